// The op entries of rnnkit's "cpu" backend: one layer of any built-in cell, in one direction or
// both directions of a bidirectional layer at once, forward over the whole sequence and its
// hand-written backward (backpropagation through time). Each entry checks every tensor it is
// given, allocates the results and runs the drivers (driver.h, compiled per cell in cell_*.cpp).
//
// Shapes are kernels.h's: T steps, B batch, I input features, H hidden size, P state size,
// G = gates * H, S = saved * H. An absent optional tensor in a list is an empty (0,) tensor.
//
// layer_forward(Tensor[] inputs, Tensor[] states, Tensor[] weights, Tensor[] masks,
//               Tensor? lengths, int kernel_id, bool[] reverse, float eps, bool save) -> Tensor[]
//   D = len(reverse) directions: 1, or 2 (a bidirectional layer: forward, then reverse), each on
//   its own thread; reverse[d]: direction d reads each sequence from its own end.
//   inputs: x (T, B, I), shared by the directions, or one per direction (variational dropout
//     masks each direction's input apart)
//   states: per direction the cell's initial state: h0 (B, P) [, c0 (B, H) with a cell state]
//   weights: per direction the cell's weights in the cell table's order (cells.h, kWeights):
//     w_ih (G, I), w_hh (G, P), b_ih and b_hh (G) [both or neither], w_hr (P, H) [projected
//     LSTM], w_ci, w_cf, w_co (H) [peephole LSTM], ln_ih and ln_hh gains and biases (G) and
//     ln_c's (H) [LayerNorm cells]
//   masks: per direction state_mask (B, P) (state dropout: h_{t-1} * state_mask enters the
//     step), zone_h (T, B, P) or (P) and zone_c (T, B, H) or (H) [a cell state, with zone_h]
//     (zoneout: each state becomes keep * previous + (1 - keep) * new, keep = zone[t, b], 0 or 1
//     in training, or the probability at every step in eval mode)
//   lengths (B) int64, 0 <= len <= T [optional]; kernel_id: the cell table's; eps: LayerNorm's
//   -> per direction: out (T, B, P), the final states (h_n (B, P) [, c_n (B, H)]), then what the
//      backward needs (kernels.h's SavedSlot order; each (0) unless save and the cell uses it)
//
// layer_backward(Tensor?[] grads, Tensor[] inputs, Tensor[] states, Tensor[] weights,
//                Tensor[] masks, Tensor[] saved, Tensor? lengths, int kernel_id, bool[] reverse,
//                float eps, bool need_dx) -> Tensor[]
//   grads: per direction the gradients reaching out and the final states (None: zero); saved:
//   what layer_forward returned for backward; the rest as layer_forward took it
//   -> dx per input ((0) unless need_dx; a shared input receives the sum over the directions),
//      then per direction the gradients of the initial states and of the weights ((0) where a
//      weight is absent)

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif
#include "cells.h"
#include "checks.h"
#include "kernel_common.h"
#include "kernels.h"
#include "onednn.h"

namespace rnnkit {
namespace cpu {

// Subnormal floats flushed to zero (FTZ) and read as zero (DAZ) while a kernel runs, the caller's
// setting restored after. On x86 an operation on a subnormal operand takes up to ~100 times
// longer; recurrent layers produce them (a saturated gate: sigmoid(-88) ~ 6e-39; gradients that
// decay over many steps), and a row pass that meets them measured a GRU layer's inference 1.4x
// slower. Values below 1.2e-38 (float) carry nothing a recurrent network can use; outputs differ
// from IEEE arithmetic only there. MXCSR is per thread: set on every thread that runs a part.
constexpr unsigned kFlushBits = 0x8000 | 0x0040;  // MXCSR's FTZ | DAZ

class FlushDenormals {
 public:
#if defined(__SSE__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFlushBits); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#endif
};

// The same setting for a whole training run rather than one kernel call (rnnkit.train turns it
// on): every thread of the OpenMP pool that runs torch's parallel regions, MKL's and oneDNN's
// sets FTZ and DAZ (or clears them), the calling thread among them, since a thread's MXCSR is its
// own and torch.set_flush_denormal() reaches the calling thread alone. A network that has trained
// for a while meets subnormals outside the kernels too (attention and output softmaxes of a
// confident model, their gradients), and a thread that computes on them runs its part many times
// slower. Returns whether the calling thread flushed before (its MXCSR, restored by passing it);
// false and nothing set where the CPU has no such control.
bool flush_denormals(bool on) {
#if defined(__SSE__)
  const bool before = (_mm_getcsr() & kFlushBits) == kFlushBits;
  auto set = [&] {
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(on ? csr | kFlushBits : csr & ~kFlushBits);
  };
  set();
#ifdef _OPENMP
#pragma omp parallel num_threads(std::max(1, at::get_num_threads()))
  set();
#endif
  return before;
#else
  (void)on;
  return false;
#endif
}

// ---------------------------------------------------------------------------------------------
// What kernel_common.h declares, defined here once: the GEMMs of every source (GemmSource) in
// float32, bfloat16 x bfloat16 -> float32 and float64, and the thread pool (at::parallel_for).
// The one place that knows where the GEMMs come from.

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                      const float* src, int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a,
                         int lda, const float* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const std::uint16_t* a, int lda, const std::uint16_t* b, int ldb,
                            float beta, float* c, int ldc) __attribute__((weak));
}
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;

namespace {

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

bool have_mkl_bf16() { return cblas_gemm_bf16bf16f32 != nullptr; }

// dst (rows, cols), compact = src (rows, cols) with leading dimension ld, rounded to bfloat16.
void round_rows(int64_t rows, int64_t cols, const float* src, int64_t ld, std::uint16_t* dst) {
  if (ld == cols) {  // contiguous: one flat range, split evenly
    parallel_for(rows * cols, 1 << 14, [&](int64_t k0, int64_t k1) {
      round_row(k1 - k0, src + k0, dst + k0);
    });
    return;
  }
  parallel_for(rows, grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) round_row(cols, src + r * ld, dst + r * cols);
  });
}

// Scratch for the bfloat16 copies of one GEMM's operands: grown, never shrunk, per thread (the
// directions of a bidirectional layer run on two).
std::uint16_t* scratch(int which, int64_t n) {
  thread_local std::vector<std::uint16_t> pool[2];
  if (static_cast<int64_t>(pool[which].size()) < n) pool[which].resize(n);
  return pool[which].data();
}

template <typename T>
Tensor view(const T* p, int64_t rows, int64_t cols, int64_t ld, bool transpose) {
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  Tensor t = at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, opts);
  return transpose ? t.t() : t;
}

// C = alpha op(A) op(B) + beta C by ATen (the dispatcher picks MKL or oneDNN as torch does);
// bf16: of the operands rounded to bfloat16 (a bfloat16 product, widened into C).
template <typename T>
void aten_gemm(bool bf16, bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha,
               const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  Tensor c = view(C, M, N, ldc, false);
  if (bf16) {
    Tensor a = view(A, ta ? K : M, ta ? M : K, lda, false).to(at::kBFloat16);
    Tensor b = view(B, tb ? N : K, tb ? K : N, ldb, false).to(at::kBFloat16);
    Tensor p = at::mm(ta ? a.t() : a, tb ? b.t() : b);
    if (beta == T(0)) {
      c.copy_(p);
      if (alpha != T(1)) c.mul_(alpha);
    } else {
      c.mul_(beta).add_(p, alpha);
    }
    return;
  }
  Tensor a = view(A, ta ? K : M, ta ? M : K, lda, ta);
  Tensor b = view(B, tb ? N : K, tb ? K : N, ldb, tb);
  if (beta == T(0)) c.zero_();
  at::addmm_out(c, c, a, b, beta == T(0) ? T(1) : beta, alpha);
}

}  // namespace

bool gemm_source_available(int source, bool bf16) {
  switch (source) {
    case kSourceMkl:
      return bf16 ? have_mkl_bf16() : have_blas<float>();
    case kSourceTorch:
      return true;
    case kSourceOnednn:
      return onednn::available(bf16);
    case kSourceAvx2:
      return !bf16 && avx2_available();
    default:
      return false;
  }
}

template <typename T>
void gemm(const GemmPlan& plan, GemmRole role, bool ta, bool tb, int64_t M, int64_t N, int64_t K,
          T alpha, const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  const int source = plan.source[role];
  constexpr bool kFloat = std::is_same_v<T, float>;
  const bool bf16 = kFloat && plan.bf16;
  if constexpr (kFloat) {
    if (source == kSourceOnednn && alpha == 1.0f && onednn::available(bf16)) {
      if (!bf16) {
        if (onednn::matmul(false, ta, tb, M, N, K, A, lda, B, ldb, beta, C, ldc)) return;
      } else {
        const int64_t ar = ta ? K : M, ac = ta ? M : K, br = tb ? N : K, bc = tb ? K : N;
        std::uint16_t* a = scratch(0, ar * ac);
        std::uint16_t* b = scratch(1, br * bc);
        round_rows(ar, ac, A, lda, a);
        round_rows(br, bc, B, ldb, b);
        if (onednn::matmul(true, ta, tb, M, N, K, a, ac, b, bc, beta, C, ldc)) return;
      }
    }
    if (bf16 && source == kSourceMkl && have_mkl_bf16()) {
      const int64_t ar = ta ? K : M, ac = ta ? M : K, br = tb ? N : K, bc = tb ? K : N;
      std::uint16_t* a = scratch(0, ar * ac);
      std::uint16_t* b = scratch(1, br * bc);
      round_rows(ar, ac, A, lda, a);
      round_rows(br, bc, B, ldb, b);
      cblas_gemm_bf16bf16f32(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, M, N, K,
                             alpha, a, ac, b, bc, beta, C, ldc);
      return;
    }
  }
  if (!bf16 && source != kSourceTorch && have_blas<T>()) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
    const char fa = ta ? 'T' : 'N', fb = tb ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
    blas_gemm<T>(&fb, &fa, &m, &n, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
    return;
  }
  aten_gemm<T>(bf16, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

template void gemm<float>(const GemmPlan&, GemmRole, bool, bool, int64_t, int64_t, int64_t, float,
                          const float*, int64_t, const float*, int64_t, float, float*, int64_t);
template void gemm<double>(const GemmPlan&, GemmRole, bool, bool, int64_t, int64_t, int64_t,
                           double, const double*, int64_t, const double*, int64_t, double,
                           double*, int64_t);

bool rounds_operands(const GemmPlan& plan) {
  if (!plan.bf16) return false;
  switch (plan.source[kBulk]) {
    case kSourceMkl:
      return have_mkl_bf16();
    case kSourceOnednn:
      return onednn::available(true);
    default:
      return false;
  }
}

void round_bf16(int64_t n, const float* src, std::uint16_t* dst) { round_rows(1, n, src, n, dst); }

template <typename T>
void gemm(const GemmPlan& plan, bool ta, bool tb, int64_t M, int64_t N, int64_t K,
          const Operand<T>& A, const Operand<T>& B, T beta, T* C, int64_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    if (A.half && B.half && M > 0 && N > 0 && K > 0) {
      // rounded for the plan's bulk source (rounds_operands): oneDNN's or MKL's bf16 GEMM
      if (plan.source[kBulk] == kSourceOnednn &&
          onednn::matmul(true, ta, tb, M, N, K, A.half, A.cols, B.half, B.cols, beta, C, ldc))
        return;
      if (have_mkl_bf16()) {
        cblas_gemm_bf16bf16f32(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, M, N,
                               K, 1.0f, A.half, A.cols, B.half, B.cols, beta, C, ldc);
        return;
      }
    }
  }
  gemm<T>(plan, kBulk, ta, tb, M, N, K, T(1), A.data, A.cols, B.data, B.cols, beta, C, ldc);
}

template void gemm<float>(const GemmPlan&, bool, bool, int64_t, int64_t, int64_t,
                          const Operand<float>&, const Operand<float>&, float, float*, int64_t);
template void gemm<double>(const GemmPlan&, bool, bool, int64_t, int64_t, int64_t,
                           const Operand<double>&, const Operand<double>&, double, double*,
                           int64_t);

template <typename T>
PackedB<T>::PackedB(const GemmPlan& plan, bool tb, int64_t M, int64_t N, int64_t K, const T* B,
                    int64_t ldb)
    : plan_(plan), tb_(tb), M_(M), N_(N), K_(K), B_(B), ldb_(ldb) {
  if constexpr (std::is_same_v<T, float>) {
    if (B && M > 0 && N > 0 && K > 0 && plan.source[kStep] == kSourceAvx2 && !plan.bf16 &&
        avx2_available()) {
      buffer_ = Buffer<float>(avx2_packed_size(N, K));
      avx2_pack(tb, N, K, B, ldb, buffer_.data());
      panels_ = true;
      return;
    }
    if (B && M > 0 && N > 0 && K > 0 && plan.source[kStep] == kSourceOnednn) {
      onednn_ = onednn::Packed::make(plan.bf16, tb, M, N, K, B, ldb);
      if (onednn_ && plan.bf16) ahalf_ = Buffer<std::uint16_t>(M * K);
      return;  // else (oneDNN cannot run it) the plain GEMM per step
    }
    const bool usable = B && M > 0 && N > 0 && K > 0 && plan.source[kStep] == kSourceMkl;
    if (plan.bf16) {
      half_ = usable && have_mkl_bf16();
      if (half_) {
        const int64_t rows = tb ? N : K, cols = tb ? K : N;
        bhalf_ = Buffer<std::uint16_t>(rows * cols);
        round_rows(rows, cols, B, ldb, bhalf_.data());
        ahalf_ = Buffer<std::uint16_t>(M * K);
      }
      return;
    }
    packed_ = usable && cblas_sgemm_pack_get_size && cblas_sgemm_pack && cblas_sgemm_compute;
    if (packed_) {
      const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, M, N, K);
      buffer_ = Buffer<float>(static_cast<int64_t>((bytes + sizeof(float) - 1) / sizeof(float)));
      cblas_sgemm_pack(kRowMajor, kBMatrix, tb ? kTrans : kNoTrans, M, N, K, 1.0f, B, ldb,
                       buffer_.data());
    }
  }
}

template <typename T>
void PackedB<T>::run(const T* A, int64_t lda, T beta, T* C, int64_t ldc,
                     const std::uint16_t* A_half) const {
  run_rows(M_, A, lda, beta, C, ldc, A_half);
}

template <typename T>
void PackedB<T>::run_rows(int64_t rows, const T* A, int64_t lda, T beta, T* C, int64_t ldc,
                          const std::uint16_t* A_half) const {
  if (rows <= 0) return;
  if constexpr (std::is_same_v<T, float>) {
    // A in bfloat16 (rows, K): the caller's rounding, else rounded here into ahalf_
    auto rounded = [&]() -> const std::uint16_t* {
      if (A_half) return A_half;
      round_rows(rows, K_, A, lda, ahalf_.data());
      return ahalf_.data();
    };
    if (panels_) {
      avx2_gemm(rows, N_, K_, A, lda, buffer_.data(), beta, C, ldc);
      return;
    }
    if (onednn_) {
      const bool bf16 = plan_.bf16;
      if (onednn_->run(rows, bf16 ? static_cast<const void*>(rounded()) : A, bf16 ? K_ : lda,
                       beta, C, ldc))
        return;
    }
    if (packed_ && rows == M_) {  // MKL's packed B is computed with the M it was packed for
      cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, M_, N_, K_, A, lda, buffer_.data(), ldb_,
                          beta, C, ldc);
      return;
    }
    if (half_) {
      cblas_gemm_bf16bf16f32(kRowMajor, kNoTrans, tb_ ? kTrans : kNoTrans, rows, N_, K_, 1.0f,
                             rounded(), K_, bhalf_.data(), tb_ ? K_ : N_, beta, C, ldc);
      return;
    }
  }
  gemm<T>(plan_, kStep, false, tb_, rows, N_, K_, T(1), A, lda, B_, ldb_, beta, C, ldc);
}

template class PackedB<float>;
template class PackedB<double>;

int64_t pool_threads() { return at::get_num_threads(); }

void parallel_chunks(int64_t n, int64_t grain, const Chunks& body) {
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;  // on whichever thread runs the chunk
    body.run(begin, end);
  });
}

namespace {

// ---------------------------------------------------------------------------------------------
// The cells by kernel id, and their facts as the entries check and allocate by them.

template <typename... Cells>
struct CellList {};
using Cells = CellList<RnnTanh, RnnRelu, PlainLstm, Gru, PeepholeLstm, LayerNormLstm, LayerNormGru>;

template <typename Fn, typename... Cell>
void with_cell_of(int64_t id, Fn&& fn, CellList<Cell...>) {
  const bool found = ((Cell::kId == id ? (fn(Cell{}), true) : false) || ...);
  TORCH_CHECK(found, "rnnkit cpu kernels: kernel_id = ", id,
              "; expected a kernel_id of the cell table, 0 to ", sizeof...(Cell) - 1);
}

// fn(Cell{}) for the cell whose kernel id is `id`.
template <typename Fn>
void with_cell(int64_t id, Fn&& fn) {
  with_cell_of(id, fn, Cells{});
}

struct Facts {
  const char* name;
  int64_t gates, saved, states;
  bool cell_state;
  SlotList weights;
};

Facts facts(int64_t id) {
  Facts f{};
  with_cell(id, [&](auto cell) {
    using Cell = decltype(cell);
    f = {Cell::kName,     Cell::kGates, Cell::kSaved, Cell::kCellState ? 2 : 1,
         Cell::kCellState, Cell::kWeights};
  });
  return f;
}

// Each weight slot's name, its sizes in the call's letters, and whether a layer may leave it out.
struct SlotInfo {
  const char* name;
  const char* layout;
  bool optional;
};

constexpr SlotInfo kSlotInfo[kSlots] = {
    {"w_ih", "(G, I)", false},   {"w_hh", "(G, P)", false},    {"b_ih", "(G)", true},
    {"b_hh", "(G)", true},       {"w_hr", "(P, H)", true},     {"w_ci", "(H)", false},
    {"w_cf", "(H)", false},      {"w_co", "(H)", false},       {"ln_ih_w", "(G)", false},
    {"ln_ih_b", "(G)", false},   {"ln_hh_w", "(G)", false},    {"ln_hh_b", "(G)", false},
    {"ln_c_w", "(H)", false},    {"ln_c_b", "(H)", false},
};

std::vector<int64_t> slot_sizes(int slot, const Shape& n) {
  switch (slot) {
    case kWeightIh:
      return {n.G, n.I};
    case kWeightHh:
      return {n.G, n.P};
    case kWeightHr:
      return {n.P, n.H};
    case kWeightCi:
    case kWeightCf:
    case kWeightCo:
    case kLnCWeight:
    case kLnCBias:
      return {n.H};
    default:
      return {n.G};
  }
}

constexpr const char* kSavedName[kSavedSlots] = {"act",  "hprev", "c",    "cprev", "hpre",
                                                 "xhat", "hhat",  "chat", "rstd"};
constexpr const char* kSavedLayout[kSavedSlots] = {
    "(T, B, S)", "(T, B, P)", "(T, B, H)", "(T, B, H)", "(T, B, H)",
    "(T, B, G)", "(T, B, G)", "(T, B, H)", "(T, B, 3)"};
constexpr int64_t kMasks = 3;  // per direction: state_mask, zone_h, zone_c

// An optional tensor of a list: undefined when absent (an empty (0,) tensor), else contiguous.
Tensor given(const Tensor& t) {
  return !t.defined() || (t.dim() == 1 && t.size(0) == 0) ? Tensor() : t.contiguous();
}

// ---------------------------------------------------------------------------------------------
// One call: its cell and lengths, and per direction its arguments (checked against its input and
// the cell), its variants and the tensors the entry returns.

struct Direction {
  Shape n{};
  bool reverse = false;
  Variants v{};
  int64_t widths[kSavedSlots] = {};  // of the saved arrays (saved_width)
  Tensor x, h0, c0;
  Tensor w[kSlots];
  std::optional<Regularisers> reg;
  Tensor saved[kSavedSlots];
  Tensor out, h, c;                     // forward
  Tensor gout, ghn, gcn, dx, dh, dc;    // backward
  Tensor dw[kSlots];                    // backward
};

struct Call {
  Call(int64_t kernel_id, at::TensorList inputs, at::TensorList states, at::TensorList weights,
       at::TensorList masks, const std::optional<Tensor>& lengths_,
       const c10::List<bool>& reverse, bool save);

  int64_t kernel_id;
  Facts f;
  Tensor lengths;  // (B) int64 on the CPU, or undefined
  std::vector<Direction> dirs;
  at::TensorOptions opts;
  GemmPlan plan;

  int64_t size() const { return static_cast<int64_t>(dirs.size()); }

  // The arguments of direction d's driver (ForwardArgs<T> or BackwardArgs<T>).
  template <typename T, typename Args>
  void fill(int64_t d, double eps, Args& a);
};

Call::Call(int64_t kernel_id, at::TensorList inputs, at::TensorList states,
           at::TensorList weights, at::TensorList masks, const std::optional<Tensor>& lengths_,
           const c10::List<bool>& reverse, bool save)
    : kernel_id(kernel_id), f(facts(kernel_id)) {
  lengths = lengths_.has_value() && lengths_->defined() ? lengths_->to(at::kCPU).contiguous()
                                                        : Tensor();
  const int64_t D = static_cast<int64_t>(reverse.size());
  const int64_t nw = f.weights.count;
  TORCH_CHECK(D == 1 || D == 2, "rnnkit cpu kernels: reverse has ", D,
              " entries; expected one per direction, 1 or 2");
  TORCH_CHECK(inputs.size() == 1 || static_cast<int64_t>(inputs.size()) == D,
              "rnnkit cpu kernels: inputs has ", inputs.size(),
              " tensors; expected 1 (shared) or one per direction (", D, ")");
  TORCH_CHECK(static_cast<int64_t>(states.size()) == D * f.states,
              "rnnkit cpu kernels: states has ", states.size(), " tensors; expected ",
              D * f.states, ": ", f.cell_state ? "h0 and c0" : "h0", " per direction for the ",
              f.name);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == D * nw, "rnnkit cpu kernels: weights has ",
              weights.size(), " tensors; expected ", D * nw, ": the ", nw,
              " weights per direction of the ", f.name);
  TORCH_CHECK(static_cast<int64_t>(masks.size()) == D * kMasks, "rnnkit cpu kernels: masks has ",
              masks.size(), " tensors; expected ", D * kMasks,
              ": state_mask, zone_h, zone_c per direction");
  dirs.resize(D);
  for (int64_t d = 0; d < D; ++d) {
    Direction& dir = dirs[d];
    dir.reverse = reverse.get(d);
    const Tensor& x = inputs[inputs.size() == 1 ? 0 : d];
    check_input(x);
    if (d > 0) check_arg("inputs[1]", x, dirs[0].x, dirs[0].x.sizes(), "x's");
    dir.x = x.contiguous();
    for (int64_t k = 0; k < nw; ++k) dir.w[f.weights.at[k]] = given(weights[d * nw + k]);
    Shape& n = dir.n;
    n.T = x.size(0);
    n.B = x.size(1);
    n.I = x.size(2);
    n.H = hidden_of(dir.w[kWeightIh], f.gates, f.name);
    n.G = dir.w[kWeightIh].size(0);
    const Tensor& w_hr = dir.w[kWeightHr];
    TORCH_CHECK(!w_hr.defined() || (w_hr.dim() == 2 && w_hr.size(0) > 0),
                "rnnkit cpu kernels: w_hr has shape ",
                w_hr.defined() ? w_hr.sizes() : at::IntArrayRef{}, "; expected (P, H)");
    n.P = w_hr.defined() ? w_hr.size(0) : n.H;
    n.S = f.saved * n.H;
    for (int64_t k = 0; k < nw; ++k) {
      const int slot = f.weights.at[k];
      const SlotInfo& info = kSlotInfo[slot];
      TORCH_CHECK(dir.w[slot].defined() || info.optional, "rnnkit cpu kernels: ", info.name,
                  " is missing; the ", f.name, " needs it");
      check_arg(info.name, dir.w[slot], x, slot_sizes(slot, n), info.layout);
    }
    TORCH_CHECK(dir.w[kBiasIh].defined() == dir.w[kBiasHh].defined(),
                "rnnkit cpu kernels: b_ih and b_hh: expected both or neither");
    dir.h0 = states[d * f.states].contiguous();
    check_arg("h0", dir.h0, x, {n.B, n.P}, "(B, P)");
    if (f.cell_state) {
      dir.c0 = states[d * f.states + 1].contiguous();
      check_arg("c0", dir.c0, x, {n.B, n.H}, "(B, H)");
    }
    dir.reg.emplace(given(masks[d * kMasks]), given(masks[d * kMasks + 1]),
                    given(masks[d * kMasks + 2]), f.cell_state, n, x);
    dir.v = {lengths.defined(), w_hr.defined(), save, dir.reg->mask.defined(),
             dir.reg->zone_h.defined()};
    with_cell(kernel_id, [&](auto cell) {
      for (int k = 0; k < kSavedSlots; ++k)
        dir.widths[k] = saved_width<decltype(cell)>(k, n, dir.v.projection, dir.v.zoneout);
    });
  }
  check_lengths(lengths, dirs[0].n.B, dirs[0].n.T);
  opts = dirs[0].x.options();
}

template <typename T, typename Args>
void Call::fill(int64_t d, double eps, Args& a) {
  Direction& dir = dirs[d];
  a.n = dir.n;
  a.reverse = dir.reverse;
  a.len = lengths.defined() ? lengths.const_data_ptr<int64_t>() : nullptr;
  a.eps = static_cast<T>(eps);
  a.gemm = plan;
  a.x = ptr<T>(dir.x);
  for (int k = 0; k < kSlots; ++k) a.w[k] = ptr<T>(dir.w[k]);
  const Regularisers& reg = *dir.reg;
  a.masks.mask = ptr<T>(reg.mask);
  a.masks.zone_h = ptr<T>(reg.zone_h);
  a.masks.zone_c = ptr<T>(reg.zone_c);
  a.masks.zone_h_step = reg.zone_h_step;
  a.masks.zone_c_step = reg.zone_c_step;
  if constexpr (std::is_same_v<Args, ForwardArgs<T>>) {
    a.out = mptr<T>(dir.out);
    a.h = mptr<T>(dir.h);
    a.c = mptr<T>(dir.c);
    for (int k = 0; k < kSavedSlots; ++k) a.saved.at[k] = mptr<T>(dir.saved[k]);
  } else {
    a.gout = ptr<T>(dir.gout);
    a.c0 = ptr<T>(dir.c0);
    for (int k = 0; k < kSavedSlots; ++k) a.saved.at[k] = ptr<T>(dir.saved[k]);
    a.dx = mptr<T>(dir.dx);
    a.dh = mptr<T>(dir.dh);
    a.dc = mptr<T>(dir.dc);
    for (int k = 0; k < kSlots; ++k) a.dw[k] = mptr<T>(dir.dw[k]);
  }
}

// run(d) for each direction: two on two threads when there are, one after the other otherwise.
// Independent directions each on their own thread (their GEMMs single-threaded) beat splitting
// every small per-step GEMM across threads.
template <typename F>
void each_direction(int64_t D, F&& run) {
  if (D == 1) {
    run(0);
    return;
  }
  std::exception_ptr error[2];
  // The caller's thread-local state (autograd off below the custom op, grad mode, ...) must hold
  // on the worker thread too.
  const at::ThreadLocalState state;
  auto guarded = [&](int d) {
    try {
      at::ThreadLocalStateGuard guard(state);
      run(d);
    } catch (...) {
      error[d] = std::current_exception();
    }
  };
#ifdef _OPENMP
  if (at::get_num_threads() >= 2 && !at::in_parallel_region()) {
    // OpenMP may hand the region fewer threads than asked for (OMP_THREAD_LIMIT, dynamic teams,
    // nested regions): each thread takes every direction left to it, so both always run.
#pragma omp parallel num_threads(2)
    for (int d = omp_get_thread_num(); d < 2; d += omp_get_num_threads()) guarded(d);
  } else {
    guarded(0);
    guarded(1);
  }
#else
  guarded(0);
  guarded(1);
#endif
  for (auto& e : error)
    if (e) std::rethrow_exception(e);
}

// OpenMP's pool threads start with the MXCSR of the thread whose parallel region creates them.
// Created inside a call (MKL's first threaded GEMM, say), while the calling thread flushes
// subnormals (FlushDenormals), they would flush for the rest of the process and change the
// caller's own arithmetic on them. So after the first call at each thread count, every thread of
// the pool gets the calling thread's setting from before the call; a no-op after.
class SettlePool {
 public:
#if defined(__SSE__) && defined(_OPENMP)
  SettlePool() : csr_(_mm_getcsr()), n_(at::get_num_threads()) {}
  ~SettlePool() {
    thread_local int settled = 1;
    if (n_ <= settled || omp_in_parallel()) return;
    flush_denormals((csr_ & kFlushBits) == kFlushBits);
    _mm_setcsr(csr_);
    settled = n_;
  }

 private:
  unsigned csr_;
  int n_;
#endif
};

// The drivers of the call's cell over its directions, in its dtype: forward or backward by the
// arguments' type.
template <template <typename> class Args>
void run(Call& call, double eps) {
  const SettlePool settle;
  AT_DISPATCH_FLOATING_TYPES(call.opts.dtype().toScalarType(), "rnnkit_layer", [&] {
    using T = scalar_t;
    std::vector<Args<T>> args(call.size());
    for (int64_t d = 0; d < call.size(); ++d) call.fill<T>(d, eps, args[d]);
    with_cell(call.kernel_id, [&](auto cell) {
      using Cell = decltype(cell);
      each_direction(call.size(), [&](int d) {
        const FlushDenormals flush;  // on the thread that runs this direction
        if constexpr (std::is_same_v<Args<T>, ForwardArgs<T>>) {
          run_forward<Cell, T>(call.dirs[d].v, args[d]);
        } else {
          run_backward<Cell, T>(call.dirs[d].v, args[d]);
        }
      });
    });
  });
}

// ---------------------------------------------------------------------------------------------
// The GEMM plan of a call, and the measurement that chooses it (rnnkit.backends.cpu.gemm).

void check_source(const char* name, int64_t source) {
  TORCH_CHECK(source >= 0 && source < kSources, "rnnkit cpu kernels: ", name, " = ", source,
              "; expected a GEMM source, 0 to ", kSources - 1);
}

GemmPlan plan_of(int64_t step, int64_t bulk, bool bf16, bool split) {
  check_source("gemm_step", step);
  check_source("gemm_bulk", bulk);
  GemmPlan plan;
  plan.source[kStep] = static_cast<int>(step);
  plan.source[kBulk] = static_cast<int>(bulk);
  plan.bf16 = bf16;
  plan.split = split;
  return plan;
}

// Opens oneDNN's library at `path` for the onednn source: "" when it is open (now or before),
// else why it could not be.
std::string onednn_load(std::string path) { return onednn::load(path); }

bool gemm_available(int64_t source, bool bf16) {
  check_source("source", source);
  return gemm_source_available(static_cast<int>(source), bf16);
}

// Seconds per call of `reps` calls of one GEMM of `role` from `source`, as the drivers run it:
// 0 (kStep), C (M, N) = A (M, K) . B^T with B (N, K) prepared once (PackedB), as the recurrent
// step; 1 (kBulk), C (M, N) = A (M, K) . B^T, as the input projection; 2, C (M, N) = A^T . B
// with A (K, M) and B (K, N), as the weight gradients (bulk too). One warm-up call first.
std::vector<double> gemm_probe(int64_t source, bool bf16, int64_t role, int64_t M, int64_t N,
                               int64_t K, int64_t reps) {
  check_source("source", source);
  TORCH_CHECK(role >= 0 && role <= 3, "rnnkit cpu kernels: role = ", role,
              "; expected 0 (step), 1 (bulk), 2 (weight gradient) or 3 (split step)");
  TORCH_CHECK(M > 0 && N > 0 && K > 0 && reps > 0, "rnnkit cpu kernels: M, N, K, reps = ", M,
              ", ", N, ", ", K, ", ", reps, "; expected positive sizes");
  const GemmPlan plan = plan_of(source, source, bf16, false);
  Buffer<float> a(M * K), b(N * K), c(M * N);
  for (int64_t k = 0; k < M * K; ++k) a.data()[k] = static_cast<float>((k % 17) - 8) / 16.0f;
  for (int64_t k = 0; k < N * K; ++k) b.data()[k] = static_cast<float>((k % 13) - 6) / 16.0f;
  if (role == 3) {
    // The step as split steps run it: each thread of the pool its own slice of the M rows, B
    // prepared per slice, the slices at once; a call takes as long as its slowest slice.
    std::vector<double> seconds(reps, 0.0);
    std::mutex lock;
    over_batch(true, M, [&](int64_t m0, int64_t m1) {
      const PackedB<float> packed(plan, true, m1 - m0, N, K, b.data(), K);
      std::vector<double> mine;
      for (int64_t r = 0; r <= reps; ++r) {
        const auto start = std::chrono::steady_clock::now();
        packed.run(a.data() + m0 * K, K, 0.0f, c.data() + m0 * N, N);
        const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
        if (r > 0) mine.push_back(took.count());
      }
      const std::lock_guard<std::mutex> guard(lock);
      for (int64_t r = 0; r < reps; ++r) seconds[r] = std::max(seconds[r], mine[r]);
    });
    return seconds;
  }
  std::vector<double> seconds;
  const PackedB<float> packed(plan, true, M, N, K, role == kStep ? b.data() : nullptr, K);
  for (int64_t r = 0; r <= reps; ++r) {
    const auto start = std::chrono::steady_clock::now();
    if (role == kStep) {
      packed.run(a.data(), K, 0.0f, c.data(), N);
    } else if (role == 2) {
      gemm<float>(plan, kBulk, true, false, M, N, K, 1.0f, a.data(), M, b.data(), N, 0.0f,
                  c.data(), N);
    } else {
      gemm<float>(plan, kBulk, false, true, M, N, K, 1.0f, a.data(), K, b.data(), K, 0.0f,
                  c.data(), N);
    }
    const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
    if (r > 0) seconds.push_back(took.count());
  }
  return seconds;
}

// C (M, N) = op(A) (M, K) . op(B) (K, N) + beta C in place, float32 (rows strided as given:
// stride(1) == 1), by `source` as the kernels call it `how`: "packed" (the step: B prepared once,
// PackedB; A not transposed), "packed_rows" (the same B prepared for M + 5 rows, run on M:
// PackedB::run_rows), "step" (the step's plain GEMM, as with lengths), "bulk" (a bulk
// GEMM), "operand" (a bulk GEMM of two Operands, rounded once where the plan says so: A and B
// contiguous). For the tests of every source against a float64 product.
void gemm_compute(int64_t source, bool bf16, std::string how, const Tensor& a,
                  const Tensor& b, const Tensor& c, bool ta, bool tb, double beta) {
  check_source("source", source);
  for (const Tensor* t : {&a, &b, &c})
    TORCH_CHECK(t->dim() == 2 && t->scalar_type() == at::kFloat && t->device().is_cpu() &&
                    t->stride(1) == 1 && t->stride(0) >= std::max<int64_t>(t->size(1), 1),
                "rnnkit cpu kernels: gemm_compute takes 2-D float32 CPU matrices with rows of "
                "unit stride; got sizes ", t->sizes(), ", strides ", t->strides());
  const int64_t M = c.size(0), N = c.size(1), K = ta ? a.size(0) : a.size(1);
  TORCH_CHECK((ta ? a.size(1) : a.size(0)) == M && (tb ? b.size(1) : b.size(0)) == K &&
                  (tb ? b.size(0) : b.size(1)) == N,
              "rnnkit cpu kernels: gemm_compute: op(A) ", a.sizes(), ", op(B) ", b.sizes(),
              " and C ", c.sizes(), " do not make a product");
  const GemmPlan plan = plan_of(source, source, bf16, false);
  const float* A = a.const_data_ptr<float>();
  const float* B = b.const_data_ptr<float>();
  float* C = c.mutable_data_ptr<float>();
  const float fbeta = static_cast<float>(beta);
  if (how == "packed" || how == "packed_rows") {
    TORCH_CHECK(!ta, "rnnkit cpu kernels: gemm_compute: the step does not transpose A");
    if (how == "packed") {
      const PackedB<float> packed(plan, tb, M, N, K, B, b.stride(0));
      packed.run(A, a.stride(0), fbeta, C, c.stride(0));
    } else {
      const PackedB<float> packed(plan, tb, M + 5, N, K, B, b.stride(0));
      packed.run_rows(M, A, a.stride(0), fbeta, C, c.stride(0));
    }
  } else if (how == "step" || how == "bulk") {
    gemm<float>(plan, how == "step" ? kStep : kBulk, ta, tb, M, N, K, 1.0f, A, a.stride(0), B,
                b.stride(0), fbeta, C, c.stride(0));
  } else if (how == "operand") {
    TORCH_CHECK(a.is_contiguous() && b.is_contiguous(),
                "rnnkit cpu kernels: gemm_compute: Operands are contiguous");
    const Operand<float> oa(plan, a.size(0), a.size(1), A), ob(plan, b.size(0), b.size(1), B);
    gemm<float>(plan, ta, tb, M, N, K, oa, ob, fbeta, C, c.stride(0));
  } else {
    TORCH_CHECK(false, "rnnkit cpu kernels: gemm_compute: how = '", how,
                "'; expected packed, packed_rows, step, bulk or operand");
  }
}

// ---------------------------------------------------------------------------------------------
// The entries.

// An uninitialised (zeroed) tensor of `sizes` for what the forward saves for backward: from the
// scratch pool (scratch.cpp) when large, handed back to it when autograd frees the tensor, so
// that each training step does not fault in fresh pages. Tensors the caller sees as results
// (out, the states, the gradients) come from ATen's allocator as usual.
Tensor pooled(const std::vector<int64_t>& sizes, const at::TensorOptions& opts, bool zeroed) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const std::size_t bytes = static_cast<std::size_t>(numel) * opts.dtype().itemsize();
  if (bytes < (std::size_t(1) << 20))
    return zeroed ? at::zeros(sizes, opts) : at::empty(sizes, opts);
  void* data = scratch_acquire(bytes);
  Tensor t = at::from_blob(data, sizes, [bytes](void* p) { scratch_release(p, bytes); }, opts);
  if (zeroed) t.zero_();
  return t;
}

std::vector<Tensor> layer_forward(at::TensorList inputs, at::TensorList states,
                                  at::TensorList weights, at::TensorList masks,
                                  const std::optional<Tensor>& lengths, int64_t kernel_id,
                                  const c10::List<bool>& reverse, double eps, bool save,
                                  int64_t gemm_step, int64_t gemm_bulk, bool bf16, bool split) {
  TORCH_CHECK(eps >= 0, "rnnkit cpu kernels: eps = ", eps, "; expected eps >= 0");
  Call call(kernel_id, inputs, states, weights, masks, lengths, reverse, save);
  call.plan = plan_of(gemm_step, gemm_bulk, bf16, split);
  for (Direction& dir : call.dirs) {
    const Shape& n = dir.n;
    dir.out = dir.v.lengths ? at::zeros({n.T, n.B, n.P}, call.opts)
                            : at::empty({n.T, n.B, n.P}, call.opts);
    dir.h = dir.h0.clone();
    if (call.f.cell_state) dir.c = dir.c0.clone();
    for (int k = 0; k < kSavedSlots; ++k) {
      // Padded rows must hold finite values: the final GEMMs multiply them by zero. xhat's are
      // all written.
      const std::vector<int64_t> sizes{n.T, n.B, dir.widths[k]};
      dir.saved[k] = !save || dir.widths[k] == 0
                         ? at::empty({0}, call.opts)
                         : pooled(sizes, call.opts, dir.v.lengths && k != kXhat);
    }
  }
  run<ForwardArgs>(call, eps);
  std::vector<Tensor> out;
  for (Direction& dir : call.dirs) {
    out.push_back(dir.out);
    out.push_back(dir.h);
    if (call.f.cell_state) out.push_back(dir.c);
    for (Tensor& t : dir.saved) out.push_back(t);
  }
  return out;
}

std::vector<Tensor> layer_backward(const c10::List<std::optional<Tensor>>& grads,
                                   at::TensorList inputs, at::TensorList states,
                                   at::TensorList weights, at::TensorList masks,
                                   at::TensorList saved, const std::optional<Tensor>& lengths,
                                   int64_t kernel_id, const c10::List<bool>& reverse, double eps,
                                   bool need_dx, int64_t gemm_step, int64_t gemm_bulk, bool bf16,
                                   bool split) {
  Call call(kernel_id, inputs, states, weights, masks, lengths, reverse, false);
  call.plan = plan_of(gemm_step, gemm_bulk, bf16, split);
  const int64_t D = call.size(), ng = 1 + call.f.states;
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == D * ng, "rnnkit cpu kernels: grads has ",
              grads.size(), " entries; expected ", D * ng,
              ": the gradients of out and of the final states per direction");
  TORCH_CHECK(static_cast<int64_t>(saved.size()) == D * kSavedSlots,
              "rnnkit cpu kernels: saved has ", saved.size(), " tensors; expected ",
              D * kSavedSlots, ": what layer_forward saved per direction");
  for (int64_t d = 0; d < D; ++d) {
    Direction& dir = call.dirs[d];
    const Shape& n = dir.n;
    auto grad = [&](int64_t k) {
      const std::optional<Tensor> t = grads.get(d * ng + k);
      return t.has_value() && t->defined() ? t->contiguous() : Tensor();
    };
    dir.gout = grad(0);
    dir.ghn = grad(1);
    dir.gcn = call.f.cell_state ? grad(2) : Tensor();
    check_arg("grad_out", dir.gout, dir.x, {n.T, n.B, n.P}, "(T, B, P)");
    check_arg("grad_hn", dir.ghn, dir.x, {n.B, n.P}, "(B, P)");
    check_arg("grad_cn", dir.gcn, dir.x, {n.B, n.H}, "(B, H)");
    for (int k = 0; k < kSavedSlots; ++k) {
      dir.saved[k] = saved[d * kSavedSlots + k].contiguous();
      check_saved(kSavedName[k], dir.saved[k], dir.x, dir.widths[k] > 0,
                  {n.T, n.B, dir.widths[k]}, kSavedLayout[k]);
    }
    dir.dx = need_dx ? at::empty({n.T, n.B, n.I}, call.opts) : Tensor();
    dir.dh = dir.ghn.defined() ? dir.ghn.clone() : at::zeros({n.B, n.P}, call.opts);
    if (call.f.cell_state)
      dir.dc = dir.gcn.defined() ? dir.gcn.clone() : at::zeros({n.B, n.H}, call.opts);
    for (int k = 0; k < kSlots; ++k)
      if (dir.w[k].defined()) dir.dw[k] = at::empty(dir.w[k].sizes(), call.opts);
  }
  run<BackwardArgs>(call, eps);
  auto none = [&] { return at::empty({0}, call.opts); };  // an absent result
  std::vector<Tensor> out;
  if (inputs.size() == 1 && D == 2) {
    out.push_back(need_dx ? call.dirs[0].dx.add_(call.dirs[1].dx) : none());
  } else {
    for (Direction& dir : call.dirs) out.push_back(need_dx ? dir.dx : none());
  }
  for (Direction& dir : call.dirs) {
    out.push_back(dir.dh);
    if (call.f.cell_state) out.push_back(dir.dc);
    for (int64_t k = 0; k < call.f.weights.count; ++k) {
      const Tensor& dw = dir.dw[call.f.weights.at[k]];
      out.push_back(dw.defined() ? dw : none());
    }
  }
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace rnnkit

TORCH_LIBRARY(rnnkit_cpu, m) {
  m.def(
      "layer_forward(Tensor[] inputs, Tensor[] states, Tensor[] weights, Tensor[] masks, "
      "Tensor? lengths, int kernel_id, bool[] reverse, float eps, bool save, int gemm_step=0, "
      "int gemm_bulk=0, bool bf16=False, bool split=False) -> Tensor[]");
  m.def(
      "layer_backward(Tensor?[] grads, Tensor[] inputs, Tensor[] states, Tensor[] weights, "
      "Tensor[] masks, Tensor[] saved, Tensor? lengths, int kernel_id, bool[] reverse, "
      "float eps, bool need_dx, int gemm_step=0, int gemm_bulk=0, bool bf16=False, "
      "bool split=False) -> Tensor[]");
  m.def("gemm_available(int source, bool bf16) -> bool", &rnnkit::cpu::gemm_available);
  m.def("onednn_load(str path) -> str", &rnnkit::cpu::onednn_load);
  m.def(
      "gemm_compute(int source, bool bf16, str how, Tensor a, Tensor b, Tensor(c!) c, bool ta, "
      "bool tb, float beta) -> ()",
      &rnnkit::cpu::gemm_compute);
  m.def("flush_denormals(bool on) -> bool", &rnnkit::cpu::flush_denormals);
  m.def("gemm_probe(int source, bool bf16, int role, int M, int N, int K, int reps) -> float[]",
        &rnnkit::cpu::gemm_probe);
}

TORCH_LIBRARY_IMPL(rnnkit_cpu, CPU, m) {
  m.impl("layer_forward", &rnnkit::cpu::layer_forward);
  m.impl("layer_backward", &rnnkit::cpu::layer_backward);
}
