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

namespace rnnkit {
namespace {

using namespace cpu;

using at::Tensor;
using std::int64_t;

enum LnMode : int64_t { kLnLstm = 0, kLnGru = 1 };

constexpr int64_t kStats = 3;  // rstd per row: input-side, recurrent, cell LayerNorm

// ---------------------------------------------------------------------------------------------
// LayerNorm pieces. torch's layer_norm: biased variance (divided by n), eps inside the root.

// ---------------------------------------------------------------------------------------------
// One fused pass per row (one sequence) at one step; j runs over H. xhat (G): the normalised
// W_ih x_t from the pass over all steps, whose input side of the pre-activations is
// xl = wx * xhat + xb (wx = ln_ih_w; xb: ln_ih_b and the biases added there); hw (G): W_hh h_{t-1}
// from the step's GEMM.

// LSTM: pre = xl + wh * LN(hw) (every bias is in xb); c = f c + i g; h = o tanh(LN(c)).
// out holds o until the cell state's moments are known. cn (H) receives the new cell state
// before zoneout (c itself without kZone); with kZone, keep_h and keep_c (H) are the row's
// zoneout weights: state = keep * previous + (1 - keep) * new. cp saves c_{t-1} [kZone, kSave].
template <typename T, bool kSave, bool kZone>
inline void ln_lstm_row_forward(int64_t H, T eps, const T* xhat, const T* wx, const T* xb,
                                const T* hw, const T* wh, const T* wc, const T* bc,
                                const T* keep_h, const T* keep_c, T* c, T* cn, T* h, T* out,
                                T* act, T* cs, T* cp, T* hhat, T* chat, T* rstd) {
  T mean_h, rstd_h;
  moments(4 * H, hw, eps, mean_h, rstd_h);
  T sum_c = T(0);
#pragma omp simd reduction(+ : sum_c)
  for (int64_t j = 0; j < H; ++j) {
    const T hi = (hw[j] - mean_h) * rstd_h;
    const T hf = (hw[H + j] - mean_h) * rstd_h;
    const T hg = (hw[2 * H + j] - mean_h) * rstd_h;
    const T ho = (hw[3 * H + j] - mean_h) * rstd_h;
    const T i = sigmoid(wx[j] * xhat[j] + xb[j] + wh[j] * hi);
    const T f = sigmoid(wx[H + j] * xhat[H + j] + xb[H + j] + wh[H + j] * hf);
    const T g = tanh_(wx[2 * H + j] * xhat[2 * H + j] + xb[2 * H + j] + wh[2 * H + j] * hg);
    const T o = sigmoid(wx[3 * H + j] * xhat[3 * H + j] + xb[3 * H + j] + wh[3 * H + j] * ho);
    const T c_old = c[j];
    const T c_new = f * c_old + i * g;
    if constexpr (kZone) {
      cn[j] = c_new;
      c[j] = keep_c[j] * c_old + (T(1) - keep_c[j]) * c_new;
    } else {
      c[j] = c_new;
    }
    out[j] = o;
    sum_c += c_new;
    if constexpr (kSave) {
      hhat[j] = hi;
      hhat[H + j] = hf;
      hhat[2 * H + j] = hg;
      hhat[3 * H + j] = ho;
      act[j] = i;
      act[H + j] = f;
      act[2 * H + j] = g;
      act[3 * H + j] = o;
      cs[j] = c_new;
      if constexpr (kZone) cp[j] = c_old;
    }
  }
  const T mean_c = sum_c / T(H);
  T sq = T(0);
#pragma omp simd reduction(+ : sq)
  for (int64_t j = 0; j < H; ++j) {
    const T d = cn[j] - mean_c;
    sq += d * d;
  }
  const T rstd_c = T(1) / std::sqrt(sq / T(H) + eps);
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const T cl = (cn[j] - mean_c) * rstd_c;
    const T h_new = out[j] * tanh_(wc[j] * cl + bc[j]);
    const T h_t = kZone ? keep_h[j] * h[j] + (T(1) - keep_h[j]) * h_new : h_new;
    h[j] = h_t;
    out[j] = h_t;
    if constexpr (kSave) chat[j] = cl;
  }
  if constexpr (kSave) {
    rstd[1] = rstd_h;
    rstd[2] = rstd_c;
  }
}

// GRU: hl = wh * LN(hw) + hb (hb = ln_hh_b + b_hh); r, z = sigmoid(xl + hl);
// n = tanh(xl_n + r hl_n); h = (1 - z) n + z hin. hin (H): the state entering the step
// (h_{t-1}, times the state dropout mask with it); h: the state, updated in place, with kZone
// keep (H) * previous + (1 - keep) * new.
template <typename T, bool kSave, bool kZone>
inline void ln_gru_row_forward(int64_t H, T eps, const T* xhat, const T* wx, const T* xb,
                               const T* hw, const T* wh, const T* hb, const T* hin,
                               const T* keep, T* h, T* out, T* act, T* hhat, T* rstd) {
  T mean_h, rstd_h;
  moments(3 * H, hw, eps, mean_h, rstd_h);
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const T hr = (hw[j] - mean_h) * rstd_h;
    const T hz = (hw[H + j] - mean_h) * rstd_h;
    const T hnn = (hw[2 * H + j] - mean_h) * rstd_h;
    const T r = sigmoid(wx[j] * xhat[j] + xb[j] + wh[j] * hr + hb[j]);
    const T z = sigmoid(wx[H + j] * xhat[H + j] + xb[H + j] + wh[H + j] * hz + hb[H + j]);
    const T hn = wh[2 * H + j] * hnn + hb[2 * H + j];
    const T n = tanh_(wx[2 * H + j] * xhat[2 * H + j] + xb[2 * H + j] + r * hn);
    const T h_new = (T(1) - z) * n + z * hin[j];
    const T h_t = kZone ? keep[j] * h[j] + (T(1) - keep[j]) * h_new : h_new;
    h[j] = h_t;
    out[j] = h_t;
    if constexpr (kSave) {
      hhat[j] = hr;
      hhat[H + j] = hz;
      hhat[2 * H + j] = hnn;
      act[j] = r;
      act[H + j] = z;
      act[2 * H + j] = n;
      act[3 * H + j] = hn;
    }
  }
  if constexpr (kSave) {
    rstd[1] = rstd_h;
    rstd[2] = T(0);  // no cell-state LayerNorm
  }
}

// Backward rows. Each writes the gradients of the step's pre-activations (dxl: of the input side;
// dhl: of the recurrent side after its LayerNorm, the same for the LSTM; dcl: of the cell
// LayerNorm's output) and dhw, the gradient of W_hh h_{t-1}; the recurrent GEMM turns dhw into
// the part of dh_{t-1} that goes through w_hh.

// dht: the gradient reaching h_t; dc: reaching c_t, left holding the one reaching c_{t-1}.
// With kZone (keep_h, keep_c (H): the row's zoneout weights), dhz receives the part of dh_{t-1}
// that zoneout carries past the step: keep_h * dht.
template <typename T, bool kZone>
inline void ln_lstm_row_backward(int64_t H, const T* act, const T* cprev, const T* chat,
                                 const T* hhat, const T* rstd, const T* wh, const T* wc,
                                 const T* bc, const T* keep_h, const T* keep_c, const T* dht,
                                 T* dc, T* dg, T* dcl, T* dhw, T* dhz) {
  const T rstd_c = rstd[2];
  // Through h = o tanh(cl), cl = wc * chat + bc: the output gate and the cell LayerNorm's output.
  T sum = T(0), dot = T(0);
#pragma omp simd reduction(+ : sum, dot)
  for (int64_t j = 0; j < H; ++j) {
    const T o = act[3 * H + j];
    const T tc = tanh_(wc[j] * chat[j] + bc[j]);
    const T dh_new = kZone ? (T(1) - keep_h[j]) * dht[j] : dht[j];
    const T d_o = dh_new * tc;
    const T dclj = dh_new * o * (T(1) - tc * tc);
    if constexpr (kZone) dhz[j] = keep_h[j] * dht[j];
    const T dchat = dclj * wc[j];
    dg[3 * H + j] = d_o * o * (T(1) - o);
    dcl[j] = dclj;
    sum += dchat;
    dot += dchat * chat[j];
  }
  const T mean_dchat = sum / T(H), mean_dot = dot / T(H);
  // Through c_t = f c_{t-1} + i g, with the cell LayerNorm's backward.
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const T i = act[j];
    const T f = act[H + j];
    const T g = act[2 * H + j];
    const T dchat = dcl[j] * wc[j];
    const T dc_t = dc[j];
    const T dc_new = kZone ? (T(1) - keep_c[j]) * dc_t : dc_t;
    const T dct = dc_new + rstd_c * (dchat - mean_dchat - chat[j] * mean_dot);
    const T di = dct * g;
    const T dgg = dct * i;
    const T df = dct * cprev[j];
    dg[j] = di * i * (T(1) - i);
    dg[H + j] = df * f * (T(1) - f);
    dg[2 * H + j] = dgg * (T(1) - g * g);
    dc[j] = kZone ? dct * f + keep_c[j] * dc_t : dct * f;
  }
  // The recurrent LayerNorm: pre = xl + wh * hhat.
  layer_norm_backward(4 * H, dg, wh, hhat, rstd[1], dhw);
}

// dh: the gradient reaching h_t from later steps, left holding the part of the gradient of the
// state entering the step (hprev) that does not go through w_hh; gout: the one from the output
// at t. With kZone (keep (H)), dhz receives the part of dh_{t-1} that zoneout carries past the
// step: keep * (dh + gout).
template <typename T, bool kZone>
inline void ln_gru_row_backward(int64_t H, const T* act, const T* hprev, const T* hhat,
                                const T* rstd, const T* wh, const T* keep, const T* gout, T* dh,
                                T* dxl, T* dhl, T* dhw, T* dhz) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const T r = act[j];
    const T z = act[H + j];
    const T n = act[2 * H + j];
    const T hn = act[3 * H + j];
    const T dh_t = dh[j] + gout[j];
    const T dht = kZone ? (T(1) - keep[j]) * dh_t : dh_t;
    const T dn = dht * (T(1) - z);
    const T dz = dht * (hprev[j] - n);
    const T dnp = dn * (T(1) - n * n);
    const T dr = dnp * hn;
    const T drp = dr * r * (T(1) - r);
    const T dzp = dz * z * (T(1) - z);
    dxl[j] = drp;
    dxl[H + j] = dzp;
    dxl[2 * H + j] = dnp;
    dhl[j] = drp;
    dhl[H + j] = dzp;
    dhl[2 * H + j] = dnp * r;
    dh[j] = dht * z;
    if constexpr (kZone) dhz[j] = keep[j] * dh_t;
  }
  // The recurrent LayerNorm: hl = wh * hhat + bh.
  layer_norm_backward(3 * H, dhl, wh, hhat, rstd[1], dhw);
}

// ---------------------------------------------------------------------------------------------
// Forward.

// Calls fn with std::bool_constant<b>: a runtime flag made a compile-time one.
template <typename Fn>
inline void with_bool(bool b, Fn&& fn) {
  if (b) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}



struct LnForwardIn {
  Tensor x, w_ih, w_hh, xbias, hbias, ln_ih_w, ln_hh_w, ln_c_w, ln_c_b;
  Tensor mask, zone_h, zone_c;  // regularisers, undefined when off
  int64_t zone_h_step, zone_c_step;
  const int64_t* len;
  bool reverse;
  double eps;
};

struct LnForwardOut {
  Tensor out, h_n, c_n, act, hprev, c, xhat, hhat, chat, rstd, cprev;
};

// kState: state dropout, h_{t-1} * mask (B, H) enters the step; kZone: zoneout on h (and c).
template <typename T, int64_t kMode, bool kLen, bool kSave, bool kState, bool kZone>
void ln_forward_impl(const Shape& n, const LnForwardIn& in, LnForwardOut& r) {
  constexpr bool kLstm = kMode == kLnLstm;
  const int64_t T_ = n.T, B = n.B, I = n.I, H = n.H, G = n.G, TB = n.T * n.B;
  const bool reverse = in.reverse;
  const int64_t* len = in.len;
  const T eps = static_cast<T>(in.eps);
  const T* x = ptr<T>(in.x);
  const T* w_ih = ptr<T>(in.w_ih);
  const T* w_hh = ptr<T>(in.w_hh);
  const T* xbias = ptr<T>(in.xbias);  // (G) ln_ih_b + b_ih [+ ln_hh_b + b_hh]
  const T* hbias = ptr<T>(in.hbias);  // (G) ln_hh_b + b_hh [gru]
  const T* wx = ptr<T>(in.ln_ih_w);
  const T* wh = ptr<T>(in.ln_hh_w);
  const T* wc = ptr<T>(in.ln_c_w);
  const T* bc = ptr<T>(in.ln_c_b);
  auto opts = r.out.options();

  T* h = r.h_n.mutable_data_ptr<T>();  // (B, H), starts as h0, updated in place
  T* c = kLstm ? r.c_n.mutable_data_ptr<T>() : nullptr;  // (B, H)
  T* out = r.out.mutable_data_ptr<T>();
  T* act = kSave ? mptr<T>(r.act) : nullptr;
  T* hprev = kSave ? mptr<T>(r.hprev) : nullptr;
  T* cs = kSave && kLstm ? mptr<T>(r.c) : nullptr;
  T* hhat = kSave ? mptr<T>(r.hhat) : nullptr;
  T* chat = kSave && kLstm ? mptr<T>(r.chat) : nullptr;
  T* rstd = kSave ? mptr<T>(r.rstd) : nullptr;
  T* cp = kSave && kLstm && kZone ? mptr<T>(r.cprev) : nullptr;
  const T* mask = ptr<T>(in.mask);      // (B, H) with kState
  const T* zone_h = ptr<T>(in.zone_h);  // (T, B, H) or (H) with kZone
  const T* zone_c = ptr<T>(in.zone_c);  // (T, B, H) or (H), LSTM with kZone
  // cn_t (B, H): the new cell states before zoneout, when they are not saved
  constexpr bool kScratch = kLstm && kZone && !kSave;
  Tensor cn_t = kScratch ? at::empty({B, H}, opts) : Tensor();
  T* cn_scratch = kScratch ? cn_t.mutable_data_ptr<T>() : nullptr;

  // xhat (T*B, G) = x (T*B, I) . w_ih^T: the input projection of every step at once, then, row
  // by row, normalised in place (the saved xhat, when saving). Padded rows are set to 0.
  Tensor xhat_t = kSave ? r.xhat : at::empty({TB, G}, opts);
  T* xhat = xhat_t.mutable_data_ptr<T>();
  gemm<T>(false, true, TB, G, I, T(1), x, I, w_ih, I, T(0), xhat, G);
  at::parallel_for(0, TB, grain(G), [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      T* v = xhat + row * G;
      if constexpr (kLen) {
        if (row / B >= len[row % B]) {
          std::fill(v, v + G, T(0));
          continue;
        }
      }
      T mean, rs;
      moments(G, v, eps, mean, rs);
      if constexpr (kSave) rstd[row * kStats] = rs;
#pragma omp simd
      for (int64_t j = 0; j < G; ++j) v[j] = (v[j] - mean) * rs;
    }
  });

  Tensor hw_t = at::empty({B, G}, opts);  // (B, G) recurrent projection of this step
  T* hw = hw_t.mutable_data_ptr<T>();
  const PackedB<T> hh(true, B, G, H, w_hh, H);  // op(B) = w_hh^T (H, G)
  // With lengths, the recurrent GEMM runs over the A sequences still active at this step only:
  // rows[k] (k < A) is the batch index of the k-th active one and hc (A, H) gathers their states.
  // With state dropout, hc (A, H) holds the masked states entering the step.
  std::vector<int64_t> rows;
  rows.reserve(B);
  active_rows<kLen>(0, len, B, rows);
  Tensor hc_t = kLen || kState ? at::empty({B, H}, opts) : Tensor();
  T* hc = kLen || kState ? hc_t.mutable_data_ptr<T>() : nullptr;
  const int64_t steps = max_length(len, B, T_);
  for (int64_t s = 0; s < steps; ++s) {
    if constexpr (kLen) active_rows<kLen>(s, len, B, rows);
    const int64_t A = static_cast<int64_t>(rows.size());
    const bool gathered = kState || (kLen && A < B);
    if (gathered) {
      for (int64_t k = 0; k < A; ++k) {
        const T* h_row = h + rows[k] * H;
        T* hc_row = hc + k * H;
        if constexpr (kState) {
          const T* m = mask + rows[k] * H;
#pragma omp simd
          for (int64_t j = 0; j < H; ++j) hc_row[j] = h_row[j] * m[j];
        } else {
          std::copy(h_row, h_row + H, hc_row);
        }
      }
    }
    if (A == B) {
      // hw (B, G) = h or hc (B, H) . w_hh^T
      hh.run(gathered ? hc : h, H, T(0), hw, G);
    } else {
      // hw (A, G) = hc (A, H) . w_hh^T
      gemm<T>(false, true, A, G, H, T(1), hc, H, w_hh, H, T(0), hw, G);
    }
    at::parallel_for(0, A, grain(G), [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t b = rows[k];
        const int64_t t = time_of<kLen>(s, b, len, T_, reverse);
        const int64_t row = t * B + b;
        const T* hin = kState ? hc + k * H : h + b * H;  // the state entering the step
        if constexpr (kSave) std::copy(hin, hin + H, hprev + row * H);
        T* a = kSave ? act + row * 4 * H : nullptr;
        T* hhat_row = kSave ? hhat + row * G : nullptr;
        T* rs = kSave ? rstd + row * kStats : nullptr;
        const T* keep_h = kZone ? keep_row(zone_h, in.zone_h_step, row) : nullptr;
        if constexpr (kLstm) {
          const T* keep_c = kZone ? keep_row(zone_c, in.zone_c_step, row) : nullptr;
          T* cs_row = kSave ? cs + row * H : nullptr;
          T* cn = !kZone ? c + b * H : kSave ? cs_row : cn_scratch + b * H;
          ln_lstm_row_forward<T, kSave, kZone>(
              H, eps, xhat + row * G, wx, xbias, hw + k * G, wh, wc, bc, keep_h, keep_c, c + b * H,
              cn, h + b * H, out + row * H, a, cs_row, kSave && kZone ? cp + row * H : nullptr,
              hhat_row, kSave ? chat + row * H : nullptr, rs);
        } else {
          ln_gru_row_forward<T, kSave, kZone>(H, eps, xhat + row * G, wx, xbias, hw + k * G, wh,
                                              hbias, hin, keep_h, h + b * H, out + row * H, a,
                                              hhat_row, rs);
        }
      }
    });
  }
}

template <typename T, int64_t kMode>
void ln_forward_variant(bool has_len, bool save, bool state, bool zone, const Shape& n,
                        const LnForwardIn& in, LnForwardOut& r) {
  with_bool(has_len, [&](auto len) {
    with_bool(save, [&](auto sv) {
      with_bool(state, [&](auto st) {
        with_bool(zone, [&](auto zn) {
          ln_forward_impl<T, kMode, decltype(len)::value, decltype(sv)::value,
                          decltype(st)::value, decltype(zn)::value>(n, in, r);
        });
      });
    });
  });
}

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
  LnForwardOut r;
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

  // Biases as the passes add them: the LSTM adds every bias on the input side; the GRU keeps the
  // recurrent ones apart, since its reset gate scales the recurrent side of n.
  Tensor xbias = ln_ih_b.clone(), hbias = ln_hh_b.clone();
  if (b_ih.defined()) {
    xbias.add_(b_ih);
    hbias.add_(b_hh);
  }
  if (lstm) xbias.add_(hbias);

  LnForwardIn in;
  in.len = has_len ? lengths.const_data_ptr<int64_t>() : nullptr;
  in.reverse = reverse;
  in.eps = eps;
  in.x = x;
  in.w_ih = w_ih;
  in.w_hh = w_hh;
  in.xbias = xbias;
  in.hbias = hbias;
  in.ln_ih_w = ln_ih_w;
  in.ln_hh_w = ln_hh_w;
  in.ln_c_w = lstm ? ln_c_w : Tensor();
  in.ln_c_b = lstm ? ln_c_b : Tensor();
  in.mask = reg.mask;
  in.zone_h = reg.zone_h;
  in.zone_c = reg.zone_c;
  in.zone_h_step = reg.zone_h_step;
  in.zone_c_step = reg.zone_c_step;
  const bool state = reg.mask.defined();

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnkit_layernorm_forward", [&] {
    using T = scalar_t;
    if (lstm) {
      ln_forward_variant<T, kLnLstm>(has_len, save, state, zone, n, in, r);
    } else {
      ln_forward_variant<T, kLnGru>(has_len, save, state, zone, n, in, r);
    }
  });
  return {r.out, r.h_n, r.c_n, r.act, r.hprev, r.c, r.xhat, r.hhat, r.chat, r.rstd, r.cprev};
}

// ---------------------------------------------------------------------------------------------
// Backward.

struct LnBackwardIn {
  Tensor gout, x, c0, w_ih, w_hh, ln_ih_w, ln_hh_w, ln_c_w, ln_c_b;
  Tensor act, hprev, cs, xhat, hhat, chat, rstd, cprev;
  Tensor mask, zone_h, zone_c;  // regularisers, undefined when off
  int64_t zone_h_step, zone_c_step;
  const int64_t* len;
  bool reverse, need_dx, has_bias;
};

struct LnBackwardOut {
  Tensor dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dln_ih_w, dln_ih_b, dln_hh_w, dln_hh_b,
      dln_c_w, dln_c_b;
};

template <typename T, int64_t kMode, bool kLen, bool kState, bool kZone>
void ln_backward_impl(const Shape& n, const LnBackwardIn& in, LnBackwardOut& r) {
  constexpr bool kLstm = kMode == kLnLstm;
  const int64_t T_ = n.T, B = n.B, I = n.I, H = n.H, G = n.G, TB = n.T * n.B;
  const bool reverse = in.reverse;
  const int64_t* len = in.len;
  auto opts = r.dh0.options();
  const T* gout = ptr<T>(in.gout);  // (T, B, H) or nullptr
  const T* x = ptr<T>(in.x);
  const T* c0 = ptr<T>(in.c0);
  const T* w_ih = ptr<T>(in.w_ih);
  const T* w_hh = ptr<T>(in.w_hh);
  const T* wx = ptr<T>(in.ln_ih_w);
  const T* wh = ptr<T>(in.ln_hh_w);
  const T* wc = ptr<T>(in.ln_c_w);
  const T* bc = ptr<T>(in.ln_c_b);
  const T* act = ptr<T>(in.act);
  const T* hprev = ptr<T>(in.hprev);
  const T* cs = ptr<T>(in.cs);
  const T* xhat = ptr<T>(in.xhat);
  const T* hhat = ptr<T>(in.hhat);
  const T* chat = ptr<T>(in.chat);
  const T* rstd = ptr<T>(in.rstd);
  const T* cprev_saved = ptr<T>(in.cprev);  // (T, B, H), LSTM with kZone
  const T* mask = ptr<T>(in.mask);          // (B, H) with kState
  const T* zone_h = ptr<T>(in.zone_h);      // (T, B, H) or (H) with kZone
  const T* zone_c = ptr<T>(in.zone_c);      // (T, B, H) or (H), LSTM with kZone
  // dhz (B, H): the part of dh_{t-1} that zoneout carries past the step [kZone]
  Tensor dhz_t = kZone ? at::empty({B, H}, opts) : Tensor();
  T* dhz = kZone ? dhz_t.mutable_data_ptr<T>() : nullptr;

  // The carried gradients: dh (B, H) reaching h_s from later steps, dc (B, H) reaching c_s.
  T* dh = r.dh0.mutable_data_ptr<T>();
  T* dc = kLstm ? r.dc0.mutable_data_ptr<T>() : nullptr;
  // Per-step gradients, time-ordered, zero at padded positions: dxl (T*B, G) of the input side
  // of the pre-activations; dhl (T*B, G) of the recurrent side after its LayerNorm (the same
  // tensor for the LSTM); dhw (T*B, G) of W_hh h_{t-1}; dcl (T*B, H) of the cell LayerNorm's
  // output [lstm].
  auto buffer = [&](int64_t width) {
    return kLen ? at::zeros({TB, width}, opts) : at::empty({TB, width}, opts);
  };
  Tensor dxl_t = buffer(G);
  Tensor dhl_t = kLstm ? dxl_t : buffer(G);
  Tensor dhw_t = buffer(G);
  Tensor dcl_t = kLstm ? buffer(H) : Tensor();
  T* dxl = dxl_t.mutable_data_ptr<T>();
  T* dhl = dhl_t.mutable_data_ptr<T>();
  T* dhw = dhw_t.mutable_data_ptr<T>();
  T* dcl = kLstm ? dcl_t.mutable_data_ptr<T>() : nullptr;
  // With lengths, the recurrent GEMM runs over the A sequences active at this step only
  // (rows[k], k < A, their batch indices): their dhw rows are gathered in dhs (A, G), and the
  // product dhc (A, H) is added to their dh.
  Tensor dhs_t = kLen ? at::empty({B, G}, opts) : Tensor();
  Tensor dhc_t = kLen ? at::empty({B, H}, opts) : Tensor();
  T* dhs = kLen ? dhs_t.mutable_data_ptr<T>() : nullptr;
  T* dhc = kLen ? dhc_t.mutable_data_ptr<T>() : nullptr;
  std::vector<int64_t> rows;
  rows.reserve(B);
  active_rows<kLen>(0, len, B, rows);
  Tensor zero_t = at::zeros({H}, opts);  // stands in for an absent grad_out row
  const T* zero = zero_t.const_data_ptr<T>();

  const PackedB<T> hh(false, B, H, G, w_hh, H);  // op(B) = w_hh (G, H)
  const int64_t steps = max_length(len, B, T_);
  for (int64_t s = steps - 1; s >= 0; --s) {
    if constexpr (kLen) active_rows<kLen>(s, len, B, rows);
    const int64_t A = static_cast<int64_t>(rows.size());
    at::parallel_for(0, A, grain(G), [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t b = rows[k];
        const int64_t t = time_of<kLen>(s, b, len, T_, reverse);
        const int64_t row = t * B + b;
        const T* go = gout ? gout + row * H : zero;
        T* dhw_row = kLen ? dhs + k * G : dhw + row * G;
        const T* keep_h = kZone ? keep_row(zone_h, in.zone_h_step, row) : nullptr;
        T* dhz_row = kZone ? dhz + b * H : nullptr;
        if constexpr (kLstm) {
          // c_{t-1}: the cell state one step earlier in reading order, c0 at the first step
          // (with zoneout, as saved: the new cell state of the step before is not it).
          const int64_t prev = reverse ? t + 1 : t - 1;
          const T* cprev = kZone   ? cprev_saved + row * H
                           : s == 0 ? c0 + b * H
                                    : cs + (prev * B + b) * H;
          const T* keep_c = kZone ? keep_row(zone_c, in.zone_c_step, row) : nullptr;
          T* dh_row = dh + b * H;
          for (int64_t j = 0; j < H; ++j) dh_row[j] += go[j];
          ln_lstm_row_backward<T, kZone>(H, act + row * 4 * H, cprev, chat + row * H,
                                         hhat + row * G, rstd + row * kStats, wh, wc, bc, keep_h,
                                         keep_c, dh_row, dc + b * H, dxl + row * G,
                                         dcl + row * H, dhw_row, dhz_row);
          std::fill(dh_row, dh_row + H, T(0));
        } else {
          ln_gru_row_backward<T, kZone>(H, act + row * 4 * H, hprev + row * H, hhat + row * G,
                                        rstd + row * kStats, wh, keep_h, go, dh + b * H,
                                        dxl + row * G, dhl + row * G, dhw_row, dhz_row);
        }
        if (kLen) std::copy(dhw_row, dhw_row + G, dhw + row * G);
      }
    });
    if (kLen && A == B) {
      // dh (B, H) += dhs (B, G) . w_hh (G, H): every sequence is active, rows[k] = k
      hh.run(dhs, G, T(1), dh, H);
    } else if (kLen) {
      // dhc (A, H) = dhs (A, G) . w_hh (G, H), added to the active rows of dh
      gemm<T>(false, false, A, H, G, T(1), dhs, G, w_hh, H, T(0), dhc, H);
      for (int64_t k = 0; k < A; ++k) {
        T* dh_row = dh + rows[k] * H;
        const T* dhc_row = dhc + k * H;
        for (int64_t j = 0; j < H; ++j) dh_row[j] += dhc_row[j];
      }
    } else {
      // dh (B, H) += dhw (B, G) . w_hh (G, H), the rows of time t = s (T - 1 - s in reverse)
      hh.run(dhw + (reverse ? T_ - 1 - s : s) * B * G, G, T(1), dh, H);
    }
    if constexpr (kState || kZone) {
      // dh now holds the gradient of the state entering the step: through the state dropout
      // mask to h_{t-1}, plus what zoneout carried past the step.
      for (int64_t k = 0; k < A; ++k) {
        const int64_t b = rows[k];
        T* dh_row = dh + b * H;
        const T* m = kState ? mask + b * H : nullptr;
        const T* dz = kZone ? dhz + b * H : nullptr;
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          const T dhin = kState ? dh_row[j] * m[j] : dh_row[j];
          dh_row[j] = kZone ? dhin + dz[j] : dhin;
        }
      }
    }
  }

  // Gains and biases, summed over all steps: ln_ih_b and b_ih receive dxl, ln_hh_b and b_hh
  // receive dhl (the same for the LSTM, whose biases all add to the pre-activations).
  column_sums<T>(TB, G, dxl, xhat, r.dln_ih_w.mutable_data_ptr<T>());
  column_sums<T>(TB, G, dxl, nullptr, r.dln_ih_b.mutable_data_ptr<T>());
  column_sums<T>(TB, G, dhl, hhat, r.dln_hh_w.mutable_data_ptr<T>());
  if constexpr (kLstm) {
    r.dln_hh_b.copy_(r.dln_ih_b);
    column_sums<T>(TB, H, dcl, chat, r.dln_c_w.mutable_data_ptr<T>());
    column_sums<T>(TB, H, dcl, nullptr, r.dln_c_b.mutable_data_ptr<T>());
  } else {
    column_sums<T>(TB, G, dhl, nullptr, r.dln_hh_b.mutable_data_ptr<T>());
  }
  if (in.has_bias) {
    r.db_ih.copy_(r.dln_ih_b);
    r.db_hh.copy_(r.dln_hh_b);
  }

  // dxw (T*B, G): the gradient of W_ih x_t through the input-side LayerNorm, row by row, in
  // place of dxl (padded rows stay zero: their dxl is zero).
  T* dxw = dxl;
  at::parallel_for(0, TB, grain(G), [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row)
      layer_norm_backward(G, dxl + row * G, wx, xhat + row * G, rstd[row * kStats],
                          dxw + row * G);
  });
  if (in.need_dx) {
    // dx (T*B, I) = dxw (T*B, G) . w_ih (G, I)
    gemm<T>(false, false, TB, I, G, T(1), dxw, G, w_ih, I, T(0), r.dx.mutable_data_ptr<T>(), I);
  }
  // dw_ih (G, I) = dxw^T (G, T*B) . x (T*B, I)
  gemm<T>(true, false, G, I, TB, T(1), dxw, G, x, I, T(0), r.dw_ih.mutable_data_ptr<T>(), I);
  // dw_hh (G, H) = dhw^T (G, T*B) . hprev (T*B, H)
  gemm<T>(true, false, G, H, TB, T(1), dhw, G, hprev, H, T(0), r.dw_hh.mutable_data_ptr<T>(), H);
}

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
  LnBackwardOut r;
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

  LnBackwardIn in;
  in.len = lengths.defined() ? lengths.const_data_ptr<int64_t>() : nullptr;
  in.reverse = reverse;
  in.need_dx = need_dx;
  in.has_bias = has_bias;
  in.gout = gout;
  in.x = x;
  in.c0 = c0;
  in.w_ih = w_ih;
  in.w_hh = w_hh;
  in.ln_ih_w = ln_ih_w;
  in.ln_hh_w = ln_hh_w;
  in.ln_c_w = ln_c_w;
  in.ln_c_b = ln_c_b;
  in.act = act;
  in.hprev = hprev;
  in.cs = cs;
  in.xhat = xhat;
  in.hhat = hhat;
  in.chat = chat;
  in.rstd = rstd;
  in.cprev = cprev;
  in.mask = reg.mask;
  in.zone_h = reg.zone_h;
  in.zone_c = reg.zone_c;
  in.zone_h_step = reg.zone_h_step;
  in.zone_c_step = reg.zone_c_step;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnkit_layernorm_backward", [&] {
    using T = scalar_t;
    with_bool(lengths.defined(), [&](auto len) {
      with_bool(state, [&](auto st) {
        with_bool(zone, [&](auto zn) {
          constexpr bool kLen = decltype(len)::value, kSt = decltype(st)::value;
          constexpr bool kZn = decltype(zn)::value;
          if (lstm) {
            ln_backward_impl<T, kLnLstm, kLen, kSt, kZn>(n, in, r);
          } else {
            ln_backward_impl<T, kLnGru, kLen, kSt, kZn>(n, in, r);
          }
        });
      });
    });
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
