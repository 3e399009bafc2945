"""Hardening: the layers refuse mixed dtypes before any backend runs (the C++ ops check their
own arguments: test_cpu_kernels.py), both directions run whatever OpenMP hands out, user
backends join the built-in ones, a damaged kernel cache is rebuilt instead of crashing the
process, and the drop-ins pickle like torch.nn's layers.

Where a crash is possible the case runs in a subprocess, so a regression fails the test instead
of killing the test run.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GRAD_TOL, OUT_TOL, assert_close

import rnnkit
from rnnkit.backends.cpu import build

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_python(code: str, env: dict[str, str] | None = None, timeout: int = 600):
    """Run ``code`` in a fresh interpreter with rnnkit importable; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": SRC, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def kernels():
    reason = build.unavailable()
    if reason is not None:
        pytest.skip(f"the C++ kernels are unavailable: {reason}")


# -- 1. dtypes: the layers refuse a mismatch before dispatch, with torch.nn's wording ---------------

LAYERS = {
    "GRU": lambda dtype: rnnkit.GRU(8, 16, dtype=dtype),
    "RNN": lambda dtype: rnnkit.RNN(8, 16, dtype=dtype),
    "LSTM": lambda dtype: rnnkit.LSTM(8, 16, dtype=dtype),
    "Recurrent(GRUCell)": lambda dtype: rnnkit.Recurrent(rnnkit.GRUCell(8, 16, dtype=dtype)),
    "Recurrent(LSTMCell)": lambda dtype: rnnkit.Recurrent(rnnkit.LSTMCell(8, 16, dtype=dtype)),
    "Bidirectional": lambda dtype: rnnkit.Bidirectional(
        rnnkit.Recurrent(rnnkit.GRUCell(8, 16, dtype=dtype)),
        rnnkit.Recurrent(rnnkit.GRUCell(8, 16, dtype=dtype), reverse=True),
    ),
}


@pytest.mark.parametrize("backend", ["cpu", "native", "reference"])
@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize(
    ("weights", "given"), [(torch.float32, torch.float64), (torch.float64, torch.float32)]
)
def test_input_of_another_dtype_is_refused_on_every_backend(name, backend, weights, given):
    layer = LAYERS[name](weights)
    x = torch.randn(12, 4, 8, dtype=given)
    expected = rf"input dtype \({given}\) does not match weight dtype \({weights}\)"
    with rnnkit.use_backend(backend), pytest.raises(ValueError, match=expected):
        layer(x, lengths=[12, 3, 5, 1])
    if hasattr(layer, "dispatch_requests"):
        with pytest.raises(ValueError, match=expected):
            rnnkit.explain(layer, x)


def test_the_reported_numpy_case_raises_instead_of_returning_nan():
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((12, 4, 8)))  # float64
    with pytest.raises(ValueError, match="Convert input: input.to"):
        rnnkit.GRU(8, 16)(x)


def test_weights_of_mixed_dtypes_are_refused():
    gru = rnnkit.GRU(8, 16, num_layers=2)
    gru.weight_hh_l1.data = gru.weight_hh_l1.data.double()
    with pytest.raises(ValueError, match="weight_hh_l1 has dtype torch.float64, but weight_ih_l0"):
        gru(torch.randn(3, 2, 8))


def test_under_autocast_the_input_is_converted_as_torch_nn_accepts_it():
    gru = rnnkit.GRU(8, 16)
    x = torch.randn(5, 2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, h = gru(x.bfloat16(), torch.zeros(1, 2, 16, dtype=torch.bfloat16))
    assert out.isfinite().all() and h.isfinite().all()


def test_batch_first_shape_errors_quote_the_shape_passed():
    gru = rnnkit.GRU(7, 16, batch_first=True)
    with pytest.raises(ValueError, match=r"\(shape \(4, 10, 8\)\); expected input_size = 7"):
        gru(torch.randn(4, 10, 8))


@pytest.mark.slow
def test_large_float64_layer_given_float32_weights_does_not_crash():
    # Read as double, float32 weights of this size ran far past their buffer (a segfault).
    done = run_python(
        """
        import torch, rnnkit
        try:
            rnnkit.GRU(2048, 2048)(torch.randn(3, 2, 2048, dtype=torch.float64))
        except ValueError as e:
            print("refused:", e)
        """
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: GRU input dtype (torch.float64)" in done.stdout


# -- 2. both directions run whatever thread team OpenMP hands out ---------------------------------


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("limit", ["1", "2"])
@pytest.mark.slow
def test_bidirectional_kernels_under_an_openmp_thread_limit(limit):
    done = run_python(
        """
        import torch, rnnkit
        torch.set_num_threads(2)
        torch.manual_seed(0)
        gru = rnnkit.GRU(4, 6, num_layers=2, bidirectional=True, backend="cpu").double()
        x = torch.randn(7, 3, 4, dtype=torch.float64, requires_grad=True)
        out, h = gru(x, lengths=[7, 2, 5])
        (out.sum() + h.sum()).backward()
        ref = rnnkit.GRU(4, 6, num_layers=2, bidirectional=True, backend="reference").double()
        ref.load_state_dict(gru.state_dict())
        x2 = x.detach().clone().requires_grad_()
        out2, h2 = ref(x2, lengths=[7, 2, 5])
        (out2.sum() + h2.sum()).backward()
        err = max(
            (out - out2).abs().max().item(),
            (h - h2).abs().max().item(),
            (x.grad - x2.grad).abs().max().item(),
            max((p.grad - q.grad).abs().max().item()
                for p, q in zip(gru.parameters(), ref.parameters())),
        )
        print("max error", err)
        assert err < 1e-10, err
        """,
        env={"OMP_THREAD_LIMIT": limit},
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]


# -- 3. a user's backend joins the built-in ones -------------------------------------------------


@pytest.mark.slow
def test_a_backend_registered_before_first_use_joins_the_builtins():
    done = run_python(
        """
        import torch, rnnkit
        from rnnkit import backends
        from rnnkit.backends.reference import ReferenceBackend

        class Mine:
            name, priority, why = "mine", 5, "a test backend"
            def check(self, request):
                return None if request.mode == "gru" else "only the GRU"
            def run_layer(self, layer):
                return ReferenceBackend().run_layer(layer)

        backends.register(Mine())  # before any layer has run
        names = backends.available()
        assert {"auto", "reference", "native", "cpu", "mine"} <= set(names), names
        out, h = rnnkit.LSTM(3, 4)(torch.randn(5, 2, 3))  # built-ins still dispatch
        gru = rnnkit.GRU(3, 4, backend="mine")
        assert rnnkit.explain(gru, torch.randn(5, 2, 3)).backend == "mine"
        out, h = gru(torch.randn(5, 2, 3))
        print("ok", names)
        """
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok" in done.stdout


# -- 4. the kernel cache -------------------------------------------------------------------------


@pytest.mark.usefixtures("kernels")
def test_the_cache_key_holds_the_compiler_and_the_target_isa(monkeypatch):
    key = build._key()
    assert build._toolchain() and "-m" in build._toolchain().split("\n", 1)[1]
    build._toolchain.cache_clear()
    try:
        monkeypatch.setattr(build, "_toolchain", lambda: "another compiler, another ISA")
        assert build._key() != key
    finally:
        monkeypatch.undo()
        build._toolchain.cache_clear()
    assert build._key() == key


def test_the_sanitizer_opt_in_changes_the_flags_and_the_cache_key(monkeypatch):
    monkeypatch.delenv(build.SANITIZE_ENV, raising=False)
    cflags, ldflags, key = build._cflags(), build._ldflags(), build._key()
    assert not any("sanitize" in f for f in cflags + ldflags)
    monkeypatch.setenv(build.SANITIZE_ENV, "0")
    assert (build._cflags(), build._key()) == (cflags, key)
    monkeypatch.setenv(build.SANITIZE_ENV, "1")
    # the usual flags kept (-march=native, OpenMP), the sanitizers' added after them
    assert build._cflags()[: len(cflags)] == cflags
    assert "-fsanitize=address,undefined" in build._cflags()
    assert "-fsanitize=address,undefined" in build._ldflags()
    assert build._key() != key
    assert build.library_path().parent != build.cache_dir() / f"rnnkit_cpu_{key}"
    monkeypatch.setenv(build.SANITIZE_ENV, "yes")
    with pytest.raises(build.CacheError, match="RNNKIT_CPU_SANITIZE = 'yes'; expected 1"):
        build._key()


def test_a_sanitized_build_without_its_runtime_preloaded_says_how_to_preload_it(monkeypatch):
    if "libasan" in Path("/proc/self/maps").read_text():
        pytest.skip("the sanitizer runtime is preloaded in this process")
    monkeypatch.setenv(build.SANITIZE_ENV, "1")
    # raised before anything is built or loaded (loading it would end the process)
    monkeypatch.setattr(build, "_compile", lambda *a: pytest.fail("compiled"))
    with pytest.raises(build.CacheError, match="LD_PRELOAD="):
        build._build()


def test_elf_completeness_check(tmp_path):
    good = build.library_path()
    if not good.exists():
        pytest.skip("no cached library to inspect")
    data = good.read_bytes()
    assert build._elf_complete(good)
    for cut in (16, 64, len(data) // 2, len(data) - 1):
        part = tmp_path / f"cut{cut}.so"
        part.write_bytes(data[:cut])
        assert not build._elf_complete(part), cut
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"\x00" * 4096)
    assert not build._elf_complete(junk)


CACHE_CHILD = """
    import os, shutil, sys, torch, warnings
    from pathlib import Path
    import rnnkit
    from rnnkit.backends.cpu import build

    good, mode = Path(sys.argv[1]), sys.argv[2]
    compiled = []

    def fake_compile(directory, name):
        # stands in for the two-minute compiler run: the known-good library, loaded as
        # cpp_extension loads what it builds
        compiled.append(name)
        if mode == "build fails":
            raise RuntimeError("the compiler failed")
        staged = directory / f".{name}.{os.getpid()}.so"
        shutil.copy(good, staged)
        torch.ops.load_library(str(staged))
        return staged

    build._compile = fake_compile
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reason = build.unavailable()
    library = build.library_path()
    gru = rnnkit.GRU(4, 6, bidirectional=True)
    out, h = gru(torch.randn(5, 3, 4), lengths=[5, 1, 3])
    chosen = rnnkit.explain(gru, torch.randn(5, 3, 4)).backend
    checksum = library.with_name(library.name + ".sha256")
    print("compiled", len(compiled), "reason", reason, "backend", chosen)
    print("checksum", checksum.exists() and checksum.read_text().strip() == build._sha256(library))
    print("warnings", len([w for w in caught if "rnnkit" in str(w.message)]))
"""


def cache_case(tmp_path: Path, damage: str, mode: str = "copy", also=None):
    """Put a damaged library where this machine's build belongs in a fresh cache (and whatever
    ``also(its directory)`` puts there), then run a layer in a subprocess whose compiler copies
    the known-good library."""
    good = build.library_path()
    cache = tmp_path / "cache"
    target = cache / good.relative_to(build.cache_dir())
    target.parent.mkdir(parents=True)
    if also is not None:
        also(target.parent)
    data = good.read_bytes()
    checksum = target.with_name(target.name + ".sha256")
    if damage == "truncated":  # a build killed mid-write: no checksum was ever written
        target.write_bytes(data[: len(data) // 3])
    elif damage == "truncated, checksum of the good one":  # damaged after it was installed
        target.write_bytes(data[: len(data) // 3])
        checksum.write_text(build._sha256(good) + "\n")
    elif damage == "flipped bytes":
        flipped = bytearray(data)
        flipped[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
        target.write_bytes(bytes(flipped))
        checksum.write_text(build._sha256(good) + "\n")
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CACHE_CHILD))
    env = {**os.environ, "PYTHONPATH": SRC, "RNNKIT_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, str(script), str(good), mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize(
    "damage", ["truncated", "truncated, checksum of the good one", "flipped bytes"]
)
@pytest.mark.slow
def test_a_damaged_library_in_the_cache_is_rebuilt_not_loaded(tmp_path, damage):
    done = cache_case(tmp_path, damage)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-3000:]}"
    assert "compiled 1 reason None backend cpu" in done.stdout, done.stdout + done.stderr
    assert "checksum True" in done.stdout
    assert "warnings 0" in done.stdout
    assert "rebuilding the C++ CPU kernels" in done.stderr


@pytest.mark.usefixtures("kernels")
@pytest.mark.slow
def test_a_rebuild_removes_what_killed_builds_left_and_nothing_else(tmp_path):
    """Builds killed midway leave their private build directory and a staged library behind;
    the next build (it holds the directory's lock) removes them, and only them."""
    name = build.library_path().stem

    def leftovers(directory: Path) -> None:
        (directory / "build-k3j2x9").mkdir()
        (directory / "build-k3j2x9" / "cell_gru.o").write_bytes(b"\0" * 4096)
        (directory / f".{name}.4242.so").write_bytes(b"\0" * 4096)
        (directory / ".another_library.4242.so").write_bytes(b"kept")
        (directory / "build-notes.txt").write_text("kept")

    done = cache_case(tmp_path, "truncated", also=leftovers)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-3000:]}"
    assert "compiled 1 reason None backend cpu" in done.stdout, done.stdout + done.stderr
    directory = tmp_path / "cache" / name
    left = sorted(p.name for p in directory.iterdir())
    assert "build-k3j2x9" not in left and f".{name}.4242.so" not in left, left
    assert {".another_library.4242.so", "build-notes.txt", f"{name}.so"} <= set(left), left


@pytest.mark.usefixtures("kernels")
@pytest.mark.slow
def test_a_failed_rebuild_warns_once_and_falls_back(tmp_path):
    done = cache_case(tmp_path, "truncated", mode="build fails")
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-3000:]}"
    assert "compiled 1 reason the C++ kernels failed to build: the compiler failed" in done.stdout
    assert "backend native" in done.stdout or "backend reference" in done.stdout
    assert "warnings 1" in done.stdout


@pytest.mark.usefixtures("kernels")
@pytest.mark.slow
def test_a_verified_library_is_loaded_without_building(tmp_path):
    done = cache_case(tmp_path, "none")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled 1" in done.stdout  # the empty cache is filled once
    # a second process finds it verified
    again = subprocess.run(
        [sys.executable, str(tmp_path / "child.py"), str(build.library_path()), "copy"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC, "RNNKIT_CACHE": str(tmp_path / "cache")},
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "compiled 0 reason None backend cpu" in again.stdout
    assert "building" not in again.stderr


@pytest.mark.usefixtures("kernels")
@pytest.mark.slow
def test_a_cache_that_cannot_be_written_says_how_to_point_it_elsewhere(tmp_path):
    # a cache directory that cannot be created (here below a regular file; likewise a read-only
    # home): the layers fall back, and the one-line reason names the directory and RNNKIT_CACHE
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CACHE_CHILD))
    done = subprocess.run(
        [sys.executable, str(script), str(build.library_path()), "copy"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC, "RNNKIT_CACHE": str(blocker / "cache")},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reason = next(line for line in done.stdout.splitlines() if line.startswith("compiled"))
    assert reason.startswith("compiled 0 reason the C++ kernels failed to build: the kernel cache ")
    assert str(blocker / "cache") in reason
    assert "is not writable" in reason and "set RNNKIT_CACHE to a writable directory" in reason
    assert "backend native" in reason or "backend reference" in reason
    assert "warnings 1" in done.stdout


# -- 8. pickling the drop-ins needs only their public class --------------------------------------


@pytest.mark.parametrize(
    ("make", "allowed"),
    [
        (lambda: rnnkit.GRU(4, 8, num_layers=2, bidirectional=True, zoneout=0.1), ["GRU"]),
        (lambda: rnnkit.LSTM(4, 8, proj_size=3, dropout_state=0.2), ["LSTM"]),
        (lambda: rnnkit.RNN(4, 8, nonlinearity="relu"), ["RNN"]),
        (
            lambda: rnnkit.Recurrent(rnnkit.LSTMCell(4, 8), weight_drop=0.3),
            ["Recurrent", "LSTMCell"],
        ),
    ],
)
def test_whole_model_pickles_with_only_public_classes_allowed(make, allowed):
    model = make().eval()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    with torch.serialization.safe_globals([getattr(rnnkit, n) for n in allowed]):
        loaded = torch.load(buf)
    assert type(loaded) is type(model)
    assert loaded.regularisers == model.regularisers
    x = torch.randn(5, 2, 4)
    out, _ = model(x)
    out2, _ = loaded(x)
    assert_close(out2, out, OUT_TOL, "output after the round trip")


def test_gradients_survive_a_pickled_drop_in():
    model = rnnkit.GRU(4, 8)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    with torch.serialization.safe_globals([rnnkit.GRU]):
        loaded = torch.load(buf)
    x = torch.randn(5, 2, 4)
    g1 = torch.autograd.grad(model(x)[0].sum(), model.weight_hh_l0)[0]
    g2 = torch.autograd.grad(loaded(x)[0].sum(), loaded.weight_hh_l0)[0]
    assert_close(g2, g1, GRAD_TOL, "weight_hh_l0 gradient")


def test_a_cache_path_from_the_environment_expands_the_home_directory(monkeypatch, tmp_path):
    """RNNKIT_CACHE="~/kernels" (set where no shell expands it: a Dockerfile's ENV, a unit
    file) is the home directory's kernels, not a folder named '~' in the working directory."""
    from rnnkit.backends.cpu import build

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RNNKIT_CACHE", "~/kernels")
    assert build.cache_dir() == tmp_path / "kernels"
    monkeypatch.delenv("RNNKIT_CACHE")
    assert build.cache_dir() == tmp_path / ".cache" / "rnnkit"
