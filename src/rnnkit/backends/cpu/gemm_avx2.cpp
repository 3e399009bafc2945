// The avx2 GEMM source: rnnkit's own product for the recurrent step, float32 on AVX2 and FMA.
//
// The step multiplies B rows of state by the same recurrent weight at every step. A BLAS's
// packed API is meant to prepare that weight once, but where its generic code path runs (MKL on
// AMD CPUs) each call copies the packed weight again: a fixed cost per step, 7-29 % of the step
// at the sizes measured (BENCHMARKS.md). Here the weight, op(B) (K, N), is packed once per call
// into panels of kNr columns, each panel cut into blocks of at most kKc rows of depth, kNr floats
// per row, in the order the kernel reads them; a step then streams the panels and nothing else
// is copied. The kernel keeps a tile of kMr x kNr results in twelve 8-wide registers (two more hold
// a row of the panel, one the broadcast element of A), the classic register blocking for 16
// vector registers; a block of a panel (kKc x kNr floats, 16 KiB) stays in L1 while every row
// tile of A passes over it. Threads take whole panels (at::parallel_for: serial inside a
// parallel region, as in the steps split by batch).
//
// Whether this beats MKL's or oneDNN's step is measured on each machine like every other source
// (rnnkit.backends.cpu.gemm); where the kernels are compiled without AVX2 and FMA the source is
// unavailable.
#include <algorithm>
#include <cstdint>

#include "kernel_common.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define RNNKIT_HAVE_AVX2 1
#else
#define RNNKIT_HAVE_AVX2 0
#endif

namespace rnnkit {
namespace cpu {

namespace {

constexpr int64_t kNr = 16;   // columns of a panel: two 8-wide vectors
constexpr int64_t kKc = 256;  // depth of a panel's block
constexpr int64_t kMr = 6;    // rows of a tile

int64_t panels(int64_t N) { return (N + kNr - 1) / kNr; }

#if RNNKIT_HAVE_AVX2

// Row r of a tile at depth k: its two accumulators += A[r][k] * the panel's row (b0, b1). A row
// past the tile's R does nothing, so that tile<R> names all twelve accumulators as registers
// (an array of them is spilled to the stack at every step of the loop).
template <int R, int r>
inline __attribute__((always_inline)) void row_fma(const float* a, __m256 b0, __m256 b1,
                                                   __m256& lo, __m256& hi) {
  if constexpr (r < R) {
    const __m256 x = _mm256_broadcast_ss(a);
    lo = _mm256_fmadd_ps(x, b0, lo);
    hi = _mm256_fmadd_ps(x, b1, hi);
  }
}

// The tile of R (<= kMr) rows of A (lda apart) times one block of a panel (kc x kNr at bp), into
// C (R rows, ldc apart, nc <= kNr columns). first: the block at depth 0, which writes
// C = acc (beta 0: C is not read, so what it held never leaks in) or acc + beta C; the later
// blocks add to C.
template <int R>
inline void tile(int64_t kc, const float* A, int64_t lda, const float* bp, float* C, int64_t ldc,
                 int64_t nc, bool first, float beta) {
  __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
  __m256 c6 = c0, c7 = c0, c8 = c0, c9 = c0, c10 = c0, c11 = c0;
  auto a_row = [&](int r) { return A + (r < R ? r * lda : 0); };  // rows past R: never read
  const float *a0 = a_row(0), *a1 = a_row(1), *a2 = a_row(2), *a3 = a_row(3), *a4 = a_row(4),
              *a5 = a_row(5);
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(bp + k * kNr);
    const __m256 b1 = _mm256_loadu_ps(bp + k * kNr + 8);
    row_fma<R, 0>(a0 + k, b0, b1, c0, c1);
    row_fma<R, 1>(a1 + k, b0, b1, c2, c3);
    row_fma<R, 2>(a2 + k, b0, b1, c4, c5);
    row_fma<R, 3>(a3 + k, b0, b1, c6, c7);
    row_fma<R, 4>(a4 + k, b0, b1, c8, c9);
    row_fma<R, 5>(a5 + k, b0, b1, c10, c11);
  }
  // The accumulators leave the registers only here, after the loop.
  const __m256 acc[2 * kMr] = {c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11};
  const bool scaled = first && beta != 0.0f;
  const __m256 vbeta = _mm256_set1_ps(beta);
  for (int r = 0; r < R; ++r) {
    float* row = C + r * ldc;
    __m256 lo = acc[2 * r], hi = acc[2 * r + 1];
    if (nc == kNr) {
      if (!first) {
        lo = _mm256_add_ps(lo, _mm256_loadu_ps(row));
        hi = _mm256_add_ps(hi, _mm256_loadu_ps(row + 8));
      } else if (scaled) {
        lo = _mm256_fmadd_ps(vbeta, _mm256_loadu_ps(row), lo);
        hi = _mm256_fmadd_ps(vbeta, _mm256_loadu_ps(row + 8), hi);
      }
      _mm256_storeu_ps(row, lo);
      _mm256_storeu_ps(row + 8, hi);
    } else {  // the last panel's columns past N are padding: only nc are C's
      alignas(32) float t[kNr];
      _mm256_store_ps(t, lo);
      _mm256_store_ps(t + 8, hi);
      for (int64_t j = 0; j < nc; ++j)
        row[j] = !first ? row[j] + t[j] : (scaled ? beta * row[j] + t[j] : t[j]);
    }
  }
}

// All M rows of A times one block of a panel, kMr rows at a time.
void rows_by_block(int64_t M, int64_t kc, const float* A, int64_t lda, const float* bp, float* C,
                   int64_t ldc, int64_t nc, bool first, float beta) {
  int64_t r = 0;
  for (; r + kMr <= M; r += kMr)
    tile<kMr>(kc, A + r * lda, lda, bp, C + r * ldc, ldc, nc, first, beta);
  const float* a = A + r * lda;
  float* c = C + r * ldc;
  switch (M - r) {
    case 5:
      tile<5>(kc, a, lda, bp, c, ldc, nc, first, beta);
      break;
    case 4:
      tile<4>(kc, a, lda, bp, c, ldc, nc, first, beta);
      break;
    case 3:
      tile<3>(kc, a, lda, bp, c, ldc, nc, first, beta);
      break;
    case 2:
      tile<2>(kc, a, lda, bp, c, ldc, nc, first, beta);
      break;
    case 1:
      tile<1>(kc, a, lda, bp, c, ldc, nc, first, beta);
      break;
    default:
      break;
  }
}

#endif  // RNNKIT_HAVE_AVX2

}  // namespace

bool avx2_available() { return RNNKIT_HAVE_AVX2 != 0; }

int64_t avx2_packed_size(int64_t N, int64_t K) { return panels(N) * kNr * K; }

// Block kb (depth k0 = kb * kKc, kc rows) of panel p sits at dst + k0 * panels(N) * kNr +
// p * kc * kNr: row k of it holds op(B)[k0 + k, p * kNr + j] for j < kNr, zero past N.
void avx2_pack(bool tb, int64_t N, int64_t K, const float* B, int64_t ldb, float* dst) {
  const int64_t np = panels(N);
  parallel_for(np, 4, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kNr, nc = std::min(kNr, N - n0);
      for (int64_t k0 = 0; k0 < K; k0 += kKc) {
        const int64_t kc = std::min(kKc, K - k0);
        float* block = dst + k0 * np * kNr + p * kc * kNr;
        std::fill_n(block, kc * kNr, 0.0f);
        for (int64_t j = 0; j < nc; ++j) {
          if (tb) {  // op(B) = B^T: column n of op(B) is row n of B
            const float* src = B + (n0 + j) * ldb + k0;
            for (int64_t k = 0; k < kc; ++k) block[k * kNr + j] = src[k];
          } else {
            for (int64_t k = 0; k < kc; ++k) block[k * kNr + j] = B[(k0 + k) * ldb + n0 + j];
          }
        }
      }
    }
  });
}

void avx2_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* packed,
               float beta, float* C, int64_t ldc) {
#if RNNKIT_HAVE_AVX2
  if (M <= 0 || N <= 0 || K <= 0) return;
  const int64_t np = panels(N);
  // Panels per chunk: about 2^17 multiply-adds each, enough to pay for a thread's fork.
  const int64_t per_panel = M * kNr * K;
  const int64_t grain_panels =
      std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(per_panel, 1));
  parallel_for(np, grain_panels, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kNr, nc = std::min(kNr, N - n0);
      for (int64_t k0 = 0; k0 < K; k0 += kKc) {
        const int64_t kc = std::min(kKc, K - k0);
        const float* bp = packed + k0 * np * kNr + p * kc * kNr;
        rows_by_block(M, kc, A + k0, lda, bp, C + n0, ldc, nc, k0 == 0, beta);
      }
    }
  });
#else
  (void)M, (void)N, (void)K, (void)A, (void)lda, (void)packed, (void)beta, (void)C, (void)ldc;
#endif
}

}  // namespace cpu
}  // namespace rnnkit
