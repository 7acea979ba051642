// The CPU's subnormal mode on torch's threads: flush-to-zero (a subnormal result is written as 0)
// and denormals-are-zero (a subnormal operand is read as 0), per thread, as the CPU keeps them:
// MXCSR's FTZ and DAZ bits on x86, FPCR's FZ bit on AArch64. A CPU computes with subnormal floats
// through a microcode assist, many times slower; training drives attention probabilities, and the
// gradients and optimiser moments of rarely used weights, into that range.
//
// A mode is a property of each thread, so it is set inside an OpenMP parallel region of `threads`
// threads: the libgomp torch loads (see setup.py), whose pool runs torch's and MKL's work. Threads
// the pool starts later inherit the mode of the thread that starts them, the calling one.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace py = pybind11;

namespace {

constexpr bool kSupported =
#if defined(__x86_64__) || defined(__i386__) || defined(__aarch64__)
    true;
#else
    false;
#endif

// Whether this thread flushes subnormals (both bits on x86).
bool thread_flushes() {
#if defined(__x86_64__) || defined(__i386__)
  return (_mm_getcsr() & 0x8040u) == 0x8040u;
#elif defined(__aarch64__)
  uint64_t fpcr;
  asm volatile("mrs %0, fpcr" : "=r"(fpcr));
  return (fpcr >> 24) & 1u;
#else
  return false;
#endif
}

void set_thread_flushes(bool on) {
#if defined(__x86_64__) || defined(__i386__)
  const unsigned int csr = _mm_getcsr();
  _mm_setcsr(on ? (csr | 0x8040u) : (csr & ~0x8040u));
#elif defined(__aarch64__)
  uint64_t fpcr;
  asm volatile("mrs %0, fpcr" : "=r"(fpcr));
  fpcr = on ? (fpcr | (uint64_t{1} << 24)) : (fpcr & ~(uint64_t{1} << 24));
  asm volatile("msr fpcr, %0" : : "r"(fpcr));
#else
  (void)on;
#endif
}

// Sets the mode on `threads` threads (the calling one among them); returns how many now have it.
int set_flush_subnormal(bool on, int threads) {
  if (threads < 1) throw py::value_error("threads must be >= 1, got " + std::to_string(threads));
  if (!kSupported) return 0;
  int done = 0;
  py::gil_scoped_release release;
#pragma omp parallel num_threads(threads) reduction(+ : done)
  {
    set_thread_flushes(on);
    done += thread_flushes() == on;
  }
  return done;
}

// How many of `threads` threads (the calling one among them) flush subnormals.
int flushing_threads(int threads) {
  if (threads < 1) throw py::value_error("threads must be >= 1, got " + std::to_string(threads));
  int flushing = 0;
  py::gil_scoped_release release;
#pragma omp parallel num_threads(threads) reduction(+ : flushing)
  flushing += thread_flushes();
  return flushing;
}

}  // namespace

PYBIND11_MODULE(_fp_env, m) {
  m.doc() = "The CPU's subnormal mode (flush-to-zero, denormals-are-zero) on OpenMP threads.";
  m.attr("supported") = kSupported;
  m.def("set_flush_subnormal", &set_flush_subnormal, py::arg("on"), py::arg("threads"));
  m.def("flushing_threads", &flushing_threads, py::arg("threads"));
}
