"""Compute allocation: how many experts each image token got, where, and how unevenly (paper §3.4, Fig. 6).

Expert choice gives every routing group exactly f_c experts per token *on average*; the statistics here say how
that average is spread. Per (layer, step) of a trace (per (train_step, t, layer) of a training probe), over
all samples: the share of tokens no expert took, the most experts one token received (and as a share of the
layer's E experts: the paper's "up to 44%"), the Gini coefficient, coefficient of variation and entropy of the
allocation within an image, vmoe-style counts (share of tokens processed by at least t experts), and how many
denoising steps each layer needs before its allocation map stops changing (the paper's "later layers become
heterogeneous in fewer steps", as one number per layer).

Everything stays lazy (dask) until `.compute()` or `.values`, so traces larger than memory work.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ecviz.analysis.common import (
    experts_per_token,
    n_experts,
    pearson_rows,
    row_histograms,
    row_ranks,
    sample_dim,
    stats_from_histograms,
)
from ecviz.errors import TraceError

PER_IMAGE = ("mean", "std", "cv", "gini", "entropy", "skipped", "min", "max")
SAMPLE_CHUNK = 64  # images per dask task: large enough that task overhead vanishes, small enough for memory


def _chunked(da: xr.DataArray) -> xr.DataArray:
    """Dask-backed, SAMPLE_CHUNK images per chunk and whole along every other dimension."""
    dim = sample_dim(da)
    return da.chunk({d: (SAMPLE_CHUNK if d == dim else -1) for d in da.dims})


def token_grid(da: xr.DataArray, rows: int | None = None) -> xr.DataArray:
    """Unflatten the `token` dimension into (`row`, `col`) on the patch grid (row-major, square by default)."""
    import math

    n = da.sizes["token"]
    rows = math.isqrt(n) if rows is None else rows
    if rows < 1 or n % rows:
        raise TraceError(f"rows={rows}: the {n} tokens make no grid of that many rows (a divisor of {n})")
    cols = n // rows
    out = da.drop_vars([c for c in ("token", "row", "col") if c in da.coords])
    out = out.assign_coords(token=np.arange(n))
    return out.coarsen(token=cols).construct(token=("row", "col")).assign_coords(row=np.arange(rows),
                                                                                    col=np.arange(cols))


def check_position(dim: str, value: int, size: int) -> None:
    """TraceError unless `value` is a position along `dim` of `size` (negative: from the end)."""
    if not -size <= value < size:
        raise TraceError(f"{dim} {value} is out of range ({size} recorded)")


def select(da: xr.DataArray, reduce: str = "mean", **index) -> xr.DataArray:
    """Pick or reduce dimensions of a routing array by label: `step=24`, `layer=3`, `train_step=6000`, `t=0.5`;
    a negative integer counts from the end (`step=-1`: the last recorded step), in a list too; a list keeps those
    labels; "all" (or None) reduces the dimension with `reduce` ("mean" or "sum"); `sample=`/`probe=` are
    positions (a slice too)."""
    if reduce not in ("mean", "sum"):
        raise TraceError(f"reduce {reduce!r}: 'mean' or 'sum'")
    for dim, value in index.items():
        if dim not in da.dims:
            raise TraceError(f"no dimension {dim!r} here (dimensions: {', '.join(map(str, da.dims))})")
        if value is None or (isinstance(value, str) and value == "all"):
            da = getattr(da, reduce)(dim)
        elif isinstance(value, (list, tuple, np.ndarray)):  # several: keep the dimension
            if dim in da.coords:  # labels, a negative one counting from the end, each checked (picked_labels)
                da = da.sel({dim: picked_labels(da, dim, value) if len(value) else []})
            else:  # positions (sample, probe)
                for v in value:
                    check_position(dim, v, da.sizes[dim])
                da = da.isel({dim: list(value)})
        elif (dim in ("sample", "probe") or dim not in da.coords) and isinstance(value, slice):
            da = da.isel({dim: value})
        elif dim in ("sample", "probe") or dim not in da.coords:
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise TraceError(f"{dim} {value!r}: a position is a whole number (or a list of them)")
            check_position(dim, value, da.sizes[dim])
            da = da.isel({dim: value})
        elif isinstance(value, (int, np.integer)) and value < 0:
            check_position(dim, int(value), da.sizes[dim])  # counted from the end: -1 is the last
            da = da.isel({dim: value})
        else:
            labels = da[dim].values
            if value not in labels:
                raise TraceError(f"{dim} {value!r} is not recorded (recorded: {_labels(labels)})")
            da = da.sel({dim: value})
    return da


def picked_labels(ds: xr.Dataset | xr.DataArray, dim: str, value) -> list:
    """The labels of `dim` a value picks, as a list: "all" (or None) every one, a negative integer from the end, a
    list those, else the label itself (checked). Where `select` picks or reduces an array, this names the labels,
    for reading arrays indexed otherwise (a group's dispatch)."""
    labels = ds[dim].values.tolist()
    if value is None or (isinstance(value, str) and value == "all"):
        return labels
    picked = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    if not picked:
        raise TraceError(f"no {dim} chosen: name one, a list of them, or 'all'")
    out = []
    for v in picked:
        if isinstance(v, (int, np.integer)) and v < 0:
            check_position(dim, int(v), len(labels))
            v = labels[v]
        if v not in labels:
            raise TraceError(f"{dim} {v!r} is not recorded (recorded: {_labels(labels)})")
        out.append(v)
    return out


def _labels(values) -> str:
    v = [x.item() if hasattr(x, "item") else x for x in values]
    return ", ".join(map(str, v)) if len(v) <= 12 else f"{v[0]} … {v[-1]} ({len(v)} values)"


def heatmap(ds: xr.Dataset, sample: int = 0, step=-1, layer=-1, branch: str = "cond", reduce: str = "mean",
            **index) -> xr.DataArray:
    """Experts per token of one image on the token grid, (row, col), computed: the paper's Fig. 6 cell.

    step/layer: a label, -1 (last), or "all" to average (reduce="sum": to add) over them. For a training
    probe pass `probe=`, `train_step=`, `t=` instead of sample and step."""
    count = experts_per_token(ds, branch)
    if "probe" in count.dims:
        if step != -1:  # it would be ignored: a probe is indexed by train_step and t
            raise TraceError(f"step={step!r}: a training probe has train_step and t, not step; pass train_step= "
                             "and t= (and probe= for the image)")
        index = {"probe": index.pop("probe", sample), "train_step": index.pop("train_step", -1),
                 "t": index.pop("t", "all"), "layer": layer, **index}
    else:
        index = {"sample": sample, "step": step, "layer": layer, **index}
    da = select(count.astype(np.float32), reduce, **index)
    extra = set(da.dims) - {"token"}
    if extra:
        raise TraceError(f"a heatmap is one image: also choose {', '.join(sorted(extra))}")
    return token_grid(da).compute()


def heatmaps(ds: xr.Dataset, sample: int = 0, over: str = "layer", branch: str = "cond", **index) -> xr.DataArray:
    """A row of heatmaps (over, row, col) for one image: over="layer" at one step (Fig. 6a), over="step" for one
    layer (Fig. 6b)."""
    count = experts_per_token(ds, branch).astype(np.float32)
    offered = [d for d in count.dims if d not in ("token", "sample", "probe")]
    if over not in offered:
        raise TraceError(f"over={over!r}: one of {', '.join(offered)}")
    fixed = {"sample": sample} if "sample" in count.dims else {"probe": sample}
    for dim in count.dims:
        if dim not in (over, "token", *fixed) and dim not in index:
            index[dim] = "all" if dim == "t" else -1  # a probe: the mean over its timesteps, as `heatmap`
    return token_grid(select(count, **fixed, **index)).transpose(over, "row", "col").compute()


def histogram(count: xr.DataArray, E: int) -> xr.DataArray:
    """Per row (every dimension but token): how many tokens got 0, 1, …, E experts, along `experts`. Lazy."""
    if not (isinstance(E, (int, np.integer)) and E >= 1):
        raise TraceError(f"E={E!r}: the number of experts, a whole number >= 1")
    return xr.apply_ufunc(row_histograms, count, kwargs={"E": E}, input_core_dims=[["token"]],
                          output_core_dims=[["experts"]], dask="parallelized", output_dtypes=[np.int32],
                          dask_gufunc_kwargs={"output_sizes": {"experts": E + 1}}) \
        .assign_coords(experts=np.arange(E + 1))


def per_image(ds: xr.Dataset, branch: str = "cond") -> xr.Dataset:
    """Per image (and step, layer): mean, std, cv, gini, entropy, skipped (share of tokens with no expert), min
    and max experts per token. Lazy. In a trace, an image's mean differs from f_c when it shared its routing
    group with another image: compare `group_mean` (ecviz.analysis.load)."""
    count = _chunked(experts_per_token(ds, branch))
    E = n_experts(ds)

    def kernel(x):
        s = stats_from_histograms(row_histograms(x, E))
        return np.stack([s[k] for k in PER_IMAGE], -1).astype(np.float32)

    stats = xr.apply_ufunc(kernel, count, input_core_dims=[["token"]], output_core_dims=[["stat"]],
                           dask="parallelized", output_dtypes=[np.float32],
                           dask_gufunc_kwargs={"output_sizes": {"stat": len(PER_IMAGE)}})
    return xr.Dataset({k: stats.isel(stat=i, drop=True) for i, k in enumerate(PER_IMAGE)})


def allocation_stats(ds: xr.Dataset, branch: str = "cond") -> xr.Dataset:
    """Heterogeneity of compute allocation, over all images, per (step, layer) of a trace or (train_step, t,
    layer) of a probe. Lazy; `.compute()` it.

    Variables: mean (experts per token; f_c for expert choice), skipped (share of tokens no expert took),
    max / min (experts one token received, over every image), max_share (max over the E experts), gini, cv and
    entropy (of the allocation within an image, averaged over images: 0, 0 and 1 for perfectly even),
    at_least (threshold): share of tokens processed by at least `threshold` experts (vmoe), and histogram
    (experts): tokens with exactly that many experts."""
    count = _chunked(experts_per_token(ds, branch))
    E = n_experts(ds)
    dim = sample_dim(count)
    img = per_image(ds, branch)
    hist = histogram(count, E).sum(dim)
    total = hist.sum("experts")
    present = hist > 0
    v = hist["experts"]
    out = xr.Dataset({
        "mean": img["mean"].mean(dim),
        "skipped": hist.sel(experts=0) / total,
        "max": v.where(present).max("experts"),
        "min": v.where(present).min("experts"),
        "gini": img["gini"].mean(dim),
        "cv": img["cv"].mean(dim),
        "entropy": img["entropy"].mean(dim),
        "at_least": (hist.isel(experts=slice(None, None, -1)).cumsum("experts").isel(experts=slice(None, None, -1))
                     / total).isel(experts=slice(1, None)).rename(experts="threshold"),
        "histogram": hist,
    })
    out["max_share"] = out["max"] / E
    out.attrs.update(experts=E, branch=branch, kind="allocation")
    for name, doc in (("mean", "experts per token"), ("skipped", "share of tokens no expert took"),
                      ("max", "most experts one token received"), ("max_share", "max as a share of the experts"),
                      ("gini", "Gini coefficient of the allocation within an image"),
                      ("cv", "coefficient of variation of experts per token within an image"),
                      ("entropy", "entropy of the allocation within an image over log(tokens)"),
                      ("at_least", "share of tokens processed by at least `threshold` experts"),
                      ("histogram", "tokens that got exactly `experts` experts")):
        out[name].attrs["description"] = doc
    return out


def settling(ds: xr.Dataset, threshold: float = 0.9, branch: str = "cond") -> xr.Dataset:
    """How fast each layer's allocation map stops changing over the denoising steps.

    similarity (step, layer): Spearman correlation, per image, between the map at each recorded step and at the
    last one, averaged over images; settle_step (layer): the first recorded step from which the similarity stays
    at or above `threshold` (the paper's "later layers become heterogeneous in fewer denoising steps"), or -1 when
    no step before the last does (the last step's similarity with itself is 1: it settles nothing)."""
    count = _chunked(experts_per_token(ds, branch))
    if "step" not in count.dims:
        raise TraceError("settling needs denoising steps: a trace, not a training probe")
    if count.sizes["step"] < 2:
        raise TraceError("settling needs at least two recorded steps (see --record-steps)")
    E = n_experts(ds)

    def kernel(x):  # (..., step, token) -> (..., step)
        r = row_ranks(x, E)
        return pearson_rows(r, r[..., -1:, :]).astype(np.float32)

    sim = xr.apply_ufunc(kernel, count, input_core_dims=[["step", "token"]], output_core_dims=[["step"]],
                         dask="parallelized", output_dtypes=[np.float32]).mean(sample_dim(count))
    labels = sim["step"].values  # sim: (layer, step); a lazy transpose here broke dask.compute with other results

    def first_settled(s):  # (..., step) -> (...): first step label from which every later one is >= threshold
        before = s[..., :-1] >= threshold  # the last step is 1 by definition: it alone is not settling
        tail = np.logical_and.accumulate(before[..., ::-1], axis=-1)[..., ::-1]
        return np.where(tail.any(-1), labels[np.argmax(tail, -1)], -1).astype(np.int64)

    settle = xr.apply_ufunc(first_settled, sim.chunk({"step": -1}), input_core_dims=[["step"]], dask="parallelized",
                            output_dtypes=[np.int64])
    out = xr.Dataset({"similarity": sim, "settle_step": settle})
    out.attrs.update(threshold=threshold, branch=branch)
    out["similarity"].attrs["description"] = "Spearman correlation of the allocation map with the last step's"
    out["settle_step"].attrs["description"] = (f"first step from which the similarity stays >= {threshold}; -1: "
                                               "no step before the last")
    return out


def layer_agreement(ds: xr.Dataset, branch: str = "cond") -> xr.DataArray:
    """(layer, layer_b): Spearman correlation of two layers' allocation maps of the same image and step,
    averaged over images and steps (training probes: over probe images, t and train steps). Lazy."""
    count = _chunked(experts_per_token(ds, branch))
    E = n_experts(ds)
    L = count.sizes["layer"]

    def kernel(x):  # (..., layer, token) -> (..., layer, layer_b): Pearson on standardised ranks, one einsum
        r = row_ranks(x, E)
        r -= r.mean(-1, keepdims=True)
        norm = np.sqrt((r * r).sum(-1, keepdims=True))
        z = np.divide(r, norm, out=np.full_like(r, np.nan), where=norm > 0)
        return np.einsum("...lt,...mt->...lm", z, z, optimize=True).astype(np.float32)

    agree = xr.apply_ufunc(kernel, count, input_core_dims=[["layer", "token"]],
                           output_core_dims=[["layer", "layer_b"]], dask="parallelized", output_dtypes=[np.float32],
                           exclude_dims={"layer"}, dask_gufunc_kwargs={"output_sizes": {"layer": L, "layer_b": L}})
    layers = count["layer"].values
    agree = agree.assign_coords(layer=layers, layer_b=layers)
    return agree.mean([d for d in agree.dims if d not in ("layer", "layer_b")], skipna=True)
