"""Routing traces: record (hooks), store (background Zarr writer), format (schema v1), run (`ecviz trace`).

Reading a trace needs only `format` (xarray and zarr); the recorder and the writer need torch, so they are
imported on first use (`ecviz.trace.record`, `ecviz.trace.TraceWriter`), never by `ecviz.open_trace`.
"""

from __future__ import annotations

import importlib
import sys
import types

from ecviz.trace.format import SCHEMA_VERSION, VARIABLES, TraceError, open_trace

_LAZY = {"BatchLayout": "ecviz.trace.record", "Recorder": "ecviz.trace.record", "record": "ecviz.trace.record",
         "TraceWriter": "ecviz.trace.store"}

__all__ = ["SCHEMA_VERSION", "VARIABLES", "BatchLayout", "Recorder", "TraceError", "TraceWriter", "open_trace",
           "record"]


def __getattr__(name: str):
    """Import the torch-using parts (recorder, writer) only when someone asks for them."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """`ecviz.trace.record` is the function `record`, as when it was imported eagerly: importing the submodule
    of the same name (which sets the package attribute to the module) must not replace it."""

    def __setattr__(self, name, value):
        if name == "record" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
