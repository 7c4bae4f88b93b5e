"""ecviz: see where an expert-choice diffusion transformer (EC-DiT) spends its compute."""

__version__ = "0.1.0"


def open_trace(path):
    """Open a trace store as an xarray.Dataset (see docs/trace-format.md)."""
    from ecviz.trace.format import open_trace as _open

    return _open(path)
