"""Where the cpu kernels are slower than torch's own fused op, by measurement: the crossovers
:meth:`rnnkit.backends.cpu.CpuBackend.slower` consults.

:data:`MEASURED` holds benchmarks/bench_rnn.py's interleaved medians (torch.nn time / rnnkit's
cpu-kernel time; > 1: the kernels are faster) for the shapes it runs, per cell, lengths or not,
precision and mode, on the machine :data:`MACHINE` names. A request is compared with the
measured shape nearest to it (in log-distance over T, B, I and H); where torch's op measured
faster there, automatic dispatch leaves the call to it.

The crossovers differ by machine (the GEMM sources' rates, the CPU's bf16 instructions, torch's
oneDNN), so the shipped table is only the default: ``rnnkit calibrate``
(:mod:`.calibrate`) measures the same ratios on the machine that runs, for the thread count it
runs with, into ``dispatch-<machine>.json`` in the kernels' cache directory, and automatic
dispatch reads that table instead wherever it has one for the current thread count
(:func:`calibration`; :func:`rnnkit.explain` says which table decided).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

__all__ = [
    "MACHINE",
    "MEASURED",
    "Calibration",
    "Point",
    "calibration",
    "calibration_path",
    "deciding",
    "forget_calibration",
    "nearest",
    "save_calibration",
]

#: The machine the table was measured on (lscpu), with the command.
MACHINE = (
    "Intel Xeon (KVM, model 167) with avx512f/bw/vl, avx512_bf16, amx_bf16, 2 cores, torch 2.13; "
    "python benchmarks/bench_rnn.py --threads 2 --backend cpu --precision fp32|bf16; fp32 and "
    "bf16-onednn re-measured 2026-12-02 with the steps split by batch where measured faster"
)


class Point(NamedTuple):
    """One measured shape and torch.nn's time over the kernels' (> 1: the kernels won)."""

    steps: int
    batch: int
    input_size: int
    hidden: int
    ratio: float


S, M, L = (100, 8, 64, 64), (100, 32, 128, 256), (200, 64, 256, 512)

#: (mode, lengths given, precision, training) -> the measured points: BENCHMARKS.md's 2-thread
#: tables (``--backend cpu``, wall time, interleaved medians, quiet machine).
MEASURED: dict[tuple[str, bool, str, bool], tuple[Point, ...]] = {
    ("lstm", False, "fp32", True): (Point(*S, 1.38), Point(*M, 1.30), Point(*L, 1.30)),
    ("lstm", False, "fp32", False): (Point(*S, 1.29), Point(*M, 0.93), Point(*L, 1.02)),
    ("gru", False, "fp32", True): (Point(*S, 6.07), Point(*M, 2.03), Point(*L, 1.57)),
    ("gru", False, "fp32", False): (Point(*S, 3.49), Point(*M, 1.67), Point(*L, 1.58)),
    ("rnn_tanh", False, "fp32", True): (Point(*S, 3.69), Point(*M, 1.81), Point(*L, 1.40)),
    ("rnn_tanh", False, "fp32", False): (Point(*S, 2.80), Point(*M, 1.89), Point(*L, 1.41)),
    # a 2-layer bidirectional LSTM, lengths uniform in [T/4, T] against pack_padded_sequence
    ("lstm", True, "fp32", True): (Point(*M, 3.58),),
    ("lstm", True, "fp32", False): (Point(*M, 1.39),),
    # bf16 with MKL's GEMMs alone (no onednn extra)
    ("lstm", False, "bf16", True): (Point(*S, 0.88), Point(*M, 1.12), Point(*L, 0.71)),
    ("lstm", False, "bf16", False): (Point(*S, 0.51), Point(*M, 0.37), Point(*L, 0.37)),
    ("gru", False, "bf16", True): (Point(*S, 4.04), Point(*M, 2.09), Point(*L, 1.40)),
    ("gru", False, "bf16", False): (Point(*S, 3.15), Point(*M, 1.47), Point(*L, 1.15)),
    ("rnn_tanh", False, "bf16", True): (Point(*S, 5.01), Point(*M, 1.91), Point(*L, 1.42)),
    ("rnn_tanh", False, "bf16", False): (Point(*S, 4.94), Point(*M, 1.68), Point(*L, 1.52)),
    ("lstm", True, "bf16", True): (Point(*M, 4.74),),
    ("lstm", True, "bf16", False): (Point(*M, 1.89),),
    # bf16 with the onednn extra installed (its matmul runs the bf16 step on packed weights)
    ("lstm", False, "bf16-onednn", True): (Point(*M, 1.44), Point(*L, 1.21)),
    ("lstm", False, "bf16-onednn", False): (Point(*M, 0.93), Point(*L, 0.84)),
    ("gru", False, "bf16-onednn", True): (Point(*M, 3.03), Point(*L, 2.44)),
    ("gru", False, "bf16-onednn", False): (Point(*M, 3.16), Point(*L, 2.35)),
    ("rnn_tanh", False, "bf16-onednn", True): (Point(*M, 3.21), Point(*L, 1.87)),
    ("rnn_tanh", False, "bf16-onednn", False): (Point(*M, 3.97), Point(*L, 2.10)),
    ("lstm", True, "bf16-onednn", True): (Point(*M, 6.60),),
    ("lstm", True, "bf16-onednn", False): (Point(*M, 2.61),),
}


class Calibration(NamedTuple):
    """The crossovers ``rnnkit calibrate`` measured on this machine for one thread count."""

    table: dict[tuple[str, bool, str, bool], tuple[Point, ...]]
    threads: int
    date: str  # when (ISO 8601, UTC)
    path: Path

    def describe(self) -> str:
        return (
            f"measured on this machine by `rnnkit calibrate` at {self.threads} "
            f"thread{'s' if self.threads != 1 else ''} on {self.date[:10]}"
        )


#: The calibration file's format: {"format": 1, "threads": {"<n>": {"date": "...", "points":
#: {"<mode>|<lengths or none>|<precision>|<train or infer>": [[T, B, I, H, ratio], ...]}}}}
_FORMAT = 1
_lock = threading.Lock()
_calibrations: dict[int, Calibration] | None = None  # by thread count, read once


def calibration_path() -> Path:
    """Where ``rnnkit calibrate`` keeps this machine's crossovers (keyed like the GEMM sources'
    measurements: the CPU, torch and its BLAS)."""
    from . import build, gemm

    return build.cache_dir() / f"dispatch-{gemm._machine()}.json"


def _key_text(key: tuple[str, bool, str, bool]) -> str:
    mode, lengths, precision, training = key
    return (
        f"{mode}|{'lengths' if lengths else 'none'}|{precision}|{'train' if training else 'infer'}"
    )


def _key_of(text: str) -> tuple[str, bool, str, bool]:
    mode, lengths, precision, training = text.split("|")
    if lengths not in ("lengths", "none") or training not in ("train", "infer") or not mode:
        raise ValueError(f"entry {text!r} is not mode|lengths|precision|train")
    return mode, lengths == "lengths", precision, training == "train"


def _point_of(values: object) -> Point:
    if not (isinstance(values, list) and len(values) == 5):
        raise ValueError(f"point {values!r} is not [T, B, I, H, ratio]")
    *shape, ratio = values
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
        raise ValueError(f"point {values!r}: T, B, I and H must be positive integers")
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"point {values!r}: the ratio must be a positive number")
    return Point(*shape, float(ratio))


def _read(path: Path) -> dict[int, Calibration]:
    """Every thread count's table in ``path`` (nothing where there is no file); a damaged file
    is named in a warning and ignored."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as e:
        warnings.warn(
            f"rnnkit: cannot read the dispatch table {path} ({e}); using the shipped one",
            stacklevel=2,
        )
        return {}
    try:
        data = json.loads(raw.decode())
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"expected format {_FORMAT}")
        out: dict[int, Calibration] = {}
        for threads, entry in data["threads"].items():
            table = {
                _key_of(k): tuple(_point_of(v) for v in points)
                for k, points in entry["points"].items()
            }
            out[int(threads)] = Calibration(table, int(threads), str(entry["date"]), path)
        return out
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        warnings.warn(
            f"rnnkit: the dispatch table {path} is damaged ({e}); using the shipped one "
            "(`rnnkit calibrate` measures it again)",
            stacklevel=2,
        )
        return {}


def calibration(threads: int | None = None) -> Calibration | None:
    """This machine's crossovers for ``threads`` (default: torch's thread count now) where
    ``rnnkit calibrate`` measured them, else None (the shipped :data:`MEASURED` decides)."""
    global _calibrations
    with _lock:
        if _calibrations is None:
            _calibrations = _read(calibration_path())
        return _calibrations.get(torch.get_num_threads() if threads is None else threads)


def save_calibration(
    table: dict[tuple[str, bool, str, bool], tuple[Point, ...]], threads: int
) -> Calibration:
    """Keep ``table`` as this machine's crossovers for ``threads`` (other thread counts' tables
    stay), written atomically; automatic dispatch reads it from the next call on."""
    global _calibrations
    path = calibration_path()
    with _lock:
        kept = _read(path)
        date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        kept[threads] = Calibration(dict(table), threads, date, path)
        data = {
            "format": _FORMAT,
            "threads": {
                str(n): {
                    "date": c.date,
                    "points": {
                        _key_text(k): [list(p) for p in points] for k, points in c.table.items()
                    },
                }
                for n, c in sorted(kept.items())
            },
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
        _calibrations = kept
        return kept[threads]


def forget_calibration() -> bool:
    """Delete this machine's calibration (every thread count): the shipped table decides again.
    Whether there was one."""
    global _calibrations
    with _lock:
        _calibrations = None
        with contextlib.suppress(FileNotFoundError):
            calibration_path().unlink()
            return True
        return False


def deciding(mode: str, lengths: bool, precision: str, training: bool) -> Calibration | None:
    """This machine's calibration where it measured this cell, lengths, precision and mode at
    the current thread count; None where the shipped :data:`MEASURED` decides."""
    measured = calibration()
    if measured is not None and (mode, lengths, _calibrated(precision), training) in measured.table:
        return measured
    return None


def _calibrated(precision: str) -> str:
    # calibrate measures bf16 with whatever GEMM source the plan picks on the machine
    return "bf16" if precision == "bf16-onednn" else precision


def nearest(
    mode: str, lengths: bool, precision: str, training: bool, shape: tuple[int, int, int, int]
) -> Point | None:
    """The measured point nearest to ``shape`` (T, B, I, H), or None where nothing was measured
    for this cell, lengths, precision and mode: from this machine's calibration where it has
    them (:func:`deciding`), else from :data:`MEASURED`."""
    measured = deciding(mode, lengths, precision, training)
    if measured is not None:
        table, precision = measured.table, _calibrated(precision)
    else:
        table = MEASURED
    key = (mode, lengths, precision, training, shape)
    known = _nearest.get(key)
    if known is not None and known[0] is table:
        return known[1]
    # first asked, or another table since (calibrated, re-measured, or replaced in a test)
    if len(_nearest) >= 4096:
        _nearest.clear()
    point = _find_nearest(table, mode, lengths, precision, training, shape)
    _nearest[key] = (table, point)
    return point


#: nearest's answers with the table each came from (asked at every call: worked out once per
#: shape and table)
_nearest: dict[tuple, tuple[dict, Point | None]] = {}


def _find_nearest(
    table: dict[tuple[str, bool, str, bool], tuple[Point, ...]],
    mode: str,
    lengths: bool,
    precision: str,
    training: bool,
    shape: tuple[int, int, int, int],
) -> Point | None:
    points = table.get((mode, lengths, precision, training))
    if not points:
        return None

    def distance(p: Point) -> float:
        measured = (p.steps, p.batch, p.input_size, p.hidden)
        return sum(
            abs(math.log(max(a, 1) / max(b, 1))) for a, b in zip(shape, measured, strict=True)
        )

    return min(points, key=distance)
