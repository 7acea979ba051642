// C++ kernels of a CPU beam-search step, where torch's general ops read and write too much.
//
// attend: the step's self-attention, reading each beam's history where it was written. A step's
// keys and values are stored once, at [step, row] of a layer's history, and never moved: a beam
// finds its own by its ancestors, the row it descended from at every earlier step. The usual
// layout instead reorders the whole history by the surviving beams' parents at every step and
// layer, one copy that reads and writes it all, and then attention reads it a third time; here
// attention reads it once, straight from where it lies. Beams of one query share their early
// ancestors, so those rows are read from cache. One row is one beam's newest token: for each
// head, scores over its history plus T5's position bias (no 1/sqrt(d) scaling, as T5), a softmax
// (its weights that would be subnormal are zero: unnormalised_weight), and the weighted sum of the
// values, in fp32.
//
// top_allowed: a level's beam selection, the best `keep` of beam score + log-probability over
// the trie-allowed codes of each query's beams, in one pass over the log-probabilities (torch
// adds, masks a copy and runs topk: three passes over [rows, K] and two fresh tensors).
//
// add_rms_norm: the residual stream's update and the next layer norm, x += delta, then T5's
// RMS norm of x, in one pass over each row (torch runs an add and five element-wise ops, and for
// bf16 a conversion on each side).
//
// int8 decoding (add_rms_norm_int8, quantize, scale_sums): the step's
// products are torch._int_mm's, int8 operands and int32 sums; these kernels write the operands
// and read the sums in the passes that are there anyway. A product's input row is quantized
// symmetrically with its own scale (max |x| / levels), so the norm quantizes its output as it
// writes it, and the sums are scaled back (sum * row scale * column scale) where they are read:
// in the residual update before the next norm, into q and the history, or straight into the
// next product's quantized input (the feed-forward's ReLU between them).
//
// Each splits its work between `threads` OpenMP threads, with the GIL released: torch's own
// threads, since the libgomp torch loads is the one these find (see setup.py). Threads of their
// own would compete with torch's workers, which spin for a while after each op (measured: the
// search 10-20 % slower than with one thread).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace py = pybind11;

namespace {

// GCC (11 or later, for these names) builds the row loops for AVX-512 and AVX2+FMA as well, picked
// at load time by the CPU (an ifunc: glibc only).
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__linux__)
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

// A softmax weight exp(score - top), flushed to zero where it would be subnormal (below FLT_MIN,
// a score more than 87.3 under the row's top): the CPU multiplies subnormal operands through a
// microcode assist (a product with a tenth of its operands subnormal ran 20-25x slower,
// BENCHMARKS.md), and trained attention is that peaked often enough (the demo's decoder: 2 % of
// its cross-attention weights). What is dropped is under 1.2e-38 of the top weight's 1. -88 lies
// below log(FLT_MIN), so every normal weight is still computed, and expf's underflow path is never
// taken. A NaN score stays NaN.
inline float unnormalised_weight(float score_below_top) {
  if (score_below_top < -88.f) return 0.f;
  const float weight = std::exp(score_below_top);
  return weight < FLT_MIN ? 0.f : weight;
}

template <typename T>
__attribute__((always_inline)) inline void attend_rows(const Problem<T>& p, int64_t begin, int64_t end) {
  const int64_t width = p.heads * p.d_kv;
  std::vector<float> weights(p.heads * p.steps), total(p.heads), acc(width), q(width);
  for (int64_t row = begin; row < end; ++row) {
    for (int64_t i = 0; i < width; ++i) q[i] = widen(p.q[row * p.q_stride + i]);
    // Each step's key row is read once, front to back, every head's score from it in turn: one
    // run of heads * d_kv values per step (about 10 % faster in a replay than a head's slice of
    // every step at a time, the order before; each score is the same sum).
    for (int64_t s = 0; s < p.steps; ++s) {
      const T* k = p.keys + (s * p.max_rows + p.ancestors[s * p.max_rows + row]) * width;
      for (int64_t h = 0; h < p.heads; ++h)
        weights[h * p.steps + s] = dot(&q[h * p.d_kv], k + h * p.d_kv, p.d_kv) + p.bias[h * p.steps + s];
    }
    for (int64_t h = 0; h < p.heads; ++h) {
      float* w = &weights[h * p.steps];
      float top = -INFINITY;
      for (int64_t s = 0; s < p.steps; ++s) top = std::max(top, w[s]);
      float sum = 0.f;
      for (int64_t s = 0; s < p.steps; ++s) sum += (w[s] = unnormalised_weight(w[s] - top));
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

// Symmetric int8 quantization of a row x[0..d): returns its scale, max |x| / levels, and writes
// q = x / scale rounded to nearest even (as torch.round), in [-levels, levels]. A row of zeros
// (or of values so small that the scale underflows) has scale 0 and q 0; a row holding inf or NaN
// gets scale NaN, so that what its product scales back is NaN, as the fp32 product's would be, for
// the search's check to see.
__attribute__((always_inline)) inline float quantize_row(const float* x, int64_t d, float levels, int8_t* q) {
  // max |x| over the bits: with the sign cleared, floats order as their bits, inf and NaN above
  // every finite value; an integer max the compiler vectorises (a float max it keeps scalar, for NaN)
  uint32_t top_bits = 0;
  for (int64_t i = 0; i < d; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &x[i], sizeof bits);
    top_bits = std::max(top_bits, bits & 0x7FFFFFFFu);
  }
  float top;
  std::memcpy(&top, &top_bits, sizeof top);
  const float scale = top_bits >= 0x7F800000u ? NAN : top / levels;
  if (!(scale > 0.f)) {
    std::fill(q, q + d, int8_t{0});
    return std::isnan(scale) ? NAN : 0.f;
  }
  for (int64_t j = 0; j < d; ++j)
    q[j] = static_cast<int8_t>(std::min(levels, std::max(-levels, std::nearbyint(x[j] / scale))));
  return scale;
}

// An update's value i as fp32: a stored fp32 or bf16 value, or an int8 product's int32 sum
// scaled back by its input row's scale and its column's (in that order, as the Python reference).
inline float update_value(const float* delta, int64_t i, float, const float*) { return delta[i]; }
inline float update_value(const BFloat16* delta, int64_t i, float, const float*) { return widen(delta[i]); }
inline float update_value(const int32_t* sums, int64_t i, float row_scale, const float* column_scales) {
  return static_cast<float>(sums[i]) * row_scale * column_scales[i];
}

// The norm's rows begin..end of [rows, d] arrays, per (update, output) type: fp32's, bf16's
// (bf16 products' updates; bf16 normed states for the next product, fp32 for the head), and
// int8's (int32 sums' updates; int8 normed states with a scale per row, fp32 for the head).
template <typename Delta, typename Out>
struct NormRows {
  float* x;
  const Delta* delta;  // nullptr: no update
  const float* weight;
  float eps;
  Out* out;
  int64_t d;
  const float* delta_scales = nullptr;    // int32 sums: their input rows' scales [rows]
  const float* column_scales = nullptr;  // and their columns' [d]
  float* out_scales = nullptr;           // int8 out: each row's scale [rows]
  float levels = 127.f;
};

// Inlined into each clone below, so that each is compiled for its CPU (a shared out-of-line copy
// would be the default target's, and its rounding differ from the fp32 clone's where FMA is used).
// `normed`: d floats of scratch for an int8 output, quantized once the row is normed.
template <typename Delta, typename Out>
__attribute__((always_inline)) inline void add_rms_norm_row(const NormRows<Delta, Out>& p, int64_t row, float* normed) {
  const int64_t d = p.d;
  float* x = p.x + row * d;
  const Delta* delta = p.delta ? p.delta + row * d : nullptr;
  const float row_scale = p.delta_scales ? p.delta_scales[row] : 1.f;
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float v = delta ? x[i + l] + update_value(delta, i + l, row_scale, p.column_scales) : x[i + l];
      x[i + l] = v;
      lanes[l] += v * v;
    }
  float squares = 0.f;
  for (int l = 0; l < kLanes; ++l) squares += lanes[l];
  for (; i < d; ++i) {
    x[i] = delta ? x[i] + update_value(delta, i, row_scale, p.column_scales) : x[i];
    squares += x[i] * x[i];
  }
  const float inverse = 1.f / std::sqrt(squares / static_cast<float>(d) + p.eps);
  Out* out = p.out + row * d;
  if constexpr (std::is_same_v<Out, int8_t>) {
    for (int64_t j = 0; j < d; ++j) normed[j] = p.weight[j] * (x[j] * inverse);
    p.out_scales[row] = quantize_row(normed, d, p.levels, out);
  } else {
    for (int64_t j = 0; j < d; ++j) narrow(p.weight[j] * (x[j] * inverse), &out[j]);
  }
}

template <typename Delta, typename Out>
__attribute__((always_inline)) inline void add_rms_norm_rows(const NormRows<Delta, Out>& p, int64_t begin, int64_t end) {
  std::vector<float> normed(std::is_same_v<Out, int8_t> ? p.d : 0);
  for (int64_t row = begin; row < end; ++row) add_rms_norm_row(p, row, normed.data());
}

// An int8 product's sums [rows, n] (rows `sums_stride` apart) scaled back, ReLU'd if `relu`:
// into fp32 rows (`out_stride` apart), or quantized again, row by row, as the next product's input.
struct ScaleRows {
  const int32_t* sums;
  int64_t sums_stride;
  const float* sum_scales;     // [rows]
  const float* column_scales;  // [n]
  bool relu;
  int64_t n;
  float* out;  // fp32 out, or nullptr for int8
  int64_t out_stride;
  int8_t* quantized;  // int8 out [rows, n], contiguous
  float* out_scales;  // its rows' scales
  float levels;
};

__attribute__((always_inline)) inline void scale_rows(const ScaleRows& p, int64_t begin, int64_t end) {
  std::vector<float> scratch(p.out ? 0 : p.n);
  for (int64_t row = begin; row < end; ++row) {
    const int32_t* sums = p.sums + row * p.sums_stride;
    float* out = p.out ? p.out + row * p.out_stride : scratch.data();
    const float row_scale = p.sum_scales[row];
    for (int64_t j = 0; j < p.n; ++j) {
      const float v = update_value(sums, j, row_scale, p.column_scales);
      out[j] = p.relu && v < 0.f ? 0.f : v;  // a NaN stays NaN, as through torch's relu
    }
    if (!p.out) p.out_scales[row] = quantize_row(out, p.n, p.levels, p.quantized + row * p.n);
  }
}

// fp32 rows [rows, d] (`x_stride` apart) quantized as a product's input: int8 [rows, d] and a scale per row.
struct QuantizeRows {
  const float* x;
  int64_t x_stride;
  int64_t d;
  int8_t* out;
  float* out_scales;
  float levels;
};

__attribute__((always_inline)) inline void quantize_rows(const QuantizeRows& p, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row)
    p.out_scales[row] = quantize_row(p.x + row * p.x_stride, p.d, p.levels, p.out + row * p.d);
}

// GCC's target clones are made per function, not per template, hence one entry point per type.
GENIUS_CLONES void attend_rows_fp32(const Problem<float>& p, int64_t begin, int64_t end) { attend_rows(p, begin, end); }
GENIUS_CLONES void attend_rows_bf16(const Problem<BFloat16>& p, int64_t begin, int64_t end) { attend_rows(p, begin, end); }
GENIUS_CLONES void norm_rows_fp32(const NormRows<float, float>& p, int64_t begin, int64_t end) {
  add_rms_norm_rows(p, begin, end);
}
GENIUS_CLONES void norm_rows_bf16(const NormRows<BFloat16, BFloat16>& p, int64_t begin, int64_t end) {
  add_rms_norm_rows(p, begin, end);
}
GENIUS_CLONES void norm_rows_bf16_to_fp32(const NormRows<BFloat16, float>& p, int64_t begin, int64_t end) {
  add_rms_norm_rows(p, begin, end);
}
GENIUS_CLONES void norm_rows_int32_to_int8(const NormRows<int32_t, int8_t>& p, int64_t begin, int64_t end) {
  add_rms_norm_rows(p, begin, end);
}
GENIUS_CLONES void norm_rows_int32_to_fp32(const NormRows<int32_t, float>& p, int64_t begin, int64_t end) {
  add_rms_norm_rows(p, begin, end);
}
GENIUS_CLONES void scale_rows_clones(const ScaleRows& p, int64_t begin, int64_t end) { scale_rows(p, begin, end); }
GENIUS_CLONES void quantize_rows_clones(const QuantizeRows& p, int64_t begin, int64_t end) { quantize_rows(p, begin, end); }

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("beam attention: " + what);
}

bool c_contiguous(const py::array& a) { return a.flags() & py::array::c_style; }

// Runs work(begin, end) over 0..n split evenly between `workers` threads (this one included).
void split(int64_t n, int64_t workers, const std::function<void(int64_t, int64_t)>& work) {
  workers = std::max<int64_t>(1, std::min(workers, n));
#ifdef _OPENMP  // built without OpenMP (see setup.py), the loop runs serially
#pragma omp parallel for num_threads(workers) schedule(static, 1)
#endif
  for (int64_t w = 0; w < workers; ++w) work(n * w / workers, n * (w + 1) / workers);
}

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
  py::gil_scoped_release release;
  split(rows, std::min<int64_t>(threads, rows / 16), [&](int64_t begin, int64_t end) { run(p, begin, end); });
}

// x += delta (when given), then out = weight * x / sqrt(mean(x^2) + eps) per row of x [rows, d],
// as T5's layer norm, in fp32 (the stream x is fp32). delta and out are float32 arrays, or bf16
// given as its bits (int16 arrays): a bf16 update is widened exactly, a bf16 output rounded to
// nearest even (as torch's .to(bf16) of the fp32 norm). The pairs a decoder needs: fp32 update
// and output; bf16 update (or none) and bf16 output; bf16 update and fp32 output. x and out must
// not overlap.
void add_rms_norm(py::array_t<float>& x, const py::object& delta, const py::array_t<float>& weight, double eps,
                  py::array& out, int threads) {
  require(x.ndim() == 2 && c_contiguous(x), "x must be contiguous [rows, d]");
  const int64_t rows = x.shape(0), d = x.shape(1);
  require(weight.ndim() == 1 && weight.shape(0) == d && c_contiguous(weight), "weight must be contiguous [d]");
  const auto is = [](const py::array& a, auto type) { return a.dtype().is(py::dtype::of<decltype(type)>()); };
  require(is(out, float{}) || is(out, int16_t{}), "out must be a float32 array, or bf16 bits as an int16 array");
  require(out.ndim() == 2 && c_contiguous(out) && out.shape(0) == rows && out.shape(1) == d, "out must be x's shape");
  require(out.writeable(), "out must be writeable");
  const bool bf16_out = is(out, int16_t{});
  py::array delta_array;
  bool bf16_delta = bf16_out;  // no update: the output's type picks the kernel
  if (!delta.is_none()) {
    const char* delta_types = "delta must be a float32 array, bf16 bits as an int16 array, or None";
    require(py::isinstance<py::array>(delta), delta_types);
    delta_array = delta.cast<py::array>();
    require(is(delta_array, float{}) || is(delta_array, int16_t{}), delta_types);
    require(delta_array.ndim() == 2 && c_contiguous(delta_array) && delta_array.shape(0) == rows &&
                delta_array.shape(1) == d, "delta must be contiguous, x's shape");
    bf16_delta = is(delta_array, int16_t{});
  }
  require(bf16_delta || !bf16_out, "a float32 delta with a bf16 out is not a decoder's pair");
  float* stream = x.mutable_data();
  const void* add = delta.is_none() ? nullptr : delta_array.data();
  void* normed = out.mutable_data();
  const float* scale = weight.data();
  const float epsilon = static_cast<float>(eps);
  const auto* add_bf16 = static_cast<const BFloat16*>(add);
  py::gil_scoped_release release;
  split(rows, std::min<int64_t>(threads, rows / 32), [&](int64_t begin, int64_t end) {
    if (!bf16_delta)
      norm_rows_fp32({stream, static_cast<const float*>(add), scale, epsilon, static_cast<float*>(normed), d}, begin, end);
    else if (bf16_out)
      norm_rows_bf16({stream, add_bf16, scale, epsilon, static_cast<BFloat16*>(normed), d}, begin, end);
    else
      norm_rows_bf16_to_fp32({stream, add_bf16, scale, epsilon, static_cast<float*>(normed), d}, begin, end);
  });
}

// Row strides in elements of an array with contiguous rows (2-d, unit column stride).
template <typename T>
int64_t row_stride(const py::array& a, const char* what) {
  require(a.ndim() == 2 && a.strides(1) == static_cast<int64_t>(sizeof(T)) && a.strides(0) % sizeof(T) == 0 &&
              a.strides(0) >= a.shape(1) * static_cast<int64_t>(sizeof(T)),
          std::string(what) + " must be 2-d with contiguous rows");
  return a.strides(0) / static_cast<int64_t>(sizeof(T));
}

void require_vector(const py::array_t<float>& a, int64_t n, const char* what) {
  require(a.ndim() == 1 && a.shape(0) == n && c_contiguous(a), std::string(what) + " must be contiguous float32 [" +
                                                                   std::to_string(n) + "]");
}

void require_levels(double levels) { require(levels >= 1 && levels <= 127, "levels must be in 1..127"); }

// The int8 decoder's norm: x += sums * sum_scales[row] * column_scales (unless sums is None), then
// out = T5's RMS norm of x times weight, per row: int8 with a scale per row into out_scales (the
// next product's input), or fp32 (the last layer's, for the head; out_scales None).
void add_rms_norm_int8(py::array_t<float>& x, const py::object& sums, const py::object& sum_scales,
                       const py::object& column_scales, const py::array_t<float>& weight, double eps, py::array& out,
                       const py::object& out_scales, double levels, int threads) {
  require(x.ndim() == 2 && c_contiguous(x), "x must be contiguous [rows, d]");
  const int64_t rows = x.shape(0), d = x.shape(1);
  require_vector(weight, d, "weight");
  const bool int8_out = out.dtype().is(py::dtype::of<int8_t>());
  require(int8_out || out.dtype().is(py::dtype::of<float>()), "out must be an int8 or a float32 array");
  require(out.ndim() == 2 && c_contiguous(out) && out.shape(0) == rows && out.shape(1) == d && out.writeable(),
          "out must be writeable, contiguous, x's shape");
  require(int8_out != out_scales.is_none(), "out_scales must be given exactly when out is int8");
  require_levels(levels);
  py::array_t<int32_t> sums_array;
  py::array_t<float> sum_scales_array, column_scales_array, out_scales_array;
  if (!sums.is_none()) {
    require(py::isinstance<py::array_t<int32_t>>(sums), "sums must be an int32 array or None");
    sums_array = sums.cast<py::array_t<int32_t>>();
    require(sums_array.ndim() == 2 && c_contiguous(sums_array) && sums_array.shape(0) == rows &&
                sums_array.shape(1) == d, "sums must be contiguous, x's shape");
    sum_scales_array = sum_scales.cast<py::array_t<float>>();
    column_scales_array = column_scales.cast<py::array_t<float>>();
    require_vector(sum_scales_array, rows, "sum_scales");
    require_vector(column_scales_array, d, "column_scales");
  }
  if (int8_out) {
    out_scales_array = out_scales.cast<py::array_t<float>>();
    require_vector(out_scales_array, rows, "out_scales");
    require(out_scales_array.writeable(), "out_scales must be writeable");
  }
  const int32_t* add = sums.is_none() ? nullptr : sums_array.data();
  const float* add_scales = sums.is_none() ? nullptr : sum_scales_array.data();
  const float* columns = sums.is_none() ? nullptr : column_scales_array.data();
  float* stream = x.mutable_data();
  void* normed = out.mutable_data();
  float* normed_scales = int8_out ? out_scales_array.mutable_data() : nullptr;
  const float* scale = weight.data();
  const float epsilon = static_cast<float>(eps), top = static_cast<float>(levels);
  py::gil_scoped_release release;
  split(rows, std::min<int64_t>(threads, rows / 32), [&](int64_t begin, int64_t end) {
    if (int8_out)
      norm_rows_int32_to_int8({stream, add, scale, epsilon, static_cast<int8_t*>(normed), d, add_scales, columns,
                               normed_scales, top}, begin, end);
    else
      norm_rows_int32_to_fp32({stream, add, scale, epsilon, static_cast<float*>(normed), d, add_scales, columns},
                              begin, end);
  });
}

// An int8 product's sums [rows, n] scaled back (sums * sum_scales[row] * column_scales), ReLU'd
// if `relu`: into fp32 `out` (rows may lie apart in sums and out, e.g. q, k and v of one product
// into their own buffers), or, with `out` int8, quantized per row (scales into out_scales) as the
// next product's input.
void scale_sums(const py::array& sums, const py::array_t<float>& sum_scales, const py::array_t<float>& column_scales,
                bool relu, py::array& out, const py::object& out_scales, double levels, int threads) {
  require(sums.dtype().is(py::dtype::of<int32_t>()), "sums must be an int32 array");
  const int64_t sums_stride = row_stride<int32_t>(sums, "sums"), rows = sums.shape(0), n = sums.shape(1);
  require_vector(sum_scales, rows, "sum_scales");
  require_vector(column_scales, n, "column_scales");
  require(out.shape(0) == rows && out.ndim() == 2 && out.shape(1) == n && out.writeable(),
          "out must be writeable, the shape of sums");
  const bool int8_out = out.dtype().is(py::dtype::of<int8_t>());
  require(int8_out || out.dtype().is(py::dtype::of<float>()), "out must be a float32 or an int8 array");
  require(int8_out != out_scales.is_none(), "out_scales must be given exactly when out is int8");
  require_levels(levels);
  ScaleRows p{static_cast<const int32_t*>(sums.data()), sums_stride, sum_scales.data(), column_scales.data(), relu, n,
              nullptr, 0, nullptr, nullptr, static_cast<float>(levels)};
  py::array_t<float> scales_array;
  if (int8_out) {
    require(c_contiguous(out), "an int8 out must be contiguous");
    scales_array = out_scales.cast<py::array_t<float>>();
    require_vector(scales_array, rows, "out_scales");
    require(scales_array.writeable(), "out_scales must be writeable");
    p.quantized = static_cast<int8_t*>(out.mutable_data());
    p.out_scales = scales_array.mutable_data();
  } else {
    p.out_stride = row_stride<float>(out, "out");
    p.out = static_cast<float*>(out.mutable_data());
  }
  py::gil_scoped_release release;
  split(rows, std::min<int64_t>(threads, rows / 32), [&](int64_t begin, int64_t end) { scale_rows_clones(p, begin, end); });
}

// fp32 rows x [rows, d] (rows may lie apart) quantized as a product's input: out int8 [rows, d],
// each row's scale into out_scales.
void quantize(const py::array_t<float>& x, py::array_t<int8_t>& out, py::array_t<float>& out_scales, double levels,
              int threads) {
  const int64_t x_stride = row_stride<float>(x, "x"), rows = x.shape(0), d = x.shape(1);
  require(out.ndim() == 2 && c_contiguous(out) && out.shape(0) == rows && out.shape(1) == d && out.writeable(),
          "out must be writeable, contiguous, x's shape");
  require_vector(out_scales, rows, "out_scales");
  require(out_scales.writeable(), "out_scales must be writeable");
  require_levels(levels);
  const QuantizeRows p{x.data(), x_stride, d, out.mutable_data(), out_scales.mutable_data(), static_cast<float>(levels)};
  py::gil_scoped_release release;
  split(rows, std::min<int64_t>(threads, rows / 32), [&](int64_t begin, int64_t end) { quantize_rows_clones(p, begin, end); });
}

// Whether a beam candidate (score, flat index) ranks before another: higher scores first, NaN
// above everything (as torch's CPU topk ranks it, so the caller's check finds it), ties by index.
inline bool ranks_before(float a, int64_t ia, float b, int64_t ib) {
  const bool nan_a = std::isnan(a), nan_b = std::isnan(b);
  if (nan_a != nan_b) return nan_a;
  if (!nan_a && a != b) return a > b;
  return ia < ib;
}

struct Candidate {
  float score;
  int64_t flat;
};

// Per query q (its `beams` rows q * beams ..): the `keep` best (scores[row] + log_probs[row, c])
// over allowed[row, c], as flat indices (beam * width + c), best first; -inf (index 0) pads a
// query with fewer allowed codes. log_probs and allowed are [rows, width], scores [rows]; the rows
// of log_probs may lie apart (a level's columns of full-vocabulary log-probabilities, not copied).
void top_allowed(const py::array_t<float>& log_probs, const py::array_t<float>& scores, const py::array_t<bool>& allowed,
                 int64_t beams, py::array_t<float>& out_scores, py::array_t<int64_t>& out_flat, int threads) {
  const int64_t lp_stride = row_stride<float>(log_probs, "log_probs");
  require(allowed.ndim() == 2 && c_contiguous(allowed) && allowed.shape(0) == log_probs.shape(0) &&
              allowed.shape(1) == log_probs.shape(1), "allowed must be contiguous, the shape of log_probs");
  const int64_t rows = log_probs.shape(0), width = log_probs.shape(1);
  require(scores.ndim() == 1 && scores.shape(0) == rows && c_contiguous(scores), "scores must be contiguous [rows]");
  require(beams >= 1 && rows % beams == 0, "rows must be a whole number of beams per query");
  const int64_t queries = rows / beams;
  require(out_scores.ndim() == 2 && c_contiguous(out_scores) && out_scores.shape(0) == queries, "out_scores must be [queries, keep]");
  require(out_flat.ndim() == 2 && c_contiguous(out_flat) && out_flat.shape(0) == queries &&
              out_flat.shape(1) == out_scores.shape(1), "out_flat must be [queries, keep], as out_scores");
  const int64_t keep = out_scores.shape(1);
  require(keep >= 1 && keep <= beams * width, "keep must be in 1..beams * width");
  const float* lp = log_probs.data();
  const float* base = scores.data();
  const bool* mask = allowed.data();
  float* best_scores = out_scores.mutable_data();
  int64_t* best_flat = out_flat.mutable_data();
  const auto worse = [](const Candidate& a, const Candidate& b) { return ranks_before(a.score, a.flat, b.score, b.flat); };
  py::gil_scoped_release release;
  split(queries, threads, [&](int64_t begin, int64_t end) {
    std::vector<Candidate> heap;  // the best `keep` so far, worst on top
    heap.reserve(keep + 1);
    for (int64_t q = begin; q < end; ++q) {
      heap.clear();
      for (int64_t beam = 0; beam < beams; ++beam) {
        const int64_t row = q * beams + beam;
        const float* row_lp = lp + row * lp_stride;
        const bool* row_mask = mask + row * width;
        for (int64_t c = 0; c < width; ++c) {
          if (!row_mask[c]) continue;
          const Candidate next{base[row] + row_lp[c], beam * width + c};
          if (static_cast<int64_t>(heap.size()) < keep) {
            heap.push_back(next);
            std::push_heap(heap.begin(), heap.end(), worse);
          } else if (ranks_before(next.score, next.flat, heap.front().score, heap.front().flat)) {
            std::pop_heap(heap.begin(), heap.end(), worse);
            heap.back() = next;
            std::push_heap(heap.begin(), heap.end(), worse);
          }
        }
      }
      std::sort_heap(heap.begin(), heap.end(), worse);  // best first
      for (int64_t i = 0; i < keep; ++i) {
        const bool found = i < static_cast<int64_t>(heap.size());
        best_scores[q * keep + i] = found ? heap[i].score : -INFINITY;
        best_flat[q * keep + i] = found ? heap[i].flat : 0;
      }
    }
  });
}

}  // namespace

PYBIND11_MODULE(_decoder_kernels, m) {
  m.doc() = "C++ kernels of a CPU beam-search step (see the source's comment, fused_decoder.py and beam_search.py).";
  const auto def_attend = [&m](auto f, const char* name, const char* doc) {  // one per storage type
    m.def(name, f, py::arg("q").noconvert(), py::arg("keys").noconvert(), py::arg("values").noconvert(),
          py::arg("ancestors").noconvert(), py::arg("bias").noconvert(), py::arg("out").noconvert(), py::arg("threads"),
          doc);
  };
  def_attend(&attend<float, float>, "attend", "out[r] = the attention of q[r] over row r's history (see the source)");
  def_attend(&attend<BFloat16, int16_t>, "attend_bf16", "attend on bf16 arrays given as their bits, viewed as int16");
  m.def("add_rms_norm", &add_rms_norm, py::arg("x").noconvert(), py::arg("delta"), py::arg("weight").noconvert(),
        py::arg("eps"), py::arg("out").noconvert(), py::arg("threads"),
        "x += delta (unless None), then out = T5's RMS norm of x times weight, per row (fp32; bf16 as int16 bits)");
  m.def("add_rms_norm_int8", &add_rms_norm_int8, py::arg("x").noconvert(), py::arg("sums"), py::arg("sum_scales"),
        py::arg("column_scales"), py::arg("weight").noconvert(), py::arg("eps"), py::arg("out").noconvert(),
        py::arg("out_scales"), py::arg("levels"), py::arg("threads"),
        "x += int8 product sums scaled back (unless None), then T5's RMS norm into int8 rows and their scales, or fp32");
  m.def("scale_sums", &scale_sums, py::arg("sums").noconvert(), py::arg("sum_scales").noconvert(),
        py::arg("column_scales").noconvert(), py::arg("relu"), py::arg("out").noconvert(), py::arg("out_scales"),
        py::arg("levels"), py::arg("threads"),
        "an int8 product's sums scaled back (ReLU'd if relu), into fp32, or quantized per row into int8");
  m.def("quantize", &quantize, py::arg("x").noconvert(), py::arg("out").noconvert(), py::arg("out_scales").noconvert(),
        py::arg("levels"), py::arg("threads"), "fp32 rows quantized symmetrically per row into int8 and their scales");
  m.def("top_allowed", &top_allowed, py::arg("log_probs").noconvert(), py::arg("scores").noconvert(),
        py::arg("allowed").noconvert(), py::arg("beams"), py::arg("out_scores").noconvert(), py::arg("out_flat").noconvert(),
        py::arg("threads"), "per query, the best `keep` allowed (score + log-probability), flat indices (see the source)");
}
