"""The Triton kernels: one layer's recurrence, forward and backward, every direction of it.

Importing this module imports triton; :mod:`.ops` imports it at the first launch only.

Two kernels, each in two shapes chosen at compile time (``STEPWISE``):

* persistent (``STEPWISE=False``): one program per (batch tile, direction) loops over all T
  steps with its recurrent weights resident on chip (loaded once, before the loop) and its
  state in registers; the recurrent GEMM is a ``tl.dot`` per gate and step.
* one launch per step (``STEPWISE=True``), for weights that do not fit on chip: the host runs
  the step's recurrent GEMM (h_{t-1} W_hh^T for all directions, one batched cuBLAS call) and
  the kernel does the rest of the step, reading and writing the state in global memory. Cells
  without LayerNorm are tiled over H too (grid axis 2). A projected LSTM (``HOST_PROJ``) has
  the host project o * tanh(c_t) as well, between the kernel and ``proj_forward_kernel``
  (zoneout, output and state of the projected h); backward, ``proj_backward_kernel`` comes
  first and the host's GEMM hands the kernel d(o * tanh(c_t)).

sigmoid(x) = 1 / (1 + e^-x) and tanh(x) = 1 - 2 / (e^2x + 1) are written out where they are
used: under the interpreter every call of a ``@triton.jit`` helper re-patches
``triton.language``, which costs more than the step it computes.


Shapes, in the letters of DESIGN.md (D = directions of the layer, 1 or 2; G = NG * H; P = H
without a projection), all row-major and contiguous:

    gx      (D, T, B, G)  fp32: W_ih x_t [LayerNorm'd] + b_ih [+ b_hh], every step (host GEMM)
    gh      (D, B, G)     STEPWISE: h_{t-1} W_hh^T of this step [raw: before LayerNorm, bias]
    h0, c0  (D, B, P), (D, B, H)   the initial state (STEPWISE: the state, fp32, in place)
    w_hh    (D, G, P)     w_hr (D, P, H)   peep (D, 3, H)  w_ci, w_cf, w_co
    b_hh    (D, G)        ln_hh (D, 2, G) gain, bias      ln_c (D, 2, H) gain, bias
    lengths (B,) int64    smask (D, B, P)  state dropout's mask on h_{t-1} entering the step
    zone_h  (D, T, B, P) 0/1 per step (ZONE=1) or (D, P) probabilities (ZONE=2); zone_c likewise
    out     (T, B, D*P)   every direction's output, zero at padded steps (allocated as zeros)
    saved (SAVE), per direction, at each step's own time position tt (zeros at padded steps):
      act (D, T, B, NA*H) LSTM i f g o; GRU r z n and gh_n (after LayerNorm and b_hn); RNN h_t
      hin (D, T, B, P)    h_{t-1} as it entered the step, before state dropout's mask
      cprev, c (D, T, B, H)   LSTM: the cell state entering the step, and c_t (before zoneout)
      hfull (D, T, B, H)  projection: o * tanh(c_t) before W_hr
      xhat (D, T, B, G)   LayerNorm: the normalised h_{t-1} W_hh^T
      stats (D, T, B, 3)  LayerNorm: rstd of h_{t-1} W_hh^T; mean and rstd of c_t (LSTM)

A row (sequence) b at step t is valid when t < lengths[b]; its time position is tt = t, or
tt = lengths[b] - 1 - t in a reversed direction (each sequence reversed within its own length).
Invalid rows keep their state and write nothing. Every ``tl.dot`` operand dimension is a padded
block size >= 16 (BB, HP, PP); padded rows and columns load as zero and are never stored.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "INTERPRETED",
    "backward_kernel",
    "forward_kernel",
    "proj_backward_kernel",
    "proj_forward_kernel",
]

#: Sizes, the step and the directions' reading orders are plain runtime arguments: specialising
#: on their values (triton does, for 1 and multiples of 16) would compile a kernel per step.
_RUNTIME = ["t0", "T", "B", "H", "P", "D", "rev0", "rev1"]
_RUNTIME_PROJ = ["t", "T", "B", "P", "D", "rev0", "rev1"]


@triton.jit(do_not_specialize=_RUNTIME)
def forward_kernel(
    gx, gh, h0, c0, w_hh, b_hh, w_hr, peep, ln_hh, ln_c, lengths, smask, zone_h, zone_c,
    out, h_n, c_n, hin_next, h_full_step, s_act, s_hin, s_cprev, s_c, s_hfull, s_xhat, s_stats,
    t0, T, B, H, P, D, rev0, rev1, eps,
    MODE: tl.constexpr,  # 0 rnn_tanh, 1 rnn_relu, 2 LSTM family, 3 GRU family
    NG: tl.constexpr,  # gates: 1, 4 or 3
    PEEP: tl.constexpr,
    LN: tl.constexpr,
    PROJ: tl.constexpr,
    HAS_BHH: tl.constexpr,
    HAS_LEN: tl.constexpr,
    SMASK: tl.constexpr,
    ZONE: tl.constexpr,  # 0 none, 1 a 0/1 mask per step, 2 eval-mode probabilities
    ZONE_C: tl.constexpr,
    SAVE: tl.constexpr,
    STEPWISE: tl.constexpr,
    HOST_PROJ: tl.constexpr,  # STEPWISE with a projection: W_hr h_t is the host's GEMM
    BB: tl.constexpr,  # batch rows per program
    HP: tl.constexpr,  # hidden columns per program (all of H, padded, unless tiled)
    PP: tl.constexpr,  # state columns (P padded; HP without a projection)
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    """One layer forward, for the batch rows of tile program_id(0), direction program_id(1)
    and hidden units of tile program_id(2): all T steps (persistent), or step t0 (STEPWISE).
    The module docstring gives every tensor's shape."""
    pid_b = tl.program_id(0)
    d = tl.program_id(1)
    pid_h = tl.program_id(2)
    G = NG * H
    NA = 4 if NG > 1 else 1
    rev = tl.where(d == 0, rev0, rev1)
    rows = pid_b * BB + tl.arange(0, BB)  # (BB,)
    rmask = rows < B
    hc = pid_h * HP + tl.arange(0, HP)  # (HP,) this program's hidden units
    hmask = hc < H
    if PROJ:
        pc = tl.arange(0, PP)  # (PP,) the projected state's columns
        pmask = pc < P
    else:
        pc = hc
        pmask = hmask
    rh = rmask[:, None] & hmask[None, :]  # (BB, HP)
    rp = rmask[:, None] & pmask[None, :]  # (BB, PP)
    srow = (d * B + rows).to(tl.int64)  # (BB,) row of the (D, B, .) state tensors

    # -- the state, fp32 ------------------------------------------------------------------------
    h = tl.load(h0 + srow[:, None] * P + pc[None, :], mask=rp, other=0.0).to(tl.float32)
    c = tl.full((BB, HP), 0.0, tl.float32)
    if NG == 4:
        c = tl.load(c0 + srow[:, None] * H + hc[None, :], mask=rh, other=0.0).to(tl.float32)
    if HAS_LEN:
        L = tl.load(lengths + rows, mask=rmask, other=0).to(tl.int32)  # (BB,)
    else:
        L = tl.full((BB,), 0, tl.int32) + T
    if SMASK:
        sm = tl.load(smask + srow[:, None] * P + pc[None, :], mask=rp, other=0.0).to(tl.float32)

    # -- weights: resident for the whole loop (persistent) ---------------------------------------
    wbase = w_hh + d * G * P
    kp = tl.arange(0, PP)  # (PP,) the reduction index over h_{t-1}'s columns
    wmask = (kp < P)[:, None] & hmask[None, :]  # (PP, HP)
    if not STEPWISE:
        # W_k^T (PP, HP): [p, j] = w_hh[d, k*H + j, p]
        w0 = tl.load(wbase + (0 * H + hc)[None, :] * P + kp[:, None], mask=wmask, other=0.0)
        if NG > 1:
            w1 = tl.load(wbase + (1 * H + hc)[None, :] * P + kp[:, None], mask=wmask, other=0.0)
            w2 = tl.load(wbase + (2 * H + hc)[None, :] * P + kp[:, None], mask=wmask, other=0.0)
        if NG > 3:
            w3 = tl.load(wbase + (3 * H + hc)[None, :] * P + kp[:, None], mask=wmask, other=0.0)
    if PROJ:
        if not HOST_PROJ:
            # W_hr^T (HP, PP): [j, p] = w_hr[d, p, j]
            whr = tl.load(
                w_hr + d * P * H + pc[None, :] * H + hc[:, None],
                mask=hmask[:, None] & pmask[None, :], other=0.0,
            )  # fmt: skip
    if HAS_BHH:
        bb0 = tl.load(b_hh + d * G + (0 * H + hc), mask=hmask, other=0.0).to(tl.float32)
        if NG > 1:
            bb1 = tl.load(b_hh + d * G + (1 * H + hc), mask=hmask, other=0.0).to(tl.float32)
            bb2 = tl.load(b_hh + d * G + (2 * H + hc), mask=hmask, other=0.0).to(tl.float32)
        if NG > 3:
            bb3 = tl.load(b_hh + d * G + (3 * H + hc), mask=hmask, other=0.0).to(tl.float32)
    if PEEP:
        wci = tl.load(peep + d * 3 * H + hc, mask=hmask, other=0.0).to(tl.float32)
        wcf = tl.load(peep + d * 3 * H + H + hc, mask=hmask, other=0.0).to(tl.float32)
        wco = tl.load(peep + d * 3 * H + 2 * H + hc, mask=hmask, other=0.0).to(tl.float32)
    if LN:
        lb = ln_hh + d * 2 * G
        ga0 = tl.load(lb + (0 * H + hc), mask=hmask, other=0.0).to(tl.float32)
        be0 = tl.load(lb + G + (0 * H + hc), mask=hmask, other=0.0).to(tl.float32)
        ga1 = tl.load(lb + (1 * H + hc), mask=hmask, other=0.0).to(tl.float32)
        be1 = tl.load(lb + G + (1 * H + hc), mask=hmask, other=0.0).to(tl.float32)
        ga2 = tl.load(lb + (2 * H + hc), mask=hmask, other=0.0).to(tl.float32)
        be2 = tl.load(lb + G + (2 * H + hc), mask=hmask, other=0.0).to(tl.float32)
        if NG > 3:
            ga3 = tl.load(lb + (3 * H + hc), mask=hmask, other=0.0).to(tl.float32)
            be3 = tl.load(lb + G + (3 * H + hc), mask=hmask, other=0.0).to(tl.float32)
            gac = tl.load(ln_c + d * 2 * H + hc, mask=hmask, other=0.0).to(tl.float32)
            bec = tl.load(ln_c + d * 2 * H + H + hc, mask=hmask, other=0.0).to(tl.float32)
    if ZONE == 2:
        zh_p = tl.load(zone_h + d * P + pc, mask=pmask, other=0.0).to(tl.float32)
        if ZONE_C:
            zc_p = tl.load(zone_c + d * H + hc, mask=hmask, other=0.0).to(tl.float32)

    if STEPWISE:
        t_end = t0 + 1
    else:
        t_end = T
    for t in range(t0, t_end):
        valid = rmask & (t < L)  # (BB,)
        tt = tl.where(rev != 0, L - 1 - t, t)
        tt = tl.where(valid, tt, 0)
        trow = ((d * T + tt) * B + rows).to(tl.int64)  # (BB,) row of the (D, T, B, .) tensors
        vh = valid[:, None] & hmask[None, :]  # (BB, HP)
        vp = valid[:, None] & pmask[None, :]  # (BB, PP)
        if SMASK:
            hin = h * sm
        else:
            hin = h
        # recurrent pre-activations of gate k, a_k (BB, HP): h_{t-1} W_hh^T
        if STEPWISE:
            ghp = gh + srow[:, None] * G
            a0 = tl.load(ghp + (0 * H + hc)[None, :], mask=rh, other=0.0).to(tl.float32)
            if NG > 1:
                a1 = tl.load(ghp + (1 * H + hc)[None, :], mask=rh, other=0.0).to(tl.float32)
                a2 = tl.load(ghp + (2 * H + hc)[None, :], mask=rh, other=0.0).to(tl.float32)
            if NG > 3:
                a3 = tl.load(ghp + (3 * H + hc)[None, :], mask=rh, other=0.0).to(tl.float32)
        else:
            hd = hin.to(w0.dtype)  # (BB, PP)
            a0 = tl.dot(hd, w0, input_precision=DOT_PREC)
            if NG > 1:
                a1 = tl.dot(hd, w1, input_precision=DOT_PREC)
                a2 = tl.dot(hd, w2, input_precision=DOT_PREC)
            if NG > 3:
                a3 = tl.dot(hd, w3, input_precision=DOT_PREC)
        if LN:
            # LayerNorm over all G = NG*H recurrent pre-activations of each row
            mean = tl.sum(a0, 1) + tl.sum(a1, 1) + tl.sum(a2, 1)
            if NG > 3:
                mean += tl.sum(a3, 1)
            mean = mean / G  # (BB,)
            x0 = tl.where(hmask[None, :], a0 - mean[:, None], 0.0)
            x1 = tl.where(hmask[None, :], a1 - mean[:, None], 0.0)
            x2 = tl.where(hmask[None, :], a2 - mean[:, None], 0.0)
            var = tl.sum(x0 * x0, 1) + tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)
            if NG > 3:
                x3 = tl.where(hmask[None, :], a3 - mean[:, None], 0.0)
                var += tl.sum(x3 * x3, 1)
            rstd = 1.0 / tl.sqrt(var / G + eps)  # (BB,)
            x0 = x0 * rstd[:, None]
            x1 = x1 * rstd[:, None]
            x2 = x2 * rstd[:, None]
            a0 = x0 * ga0[None, :] + be0[None, :]
            a1 = x1 * ga1[None, :] + be1[None, :]
            a2 = x2 * ga2[None, :] + be2[None, :]
            if NG > 3:
                x3 = x3 * rstd[:, None]
                a3 = x3 * ga3[None, :] + be3[None, :]
        if HAS_BHH:
            a0 += bb0[None, :]
            if NG > 1:
                a1 += bb1[None, :]
                a2 += bb2[None, :]
            if NG > 3:
                a3 += bb3[None, :]
        # input pre-activations of this step, at each row's own time position
        gxp = gx + trow[:, None] * G
        g0 = tl.load(gxp + (0 * H + hc)[None, :], mask=vh, other=0.0)
        if NG > 1:
            g1 = tl.load(gxp + (1 * H + hc)[None, :], mask=vh, other=0.0)
            g2 = tl.load(gxp + (2 * H + hc)[None, :], mask=vh, other=0.0)
        if NG > 3:
            g3 = tl.load(gxp + (3 * H + hc)[None, :], mask=vh, other=0.0)

        # -- the cell ------------------------------------------------------------------------
        if MODE == 2:  # LSTM: i f g o
            i_pre = g0 + a0
            f_pre = g1 + a1
            if PEEP:
                i_pre += wci[None, :] * c
                f_pre += wcf[None, :] * c
            ig = 1.0 / (1.0 + tl.exp(-(i_pre)))
            fg = 1.0 / (1.0 + tl.exp(-(f_pre)))
            gg = 1.0 - 2.0 / (tl.exp(2.0 * (g2 + a2)) + 1.0)
            c_new = fg * c + ig * gg
            o_pre = g3 + a3
            if PEEP:
                o_pre += wco[None, :] * c_new
            og = 1.0 / (1.0 + tl.exp(-(o_pre)))
            if LN:
                cm = tl.sum(tl.where(hmask[None, :], c_new, 0.0), 1) / H  # (BB,)
                cx = tl.where(hmask[None, :], c_new - cm[:, None], 0.0)
                crs = 1.0 / tl.sqrt(tl.sum(cx * cx, 1) / H + eps)  # (BB,)
                th = 1.0 - 2.0 / (
                    tl.exp(2.0 * (cx * crs[:, None] * gac[None, :] + bec[None, :])) + 1.0
                )
            else:
                th = 1.0 - 2.0 / (tl.exp(2.0 * (c_new)) + 1.0)
            h_full = tl.where(hmask[None, :], og * th, 0.0)  # (BB, HP)
        elif MODE == 3:  # GRU: r z n
            rg = 1.0 / (1.0 + tl.exp(-(g0 + a0)))
            zg = 1.0 / (1.0 + tl.exp(-(g1 + a1)))
            ng = 1.0 - 2.0 / (tl.exp(2.0 * (g2 + rg * a2)) + 1.0)
            # the carry reads h_{t-1} unmasked: state dropout is on the products only
            h_full = tl.where(hmask[None, :], (1.0 - zg) * ng + zg * h, 0.0)
        elif MODE == 0:
            h_full = tl.where(hmask[None, :], (1.0 - 2.0 / (tl.exp(2.0 * (g0 + a0)) + 1.0)), 0.0)
        else:
            h_full = tl.where(hmask[None, :], tl.maximum(g0 + a0, 0.0), 0.0)
        if HOST_PROJ:  # the host projects; proj_forward_kernel finishes h
            fp = h_full_step + srow[:, None] * H + hc[None, :]
            tl.store(fp, tl.where(vh, h_full, 0.0).to(h_full_step.dtype.element_ty), mask=rh)
        else:
            if PROJ:
                h_new = tl.dot(h_full.to(whr.dtype), whr, input_precision=DOT_PREC)  # (BB, PP)
            else:
                h_new = h_full
            # zoneout: keep the previous value where the mask says so (eval: the expectation)
            if ZONE == 1:
                zh = tl.load(zone_h + trow[:, None] * P + pc[None, :], mask=vp, other=0.0)
                h_new = zh * h + (1.0 - zh) * h_new
            elif ZONE == 2:
                h_new = zh_p[None, :] * h + (1.0 - zh_p[None, :]) * h_new
            optr = out + (tt * B + rows).to(tl.int64)[:, None] * (D * P) + d * P + pc[None, :]
            tl.store(optr, h_new.to(out.dtype.element_ty), mask=vp)
        if MODE == 2:
            c_keep = c_new
            if ZONE_C:
                if ZONE == 1:
                    zc = tl.load(zone_c + trow[:, None] * H + hc[None, :], mask=vh, other=0.0)
                    c_keep = zc * c + (1.0 - zc) * c_new
                else:
                    c_keep = zc_p[None, :] * c + (1.0 - zc_p[None, :]) * c_new
        if SAVE:
            NAH = NA * H
            ap = s_act + trow[:, None] * NAH
            if PROJ:  # every H tile holds all of h_{t-1}: the first one stores it
                first = (pc * 0 + pid_h) == 0  # (PP,)
                tl.store(s_hin + trow[:, None] * P + pc[None, :], h, mask=vp & first[None, :])
            else:
                tl.store(s_hin + trow[:, None] * P + pc[None, :], h, mask=vp)
            if MODE == 2:
                tl.store(ap + (0 * H + hc)[None, :], ig, mask=vh)
                tl.store(ap + (1 * H + hc)[None, :], fg, mask=vh)
                tl.store(ap + (2 * H + hc)[None, :], gg, mask=vh)
                tl.store(ap + (3 * H + hc)[None, :], og, mask=vh)
                tl.store(s_cprev + trow[:, None] * H + hc[None, :], c, mask=vh)
                tl.store(s_c + trow[:, None] * H + hc[None, :], c_new, mask=vh)
            elif MODE == 3:
                tl.store(ap + (0 * H + hc)[None, :], rg, mask=vh)
                tl.store(ap + (1 * H + hc)[None, :], zg, mask=vh)
                tl.store(ap + (2 * H + hc)[None, :], ng, mask=vh)
                tl.store(ap + (3 * H + hc)[None, :], a2, mask=vh)
            else:
                tl.store(ap + hc[None, :], h_full, mask=vh)
            if PROJ:
                tl.store(s_hfull + trow[:, None] * H + hc[None, :], h_full, mask=vh)
            if LN:
                xp = s_xhat + trow[:, None] * G
                tl.store(xp + (0 * H + hc)[None, :], x0, mask=vh)
                tl.store(xp + (1 * H + hc)[None, :], x1, mask=vh)
                tl.store(xp + (2 * H + hc)[None, :], x2, mask=vh)
                tl.store(s_stats + trow * 3, rstd, mask=valid)
                if NG > 3:
                    tl.store(xp + (3 * H + hc)[None, :], x3, mask=vh)
                    tl.store(s_stats + trow * 3 + 1, cm, mask=valid)
                    tl.store(s_stats + trow * 3 + 2, crs, mask=valid)
        if not HOST_PROJ:
            h = tl.where(valid[:, None], h_new, h)
        if MODE == 2:
            c = tl.where(valid[:, None], c_keep, c)

    if not HOST_PROJ:
        tl.store(h_n + srow[:, None] * P + pc[None, :], h.to(h_n.dtype.element_ty), mask=rp)
        if STEPWISE:  # the next step's GEMM input: h_t * state mask, in the weights' dtype
            if SMASK:
                nxt = h * sm
            else:
                nxt = h
            nxt_ptr = hin_next + srow[:, None] * P + pc[None, :]
            tl.store(nxt_ptr, nxt.to(hin_next.dtype.element_ty), mask=rp)
    if NG == 4:
        tl.store(c_n + srow[:, None] * H + hc[None, :], c.to(c_n.dtype.element_ty), mask=rh)


@triton.jit(do_not_specialize=_RUNTIME)
def backward_kernel(
    grad_out, dh_in, dpart, dc, w_hh, w_hr, peep, ln_hh, ln_c, lengths, smask, zone_h, zone_c,
    s_act, s_hin, s_cprev, s_c, s_hfull, s_xhat, s_stats,
    dgx, dgh, dghr, dh_new_s, dyc_s, dh0, dc0, dghr_step, dh_full_step,
    t0, T, B, H, P, D, rev0, rev1,
    MODE: tl.constexpr,
    NG: tl.constexpr,
    PEEP: tl.constexpr,
    LN: tl.constexpr,
    PROJ: tl.constexpr,
    HAS_LEN: tl.constexpr,
    HAS_GOUT: tl.constexpr,
    SMASK: tl.constexpr,
    ZONE: tl.constexpr,
    ZONE_C: tl.constexpr,
    STEPWISE: tl.constexpr,
    HOST_PROJ: tl.constexpr,
    BB: tl.constexpr,
    HP: tl.constexpr,
    PP: tl.constexpr,
    DOT_PREC: tl.constexpr,
):  # fmt: skip
    """Backpropagation
    through time of :func:`forward_kernel`, the forward read in reverse.

       grad_out (T, B, D*P); dh_in, dpart (D, B, P), dc (D, B, H): persistent: d h_n, unused and
       d c_n; STEPWISE: the state's gradient after step t+1 is dh_in * smask + dpart, where dh_in
       is the host's GEMM dghr_{t+1} W_hh, and dc is d c_t (updated in place). Written: dgx, dgh,
       dghr (D, T, B, G) the gradients of the input pre-activations, of the recurrent ones (after
       LayerNorm and bias) and of the raw h_{t-1} W_hh^T; dh_new_s (D, T, B, P) the gradient of the
       projected h (for dW_hr); dyc_s (D, T, B, H) that of LN(c_t) (for ln_c's gain and bias);
       dh0, dc0 (D, B, P/H); STEPWISE: dghr_step (D, B, G) this step's dghr for the host GEMM and
       dpart for the next (earlier) step. dgh and dghr are written only where they differ from dgx
       (GRU; LayerNorm).
    """
    pid_b = tl.program_id(0)
    d = tl.program_id(1)
    pid_h = tl.program_id(2)
    G = NG * H
    NA = 4 if NG > 1 else 1
    NAH = NA * H
    rev = tl.where(d == 0, rev0, rev1)
    rows = pid_b * BB + tl.arange(0, BB)
    rmask = rows < B
    hc = pid_h * HP + tl.arange(0, HP)
    hmask = hc < H
    if PROJ:
        pc = tl.arange(0, PP)
        pmask = pc < P
    else:
        pc = hc
        pmask = hmask
    rh = rmask[:, None] & hmask[None, :]
    rp = rmask[:, None] & pmask[None, :]
    srow = (d * B + rows).to(tl.int64)

    if SMASK:
        sm = tl.load(smask + srow[:, None] * P + pc[None, :], mask=rp, other=0.0).to(tl.float32)
    # the gradient of the state after the step: dh (BB, PP), dc (BB, HP)
    if not HOST_PROJ:
        dh = tl.load(dpart + srow[:, None] * P + pc[None, :], mask=rp, other=0.0).to(tl.float32)
        if STEPWISE:
            dhin_prev = tl.load(dh_in + srow[:, None] * P + pc[None, :], mask=rp, other=0.0)
            if SMASK:
                dh += dhin_prev * sm
            else:
                dh += dhin_prev
    dcs = tl.full((BB, HP), 0.0, tl.float32)
    if NG == 4:
        dcs = tl.load(dc + srow[:, None] * H + hc[None, :], mask=rh, other=0.0).to(tl.float32)
    if HAS_LEN:
        L = tl.load(lengths + rows, mask=rmask, other=0).to(tl.int32)
    else:
        L = tl.full((BB,), 0, tl.int32) + T

    wbase = w_hh + d * G * P
    kp = tl.arange(0, PP)
    wmask = hmask[:, None] & (kp < P)[None, :]  # (HP, PP)
    if not STEPWISE:
        # W_k (HP, PP): [j, p] = w_hh[d, k*H + j, p]
        w0 = tl.load(wbase + (0 * H + hc)[:, None] * P + kp[None, :], mask=wmask, other=0.0)
        if NG > 1:
            w1 = tl.load(wbase + (1 * H + hc)[:, None] * P + kp[None, :], mask=wmask, other=0.0)
            w2 = tl.load(wbase + (2 * H + hc)[:, None] * P + kp[None, :], mask=wmask, other=0.0)
        if NG > 3:
            w3 = tl.load(wbase + (3 * H + hc)[:, None] * P + kp[None, :], mask=wmask, other=0.0)
    if PROJ:
        if not HOST_PROJ:
            # W_hr (PP, HP): [p, j] = w_hr[d, p, j]
            whr = tl.load(
                w_hr + d * P * H + pc[:, None] * H + hc[None, :],
                mask=pmask[:, None] & hmask[None, :], other=0.0,
            )  # fmt: skip
    if PEEP:
        wci = tl.load(peep + d * 3 * H + hc, mask=hmask, other=0.0).to(tl.float32)
        wcf = tl.load(peep + d * 3 * H + H + hc, mask=hmask, other=0.0).to(tl.float32)
        wco = tl.load(peep + d * 3 * H + 2 * H + hc, mask=hmask, other=0.0).to(tl.float32)
    if LN:
        lb = ln_hh + d * 2 * G
        ga0 = tl.load(lb + (0 * H + hc), mask=hmask, other=0.0).to(tl.float32)
        ga1 = tl.load(lb + (1 * H + hc), mask=hmask, other=0.0).to(tl.float32)
        ga2 = tl.load(lb + (2 * H + hc), mask=hmask, other=0.0).to(tl.float32)
        if NG > 3:
            ga3 = tl.load(lb + (3 * H + hc), mask=hmask, other=0.0).to(tl.float32)
            gac = tl.load(ln_c + d * 2 * H + hc, mask=hmask, other=0.0).to(tl.float32)
            bec = tl.load(ln_c + d * 2 * H + H + hc, mask=hmask, other=0.0).to(tl.float32)
    if ZONE == 2:
        zh_p = tl.load(zone_h + d * P + pc, mask=pmask, other=0.0).to(tl.float32)
        if ZONE_C:
            zc_p = tl.load(zone_c + d * H + hc, mask=hmask, other=0.0).to(tl.float32)

    if STEPWISE:
        n_steps = 1
    else:
        n_steps = T
    for s in range(0, n_steps):
        t = t0 - s  # steps in reverse: t0 = T - 1 (persistent) or this launch's step
        valid = rmask & (t < L)
        tt = tl.where(rev != 0, L - 1 - t, t)
        tt = tl.where(valid, tt, 0)
        trow = ((d * T + tt) * B + rows).to(tl.int64)
        vh = valid[:, None] & hmask[None, :]
        vp = valid[:, None] & pmask[None, :]

        if HOST_PROJ:  # proj_backward_kernel and the host's GEMM gave d(o * tanh(c_t))
            dh_full = tl.load(dh_full_step + srow[:, None] * H + hc[None, :], mask=vh, other=0.0)
        else:
            dht = dh  # d out_t + d h_t (the state after the step is the output)
            if HAS_GOUT:
                gp = grad_out + (tt * B + rows).to(tl.int64)[:, None] * (D * P)
                gp += d * P + pc[None, :]
                dht += tl.load(gp, mask=vp, other=0.0).to(tl.float32)
            # zoneout: h = zh * h_{t-1} + (1 - zh) * h_new
            if ZONE == 1:
                zh = tl.load(zone_h + trow[:, None] * P + pc[None, :], mask=vp, other=0.0)
                dh_new = (1.0 - zh) * dht
                dh_keep = zh * dht
            elif ZONE == 2:
                dh_new = (1.0 - zh_p[None, :]) * dht
                dh_keep = zh_p[None, :] * dht
            else:
                dh_new = dht
            if PROJ:
                tl.store(dh_new_s + trow[:, None] * P + pc[None, :], dh_new, mask=vp)
                dh_full = tl.dot(dh_new.to(whr.dtype), whr, input_precision=DOT_PREC)  # (BB, HP)
            else:
                dh_full = dh_new
        ap = s_act + trow[:, None] * NAH

        if MODE == 2:  # LSTM
            ig = tl.load(ap + (0 * H + hc)[None, :], mask=vh, other=0.0)
            fg = tl.load(ap + (1 * H + hc)[None, :], mask=vh, other=0.0)
            gg = tl.load(ap + (2 * H + hc)[None, :], mask=vh, other=0.0)
            og = tl.load(ap + (3 * H + hc)[None, :], mask=vh, other=0.0)
            cp = tl.load(s_cprev + trow[:, None] * H + hc[None, :], mask=vh, other=0.0)
            cn = tl.load(s_c + trow[:, None] * H + hc[None, :], mask=vh, other=0.0)
            # c carried to the next step: c = zc * c_{t-1} + (1 - zc) * c_t
            if ZONE_C:
                if ZONE == 1:
                    zc = tl.load(zone_c + trow[:, None] * H + hc[None, :], mask=vh, other=0.0)
                else:
                    zc = zc_p[None, :] + tl.full((BB, HP), 0.0, tl.float32)
                dcn = (1.0 - zc) * dcs
                dc_keep = zc * dcs
            else:
                dcn = dcs
            if LN:
                st = s_stats + trow * 3
                cm = tl.load(st + 1, mask=valid, other=0.0)
                crs = tl.load(st + 2, mask=valid, other=0.0)
                cx = tl.where(hmask[None, :], (cn - cm[:, None]) * crs[:, None], 0.0)
                th = 1.0 - 2.0 / (tl.exp(2.0 * (cx * gac[None, :] + bec[None, :])) + 1.0)
            else:
                th = 1.0 - 2.0 / (tl.exp(2.0 * (cn)) + 1.0)
            do = dh_full * th
            dth = dh_full * og * (1.0 - th * th)
            if LN:
                tl.store(dyc_s + trow[:, None] * H + hc[None, :], dth, mask=vh)
                dxc = tl.where(hmask[None, :], dth * gac[None, :], 0.0)
                m1 = tl.sum(dxc, 1) / H
                m2 = tl.sum(dxc * cx, 1) / H
                dcn += crs[:, None] * (dxc - m1[:, None] - cx * m2[:, None])
            else:
                dcn += dth
            do_pre = do * og * (1.0 - og)
            if PEEP:
                dcn += do_pre * wco[None, :]
            di_pre = dcn * gg * ig * (1.0 - ig)
            df_pre = dcn * cp * fg * (1.0 - fg)
            dg_pre = dcn * ig * (1.0 - gg * gg)
            dc_prev = dcn * fg
            if PEEP:  # as fma: the sum of products crashes LLVM's SLP vectoriser (sm_90)
                dc_prev = tl.fma(di_pre, wci[None, :], tl.fma(df_pre, wcf[None, :], dc_prev))
            if ZONE_C:
                dc_prev += dc_keep
            e0 = di_pre
            e1 = df_pre
            e2 = dg_pre
            e3 = do_pre
            q0 = e0
            q1 = e1
            q2 = e2
            q3 = e3
        elif MODE == 3:  # GRU
            hin = tl.load(s_hin + trow[:, None] * P + pc[None, :], mask=vp, other=0.0)
            rg = tl.load(ap + (0 * H + hc)[None, :], mask=vh, other=0.0)
            zg = tl.load(ap + (1 * H + hc)[None, :], mask=vh, other=0.0)
            ng = tl.load(ap + (2 * H + hc)[None, :], mask=vh, other=0.0)
            ghn = tl.load(ap + (3 * H + hc)[None, :], mask=vh, other=0.0)
            dn = dh_full * (1.0 - zg)
            dz = dh_full * (hin - ng)
            dhin_direct = dh_full * zg
            dn_pre = dn * (1.0 - ng * ng)
            dr_pre = dn_pre * ghn * rg * (1.0 - rg)
            dz_pre = dz * zg * (1.0 - zg)
            e0 = dr_pre
            e1 = dz_pre
            e2 = dn_pre
            q0 = dr_pre
            q1 = dz_pre
            q2 = dn_pre * rg
        else:  # Elman
            hn = tl.load(ap + hc[None, :], mask=vh, other=0.0)
            if MODE == 0:
                e0 = dh_full * (1.0 - hn * hn)
            else:
                e0 = tl.where(hn > 0.0, dh_full, 0.0)
            q0 = e0

        # e_k: d(input pre-activations), q_k: d(recurrent ones, after LayerNorm and bias)
        gxp = dgx + trow[:, None] * G
        tl.store(gxp + (0 * H + hc)[None, :], e0, mask=vh)
        if NG > 1:
            tl.store(gxp + (1 * H + hc)[None, :], e1, mask=vh)
            tl.store(gxp + (2 * H + hc)[None, :], e2, mask=vh)
        if NG > 3:
            tl.store(gxp + (3 * H + hc)[None, :], e3, mask=vh)
        if MODE == 3:
            ghp = dgh + trow[:, None] * G
            tl.store(ghp + (0 * H + hc)[None, :], q0, mask=vh)
            tl.store(ghp + (1 * H + hc)[None, :], q1, mask=vh)
            tl.store(ghp + (2 * H + hc)[None, :], q2, mask=vh)
        if LN:  # back through LayerNorm(h_{t-1} W_hh^T): r_k = d raw
            xp = s_xhat + trow[:, None] * G
            x0 = tl.load(xp + (0 * H + hc)[None, :], mask=vh, other=0.0)
            x1 = tl.load(xp + (1 * H + hc)[None, :], mask=vh, other=0.0)
            x2 = tl.load(xp + (2 * H + hc)[None, :], mask=vh, other=0.0)
            rstd = tl.load(s_stats + trow * 3, mask=valid, other=0.0)
            y0 = q0 * ga0[None, :]
            y1 = q1 * ga1[None, :]
            y2 = q2 * ga2[None, :]
            m1 = tl.sum(y0, 1) + tl.sum(y1, 1) + tl.sum(y2, 1)
            m2 = tl.sum(y0 * x0, 1) + tl.sum(y1 * x1, 1) + tl.sum(y2 * x2, 1)
            if NG > 3:
                x3 = tl.load(xp + (3 * H + hc)[None, :], mask=vh, other=0.0)
                y3 = q3 * ga3[None, :]
                m1 += tl.sum(y3, 1)
                m2 += tl.sum(y3 * x3, 1)
            m1 = m1 / G
            m2 = m2 / G
            r0 = tl.where(vh, rstd[:, None] * (y0 - m1[:, None] - x0 * m2[:, None]), 0.0)
            r1 = tl.where(vh, rstd[:, None] * (y1 - m1[:, None] - x1 * m2[:, None]), 0.0)
            r2 = tl.where(vh, rstd[:, None] * (y2 - m1[:, None] - x2 * m2[:, None]), 0.0)
            rp_ = dghr + trow[:, None] * G
            tl.store(rp_ + (0 * H + hc)[None, :], r0, mask=vh)
            tl.store(rp_ + (1 * H + hc)[None, :], r1, mask=vh)
            tl.store(rp_ + (2 * H + hc)[None, :], r2, mask=vh)
            if NG > 3:
                r3 = tl.where(vh, rstd[:, None] * (y3 - m1[:, None] - x3 * m2[:, None]), 0.0)
                tl.store(rp_ + (3 * H + hc)[None, :], r3, mask=vh)
        else:
            r0 = tl.where(vh, q0, 0.0)
            if NG > 1:
                r1 = tl.where(vh, q1, 0.0)
                r2 = tl.where(vh, q2, 0.0)
            if NG > 3:
                r3 = tl.where(vh, q3, 0.0)

        # d h_{t-1}: through the recurrent GEMM, GRU's z * h_{t-1}, state dropout and zoneout
        if STEPWISE:  # the host multiplies by W_hh; this step keeps the rest in dpart
            sp = dghr_step + srow[:, None] * G
            tl.store(sp + (0 * H + hc)[None, :], r0.to(dghr_step.dtype.element_ty), mask=rh)
            if NG > 1:
                tl.store(sp + (1 * H + hc)[None, :], r1.to(dghr_step.dtype.element_ty), mask=rh)
                tl.store(sp + (2 * H + hc)[None, :], r2.to(dghr_step.dtype.element_ty), mask=rh)
            if NG > 3:
                tl.store(sp + (3 * H + hc)[None, :], r3.to(dghr_step.dtype.element_ty), mask=rh)
            dhin = tl.full((BB, PP), 0.0, tl.float32)
        else:
            dhin = tl.dot(r0.to(w0.dtype), w0, input_precision=DOT_PREC)  # (BB, PP)
            if NG > 1:
                dhin += tl.dot(r1.to(w0.dtype), w1, input_precision=DOT_PREC)
                dhin += tl.dot(r2.to(w0.dtype), w2, input_precision=DOT_PREC)
            if NG > 3:
                dhin += tl.dot(r3.to(w0.dtype), w3, input_precision=DOT_PREC)
        if not HOST_PROJ:  # (with HOST_PROJ, proj_backward_kernel keeps the rest of d h_{t-1})
            if SMASK:
                dh_prev = dhin * sm
            else:
                dh_prev = dhin
            if MODE == 3:  # the carry's z * dh_t, past the state dropout mask
                dh_prev += dhin_direct
            if ZONE != 0:
                dh_prev += dh_keep
            dh = tl.where(valid[:, None], dh_prev, dh)
        if MODE == 2:
            dcs = tl.where(valid[:, None], dc_prev, dcs)

    if STEPWISE:
        # after this step: d h_{t-1} = (dghr_t W_hh) * smask + dpart, the host's GEMM adds the
        # first term; invalid rows wrote dghr = 0 and pass dh on unchanged in dpart
        if not HOST_PROJ:
            tl.store(dpart + srow[:, None] * P + pc[None, :], dh, mask=rp)

        if NG == 4:
            tl.store(dc + srow[:, None] * H + hc[None, :], dcs, mask=rh)
    else:
        tl.store(dh0 + srow[:, None] * P + pc[None, :], dh, mask=rp)
        if NG == 4:
            tl.store(dc0 + srow[:, None] * H + hc[None, :], dcs, mask=rh)


@triton.jit(do_not_specialize=_RUNTIME_PROJ)
def proj_forward_kernel(
    hp_step, h_state, out, hin_next, lengths, smask, zone_h,
    t, T, B, P, D, rev0, rev1,
    HAS_LEN: tl.constexpr,
    SMASK: tl.constexpr,
    ZONE: tl.constexpr,
    BB: tl.constexpr,
    PT: tl.constexpr,  # state columns per program
):  # fmt: skip
    """The end of a projected LSTM's step t, one launch per step (forward_kernel with
    HOST_PROJ ran the cell, the host's GEMM projected it): hp_step (D, B, P) = W_hr h_full;
    zoneout, the output, the state h_state (D, B, P, fp32, in place) and the next GEMM's input
    hin_next (D, B, P) = h_t * smask."""
    pid_b = tl.program_id(0)
    d = tl.program_id(1)
    rev = tl.where(d == 0, rev0, rev1)
    rows = pid_b * BB + tl.arange(0, BB)
    rmask = rows < B
    pc = tl.program_id(2) * PT + tl.arange(0, PT)
    pmask = pc < P
    rp = rmask[:, None] & pmask[None, :]
    srow = (d * B + rows).to(tl.int64)
    if HAS_LEN:
        L = tl.load(lengths + rows, mask=rmask, other=0).to(tl.int32)
    else:
        L = tl.full((BB,), 0, tl.int32) + T
    valid = rmask & (t < L)
    tt = tl.where(rev != 0, L - 1 - t, t)
    tt = tl.where(valid, tt, 0)
    vp = valid[:, None] & pmask[None, :]
    sp = srow[:, None] * P + pc[None, :]
    h = tl.load(h_state + sp, mask=rp, other=0.0)
    h_new = tl.load(hp_step + sp, mask=rp, other=0.0).to(tl.float32)
    if ZONE == 1:
        trow = ((d * T + tt) * B + rows).to(tl.int64)
        zh = tl.load(zone_h + trow[:, None] * P + pc[None, :], mask=vp, other=0.0)
        h_new = zh * h + (1.0 - zh) * h_new
    elif ZONE == 2:
        zh_p = tl.load(zone_h + d * P + pc, mask=pmask, other=0.0)
        h_new = zh_p[None, :] * h + (1.0 - zh_p[None, :]) * h_new
    optr = out + (tt * B + rows).to(tl.int64)[:, None] * (D * P) + d * P + pc[None, :]
    tl.store(optr, h_new.to(out.dtype.element_ty), mask=vp)
    h = tl.where(valid[:, None], h_new, h)
    tl.store(h_state + sp, h, mask=rp)
    if SMASK:
        h = h * tl.load(smask + sp, mask=rp, other=0.0).to(tl.float32)
    tl.store(hin_next + sp, h.to(hin_next.dtype.element_ty), mask=rp)


@triton.jit(do_not_specialize=_RUNTIME_PROJ)
def proj_backward_kernel(
    grad_out, dh_in, dpart, lengths, smask, zone_h, dh_new_s, dh_new_step,
    t, T, B, P, D, rev0, rev1,
    HAS_LEN: tl.constexpr,
    HAS_GOUT: tl.constexpr,
    SMASK: tl.constexpr,
    ZONE: tl.constexpr,
    BB: tl.constexpr,
    PT: tl.constexpr,
):  # fmt: skip
    """The start of a projected LSTM's backward step t, one launch per step: the state's
    gradient dh = dh_in * smask + dpart (dh_in: the host's GEMM dghr_{t+1} W_hh), plus
    d out_t, split by zoneout into d(W_hr h_full) -> dh_new_step (D, B, P) for the host's GEMM
    (and dh_new_s (D, T, B, P) for dW_hr) and the part kept from h_{t-1} -> dpart (in place);
    backward_kernel with HOST_PROJ then runs the cell."""
    pid_b = tl.program_id(0)
    d = tl.program_id(1)
    rev = tl.where(d == 0, rev0, rev1)
    rows = pid_b * BB + tl.arange(0, BB)
    rmask = rows < B
    pc = tl.program_id(2) * PT + tl.arange(0, PT)
    pmask = pc < P
    rp = rmask[:, None] & pmask[None, :]
    srow = (d * B + rows).to(tl.int64)
    if HAS_LEN:
        L = tl.load(lengths + rows, mask=rmask, other=0).to(tl.int32)
    else:
        L = tl.full((BB,), 0, tl.int32) + T
    valid = rmask & (t < L)
    tt = tl.where(rev != 0, L - 1 - t, t)
    tt = tl.where(valid, tt, 0)
    trow = ((d * T + tt) * B + rows).to(tl.int64)
    vp = valid[:, None] & pmask[None, :]
    sp = srow[:, None] * P + pc[None, :]
    dh = tl.load(dpart + sp, mask=rp, other=0.0)
    dhin = tl.load(dh_in + sp, mask=rp, other=0.0)
    if SMASK:
        dhin = dhin * tl.load(smask + sp, mask=rp, other=0.0).to(tl.float32)
    dh += dhin
    dht = dh
    if HAS_GOUT:
        gp = grad_out + (tt * B + rows).to(tl.int64)[:, None] * (D * P) + d * P + pc[None, :]
        dht += tl.load(gp, mask=vp, other=0.0).to(tl.float32)
    if ZONE == 1:
        zh = tl.load(zone_h + trow[:, None] * P + pc[None, :], mask=vp, other=0.0)
        dh_new = (1.0 - zh) * dht
        dh_keep = zh * dht
    elif ZONE == 2:
        zh_p = tl.load(zone_h + d * P + pc, mask=pmask, other=0.0)
        dh_new = (1.0 - zh_p[None, :]) * dht
        dh_keep = zh_p[None, :] * dht
    else:
        dh_new = dht
        dh_keep = tl.full((BB, PT), 0.0, tl.float32)
    tl.store(dh_new_s + trow[:, None] * P + pc[None, :], dh_new, mask=vp)
    tl.store(dh_new_step + sp, tl.where(vp, dh_new, 0.0).to(dh_new_step.dtype.element_ty), mask=rp)
    tl.store(dpart + sp, tl.where(valid[:, None], dh_keep, dh), mask=rp)


#: True when the kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors).

INTERPRETED = not isinstance(forward_kernel, triton.runtime.JITFunction)
