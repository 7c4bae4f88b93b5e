"""What an interactive viewer asks of one trace: a sample's words with their importance and attention maps at a
chosen layer and step (or averaged over all of them), the same prompt and seed in another trace and the
difference of the two allocation maps, and the samples a prompt search or a category filter selects (with a
trace restricted to them).

Layer and step arguments follow `select`: a label (block index, step index), -1 for the last, or "all" to
average over every recorded one. Everything returned is computed and small (one image's maps, one prompt's
words), so a viewer can cache it.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ecviz.analysis.allocation import check_position, heatmap, picked_labels, select, token_grid
from ecviz.analysis.common import bookkeeping, check_uncut, pearson_rows, require, require_trace
from ecviz.errors import TraceError


def prompts(ds: xr.Dataset) -> list[str]:
    """Every sample's prompt text, in sample order."""
    require_trace(ds, "prompts")
    return [str(p) for p in ds["prompt"].values]


def image_index(ds: xr.Dataset) -> np.ndarray:
    """Which of its prompt's images each sample is: sample = prompt · images_per_prompt + image (prompt-major,
    docs/trace-format.md), so it comes from the attributes without reading the store; the stored `image_index`
    where the attributes lack it."""
    require_trace(ds, "image_index")
    ipp = ds.attrs.get("sampler", {}).get("images_per_prompt")
    if ipp:
        return original_samples(ds) % int(ipp)
    return ds["image_index"].values


def original_samples(ds: xr.Dataset) -> np.ndarray:
    """Each sample's index in the store it was read from: `open_trace`'s `store_sample` coordinate, which follows
    any selection; without it (`xr.open_zarr`), what `subset` kept (`subset_of`), else 0..n-1."""
    if "store_sample" in ds.coords:
        return np.asarray(ds["store_sample"].values, dtype=np.int64)
    kept = ds.attrs.get("subset_of")
    return np.asarray(kept, dtype=np.int64) if kept is not None else np.arange(ds.sizes["sample"])


def search_prompts(ds: xr.Dataset, query: str) -> np.ndarray:
    """Sample indices whose prompt contains every whitespace-separated term of query (case-insensitive);
    every sample for an empty query."""
    terms = query.lower().split()
    texts = [p.lower() for p in prompts(ds)]
    return np.array([i for i, t in enumerate(texts) if all(term in t for term in terms)], dtype=np.int64)


def filter_samples(ds: xr.Dataset, **values) -> np.ndarray:
    """Sample indices whose per-sample label variables (`category`, `challenge`) take one of the given values:
    filter_samples(ds, category=["Animals", "Food"], challenge=[]) (an empty or None list keeps every sample)."""
    require_trace(ds, "filter_samples")
    keep = np.ones(ds.sizes["sample"], bool)
    for name, allowed in values.items():
        if not allowed:
            continue
        require(ds, name, what=f"filtering by {name}")
        allowed = [allowed] if isinstance(allowed, str) else [str(a) for a in allowed]  # one value, or several
        have = np.array([str(v) for v in ds[name].values], dtype=object)
        if not set(allowed) & set(have):  # a typo would keep no sample without a word (one of several may be absent)
            raise TraceError(f"{name} {', '.join(map(repr, allowed))}: not in this trace (it has: "
                             f"{', '.join(labels(ds, name))})")
        keep &= np.isin(have, allowed)
    return np.nonzero(keep)[0]


def spaced(samples, at_most: int | None, by=None) -> np.ndarray:
    """At most `at_most` of the given sample indices, evenly spaced over them (first and last included): a
    deterministic thinning for statistics over a large trace; all of them for at_most None.

    by: a label per sample of the trace (e.g. its routing group, `sample_groups(ds).group.isel(branch=0)`; -1:
    none, a unit of its own), to thin whole units instead: evenly spaced labels, each with all its given samples, about
    `at_most` samples in all (never more than at_most plus one unit). Statistics of images against their
    groups (`image_vs_group`, `objects_draw_compute`) need the partners that a thinning by sample leaves out."""
    if at_most is not None and not (isinstance(at_most, (int, np.integer)) and at_most >= 1):
        raise TraceError(f"at_most={at_most!r}: a whole number >= 1, or None for all")
    samples = np.asarray(samples, dtype=np.int64)
    if at_most is None or samples.size <= at_most:
        return samples
    if by is None:
        return samples[np.unique(np.linspace(0, samples.size - 1, at_most).round().astype(np.int64))]
    labels = np.asarray(by)[samples]
    labels = np.where(labels >= 0, labels, -1 - samples)  # a sample in no unit (-1) is a unit of its own
    units, first, unit_of = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(first)  # units in the order their first sample comes
    per_unit = samples.size / len(units)
    n = max(1, min(len(units), int(at_most // per_unit)))
    chosen = order[np.unique(np.linspace(0, len(units) - 1, n).round().astype(np.int64))]
    return samples[np.isin(unit_of, chosen)]


def labels(ds: xr.Dataset, name: str) -> list[str]:
    """The distinct non-empty values of a per-sample label variable (`category`, `challenge`), sorted; [] when the
    trace has none."""
    if name not in ds:
        return []
    return sorted({str(v) for v in ds[name].values if str(v)})


def subset(ds: xr.Dataset, samples) -> xr.Dataset:
    """The trace restricted to the given samples (positions, or a boolean mask over the samples): per-sample
    variables to those samples (renumbered 0..n-1 in the given order, sorted), per-group variables to the routing
    groups holding at least one of them, with `group_member_sample` renumbered and other members marked -1 (as
    padding fillers are; `group_member_removed` (group, member), in memory only, tells the real images left out
    from fillers), and the kept samples' store indices in the `subset_of` attribute (`original_samples`). Group
    statistics (expert load, co-selection) of a subset therefore count every token of those groups: expert choice
    ranks a group's tokens together, so a group's routing cannot be split by image. Lazy."""
    require_trace(ds, "subset")
    samples = np.asarray(samples)
    if samples.dtype == bool:  # a mask over the samples
        if samples.shape != (ds.sizes["sample"],):
            raise TraceError(f"a mask of {samples.size} values for {ds.sizes['sample']} samples")
        samples = np.flatnonzero(samples)
    elif samples.size and samples.dtype.kind not in "iu":
        whole = samples.dtype == object and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                                for v in samples.ravel())
        if not whole:  # floats were cut to integers without a word
            raise TraceError(f"samples of dtype {samples.dtype}: give sample positions (whole numbers) or a boolean "
                             "mask")
    samples = np.unique(samples.astype(np.int64))
    if samples.size == 0:
        raise TraceError("no sample matches the filter")
    n = ds.sizes["sample"]
    if samples[0] < 0 or samples[-1] >= n:
        raise TraceError(f"sample {samples[0] if samples[0] < 0 else samples[-1]} is out of range ({n} recorded)")
    out = ds.isel(sample=samples)
    if "group_member_sample" in ds:
        new = np.full(n, -1, np.int64)
        new[samples] = np.arange(samples.size)
        ms = bookkeeping(ds, "group_member_sample")
        check_uncut(ds, ms)  # which image a member is cannot be known
        mapped = np.where(ms >= 0, new[np.clip(ms, 0, n - 1)], -1).astype(np.int32)
        removed = (ms >= 0) & (mapped < 0)  # real images not kept: partners all the same, not padding
        if "group_member_removed" in ds:  # a subset's subset
            removed |= bookkeeping(ds, "group_member_removed")
        keep = np.nonzero((mapped >= 0).any(1))[0]
        out = out.isel(group=keep)
        out["group_member_sample"] = (ds["group_member_sample"].dims, mapped[keep])
        out["group_member_removed"] = (ds["group_member_sample"].dims, removed[keep])
    out.attrs = dict(ds.attrs) | {"subset_of": original_samples(ds)[samples].tolist()}  # a subset's subset too
    return out


def one_sample(ds: xr.Dataset, sample: int) -> xr.Dataset:
    """The trace cut to one sample (a position; negative counts from the end), keeping the dimension."""
    require_trace(ds, "a view of one image")
    n = ds.sizes["sample"]
    check_position("sample", sample, n)
    return ds.isel(sample=[sample % n])


def word_scores(ds: xr.Dataset, sample: int, step=-1, layer="all", branch: str = "cond") -> xr.Dataset:
    """Each word of one prompt: importance and correlation (`text_importance`) at a step and layer, or their mean
    over every recorded step / sparse layer for "all"; (word) with `word_text`. Padding words are NaN."""
    from ecviz.analysis.words import text_importance

    imp = text_importance(one_sample(ds, sample), branch).isel(sample=0)
    return select(imp, step=step, layer=layer).compute()


def sample_words(ds: xr.Dataset, sample: int) -> list[str]:
    """One prompt's words by slot, as `word_scores`' word_text and `word_map`'s `word` number them ('' for the
    padding slots): what a viewer lists where a trace has cross-attention but no routing to score the words."""
    require(ds, "prompt_word", what="a prompt's words")
    return [str(w) for w in one_sample(ds, sample)["prompt_word"].values[0]]


def word_map(ds: xr.Dataset, sample: int, word: int, step=-1, layer="all") -> xr.DataArray:
    """The cross-attention of one word (its text pieces summed) over one image's tokens, (row, col), from the
    chosen sparse layer's own block (what that layer's router saw; "all": the mean over the sparse layers'
    blocks, or over every block of a model without sparse layers, a dense one, as DAAM averages its layers) at a
    step ("all": the mean over steps). Attributes: `blocks`, the blocks averaged; `share`, the word's share of the
    image tokens' cross-attention (the map's mean: each token's attention sums to 1 over the caption's tokens,
    special ones included), which says how much attention a word's scores rest on."""
    from ecviz.analysis.words import word_attention

    require(ds, "cross_attn", "text_word", what="a word's attention map")
    if not 0 <= word < ds.sizes["word"]:
        raise TraceError(f"word {word} is out of range (the prompt has {ds.sizes['word']} word slots)")
    A = word_attention(one_sample(ds, sample)).isel(sample=0, word=word)
    layers = ds["layer"].values if "layer" in ds.coords else np.array([], int)
    if isinstance(layer, str) and layer == "all":
        blocks = layers if len(layers) else A["block"].values  # a dense model: every block
        A = A.sel(block=blocks).mean("block")
    elif not len(layers):
        raise TraceError(f"layer {layer!r}: this trace has no sparse layer (a dense model); its word maps average "
                         "every block: layer='all'")
    else:
        if not isinstance(layer, (int, np.integer)):  # a list gave (block, row, col)
            raise TraceError(f"layer {layer!r}: one recorded layer, a negative position, or 'all'")
        (layer,) = picked_labels(ds, "layer", layer)
        A, blocks = A.sel(block=layer), [layer]
    out = token_grid(select(A, step=step)).compute()
    out.attrs["blocks"] = [int(b) for b in blocks]
    out.attrs["share"] = float(out.mean())
    return out


def matching_sample(ds: xr.Dataset, sample: int, other: xr.Dataset) -> int | None:
    """The sample of `other` with the same prompt text and noise seed as `sample` of ds (None if there is none):
    two traces of the same prompt file and seed pair up image for image."""
    require_trace(ds, "matching_sample")
    require_trace(other, "matching_sample")
    check_position("sample", sample, ds.sizes["sample"])
    prompt = str(ds["prompt"].values[sample])
    seed = int(ds["seed"].values[sample])
    texts = np.array([str(p) for p in other["prompt"].values], dtype=object)
    hits = np.nonzero((texts == prompt) & (other["seed"].values == seed))[0]
    return int(hits[0]) if hits.size else None


def comparable(a: xr.Dataset, b: xr.Dataset) -> bool:
    """Whether two traces pair up image for image: the same prompt file (by hash), run seed and images per
    prompt (then matching_sample finds every image's twin)."""
    keys = ("prompt_file_sha256", "seed")
    same = all(a.attrs.get(k) == b.attrs.get(k) for k in keys)
    ipp = (a.attrs.get("sampler", {}).get("images_per_prompt"), b.attrs.get("sampler", {}).get("images_per_prompt"))
    return same and ipp[0] == ipp[1]


def compare_maps(a: xr.Dataset, sample_a: int, b: xr.Dataset, sample_b: int, step=-1, layer="all",
                 branch: str = "cond") -> xr.Dataset:
    """Experts per token of the same image in two traces (expert choice against token choice, or two
    checkpoints) at one step and layer: a, b and difference = a − b, each (row, col); attributes
    mean_abs_difference and correlation (Pearson, over tokens; NaN when a map is constant).

    "all" averages over the layers (steps) both traces recorded, the same ones on both sides (attribute
    `layers` / `steps`, and `steps_b` where B labels them otherwise): steps are paired by their timestep t, so
    traces of other schedules are compared at the timesteps they share; a step label that is another timestep
    in the two traces is refused."""
    for name, ds in (("A", a), ("B", b)):  # before the layers are intersected: a dense trace has none
        try:
            require(ds, "expert_count", what="a comparison of allocation maps")
        except TraceError as e:
            raise TraceError(f"trace {name}: {e}") from None
    pick_a, pick_b = {}, {}
    for dim, value in (("layer", layer), ("step", step)):
        if isinstance(value, str) and value == "all" and dim in a.coords and dim in b.coords:
            pairs = _common(a, b, dim)
            if not pairs:
                what = "timestep t" if dim == "step" and "t" in a.coords and "t" in b.coords else dim
                shown = "t" if what == "timestep t" else dim
                raise TraceError(f"the traces recorded no {what} in common (A: {np.round(a[shown].values, 3).tolist()}"
                                 f", B: {np.round(b[shown].values, 3).tolist()})")
            pick_a[dim], pick_b[dim] = [p[0] for p in pairs], [p[1] for p in pairs]
    maps = []
    for name, ds, s, pick in (("A", a, sample_a, pick_a), ("B", b, sample_b, pick_b)):
        try:
            maps.append(heatmap(ds.sel(pick), s, step=step, layer=layer, branch=branch))
        except TraceError as e:
            raise TraceError(f"trace {name}: {e}") from None
    if maps[0].shape != maps[1].shape:
        raise TraceError(f"the traces' token grids differ ({maps[0].shape} against {maps[1].shape}): nothing to "
                         "compare token by token")
    ta, tb = (float(m["t"]) if "t" in m.coords and m["t"].size == 1 else None for m in maps)
    if ta is not None and tb is not None and not np.isclose(ta, tb):
        raise TraceError(f"step {step} is t = {ta:.3f} in A and t = {tb:.3f} in B (other sampler schedules): "
                         "compare the traces at \"all\" steps or trace them with the same --steps")
    ma, mb = (m.reset_coords(drop=True) for m in maps)
    out = xr.Dataset({"a": ma, "b": mb, "difference": ma - mb})
    out.attrs["mean_abs_difference"] = float(np.abs(out["difference"]).mean())
    out.attrs["correlation"] = float(pearson_rows(ma.values.ravel(), mb.values.ravel()))
    out.attrs.update({f"{dim}s": labels for dim, labels in pick_a.items()})
    if pick_b.get("step") != pick_a.get("step"):
        out.attrs["steps_b"] = pick_b["step"]
    return out


def _common(a: xr.Dataset, b: xr.Dataset, dim: str) -> list[tuple]:
    """(label in A, label in B) of the layers, or steps, both traces recorded: steps by their timestep t where
    both have it (two schedules share only some timesteps, whatever their step labels), else by label."""
    if dim == "step" and "t" in a.coords and "t" in b.coords:
        tb, labels_b = b["t"].values, b[dim].values.tolist()
        pairs = []
        for sa, t in zip(a[dim].values.tolist(), a["t"].values, strict=True):
            same = np.flatnonzero(np.isclose(tb, t))
            if same.size:
                pairs.append((sa, labels_b[same[0]]))
        return pairs
    in_b = set(b[dim].values.tolist())
    return [(v, v) for v in a[dim].values.tolist() if v in in_b]
