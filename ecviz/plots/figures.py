"""Matplotlib figures of routing analyses, for files (`save`) and notebooks (the returned Figure shows itself).

Each function takes what an `ecviz.analysis` function returns (or the Dataset, where the figure needs the image
too) and returns a `matplotlib.figure.Figure`. Heatmaps are drawn over the generated image (or the step's x0
estimate), upscaled without smoothing, in the paper's Fig. 6 manner: darker = more experts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from ecviz.analysis.allocation import check_position
from ecviz.errors import TraceError
from ecviz.io import atomic_write

CMAP = "magma_r"


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline", "inline") \
            and not _in_notebook():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        return get_ipython() is not None
    except ImportError:
        return False


def save(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write a figure as PNG atomically and close it."""
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    _plt().close(fig)
    return path


def background(ds: xr.Dataset, sample: int, step=None, use: str = "image") -> np.ndarray | None:
    """The picture under a heatmap: the generated image, or (use="x0", where recorded) the step's clean-image
    estimate; None for no picture (use="none"). (H, W, 3) uint8. A training probe (images along `probe`, no x0)
    gives its image; step None, "all" or a list (no one estimate) gives the generated image."""
    if use not in ("image", "x0", "none", None):  # a typo drew no picture without a word
        raise TraceError(f"use={use!r}: 'image', 'x0' or 'none' (no picture)")
    if use in ("none", None):
        return None
    if "probe" in ds.dims:
        return ds["image"].isel(probe=sample).values if "image" in ds else None
    check_position("sample", sample, ds.sizes["sample"])
    if isinstance(step, (list, tuple, np.ndarray)):  # several steps: no one estimate, the generated image
        step = None
    if use == "x0" and "x0" in ds and step is not None and not (isinstance(step, str) and step == "all"):
        x0 = ds["x0"].isel(sample=sample)
        x0 = x0.isel(step=step) if isinstance(step, (int, np.integer)) and step < 0 else x0.sel(step=step)
        return x0.values
    return ds["image"].isel(sample=sample).values if "image" in ds else None


def overlay(ax, heat: np.ndarray, image: np.ndarray | None = None, alpha: float = 0.6, cmap: str = CMAP,
            vmin: float = 0, vmax: float | None = None):
    """Draw image (nearest-neighbour) with heat (rows, cols) stretched over it; returns the heat artist."""
    h, w = (image.shape[:2] if image is not None else heat.shape)
    extent = (0, w, h, 0)
    if image is not None:
        ax.imshow(image, interpolation="nearest", extent=extent)
    art = ax.imshow(heat, cmap=cmap, alpha=alpha if image is not None else 1.0, interpolation="nearest",
                    extent=extent, vmin=vmin, vmax=vmax)
    ax.set_xticks([])
    ax.set_yticks([])
    return art


def allocation_grid(ds: xr.Dataset, sample: int = 0, over: str = "layer", use: str = "image", alpha: float = 0.6,
                    cmap: str = CMAP, panels: int = 8, **index):
    """The paper's Fig. 6 for one image: over="layer" (6a: every sparse layer at one step, `step=`; `layer=[...]`
    for some) or
    over="step" (6b: one layer over the denoising steps, `layer=`; at most `panels` evenly spaced steps, the last
    included, unless `step=[...]` names them), heatmaps of experts per token over the image (use="image"), the
    step's x0 estimate (use="x0", where recorded) or nothing (use="none")."""
    from ecviz.analysis import heatmaps

    if over == "step" and over in ds.dims and over not in index and ds.sizes[over] > panels:
        labels = ds[over].values
        index[over] = [labels[i] for i in np.unique(np.linspace(0, len(labels) - 1, panels).round().astype(int))]

    maps = heatmaps(ds, sample=sample, over=over, **index)  # (over, row, col)
    n = maps.sizes[over]
    plt = _plt()
    fig, axes = plt.subplots(1, n, figsize=(1.9 * n + 0.8, 2.3), squeeze=False)
    vmax = float(maps.max())
    for i, ax in enumerate(axes[0]):
        label = maps[over].values[i]
        step = label if over == "step" else index.get("step", -1)
        art = overlay(ax, maps.isel({over: i}).values, background(ds, sample, step, use), alpha, cmap, 0, vmax)
        ax.set_title(f"block {label}" if over == "layer" else f"step {label}", fontsize=9)
    fig.colorbar(art, ax=axes[0].tolist(), shrink=0.8, label="experts per token")
    prompt = str(ds["prompt"].values[sample]) if "prompt" in ds else ""
    fig.suptitle(prompt[:90], fontsize=9)
    return fig


def expert_grid(ds: xr.Dataset, sample: int = 0, step=-1, layer=-1, use: str = "image", alpha: float = 0.75,
                cmap: str = "cool", columns: int = 8):
    """Which tokens of one image each expert took at a step and sparse layer (`analysis.expert_maps`; "all"
    averages, giving the share of them in which it took each token), one panel per expert over the image:
    tokens it did not take are left clear, so the picture shows through (a bright colour map: the background
    may be black or white)."""
    from ecviz.analysis import expert_maps

    result = expert_maps(ds, sample, step=step, layer=layer)
    maps = result["taken"]  # (expert, row, col)
    one = len(result.attrs["steps"]) == 1 and len(result.attrs["layers"]) == 1
    E = maps.sizes["expert"]
    rows, cols = -(-E // columns), min(E, columns)
    plt = _plt()
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols + 0.8, 1.9 * rows + 0.3), squeeze=False)
    picture = background(ds, sample, step if step != "all" else None, use)
    for e, ax in enumerate(axes.flat):
        if e >= E:
            ax.axis("off")
            continue
        art = overlay(ax, np.ma.masked_equal(maps.isel(expert=e).values, 0), picture, alpha, cmap, 0, 1)
        ax.set_title(f"expert {e}: {int(maps.isel(expert=e).sum())} tokens" if one else f"expert {e}", fontsize=8)
    if not one:  # one step and layer: a token is taken or not, in the colour map's top colour
        fig.colorbar(art, ax=axes.ravel().tolist(), shrink=0.8, label="share of steps and layers")
    steps, layers = result.attrs["steps"], result.attrs["layers"]
    where = (f"step {steps[0]}" if len(steps) == 1 else f"{len(steps)} steps") + ", " + \
        (f"block {layers[0]}" if len(layers) == 1 else f"blocks {', '.join(map(str, layers))}") + \
        ("; coloured: the tokens it took" if one else "")
    fig.suptitle(f"{str(ds['prompt'].values[sample])[:70]} ({where})" if "prompt" in ds else where, fontsize=9)
    return fig


def image_heatmap_pairs(ds: xr.Dataset, samples, step=-1, layer="all", cmap: str = CMAP, columns: int = 3):
    """For each sample, its generated image beside its experts-per-token heatmap (one step, `layer`: a block or
    "all" for the mean over the sparse layers), on one colour scale; `columns` pairs per row, prompts as titles."""
    from ecviz.analysis import heatmap

    samples = [int(i) for i in samples]
    if not samples or columns < 1:
        raise TraceError(f"samples {samples}, columns {columns}: give at least one sample and one column")
    maps = [heatmap(ds, sample=i, step=step, layer=layer).values for i in samples]  # each (rows, cols)
    vmax = max(float(m.max()) for m in maps)
    rows = -(-len(samples) // columns)
    plt = _plt()
    fig, axes = plt.subplots(rows, 2 * columns, figsize=(3.0 * columns + 0.8, 1.75 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (i, heat) in enumerate(zip(samples, maps, strict=True)):
        a, b = axes[k // columns, 2 * (k % columns)], axes[k // columns, 2 * (k % columns) + 1]
        image = background(ds, i)
        if image is not None:
            a.imshow(image, interpolation="nearest")
        art = overlay(b, heat, None, cmap=cmap, vmin=0, vmax=vmax)
        prompt = str(ds["prompt"].values[i]) if "prompt" in ds else f"sample {i}"
        a.set_title(prompt[:40], fontsize=8, loc="left")
    fig.colorbar(art, ax=axes.ravel().tolist(), shrink=0.8, label="experts per token")
    return fig


def word_maps(ds: xr.Dataset, sample: int = 0, step="all", layer="all", use: str = "image", alpha: float = 0.6,
              cmap: str = "inferno", words: int = 12):
    """DAAM-style, for one image: its experts-per-token heatmap, then each caption word's cross-attention map
    (`analysis.word_map`: the word's pieces summed; step and layer "all" average them) over the picture, each on
    its own scale, titled with the word's share of the image tokens' attention (the map's mean): a map at 0.1%
    of the attention shows where a little attention goes, not that the word is looked at. At most `words`."""
    from ecviz.analysis import heatmap, word_map

    check_position("sample", sample, ds.sizes["sample"])
    names = [str(w) for w in ds["prompt_word"].isel(sample=sample).values]
    slots = [k for k, w in enumerate(names) if w][:words]
    plt = _plt()
    fig, axes = plt.subplots(1, 1 + len(slots), figsize=(1.9 * (1 + len(slots)) + 0.4, 2.4), squeeze=False)
    picture = background(ds, sample, step, use)
    art = overlay(axes[0, 0], heatmap(ds, sample=sample, step=step, layer=layer).values, picture, alpha)
    axes[0, 0].set_title("experts per token", fontsize=8, loc="left")
    fig.colorbar(art, ax=axes[0, 0], shrink=0.7)
    for ax, k in zip(axes[0, 1:], slots, strict=True):
        m = word_map(ds, sample, k, step=step, layer=layer)
        if float(m.max()) > 0:
            overlay(ax, m.values, picture, alpha, cmap, 0, float(m.max()))
            ax.set_title(f"{names[k][:14]} · {100 * m.attrs['share']:.2g}%", fontsize=8, loc="left")
        else:  # nothing to scale: the picture alone
            overlay(ax, np.ma.masked_all(m.shape), picture, alpha, cmap, 0, 1)
            ax.set_title(f"{names[k][:14]} · no attention", fontsize=8, loc="left")
    where = ("every step" if step == "all" else f"step {step}") + ", " + (
        "the sparse layers' blocks" if layer == "all" else f"block {layer}")
    fig.suptitle(f"{str(ds['prompt'].values[sample])[:80]} ({where}; each word: its share of the attention, its "
                 "map on its own scale)", fontsize=8)
    return fig


def allocation_histogram(stats: xr.Dataset, step=-1):
    """Tokens by number of experts, one bar series per layer, at one step (stats: allocation_stats)."""
    h = stats["histogram"]
    if "step" in h.dims:
        from ecviz.analysis import select

        h = select(h, step=step)
    h = h.mean([d for d in h.dims if d not in ("layer", "experts")])
    share = h / h.sum("experts")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    L = share.sizes["layer"]
    width = 0.8 / L
    for i, layer in enumerate(share["layer"].values):
        ax.bar(share["experts"].values + (i - (L - 1) / 2) * width, share.sel(layer=layer).values, width,
               label=f"block {layer}")
    ax.set_xlabel("experts per token")
    ax.set_ylabel("share of tokens")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return fig


def heterogeneity(stats: xr.Dataset, var: str = "gini"):
    """One statistic of allocation_stats over (layer, step) as a heatmap (or over train_step for a probe)."""
    da = stats[var]
    x = "step" if "step" in da.dims else "train_step"
    da = da.mean([d for d in da.dims if d not in ("layer", x)]).transpose("layer", x)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 0.5 * da.sizes["layer"] + 1.4))
    art = ax.imshow(da.values, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(da.sizes["layer"]), [f"block {v}" for v in da["layer"].values])
    xs = da[x].values
    ticks = np.unique(np.linspace(0, len(xs) - 1, min(len(xs), 8)).round().astype(int))
    ax.set_xticks(ticks, [str(xs[i]) for i in ticks])
    ax.set_xlabel(x.replace("_", " "))
    fig.colorbar(art, ax=ax, label=stats[var].attrs.get("description", var))
    return fig


def curves(da: xr.DataArray, x: str, label: str | None = None, lo: xr.DataArray | None = None,
           hi: xr.DataArray | None = None, hline: float | None = None):
    """Lines of da along x, one per layer, with an optional band (lo, hi)."""
    da = da.mean([d for d in da.dims if d not in ("layer", x)])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    for i, layer in enumerate(da["layer"].values):
        y = da.sel(layer=layer)
        ax.plot(da[x].values, y.values, color=f"C{i}", ls=("-", "--", ":", "-.")[i % 4], label=f"block {layer}",
                marker="o" if da.sizes[x] <= 3 else None)  # a single step is a point, not an empty plot
        if lo is not None and hi is not None:
            if da.sizes[x] > 1:
                ax.fill_between(da[x].values, lo.sel(layer=layer).values, hi.sel(layer=layer).values,
                                color=f"C{i}", alpha=0.2)
            else:
                ax.errorbar(da[x].values, y.values, yerr=[y.values - lo.sel(layer=layer).values,
                                                          hi.sel(layer=layer).values - y.values], color=f"C{i}")
    if hline is not None:
        ax.axhline(hline, color="k", lw=0.8)
    if da.sizes[x] <= 3:  # the steps themselves, not fractional ticks around a single one
        ax.set_xticks(da[x].values)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(label or (da.name or ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def load_bars(load: xr.Dataset, var: str = "tokens", step=None):
    """Per-expert load (tokens, gate_mass or share) for each layer, summed over steps unless one is given; gate
    mass as each expert's share of its layer's (summed over steps and groups it is a count of nothing)."""
    da = load[var]
    if step is not None:
        from ecviz.analysis import select

        da = select(da, step=step)
    da = da.sum([d for d in da.dims if d not in ("layer", "expert")])
    label = var.replace("_", " ")
    if var == "gate_mass":
        da, label = da / da.sum("expert"), "share of the layer's gate mass"
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    L = da.sizes["layer"]
    fig, axes = plt.subplots(1, L, figsize=(2.6 * L + 0.5, 2.6), squeeze=False, sharey=True)
    for ax, layer in zip(axes[0], da["layer"].values, strict=True):
        ax.bar(da["expert"].values, da.sel(layer=layer).values, color="C0")
        ax.set_title(f"block {layer}", fontsize=9)
        ax.set_xlabel("expert")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_ylabel(label)
    return fig


def expert_objects_bars(eo: xr.Dataset, step=-1):
    """Per sparse layer, how strongly each expert seeks the objects at one step (`expert_objects`:
    `enrichment`, the share of its tokens on objects over the images' object share, with its interval): 1 is a
    random choice, above it the expert takes object tokens."""
    from ecviz.analysis import select

    at = {k: select(eo[k], step=step) for k in ("enrichment", "enrichment_lo", "enrichment_hi")}
    L = eo.sizes["layer"]
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, L, figsize=(2.6 * L + 0.5, 2.6), squeeze=False, sharey=True)
    for ax, layer in zip(axes[0], eo["layer"].values, strict=True):
        y, lo, hi = (at[k].sel(layer=layer).values for k in ("enrichment", "enrichment_lo", "enrichment_hi"))
        err = np.nan_to_num(np.stack([y - lo, hi - y]).clip(0))
        ax.bar(eo["expert"].values, y, color=np.where(lo > 1, "C3", "C0"), yerr=err, ecolor="0.3", capsize=2)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title(f"block {layer}", fontsize=9)
        ax.set_xlabel("expert")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_ylabel("object share / a random choice's")
    return fig


def expert_word_maps(results: list[xr.Dataset], words: list[str] | None = None, min_n: int = 2):
    """Which experts take each word's object (`expert_words` results, one per sparse layer): a panel per layer,
    the words as rows (`words`, in that order, or every word counted `min_n` times or more), the experts as
    columns, each cell the share of the word's object tokens the expert took, printed in percent."""
    plt = _plt()
    n = len(results)
    shown = []
    for r in results:
        keep = r["n"] >= min_n
        names = [w for w in (words or r["word"].values.tolist()) if w in r["word"].values and bool(keep.sel(word=w))]
        shown.append(r["coverage"].sel(word=names))
    rows = max((s.sizes["word"] for s in shown), default=1)
    E = results[0].sizes["expert"] if results else 1
    fig, axes = plt.subplots(1, n, figsize=(0.42 * E * n + 1.4, 0.3 * rows + 1.3), squeeze=False)
    for ax, r, cover in zip(axes[0], results, shown, strict=True):
        ax.set_title(f"block {r.attrs.get('layer', '')}", fontsize=9)
        if not cover.sizes["word"]:  # an empty image would make matplotlib warn of singular limits
            ax.text(0.5, 0.5, f"no word's object found {min_n}+ times", ha="center", va="center", fontsize=8,
                    transform=ax.transAxes)
            ax.set_axis_off()
            continue
        ax.imshow(cover.values, cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        for (i, j), v in np.ndenumerate(cover.values):
            if np.isfinite(v):
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=6.5,
                        color="white" if v > 0.6 else "black")
        ax.set_xticks(range(cover.sizes["expert"]), [str(e) for e in cover["expert"].values], fontsize=8)
        ax.set_yticks(range(cover.sizes["word"]), cover["word"].values.tolist(), fontsize=8)
        ax.set_xlabel("expert")
    fig.suptitle("% of the object's tokens the expert took" + (f" (step {results[0].attrs['step']})"
                                                               if results else ""), fontsize=9)
    fig.tight_layout()
    return fig


def coselection_heatmap(cosel: xr.Dataset, var: str = "lift"):
    """The expert co-selection matrix per layer (coselection(): lift, conditional or count)."""
    from matplotlib.colors import Normalize

    da = cosel[var]
    plt = _plt()
    L = da.sizes["layer"]
    mats = da.values.astype(float).copy()  # (layer, expert, expert_b)
    for m in mats:
        np.fill_diagonal(m, np.nan)
    if var == "lift":  # white is independence (lift 1): red pairs share tokens, blue ones avoid each other
        norm = _centred_at_one(mats)
    else:
        norm = Normalize(0, max(float(np.nanmax(mats)) if np.isfinite(mats).any() else 1.0, 1e-12))
    fig, axes = plt.subplots(1, L, figsize=(3 * L + 0.8, 3), squeeze=False)
    for i, (ax, layer, m) in enumerate(zip(axes[0], da["layer"].values, mats, strict=True)):
        art = ax.imshow(m, cmap="coolwarm" if var == "lift" else "viridis", interpolation="nearest", norm=norm)
        ax.set_title(f"block {layer}", fontsize=9)
        ax.set_xlabel("expert")
        if i == 0:  # on every panel it ran into the panel to its left
            ax.set_ylabel("expert")
    if var == "lift":
        _ratio_colorbar(fig, art, axes[0].tolist(), var)
    else:
        fig.colorbar(art, ax=axes[0].tolist(), shrink=0.8, label=var)
    return fig


def _centred_at_one(values: np.ndarray):
    """A colour norm with white at 1 (no preference) over the finite values, for ratios to a uniform baseline."""
    from matplotlib.colors import TwoSlopeNorm

    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (1.0, 1.0)
    return TwoSlopeNorm(vcenter=1.0, vmin=min(lo, 1 - 1e-6), vmax=max(hi, 1 + 1e-6))


def _ratio_colorbar(fig, art, ax, label: str):
    """A colour bar for a norm centred at 1, ticked on both sides of it (matplotlib leaves the short side bare)."""
    norm = art.norm
    ticks = np.r_[np.linspace(norm.vmin, 1, 3), np.linspace(1, norm.vmax, 4)].round(2)
    ticks = np.unique(ticks[(ticks >= norm.vmin) & (ticks <= norm.vmax)])  # a tick outside breaks the bar
    bar = fig.colorbar(art, ax=ax, shrink=0.8, label=label)
    bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
    return bar


def _layer_label(da: xr.DataArray, layer):
    """The block a `layer=` argument names: its label, for -1 and other positions from the end."""
    return int(da["layer"].values[layer]) if isinstance(layer, (int, np.integer)) and layer < 0 else layer


def expert_position_maps(pos: xr.DataArray, layer=-1, experts: int = 8):
    """Where each expert of one sparse layer takes its tokens (expert_positions: (layer, expert, token), relative
    to a uniform choice), the first `experts` experts on one colour scale, white at 1."""
    from ecviz.analysis import select, token_grid

    grid = token_grid(select(pos, layer=layer)).compute()  # (expert, row, col)
    layer = _layer_label(pos, layer)
    shown = grid.isel(expert=slice(0, experts))
    norm = _centred_at_one(shown.values)
    n = shown.sizes["expert"]
    plt = _plt()
    fig, axes = plt.subplots(1, n, figsize=(1.7 * n + 0.8, 2.1), squeeze=False)
    labels = shown["expert"].values if "expert" in shown.coords else np.arange(n)
    for i, ax in enumerate(axes[0]):
        art = ax.imshow(shown.isel(expert=i).values, cmap="coolwarm", norm=norm, interpolation="nearest")
        ax.set_title(f"expert {labels[i]}", fontsize=9)
        ax.axis("off")
    _ratio_colorbar(fig, art, axes[0].tolist(), "× a uniform choice")
    fig.suptitle(f"block {layer}", fontsize=9)
    return fig


def expert_step_map(steps: xr.DataArray, layer=-1):
    """Each expert's gate mass per recorded denoising step over its mean over steps (expert_steps: (step, layer,
    expert)) for one sparse layer, the steps labelled as recorded, white at 1."""
    from ecviz.analysis import select

    da = select(steps, layer=layer).transpose("expert", "step").compute()
    layer = _layer_label(steps, layer)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 0.18 * da.sizes["expert"] + 1.6))
    art = ax.imshow(da.values, aspect="auto", cmap="coolwarm", norm=_centred_at_one(da.values),
                    interpolation="nearest")
    xs = da["step"].values
    ticks = np.unique(np.linspace(0, len(xs) - 1, min(len(xs), 10)).round().astype(int))
    ax.set_xticks(ticks, [str(xs[i]) for i in ticks])
    ax.set_xlabel("step")
    ax.set_ylabel("expert")
    ax.set_title(f"block {layer}", fontsize=9)
    _ratio_colorbar(fig, art, ax, "gate mass / its mean over steps")
    return fig


def word_bars(imp: xr.Dataset, sample: int = 0, var: str = "importance"):
    """Per-word importance of one prompt, in prompt order (text_importance result; averaged over step/layer).
    Every word gets a place: one without a score (its region is empty or every token of it took no expert, see
    text_importance) is marked "no score" on a grey tick, not left out."""
    row = imp.isel(sample=sample)
    row = row.mean([d for d in row[var].dims if d != "word"])
    words = [str(w) for w in row["word_text"].values]
    vals = row[var].values
    keep = [i for i, w in enumerate(words) if w]
    base = 1 if var == "importance" else 0
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(3, 0.6 * len(keep) + 1), 2.6))
    scored = [np.isfinite(vals[i]) for i in keep]
    ax.bar(range(len(keep)), [vals[i] if ok else 0 for i, ok in zip(keep, scored, strict=True)],
           color=["C3" if ok and vals[i] > base else "C0" for i, ok in zip(keep, scored, strict=True)])
    for k, ok in enumerate(scored):
        if not ok:
            ax.text(k, base, "no score", rotation=90, ha="center", va="bottom", fontsize=7, color="0.45")
    ax.set_xticks(range(len(keep)), [words[i] for i in keep], rotation=45, ha="right")
    for tick, ok in zip(ax.get_xticklabels(), scored, strict=True):
        if not ok:
            tick.set_color("0.55")
    ax.axhline(base, color="k", lw=0.8)
    ax.set_ylabel(var)
    return fig


def table_bars(frame, column: str = "importance", top: int = 20, baseline: float = 1.0):
    """Horizontal bars of one column of a by_word() table (top rows)."""
    frame = frame.head(top)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 0.25 * len(frame) + 1))
    ax.barh(range(len(frame)), frame[column].values, color="C0")
    ax.set_yticks(range(len(frame)), [str(i) for i in frame.index])
    ax.invert_yaxis()
    ax.axvline(baseline, color="k", lw=0.8)
    ax.set_xlabel(column)
    return fig
