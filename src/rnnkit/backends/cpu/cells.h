// The cells of rnnkit's fused kernels, as policies of the drivers (driver.h): the Elman RNN (tanh,
// relu), the LSTM (plain, projected, peephole), the GRU and the layer-normalised LSTM and GRU.
// Each keeps its forward row pass and, beside it, the mirrored backward row pass: one derivative
// per line, named d<var>. The equations are functional.py's.
//
// A policy states its facts (the cell table's: kernel id, gates, saved width, weights in kernel
// order) and provides
//   Params<T>(w, dim, eps)   its weights as the row passes read them, built once per call;
//   prepare                before the steps, on the input projection of every step (LayerNorm:
//                          normalise it; the others: nothing);
//   forward_row            one sequence at one step, after the step's recurrent GEMM;
//   backward_row           its mirror: writes the gradients of the pre-activations and leaves in
//                          dh the part of dh_{t-1} that bypasses w_hh and the state dropout mask;
//   Grads<T>               per-step gradients of its own (LayerNorm), and
//   finish                 after the steps: the gradients of its own weights (biases, peepholes,
//                          LayerNorm gains and biases).
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
  const T* hin = nullptr;     // (P) the state entering the step (times the state dropout mask)
  const T* keep_h = nullptr;  // (P) zoneout's keep weights for h [kZone]
  const T* keep_c = nullptr;  // (H) and for c [kZone, a cell state]
  T* h = nullptr;    // (H) the state, updated in place; projected LSTM: the projection's input
  T* c = nullptr;    // (H) the cell state, updated in place [a cell state]
  T* out = nullptr;  // (P) the output at t (a projected LSTM's is written after the projection)
  T* tmp = nullptr;  // (H) scratch [Cell::kRowScratch]
};

// What the backward driver hands a row pass.
template <typename T>
struct BackwardRow {
  int64_t row = 0;
  const T* gout = nullptr;    // (P) the gradient reaching the output at t (zeros when none)
  const T* keep_h = nullptr;  // as forward
  const T* keep_c = nullptr;
  const T* cprev = nullptr;   // (H) c_{t-1} [a cell state]
  const T* dhp = nullptr;     // (H) projected LSTM: the gradient reaching o tanh(c_t) through
                              // the projection (zoneout on h and gout are taken apart before it)
  T* dh = nullptr;    // (P) in: the gradient reaching h_t from later steps; out: the part of
                      // dh_{t-1} that bypasses w_hh and the state dropout mask (zoneout's keep
                      // part and, without state dropout, the cell's direct term)
  T* dhin = nullptr;  // (P) with state dropout: receives the cell's direct term [kDirect]
  T* dc = nullptr;    // (H) in: the gradient reaching c_t; out: reaching c_{t-1}
  T* dgi = nullptr;   // (G) the gradient of the input side of the pre-activations [kSplit]
  T* dg = nullptr;    // (G) the gradient of W_hh hin, what the recurrent GEMM multiplies (and,
                      // unless kSplit, of the input side too)
};

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
  static constexpr bool kDirect = false;  // h_{t-1} reaches h_t other than through w_hh
  static constexpr int64_t kRowScratch = 0;  // the row pass's scratch, in units of H
  // Whether the forward saves c_{t-1} (kCprev), with or without zoneout.
  static constexpr bool saves_cprev(bool) { return false; }

  template <typename T>
  struct Grads {
    Grads(const Shape&, bool) {}
  };

  template <typename T, bool kLen, bool kSave, typename ParamsT>
  static void prepare(const Shape&, const int64_t*, const ParamsT&, T*, const Saved<T>&) {}

  // db_ih (G) = the sum over all steps of dgi, db_hh of dgh: a GEMM with a row of ones each.
  template <typename T, bool kLen, typename ParamsT, typename GradsT>
  static void finish(const ParamsT&, const BackwardArgs<T>& a, T* dgi, const T* dgh, GradsT&) {
    if (!a.dw[kBiasIh]) return;
    const int64_t TB = a.n.T * a.n.B, G = a.n.G;
    Buffer<T> ones_t(TB);
    T* ones = ones_t.data();
    std::fill_n(ones, TB, T(1));
    // db (1, G) = ones (1, T*B) . dg (T*B, G)
    gemm<T>(false, false, 1, G, TB, T(1), ones, TB, dgi, G, T(0), a.dw[kBiasIh], G);
    gemm<T>(false, false, 1, G, TB, T(1), ones, TB, dgh, G, T(0), a.dw[kBiasHh], G);
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
  static void forward_row(const Params<T>& p, const ForwardRow<T>& step, const Saved<T>& saved,
                          const Shape& dim) {
    const T* xg = step.xg;
    const T* hg = step.hg;
    const T* b = p.bias.data();
    const T* keep = step.keep_h;
    T* h = step.h;
    T* out = step.out;
    T* act = kSave ? saved.at[kAct] + step.row * dim.S : nullptr;
#pragma omp simd
    for (int64_t j = 0; j < dim.H; ++j) {
      const T pre = xg[j] + hg[j] + b[j];
      const T h_new = kRelu ? (pre > T(0) ? pre : T(0)) : tanh_(pre);
      const T h_t = kZone ? keep[j] * h[j] + (T(1) - keep[j]) * h_new : h_new;
      h[j] = h_t;
      out[j] = h_t;
      if constexpr (kSave) act[j] = h_new;
    }
  }

  template <typename T, bool kZone, bool kState, bool kProj, typename GradsT>
  static void backward_row(const Params<T>&, const BackwardRow<T>& step, const ConstSaved<T>& saved,
                           GradsT&, const Shape& dim) {
    const T* act = saved.at[kAct] + step.row * dim.S;
    const T* gout = step.gout;
    const T* keep = step.keep_h;
    T* dh = step.dh;
    T* dg = step.dg;
#pragma omp simd
    for (int64_t j = 0; j < dim.H; ++j) {
      const T h = act[j];
      const T dht = dh[j] + gout[j];
      const T dh_new = kZone ? (T(1) - keep[j]) * dht : dht;
      const T dpre = kRelu ? (h > T(0) ? dh_new : T(0)) : dh_new * (T(1) - h * h);
      dg[j] = dpre;
      dh[j] = kZone ? keep[j] * dht : T(0);
    }
  }
};

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
        : bias(summed_biases(w, dim.G)), w_ci(w[kWeightCi]), w_cf(w[kWeightCf]), w_co(w[kWeightCo]) {}
    std::vector<T> bias;            // (G) b_ih + b_hh
    const T *w_ci, *w_cf, *w_co;  // (H) each [kPeep]
  };

  // c holds c_{t-1} and receives c_t. Without a projection h (the state) receives h_new and out
  // the same; with one, h is the projection's input row and receives h_new (zoneout on h and
  // out come after the projection).
  template <typename T, bool kSave, bool kZone, bool kProj>
  static void forward_row(const Params<T>& p, const ForwardRow<T>& step, const Saved<T>& saved,
                          const Shape& dim) {
    const int64_t H = dim.H;
    const T* xg = step.xg;
    const T* hg = step.hg;
    const T* b = p.bias.data();
    const T* w_ci = p.w_ci;
    const T* w_cf = p.w_cf;
    const T* w_co = p.w_co;
    const T* keep_h = step.keep_h;
    const T* keep_c = step.keep_c;
    T* c = step.c;
    T* h = step.h;
    T* out = step.out;
    T* act = kSave ? saved.at[kAct] + step.row * dim.S : nullptr;
    T* cs = kSave ? saved.at[kC] + step.row * H : nullptr;
    T* cp = kSave && saves_cprev(kZone) ? saved.at[kCprev] + step.row * H : nullptr;
    T* hpre = kSave && kProj ? saved.at[kHpre] + step.row * H : nullptr;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const T c_old = c[j];
      T pi = xg[j] + hg[j] + b[j];
      T pf = xg[H + j] + hg[H + j] + b[H + j];
      T po = xg[3 * H + j] + hg[3 * H + j] + b[3 * H + j];
      if constexpr (kPeep) {
        pi += w_ci[j] * c_old;
        pf += w_cf[j] * c_old;
      }
      const T i = sigmoid(pi);
      const T f = sigmoid(pf);
      const T g = tanh_(xg[2 * H + j] + hg[2 * H + j] + b[2 * H + j]);
      const T c_new = f * c_old + i * g;
      if constexpr (kPeep) po += w_co[j] * c_new;
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
        if constexpr (saves_cprev(kZone)) cp[j] = c_old;
      }
    }
  }

  // dc holds the gradient reaching c_t and receives the one reaching c_{t-1}.
  template <typename T, bool kZone, bool kState, bool kProj, typename GradsT>
  static void backward_row(const Params<T>& p, const BackwardRow<T>& step, const ConstSaved<T>& saved,
                           GradsT&, const Shape& dim) {
    const int64_t H = dim.H;
    const T* act = saved.at[kAct] + step.row * dim.S;
    const T* cs = saved.at[kC] + step.row * H;
    const T* cprev = step.cprev;
    const T* w_ci = p.w_ci;
    const T* w_cf = p.w_cf;
    const T* w_co = p.w_co;
    const T* keep_h = step.keep_h;
    const T* keep_c = step.keep_c;
    const T* dhp = step.dhp;
    const T* gout = step.gout;
    T* dh = step.dh;
    T* dc = step.dc;
    T* dg = step.dg;
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
      if constexpr (kPeep) dc_new += dop * w_co[j];
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
      if constexpr (kPeep) dc_old += dip * w_ci[j] + dfp * w_cf[j];
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
  static constexpr bool kSplit = true, kDirect = true;
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

  // hin: the state that entered the step (after state dropout); h holds h_{t-1} and receives h_t.
  template <typename T, bool kSave, bool kZone, bool kProj>
  static void forward_row(const Params<T>& p, const ForwardRow<T>& step, const Saved<T>& saved,
                          const Shape& dim) {
    const int64_t H = dim.H;
    const T* xg = step.xg;
    const T* hg = step.hg;
    const T* b = p.bias.data();
    const T* bhn = p.bhn.data();
    const T* hin = step.hin;
    const T* keep = step.keep_h;
    T* h = step.h;
    T* out = step.out;
    T* act = kSave ? saved.at[kAct] + step.row * dim.S : nullptr;
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

  // dgi: the gradient of the input pre-activations (r z n); dg: of W_hh hin + b_hh (r z hn).
  // The direct term z * dh_new (through h_t = ... + z hin) goes to dhin with state dropout (to
  // be masked with the GEMM's result), else into dh.
  template <typename T, bool kZone, bool kState, bool kProj, typename GradsT>
  static void backward_row(const Params<T>&, const BackwardRow<T>& step, const ConstSaved<T>& saved,
                           GradsT&, const Shape& dim) {
    const int64_t H = dim.H;
    const T* act = saved.at[kAct] + step.row * dim.S;
    const T* hin = saved.at[kHprev] + step.row * dim.P;
    const T* gout = step.gout;
    const T* keep = step.keep_h;
    T* dh = step.dh;
    T* dhin = step.dhin;
    T* dgi = step.dgi;
    T* dgh = step.dg;
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
  const T *wx, *wh;     // (G) the input-side and recurrent gains
  const T *wc, *bc;     // (H) the cell-state LayerNorm's gain and bias [LSTM]
  std::vector<T> xbias;  // (G) ln_ih_b + b_ih [+ ln_hh_b + b_hh: fold]
  std::vector<T> hbias;  // (G) ln_hh_b + b_hh
};

struct LayerNormCell : CellBase {
  static constexpr bool kLayerNorm = true, kSplit = true;

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

struct LayerNormLstm : LayerNormCell {
  static constexpr int64_t kId = 5;
  static constexpr const char* kName = "LayerNorm LSTM";
  static constexpr int64_t kGates = 4, kSaved = 4;
  static constexpr bool kCellState = true;
  static constexpr int64_t kRowScratch = 1;
  static constexpr SlotList kWeights = {10, {kWeightIh, kWeightHh, kBiasIh, kBiasHh, kLnIhWeight,
                                             kLnIhBias, kLnHhWeight, kLnHhBias, kLnCWeight,
                                             kLnCBias}};
  static constexpr bool saves_cprev(bool zoneout) { return zoneout; }

  template <typename T>
  struct Params : LayerNormParams<T> {
    Params(const T* const* w, const Shape& dim, T eps) : LayerNormParams<T>(w, dim, eps, true) {}
  };

  // dcl (T*B, H): the gradient of the cell LayerNorm's output, for its gain and bias.
  template <typename T>
  struct Grads {
    Grads(const Shape& dim, bool zeroed) : dcl(dim.T * dim.B * dim.H, zeroed) {}
    Buffer<T> dcl;
  };

  // pre = xl + wh * LN(hw), xl = wx * xhat + xbias (every bias is in xbias). out holds o until
  // the cell state's moments are known; cn receives c_t before zoneout (c itself without it).
  template <typename T, bool kSave, bool kZone, bool kProj>
  static void forward_row(const Params<T>& p, const ForwardRow<T>& step, const Saved<T>& saved,
                          const Shape& dim) {
    const int64_t H = dim.H, G = dim.G, row = step.row;
    const T eps = p.eps;
    const T* xhat = step.xg;
    const T* hw = step.hg;
    const T* wx = p.wx;
    const T* xb = p.xbias.data();
    const T* wh = p.wh;
    const T* wc = p.wc;
    const T* bc = p.bc;
    const T* keep_h = step.keep_h;
    const T* keep_c = step.keep_c;
    T* c = step.c;
    T* h = step.h;
    T* out = step.out;
    T* act = kSave ? saved.at[kAct] + row * dim.S : nullptr;
    T* cs = kSave ? saved.at[kC] + row * H : nullptr;
    T* cp = kSave && kZone ? saved.at[kCprev] + row * H : nullptr;
    T* hhat = kSave ? saved.at[kHhat] + row * G : nullptr;
    T* chat = kSave ? saved.at[kChat] + row * H : nullptr;
    T* rstd = kSave ? saved.at[kRstd] + row * kStats : nullptr;
    T* cn = !kZone ? c : kSave ? cs : step.tmp;
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

  // dgi receives the gradients of the pre-activations (dxl, which is dhl too); dcl of the cell
  // LayerNorm's output; dg of W_hh h_{t-1}, through the recurrent LayerNorm.
  template <typename T, bool kZone, bool kState, bool kProj>
  static void backward_row(const Params<T>& p, const BackwardRow<T>& step, const ConstSaved<T>& saved,
                           Grads<T>& grads, const Shape& dim) {
    const int64_t H = dim.H, G = dim.G, row = step.row;
    const T* act = saved.at[kAct] + row * dim.S;
    const T* chat = saved.at[kChat] + row * H;
    const T* hhat = saved.at[kHhat] + row * G;
    const T* rstd = saved.at[kRstd] + row * kStats;
    const T* cprev = step.cprev;
    const T* wh = p.wh;
    const T* wc = p.wc;
    const T* bc = p.bc;
    const T* keep_h = step.keep_h;
    const T* keep_c = step.keep_c;
    const T* gout = step.gout;
    T* dh = step.dh;
    T* dc = step.dc;
    T* dg = step.dgi;
    T* dcl = grads.dcl.data() + row * H;
    const T rstd_c = rstd[2];
    // Through h_t = o tanh(cl), cl = wc * chat + bc: the output gate and the cell LayerNorm's
    // output.
    T sum = T(0), dot = T(0);
#pragma omp simd reduction(+ : sum, dot)
    for (int64_t j = 0; j < H; ++j) {
      const T o = act[3 * H + j];
      const T tc = tanh_(wc[j] * chat[j] + bc[j]);
      const T dht = dh[j] + gout[j];
      const T dh_new = kZone ? (T(1) - keep_h[j]) * dht : dht;
      const T d_o = dh_new * tc;
      const T dclj = dh_new * o * (T(1) - tc * tc);
      dh[j] = kZone ? keep_h[j] * dht : T(0);
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
    layer_norm_backward(4 * H, dg, wh, hhat, rstd[1], step.dg);
  }

  // The gains and biases; the cell LayerNorm's from dcl.
  template <typename T, bool kLen>
  static void finish(const Params<T>& p, const BackwardArgs<T>& a, T* dgi, const T*,
                     Grads<T>& grads) {
    const int64_t TB = a.n.T * a.n.B, H = a.n.H;
    column_sums<T>(TB, H, grads.dcl.data(), a.saved.at[kChat], a.dw[kLnCWeight]);
    column_sums<T>(TB, H, grads.dcl.data(), nullptr, a.dw[kLnCBias]);
    finish_norms<T>(p, a, dgi, dgi);
  }
};

// LayerNorm GRU: (x_r, x_z, x_n) = LN(W_ih x_t) + b_ih; (h_r, h_z, h_n) = LN(W_hh h_{t-1}) + b_hh;
// r = sigmoid(x_r + h_r); z = sigmoid(x_z + h_z); n = tanh(x_n + r h_n); h_t = (1 - z) n + z h_{t-1}.
// Saves act = r z n hn (hn = h_n), xhat, hhat, rstd.

struct LayerNormGru : LayerNormCell {
  static constexpr int64_t kId = 6;
  static constexpr const char* kName = "LayerNorm GRU";
  static constexpr int64_t kGates = 3, kSaved = 4;
  static constexpr bool kDirect = true;
  static constexpr SlotList kWeights = {
      8, {kWeightIh, kWeightHh, kBiasIh, kBiasHh, kLnIhWeight, kLnIhBias, kLnHhWeight, kLnHhBias}};

  template <typename T>
  struct Params : LayerNormParams<T> {
    Params(const T* const* w, const Shape& dim, T eps) : LayerNormParams<T>(w, dim, eps, false) {}
  };

  // dhl (T*B, G): the gradient of the recurrent side after its LayerNorm, for its gain and bias.
  template <typename T>
  struct Grads {
    Grads(const Shape& dim, bool zeroed) : dhl(dim.T * dim.B * dim.G, zeroed) {}
    Buffer<T> dhl;
  };

  // hl = wh * LN(hw) + hbias; r, z = sigmoid(xl + hl); n = tanh(xl_n + r hl_n); hin: the state
  // entering the step; h: the state, updated in place.
  template <typename T, bool kSave, bool kZone, bool kProj>
  static void forward_row(const Params<T>& p, const ForwardRow<T>& step, const Saved<T>& saved,
                          const Shape& dim) {
    const int64_t H = dim.H, G = dim.G, row = step.row;
    const T* xhat = step.xg;
    const T* hw = step.hg;
    const T* wx = p.wx;
    const T* xb = p.xbias.data();
    const T* wh = p.wh;
    const T* hb = p.hbias.data();
    const T* hin = step.hin;
    const T* keep = step.keep_h;
    T* h = step.h;
    T* out = step.out;
    T* act = kSave ? saved.at[kAct] + row * dim.S : nullptr;
    T* hhat = kSave ? saved.at[kHhat] + row * G : nullptr;
    T* rstd = kSave ? saved.at[kRstd] + row * kStats : nullptr;
    T mean_h, rstd_h;
    moments(3 * H, hw, p.eps, mean_h, rstd_h);
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

  // dgi receives the gradient of the input side (dxl), dhl of the recurrent side after its
  // LayerNorm, dg of W_hh h_{t-1} through it; the direct term z * dh_new as the GRU's.
  template <typename T, bool kZone, bool kState, bool kProj>
  static void backward_row(const Params<T>& p, const BackwardRow<T>& step, const ConstSaved<T>& saved,
                           Grads<T>& grads, const Shape& dim) {
    const int64_t H = dim.H, G = dim.G, row = step.row;
    const T* act = saved.at[kAct] + row * dim.S;
    const T* hin = saved.at[kHprev] + row * dim.P;
    const T* hhat = saved.at[kHhat] + row * G;
    const T* rstd = saved.at[kRstd] + row * kStats;
    const T* keep = step.keep_h;
    const T* gout = step.gout;
    T* dh = step.dh;
    T* dhin = step.dhin;
    T* dxl = step.dgi;
    T* dhl = grads.dhl.data() + row * G;
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
      dxl[j] = drp;
      dxl[H + j] = dzp;
      dxl[2 * H + j] = dnp;
      dhl[j] = drp;
      dhl[H + j] = dzp;
      dhl[2 * H + j] = dnp * r;
      if constexpr (kState) {
        dhin[j] = dhz;
        dh[j] = kZone ? keep[j] * dht : T(0);
      } else {
        dh[j] = kZone ? keep[j] * dht + dhz : dhz;
      }
    }
    // The recurrent LayerNorm: hl = wh * hhat + hbias.
    layer_norm_backward(3 * H, dhl, p.wh, hhat, rstd[1], step.dg);
  }

  template <typename T, bool kLen>
  static void finish(const Params<T>& p, const BackwardArgs<T>& a, T* dgi, const T*,
                     Grads<T>& grads) {
    finish_norms<T>(p, a, dgi, grads.dhl.data());
  }
};

}  // namespace cpu
}  // namespace rnnkit
