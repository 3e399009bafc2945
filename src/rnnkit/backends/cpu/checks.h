// The argument checks of the op entries, and the typed accessors they read tensors through.
//
// The kernels read every floating-point tensor as x's scalar type through typed accessors
// (ptr<T>, mptr<T>: const_data_ptr<T> checks the type again): a tensor of another dtype, on
// another device or of other sizes is an error that names it, never a reinterpretation.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "kernel_common.h"

namespace rnnkit {
namespace cpu {

using at::Tensor;

template <typename T>
inline const T* ptr(const Tensor& t) {
  return t.defined() && t.numel() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
inline T* mptr(Tensor& t) {
  return t.defined() && t.numel() ? t.mutable_data_ptr<T>() : nullptr;
}

// An optional tensor argument made contiguous, or an undefined Tensor when absent.
inline Tensor contiguous_or_empty(const std::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : Tensor();
}

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

// The hidden size H of a cell with `gates` gate blocks from w_ih (G, I): G = gates * H, H >= 1.
inline int64_t hidden_of(const Tensor& w_ih, int64_t gates, const char* cell) {
  TORCH_CHECK(w_ih.defined() && w_ih.dim() == 2, "rnnkit cpu kernels: w_ih has shape ",
              w_ih.defined() ? w_ih.sizes() : at::IntArrayRef{}, "; expected (G, I)");
  const int64_t G = w_ih.size(0);
  TORCH_CHECK(G > 0 && G % gates == 0, "rnnkit cpu kernels: w_ih has G = ", G,
              " rows; expected a positive multiple of the ", gates, " gates of the ", cell);
  return G / gates;
}

// lengths (B) int64 with 0 <= len <= T each, when defined.
inline void check_lengths(const Tensor& lengths, int64_t B, int64_t T) {
  if (!lengths.defined()) return;
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B && lengths.scalar_type() == at::kLong,
              "lengths has shape ", lengths.sizes(), " and dtype ", lengths.scalar_type(),
              "; expected (B,) = (", B, ",) int64");
  const int64_t* l = lengths.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(l[b] >= 0 && l[b] <= T, "lengths[", b, "] = ", l[b], "; expected 0 <= len <= T = ",
                T);
}

// The state dropout and zoneout tensors of one direction (each undefined when off), checked
// against the layer's shapes: mask (B, P); zone_h (T, B, P) per step in training or (P) keep
// probabilities in eval; zone_c likewise with H, for a cell with a cell state only.
struct Regularisers {
  Tensor mask, zone_h, zone_c;
  int64_t zone_h_step = 0, zone_c_step = 0;

  Regularisers(const std::optional<Tensor>& mask_, const std::optional<Tensor>& zone_h_,
               const std::optional<Tensor>& zone_c_, bool cell_state, const Shape& n,
               const Tensor& x)
      : mask(contiguous_or_empty(mask_)),
        zone_h(contiguous_or_empty(zone_h_)),
        zone_c(contiguous_or_empty(zone_c_)) {
    check_arg("state_mask", mask, x, {n.B, n.P}, "(B, P)");
    TORCH_CHECK(!zone_c.defined() || (cell_state && zone_h.defined()),
                "zone_c: expected only for a cell with a cell state, together with zone_h");
    TORCH_CHECK(!zone_h.defined() || !cell_state || zone_c.defined(),
                "zoneout on a cell with a cell state needs zone_c as well as zone_h");
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
                name, " has shape ", z.sizes(), " and dtype ", z.scalar_type(),
                "; expected (T, B, ", width, ") = (", n.T, ", ", n.B, ", ", width, ") or (", width,
                ") ", x.scalar_type());
    return per_step ? width : 0;
  }
};

}  // namespace cpu
}  // namespace rnnkit
