// Fused layer-normalised LSTM and GRU for rnnkit's "cpu" backend (the cells LayerNormLSTMCell and
// LayerNormGRUCell; the equations are in functional.layernorm_lstm_step / layernorm_gru_step):
// one layer, one direction per call, the forward over the whole sequence and its hand-written
// backward (backpropagation through time).
//
// Shapes, in single letters: T steps, B batch, I input features, H hidden size, G = gates * H
// (4H lstm, 3H gru). Every tensor is contiguous, row-major, time-major.
//
// layernorm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b,
//                   ln_c_w, ln_c_b, lengths, eps, mode, reverse, save, state_mask, zone_h,
//                   zone_c)
//   x (T, B, I)   h0 (B, H)   c0 (B, H) [lstm]   w_ih (G, I)   w_hh (G, H)   b_ih, b_hh (G)
//   [optional, both or neither]   ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b (G): gain and bias of the
//   input-side and recurrent LayerNorm   ln_c_w, ln_c_b (H) [lstm]: of the cell-state LayerNorm
//   lengths (B) int64, 0 <= len <= T [optional]   eps: the LayerNorms' epsilon
//   mode 0 LayerNorm LSTM, 1 LayerNorm GRU; reverse: read each sequence from its own end
//   state_mask (B, H) [optional]: state dropout, h_{t-1} * state_mask is what enters the step
//   zone_h (T, B, H) or (H) [optional], zone_c (T, B, H) or (H) [lstm, given with zone_h]:
//     zoneout, each state becomes keep * previous + (1 - keep) * new, keep = zone[t, b] (0 or 1:
//     training) or zone (the probability, every step: eval mode); the output is the zoned h
//   -> [out (T, B, H), h_n (B, H), c_n (B, H) [lstm, else (0)],
//       saved for backward (each (0) unless save):
//       act (T, B, 4H): lstm i f g o, gru r z n hn (hn = the recurrent side of n, before r)
//       hprev (T, B, H): the state fed into the step at t (after state_mask)
//       c (T, B, H) [lstm]: the new cell state, before zoneout
//       xhat (T, B, G), hhat (T, B, G): the normalised W_ih x_t and W_hh h_{t-1}
//       chat (T, B, H) [lstm]: the normalised c_t
//       rstd (T, B, 3): 1 / sqrt(var + eps) of the input-side, recurrent and cell LayerNorm
//       cprev (T, B, H) [lstm with zoneout]: the cell state entering the step at t]
//
// layernorm_backward(grad_out, grad_hn, grad_cn, x, c0, w_ih, w_hh, ln_ih_w, ln_hh_w, ln_c_w,
//                    ln_c_b, lengths, act, hprev, c, xhat, hhat, chat, rstd, mode, reverse,
//                    has_bias, need_dx, state_mask, zone_h, zone_c, cprev)
//   grad_out (T, B, H)   grad_hn (B, H)   grad_cn (B, H) [lstm]   (each optional: absent = zero)
//   state_mask, zone_h, zone_c as given to layernorm_forward; cprev as it saved
//   -> [dx (T, B, I) [or (0) unless need_dx], dh0 (B, H), dc0 (B, H) [lstm, else (0)],
//       dw_ih (G, I), dw_hh (G, H), db_ih, db_hh (G) [or (0) without bias],
//       dln_ih_w, dln_ih_b, dln_hh_w, dln_hh_b (G), dln_c_w, dln_c_b (H) [lstm, else (0)]]
//
// Step s (0 <= s < max length) reads time t = s forwards, t = len_b - 1 - s in reverse (T - 1 - s
// without lengths); a sequence b with s >= len_b is finished: its state is kept, its output is 0.
// The forward is: one GEMM for the input projection of all steps, normalised for all steps in one
// pass, then per step one recurrent GEMM (over the still-active sequences only, with lengths) and
// one fused pass per sequence: the input side's gain and biases, the recurrent LayerNorm, the
// gates and, for the LSTM, the cell-state LayerNorm. The backward reads the forward
// in reverse, one derivative per line; the input-side LayerNorm's backward, dx, dw_ih, dw_hh and
// the gain and bias gradients are single passes, GEMMs and column sums over all steps at the end.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

#include "checks.h"
#include "kernel_common.h"
#include "kernels.h"

namespace rnnkit {
namespace {

using namespace cpu;

using at::Tensor;
using std::int64_t;

enum LnMode : int64_t { kLnLstm = 0, kLnGru = 1 };


void check_ln_mode(int64_t mode) {
  TORCH_CHECK(mode == kLnLstm || mode == kLnGru, "rnnkit cpu LayerNorm kernels: mode = ", mode,
              "; expected 0 (lstm_layernorm) or 1 (gru_layernorm)");
}

void check_vector(const char* name, const Tensor& t, int64_t size) {
  TORCH_CHECK(t.defined() && t.dim() == 1 && t.size(0) == size, "rnnkit cpu kernels: ", name,
              " has shape ", t.defined() ? t.sizes() : at::IntArrayRef{}, "; expected (", size,
              ",)");
}

// The kernels read every tensor as x's scalar type: each defined one must have it, on the CPU.
void check_dtypes(const Tensor& x,
                  std::initializer_list<std::pair<const char*, const Tensor*>> tensors) {
  for (const auto& [name, t] : tensors) check_arg(name, *t, x);
}

struct ForwardOut {
  Tensor out, h_n, c_n, act, hprev, c, xhat, hhat, chat, rstd, cprev;
};

std::vector<Tensor> layernorm_forward(
    const Tensor& x_, const Tensor& h0, const std::optional<Tensor>& c0_, const Tensor& w_ih_,
    const Tensor& w_hh_, const std::optional<Tensor>& b_ih_, const std::optional<Tensor>& b_hh_,
    const Tensor& ln_ih_w_, const Tensor& ln_ih_b_, const Tensor& ln_hh_w_,
    const Tensor& ln_hh_b_, const std::optional<Tensor>& ln_c_w_,
    const std::optional<Tensor>& ln_c_b_, const std::optional<Tensor>& lengths_, double eps,
    int64_t mode, bool reverse, bool save, const std::optional<Tensor>& state_mask,
    const std::optional<Tensor>& zone_h, const std::optional<Tensor>& zone_c) {
  check_ln_mode(mode);
  const bool lstm = mode == kLnLstm;
  check_input(x_);
  TORCH_CHECK(eps >= 0, "eps = ", eps, "; expected eps >= 0");
  const Tensor x = x_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const Tensor b_ih = contiguous_or_empty(b_ih_), b_hh = contiguous_or_empty(b_hh_);
  const Tensor ln_ih_w = ln_ih_w_.contiguous(), ln_ih_b = ln_ih_b_.contiguous();
  const Tensor ln_hh_w = ln_hh_w_.contiguous(), ln_hh_b = ln_hh_b_.contiguous();
  const Tensor ln_c_w = contiguous_or_empty(ln_c_w_), ln_c_b = contiguous_or_empty(ln_c_b_);
  const Tensor c0 = contiguous_or_empty(c0_);
  const Tensor lengths = lengths_.has_value() && lengths_->defined()
                             ? lengths_->to(at::kCPU).contiguous()
                             : Tensor();
  Shape n;
  n.T = x.size(0);
  n.B = x.size(1);
  n.I = x.size(2);
  n.H = hidden_of(w_ih, lstm ? 4 : 3, lstm ? "LayerNorm LSTM" : "LayerNorm GRU");
  n.G = w_ih.size(0);
  n.P = n.H;
  n.S = 4 * n.H;
  check_arg("w_ih", w_ih, x, {n.G, n.I}, "(G, I)");
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == n.G && w_hh.size(1) == n.H, "w_hh has shape ",
              w_hh.sizes(), "; expected (", n.G, ", ", n.H, ")");
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == n.B && h0.size(1) == n.H, "h0 has shape ",
              h0.sizes(), "; expected (", n.B, ", ", n.H, ")");
  TORCH_CHECK(b_ih.defined() == b_hh.defined(), "b_ih and b_hh: expected both or neither");
  if (b_ih.defined()) {
    check_vector("b_ih", b_ih, n.G);
    check_vector("b_hh", b_hh, n.G);
  }
  check_vector("ln_ih_w", ln_ih_w, n.G);
  check_vector("ln_ih_b", ln_ih_b, n.G);
  check_vector("ln_hh_w", ln_hh_w, n.G);
  check_vector("ln_hh_b", ln_hh_b, n.G);
  if (lstm) {
    TORCH_CHECK(c0.defined() && c0.dim() == 2 && c0.size(0) == n.B && c0.size(1) == n.H,
                "the LayerNorm LSTM needs c0 of shape (", n.B, ", ", n.H, ")");
    check_vector("ln_c_w", ln_c_w, n.H);
    check_vector("ln_c_b", ln_c_b, n.H);
  }
  check_lengths(lengths, n.B, n.T);
  check_dtypes(x, {{"h0", &h0}, {"c0", &c0}, {"w_ih", &w_ih}, {"w_hh", &w_hh}, {"b_ih", &b_ih},
                   {"b_hh", &b_hh}, {"ln_ih_w", &ln_ih_w}, {"ln_ih_b", &ln_ih_b},
                   {"ln_hh_w", &ln_hh_w}, {"ln_hh_b", &ln_hh_b}, {"ln_c_w", &ln_c_w},
                   {"ln_c_b", &ln_c_b}});
  const bool has_len = lengths.defined();
  const Regularisers reg(state_mask, zone_h, zone_c, lstm, n, x);
  const bool zone = reg.zone_h.defined();

  auto opts = x.options();
  ForwardOut r;
  r.out = has_len ? at::zeros({n.T, n.B, n.H}, opts) : at::empty({n.T, n.B, n.H}, opts);
  r.h_n = h0.contiguous().clone();
  r.c_n = lstm ? c0.clone() : at::empty({0}, opts);
  auto saved = [&](int64_t width, bool used) {
    if (!save || !used) return at::empty({0}, opts);
    // Padded positions must hold finite values: the final GEMMs multiply them by zero.
    return has_len ? at::zeros({n.T, n.B, width}, opts) : at::empty({n.T, n.B, width}, opts);
  };
  r.act = saved(4 * n.H, true);
  r.hprev = saved(n.H, true);
  r.c = saved(n.H, lstm);
  r.xhat = save ? at::empty({n.T, n.B, n.G}, opts) : at::empty({0}, opts);  // all rows written
  r.hhat = saved(n.G, true);
  r.chat = saved(n.H, lstm);
  r.rstd = saved(kStats, true);
  r.cprev = saved(n.H, lstm && zone);

  const Variants v{has_len, false, save, reg.mask.defined(), zone};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnkit_layernorm_forward", [&] {
    using T = scalar_t;
    ForwardArgs<T> a;
    a.n = n;
    a.reverse = reverse;
    a.len = has_len ? lengths.const_data_ptr<int64_t>() : nullptr;
    a.eps = static_cast<T>(eps);
    a.x = ptr<T>(x);
    a.w[kWeightIh] = ptr<T>(w_ih);
    a.w[kWeightHh] = ptr<T>(w_hh);
    a.w[kBiasIh] = ptr<T>(b_ih);
    a.w[kBiasHh] = ptr<T>(b_hh);
    a.w[kLnIhWeight] = ptr<T>(ln_ih_w);
    a.w[kLnIhBias] = ptr<T>(ln_ih_b);
    a.w[kLnHhWeight] = ptr<T>(ln_hh_w);
    a.w[kLnHhBias] = ptr<T>(ln_hh_b);
    a.w[kLnCWeight] = lstm ? ptr<T>(ln_c_w) : nullptr;
    a.w[kLnCBias] = lstm ? ptr<T>(ln_c_b) : nullptr;
    a.masks.mask = ptr<T>(reg.mask);
    a.masks.zone_h = ptr<T>(reg.zone_h);
    a.masks.zone_c = ptr<T>(reg.zone_c);
    a.masks.zone_h_step = reg.zone_h_step;
    a.masks.zone_c_step = reg.zone_c_step;
    a.out = mptr<T>(r.out);
    a.h = mptr<T>(r.h_n);
    a.c = mptr<T>(r.c_n);
    a.saved.at[kAct] = mptr<T>(r.act);
    a.saved.at[kHprev] = mptr<T>(r.hprev);
    a.saved.at[kC] = mptr<T>(r.c);
    a.saved.at[kCprev] = mptr<T>(r.cprev);
    a.saved.at[kXhat] = mptr<T>(r.xhat);
    a.saved.at[kHhat] = mptr<T>(r.hhat);
    a.saved.at[kChat] = mptr<T>(r.chat);
    a.saved.at[kRstd] = mptr<T>(r.rstd);
    if (lstm) {
      run_forward<LayerNormLstm, T>(v, a);
    } else {
      run_forward<LayerNormGru, T>(v, a);
    }
  });
  return {r.out, r.h_n, r.c_n, r.act, r.hprev, r.c, r.xhat, r.hhat, r.chat, r.rstd, r.cprev};
}

// ---------------------------------------------------------------------------------------------
// Backward.

struct BackwardOut {
  Tensor dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dln_ih_w, dln_ih_b, dln_hh_w, dln_hh_b,
      dln_c_w, dln_c_b;
};

std::vector<Tensor> layernorm_backward(
    const std::optional<Tensor>& grad_out_, const std::optional<Tensor>& grad_hn_,
    const std::optional<Tensor>& grad_cn_, const Tensor& x_, const std::optional<Tensor>& c0_,
    const Tensor& w_ih_, const Tensor& w_hh_, const Tensor& ln_ih_w_, const Tensor& ln_hh_w_,
    const std::optional<Tensor>& ln_c_w_, const std::optional<Tensor>& ln_c_b_,
    const std::optional<Tensor>& lengths_, const Tensor& act_, const Tensor& hprev_,
    const Tensor& c_, const Tensor& xhat_, const Tensor& hhat_, const Tensor& chat_,
    const Tensor& rstd_, int64_t mode, bool reverse, bool has_bias, bool need_dx,
    const std::optional<Tensor>& state_mask, const std::optional<Tensor>& zone_h,
    const std::optional<Tensor>& zone_c, const std::optional<Tensor>& cprev_) {
  check_ln_mode(mode);
  check_input(x_);
  const bool lstm = mode == kLnLstm;
  const Tensor x = x_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const Tensor ln_ih_w = ln_ih_w_.contiguous(), ln_hh_w = ln_hh_w_.contiguous();
  const Tensor ln_c_w = contiguous_or_empty(ln_c_w_), ln_c_b = contiguous_or_empty(ln_c_b_);
  const Tensor c0 = contiguous_or_empty(c0_);
  const Tensor gout = contiguous_or_empty(grad_out_), ghn = contiguous_or_empty(grad_hn_);
  const Tensor gcn = contiguous_or_empty(grad_cn_);
  const Tensor act = act_.contiguous(), hprev = hprev_.contiguous(), cs = c_.contiguous();
  const Tensor xhat = xhat_.contiguous(), hhat = hhat_.contiguous(), chat = chat_.contiguous();
  const Tensor rstd = rstd_.contiguous();
  const Tensor lengths = lengths_.has_value() && lengths_->defined()
                             ? lengths_->to(at::kCPU).contiguous()
                             : Tensor();
  Shape n;
  n.T = x.size(0);
  n.B = x.size(1);
  n.I = x.size(2);
  n.H = hidden_of(w_ih, lstm ? 4 : 3, lstm ? "LayerNorm LSTM" : "LayerNorm GRU");
  n.G = w_ih.size(0);
  n.P = n.H;
  n.S = 4 * n.H;
  check_arg("w_ih", w_ih, x, {n.G, n.I}, "(G, I)");
  check_arg("w_hh", w_hh, x, {n.G, n.H}, "(G, H)");
  check_vector("ln_ih_w", ln_ih_w, n.G);
  check_vector("ln_hh_w", ln_hh_w, n.G);
  check_arg("grad_out", gout, x, {n.T, n.B, n.H}, "(T, B, H)");
  check_arg("grad_hn", ghn, x, {n.B, n.H}, "(B, H)");
  TORCH_CHECK(lstm || !gcn.defined(), "rnnkit cpu kernels: grad_cn is given, but only the "
              "LayerNorm LSTM has a cell state");
  check_arg("grad_cn", gcn, x, {n.B, n.H}, "(B, H)");
  check_arg("c0", c0, x, {n.B, n.H}, "(B, H)");
  if (lstm) {
    check_vector("ln_c_w", ln_c_w, n.H);
    check_vector("ln_c_b", ln_c_b, n.H);
  }
  const int64_t TB = n.T * n.B;
  TORCH_CHECK(act.numel() == TB * 4 * n.H && hprev.numel() == TB * n.H &&
                  xhat.numel() == TB * n.G && hhat.numel() == TB * n.G &&
                  rstd.numel() == TB * kStats,
              "layernorm_backward: the forward was run without saving for backward");
  TORCH_CHECK(!lstm || (c0.defined() && cs.numel() == TB * n.H && chat.numel() == TB * n.H &&
                        ln_c_w.defined() && ln_c_b.defined()),
              "layernorm_backward: the LayerNorm LSTM needs c0, ln_c_w, ln_c_b and the saved c "
              "and chat");
  const Regularisers reg(state_mask, zone_h, zone_c, lstm, n, x);
  const bool zone = reg.zone_h.defined(), state = reg.mask.defined();
  const Tensor cprev = contiguous_or_empty(cprev_);
  TORCH_CHECK(!lstm || !zone || (cprev.defined() && cprev.numel() == TB * n.H),
              "layernorm_backward: zoneout on the LayerNorm LSTM needs the saved cprev");
  check_lengths(lengths, n.B, n.T);
  check_dtypes(x, {{"grad_out", &gout}, {"grad_hn", &ghn}, {"grad_cn", &gcn}, {"c0", &c0},
                   {"w_ih", &w_ih}, {"w_hh", &w_hh}, {"ln_ih_w", &ln_ih_w}, {"ln_hh_w", &ln_hh_w},
                   {"ln_c_w", &ln_c_w}, {"ln_c_b", &ln_c_b}, {"act", &act}, {"hprev", &hprev},
                   {"c", &cs}, {"xhat", &xhat}, {"hhat", &hhat}, {"chat", &chat},
                   {"rstd", &rstd}});
  auto opts = x.options();
  BackwardOut r;
  r.dx = need_dx ? at::empty({n.T, n.B, n.I}, opts) : at::empty({0}, opts);
  r.dh0 = ghn.defined() ? ghn.clone() : at::zeros({n.B, n.H}, opts);
  r.dc0 = !lstm ? at::empty({0}, opts) : gcn.defined() ? gcn.clone() : at::zeros({n.B, n.H}, opts);
  r.dw_ih = at::empty({n.G, n.I}, opts);
  r.dw_hh = at::empty({n.G, n.H}, opts);
  r.db_ih = has_bias ? at::empty({n.G}, opts) : at::empty({0}, opts);
  r.db_hh = has_bias ? at::empty({n.G}, opts) : at::empty({0}, opts);
  r.dln_ih_w = at::empty({n.G}, opts);
  r.dln_ih_b = at::empty({n.G}, opts);
  r.dln_hh_w = at::empty({n.G}, opts);
  r.dln_hh_b = at::empty({n.G}, opts);
  r.dln_c_w = lstm ? at::empty({n.H}, opts) : at::empty({0}, opts);
  r.dln_c_b = lstm ? at::empty({n.H}, opts) : at::empty({0}, opts);

  const Variants v{lengths.defined(), false, false, state, zone};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnkit_layernorm_backward", [&] {
    using T = scalar_t;
    BackwardArgs<T> a;
    a.n = n;
    a.reverse = reverse;
    a.len = lengths.defined() ? lengths.const_data_ptr<int64_t>() : nullptr;
    a.gout = ptr<T>(gout);
    a.x = ptr<T>(x);
    a.c0 = ptr<T>(c0);
    a.w[kWeightIh] = ptr<T>(w_ih);
    a.w[kWeightHh] = ptr<T>(w_hh);
    a.w[kLnIhWeight] = ptr<T>(ln_ih_w);
    a.w[kLnHhWeight] = ptr<T>(ln_hh_w);
    a.w[kLnCWeight] = ptr<T>(ln_c_w);
    a.w[kLnCBias] = ptr<T>(ln_c_b);
    a.masks.mask = ptr<T>(reg.mask);
    a.masks.zone_h = ptr<T>(reg.zone_h);
    a.masks.zone_c = ptr<T>(reg.zone_c);
    a.masks.zone_h_step = reg.zone_h_step;
    a.masks.zone_c_step = reg.zone_c_step;
    a.saved.at[kAct] = ptr<T>(act);
    a.saved.at[kHprev] = ptr<T>(hprev);
    a.saved.at[kC] = ptr<T>(cs);
    a.saved.at[kCprev] = ptr<T>(cprev);
    a.saved.at[kXhat] = ptr<T>(xhat);
    a.saved.at[kHhat] = ptr<T>(hhat);
    a.saved.at[kChat] = ptr<T>(chat);
    a.saved.at[kRstd] = ptr<T>(rstd);
    a.dx = need_dx ? mptr<T>(r.dx) : nullptr;
    a.dh = mptr<T>(r.dh0);
    a.dc = mptr<T>(r.dc0);
    a.dw[kWeightIh] = mptr<T>(r.dw_ih);
    a.dw[kWeightHh] = mptr<T>(r.dw_hh);
    a.dw[kBiasIh] = has_bias ? mptr<T>(r.db_ih) : nullptr;
    a.dw[kBiasHh] = has_bias ? mptr<T>(r.db_hh) : nullptr;
    a.dw[kLnIhWeight] = mptr<T>(r.dln_ih_w);
    a.dw[kLnIhBias] = mptr<T>(r.dln_ih_b);
    a.dw[kLnHhWeight] = mptr<T>(r.dln_hh_w);
    a.dw[kLnHhBias] = mptr<T>(r.dln_hh_b);
    a.dw[kLnCWeight] = mptr<T>(r.dln_c_w);
    a.dw[kLnCBias] = mptr<T>(r.dln_c_b);
    if (lstm) {
      run_backward<LayerNormLstm, T>(v, a);
    } else {
      run_backward<LayerNormGru, T>(v, a);
    }
  });
  return {r.dx,       r.dh0,      r.dc0,      r.dw_ih,    r.dw_hh,   r.db_ih,  r.db_hh,
          r.dln_ih_w, r.dln_ih_b, r.dln_hh_w, r.dln_hh_b, r.dln_c_w, r.dln_c_b};
}

}  // namespace
}  // namespace rnnkit

// rnn_kernels.cpp owns the library (TORCH_LIBRARY); these ops join it.
TORCH_LIBRARY_FRAGMENT(rnnkit_cpu, m) {
  m.def(
      "layernorm_forward(Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor ln_ih_w, Tensor ln_ih_b, Tensor ln_hh_w, "
      "Tensor ln_hh_b, Tensor? ln_c_w, Tensor? ln_c_b, Tensor? lengths, float eps, int mode, "
      "bool reverse, bool save, Tensor? state_mask=None, Tensor? zone_h=None, "
      "Tensor? zone_c=None) -> Tensor[]");
  m.def(
      "layernorm_backward(Tensor? grad_out, Tensor? grad_hn, Tensor? grad_cn, Tensor x, "
      "Tensor? c0, Tensor w_ih, Tensor w_hh, Tensor ln_ih_w, Tensor ln_hh_w, Tensor? ln_c_w, "
      "Tensor? ln_c_b, Tensor? lengths, Tensor act, Tensor hprev, Tensor c, Tensor xhat, "
      "Tensor hhat, Tensor chat, Tensor rstd, int mode, bool reverse, bool has_bias, "
      "bool need_dx, Tensor? state_mask=None, Tensor? zone_h=None, Tensor? zone_c=None, "
      "Tensor? cprev=None) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(rnnkit_cpu, CPU, m) {
  m.impl("layernorm_forward", &rnnkit::layernorm_forward);
  m.impl("layernorm_backward", &rnnkit::layernorm_backward);
}
