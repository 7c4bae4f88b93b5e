"""ecviz: see where an expert-choice diffusion transformer (EC-DiT) spends its compute."""

from ecviz._version import version as _version

__version__ = _version()


def open_trace(path, verify: bool = False):
    """Open a trace store as an xarray.Dataset (see docs/trace-format.md); reading a damaged sample raises
    ecviz.trace.DamagedTraceError naming it (verify=True: check every chunk first)."""
    from ecviz.trace.format import open_trace as _open

    return _open(path, verify=verify)
