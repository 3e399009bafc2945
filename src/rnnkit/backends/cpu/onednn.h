// The "onednn" GEMM source: oneDNN's matmul primitive from a GOMP-threaded oneDNN 3 library
// (the optional onednn-cpu-gomp wheel), opened at run time. Used by ops.cpp's gemm() and
// PackedB only; defined in onednn.cpp.
//
// Threads: the library's OpenMP is torch's own libgomp (resolved by its SONAME once torch is
// loaded), so a primitive runs on the caller's torch.set_num_threads threads; inside an OpenMP
// parallel region (the two directions of a bidirectional layer) it runs on the calling thread
// alone. Primitives are cached per shape, transposes, strides, precision, beta and thread count,
// shared by all threads; the memory objects that bind them to data are per thread (or per
// PackedB) and re-pointed with set_data_handle, never re-created per step.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace rnnkit {
namespace cpu {
namespace onednn {

using std::int64_t;

// Opens libdnnl at `path` and creates the process's engine and stream: "" on success (or when
// already open), else why it could not (a later call may try another path).
std::string load(const std::string& path);

// Whether the library is open (bf16: and runs bf16 x bf16 -> f32 matmuls on the CPU's own
// instructions, not on oneDNN's reference code).
bool available(bool bf16);

// C (M, N) = op(A) (M, K) . op(B) (K, N) + beta C, row-major, C float32; A and B float32, or
// bfloat16 (uint16 bits) with bf16. op = transpose if ta / tb; lda, ldb, ldc are the rows'
// strides as stored. False when no primitive could be made for it (the caller falls back).
bool matmul(bool bf16, bool ta, bool tb, int64_t M, int64_t N, int64_t K, const void* A,
            int64_t lda, const void* B, int64_t ldb, float beta, float* C, int64_t ldc);

struct Bound;

// A right-hand operand used at every step, reordered once into the matmul primitive's preferred
// (packed) layout, float32 or bfloat16: then per step one primitive execution.
class Packed {
 public:
  // B as op(B) (K, N) for M rows of A; nullptr when oneDNN cannot make it.
  static std::unique_ptr<Packed> make(bool bf16, bool tb, int64_t M, int64_t N, int64_t K,
                                      const float* B, int64_t ldb);
  ~Packed();
  // C (rows, N) = A (rows, K) . op(B) + beta C, rows <= M; A float32, or bfloat16 with bf16.
  // False when no primitive could be made for these rows, strides and beta (the caller falls
  // back).
  bool run(int64_t rows, const void* A, int64_t lda, float beta, float* C, int64_t ldc);

 private:
  Packed() = default;
  bool bf16_ = false;
  int64_t M_ = 0, N_ = 0, K_ = 0;
  int layout_threads_ = 1;  // the threads the layout was chosen for
  std::shared_ptr<void> weights_;  // the packed B, 64-byte aligned
  // The primitives bound to the packed B, per (rows, lda, ldc, beta, threads) met so far; the first
  // is the one that chose the layout.
  std::vector<std::unique_ptr<Bound>> bound_;
};

}  // namespace onednn
}  // namespace cpu
}  // namespace rnnkit
