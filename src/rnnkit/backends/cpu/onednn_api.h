// The few entry points of oneDNN's C API (version 3, "dnnl.h") that the "onednn" GEMM source
// calls, declared here so that the kernels build without oneDNN's headers or library: the library
// (libdnnl.so.3 of the optional onednn-cpu-gomp wheel) is opened at run time with dlopen() and
// these are resolved with dlsym() (onednn.cpp).
//
// The handles are opaque pointers; the enumerations are passed as int (C enums, 4 bytes). The
// values below are those of oneDNN 3.2's headers (onednn-devel-cpu-gomp 2023.2.0), which the
// library's major version 3 keeps stable.
#pragma once

#include <cstddef>
#include <cstdint>

namespace rnnkit {
namespace cpu {
namespace dnnl_c {

struct EngineObj;
struct StreamObj;
struct MemoryDescObj;
struct MemoryObj;
struct PrimitiveDescObj;
struct PrimitiveObj;
struct AttrObj;
struct PostOpsObj;

using Engine = EngineObj*;
using Stream = StreamObj*;
using MemoryDesc = MemoryDescObj*;  // owned by whoever created it (memory_desc_destroy)
using Memory = MemoryObj*;
using PrimitiveDesc = PrimitiveDescObj*;
using Primitive = PrimitiveObj*;
using Attr = AttrObj*;
using PostOps = PostOpsObj*;

using Status = int;  // 0: success; anything else names an error (3: unimplemented)
constexpr Status kSuccess = 0;

constexpr int kEngineCpu = 1;     // the engine kind of the CPU
constexpr int kStreamInOrder = 1;  // a stream's default flags

// Element types of a memory descriptor.
constexpr int kTypeUndef = 0;  // "same as the destination" where a type is asked for
constexpr int kTypeBf16 = 2;
constexpr int kTypeF32 = 3;

// The layout a primitive may choose for an operand (its preferred, packed one).
constexpr int kFormatAny = 1;

// What a primitive descriptor is asked for.
constexpr int kQueryImplInfo = 8;       // const char*: the implementation's name, e.g. "brg:avx512_core"
constexpr int kQueryWeightsMd = 131;    // the weights' memory descriptor (the chosen layout)
constexpr int kQueryScratchpadMd = 136;  // the scratch memory an execution needs

// Execution argument ids (a reorder reads its "from" as SRC and writes its "to" as DST).
constexpr int kArgSrc = 1;
constexpr int kArgDst = 17;
constexpr int kArgWeights = 33;
constexpr int kArgScratchpad = 80;

// Scratch memory passed by the caller at each execution (not kept by the library).
constexpr int kScratchpadUser = 1;

constexpr int kMaxDims = 12;
using Dims = std::int64_t[kMaxDims];

struct ExecArg {
  int arg;
  Memory memory;
};

struct Version {
  int major, minor, patch;
  const char* hash;
  unsigned cpu_runtime;  // 2: OpenMP
  unsigned gpu_runtime;
};
constexpr unsigned kRuntimeOpenMP = 2;

// The functions, resolved by name ("dnnl_" + the member's name) from the opened library.
struct Api {
  const Version* (*version)();
  Status (*engine_create)(Engine* engine, int kind, std::size_t index);
  Status (*stream_create)(Stream* stream, Engine engine, unsigned flags);
  Status (*memory_desc_create_with_strides)(MemoryDesc* md, int ndims, const Dims dims,
                                            int data_type, const Dims strides);
  Status (*memory_desc_create_with_tag)(MemoryDesc* md, int ndims, const Dims dims,
                                        int data_type, int format_tag);
  Status (*memory_desc_destroy)(MemoryDesc md);
  std::size_t (*memory_desc_get_size)(const MemoryDescObj* md);
  Status (*memory_create)(Memory* memory, const MemoryDescObj* md, Engine engine, void* handle);
  Status (*memory_set_data_handle)(Memory memory, void* handle);
  Status (*memory_destroy)(Memory memory);
  Status (*primitive_attr_create)(Attr* attr);
  Status (*primitive_attr_destroy)(Attr attr);
  Status (*primitive_attr_set_scratchpad_mode)(Attr attr, int mode);
  Status (*primitive_attr_set_post_ops)(Attr attr, const PostOpsObj* post_ops);
  Status (*post_ops_create)(PostOps* post_ops);
  Status (*post_ops_destroy)(PostOps post_ops);
  // dst = scale * dst (its value before the primitive) + the primitive's result
  Status (*post_ops_append_sum)(PostOps post_ops, float scale, std::int32_t zero_point,
                                int data_type);
  Status (*matmul_primitive_desc_create)(PrimitiveDesc* pd, Engine engine,
                                         const MemoryDescObj* src, const MemoryDescObj* weights,
                                         const MemoryDescObj* bias, const MemoryDescObj* dst,
                                         const AttrObj* attr);
  Status (*reorder_primitive_desc_create)(PrimitiveDesc* pd, const MemoryDescObj* src,
                                          Engine src_engine, const MemoryDescObj* dst,
                                          Engine dst_engine, const AttrObj* attr);
  Status (*primitive_desc_query)(const PrimitiveDescObj* pd, int what, int index, void* result);
  const MemoryDescObj* (*primitive_desc_query_md)(const PrimitiveDescObj* pd, int what,
                                                   int index);
  Status (*primitive_desc_destroy)(PrimitiveDesc pd);
  Status (*primitive_create)(Primitive* primitive, const PrimitiveDescObj* pd);
  Status (*primitive_execute)(const PrimitiveObj* primitive, Stream stream, int nargs,
                              const ExecArg* args);
  Status (*primitive_destroy)(Primitive primitive);
  Status (*set_primitive_cache_capacity)(int capacity);
};

}  // namespace dnnl_c
}  // namespace cpu
}  // namespace rnnkit
