// Shared by rnnkit's C++ CPU kernels (rnn_kernels.cpp, layernorm_kernels.cpp): the GEMM source,
// the recurrent weight packed once per call, fp32 activations, and the step -> time indexing with
// lengths. Everything lives in an anonymous namespace: each kernel file gets its own copy.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace rnnkit {
namespace {

using at::Tensor;
using std::int64_t;

// ---------------------------------------------------------------------------------------------
// GEMM: MKL's BLAS when torch exports it (through its Fortran symbols), else at::addmm.

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
}

template <typename T>
void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
               const T* alpha, const T* a, const int* lda, const T* b, const int* ldb,
               const T* beta, T* c, const int* ldc) {
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  } else {
    dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}

template <typename T>
bool have_blas() {
  if constexpr (std::is_same_v<T, float>) {
    return sgemm_ != nullptr;
  } else {
    return dgemm_ != nullptr;
  }
}

// C (M, N) = alpha * op(A) (M, K) . op(B) (K, N) + beta * C, row-major; op = transpose if ta/tb.
template <typename T>
void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  if (have_blas<T>()) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
    const char fa = ta ? 'T' : 'N', fb = tb ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
    blas_gemm<T>(&fb, &fa, &m, &n, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
    return;
  }
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  Tensor a = ta ? at::from_blob(const_cast<T*>(A), {K, M}, {lda, 1}, opts).t()
                : at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
  Tensor b = tb ? at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, opts).t()
                : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);
  Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (beta == T(0)) c.zero_();
  at::addmm_out(c, c, a, b, beta == T(0) ? T(1) : beta, alpha);
}

// A right-hand operand used at every step (w_hh, w_hr), packed once into MKL's internal layout:
// per step C (M, N) = A (M, K) . op(B) (K, N) + beta C without re-packing B. Falls back to gemm
// where the packed API is absent (fp64, or a torch without MKL).

extern "C" {
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                      const float* src, int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a,
                         int lda, const float* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
}
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;

template <typename T>
class PackedB {
 public:
  PackedB(bool tb, int64_t M, int64_t N, int64_t K, const T* B, int64_t ldb)
      : tb_(tb), M_(M), N_(N), K_(K), B_(B), ldb_(ldb) {
    if constexpr (std::is_same_v<T, float>) {
      packed_ = B && cblas_sgemm_pack_get_size && cblas_sgemm_pack && cblas_sgemm_compute && M > 0 &&
                N > 0 && K > 0;
      if (packed_) {
        const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, M, N, K);
        buffer_ = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte));
        cblas_sgemm_pack(kRowMajor, kBMatrix, tb ? kTrans : kNoTrans, M, N, K, 1.0f, B, ldb,
                         reinterpret_cast<float*>(buffer_.mutable_data_ptr()));
      }
    }
  }
  // C (M, N) = A (M, K) . op(B) + beta C
  void run(const T* A, int64_t lda, T beta, T* C, int64_t ldc) const {
    if constexpr (std::is_same_v<T, float>) {
      if (packed_) {
        cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, M_, N_, K_, A, lda,
                            reinterpret_cast<const float*>(buffer_.const_data_ptr()), ldb_, beta,
                            C, ldc);
        return;
      }
    }
    gemm<T>(false, tb_, M_, N_, K_, T(1), A, lda, B_, ldb_, beta, C, ldc);
  }

 private:
  bool tb_;
  int64_t M_, N_, K_;
  const T* B_;
  int64_t ldb_;
  bool packed_ = false;
  Tensor buffer_;
};

// ---------------------------------------------------------------------------------------------
// Activations. fp32: a Cephes-style exp that the compiler vectorises (relative error ~1e-7);
// fp64 (gradcheck): the C library's.

inline float exp_fast(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);  // x = n ln2 + r, |r| <= ln2/2
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <typename T>
inline T sigmoid(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return 1.0f / (1.0f + exp_fast(-x));
  } else {
    return T(1) / (T(1) + std::exp(-x));
  }
}

template <typename T>
inline T tanh_(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return 2.0f / (1.0f + exp_fast(-2.0f * x)) - 1.0f;
  } else {
    return std::tanh(x);
  }
}

// ---------------------------------------------------------------------------------------------
// Sizes and step -> time indexing shared by forward and backward.

struct Shape {
  int64_t T, B, I, H, P, G, S;
};

int64_t max_length(const int64_t* len, int64_t B, int64_t T) {
  if (!len) return T;
  int64_t m = 0;
  for (int64_t b = 0; b < B; ++b) m = std::max(m, len[b]);
  return m;
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
std::vector<int64_t> active_rows(int64_t s, const int64_t* len, int64_t B) {
  std::vector<int64_t> rows;
  rows.reserve(B);
  for (int64_t b = 0; b < B; ++b)
    if (!kLen || s < len[b]) rows.push_back(b);
  return rows;
}

// Rows per parallel chunk: enough work per thread to pay for the fork.
int64_t grain(int64_t width) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1));
}

template <typename T>
const T* ptr(const Tensor& t) {
  return t.defined() && t.numel() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T* mptr(Tensor& t) {
  return t.numel() ? t.mutable_data_ptr<T>() : nullptr;
}

// An optional tensor argument made contiguous, or an undefined Tensor when absent.
Tensor contiguous_or_empty(const std::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : Tensor();
}

// Argument checks of the op entries. The kernels read every floating-point tensor as x's scalar
// type through typed accessors (ptr<T>, which checks the type again): a tensor of another dtype,
// on another device or of other sizes is an error that names it, never a reinterpretation.

// x (T, B, I): a 3-D float32 or float64 CPU tensor.
inline void check_input(const Tensor& x) {
  TORCH_CHECK(x.defined() && x.dim() == 3, "rnnkit cpu kernels: x has shape ",
              x.defined() ? x.sizes() : at::IntArrayRef{}, "; expected (T, B, I)");
  TORCH_CHECK(x.device().is_cpu(), "rnnkit cpu kernels: x is on ", x.device(),
              "; expected the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "rnnkit cpu kernels: x has dtype ", x.scalar_type(),
              "; expected float32 or float64");
}

// A tensor argument named `name` (skipped when undefined): on the CPU, of x's dtype and, unless
// `sizes` is empty, of exactly these sizes (`layout` names them, e.g. "(G, I)").
inline void check_arg(const char* name, const Tensor& t, const Tensor& x,
                      at::IntArrayRef sizes = {}, const char* layout = "") {
  if (!t.defined()) return;
  TORCH_CHECK(t.device().is_cpu(), "rnnkit cpu kernels: ", name, " is on ", t.device(),
              "; expected the CPU");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "rnnkit cpu kernels: ", name, " has dtype ",
              t.scalar_type(), "; expected ", x.scalar_type(), " like x");
  TORCH_CHECK(sizes.empty() || t.sizes().equals(sizes), "rnnkit cpu kernels: ", name,
              " has shape ", t.sizes(), "; expected ", layout, " = ", sizes);
}

// A tensor the forward saved for backward: (0) when it was not needed, else exactly `sizes`.
inline void check_saved(const char* name, const Tensor& t, const Tensor& x, bool needed,
                        at::IntArrayRef sizes, const char* layout) {
  TORCH_CHECK(t.defined(), "rnnkit cpu kernels: ", name, " is missing");
  if (!needed && t.numel() == 0) {
    check_arg(name, t, x);
    return;
  }
  TORCH_CHECK(needed, "rnnkit cpu kernels: ", name, " has shape ", t.sizes(),
              "; expected (0): this call does not use it");
  TORCH_CHECK(t.numel() > 0 || c10::multiply_integers(sizes) == 0, "rnnkit cpu kernels: ", name,
              " is empty: the forward was run without saving for backward");
  check_arg(name, t, x, sizes, layout);
}

// The weight rows G of a cell with `gates` gate blocks: G = gates * H, H >= 1.
inline int64_t hidden_of(const Tensor& w_ih, int64_t gates, const char* cell) {
  TORCH_CHECK(w_ih.defined() && w_ih.dim() == 2, "rnnkit cpu kernels: w_ih has shape ",
              w_ih.defined() ? w_ih.sizes() : at::IntArrayRef{}, "; expected (G, I)");
  const int64_t G = w_ih.size(0);
  TORCH_CHECK(G > 0 && G % gates == 0, "rnnkit cpu kernels: w_ih has G = ", G,
              " rows; expected a positive multiple of the ", gates, " gates of the ", cell);
  return G / gates;
}

// lengths (B) int64 with 0 <= len <= T each, when defined.
void check_lengths(const Tensor& lengths, int64_t B, int64_t T) {
  if (!lengths.defined()) return;
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B && lengths.scalar_type() == at::kLong,
              "lengths has shape ", lengths.sizes(), " and dtype ", lengths.scalar_type(),
              "; expected (B,) = (", B, ",) int64");
  const int64_t* l = lengths.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(l[b] >= 0 && l[b] <= T, "lengths[", b, "] = ", l[b], "; expected 0 <= len <= T = ",
                T);
}

// The state dropout and zoneout tensors of one call (each undefined when off), checked against
// the layer's shapes: state_mask (B, P); zone_h (T, B, P) per step in training or (P) keep
// probabilities in eval; zone_c likewise with H, for an LSTM only.
struct Regularisers {
  Tensor mask, zone_h, zone_c;
  int64_t zone_h_step = 0, zone_c_step = 0;

  Regularisers(const std::optional<Tensor>& mask_, const std::optional<Tensor>& zone_h_,
               const std::optional<Tensor>& zone_c_, bool lstm, const Shape& n, const Tensor& x)
      : mask(contiguous_or_empty(mask_)),
        zone_h(contiguous_or_empty(zone_h_)),
        zone_c(contiguous_or_empty(zone_c_)) {
    check_arg("state_mask", mask, x, {n.B, n.P}, "(B, P)");
    TORCH_CHECK(!zone_c.defined() || (lstm && zone_h.defined()),
                "zone_c: expected only for an LSTM, together with zone_h");
    TORCH_CHECK(!zone_h.defined() || !lstm || zone_c.defined(),
                "zoneout on an LSTM needs zone_c as well as zone_h");
    zone_h_step = check_zone("zone_h", zone_h, n.P, n, x);
    zone_c_step = check_zone("zone_c", zone_c, n.H, n, x);
  }

  static int64_t check_zone(const char* name, const Tensor& z, int64_t width, const Shape& n,
                            const Tensor& x) {
    if (!z.defined()) return 0;
    check_arg(name, z, x);
    const bool per_step = z.dim() == 3 && z.size(0) == n.T && z.size(1) == n.B;
    TORCH_CHECK((per_step || z.dim() == 1) && z.size(-1) == width &&
                    z.scalar_type() == x.scalar_type(),
                name, " has shape ", z.sizes(), " and dtype ", z.scalar_type(), "; expected (T, B, ",
                width, ") = (", n.T, ", ", n.B, ", ", width, ") or (", width, ") ",
                x.scalar_type());
    return per_step ? width : 0;
  }
};

}  // namespace
}  // namespace rnnkit
