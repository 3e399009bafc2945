"""Build and load the C++ kernels at first use (never at import).

The shared library is compiled with ``torch.utils.cpp_extension`` into a cache directory keyed by
a hash of the sources, the compiler flags and the torch version (``$RNNKIT_CACHE`` or
``~/.cache/rnnkit``), so later processes load it without compiling. A file lock keeps two
processes from building at once; one line on stderr says that a build is happening. Without a
compiler, or if the build fails, one warning is issued and :func:`unavailable` returns the reason,
so the dispatch falls back to another backend.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["HEADERS", "SOURCES", "cache_dir", "ensure", "unavailable"]

_HERE = Path(__file__).resolve().parent
SOURCES = (_HERE / "rnn_kernels.cpp", _HERE / "layernorm_kernels.cpp")
HEADERS = (_HERE / "kernel_common.h",)  # hashed into the cache key, not compiled alone
_CFLAGS = (
    "-O3",
    "-march=native",
    "-fopenmp",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-std=c++17",
)
_LDFLAGS = ("-fopenmp",)

_lock = threading.Lock()
_loaded = False
_failure: str | None = None  # why the kernels cannot be used, once a build was tried


def _key() -> str:
    h = hashlib.sha256()
    for src in SOURCES + HEADERS:
        h.update(src.read_bytes())
    h.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    """Where built kernels are kept: ``$RNNKIT_CACHE`` or ``~/.cache/rnnkit``."""
    root = os.environ.get("RNNKIT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "rnnkit"
    )
    return Path(root)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: cpp_extension's own baton still applies
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _compiler() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx.split()[0]) if cxx else None


def _build() -> None:
    from torch.utils import cpp_extension

    name = f"rnnkit_cpu_{_key()}"
    directory = cache_dir() / name
    library = directory / f"{name}.so"
    if not library.exists():
        directory.mkdir(parents=True, exist_ok=True)
        with _file_lock(directory / "build.lock"):
            if not library.exists():  # another process may have built it while we waited
                # Under our lock no one else builds here: a baton left by a build that was killed
                # would make cpp_extension wait forever.
                (directory / "lock").unlink(missing_ok=True)
                print(
                    f"rnnkit: building the C++ CPU kernels (first use, cached in {directory})",
                    file=sys.stderr,
                    flush=True,
                )
                cpp_extension.load(
                    name=name,
                    sources=[str(s) for s in SOURCES],
                    extra_cflags=list(_CFLAGS),
                    extra_ldflags=list(_LDFLAGS),
                    build_directory=str(directory),
                    is_python_module=False,
                    verbose=False,
                )
                return
    torch.ops.load_library(str(library))


def unavailable() -> str | None:
    """None when the kernels are loaded (building them at first use), else the reason they are not.

    While torch.compile traces, nothing is built: the answer is the last one known.
    """
    global _loaded, _failure
    if _loaded or _failure is not None or torch.compiler.is_compiling():
        return _failure
    with _lock:
        if _loaded or _failure is not None:
            return _failure
        if _compiler() is None:
            _failure = "no C++ compiler found (set CXX or install g++/clang++)"
        else:
            try:
                _build()
                _loaded = True
            except Exception as e:  # any build or load error: fall back, say why once
                first = str(e).strip().splitlines()
                _failure = f"the C++ kernels failed to build: {first[0] if first else type(e)}"
        if _failure is not None:
            warnings.warn(
                f"rnnkit: {_failure}; using another backend", RuntimeWarning, stacklevel=3
            )
    return _failure


def ensure() -> None:
    """Load the kernels or raise with the reason they are unavailable."""
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(f"rnnkit cpu backend: {reason}")
