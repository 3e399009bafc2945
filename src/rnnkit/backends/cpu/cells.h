// The cells of rnnkit's fused kernels, as policies of the drivers (driver.h): the Elman RNN (tanh,
// relu), the LSTM (plain, projected, peephole), the GRU and the layer-normalised LSTM and GRU.
// Each keeps its forward row pass and, beside it, the mirrored backward row pass: one derivative
// per line, named d<var>. The equations are functional.py's.
//
// A policy states its facts (the cell table's: kernel id, gates, saved width, weights in kernel
// order) and provides
//   Params<T>(w, dim, eps)  its weights as the row passes read them, built once per call;
//   prepare                 before the steps, on the input projection of every step (LayerNorm:
//                           normalise it; the others: nothing);
//   forward_row             one sequence at one step, after the step's recurrent GEMM;
//   backward_row            its mirror: writes the gradients of the pre-activations and leaves in
//                           dh the part of dh_{t-1} that bypasses w_hh and the state dropout mask;
//   Grads<T>                per-step gradients of its own (LayerNorm), and
//   finish                  after the steps: the gradients of its own weights (biases, peepholes,
//                           LayerNorm gains and biases).
// Shapes are kernels.h's: T, B, I, H, P, G, S; j runs over the H units of a row.
#pragma once

#include <cstdint>
#include <vector>

#include "kernel_common.h"
#include "kernels.h"

namespace rnnkit {
namespace cpu {

// What the forward driver hands a row pass: sequence b at one step, reading time t.
template <typename T>
struct ForwardRow {
  int64_t row = 0;            // t * B + b: the row of the (T, B, .) arrays
  const T* xg = nullptr;      // (G) the input side of the pre-activations: W_ih x_t (normalised
                              // by a LayerNorm cell)
  const T* hg = nullptr;      // (G) W_hh hin, from this step's recurrent GEMM
  const T* hin = nullptr;     // (P) the state the recurrent GEMM read (times the state dropout
                              // mask); h holds it unmasked
  const T* keep_h = nullptr;  // (P) zoneout's keep weights for h [kZone]
  const T* keep_c = nullptr;  // (H) and for c [kZone, a cell state]
  T* h = nullptr;    // (H) the state, updated in place; projected LSTM: the projection's input
  T* c = nullptr;    // (H) the cell state, updated in place [a cell state]
  T* out = nullptr;  // (P) the output at t (a projected LSTM's is written after the projection)
  T* act = nullptr;  // (S) the saved activations of the row [kSave]
  T* tmp = nullptr;  // (H) scratch [Cell::kRowScratch]
};

// h_t of unit j from h_new, to the state and the output: with zoneout
// keep_h * h_{t-1} + (1 - keep_h) * h_new.
template <bool kZone, typename T>
RNNKIT_INLINE void emit(const ForwardRow<T>& step, int64_t j, T h_new) {
  const T h_t = kZone ? step.keep_h[j] * step.h[j] + (T(1) - step.keep_h[j]) * h_new : h_new;
  step.h[j] = h_t;
  step.out[j] = h_t;
}

// What the backward driver hands a row pass.
template <typename T>
struct BackwardRow {
  int64_t row = 0;
  const T* gout = nullptr;    // (P) the gradient reaching the output at t (zeros when none)
  const T* keep_h = nullptr;  // as forward
  const T* keep_c = nullptr;
  const T* act = nullptr;     // (S) the activations the forward saved for the row
  const T* hin = nullptr;     // (P) the state that entered the step (saved hprev, unmasked)
  const T* cprev = nullptr;   // (H) c_{t-1} [a cell state]
  const T* dhp = nullptr;     // (H) projected LSTM: the gradient reaching o tanh(c_t) through
                              // the projection (zoneout on h and gout are taken apart before it)
  T* dh = nullptr;    // (P) in: the gradient reaching h_t from later steps; out: the part of
                      // dh_{t-1} that bypasses w_hh and the state dropout mask (zoneout's keep
                      // part and a GRU's direct term z * dh_t)
  T* dc = nullptr;    // (H) in: the gradient reaching c_t; out: reaching c_{t-1}
  T* dgi = nullptr;   // (G) the gradient of the input side of the pre-activations [kSplit]
  T* dg = nullptr;    // (G) the gradient of W_hh hin, what the recurrent GEMM multiplies (and,
                      // unless kSplit, of the input side too)
};

// The mirror of emit: dh_t = dh + gout reaches h_t; zoneout's keep_h * dh_t goes on to h_{t-1}
// (left in dh; 0 without zoneout) and the rest, returned, reaches h_new.
template <bool kZone, typename T>
RNNKIT_INLINE T receive(const BackwardRow<T>& step, int64_t j) {
  const T dht = step.dh[j] + step.gout[j];
  step.dh[j] = kZone ? step.keep_h[j] * dht : T(0);
  return kZone ? (T(1) - step.keep_h[j]) * dht : dht;
}

// The weights a cell takes, in the cell table's order: the first `count` of `at`.
struct SlotList {
  int count;
  Slot at[kSlots];
};

// b_ih + b_hh (G), zero without biases; the last `apart` entries of b_hh left out (the GRU's
// b_hn, which its reset gate scales).
template <typename T>
std::vector<T> summed_biases(const T* const* w, int64_t G, int64_t apart = 0) {
  std::vector<T> bias(G, T(0));
  const T* b_ih = w[kBiasIh];
  const T* b_hh = w[kBiasHh];
  for (int64_t j = 0; j < G; ++j) {
    if (b_ih) bias[j] = b_ih[j];
    if (b_hh && j < G - apart) bias[j] += b_hh[j];
  }
  return bias;
}

// What a cell without cell state, projection, LayerNorm or weights of its own has.
struct CellBase {
  static constexpr bool kCellState = false;   // its states are (h, c)
  static constexpr bool kProjection = false;  // it may be projected (w_hr)
  static constexpr bool kPeephole = false;
  static constexpr bool kLayerNorm = false;
  static constexpr bool kSplit = false;   // dgh (of W_hh hin) differs from dgi (of the input side)
  static constexpr int64_t kRowScratch = 0;  // the row pass's scratch, in units of H
  // Whether the forward saves c_{t-1} (kCprev), with or without zoneout.
  static constexpr bool saves_cprev(bool) { return false; }

  template <typename T>
  struct Grads {
    Grads(const Shape&, bool) {}
  };

  template <typename T, bool kLen, bool kSave, typename ParamsT>
  static void prepare(const Shape&, const int64_t*, const ParamsT&, T*, const Saved<T>&) {}

  // db_ih (G) = the sum over all steps of dgi, db_hh of dgh: a GEMM with a row of ones each (one,
  // copied, where dgh is dgi).
  template <typename T, bool kLen, typename ParamsT, typename GradsT>
  static void finish(const ParamsT&, const BackwardArgs<T>& a, T* dgi, const T* dgh, GradsT&) {
    if (!a.dw[kBiasIh]) return;
    const int64_t TB = a.n.T * a.n.B, G = a.n.G;
    Buffer<T> ones_t(TB);
    T* ones = ones_t.data();
    std::fill_n(ones, TB, T(1));
    // db (1, G) = ones (1, T*B) . dg (T*B, G)
    const GemmPlan plan = in_fp32(a.gemm);
    gemm<T>(plan, kBulk, false, false, 1, G, TB, T(1), ones, TB, dgi, G, T(0), a.dw[kBiasIh], G);
    if (dgh == dgi) {
      std::copy(a.dw[kBiasIh], a.dw[kBiasIh] + G, a.dw[kBiasHh]);
    } else {
      gemm<T>(plan, kBulk, false, false, 1, G, TB, T(1), ones, TB, dgh, G, T(0), a.dw[kBiasHh],
              G);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Elman RNN: h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), act = tanh or relu.
// Saves act = h_new (before zoneout).

template <bool kRelu>
struct Elman : CellBase {
  static constexpr int64_t kId = kRelu ? 1 : 0;
  static constexpr const char* kName = "Elman RNN";
  static constexpr int64_t kGates = 1, kSaved = 1;
  static constexpr SlotList kWeights = {4, {kWeightIh, kWeightHh, kBiasIh, kBiasHh}};

  template <typename T>
  struct Params {
    Params(const T* const* w, const Shape& dim, T) : bias(summed_biases(w, dim.G)) {}
    std::vector<T> bias;  // (G) b_ih + b_hh
  };

  template <typename T, bool kSave, bool kZone, bool kProj>
  static void forward_row(const Params<T>& p, const ForwardRow<T>& step, const Saved<T>&,
                          const Shape& dim) {
    const T* xg = step.xg;
    const T* hg = step.hg;
    const T* b = p.bias.data();
#pragma omp simd
    for (int64_t j = 0; j < dim.H; ++j) {
      const T pre = xg[j] + hg[j] + b[j];
      const T h_new = kRelu ? (pre > T(0) ? pre : T(0)) : tanh_(pre);
      emit<kZone>(step, j, h_new);
      if constexpr (kSave) step.act[j] = h_new;
    }
  }

  template <typename T, bool kZone, bool kProj, typename GradsT>
  static void backward_row(const Params<T>&, const BackwardRow<T>& step, const ConstSaved<T>&,
                           GradsT&, const Shape& dim) {
#pragma omp simd
    for (int64_t j = 0; j < dim.H; ++j) {
      const T h = step.act[j];
      const T dh_new = receive<kZone>(step, j);
      const T dpre = kRelu ? (h > T(0) ? dh_new : T(0)) : dh_new * (T(1) - h * h);
      step.dg[j] = dpre;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// The cell state of an LSTM-family row (the LSTMs and the LayerNorm LSTM): c holds c_{t-1} and
// receives c_t = f c_{t-1} + i g (with zoneout keep_c * c_{t-1} + (1 - keep_c) * c_t); with
// kSave the gates go to act (i f g o), c_t to cs and, with kSaveCprev, c_{t-1} to cp.

template <typename T, bool kSave, bool kZone, bool kSaveCprev>
struct CellState {
  CellState(const ForwardRow<T>& step, const Saved<T>& saved, const Shape& dim)
      : keep_c(step.keep_c),
        c(step.c),
        act(step.act),
        cs(kSave ? saved.at[kC] + step.row * dim.H : nullptr),
        cp(kSave && kSaveCprev ? saved.at[kCprev] + step.row * dim.H : nullptr) {}

  // c_t of unit j from its gates i, f, g (o is saved apart: it may see c_t).
  RNNKIT_INLINE T update(int64_t H, int64_t j, T i, T f, T g) const {
    const T c_old = c[j];
    const T c_new = f * c_old + i * g;
    c[j] = kZone ? keep_c[j] * c_old + (T(1) - keep_c[j]) * c_new : c_new;
    if constexpr (kSave) {
      act[j] = i;
      act[H + j] = f;
      act[2 * H + j] = g;
      cs[j] = c_new;
      if constexpr (kSaveCprev) cp[j] = c_old;
    }
    return c_new;
  }

  RNNKIT_INLINE void save_o(int64_t H, int64_t j, T o) const {
    if constexpr (kSave) act[3 * H + j] = o;
  }

  const T* keep_c;
  T *c, *act, *cs, *cp;
};

// The mirror of CellState::update: from dc_new, the gradient reaching c_t, the gradients of the
// pre-activations of i, f, g to dg (dip and dfp also returned, for the peepholes); returns
// dc_new * f, the gradient reaching c_{t-1} through c_t.
template <typename T>
RNNKIT_INLINE T cell_state_backward(int64_t H, int64_t j, T dc_new, T i, T f, T g, T c_prev, T* dg,
                             T& dip, T& dfp) {
  const T di = dc_new * g;
  const T dgg = dc_new * i;
  const T df = dc_new * c_prev;
  dip = di * i * (T(1) - i);
  dfp = df * f * (T(1) - f);
  dg[j] = dip;
  dg[H + j] = dfp;
  dg[2 * H + j] = dgg * (T(1) - g * g);
  return dc_new * f;
}

// ---------------------------------------------------------------------------------------------
// LSTM: (i, f, g, o) = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh; i, f, o = sigmoid(.), g = tanh(.);
// c_t = f c_{t-1} + i g; h_t = o tanh(c_t), projected: h_t = W_hr (o tanh(c_t)).
// Peephole LSTM (kPeep): i and f see c_{t-1} (+ w_ci * c_{t-1}, + w_cf * c_{t-1}), o sees c_t
// (+ w_co * c_t).
// Saves act = i f g o, c_t (before zoneout), c_{t-1} (with zoneout or peepholes) and, projected,
// hpre = o tanh(c_t).

template <bool kPeep>
struct Lstm : CellBase {
  static constexpr int64_t kId = kPeep ? 4 : 2;
  static constexpr const char* kName = kPeep ? "peephole LSTM" : "LSTM";
  static constexpr int64_t kGates = 4, kSaved = 4;
  static constexpr bool kCellState = true, kProjection = true, kPeephole = kPeep;
  static constexpr SlotList kWeights =
      kPeep ? SlotList{8, {kWeightIh, kWeightHh, kBiasIh, kBiasHh, kWeightCi, kWeightCf,
                           kWeightCo, kWeightHr}}
            : SlotList{5, {kWeightIh, kWeightHh, kBiasIh, kBiasHh, kWeightHr}};
  static constexpr bool saves_cprev(bool zoneout) { return zoneout || kPeep; }

  template <typename T>
  struct Params {
    Params(const T* const* w, const Shape& dim, T)
        : bias(summed_biases(w, dim.G)),
          w_ci(w[kWeightCi]),
          w_cf(w[kWeightCf]),
          w_co(w[kWeightCo]) {}
    std::vector<T> bias;          // (G) b_ih + b_hh
    const T *w_ci, *w_cf, *w_co;  // (H) each [kPeep]
  };

  // Without a projection h (the state) receives h_new and out the same; with one, h is the
  // projection's input row and receives h_new (zoneout on h and out come after the projection).
  template <typename T, bool kSave, bool kZone, bool kProj>
  static void forward_row(const Params<T>& p, const ForwardRow<T>& step, const Saved<T>& saved,
                          const Shape& dim) {
    const int64_t H = dim.H;
    const T* xg = step.xg;
    const T* hg = step.hg;
    const T* b = p.bias.data();
    T* hpre = kSave && kProj ? saved.at[kHpre] + step.row * H : nullptr;
    const CellState<T, kSave, kZone, saves_cprev(kZone)> state(step, saved, dim);
    // Two passes over each block of kBlock units, so that neither chains all five activations:
    // the first computes i, f, g (independent of each other) and c_t, the second o and
    // tanh(c_t) (likewise) and h_t. One pass over all of them is a chain of two activations
    // per unit too long for the core to overlap the next units with it.
    constexpr int64_t kBlock = 64;
    for (int64_t j0 = 0; j0 < H; j0 += kBlock) {
      const int64_t n = std::min(kBlock, H - j0);
      alignas(64) T po_b[kBlock], c_b[kBlock];  // o's pre-activation and c_t of the block
#pragma omp simd
      for (int64_t u = 0; u < n; ++u) {
        const int64_t j = j0 + u;
        const T c_old = state.c[j];
        T pi = xg[j] + hg[j] + b[j];
        T pf = xg[H + j] + hg[H + j] + b[H + j];
        T po = xg[3 * H + j] + hg[3 * H + j] + b[3 * H + j];
        if constexpr (kPeep) {
          pi += p.w_ci[j] * c_old;
          pf += p.w_cf[j] * c_old;
        }
        const T i = sigmoid(pi);
        const T f = sigmoid(pf);
        const T g = tanh_(xg[2 * H + j] + hg[2 * H + j] + b[2 * H + j]);
        const T c_new = state.update(H, j, i, f, g);
        if constexpr (kPeep) po += p.w_co[j] * c_new;
        po_b[u] = po;
        c_b[u] = c_new;
      }
#pragma omp simd
      for (int64_t u = 0; u < n; ++u) {
        const int64_t j = j0 + u;
        const T o = sigmoid(po_b[u]);
        state.save_o(H, j, o);
        const T h_new = o * tanh_(c_b[u]);
        if constexpr (kProj) {
          step.h[j] = h_new;
          if constexpr (kSave) hpre[j] = h_new;
        } else {
          emit<kZone>(step, j, h_new);
        }
      }
    }
  }

  // dc holds the gradient reaching c_t and receives the one reaching c_{t-1}.
  template <typename T, bool kZone, bool kProj, typename GradsT>
  static void backward_row(const Params<T>& p, const BackwardRow<T>& step,
                           const ConstSaved<T>& saved, GradsT&, const Shape& dim) {
    const int64_t H = dim.H;
    const T* act = step.act;  // i f g o
    const T* cs = saved.at[kC] + step.row * H;
    const T* keep_c = step.keep_c;
    T* dc = step.dc;
    T* dg = step.dg;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const T o = act[3 * H + j];
      const T tc = tanh_(cs[j]);
      const T dh_new = kProj ? step.dhp[j] : receive<kZone>(step, j);
      const T dct = dc[j];
      const T d_o = dh_new * tc;
      const T dop = d_o * o * (T(1) - o);
      T dc_new = (kZone ? (T(1) - keep_c[j]) * dct : dct) + dh_new * o * (T(1) - tc * tc);
      if constexpr (kPeep) dc_new += dop * p.w_co[j];
      T dip, dfp;
      T dc_old = cell_state_backward(H, j, dc_new, act[j], act[H + j], act[2 * H + j],
                                     step.cprev[j], dg, dip, dfp);
      dg[3 * H + j] = dop;
      if constexpr (kPeep) dc_old += dip * p.w_ci[j] + dfp * p.w_cf[j];
      dc[j] = kZone ? dc_old + keep_c[j] * dct : dc_old;
    }
  }

  // The biases; with peepholes dw_ci = the sum over (t, b) of di' * c_{t-1}, dw_cf of
  // df' * c_{t-1}, dw_co of do' * c_t (di', df', do': the pre-activation gradients in dgi
  // (T*B, G), zero at padded rows), one pass over all steps; each thread sums its own units j.
  template <typename T, bool kLen, typename GradsT>
  static void finish(const Params<T>& p, const BackwardArgs<T>& a, T* dgi, const T* dgh,
                     GradsT& grads) {
    CellBase::finish<T, kLen>(p, a, dgi, dgh, grads);
    if constexpr (kPeep) {
      const int64_t TB = a.n.T * a.n.B, H = a.n.H, G = a.n.G;
      const T* cp = a.saved.at[kCprev];
      const T* cs = a.saved.at[kC];
      T* dw_ci = a.dw[kWeightCi];
      T* dw_cf = a.dw[kWeightCf];
      T* dw_co = a.dw[kWeightCo];
      parallel_for(H, 64, [&](int64_t j0, int64_t j1) {
        std::vector<double> ci(j1 - j0, 0.0), cf(j1 - j0, 0.0), co(j1 - j0, 0.0);
        for (int64_t row = 0; row < TB; ++row) {
          const T* dg = dgi + row * G;
          const T* c_prev = cp + row * H;
          const T* c_new = cs + row * H;
          for (int64_t j = j0; j < j1; ++j) {
            ci[j - j0] += double(dg[j]) * double(c_prev[j]);
            cf[j - j0] += double(dg[H + j]) * double(c_prev[j]);
            co[j - j0] += double(dg[3 * H + j]) * double(c_new[j]);
          }
        }
        for (int64_t j = j0; j < j1; ++j) {
          dw_ci[j] = static_cast<T>(ci[j - j0]);
          dw_cf[j] = static_cast<T>(cf[j - j0]);
          dw_co[j] = static_cast<T>(co[j - j0]);
        }
      });
    }
  }
};

// ---------------------------------------------------------------------------------------------
// GRU: r = sigmoid(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr), z likewise;
// n = tanh(W_in x_t + b_in + r (W_hn h_{t-1} + b_hn)); h_t = (1 - z) n + z h_{t-1}.
// Saves act = r z n hn (hn = W_hn h_{t-1} + b_hn).

struct Gru : CellBase {
  static constexpr int64_t kId = 3;
  static constexpr const char* kName = "GRU";
  static constexpr int64_t kGates = 3, kSaved = 4;
  static constexpr bool kSplit = true;
  static constexpr SlotList kWeights = {4, {kWeightIh, kWeightHh, kBiasIh, kBiasHh}};

  template <typename T>
  struct Params {
    Params(const T* const* w, const Shape& dim, T)
        : bias(summed_biases(w, dim.G, dim.H)), bhn(dim.H, T(0)) {
      if (w[kBiasHh]) std::copy(w[kBiasHh] + 2 * dim.H, w[kBiasHh] + 3 * dim.H, bhn.begin());
    }
    std::vector<T> bias;  // (G) b_ir + b_hr, b_iz + b_hz, b_in
    std::vector<T> bhn;   // (H) b_hn
  };

  template <typename T, bool kSave, bool kZone, bool kProj>
  static void forward_row(const Params<T>& p, const ForwardRow<T>& step, const Saved<T>&,
                          const Shape& dim) {
    const int64_t H = dim.H;
    const T* xg = step.xg;
    const T* hg = step.hg;
    const T* b = p.bias.data();
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      gates<T, kSave, kZone>(H, j, xg[j] + hg[j] + b[j], xg[H + j] + hg[H + j] + b[H + j],
                             xg[2 * H + j] + b[2 * H + j], hg[2 * H + j] + p.bhn[j], step);
    }
  }

  // The gates of unit j from its pre-activations: pr and pz of r and z, xn and hn the input and
  // recurrent sides of n (the recurrent sides read h_{t-1} after state dropout; the carry
  // z * h_{t-1} reads it unmasked, in step.h before emit overwrites it); h_t out, and with kSave
  // r z n hn to act.
  template <typename T, bool kSave, bool kZone>
  RNNKIT_INLINE static void gates(int64_t H, int64_t j, T pr, T pz, T xn, T hn,
                                  const ForwardRow<T>& step) {
    const T r = sigmoid(pr);
    const T z = sigmoid(pz);
    const T n = tanh_(xn + r * hn);
    emit<kZone>(step, j, (T(1) - z) * n + z * step.h[j]);
    if constexpr (kSave) {
      step.act[j] = r;
      step.act[H + j] = z;
      step.act[2 * H + j] = n;
      step.act[3 * H + j] = hn;
    }
  }

  // dgi: the gradient of the input pre-activations (r z n); dg: of W_hh hin + b_hh (r z hn).
  template <typename T, bool kZone, bool kProj, typename GradsT>
  static void backward_row(const Params<T>&, const BackwardRow<T>& step, const ConstSaved<T>&,
                           GradsT&, const Shape& dim) {
    gates_backward<T, kZone>(dim.H, step, step.dg);
  }

  // The mirror of gates over a row: dgi receives the gradient of the input sides (r z n), dgh of
  // the recurrent sides (r z hn). The direct term z * dh_new (through the carry z * h_{t-1},
  // which no state dropout mask touches) goes into dh.
  template <typename T, bool kZone>
  static void gates_backward(int64_t H, const BackwardRow<T>& step, T* dgh) {
    const T* act = step.act;  // r z n hn
    T* dgi = step.dgi;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const T r = act[j];
      const T z = act[H + j];
      const T n = act[2 * H + j];
      const T hn = act[3 * H + j];
      const T dh_new = receive<kZone>(step, j);
      const T dn = dh_new * (T(1) - z);
      const T dz = dh_new * (step.hin[j] - n);
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
      step.dh[j] += dhz;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// The layer-normalised cells: LN(v; w, b) = w * (v - mean(v)) / sqrt(var(v) + eps) + b over the
// G pre-activations of W_ih x_t (input side: gain wx, bias ln_ih_b) and of W_hh h_{t-1}
// (recurrent side: gain wh, bias ln_hh_b), and for the LSTM over the H cells of c_t. The input
// side is normalised for all steps in one pass before them (prepare; xhat saved), its backward
// done in one pass after them (finish).

template <typename T>
struct LayerNormParams {
  // fold: every bias adds to the pre-activations (the LSTM); else the recurrent side keeps its
  // own (the GRU's reset gate scales the recurrent side of n).
  LayerNormParams(const T* const* w, const Shape& dim, T eps, bool fold)
      : eps(eps),
        wx(w[kLnIhWeight]),
        wh(w[kLnHhWeight]),
        wc(w[kLnCWeight]),
        bc(w[kLnCBias]),
        xbias(dim.G),
        hbias(dim.G) {
    for (int64_t j = 0; j < dim.G; ++j) {
      T x = w[kLnIhBias] ? w[kLnIhBias][j] : T(0);
      T h = w[kLnHhBias] ? w[kLnHhBias][j] : T(0);
      if (w[kBiasIh]) {
        x += w[kBiasIh][j];
        h += w[kBiasHh][j];
      }
      xbias[j] = fold ? x + h : x;
      hbias[j] = h;
    }
  }
  T eps;
  const T *wx, *wh;      // (G) the input-side and recurrent gains
  const T *wc, *bc;      // (H) the cell-state LayerNorm's gain and bias [LSTM]
  std::vector<T> xbias;  // (G) ln_ih_b + b_ih [+ ln_hh_b + b_hh: fold]
  std::vector<T> hbias;  // (G) ln_hh_b + b_hh
};

template <bool kLstm>
struct LayerNormCell : CellBase {
  static constexpr bool kLayerNorm = true, kSplit = true;

  template <typename T>
  struct Params : LayerNormParams<T> {
    Params(const T* const* w, const Shape& dim, T eps) : LayerNormParams<T>(w, dim, eps, kLstm) {}
  };

  // dnorm: the gradient of the output of the LayerNorm whose gain and bias finish sums besides
  // the input side's: the LSTM's cell LayerNorm, dcl (T*B, H); the GRU's recurrent one, dhl
  // (T*B, G).
  template <typename T>
  struct Grads {
    Grads(const Shape& dim, bool zeroed) : dnorm(dim.T * dim.B * (kLstm ? dim.H : dim.G), zeroed) {}
    Buffer<T> dnorm;
  };

  // The input side of pre-activation k: wx * xhat + xbias.
  template <typename T>
  RNNKIT_INLINE static T input_side(const LayerNormParams<T>& p, const ForwardRow<T>& step,
                                    int64_t k) {
    return p.wx[k] * step.xg[k] + p.xbias[k];
  }

  // xhat (T*B, G): W_ih x_t of every step, normalised in place row by row (its rstd saved);
  // padded rows are set to 0.
  template <typename T, bool kLen, bool kSave>
  static void prepare(const Shape& dim, const int64_t* len, const LayerNormParams<T>& p, T* xhat,
                      const Saved<T>& saved) {
    const int64_t B = dim.B, G = dim.G;
    T* rstd = saved.at[kRstd];
    parallel_for(dim.T * B, grain(G), [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        T* v = xhat + row * G;
        if constexpr (kLen) {
          if (row / B >= len[row % B]) {
            std::fill(v, v + G, T(0));
            continue;
          }
        }
        T mean, rs;
        moments(G, v, p.eps, mean, rs);
        if constexpr (kSave) rstd[row * kStats] = rs;
#pragma omp simd
        for (int64_t j = 0; j < G; ++j) v[j] = (v[j] - mean) * rs;
      }
    });
  }

  // The recurrent LayerNorm of a row: the moments of hw = W_hh h_{t-1} (G), the normalised hhat
  // saved (kSave) with its rstd; its backward from dhl, the gradient of wh * hhat + hbias, to
  // the row's dg (the gradient of hw).
  template <typename T>
  struct Recurrent {
    Recurrent(const ForwardRow<T>& step, const Saved<T>& saved, const Shape& dim, T eps)
        : hw(step.hg),
          hhat(saved.at[kHhat] ? saved.at[kHhat] + step.row * dim.G : nullptr),
          rstd_row(saved.at[kRstd] ? saved.at[kRstd] + step.row * kStats : nullptr) {
      moments(dim.G, hw, eps, mean, rstd);
      if (rstd_row) rstd_row[1] = rstd;
    }
    RNNKIT_INLINE T at(int64_t k) const { return (hw[k] - mean) * rstd; }
    const T* hw;
    T* hhat;
    T* rstd_row;
    T mean, rstd;
  };

  template <typename T>
  static void recurrent_backward(const LayerNormParams<T>& p, const BackwardRow<T>& step,
                                 const ConstSaved<T>& saved, const Shape& dim, const T* dhl) {
    layer_norm_backward(dim.G, dhl, p.wh, saved.at[kHhat] + step.row * dim.G,
                        saved.at[kRstd][step.row * kStats + 1], step.dg);
  }

  // The input-side and recurrent gains and biases, summed over all steps: ln_ih_b and b_ih
  // receive dxl (dgi), ln_hh_b and b_hh receive dhl (the LSTM's: dxl again); then dgi becomes
  // dxw, the gradient of W_ih x_t through the input-side LayerNorm (padded rows stay zero).
  template <typename T>
  static void finish_norms(const LayerNormParams<T>& p, const BackwardArgs<T>& a, T* dxl,
                           const T* dhl) {
    const int64_t TB = a.n.T * a.n.B, G = a.n.G;
    const T* xhat = a.saved.at[kXhat];
    const T* rstd = a.saved.at[kRstd];
    column_sums<T>(TB, G, dxl, xhat, a.dw[kLnIhWeight]);
    column_sums<T>(TB, G, dxl, nullptr, a.dw[kLnIhBias]);
    column_sums<T>(TB, G, dhl, a.saved.at[kHhat], a.dw[kLnHhWeight]);
    if (dhl == dxl) {
      std::copy(a.dw[kLnIhBias], a.dw[kLnIhBias] + G, a.dw[kLnHhBias]);
    } else {
      column_sums<T>(TB, G, dhl, nullptr, a.dw[kLnHhBias]);
    }
    if (a.dw[kBiasIh]) {
      std::copy(a.dw[kLnIhBias], a.dw[kLnIhBias] + G, a.dw[kBiasIh]);
      std::copy(a.dw[kLnHhBias], a.dw[kLnHhBias] + G, a.dw[kBiasHh]);
    }
    T* dxw = dxl;
    parallel_for(TB, grain(G), [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row)
        layer_norm_backward(G, dxl + row * G, p.wx, xhat + row * G, rstd[row * kStats],
                            dxw + row * G);
    });
  }
};

// LayerNorm LSTM: (i, f, g, o) = LN(W_ih x_t) + LN(W_hh h_{t-1}) + b_ih + b_hh;
// c_t = f c_{t-1} + i g; h_t = o tanh(LN(c_t)).
// Saves act = i f g o, c_t, xhat, hhat, chat = the normalised c_t, rstd, c_{t-1} with zoneout.

struct LayerNormLstm : LayerNormCell<true> {
  static constexpr int64_t kId = 5;
  static constexpr const char* kName = "LayerNorm LSTM";
  static constexpr int64_t kGates = 4, kSaved = 4;
  static constexpr bool kCellState = true;
  static constexpr int64_t kRowScratch = 1;
  static constexpr SlotList kWeights = {10, {kWeightIh, kWeightHh, kBiasIh, kBiasHh, kLnIhWeight,
                                             kLnIhBias, kLnHhWeight, kLnHhBias, kLnCWeight,
                                             kLnCBias}};
  static constexpr bool saves_cprev(bool zoneout) { return zoneout; }

  // pre = wx * xhat + xbias + wh * LN(hw) (every bias is in xbias). out holds o until the cell
  // state's moments are known; cn receives c_t before zoneout (c itself without it).
  template <typename T, bool kSave, bool kZone, bool kProj>
  static void forward_row(const Params<T>& p, const ForwardRow<T>& step, const Saved<T>& saved,
                          const Shape& dim) {
    const int64_t H = dim.H;
    const Recurrent<T> hl(step, saved, dim, p.eps);
    const CellState<T, kSave, kZone, kZone> state(step, saved, dim);
    T* cn = !kZone ? state.c : kSave ? state.cs : step.tmp;
    T* chat = kSave ? saved.at[kChat] + step.row * H : nullptr;
    T sum_c = T(0);
#pragma omp simd reduction(+ : sum_c)
    for (int64_t j = 0; j < H; ++j) {
      const T hi = hl.at(j);
      const T hf = hl.at(H + j);
      const T hg = hl.at(2 * H + j);
      const T ho = hl.at(3 * H + j);
      const T i = sigmoid(input_side(p, step, j) + p.wh[j] * hi);
      const T f = sigmoid(input_side(p, step, H + j) + p.wh[H + j] * hf);
      const T g = tanh_(input_side(p, step, 2 * H + j) + p.wh[2 * H + j] * hg);
      const T o = sigmoid(input_side(p, step, 3 * H + j) + p.wh[3 * H + j] * ho);
      const T c_new = state.update(H, j, i, f, g);
      state.save_o(H, j, o);
      if constexpr (kZone && !kSave) cn[j] = c_new;
      step.out[j] = o;
      sum_c += c_new;
      if constexpr (kSave) {
        hl.hhat[j] = hi;
        hl.hhat[H + j] = hf;
        hl.hhat[2 * H + j] = hg;
        hl.hhat[3 * H + j] = ho;
      }
    }
    // h_t = o tanh(LN(c_t)): the cell LayerNorm's moments, then h.
    const T mean_c = sum_c / T(H);
    T sq = T(0);
#pragma omp simd reduction(+ : sq)
    for (int64_t j = 0; j < H; ++j) {
      const T d = cn[j] - mean_c;
      sq += d * d;
    }
    const T rstd_c = T(1) / std::sqrt(sq / T(H) + p.eps);
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const T cl = (cn[j] - mean_c) * rstd_c;
      emit<kZone>(step, j, step.out[j] * tanh_(p.wc[j] * cl + p.bc[j]));
      if constexpr (kSave) chat[j] = cl;
    }
    if constexpr (kSave) hl.rstd_row[2] = rstd_c;
  }

  // dgi receives the gradients of the pre-activations (dxl, which is dhl too); dcl of the cell
  // LayerNorm's output; dg of W_hh h_{t-1}, through the recurrent LayerNorm.
  template <typename T, bool kZone, bool kProj>
  static void backward_row(const Params<T>& p, const BackwardRow<T>& step,
                           const ConstSaved<T>& saved, Grads<T>& grads, const Shape& dim) {
    const int64_t H = dim.H;
    const T* act = step.act;  // i f g o
    const T* chat = saved.at[kChat] + step.row * H;
    const T* keep_c = step.keep_c;
    T* dg = step.dgi;
    T* dcl = grads.dnorm.data() + step.row * H;
    const T rstd_c = saved.at[kRstd][step.row * kStats + 2];
    // Through h_t = o tanh(cl), cl = wc * chat + bc: the output gate and the cell LayerNorm's
    // output.
    T sum = T(0), dot = T(0);
#pragma omp simd reduction(+ : sum, dot)
    for (int64_t j = 0; j < H; ++j) {
      const T o = act[3 * H + j];
      const T tc = tanh_(p.wc[j] * chat[j] + p.bc[j]);
      const T dh_new = receive<kZone>(step, j);
      const T d_o = dh_new * tc;
      const T dclj = dh_new * o * (T(1) - tc * tc);
      const T dchat = dclj * p.wc[j];
      dg[3 * H + j] = d_o * o * (T(1) - o);
      dcl[j] = dclj;
      sum += dchat;
      dot += dchat * chat[j];
    }
    const T mean_dchat = sum / T(H), mean_dot = dot / T(H);
    // Through c_t = f c_{t-1} + i g, with the cell LayerNorm's backward.
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const T dchat = dcl[j] * p.wc[j];
      const T dc_t = step.dc[j];
      const T dc_new = kZone ? (T(1) - keep_c[j]) * dc_t : dc_t;
      const T dct = dc_new + rstd_c * (dchat - mean_dchat - chat[j] * mean_dot);
      T dip, dfp;
      const T dc_old = cell_state_backward(H, j, dct, act[j], act[H + j], act[2 * H + j],
                                           step.cprev[j], dg, dip, dfp);
      step.dc[j] = kZone ? dc_old + keep_c[j] * dc_t : dc_old;
    }
    // The recurrent LayerNorm: pre = xl + wh * hhat.
    recurrent_backward(p, step, saved, dim, dg);
  }

  // The gains and biases; the cell LayerNorm's from dcl.
  template <typename T, bool kLen>
  static void finish(const Params<T>& p, const BackwardArgs<T>& a, T* dgi, const T*,
                     Grads<T>& grads) {
    const int64_t TB = a.n.T * a.n.B, H = a.n.H;
    column_sums<T>(TB, H, grads.dnorm.data(), a.saved.at[kChat], a.dw[kLnCWeight]);
    column_sums<T>(TB, H, grads.dnorm.data(), nullptr, a.dw[kLnCBias]);
    finish_norms<T>(p, a, dgi, dgi);
  }
};

// LayerNorm GRU: (x_r, x_z, x_n) = LN(W_ih x_t) + b_ih; (h_r, h_z, h_n) = LN(W_hh h_{t-1}) + b_hh;
// r = sigmoid(x_r + h_r); z = sigmoid(x_z + h_z); n = tanh(x_n + r h_n);
// h_t = (1 - z) n + z h_{t-1}.
// Saves act = r z n hn (hn = h_n), xhat, hhat, rstd.

struct LayerNormGru : LayerNormCell<false> {
  static constexpr int64_t kId = 6;
  static constexpr const char* kName = "LayerNorm GRU";
  static constexpr int64_t kGates = 3, kSaved = 4;
  static constexpr SlotList kWeights = {
      8, {kWeightIh, kWeightHh, kBiasIh, kBiasHh, kLnIhWeight, kLnIhBias, kLnHhWeight, kLnHhBias}};

  // The GRU's gates, its sides xl = wx * xhat + xbias and hl = wh * LN(hw) + hbias.
  template <typename T, bool kSave, bool kZone, bool kProj>
  static void forward_row(const Params<T>& p, const ForwardRow<T>& step, const Saved<T>& saved,
                          const Shape& dim) {
    const int64_t H = dim.H;
    const T* hb = p.hbias.data();
    const Recurrent<T> hl(step, saved, dim, p.eps);
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const T hr = hl.at(j);
      const T hz = hl.at(H + j);
      const T hnn = hl.at(2 * H + j);
      if constexpr (kSave) {
        hl.hhat[j] = hr;
        hl.hhat[H + j] = hz;
        hl.hhat[2 * H + j] = hnn;
      }
      Gru::gates<T, kSave, kZone>(H, j, input_side(p, step, j) + p.wh[j] * hr + hb[j],
                                  input_side(p, step, H + j) + p.wh[H + j] * hz + hb[H + j],
                                  input_side(p, step, 2 * H + j),
                                  p.wh[2 * H + j] * hnn + hb[2 * H + j], step);
    }
    if constexpr (kSave) hl.rstd_row[2] = T(0);  // no cell-state LayerNorm
  }

  // dgi receives the gradient of the input side (dxl), dhl of the recurrent side after its
  // LayerNorm, dg of W_hh h_{t-1} through it; the direct term z * dh_new as the GRU's.
  template <typename T, bool kZone, bool kProj>
  static void backward_row(const Params<T>& p, const BackwardRow<T>& step,
                           const ConstSaved<T>& saved, Grads<T>& grads, const Shape& dim) {
    T* dhl = grads.dnorm.data() + step.row * dim.G;
    Gru::gates_backward<T, kZone>(dim.H, step, dhl);
    recurrent_backward(p, step, saved, dim, dhl);
  }

  template <typename T, bool kLen>
  static void finish(const Params<T>& p, const BackwardArgs<T>& a, T* dgi, const T*,
                     Grads<T>& grads) {
    finish_norms<T>(p, a, dgi, grads.dnorm.data());
  }
};

// ---------------------------------------------------------------------------------------------

// The width of each array a forward of Cell saves (0: not saved), per row of (T, B, width), for a
// call of shape n with or without a projection and zoneout. The op entries allocate by it; the
// row passes write what it names.
template <typename Cell>
constexpr int64_t saved_width(int slot, const Shape& n, bool projection, bool zoneout) {
  switch (slot) {
    case kAct:
      return n.S;
    case kHprev:
      return n.P;
    case kC:
      return Cell::kCellState ? n.H : 0;
    case kCprev:
      return Cell::kCellState && Cell::saves_cprev(zoneout) ? n.H : 0;
    case kHpre:
      return projection ? n.H : 0;
    case kXhat:
    case kHhat:
      return Cell::kLayerNorm ? n.G : 0;
    case kChat:
      return Cell::kLayerNorm && Cell::kCellState ? n.H : 0;
    case kRstd:
      return Cell::kLayerNorm ? kStats : 0;
    default:
      return 0;
  }
}

}  // namespace cpu
}  // namespace rnnkit
