// Fused recurrent layers for rnnkit's "cpu" backend: one layer, one direction per call, the
// forward over the whole sequence and its hand-written backward (backpropagation through time).
//
// Shapes, in single letters: T steps, B batch, I input features, H hidden size, P state size
// (P = H except for a projected LSTM, where P = proj_size), G = gates * H (1 rnn, 4 lstm, 3 gru),
// S = saved activations per step (H rnn, 4H lstm: i f g o, 4H gru: r z n hn).
// Every tensor is contiguous, row-major, time-major.
//
// layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, mode, reverse, save,
//               state_mask, zone_h, zone_c, peep)
//   x (T, B, I)   h0 (B, P)   c0 (B, H) [lstm]   w_ih (G, I)   w_hh (G, P)   b_ih, b_hh (G)
//   w_hr (P, H) [projected lstm]   lengths (B) int64, 0 <= len <= T [optional]
//   mode 0 rnn_tanh, 1 rnn_relu, 2 lstm, 3 gru; reverse: read each sequence from its own end
//   state_mask (B, P) [optional]: state dropout, h_{t-1} * state_mask is what enters the step
//     (the recurrent GEMM and, in the GRU, z * h_{t-1})
//   zone_h (T, B, P) or (P) [optional], zone_c (T, B, H) or (H) [lstm, given with zone_h]:
//     zoneout, each state becomes keep * previous + (1 - keep) * new, keep = zone[t, b] (0 or 1:
//     training) or zone (the probability, every step: eval mode); the output is the zoned h
//   peep (3, H) [optional, lstm]: the peephole LSTM's w_ci, w_cf, w_co: i and f see c_{t-1}
//     (+ w_ci * c_{t-1}, + w_cf * c_{t-1}), o sees the new cell state (+ w_co * c_t)
//   -> out (T, B, P)   h_n (B, P)   c_n (B, H) [lstm, else (0)]
//      saved for backward (each (0) unless save): act (T, B, S)   hprev (T, B, P) state fed into
//      the step at t (after state_mask)   c (T, B, H) [lstm: the new cell state, before zoneout]
//      hpre (T, B, H) [projected lstm: o * tanh(c)]   cprev (T, B, H) [lstm with zoneout or
//      peepholes: the cell state entering the step at t]
//
// layer_backward(grad_out, grad_hn, grad_cn, x, c0, w_ih, w_hh, w_hr, lengths, act, hprev, c,
//                hpre, mode, reverse, has_bias, need_dx, state_mask, zone_h, zone_c, cprev, peep)
//   grad_out (T, B, P)   grad_hn (B, P)   grad_cn (B, H)   (each optional: absent = zero);
//   state_mask, zone_h, zone_c, peep as given to layer_forward; cprev as it saved
//   -> dx (T, B, I) [or (0) unless need_dx]   dh0 (B, P)   dc0 (B, H)   dw_ih (G, I)
//      dw_hh (G, P)   db_ih, db_hh (G) [or (0) without bias]   dw_hr (P, H) [or (0)]
//      dpeep (3, H) [or (0) without peep]
//
// pair_forward / pair_backward: both directions of a bidirectional layer (forward then reverse
//   arguments, then x, lengths, mode, ..., x_b, the regulariser tensors of each direction, the
//   peep of each direction), each direction on its own thread; the results are layer_forward's
//   8 (layer_backward's 9) per direction, forward direction first. x_b (T, B, I) [optional]: the
//   reverse direction's own input (variational dropout masks each direction's input apart),
//   else it reads x too.
//
// Step s (0 <= s < max length) reads time t = s forwards, t = len_b - 1 - s in reverse (T - 1 - s
// without lengths); a sequence b with s >= len_b is finished: its state is kept, its output is 0.
// The forward is: one GEMM for the input projection of all steps, then per step one recurrent
// GEMM (over the still-active sequences only, with lengths) and one fused pass over the gates.
// The backward reads the forward in reverse, one derivative per line; dx, dw_ih, dw_hh and the
// biases are single GEMMs over all steps at the end, the peephole weights one reduction.
//
// Variants are compiled apart (a bit each of one template argument, see Flag): lengths,
// projection, saving for backward, state dropout, zoneout, peepholes. A variant that is off
// costs nothing.

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "checks.h"
#include "kernel_common.h"
#include "kernels.h"

namespace rnnkit {
namespace {

using namespace cpu;

using at::Tensor;
using std::int64_t;

enum Mode : int64_t { kRnnTanh = 0, kRnnRelu = 1, kLstm = 2, kGru = 3 };

// The compile-time variants of a kernel: bits of its template argument kF.
enum Flag : int {
  kLengths = 1 << 0,     // lengths given: finished sequences keep their state
  kProjection = 1 << 1,  // projected LSTM (w_hr)
  kSaving = 1 << 2,      // the forward keeps what backward needs
  kStateDrop = 1 << 3,   // state dropout: h_{t-1} * state_mask enters the step
  kZoneout = 1 << 4,     // zoneout on h (and c)
  kPeephole = 1 << 5,    // peephole LSTM: the gates see the cell state
};

int64_t saved_width(int64_t mode, int64_t H) { return mode == kLstm || mode == kGru ? 4 * H : H; }

// ---------------------------------------------------------------------------------------------
// Forward.

struct ForwardIn {
  Tensor x, w_ih, w_hh, w_hr, b_ih, b_hh, bias, bhn, peep, mask, zone_h, zone_c;
  int64_t zone_h_step, zone_c_step;  // per row: n, or 0 when the same mask serves every step
  const int64_t* len;
  bool reverse;
};

struct ForwardOut {
  Tensor out, h_n, c_n, act, hprev, c, hpre, cprev;
};

void check_mode(int64_t mode) {
  TORCH_CHECK(mode >= kRnnTanh && mode <= kGru, "rnnkit cpu kernels: mode = ", mode,
              "; expected 0 (rnn_tanh), 1 (rnn_relu), 2 (lstm) or 3 (gru)");
}

int64_t gates_of(int64_t mode) { return mode == kLstm ? 4 : mode == kGru ? 3 : 1; }

void check_peep(const Tensor& peep, int64_t mode, int64_t H, const Tensor& x) {
  if (!peep.defined()) return;
  TORCH_CHECK(mode == kLstm, "peepholes are only defined for the LSTM");
  check_arg("peep (w_ci, w_cf, w_co)", peep, x, {3, H}, "(3, H)");
}

// The sizes of a call from x (T, B, I), w_ih (G, I) and w_hr (P, H) [projected LSTM].
Shape shape_of(const Tensor& x, const Tensor& w_ih, const Tensor& w_hr, int64_t mode) {
  static const char* names[] = {"Elman RNN", "Elman RNN", "LSTM", "GRU"};
  Shape n;
  n.T = x.size(0);
  n.B = x.size(1);
  n.I = x.size(2);
  n.H = hidden_of(w_ih, gates_of(mode), names[mode]);
  n.G = w_ih.size(0);
  TORCH_CHECK(!w_hr.defined() || (w_hr.dim() == 2 && w_hr.size(0) > 0),
              "rnnkit cpu kernels: w_hr has shape ", w_hr.defined() ? w_hr.sizes() : at::IntArrayRef{},
              "; expected (P, H)");
  n.P = w_hr.defined() ? w_hr.size(0) : n.H;
  n.S = saved_width(mode, n.H);
  return n;
}

// The weights of one direction, against the call's sizes and x's dtype.
void check_weights(const Shape& n, const Tensor& x, const Tensor& w_ih, const Tensor& w_hh,
                   const Tensor& b_ih, const Tensor& b_hh, const Tensor& w_hr, int64_t mode) {
  check_arg("w_ih", w_ih, x, {n.G, n.I}, "(G, I)");
  check_arg("w_hh", w_hh, x, {n.G, n.P}, "(G, P)");
  TORCH_CHECK(w_hh.defined(), "rnnkit cpu kernels: w_hh is missing");
  TORCH_CHECK(b_ih.defined() == b_hh.defined(),
              "rnnkit cpu kernels: b_ih and b_hh: expected both or neither");
  check_arg("b_ih", b_ih, x, {n.G}, "(G)");
  check_arg("b_hh", b_hh, x, {n.G}, "(G)");
  check_arg("w_hr", w_hr, x, {n.P, n.H}, "(P, H)");
}

// c (B, H): required for an LSTM, absent otherwise.
void check_c(const Tensor& c, const char* name, const Shape& n, const Tensor& x, int64_t mode) {
  if (mode != kLstm) {
    TORCH_CHECK(!c.defined() || c.numel() == 0, "rnnkit cpu kernels: ", name,
                " is given, but only the LSTM has a cell state");
    return;
  }
  TORCH_CHECK(c.defined(), "rnnkit cpu kernels: the LSTM needs ", name, " of shape (B, H) = (",
              n.B, ", ", n.H, ")");
  check_arg(name, c, x, {n.B, n.H}, "(B, H)");
}

// Which compile-time regulariser variant a call's masks select.
int regulariser_flags(const Regularisers& reg) {
  return (reg.mask.defined() ? kStateDrop : 0) | (reg.zone_h.defined() ? kZoneout : 0);
}

// The drivers (driver.h, compiled in cell_*.cpp).
template <typename T>
bool forward_new(int64_t mode, int flags, const Shape& n, const ForwardIn& in, ForwardOut& r) {
  ForwardArgs<T> a;
  a.n = n;
  a.reverse = in.reverse;
  a.len = in.len;
  a.x = ptr<T>(in.x);
  a.w[kWeightIh] = ptr<T>(in.w_ih);
  a.w[kWeightHh] = ptr<T>(in.w_hh);
  a.w[kBiasIh] = ptr<T>(in.b_ih);
  a.w[kBiasHh] = ptr<T>(in.b_hh);
  a.w[kWeightHr] = ptr<T>(in.w_hr);
  if (const T* peep = ptr<T>(in.peep)) {
    a.w[kWeightCi] = peep;
    a.w[kWeightCf] = peep + n.H;
    a.w[kWeightCo] = peep + 2 * n.H;
  }
  a.masks.mask = ptr<T>(in.mask);
  a.masks.zone_h = ptr<T>(in.zone_h);
  a.masks.zone_c = ptr<T>(in.zone_c);
  a.masks.zone_h_step = in.zone_h_step;
  a.masks.zone_c_step = in.zone_c_step;
  a.out = mptr<T>(r.out);
  a.h = mptr<T>(r.h_n);
  a.c = mptr<T>(r.c_n);
  a.saved.at[kAct] = mptr<T>(r.act);
  a.saved.at[kHprev] = mptr<T>(r.hprev);
  a.saved.at[kC] = mptr<T>(r.c);
  a.saved.at[kHpre] = mptr<T>(r.hpre);
  a.saved.at[kCprev] = mptr<T>(r.cprev);
  const Variants v{bool(flags & kLengths), bool(flags & kProjection), bool(flags & kSaving),
                   bool(flags & kStateDrop), bool(flags & kZoneout)};
  if (mode == kRnnTanh) {
    run_forward<RnnTanh, T>(v, a);
  } else if (mode == kRnnRelu) {
    run_forward<RnnRelu, T>(v, a);
  } else if (mode == kGru) {
    run_forward<Gru, T>(v, a);
  } else if (a.w[kWeightCi]) {
    run_forward<PeepholeLstm, T>(v, a);
  } else {
    run_forward<PlainLstm, T>(v, a);
  }
  return true;
}

template <typename T>
void forward_mode(int64_t mode, int flags, const Shape& n, const ForwardIn& in, ForwardOut& r) {
  forward_new<T>(mode, flags, n, in, r);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layer_forward(
    const Tensor& x_, const Tensor& h0, const std::optional<Tensor>& c0_, const Tensor& w_ih_,
    const Tensor& w_hh_, const std::optional<Tensor>& b_ih_, const std::optional<Tensor>& b_hh_,
    const std::optional<Tensor>& w_hr_, const std::optional<Tensor>& lengths_, int64_t mode,
    bool reverse, bool save, const std::optional<Tensor>& state_mask,
    const std::optional<Tensor>& zone_h, const std::optional<Tensor>& zone_c,
    const std::optional<Tensor>& peep_) {
  check_mode(mode);
  check_input(x_);
  const Tensor x = x_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const Tensor b_ih = contiguous_or_empty(b_ih_), b_hh = contiguous_or_empty(b_hh_);
  const Tensor w_hr = contiguous_or_empty(w_hr_), c0 = contiguous_or_empty(c0_);
  const Tensor peep = contiguous_or_empty(peep_);
  const Tensor lengths = lengths_.has_value() && lengths_->defined()
                             ? lengths_->to(at::kCPU).contiguous()
                             : Tensor();
  const bool proj = w_hr.defined();
  TORCH_CHECK(!proj || mode == kLstm, "w_hr (a projection) is only defined for the LSTM");
  const Shape n = shape_of(x, w_ih, w_hr, mode);
  check_weights(n, x, w_ih, w_hh, b_ih, b_hh, w_hr, mode);
  check_arg("h0", h0, x, {n.B, n.P}, "(B, P)");
  TORCH_CHECK(h0.defined(), "rnnkit cpu kernels: h0 is missing");
  check_c(c0, "c0", n, x, mode);
  check_lengths(lengths, n.B, n.T);
  check_peep(peep, mode, n.H, x);
  const Regularisers reg(state_mask, zone_h, zone_c, mode == kLstm, n, x);
  const bool has_len = lengths.defined();
  const bool zone = reg.zone_h.defined();
  const bool has_peep = peep.defined();

  auto opts = x.options();
  ForwardOut r;
  r.out = has_len ? at::zeros({n.T, n.B, n.P}, opts) : at::empty({n.T, n.B, n.P}, opts);
  r.h_n = h0.contiguous().clone();
  r.c_n = mode == kLstm ? c0.clone() : at::empty({0}, opts);
  auto saved = [&](int64_t width, bool used) {
    if (!save || !used) return at::empty({0}, opts);
    // Padded positions must hold finite values: the final GEMMs multiply them by zero.
    return has_len ? at::zeros({n.T, n.B, width}, opts) : at::empty({n.T, n.B, width}, opts);
  };
  r.act = saved(n.S, true);
  r.hprev = saved(n.P, true);
  r.c = saved(n.H, mode == kLstm);
  r.hpre = saved(n.H, proj);
  r.cprev = saved(n.H, mode == kLstm && (zone || has_peep));

  // Biases as the gate pass adds them: b_ih + b_hh, except the GRU's b_hn, kept apart.
  Tensor bias = at::zeros({n.G}, opts), bhn = at::zeros({n.H}, opts);
  if (b_ih.defined()) bias.add_(b_ih);
  if (b_hh.defined()) {
    if (mode == kGru) {
      bias.narrow(0, 0, 2 * n.H).add_(b_hh.narrow(0, 0, 2 * n.H));
      bhn.copy_(b_hh.narrow(0, 2 * n.H, n.H));
    } else {
      bias.add_(b_hh);
    }
  }
  ForwardIn in;
  in.x = x;
  in.w_ih = w_ih;
  in.w_hh = w_hh;
  in.w_hr = w_hr;
  in.bias = bias;
  in.b_ih = b_ih;
  in.b_hh = b_hh;
  in.bhn = bhn;
  in.peep = peep;
  in.mask = reg.mask;
  in.zone_h = reg.zone_h;
  in.zone_c = reg.zone_c;
  in.zone_h_step = reg.zone_h_step;
  in.zone_c_step = reg.zone_c_step;
  in.len = has_len ? lengths.const_data_ptr<int64_t>() : nullptr;
  in.reverse = reverse;
  const int flags = (has_len ? kLengths : 0) | (proj ? kProjection : 0) | (save ? kSaving : 0) |
                    (has_peep ? kPeephole : 0) | regulariser_flags(reg);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnkit_layer_forward",
                             [&] { forward_mode<scalar_t>(mode, flags, n, in, r); });
  return {r.out, r.h_n, r.c_n, r.act, r.hprev, r.c, r.hpre, r.cprev};
}

// ---------------------------------------------------------------------------------------------
// Backward.

struct BackwardIn {
  Tensor gout, x, c0, w_ih, w_hh, w_hr, act, hprev, cs, hpre, cprev, peep, mask, zone_h, zone_c;
  int64_t zone_h_step, zone_c_step;
  const int64_t* len;
  bool reverse, need_dx, has_bias;
};

struct BackwardOut {
  Tensor dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr, dpeep;
};

template <typename T>
bool backward_new(int64_t mode, int flags, const Shape& n, const BackwardIn& in,
                  BackwardOut& r) {
  BackwardArgs<T> a;
  a.n = n;
  a.reverse = in.reverse;
  a.len = in.len;
  a.gout = ptr<T>(in.gout);
  a.x = ptr<T>(in.x);
  a.c0 = ptr<T>(in.c0);
  a.w[kWeightIh] = ptr<T>(in.w_ih);
  a.w[kWeightHh] = ptr<T>(in.w_hh);
  a.w[kWeightHr] = ptr<T>(in.w_hr);
  T* dpeep = mptr<T>(r.dpeep);
  if (const T* peep = ptr<T>(in.peep)) {
    a.w[kWeightCi] = peep;
    a.w[kWeightCf] = peep + n.H;
    a.w[kWeightCo] = peep + 2 * n.H;
    a.dw[kWeightCi] = dpeep;
    a.dw[kWeightCf] = dpeep + n.H;
    a.dw[kWeightCo] = dpeep + 2 * n.H;
  }
  a.masks.mask = ptr<T>(in.mask);
  a.masks.zone_h = ptr<T>(in.zone_h);
  a.masks.zone_c = ptr<T>(in.zone_c);
  a.masks.zone_h_step = in.zone_h_step;
  a.masks.zone_c_step = in.zone_c_step;
  a.saved.at[kAct] = ptr<T>(in.act);
  a.saved.at[kHprev] = ptr<T>(in.hprev);
  a.saved.at[kC] = ptr<T>(in.cs);
  a.saved.at[kHpre] = ptr<T>(in.hpre);
  a.saved.at[kCprev] = ptr<T>(in.cprev);
  a.dx = in.need_dx ? mptr<T>(r.dx) : nullptr;
  a.dh = mptr<T>(r.dh0);
  a.dc = mptr<T>(r.dc0);
  a.dw[kWeightIh] = mptr<T>(r.dw_ih);
  a.dw[kWeightHh] = mptr<T>(r.dw_hh);
  a.dw[kBiasIh] = in.has_bias ? mptr<T>(r.db_ih) : nullptr;
  a.dw[kBiasHh] = in.has_bias ? mptr<T>(r.db_hh) : nullptr;
  a.dw[kWeightHr] = mptr<T>(r.dw_hr);
  const Variants v{bool(flags & kLengths), bool(flags & kProjection), false,
                   bool(flags & kStateDrop), bool(flags & kZoneout)};
  if (mode == kRnnTanh) {
    run_backward<RnnTanh, T>(v, a);
  } else if (mode == kRnnRelu) {
    run_backward<RnnRelu, T>(v, a);
  } else if (mode == kGru) {
    run_backward<Gru, T>(v, a);
  } else if (a.w[kWeightCi]) {
    run_backward<PeepholeLstm, T>(v, a);
  } else {
    run_backward<PlainLstm, T>(v, a);
  }
  return true;
}

template <typename T>
void backward_mode(int64_t mode, int flags, const Shape& n, const BackwardIn& in,
                   BackwardOut& r) {
  backward_new<T>(mode, flags, n, in, r);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layer_backward(
    const std::optional<Tensor>& grad_out_, const std::optional<Tensor>& grad_hn_,
    const std::optional<Tensor>& grad_cn_, const Tensor& x_, const std::optional<Tensor>& c0_,
    const Tensor& w_ih_, const Tensor& w_hh_, const std::optional<Tensor>& w_hr_,
    const std::optional<Tensor>& lengths_, const Tensor& act_, const Tensor& hprev_,
    const Tensor& c_, const Tensor& hpre_, int64_t mode, bool reverse, bool has_bias,
    bool need_dx, const std::optional<Tensor>& state_mask, const std::optional<Tensor>& zone_h,
    const std::optional<Tensor>& zone_c, const std::optional<Tensor>& cprev_,
    const std::optional<Tensor>& peep_) {
  check_mode(mode);
  check_input(x_);
  const Tensor x = x_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const Tensor w_hr = contiguous_or_empty(w_hr_), c0 = contiguous_or_empty(c0_);
  const Tensor gout = contiguous_or_empty(grad_out_), ghn = contiguous_or_empty(grad_hn_);
  const Tensor gcn = contiguous_or_empty(grad_cn_);
  const Tensor act = act_.contiguous(), hprev = hprev_.contiguous(), cs = c_.contiguous();
  const Tensor hpre = hpre_.contiguous(), cprev = contiguous_or_empty(cprev_);
  const Tensor peep = contiguous_or_empty(peep_);
  const Tensor lengths = lengths_.has_value() && lengths_->defined()
                             ? lengths_->to(at::kCPU).contiguous()
                             : Tensor();
  const bool proj = w_hr.defined();
  TORCH_CHECK(!proj || mode == kLstm, "w_hr (a projection) is only defined for the LSTM");
  const Shape n = shape_of(x, w_ih, w_hr, mode);
  const bool lstm = mode == kLstm;
  check_weights(n, x, w_ih, w_hh, Tensor(), Tensor(), w_hr, mode);
  check_c(c0, "c0", n, x, mode);
  check_arg("grad_out", gout, x, {n.T, n.B, n.P}, "(T, B, P)");
  check_arg("grad_hn", ghn, x, {n.B, n.P}, "(B, P)");
  TORCH_CHECK(lstm || !gcn.defined(), "rnnkit cpu kernels: grad_cn is given, but only the LSTM "
              "has a cell state");
  check_arg("grad_cn", gcn, x, {n.B, n.H}, "(B, H)");
  check_lengths(lengths, n.B, n.T);
  check_peep(peep, mode, n.H, x);
  const Regularisers reg(state_mask, zone_h, zone_c, lstm, n, x);
  const bool uses_cprev = lstm && (reg.zone_h.defined() || peep.defined());
  check_saved("act", act, x, true, {n.T, n.B, n.S}, "(T, B, S)");
  check_saved("hprev", hprev, x, true, {n.T, n.B, n.P}, "(T, B, P)");
  check_saved("c", cs, x, lstm, {n.T, n.B, n.H}, "(T, B, H)");
  check_saved("hpre", hpre, x, proj, {n.T, n.B, n.H}, "(T, B, H)");
  TORCH_CHECK(!uses_cprev || cprev.defined(), "layer_backward: an LSTM with zoneout or "
              "peepholes needs the cprev its forward saved");
  if (cprev.defined()) check_saved("cprev", cprev, x, uses_cprev, {n.T, n.B, n.H}, "(T, B, H)");
  auto opts = x.options();
  BackwardOut r;
  r.dx = need_dx ? at::empty({n.T, n.B, n.I}, opts) : at::empty({0}, opts);
  r.dh0 = ghn.defined() ? ghn.clone() : at::zeros({n.B, n.P}, opts);
  r.dc0 = mode != kLstm ? at::empty({0}, opts)
          : gcn.defined() ? gcn.clone()
                          : at::zeros({n.B, n.H}, opts);
  r.dw_ih = at::empty({n.G, n.I}, opts);
  r.dw_hh = at::empty({n.G, n.P}, opts);
  r.db_ih = has_bias ? at::empty({n.G}, opts) : at::empty({0}, opts);
  r.db_hh = has_bias ? at::empty({n.G}, opts) : at::empty({0}, opts);
  r.dw_hr = proj ? at::empty({n.P, n.H}, opts) : at::empty({0}, opts);
  r.dpeep = peep.defined() ? at::empty({3, n.H}, opts) : at::empty({0}, opts);

  BackwardIn in;
  in.len = lengths.defined() ? lengths.const_data_ptr<int64_t>() : nullptr;
  in.reverse = reverse;
  in.need_dx = need_dx;
  in.has_bias = has_bias;
  in.gout = gout;
  in.x = x;
  in.c0 = c0;
  in.w_ih = w_ih;
  in.w_hh = w_hh;
  in.w_hr = w_hr;
  in.act = act;
  in.hprev = hprev;
  in.cs = cs;
  in.hpre = hpre;
  in.cprev = cprev;
  in.peep = peep;
  in.mask = reg.mask;
  in.zone_h = reg.zone_h;
  in.zone_c = reg.zone_c;
  in.zone_h_step = reg.zone_h_step;
  in.zone_c_step = reg.zone_c_step;
  const int flags = (lengths.defined() ? kLengths : 0) | (proj ? kProjection : 0) |
                    (peep.defined() ? kPeephole : 0) | regulariser_flags(reg);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnkit_layer_backward",
                             [&] { backward_mode<scalar_t>(mode, flags, n, in, r); });
  return {r.dx, r.dh0, r.dc0, r.dw_ih, r.dw_hh, r.db_ih, r.db_hh, r.dw_hr, r.dpeep};
}

// ---------------------------------------------------------------------------------------------
// Both directions of a bidirectional layer at once: they are independent, so with two or more
// threads each runs on its own thread (its GEMMs single-threaded), instead of splitting every
// small per-step GEMM across threads. Arguments and results are those of layer_forward and
// layer_backward for the forward direction, then for the reverse one.

template <typename F>
void both(F&& run) {
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

std::vector<Tensor> pair_forward(
    const Tensor& x, const Tensor& h0_f, const std::optional<Tensor>& c0_f, const Tensor& w_ih_f,
    const Tensor& w_hh_f, const std::optional<Tensor>& b_ih_f, const std::optional<Tensor>& b_hh_f,
    const std::optional<Tensor>& w_hr_f, const Tensor& h0_b, const std::optional<Tensor>& c0_b,
    const Tensor& w_ih_b, const Tensor& w_hh_b, const std::optional<Tensor>& b_ih_b,
    const std::optional<Tensor>& b_hh_b, const std::optional<Tensor>& w_hr_b,
    const std::optional<Tensor>& lengths, int64_t mode, bool save,
    const std::optional<Tensor>& x_b, const std::optional<Tensor>& state_mask_f,
    const std::optional<Tensor>& zone_h_f, const std::optional<Tensor>& zone_c_f,
    const std::optional<Tensor>& state_mask_b, const std::optional<Tensor>& zone_h_b,
    const std::optional<Tensor>& zone_c_b, const std::optional<Tensor>& peep_f,
    const std::optional<Tensor>& peep_b) {
  const Tensor xc = x.contiguous();
  const Tensor xb = x_b.has_value() && x_b->defined() ? x_b->contiguous() : xc;
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> r[2];
  both([&](int d) {
    r[d] = d == 0 ? layer_forward(xc, h0_f, c0_f, w_ih_f, w_hh_f, b_ih_f, b_hh_f, w_hr_f, lengths,
                                  mode, false, save, state_mask_f, zone_h_f, zone_c_f, peep_f)
                  : layer_forward(xb, h0_b, c0_b, w_ih_b, w_hh_b, b_ih_b, b_hh_b, w_hr_b, lengths,
                                  mode, true, save, state_mask_b, zone_h_b, zone_c_b, peep_b);
  });
  std::vector<Tensor> out;
  for (auto& t : r) {
    auto [a, b, c, d, e, f, g, h] = t;
    out.insert(out.end(), {a, b, c, d, e, f, g, h});
  }
  return out;
}

std::vector<Tensor> pair_backward(
    const std::optional<Tensor>& grad_out_f, const std::optional<Tensor>& grad_hn_f,
    const std::optional<Tensor>& grad_cn_f, const std::optional<Tensor>& c0_f, const Tensor& w_ih_f,
    const Tensor& w_hh_f, const std::optional<Tensor>& w_hr_f, const Tensor& act_f,
    const Tensor& hprev_f, const Tensor& c_f, const Tensor& hpre_f,
    const std::optional<Tensor>& grad_out_b, const std::optional<Tensor>& grad_hn_b,
    const std::optional<Tensor>& grad_cn_b, const std::optional<Tensor>& c0_b, const Tensor& w_ih_b,
    const Tensor& w_hh_b, const std::optional<Tensor>& w_hr_b, const Tensor& act_b,
    const Tensor& hprev_b, const Tensor& c_b, const Tensor& hpre_b, const Tensor& x,
    const std::optional<Tensor>& lengths, int64_t mode, bool has_bias, bool need_dx,
    const std::optional<Tensor>& x_b, const std::optional<Tensor>& state_mask_f,
    const std::optional<Tensor>& zone_h_f, const std::optional<Tensor>& zone_c_f,
    const std::optional<Tensor>& cprev_f, const std::optional<Tensor>& state_mask_b,
    const std::optional<Tensor>& zone_h_b, const std::optional<Tensor>& zone_c_b,
    const std::optional<Tensor>& cprev_b, const std::optional<Tensor>& peep_f,
    const std::optional<Tensor>& peep_b) {
  const Tensor xc = x.contiguous();
  const Tensor xb = x_b.has_value() && x_b->defined() ? x_b->contiguous() : xc;
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> r[2];
  both([&](int d) {
    r[d] = d == 0 ? layer_backward(grad_out_f, grad_hn_f, grad_cn_f, xc, c0_f, w_ih_f, w_hh_f,
                                   w_hr_f, lengths, act_f, hprev_f, c_f, hpre_f, mode, false,
                                   has_bias, need_dx, state_mask_f, zone_h_f, zone_c_f, cprev_f,
                                   peep_f)
                  : layer_backward(grad_out_b, grad_hn_b, grad_cn_b, xb, c0_b, w_ih_b, w_hh_b,
                                   w_hr_b, lengths, act_b, hprev_b, c_b, hpre_b, mode, true,
                                   has_bias, need_dx, state_mask_b, zone_h_b, zone_c_b, cprev_b,
                                   peep_b);
  });
  std::vector<Tensor> out;
  for (auto& t : r) {
    auto [a, b, c, d, e, f, g, h, k] = t;
    out.insert(out.end(), {a, b, c, d, e, f, g, h, k});
  }
  return out;
}

}  // namespace
}  // namespace rnnkit

namespace rnnkit {
namespace cpu {

template <typename T>
void gemm_fallback(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
                   int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  Tensor a = ta ? at::from_blob(const_cast<T*>(A), {K, M}, {lda, 1}, opts).t()
                : at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
  Tensor b = tb ? at::from_blob(const_cast<T*>(B), {N, K}, {ldb, 1}, opts).t()
                : at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);
  Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (beta == T(0)) c.zero_();
  at::addmm_out(c, c, a, b, beta == T(0) ? T(1) : beta, alpha);
}

template void gemm_fallback<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*,
                                   int64_t, const float*, int64_t, float, float*, int64_t);
template void gemm_fallback<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*,
                                    int64_t, const double*, int64_t, double, double*, int64_t);

void parallel_chunks(int64_t n, int64_t grain, const Chunks& body) {
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { body.run(begin, end); });
}

}  // namespace cpu
}  // namespace rnnkit

TORCH_LIBRARY(rnnkit_cpu, m) {
  m.def(
      "layer_forward(Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? w_hr, Tensor? lengths, int mode, bool reverse, bool save, "
      "Tensor? state_mask=None, Tensor? zone_h=None, Tensor? zone_c=None, Tensor? peep=None) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "layer_backward(Tensor? grad_out, Tensor? grad_hn, Tensor? grad_cn, Tensor x, Tensor? c0, "
      "Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor? lengths, Tensor act, Tensor hprev, "
      "Tensor c, Tensor hpre, int mode, bool reverse, bool has_bias, bool need_dx, "
      "Tensor? state_mask=None, Tensor? zone_h=None, Tensor? zone_c=None, Tensor? cprev=None, "
      "Tensor? peep=None) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "pair_forward(Tensor x, Tensor h0_f, Tensor? c0_f, Tensor w_ih_f, Tensor w_hh_f, "
      "Tensor? b_ih_f, Tensor? b_hh_f, Tensor? w_hr_f, Tensor h0_b, Tensor? c0_b, Tensor w_ih_b, "
      "Tensor w_hh_b, Tensor? b_ih_b, Tensor? b_hh_b, Tensor? w_hr_b, Tensor? lengths, int mode, "
      "bool save, Tensor? x_b=None, Tensor? state_mask_f=None, Tensor? zone_h_f=None, "
      "Tensor? zone_c_f=None, Tensor? state_mask_b=None, Tensor? zone_h_b=None, "
      "Tensor? zone_c_b=None, Tensor? peep_f=None, Tensor? peep_b=None) -> Tensor[]");
  m.def(
      "pair_backward(Tensor? grad_out_f, Tensor? grad_hn_f, Tensor? grad_cn_f, Tensor? c0_f, "
      "Tensor w_ih_f, Tensor w_hh_f, Tensor? w_hr_f, Tensor act_f, Tensor hprev_f, Tensor c_f, "
      "Tensor hpre_f, Tensor? grad_out_b, Tensor? grad_hn_b, Tensor? grad_cn_b, Tensor? c0_b, "
      "Tensor w_ih_b, Tensor w_hh_b, Tensor? w_hr_b, Tensor act_b, Tensor hprev_b, Tensor c_b, "
      "Tensor hpre_b, Tensor x, Tensor? lengths, int mode, bool has_bias, bool need_dx, "
      "Tensor? x_b=None, Tensor? state_mask_f=None, Tensor? zone_h_f=None, Tensor? zone_c_f=None, "
      "Tensor? cprev_f=None, Tensor? state_mask_b=None, Tensor? zone_h_b=None, "
      "Tensor? zone_c_b=None, Tensor? cprev_b=None, Tensor? peep_f=None, Tensor? peep_b=None) -> "
      "Tensor[]");
}

TORCH_LIBRARY_IMPL(rnnkit_cpu, CPU, m) {
  m.impl("layer_forward", &rnnkit::layer_forward);
  m.impl("layer_backward", &rnnkit::layer_backward);
  m.impl("pair_forward", &rnnkit::pair_forward);
  m.impl("pair_backward", &rnnkit::pair_backward);
}
