"""ecviz: see where an expert-choice diffusion transformer (EC-DiT) spends its compute."""

from ecviz._version import version as _version

__version__ = _version()


def open_trace(path):
    """Open a trace store as an xarray.Dataset (see docs/trace-format.md)."""
    from ecviz.trace.format import open_trace as _open

    return _open(path)
