// The "onednn" GEMM source (onednn.h): oneDNN 3's matmul primitive, from a library opened at run
// time with dlopen() (the kernels never link against it: without the optional wheel they build
// and run on the other sources).
//
// Pieces:
//   Library  the opened library: its functions (onednn_api.h), the process's one CPU engine and
//            one stream, and whether bf16 matmuls run natively; created once, under a lock.
//   Entry    a primitive (matmul, or the reorder that packs a weight) with the memory
//            descriptors it is bound through; cached per Key, shared by every thread, kept for
//            the life of the process (a bounded cache: dropped wholesale when full).
//   Bound    an Entry with memory objects and scratch memory of its own: one per thread for the
//            plain GEMMs (thread_local), one per Packed for the step's. Each execution re-points
//            the memory objects at the call's data (set_data_handle); nothing is re-created.

#include "onednn.h"

#include <dlfcn.h>

#include <atomic>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "onednn_api.h"

namespace rnnkit {
namespace cpu {
namespace onednn {

using namespace dnnl_c;

namespace {

struct Library {
  Api api{};
  Engine engine = nullptr;
  Stream stream = nullptr;
  bool bf16 = false;
};

std::mutex load_mutex;
std::atomic<const Library*> opened{nullptr};

const Api& api() { return opened.load(std::memory_order_acquire)->api; }

void check(Status status, const char* what) {
  if (status != kSuccess)
    throw std::runtime_error(std::string("rnnkit cpu kernels: oneDNN's ") + what +
                             " failed (status " + std::to_string(status) + ")");
}

// The threads a primitive made now will run on: the caller's OpenMP threads (torch's count), or
// one inside a parallel region (oneDNN does not nest).
int current_threads() {
#ifdef _OPENMP
  return omp_in_parallel() ? 1 : omp_get_max_threads();
#else
  return 1;
#endif
}

std::shared_ptr<void> aligned(std::size_t bytes) {
  constexpr std::align_val_t kAlign{64};
  return std::shared_ptr<void>(::operator new(std::max<std::size_t>(bytes, 1), kAlign),
                               [](void* p) { ::operator delete(p, kAlign); });
}

// A (rows, cols) matrix of `type` whose element (i, j) is at i * row_stride + j * col_stride.
MemoryDesc matrix(const Api& f, int64_t rows, int64_t cols, int type, int64_t row_stride,
                  int64_t col_stride) {
  Dims dims = {rows, cols};
  Dims strides = {row_stride, col_stride};
  MemoryDesc md = nullptr;
  return f.memory_desc_create_with_strides(&md, 2, dims, type, strides) == kSuccess ? md
                                                                                     : nullptr;
}

}  // namespace

enum Kind : int { kPlain = 0, kPacked = 1, kPacking = 2 };

// What a primitive is made for. kPacked: the weights in the layout the kPacked primitive of
// (layout_m, N, K, bf16, layout_threads) with lda = K, ldc = N, beta = 0 chose ("any");
// kPacking: the reorder of a plain float32 op(B) (ldb, tb) into that layout.
struct Key {
  int kind;
  bool bf16, ta, tb;
  int64_t M, N, K, lda, ldb, ldc;
  float beta;
  int threads;
  int64_t layout_m;
  int layout_threads;

  auto tie() const {
    return std::tie(kind, bf16, ta, tb, M, N, K, lda, ldb, ldc, beta, threads, layout_m,
                    layout_threads);
  }
  bool operator<(const Key& o) const { return tie() < o.tie(); }
};

struct Entry {
  PrimitiveDesc pd = nullptr;
  Primitive primitive = nullptr;
  MemoryDesc own[3] = {};              // the descriptors made here, destroyed with the entry
  const MemoryDescObj* md[3] = {};     // src (a reorder's "from"), weights, dst ("to")
  std::size_t scratch = 0;             // bytes of scratch memory an execution needs

  Entry() = default;
  Entry(const Entry&) = delete;
  Entry& operator=(const Entry&) = delete;
  ~Entry() {
    const Api& f = api();
    if (primitive) f.primitive_destroy(primitive);
    if (pd) f.primitive_desc_destroy(pd);
    for (MemoryDesc m : own)
      if (m) f.memory_desc_destroy(m);
  }

  // The primitive of pd, and the scratch memory it asks for; false if it cannot be made.
  bool finish() {
    const Api& f = api();
    if (f.primitive_create(&primitive, pd) != kSuccess) return false;
    scratch = f.memory_desc_get_size(f.primitive_desc_query_md(pd, kQueryScratchpadMd, 0));
    return true;
  }
};

namespace {

// Attributes: scratch memory passed by the caller (so that two threads never share one), and
// dst = beta * dst + the product where beta != 0.
struct Attributes {
  Attr attr = nullptr;
  PostOps ops = nullptr;
  explicit Attributes(float beta) {
    const Api& f = api();
    check(f.primitive_attr_create(&attr), "primitive_attr_create");
    check(f.primitive_attr_set_scratchpad_mode(attr, kScratchpadUser), "set_scratchpad_mode");
    if (beta != 0.0f) {
      check(f.post_ops_create(&ops), "post_ops_create");
      check(f.post_ops_append_sum(ops, beta, 0, kTypeUndef), "post_ops_append_sum");
      check(f.primitive_attr_set_post_ops(attr, ops), "set_post_ops");
    }
  }
  ~Attributes() {
    const Api& f = api();
    if (ops) f.post_ops_destroy(ops);
    if (attr) f.primitive_attr_destroy(attr);
  }
};

// The matmul of `k`; weights: the packed layout to use (kPacked; nullptr: let it choose).
std::shared_ptr<Entry> make_matmul(const Key& k, const MemoryDescObj* weights) {
  const Library& lib = *opened.load(std::memory_order_acquire);
  const Api& f = lib.api;
  auto e = std::make_shared<Entry>();
  const int type = k.bf16 ? kTypeBf16 : kTypeF32;
  e->own[0] = matrix(f, k.M, k.K, type, k.ta ? 1 : k.lda, k.ta ? k.lda : 1);
  if (k.kind == kPlain) {
    e->own[1] = matrix(f, k.K, k.N, type, k.tb ? 1 : k.ldb, k.tb ? k.ldb : 1);
  } else if (!weights) {
    Dims dims = {k.K, k.N};
    if (f.memory_desc_create_with_tag(&e->own[1], 2, dims, type, kFormatAny) != kSuccess)
      e->own[1] = nullptr;
  }
  e->own[2] = matrix(f, k.M, k.N, kTypeF32, k.ldc, 1);
  const MemoryDescObj* wmd = e->own[1] ? e->own[1] : weights;
  if (!e->own[0] || !wmd || !e->own[2]) return nullptr;
  const Attributes attr(k.beta);
  if (f.matmul_primitive_desc_create(&e->pd, lib.engine, e->own[0], wmd, nullptr, e->own[2],
                                     attr.attr) != kSuccess) {
    e->pd = nullptr;
    return nullptr;
  }
  e->md[0] = e->own[0];
  e->md[1] = k.kind == kPlain ? e->own[1] : f.primitive_desc_query_md(e->pd, kQueryWeightsMd, 0);
  e->md[2] = e->own[2];
  if (!e->md[1] || !e->finish()) return nullptr;
  return e;
}

// The reorder of a plain float32 op(B) (K, N) into `packed` (float32 or bfloat16).
std::shared_ptr<Entry> make_packing(const Key& k, const MemoryDescObj* packed) {
  const Library& lib = *opened.load(std::memory_order_acquire);
  const Api& f = lib.api;
  auto e = std::make_shared<Entry>();
  e->own[0] = matrix(f, k.K, k.N, kTypeF32, k.tb ? 1 : k.ldb, k.tb ? k.ldb : 1);
  if (!e->own[0]) return nullptr;
  const Attributes attr(0.0f);
  if (f.reorder_primitive_desc_create(&e->pd, e->own[0], lib.engine, packed, lib.engine,
                                      attr.attr) != kSuccess) {
    e->pd = nullptr;
    return nullptr;
  }
  e->md[0] = e->own[0];
  e->md[2] = packed;
  if (!e->finish()) return nullptr;
  return e;
}

// The primitives made so far (a failure too, as nullptr), for every thread. Never destroyed: it
// may outlive the library's own state at exit.
std::mutex cache_mutex;
auto* const cache = new std::map<Key, std::shared_ptr<Entry>>;
constexpr std::size_t kCacheSize = 512;

template <typename Make>
std::shared_ptr<Entry> cached(const Key& k, Make&& make) {
  const std::lock_guard<std::mutex> lock(cache_mutex);
  auto it = cache->find(k);
  if (it != cache->end()) return it->second;
  if (cache->size() >= kCacheSize) cache->clear();  // those in use live on in their Bound
  std::shared_ptr<Entry> e = make();
  cache->emplace(k, e);
  return e;
}

}  // namespace

// An Entry with memory objects (and scratch memory) of its own, re-pointed at each execution.
struct Bound {
  Key key;
  std::shared_ptr<Entry> entry;
  Memory memory[3] = {};
  Memory scratch_memory = nullptr;
  std::shared_ptr<void> scratch;

  Bound(const Key& k, std::shared_ptr<Entry> e) : key(k), entry(std::move(e)) {
    const Library& lib = *opened.load(std::memory_order_acquire);
    for (int k = 0; k < 3; ++k)
      if (entry->md[k])
        check(lib.api.memory_create(&memory[k], entry->md[k], lib.engine, nullptr),
              "memory_create");
    if (entry->scratch > 0) {
      scratch = aligned(entry->scratch);
      check(lib.api.memory_create(&scratch_memory,
                                  lib.api.primitive_desc_query_md(entry->pd, kQueryScratchpadMd, 0),
                                  lib.engine, scratch.get()),
            "memory_create (scratch)");
    }
  }
  Bound(const Bound&) = delete;
  Bound& operator=(const Bound&) = delete;
  ~Bound() {
    const Api& f = api();
    for (Memory m : memory)
      if (m) f.memory_destroy(m);
    if (scratch_memory) f.memory_destroy(scratch_memory);
  }

  void point(int k, const void* data) {
    check(api().memory_set_data_handle(memory[k], const_cast<void*>(data)), "set_data_handle");
  }

  // src (a reorder's "from"), weights (nullptr: as pointed before), dst (a reorder's "to").
  void run(const void* src, const void* weights, void* dst) {
    const Library& lib = *opened.load(std::memory_order_acquire);
    point(0, src);
    if (weights) point(1, weights);
    point(2, dst);
    ExecArg args[4];
    int n = 0;
    args[n++] = {kArgSrc, memory[0]};
    if (memory[1]) args[n++] = {kArgWeights, memory[1]};
    args[n++] = {kArgDst, memory[2]};
    if (scratch_memory) args[n++] = {kArgScratchpad, scratch_memory};
    check(lib.api.primitive_execute(entry->primitive, lib.stream, n, args), "primitive_execute");
  }
};

namespace {

// The implementation oneDNN picks for a bf16 or fp32 matmul of a step's shape: "" if none.
std::string implementation(const Library& lib, bool bf16) {
  const Api& f = lib.api;
  const int type = bf16 ? kTypeBf16 : kTypeF32;
  MemoryDesc src = matrix(f, 64, 256, type, 256, 1);
  MemoryDesc wei = matrix(f, 256, 768, type, 1, 256);
  MemoryDesc dst = matrix(f, 64, 768, kTypeF32, 768, 1);
  std::string name;
  PrimitiveDesc pd = nullptr;
  if (src && wei && dst &&
      f.matmul_primitive_desc_create(&pd, lib.engine, src, wei, nullptr, dst, nullptr) ==
          kSuccess) {
    const char* info = nullptr;
    if (f.primitive_desc_query(pd, kQueryImplInfo, 0, &info) == kSuccess && info) name = info;
    f.primitive_desc_destroy(pd);
  }
  for (MemoryDesc m : {src, wei, dst})
    if (m) f.memory_desc_destroy(m);
  return name;
}

template <typename Fn>
bool resolve(void* handle, const char* name, Fn& fn) {
  void* p = dlsym(handle, (std::string("dnnl_") + name).c_str());
  fn = reinterpret_cast<Fn>(p);
  return p != nullptr;
}

}  // namespace

std::string load(const std::string& path) {
  if (opened.load(std::memory_order_acquire)) return "";
  const std::lock_guard<std::mutex> lock(load_mutex);
  if (opened.load(std::memory_order_acquire)) return "";
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle) {
    const char* why = dlerror();
    return "cannot open " + path + ": " + (why ? why : "unknown error");
  }
  auto lib = std::make_unique<Library>();
  Api& f = lib->api;
  const char* missing = nullptr;
#define RNNKIT_RESOLVE(name) \
  if (!missing && !resolve(handle, #name, f.name)) missing = #name;
  RNNKIT_RESOLVE(version)
  RNNKIT_RESOLVE(engine_create)
  RNNKIT_RESOLVE(stream_create)
  RNNKIT_RESOLVE(memory_desc_create_with_strides)
  RNNKIT_RESOLVE(memory_desc_create_with_tag)
  RNNKIT_RESOLVE(memory_desc_destroy)
  RNNKIT_RESOLVE(memory_desc_get_size)
  RNNKIT_RESOLVE(memory_create)
  RNNKIT_RESOLVE(memory_set_data_handle)
  RNNKIT_RESOLVE(memory_destroy)
  RNNKIT_RESOLVE(primitive_attr_create)
  RNNKIT_RESOLVE(primitive_attr_destroy)
  RNNKIT_RESOLVE(primitive_attr_set_scratchpad_mode)
  RNNKIT_RESOLVE(primitive_attr_set_post_ops)
  RNNKIT_RESOLVE(post_ops_create)
  RNNKIT_RESOLVE(post_ops_destroy)
  RNNKIT_RESOLVE(post_ops_append_sum)
  RNNKIT_RESOLVE(matmul_primitive_desc_create)
  RNNKIT_RESOLVE(reorder_primitive_desc_create)
  RNNKIT_RESOLVE(primitive_desc_query)
  RNNKIT_RESOLVE(primitive_desc_query_md)
  RNNKIT_RESOLVE(primitive_desc_destroy)
  RNNKIT_RESOLVE(primitive_create)
  RNNKIT_RESOLVE(primitive_execute)
  RNNKIT_RESOLVE(primitive_destroy)
  RNNKIT_RESOLVE(set_primitive_cache_capacity)
#undef RNNKIT_RESOLVE
  if (missing) return path + " lacks dnnl_" + missing + " (not oneDNN 3)";
  const Version* v = f.version();
  if (!v || v->major != 3)
    return path + " is oneDNN " + (v ? std::to_string(v->major) : std::string("?")) +
           ".x; expected 3.x";
  if (v->cpu_runtime != kRuntimeOpenMP)
    return path + " is not the OpenMP-threaded build of oneDNN (cpu_runtime " +
           std::to_string(v->cpu_runtime) + "); expected onednn-cpu-gomp";
  // The primitives are cached here, per shape: oneDNN's own primitive cache would only hold
  // them twice. (This copy shares a few C++ runtime symbols with the oneDNN inside libtorch,
  // the vtables of the std::future results its primitive creation passes through; opened
  // RTLD_LOCAL, its primitive creation runs its own copies of those methods, as a debugger
  // shows.)
  if (f.set_primitive_cache_capacity(0) != kSuccess)
    return "oneDNN at " + path + " could not turn its primitive cache off";
  if (f.engine_create(&lib->engine, kEngineCpu, 0) != kSuccess)
    return "oneDNN at " + path + " could not create a CPU engine";
  if (f.stream_create(&lib->stream, lib->engine, kStreamInOrder) != kSuccess)
    return "oneDNN at " + path + " could not create a CPU stream";
  const std::string fp32 = implementation(*lib, false);
  if (fp32.empty() || fp32.rfind("ref", 0) == 0)
    return "oneDNN at " + path + " has no optimised float32 matmul for this CPU (" +
           (fp32.empty() ? std::string("none") : fp32) + ")";
  const std::string bf16 = implementation(*lib, true);
  lib->bf16 = !bf16.empty() && bf16.rfind("ref", 0) != 0;
  opened.store(lib.release(), std::memory_order_release);  // for the life of the process
  return "";
}

bool available(bool bf16) {
  const Library* lib = opened.load(std::memory_order_acquire);
  return lib && (!bf16 || lib->bf16);
}

bool matmul(bool bf16, bool ta, bool tb, int64_t M, int64_t N, int64_t K, const void* A,
            int64_t lda, const void* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (!available(bf16)) return false;
  const Key key{kPlain, bf16, ta, tb, M, N, K, lda, ldb, ldc, beta, current_threads(), 0, 0};
  thread_local std::map<Key, std::unique_ptr<Bound>> bound;
  auto it = bound.find(key);
  if (it == bound.end()) {
    std::shared_ptr<Entry> e = cached(key, [&] { return make_matmul(key, nullptr); });
    if (!e) return false;
    if (bound.size() >= 256) bound.clear();  // e.g. the step of every active-row count
    it = bound.emplace(key, std::make_unique<Bound>(key, std::move(e))).first;
  }
  it->second->run(A, B, C);
  return true;
}

std::unique_ptr<Packed> Packed::make(bool bf16, bool tb, int64_t M, int64_t N, int64_t K,
                                     const float* B, int64_t ldb) {
  if (!available(bf16)) return nullptr;
  const int threads = current_threads();
  const Key layout{kPacked, bf16, false, false, M, N, K, K, 0, N, 0.0f, threads, M, threads};
  std::shared_ptr<Entry> chosen = cached(layout, [&] { return make_matmul(layout, nullptr); });
  if (!chosen) return nullptr;
  const Key packing{kPacking, bf16, false, tb, M, N, K, 0, ldb, 0, 0.0f, threads, M, threads};
  std::shared_ptr<Entry> reorder =
      cached(packing, [&] { return make_packing(packing, chosen->md[1]); });
  if (!reorder) return nullptr;
  std::unique_ptr<Packed> p(new Packed());
  p->bf16_ = bf16;
  p->M_ = M;
  p->N_ = N;
  p->K_ = K;
  p->layout_threads_ = threads;
  p->weights_ = aligned(api().memory_desc_get_size(chosen->md[1]));
  Bound(packing, reorder).run(B, nullptr, p->weights_.get());
  p->bound_.push_back(std::make_unique<Bound>(layout, chosen));
  p->bound_.back()->point(1, p->weights_.get());
  return p;
}

Packed::~Packed() = default;

bool Packed::run(int64_t rows, const void* A, int64_t lda, float beta, float* C, int64_t ldc) {
  if (rows < 1 || rows > M_) return false;
  const Key key{kPacked, bf16_, false, false, rows,  N_, K_, lda, 0, ldc, beta, current_threads(),
                M_,      layout_threads_};
  Bound* b = nullptr;
  for (const auto& bound : bound_)
    if (!(bound->key < key) && !(key < bound->key)) b = bound.get();
  if (!b) {
    const MemoryDescObj* weights = bound_.front()->entry->md[1];
    std::shared_ptr<Entry> e = cached(key, [&] { return make_matmul(key, weights); });
    if (!e) return false;
    bound_.push_back(std::make_unique<Bound>(key, std::move(e)));
    b = bound_.back().get();
    b->point(1, weights_.get());
  }
  b->run(A, nullptr, C);
  return true;
}

}  // namespace onednn
}  // namespace cpu
}  // namespace rnnkit
