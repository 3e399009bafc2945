// Fused recurrent layers for rnnkit's "cpu" backend: one layer, one direction per call, the
// forward over the whole sequence and its hand-written backward (backpropagation through time).
//
// Shapes, in single letters: T steps, B batch, I input features, H hidden size, P state size
// (P = H except for a projected LSTM, where P = proj_size), G = gates * H (1 rnn, 4 lstm, 3 gru),
// S = saved activations per step (H rnn, 4H lstm: i f g o, 4H gru: r z n hn).
// Every tensor is contiguous, row-major, time-major.
//
// layer_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, mode, reverse, save)
//   x (T, B, I)   h0 (B, P)   c0 (B, H) [lstm]   w_ih (G, I)   w_hh (G, P)   b_ih, b_hh (G)
//   w_hr (P, H) [projected lstm]   lengths (B) int64, 0 <= len <= T [optional]
//   mode 0 rnn_tanh, 1 rnn_relu, 2 lstm, 3 gru; reverse: read each sequence from its own end
//   -> out (T, B, P)   h_n (B, P)   c_n (B, H) [lstm, else (0)]
//      saved for backward (each (0) unless save): act (T, B, S)   hprev (T, B, P) state fed into
//      the step at t   c (T, B, H) [lstm]   hpre (T, B, H) [projected lstm: o * tanh(c)]
//
// layer_backward(grad_out, grad_hn, grad_cn, x, c0, w_ih, w_hh, w_hr, lengths, act, hprev, c,
//                hpre, mode, reverse, has_bias, need_dx)
//   grad_out (T, B, P)   grad_hn (B, P)   grad_cn (B, H)   (each optional: absent = zero)
//   -> dx (T, B, I) [or (0) unless need_dx]   dh0 (B, P)   dc0 (B, H)   dw_ih (G, I)
//      dw_hh (G, P)   db_ih, db_hh (G) [or (0) without bias]   dw_hr (P, H) [or (0)]
//
// pair_forward / pair_backward: both directions of a bidirectional layer (forward then reverse
//   arguments, then x, lengths, mode, ...), each direction on its own thread; the results are
//   layer_forward's 7 (layer_backward's 8) per direction, forward direction first.
//
// Step s (0 <= s < max length) reads time t = s forwards, t = len_b - 1 - s in reverse (T - 1 - s
// without lengths); a sequence b with s >= len_b is finished: its state is kept, its output is 0.
// The forward is: one GEMM for the input projection of all steps, then per step one recurrent
// GEMM (over the still-active sequences only, with lengths) and one fused pass over the gates.
// The backward reads the forward in reverse, one derivative per line; dx, dw_ih, dw_hh and the
// biases are single GEMMs over all steps at the end.

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
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernel_common.h"

namespace rnnkit {
namespace {

using at::Tensor;
using std::int64_t;

enum Mode : int64_t { kRnnTanh = 0, kRnnRelu = 1, kLstm = 2, kGru = 3 };

// ---------------------------------------------------------------------------------------------
// One fused pass over the gates of one row (one sequence) at one step; j runs over H.

// Elman RNN: h = act(xg + b + hg). Saves h.
template <typename T, bool kRelu, bool kSave>
inline void rnn_row_forward(int64_t H, const T* xg, const T* hg, const T* b, T* h, T* out,
                            T* act) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const T pre = xg[j] + hg[j] + b[j];
    const T h_new = kRelu ? (pre > T(0) ? pre : T(0)) : tanh_(pre);
    h[j] = h_new;
    out[j] = h_new;
    if constexpr (kSave) act[j] = h_new;
  }
}

// LSTM: c = f c + i g, h = o tanh(c) (h goes to hp, the projection's input, with a projection).
template <typename T, bool kSave>
inline void lstm_row_forward(int64_t H, const T* xg, const T* hg, const T* b, T* c, T* hp,
                             T* act, T* cs) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const T i = sigmoid(xg[j] + hg[j] + b[j]);
    const T f = sigmoid(xg[H + j] + hg[H + j] + b[H + j]);
    const T g = tanh_(xg[2 * H + j] + hg[2 * H + j] + b[2 * H + j]);
    const T o = sigmoid(xg[3 * H + j] + hg[3 * H + j] + b[3 * H + j]);
    const T c_new = f * c[j] + i * g;
    c[j] = c_new;
    hp[j] = o * tanh_(c_new);
    if constexpr (kSave) {
      act[j] = i;
      act[H + j] = f;
      act[2 * H + j] = g;
      act[3 * H + j] = o;
      cs[j] = c_new;
    }
  }
}

// GRU: r, z from x and h; n = tanh(xn + r (W_hn h + b_hn)); h = (1 - z) n + z h.
// b holds b_ir + b_hr, b_iz + b_hz, b_in; bhn holds b_hn.
template <typename T, bool kSave>
inline void gru_row_forward(int64_t H, const T* xg, const T* hg, const T* b, const T* bhn, T* h,
                            T* out, T* act) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const T r = sigmoid(xg[j] + hg[j] + b[j]);
    const T z = sigmoid(xg[H + j] + hg[H + j] + b[H + j]);
    const T hn = hg[2 * H + j] + bhn[j];
    const T n = tanh_(xg[2 * H + j] + b[2 * H + j] + r * hn);
    const T h_new = (T(1) - z) * n + z * h[j];
    h[j] = h_new;
    out[j] = h_new;
    if constexpr (kSave) {
      act[j] = r;
      act[H + j] = z;
      act[2 * H + j] = n;
      act[3 * H + j] = hn;
    }
  }
}

// Backward rows: dh is the gradient reaching h_t from later steps, gout the one from the output
// at t. Each writes the gate pre-activation gradients and leaves in dh the part of dh_{t-1} that
// does not go through w_hh (the recurrent GEMM adds the rest).

template <typename T, bool kRelu>
inline void rnn_row_backward(int64_t H, const T* act, const T* gout, T* dh, T* dg) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const T h = act[j];
    const T dht = dh[j] + gout[j];
    const T dpre = kRelu ? (h > T(0) ? dht : T(0)) : dht * (T(1) - h * h);
    dg[j] = dpre;
    dh[j] = T(0);
  }
}

// dht: the gradient reaching h_t = o tanh(c_t) (after the projection's backward, if any).
template <typename T>
inline void lstm_row_backward(int64_t H, const T* act, const T* cs, const T* cprev, const T* dht,
                              T* dc, T* dg) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const T i = act[j];
    const T f = act[H + j];
    const T g = act[2 * H + j];
    const T o = act[3 * H + j];
    const T tc = tanh_(cs[j]);
    const T dh = dht[j];
    const T d_o = dh * tc;
    const T dct = dc[j] + dh * o * (T(1) - tc * tc);
    const T di = dct * g;
    const T dgg = dct * i;
    const T df = dct * cprev[j];
    dg[j] = di * i * (T(1) - i);
    dg[H + j] = df * f * (T(1) - f);
    dg[2 * H + j] = dgg * (T(1) - g * g);
    dg[3 * H + j] = d_o * o * (T(1) - o);
    dc[j] = dct * f;
  }
}

// dgi: gradient of the input pre-activations (r z n); dgh: of W_hh h + b_hh (r z hn).
template <typename T>
inline void gru_row_backward(int64_t H, const T* act, const T* hprev, const T* gout, T* dh,
                             T* dgi, T* dgh) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const T r = act[j];
    const T z = act[H + j];
    const T n = act[2 * H + j];
    const T hn = act[3 * H + j];
    const T dht = dh[j] + gout[j];
    const T dn = dht * (T(1) - z);
    const T dz = dht * (hprev[j] - n);
    const T dnp = dn * (T(1) - n * n);
    const T dr = dnp * hn;
    const T drp = dr * r * (T(1) - r);
    const T dzp = dz * z * (T(1) - z);
    dgi[j] = drp;
    dgi[H + j] = dzp;
    dgi[2 * H + j] = dnp;
    dgh[j] = drp;
    dgh[H + j] = dzp;
    dgh[2 * H + j] = dnp * r;
    dh[j] = dht * z;
  }
}

int64_t saved_width(int64_t mode, int64_t H) { return mode == kLstm || mode == kGru ? 4 * H : H; }

// ---------------------------------------------------------------------------------------------
// Forward.

struct ForwardOut {
  Tensor out, h_n, c_n, act, hprev, c, hpre;
};

template <typename T, int64_t kMode, bool kLen, bool kProj, bool kSave>
void forward_impl(const Shape& n, const T* x, const T* w_ih, const T* w_hh, const T* w_hr,
                  const T* bias, const T* bhn, const int64_t* len, bool reverse, ForwardOut& r) {
  const int64_t T_ = n.T, B = n.B, I = n.I, H = n.H, P = n.P, G = n.G, S = n.S;
  auto opts = r.out.options();
  // xg (T*B, G) = x (T*B, I) . w_ih^T: the input projection of every step at once.
  Tensor xg_t = at::empty({T_ * B, G}, opts);
  T* xg = xg_t.mutable_data_ptr<T>();
  gemm<T>(false, true, T_ * B, G, I, T(1), x, I, w_ih, I, T(0), xg, G);

  T* h = r.h_n.mutable_data_ptr<T>();  // (B, P), starts as h0, updated in place
  T* c = kMode == kLstm ? r.c_n.mutable_data_ptr<T>() : nullptr;  // (B, H)
  T* out = r.out.mutable_data_ptr<T>();
  T* act = kSave ? mptr<T>(r.act) : nullptr;
  T* hprev = kSave ? mptr<T>(r.hprev) : nullptr;
  T* cs = kSave && kMode == kLstm ? mptr<T>(r.c) : nullptr;
  T* hpre = kSave && kProj ? mptr<T>(r.hpre) : nullptr;

  Tensor hg_t = at::empty({B, G}, opts);  // (B, G) recurrent projection of this step
  T* hg = hg_t.mutable_data_ptr<T>();
  Tensor hp_t = kProj ? at::zeros({B, H}, opts) : Tensor();  // (B, H) projection input
  Tensor hq_t = kProj ? at::empty({B, P}, opts) : Tensor();  // (B, P) projection output
  T* hp = kProj ? hp_t.mutable_data_ptr<T>() : nullptr;
  T* hq = kProj ? hq_t.mutable_data_ptr<T>() : nullptr;

  const PackedB<T> hh(true, B, G, P, w_hh, P);  // op(B) = w_hh^T (P, G)
  const PackedB<T> hr(true, B, P, H, w_hr, H);  // op(B) = w_hr^T (H, P), with a projection
  // With lengths, the recurrent GEMM runs over the A sequences still active at this step only:
  // rows[k] (k < A) is the batch index of the k-th active one and hc (A, P) gathers their states.
  std::vector<int64_t> rows = active_rows<kLen>(0, len, B);
  Tensor hc_t = kLen ? at::empty({B, P}, opts) : Tensor();
  T* hc = kLen ? hc_t.mutable_data_ptr<T>() : nullptr;
  const int64_t steps = max_length(len, B, T_);
  for (int64_t s = 0; s < steps; ++s) {
    if constexpr (kLen) rows = active_rows<kLen>(s, len, B);
    const int64_t A = static_cast<int64_t>(rows.size());
    if (!kLen || A == B) {
      // hg (B, G) = h (B, P) . w_hh^T
      hh.run(h, P, T(0), hg, G);
    } else {
      // hg (A, G) = hc (A, P) . w_hh^T
      for (int64_t k = 0; k < A; ++k) std::copy(h + rows[k] * P, h + rows[k] * P + P, hc + k * P);
      gemm<T>(false, true, A, G, P, T(1), hc, P, w_hh, P, T(0), hg, G);
    }
    at::parallel_for(0, A, grain(G), [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t b = rows[k];
        const int64_t t = time_of<kLen>(s, b, len, T_, reverse);
        const int64_t row = t * B + b;
        if constexpr (kSave) std::copy(h + b * P, h + b * P + P, hprev + row * P);
        T* a = kSave ? act + row * S : nullptr;
        if constexpr (kMode == kRnnTanh || kMode == kRnnRelu) {
          rnn_row_forward<T, kMode == kRnnRelu, kSave>(H, xg + row * G, hg + k * G, bias,
                                                       h + b * H, out + row * P, a);
        } else if constexpr (kMode == kGru) {
          gru_row_forward<T, kSave>(H, xg + row * G, hg + k * G, bias, bhn, h + b * H,
                                    out + row * P, a);
        } else {
          T* cs_row = kSave ? cs + row * H : nullptr;
          T* hp_row = kProj ? hp + b * H : h + b * H;
          lstm_row_forward<T, kSave>(H, xg + row * G, hg + k * G, bias, c + b * H, hp_row, a,
                                     cs_row);
          if constexpr (!kProj) std::copy(hp_row, hp_row + H, out + row * P);
          if constexpr (kProj && kSave) std::copy(hp_row, hp_row + H, hpre + row * H);
        }
      }
    });
    if constexpr (kProj) {
      // hq (B, P) = hp (B, H) . w_hr^T; finished sequences keep their state.
      hr.run(hp, H, T(0), hq, P);
      for (int64_t b = 0; b < B; ++b) {
        const int64_t t = time_of<kLen>(s, b, len, T_, reverse);
        if (kLen && t < 0) continue;
        std::copy(hq + b * P, hq + b * P + P, h + b * P);
        std::copy(hq + b * P, hq + b * P + P, out + (t * B + b) * P);
      }
    }
  }
}

template <typename T, int64_t kMode, bool kLen, bool kProj>
void forward_save(bool save, const Shape& n, const T* x, const T* w_ih, const T* w_hh,
                  const T* w_hr, const T* bias, const T* bhn, const int64_t* len, bool reverse,
                  ForwardOut& r) {
  if (save) {
    forward_impl<T, kMode, kLen, kProj, true>(n, x, w_ih, w_hh, w_hr, bias, bhn, len, reverse, r);
  } else {
    forward_impl<T, kMode, kLen, kProj, false>(n, x, w_ih, w_hh, w_hr, bias, bhn, len, reverse,
                                               r);
  }
}

template <typename T, int64_t kMode, bool kLen>
void forward_proj(bool proj, bool save, const Shape& n, const T* x, const T* w_ih, const T* w_hh,
                  const T* w_hr, const T* bias, const T* bhn, const int64_t* len, bool reverse,
                  ForwardOut& r) {
  if constexpr (kMode == kLstm) {
    if (proj) {
      forward_save<T, kMode, kLen, true>(save, n, x, w_ih, w_hh, w_hr, bias, bhn, len, reverse, r);
      return;
    }
  }
  forward_save<T, kMode, kLen, false>(save, n, x, w_ih, w_hh, w_hr, bias, bhn, len, reverse, r);
}

template <typename T, int64_t kMode>
void forward_len(bool has_len, bool proj, bool save, const Shape& n, const T* x, const T* w_ih,
                 const T* w_hh, const T* w_hr, const T* bias, const T* bhn, const int64_t* len,
                 bool reverse, ForwardOut& r) {
  if (has_len) {
    forward_proj<T, kMode, true>(proj, save, n, x, w_ih, w_hh, w_hr, bias, bhn, len, reverse, r);
  } else {
    forward_proj<T, kMode, false>(proj, save, n, x, w_ih, w_hh, w_hr, bias, bhn, len, reverse, r);
  }
}

void check_mode(int64_t mode) {
  TORCH_CHECK(mode >= kRnnTanh && mode <= kGru, "rnnkit cpu kernels: mode = ", mode,
              "; expected 0 (rnn_tanh), 1 (rnn_relu), 2 (lstm) or 3 (gru)");
}

int64_t gates_of(int64_t mode) { return mode == kLstm ? 4 : mode == kGru ? 3 : 1; }

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layer_forward(
    const Tensor& x_, const Tensor& h0, const std::optional<Tensor>& c0_, const Tensor& w_ih_,
    const Tensor& w_hh_, const std::optional<Tensor>& b_ih_, const std::optional<Tensor>& b_hh_,
    const std::optional<Tensor>& w_hr_, const std::optional<Tensor>& lengths_, int64_t mode,
    bool reverse, bool save) {
  check_mode(mode);
  TORCH_CHECK(x_.dim() == 3, "x has shape ", x_.sizes(), "; expected (T, B, I)");
  const Tensor x = x_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const Tensor b_ih = contiguous_or_empty(b_ih_), b_hh = contiguous_or_empty(b_hh_);
  const Tensor w_hr = contiguous_or_empty(w_hr_), c0 = contiguous_or_empty(c0_);
  const Tensor lengths = lengths_.has_value() && lengths_->defined()
                             ? lengths_->to(at::kCPU).contiguous()
                             : Tensor();
  const bool proj = w_hr.defined();
  TORCH_CHECK(!proj || mode == kLstm, "w_hr (a projection) is only defined for the LSTM");
  Shape n;
  n.T = x.size(0);
  n.B = x.size(1);
  n.I = x.size(2);
  n.G = w_ih.size(0);
  n.H = n.G / gates_of(mode);
  n.P = proj ? w_hr.size(0) : n.H;
  n.S = saved_width(mode, n.H);
  TORCH_CHECK(w_ih.size(1) == n.I, "w_ih has shape ", w_ih.sizes(), "; expected (G, I = ", n.I,
              ")");
  TORCH_CHECK(w_hh.size(0) == n.G && w_hh.size(1) == n.P, "w_hh has shape ", w_hh.sizes(),
              "; expected (", n.G, ", ", n.P, ")");
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == n.B && h0.size(1) == n.P, "h0 has shape ",
              h0.sizes(), "; expected (", n.B, ", ", n.P, ")");
  TORCH_CHECK(mode != kLstm || (c0.defined() && c0.size(0) == n.B && c0.size(1) == n.H),
              "the LSTM needs c0 of shape (", n.B, ", ", n.H, ")");
  check_lengths(lengths, n.B, n.T);
  const bool has_len = lengths.defined();

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
  const int64_t* len = has_len ? lengths.const_data_ptr<int64_t>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnkit_layer_forward", [&] {
    using T = scalar_t;
    const T *px = x.const_data_ptr<T>(), *pih = w_ih.const_data_ptr<T>(),
            *phh = w_hh.const_data_ptr<T>(), *phr = proj ? w_hr.const_data_ptr<T>() : nullptr,
            *pb = bias.const_data_ptr<T>(), *pbhn = bhn.const_data_ptr<T>();
    switch (mode) {
      case kRnnTanh:
        forward_len<T, kRnnTanh>(has_len, proj, save, n, px, pih, phh, phr, pb, pbhn, len,
                                 reverse, r);
        break;
      case kRnnRelu:
        forward_len<T, kRnnRelu>(has_len, proj, save, n, px, pih, phh, phr, pb, pbhn, len,
                                 reverse, r);
        break;
      case kLstm:
        forward_len<T, kLstm>(has_len, proj, save, n, px, pih, phh, phr, pb, pbhn, len, reverse,
                              r);
        break;
      default:
        forward_len<T, kGru>(has_len, proj, save, n, px, pih, phh, phr, pb, pbhn, len, reverse,
                             r);
    }
  });
  return {r.out, r.h_n, r.c_n, r.act, r.hprev, r.c, r.hpre};
}

// ---------------------------------------------------------------------------------------------
// Backward.

struct BackwardIn {
  const void *gout, *x, *c0, *w_ih, *w_hh, *w_hr, *act, *hprev, *cs, *hpre;
  const int64_t* len;
  bool reverse, need_dx, has_bias;
};

struct BackwardOut {
  Tensor dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr;
};

template <typename T, int64_t kMode, bool kLen, bool kProj>
void backward_impl(const Shape& n, const BackwardIn& in, BackwardOut& r) {
  const int64_t T_ = n.T, B = n.B, I = n.I, H = n.H, P = n.P, G = n.G, S = n.S;
  const bool reverse = in.reverse;
  const int64_t* len = in.len;
  auto opts = r.dh0.options();
  const T* gout = static_cast<const T*>(in.gout);  // (T, B, P) or nullptr
  const T* x = static_cast<const T*>(in.x);
  const T* c0 = static_cast<const T*>(in.c0);
  const T* w_ih = static_cast<const T*>(in.w_ih);
  const T* w_hh = static_cast<const T*>(in.w_hh);
  const T* w_hr = static_cast<const T*>(in.w_hr);
  const T* act = static_cast<const T*>(in.act);
  const T* hprev = static_cast<const T*>(in.hprev);
  const T* cs = static_cast<const T*>(in.cs);
  const T* hpre = static_cast<const T*>(in.hpre);

  // The carried gradients: dh (B, P) reaching h_s from later steps, dc (B, H) reaching c_s.
  T* dh = r.dh0.mutable_data_ptr<T>();
  T* dc = kMode == kLstm ? r.dc0.mutable_data_ptr<T>() : nullptr;
  // Gate gradients of every step, time-ordered (T*B, G), zero at padded positions. dgi: of the
  // input pre-activations; dgh: of W_hh h + b_hh (the same tensor except for the GRU).
  Tensor dgi_t = kLen ? at::zeros({T_ * B, G}, opts) : at::empty({T_ * B, G}, opts);
  Tensor dgh_t = kMode == kGru ? (kLen ? at::zeros({T_ * B, G}, opts)
                                       : at::empty({T_ * B, G}, opts))
                               : dgi_t;
  T* dgi = dgi_t.mutable_data_ptr<T>();
  T* dgh = dgh_t.mutable_data_ptr<T>();
  // With lengths, the recurrent GEMM runs over the A sequences active at this step only
  // (rows[k], k < A, their batch indices): their rows of dgh are gathered in dgs (A, G), and the
  // product dhc (A, P) is added to their dh.
  Tensor dgs_t = kLen ? at::empty({B, G}, opts) : Tensor();
  Tensor dhc_t = kLen ? at::empty({B, P}, opts) : Tensor();
  T* dgs = kLen ? dgs_t.mutable_data_ptr<T>() : nullptr;
  T* dhc = kLen ? dhc_t.mutable_data_ptr<T>() : nullptr;
  std::vector<int64_t> rows = active_rows<kLen>(0, len, B);
  Tensor zero_t = at::zeros({std::max(P, H)}, opts);  // stands in for an absent grad_out row
  const T* zero = zero_t.const_data_ptr<T>();
  // Projected LSTM: dht (T*B, P) gradient reaching each projected h_t; dhs (B, P) this step's;
  // dhp (B, H) the gradient reaching o tanh(c) after the projection.
  Tensor dht_t = kProj ? (kLen ? at::zeros({T_ * B, P}, opts) : at::empty({T_ * B, P}, opts))
                       : Tensor();
  Tensor dhs_t = kProj ? at::zeros({B, P}, opts) : Tensor();
  Tensor dhp_t = kProj ? at::empty({B, H}, opts) : Tensor();
  T* dht = kProj ? dht_t.mutable_data_ptr<T>() : nullptr;
  T* dhs = kProj ? dhs_t.mutable_data_ptr<T>() : nullptr;
  T* dhp = kProj ? dhp_t.mutable_data_ptr<T>() : nullptr;

  const PackedB<T> hh(false, B, P, G, w_hh, P);  // op(B) = w_hh (G, P)
  const PackedB<T> hr(false, B, H, P, w_hr, H);  // op(B) = w_hr (P, H), with a projection
  const int64_t steps = max_length(len, B, T_);
  for (int64_t s = steps - 1; s >= 0; --s) {
    if constexpr (kLen) rows = active_rows<kLen>(s, len, B);
    const int64_t A = static_cast<int64_t>(rows.size());
    if constexpr (kProj) {
      for (int64_t b = 0; b < B; ++b) {
        const int64_t t = time_of<kLen>(s, b, len, T_, reverse);
        if (kLen && t < 0) continue;
        const int64_t row = t * B + b;
        const T* go = gout ? gout + row * P : zero;
        for (int64_t j = 0; j < P; ++j) dhs[b * P + j] = dh[b * P + j] + go[j];
        std::copy(dhs + b * P, dhs + b * P + P, dht + row * P);
        std::fill(dh + b * P, dh + b * P + P, T(0));
      }
      // dhp (B, H) = dhs (B, P) . w_hr (P, H)
      hr.run(dhs, P, T(0), dhp, H);
    }
    at::parallel_for(0, A, grain(G), [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t b = rows[k];
        const int64_t t = time_of<kLen>(s, b, len, T_, reverse);
        const int64_t row = t * B + b;
        const T* go = gout ? gout + row * P : zero;
        T* dgh_row = kLen ? dgs + k * G : dgh + row * G;
        if constexpr (kMode == kRnnTanh || kMode == kRnnRelu) {
          rnn_row_backward<T, kMode == kRnnRelu>(H, act + row * S, go, dh + b * H, dgh_row);
          if (kLen) std::copy(dgh_row, dgh_row + G, dgi + row * G);
        } else if constexpr (kMode == kGru) {
          gru_row_backward<T>(H, act + row * S, hprev + row * P, go, dh + b * H, dgi + row * G,
                              dgh_row);
          if (kLen) std::copy(dgh_row, dgh_row + G, dgh + row * G);
        } else {
          // c_{t-1}: the cell state one step earlier in reading order, c0 at the first step.
          const int64_t prev = reverse ? t + 1 : t - 1;
          const T* cprev = s == 0 ? c0 + b * H : cs + (prev * B + b) * H;
          if constexpr (kProj) {
            lstm_row_backward<T>(H, act + row * S, cs + row * H, cprev, dhp + b * H, dc + b * H,
                                 dgh_row);
          } else {
            T* dh_row = dh + b * H;
            for (int64_t j = 0; j < H; ++j) dh_row[j] += go[j];
            lstm_row_backward<T>(H, act + row * S, cs + row * H, cprev, dh_row, dc + b * H,
                                 dgh_row);
            std::fill(dh_row, dh_row + H, T(0));
          }
          if (kLen) std::copy(dgh_row, dgh_row + G, dgi + row * G);
        }
      }
    });
    if (kLen && A == B) {
      // dh (B, P) += dgs (B, G) . w_hh (G, P): every sequence is active, rows[k] = k
      hh.run(dgs, G, T(1), dh, P);
    } else if (kLen) {
      // dhc (A, P) = dgs (A, G) . w_hh (G, P), added to the active rows of dh
      gemm<T>(false, false, A, P, G, T(1), dgs, G, w_hh, P, T(0), dhc, P);
      for (int64_t k = 0; k < A; ++k) {
        T* dh_row = dh + rows[k] * P;
        const T* dhc_row = dhc + k * P;
        for (int64_t j = 0; j < P; ++j) dh_row[j] += dhc_row[j];
      }
    } else {
      // dh (B, P) += dg (B, G) . w_hh (G, P)
      hh.run(dgh + (reverse ? T_ - 1 - s : s) * B * G, G, T(1), dh, P);
    }
  }

  const int64_t TB = T_ * B;
  if (in.need_dx) {
    // dx (T*B, I) = dgi (T*B, G) . w_ih (G, I)
    gemm<T>(false, false, TB, I, G, T(1), dgi, G, w_ih, I, T(0), r.dx.mutable_data_ptr<T>(), I);
  }
  // dw_ih (G, I) = dgi^T (G, T*B) . x (T*B, I)
  gemm<T>(true, false, G, I, TB, T(1), dgi, G, x, I, T(0), r.dw_ih.mutable_data_ptr<T>(), I);
  // dw_hh (G, P) = dgh^T (G, T*B) . hprev (T*B, P)
  gemm<T>(true, false, G, P, TB, T(1), dgh, G, hprev, P, T(0), r.dw_hh.mutable_data_ptr<T>(), P);
  if (in.has_bias) {
    // db (1, G) = ones (1, T*B) . dg (T*B, G)
    Tensor ones_t = at::ones({TB}, opts);
    const T* ones = ones_t.const_data_ptr<T>();
    gemm<T>(false, false, 1, G, TB, T(1), ones, TB, dgi, G, T(0), r.db_ih.mutable_data_ptr<T>(),
            G);
    gemm<T>(false, false, 1, G, TB, T(1), ones, TB, dgh, G, T(0), r.db_hh.mutable_data_ptr<T>(),
            G);
  }
  if constexpr (kProj) {
    // dw_hr (P, H) = dht^T (P, T*B) . hpre (T*B, H)
    gemm<T>(true, false, P, H, TB, T(1), dht, P, hpre, H, T(0), r.dw_hr.mutable_data_ptr<T>(), H);
  }
}

template <typename T, int64_t kMode>
void backward_variant(bool has_len, bool proj, const Shape& n, const BackwardIn& in,
                      BackwardOut& r) {
  if constexpr (kMode == kLstm) {
    if (proj) {
      if (has_len) {
        backward_impl<T, kMode, true, true>(n, in, r);
      } else {
        backward_impl<T, kMode, false, true>(n, in, r);
      }
      return;
    }
  }
  if (has_len) {
    backward_impl<T, kMode, true, false>(n, in, r);
  } else {
    backward_impl<T, kMode, false, false>(n, in, r);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layer_backward(
    const std::optional<Tensor>& grad_out_, const std::optional<Tensor>& grad_hn_,
    const std::optional<Tensor>& grad_cn_, const Tensor& x_, const std::optional<Tensor>& c0_,
    const Tensor& w_ih_, const Tensor& w_hh_, const std::optional<Tensor>& w_hr_,
    const std::optional<Tensor>& lengths_, const Tensor& act_, const Tensor& hprev_,
    const Tensor& c_, const Tensor& hpre_, int64_t mode, bool reverse, bool has_bias,
    bool need_dx) {
  check_mode(mode);
  const Tensor x = x_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const Tensor w_hr = contiguous_or_empty(w_hr_), c0 = contiguous_or_empty(c0_);
  const Tensor gout = contiguous_or_empty(grad_out_), ghn = contiguous_or_empty(grad_hn_);
  const Tensor gcn = contiguous_or_empty(grad_cn_);
  const Tensor act = act_.contiguous(), hprev = hprev_.contiguous(), cs = c_.contiguous();
  const Tensor hpre = hpre_.contiguous();
  const Tensor lengths = lengths_.has_value() && lengths_->defined()
                             ? lengths_->to(at::kCPU).contiguous()
                             : Tensor();
  const bool proj = w_hr.defined();
  Shape n;
  n.T = x.size(0);
  n.B = x.size(1);
  n.I = x.size(2);
  n.G = w_ih.size(0);
  n.H = n.G / gates_of(mode);
  n.P = proj ? w_hr.size(0) : n.H;
  n.S = saved_width(mode, n.H);
  TORCH_CHECK(act.numel() == n.T * n.B * n.S && hprev.numel() == n.T * n.B * n.P,
              "layer_backward: the forward was run without saving for backward");
  check_lengths(lengths, n.B, n.T);
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

  BackwardIn in;
  in.len = lengths.defined() ? lengths.const_data_ptr<int64_t>() : nullptr;
  in.reverse = reverse;
  in.need_dx = need_dx;
  in.has_bias = has_bias;
  auto raw = [](const Tensor& t) -> const void* {
    return t.defined() && t.numel() ? t.const_data_ptr() : nullptr;
  };
  in.gout = raw(gout);
  in.x = raw(x);
  in.c0 = raw(c0);
  in.w_ih = raw(w_ih);
  in.w_hh = raw(w_hh);
  in.w_hr = raw(w_hr);
  in.act = raw(act);
  in.hprev = raw(hprev);
  in.cs = raw(cs);
  in.hpre = raw(hpre);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnkit_layer_backward", [&] {
    using T = scalar_t;
    const bool has_len = lengths.defined();
    switch (mode) {
      case kRnnTanh:
        backward_variant<T, kRnnTanh>(has_len, proj, n, in, r);
        break;
      case kRnnRelu:
        backward_variant<T, kRnnRelu>(has_len, proj, n, in, r);
        break;
      case kLstm:
        backward_variant<T, kLstm>(has_len, proj, n, in, r);
        break;
      default:
        backward_variant<T, kGru>(has_len, proj, n, in, r);
    }
  });
  return {r.dx, r.dh0, r.dc0, r.dw_ih, r.dw_hh, r.db_ih, r.db_hh, r.dw_hr};
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
#pragma omp parallel num_threads(2)
    guarded(omp_get_thread_num());
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
    const std::optional<Tensor>& lengths, int64_t mode, bool save) {
  const Tensor xc = x.contiguous();
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> r[2];
  both([&](int d) {
    r[d] = d == 0 ? layer_forward(xc, h0_f, c0_f, w_ih_f, w_hh_f, b_ih_f, b_hh_f, w_hr_f, lengths,
                                  mode, false, save)
                  : layer_forward(xc, h0_b, c0_b, w_ih_b, w_hh_b, b_ih_b, b_hh_b, w_hr_b, lengths,
                                  mode, true, save);
  });
  std::vector<Tensor> out;
  for (auto& t : r) {
    auto [a, b, c, d, e, f, g] = t;
    out.insert(out.end(), {a, b, c, d, e, f, g});
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
    const std::optional<Tensor>& lengths, int64_t mode, bool has_bias, bool need_dx) {
  const Tensor xc = x.contiguous();
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> r[2];
  both([&](int d) {
    r[d] = d == 0 ? layer_backward(grad_out_f, grad_hn_f, grad_cn_f, xc, c0_f, w_ih_f, w_hh_f,
                                   w_hr_f, lengths, act_f, hprev_f, c_f, hpre_f, mode, false,
                                   has_bias, need_dx)
                  : layer_backward(grad_out_b, grad_hn_b, grad_cn_b, xc, c0_b, w_ih_b, w_hh_b,
                                   w_hr_b, lengths, act_b, hprev_b, c_b, hpre_b, mode, true,
                                   has_bias, need_dx);
  });
  std::vector<Tensor> out;
  for (auto& t : r) {
    auto [a, b, c, d, e, f, g, h] = t;
    out.insert(out.end(), {a, b, c, d, e, f, g, h});
  }
  return out;
}

}  // namespace
}  // namespace rnnkit

TORCH_LIBRARY(rnnkit_cpu, m) {
  m.def(
      "layer_forward(Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? w_hr, Tensor? lengths, int mode, bool reverse, bool save) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "layer_backward(Tensor? grad_out, Tensor? grad_hn, Tensor? grad_cn, Tensor x, Tensor? c0, "
      "Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor? lengths, Tensor act, Tensor hprev, "
      "Tensor c, Tensor hpre, int mode, bool reverse, bool has_bias, bool need_dx) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "pair_forward(Tensor x, Tensor h0_f, Tensor? c0_f, Tensor w_ih_f, Tensor w_hh_f, "
      "Tensor? b_ih_f, Tensor? b_hh_f, Tensor? w_hr_f, Tensor h0_b, Tensor? c0_b, Tensor w_ih_b, "
      "Tensor w_hh_b, Tensor? b_ih_b, Tensor? b_hh_b, Tensor? w_hr_b, Tensor? lengths, int mode, "
      "bool save) -> Tensor[]");
  m.def(
      "pair_backward(Tensor? grad_out_f, Tensor? grad_hn_f, Tensor? grad_cn_f, Tensor? c0_f, "
      "Tensor w_ih_f, Tensor w_hh_f, Tensor? w_hr_f, Tensor act_f, Tensor hprev_f, Tensor c_f, "
      "Tensor hpre_f, Tensor? grad_out_b, Tensor? grad_hn_b, Tensor? grad_cn_b, Tensor? c0_b, "
      "Tensor w_ih_b, Tensor w_hh_b, Tensor? w_hr_b, Tensor act_b, Tensor hprev_b, Tensor c_b, "
      "Tensor hpre_b, Tensor x, Tensor? lengths, int mode, bool has_bias, bool need_dx) -> "
      "Tensor[]");
}

TORCH_LIBRARY_IMPL(rnnkit_cpu, CPU, m) {
  m.impl("layer_forward", &rnnkit::layer_forward);
  m.impl("layer_backward", &rnnkit::layer_backward);
  m.impl("pair_forward", &rnnkit::pair_forward);
  m.impl("pair_backward", &rnnkit::pair_backward);
}
