// The kernels' scratch memory kept between calls.
//
// A layer's large scratch arrays (the input projection of every step, the gate gradients of every
// step: T*B*G values, tens of megabytes at common sizes) are the same size call after call. Above
// the C library's mmap threshold every fresh allocation maps new pages, which the kernel then
// faults in and zeroes one by one: at T=200, B=64, H=512 that was a sixth of a GRU training step.
// Blocks of at least kPooled bytes are therefore handed back here when a call ends and reused by
// the next call that fits them, up to a limit on what is kept (RNNKIT_CPU_SCRATCH_MB, default
// 1024; 0 turns the pool off). rnnkit.backends.cpu.release_memory() returns everything kept.
//
// Nothing may rely on what a block held before: RNNKIT_CPU_SCRATCH_POISON=1 fills every block
// handed out with NaN bytes (0xff), which the tests use to show that no result reads memory it
// did not write.
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <new>
#include <vector>

#include <torch/library.h>

#include "kernel_common.h"

namespace rnnkit {
namespace cpu {
namespace {

constexpr std::size_t kAlign = 64;
constexpr std::size_t kPooled = std::size_t(1) << 20;  // smaller blocks go to the allocator

struct Block {
  void* data;
  std::size_t bytes;
};

struct Pool {
  std::mutex lock;
  std::deque<Block> free;  // oldest first
  std::size_t kept = 0;    // bytes in `free`
  std::size_t limit = limit_from_environment();
  const bool poison = poison_from_environment();

  static bool poison_from_environment() {
    const char* text = std::getenv("RNNKIT_CPU_SCRATCH_POISON");
    return text && std::strcmp(text, "1") == 0;
  }

  static std::size_t limit_from_environment() {
    const char* text = std::getenv("RNNKIT_CPU_SCRATCH_MB");
    if (!text || !*text) return std::size_t(1024) << 20;
    char* end = nullptr;
    const long long mb = std::strtoll(text, &end, 10);
    if (end == text || *end != '\0' || mb < 0) return std::size_t(1024) << 20;
    return static_cast<std::size_t>(mb) << 20;
  }

  // Frees the oldest blocks until at most `keep` bytes are kept; the caller holds `lock`.
  void trim(std::size_t keep) {
    while (kept > keep && !free.empty()) {
      const Block b = free.front();
      free.pop_front();
      kept -= b.bytes;
      ::operator delete(b.data, std::align_val_t{kAlign});
    }
  }
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: blocks may come back during exit
  return *p;
}

// A kept block for `bytes`, or nullptr: the smallest that fits and wastes at most a quarter of
// itself.
void* take(Pool& p, std::size_t bytes) {
  if (bytes < kPooled) return nullptr;
  std::lock_guard<std::mutex> guard(p.lock);
  auto best = p.free.end();
  for (auto it = p.free.begin(); it != p.free.end(); ++it) {
    if (it->bytes >= bytes && it->bytes - bytes <= it->bytes / 4 &&
        (best == p.free.end() || it->bytes < best->bytes))
      best = it;
  }
  if (best == p.free.end()) return nullptr;
  void* data = best->data;
  p.kept -= best->bytes;
  p.free.erase(best);
  return data;
}

}  // namespace

void* scratch_acquire(std::size_t bytes) {
  Pool& p = pool();
  void* data = take(p, bytes);
  if (!data) data = ::operator new(bytes, std::align_val_t{kAlign});
  if (p.poison) std::memset(data, 0xff, bytes);
  return data;
}

void scratch_release(void* data, std::size_t bytes) noexcept {
  if (!data) return;
  if (bytes >= kPooled) {
    Pool& p = pool();
    std::lock_guard<std::mutex> guard(p.lock);
    if (bytes <= p.limit) {
      p.free.push_back({data, bytes});
      p.kept += bytes;
      p.trim(p.limit);
      return;
    }
  }
  ::operator delete(data, std::align_val_t{kAlign});
}

std::size_t scratch_kept() {
  Pool& p = pool();
  std::lock_guard<std::mutex> guard(p.lock);
  return p.kept;
}

std::size_t scratch_limit() {
  Pool& p = pool();
  std::lock_guard<std::mutex> guard(p.lock);
  return p.limit;
}

void set_scratch_limit(std::size_t bytes) {
  Pool& p = pool();
  std::lock_guard<std::mutex> guard(p.lock);
  p.limit = bytes;
  p.trim(bytes);
}

namespace {

// The op: [bytes kept, limit]; a limit >= 0 is set first (0 frees everything and keeps nothing).
std::vector<int64_t> scratch_memory(int64_t limit) {
  if (limit >= 0) set_scratch_limit(static_cast<std::size_t>(limit));
  return {static_cast<int64_t>(scratch_kept()), static_cast<int64_t>(scratch_limit())};
}

}  // namespace
}  // namespace cpu
}  // namespace rnnkit

TORCH_LIBRARY_FRAGMENT(rnnkit_cpu, m) {
  m.def("scratch_memory(int limit=-1) -> int[]", &rnnkit::cpu::scratch_memory);
}
