"""The Streamlit app (app/main.py) on real traces of tiny checkpoints and the shipped training probes: every view
and control driven through streamlit.testing's AppTest, with the values each chart shows decoded from its plotly
spec and compared with ecviz.analysis on the same store, the pictures decoded and compared with the stored
pixels, every unusable store's message found in the page; and one end-to-end run of `streamlit run` photographed
in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import BROKEN, break_store, draw_shapes, make_checkpoint
from streamlit.testing.v1 import AppTest

import ecviz
from ecviz import analysis as A
from ecviz.plots import interactive as P
from ecviz.trace.run import TraceSettings, run_trace
from ecviz.trace.synthetic import write_synthetic_trace

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app" / "main.py"
PROMPTS = [("a red circle", "Simple", "Color"), ("a square left of a triangle", "Position", "Spatial"),
           ("three rings", "Counting", "Quantity"), ("an orange cross and a white diamond", "Simple", "Color")]
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """traces/: ec.zarr (newest; dispatch, cross_attn, x0; PartiPrompts-style TSV of Shapes captions, so
    category, challenge and word_object), tc.zarr (token choice, same prompts and seeds), plain.zarr (synthetic,
    dispatch only), dense.zarr (dense model); checkpoints/: the shipped EC and TC runs' routing probes."""
    root = tmp_path_factory.mktemp("app")
    tsv = root / "shapes.tsv"
    tsv.write_text("Prompt\tCategory\tChallenge\tNote\n" + "".join(f"{p}\t{c}\t{h}\t\n" for p, c, h in PROMPTS))
    one = root / "one.txt"
    one.write_text("a red circle\n")
    for kind, name, prompts in (("tc", "TC-tiny-4E", tsv), ("dense", "DENSE-tiny", one), ("ec", "EC-DiT-tiny-4E", tsv)):
        ck = make_checkpoint(root / "ck" / kind, name, depth=4)
        run_trace(TraceSettings(ckpt=ck, prompts=prompts, out=root / "traces" / f"{kind}.zarr", steps=3, guidance=3.0,
                                images_per_prompt=2, batch_size=4, progress=False,
                                record=("dispatch", "cross_attn", "x0") if kind != "dense" else ("cross_attn",)))
    for kind in ("ec", "tc"):
        draw_shapes(root / "traces" / f"{kind}.zarr")
    write_synthetic_trace(root / "traces" / "plain.zarr", samples=6, steps=3, layers=2, experts=4, grid=4,
                          group_size=32)
    old = 1_000_000_000
    for name in ("tc", "dense", "plain"):
        for p in (root / "traces" / f"{name}.zarr", root / "traces" / f"{name}.zarr" / "zarr.json"):
            os.utime(p, (old, old))
    (root / "checkpoints").mkdir()
    for name in ("ec-dit-shapes", "tc-shapes"):
        (root / "checkpoints" / name).symlink_to(ROOT / "checkpoints" / name)
    return root


@pytest.fixture(scope="module")
def ec(root):
    return ecviz.open_trace(root / "traces" / "ec.zarr").load()


def start(monkeypatch, *args, root: Path, query: dict | None = None) -> AppTest:
    """Run the app as `streamlit run app/main.py -- --root ROOT ARGS` would, once."""
    monkeypatch.setattr(sys, "argv", [str(APP), "--root", str(root), *map(str, args)])
    at = AppTest.from_file(str(APP), default_timeout=600)
    if query:
        at.query_params.update(query)
    return run(at)


def run(at: AppTest) -> AppTest:
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def charts(at: AppTest) -> dict[str, tuple[dict, dict]]:
    """Every plotly chart on the page by its key: (figure spec, chart config), decoded from the protos."""
    return {c.proto.id.rsplit("-", 1)[-1]: (json.loads(c.proto.spec), json.loads(c.proto.config))
            for c in at.get("plotly_chart")}


def values(v) -> np.ndarray:
    """A plotly JSON array: a list, or a typed array {dtype, bdata (base64), shape}."""
    if isinstance(v, dict) and "bdata" in v:
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        return a.reshape([int(s) for s in str(v["shape"]).split(",")]) if "shape" in v else a
    return np.asarray(v, dtype=float)


def z(at: AppTest, key: str, i: int = 0) -> np.ndarray:
    return values(charts(at)[key][0]["data"][i]["z"]).astype(float)


def picture(at: AppTest, key: str, i: int = 0, size: int = 16) -> np.ndarray:
    """The picture under a heatmap chart, downsampled back from its nearest-neighbour upscale."""
    big = P.decode_uri(charts(at)[key][0]["layout"]["images"][i]["source"])
    f = big.shape[0] // size
    assert np.array_equal(big, np.repeat(np.repeat(big[::f, ::f], f, 0), f, 1))  # blocks of equal pixels: no blur
    return big[::f, ::f]


def lines(at: AppTest, key: str) -> dict[str, np.ndarray]:
    """The y values of each named line (bands left out) of a lines chart."""
    return {d["name"]: values(d["y"]).astype(float) for d in charts(at)[key][0]["data"] if d.get("mode")}


# ---- picking a store ----------------------------------------------------------------------------------------
def test_the_app_opens_the_newest_trace_and_lists_every_trace_and_run(root, monkeypatch):
    at = start(monkeypatch, root=root)
    store = at.sidebar.selectbox(key="store")
    assert store.value == "traces/ec.zarr" and not errors(at)
    assert store.options == ["trace · traces/dense.zarr", "trace · traces/ec.zarr", "trace · traces/plain.zarr",
                             "trace · traces/tc.zarr", "run · checkpoints/ec-dit-shapes",
                             "run · checkpoints/tc-shapes"]
    at = start(monkeypatch, "--trace", root / "traces" / "tc.zarr", root=root)
    assert at.sidebar.selectbox(key="store").value == "traces/tc.zarr"
    outside = shutil.copytree(root / "traces" / "plain.zarr", root / "elsewhere" / "x.zarr")
    at = start(monkeypatch, "--trace", outside, root=root)
    assert at.sidebar.selectbox(key="store").value == str(outside) and "sample_heatmap" in charts(at)


# ---- Sample view ----------------------------------------------------------------------------------------------
def test_sample_view_shows_the_allocation_map_over_the_image_with_its_controls(root, ec, monkeypatch):
    at = start(monkeypatch, root=root)
    assert at.radio(key="view").value == "Sample"
    assert at.sidebar.selectbox(key="layer").value == "all" and at.sidebar.select_slider(key="step").value == 2
    assert np.allclose(z(at, "sample_heatmap"), A.heatmap(ec, 0, step=2, layer="all").values)
    assert np.array_equal(picture(at, "sample_heatmap"), ec.image.values[0])
    at.sidebar.selectbox(key="layer").set_value(3)
    at.sidebar.select_slider(key="step").set_value(0)
    run(at)
    assert np.allclose(z(at, "sample_heatmap"), A.heatmap(ec, 0, step=0, layer=3).values)
    at.sidebar.slider(key="opacity").set_value(0.3)
    at.sidebar.selectbox(key="cmap").set_value("Viridis")
    at.sidebar.radio(key="picture").set_value("x0")
    run(at)
    trace = charts(at)["sample_heatmap"][0]["data"][0]

    assert trace["opacity"] == 0.3 and trace["colorscale"] == P.theme_safe("Viridis")
    assert np.array_equal(picture(at, "sample_heatmap"), ec.x0.values[0, 0])  # the step's clean-image estimate
    at.sidebar.text_input(key="search").input("square")
    run(at)
    sample = at.sidebar.selectbox(key="sample")
    assert sample.options == ["2: a square left of a triangle (image 0)", "3: a square left of a triangle (image 1)"]
    sample.set_value(3)
    at.sidebar.select_slider(key="step").set_value("all")
    run(at)
    assert np.allclose(z(at, "sample_heatmap"), A.heatmap(ec, 3, step="all", layer=3).values)
    assert np.array_equal(picture(at, "sample_heatmap"), ec.image.values[3])  # no single step: the final image
    assert any("x0 is per step" in c.value for c in at.caption)


def word_values(at: AppTest) -> dict[int, float]:
    import re

    html = at.html[0].value
    return {int(w): float(v) for w, v in re.findall(r'data-word="(\d+)" data-importance="([^"]+)"', html)}


def test_words_are_coloured_by_importance_and_a_chosen_word_shows_its_attention(root, ec, monkeypatch):
    imp = A.text_importance(ec).compute()
    at = start(monkeypatch, root=root)
    shown = word_values(at)
    want = imp.importance.isel(sample=0).sel(step=2).mean("layer").values
    assert sorted(shown) == [0, 1, 2] and np.allclose([shown[i] for i in range(3)], want[:3], rtol=1e-5)
    assert at.pills(key="word").options == ["a", "red", "circle"] and "word_heatmap" not in charts(at)
    at.sidebar.selectbox(key="layer").set_value(1)
    at.sidebar.select_slider(key="step").set_value(1)
    at.pills(key="word").set_value(1)
    run(at)
    shown = word_values(at)
    assert np.allclose([shown[i] for i in range(3)], imp.importance.isel(sample=0).sel(step=1, layer=1).values[:3],
                       rtol=1e-5)
    assert np.allclose(z(at, "word_heatmap"), A.word_map(ec, 0, 1, step=1, layer=1).values, atol=1e-6)
    corr = float(imp.correlation.isel(sample=0, word=1).sel(step=1, layer=1))
    metric = {m.label: m.value for m in at.metric}
    assert metric["Spearman ρ"] == f"{corr:+.3f}"
    pieces = ec.text_word.values[0] == 1  # the word's text tokens; its share of block 1's attention at step 1
    share = ec.cross_attn.isel(sample=0).sel(step=1, block=1).values.astype(float)[:, pieces].sum(-1).mean()
    assert metric["attention"] == f"{share:.1%}"
    at.sidebar.selectbox(key="sample").set_value(4)  # "three rings": word 1 is "rings" now
    run(at)
    assert at.pills(key="word").value == 1 and "rings" in charts(at)["word_heatmap"][0]["layout"]["title"]["text"]
    at.sidebar.selectbox(key="sample").set_value(0)
    run(at)
    at.pills(key="word").set_value(2)
    run(at)
    at.sidebar.selectbox(key="sample").set_value(4)  # it has no third word: the choice is dropped
    run(at)
    assert at.pills(key="word").value is None and "word_heatmap" not in charts(at)


# ---- Grids ----------------------------------------------------------------------------------------------------
def test_grids_show_every_layer_at_a_step_and_every_step_of_a_layer(root, ec, monkeypatch):
    at = start(monkeypatch, root=root, query={"view": "Grids", "sample": "5", "layer": "3", "step": "1"})
    assert at.radio(key="view").value == "Grids"
    by_layer = A.heatmaps(ec, 5, over="layer", step=1)
    assert len(charts(at)["grid_layers"][0]["data"]) == 2
    for i in range(2):
        assert np.allclose(z(at, "grid_layers", i), by_layer.isel(layer=i).values)
        assert np.array_equal(picture(at, "grid_layers", i), ec.image.values[5])
    by_step = A.heatmaps(ec, 5, over="step", layer=3)
    at.sidebar.radio(key="picture").set_value("x0")
    run(at)
    for i in range(3):
        assert np.allclose(z(at, "grid_steps", i), by_step.isel(step=i).values)
        assert np.array_equal(picture(at, "grid_steps", i), ec.x0.values[5, i])  # each step over its own x0
    # every expert's tokens of the image at the step and layer: 0/1 maps that add up to its experts per token
    E = ec.sizes["expert"]
    per_expert = np.stack([z(at, "grid_experts", e) for e in range(E)])
    assert len(charts(at)["grid_experts"][0]["data"]) == E and set(np.unique(per_expert)) <= {0.0, 1.0}
    assert np.array_equal(per_expert, A.expert_maps(ec, 5, step=1, layer=3).taken.values)
    assert np.array_equal(per_expert.sum(0), A.heatmap(ec, 5, step=1, layer=3).values)
    assert np.array_equal(picture(at, "grid_experts", 0), ec.x0.values[5, 1])
    # with every layer chosen, one block's experts (the last): expert k of block 1 is not expert k of block 3, and
    # the grid averaged them
    at.sidebar.selectbox(key="layer").set_value("all")
    run(at)
    last = int(ec.layer.values[-1])
    per_expert = np.stack([z(at, "grid_experts", e) for e in range(E)])
    assert np.array_equal(per_expert, A.expert_maps(ec, 5, step=1, layer=last).taken.values)
    assert any("these are the last sparse block's experts" in c.value for c in at.caption)


# ---- Statistics -----------------------------------------------------------------------------------------------
def test_statistics_equal_the_analysis_of_the_filtered_trace(root, ec, monkeypatch):
    at = start(monkeypatch, root=root, query={"view": "Statistics", "layer": "3", "step": "2"})
    stats = A.allocation_stats(ec).compute()
    assert np.allclose(z(at, "stat_matrix"), stats.gini.transpose("layer", "step").values)
    load = A.expert_load(ec).compute()
    tokens = values(charts(at)["load_tokens"][0]["data"][0]["y"])
    gate = values(charts(at)["load_gate"][0]["data"][0]["y"])
    assert np.allclose(tokens, load.tokens.sel(step=2, layer=3).values)
    assert np.allclose(gate, load.gate_mass.sel(step=2, layer=3).values, rtol=1e-5)
    cosel = A.coselection(ec).compute()
    lift = cosel.lift.sel(layer=3).values.copy()
    np.fill_diagonal(lift, np.nan)  # each expert with itself: left blank
    assert np.allclose(z(at, "coselection"), lift, equal_nan=True) and np.isfinite(lift).sum() == 4 * 4 - 4
    ob = A.object_background(ec)
    assert ob.attrs["n"] > 0
    for layer in (1, 3):
        assert np.allclose(lines(at, "objects")[f"block {layer}"], ob.ratio.sel(layer=layer).values)
    ei = A.edge_interior(ec)
    assert ei.attrs["n"] > 0
    for layer in (1, 3):
        assert np.allclose(lines(at, "edges")[f"block {layer}"], ei.ratio.sel(layer=layer).values)
    dc = A.objects_draw_compute(ec)  # images that shared a routing group: here every image has the same square
    assert dc.attrs["n"] == 8 and not np.isfinite(dc.rho.values).any() and "partners" not in charts(at)
    assert any("The 8 images in groups of two or more have the same object area as their partners" in i.value
               for i in at.info)
    eo = A.expert_objects(ec).sel(step=2, layer=3)
    bars = charts(at)["expert_objects"][0]["data"][0]
    assert np.allclose(values(bars["y"]), eo.enrichment.values, equal_nan=True)
    hi = values(bars["error_y"]["array"])  # the bootstrap interval as error bars
    assert np.allclose(hi, np.nan_to_num(eo.enrichment_hi.values - eo.enrichment.values).clip(0))
    assert any(c.value.startswith(f"Object tokens are {float(eo.object_tokens):.0%}") for c in at.caption)
    ew = A.expert_words(ec, step=2, layer=3)
    cover = ew.coverage.sel(word=ew.n >= 2)
    assert cover.sizes["word"] >= 1  # the drawn squares are found as "a square left of a triangle"'s square
    assert np.allclose(z(at, "expert_words"), cover.values, equal_nan=True)
    assert charts(at)["expert_words"][0]["data"][0]["y"] == cover.word.values.tolist()
    assert any("Expert choice drops no token" in c.value for c in at.caption)
    every = start(monkeypatch, root=root, query={"view": "Statistics", "layer": "all", "step": "all"})
    last = A.expert_objects(ec).isel(step=-1)  # intervals are per step: every step shows the last, per block
    assert np.allclose(z(every, "expert_objects"), last.enrichment.transpose("layer", "expert").values,
                       equal_nan=True)
    assert any("The last step, as every step is chosen" in c.value for c in every.caption)
    at.selectbox(key="stat").set_value("skipped")
    at.multiselect(key="category").set_value(["Simple"])
    run(at)
    keep = A.filter_samples(ec, category=["Simple"])
    assert keep.tolist() == [0, 1, 6, 7] and any(c.value.startswith("4 of 8 images") for c in at.caption)
    sub = A.allocation_stats(A.subset(ec, keep)).compute()
    assert np.allclose(z(at, "stat_matrix"), sub.skipped.transpose("layer", "step").values)
    at.multiselect(key="challenge").set_value(["Spatial"])  # Simple and Spatial: no prompt is both
    run(at)
    assert any("no sample matches the filter" in e for e in errors(at))
    tc = ecviz.open_trace(root / "traces" / "tc.zarr")
    at = start(monkeypatch, "--trace", root / "traces" / "tc.zarr", root=root, query={"view": "Statistics"})
    drops = A.token_choice_drops(tc)
    for layer in (1, 3):
        assert np.allclose(lines(at, "drops")[f"block {layer}"], drops.share.sel(layer=layer).values)


def test_images_of_one_routing_group_are_set_against_each_other(root, monkeypatch, tmp_path):
    """Statistics: among images that shared a routing group, the chart of Spearman's rho between an image's
    experts per token over its group's mean and its object area over its partners' is objects_draw_compute's,
    its caption says whose mean expert choice fixes and what the band resamples."""
    ec = shutil.copytree(root / "traces" / "ec.zarr", tmp_path / "traces" / "ec.zarr")
    image = zarr.open_group(str(ec), mode="r+")["image"]
    pixels = image[...]
    for i in range(len(pixels)):  # squares of other sizes: the images of a group differ in object area
        pixels[i, : 2 + 2 * i, : 2 + 2 * i] = (40, 220, 60)
    image[...] = pixels
    at = start(monkeypatch, "--trace", ec, root=tmp_path, query={"view": "Statistics"})
    dc = A.objects_draw_compute(ecviz.open_trace(ec))
    assert np.isfinite(dc.rho.values).all() and dc.attrs["clusters"] >= 2
    for layer in (1, 3):
        assert np.allclose(lines(at, "partners")[f"block {layer}"], dc.rho.sel(layer=layer).values)
    assert any(c.value.startswith(f"{dc.attrs['n']} images in groups of two or more") and "Expert choice fixes "
               "only the group's mean" in c.value and "resampling prompts and routing groups whole" in c.value
               for c in at.caption), [c.value for c in at.caption]


def test_statistics_of_a_large_trace_default_to_evenly_spaced_images(root, monkeypatch, tmp_path):
    big = write_synthetic_trace(tmp_path / "big.zarr", samples=520, steps=2, layers=1, experts=4, grid=2,
                                group_size=8, batch=104, image_size=4, text_len=4)
    at = start(monkeypatch, "--trace", big, root=root, query={"view": "Statistics"})
    assert at.selectbox(key="stat_images").value == 64 and at.selectbox(key="stat_images").options == \
        ["64 images, evenly spaced", "256 images, evenly spaced", "every image"]
    assert any(c.value.startswith("64 of 520 images") for c in at.caption)
    ds = ecviz.open_trace(big)
    groups = A.sample_groups(ds).group.isel(branch=0).values
    keep = A.spaced(np.arange(520), 64, by=groups)  # whole routing groups (of two images here), evenly spaced
    assert len(keep) == 64 and all(np.isin(np.flatnonzero(groups == g), keep).all() for g in groups[keep])
    want = A.allocation_stats(A.subset(ds, keep)).compute()
    assert np.allclose(z(at, "stat_matrix"), want.gini.transpose("layer", "step").values)
    assert not np.allclose(want.gini.values, A.allocation_stats(ds).gini.values)  # a subset, not everything
    # the default follows the store: a small trace reads every image, and coming back the big one 64 again
    at.selectbox(key="store").set_value("traces/ec.zarr")
    run(at)
    assert at.selectbox(key="stat_images").value == "all"
    at.selectbox(key="store").set_value(str(big))
    run(at)
    assert at.selectbox(key="stat_images").value == 64


# ---- Compare --------------------------------------------------------------------------------------------------
def test_compare_shows_two_traces_of_the_same_prompt_and_seed_and_their_difference(root, ec, monkeypatch):
    at = start(monkeypatch, root=root, query={"view": "Compare", "sample": "3", "layer": "1", "step": "2"})
    assert at.selectbox(key="compare").value == "traces/tc.zarr"  # the trace that pairs up with this one
    tc = ecviz.open_trace(root / "traces" / "tc.zarr")
    twin = A.matching_sample(ec, 3, tc)
    assert twin == 3 and str(tc.prompt.values[3]) == str(ec.prompt.values[3]) and tc.seed[3] == ec.seed[3]
    a, b = A.heatmap(ec, 3, step=2, layer=1).values, A.heatmap(tc, twin, step=2, layer=1).values
    assert np.allclose(z(at, "compare_a"), a) and np.allclose(z(at, "compare_b"), b)
    assert np.allclose(z(at, "compare_difference"), a - b)
    assert np.array_equal(picture(at, "compare_b"), tc.image.values[3])
    # the three titles sit above the charts, where plotly's toolbar cannot cover them
    for k in ("a", "b", "difference"):  # and a band above each plot keeps the toolbar off the colour bar's label
        layout = charts(at)[f"compare_{k}"][0]["layout"]
        assert not layout.get("title") and layout["margin"]["t"] >= 30
    titles = [m.value for m in at.markdown]
    assert {"**A**: ec.zarr (ec), sample 3", "**B**: tc.zarr (tc), sample 3", "**A − B**"} <= set(titles)
    # only traces that pair are offered: not the dense one (no routing) nor the synthetic one (other prompts)
    assert at.selectbox(key="compare").options == ["traces/tc.zarr"]
    assert any("Other traces not listed: 2 that do not pair with this one (other prompts, seed or images per "
               "prompt, or no routing)." == c.value for c in at.caption), [c.value for c in at.caption]
    # picking B's trace in the sidebar: B defaults anew, never to the trace itself (it compared tc with tc)
    at.sidebar.selectbox(key="store").set_value("traces/tc.zarr")
    run(at)
    assert at.selectbox(key="compare").value == "traces/ec.zarr"
    assert "traces/tc.zarr" not in at.selectbox(key="compare").options
    # a link carries its trace: a new session opens the one shown, not the newest
    assert at.query_params["store"] in (["traces/tc.zarr"], "traces/tc.zarr")
    again = start(monkeypatch, root=root, query={"store": "traces/tc.zarr", "view": "Sample", "sample": "2"})
    assert again.sidebar.selectbox(key="store").value == "traces/tc.zarr"
    tc_map = A.heatmap(tc, 2, step=int(tc.step[-1]), layer="all").values
    assert np.allclose(z(again, "sample_heatmap"), tc_map)


def test_compare_with_an_unfinished_trace_says_the_image_is_not_done_yet(root, monkeypatch, tmp_path):
    """B's twin of the sample shown is not done yet: said so (it read "no image with this prompt and seed;
    compare traces of the same prompt file and seed", which they were)."""
    for name in ("ec", "tc"):
        shutil.copytree(root / "traces" / f"{name}.zarr", tmp_path / "traces" / f"{name}.zarr")
    g = zarr.open_group(str(tmp_path / "traces" / "tc.zarr"), mode="r+")
    g["done"][4:] = False
    g.attrs["complete"] = False
    at = start(monkeypatch, "--trace", tmp_path / "traces" / "ec.zarr", root=tmp_path,
               query={"view": "Compare", "sample": "5"})
    at.selectbox(key="compare").set_value("traces/tc.zarr")
    run(at)
    assert any("traces/tc.zarr has not done this image yet (4 of 8 samples done" in w.value
               for w in at.warning), [w.value for w in at.warning]
    # a store that cannot be opened is not listed, and the page says so (it was counted as not pairing)
    break_store(tmp_path / "traces" / "tc.zarr", tmp_path / "traces" / "bad.zarr", "json")
    at = start(monkeypatch, "--trace", tmp_path / "traces" / "ec.zarr", root=tmp_path, query={"view": "Compare"})
    assert at.selectbox(key="compare").options == ["traces/tc.zarr"]
    assert any(c.value == "Other traces not listed: traces/bad.zarr, which cannot be opened (pick it in the sidebar "
               "to see why)." for c in at.caption), [c.value for c in at.caption]


# ---- Training -------------------------------------------------------------------------------------------------
def test_training_view_shows_the_probe_at_a_train_step_and_statistics_along_training(root, monkeypatch):
    at = start(monkeypatch, root=root)
    at.sidebar.selectbox(key="store").set_value("checkpoints/ec-dit-shapes")
    run(at)
    assert at.radio(key="view").value == "Training"  # picking a run shows it
    probe = A.open_store(root / "checkpoints" / "ec-dit-shapes")
    last = int(probe.train_step[-1])
    assert np.allclose(z(at, "train_heatmap"), A.heatmap(probe, 0, train_step=last, t="all", layer="all").values)
    assert np.array_equal(picture(at, "train_heatmap", size=32), probe.image.values[0])
    at.select_slider(key="train_step").set_value(3000)
    at.selectbox(key="t").set_value(0.5)
    at.selectbox(key="train_layer").set_value(3)
    at.selectbox(key="probe_image").set_value(2)
    run(at)
    assert np.allclose(z(at, "train_heatmap"), A.heatmap(probe, 2, train_step=3000, t=0.5, layer=3).values)
    grid = A.heatmaps(probe, 2, over="layer", train_step=3000, t=0.5)
    assert all(np.allclose(z(at, "train_grid", i), grid.isel(layer=i).values) for i in range(3))
    stats = A.allocation_stats(probe).compute()
    ob = A.object_background(probe)
    for layer in (1, 3, 5):
        assert np.allclose(lines(at, "train_stat_chart")[f"block {layer}"], stats.gini.sel(t=0.5, layer=layer))
        assert np.allclose(lines(at, "train_objects")[f"block {layer}"], ob.ratio.sel(t=0.5, layer=layer))
    assert "train_drops" not in charts(at)
    assert any("load imbalance is 1 by construction" in c.value for c in at.caption)  # flat lines, said why
    at.sidebar.selectbox(key="store").set_value("checkpoints/tc-shapes")  # the run picked in the sidebar
    run(at)
    assert not any("1 by construction" in c.value for c in at.caption)
    assert at.selectbox(key="run").value == "checkpoints/tc-shapes"  # (it stayed on the first run picked)
    tc = A.open_store(root / "checkpoints" / "tc-shapes")
    for layer in (1, 3, 5):
        assert np.allclose(lines(at, "train_drops")[f"block {layer}"], tc.tc_drop_rate.sel(t=0.5, layer=layer))


# ---- state, URL, hover, download ----------------------------------------------------------------------------
def test_sample_layer_and_step_survive_switching_views_and_every_chart_hovers_and_downloads_png(root, monkeypatch):
    at = start(monkeypatch, root=root)
    at.sidebar.selectbox(key="sample").set_value(5)
    at.sidebar.selectbox(key="layer").set_value(3)
    at.sidebar.select_slider(key="step").set_value(1)
    at.sidebar.slider(key="opacity").set_value(0.45)
    run(at)
    seen = {}
    for view in ("Grids", "Statistics", "Compare", "Training", "Sample"):
        at.radio(key="view").set_value(view)
        run(at)
        assert not errors(at), (view, errors(at))
        seen.update(charts(at))
        if view != "Training":
            assert (at.sidebar.selectbox(key="sample").value, at.sidebar.selectbox(key="layer").value,
                    at.sidebar.select_slider(key="step").value, at.sidebar.slider(key="opacity").value) == \
                (5, 3, 1, 0.45)
    url = {k: v[0] if isinstance(v, list) else v for k, v in at.query_params.items()}
    assert url == {"store": "traces/ec.zarr", "view": "Sample", "sample": "5", "layer": "3", "step": "1",
                   "opacity": "0.45"}
    assert len(seen) >= 14
    placeholder = re.compile(r"#0000([0-3][0-9a-f]|40)\b", re.IGNORECASE)  # streamlit paints these its theme's way
    for key, (spec, config) in seen.items():
        assert config["toImageButtonOptions"]["format"] == "png" and config.get("displayModeBar", True), key
        text = json.dumps(spec["data"])  # Magma's black, #000004, was drawn bright violet (the layout's template
        # is streamlit's theme, its placeholders meant)
        assert not (m := placeholder.search(text)), (key, text[max(0, m.start() - 150):m.end()])
        for trace in spec["data"]:
            assert trace.get("hoverinfo") == "skip" or "hovertemplate" in trace or trace["type"] == "scatter", key


# ---- bad input ----------------------------------------------------------------------------------------------
def test_an_unfinished_trace_shows_its_done_samples_and_who_is_writing_the_rest(root, monkeypatch, tmp_path):
    """A trace cut short (or still being written) opens with its done samples, and a line saying how many of
    how many and what to do: rerun the command, or, while a live process holds the store's lock, reload."""
    part = break_store(root / "traces" / "plain.zarr", tmp_path / "part.zarr", "unfinished")  # 3 of 6 done
    at = start(monkeypatch, "--trace", part, root=root)
    assert not errors(at)
    assert any("3 of 6 samples done, shown here (its writer stopped; rerun the same ecviz trace command" in i.value
               for i in at.info), [i.value for i in at.info]
    assert len(at.sidebar.selectbox(key="sample").options) == 3  # the done ones
    assert len(charts(at)) >= 1  # the first done sample's map
    # done out of order (under --nproc 2 one process runs ahead): samples keep their store numbers, in the picker,
    # on the page and in the URL, and show their own prompt, so a link names the same image once the rest is done
    zarr.open_group(str(part), mode="r+")["done"][:] = [True, False] * 3
    store_prompts = A.prompts(ecviz.open_trace(part))
    at = start(monkeypatch, "--trace", part, root=root, query={"sample": "4"})
    assert not errors(at)
    picker = at.sidebar.selectbox(key="sample")
    assert [int(o.split(":")[0]) for o in picker.options] == [0, 2, 4] and picker.value == 4
    assert any(m.value.startswith("**Sample 4**") for m in at.markdown), [m.value for m in at.markdown]
    assert any(m.value == f"> {store_prompts[4]}" for m in at.markdown), [m.value for m in at.markdown]
    assert at.query_params["sample"] in (["4"], "4")
    code = ("import sys, time; from ecviz.lock import writing\n"
            "with writing(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(part)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        at = start(monkeypatch, "--trace", part, root=root)
        assert any(f"3 of 6 samples done, shown here (being written by pid {holder.pid} on " in i.value and
                   "reload to see more" in i.value for i in at.info), [i.value for i in at.info]
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("how", [h for h in BROKEN if h != "unfinished"])
def test_an_unusable_store_shows_what_to_do_in_the_page(root, monkeypatch, tmp_path, how):
    bad = break_store(root / "traces" / "plain.zarr", tmp_path / "bad.zarr", how)
    at = start(monkeypatch, "--trace", bad, root=root)
    want = BROKEN[how].replace("10 samples", "6 samples").replace("3 of", "3 of")
    assert any(want in e for e in errors(at)), errors(at)
    assert at.sidebar.selectbox(key="store").value == str(bad)  # the picker stays, to pick another


def test_missing_stores_and_missing_variables_show_what_to_do_in_the_page(root, monkeypatch, tmp_path):
    at = start(monkeypatch, "--trace", tmp_path / "nope.zarr", root=root)
    assert any("nope.zarr: not found; write one with ecviz trace (./run.sh demo" in e for e in errors(at))
    at = start(monkeypatch, root=tmp_path)  # nothing under traces/, runs/, checkpoints/
    assert any(e.startswith("No trace under") and "run ./run.sh demo" in e for e in errors(at))
    at = start(monkeypatch, "--trce", root / "traces" / "plain.zarr", root=root)  # a typo opened the newest trace
    assert errors(at) == ["unknown arguments after `--`: --trce " + str(root / "traces" / "plain.zarr")
                          + "; use --trace PATH and --root DIR"]
    at = start(monkeypatch, "--trace", root / "traces" / "plain.zarr", root=root)
    assert any("word importance and attention needs `cross_attn`, which it lacks: record it with ecviz trace "
               "--record cross_attn" in i.value for i in at.info)
    assert any("record them with ecviz trace --record x0" in c.value for c in at.sidebar.caption)
    at = start(monkeypatch, "--trace", root / "traces" / "dense.zarr", root=root)
    assert errors(at) == [f"{root / 'traces' / 'dense.zarr'}: an allocation map needs `expert_count`, which it "
                          "lacks: a dense model has no routing"]  # once (text importance said it again)
    assert len(at.get("image")) == 1  # the generated image is still shown (it was not: the map failed first)
    # its words' cross-attention is still there, unscored, averaged over every block (it was an error)
    assert at.pills(key="word").options == ["a", "red", "circle"]
    assert 'data-word="2"' in at.html[0].value and "data-importance" not in at.html[0].value
    at.pills(key="word").set_value(2)
    run(at)
    dense = ecviz.open_trace(root / "traces" / "dense.zarr")
    want = A.word_map(dense, 0, 2, step=int(dense.step[-1]), layer="all")
    assert want.attrs["blocks"] == [0, 1, 2, 3] and np.allclose(z(at, "word_heatmap"), want.values, atol=1e-6)
    assert "circle" in charts(at)["word_heatmap"][0]["layout"]["title"]["text"] and not at.metric
    assert any("averaged over every block, 0, 1, 2, 3: a dense model has no sparse layers" in c.value
               for c in at.caption)
    for view in ("Grids", "Statistics", "Compare"):
        at.radio(key="view").set_value(view)
        run(at)
        assert any("a dense model has no routing" in e for e in errors(at)), view
        assert all("a dense model has no routing" in e for e in errors(at)), errors(at)  # no other failure
        assert len(errors(at)) == 1, errors(at)  # once for the view, not once a section (seven in Statistics)
    # a chunk damaged past the first sample is found when that sample is shown
    late = shutil.copytree(root / "traces" / "plain.zarr", tmp_path / "late.zarr")
    shard = sorted(f for f in (late / "expert_count" / "c").rglob("*") if f.is_file())[-1]
    shard.write_bytes(shard.read_bytes()[:40])
    at = start(monkeypatch, "--trace", late, root=root)
    at.sidebar.selectbox(key="sample").set_value(5)
    run(at)
    assert any("the store is damaged: sample" in e and "rerun ecviz trace with the same arguments" in e
               for e in errors(at)), errors(at)


def test_a_probe_that_has_not_reached_its_first_row_says_so(root, monkeypatch, tmp_path):
    run_dir = shutil.copytree(ROOT / "checkpoints" / "ec-dit-shapes" / "routing.zarr",
                              tmp_path / "runs" / "new" / "routing.zarr")
    zarr.open_group(str(run_dir), mode="r+").attrs["rows"] = 0
    at = start(monkeypatch, "--trace", run_dir.parent, root=tmp_path)
    assert at.radio(key="view").value == "Training"
    assert any("the training probe has no rows yet" in e for e in errors(at))
    # a damaged probe: one line with the training's remedy, not a trace's (nor "a bug in ecviz" for a lost array)
    for damage, says in (("rows", "attribute `rows` is -1, not an integer in 0..10"),
                         ("caption", "lacks `caption`"), ("chunk", "cannot read `image`, the store is damaged")):
        bad = shutil.copytree(run_dir, tmp_path / "runs" / damage / "routing.zarr")
        if damage == "rows":
            zarr.open_group(str(bad), mode="r+").attrs["rows"] = -1
        elif damage == "caption":
            shutil.rmtree(bad / "caption")
        else:
            zarr.open_group(str(bad), mode="r+").attrs["rows"] = 10
            chunk = next(f for f in sorted((bad / "image" / "c").rglob("*")) if f.is_file())
            chunk.write_bytes(chunk.read_bytes()[:40])
        at = start(monkeypatch, "--trace", bad.parent, root=tmp_path)
        assert any(says in e and "written by ecviz train: move it away" in e for e in errors(at)), errors(at)
        assert not any("ecviz trace" in e or "a bug in ecviz" in e for e in errors(at)), errors(at)


def test_a_link_to_what_the_store_does_not_hold_says_so(root, monkeypatch, tmp_path):
    """A link (URL) asking for a sample, layer, step or store the page does not offer, or an opacity outside
    0..1, shows the page's default with a line saying what was asked (it was replaced without a word; opacity=nan
    hid the map); a --trace path that does not resolve (a symlink loop) is a line, not a traceback."""
    query = {"sample": "999999", "layer": "99", "step": "abc", "opacity": "nan", "store": "traces/gone.zarr",
             "word": "9"}
    at = start(monkeypatch, root=root, query=query)
    notes = [w.value for w in at.warning]
    for says in ("sample=999999 is not offered here; showing 0", "layer=99 is not offered here; showing all",
                 "word=9 is not offered here (this prompt has 3 words, from 0); showing none",
                 "step=abc is not a whole number; ignored", "opacity=nan is not a number in 0..1; ignored",
                 "store=traces/gone.zarr is not offered here; showing traces/"):
        assert any(f"This page's link: {says}" in n for n in notes), (says, notes)
    assert at.sidebar.slider(key="opacity").value == 0.6 and len(charts(at)) >= 1
    run(at)  # a rerun does not say it again
    assert not any("This page's link" in w.value for w in at.warning)
    loop = tmp_path / "loop.zarr"
    loop.symlink_to(loop)
    at = start(monkeypatch, "--trace", loop, root=root)
    assert any("loop.zarr" in e for e in errors(at)), errors(at)


# ---- end to end -----------------------------------------------------------------------------------------------
def test_streamlit_run_shows_the_image_and_the_chart_in_chromium(root, tmp_path):
    from PIL import Image

    from ecviz.browser import READY_JS, chromium, find_chromium, screenshot, serve_app

    exe = find_chromium(install=True)
    if exe is None:
        pytest.skip("chromium is missing and could not be installed (apt-get install -y chromium needs root and "
                    "the Debian package mirrors)")
    with serve_app(APP, "--root", str(root), "--trace", str(root / "traces" / "ec.zarr"), cwd=ROOT) as url, \
            chromium(exe) as port:
        png = screenshot(port, url + "/?sample=1&step=all&opacity=0.25", 1400, 1000, READY_JS.format(n=1), timeout=300)
    (tmp_path / "app.png").write_bytes(png)
    if keep := os.environ.get("ECVIZ_APP_SHOT"):  # where to keep the screenshot, to look at it
        shutil.copy(tmp_path / "app.png", keep)
    px = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    r, g, b = px[..., 0], px[..., 1], px[..., 2]
    # the picture: a green square, seen through the 25%-opaque heatmap, turns pixels green-dominant; the page
    # itself has no green
    tinted = (g > r + 25) & (g > b + 25)
    assert tinted.sum() > 5000, tinted.sum()
    ys, xs = np.nonzero(tinted)
    assert np.ptp(ys) > 100 and np.ptp(xs) > 100  # a square of it, not a stray line
    # the chart: heatmap cells and the colour bar in Magma colours (dark purples, reds) that the page lacks
    magma = (r > g + 40) & (b > g + 20)
    assert magma.sum() > 2000, magma.sum()
    assert len({tuple(c) for c in px[magma][:: 7]}) > 30  # a colour scale, not one flat colour


def test_a_word_without_attention_shows_no_score_and_says_why(root, tmp_path, monkeypatch):
    """A word whose attention map is zero (a model that parks its attention on [CLS]) has no importance or
    correlation: the metrics read n/a with the reason, not nan."""
    alone = tmp_path / "traces" / "ec.zarr"
    shutil.copytree(root / "traces" / "ec.zarr", alone)
    store = zarr.open_group(str(alone), mode="r+")
    tokens = np.flatnonzero(store["text_word"][0] == 1)  # the text tokens of sample 0's word 1, "red"
    attn = store["cross_attn"][0]
    attn[..., tokens] = 0
    store["cross_attn"][0] = attn
    at = start(monkeypatch, root=tmp_path, query={"sample": "0", "word": "1"})
    metric = {m.label: m.value for m in at.metric}
    assert metric["Spearman ρ"] == "n/a"
    assert metric["importance"] == "n/a"
    assert any("gets no attention here" in c.value for c in at.caption)


def test_chart_colour_scales_say_what_the_values_are():
    """A band is drawn in its own line's colour (it took the next one of plotly's cycle) and a block keeps its
    colour from chart to chart; a ratio's scale (lift, enrichment) starts at 0 with white at 1 (plotly centred it
    and drew -1); a flat attention map gets a range above 0 (plotly drew -0.5..0.5 around it)."""
    import plotly.colors
    import xarray as xr

    steps, layers = np.arange(4), [1, 3, 5]
    da = xr.DataArray(np.random.default_rng(0).random((4, 3)), {"step": steps, "layer": layers}, ("step", "layer"))
    fig = P.lines_figure(da, "step", lo=da - 0.1, hi=da + 0.1)
    lines, bands = fig.data[0::2], fig.data[1::2]
    for line, band in zip(lines, bands, strict=True):
        r, g, b = plotly.colors.hex_to_rgb(line.line.color)
        assert band.fillcolor.startswith(f"rgba({r},{g},{b},")
    again = P.lines_figure(da.sel(layer=[3, 5]), "step")
    assert [t.line.color for t in again.data] == [t.line.color for t in lines[1:]]

    lift = xr.DataArray(np.array([[np.nan, 0.2, 3.0], [0.2, np.nan, 1.0], [3.0, 1.0, np.nan]]),
                        {"expert": [0, 1, 2], "expert_b": [0, 1, 2]}, ("expert", "expert_b"))
    heat = P.matrix_figure(lift, x="expert_b", y="expert", colorscale="RdBu_r", diagonal=False, zmid=1.0,
                           zrange=(0.0, 2.0)).data[0]
    assert heat.zmin == 0 and heat.zmax == 3.0 and heat.zmid is None
    centre = dict(plotly.colors.get_colorscale("RdBu_r"))[0.5]  # the diverging scale's white
    assert [c for p, c in heat.colorscale if abs(p - 1 / 3) < 1e-9] == [centre]  # lift 1 of the range 0..3
    assert heat.colorscale[0][0] == 0 and heat.colorscale[-1][0] == 1

    for name in ("Magma_r", "Inferno"):  # their black, #000004, is a streamlit theme placeholder: drawn violet
        scale = P.heatmap_figure(np.eye(4), colorscale=name).data[0].colorscale
        assert [p for p, _ in scale] == [p for p, _ in plotly.colors.get_colorscale(name)]
        assert all(c.startswith("rgb(") for _, c in scale) and "rgb(0, 0, 4)" in {c for _, c in scale}, name
    flat = P.heatmap_figure(np.zeros((4, 4)), label="attention").data[0]
    assert flat.zmin == 0 and flat.zmax > 0
    assert P.bars_figure(range(8), np.ones(8)).layout.xaxis.type == "category"  # "0".."7" read as numbers: 0, 2, 4, 6
