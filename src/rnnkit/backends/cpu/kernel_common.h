// Shared by rnnkit's C++ CPU kernels: the GEMM source, the recurrent weight packed once per call,
// fp32 activations, the LayerNorm pieces, scratch buffers, the thread pool, compile-time variants
// and the step -> time indexing with lengths.
//
// Plain C++, no ATen header: the translation units that instantiate the drivers (cell_*.cpp)
// include only this, so they compile fast. The GEMMs and the thread pool are defined once, in
// ops.cpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef __AVX512BF16__
#include <immintrin.h>
#endif

namespace rnnkit {
namespace cpu {

using std::int64_t;

// For the per-unit helpers called inside the row passes' `omp simd` loops: inlined, so that the
// loops vectorise.
#define RNNKIT_INLINE inline __attribute__((always_inline))

// ---------------------------------------------------------------------------------------------
// GEMM: where each of a call's GEMMs comes from, and in which precision. Defined once, in
// ops.cpp: the one place that knows the sources.
//
// A call's GEMMs fall in two classes (roles): the recurrent step's (M = B rows, the right-hand
// operand the same at every step) and the bulk ones over all steps (the input projection, dx and
// the weight gradients: M or K = T*B). Each role has its source, chosen by the Python side by a
// short measurement on the call's shapes (rnnkit.backends.cpu.gemm). With bf16, the operands are
// rounded to bfloat16 and the products accumulate in float32 into float32 results (float only;
// float64 ignores it).

enum GemmRole : int { kStep = 0, kBulk = 1 };

enum GemmSource : int {
  kSourceMkl = 0,     // MKL's BLAS as torch exports it: sgemm_, its packed API, gemm_bf16bf16f32
  kSourceTorch = 1,   // ATen's matrix product through the dispatcher (torch's MKL or oneDNN)
  kSourceOnednn = 2,  // oneDNN 3's matmul primitive, opened at run time (onednn.h)
  kSourceAvx2 = 3,    // rnnkit's own float32 step on AVX2 and FMA (gemm_avx2.cpp); step only
  kSources
};

struct GemmPlan {
  int source[2] = {kSourceMkl, kSourceMkl};  // by GemmRole
  bool bf16 = false;
  // The recurrent steps on one slice of the batch per thread (over_batch), each slice's step
  // GEMMs single-threaded, instead of every step's GEMM and row pass threaded: chosen by
  // measuring the step GEMM both ways (rnnkit.backends.cpu.gemm).
  bool split = false;
};

// The plan with float32 operands: for sums that must not be rounded (the bias gradients).
inline GemmPlan in_fp32(GemmPlan plan) {
  plan.bf16 = false;
  return plan;
}

// C (M, N) = alpha * op(A) (M, K) . op(B) (K, N) + beta * C, row-major; op = transpose if ta/tb.
// Whether `source` can run here (in bf16: bfloat16 operands); an unavailable one falls back
// to ATen's.
bool gemm_source_available(int source, bool bf16);

template <typename T>
void gemm(const GemmPlan& plan, GemmRole role, bool ta, bool tb, int64_t M, int64_t N, int64_t K,
          T alpha, const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc);

// The avx2 source (gemm_avx2.cpp), the step's product only: op(B) (K, N) packed once into
// avx2_packed_size(N, K) floats by avx2_pack, then per step C (M, N) = A (M, K) . op(B) + beta C
// for any M. A bulk GEMM under a plan that names it runs on MKL's BLAS (gemm's generic path).
bool avx2_available();  // compiled with AVX2 and FMA
int64_t avx2_packed_size(int64_t N, int64_t K);
void avx2_pack(bool tb, int64_t N, int64_t K, const float* B, int64_t ldb, float* dst);
void avx2_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* packed,
               float beta, float* C, int64_t ldc);

// ---------------------------------------------------------------------------------------------
// Scratch memory: n elements of T, 64-byte aligned (as ATen allocates), uninitialised unless
// zeroed. Allocated once per call, never per step; blocks of a megabyte or more come from the
// pool of scratch.cpp, which keeps them between calls (no fresh pages to fault in each call).

void* scratch_acquire(std::size_t bytes);
void scratch_release(void* data, std::size_t bytes) noexcept;
std::size_t scratch_kept();   // bytes the pool keeps now
std::size_t scratch_limit();  // at most this many
void set_scratch_limit(std::size_t bytes);

template <typename T>
class Buffer {
 public:
  explicit Buffer(int64_t n = 0, bool zeroed = false)
      : data_(n > 0 ? static_cast<T*>(scratch_acquire(sizeof(T) * n)) : nullptr,
              Free{n > 0 ? sizeof(T) * n : 0}) {
    if (zeroed && n > 0) std::fill_n(data_.get(), n, T(0));
  }
  T* data() const { return data_.get(); }

 private:
  struct Free {
    std::size_t bytes;
    void operator()(T* p) const { scratch_release(p, bytes); }
  };
  std::unique_ptr<T[], Free> data_;
};

namespace onednn {
class Packed;
}

// A right-hand operand used at every step (w_hh, w_hr), prepared once per call for the step's
// source: packed into MKL's internal layout or the avx2 source's panels, or rounded to bfloat16
// once (bf16), or reordered into the layout oneDNN's matmul prefers (float32 or bfloat16). Per step
// C (M, N) = A (M, K) . op(B) (K, N) + beta C without preparing B again. Defined in ops.cpp.
template <typename T>
class PackedB {
 public:
  PackedB(const GemmPlan& plan, bool tb, int64_t M, int64_t N, int64_t K, const T* B,
          int64_t ldb);
  // C (M, N) = A (M, K) . op(B) + beta C
  void run(const T* A, int64_t lda, T beta, T* C, int64_t ldc,
           const std::uint16_t* A_half = nullptr) const;
  // C (rows, N) = A (rows, K) . op(B) + beta C, rows <= M: the step over the sequences still
  // running (with lengths), on B as prepared where the source allows it. A_half: A already
  // rounded to bfloat16 (rows, K, compact), or null; a step that runs in bf16 (takes_half) reads
  // it instead of rounding A itself.
  void run_rows(int64_t rows, const T* A, int64_t lda, T beta, T* C, int64_t ldc,
                const std::uint16_t* A_half = nullptr) const;
  // Whether the step multiplies bfloat16 operands (so that a caller may round A as it writes it).
  bool takes_half() const { return half_ || (onednn_ && plan_.bf16); }

 private:
  GemmPlan plan_;
  bool tb_;
  int64_t M_, N_, K_;
  const T* B_;
  int64_t ldb_;
  bool packed_ = false;  // MKL's packed fp32 B in buffer_
  bool panels_ = false;  // the avx2 source's panels of B in buffer_ (any rows per run)
  bool half_ = false;    // bf16: B rounded once into bhalf_ (op(B) layout kept), A per step
  Buffer<float> buffer_;
  Buffer<std::uint16_t> bhalf_, ahalf_;  // ahalf_: A rounded per step (MKL's and oneDNN's bf16)
  std::shared_ptr<onednn::Packed> onednn_;  // oneDNN's packed B (float32 or bfloat16)
};

extern template class PackedB<float>;
extern template class PackedB<double>;

// float -> bfloat16, rounded to nearest even (as torch rounds); NaN stays NaN. Branch-free, so
// that the row loop vectorises.
RNNKIT_INLINE std::uint16_t to_bf16(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  const std::uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>((nan ? (u | 0x400000u) : rounded) >> 16);
}

// dst (n) = src (n) rounded to bfloat16, on the calling thread: the CPU's own conversion where it
// has one. The row passes call it on the rows they have just written (still in cache).
inline void round_row(int64_t n, const float* src, std::uint16_t* dst) {
  int64_t j = 0;
#ifdef __AVX512BF16__
  for (; j + 16 <= n; j += 16) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + j));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), reinterpret_cast<const __m256i&>(h));
  }
#endif
#pragma omp simd
  for (int64_t k = j; k < n; ++k) dst[k] = to_bf16(src[k]);
}

// Whether a plan's bulk GEMMs take operands rounded to bfloat16 beforehand (Operand), and the
// rounding itself: dst (n) = src (n) to nearest even. Defined in ops.cpp.
bool rounds_operands(const GemmPlan& plan);
void round_bf16(int64_t n, const float* src, std::uint16_t* dst);

// A contiguous (rows, cols) operand of several bulk GEMMs (dgi, x, the weights at the end of
// backward): where the plan rounds operands to bfloat16 (float only), rounded once here and
// read by every GEMM that takes it; or, given `rounded` (data as the pass that wrote it rounded
// it), read as is.
template <typename T>
struct Operand {
  Operand(const GemmPlan& plan, int64_t rows, int64_t cols, const T* data,
          const std::uint16_t* rounded = nullptr)
      : data(data), cols(cols) {
    if constexpr (std::is_same_v<T, float>) {
      if (data && rows * cols > 0 && rounds_operands(plan)) {
        if (rounded) {
          half = rounded;
        } else {
          own = Buffer<std::uint16_t>(rows * cols);
          round_bf16(rows * cols, data, own.data());
          half = own.data();
        }
      }
    }
  }
  const T* data;
  int64_t cols;
  const std::uint16_t* half = nullptr;  // null unless rounded
  Buffer<std::uint16_t> own;            // the rounding when done here
};

// C (M, N) = op(A) (M, K) . op(B) (K, N) + beta C of two Operands (their leading dimension their
// cols), a bulk GEMM.
template <typename T>
void gemm(const GemmPlan& plan, bool ta, bool tb, int64_t M, int64_t N, int64_t K,
          const Operand<T>& A, const Operand<T>& B, T beta, T* C, int64_t ldc);

// ---------------------------------------------------------------------------------------------
// The thread pool: a loop over [0, n) in chunks of at least `grain`, as at::parallel_for runs it
// (ops.cpp; serial inside a parallel region). The body is called through Chunks, so the drivers
// need no ATen header.

struct Chunks {
  virtual void run(int64_t begin, int64_t end) const = 0;

 protected:
  ~Chunks() = default;
};

void parallel_chunks(int64_t n, int64_t grain, const Chunks& body);

// Threads of the pool (torch's intra-op thread count).
int64_t pool_threads();

// f(begin, end) over chunks of [0, n).
template <typename F>
inline void parallel_for(int64_t n, int64_t grain, const F& f) {
  struct Body final : Chunks {
    explicit Body(const F& f) : f(f) {}
    void run(int64_t begin, int64_t end) const override { f(begin, end); }
    const F& f;
  };
  parallel_chunks(n, grain, Body(f));
}

// The recurrent steps of a layer over its B sequences: body(b0, b1) runs the steps of sequences
// [b0, b1). With `split`, once per thread of the pool on its own slice of the batch (sequences are
// independent, so the slices never wait for each other: no fork or join per step, and the GEMMs
// and row passes inside run on the slice's thread alone); else body(0, B) once, its GEMMs and row
// passes threaded per step. Inside a parallel region (a bidirectional layer's directions), one
// slice.
template <typename F>
inline void over_batch(bool split, int64_t B, const F& body) {
  if (!split || B < 2) {
    body(0, B);
    return;
  }
  const int64_t n = std::min<int64_t>(B, std::max<int64_t>(1, pool_threads()));
  parallel_for(B, (B + n - 1) / n, body);
}

// Rows per parallel chunk: enough work per thread to pay for the fork.
inline int64_t grain(int64_t width) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1));
}

// ---------------------------------------------------------------------------------------------
// Compile-time variants: fn(std::bool_constant<b>...) for the runtime flags b, in order. A flag
// given as std::false_type stays false: a variant a cell cannot have is not compiled.

template <typename Fn>
inline void with_bools(Fn&& fn) {
  fn();
}

template <typename Fn, typename... Rest>
inline void with_bools(Fn&& fn, std::false_type, Rest... rest) {
  with_bools([&](auto... tail) { fn(std::false_type{}, tail...); }, rest...);
}

template <typename Fn, typename... Rest>
inline void with_bools(Fn&& fn, bool flag, Rest... rest) {
  if (flag) {
    with_bools([&](auto... tail) { fn(std::true_type{}, tail...); }, rest...);
  } else {
    with_bools([&](auto... tail) { fn(std::false_type{}, tail...); }, rest...);
  }
}

// `flag` as with_bools takes it: a runtime bool where kPossible, else std::false_type.
template <bool kPossible>
inline auto possible(bool flag) {
  if constexpr (kPossible) {
    return flag;
  } else {
    return std::false_type{};
  }
}

// ---------------------------------------------------------------------------------------------
// Activations. fp32: a Cephes-style exp that the compiler vectorises (relative error ~1e-7);
// fp64 (gradcheck): the C library's.

RNNKIT_INLINE float exp_fast(float x) {
  // A NaN x fails both comparisons and passes through (the result is then NaN).
  x = -87.0f > x ? -87.0f : x;
  x = 88.0f < x ? 88.0f : x;
  // n = round(x / ln2) by adding and subtracting 1.5 * 2^23 (the sum's low bits then hold n,
  // ties to even), so that x = n ln2 + r, |r| <= ln2/2.
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23
  const float shifted = x * 1.44269504088896341f + kShift;
  const float n = shifted - kShift;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n from the integer in the sum's low bits, in unsigned arithmetic (no float-to-integer
  // conversion, so a NaN x is no undefined behaviour: p is NaN and so is the result).
  constexpr std::uint32_t kShiftBits = 0x4B400000u;  // kShift's bits
  std::uint32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  const std::uint32_t exponent = (bits - kShiftBits + 127u) << 23;
  float scale;
  std::memcpy(&scale, &exponent, sizeof(scale));
  return p * scale;
}

template <typename T>
RNNKIT_INLINE T sigmoid(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return 1.0f / (1.0f + exp_fast(-x));
  } else {
    return T(1) / (T(1) + std::exp(-x));
  }
}

template <typename T>
RNNKIT_INLINE T tanh_(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return 2.0f / (1.0f + exp_fast(-2.0f * x)) - 1.0f;
  } else {
    return std::tanh(x);
  }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm pieces. torch's layer_norm: biased variance (divided by n), eps inside the root.

// mean and 1 / sqrt(var + eps) of v (n), in two passes over v.
template <typename T>
inline void moments(int64_t n, const T* v, T eps, T& mean, T& rstd) {
  T sum = T(0);
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += v[j];
  mean = sum / T(n);
  T sq = T(0);
#pragma omp simd reduction(+ : sq)
  for (int64_t j = 0; j < n; ++j) {
    const T d = v[j] - mean;
    sq += d * d;
  }
  rstd = T(1) / std::sqrt(sq / T(n) + eps);
}

// The gradient reaching v (n) through y = w * vhat + bias, vhat = (v - mean) * rstd, from dy:
//   dvhat = dy * w;   dv = rstd * (dvhat - mean(dvhat) - vhat * mean(dvhat * vhat)).
// dv may alias dy.
template <typename T>
inline void layer_norm_backward(int64_t n, const T* dy, const T* w, const T* vhat, T rstd, T* dv) {
  T sum = T(0), dot = T(0);
#pragma omp simd reduction(+ : sum, dot)
  for (int64_t j = 0; j < n; ++j) {
    const T dvhat = dy[j] * w[j];
    sum += dvhat;
    dot += dvhat * vhat[j];
  }
  const T mean_dvhat = sum / T(n), mean_dot = dot / T(n);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dv[j] = rstd * (dy[j] * w[j] - mean_dvhat - vhat[j] * mean_dot);
}

// out (W) = the sum over rows of a (R, W) * b (R, W) elementwise (of a alone without b): gain and
// bias gradients, summed over all steps. Each thread owns a range of columns, so the result does
// not depend on the thread count.
template <typename T>
inline void column_sums(int64_t R, int64_t W, const T* a, const T* b, T* out) {
  parallel_for(W, std::max<int64_t>(16, grain(R)), [&](int64_t j0, int64_t j1) {
    std::fill(out + j0, out + j1, T(0));
    for (int64_t r = 0; r < R; ++r) {
      const T* ar = a + r * W;
      if (b) {
        const T* br = b + r * W;
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) out[j] += ar[j] * br[j];
      } else {
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) out[j] += ar[j];
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Sizes and step -> time indexing shared by forward and backward.

// T steps, B batch, I input features, H hidden size, P state size (P = H except for a projected
// LSTM), G = gates * H, S = saved activations per step.
struct Shape {
  int64_t T, B, I, H, P, G, S;
};

inline int64_t max_length(const int64_t* len, int64_t B, int64_t T) {
  if (!len) return T;
  int64_t m = 0;
  for (int64_t b = 0; b < B; ++b) m = std::max(m, len[b]);
  return m;
}

// The valid rows of a (T, B, .) array, in order: t * B + b for t < len_b. With lengths, the bulk
// GEMMs run over these rows alone, never over the padding.
inline std::vector<int64_t> valid_rows(const int64_t* len, int64_t T, int64_t B) {
  std::vector<int64_t> rows;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t b = 0; b < B; ++b)
      if (t < len[b]) rows.push_back(t * B + b);
  return rows;
}

// dst (N, W) = the rows `rows` (N) of src (., W).
template <typename T>
inline void gather_rows(const std::vector<int64_t>& rows, int64_t W, const T* src, T* dst) {
  parallel_for(static_cast<int64_t>(rows.size()), grain(W), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k)
      std::copy(src + rows[k] * W, src + (rows[k] + 1) * W, dst + k * W);
  });
}

// The rows `rows` (N) of dst (., W) = src (N, W).
template <typename T>
inline void scatter_rows(const std::vector<int64_t>& rows, int64_t W, const T* src, T* dst) {
  parallel_for(static_cast<int64_t>(rows.size()), grain(W), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) std::copy(src + k * W, src + (k + 1) * W, dst + rows[k] * W);
  });
}

// Time index of sequence b at step s, or -1 once the sequence has ended.
template <bool kLen>
inline int64_t time_of(int64_t s, int64_t b, const int64_t* len, int64_t T, bool reverse) {
  if constexpr (kLen) {
    const int64_t n = len[b];
    if (s >= n) return -1;
    return reverse ? n - 1 - s : s;
  } else {
    return reverse ? T - 1 - s : s;
  }
}

// The batch indices of the sequences still running at step s (all of them without lengths).
template <bool kLen>
inline void active_rows(int64_t s, const int64_t* len, int64_t b0, int64_t b1,
                        std::vector<int64_t>& rows) {
  rows.clear();
  for (int64_t b = b0; b < b1; ++b)
    if (!kLen || s < len[b]) rows.push_back(b);
}

// The zoneout weights of row (t, b): zone (T, B, n) per step (step = n), or (n) the same at
// every step (step = 0: eval mode's probabilities).
template <typename T>
inline const T* keep_row(const T* zone, int64_t step, int64_t row) {
  return zone + row * step;
}

}  // namespace cpu
}  // namespace rnnkit
