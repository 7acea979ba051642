// The C++ trie backend: the flat per-level CSR layout of python_trie.py, built from a numpy code
// matrix in two linear passes after one sort, and queried in whole batches with the GIL released.
//
// In memory the child offsets are uint32 rather than the file's int64: a level never has more
// nodes than the trie has IDs, and halving the offsets is most of the difference between ~76
// and ~52 bytes per ID for a million random 9-level IDs. So one trie holds at most 2^32 - 1 IDs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <unordered_map>
#include <vector>

namespace py = pybind11;

namespace {

using Offset = uint32_t;
constexpr int64_t kAbsent = -1;
constexpr uint64_t kMaxIds = std::numeric_limits<Offset>::max();
// fill_mask copies a row rather than rebuilding it once a node has >= width / kDenseFraction children.
constexpr int64_t kDenseFraction = 16;

using OffsetArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using CodeArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using BatchArray = py::array_t<int64_t, py::array::c_style>;

struct Level {
  std::vector<Offset> start;  // n_d + 1 offsets into `code`
  std::vector<int32_t> code;  // n_{d+1} child codes, ascending within each node
  int64_t num_nodes() const { return static_cast<int64_t>(start.size()) - 1; }
};

// A failure found while the GIL is released; turned into a Python exception once it is back.
struct BatchError {
  std::string message;
  bool failed() const { return !message.empty(); }
  void raise_if_failed() const {
    if (failed()) throw py::value_error(message);
  }
};

int bit_width(uint64_t value) {
  int bits = 0;
  for (; value; value >>= 1) ++bits;
  return bits;
}

// ---- build --------------------------------------------------------------------------------------

// A row index with the row's leading codes packed into one integer, so that nearly every sort
// comparison is a single integer compare instead of two cache-missing walks through the matrix.
struct SortEntry {
  uint64_t key;
  uint32_t row;
};

template <typename T>
class CodeMatrix {
 public:
  CodeMatrix(const T* data, size_t rows, size_t cols) : data_(data), rows_(rows), cols_(cols) {}
  size_t rows() const { return rows_; }
  size_t cols() const { return cols_; }
  const T* row(size_t r) const { return data_ + r * cols_; }

  // First column, at or after `from`, where rows a and b differ; cols() if none.
  size_t first_difference(size_t a, size_t b, size_t from = 0) const {
    const T *ra = row(a), *rb = row(b);
    while (from < cols_ && ra[from] == rb[from]) ++from;
    return from;
  }

  // Largest code per column; throws unless every code fits in [0, 2^31).
  std::vector<uint64_t> column_max() const {
    std::vector<uint64_t> out(cols_, 0);
    for (size_t r = 0; r < rows_; ++r) {
      for (size_t c = 0; c < cols_; ++c) {
        const int64_t v = static_cast<int64_t>(row(r)[c]);
        if (v < 0 || v > std::numeric_limits<int32_t>::max())
          throw py::value_error("trie codes must lie in [0, 2147483647], got " + std::to_string(v));
        out[c] = std::max(out[c], static_cast<uint64_t>(v));
      }
    }
    return out;
  }

 private:
  const T* data_;
  size_t rows_, cols_;
};

// Row indices in lexicographic order of their rows.
template <typename T>
std::vector<SortEntry> sorted_rows(const CodeMatrix<T>& m, const std::vector<uint64_t>& col_max) {
  // Pack as many leading columns as fit in 64 bits, each in its own bit width.
  std::vector<int> bits(m.cols());
  size_t packed = 0;
  for (int used = 0; packed < m.cols(); ++packed) {
    bits[packed] = bit_width(col_max[packed]);
    if (used + bits[packed] > 64) break;
    used += bits[packed];
  }
  std::vector<SortEntry> entries(m.rows());
  for (size_t r = 0; r < m.rows(); ++r) {
    uint64_t key = 0;
    for (size_t c = 0; c < packed; ++c) key = (key << bits[c]) | static_cast<uint64_t>(m.row(r)[c]);
    entries[r] = {key, static_cast<uint32_t>(r)};
  }
  std::sort(entries.begin(), entries.end(), [&](const SortEntry& a, const SortEntry& b) {
    if (a.key != b.key) return a.key < b.key;
    const size_t c = m.first_difference(a.row, b.row, packed);
    return c < m.cols() && m.row(a.row)[c] < m.row(b.row)[c];
  });
  return entries;
}

// CSR levels from rows in sorted order: one pass finds, for each distinct row, the first column
// where it leaves the previous row (the depth at which it branches off); a second writes codes.
template <typename T>
std::vector<Level> levels_from_sorted(const CodeMatrix<T>& m, std::vector<SortEntry>& entries) {
  const size_t num_levels = m.cols();
  // Reuse the sort entries: key becomes the branch depth, duplicates are dropped in place.
  size_t kept = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    const size_t branch = i == 0 ? 0 : m.first_difference(entries[kept - 1].row, entries[i].row);
    if (branch == num_levels) continue;  // a duplicate ID
    entries[kept++] = {branch, entries[i].row};
  }
  entries.resize(kept);

  // A row branching at depth b adds one child entry at every level d >= b.
  std::vector<size_t> children_per_level(num_levels, 0);
  for (const SortEntry& e : entries) ++children_per_level[e.key];
  for (size_t d = 1; d < num_levels; ++d) children_per_level[d] += children_per_level[d - 1];

  std::vector<Level> levels(num_levels);
  for (size_t d = 0; d < num_levels; ++d) {
    levels[d].code.resize(children_per_level[d]);
    levels[d].start.resize((d == 0 ? 1 : children_per_level[d - 1]) + 1);
  }
  std::vector<size_t> next_code(num_levels, 0), next_node(num_levels, 0);
  for (const SortEntry& e : entries) {
    const T* row = m.row(e.row);
    for (size_t d = e.key; d < num_levels; ++d) {
      // Below the branch depth the row opens a new node at depth d; its children start here.
      if (d > e.key) levels[d].start[next_node[d]++] = static_cast<Offset>(next_code[d]);
      levels[d].code[next_code[d]++] = static_cast<int32_t>(row[d]);
    }
  }
  // The root's range starts at 0 (from resize); every level's last offset closes its last node.
  for (Level& level : levels) level.start.back() = static_cast<Offset>(level.code.size());
  return levels;
}

// ---- the trie -------------------------------------------------------------------------------

class Trie {
 public:
  explicit Trie(std::vector<Level> levels) : levels_(std::move(levels)) {}

  static Trie build(const py::array& codes) {
    if (codes.ndim() != 2 || codes.shape(1) == 0)
      throw py::value_error("trie IDs must be a 2-D integer array [N, L] with L >= 1");
    if (static_cast<uint64_t>(codes.shape(0)) > kMaxIds)
      throw py::value_error("the C++ trie holds at most 2^32 - 1 IDs");
    if (py::isinstance<py::array_t<int32_t>>(codes)) return build_typed<int32_t>(codes);
    if (py::isinstance<py::array_t<int64_t>>(codes)) return build_typed<int64_t>(codes);
    throw py::value_error("trie IDs must be an int32 or int64 array, got dtype " +
                          std::string(py::str(codes.dtype())));
  }

  // From the file's arrays (int64 offsets, int32 codes), checked so that no later query can
  // read out of bounds whatever the file held.
  static Trie from_csr(const std::vector<OffsetArray>& starts, const std::vector<CodeArray>& codes) {
    if (starts.empty() || starts.size() != codes.size())
      throw py::value_error("corrupt trie: need one offset array and one code array per level, at least one level");
    std::vector<Level> levels(starts.size());
    int64_t num_nodes = 1;  // the root
    for (size_t d = 0; d < starts.size(); ++d) {
      levels[d] = checked_level(d, num_nodes, starts[d], codes[d]);
      num_nodes = static_cast<int64_t>(levels[d].code.size());
    }
    return Trie(std::move(levels));
  }

  size_t num_levels() const { return levels_.size(); }
  size_t size() const { return levels_.back().code.size(); }

  size_t nbytes() const {
    size_t total = 0;
    for (const Level& level : levels_)
      total += level.start.size() * sizeof(Offset) + level.code.size() * sizeof(int32_t);
    return total;
  }

  const Level& level(size_t depth) const { return levels_.at(depth); }

  py::array_t<int32_t> ids() const {
    const size_t num_ids = size(), L = num_levels();
    py::array_t<int32_t> out({num_ids, L});
    int32_t* dst = out.mutable_data();
    py::gil_scoped_release release;
    // first_leaf[k]: the first leaf under node k at the current depth (plus a sentinel), going up
    // from the leaves; each level's codes are then written over their nodes' leaf ranges.
    std::vector<Offset> first_leaf(num_ids + 1);
    for (size_t k = 0; k <= num_ids; ++k) first_leaf[k] = static_cast<Offset>(k);
    for (size_t d = L; d-- > 0;) {
      const Level& lv = levels_[d];
      for (size_t k = 0; k < lv.code.size(); ++k)
        for (size_t leaf = first_leaf[k]; leaf < first_leaf[k + 1]; ++leaf) dst[leaf * L + d] = lv.code[k];
      std::vector<Offset> parent_first(lv.start.size());
      for (size_t j = 0; j < lv.start.size(); ++j) parent_first[j] = first_leaf[lv.start[j]];
      first_leaf.swap(parent_first);
    }
    return out;
  }

  py::array_t<int32_t> children(const std::vector<int64_t>& prefix) const {
    if (prefix.size() >= num_levels()) return py::array_t<int32_t>(0);
    int64_t node = 0;
    for (size_t d = 0; d < prefix.size() && node != kAbsent; ++d) node = find_child(levels_[d], node, prefix[d]);
    if (node == kAbsent) return py::array_t<int32_t>(0);
    const Level& lv = levels_[prefix.size()];
    const Offset lo = lv.start[node], hi = lv.start[node + 1];
    py::array_t<int32_t> out(hi - lo);
    std::copy(lv.code.begin() + lo, lv.code.begin() + hi, out.mutable_data());
    return out;
  }

  py::array_t<int64_t> advance(int64_t depth, const BatchArray& nodes, const BatchArray& codes) const {
    const Level& lv = checked_depth(depth);
    if (nodes.ndim() != 1 || codes.ndim() != 1 || nodes.shape(0) != codes.shape(0))
      throw py::value_error("nodes and codes must be 1-D arrays of one length");
    const int64_t batch = nodes.shape(0);
    py::array_t<int64_t> out(batch);
    const int64_t *node_in = nodes.data(), *code_in = codes.data();
    int64_t* node_out = out.mutable_data();
    BatchError error;
    {
      py::gil_scoped_release release;
      for (int64_t i = 0; i < batch && check_node(lv, depth, node_in[i], error); ++i)
        node_out[i] = node_in[i] == kAbsent ? kAbsent : find_child(lv, node_in[i], code_in[i]);
    }
    error.raise_if_failed();
    return out;
  }

  void fill_mask(int64_t depth, const BatchArray& nodes, py::array mask) const {
    const Level& lv = checked_depth(depth);
    if (mask.ndim() != 2 || mask.dtype().kind() != 'b' || mask.itemsize() != 1)
      throw py::value_error("mask must be a 2-D numpy bool array [B, width]");
    if (nodes.ndim() != 1 || nodes.shape(0) != mask.shape(0))
      throw py::value_error("nodes must be 1-D with one entry per mask row");
    // (numpy gives an empty array zero strides, so only a non-empty mask can be misaligned.)
    if (mask.shape(0) > 0 && mask.shape(1) > 1 && mask.strides(1) != 1)
      throw py::value_error("mask rows must be contiguous (unit stride along the width)");
    if (!mask.writeable()) throw py::value_error("mask must be writable");
    const int64_t batch = nodes.shape(0), width = mask.shape(1), row_stride = mask.strides(0);
    const int64_t* node_in = nodes.data();
    char* rows = static_cast<char*>(mask.mutable_data());
    BatchError error;
    {
      py::gil_scoped_release release;
      // Beams share prefixes, and a node with many children costs thousands of single-byte
      // stores: such a node's row is written once per call and copied for its other rows.
      std::unordered_map<int64_t, const char*> dense_rows;
      // One large clear streams through memory much faster than a clear per 4 KB row.
      const bool cleared = batch > 0 && row_stride == width;
      if (cleared) std::memset(rows, 0, static_cast<size_t>(batch * width));
      for (int64_t b = 0; b < batch && check_node(lv, depth, node_in[b], error); ++b) {
        char* row = rows + b * row_stride;
        const int64_t node = node_in[b];
        const bool dense = node != kAbsent && int64_t{lv.start[node + 1] - lv.start[node]} * kDenseFraction >= width;
        const auto filled = dense ? dense_rows.find(node) : dense_rows.end();
        if (filled != dense_rows.end()) {
          std::memcpy(row, filled->second, static_cast<size_t>(width));
          continue;
        }
        if (!cleared) std::memset(row, 0, static_cast<size_t>(width));
        if (node == kAbsent) continue;
        if (!set_children(lv, node, row, width, depth, error)) break;
        if (dense) dense_rows.emplace(node, row);
      }
    }
    error.raise_if_failed();
  }

 private:
  std::vector<Level> levels_;

  template <typename T>
  static Trie build_typed(const py::array& array) {
    const auto codes = py::array_t<T, py::array::c_style>::ensure(array);
    const CodeMatrix<T> matrix(codes.data(), codes.shape(0), codes.shape(1));
    const std::vector<uint64_t> col_max = matrix.column_max();
    py::gil_scoped_release release;
    std::vector<SortEntry> entries = sorted_rows(matrix, col_max);
    return Trie(levels_from_sorted(matrix, entries));
  }

  static Level checked_level(size_t depth, int64_t num_nodes, const OffsetArray& start, const CodeArray& code) {
    const auto fail = [depth](const std::string& problem) {
      return py::value_error("corrupt trie at depth " + std::to_string(depth) + ": " + problem);
    };
    const int64_t n_start = start.size(), n_code = code.size();
    if (start.ndim() != 1 || code.ndim() != 1 || n_start != num_nodes + 1)
      throw fail(std::to_string(n_start) + " child offsets for " + std::to_string(num_nodes) + " nodes");
    if (static_cast<uint64_t>(n_code) > kMaxIds) throw fail("more nodes than the C++ trie can address");
    const int64_t* s = start.data();
    const int32_t* c = code.data();
    if (s[0] != 0 || s[num_nodes] != n_code) throw fail("child offsets do not cover the child codes");
    for (int64_t j = 0; j < num_nodes; ++j) {
      if (s[j + 1] < s[j] || (depth > 0 && s[j + 1] == s[j]))
        throw fail("child offsets must increase (every node above the leaves has a child)");
      for (int64_t k = s[j]; k < s[j + 1]; ++k)
        if (c[k] < 0 || (k > s[j] && c[k] <= c[k - 1]))
          throw fail("child codes are not sorted, distinct and non-negative within a node");
    }
    Level level;
    level.start.assign(s, s + n_start);  // every offset is now known to lie in [0, n_code]
    level.code.assign(c, c + n_code);
    return level;
  }

  const Level& checked_depth(int64_t depth) const {
    if (depth < 0 || depth >= static_cast<int64_t>(num_levels()))
      throw py::value_error("depth must be in [0, " + std::to_string(num_levels()) + ") for a trie with " +
                            std::to_string(num_levels()) + " levels, got " + std::to_string(depth));
    return levels_[depth];
  }

  // True when `node` may be used at this depth (-1 included); otherwise records why not.
  static bool check_node(const Level& lv, int64_t depth, int64_t node, BatchError& error) {
    if (node >= kAbsent && node < lv.num_nodes()) return true;
    error.message = "node id " + std::to_string(node) + " does not exist at depth " + std::to_string(depth) + " (" +
                    std::to_string(lv.num_nodes()) + " nodes; -1 means absent)";
    return false;
  }

  // Marks the children of `node` in a cleared mask row; false (with the reason) if one does not fit.
  static bool set_children(const Level& lv, int64_t node, char* row, int64_t width, int64_t depth,
                           BatchError& error) {
    const Offset lo = lv.start[node], hi = lv.start[node + 1];
    if (hi > lo && lv.code[hi - 1] >= width) {  // codes ascend, so the last one is the largest
      error.message = "child code " + std::to_string(lv.code[hi - 1]) + " at depth " + std::to_string(depth) +
                      " does not fit a mask of width " + std::to_string(width);
      return false;
    }
    for (Offset k = lo; k < hi; ++k) row[lv.code[k]] = 1;
    return true;
  }

  // The child of `node` reached by `code` (its index in the level's code array), or kAbsent.
  static int64_t find_child(const Level& lv, int64_t node, int64_t code) {
    if (code < 0 || code > std::numeric_limits<int32_t>::max()) return kAbsent;
    const auto first = lv.code.begin() + lv.start[node], last = lv.code.begin() + lv.start[node + 1];
    const auto it = std::lower_bound(first, last, static_cast<int32_t>(code));
    return it != last && *it == code ? it - lv.code.begin() : kAbsent;
  }
};

// A read-only numpy view of a vector inside the trie; `owner` (the Python Trie) keeps it alive.
template <typename T>
py::array_t<T> view_of(const std::vector<T>& values, const py::object& owner) {
  py::array_t<T> out(values.size(), values.data(), owner);
  out.attr("setflags")(py::arg("write") = false);
  return out;
}

}  // namespace

PYBIND11_MODULE(_trie, m) {
  m.doc() = "C++ core of the GENIUS ID trie; use genius.trie_cpp.build_trie / load_trie.";
  const auto starts_view = [](const py::object& self, size_t depth) {
    return view_of(self.cast<const Trie&>().level(depth).start, self);
  };
  const auto codes_view = [](const py::object& self, size_t depth) {
    return view_of(self.cast<const Trie&>().level(depth).code, self);
  };
  py::class_<Trie>(m, "Trie")
      .def_static("build", &Trie::build, py::arg("codes"), "Trie over the distinct rows of an int32/int64 [N, L] array")
      .def_static("from_csr", &Trie::from_csr, py::arg("child_start"), py::arg("child_code"),
                  "Trie from per-level CSR arrays (int64 offsets, int32 codes), checked first.")
      .def_property_readonly("num_levels", &Trie::num_levels)
      .def_property_readonly("nbytes", &Trie::nbytes)
      .def("__len__", &Trie::size)
      .def("ids", &Trie::ids)
      .def("children", &Trie::children, py::arg("prefix"))
      .def("advance", &Trie::advance, py::arg("depth"), py::arg("nodes"), py::arg("codes"))
      .def("fill_mask", &Trie::fill_mask, py::arg("depth"), py::arg("nodes"), py::arg("mask").noconvert())
      .def("child_start", starts_view, py::arg("depth"), "Read-only uint32 view of the child offsets at `depth`.")
      .def("child_code", codes_view, py::arg("depth"), "Read-only int32 view of the child codes at `depth`.");
}
