// The one forward driver and the one backward driver of rnnkit's fused recurrent layers, for
// every cell: templated on a cell policy (cells.h) and on named compile-time variants, as haste's
// kernels are. Included by the cell_*.cpp translation units only, each of which compiles the
// drivers of its cells (RNNKIT_INSTANTIATE); ops.cpp calls them through kernels.h.
//
// Forward: one GEMM projects the inputs of all steps (a LayerNorm cell then normalises them in
// one pass); per step, one recurrent GEMM over the sequences still running and one fused pass of
// the cell over each of their rows (Cell::forward_row); a projected LSTM adds the projection's
// GEMM. Backward: the forward read in reverse; per step the cell's mirrored row pass
// (Cell::backward_row) and one GEMM through w_hh; the cell's own weight gradients (biases,
// peepholes, LayerNorm gains: Cell::finish), dx, dw_ih, dw_hh and dw_hr as single GEMMs and
// reductions over all steps at the end. No allocation per step.
//
// A variant that is off costs nothing: kLengths (finished sequences keep their state, and the
// recurrent GEMM runs over the active rows only), kProjection (w_hr), kSaving (the forward keeps
// what backward needs), kStateDropout (the recurrent GEMM reads h_{t-1} * mask; a GRU's carry
// z * h_{t-1} reads the unmasked state), kZoneout (each state becomes keep * previous +
// (1 - keep) * new).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cells.h"
#include "kernel_common.h"
#include "kernels.h"

namespace rnnkit {
namespace cpu {

template <typename Cell, typename T, bool kLengths, bool kProjection, bool kSaving,
          bool kStateDropout, bool kZoneout>
void forward(const ForwardArgs<T>& a) {
  const Shape& n = a.n;
  const int64_t T_ = n.T, B = n.B, I = n.I, H = n.H, P = n.P, G = n.G, TB = n.T * n.B;
  const int64_t* len = a.len;
  const Masks<T>& m = a.masks;
  const Saved<T>& saved = a.saved;
  const typename Cell::template Params<T> p(a.w, n, a.eps);

  // xg (T*B, G) = x (T*B, I) . w_ih^T: the input projection of every step at once. A LayerNorm
  // cell normalises it in place (into the saved xhat when saving).
  Buffer<T> xg_t(saved.at[kXhat] ? 0 : TB * G);
  T* xg = saved.at[kXhat] ? saved.at[kXhat] : xg_t.data();
  // With lengths, over the valid rows alone: xgc (N, G) = xc (N, I) . w_ih^T, xc the valid rows
  // of x, scattered into xg (padded rows are never read; a LayerNorm cell zeroes them).
  const std::vector<int64_t> valid = kLengths ? valid_rows(len, T_, B) : std::vector<int64_t>{};
  const int64_t N = static_cast<int64_t>(valid.size());
  if (kLengths && N < TB) {
    Buffer<T> xc(N * I), xgc(N * G);
    gather_rows(valid, I, a.x, xc.data());
    gemm<T>(a.gemm, kBulk, false, true, N, G, I, T(1), xc.data(), I, a.w[kWeightIh], I, T(0),
            xgc.data(), G);
    scatter_rows(valid, G, xgc.data(), xg);
  } else {
    gemm<T>(a.gemm, kBulk, false, true, TB, G, I, T(1), a.x, I, a.w[kWeightIh], I, T(0), xg, G);
  }
  Cell::template prepare<T, kLengths, kSaving>(n, len, p, xg, saved);

  T* h = a.h;  // (B, P) the state, updated in place
  T* c = a.c;  // (B, H) the cell state, updated in place [a cell state]
  // Projected LSTM: hp (B, H) the projection's input o * tanh(c), hq (B, P) its output.
  Buffer<T> hp_t(kProjection ? B * H : 0, true), hq_t(kProjection ? B * P : 0);
  T* hp = hp_t.data();
  T* hq = hq_t.data();
  Buffer<T> tmp_t(Cell::kRowScratch * B * H);  // (B, H) per row, for the cell's own use
  T* tmp = tmp_t.data();

  // The steps of sequences [b0, b1) (Bs of them): each slice of over_batch on its own thread,
  // or all B at once.
  over_batch(a.gemm.split, B, [&](int64_t b0, int64_t b1) {
    const int64_t Bs = b1 - b0;
    Buffer<T> hg_t(Bs * G);  // (Bs, G) the recurrent projection of this step
    T* hg = hg_t.data();
    const PackedB<T> hh(a.gemm, true, Bs, G, P, a.w[kWeightHh], P);  // op(B) = w_hh^T (P, G)
    // op(B) = w_hr^T (H, P), projected
    const PackedB<T> hr(a.gemm, true, Bs, P, H, a.w[kWeightHr], H);
    // The recurrent GEMM reads hc (A, P), the states entering the step of the A sequences it
    // runs over (rows[k], k < A: their batch indices), when they are not h itself: with lengths
    // while some sequences have finished, and with state dropout (hc = h * mask).
    std::vector<int64_t> rows;
    rows.reserve(Bs);
    active_rows<kLengths>(0, len, b0, b1, rows);
    Buffer<T> hc_t(kLengths || kStateDropout ? Bs * P : 0);
    T* hc = hc_t.data();
    // A step GEMM in bf16 reads its operand rounded by whoever wrote it: hin_h (Bs, P), row k the
    // k-th row the GEMM reads (h[b0 + k], or hc's row k where gathered), rounded by the row pass
    // that wrote h (the state of the next step) or by the gathering below. Not projected (the
    // projection writes h).
    const bool step_half = std::is_same_v<T, float> && !kProjection && hh.takes_half();
    Buffer<std::uint16_t> hin_h(step_half ? Bs * P : 0);
    auto round_state = [&](const T* src, int64_t k) {
      if constexpr (std::is_same_v<T, float>) round_row(P, src, hin_h.data() + k * P);
    };
    if (step_half && !kStateDropout)
      for (int64_t b = b0; b < b1; ++b) round_state(h + b * P, b - b0);
    const int64_t steps = max_length(len ? len + b0 : nullptr, Bs, T_);
    for (int64_t s = 0; s < steps; ++s) {
      if constexpr (kLengths) active_rows<kLengths>(s, len, b0, b1, rows);
      const int64_t A = static_cast<int64_t>(rows.size());
      const bool gathered = kStateDropout || (kLengths && A < Bs);
      if (gathered) {
        for (int64_t k = 0; k < A; ++k) {
          const T* h_row = h + rows[k] * P;
          T* hc_row = hc + k * P;
          if constexpr (kStateDropout) {
            const T* m_row = m.mask + rows[k] * P;
#pragma omp simd
            for (int64_t j = 0; j < P; ++j) hc_row[j] = h_row[j] * m_row[j];
          } else {
            std::copy(h_row, h_row + P, hc_row);
          }
          if (step_half) round_state(hc_row, k);
        }
      }
      const std::uint16_t* hin_half = step_half ? hin_h.data() : nullptr;
      if (A == Bs) {
        // hg (Bs, G) = h or hc (Bs, P) . w_hh^T
        hh.run(gathered ? hc : h + b0 * P, P, T(0), hg, G, hin_half);
      } else {
        // hg (A, G) = hc (A, P) . w_hh^T, on the weight as prepared for the step
        hh.run_rows(A, hc, P, T(0), hg, G, hin_half);
      }
      parallel_for(A, grain(G), [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t b = rows[k];
          ForwardRow<T> r;
          r.row = time_of<kLengths>(s, b, len, T_, a.reverse) * B + b;
          r.xg = xg + r.row * G;
          r.hg = hg + k * G;
          r.hin = gathered ? hc + k * P : h + b * P;
          // h_{t-1} unmasked: the backward masks it for dw_hh (state dropout)
          if constexpr (kSaving) std::copy(h + b * P, h + b * P + P, saved.at[kHprev] + r.row * P);
          if constexpr (kZoneout) {
            r.keep_h = keep_row(m.zone_h, m.zone_h_step, r.row);
            if constexpr (Cell::kCellState) r.keep_c = keep_row(m.zone_c, m.zone_c_step, r.row);
          }
          r.h = kProjection ? hp + b * H : h + b * H;
          if constexpr (Cell::kCellState) r.c = c + b * H;
          r.out = a.out + r.row * P;
          if constexpr (kSaving) r.act = saved.at[kAct] + r.row * n.S;
          if constexpr (Cell::kRowScratch > 0) r.tmp = tmp + b * H;
          Cell::template forward_row<T, kSaving, kZoneout, kProjection>(p, r, saved, n);
          if (step_half && !kStateDropout) round_state(r.h, b - b0);
        }
      });
      if constexpr (kProjection) {
        // hq (Bs, P) = hp (Bs, H) . w_hr^T; finished sequences keep their state.
        hr.run(hp + b0 * H, H, T(0), hq + b0 * P, P);
        for (int64_t k = 0; k < A; ++k) {
          const int64_t b = rows[k];
          ForwardRow<T> r;
          r.row = time_of<kLengths>(s, b, len, T_, a.reverse) * B + b;
          if constexpr (kZoneout) r.keep_h = keep_row(m.zone_h, m.zone_h_step, r.row);
          r.h = h + b * P;
          r.out = a.out + r.row * P;
          const T* hq_row = hq + b * P;
          for (int64_t j = 0; j < P; ++j) emit<kZoneout>(r, j, hq_row[j]);
        }
      }
    }
  });
}

template <typename Cell, typename T, bool kLengths, bool kProjection, bool kStateDropout,
          bool kZoneout>
void backward(const BackwardArgs<T>& a) {
  const int64_t T_ = a.n.T, B = a.n.B, I = a.n.I, H = a.n.H, P = a.n.P, G = a.n.G;
  const int64_t TB = T_ * B;
  const bool reverse = a.reverse;
  const int64_t* len = a.len;
  const T* w_hh = a.w[kWeightHh];
  const typename Cell::template Params<T> p(a.w, a.n, a.eps);

  // The carried gradients: dh (B, P) reaching h_s from later steps, dc (B, H) reaching c_s.
  T* dh = a.dh;
  T* dc = a.dc;
  // Gate gradients of every step, time-ordered (T*B, G), zero at padded positions: dgi of the
  // input side of the pre-activations, dgh of W_hh hin, what the recurrent GEMM multiplies (the
  // same array unless the cell's recurrent side has a gradient of its own: Cell::kSplit).
  Buffer<T> dgi_t(TB * G, kLengths);
  Buffer<T> dgh_t(Cell::kSplit ? TB * G : 0, kLengths);
  T* dgi = dgi_t.data();
  T* dgh = Cell::kSplit ? dgh_t.data() : dgi;
  typename Cell::template Grads<T> cell_grads(a.n, kLengths);  // the cell's own, per step
  Buffer<T> zero_t(std::max(P, H), true);  // stands in for an absent grad_out row
  const T* zero = zero_t.data();
  // Projected LSTM: dht (T*B, P) the gradient reaching each projection output; dhs (B, P) this
  // step's; dhp (B, H) the gradient reaching o tanh(c) through the projection.
  Buffer<T> dht_t(kProjection ? TB * P : 0, kLengths);
  Buffer<T> dhs_t(kProjection ? B * P : 0, true);
  Buffer<T> dhp_t(kProjection ? B * H : 0);
  T* dht = dht_t.data();
  T* dhs = dhs_t.data();
  T* dhp = dhp_t.data();
  // Where the bulk GEMMs take bfloat16 operands (float, a bf16 plan), the row passes round the
  // gate gradients they have just written: dgh_h (T*B, G) of dgh, dgi_h of dgi [kRoundDgi],
  // read by the bulk GEMMs (Operand) and, without lengths, by the step's GEMM; no pass over all
  // of dgi afterwards. Padded rows are never read (the bulk GEMMs gather the valid rows). A
  // LayerNorm cell's finish rewrites dgi, which is then rounded after it.
  constexpr bool kRoundDgi = Cell::kSplit && !Cell::kLayerNorm;
  const bool half = std::is_same_v<T, float> && rounds_operands(a.gemm);
  Buffer<std::uint16_t> dgh_h(half ? TB * G : 0), dgi_h(half && kRoundDgi ? TB * G : 0);

  // The steps of sequences [b0, b1) (Bs of them), in reverse: each slice of over_batch on its
  // own thread, or all B at once.
  over_batch(a.gemm.split, B, [&](int64_t b0, int64_t b1) {
    const int64_t Bs = b1 - b0;
    // With lengths, the recurrent GEMM runs over the A sequences active at this step only
    // (rows[k], k < A, their batch indices): their rows of dgh are gathered in dgs (A, G). Its
    // product dhc (A, P), the gradient reaching the states the GEMM read (with state dropout:
    // h * mask, so the mask then multiplies it), is added to their dh.
    Buffer<T> dgs_t(kLengths ? Bs * G : 0);
    Buffer<T> dhc_t(kLengths || kStateDropout ? Bs * P : 0);
    T* dgs = dgs_t.data();
    T* dhc = dhc_t.data();
    std::vector<int64_t> rows;
    rows.reserve(Bs);
    active_rows<kLengths>(0, len, b0, b1, rows);
    const PackedB<T> hh(a.gemm, false, Bs, P, G, w_hh, P);  // op(B) = w_hh (G, P)
    // op(B) = w_hr (P, H), projected
    const PackedB<T> hr(a.gemm, false, Bs, H, P, a.w[kWeightHr], H);
    // A step GEMM in bf16 reads its operand as the row pass rounded it: the step's rows of
    // dgh_h, or (with lengths, or when the bulk GEMMs stay in float32) dgs_h (A, G).
    const bool step_half = std::is_same_v<T, float> && hh.takes_half();
    const bool own_half = step_half && (kLengths || !half);
    Buffer<std::uint16_t> dgs_h(own_half ? Bs * G : 0);
    const int64_t steps = max_length(len ? len + b0 : nullptr, Bs, T_);
    for (int64_t s = steps - 1; s >= 0; --s) {
      if constexpr (kLengths) active_rows<kLengths>(s, len, b0, b1, rows);
      const int64_t A = static_cast<int64_t>(rows.size());
      if constexpr (kProjection) {
        // Zoneout on h is taken apart before the projection: dhs = (1 - keep) (dh + gout)
        // reaches the projection's output, keep (dh + gout) the state before the step.
        for (int64_t k = 0; k < A; ++k) {
          const int64_t b = rows[k];
          BackwardRow<T> r;
          r.row = time_of<kLengths>(s, b, len, T_, reverse) * B + b;
          r.gout = a.gout ? a.gout + r.row * P : zero;
          if constexpr (kZoneout) r.keep_h = keep_row(a.masks.zone_h, a.masks.zone_h_step, r.row);
          r.dh = dh + b * P;
          T* dhs_row = dhs + b * P;
          for (int64_t j = 0; j < P; ++j) dhs_row[j] = receive<kZoneout>(r, j);
          std::copy(dhs_row, dhs_row + P, dht + r.row * P);
        }
        // dhp (Bs, H) = dhs (Bs, P) . w_hr (P, H)
        hr.run(dhs + b0 * P, P, T(0), dhp + b0 * H, H);
      }
      parallel_for(A, grain(G), [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t b = rows[k];
          const int64_t t = time_of<kLengths>(s, b, len, T_, reverse);
          BackwardRow<T> r;
          r.row = t * B + b;
          r.gout = a.gout ? a.gout + r.row * P : zero;
          r.act = a.saved.at[kAct] + r.row * a.n.S;
          r.hin = a.saved.at[kHprev] + r.row * P;
          if constexpr (kZoneout) {
            r.keep_h = keep_row(a.masks.zone_h, a.masks.zone_h_step, r.row);
            if constexpr (Cell::kCellState)
              r.keep_c = keep_row(a.masks.zone_c, a.masks.zone_c_step, r.row);
          }
          if constexpr (Cell::kCellState) {
            // c_{t-1}: saved where the forward overwrote it (zoneout) or the cell saves it
            // (peepholes); else the new cell state one step earlier in reading order, c0 first.
            const int64_t prev = reverse ? t + 1 : t - 1;
            r.cprev = Cell::saves_cprev(kZoneout) ? a.saved.at[kCprev] + r.row * H
                      : s == 0                    ? a.c0 + b * H
                                                  : a.saved.at[kC] + (prev * B + b) * H;
            r.dc = dc + b * H;
          }
          if constexpr (kProjection) r.dhp = dhp + b * H;
          r.dh = dh + b * P;
          r.dgi = dgi + r.row * G;
          r.dg = kLengths ? dgs + k * G : dgh + r.row * G;
          Cell::template backward_row<T, kZoneout, kProjection>(p, r, a.saved, cell_grads, a.n);
          if (kLengths) std::copy(r.dg, r.dg + G, dgh + r.row * G);
          if constexpr (std::is_same_v<T, float>) {
            if (half) {
              round_row(G, r.dg, dgh_h.data() + r.row * G);
              if (kRoundDgi) round_row(G, r.dgi, dgi_h.data() + r.row * G);
            }
            if (own_half) round_row(G, r.dg, dgs_h.data() + k * G);
          }
        }
      });
      // This step's gradients of W_hh hin of the A active sequences: dga (A, G), and rounded to
      // bfloat16 where the step takes it so (else null).
      const int64_t first = ((reverse ? T_ - 1 - s : s) * B + b0) * G;
      const T* dga = kLengths ? dgs : dgh + first;
      const std::uint16_t* dga_h = !step_half ? nullptr
                                   : own_half ? dgs_h.data()
                                              : dgh_h.data() + first;
      if constexpr (kStateDropout) {
        // dhc (A, P) = dga (A, G) . w_hh (G, P), the gradient reaching hin = h * mask; dh +=
        // mask * dhc on the active rows (a GRU's direct term z * dh_t is in dh already).
        if (A == Bs) {
          hh.run(dga, G, T(0), dhc, P, dga_h);
        } else {
          hh.run_rows(A, dga, G, T(0), dhc, P, dga_h);
        }
        for (int64_t k = 0; k < A; ++k) {
          T* dh_row = dh + rows[k] * P;
          const T* m_row = a.masks.mask + rows[k] * P;
          const T* dhc_row = dhc + k * P;
#pragma omp simd
          for (int64_t j = 0; j < P; ++j) dh_row[j] += m_row[j] * dhc_row[j];
        }
      } else if (!kLengths || A == Bs) {
        // dh (Bs, P) += dga (Bs, G) . w_hh (G, P): every sequence is active, rows[k] = b0 + k
        hh.run(dga, G, T(1), dh + b0 * P, P, dga_h);
      } else {
        // dhc (A, P) = dga (A, G) . w_hh (G, P), added to the active rows of dh
        hh.run_rows(A, dga, G, T(0), dhc, P, dga_h);
        for (int64_t k = 0; k < A; ++k) {
          T* dh_row = dh + rows[k] * P;
          const T* dhc_row = dhc + k * P;
#pragma omp simd
          for (int64_t j = 0; j < P; ++j) dh_row[j] += dhc_row[j];
        }
      }
    }
  });

  // The cell's own weights (biases, peepholes, LayerNorm gains); a LayerNorm cell turns dgi into
  // the gradient of W_ih x_t.
  Cell::template finish<T, kLengths>(p, a, dgi, dgh, cell_grads);
  // The bulk GEMMs over the R rows that count: with lengths, the N valid rows alone (gathered
  // once; padded rows of dgi and dgh are zero and add nothing, and dx is zero there), else all
  // T*B. Each operand is rounded to bfloat16 once where the plan says so (Operand; the gate
  // gradients by the row passes that wrote them).
  const std::vector<int64_t> valid = kLengths ? valid_rows(len, T_, B) : std::vector<int64_t>{};
  const bool compact = kLengths && static_cast<int64_t>(valid.size()) < TB;
  const int64_t R = compact ? static_cast<int64_t>(valid.size()) : TB;
  Buffer<T> dgi_c(compact ? R * G : 0), dgh_c(compact && Cell::kSplit ? R * G : 0);
  Buffer<T> x_c(compact ? R * I : 0), hprev_c(compact ? R * P : 0);
  // the gate gradients as the row passes rounded them (null where they did not)
  const std::uint16_t* dgi_r = Cell::kSplit ? dgi_h.data() : dgh_h.data();
  const std::uint16_t* dgh_r = Cell::kSplit ? dgh_h.data() : nullptr;
  Buffer<std::uint16_t> dgi_hc(compact && dgi_r ? R * G : 0), dgh_hc(compact && dgh_r ? R * G : 0);
  // pick(full, W, buffer): the R rows of the (T*B, W) array full that count (null: null)
  auto pick = [&](const auto* full, int64_t W, auto& buffer) -> decltype(full) {
    if (!compact || !full) return full;
    gather_rows(valid, W, full, buffer.data());
    return buffer.data();
  };
  const Operand<T> dgi_o(a.gemm, R, G, pick(dgi, G, dgi_c), pick(dgi_r, G, dgi_hc));
  const Operand<T> dgh_o(a.gemm, Cell::kSplit ? R : 0, G,
                         Cell::kSplit ? pick(dgh, G, dgh_c) : nullptr,
                         pick(dgh_r, G, dgh_hc));
  const Operand<T>& dg_hh = Cell::kSplit ? dgh_o : dgi_o;
  const Operand<T> x_o(a.gemm, R, I, pick(a.x, I, x_c));
  // The recurrent GEMM read h_{t-1} * mask under state dropout; the saved hprev is unmasked (a
  // GRU's carry reads it so): dw_hh takes the masked rows, hprev_m (R, P).
  const T* hprev = pick(a.saved.at[kHprev], P, hprev_c);
  Buffer<T> hprev_m(kStateDropout ? R * P : 0);
  if constexpr (kStateDropout) {
    T* masked = hprev_m.data();
    parallel_for(R, grain(P), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const T* m_row = a.masks.mask + ((compact ? valid[i] : i) % B) * P;
#pragma omp simd
        for (int64_t j = 0; j < P; ++j) masked[i * P + j] = hprev[i * P + j] * m_row[j];
      }
    });
    hprev = masked;
  }
  const Operand<T> hprev_o(a.gemm, R, P, hprev);
  if (a.dx) {
    // dx (R, I) = dgi (R, G) . w_ih (G, I) [scattered into dx (T*B, I), 0 at padded rows]
    const Operand<T> w_o(a.gemm, G, I, a.w[kWeightIh]);
    Buffer<T> dx_c(compact ? R * I : 0);
    gemm<T>(a.gemm, false, false, R, I, G, dgi_o, w_o, T(0), compact ? dx_c.data() : a.dx, I);
    if (compact) {
      std::fill_n(a.dx, TB * I, T(0));
      scatter_rows(valid, I, dx_c.data(), a.dx);
    }
  }
  // dw_ih (G, I) = dgi^T (G, R) . x (R, I)
  gemm<T>(a.gemm, true, false, G, I, R, dgi_o, x_o, T(0), a.dw[kWeightIh], I);
  // dw_hh (G, P) = dgh^T (G, R) . hprev (R, P)
  gemm<T>(a.gemm, true, false, G, P, R, dg_hh, hprev_o, T(0), a.dw[kWeightHh], P);
  if constexpr (kProjection) {
    // dw_hr (P, H) = dht^T (P, R) . hpre (R, H)
    Buffer<T> dht_c(compact ? R * P : 0), hpre_c(compact ? R * H : 0);
    const Operand<T> dht_o(a.gemm, R, P, pick(dht, P, dht_c));
    const Operand<T> hpre_o(a.gemm, R, H, pick(a.saved.at[kHpre], H, hpre_c));
    gemm<T>(a.gemm, true, false, P, H, R, dht_o, hpre_o, T(0), a.dw[kWeightHr], H);
  }
}

// The variants of a call, made compile-time; those the cell cannot have are not compiled.
template <typename Cell, typename T>
void run_forward(const Variants& v, const ForwardArgs<T>& a) {
  with_bools(
      [&](auto len, auto proj, auto save, auto state, auto zone) {
        forward<Cell, T, decltype(len)::value, decltype(proj)::value, decltype(save)::value,
                decltype(state)::value, decltype(zone)::value>(a);
      },
      v.lengths, possible<Cell::kProjection>(v.projection), v.saving, v.state_dropout,
      v.zoneout);
}

template <typename Cell, typename T>
void run_backward(const Variants& v, const BackwardArgs<T>& a) {
  with_bools(
      [&](auto len, auto proj, auto state, auto zone) {
        backward<Cell, T, decltype(len)::value, decltype(proj)::value, decltype(state)::value,
                 decltype(zone)::value>(a);
      },
      v.lengths, possible<Cell::kProjection>(v.projection), v.state_dropout, v.zoneout);
}

// The drivers of `Cell` in float32 and float64, compiled in this translation unit.
#define RNNKIT_INSTANTIATE(Cell)                                                          \
  template void run_forward<Cell, float>(const Variants&, const ForwardArgs<float>&);    \
  template void run_forward<Cell, double>(const Variants&, const ForwardArgs<double>&);  \
  template void run_backward<Cell, float>(const Variants&, const BackwardArgs<float>&);  \
  template void run_backward<Cell, double>(const Variants&, const BackwardArgs<double>&)

}  // namespace cpu
}  // namespace rnnkit
