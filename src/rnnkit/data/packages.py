"""Locate the data files that a package ships, without importing the package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import DataMissing

__all__ = ["INSTALL_ALL", "package_dir"]

# How the whole set of recipe data is installed (the ``data`` extra in pyproject.toml).
INSTALL_ALL = 'pip install "rnnkit[data]"'


def package_dir(module: str) -> Path | None:
    """The directory of an installed top-level package, or None; the package is not imported."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_data(what: str, candidates: list[tuple[str, str]], install: str) -> Path:
    """The first existing ``package/relative/path`` among ``candidates`` (module, relative path).

    Raises :class:`DataMissing` naming ``what`` and the exact ``install`` command otherwise.
    """
    looked = []
    for module, rel in candidates:
        root = package_dir(module)
        if root is None:
            looked.append(f"{module} (not installed)")
            continue
        path = root / rel
        if path.exists():
            return path
        looked.append(f"{path} (missing)")
    raise DataMissing(
        f"{what} not found; looked in: {', '.join(looked)}. Install it with:\n    {install}\n"
        f"(or every recipe's data at once: {INSTALL_ALL})"
    )
