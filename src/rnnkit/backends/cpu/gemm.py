"""Where the cpu kernels' GEMMs come from, chosen on the machine that runs them by measurement.

A call's GEMMs fall in two classes: the recurrent step's (B rows times the recurrent weight,
prepared once per call) and the bulk ones over all steps (the input projection, dx and the
weight gradients). The best source differs by machine (MKL's BLAS takes a slow path on some
CPUs; bfloat16 needs the CPU's bf16 instructions), so nothing here is decided in advance: at
the first call of a shape class each available source (:data:`SOURCES`) runs that class's GEMM
for a few milliseconds, the fastest is kept, and the choice is cached in memory and on disk
(``gemm-<machine>.json`` in the kernels' cache directory, keyed by the CPU, torch and the thread
count). ``RNNKIT_GEMM=<source>`` forces one source for every GEMM; :func:`rnnkit.explain` shows
the choice. Under torch.compile nothing is measured: the graph keeps the source
``RNNKIT_GEMM`` forces when the layer is traced, else MKL (``RNNKIT_SPLIT`` likewise).

How the recurrent steps use the threads is measured the same way. Either every step's GEMM and
row pass are spread over the threads (a fork and a join per step, the weight shared), or the
batch is split into one slice per thread and each thread runs all the steps of its slice alone
(sequences are independent: no synchronisation per step, but each thread streams the whole
recurrent weight through its own cache). The second wins where the step is small or the weight
fits a core's cache, the first where the weight is large; at the first call of a step shape
each source's step GEMM is timed both ways (:data:`ROLES` "step" and "split"), each source is
ranked by its faster way (the split where it is not slower), and the chosen source runs that
way. ``RNNKIT_SPLIT=on|off`` forces it (the sources are then timed that way alone).

Sources (ops.cpp's GemmSource):

* ``mkl``: MKL's BLAS as libtorch exports it (``sgemm_``, its packed API for the step, and
  ``cblas_gemm_bf16bf16f32`` for bfloat16);
* ``torch``: ATen's matrix product through the dispatcher, no extra dependency (torch's own
  MKL for float32, its oneDNN for bfloat16);
* ``onednn``: oneDNN 3's matmul primitive, the step's weight reordered once per call into the
  layout the primitive prefers, from the GOMP-threaded ``onednn-cpu-gomp`` wheel (the
  ``rnnkit[onednn]`` extra). The kernels never link against it: its library is opened at first
  use (:func:`onednn_library` says where), and without it the source is simply unavailable.
* ``avx2``: rnnkit's own float32 step (gemm_avx2.cpp), for the step alone: the recurrent weight
  packed once per call into the panels its AVX2/FMA kernel reads, so that no step copies it
  (MKL's packed API copies it again at every call where MKL takes its generic path, as on AMD
  CPUs). Available where the kernels were compiled with AVX2 and FMA; never in bfloat16. It is
  measured for the step only; forced by ``RNNKIT_GEMM=avx2``, the bulk GEMMs take MKL.

bfloat16 GEMMs (operands rounded to bfloat16, products accumulated in float32) are used only
where :func:`bf16_supported` says the CPU has bf16 instructions.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..env import forced_choice
from . import build

__all__ = [
    "BULK_FOR_STEP_ONLY",
    "ENV",
    "SOURCES",
    "SPLIT_ENV",
    "STEP_ONLY",
    "Plan",
    "bf16_supported",
    "forced",
    "forced_split",
    "onednn_library",
    "onednn_problem",
    "open_sources",
    "plan",
    "probe",
]

#: The GEMM sources by ops.cpp's id.
SOURCES = ("mkl", "torch", "onednn", "avx2")
#: The sources of the recurrent step alone, and the bulk source a plan forcing one of them takes.
STEP_ONLY = ("avx2",)
BULK_FOR_STEP_ONLY = "mkl"
#: What gemm_probe measures: the recurrent step, the input projection, the weight gradients, and
#: the recurrent step split by rows, each thread its own slice (as split steps run it).
ROLES = ("step", "bulk", "wgrad", "split")
#: The environment variable that forces a source ("auto": measure).
ENV = "RNNKIT_GEMM"
#: The environment variable that forces the steps split by batch or not ("auto": measure).
SPLIT_ENV = "RNNKIT_SPLIT"
#: Seconds of measurement per source and shape class.
BUDGET = 0.004
#: How much faster (ratio of times) another source must measure to replace the first one.
MARGIN = 1.1
#: The bulk GEMMs are measured on at most this many rows (their rate has settled by then).
BULK_ROWS = 4096
#: The wheel that brings the onednn source's library, and the library's file name in it.
ONEDNN_WHEEL = "onednn-cpu-gomp==2023.2.0"
ONEDNN_LIBRARY = "libdnnl.so.3"
#: An environment variable naming another libdnnl.so.3 (an OpenMP build of oneDNN 3) to open.
ONEDNN_ENV = "RNNKIT_ONEDNN_LIBRARY"

_lock = threading.Lock()
_memory: dict[str, dict] = {}
_loaded = False


@dataclass(frozen=True)
class Plan:
    """A call's GEMMs: the step's source, the bulk source, bfloat16 operands or not, how the
    sources were chosen (in words, for :func:`rnnkit.explain`), and whether the steps run split
    by batch, one slice per thread."""

    step: str
    bulk: str
    bf16: bool
    how: str
    split: bool = False

    def args(self) -> tuple[int, int, bool, bool]:
        """The ops' ``gemm_step, gemm_bulk, bf16, split``."""
        return SOURCES.index(self.step), SOURCES.index(self.bulk), self.bf16, self.split

    def __str__(self) -> str:
        kind = "bf16 x bf16 -> fp32" if self.bf16 else "fp32"
        steps = "; steps split by batch, one slice per thread" if self.split else ""
        return f"GEMMs {kind}: step {self.step}, bulk {self.bulk}{steps} ({self.how})"


_bf16: bool | None = None  # bf16_supported's answer, once asked


def bf16_supported() -> bool:
    """Whether this CPU runs bfloat16 GEMMs natively, by torch's own check (oneDNN's: avx512_bf16,
    AMX or avx_ne_convert); elsewhere they would be emulated at a fraction of float32's rate."""
    global _bf16
    if _bf16 is None:
        try:
            _bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # pragma: no cover - a torch without oneDNN
            _bf16 = False
    return _bf16


def forced() -> str | None:
    """The source ``RNNKIT_GEMM`` forces, or None ("auto" or unset)."""
    return forced_choice(ENV, SOURCES)


def forced_split() -> bool | None:
    """Whether ``RNNKIT_SPLIT`` forces the steps split by batch (True), not split (False), or
    leaves it to measurement (None: "auto" or unset)."""
    value = os.environ.get(SPLIT_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("on", "1", "true", "yes"):
        return True
    if value in ("off", "0", "false", "no"):
        return False
    raise ValueError(f"{SPLIT_ENV} = {value!r}; expected auto, on or off")


@functools.cache
def _machine() -> str:
    """The CPU (model and flags), torch's version and its BLAS: what decides the rates."""
    cpu = ""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        keep = [
            line for line in text.splitlines() if line.startswith(("model name", "flags", "vendor"))
        ]
        cpu = "\n".join(sorted(set(keep)))
    h = hashlib.sha256()
    h.update(cpu.encode())
    h.update(torch.__version__.encode())
    h.update(torch.__config__.show().encode())
    return h.hexdigest()[:16]


def _file() -> Path:
    return build.cache_dir() / f"gemm-{_machine()}.json"


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(_file().read_text())
        if isinstance(data, dict):
            _memory.update({k: v for k, v in data.items() if isinstance(v, dict)})


def _save() -> None:
    path = _file()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(_memory, indent=1, sort_keys=True))
        os.replace(tmp, path)


def onednn_library() -> Path | None:
    """Where the onednn source's library is: ``$RNNKIT_ONEDNN_LIBRARY``, else the
    ``libdnnl.so.3`` the ``onednn-cpu-gomp`` distribution installed (it unpacks it at the
    environment's root, ``sys.prefix/lib``), else None."""
    given = os.environ.get(ONEDNN_ENV, "").strip()
    if given:
        return Path(given)
    return _installed_library()


@functools.cache
def _installed_library() -> Path | None:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        for f in importlib.metadata.distribution("onednn-cpu-gomp").files or ():
            if f.name == ONEDNN_LIBRARY:
                return Path(str(f.locate())).resolve()
    path = Path(sys.prefix) / "lib" / ONEDNN_LIBRARY
    return path if path.is_file() else None


_onednn_problems: dict[str, str | None] = {}  # by library path: why it could not be opened


def onednn_problem() -> str | None:
    """None when the onednn source's library is open (opened now at the first call), else why
    it is not, in words."""
    path = onednn_library()
    if path is None:
        return f"the {ONEDNN_WHEEL.split('==')[0]} package is not installed"
    key = str(path)
    if key not in _onednn_problems:
        if not path.is_file():
            _onednn_problems[key] = f"{path} does not exist"
        else:
            build.ensure()
            _onednn_problems[key] = torch.ops.rnnkit_cpu.onednn_load(key) or None
    return _onednn_problems[key]


def available(source: str, bf16: bool) -> bool:
    """Whether ``source`` can run here (in bfloat16 with ``bf16``)."""
    build.ensure()
    if source == "onednn" and onednn_problem() is not None:
        return False
    return bool(torch.ops.rnnkit_cpu.gemm_available(SOURCES.index(source), bf16))


def _check_forced(source: str) -> None:
    """Raise, in one line, if a forced source cannot run here."""
    if source in STEP_ONLY and not available(source, False):
        raise RuntimeError(
            f"{ENV} = {source!r} but the cpu kernels were compiled without AVX2 and FMA (this "
            f"CPU lacks them); expected one of {', '.join(s for s in SOURCES if s != source)}"
        )
    if source == "onednn":
        why = onednn_problem()
        if why is not None:
            raise RuntimeError(
                f"{ENV} = 'onednn' but oneDNN cannot be used: {why}; install it with "
                f"`pip install {ONEDNN_WHEEL}` (or `pip install 'rnnkit[onednn]'`)"
            )


def open_sources(step: int, bulk: int) -> None:
    """Open oneDNN where the ops' ``gemm_step`` or ``gemm_bulk`` names it, as :func:`plan` does
    for an eager call (a compiled graph's plan is made while tracing, where nothing is opened);
    RuntimeError in one line where it cannot be used."""
    if SOURCES.index("onednn") in (step, bulk):
        with _lock:
            _check_forced("onednn")


def probe(source: str, bf16: bool, role: str, m: int, n: int, k: int, budget: float = BUDGET):
    """Seconds per call (the fastest of the calls) of ``source``'s GEMM C (m, n) = op(A) . op(B)
    as the kernels run it in ``role`` ("step": A (m, k) . B^T, B prepared once; "bulk": A . B^T,
    the input projection; "wgrad": A^T (m, k) . B (k, n), the weight gradients; "split": the
    step with each thread of the pool on its own slice of the m rows at once), measured for
    about ``budget`` seconds. The fastest call, not the median: on a shared machine a call can
    only be slowed down (descheduled threads), never sped up."""
    return min(_calls(source, bf16, role, m, n, k, budget))


def _calls(source: str, bf16: bool, role: str, m: int, n: int, k: int, budget: float):
    build.ensure()
    op = torch.ops.rnnkit_cpu.gemm_probe
    sid, rid = SOURCES.index(source), ROLES.index(role)
    first = op(sid, bf16, rid, m, n, k, 1)[0]
    reps = int(min(50, max(3, budget / max(first, 1e-7))))
    return op(sid, bf16, rid, m, n, k, reps)


def _interleaved(candidates: dict[Any, tuple[int, int]], bf16: bool, m: int, n: int, k: int):
    """Seconds per call of each candidate (name -> gemm_probe's source and role ids), in
    interleaved rounds for about :data:`BUDGET` seconds each; the fastest call of each."""
    build.ensure()
    op = torch.ops.rnnkit_cpu.gemm_probe
    rounds = 3
    best = {c: op(sid, bf16, rid, m, n, k, 1)[0] for c, (sid, rid) in candidates.items()}
    reps = {c: int(min(20, max(1, BUDGET / rounds / max(t, 1e-7)))) for c, t in best.items()}
    for _ in range(rounds):
        for c, (sid, rid) in candidates.items():
            best[c] = min(best[c], *op(sid, bf16, rid, m, n, k, reps[c]))
    return best


def _remember(key: str, choice: dict, seconds: dict[str, float], m: int, n: int, k: int) -> None:
    """Keep a shape class's choice with each candidate's GFLOP/s, in memory and on disk."""
    flops = 2.0 * m * n * k
    _memory[key] = {**choice, "gflops": {c: round(flops / t / 1e9, 1) for c, t in seconds.items()}}
    _save()


def _pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _best(role: str, bf16: bool, m: int, n: int, k: int) -> tuple[str, bool]:
    """The fastest source for one shape class, and whether it was measured just now. The step's
    sources are timed in the schedule each would run (see :func:`_schedules`): a source whose
    split steps are fast must not lose to one that is faster only unsplit."""
    key = f"{role}:{'bf16' if bf16 else 'fp32'}:m{m}:n{n}:k{k}:t{torch.get_num_threads()}"
    sources = [s for s in SOURCES if (role == "step" or s not in STEP_ONLY) and available(s, bf16)]
    entry = _memory.get(key)
    # kept while it measured every source available now (one installed since is measured), and
    # measured again where the file holds something else under its key
    if (
        entry is not None
        and entry.get("best") in sources
        and isinstance(entry.get("gflops"), dict)
        and set(sources) <= set(entry["gflops"])
    ):
        return entry["best"], False
    schedules = _schedules(m) if role == "step" else (role,)
    candidates = {(s, r): (SOURCES.index(s), ROLES.index(r)) for s in sources for r in schedules}
    timed = _interleaved(candidates, bf16, m, n, k)
    if len(sources) > 1 and max(timed.values()) > MARGIN * min(timed.values()):
        # a difference: measured again, so that one stalled pass (the machine's other work
        # descheduling our threads) cannot decide alone
        again = _interleaved(candidates, bf16, m, n, k)
        timed = {c: min(timed[c], again[c]) for c in candidates}
    # each source in its faster schedule, whose choice is kept as _split reads it
    seconds = {s: min(timed[(s, r)] for r in schedules) for s in sources}
    if len(schedules) > 1:
        for s in sources:
            _keep_split(s, bf16, m, n, k, {r: timed[(s, r)] for r in schedules})
    # The first available source (MKL where torch exports it) is kept unless another is clearly
    # faster: a few milliseconds of measurement cannot resolve a few percent.
    best = sources[0]
    for s in sources[1:]:
        if seconds[s] < seconds[best] / MARGIN:
            best = s
    _remember(key, {"best": best}, seconds, m, n, k)
    return best, True


def _schedules(m: int) -> tuple[str, ...]:
    """The roles the step's sources are timed in: "split" (the steps split by batch) or "step"
    (threaded per step) where RNNKIT_SPLIT forces one or where there is nothing to split (one
    thread, one sequence), both where the split is measured."""
    force = forced_split()
    if torch.get_num_threads() < 2 or m < 2:
        return ("step",)
    if force is not None:
        return ("split",) if force else ("step",)
    return ("step", "split")


def plan(steps: int, batch: int, input_size: int, hidden: int, gates: int, bf16: bool) -> Plan:
    """The GEMM plan of a call of these sizes (T, B, I, H and the cell's gate count): forced by
    ``RNNKIT_GEMM``, cached, or measured now. ``bf16`` asks for bfloat16 operands, granted where
    :func:`bf16_supported`."""
    if torch.compiler.is_compiling():  # nothing is measured while tracing; a forced source is
        step, split, how = _compiling_plan(batch)  # kept (read when the trace is made)
        return Plan(step, _bulk_for(step), bf16 and bool(_bf16), how, split)
    bf16 = bf16 and bf16_supported()
    key = (steps, batch, input_size, hidden, gates, bf16, torch.get_num_threads(),
           os.environ.get(ENV), os.environ.get(SPLIT_ENV))  # fmt: skip
    known = _plans.get(key)
    if known is not None:
        return known
    found = _plan(steps, batch, input_size, hidden, gates, bf16)
    if len(_plans) >= 4096:  # many distinct lengths and batch sizes: start over
        _plans.clear()
    _plans[key] = replace(found, how=_EARLIER) if found.how == "measured now" else found
    return found


@torch.compiler.assume_constant_result
def _compiling_plan(batch: int) -> tuple[str, bool, str]:
    """The plan of a call traced by torch.compile, run as plain Python while tracing (its answer
    is a constant of the graph): the source ``RNNKIT_GEMM`` forces, else MKL; the steps split
    by batch where ``RNNKIT_SPLIT`` forces it. Nothing is measured or opened while tracing (the
    op opens oneDNN when it runs: :func:`open_sources`): a compiled graph keeps what the
    environment said when it was traced."""
    source = forced()
    split = bool(forced_split()) and torch.get_num_threads() > 1 and batch > 1
    how = f"forced by {ENV} while compiling" if source is not None else "default while compiling"
    return source or "mkl", split, how


#: plan's answers by its arguments, the thread count and RNNKIT_GEMM: the measurements they
#: rest on are cached, so each is worked out once (a call's overhead matters at small sizes).
_plans: dict[tuple, Plan] = {}
_EARLIER = "measured earlier on this machine"


def _plan(steps: int, batch: int, input_size: int, hidden: int, gates: int, bf16: bool) -> Plan:
    source = forced()
    g = gates * hidden
    step_shape = (max(1, batch), max(1, g), max(1, hidden))
    bulk_shape = (min(BULK_ROWS, _pow2(max(1, steps * batch))), max(1, g), max(1, input_size))
    with _lock:
        _load()
        if source is not None:
            _check_forced(source)
            step, bulk = source, _bulk_for(source)
            new_step = new_bulk = False
        else:
            step, new_step = _best("step", bf16, *step_shape)
            bulk, new_bulk = _best("bulk", bf16, *bulk_shape)
        split, new_split = _split(step, bf16, *step_shape)
    if source is not None:
        how = f"forced by {ENV}"
    else:
        how = "measured now" if new_step or new_bulk or new_split else _EARLIER
    return Plan(step, bulk, bf16, how, split)


def _bulk_for(source: str) -> str:
    """The bulk GEMMs' source when ``source`` is forced for every GEMM: itself, or MKL's BLAS
    for a step-only source (the C++ side falls back to ATen's where MKL is absent)."""
    return BULK_FOR_STEP_ONLY if source in STEP_ONLY else source


def _split(source: str, bf16: bool, m: int, n: int, k: int) -> tuple[bool, bool]:
    """Whether the steps of this step shape run split by batch (see the module's docstring),
    and whether that was measured just now: forced by ``RNNKIT_SPLIT``, off with one thread or
    one sequence, else the step GEMM from ``source`` timed both ways, interleaved (cached like
    the sources)."""
    schedules = _schedules(m)
    if len(schedules) == 1:
        return schedules == ("split",), False
    entry = _memory.get(_split_key(source, bf16, m, n, k))
    if entry is not None and isinstance(entry.get("split"), bool):
        return entry["split"], False
    sid = SOURCES.index(source)
    seconds = _interleaved({r: (sid, ROLES.index(r)) for r in schedules}, bf16, m, n, k)
    return _keep_split(source, bf16, m, n, k, seconds), True


def _keep_split(source: str, bf16: bool, m: int, n: int, k: int, seconds: dict) -> bool:
    """Whether ``source``'s steps run split, from its step GEMM's ``seconds`` each way, kept
    with them. Ties go to the split: its GEMM time aside, it saves a fork and a join per step."""
    split = seconds["split"] <= seconds["step"]
    _remember(_split_key(source, bf16, m, n, k), {"split": split}, seconds, m, n, k)
    return split


def _split_key(source: str, bf16: bool, m: int, n: int, k: int) -> str:
    threads = torch.get_num_threads()
    return f"split:{source}:{'bf16' if bf16 else 'fp32'}:m{m}:n{n}:k{k}:t{threads}"


def table() -> dict[str, dict]:
    """Every shape class measured on this machine: the best source and each source's GFLOP/s."""
    with _lock:
        _load()
        return {k: dict(v) for k, v in _memory.items()}


def clear() -> None:
    """Forget the measurements (in memory and on disk): the next call measures again."""
    global _loaded
    with _lock:
        _memory.clear()
        _plans.clear()
        _loaded = True
        with contextlib.suppress(OSError):
            _file().unlink()
