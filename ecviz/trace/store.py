"""Writing traces: a background thread that streams finished batches into the Zarr store.

The sampling thread hands each batch over through a bounded queue (so a slow disk applies back-pressure
instead of filling memory) and goes on sampling. For every batch the writer writes all variables first and
the samples' `done` flags last, so a killed run never leaves a sample marked done with data missing.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import zarr

from ecviz.trace.format import writing
from ecviz.trace.integrity import array_keys
from ecviz.trace.record import BatchRecord


class TraceWriter:
    """Writes BatchRecords to a store on a background thread; `close()` flushes and re-raises its errors."""

    def __init__(self, root: zarr.Group, max_pending: int = 4):
        self.root = root
        with writing():  # every chunk stored, fill values too: an absent chunk is damage (ecviz.trace.integrity)
            self.arrays = {name: root[name] for name in array_keys(root)}  # opened once: a lookup reads metadata
        self.queue: queue.Queue = queue.Queue(max_pending)
        self.error: BaseException | None = None
        self.written = 0
        self.thread = threading.Thread(target=self._run, name="ecviz-trace-writer", daemon=True)
        self.thread.start()

    def put(self, rec: BatchRecord) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(rec)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (rec := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.write(rec)
                except BaseException as e:  # surfaced on the sampling thread by put/close
                    self.error = e

    def write(self, rec: BatchRecord) -> None:
        per_sample, per_group = rec.arrays()
        samples = rec.layout.samples[rec.layout.samples >= 0]
        s0, s1 = int(samples[0]), int(samples[-1]) + 1
        assert s1 - s0 == len(samples), "a batch holds consecutive samples"
        for name, values in per_sample.items():
            if name in self.arrays:
                self.arrays[name][s0:s1] = values
        if per_group:
            g0 = rec.layout.first_group
            g1 = g0 + len(per_group["dispatch"])
            for name, values in per_group.items():
                self.arrays[name][g0:g1] = values
        self.arrays["done"][s0:s1] = True
        self.written += len(samples)


def remove_partials(path: str | Path) -> int:
    """Delete `*.partial` files a killed writer left behind; returns how many."""
    n = 0
    for p in Path(path).rglob("*.partial"):
        p.unlink(missing_ok=True)
        n += 1
    return n
