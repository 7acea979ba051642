// The self-attention of one beam-search step, reading each beam's history where it was written.
//
// A step's keys and values are stored once, at [step, row] of a layer's history, and never moved:
// a beam finds its own by its ancestors, the row it descended from at every earlier step. The
// usual layout instead reorders the whole history by the surviving beams' parents at every step
// and layer, one copy that reads and writes it all, and then attention reads it a third time;
// here attention reads it once, straight from where it lies. Beams of one query share their early
// ancestors, so those rows are read from cache.
//
// One row is one beam's newest token: for each head, scores over its history plus T5's position
// bias (no 1/sqrt(d) scaling, as T5), a softmax, and the weighted sum of the values, in fp32.
// The rows are split between `threads` threads, with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace py = pybind11;

namespace {

// GCC builds the row loop for AVX-512 and AVX2+FMA as well, picked at load time by the CPU.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define GENIUS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GENIUS_CLONES
#endif

constexpr int kLanes = 16;  // independent partial sums, so the compiler can vectorise the dot

// bf16 is stored as the top 16 bits of an fp32; the arithmetic is fp32, as in torch's CPU SDPA.
struct BFloat16 {
  uint16_t bits;
};

inline float widen(float x) { return x; }
inline float widen(BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

inline void narrow(float x, float* out) { *out = x; }
inline void narrow(float x, BFloat16* out) {  // round to nearest even, as torch rounds
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  out->bits = std::isnan(x) ? 0x7FC0 : static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

template <typename T>
struct Problem {
  const T* q;                // [rows, heads * d_kv], rows q_stride apart
  int64_t q_stride;
  const T* keys;             // [steps_max, max_rows, heads * d_kv]
  const T* values;           // the same shape
  const int64_t* ancestors;  // [steps_max, max_rows]: the row each row descends from at each step
  const float* bias;         // [heads, steps]
  T* out;                    // [rows, heads * d_kv]
  int64_t rows, max_rows, steps, heads, d_kv;
};

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += a[i + l] * widen(b[i + l]);
  float sum = 0.f;
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  for (; i < n; ++i) sum += a[i] * widen(b[i]);
  return sum;
}

template <typename T>
__attribute__((always_inline)) inline void attend_rows(const Problem<T>& p, int64_t begin, int64_t end) {
  const int64_t width = p.heads * p.d_kv;
  std::vector<float> weights(p.heads * p.steps), total(p.heads), acc(width), q(width);
  std::vector<const T*> history(p.steps);
  for (int64_t row = begin; row < end; ++row) {
    for (int64_t i = 0; i < width; ++i) q[i] = widen(p.q[row * p.q_stride + i]);
    for (int64_t s = 0; s < p.steps; ++s) history[s] = p.keys + (s * p.max_rows + p.ancestors[s * p.max_rows + row]) * width;
    for (int64_t h = 0; h < p.heads; ++h) {
      float* w = &weights[h * p.steps];
      float top = -INFINITY;
      for (int64_t s = 0; s < p.steps; ++s) {
        w[s] = dot(&q[h * p.d_kv], history[s] + h * p.d_kv, p.d_kv) + p.bias[h * p.steps + s];
        top = std::max(top, w[s]);
      }
      float sum = 0.f;
      for (int64_t s = 0; s < p.steps; ++s) sum += (w[s] = std::exp(w[s] - top));
      total[h] = sum;
    }
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t s = 0; s < p.steps; ++s) {
      const T* v = p.values + (s * p.max_rows + p.ancestors[s * p.max_rows + row]) * width;
      for (int64_t h = 0; h < p.heads; ++h) {
        const float weight = weights[h * p.steps + s];
        float* a = &acc[h * p.d_kv];
        const T* vh = v + h * p.d_kv;
        for (int64_t d = 0; d < p.d_kv; ++d) a[d] += weight * widen(vh[d]);
      }
    }
    T* out = p.out + row * width;
    for (int64_t h = 0; h < p.heads; ++h)
      for (int64_t d = 0; d < p.d_kv; ++d) narrow(acc[h * p.d_kv + d] / total[h], &out[h * p.d_kv + d]);
  }
}

// GCC's target clones are made per function, not per template, hence one entry point per type.
GENIUS_CLONES void attend_rows_fp32(const Problem<float>& p, int64_t begin, int64_t end) { attend_rows(p, begin, end); }
GENIUS_CLONES void attend_rows_bf16(const Problem<BFloat16>& p, int64_t begin, int64_t end) { attend_rows(p, begin, end); }

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("beam attention: " + what);
}

bool c_contiguous(const py::array& a) { return a.flags() & py::array::c_style; }

// out[r] = attention of q[r] over the history of row r (keys/values at [s, ancestors[s, r]] for
// s < steps = bias.shape[1]); see the file's comment. Storage is float32 arrays, or for bf16
// (`Storage` int16) the bf16 bits as int16 arrays; bias is float32 either way.
template <typename T, typename Storage>
void attend(const py::array_t<Storage>& q, const py::array_t<Storage>& keys, const py::array_t<Storage>& values,
            const py::array_t<int64_t>& ancestors, const py::array_t<float>& bias, py::array_t<Storage>& out,
            int threads) {
  require(q.ndim() == 2 && q.strides(1) == sizeof(Storage), "q must be [rows, heads * d_kv] with contiguous rows");
  require(keys.ndim() == 3 && c_contiguous(keys) && values.ndim() == 3 && c_contiguous(values),
          "keys and values must be contiguous [steps, max_rows, heads * d_kv]");
  for (int axis = 0; axis < 3; ++axis) require(keys.shape(axis) == values.shape(axis), "keys and values differ in shape");
  require(bias.ndim() == 2 && c_contiguous(bias), "bias must be contiguous [heads, steps]");
  require(ancestors.ndim() == 2 && c_contiguous(ancestors), "ancestors must be contiguous [steps, max_rows]");
  require(out.ndim() == 2 && c_contiguous(out), "out must be contiguous [rows, heads * d_kv]");
  const int64_t rows = q.shape(0), width = q.shape(1), heads = bias.shape(0), steps = bias.shape(1);
  const int64_t max_rows = keys.shape(1);
  require(heads > 0 && width % heads == 0, "q's width is not a multiple of the heads");
  require(keys.shape(2) == width && out.shape(0) == rows && out.shape(1) == width, "q, keys and out differ in width");
  require(steps >= 1 && steps <= keys.shape(0), "bias has more steps than the history");
  require(rows <= max_rows && ancestors.shape(0) == keys.shape(0) && ancestors.shape(1) == max_rows,
          "ancestors must be [steps, max_rows] of the history, with rows <= max_rows");
  const int64_t* lineage = ancestors.data();
  for (int64_t s = 0; s < steps; ++s)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t a = lineage[s * max_rows + r];
      require(a >= 0 && a < max_rows, "ancestor row out of range");
    }
  const Problem<T> p{reinterpret_cast<const T*>(q.data()), q.strides(0) / static_cast<int64_t>(sizeof(Storage)),
                     reinterpret_cast<const T*>(keys.data()), reinterpret_cast<const T*>(values.data()), lineage,
                     bias.data(), reinterpret_cast<T*>(out.mutable_data()), rows, max_rows, steps, heads, width / heads};
  void (*const run)(const Problem<T>&, int64_t, int64_t) = [] {
    if constexpr (std::is_same_v<T, float>) return &attend_rows_fp32;
    else return &attend_rows_bf16;
  }();
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, rows / 16));
  py::gil_scoped_release release;
  std::vector<std::thread> pool;
  for (int64_t w = 1; w < workers; ++w) pool.emplace_back(run, std::cref(p), rows * w / workers, rows * (w + 1) / workers);
  run(p, 0, rows / workers);
  for (auto& t : pool) t.join();
}

}  // namespace

PYBIND11_MODULE(_beam_attention, m) {
  m.doc() = "C++ self-attention of a beam-search step over histories stored in place; see fused_decoder.py.";
  const auto args = [](auto f, const char* name, py::module_& m, const char* doc) {
    m.def(name, f, py::arg("q").noconvert(), py::arg("keys").noconvert(), py::arg("values").noconvert(),
          py::arg("ancestors").noconvert(), py::arg("bias").noconvert(), py::arg("out").noconvert(), py::arg("threads"),
          doc);
  };
  args(&attend<float, float>, "attend", m, "out[r] = the attention of q[r] over row r's history (see the source)");
  args(&attend<BFloat16, int16_t>, "attend_bf16", m, "attend on bf16 arrays given as their bits, viewed as int16");
}
