"""What every analysis shares: recognising a routing record, checking it has what a statistic needs, the
experts-per-token array, and numpy kernels that turn rows of per-token expert counts into statistics.

Two kinds of routing record open as an `xarray.Dataset`:
- a **trace** (`ecviz.open_trace`): expert_count (sample, branch, step, layer, token), dispatch (group, step,
  layer, expert, slot), ... (docs/trace-format.md);
- a **training probe** (`runs/NAME/routing.zarr`, `open_probe`): expert_count (train_step, probe, t, layer,
  token), expert_load, tc_drop_rate.
Statistics reduce over the *sample dimension* (`sample`, or `probe`) and over `token`, and keep the rest, so the
same function gives per-(step, layer) numbers for a trace and per-(train_step, t, layer) numbers for a probe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import xarray as xr

from ecviz.errors import TraceError

# the --record flag (or run kind) that writes each variable, for error messages
RECORDED_BY = {
    "dispatch": "--record dispatch (on an EC or TC checkpoint)",
    "gate": "--record dispatch (on an EC or TC checkpoint)",
    "group_member_sample": "--record dispatch (on an EC or TC checkpoint)",
    "expert_count": "--record dispatch (on an EC or TC checkpoint)",
    "gate_sum": "--record dispatch (on an EC or TC checkpoint)",
    "tc_expert": "--record dispatch on a token-choice (TC) checkpoint",
    "affinity": "--record affinity",
    "cross_attn": "--record cross_attn",
    "x0": "--record x0",
    "word_object": "Shapes captions as prompts (e.g. --prompts shapes)",
    "category": "a PartiPrompts .tsv or GenEval .jsonl prompt file",
}


def kind(ds: xr.Dataset) -> str:
    """'trace' or 'probe'."""
    if "train_step" in ds.dims:
        return "probe"
    if "ecviz_schema_version" in ds.attrs:
        return "trace"
    raise TraceError("not an ecviz trace or training probe (open it with ecviz.open_trace or open_probe)")


def sample_dim(ds: xr.Dataset | xr.DataArray) -> str:
    """The dimension that enumerates images: `sample` in traces, `probe` in training probes."""
    return "probe" if "probe" in ds.dims else "sample"


def routing_kind(ds: xr.Dataset) -> str:
    """'ec', 'tc' or 'dense'."""
    if "routing" in ds.attrs:
        return ds.attrs["routing"]["kind"]
    model = ds.attrs.get("model_config")  # a training probe: the model it probes
    if isinstance(model, dict) and model.get("routing") in ("ec", "tc", "dense"):
        return model["routing"]
    return ds.attrs.get("routing_kind", "tc" if "tc_drop_rate" in ds and float(ds.tc_drop_rate.max()) > 0 else "ec")


def n_experts(ds: xr.Dataset) -> int:
    if "routing" in ds.attrs:
        return int(ds.attrs["routing"]["experts"])
    if "expert" in ds.sizes:
        return int(ds.sizes["expert"])
    return int(ds.attrs.get("experts", 0))


def require(ds: xr.Dataset, *names: str, what: str = "this statistic") -> None:
    """Raise a one-line TraceError naming the first missing variable and the flag that records it."""
    for name in names:
        if name not in ds.variables:
            where = ds.encoding.get("source") or ds.attrs.get("path") or "this trace"
            how = RECORDED_BY.get(name)
            hint = f": record it with ecviz trace {how}" if how and not how.startswith("a ") and \
                not how.startswith("Shapes") else (f": it needs {how}" if how else "")
            if kind_of_dense(ds) and routed(name):
                hint = ": a dense model has no routing"
            raise TraceError(f"{where}: {what} needs `{name}`, which it lacks{hint}")


def branch_index(ds: xr.Dataset, branch: str) -> int:
    """The position of a guidance branch ("cond", "uncond") in the trace's `branch` dimension; a one-line
    TraceError naming the branches it has for any other."""
    branches = ds["branch"].values.tolist() if "branch" in ds.coords else ["cond"]
    if branch not in branches:
        raise TraceError(f"branch {branch!r} is not in this trace (it has {branches})")
    return branches.index(branch)


def require_trace(ds: xr.Dataset, what: str) -> None:
    """Raise a one-line TraceError unless ds is a trace (samples of generated images), naming what needs one: a
    training probe, or a result of a statistic, would fail deeper for want of `sample` or `prompt`."""
    if "sample" not in ds.dims:
        given = "a training probe" if "train_step" in ds.dims else "a Dataset without samples"
        raise TraceError(f"{what} takes a trace (ecviz.open_trace), not {given}")


def routed(name: str) -> bool:
    """Whether a trace variable is one only a routing model writes (the schema's `when`)."""
    from ecviz.trace.format import VARIABLES

    return name in VARIABLES and VARIABLES[name].when in ("routing", "tc", "affinity")


def kind_of_dense(ds: xr.Dataset) -> bool:
    return ds.attrs.get("routing", {}).get("kind") == "dense"


DONE_ONLY = "ecviz.analysis.subset(ds, np.flatnonzero(ds.done.values))"  # a trace's done samples alone


_BOOKKEEPING: OrderedDict[str, np.ndarray] = OrderedDict()  # dask name -> values, most recent last
_BOOKKEEPING_LOCK = threading.Lock()  # the app's sessions are threads


def bookkeeping(ds: xr.Dataset, name: str) -> np.ndarray:
    """The values of a small per-sample or per-group variable (the `done` flags, the routing groups' members),
    read-only. Of a trace that was finished when `open_trace` opened it, they are read from the store once and
    kept (keyed by the dask array's name, which names one open's data and the selections made from it), rather
    than by every statistic that needs them: each read visits one file per writer batch (a fifth of a second for
    a PartiPrompts-size trace). Anything else is read each time: a trace still being written (its flags and
    groups change under it), or one opened otherwise (`xr.open_zarr` names its arrays by path, so two opens of
    a changed store would share a name)."""
    data = ds[name].data
    key = _kept_key(ds, data)
    if key is not None:
        with _BOOKKEEPING_LOCK:
            if key in _BOOKKEEPING:
                _BOOKKEEPING.move_to_end(key)
                return _BOOKKEEPING[key]
    # a damaged chunk raises here, and nothing is kept; a view, so that an in-memory array stays writable
    values = np.asarray(data.compute() if hasattr(data, "compute") else data).view()
    values.flags.writeable = False
    if key is not None:
        with _BOOKKEEPING_LOCK:
            _BOOKKEEPING[key] = values
            while len(_BOOKKEEPING) > 64:
                _BOOKKEEPING.popitem(last=False)
    return values


def _kept_key(ds: xr.Dataset, data) -> str | None:
    """The cache key of `bookkeeping`: the dask name of an array that open_trace made (every root layer of its
    graph is one of its `open_trace-` reads, or the array object dask's from_array keeps beside one) of a trace
    finished at open; None for anything else."""
    from dask.base import is_dask_collection

    if not is_dask_collection(data) or ds.attrs.get("complete") is not True:
        return None
    graph = data.__dask_graph__()
    roots = [k for k, deps in getattr(graph, "dependencies", {}).items() if not deps]
    ours = all(str(k).removeprefix("original-").startswith("open_trace-") for k in roots)  # dask's from_array
    return data.name if roots and ours else None


def samples_done(ds: xr.Dataset) -> tuple[int, int]:
    """(done, n): how many of a trace's n samples are done (all of them where it does not say)."""
    n = ds.sizes.get("sample", 0)
    return (int(bookkeeping(ds, "done").sum()) if "done" in ds else n), n


def require_done(ds: xr.Dataset, what: str) -> None:
    """Refuse a trace with samples not done for statistics over routing groups: the groups of samples not yet
    written hold no dispatch and would count as groups no expert filled (per-image maps only warn:
    experts_per_token)."""
    if "sample" not in ds.dims or ds.attrs.get("complete") is True:
        return
    done, n = samples_done(ds)
    if done < n:
        raise TraceError(f"{what}: {n - done} of {n} samples of this trace are not done, and their routing groups "
                         f"would count as empty; analyse the done ones with {DONE_ONLY}")


def check_uncut(ds: xr.Dataset, members: np.ndarray | None = None) -> None:
    """Refuse a trace cut, reordered or repeated with `isel`: it leaves the routing groups naming samples by their
    store index, so which image a group member is cannot be known (`subset` renumbers them). `open_trace`'s
    `store_sample` coordinate follows the samples through any selection, so a reordering of the same length is
    seen too; without it (`xr.open_zarr`) only a cut is. `members`: `group_member_sample`'s values where the
    caller has read them already (each read of a store variable goes to disk)."""
    if members is None:
        if "group_member_sample" not in ds:
            return
        members = bookkeeping(ds, "group_member_sample")
    top, n = int(members.max(initial=-1)), ds.sizes["sample"]
    kept = ds.attrs.get("subset_of")  # the store indices `subset` kept, in its order; else the store's 0..n-1
    order = np.asarray(kept, dtype=np.int64) if kept is not None else np.arange(n)
    ids = ds.coords.get("store_sample")
    if top >= n or (ids is not None and not np.array_equal(ids.values, order)):
        raise TraceError(f"routing groups name samples by their place in the store ({n} samples), and this "
                         "Dataset's samples were reordered, repeated or cut with isel; select samples with "
                         "ecviz.analysis.subset(ds, samples), which renumbers its groups")


def check_complete(ds: xr.Dataset) -> None:
    """Refuse an empty or unfinished trace, saying how many samples are done."""
    if kind(ds) != "trace":
        if ds.sizes.get("train_step", 0) == 0:
            writer = writer_of(ds)
            raise TraceError("the training probe has no rows yet (the run has not reached its first probe" +
                             (f"; it is being trained by {writer})" if writer else ")"))
        return
    done, n = samples_done(ds)
    if done < n and (writer := writer_of(ds)):
        raise TraceError(f"the trace is being written by {writer}: {done} of {n} samples done so far; look again "
                         f"when it finishes" + (f", or analyse the finished ones with {DONE_ONLY}" if done else ""))
    if n == 0 or done == 0:
        raise TraceError(f"the trace has no finished samples (0 of {n} done): run ecviz trace to fill it")
    if done < n:
        raise TraceError(f"the trace is unfinished: {done} of {n} samples done; rerun the same ecviz trace "
                         f"command to finish it, or analyse the finished ones with {DONE_ONLY}")


def writer_at(path: str | Path) -> str | None:
    """The live process writing the store at path ('pid ... on HOST (COMMAND)'), or None. A probe's writer is
    its training run, which locks the run directory (given as such, or as its routing.zarr)."""
    from ecviz.lock import holder

    path = Path(path)
    return holder(path.parent if path.name == "routing.zarr" else path)


def writer_of(ds: xr.Dataset) -> str | None:
    """writer_at the path a Dataset was opened from; None for one not opened from a path."""
    path = ds.attrs.get("path")
    return writer_at(path) if path else None


def experts_per_token(ds: xr.Dataset, branch: str = "cond") -> xr.DataArray:
    """Experts that processed each token: trace (sample, step, layer, token) for one guidance branch; probe
    (train_step, probe, t, layer, token). Lazy (dask) as stored, uint8. A trace with samples not done yet
    warns: theirs read as tokens no expert took (`check_complete` refuses such a trace; `subset` keeps the done)."""
    require(ds, "expert_count", what="experts per token")
    if ds.sizes.get("sample") == 0:  # every statistic of it would be NaN
        raise TraceError("no samples: the selection is empty (pick some with ecviz.analysis.subset)")
    if ds.attrs.get("complete") is not True and "sample" in ds.dims:
        done, n = samples_done(ds)
        if done < n:
            import warnings

            warnings.warn(f"{n - done} of {n} samples of this trace are not done: they count as tokens no expert "
                          f"took; analyse the done ones with {DONE_ONLY}", stacklevel=2)
    da = ds["expert_count"]
    if "branch" in da.dims:
        if branch not in da["branch"].values:
            raise TraceError(f"branch {branch!r} is not in this trace (it has {list(da['branch'].values)})")
        da = da.sel(branch=branch, drop=True)
    elif branch != "cond":  # a training probe routes its captioned images alone
        raise TraceError(f"branch {branch!r}: a training probe records the conditional branch only")
    return da


def open_probe(path) -> xr.Dataset:
    """A training run's routing probe: `runs/NAME`, `runs/NAME/routing.zarr` or a checkpoint directory holding
    one, trimmed to its committed rows; a missing or other-version store is a one-line TraceError."""
    import zarr

    path = Path(path)
    if (path / "routing.zarr").is_dir():
        path = path / "routing.zarr"
    if not path.exists():
        raise TraceError(f"{path}: not found")
    try:
        version = zarr.open_group(str(path), mode="r").attrs.get("ecviz_probe_version")
    except (FileNotFoundError, ValueError, zarr.errors.GroupNotFoundError):
        version = None
    if version is None:
        raise TraceError(f"{path}: not an ecviz training probe (routing.zarr)")
    if version != 1:
        raise TraceError(f"{path}: probe version {version}, this ecviz reads version 1")
    ds = xr.open_zarr(str(path), consolidated=False)
    ds.attrs["path"] = str(path)
    check_probe(path, ds)
    ds = ds.isel(train_step=slice(0, ds.attrs.get("rows", ds.sizes["train_step"])))  # committed last
    check_probe_rows(path, ds)
    return _checked_probe(path, ds)


PROBE_ROWS = ("expert_count", "expert_load")  # written for every probe row, never all fill values (zarr skips those)


def check_probe_rows(path, ds: xr.Dataset) -> None:
    """A one-line TraceError if a committed row's chunk of a variable every row writes is missing: xarray would
    read it back as fill values (zero counts, as if no expert had taken a token). A listing, no data read."""
    from ecviz.analysis.stores import PROBE_REMEDY

    for name in PROBE_ROWS:
        chunks = Path(path) / name / "c"  # the default chunk keys: c/<row chunk>/...
        per = (ds[name].encoding.get("chunks") or (0,))[0]
        if not chunks.is_dir() or not per:
            continue
        present = {int(e.name) for e in chunks.iterdir() if e.name.isdigit()}
        lost = [i for i in range(-(-ds.sizes["train_step"] // per)) if i not in present]
        if lost:
            step, more = ds["train_step"].values[lost[0] * per], len(lost) - 1
            raise TraceError(f"{path}: `{name}` of train step {step}" + (f" (and {more} more chunks)" if more else "")
                             + f" is missing: the training probe is damaged; {PROBE_REMEDY}")


class _ProbeVariable:
    """A probe variable read block by block; a block that fails to decode raises a one-line TraceError."""

    def __init__(self, var: xr.Variable, name: str, path):
        self.var, self.name, self.path = var, name, path
        self.shape, self.dtype, self.ndim = var.shape, var.dtype, var.ndim

    def __getitem__(self, key):
        from ecviz.analysis.stores import damaged

        try:
            return np.asarray(self.var[key].values)
        except Exception as e:
            raise TraceError(damaged(self.path, e, self.name)) from e  # the training's remedy, for a probe


def _checked_probe(path, ds: xr.Dataset) -> xr.Dataset:
    """The probe with each data variable read through _ProbeVariable (same chunks, still lazy)."""
    import uuid

    import dask.array as da

    token = uuid.uuid4().hex[:12]
    return ds.assign({name: var.copy(data=da.from_array(
        _ProbeVariable(var.variable, name, path), chunks=var.data.chunks, name=f"open_probe-{name}-{token}",
        meta=np.empty((0,) * var.ndim, var.dtype))) for name, var in ds.data_vars.items()})


PROBE_VARIABLES = ("train_step", "expert_count", "expert_load", "aux_loss", "tc_drop_rate", "t", "layer", "caption",
                   "image")  # what ecviz.trace.probe writes for every model (object_fraction: for Shapes only)


def check_probe(path, ds: xr.Dataset) -> None:
    """A one-line TraceError for a probe that lacks a variable or whose attributes are broken (`rows` outside
    0..the rows stored, `grid`, `tokens_per_image`, `model_config`), with the remedy; nothing when it is whole."""
    from ecviz.analysis.stores import PROBE_REMEDY
    from ecviz.trace.format import COUNT, GRID, INTEGER, OBJECT, Kind, attrs_problem

    n = ds.sizes.get("train_step", 0)
    spec = {"rows": Kind(f"an integer in 0..{n}", lambda v: INTEGER.test(v) and 0 <= v <= n, optional=True),
            "tokens_per_image": COUNT, "grid": GRID, "model_config": OBJECT}
    lost = [name for name in PROBE_VARIABLES if name not in ds.variables]
    problem = f"lacks `{lost[0]}`" if lost else attrs_problem(ds.attrs, spec)
    if problem:
        raise TraceError(f"{path}: {problem}: the training probe is damaged; {PROBE_REMEDY}")


def open_routing(path) -> xr.Dataset:
    """A trace store or a training probe (run directory, routing.zarr or checkpoint directory), by content."""
    from ecviz.trace.format import open_trace

    path = Path(path)
    if not path.exists():
        raise TraceError(f"{path}: not found")
    if (path / "routing.zarr").is_dir() or ((path / "zarr.json").is_file() and _is_probe(path)):
        return open_probe(path)
    if (path.parent / "routing.zarr").is_dir() and (path / "config.json").is_file():  # a run's checkpoint/
        raise TraceError(f"{path}: a run's checkpoint; its training probe is the run's: {path.parent}")
    if (path / "config.json").is_file() or (path / "checkpoint").is_dir():  # a checkpoint or run without a probe
        raise TraceError(f"{path}: a checkpoint without a training probe (routing.zarr; a dense model's run has "
                         "none): trace it with ecviz trace --ckpt and open the trace")
    ds = open_trace(path)
    ds.attrs["path"] = str(path)
    return ds


def _is_probe(path: Path) -> bool:
    from ecviz.validate import STORE_KINDS, store_kind

    return store_kind(path) == STORE_KINDS["ecviz_probe_version"]


# ---- numpy kernels over rows of per-token counts ------------------------------------------------------------
def row_histograms(x: np.ndarray, E: int) -> np.ndarray:
    """(..., S) integer counts in [0, E] -> (..., E + 1) int32: per row, how many tokens got v experts."""
    flat = x.reshape(-1, x.shape[-1]).astype(np.int64)
    rows = flat.shape[0]
    idx = (flat + (E + 1) * np.arange(rows)[:, None]).ravel()
    return np.bincount(idx, minlength=rows * (E + 1)).reshape(*x.shape[:-1], E + 1).astype(np.int32)


def stats_from_histograms(h: np.ndarray) -> dict[str, np.ndarray]:
    """Per row of histograms h (..., E + 1) over S tokens: mean, std, coefficient of variation, Gini, normalised
    entropy of the allocation (1: every token the same share), share of skipped tokens, min and max.

    Gini from sorted values: G = 2·Σ_i i·x_(i) / (n·Σx) − (n + 1)/n, where the tokens with value v occupy ranks
    c_{v−1}+1 … c_v, so their rank sum is h_v·(c_{v−1} + c_v + 1)/2. Entropy of p_i = x_i / Σx: −Σ_v h_v·q_v·log q_v
    with q_v = v / Σx, divided by log n."""
    h = h.astype(np.float64)
    E = h.shape[-1] - 1
    v = np.arange(E + 1, dtype=np.float64)
    n = h.sum(-1)
    total = (h * v).sum(-1)
    mean = total / n
    var = (h * v**2).sum(-1) / n - mean**2
    std = np.sqrt(np.maximum(var, 0))
    c = np.cumsum(h, -1)
    prev = c - h
    rank_sum = (h * v * (prev + c + 1) / 2).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        gini = np.where(total > 0, 2 * rank_sum / (n * total) - (n + 1) / n, 0.0)
        q = np.where(total[..., None] > 0, v / total[..., None], 0.0)
        plogp = np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0.0)
        entropy = np.where(total > 0, -(h * plogp).sum(-1) / np.log(n), 1.0)
        cv = np.where(mean > 0, std / mean, 0.0)
    present = h > 0
    mx = np.where(present, v, -1).max(-1)
    mn = np.where(present, v, E + 1).min(-1)
    return {"mean": mean, "std": std, "cv": cv, "gini": gini, "entropy": entropy, "skipped": h[..., 0] / n,
            "min": mn, "max": mx}


def row_ranks(x: np.ndarray, E: int) -> np.ndarray:
    """Average ranks (1-based, ties share their mean rank) of integer counts in [0, E] along the last axis,
    as float32: Spearman's rho is Pearson's r on these. Uses histograms, so it costs O(S + E) per row."""
    h = row_histograms(x, E).astype(np.float32)
    c = np.cumsum(h, -1)
    avg = c - h + (h + 1) / 2  # (..., E + 1) rank of value v
    return np.take_along_axis(avg.reshape(-1, E + 1), x.reshape(-1, x.shape[-1]).astype(np.int64), axis=1) \
        .reshape(x.shape).astype(np.float32)


def float_ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis of real values (ties share their mean rank), float32."""
    from scipy.stats import rankdata

    return rankdata(x, axis=-1).astype(np.float32)


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis, broadcasting; NaN where a row is constant."""
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    num = (a * b).sum(-1)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
