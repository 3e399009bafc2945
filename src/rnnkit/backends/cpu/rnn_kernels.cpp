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
constexpr int kFlagBits = 6;

// fn(std::integral_constant<int, F>{}) with F = flags as a compile-time constant. Only the bits of
// kUsed are branched on (the others are 0), so only the variants a caller can ask for are built.
template <int kUsed, int kF = 0, int kBit = 0, typename Fn>
void with_flags(int flags, Fn&& fn) {
  if constexpr (kBit == kFlagBits) {
    fn(std::integral_constant<int, kF>{});
  } else if constexpr ((kUsed & (1 << kBit)) == 0) {
    with_flags<kUsed, kF, kBit + 1>(flags, fn);
  } else if (flags & (1 << kBit)) {
    with_flags<kUsed, kF | (1 << kBit), kBit + 1>(flags, fn);
  } else {
    with_flags<kUsed, kF, kBit + 1>(flags, fn);
  }
}

// ---------------------------------------------------------------------------------------------
// One fused pass over the gates of one row (one sequence) at one step; j runs over H.
// keep (H or P) is the row's zoneout mask with kZone: state = keep * previous + (1 - keep) * new.

// Elman RNN: h_new = act(xg + b + hg). h holds the previous state and receives the new one.
// Saves h_new.
template <typename T, bool kRelu, bool kSave, bool kZone>
inline void rnn_row_forward(int64_t H, const T* xg, const T* hg, const T* b, const T* keep, T* h,
                            T* out, T* act) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const T pre = xg[j] + hg[j] + b[j];
    const T h_new = kRelu ? (pre > T(0) ? pre : T(0)) : tanh_(pre);
    const T h_t = kZone ? keep[j] * h[j] + (T(1) - keep[j]) * h_new : h_new;
    h[j] = h_t;
    out[j] = h_t;
    if constexpr (kSave) act[j] = h_new;
  }
}

// LSTM: c_new = f c + i g, h_new = o tanh(c_new). c holds the previous cell state and receives
// the new one. Without a projection h (the state) receives h_new and out the same; with one, h
// is the projection's input row and receives h_new (zoneout and out come after the projection).
// With peepholes, peep (3H) holds w_ci, w_cf (i and f see c_{t-1}) and w_co (o sees c_new).
// cs saves c_new, cp the previous cell state (with zoneout or peepholes), hpre h_new (with a
// projection).
template <typename T, bool kSave, bool kProj, bool kZone, bool kPeep>
inline void lstm_row_forward(int64_t H, const T* xg, const T* hg, const T* b, const T* peep,
                             const T* keep_h, const T* keep_c, T* c, T* h, T* out, T* act, T* cs,
                             T* cp, T* hpre) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const T c_old = c[j];
    T pi = xg[j] + hg[j] + b[j];
    T pf = xg[H + j] + hg[H + j] + b[H + j];
    T po = xg[3 * H + j] + hg[3 * H + j] + b[3 * H + j];
    if constexpr (kPeep) {
      pi += peep[j] * c_old;
      pf += peep[H + j] * c_old;
    }
    const T i = sigmoid(pi);
    const T f = sigmoid(pf);
    const T g = tanh_(xg[2 * H + j] + hg[2 * H + j] + b[2 * H + j]);
    const T c_new = f * c_old + i * g;
    if constexpr (kPeep) po += peep[2 * H + j] * c_new;
    const T o = sigmoid(po);
    const T h_new = o * tanh_(c_new);
    c[j] = kZone ? keep_c[j] * c_old + (T(1) - keep_c[j]) * c_new : c_new;
    if constexpr (kProj) {
      h[j] = h_new;
      if constexpr (kSave) hpre[j] = h_new;
    } else {
      const T h_t = kZone ? keep_h[j] * h[j] + (T(1) - keep_h[j]) * h_new : h_new;
      h[j] = h_t;
      out[j] = h_t;
    }
    if constexpr (kSave) {
      act[j] = i;
      act[H + j] = f;
      act[2 * H + j] = g;
      act[3 * H + j] = o;
      cs[j] = c_new;
      if constexpr (kZone || kPeep) cp[j] = c_old;
    }
  }
}

// GRU: r, z from x and hin; n = tanh(xn + r (W_hn hin + b_hn)); h_new = (1 - z) n + z hin.
// hin is the state that entered the step (after state dropout); h holds the previous state and
// receives the new one. b holds b_ir + b_hr, b_iz + b_hz, b_in; bhn holds b_hn.
template <typename T, bool kSave, bool kZone>
inline void gru_row_forward(int64_t H, const T* xg, const T* hg, const T* b, const T* bhn,
                            const T* hin, const T* keep, T* h, T* out, T* act) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const T r = sigmoid(xg[j] + hg[j] + b[j]);
    const T z = sigmoid(xg[H + j] + hg[H + j] + b[H + j]);
    const T hn = hg[2 * H + j] + bhn[j];
    const T n = tanh_(xg[2 * H + j] + b[2 * H + j] + r * hn);
    const T h_new = (T(1) - z) * n + z * hin[j];
    const T h_t = kZone ? keep[j] * h[j] + (T(1) - keep[j]) * h_new : h_new;
    h[j] = h_t;
    out[j] = h_t;
    if constexpr (kSave) {
      act[j] = r;
      act[H + j] = z;
      act[2 * H + j] = n;
      act[3 * H + j] = hn;
    }
  }
}

// Backward rows: dh holds the gradient reaching the state h_t from later steps, gout the one from
// the output at t (the output is h_t). Each writes the gate pre-activation gradients and leaves in
// dh the part of dh_{t-1} that goes neither through w_hh nor through state dropout (zoneout's
// keep, and without state dropout the GRU's z * h_{t-1}); the recurrent GEMM adds the rest.

template <typename T, bool kRelu, bool kZone>
inline void rnn_row_backward(int64_t H, const T* act, const T* gout, const T* keep, T* dh,
                             T* dg) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const T h = act[j];
    const T dht = dh[j] + gout[j];
    const T dh_new = kZone ? (T(1) - keep[j]) * dht : dht;
    const T dpre = kRelu ? (h > T(0) ? dh_new : T(0)) : dh_new * (T(1) - h * h);
    dg[j] = dpre;
    dh[j] = kZone ? keep[j] * dht : T(0);
  }
}

// dhp: with a projection, the gradient reaching h_new = o tanh(c_new) through it (zoneout on h
// was taken apart before the projection); without, it comes from dh and gout here. dc holds the
// gradient reaching the cell state c_t and receives the one reaching c_{t-1}. peep as forward.
template <typename T, bool kProj, bool kZone, bool kPeep>
inline void lstm_row_backward(int64_t H, const T* act, const T* cs, const T* cprev,
                              const T* peep, const T* keep_h, const T* keep_c, const T* dhp,
                              const T* gout, T* dh, T* dc, T* dg) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const T i = act[j];
    const T f = act[H + j];
    const T g = act[2 * H + j];
    const T o = act[3 * H + j];
    const T tc = tanh_(cs[j]);
    T dh_new;
    if constexpr (kProj) {
      dh_new = dhp[j];
    } else {
      const T dht = dh[j] + gout[j];
      dh_new = kZone ? (T(1) - keep_h[j]) * dht : dht;
      dh[j] = kZone ? keep_h[j] * dht : T(0);
    }
    const T dct = dc[j];
    const T d_o = dh_new * tc;
    const T dop = d_o * o * (T(1) - o);
    T dc_new = (kZone ? (T(1) - keep_c[j]) * dct : dct) + dh_new * o * (T(1) - tc * tc);
    if constexpr (kPeep) dc_new += dop * peep[2 * H + j];
    const T di = dc_new * g;
    const T dgg = dc_new * i;
    const T df = dc_new * cprev[j];
    const T dip = di * i * (T(1) - i);
    const T dfp = df * f * (T(1) - f);
    dg[j] = dip;
    dg[H + j] = dfp;
    dg[2 * H + j] = dgg * (T(1) - g * g);
    dg[3 * H + j] = dop;
    T dc_old = dc_new * f;
    if constexpr (kPeep) dc_old += dip * peep[j] + dfp * peep[H + j];
    dc[j] = kZone ? dc_old + keep_c[j] * dct : dc_old;
  }
}

// dgi: gradient of the input pre-activations (r z n); dgh: of W_hh hin + b_hh (r z hn). With
// state dropout the gradient reaching hin directly (through z * hin) goes to dhin, to be masked.
template <typename T, bool kZone, bool kState>
inline void gru_row_backward(int64_t H, const T* act, const T* hin, const T* gout, const T* keep,
                             T* dh, T* dhin, T* dgi, T* dgh) {
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) {
    const T r = act[j];
    const T z = act[H + j];
    const T n = act[2 * H + j];
    const T hn = act[3 * H + j];
    const T dht = dh[j] + gout[j];
    const T dh_new = kZone ? (T(1) - keep[j]) * dht : dht;
    const T dn = dh_new * (T(1) - z);
    const T dz = dh_new * (hin[j] - n);
    const T dnp = dn * (T(1) - n * n);
    const T dr = dnp * hn;
    const T drp = dr * r * (T(1) - r);
    const T dzp = dz * z * (T(1) - z);
    const T dhz = dh_new * z;
    dgi[j] = drp;
    dgi[H + j] = dzp;
    dgi[2 * H + j] = dnp;
    dgh[j] = drp;
    dgh[H + j] = dzp;
    dgh[2 * H + j] = dnp * r;
    if constexpr (kState) {
      dhin[j] = dhz;
      dh[j] = kZone ? keep[j] * dht : T(0);
    } else {
      dh[j] = kZone ? keep[j] * dht + dhz : dhz;
    }
  }
}

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

template <typename T, int64_t kMode, int kF>
void forward_impl(const Shape& n, const ForwardIn& in, ForwardOut& r) {
  constexpr bool kLen = kF & kLengths, kProj = kF & kProjection, kSave = kF & kSaving;
  constexpr bool kState = kF & kStateDrop, kZone = kF & kZoneout, kPeep = kF & kPeephole;
  const int64_t T_ = n.T, B = n.B, I = n.I, H = n.H, P = n.P, G = n.G, S = n.S;
  const bool reverse = in.reverse;
  const int64_t* len = in.len;
  const T* x = ptr<T>(in.x);
  const T* w_ih = ptr<T>(in.w_ih);
  const T* w_hh = ptr<T>(in.w_hh);
  const T* w_hr = ptr<T>(in.w_hr);
  const T* bias = ptr<T>(in.bias);
  const T* bhn = ptr<T>(in.bhn);
  const T* peep = ptr<T>(in.peep);      // (3, H) with kPeep
  const T* mask = ptr<T>(in.mask);      // (B, P) with kState
  const T* zone_h = ptr<T>(in.zone_h);  // (T, B, P) or (P) with kZone
  const T* zone_c = ptr<T>(in.zone_c);  // (T, B, H) or (H), LSTM with kZone
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
  T* cp = kSave && (kZone || kPeep) ? mptr<T>(r.cprev) : nullptr;  // LSTM only

  Tensor hg_t = at::empty({B, G}, opts);  // (B, G) recurrent projection of this step
  T* hg = hg_t.mutable_data_ptr<T>();
  Tensor hp_t = kProj ? at::zeros({B, H}, opts) : Tensor();  // (B, H) projection input
  Tensor hq_t = kProj ? at::empty({B, P}, opts) : Tensor();  // (B, P) projection output
  T* hp = kProj ? hp_t.mutable_data_ptr<T>() : nullptr;
  T* hq = kProj ? hq_t.mutable_data_ptr<T>() : nullptr;

  const PackedB<T> hh(true, B, G, P, w_hh, P);  // op(B) = w_hh^T (P, G)
  const PackedB<T> hr(true, B, P, H, w_hr, H);  // op(B) = w_hr^T (H, P), with a projection
  // The recurrent GEMM reads hc (A, P), the states entering the step of the A sequences it runs
  // over (rows[k], k < A: their batch indices), when they are not h itself: with lengths while
  // some sequences have finished, and with state dropout (hc = h * mask).
  std::vector<int64_t> rows;
  rows.reserve(B);
  active_rows<kLen>(0, len, B, rows);
  Tensor hc_t = kLen || kState ? at::empty({B, P}, opts) : Tensor();
  T* hc = kLen || kState ? hc_t.mutable_data_ptr<T>() : nullptr;
  const int64_t steps = max_length(len, B, T_);
  for (int64_t s = 0; s < steps; ++s) {
    if constexpr (kLen) active_rows<kLen>(s, len, B, rows);
    const int64_t A = static_cast<int64_t>(rows.size());
    const bool gathered = kState || (kLen && A < B);
    if (gathered) {
      for (int64_t k = 0; k < A; ++k) {
        const T* h_row = h + rows[k] * P;
        T* hc_row = hc + k * P;
        if constexpr (kState) {
          const T* m_row = mask + rows[k] * P;
          for (int64_t j = 0; j < P; ++j) hc_row[j] = h_row[j] * m_row[j];
        } else {
          std::copy(h_row, h_row + P, hc_row);
        }
      }
    }
    if (!gathered) {
      // hg (B, G) = h (B, P) . w_hh^T
      hh.run(h, P, T(0), hg, G);
    } else if (A == B) {
      // hg (B, G) = hc (B, P) . w_hh^T
      hh.run(hc, P, T(0), hg, G);
    } else {
      // hg (A, G) = hc (A, P) . w_hh^T
      gemm<T>(false, true, A, G, P, T(1), hc, P, w_hh, P, T(0), hg, G);
    }
    at::parallel_for(0, A, grain(G), [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t b = rows[k];
        const int64_t t = time_of<kLen>(s, b, len, T_, reverse);
        const int64_t row = t * B + b;
        const T* hin = gathered ? hc + k * P : h + b * P;  // (P) the state entering the step
        if constexpr (kSave) std::copy(hin, hin + P, hprev + row * P);
        T* a = kSave ? act + row * S : nullptr;
        const T* keep_h = kZone ? keep_row(zone_h, in.zone_h_step, row) : nullptr;
        if constexpr (kMode == kRnnTanh || kMode == kRnnRelu) {
          rnn_row_forward<T, kMode == kRnnRelu, kSave, kZone>(H, xg + row * G, hg + k * G, bias,
                                                              keep_h, h + b * H, out + row * P,
                                                              a);
        } else if constexpr (kMode == kGru) {
          gru_row_forward<T, kSave, kZone>(H, xg + row * G, hg + k * G, bias, bhn, hin, keep_h,
                                           h + b * H, out + row * P, a);
        } else {
          const T* keep_c = kZone ? keep_row(zone_c, in.zone_c_step, row) : nullptr;
          lstm_row_forward<T, kSave, kProj, kZone, kPeep>(
              H, xg + row * G, hg + k * G, bias, peep, keep_h, keep_c, c + b * H,
              kProj ? hp + b * H : h + b * H, out + row * P, a, kSave ? cs + row * H : nullptr,
              kSave && (kZone || kPeep) ? cp + row * H : nullptr,
              kSave && kProj ? hpre + row * H : nullptr);
        }
      }
    });
    if constexpr (kProj) {
      // hq (B, P) = hp (B, H) . w_hr^T; finished sequences keep their state.
      hr.run(hp, H, T(0), hq, P);
      for (int64_t k = 0; k < A; ++k) {
        const int64_t b = rows[k];
        const int64_t row = time_of<kLen>(s, b, len, T_, reverse) * B + b;
        const T* keep = kZone ? keep_row(zone_h, in.zone_h_step, row) : nullptr;
        T* h_row = h + b * P;
        const T* hq_row = hq + b * P;
        T* out_row = out + row * P;
        for (int64_t j = 0; j < P; ++j) {
          const T h_t = kZone ? keep[j] * h_row[j] + (T(1) - keep[j]) * hq_row[j] : hq_row[j];
          h_row[j] = h_t;
          out_row[j] = h_t;
        }
      }
    }
  }
}

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

// The cells already on the new driver (driver.h, cell_*.cpp).
template <typename T>
bool forward_new(int64_t mode, int flags, const Shape& n, const ForwardIn& in, ForwardOut& r) {
  if (mode != kRnnTanh && mode != kRnnRelu) return false;
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
  } else {
    run_forward<RnnRelu, T>(v, a);
  }
  return true;
}

template <typename T>
void forward_mode(int64_t mode, int flags, const Shape& n, const ForwardIn& in, ForwardOut& r) {
  if (forward_new<T>(mode, flags, n, in, r)) return;
  constexpr int kCell = kLengths | kSaving | kStateDrop | kZoneout;
  auto run = [&](auto mode_c) {
    constexpr int64_t kMode = decltype(mode_c)::value;
    constexpr int kUsed = kMode == kLstm ? kCell | kProjection | kPeephole : kCell;
    with_flags<kUsed>(flags, [&](auto f) { forward_impl<T, kMode, decltype(f)::value>(n, in, r); });
  };
  switch (mode) {
    case kRnnTanh:
      run(std::integral_constant<int64_t, kRnnTanh>{});
      break;
    case kRnnRelu:
      run(std::integral_constant<int64_t, kRnnRelu>{});
      break;
    case kLstm:
      run(std::integral_constant<int64_t, kLstm>{});
      break;
    default:
      run(std::integral_constant<int64_t, kGru>{});
  }
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

template <typename T, int64_t kMode, int kF>
void backward_impl(const Shape& n, const BackwardIn& in, BackwardOut& r) {
  constexpr bool kLen = kF & kLengths, kProj = kF & kProjection;
  constexpr bool kState = kF & kStateDrop, kZone = kF & kZoneout, kPeep = kF & kPeephole;
  const int64_t T_ = n.T, B = n.B, I = n.I, H = n.H, P = n.P, G = n.G, S = n.S;
  const bool reverse = in.reverse;
  const int64_t* len = in.len;
  auto opts = r.dh0.options();
  const T* gout = ptr<T>(in.gout);  // (T, B, P) or nullptr
  const T* x = ptr<T>(in.x);
  const T* c0 = ptr<T>(in.c0);
  const T* w_ih = ptr<T>(in.w_ih);
  const T* w_hh = ptr<T>(in.w_hh);
  const T* w_hr = ptr<T>(in.w_hr);
  const T* act = ptr<T>(in.act);
  const T* hprev = ptr<T>(in.hprev);
  const T* cs = ptr<T>(in.cs);
  const T* hpre = ptr<T>(in.hpre);
  const T* cp = ptr<T>(in.cprev);       // (T, B, H), LSTM with kZone or kPeep
  const T* peep = ptr<T>(in.peep);      // (3, H) with kPeep
  const T* mask = ptr<T>(in.mask);      // (B, P) with kState
  const T* zone_h = ptr<T>(in.zone_h);  // (T, B, P) or (P) with kZone
  const T* zone_c = ptr<T>(in.zone_c);  // (T, B, H) or (H), LSTM with kZone

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
  // (rows[k], k < A, their batch indices): their rows of dgh are gathered in dgs (A, G). Its
  // product dhc (A, P), the gradient reaching the states that entered the step (with state
  // dropout: before the mask, which then multiplies it), is added to their dh.
  Tensor dgs_t = kLen ? at::empty({B, G}, opts) : Tensor();
  Tensor dhc_t = kLen || kState ? at::empty({B, P}, opts) : Tensor();
  T* dgs = kLen ? dgs_t.mutable_data_ptr<T>() : nullptr;
  T* dhc = kLen || kState ? dhc_t.mutable_data_ptr<T>() : nullptr;
  std::vector<int64_t> rows;
  rows.reserve(B);
  active_rows<kLen>(0, len, B, rows);
  Tensor zero_t = at::zeros({std::max(P, H)}, opts);  // stands in for an absent grad_out row
  const T* zero = zero_t.const_data_ptr<T>();
  // Projected LSTM: dht (T*B, P) gradient reaching each projection output; dhs (B, P) this
  // step's; dhp (B, H) the gradient reaching o tanh(c) after the projection.
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
    if constexpr (kLen) active_rows<kLen>(s, len, B, rows);
    const int64_t A = static_cast<int64_t>(rows.size());
    if constexpr (kProj) {
      for (int64_t k = 0; k < A; ++k) {
        const int64_t b = rows[k];
        const int64_t row = time_of<kLen>(s, b, len, T_, reverse) * B + b;
        const T* go = gout ? gout + row * P : zero;
        const T* keep = kZone ? keep_row(zone_h, in.zone_h_step, row) : nullptr;
        T* dh_row = dh + b * P;
        T* dhs_row = dhs + b * P;
        for (int64_t j = 0; j < P; ++j) {
          const T dh_t = dh_row[j] + go[j];
          dhs_row[j] = kZone ? (T(1) - keep[j]) * dh_t : dh_t;
          dh_row[j] = kZone ? keep[j] * dh_t : T(0);
        }
        std::copy(dhs_row, dhs_row + P, dht + row * P);
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
        const T* keep_h = kZone ? keep_row(zone_h, in.zone_h_step, row) : nullptr;
        T* dgh_row = kLen ? dgs + k * G : dgh + row * G;
        if constexpr (kMode == kRnnTanh || kMode == kRnnRelu) {
          rnn_row_backward<T, kMode == kRnnRelu, kZone>(H, act + row * S, go, keep_h, dh + b * H,
                                                        dgh_row);
          if (kLen) std::copy(dgh_row, dgh_row + G, dgi + row * G);
        } else if constexpr (kMode == kGru) {
          gru_row_backward<T, kZone, kState>(H, act + row * S, hprev + row * P, go, keep_h,
                                             dh + b * H, kState ? dhc + k * P : nullptr,
                                             dgi + row * G, dgh_row);
          if (kLen) std::copy(dgh_row, dgh_row + G, dgh + row * G);
        } else {
          // c_{t-1}: saved with zoneout or peepholes; else the new cell state one step earlier
          // in reading order, c0 at the first step.
          const int64_t prev = reverse ? t + 1 : t - 1;
          const T* cprev = kZone || kPeep ? cp + row * H
                           : s == 0       ? c0 + b * H
                                          : cs + (prev * B + b) * H;
          const T* keep_c = kZone ? keep_row(zone_c, in.zone_c_step, row) : nullptr;
          lstm_row_backward<T, kProj, kZone, kPeep>(H, act + row * S, cs + row * H, cprev, peep,
                                                    keep_h, keep_c, kProj ? dhp + b * H : nullptr,
                                                    go, dh + b * H, dc + b * H, dgh_row);
          if (kLen) std::copy(dgh_row, dgh_row + G, dgi + row * G);
        }
      }
    });
    // This step's gate gradients of the A active sequences: dga (A, G).
    const T* dga = kLen ? dgs : dgh + (reverse ? T_ - 1 - s : s) * B * G;
    if constexpr (kState) {
      // dhc (A, P) = dga (A, G) . w_hh (G, P) [+ the GRU's z * h term, there already], the
      // gradient reaching h * mask; dh += mask * dhc on the active rows.
      const T beta = kMode == kGru ? T(1) : T(0);
      if (A == B) {
        hh.run(dga, G, beta, dhc, P);
      } else {
        gemm<T>(false, false, A, P, G, T(1), dga, G, w_hh, P, beta, dhc, P);
      }
      for (int64_t k = 0; k < A; ++k) {
        T* dh_row = dh + rows[k] * P;
        const T* m_row = mask + rows[k] * P;
        const T* dhc_row = dhc + k * P;
        for (int64_t j = 0; j < P; ++j) dh_row[j] += m_row[j] * dhc_row[j];
      }
    } else if (!kLen || A == B) {
      // dh (B, P) += dga (B, G) . w_hh (G, P): every sequence is active, rows[k] = k
      hh.run(dga, G, T(1), dh, P);
    } else {
      // dhc (A, P) = dga (A, G) . w_hh (G, P), added to the active rows of dh
      gemm<T>(false, false, A, P, G, T(1), dga, G, w_hh, P, T(0), dhc, P);
      for (int64_t k = 0; k < A; ++k) {
        T* dh_row = dh + rows[k] * P;
        const T* dhc_row = dhc + k * P;
        for (int64_t j = 0; j < P; ++j) dh_row[j] += dhc_row[j];
      }
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
  if constexpr (kPeep) {
    // dpeep (3, H): dw_ci = sum over (t, b) of di' * c_{t-1}, dw_cf of df' * c_{t-1}, dw_co of
    // do' * c_t (di', df', do' the gate pre-activation gradients in dgi (T*B, G); padded rows
    // are zero), one pass over all steps; each thread sums its own units j.
    using acc_t = at::acc_type<T, false>;
    T* dpeep = r.dpeep.mutable_data_ptr<T>();
    at::parallel_for(0, H, 64, [&](int64_t j0, int64_t j1) {
      std::vector<acc_t> ci(j1 - j0, acc_t(0)), cf(j1 - j0, acc_t(0)), co(j1 - j0, acc_t(0));
      for (int64_t row = 0; row < TB; ++row) {
        const T* dg = dgi + row * G;
        const T* c_prev = cp + row * H;
        const T* c_new = cs + row * H;
        for (int64_t j = j0; j < j1; ++j) {
          ci[j - j0] += acc_t(dg[j]) * acc_t(c_prev[j]);
          cf[j - j0] += acc_t(dg[H + j]) * acc_t(c_prev[j]);
          co[j - j0] += acc_t(dg[3 * H + j]) * acc_t(c_new[j]);
        }
      }
      for (int64_t j = j0; j < j1; ++j) {
        dpeep[j] = static_cast<T>(ci[j - j0]);
        dpeep[H + j] = static_cast<T>(cf[j - j0]);
        dpeep[2 * H + j] = static_cast<T>(co[j - j0]);
      }
    });
  }
}

template <typename T>
bool backward_new(int64_t mode, int flags, const Shape& n, const BackwardIn& in,
                  BackwardOut& r) {
  if (mode != kRnnTanh && mode != kRnnRelu) return false;
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
  } else {
    run_backward<RnnRelu, T>(v, a);
  }
  return true;
}

template <typename T>
void backward_mode(int64_t mode, int flags, const Shape& n, const BackwardIn& in,
                   BackwardOut& r) {
  if (backward_new<T>(mode, flags, n, in, r)) return;
  constexpr int kCell = kLengths | kStateDrop | kZoneout;
  auto run = [&](auto mode_c) {
    constexpr int64_t kMode = decltype(mode_c)::value;
    constexpr int kUsed = kMode == kLstm ? kCell | kProjection | kPeephole : kCell;
    with_flags<kUsed>(flags, [&](auto f) { backward_impl<T, kMode, decltype(f)::value>(n, in, r); });
  };
  switch (mode) {
    case kRnnTanh:
      run(std::integral_constant<int64_t, kRnnTanh>{});
      break;
    case kRnnRelu:
      run(std::integral_constant<int64_t, kRnnRelu>{});
      break;
    case kLstm:
      run(std::integral_constant<int64_t, kLstm>{});
      break;
    default:
      run(std::integral_constant<int64_t, kGru>{});
  }
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
