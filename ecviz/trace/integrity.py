"""Damage is found, not trusted: which samples of a trace store have a chunk that is missing, truncated or
altered, and taking those batches out so that `ecviz trace` computes them again.

Since schema 3 every chunk carries a CRC-32C and every chunk of a written batch is stored, fill values
included (`ecviz.trace.format`). So for a sample marked done:

- a storage file (a shard, or a chunk where there are no shards) that is absent or empty is damage (zarr
  would read it back as fill values, silently);
- a chunk that fails to decode (checksum mismatch, a truncated shard whose index no longer checks out) is damage.

A shard never spans two writer batches, so damage is found per batch and repaired per batch: `repair` deletes
the batch's files in every per-sample and per-group variable (its `done` flags with them), and the rerun writes
the batch again, bit for bit what an undamaged run wrote. `find_damage` reads every chunk of the done samples
once (a fraction of what computing them cost); with `read=False` it only lists files and reads `done`, which
`open_trace` does on every open. Reading a damaged chunk through `open_trace` raises DamagedTraceError, which
names the samples. Checking that files exist needs a local store; remote stores get the checksum check only.
"""

from __future__ import annotations

import functools
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

from ecviz.errors import DamagedTraceError, EcvizError, TraceError

LEADING = ("sample", "group")  # leading dimensions whose chunks belong to one writer batch


@dataclass
class Layout:
    """How rows of the `sample` and `group` dimensions map to writer batches (one shard each)."""

    n_samples: int
    per: int  # samples per writer batch (every batch but the last holds this many)
    n_groups: int = 0
    groups_per_batch: int = 1  # routing groups per writer batch (every batch but the last holds this many)

    @property
    def n_batches(self) -> int:
        return -(-self.n_samples // self.per)

    def rows(self, dim: str, b: int) -> tuple[int, int]:
        """Rows [r0, r1) of batch b along dim."""
        if dim == "sample":
            return b * self.per, min((b + 1) * self.per, self.n_samples)
        g = self.groups_per_batch
        return b * g, min((b + 1) * g, self.n_groups)

    def batches(self, dim: str, r0: int, r1: int) -> range:
        """The batches rows [r0, r1) of dim belong to."""
        size = self.per if dim == "sample" else self.groups_per_batch
        return range(r0 // size, -(-r1 // size))

    def samples(self, batches) -> list[int]:
        return [s for b in sorted(set(batches)) for s in range(*self.rows("sample", b))]


def array_keys(root) -> list[str]:
    """The names of a group's arrays, sorted. zarr's own `array_keys` opens them all at once on its event loop:
    when one's metadata is damaged it raises, and the others, left pending, print pages of asyncio tracebacks at
    exit after the one-line error. A local store is listed from its directory instead, each child's zarr.json
    read in turn (one that does not parse is listed, so that opening it gives the metadata error)."""
    base = getattr(root.store, "root", None)
    if base is None:
        return sorted(root.array_keys())
    names = []
    for child in sorted((Path(base) / root.path).iterdir()):
        try:
            meta = json.loads((child / "zarr.json").read_bytes())
        except (FileNotFoundError, NotADirectoryError):
            continue
        except ValueError:  # damaged: zarr says so when it is opened
            meta = {"node_type": "array"}
        if not isinstance(meta, dict) or meta.get("node_type") == "array":
            names.append(child.name)
    return names


def layout(root) -> Layout:
    """The batch layout of an open store, read from its storage: a writer batch is one shard of every variable,
    so the shard rows of `done` are the samples per batch and those of a per-group variable the groups per
    batch. (Dividing the groups evenly over the batches was wrong whenever the last batch is short: it held
    fewer groups, and a repair deleted a neighbouring batch's group shards.)"""
    n = int(root["done"].shape[0])
    per = _storage_rows(root["done"])
    group_arrays = [root[k] for k in array_keys(root) if _leading(root[k]) == "group"]
    groups = int(group_arrays[0].shape[0]) if group_arrays else 0
    return Layout(n, per, groups, _storage_rows(group_arrays[0]) if group_arrays else 1)


def _storage_rows(arr) -> int:
    shards = getattr(arr, "shards", None)
    return int(shards[0] if shards else arr.chunks[0])


def _leading(arr) -> str | None:
    names = arr.metadata.dimension_names or ()
    return names[0] if names and names[0] in LEADING else None


def _keys(arr, r0: int, r1: int) -> list[str]:
    """Storage keys (shard or chunk files, relative to the array) holding rows [r0, r1)."""
    R = _storage_rows(arr)
    rest = (0,) * (arr.ndim - 1)
    return [arr.metadata.encode_chunk_key((k, *rest)) for k in range(r0 // R, -(-r1 // R))]


def metadata_errors(fn):
    """A store whose metadata cannot be read (a truncated zarr.json, a missing `done`, an unknown codec) is
    damaged beyond repair by a rerun: one TraceError naming the store and the remedy, not zarr's traceback.
    `fn` takes the store's path first; ecviz's own errors pass through."""

    @functools.wraps(fn)
    def checked(path, *args, **kwargs):
        try:
            return fn(path, *args, **kwargs)
        except EcvizError:
            raise
        except (ValueError, LookupError) as e:  # JSONDecodeError, zarr's errors, a missing array
            raise TraceError(f"{path}: cannot read the store's metadata, the store is damaged ({cause(e)}); "
                             "rewrite it with the ecviz trace command that made it, plus --overwrite") from e

    return checked


def cause(error: BaseException) -> str:
    detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if detail.startswith("Stored and computed checksum do not match"):  # zarr's, with both checksums' raw bytes
        return "its checksum does not match (the file was altered or cut short)"
    return type(error).__name__ + (f": {detail}" if detail else "")


def _local(path) -> Path | None:
    return None if "://" in str(path) else Path(path)


def batch_arrays(root):
    """(name, array, leading dimension) of every variable written batch by batch, `done` aside, by name."""
    for name in array_keys(root):
        arr = root[name]
        dim = _leading(arr)
        if dim is not None and name != "done":
            yield name, arr, dim


def static_damage(path, root) -> str | None:
    """What is wrong with the first array written once when the store was made (the coordinates: t, step, layer,
    row, col, ...), or None: a storage file absent or empty, or a chunk that fails to decode. They are small, so
    each is read whole. No batch holds them, so a rerun cannot repair them (`check_static`)."""
    local = _local(path)
    for name in array_keys(root):
        arr = root[name]
        if _leading(arr) is not None or name == "done":
            continue
        if local is not None and arr.shape and arr.shape[0] and not _present(local, arr, 0, arr.shape[0]):
            return f"`{name}`: a chunk file is missing or empty"
        try:
            arr[...]
        except Exception as e:
            return f"`{name}`: {cause(e)}"
    return None


@metadata_errors
def check_static(path, root=None) -> None:
    """TraceError naming a damaged coordinate (static_damage) and the remedy; nothing if they all check out."""
    import zarr

    problem = static_damage(path, root if root is not None else zarr.open_group(str(path), mode="r"))
    if problem:
        raise TraceError(f"{path} is damaged, {problem} (an array written once when the store was made, which a "
                         "rerun does not repair); rewrite it with the ecviz trace command that made it, plus "
                         "--overwrite")


@metadata_errors
def array_names(path) -> set[str]:
    """The variables and coordinates a store holds (reading every array's metadata)."""
    import zarr

    return set(array_keys(zarr.open_group(str(path), mode="r")))


@metadata_errors
def find_damage(path, read: bool = True) -> dict[int, str]:
    """{batch: what is wrong} for every writer batch whose samples are marked done (or whose `done` chunk is
    itself unreadable) with a storage file absent or empty, or, with read, a chunk that fails to decode."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    check_static(path, root)  # damage no batch holds: refused whole, before the batches are looked at
    lay = layout(root)
    local = _local(path)
    damage: dict[int, str] = {}
    done = np.zeros(lay.n_samples, bool)
    for b in range(lay.n_batches):  # `done` first: one small chunk per batch
        r0, r1 = lay.rows("sample", b)
        try:
            if local is not None and not _present(local, root["done"], r0, r1):
                continue  # absent flags read as False: nothing claimed done, the rerun computes the batch
            done[r0:r1] = root["done"][r0:r1]
        except Exception as e:
            damage[b] = f"`done`: {cause(e)}"
    claimed = [b for b in range(lay.n_batches) if b not in damage and done[slice(*lay.rows("sample", b))].any()]
    for name, arr, dim in batch_arrays(root):
        for b in claimed:
            if b in damage:
                continue
            r0, r1 = lay.rows(dim, b)
            if local is not None and not _present(local, arr, r0, r1):
                damage[b] = f"`{name}`: a chunk file is missing or empty"
            elif read:
                try:
                    arr[r0:r1]
                except Exception as e:
                    damage[b] = f"`{name}`: {cause(e)}"
    return dict(sorted(damage.items()))


@metadata_errors
def missing_files(path, root, lay: Layout, only=None) -> dict[str, dict[int, str]]:
    """{variable: {batch: cause}}: batches marked done with a file of that variable absent or empty (local
    stores; lists files, reads only `done`). `only`: the variables to look at (default every one)."""
    local = _local(path)
    if local is None:
        return {}
    flags = root["done"]
    present: list[bool | None] = []  # per batch: its flags' files there, absent or empty, or None: cannot tell
    for b in range(lay.n_batches):
        try:
            present.append(_present(local, flags, *lay.rows("sample", b)))
        except Exception:
            present.append(None)
    done = np.zeros(lay.n_samples, bool)
    whole = all(present)
    if whole:  # one read of every flag (a read per batch costs a millisecond each)
        try:
            done[:] = flags[...]
        except Exception:
            whole = False  # read batch by batch below, to find the unreadable ones
    for b, here in enumerate([] if whole else present):
        r0, r1 = lay.rows("sample", b)
        if here is None:  # whether its files are there cannot be told: taken as unreadable flags are
            done[r0:r1] = True
            continue
        try:
            if here:
                done[r0:r1] = flags[r0:r1]
        except Exception:
            done[r0:r1] = True  # unreadable flags: the batch may be done; its data is checked like a done one's
    claimed = [b for b in range(lay.n_batches) if done[slice(*lay.rows("sample", b))].any()]
    out: dict[str, dict[int, str]] = {}
    for name, arr, dim in batch_arrays(root):
        if only is not None and name not in only:
            continue
        for b in claimed:
            if not _present(local, arr, *lay.rows(dim, b)):
                out.setdefault(name, {})[b] = "a chunk file is missing or empty"
    return out


def _present(local: Path, arr, r0: int, r1: int) -> bool:
    base = os.path.join(local, arr.path)
    for key in _keys(arr, r0, r1):
        try:
            if os.stat(os.path.join(base, key)).st_size == 0:
                return False
        except FileNotFoundError:
            return False
    return True


@metadata_errors
def damage_error(path, damage: dict[int, str], lay: Layout | None = None) -> DamagedTraceError:
    if lay is None:
        import zarr

        lay = layout(zarr.open_group(str(path), mode="r"))
    first = next(iter(damage.values()))
    return DamagedTraceError(path, lay.samples(damage), f"{first}" + (" and more" if len(damage) > 1 else ""))


PROMPT_COLUMNS = {"parti": {"category", "challenge"}, "geneval": {"category"}}  # by prompt_file_kind


def expected_variables(attrs: dict) -> set[str] | None:
    """The arrays a store was created with: the coordinates (COORDINATES, every schema) and its variables: its
    `variables` attribute (schema 4), else (schema 3) what its routing kind, --record flags and prompt file kind
    imply, `word_object` left out (whether every prompt was a Shapes caption is not recorded there); None for a
    store that says neither."""
    from ecviz.trace.format import COORDINATES, variables_for

    if "variables" in attrs:
        return set(attrs["variables"]) | set(COORDINATES)
    routing = attrs.get("routing")
    if not isinstance(routing, dict) or "kind" not in routing:
        return None
    record = set((attrs.get("record") or {}).get("what", ()))
    has = PROMPT_COLUMNS.get(str(attrs.get("prompt_file_kind")), set())
    return set(variables_for(str(routing["kind"]), record, has)) | set(COORDINATES)


def lost_variables(path) -> list[str]:
    """Variables the store was created with (expected_variables) that are gone: nothing per batch brings one
    back, so a rerun refuses the store and verification says so."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    expected = expected_variables(dict(root.attrs)) or set()
    return sorted(expected - set(array_keys(root)))


@metadata_errors
def check_variables(path) -> None:
    """TraceError naming the first lost variable (see lost_variables) and the remedy; nothing if none is lost."""
    lost = lost_variables(path)
    if lost:
        raise TraceError(f"{path} lacks `{lost[0]}`, which its settings say it holds: the store is damaged beyond "
                         "what a rerun repairs; rewrite it with the ecviz trace command that made it, plus --overwrite")


@metadata_errors
def verify_trace(path) -> list[int]:
    """Read every chunk of every sample marked done once; the sorted indices of damaged samples ([] if none).
    `open_trace(path, verify=True)` raises DamagedTraceError naming them instead."""
    import zarr

    check_variables(path)
    damage = find_damage(path)
    return layout(zarr.open_group(str(path), mode="r")).samples(damage) if damage else []


@metadata_errors
def repair(path, batches) -> list[int]:
    """Delete every per-sample and per-group file of these batches (their `done` flags too), so that they read
    as never written and `ecviz trace` computes them again; returns their samples."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    lay = layout(root)
    for name in array_keys(root):
        arr = root[name]
        dim = _leading(arr)
        if dim is None:
            continue
        for b in batches:
            for key in _keys(arr, *lay.rows(dim, b)):
                (Path(path) / arr.path / key).unlink(missing_ok=True)
    return lay.samples(batches)


@dataclass
class _Checked:
    """One variable of a trace read block by block; a block that is damaged raises DamagedTraceError naming its
    samples (known missing files at once, a chunk that fails to decode when it is read)."""

    var: xr.Variable
    name: str
    path: str
    lay: Layout
    dim: str
    bad: dict[int, str] = field(default_factory=dict)

    @property
    def shape(self):
        return self.var.shape

    @property
    def dtype(self):
        return self.var.dtype

    @property
    def ndim(self):
        return self.var.ndim

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        first = key[0] if key else slice(None)
        rows = range(self.shape[0])[first] if isinstance(first, slice) else np.atleast_1d(first)
        r0, r1 = (int(min(rows)), int(max(rows)) + 1) if len(rows) else (0, 0)
        batches = self.lay.batches(self.dim, r0, r1)
        bad = [b for b in batches if b in self.bad]
        if bad:
            raise DamagedTraceError(self.path, self.lay.samples(bad), self.bad[bad[0]], self.name)
        try:
            return np.asarray(self.var[key].values)
        except Exception as e:
            raise DamagedTraceError(self.path, self.lay.samples(batches), cause(e), self.name) from e


@metadata_errors
def checked_dataset(path, chunks: dict[str, int]) -> xr.Dataset:
    """The trace as xarray.open_zarr gives it, dask-backed with `chunks` along sample and group (else a whole
    storage chunk), each per-sample and per-group variable read through _Checked."""
    import dask.array as da
    import zarr

    root = zarr.open_group(str(path), mode="r")
    check_static(path, root)  # xarray would read a missing coordinate chunk as fill values, silently
    lay = layout(root)
    missing = missing_files(path, root, lay)
    lazy = xr.open_zarr(str(path), consolidated=False, chunks=None)
    token = uuid.uuid4().hex[:12]
    out = {}
    for name, var in lazy.data_vars.items():
        dim = var.dims[0] if var.dims and var.dims[0] in LEADING else None
        if dim is None:
            continue
        rows = chunks.get(dim) or (var.encoding.get("shards") or var.encoding.get("chunks") or var.shape)[0]
        block = (min(rows, var.shape[0]) if var.shape[0] else 1, *var.shape[1:])
        checked = _Checked(var.variable, name, str(path), lay, dim, missing.get(name, {}))
        data = da.from_array(checked, chunks=block, name=f"open_trace-{name}-{token}",
                             meta=np.empty((0,) * var.ndim, var.dtype))
        out[name] = var.copy(data=data)
    return lazy.assign(out)
