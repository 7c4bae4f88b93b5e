"""`ecviz report`: every statistic a routing record allows, as figures (PNG), summary.json and summary.md.

Works on traces of expert-choice, token-choice and dense models and on training probes (`routing.zarr`),
saying in the summary what does not apply and why (a dense model routes nothing; text importance needs
`--record cross_attn`; ground truth needs Shapes prompts).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import dask
import numpy as np
import xarray as xr

from ecviz import analysis as A
from ecviz.analysis.common import kind, n_experts, routing_kind
from ecviz.errors import TraceError, UsageError
from ecviz.io import atomic_write, same_path, temp_beside
from ecviz.validate import check_output


def default_out(source) -> Path:
    """Where `ecviz report SOURCE` writes without --out: reports/NAME under the working directory, NAME the
    trace store's name without .zarr, or for a training probe its run's or checkpoint's directory name and
    `-training` (traces/demo.zarr: reports/demo, as the demo writes; runs/x or runs/x/routing.zarr:
    reports/x-training, so that a trace traces/x.zarr of that run's model has a report of its own)."""
    path = Path(os.path.abspath(source))
    probe = path.name == "routing.zarr" or (path / "routing.zarr").is_dir()
    if path.name == "routing.zarr":  # a run's probe: the run's name
        path = path.parent
    name = path.name.removesuffix(".zarr")
    if not name:
        raise UsageError(f"{source}: no name to write its report under; give --out")
    return Path("reports") / (f"{name}-training" if probe else name)


REPORT_FILES = ("summary.json", "summary.md")  # and the figures its summary.json lists


def previous_report(out: Path) -> dict:
    """The summary.json a report wrote into `out` before ({} when there is none, or it is not a report's)."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return summary if isinstance(summary, dict) else {}


def report_figures(summary: dict) -> set[str]:
    """The figure files a report's summary lists (plain PNG names in its directory; anything else is not ours)."""
    figures = summary.get("figures")
    return {n for n in figures if isinstance(n, str) and Path(n).name == n and n.endswith(".png")} \
        if isinstance(figures, list) else set()


def source_path(path) -> str | None:
    """The routing record a report is of, as an absolute path (a run's or checkpoint's directory: its probe
    store), which summary.json keeps as `source`; None for a Dataset not opened from a path."""
    if not path:
        return None
    path = Path(path)
    return os.path.abspath(path / "routing.zarr" if (path / "routing.zarr").is_dir() else path)


def check_out_dir(out: Path, source: str | None = None) -> None:
    """Before any work: the output directory can be created and written, and is new, empty, or a report's
    directory of this same source (rewritten in place). A report written over a folder of other files replaced
    its summary.md without a word, one into a run's checkpoint/ was deleted by the run's next save, and the
    report of a trace and of a run's probe of one name replaced each other in reports/NAME."""
    check_output(out, "--out", "dir")  # writable, not a file, not a trace store nor inside one
    if out.is_dir():
        before = previous_report(out)
        ours = set(REPORT_FILES) | report_figures(before)
        other = sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith("."))
        if other:
            raise UsageError(f"--out {out}: holds {other[0]!r}, which is not a report's file (a report replaces "
                             "its directory's report files); give a new or empty directory")
        was = before.get("source")
        if isinstance(was, str) and source is not None and not same_path(was, source):
            raise UsageError(f"--out {out}: holds the report of {was}; give this one another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create it ({e.strerror or e})") from None


def _num(x):
    """JSON-able number (None for NaN)."""
    if isinstance(x, (np.integer,)):
        return int(x)
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else round(x, 6)


def _by_layer(da: xr.DataArray) -> dict:
    return {str(int(layer)): _num(da.sel(layer=layer)) for layer in da["layer"].values}


class Report:
    """Collects statistics, figures and notes for one routing record; figures are saved into `stage`."""

    def __init__(self, ds: xr.Dataset, stage: Path, sample: int = 0):
        self.ds, self.stage, self.sample = ds, stage, sample
        self.summary: dict = {}
        self.figures: list[tuple[str, str]] = []  # (file name, caption)
        self.notes: list[str] = []
        self.tables: list[str] = []

    def figure(self, fig, name: str, caption: str) -> None:
        from ecviz.plots.figures import save

        save(fig, self.stage / name)
        self.figures.append((name, caption))

    def na(self, what: str, why: str) -> None:
        self.notes.append(f"{what}: not applicable ({why})")
        self.summary.setdefault("not_applicable", {})[what] = why


def describe(ds: xr.Dataset) -> dict:
    k = kind(ds)
    info = {"kind": k, "path": ds.attrs.get("path")}
    if k == "trace":
        r = ds.attrs.get("routing", {})
        info |= {"routing": r.get("kind"), "experts": r.get("experts"), "capacity": r.get("capacity"),
                 "capacity_factor": r.get("capacity_factor"), "group_size": r.get("group_size"),
                 "samples": ds.sizes["sample"], "sampler_steps": ds.attrs.get("sampler", {}).get("steps"),
                 "guidance": ds.attrs.get("sampler", {}).get("guidance"), "recorded_steps": ds.sizes.get("step"),
                 "layers": [int(v) for v in ds["layer"].values] if "layer" in ds.coords else [],
                 "checkpoint": ds.attrs.get("checkpoint"), "preset": ds.attrs.get("preset"),
                 "prompt_file": ds.attrs.get("prompt_file"), "record": ds.attrs.get("record", {}).get("what")}
    else:
        info |= {"routing": routing_kind(ds), "experts": n_experts(ds), "probe_images": ds.sizes["probe"],
                 "train_steps": [int(ds["train_step"].values[0]), int(ds["train_step"].values[-1])],
                 "rows": ds.sizes["train_step"], "t": [float(v) for v in ds["t"].values],
                 "layers": [int(v) for v in ds["layer"].values]}
    return info


def allocation_section(rep: Report) -> None:
    ds = rep.ds
    from ecviz.plots import figures as F

    lazy = {"stats": A.allocation_stats(ds)}  # computed together: one read of expert_count for the three
    x = "step" if "step" in lazy["stats"].dims else "train_step"
    if x == "step" and ds.sizes["step"] >= 2:
        lazy["settle"] = A.settling(ds)
    if ds.sizes["layer"] > 1:
        lazy["agree"] = A.layer_agreement(ds)
    got = dict(zip(lazy, dask.compute(*lazy.values()), strict=True))
    stats = got["stats"]
    last = stats.isel({x: -1})
    if "t" in last.dims:  # a probe: the mean over its timesteps, but the most experts any token got at any
        last = last.mean("t").assign(max=last["max"].max("t"), max_share=last["max_share"].max("t"))
    E = n_experts(ds)
    rep.summary["allocation"] = {
        "at": f"last {x.replace('_', ' ')} ({_num(stats[x].values[-1])})",
        "mean": _by_layer(last["mean"]), "skipped_share": _by_layer(last["skipped"]),
        "max_experts": _by_layer(last["max"]), "max_share": _by_layer(last["max_share"]),
        "gini": _by_layer(last["gini"]), "cv": _by_layer(last["cv"]), "entropy": _by_layer(last["entropy"]),
        "max_share_overall": _num(stats["max_share"].max()),
        "at_least": {str(int(t)): _by_layer(last["at_least"].sel(threshold=t))
                     for t in last["threshold"].values if t <= min(E, 8)},
    }
    rows = ["| block | experts/token | skipped | max (share of E) | Gini | CV | entropy |",
            "|---|---|---|---|---|---|---|"]
    for layer in last["layer"].values:
        s = last.sel(layer=layer)
        rows.append(f"| {layer} | {float(s['mean']):.2f} | {float(s['skipped']):.1%} | {float(s['max']):.0f} "
                    f"({float(s['max_share']):.0%}) | {float(s['gini']):.3f} | {float(s['cv']):.3f} | "
                    f"{float(s['entropy']):.3f} |")
    rep.tables.append(f"### Allocation at the {rep.summary['allocation']['at']}\n\n" + "\n".join(rows))
    rep.figure(F.allocation_histogram(stats, step=-1) if x == "step" else
               F.allocation_histogram(stats.isel(train_step=-1).mean("t")), "histogram.png",
               "Tokens by number of experts, per sparse layer")
    rep.figure(F.heterogeneity(stats, "gini"), "heterogeneity.png",
               f"Gini coefficient of the allocation over (layer, {x.replace('_', ' ')})")
    if x == "step":
        fig6a = F.allocation_grid(ds, rep.sample, over="layer", step=-1)
        rep.figure(fig6a, "fig6a_layers.png", f"Sample {rep.sample}: experts per token in every sparse layer at the "
                   "last step (paper Fig. 6a)")
        rep.figure(F.allocation_grid(ds, rep.sample, over="step", layer=-1, use="x0" if "x0" in ds else "image"),
                   "fig6b_steps.png", f"Sample {rep.sample}: the last sparse layer over the denoising steps (paper "
                   "Fig. 6b)" + (", over each step's x0 estimate" if "x0" in ds else ""))
        if "settle" in got:
            settle = got["settle"]
            rep.summary["settling"] = {"threshold": settle.attrs["threshold"],
                                       "settle_step": {str(int(k)): int(v) for k, v in
                                                       zip(settle["layer"].values, settle["settle_step"].values,
                                                           strict=True)},
                                       "similarity_first_step": _by_layer(settle["similarity"].isel(step=0))}
            rep.figure(F.curves(settle["similarity"], "step", "similarity with the last step",
                                hline=settle.attrs["threshold"]), "settling.png",
                       "How fast each layer's allocation map settles: Spearman with the last step")
    else:
        rep.figure(F.curves(stats["gini"], "train_step", "Gini of the allocation"), "gini_over_training.png",
                   "Heterogeneity of the probe batch's allocation over training")
    if "agree" in got:
        agree = got["agree"]
        rep.summary["layer_agreement"] = {f"{a}-{b}": _num(agree.sel(layer=a, layer_b=b))
                                          for i, a in enumerate(agree["layer"].values)
                                          for b in agree["layer_b"].values[i + 1:]}


def _last_train_step(x):
    """A probe's statistic at its last train step (a trace's as it is)."""
    return x.isel(train_step=-1) if "train_step" in x.dims else x


def load_section(rep: Report) -> None:
    ds = rep.ds
    from ecviz.plots import figures as F

    summary = A.routing_pass(ds) if kind(ds) == "trace" else None  # one pass over dispatch for load and
    load = A.expert_load(ds, summary)  # co-selection (computed apart, each read every routing group)
    cosel = A.coselection(ds, summary=summary) if "tokens" in load else None
    load, cosel = dask.compute(load, cosel)
    last = _last_train_step(load)  # a probe: the trained model's load, not its history's (step 0 is untrained)
    s = {"imbalance_max": _num(last["imbalance"].max()), "imbalance_mean": _num(last["imbalance"].mean())}
    if "train_step" in load.dims:
        s["at"] = f"last train step ({int(load['train_step'].values[-1])})"
    if "full_capacity" in load:
        s["every_expert_took_C_per_group"] = bool(load["full_capacity"].all())
        if not s["every_expert_took_C_per_group"]:
            rep.notes.append("WARNING: an expert did not take exactly C tokens of some group: this trace breaks "
                             "expert choice's invariant")
    rep.summary["load"] = s
    if "tokens" in load:
        rep.figure(F.load_bars(load, "gate_mass"), "load.png",
                   "Each expert's share of its layer's gate mass, over every step and group")
        lift = cosel["lift"].values.copy()
        for m in lift:
            np.fill_diagonal(m, np.nan)
        rep.summary["coselection"] = {"max_lift": _num(np.nanmax(lift)), "min_lift": _num(np.nanmin(lift))}
        rep.figure(F.coselection_heatmap(cosel), "coselection.png",
                   "Expert co-selection: tokens both experts took, over what independent experts would share")
    if routing_kind(ds) == "tc":
        drops = A.token_choice_drops(ds)
        d = {"share": _num(_last_train_step(drops["share"]).mean())}
        if "train_step" in drops.dims:
            d["at"] = f"last train step ({int(drops['train_step'].values[-1])})"
        if "by_member" in drops:
            d["by_member"] = {str(int(m)): _num(drops["by_member"].sel(member=m).mean())
                              for m in drops["member"].values}
            tok = drops["by_token"].mean("layer").values
            half = len(tok) // 2
            d["first_half_tokens"], d["second_half_tokens"] = _num(tok[:half].mean()), _num(tok[half:].mean())
        rep.summary["token_choice_drops"] = d
    else:
        rep.na("token_choice_drops", "expert choice drops nothing: every expert takes exactly C tokens")


def text_section(rep: Report) -> None:
    ds = rep.ds
    from ecviz.plots import figures as F

    if kind(ds) != "trace" or "cross_attn" not in ds:
        rep.na("text_importance", "needs a trace recorded with --record cross_attn")
        return
    if "expert_count" not in ds:
        rep.na("text_importance", "no allocation to relate attention to (dense model, or no --record dispatch)")
        if "word_object" in ds:
            rep.summary["word_object_attention"] = word_object_summary(ds)
        return
    imp = A.text_importance(ds).compute()
    table = A.by_word(imp)
    if table.empty:
        rep.na("text_importance", "no word's attention was recorded above zero in the recorded sparse layers' "
               "blocks (all of it on [CLS]/[SEP])")
        return
    rep.summary["text_importance"] = {
        "top_words": {w: {"importance": _num(r.importance), "correlation": _num(r.correlation), "n": int(r.n)}
                      for w, r in table.head(10).iterrows()},
        "bottom_words": {w: {"importance": _num(r.importance), "n": int(r.n)} for w, r in table.tail(5).iterrows()},
    }
    if "category" in ds:
        cat = A.by_word(imp, ds, by="category")
        rep.summary["text_importance"]["by_category"] = {c: _num(r.importance) for c, r in cat.iterrows()}
    rep.figure(F.table_bars(table[table.n >= 2] if (table.n >= 2).any() else table), "words.png",
               "Words whose attended region gets the most compute (attention-weighted experts per token over the "
               "image mean)")
    rep.figure(F.word_bars(imp, rep.sample), "word_bars.png", f"Sample {rep.sample}: importance of each word")


def _last_ratio(r: xr.Dataset, x: str, names: tuple[str, str]) -> dict:
    """The summary of a region_ratio result (A.object_background, A.edge_interior) at its last step, per layer
    (of a probe: its counts averaged over the probe's timesteps before the ratio, `mean_over`)."""
    last = r.isel({x: -1})
    return {"at": f"last {x.replace('_', ' ')}", "images": r.attrs["n"], "clusters": r.attrs["clusters"],
            **{k: _by_layer(last[k]) for k in (*names, "ratio", "ratio_lo", "ratio_hi")}}


def shapes_section(rep: Report) -> None:
    ds = rep.ds
    from ecviz.plots import figures as F

    if kind(ds) == "probe":
        if "object_fraction" not in ds:
            rep.na("objects_vs_background", "the probe's data has no object masks")
            return
    elif "word_object" not in ds:
        rep.na("objects_vs_background", "ground truth needs Shapes captions as prompts (--prompts shapes)")
        return
    over = ("t",) if "t" in ds.dims else ()  # a probe: the ratio of t-averaged counts, as the app shows it
    ob = A.object_background(ds, mean_over=over)
    if ob.attrs["n"] == 0:
        rep.notes.append("objects vs background: no image has both object and background tokens")
    elif ob.attrs["clusters"] < 2:
        rep.notes.append("objects vs background: no interval, the images make one cluster (of prompts and routing "
                         "groups): the bootstrap needs two")
    x = "step" if "step" in ob.dims else "train_step"
    rep.summary["objects_vs_background"] = _last_ratio(ob, x, ("object", "background"))
    ei = A.edge_interior(ds.isel({x: slice(-1, None)}), mean_over=over)  # only its last step is reported
    rep.summary["edges_vs_interior"] = _last_ratio(ei, x, ("edge", "interior"))
    if ei.attrs["n"] == 0:
        rep.notes.append("object outlines vs insides: no image has objects with both")
    if ob.attrs["n"]:  # without one image, an empty plot
        rep.figure(F.curves(ob["ratio"], x, "experts/token: objects over background", ob["ratio_lo"],
                            ob["ratio_hi"], hline=1.0), "objects_vs_background.png",
                   "Experts per token on objects over background, with a 95% bootstrap interval "
                   + ("over images" if kind(ds) == "probe" else "resampling prompts and routing groups whole"))
    if kind(ds) == "trace":
        objects_draw_compute_section(rep)
    eo = A.expert_objects(ds) if kind(ds) == "trace" else None
    if eo is not None and not float(eo["object_tokens"]):
        rep.na("expert_objects", "no object tokens in the images")
    elif eo is not None:
        last = eo.isel(step=-1)
        rep.summary["expert_objects"] = {
            "at": "last step", "images": eo.attrs["n"], "clusters": eo.attrs["clusters"],
            "object_tokens": _num(eo["object_tokens"]),
            **{k: {str(int(b)): [_num(v) for v in last[k].sel(layer=b).values] for b in last["layer"].values}
               for k in ("object_coverage", "enrichment", "enrichment_lo", "enrichment_hi")}}
        rep.figure(F.expert_objects_bars(eo, step=-1), "expert_objects.png",
                   "Which experts take the objects at the last step: the share of each expert's tokens on objects "
                   "over a random choice's (1), with a 95% bootstrap interval; red: above 1"
                   + ("" if eo.attrs["clusters"] >= 2 else " (no interval here: the images make one cluster of "
                      "prompts and routing groups, so no bar is red)"))
        layers = ds["layer"].values
        shown = sorted({int(layers[0]), int(layers[len(layers) // 2]), int(layers[-1])})  # at most three panels
        regions = A.word_regions(ds)
        words = [A.expert_words(ds, step=-1, layer=b, regions=regions) for b in shown]
        rep.summary["expert_words"] = {
            "at": "last step", "n": {str(w): int(v) for w, v in zip(words[0]["word"].values, words[0]["n"].values,
                                                                     strict=True)},
            "coverage": {str(r.attrs["layer"]): {str(w): [_num(v) for v in r["coverage"].sel(word=w).values]
                                                 for w in r["word"].values} for r in words}}
        if words[0].sizes["word"]:
            rep.figure(F.expert_word_maps(words), "expert_words.png",
                       "Which experts take each caption word's object at the last step: the share of the object's "
                       "tokens each expert took, over the images where the object was found (words found twice or "
                       "more)")
    if kind(ds) == "trace" and "cross_attn" in ds:
        rep.summary["word_object_attention"] = word_object_summary(ds)


def word_object_summary(ds) -> dict:
    """How much more each caption word's cross-attention falls on its own object than elsewhere (the mean
    `lift` of `word_object_attention`), and the share of object words whose object was found in the image."""
    wa = A.word_object_attention(ds).compute()
    lift = wa["lift"].mean(["step", "block"])
    return {"lift_mean": _num(lift.mean()),
            "words_found_share": _num(np.isfinite(lift.values).sum() / max(1, int((ds["word_object"] != -1).sum())))}


def remove_stale_figures(out: Path, written: list[str]) -> None:
    """A report rewritten into its directory removes the figures its predecessor wrote (its summary.json's
    `figures`) and this one did not, so the directory holds one report; no other file is touched."""
    for name in report_figures(previous_report(out)) - set(written):
        (out / name).unlink(missing_ok=True)


def write_report(source, out, sample: int = 0) -> dict:
    """Write the report of a trace or training probe (a path or an opened Dataset) into directory `out`."""
    out = Path(out)
    ds = A.open_routing(source) if not isinstance(source, xr.Dataset) else source
    A.check_complete(ds)
    if kind(ds) == "trace" and not 0 <= sample < ds.sizes["sample"]:
        raise UsageError(f"--sample {sample}: the trace has samples 0..{ds.sizes['sample'] - 1}")
    source = source_path(ds.attrs.get("path"))
    check_out_dir(out, source)
    stage = temp_beside(out)  # figures are made here and moved in once every section succeeded: a report that
    stage.mkdir()  # fails midway leaves the one before it whole
    try:
        rep = Report(ds, stage, sample)
        rep.summary["record"] = describe(ds)
        rep.summary["source"] = source  # which report may rewrite this directory (check_out_dir)
        if "expert_count" not in ds:
            why = ("a dense model routes nothing" if routing_kind(ds) == "dense"
                   else "recorded without --record dispatch")
            for what in ("allocation", "load", "objects_vs_background", "objects_draw_compute"):
                rep.na(what, why)
        else:
            allocation_section(rep)
            load_section(rep)
            shapes_section(rep)
        text_section(rep)
        rep.summary["figures"] = [name for name, _ in rep.figures]
        remove_stale_figures(out, rep.summary["figures"])
        for name in rep.summary["figures"]:
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(rep.summary, indent=2) + "\n"))
    atomic_write(out / "summary.md", lambda tmp: Path(tmp).write_text(markdown(rep)))
    return rep.summary


def _f(x, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def _ratio_table(o: dict, title: str, first: str, second: str) -> list[str]:
    """Markdown lines of a region_ratio summary: per block, the two means and their ratio with its interval."""
    names = {"object": "objects", "background": "background", "edge": "outline", "interior": "inside"}
    groups = "" if o["clusters"] == o["images"] else f" in {o['clusters']} clusters of prompts and routing groups"
    lines = ["", f"### {title} ({o['at']}, {o['images']} images{groups})", "",
             f"| block | {names[first]} | {names[second]} | ratio (95% interval) |", "|---|---|---|---|"]
    for layer in o["ratio"]:
        lines.append(f"| {layer} | {_f(o[first][layer])} | {_f(o[second][layer])} | "
                     f"{_f(o['ratio'][layer])} ({_f(o['ratio_lo'][layer])}–{_f(o['ratio_hi'][layer])}) |")
    return lines


def _experts_table(o: dict) -> list[str]:
    """Markdown lines of the expert_objects summary: per block, the experts whose object share is above a random
    choice's (its interval above 1), most object-seeking first, with the share of all object tokens each took."""
    lines = ["", f"### Which experts take the objects ({o['at']}, {o['images']} images; object tokens are "
             f"{100 * o['object_tokens']:.0f}% of all)", "",
             "Experts whose tokens' object share is above a random choice's, its 95% interval above 1: the ratio "
             "(interval), and the share of all object tokens the expert took.", "",
             "| block | experts that seek objects | the others |", "|---|---|---|"]
    for layer, ratio in o["enrichment"].items():
        lo, hi, cover = o["enrichment_lo"][layer], o["enrichment_hi"][layer], o["object_coverage"][layer]
        seek = sorted((e for e, v in enumerate(lo) if v is not None and v > 1), key=lambda e: -ratio[e])
        rest = [e for e in range(len(ratio)) if e not in seek]
        text = "; ".join(f"{e}: {_f(ratio[e])} ({_f(lo[e])}–{_f(hi[e])}), {_f(100 * cover[e], '.0f')}%"
                         for e in seek) or ("none" if o["clusters"] >= 2 else "no interval (one cluster of prompts "
                                            "and routing groups)")
        known = [ratio[e] for e in rest if ratio[e] is not None]
        others = f"{len(rest)}, ratio {_f(min(known))}–{_f(max(known))}" if known else str(len(rest) or "")
        lines.append(f"| {layer} | {text} | {others} |")
    return lines


def objects_draw_compute_section(rep: Report) -> None:
    """Within routing groups of several images: does the image with more object area get more experts?"""
    from ecviz.plots import figures as F

    try:
        dc = A.objects_draw_compute(rep.ds)
    except TraceError as e:
        rep.na("objects_draw_compute", str(e).removeprefix("objects_draw_compute: "))
        return
    if not np.isfinite(dc["rho"].values).any():
        rep.na("objects_draw_compute", f"the {dc.attrs['n']} images in groups of two or more have the same object "
               "area as their partners, or the same experts per token")
        return
    last = dc.isel(step=-1)
    rep.summary["objects_draw_compute"] = {
        "at": f"last step ({int(last['step'])})", "images": dc.attrs["n"], "clusters": dc.attrs["clusters"],
        **{k: _by_layer(last[k]) for k in ("rho", "rho_lo", "rho_hi")}}
    if dc.attrs["clusters"] < 2:
        rep.notes.append("images that shared a routing group: no interval, the images make one cluster (of prompts "
                         "and routing groups): the bootstrap needs two")
    rep.figure(F.curves(dc["rho"], "step", "Spearman: compute vs object area", dc["rho_lo"],
                        dc["rho_hi"], hline=0.0), "objects_draw_compute.png",
               "Images that shared a routing group: Spearman correlation between an image's experts per token over "
               "its group's mean and its object area over its partners'"
               + (", with a 95% bootstrap interval resampling prompts and routing groups whole" if
                  dc.attrs["clusters"] >= 2 else " (no interval: one cluster of prompts and routing groups)")
               + (" (above 0: the image with more object draws compute from its partners)" if
                  routing_kind(rep.ds) == "ec" else " (token choice fixes no group mean: an image's excess is what "
                  "its own tokens' choices and drops gave it)"))


def markdown(rep: Report) -> str:
    info = rep.summary["record"]
    lines = [f"# Routing report: {info.get('path') or 'trace'}", ""]
    lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in info.items() if v not in (None, "", [])]
    lines.append("")
    if rep.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in rep.notes] + [""]
    lines += rep.tables
    s = rep.summary
    if "settling" in s:
        lines += ["", f"Steps after which each layer's map stays within Spearman {s['settling']['threshold']} of the "
                  f"last step's: " + ", ".join(f"block {k}: {v if v >= 0 else 'never before the last'}"
                                               for k, v in s["settling"]["settle_step"].items())]
    for key, title, first, second in (("objects_vs_background", "Objects over background", "object", "background"),
                                      ("edges_vs_interior", "Object outlines over their insides", "edge", "interior")):
        if key in s:
            lines += _ratio_table(s[key], title, first, second)
    if "objects_draw_compute" in s:
        d = s["objects_draw_compute"]
        lines += ["", f"### Images that shared a routing group ({d['images']} images, {d['at']})", "",
                  "Spearman correlation between an image's experts per token over its group's mean and its object "
                  "area over its partners' (above 0: more object, more compute), 95% interval resampling prompts "
                  "and routing groups whole:", "",
                  "| block | rho | interval |", "|---|---|---|"]
        lines += [f"| {b} | {_f(r, '+.2f')} | {_f(d['rho_lo'][b], '+.2f')} to {_f(d['rho_hi'][b], '+.2f')} |"
                  for b, r in d["rho"].items()]
    if "expert_objects" in s:
        lines += _experts_table(s["expert_objects"])
    if "text_importance" in s:
        lines += ["", "### Words that draw compute", "", "| word | importance | correlation | n |", "|---|---|---|---|"]
        for w, r in s["text_importance"]["top_words"].items():
            lines.append(f"| {w} | {_f(r['importance'], '.3f')} | {_f(r['correlation'], '.3f')} | {r['n']} |")
    lines += ["", "## Figures", ""]
    for name, caption in rep.figures:
        lines += [f"**{caption}**", "", f"![{caption}]({name})", ""]
    lines += ["All numbers: summary.json."]
    return "\n".join(lines) + "\n"
