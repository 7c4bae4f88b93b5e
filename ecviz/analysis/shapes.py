"""Ground truth on Shapes: does compute go to the objects, and does each word look at the object it names?

Training probes carry the data's own object masks (`object_fraction`). Traces of generated images have no
masks, so objects are found in the images themselves: the foreground is every non-black pixel, and each word's
object is the ShapesEval detection (colour segmentation, connected components, shape classifier) that matches
what the caption says of that object (`word_object`, recorded for Shapes prompts). Intervals are percentile
bootstraps that resample clusters of dependent images, not single images (`image_clusters`): the images of one
prompt share its caption, and the images of one routing group share its experts' capacity (an expert that takes
more of one image's tokens takes fewer of its partner's), so resampling them one by one would treat them as
independent and give intervals too narrow.
"""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr

from ecviz.analysis.common import bookkeeping, branch_index, check_uncut, pearson_rows, require, require_trace
from ecviz.errors import TraceError
from ecviz.grid import patch_coverage

OBJECT_MIN = 0.5  # a token is "object" when at least half its patch is covered by an object


def by_region(count: xr.DataArray, object_fraction: xr.DataArray, over: tuple[str, ...]) -> xr.DataArray:
    """Mean of `count` over `over` on object tokens (>= OBJECT_MIN of the patch covered) and on background
    tokens (nothing covered), along a new `region` dimension (object, background). Computed (small)."""
    regions = {"object": object_fraction >= OBJECT_MIN, "background": object_fraction == 0}
    out = [count.astype(np.float32).where(mask).mean(over) for mask in regions.values()]
    return xr.concat(out, dim=xr.DataArray(list(regions), dims="region", name="region")).compute()


def object_vs_background(probe: xr.Dataset) -> xr.DataArray:
    """Mean experts per token on object and on background tokens of a training probe store, against the data's
    ground-truth masks: (region, train_step, t, layer). Expert choice spends f_c experts per token on average;
    the split shows where."""
    if "train_step" not in probe.dims:
        raise TraceError("object_vs_background takes a training probe (its data's true masks); for a trace use "
                         "trace_object_vs_background or object_background")
    require(probe, "expert_count", "object_fraction", what="objects vs background over training")
    return by_region(probe["expert_count"], probe["object_fraction"], ("probe", "token"))


def image_object_fraction(ds: xr.Dataset, threshold: int = 64) -> xr.DataArray:
    """(sample, token): the fraction of each token's patch that is not background in the generated image
    (a pixel is background when every channel is below `threshold`): object masks for Shapes-like images, objects
    on black. On photographs nearly every token is "object", and the statistics built on these masks
    (object_background, edge_interior, expert_objects, objects_draw_compute) compute without meaning anything;
    the report and the app show them for traces of Shapes prompts only (`word_object`)."""
    require_trace(ds, "object masks of the generated images")
    require(ds, "image", what="object masks of the generated images")
    fg = (ds["image"] >= threshold).any("channel").values  # (sample, H, W)
    return xr.DataArray(patch_coverage(fg, *ds.attrs["grid"]), dims=("sample", "token"))


def trace_object_vs_background(ds: xr.Dataset, branch: str = "cond") -> xr.DataArray:
    """Mean experts per token on the objects and on the background of each trace's own generated images:
    (region, step, layer), over all samples."""
    from ecviz.analysis.common import experts_per_token

    count = experts_per_token(ds, branch).drop_vars(["row", "col", "token"], errors="ignore")
    return by_region(count, image_object_fraction(ds), ("sample", "token"))


def object_edges(frac: xr.DataArray, grid: tuple[int, int]) -> xr.DataArray:
    """(dim, token) bool: object tokens (>= OBJECT_MIN covered) on the object's outline, where the patch is only
    partly covered or a 4-neighbour on the token grid is not object (the grid's border counts as not object).
    The other object tokens are the objects' interior."""
    rows, cols = grid
    obj = (frac >= OBJECT_MIN).values
    n = obj.shape[0]
    g = np.pad(obj.reshape(n, rows, cols), ((0, 0), (1, 1), (1, 1)))  # (n, rows + 2, cols + 2), border False
    inside = g[:, :-2, 1:-1] & g[:, 2:, 1:-1] & g[:, 1:-1, :-2] & g[:, 1:-1, 2:]  # all four neighbours object
    edge = obj & ((frac.values < 1) | ~inside.reshape(n, -1))
    return xr.DataArray(edge, dims=frac.dims)


def _object_fraction(ds: xr.Dataset) -> tuple[xr.DataArray, str]:
    """(fraction of each token's patch covered by objects (dim, token), the image dimension): the data's masks
    for a probe, the generated images' foreground for a trace."""
    from ecviz.analysis.common import require

    if "probe" in ds.dims:
        require(ds, "object_fraction", what="objects vs background")
        return ds["object_fraction"], "probe"
    return image_object_fraction(ds), "sample"


def image_clusters(ds: xr.Dataset) -> np.ndarray | None:
    """(sample,) the cluster of each image for a bootstrap: images joined by a prompt (`prompt_index`) or by a
    routing group (`group_member_sample`, either branch) are one cluster, transitively: the connected components
    of the graph linking each image to its prompt and its groups. None for a training probe, whose images are
    independent draws of the data (no record of their groups)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if "probe" in ds.dims or "sample" not in ds.dims:
        return None
    n = ds.sizes["sample"]
    image, node = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]  # edges image -> prompt or group node
    if "prompt_index" in ds:
        image.append(np.arange(n))
        node.append(n + np.unique(ds["prompt_index"].values, return_inverse=True)[1])
    if "group_member_sample" in ds:
        members = bookkeeping(ds, "group_member_sample")  # (group, member); -1 fillers
        check_uncut(ds, members)  # a cut trace's members are store indices, not positions here
        real = members >= 0
        image.append(members[real].astype(np.int64))
        node.append(2 * n + np.nonzero(real)[0])  # each real member's group, in the same (row-major) order
    i, j = np.concatenate(image), np.concatenate(node)
    size = 2 * n + (ds.sizes["group"] if "group_member_sample" in ds else 0)
    _, labels = connected_components(coo_matrix((np.ones(i.size), (i, j)), shape=(size, size)), directed=False)
    return np.unique(labels[:n], return_inverse=True)[1]


def region_ratio(count: xr.DataArray, first: xr.DataArray, second: xr.DataArray, dim: str,
                 names: tuple[str, str], n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                 clusters: np.ndarray | None = None) -> xr.Dataset:
    """Mean of `count` (dim, ..., token) on the tokens of mask `first` and of mask `second` (dim, token), over
    images that have both, their ratio and its percentile bootstrap interval over those images: resampling
    `clusters` (an id per image along dim, e.g. `image_clusters`) whole where given, else single images.

    Variables: names[0], names[1] (the two means), ratio, ratio_lo, ratio_hi; attrs n (images used), clusters
    (how many were resampled)."""
    if not (isinstance(n_boot, (int, np.integer)) and n_boot >= 1) or not 0 < level < 1:
        raise TraceError(f"n_boot={n_boot!r}, level={level!r}: resamples are a whole number >= 1, the interval's "
                         "level a fraction in (0, 1), e.g. 0.95")
    count = count.drop_vars([c for c in ("row", "col", "token") if c in count.coords])
    a = count.where(first).mean("token").compute()  # (dim, ...)
    b = count.where(second).mean("token").compute()
    both = (first.any("token") & second.any("token")).values
    a, b = a.isel({dim: both}), b.isel({dim: both})
    n = int(both.sum())
    va, vb = a.transpose(dim, ...).values, b.transpose(dim, ...).values  # (n, ...)
    ids = np.unique(np.asarray(clusters)[both], return_inverse=True)[1] if clusters is not None else np.arange(n)
    k = int(ids.max()) + 1 if n else 0
    sa, sb = np.zeros((k, *va.shape[1:])), np.zeros((k, *vb.shape[1:]))  # (k, ...) each cluster's sums
    np.add.at(sa, ids, va)
    np.add.at(sb, ids, vb)
    rng = np.random.default_rng(seed)
    ratios = np.full((n_boot, *va.shape[1:]), np.nan)  # fewer than two clusters: nothing to resample, no interval
    with np.errstate(divide="ignore", invalid="ignore"):  # a resample whose second region got no expert: inf
        for i in range(n_boot if k >= 2 else 0):
            pick = rng.integers(0, k, k)  # clusters, whole: the ratio of the picked images' means
            ratios[i] = sa[pick].sum(0) / sb[pick].sum(0)
        alpha = (1 - level) / 2
        lo, hi = np.quantile(ratios, alpha, axis=0), np.quantile(ratios, 1 - alpha, axis=0)
        # interpolating between two inf resamples gives nan: there the bound is the resample itself, inf (with
        # few clusters, more than (1 - level)/2 of the resamples may hold no second-region expert at all)
        lo = np.where(np.isnan(lo), np.quantile(ratios, alpha, axis=0, method="inverted_cdf"), lo)
        hi = np.where(np.isnan(hi), np.quantile(ratios, 1 - alpha, axis=0, method="inverted_cdf"), hi)
    rest = [d for d in a.transpose(dim, ...).dims if d != dim]
    coords = {d: a[d] for d in rest if d in a.coords}
    ma, mb = a.mean(dim), b.mean(dim)
    out = xr.Dataset({
        names[0]: ma, names[1]: mb, "ratio": ma / mb,
        "ratio_lo": (rest, lo),
        "ratio_hi": (rest, hi),
    }, coords=coords)
    for name, text in ((names[0], f"mean experts per token, {names[0]} tokens"),
                       (names[1], f"mean experts per token, {names[1]} tokens"),
                       ("ratio", f"{names[0]} over {names[1]}"), ("ratio_lo", f"{level:.0%} interval, low"),
                       ("ratio_hi", f"{level:.0%} interval, high")):
        out[name].attrs = {"description": text}  # not expert_count's, which the means carried over
    out.attrs.update(n=n, clusters=k, n_boot=n_boot, level=level, object_min=OBJECT_MIN)
    return out


def _counts(ds: xr.Dataset, branch: str, mean_over: tuple[str, ...]) -> xr.DataArray:
    from ecviz.analysis.common import experts_per_token

    count = experts_per_token(ds, branch).astype(np.float32)
    if isinstance(mean_over, str):  # "step" would be its letters
        raise TraceError(f"mean_over={mean_over!r}: a tuple of dimensions, e.g. ({mean_over!r},)")
    may = [d for d in count.dims if d not in ("sample", "probe", "token")]  # each image keeps its own masks
    wrong = [d for d in mean_over if d not in may]
    if wrong:
        raise TraceError(f"mean_over={tuple(mean_over)!r}: {wrong[0]!r} is not a dimension to average over here "
                         f"(these are: {', '.join(may)})")
    return count.mean(list(mean_over)) if mean_over else count


def object_background(ds: xr.Dataset, branch: str = "cond", n_boot: int = 1000, seed: int = 0,
                      level: float = 0.95, mean_over: tuple[str, ...] = ()) -> xr.Dataset:
    """Experts per token on objects over background, per (step, layer) of a trace (or (train_step, t, layer) of
    a probe, against its true masks), with a bootstrap interval over images.

    Variables: object, background (mean experts per token on each, over images that have both), ratio
    (object / background), ratio_lo, ratio_hi (the `level` percentile interval of the ratio over `n_boot`
    resamples of the images' clusters, `image_clusters`), n (images used). mean_over: dimensions (e.g. ("t",)
    of a probe) to average the experts per token over first, so the ratio and its interval are of that average."""
    frac, dim = _object_fraction(ds)
    return region_ratio(_counts(ds, branch, mean_over), frac >= OBJECT_MIN, frac == 0, dim,
                        ("object", "background"), n_boot, seed, level, image_clusters(ds))


def edge_interior(ds: xr.Dataset, branch: str = "cond", n_boot: int = 1000, seed: int = 0,
                  level: float = 0.95, mean_over: tuple[str, ...] = ()) -> xr.Dataset:
    """Experts per token on the objects' outlines over their interiors (`object_edges`), as `object_background`
    splits objects from background: does compute follow detail (the paper's Fig. 6 reading) or whole objects?
    Variables: edge, interior, ratio, ratio_lo, ratio_hi; attrs n (images with both)."""
    frac, dim = _object_fraction(ds)
    edge = object_edges(frac, tuple(ds.attrs["grid"]))
    return region_ratio(_counts(ds, branch, mean_over), edge, (frac >= OBJECT_MIN) & ~edge, dim,
                        ("edge", "interior"), n_boot, seed, level, image_clusters(ds))


def word_regions(ds: xr.Dataset) -> xr.Dataset:
    """Per generated image and caption word, the region of the object the word names, found by ShapesEval in
    the image: region (sample, word, token) the fraction of each token's patch it covers, found (sample, word)
    whether the object was drawn (and recognised). Words naming no object get an empty region. Computed."""
    from ecviz.analysis.common import require
    from ecviz.shapes_eval import detect, object_regions, word_objects

    require(ds, "word_object", "prompt", "image", what="word regions")
    images = ds["image"].values
    prompts = ds["prompt"].values
    wo = ds["word_object"].values
    rows, cols = ds.attrs["grid"]
    n, W = wo.shape
    region = np.zeros((n, W, rows * cols), np.float32)
    found = np.zeros((n, W), bool)
    for i in range(n):
        _, objects = word_objects(str(prompts[i]))
        regions = object_regions(detect(images[i]), objects, images[i].shape[:2])  # per caption object
        cover = patch_coverage(np.stack(regions), rows, cols) if regions else np.zeros((0, rows * cols))
        for w in range(W):
            k = wo[i, w]
            if k == -2:  # the word names every object: their union
                k_cover = cover.max(0) if len(cover) else np.zeros(rows * cols)
            elif 0 <= k < len(cover):
                k_cover = cover[k]
            else:
                continue
            region[i, w] = k_cover
            found[i, w] = k_cover.max() > 0
    return xr.Dataset({"region": (("sample", "word", "token"), region), "found": (("sample", "word"), found)})


def expert_words(ds: xr.Dataset, step=-1, layer=-1, regions: xr.Dataset | None = None,
                 lower: bool = True) -> xr.Dataset:
    """Which experts take the object each caption word names, at one recorded `step` and sparse `layer` (labels,
    or -1 for the last): `coverage` (word, expert) the mean share of the word's object tokens (>= OBJECT_MIN
    of the patch in the word's region, `word_regions`) that the expert took, over the images where the object
    was drawn and found, and `n` (word) how many such objects were counted. Words are their text, lower-cased
    without punctuation, sorted. An expert choosing at random would take its share of all tokens (expert
    choice: f_c / E on average). "cyan" against "red" asks whether routing follows colour; a shape word against
    another, shape. `.coverage.to_pandas()` is the table. Computed."""
    import pandas as pd

    from ecviz.analysis.allocation import picked_labels
    from ecviz.analysis.load import tokens_taken

    if isinstance(layer, (list, tuple, np.ndarray)) or (isinstance(layer, str) and layer == "all"):
        raise TraceError(f"layer {layer!r}: name one sparse layer (a label, or -1 for the last)")
    require(ds, "dispatch", "group_member_sample", what="which experts take each word's object")  # a dense model
    (label,) = picked_labels(ds, "layer", layer)
    taken = tokens_taken(ds, step=step, layer=[label])  # (sample, 1, expert, token)
    regions = regions if regions is not None else word_regions(ds)
    obj = (regions["region"].values >= OBJECT_MIN) & regions["found"].values[..., None]  # (sample, word, token)
    size = obj.sum(-1)  # (sample, word)
    t = taken.sel(layer=label).values.astype(np.float32)  # (sample, expert, token)
    with np.errstate(invalid="ignore", divide="ignore"):
        cover = np.einsum("set,swt->swe", t, obj.astype(np.float32)) / size[..., None]  # (sample, word, expert)
    s_i, w_i = np.nonzero(size > 0)
    words = pd.Series(ds["prompt_word"].values[s_i, w_i].astype(object), dtype=object)
    if lower:
        words = words.str.lower().str.strip(".,;:!?\"'()")
    by = pd.DataFrame(cover[s_i, w_i]).groupby(words.values)
    mean, n = by.mean().sort_index(), by.size().sort_index()
    E = ds.sizes["expert"]
    out = xr.Dataset({"coverage": (("word", "expert"), mean.values.reshape(-1, E)),
                      "n": ("word", n.values.astype(np.int64))},
                     coords={"word": np.asarray(mean.index, dtype=object), "expert": np.arange(E)})
    out["coverage"].attrs["description"] = "share of the word's object tokens the expert took"
    out.attrs.update(step=taken.attrs["step"], layer=int(label))
    return out


def word_object_attention(ds: xr.Dataset, regions: xr.Dataset | None = None) -> xr.Dataset:
    """For each caption word that names an object drawn in the image: the share of its cross-attention mass
    (per block and step) that falls on that object's tokens (`inside`), the object's share of the image
    (`chance`: what uniform attention would give) and their ratio (`lift`). (sample, step, block, word)."""
    from ecviz.analysis.words import word_attention

    regions = regions if regions is not None else word_regions(ds)
    A = word_attention(ds)  # (sample, step, block, token, word)
    r = regions["region"].transpose("sample", "token", "word")  # coverage fraction per token
    mass = A.sum("token")
    inside = (A * r).sum("token") / mass.where(mass > 0)
    chance = r.mean("token")
    ok = regions["found"]
    out = xr.Dataset({"inside": inside.where(ok), "chance": chance.where(ok)})
    out["lift"] = out["inside"] / out["chance"]
    return out.assign_coords(word_text=ds["prompt_word"])


def word_object_lift(ds: xr.Dataset, wa: xr.Dataset | None = None, lower: bool = True):
    """Per caption word (its text), how much of its attention falls on the object it names: a pandas DataFrame of
    `inside` and `chance` (their means over every found object, step and block: `word_object_attention`), `lift`
    (the ratio of the two means, not a mean of ratios, which a few tiny objects would dominate) and `n` (found
    objects), most object-seeking first. Below 1: the word looks at its object less than uniform attention."""
    import pandas as pd

    wa = wa if wa is not None else word_object_attention(ds)
    wa = wa.mean([d for d in wa.dims if d not in ("sample", "word")]).compute()  # over steps and blocks
    frame = pd.DataFrame({"word": wa["word_text"].values.ravel().astype(object),
                          "inside": wa["inside"].values.ravel(), "chance": wa["chance"].values.ravel()}).dropna()
    if lower:
        frame["word"] = frame["word"].str.lower().str.strip(".,;:!?\"'()")
    out = frame.groupby("word").agg(inside=("inside", "mean"), chance=("chance", "mean"), n=("inside", "size"))
    out.insert(2, "lift", out["inside"] / out["chance"])
    return out.sort_values("lift", ascending=False)


def _taken_by_region(ds: xr.Dataset, branch: int, region: np.ndarray, clusters: np.ndarray,
                     K: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(taken, object, background), each (K, step·layer·expert) float64: per image cluster, how many tokens each
    expert took of the `branch` images' groups, and of those how many were object (region 1) and background
    (region 0) tokens; region (sample, token). Reads dispatch GROUP_CHUNK groups at a time, the other branch's
    groups not at all."""
    from ecviz.analysis.load import GROUP_CHUNK, _group_members

    S = region.shape[1]
    ms, mb, _ = _group_members(ds)  # (group, member)
    mo = bookkeeping(ds, "group_member_offset")
    seg = min(int(ds.attrs["routing"]["group_size"]), S)  # tokens of one image in a group
    mine = (ms >= 0) & (mb == branch)  # members that are this branch's images here
    tok = mo[..., None] + np.arange(seg)  # (group, member, seg) image position of each slot value
    code = np.where(mine[..., None], region[ms.clip(0)[..., None], tok.clip(0, S - 1)], -1)
    code = code.reshape(ms.shape[0], -1)  # (group, g): region of the token behind each slot value, -1 none
    group_cluster = np.where(mine.any(1), clusters[ms.clip(0)[np.arange(ms.shape[0]), mine.argmax(1)]], -1)
    T, L, E = ds.sizes["step"], ds.sizes["layer"], ds.sizes["expert"]
    counts = np.zeros((3, K, T, L, E), np.int32)  # taken, object, background per cluster
    dispatch = ds["dispatch"]
    mine_groups = np.flatnonzero(group_cluster >= 0)
    for k in range(0, len(mine_groups), GROUP_CHUNK):
        groups = mine_groups[k:k + GROUP_CHUNK]
        x = dispatch.isel(group=groups).transpose("group", "step", "layer", "expert",
                                                  "slot").values  # (Gc, T, L, E, C)
        Gc = x.shape[0]
        flat = code[groups].ravel()
        at = x.clip(0) + (np.arange(Gc) * code.shape[1]).reshape(Gc, 1, 1, 1, 1)
        r = np.where(x >= 0, flat[at], -1)  # (Gc, T, L, E, C) region of each taken token
        for i, what in enumerate(((r >= 0), (r == 1), (r == 0))):
            np.add.at(counts[i], group_cluster[groups], what.sum(-1))
    taken, obj, bg = counts.reshape(3, K, -1).astype(np.float64)
    return taken, obj, bg


def _cluster_interval(stat, K: int, shape: tuple[int, ...], n_boot: int, seed: int,
                      level: float) -> tuple[np.ndarray, np.ndarray]:
    """The `level` percentile bootstrap interval (lo, hi), each `shape`, of stat(w) over `n_boot` resamples of K
    clusters, whole: stat maps (B, K) cluster weights (how often each was drawn) to B values of `shape`. NaN
    where fewer than two clusters leave nothing to resample, or every resample was NaN there."""
    lo = hi = np.full(shape, np.nan)
    if K < 2:
        return lo, hi
    rng = np.random.default_rng(seed)
    boot = np.empty((n_boot, *shape))
    for b0 in range(0, n_boot, 100):  # (100, K) resample weights at a time: memory stays small
        picks = rng.integers(0, K, (min(100, n_boot - b0), K))
        w = np.zeros((picks.shape[0], K))
        np.add.at(w, (np.arange(picks.shape[0])[:, None], picks), 1)
        boot[b0:b0 + picks.shape[0]] = stat(w)
    alpha = (1 - level) / 2
    with warnings.catch_warnings():  # all-NaN resamples (an expert that took nothing) give NaN bounds
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanquantile(boot, alpha, axis=0), np.nanquantile(boot, 1 - alpha, axis=0)


def expert_objects(ds: xr.Dataset, branch: str = "cond", n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95) -> xr.Dataset:
    """Which experts take the objects: per (step, layer, expert), where the tokens each expert took of the
    generated images lie, against the images' own objects (`image_object_fraction`: object tokens have >=
    OBJECT_MIN of their patch drawn, background tokens nothing). From the routing groups' dispatch (`--record
    dispatch`), so for expert and token choice alike; the images of `branch` only (the masks are the
    conditional images'; fillers never count). Computed.

    Variables:
      object_share (step, layer, expert)    share of the tokens the expert took that are object tokens
      background_share                      ... that are background tokens (the rest are partly drawn)
      object_coverage, background_coverage  share of all object (background) tokens that the expert took
      object_tokens ()                      share of the images' tokens that are object tokens: what an expert
                                            choosing at random would have as its object_share
      enrichment                            object_share / object_tokens = object_coverage over the expert's
                                            share of all tokens (1: no preference; above: it seeks objects)
      enrichment_lo, enrichment_hi          the `level` percentile bootstrap interval of enrichment over
                                            `n_boot` resamples of whole image clusters (`image_clusters`)
    attrs n (images), clusters, n_boot, level, object_min, branch.

    The masks are of the final image, so early steps' shares say which experts took the tokens where the
    objects came to be, not what was drawn there yet."""
    from ecviz.analysis.common import require, require_done

    require(ds, "dispatch", "group_member_sample", "group_member_branch", "group_member_offset", "image",
            what="the experts' objects")
    require_done(ds, "the experts' objects")
    bi = branch_index(ds, branch)
    frac = image_object_fraction(ds).values  # (sample, token)
    region = np.where(frac >= OBJECT_MIN, 1, np.where(frac == 0, 0, 2)).astype(np.int8)  # object, background, part
    n, S = region.shape
    clusters = image_clusters(ds)  # (sample,): a routing group's members are always in one cluster
    K = int(clusters.max()) + 1 if n else 0
    T, L, E = ds.sizes["step"], ds.sizes["layer"], ds.sizes["expert"]
    taken, obj, bg = _taken_by_region(ds, bi, region, clusters, K)  # (K, T * L * E) each
    obj_tok = np.bincount(clusters, (region == 1).sum(1), minlength=K)  # (K,) object tokens per cluster
    bg_tok = np.bincount(clusters, (region == 0).sum(1), minlength=K)
    all_tok = np.bincount(clusters, minlength=K) * S

    def shares(w):  # w (B, K) cluster weights -> enrichment (B, T, L, E) and the other variables
        fl = lambda a: (w @ a).reshape(-1, T, L, E)  # noqa: E731
        t_, o_, b_ = fl(taken), fl(obj), fl(bg)
        ot, bt, at_ = w @ obj_tok, w @ bg_tok, w @ all_tok
        return {"object_share": o_ / t_, "background_share": b_ / t_,
                "object_coverage": o_ / ot[:, None, None, None], "background_coverage": b_ / bt[:, None, None, None],
                "object_tokens": ot / at_, "enrichment": (o_ / t_) / (ot / at_)[:, None, None, None]}

    with np.errstate(divide="ignore", invalid="ignore"):  # no object token, or an expert that took nothing: NaN
        point = shares(np.ones((1, K)))
        lo, hi = _cluster_interval(lambda w: shares(w)["enrichment"], K, (T, L, E), n_boot, seed, level)
    dims = ("step", "layer", "expert")
    out = xr.Dataset({k: ((), v[0]) if k == "object_tokens" else (dims, v[0]) for k, v in point.items()},
                     coords={"step": ds["step"].values, "layer": ds["layer"].values, "expert": np.arange(E)})
    out["enrichment_lo"], out["enrichment_hi"] = (dims, lo), (dims, hi)
    out.attrs.update(n=int(n), clusters=K, n_boot=n_boot, level=level, object_min=OBJECT_MIN, branch=branch)
    return out


def objects_draw_compute(ds: xr.Dataset, branch: str = "cond", n_boot: int = 1000, seed: int = 0,
                         level: float = 0.95) -> xr.Dataset:
    """Across the images that shared a routing group: does the image with more object area get more experts per
    token than its partners? Expert choice fixes only a group's mean (f_c), so one image's compute is taken
    from its partners'. (step, layer): `rho`, Spearman's correlation over those images between an image's
    experts per token minus its group's mean (`image_vs_group`) and its object area (the mean object fraction of
    its tokens in its own generated image, `image_object_fraction`) minus the mean area of its group's images;
    `rho_lo`, `rho_hi` the `level` percentile bootstrap interval over `n_boot` resamples of whole image clusters
    (`image_clusters`; NaN with fewer than two clusters). Attributes `n`: the images used, those whose group
    held at least two images and no padding copies, all of them here (a `subset` may have left a partner out);
    `clusters`: theirs. Token choice fixes no group mean: there an image's excess is what its own tokens' choices
    and drops gave it. Computed."""
    from scipy.stats import rankdata

    from ecviz.analysis.load import image_vs_group, sample_groups

    require_trace(ds, "objects_draw_compute")
    require(ds, "expert_count", what="objects_draw_compute")
    b = branch_index(ds, branch)
    iv = image_vs_group(ds).isel(branch=b)
    group = sample_groups(ds)["group"].values[:, b]  # (sample,)
    partners = iv["partners"].values
    use = np.flatnonzero((partners > 1) & ~iv["filler"].values)
    which = np.unique(group[use], return_inverse=True)[1]
    shared, use = len(use), use[np.bincount(which)[which] == partners[use]]  # whole groups only (a subset may
    if len(use) < 3 and shared > len(use):  # leave partners out)
        raise TraceError(f"objects_draw_compute: {len(use)} of the {shared} images here that shared a routing "
                         "group have all their partners here (a subset left the others out); it needs whole "
                         "groups: take every image, or a subset that keeps groups whole")
    if len(use) < 3:
        raise TraceError(f"objects_draw_compute: {len(use)} images shared a routing group with another image, too "
                         "few for a correlation; it needs three or more, in groups of two or more whole images "
                         "(trace with --group-size a multiple of the image's tokens, and more images)")
    area = image_object_fraction(ds).values.mean(-1)[use]  # (n,)
    _, g = np.unique(group[use], return_inverse=True)
    area_rel = area - (np.bincount(g, area) / np.bincount(g))[g]
    excess = (iv["image_mean"] - iv["group_mean"]).transpose("sample", "step", "layer").values[use]  # (n, T, L)
    n, T, L = excess.shape
    x = np.moveaxis(excess, 0, -1).reshape(T * L, n)  # (T·L, n)

    def spearman(rows: np.ndarray) -> np.ndarray:  # rows: the images drawn -> (T·L,)
        return pearson_rows(rankdata(x[:, rows], axis=-1), rankdata(area_rel[rows])[None, :])

    rho = spearman(np.arange(n))
    ids, clusters = np.unique(image_clusters(ds)[use], return_inverse=True)  # (n,) each image's cluster, 0..K-1
    K = len(ids)

    def resampled(w: np.ndarray) -> np.ndarray:  # (B, K) draws of each cluster -> (B, T·L)
        return np.stack([spearman(np.repeat(np.arange(n), wb[clusters].astype(np.int64))) for wb in w])

    lo, hi = _cluster_interval(resampled, K, (T * L,), n_boot, seed, level)
    dims, coords = ("step", "layer"), {"step": iv["step"].values, "layer": iv["layer"].values}
    if "t" in iv.coords:
        coords["t"] = ("step", iv["t"].values)
    out = xr.Dataset({k: (dims, v.reshape(T, L).astype(np.float32)) for k, v in
                      (("rho", rho), ("rho_lo", lo), ("rho_hi", hi))}, coords=coords)
    out.attrs.update(n=int(n), clusters=K, level=level, n_boot=n_boot)
    return out
