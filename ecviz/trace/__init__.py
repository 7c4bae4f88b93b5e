"""Routing traces: record (hooks), store (background Zarr writer), format (schema v1), run (`ecviz trace`)."""

from ecviz.trace.format import SCHEMA_VERSION, VARIABLES, TraceError, open_trace
from ecviz.trace.record import BatchLayout, Recorder, record
from ecviz.trace.store import TraceWriter

__all__ = ["SCHEMA_VERSION", "VARIABLES", "BatchLayout", "Recorder", "TraceError", "TraceWriter", "open_trace",
           "record"]
