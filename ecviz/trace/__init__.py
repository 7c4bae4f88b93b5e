"""Routing traces: record (hooks), store (background Zarr writer), format (schema v4: variables and attributes),
integrity (damage found and repaired), run (`ecviz trace`).

Reading a trace needs only `format`; recording needs torch, so `Recorder`, `BatchLayout`, `record` and
`TraceWriter` are imported on first use (reading a trace stays quick: importing torch takes seconds). `record` is
the recording function, as before, also after its submodule `ecviz.trace.record` has been imported (which would
otherwise rebind the package attribute to the module).
"""

import sys
import types

from ecviz.errors import DamagedTraceError
from ecviz.trace.format import SCHEMA_VERSION, VARIABLES, TraceError, open_trace
from ecviz.trace.integrity import verify_trace

__all__ = ["SCHEMA_VERSION", "VARIABLES", "BatchLayout", "DamagedTraceError", "Recorder", "TraceError",
           "TraceWriter", "open_trace", "record", "verify_trace"]


class _Package(types.ModuleType):
    @property
    def record(self):
        from ecviz.trace.record import record

        return record

    @record.setter
    def record(self, module):  # the import system stores the submodule here; `record` stays the function
        pass

    @property
    def Recorder(self):
        from ecviz.trace.record import Recorder

        return Recorder

    @property
    def BatchLayout(self):
        from ecviz.trace.record import BatchLayout

        return BatchLayout

    @property
    def TraceWriter(self):
        from ecviz.trace.store import TraceWriter

        return TraceWriter


sys.modules[__name__].__class__ = _Package
