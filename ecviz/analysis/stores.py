"""Finding and opening routing records for a viewer (the Streamlit app): every trace store under `traces/`,
every training run with a routing probe under `runs/` and `checkpoints/`, the newest trace, and opening one so
that every way it can be unusable (missing, not a store, damaged, another format version, unfinished, empty)
becomes a one-line TraceError saying what to do, never a traceback.

A store can be rewritten while a viewer holds it open (a demo still running, `ecviz trace --overwrite`);
`stamp()` changes whenever it is, so caches keyed on it never serve stale maps.
"""

from __future__ import annotations

import json
import os
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from ecviz.errors import TraceError
from ecviz.trace.format import REWRITE

MAKE_ONE = "write one with ecviz trace (./run.sh demo writes traces/demo.zarr)"
PROBE_REMEDY = ("it is written by ecviz train: move it away (the weights do not depend on it) and resume or rerun "
                "that training to record it again")


@dataclass(frozen=True)
class Store:
    """A routing record on disk: kind "trace" (a trace store) or "run" (a training run's routing.zarr)."""

    path: Path
    kind: str
    label: str
    mtime: float


def _mtime(path: Path) -> float:
    times = [path.stat().st_mtime]
    meta = path / "zarr.json"
    if meta.is_file():
        times.append(meta.stat().st_mtime)
    return max(times)


def _trace_dirs(folder: Path):
    """Directories under folder that are Zarr stores (have zarr.json or are named *.zarr), not descending into
    them; hidden names (atomic writers' temporaries) are skipped."""
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        if (entry / "zarr.json").exists() or entry.suffix == ".zarr":
            yield entry
        else:
            yield from _trace_dirs(entry)


def find_stores(root: str | Path = ".") -> list[Store]:
    """Every trace store under root/traces (recursively) and every run directory under root/runs and
    root/checkpoints holding a routing.zarr, in that order, each sorted by path. Stores that turn out to be
    unusable are listed too: opening one says why."""
    root = Path(root)
    out: list[Store] = []
    traces = root / "traces"
    if traces.is_dir():
        for p in _trace_dirs(traces):
            out.append(Store(p, "trace", str(p.relative_to(root)), _mtime(p)))
    for parent in ("runs", "checkpoints"):
        d = root / parent
        if not d.is_dir():
            continue
        for run in sorted(d.iterdir()):
            probe = run / "routing.zarr"
            if probe.is_dir() and not run.name.startswith("."):
                out.append(Store(run, "run", str(run.relative_to(root)), _mtime(probe)))
    return out


def newest_trace(stores: list[Store]) -> Store | None:
    """The most recently written trace store of a find_stores list (None if there is none)."""
    traces = [s for s in stores if s.kind == "trace"]
    return max(traces, key=lambda s: s.mtime) if traces else None


def stamp(path: str | Path) -> str:
    """A short digest that changes whenever the store at path is rewritten, resumed or appended to, or a writer
    starts or stops: of the writer holding its lock (`ecviz.lock.holder`) and the mtimes of its metadata and of
    the `done` flags' files (traces) or of zarr.json (probes: the row count lives there). '' for a missing
    path."""
    import hashlib

    from ecviz.analysis.common import writer_at

    path = Path(path)
    writer = writer_at(path)  # a writer's start or end changes it too
    if (path / "routing.zarr").is_dir():
        path = path / "routing.zarr"
    if not path.exists():
        return ""
    parts: list = [writer, path.stat().st_mtime_ns]
    meta = path / "zarr.json"
    if meta.is_file():
        parts.append(meta.stat().st_mtime_ns)
    done = path / "done"
    if done.is_dir():
        for dirpath, _, files in os.walk(done):
            parts.extend((f, os.stat(os.path.join(dirpath, f)).st_mtime_ns) for f in sorted(files))
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:16]


def damaged(path, error: BaseException, what: str = "") -> str:
    """The one-line message for a store that cannot be read, with the remedy for its kind (trace or probe)."""
    from ecviz.trace.integrity import cause

    where = f" `{what}`" if what else ""
    return f"{path}: cannot read{where}, the store is damaged ({cause(error)}); {remedy(path)}"


def remedy(path) -> str:
    """What rewrites a damaged store: the trace command, or for a training run's probe the training."""
    path = Path(path)
    probe = path.name == "routing.zarr" or (path / "routing.zarr").is_dir()
    return PROBE_REMEDY if probe else REWRITE


STORAGE = ("zarr", "numcodecs", "zstandard", "fsspec", "obstore")  # libraries whose errors mean "cannot read it"


def from_storage(error: BaseException) -> bool:
    """Whether an error came from reading files: an OSError, or raised inside the storage libraries (a shard
    that fails its checksum, a chunk that does not decompress)."""
    if isinstance(error, OSError):
        return True
    parts = {p for frame in traceback.extract_tb(error.__traceback__) for p in Path(frame.filename).parts}
    return any(lib in parts for lib in STORAGE)


def explain(error: BaseException, path=None) -> str:
    """One line for any error met while showing a store: an EcvizError's own message; an error from reading its
    files (a damaged chunk is found only when it is read) as damaged(); anything else as a bug to report."""
    from ecviz.errors import EcvizError

    if isinstance(error, EcvizError):
        return str(error)
    if from_storage(error):
        return damaged(path or "the store", error)
    detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"unexpected error ({type(error).__name__}: {detail}): a bug in ecviz, not a problem with the store; " \
           "the console shows its traceback, please report it"


LABELS = ("prompt",)  # what a viewer lists on its first page


def _load_labels(ds: xr.Dataset, path: Path, names=LABELS) -> xr.Dataset:
    """Small per-sample variables (prompts, flags) read into memory with one zarr read each: through dask that is
    a task per sample (seconds for thousands of samples)."""
    import zarr

    names = [n for n in names if n in ds and ds[n].dims == ("sample",)]
    if not names:
        return ds
    try:
        root = zarr.open_group(str(path), mode="r")
        loaded = {n: (ds[n].dims, root[n][...], ds[n].attrs) for n in names}
        damage = _trace_damage(ds, path, root, names)
    except Exception as e:
        damage = _trace_damage(ds, path, None, names, e)
        if damage is None:
            raise TraceError(damaged(path, e)) from None
    if damage is not None:
        raise damage
    return ds.assign(loaded)


def _trace_damage(ds: xr.Dataset, path: Path, root, names, error: BaseException | None = None):
    """For a trace: a DamagedTraceError naming the samples when a label's file of a done sample is absent or
    empty (zarr reads those as '' without a word) or, after a read error, whichever samples are damaged."""
    from ecviz.trace import integrity

    if "ecviz_schema_version" not in ds.attrs:
        return None
    try:
        if error is not None:
            found = integrity.find_damage(path)
            return integrity.damage_error(path, found) if found else None
        lay = integrity.layout(root)
        missing = integrity.missing_files(path, root, lay, only=names)
        bad = sorted({b for n in names for b in missing.get(n, {})})
        return integrity.damage_error(path, {b: "a chunk file is missing or empty" for b in bad}, lay) if bad \
            else None
    except Exception:
        return None


def open_store(path: str | Path, partial: bool = False) -> xr.Dataset:
    """Open a trace store or a training run (run directory, routing.zarr or a checkpoint directory holding one)
    for viewing: checks it exists, is an ecviz store of the version this ecviz reads, is finished (its `complete`
    attribute, which `ecviz trace` sets after the last sample's flags, or else every `done` flag) and readable (its
    first sample), and raises a one-line TraceError saying what to do otherwise. The prompts are read into
    memory; a probe is trimmed to its committed rows (by open_probe).

    partial: a trace with some samples done (one being written, or one whose writer stopped) opens as the
    `subset` of its done samples, with a line saying so in the `partial` attribute, rather than being refused:
    a viewer shows what is there while the rest is computed. A store is written atomically file by file and a
    sample's `done` flag after its arrays, so the done samples read whole."""
    path = Path(path)
    if not path.exists():
        raise TraceError(f"{path}: not found; {MAKE_ONE}, or pass --trace PATH")
    probe = path / "routing.zarr" if (path / "routing.zarr").is_dir() else path
    opener = _opener(path, probe)
    try:
        ds = opener(path)
    except TraceError:
        raise
    except Exception as e:  # unreadable array metadata
        raise TraceError(damaged(path, e)) from None
    ds.attrs["path"] = str(path)
    ds = _load_labels(ds, probe)  # a probe comes trimmed to its committed rows (open_probe)
    if partial:
        ds = _done_part(ds, path, probe)
    _check_finished(ds, path, probe)
    return ds


def _done_part(ds: xr.Dataset, path: Path, probe: Path) -> xr.Dataset:
    """An unfinished trace with done samples as the subset of those, its `partial` attribute saying how many of
    how many and whether a writer is still at work; anything else as it is."""
    from ecviz.analysis.common import samples_done, writer_of
    from ecviz.analysis.explore import subset

    if "sample" not in ds.dims or ds.attrs.get("complete") is True:
        return ds
    flags = _load_labels(ds, probe, ("done",))
    done, n = samples_done(flags)
    if done == 0 or done == n:
        return ds
    writer = writer_of(ds)
    how = (f"being written by {writer}: reload to see more" if writer else
           "its writer stopped; rerun the same ecviz trace command to finish it")
    part = subset(flags, np.flatnonzero(flags["done"].values))
    part.attrs["partial"] = f"{done} of {n} samples done, shown here ({how})"
    return part


def _opener(path: Path, probe: Path):
    """open_trace or open_probe, by the store's version attribute; a one-line TraceError for anything else."""
    from ecviz.analysis.common import open_probe
    from ecviz.trace.format import check_readable, open_trace

    meta = probe / "zarr.json"
    if not path.is_dir() or not meta.is_file():
        raise TraceError(f"{path}: not a Zarr store (no zarr.json); pick a store written by ecviz trace or a run "
                         "directory with a routing.zarr")
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError) as e:
        raise TraceError(damaged(path, e, "zarr.json")) from None
    attrs = doc.get("attributes", {}) if isinstance(doc, dict) else None
    if not isinstance(attrs, dict):  # JSON, but not a Zarr group's metadata
        raise TraceError(f"{path}: its zarr.json is not a Zarr group's metadata (an object with attributes); "
                         f"the store is damaged; {remedy(path)}")
    if "ecviz_probe_version" in attrs:
        version = attrs["ecviz_probe_version"]
        if version != 1 or isinstance(version, bool) or not isinstance(version, int):  # as stored: "1" is not 1
            raise TraceError(f"{path}: training probe version {json.dumps(version)}, this ecviz reads version 1; "
                             "rerun the training with this ecviz, or use the ecviz that wrote it")
        return open_probe
    if "ecviz_schema_version" in attrs:
        check_readable(path, attrs["ecviz_schema_version"], REWRITE)
        return open_trace
    raise TraceError(f"{path}: a Zarr store but not an ecviz trace or training probe; {MAKE_ONE}")


def _check_finished(ds: xr.Dataset, path: Path, probe: Path) -> None:
    """Raise a one-line TraceError unless the store is finished (its `complete` attribute, else every done flag)
    and its first sample's allocation and image read back (a damaged chunk fails here, not in a figure)."""
    from ecviz.analysis.common import check_complete

    partial = "partial" in ds.attrs  # the done samples alone (open_store(partial=True)): complete as they are
    if not partial and ("sample" not in ds.dims or ds.attrs.get("complete") is not True):
        try:
            check_complete(_load_labels(ds, probe, ("done",)) if "sample" in ds.dims else ds)
        except TraceError as e:
            raise TraceError(f"{path}: {e}") from None
    for name in ("expert_count", "image"):
        if name not in ds:
            continue
        try:
            ds[name].isel({ds[name].dims[0]: 0}).values  # noqa: B018
        except TraceError:  # DamagedTraceError: names the samples and the remedy
            raise
        except Exception as e:
            raise TraceError(damaged(path, e, name)) from None
