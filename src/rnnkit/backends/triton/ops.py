"""The Triton kernels as ``torch.library`` custom ops, with fake (meta) kernels and autograd.

``rnnkit::triton_forward`` runs one layer (every direction of it: D = 1 or 2) over the whole
sequence and returns, besides ``(out, h_n, c_n)``, what its backward needs;
``rnnkit::triton_backward`` is the hand-written backpropagation through time. Autograd,
torch.compile and torch.export see one op each.

Shapes (D directions; G = gates * H; P = H, or the projection's size):

    x, x_b      (T, B, I)   the input; x_b the second direction's own input (None: it reads x)
    h0          (D, B, P)   c0 (D, B, H)  [LSTM family]
    w_ih        (D, G, I)   w_hh (D, G, P)   b_ih, b_hh (D, G)   w_hr (D, P, H)
    peep        (D, 3, H)   the peephole LSTM's w_ci, w_cf, w_co
    ln_ih, ln_hh (D, 2, G)  ln_c (D, 2, H): the LayerNorms' gain and bias
    lengths     (B,) int64
    state_mask  (D, B, P)   state dropout's mask on h_{t-1} (scaled by 1/(1-p))
    zone_h      (D, T, B, P) 0/1 per step, or (D, P) eval-mode probabilities; zone_c (.., H)
    reverse     bit d set: direction d reads each sequence backwards

The input projection of all steps is one GEMM (cuBLAS), the recurrence the Triton kernels of
:mod:`.kernels`, and the weight gradients single GEMMs over all steps at the end.

Defining the ops imports nothing from triton: :mod:`.kernels` is imported at the first launch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from ...cells.table import SPECS
from ..env import forced_choice
from ..first_order import first_order

__all__ = ["dot_precision", "forced_kernel", "kernel_path", "triton_backward", "triton_forward"]

#: Recurrent weights up to this many bytes stay resident in the persistent kernel; larger ones
#: run one launch per step.
PERSISTENT_WEIGHT_BYTES = 64 * 1024
#: Environment variable that forces the kernel shape ("auto": by the weights' size).
KERNEL_ENV = "RNNKIT_TRITON_KERNEL"
#: The kernel shapes.
KERNEL_PATHS = ("persistent", "stepwise")
#: The kernels' cell ids by family (the Elman RNN's are its activation's: the C++ kernel ids 0 tanh,
#: 1 relu); gate counts and everything else come from the cell table.
_FAMILY_IDS = {"lstm": 2, "gru": 3}


def _kernel(mode: str) -> tuple[int, int]:
    """(the kernels' cell id, the gate count) of a built-in ``mode``."""
    spec = SPECS[mode]
    return _FAMILY_IDS.get(spec.family, spec.kernel_id), spec.gate_count


_BB = 16  # batch rows per program wherever a tl.dot needs them (every dot dim >= 16)

_Tensors10 = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
_Tensors13 = tuple[
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
]  # fmt: skip

_kernels: Any = None


def kernels() -> Any:
    """The kernel module, imported (and the kernels defined) at first use."""
    global _kernels
    if _kernels is None:
        from . import kernels as k

        _kernels = k
    return _kernels


def _pow2(n: int, least: int = 16) -> int:
    """The least power of two >= n and >= least."""
    p = least
    while p < n:
        p *= 2
    return p


def _floor_pow2(n: int) -> int:
    """The greatest power of two <= n (1 for n < 2)."""
    p = 1
    while p * 2 <= n:
        p *= 2
    return p


def forced_kernel() -> str | None:
    """The kernel shape ``RNNKIT_TRITON_KERNEL`` forces, or None ("auto" or unset); a
    ValueError naming any other value."""
    return forced_choice(KERNEL_ENV, KERNEL_PATHS)


def kernel_path(mode: str, hidden: int, state: int, proj: bool, dtype: torch.dtype) -> str:
    """ "persistent" when the recurrent weights of one direction fit on chip, else "stepwise"
    (``RNNKIT_TRITON_KERNEL`` forces either)."""
    forced = forced_kernel()
    if forced is not None:
        return forced
    gates = SPECS[mode].gate_count
    tiles = gates * _pow2(hidden) * _pow2(state) + (_pow2(hidden) * _pow2(state) if proj else 0)
    size = tiles * torch.empty(0, dtype=dtype).element_size()
    if size > PERSISTENT_WEIGHT_BYTES:
        return "stepwise"
    if dot_precision(dtype) == "ieee" and _pow2(hidden) > 64:
        return "stepwise"  # exact fp32 dots run on FMA units: wider tiles spill (sm_90)
    return "persistent"


def dot_precision(dtype: torch.dtype) -> str:
    """The precision of the kernels' fp32 ``tl.dot``: "ieee" (exact fp32, the default), or
    "tf32" when ``torch.set_float32_matmul_precision("high")`` (or "medium") allows it, as for
    torch's own matmuls. Other dtypes ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


class _Config:
    """One call's sizes, flags and launch shape: T, B, I; D directions, G = gates * H, P."""

    def __init__(
        self, mode: str, T: int, B: int, D: int, G: int, P: int, proj: bool, dtype: torch.dtype
    ) -> None:
        self.mode = mode
        self.kid, self.gates = _kernel(mode)
        spec = SPECS[mode]
        self.lstm = self.gates == 4
        self.gru = self.kid == 3
        self.ln = spec.layernorm
        self.peep = spec.peephole
        self.proj = proj
        self.T, self.B, self.D, self.G, self.P = T, B, D, G, P
        self.H = G // self.gates
        self.na = 4 if self.gates > 1 else 1  # saved activations per step, in units of H
        self.stepwise = kernel_path(mode, self.H, P, proj, dtype) == "stepwise"
        hp, pp = _pow2(self.H), _pow2(P)
        self.bb = _BB
        self.h_tiles = 1
        # stepwise with a projection: the host's GEMM projects (HOST_PROJ), the kernels stay
        # column-local in H
        self.host_proj = self.stepwise and proj
        if self.stepwise and not self.ln:
            hp = min(hp, 64)  # tiled over H: each program owns HP columns of every gate
            pp = pp if proj else hp
            self.h_tiles = -(-self.H // hp)
        elif self.stepwise:  # LayerNorm needs whole rows; no tl.dot: fewer rows when wide
            self.bb = max(2, min(_BB, _floor_pow2(8192 // (self.gates * hp))))
        self.pt = min(_pow2(P), 64)  # the projection kernels' state columns per program
        self.hp, self.pp = hp, pp
        self.dot_prec = dot_precision(dtype)
        # warps by what a program holds, about 16 values a thread: its resident weights
        # (persistent) or its rows of the step's gates (stepwise); from the register use that
        # ahead.compile_layer reports for sm_90
        held = self.bb * self.gates * hp
        if not self.stepwise:
            held = self.gates * hp * pp + (hp * pp if proj else 0)
        self.num_warps = max(4, min(16, _pow2(-(-held // 512), least=1)))

    @classmethod
    def of(cls, mode: str, x: Tensor, w_hh: Tensor, w_hr: Tensor | None) -> _Config:
        D, G, P = w_hh.shape
        return cls(mode, x.shape[0], x.shape[1], D, G, P, w_hr is not None, w_hh.dtype)

    def grid(self) -> tuple[int, int, int]:
        return (-(-self.B // self.bb), self.D, self.h_tiles)

    def proj_grid(self) -> tuple[int, int, int]:
        return (-(-self.B // _BB), self.D, -(-self.P // self.pt))

    def constants(self) -> dict[str, Any]:
        return {
            "MODE": self.kid,
            "NG": self.gates,
            "PEEP": self.peep,
            "LN": self.ln,
            "PROJ": self.proj,
            "STEPWISE": self.stepwise,
            "HOST_PROJ": self.host_proj,
            "BB": self.bb,
            "HP": self.hp,
            "PP": self.pp,
            "DOT_PREC": self.dot_prec,
            "num_warps": self.num_warps,
            "enable_fp_fusion": True,  # a*b + c as one fma (and no warning that it is a default)
        }


def _or(t: Tensor | None, dummy: Tensor) -> Tensor:
    """``t`` contiguous, or ``dummy`` for an absent tensor."""
    return dummy if t is None else t.contiguous()


def _zone_kind(zone_h: Tensor | None) -> int:
    if zone_h is None:
        return 0
    return 1 if zone_h.dim() == 4 else 2


def _inputs(x: Tensor, x_b: Tensor | None, D: int) -> Tensor:
    """(D, T*B, I): each direction's input."""
    T, B, I = x.shape
    if x_b is None:
        return x.reshape(1, T * B, I).expand(D, T * B, I)
    return torch.stack([x, x_b]).reshape(D, T * B, I)


def _input_gates(
    cfg: _Config,
    x: Tensor,
    x_b: Tensor | None,
    w_ih: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    ln_ih: Tensor | None,
    eps: float,
) -> Tensor:
    """gx (D, T, B, G) fp32: W_ih x_t [LayerNorm'd] + b_ih [+ b_hh where it adds], all steps in
    one batched GEMM."""
    raw = torch.bmm(_inputs(x, x_b, cfg.D), w_ih.transpose(1, 2)).float()  # (D, T*B, G)
    if cfg.ln:
        assert ln_ih is not None
        raw = F.layer_norm(raw, (cfg.G,), eps=eps) * ln_ih[:, :1].float() + ln_ih[:, 1:].float()
    if b_ih is not None:
        raw = raw + b_ih.float().unsqueeze(1)
        if b_hh is not None and not (cfg.gru or cfg.ln):
            raw = raw + b_hh.float().unsqueeze(1)  # (D, 1, G): b_hh adds like b_ih here
    return raw.reshape(cfg.D, cfg.T, cfg.B, cfg.G).contiguous()


@torch.library.custom_op("rnnkit::triton_forward", mutates_args=())
def triton_forward(
    x: Tensor,
    x_b: Tensor | None,
    h0: Tensor,
    c0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
    peep: Tensor | None,
    ln_ih: Tensor | None,
    ln_hh: Tensor | None,
    ln_c: Tensor | None,
    lengths: Tensor | None,
    state_mask: Tensor | None,
    zone_h: Tensor | None,
    zone_c: Tensor | None,
    mode: str,
    reverse: int,
    eps: float,
    save: bool,
) -> _Tensors10:
    """One layer, every direction: ``(out (T, B, D*P), h_n (D, B, P), c_n (D, B, H), act, hin,
    cprev, c, hfull, xhat, stats)``; the last seven are saved for backward (empty unless
    ``save`` and the cell uses them; :mod:`.kernels` lists them)."""
    _check(x, x_b, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, peep, ln_ih, ln_hh, ln_c, lengths,
           state_mask, zone_h, zone_c, mode)  # fmt: skip
    cfg = _Config.of(mode, x, w_hh, w_hr)
    K = kernels()
    T, B, D, G, H, P = cfg.T, cfg.B, cfg.D, cfg.G, cfg.H, cfg.P
    gx = _input_gates(cfg, x, x_b, w_ih, b_ih, b_hh, ln_ih, eps)
    f32 = {"dtype": torch.float32, "device": x.device}
    alloc = torch.zeros if lengths is not None else torch.empty  # zeros at padded steps

    def none() -> Tensor:  # a distinct empty tensor per unused output (outputs never alias)
        return x.new_empty(0, dtype=torch.float32)

    def saved(width: int, used: bool) -> Tensor:
        return alloc(D, T, B, width, **f32) if save and used else none()

    act = saved(cfg.na * H, True)
    hin = saved(P, True)
    cprev = saved(H, cfg.lstm)
    c = saved(H, cfg.lstm)
    hfull = saved(H, cfg.proj)
    xhat = saved(G, cfg.ln)
    stats = saved(3, cfg.ln)
    out = alloc(T, B, D * P, dtype=x.dtype, device=x.device)
    h_n = torch.empty(D, B, P, dtype=h0.dtype, device=x.device)
    c_n = torch.empty(D, B, H, dtype=h0.dtype, device=x.device) if cfg.lstm else none()
    has_bhh = b_hh is not None and (cfg.gru or cfg.ln)
    zone = _zone_kind(zone_h)
    dummy = none()  # a pointer the kernel is given but, by its flags, never reads
    args = dict(
        w_hh=w_hh.contiguous(), b_hh=_or(b_hh if has_bhh else None, dummy),
        w_hr=_or(w_hr, dummy), peep=_or(peep, dummy), ln_hh=_or(ln_hh, dummy),
        ln_c=_or(ln_c, dummy), lengths=_or(lengths, dummy), smask=_or(state_mask, dummy),
        zone_h=_or(zone_h, dummy), zone_c=_or(zone_c, dummy), out=out, s_act=act, s_hin=hin, s_cprev=cprev, s_c=c, s_hfull=hfull, s_xhat=xhat,
        s_stats=stats, T=T, B=B, H=H, P=P, eps=eps,
        HAS_BHH=has_bhh, HAS_LEN=lengths is not None, SMASK=state_mask is not None, ZONE=zone,
        ZONE_C=zone_c is not None, SAVE=save, D=D, rev0=reverse & 1, rev1=(reverse >> 1) & 1,
        **cfg.constants(),
    )  # fmt: skip
    if not cfg.stepwise:
        K.forward_kernel[cfg.grid()](
            gx=gx, gh=dummy, h0=h0.contiguous(), c0=_or(c0, dummy), h_n=h_n, c_n=c_n,
            hin_next=dummy, h_full_step=dummy, t0=0, **args,
        )  # fmt: skip
        return out, h_n, c_n, act, hin, cprev, c, hfull, xhat, stats
    # one launch per step: the state lives in global memory (fp32), the GEMM is the host's
    h_state = h0.float().clone()
    c_state = c0.float().clone() if cfg.lstm and c0 is not None else dummy
    hin_next = (h0 * state_mask if state_mask is not None else h0).to(w_hh.dtype).contiguous()
    gh = torch.empty(D, B, G, dtype=w_hh.dtype, device=x.device)
    w_hh_t = w_hh.transpose(1, 2)  # (D, P, G)
    h_full = h_proj = dummy
    if cfg.host_proj:
        assert w_hr is not None
        h_full = torch.empty(D, B, H, dtype=w_hh.dtype, device=x.device)  # o * tanh(c_t)
        h_proj = torch.empty(D, B, P, dtype=w_hh.dtype, device=x.device)  # W_hr h_full
    for t in range(T):
        torch.bmm(hin_next, w_hh_t, out=gh)  # (D, B, G): h_{t-1} W_hh^T
        K.forward_kernel[cfg.grid()](
            gx=gx, gh=gh, h0=h_state, c0=c_state, h_n=h_state, c_n=c_state, hin_next=hin_next,
            h_full_step=h_full, t0=t, **args,
        )  # fmt: skip
        if cfg.host_proj:
            torch.bmm(h_full, w_hr.transpose(1, 2), out=h_proj)  # (D, B, P)
            K.proj_forward_kernel[cfg.proj_grid()](
                h_proj, h_state, out, hin_next, args["lengths"], args["smask"], args["zone_h"],
                t, T, B, P, D, args["rev0"], args["rev1"], HAS_LEN=args["HAS_LEN"],
                SMASK=args["SMASK"], ZONE=zone, BB=_BB, PT=cfg.pt, enable_fp_fusion=True,
            )  # fmt: skip
    h_n.copy_(h_state)
    if cfg.lstm:
        c_n.copy_(c_state)
    return out, h_n, c_n, act, hin, cprev, c, hfull, xhat, stats


@triton_forward.register_fake
def _forward_fake(
    x, x_b, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, peep, ln_ih, ln_hh, ln_c, lengths, state_mask,
    zone_h, zone_c, mode, reverse, eps, save,
):  # fmt: skip
    T, B, _ = x.shape
    D, G, P = w_hh.shape
    gates = SPECS[mode].gate_count
    H = G // gates
    spec = SPECS[mode]
    lstm = gates == 4

    def none() -> Tensor:
        return x.new_empty(0, dtype=torch.float32)

    def saved(width: int, used: bool) -> Tensor:
        return x.new_empty(D, T, B, width, dtype=torch.float32) if save and used else none()

    return (
        x.new_empty(T, B, D * P),
        h0.new_empty(D, B, P),
        h0.new_empty(D, B, H) if lstm else none(),
        saved((4 if gates > 1 else 1) * H, True),
        saved(P, True),
        saved(H, lstm),
        saved(H, lstm),
        saved(H, w_hr is not None),
        saved(G, spec.layernorm),
        saved(3, spec.layernorm),
    )


@torch.library.custom_op("rnnkit::triton_backward", mutates_args=())
def triton_backward(
    grad_out: Tensor | None,
    grad_hn: Tensor | None,
    grad_cn: Tensor | None,
    x: Tensor,
    x_b: Tensor | None,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    peep: Tensor | None,
    ln_ih: Tensor | None,
    ln_hh: Tensor | None,
    ln_c: Tensor | None,
    lengths: Tensor | None,
    state_mask: Tensor | None,
    zone_h: Tensor | None,
    zone_c: Tensor | None,
    act: Tensor,
    hin: Tensor,
    cprev: Tensor,
    c: Tensor,
    hfull: Tensor,
    xhat: Tensor,
    stats: Tensor,
    mode: str,
    reverse: int,
    eps: float,
    has_bias: bool,
    need_dx: bool,
) -> _Tensors13:
    """Backpropagation through one triton_forward: ``(dx, dx_b, dh0, dc0, dw_ih, dw_hh, db_ih,
    db_hh, dw_hr, dpeep, dln_ih, dln_hh, dln_c)``, empty where the forward had no such input
    (dx, dx_b unless ``need_dx``)."""
    cfg = _Config.of(mode, x, w_hh, w_hr)
    K = kernels()
    T, B, D, G, H, P = cfg.T, cfg.B, cfg.D, cfg.G, cfg.H, cfg.P
    f32 = {"dtype": torch.float32, "device": x.device}
    alloc = torch.zeros if lengths is not None else torch.empty

    def none() -> Tensor:
        return x.new_empty(0, dtype=torch.float32)

    dummy = none()
    dgx = alloc(D, T, B, G, **f32)
    dgh = alloc(D, T, B, G, **f32) if cfg.gru else dgx
    dghr = alloc(D, T, B, G, **f32) if cfg.ln else dgh
    dh_new = alloc(D, T, B, P, **f32) if cfg.proj else dummy
    dyc = alloc(D, T, B, H, **f32) if cfg.ln and cfg.lstm else dummy
    dh0 = torch.empty(D, B, P, **f32)
    dc0 = torch.empty(D, B, H, **f32) if cfg.lstm else none()
    dpart = grad_hn.float().clone() if grad_hn is not None else torch.zeros(D, B, P, **f32)
    dcs = dummy
    if cfg.lstm:
        dcs = grad_cn.float().clone() if grad_cn is not None else torch.zeros(D, B, H, **f32)
    args = dict(
        grad_out=_or(grad_out, dummy), dpart=dpart, dc=dcs, w_hh=w_hh.contiguous(),
        w_hr=_or(w_hr, dummy), peep=_or(peep, dummy), ln_hh=_or(ln_hh, dummy),
        ln_c=_or(ln_c, dummy), lengths=_or(lengths, dummy), smask=_or(state_mask, dummy),
        zone_h=_or(zone_h, dummy), zone_c=_or(zone_c, dummy),
        s_act=act, s_hin=hin, s_cprev=cprev, s_c=c, s_hfull=hfull, s_xhat=xhat, s_stats=stats,
        dgx=dgx, dgh=dgh, dghr=dghr, dh_new_s=dh_new, dyc_s=dyc, dh0=dh0, dc0=dc0,
        T=T, B=B, H=H, P=P, HAS_LEN=lengths is not None, HAS_GOUT=grad_out is not None,
        SMASK=state_mask is not None, ZONE=_zone_kind(zone_h), ZONE_C=zone_c is not None,
        D=D, rev0=reverse & 1, rev1=(reverse >> 1) & 1, **cfg.constants(),
    )  # fmt: skip
    if not cfg.stepwise:
        K.backward_kernel[cfg.grid()](
            dh_in=dummy, dghr_step=dummy, dh_full_step=dummy, t0=T - 1, **args
        )
    else:
        dh_in = torch.zeros(D, B, P, **f32)
        step = torch.empty(D, B, G, dtype=w_hh.dtype, device=x.device)
        dh_full = dummy
        if cfg.host_proj:
            assert w_hr is not None
            dh_proj = torch.empty(D, B, P, dtype=w_hh.dtype, device=x.device)
        for t in reversed(range(T)):
            if cfg.host_proj:  # d(W_hr h_full) and the rest of dh, then the host's GEMM
                K.proj_backward_kernel[cfg.proj_grid()](
                    args["grad_out"], dh_in, dpart, args["lengths"], args["smask"],
                    args["zone_h"], dh_new, dh_proj, t, T, B, P, D, args["rev0"], args["rev1"],
                    HAS_LEN=args["HAS_LEN"],
                    HAS_GOUT=args["HAS_GOUT"], SMASK=args["SMASK"], ZONE=args["ZONE"],
                    BB=_BB, PT=cfg.pt, enable_fp_fusion=True,
                )  # fmt: skip
                dh_full = torch.bmm(dh_proj, w_hr).float()  # (D, B, H)
            K.backward_kernel[cfg.grid()](
                dh_in=dh_in, dghr_step=step, dh_full_step=dh_full, t0=t, **args
            )
            dh_in = torch.bmm(step, w_hh).float()  # (D, B, P): dghr_t W_hh

        dh0 = dh_in * state_mask if state_mask is not None else dh_in
        dh0 = dh0 + dpart
        if cfg.lstm:
            dc0 = dcs

    # -- the weights' gradients: single GEMMs over all T*B rows -----------------------------
    TB = T * B
    dgx2 = dgx.view(D, TB, G)
    dgh2 = dgh.view(D, TB, G)
    xs = _inputs(x, x_b, D)  # (D, TB, I)
    dln_ih, dln_hh, dln_c = none(), none(), none()
    if cfg.ln:  # back through the input-side LayerNorm, recomputed from x
        assert ln_ih is not None and ln_hh is not None
        raw = torch.bmm(xs, w_ih.transpose(1, 2)).float()  # (D, TB, G)
        mu = raw.mean(-1, keepdim=True)
        rstd = torch.rsqrt(raw.var(-1, unbiased=False, keepdim=True) + eps)
        xh = (raw - mu) * rstd
        dln_ih = torch.stack([(dgx2 * xh).sum(1), dgx2.sum(1)], 1)  # (D, 2, G)
        dy = dgx2 * ln_ih[:, :1].float()
        draw = rstd * (dy - dy.mean(-1, keepdim=True) - xh * (dy * xh).mean(-1, keepdim=True))
        xhat2 = xhat.view(D, TB, G)
        dln_hh = torch.stack([(dgh2 * xhat2).sum(1), dgh2.sum(1)], 1)
        if cfg.lstm:
            st = stats.view(D, TB, 3)
            xc = (c.view(D, TB, H) - st[..., 1:2]) * st[..., 2:3]
            dyc2 = dyc.view(D, TB, H)
            dln_c = torch.stack([(dyc2 * xc).sum(1), dyc2.sum(1)], 1)  # (D, 2, H)
    else:
        draw = dgx2
    dx, dx_b = none(), none()
    if need_dx:
        dxs = torch.bmm(draw.to(w_ih.dtype), w_ih)  # (D, TB, I)
        if x_b is None:
            dx = dxs.sum(0).view(x.shape).to(x.dtype)
        else:
            # two outputs, not two views of one tensor (outputs never alias)
            dx, dx_b = (d.reshape(x.shape).to(x.dtype, copy=True) for d in dxs)
    dw_ih = torch.bmm(draw.transpose(1, 2), xs.float())  # (D, G, I)
    if state_mask is not None:  # the step's product read h_{t-1} * mask (hin is unmasked)
        hin = hin * state_mask.unsqueeze(1)
    dw_hh = torch.bmm(dghr.view(D, TB, G).transpose(1, 2), hin.view(D, TB, P))  # (D, G, P)
    db_ih = dgx2.sum(1) if has_bias else none()
    db_hh = dgh2.sum(1) if has_bias else none()
    dw_hr = none()
    if cfg.proj:
        dw_hr = torch.bmm(dh_new.view(D, TB, P).transpose(1, 2), hfull.view(D, TB, H))
    dpeep = none()
    if cfg.peep:
        cp2, c2 = cprev.view(D, TB, H), c.view(D, TB, H)
        di, df, _, do = dgx2.split(H, -1)
        dpeep = torch.stack([(di * cp2).sum(1), (df * cp2).sum(1), (do * c2).sum(1)], 1)

    def like(g: Tensor, t: Tensor | None) -> Tensor:
        return g.to(t.dtype) if t is not None and g.numel() else g

    return (
        dx, dx_b, like(dh0, h0), like(dc0, h0), like(dw_ih, w_ih), like(dw_hh, w_hh),
        like(db_ih, w_ih), like(db_hh, w_ih), like(dw_hr, w_hr), like(dpeep, peep),
        like(dln_ih, ln_ih), like(dln_hh, ln_hh), like(dln_c, ln_c),
    )  # fmt: skip


@triton_backward.register_fake
def _backward_fake(
    grad_out, grad_hn, grad_cn, x, x_b, h0, w_ih, w_hh, w_hr, peep, ln_ih, ln_hh, ln_c, lengths,
    state_mask, zone_h, zone_c, act, hin, cprev, c, hfull, xhat, stats, mode, reverse, eps,
    has_bias, need_dx,
):  # fmt: skip
    D, G, P = w_hh.shape
    gates = SPECS[mode].gate_count
    H = G // gates

    def none() -> Tensor:
        return x.new_empty(0, dtype=torch.float32)

    def opt(t: Tensor | None) -> Tensor:
        return t.new_empty(t.shape) if t is not None else none()

    return (
        x.new_empty(x.shape) if need_dx else none(),
        x.new_empty(x.shape) if need_dx and x_b is not None else none(),
        h0.new_empty(D, h0.shape[1], P),
        h0.new_empty(D, h0.shape[1], H) if gates == 4 else none(),
        w_ih.new_empty(w_ih.shape),
        w_hh.new_empty(w_hh.shape),
        w_ih.new_empty(D, G) if has_bias else none(),
        w_ih.new_empty(D, G) if has_bias else none(),
        opt(w_hr),
        opt(peep),
        opt(ln_ih),
        opt(ln_hh),
        opt(ln_c),
    )


_FORWARD_ARGS = (
    "x", "x_b", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr", "peep", "ln_ih", "ln_hh",
    "ln_c", "lengths", "state_mask", "zone_h", "zone_c", "mode", "reverse", "eps", "save",
)  # fmt: skip


def _setup_context(ctx, inputs, output) -> None:
    a = dict(zip(_FORWARD_ARGS, inputs, strict=True))
    ctx.mode, ctx.reverse, ctx.eps, ctx.save = a["mode"], a["reverse"], a["eps"], a["save"]
    ctx.has_bias = a["b_ih"] is not None
    ctx.has_c0 = a["c0"] is not None
    ctx.has_x_b = a["x_b"] is not None
    saved = output[3:]
    ctx.save_for_backward(
        *(a[n] for n in ("x", "x_b", "h0", "w_ih", "w_hh", "w_hr", "peep", "ln_ih", "ln_hh",
                         "ln_c", "lengths", "state_mask", "zone_h", "zone_c")),
        *saved,
    )  # fmt: skip
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_hn, grad_cn, *_saved_grads):
    if not ctx.save:
        raise RuntimeError(
            "rnnkit::triton_forward ran with save=False (no gradient was expected), so it kept "
            "nothing for backward"
        )
    (x, x_b, h0, w_ih, w_hh, w_hr, peep, ln_ih, ln_hh, ln_c, lengths, state_mask, zone_h, zone_c,
     *saved) = ctx.saved_tensors  # fmt: skip
    need = ctx.needs_input_grad
    need_dx = need[0] or (ctx.has_x_b and need[1])
    r = triton_backward(
        grad_out, grad_hn, grad_cn if ctx.has_c0 else None, x, x_b, h0, w_ih, w_hh, w_hr, peep,
        ln_ih, ln_hh, ln_c, lengths, state_mask, zone_h, zone_c, *saved, ctx.mode, ctx.reverse,
        ctx.eps, ctx.has_bias, need_dx,
    )  # fmt: skip
    # under create_graph=True, linked to what they derive from (a second derivative raises)
    sources = (grad_out, grad_hn, grad_cn, x, x_b, h0, w_ih, w_hh, w_hr, peep, ln_ih, ln_hh, ln_c)
    r = first_order("rnnkit's Triton kernels", r, sources)
    dx, dx_b, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr, dpeep, dln_ih, dln_hh, dln_c = r
    return (
        dx if need_dx else None,
        dx_b if need_dx and ctx.has_x_b else None,
        dh0,
        dc0 if ctx.has_c0 else None,
        dw_ih,
        dw_hh,
        db_ih if ctx.has_bias else None,
        db_hh if ctx.has_bias else None,
        dw_hr if w_hr is not None else None,
        dpeep if peep is not None else None,
        dln_ih if ln_ih is not None else None,
        dln_hh if ln_hh is not None else None,
        dln_c if ln_c is not None else None,
        None,  # lengths
        None,  # state_mask: a constant
        None,  # zone_h: a constant
        None,  # zone_c: a constant
        None,  # mode
        None,  # reverse
        None,  # eps
        None,  # save
    )


triton_forward.register_autograd(_backward, setup_context=_setup_context)


def _check(
    x, x_b, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, peep, ln_ih, ln_hh, ln_c, lengths, state_mask,
    zone_h, zone_c, mode,
) -> None:  # fmt: skip
    """Every tensor the op is given, against the shapes the kernels rely on: a mismatch is an
    error that names it, never a reinterpretation."""
    if mode not in SPECS:
        raise ValueError(f"mode = {mode!r} has no Triton kernel; expected one of {tuple(SPECS)}")
    if x.dim() != 3:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected (T, B, I)")
    T, B, I = x.shape
    if w_hh.dim() != 3:
        raise ValueError(f"w_hh has shape {tuple(w_hh.shape)}; expected (D, G, P)")
    D, G, P = w_hh.shape
    gates = SPECS[mode].gate_count
    if D not in (1, 2) or G % gates:
        raise ValueError(f"w_hh has shape {tuple(w_hh.shape)}; expected (1 or 2, {gates}*H, P)")
    H = G // gates
    spec = SPECS[mode]
    expected: dict[str, tuple[Tensor | None, tuple[int, ...] | None, bool]] = {
        "x_b": (x_b, (T, B, I), False),
        "h0": (h0, (D, B, P), True),
        "c0": (c0, (D, B, H), gates == 4),
        "w_ih": (w_ih, (D, G, I), True),
        "b_ih": (b_ih, (D, G), False),
        "b_hh": (b_hh, (D, G), b_ih is not None),
        "w_hr": (w_hr, (D, P, H), False),
        "peep": (peep, (D, 3, H), spec.peephole),
        "ln_ih": (ln_ih, (D, 2, G), spec.layernorm),
        "ln_hh": (ln_hh, (D, 2, G), spec.layernorm),
        "ln_c": (ln_c, (D, 2, H), spec.layernorm and gates == 4),
        "lengths": (lengths, (B,), False),
        "state_mask": (state_mask, (D, B, P), False),
        "zone_h": (zone_h, None, False),
        "zone_c": (zone_c, None, False),
    }
    if x_b is not None and D != 2:
        raise ValueError("x_b (the second direction's own input) was given for one direction")
    if w_hr is None and P != H:
        raise ValueError(f"w_hh has {P} columns but H = {H} and there is no projection")
    if w_hr is not None and not spec.projection:
        raise ValueError(f"mode {mode!r} has no projection, but w_hr was given")
    for name, (t, shape, required) in expected.items():
        if t is None:
            if required:
                raise ValueError(f"{name} is required for mode {mode!r}")
            continue
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
        if name == "lengths":
            if t.dtype != torch.int64:
                raise ValueError(f"lengths has dtype {t.dtype}; expected torch.int64")
        elif t.dtype != x.dtype and name not in ("zone_h", "zone_c"):
            raise ValueError(f"{name} has dtype {t.dtype}; expected x's ({x.dtype})")
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {shape}")
    for name, t, n in (("zone_h", zone_h, P), ("zone_c", zone_c, H)):
        if t is None:
            continue
        if tuple(t.shape) not in ((D, T, B, n), (D, n)):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; expected {(D, T, B, n)} or {(D, n)}"
            )
        if t.dtype != torch.float32:
            raise ValueError(f"{name} has dtype {t.dtype}; expected torch.float32")
    if zone_c is not None and (zone_h is None or zone_h.dim() != zone_c.dim()):
        raise ValueError("zone_c needs a zone_h of the same kind (per step, or probabilities)")
    if w_ih.dtype != x.dtype:
        raise ValueError(f"w_ih has dtype {w_ih.dtype}; expected x's ({x.dtype})")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"x has dtype {x.dtype}; the Triton kernels take float32, bfloat16, float16"
        )
