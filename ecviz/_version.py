"""The installed package's version, from its metadata (pyproject.toml is the one place it is written)."""

from __future__ import annotations


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("ecviz")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        return "0+unknown"
