"""Build and load the C++ kernels at first use (never at import).

The shared library is compiled with ``torch.utils.cpp_extension`` into a cache directory
(``$RNNKIT_CACHE`` or ``~/.cache/rnnkit``) keyed by everything that decides the machine code: a
hash of the sources and flags, the torch and Python versions, the compiler's identity and the
instruction set ``-march=native`` means on this machine (so a home directory shared by two CPU
generations keeps one build per generation). One line on stderr says that a build is happening.

The cache cannot crash the process:

* a build is compiled aside (a private temporary directory) and moved into place with a rename,
  under a file lock that keeps two processes from building at once;
* a checksum is written beside the library only after it has loaded once; before loading, the
  library is checked against it (and, without one, checked to be a complete ELF file), so a
  truncated or damaged file is never mapped;
* when a check or the load fails, the library is rebuilt once; if that fails too, one warning is
  issued and :func:`unavailable` returns the reason, so the dispatch falls back to another backend.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = [
    "HEADERS",
    "SANITIZE_ENV",
    "SCRATCH_ENV",
    "SOURCES",
    "cache_dir",
    "ensure",
    "library_path",
    "unavailable",
]

_HERE = Path(__file__).resolve().parent
#: One translation unit per cell family instantiating the drivers, the op entries (with the GEMMs
#: and the thread pool) and the oneDNN source's loader: they compile in parallel, the longest
#: first.
SOURCES = tuple(
    _HERE / s
    for s in (
        "cell_lstm_peephole.cpp",
        "cell_lstm.cpp",
        "ops.cpp",
        "scratch.cpp",
        "cell_rnn.cpp",
        "cell_layernorm_lstm.cpp",
        "cell_layernorm_gru.cpp",
        "cell_gru.cpp",
        "onednn.cpp",
        "gemm_avx2.cpp",
    )
)
#: Hashed into the cache key, not compiled alone.
HEADERS = tuple(
    _HERE / h
    for h in (
        "kernel_common.h",
        "kernels.h",
        "cells.h",
        "driver.h",
        "checks.h",
        "onednn.h",
        "onednn_api.h",
    )
)
_CFLAGS = (
    "-O3",
    "-march=native",
    "-fopenmp",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-std=c++17",
)
# -ldl: dlopen() of the optional oneDNN library (onednn.cpp), never linked against
_LDFLAGS = ("-fopenmp", "-ldl")

#: ``RNNKIT_CPU_SANITIZE=1`` builds the kernels with AddressSanitizer and UndefinedBehaviorSanitizer
#: (a separate library in the cache: the flags are part of its key). Python is not instrumented,
#: so such a build loads only with the sanitizer runtimes preloaded (see README, "Run the tests").
SANITIZE_ENV = "RNNKIT_CPU_SANITIZE"
_SANITIZE_CFLAGS = ("-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g", "-O1")
_SANITIZE_LDFLAGS = ("-fsanitize=address,undefined",)


def _sanitize() -> bool:
    value = os.environ.get(SANITIZE_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise CacheError(f"{SANITIZE_ENV} = {value!r}; expected 1 (sanitizers on), 0 or unset")
    return value == "1"


def _check_sanitizer_runtime() -> None:
    """CacheError unless a sanitized build can load here: its runtime must be in the process
    before the library (loaded afterwards, the runtime ends the process)."""
    if not _sanitize():
        return
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # pragma: no cover - not Linux: nothing to check
        return
    if "libasan" not in maps:
        raise CacheError(
            f"{SANITIZE_ENV}=1 builds the kernels with AddressSanitizer, which load only into a "
            'process started with its runtime preloaded: LD_PRELOAD="$(c++ '
            '-print-file-name=libasan.so):$(c++ -print-file-name=libubsan.so)"'
        )


def _cflags() -> tuple[str, ...]:
    """The compiler's flags (the sanitizers' after the others: their -O1 overrides -O3)."""
    return _CFLAGS + (_SANITIZE_CFLAGS if _sanitize() else ())


def _ldflags() -> tuple[str, ...]:
    return _LDFLAGS + (_SANITIZE_LDFLAGS if _sanitize() else ())


#: The scratch pool's limit in megabytes (scratch.cpp reads it when the pool is first used).
SCRATCH_ENV = "RNNKIT_CPU_SCRATCH_MB"

_lock = threading.Lock()
_loaded = False
_environment_checked = False  # the variables the kernels read passed their check once
_failure: str | None = None  # why the kernels cannot be used, once a build was tried


class CacheError(RuntimeError):
    """A library in the cache failed its checks or its load."""


def _compiler() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx.split()[0]) if cxx else None


@functools.cache
def _toolchain() -> str:
    """The compiler's identity and what ``-march=native`` expands to here (its target ISA)."""
    cxx = os.environ.get("CXX", "c++").split()
    parts = []
    for args in (["--version"], ["-march=native", "-###", "-x", "c++", "-c", os.devnull]):
        try:
            run = subprocess.run(
                [*cxx, *args], capture_output=True, text=True, timeout=60, check=False
            )
            parts.append(run.stdout + run.stderr)
        except (OSError, subprocess.SubprocessError) as e:
            parts.append(f"unavailable: {e}")
    # the expansion names the temporary files it would write: keep only the target options
    words = parts[1].replace('"', " ").split()
    target = [w for w in words if w.startswith(("-m", "--param", "-target"))] + [
        w for k, w in enumerate(words[1:]) if words[k] in ("-target-cpu", "-target-feature")
    ]
    return parts[0] + "\n" + " ".join(target)


def _key() -> str:
    h = hashlib.sha256()
    for src in SOURCES + HEADERS:
        h.update(src.read_bytes())
    h.update(" ".join(_cflags() + _ldflags()).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    h.update(_toolchain().encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    """Where built kernels are kept: ``$RNNKIT_CACHE`` (a leading ``~`` is the home directory,
    as a shell would expand it) or ``~/.cache/rnnkit``."""
    root = os.environ.get("RNNKIT_CACHE") or os.path.join("~", ".cache", "rnnkit")
    return Path(os.path.expanduser(root))


def library_path() -> Path:
    """Where this machine's build of the kernels lives in the cache (it may not exist yet)."""
    name = f"rnnkit_cpu_{_key()}"
    return cache_dir() / name / f"{name}.so"


def _checksum_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _elf_complete(path: Path) -> bool:
    """Whether ``path`` is a 64-bit little-endian ELF file holding every byte its headers name
    (a truncated library maps pages past its end, and touching them kills the process)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return False
            phoff, shoff = struct.unpack_from("<QQ", head, 32)
            phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", head, 54)
            end = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
            if end > size:
                return False
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            if len(table) < phentsize * phnum:
                return False
            for k in range(phnum):  # each segment: p_offset at byte 8, p_filesz at byte 32
                offset = struct.unpack_from("<Q", table, k * phentsize + 8)[0]
                filesz = struct.unpack_from("<Q", table, k * phentsize + 32)[0]
                end = max(end, offset + filesz)
        return end <= size
    except OSError:
        return False


def _verified(library: Path) -> bool:
    """The library exists and matches the checksum written after it first loaded."""
    checksum = _checksum_path(library)
    if not (library.is_file() and checksum.is_file()):
        return False
    try:
        return checksum.read_text().strip() == _sha256(library)
    except OSError:
        return False


def _discard(library: Path) -> None:
    for path in (_checksum_path(library), library):
        with contextlib.suppress(OSError):
            path.unlink()


def _unwritable(directory: Path, error: OSError) -> CacheError:
    """The one-line reason a build cannot use ``directory``: it names the directory and how to
    point the cache elsewhere."""
    why = f"{error.strerror}: {error.filename}" if error.strerror else str(error)
    return CacheError(
        f"the kernel cache {directory} is not writable ({why}); set RNNKIT_CACHE to a writable "
        "directory"
    )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: builds are not serialised
        yield
        return
    try:
        f = open(path, "w")
    except OSError as e:
        raise _unwritable(path.parent, e) from None
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _jobs() -> int:
    """The CPUs this process may run on (ninja's own default, their count + 2, only makes the
    compilers of a small machine take turns)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def _max_jobs() -> Iterator[None]:
    """cpp_extension's ninja runs one compiler per CPU, unless ``MAX_JOBS`` says otherwise."""
    if "MAX_JOBS" in os.environ:
        yield
        return
    os.environ["MAX_JOBS"] = str(_jobs())
    try:
        yield
    finally:
        os.environ.pop("MAX_JOBS", None)


def _compile(directory: Path, name: str) -> Path:
    """Compile the kernels in a private directory under ``directory`` and load them into this
    process (cpp_extension does both); returns the library, moved beside its final place."""
    from torch.utils import cpp_extension

    with tempfile.TemporaryDirectory(prefix="build-", dir=directory) as tmp, _max_jobs():
        cpp_extension.load(
            name=name,
            sources=[str(s) for s in SOURCES],
            extra_cflags=list(_cflags()),
            extra_ldflags=list(_ldflags()),
            build_directory=tmp,
            is_python_module=False,
            verbose=False,
        )
        # cpp_extension renames a second build of one name in a process (name_v1.so)
        built = max(Path(tmp).glob(f"{name}*.so"), key=lambda p: p.stat().st_mtime)
        staged = directory / f".{name}.{os.getpid()}.so"
        shutil.move(str(built), staged)
    return staged


def _remove_leftovers(directory: Path, name: str) -> None:
    """Remove what builds of ``name`` killed midway left in ``directory`` (the library's own):
    their private ``build-*`` directories and staged ``.NAME.PID.so`` libraries. Called with the
    directory's build lock held, so no build that is still running owns any of them."""
    for path in directory.glob("build-*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
    for path in directory.glob(".*.so"):
        if re.fullmatch(rf"\.{re.escape(name)}\.[0-9]+\.so", path.name) and path.is_file():
            path.unlink(missing_ok=True)


def _load(library: Path) -> None:
    if not _elf_complete(library):
        raise CacheError(f"{library} is not a complete shared library")
    try:
        torch.ops.load_library(str(library))
    except OSError as e:
        raise CacheError(f"{library} failed to load: {e}") from None


def _build() -> None:
    """Load the cached library if it passes its checks; else build, install and load it."""
    _check_sanitizer_runtime()
    library = library_path()
    with contextlib.suppress(CacheError):
        if _verified(library):
            _load(library)
            return
    directory = library.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(directory, e) from None
    with _file_lock(directory / "build.lock"):
        with contextlib.suppress(CacheError):
            if _verified(library):  # another process built it while we waited
                _load(library)
                return
        stale = library.exists()
        _discard(library)
        _remove_leftovers(directory, library.stem)
        print(
            f"rnnkit: building the C++ CPU kernels (first use, cached in {directory})"
            if not stale
            else f"rnnkit: rebuilding the C++ CPU kernels (the cached library in {directory} "
            "failed its checks)",
            file=sys.stderr,
            flush=True,
        )
        staged = _compile(directory, library.stem)
        try:
            if not _elf_complete(staged):
                raise CacheError(f"the build left an incomplete library ({staged})")
            os.replace(staged, library)  # atomic: others see all of it or nothing
        finally:
            staged.unlink(missing_ok=True)
        # it loaded (in _compile): only now is it known good
        _checksum_path(library).write_text(_sha256(library) + "\n")


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


def _check_environment() -> None:
    """ValueError naming the value of an environment variable the kernels read unless they read
    it as given: ``RNNKIT_CPU_SCRATCH_MB`` unset, empty or a whole number of megabytes (the
    kernels would otherwise fall back to the default without a word)."""
    value = os.environ.get(SCRATCH_ENV, "")
    if value and (re.fullmatch(r"\s*\+?[0-9]+", value) is None or int(value) > (2**63 - 1) >> 20):
        raise ValueError(
            f"{SCRATCH_ENV} = {value!r}; expected a whole number of megabytes >= 0 (default "
            "1024; 0 keeps nothing)"
        )


def ensure() -> None:
    """Load the kernels or raise with the reason they are unavailable (or with the bad value of
    an environment variable they read)."""
    global _environment_checked
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(f"rnnkit cpu backend: {reason}")
    if not _environment_checked:
        _check_environment()
        _environment_checked = True
