"""The GEMM probe: each source of the cpu kernels' GEMM layer (mkl, torch, onednn where its wheel
is installed, and avx2, rnnkit's own step, where the kernels have AVX2 and FMA: its rows show the
step alone), in float32 and bfloat16, on the GEMMs a GRU's training step runs at DESIGN.md's
S, M and L shapes, as the kernels call them. GFLOP/s (and µs per call for the step).

    python benchmarks/bench_gemm.py                    # threads 1 and 2, fp32 and bf16
    python benchmarks/bench_gemm.py --threads 2 --markdown --json gemm.json

Shapes (a GRU: G = 3H): "step" C (B, G) = h (B, H) . W_hh^T with W_hh prepared once per call (the
recurrent step; the prepared weight is reused, as in a call); "bulk" C (T*B, G) = x (T*B, I) .
W_ih^T (the input projection); "wgrad" dW_hh (G, H) = dG^T (G, T*B) . hprev (T*B, H). bf16 rows
round the operands to bfloat16 (the conversion is timed: it is part of the call) and accumulate
in float32.

Measured as DESIGN.md says: the sources interleaved (A B C A B C ...) for --rounds rounds after a
warm-up, each turn a burst of calls of which the median is kept; reported: the median over the
rounds (min and max in the JSON).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch

from rnnkit.backends.cpu import gemm

#: DESIGN.md's shapes as (T, B, I, H)
SIZES = {"S": (100, 8, 64, 64), "M": (100, 32, 128, 256), "L": (200, 64, 256, 512)}
ROLES = ("step", "bulk", "wgrad")


def shapes() -> dict[str, tuple[str, int, int, int]]:
    """name -> (role, M, N, K) as gemm.probe takes them."""
    out = {}
    for size, (t, b, i, h) in SIZES.items():
        g = 3 * h
        out[f"{size} step"] = ("step", b, g, h)
        out[f"{size} bulk"] = ("bulk", t * b, g, i)
        out[f"{size} wgrad"] = ("wgrad", g, h, t * b)
    return out


def lscpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return platform.processor()
    keep = [line for line in out.splitlines() if line.startswith(("Model name", "Model:"))]
    flags = next((line for line in out.splitlines() if line.startswith("Flags")), "")
    wanted = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_bf16", "amx_tile", "avx2")
    have = [f for f in flags.split() if f in wanted]
    return "; ".join(s.split(":", 1)[1].strip() for s in keep) + "; flags: " + " ".join(have)


def measure(sources, bf16, role, m, n, k, seconds, rounds) -> dict[str, list[float]]:
    """Per source, the median seconds per call of each round, the sources interleaved."""
    op = torch.ops.rnnkit_cpu.gemm_probe
    rid = gemm.ROLES.index(role)
    ids = {s: gemm.SOURCES.index(s) for s in sources}
    # warm-up (primitives made, weights packed, caches and threads awake), and a burst size
    # that fills each turn's share of the time
    first = {s: min(op(ids[s], bf16, rid, m, n, k, 3)) for s in sources}
    turn = seconds / rounds / len(sources)
    reps = {s: int(min(200, max(3, turn / max(t, 1e-7)))) for s, t in first.items()}
    per_round: dict[str, list[float]] = {s: [] for s in sources}
    for _ in range(rounds):
        for s in sources:
            per_round[s].append(statistics.median(op(ids[s], bf16, rid, m, n, k, reps[s])))
    return per_round


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seconds", type=float, default=1.0, help="per shape, all sources")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--shapes", nargs="+", help="names to run (default: all), e.g. 'L step'")
    parser.add_argument("--sources", nargs="+", choices=gemm.SOURCES, default=list(gemm.SOURCES))
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=None)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    table = shapes()
    names = args.shapes or list(table)
    precisions = args.precision or ["fp32", "bf16"]
    if not gemm.available("onednn", False) and "onednn" in args.sources:
        print(f"onednn: unavailable ({gemm.onednn_problem()})")
    started = time.time()
    load = open("/proc/loadavg").read().split()[:3] if platform.system() == "Linux" else []
    rows: dict[tuple[str, str], dict] = {}
    for precision in precisions:
        bf16 = precision == "bf16"
        if bf16 and not gemm.bf16_supported():
            print("no bf16 instructions (torch's check): bf16 rows skipped")
            continue
        sources = [s for s in args.sources if gemm.available(s, bf16)]
        for threads in args.threads:
            torch.set_num_threads(threads)
            for name in names:
                role, m, n, k = table[name]
                here = [s for s in sources if role == "step" or s not in gemm.STEP_ONLY]
                runs = measure(here, bf16, role, m, n, k, args.seconds, args.rounds)
                flops = 2.0 * m * n * k
                shown = []
                for s in here:
                    med = statistics.median(runs[s])
                    cell = {
                        "threads": threads,
                        "us": med * 1e6,
                        "gflops": flops / med / 1e9,
                        "gflops_min": flops / max(runs[s]) / 1e9,
                        "gflops_max": flops / min(runs[s]) / 1e9,
                    }
                    row = rows.setdefault((s, precision), {"source": s, "precision": precision})
                    row.setdefault("cells", {}).setdefault(name, []).append(cell)
                    shown.append(f"{s} {cell['gflops']:.0f} ({cell['us']:.1f} us)")
                print(f"{precision} t{threads} {name:8s} " + " | ".join(shown), flush=True)
    machine = lscpu()
    after = open("/proc/loadavg").read().split()[:3] if platform.system() == "Linux" else []
    print(f"{machine}; load before {' '.join(load)}, after {' '.join(after)}; "
          f"{time.time() - started:.0f} s")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": machine,
                    "torch": torch.__version__,
                    "load": {"before": load, "after": after},
                    "rows": list(rows.values()),
                },
                f,
                indent=1,
            )
    if args.markdown:
        threads = " / ".join(str(t) for t in args.threads)
        print()
        print(f"| source | precision | {' | '.join(names)} |")
        print("|---|---|" + "---:|" * len(names))
        for row in rows.values():
            cells = []
            for name in names:
                values = row["cells"].get(name, [])
                if not values:
                    cells.append("—")
                elif name.endswith("step") and name.startswith("S"):
                    cells.append(" / ".join(f"{v['us']:.1f} µs" for v in values))
                else:
                    cells.append(" / ".join(f"{v['gflops']:.0f}" for v in values))
            print(f"| {row['source']} | {row['precision']} | {' | '.join(cells)} |")
        print(f"\nGFLOP/s at {threads} threads (S step: µs per call), medians; {machine}")


if __name__ == "__main__":
    main()
