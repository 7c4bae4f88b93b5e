"""What the app asks of ecviz.analysis and ecviz.plots.interactive, against plain loops on synthetic traces: one
sample's words and attention maps, prompt search, category filters and trace subsets, matching samples across
traces, finding stores and opening them with every way a store can be unusable, and the figure pieces."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest
import zarr
from helpers import BROKEN, break_store
from scipy.stats import spearmanr

import ecviz
from ecviz import analysis as A
from ecviz.errors import DamagedTraceError, TraceError
from ecviz.plots import interactive as P
from ecviz.trace.synthetic import write_synthetic_trace

PROMPTS = ["a red circle", "two blue squares left of a ring", "a cat on a mat", "three red rings"]
CATEGORIES = ["Simple", "Position", "Animals"]


@pytest.fixture(scope="module")
def syn_path(tmp_path_factory):
    return write_synthetic_trace(tmp_path_factory.mktemp("ex") / "traces" / "words.zarr", samples=10, steps=3,
                                 layers=2, experts=4, grid=4, group_size=32, record=("dispatch", "cross_attn", "x0"),
                                 prompts=PROMPTS, categories=CATEGORIES, text_len=8, seed=3)


@pytest.fixture(scope="module")
def syn(syn_path):
    return ecviz.open_trace(syn_path).load()


def test_attention_on_words_is_their_share_of_the_attention_and_their_empty_maps(syn):
    """What text importance rests on, per block, recomputed here piece by piece: the words' share of every image
    token's attention (the rest goes to special tokens), and the share of word maps with no attention at all."""
    ds = syn.copy(deep=True)
    tw = ds.text_word.values  # (sample, text): word of each piece, -1 special or padding
    attn = ds.cross_attn.values.copy()  # (sample, step, block, token, text)
    attn[0, :, 0][..., tw[0] == 0] = 0  # sample 0's first word gets nothing in block 0: empty maps
    ds["cross_attn"] = (ds.cross_attn.dims, attn)
    got = A.attention_on_words(ds)
    a = attn.astype(np.float64)
    for b, block in enumerate(ds.block.values):
        on_words = [a[s, :, b][..., tw[s] >= 0].sum(-1).mean() for s in range(a.shape[0])]  # over steps, tokens
        assert float(got.share.sel(block=block)) == pytest.approx(np.mean(on_words), rel=1e-4)
        maps = [(a[s, t, b][:, tw[s] == w].sum() <= 0) for s in range(a.shape[0]) for t in range(a.shape[1])
                for w in range(ds.sizes["word"]) if ds.prompt_word.values[s, w] != ""]
        assert float(got.empty.sel(block=block)) == pytest.approx(np.mean(maps))
    assert float(got.empty.isel(block=0)) > float(got.empty.isel(block=1))  # (words cut by text_len: empty too)


def test_word_maps_draws_the_allocation_then_each_words_map_titled_with_its_share(syn):
    """The DAAM-style figure: one panel of experts per token, then one per caption word, each its word_map over
    the picture (on its own scale) and titled with the word's share of the attention; a word with none says so."""
    import matplotlib

    matplotlib.use("Agg")
    from ecviz.plots import figures as F

    ds = syn.copy(deep=True)
    sample = 1  # "two blue squares left of a ring"
    words = [str(w) for w in ds.prompt_word.values[sample] if w]
    attn = ds.cross_attn.values.copy()
    attn[sample][..., ds.text_word.values[sample] == 1] = 0  # "blue": no attention anywhere
    ds["cross_attn"] = (ds.cross_attn.dims, attn)
    fig = F.word_maps(ds, sample)
    axes = [ax for ax in fig.axes if ax.get_title(loc="left")]
    assert [ax.get_title(loc="left").split(" · ")[0] for ax in axes] == ["experts per token", *words]
    for k, ax in enumerate(axes[1:]):
        m = A.word_map(ds, sample, k, step="all", layer="all")
        share = ax.get_title(loc="left").split(" · ")[1]
        empty = float(m.max()) == 0  # "blue", and "ring", past the synthetic trace's 8 text tokens
        assert share == ("no attention" if empty else f"{100 * m.attrs['share']:.2g}%"), (k, share)
        assert empty == (k in (1, 6)) and (empty or np.allclose(ax.images[-1].get_array(), m.values))
    assert np.allclose(axes[0].images[-1].get_array(), A.heatmap(ds, sample, step="all", layer="all").values)


def word_map_loop(ds, s, w, step, block):
    """The attention of word w of sample s: its text pieces' columns summed, at one step and block."""
    attn = ds.cross_attn.values.astype(np.float64)[s, list(ds.step.values).index(step), block]  # (token, text)
    return attn[:, ds.text_word.values[s] == w].sum(1).reshape(4, 4)


def test_word_map_sums_a_words_pieces_of_its_layers_own_block(syn):
    for s, w in ((1, 2), (3, 0)):
        for layer in (1, 3):
            got = A.word_map(syn, s, w, step=1, layer=layer)
            assert np.allclose(got.values, word_map_loop(syn, s, w, 1, layer), atol=1e-3)
        every = np.mean([word_map_loop(syn, s, w, st, b) for st in (0, 1, 2) for b in (1, 3)], 0)
        assert np.allclose(A.word_map(syn, s, w, step="all", layer="all").values, every, atol=1e-3)
    with pytest.raises(TraceError, match="layer 2 is not recorded"):
        A.word_map(syn, 0, 0, step=0, layer=2)
    # a negative sample counts from the end, as in `heatmap` (it was an empty slice and an IndexError)
    last = syn.sizes["sample"] - 1
    assert np.array_equal(A.word_map(syn, -1, 1).values, A.word_map(syn, last, 1).values)
    assert np.array_equal(A.word_scores(syn, -1).importance.values, A.word_scores(syn, last).importance.values,
                          equal_nan=True)
    for fn in (lambda: A.word_map(syn, last + 1, 0), lambda: A.word_scores(syn, -last - 2),
               lambda: A.heatmap(syn, last + 1)):
        with pytest.raises(TraceError, match=f"sample -?{last + 1}|sample {-last - 2} is out of range"):
            fn()
    # a dense trace (no sparse layer): "all" averages every block, as DAAM does (it was refused), not an all-NaN map
    dense = syn.isel(layer=[])
    got = A.word_map(dense, 1, 2, step=1)
    blocks = syn.block.values.tolist()
    assert got.attrs["blocks"] == blocks and len(blocks) > 2
    assert np.allclose(got.values, np.mean([word_map_loop(syn, 1, 2, 1, b) for b in blocks], 0), atol=1e-3)
    assert A.word_map(syn, 1, 2, step=1).attrs["blocks"] == [1, 3]
    with pytest.raises(TraceError, match=r"no sparse layer .* layer='all'"):
        A.word_map(dense, 0, 0, layer=1)


def test_word_scores_are_one_prompts_text_importance_at_a_layer_and_step(syn):
    full = A.text_importance(syn).compute()
    s = 1
    got = A.word_scores(syn, s, step=2, layer=3)
    want = full.isel(sample=s).sel(step=2, layer=3)
    assert np.allclose(got.importance.values, want.importance.values, equal_nan=True)
    assert list(got.word_text.values) == [*"two blue squares left of a ring".split(), ""]
    avg = A.word_scores(syn, s, step="all", layer="all")
    assert np.allclose(avg.correlation.values, full.isel(sample=s).correlation.mean(("step", "layer")).values,
                       equal_nan=True)
    # the correlation is Spearman's between the word's attention and the allocation map, recomputed by hand
    c = syn.expert_count.sel(branch="cond").values[s, 2, 1].astype(float)
    rho = spearmanr(word_map_loop(syn, s, 2, 2, 3).ravel(), c)[0]
    assert got.correlation.values[2] == pytest.approx(rho, abs=1e-4)


def test_prompt_search_and_category_filters_equal_loops(syn):
    texts = [str(p) for p in syn.prompt.values]
    for query in ("red", "RED rings", "", "square left", "zebra"):
        want = [i for i, t in enumerate(texts) if all(q in t.lower() for q in query.lower().split())]
        assert A.search_prompts(syn, query).tolist() == want
    cats = [str(c) for c in syn.category.values]
    assert A.filter_samples(syn, category=["Animals", "Simple"]).tolist() == \
        [i for i, c in enumerate(cats) if c in ("Animals", "Simple")]
    assert A.filter_samples(syn, category=[]).tolist() == list(range(10))
    assert A.spaced(np.arange(10, 20), 4).tolist() == [10, 13, 16, 19]
    assert A.spaced([3, 5], 4).tolist() == [3, 5] and A.spaced(np.arange(9), None).tolist() == list(range(9))
    pairs = np.arange(20) // 2  # a label per sample: groups of two images
    assert A.spaced(np.arange(20), 6, by=pairs).tolist() == [0, 1, 8, 9, 18, 19]  # 3 whole groups, evenly spaced
    assert A.spaced(np.arange(1, 20), 4, by=pairs).tolist() == [1, 18, 19]  # sample 0 not given: its group has 1
    assert A.spaced(np.arange(20), 1, by=pairs).tolist() == [0, 1]  # at least one whole unit
    assert len(A.spaced(np.arange(30), 6, by=np.r_[[-1] * 10, pairs])) <= 7  # -1 (no group): each a unit
    assert A.labels(syn, "category") == sorted(CATEGORIES) and A.labels(syn, "challenge") == []
    with pytest.raises(TraceError, match="filtering by challenge needs `challenge`"):
        A.filter_samples(syn, challenge=["Color"])


def test_a_subset_keeps_its_samples_and_the_groups_they_were_routed_in(syn):
    keep = A.filter_samples(syn, category=["Position"])
    sub = A.subset(syn, keep)
    assert np.array_equal(sub.expert_count.values, syn.expert_count.values[keep])
    assert [str(p) for p in sub.prompt.values] == [str(syn.prompt.values[i]) for i in keep]
    ms = syn.group_member_sample.values
    groups = [g for g in range(ms.shape[0]) if np.isin(ms[g], keep).any()]
    assert np.array_equal(sub.dispatch.values, syn.dispatch.values[groups])
    for new_g, g in enumerate(groups):  # members renumbered into the subset, the others marked -1
        want = [int(np.nonzero(keep == m)[0][0]) if m in keep else -1 for m in ms[g]]
        assert sub.group_member_sample.values[new_g].tolist() == want
    stats = A.allocation_stats(sub).compute()
    rows = syn.expert_count.sel(branch="cond").values[keep]  # (n, step, layer, token)
    assert np.allclose(stats["skipped"].values, (rows == 0).mean((0, 3)))
    load = A.expert_load(sub).compute()
    assert (load.tokens.values == len(groups) * syn.sizes["slot"]).all()  # expert choice: C per group and expert
    with pytest.raises(TraceError, match="no sample matches"):
        A.subset(syn, [])
    # which image of its prompt a sample is survives renumbering, through a subset of a subset too
    assert np.array_equal(A.image_index(sub), syn.image_index.values[keep])
    assert np.array_equal(A.image_index(A.subset(sub, [1, 2])), syn.image_index.values[keep[[1, 2]]])
    two = syn.copy()  # as if each prompt had two images: samples 1, 3, 5 are all second images
    two.attrs = dict(syn.attrs) | {"sampler": dict(syn.attrs["sampler"], images_per_prompt=2)}
    assert A.image_index(A.subset(two, [1, 3, 5])).tolist() == [1, 1, 1]  # not 0, 1, 0 as renumbered
    assert A.image_index(A.subset(A.subset(two, [1, 2, 3, 5]), [0, 2, 3])).tolist() == [1, 1, 1]


def test_matching_samples_and_map_differences_across_traces(syn, tmp_path):
    other = ecviz.open_trace(write_synthetic_trace(tmp_path / "b.zarr", samples=10, steps=3, layers=2, experts=4,
                                                   grid=4, group_size=32, prompts=PROMPTS, seed=9))
    assert A.matching_sample(syn, 5, other) == 5  # same prompt, same noise seed (the sample index here)
    shifted = ecviz.open_trace(write_synthetic_trace(tmp_path / "c.zarr", samples=3, steps=3, layers=2, experts=4,
                                                     grid=4, group_size=32, prompts=PROMPTS[1:], seed=9))
    assert A.matching_sample(syn, 1, shifted) is None  # "two blue squares" is sample 0 there, with seed 0
    m = A.compare_maps(syn, 5, other, 5, step=1, layer="all")
    a = syn.expert_count.sel(branch="cond").values[5, 1].astype(float).mean(0).reshape(4, 4)
    b = other.expert_count.sel(branch="cond").values[5, 1].astype(float).mean(0).reshape(4, 4)
    assert np.allclose(m["difference"].values, a - b)
    assert m.attrs["mean_abs_difference"] == pytest.approx(np.abs(a - b).mean())
    assert m.attrs["correlation"] == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], abs=1e-6)
    with pytest.raises(TraceError, match="trace B: step 7 is not recorded"):
        A.compare_maps(ecviz.open_trace(write_synthetic_trace(tmp_path / "d.zarr", samples=4, steps=8)), 0, syn, 0,
                       step=7)
    # "all" layers of a trace of every layer against one of block 3 only: block 3 on both sides (it was the
    # mean of every layer against block 3, a difference where there is none)
    last = other.isel(layer=[-1])
    m = A.compare_maps(syn, 5, last, 5, step=1, layer="all")
    want = A.heatmap(syn, 5, step=1, layer=int(last.layer[0]))
    assert np.allclose(m["a"].values, want.values) and m.attrs["layers"] == [int(last.layer[0])]
    # the same step label at another timestep (another schedule) is refused in one line (was a MergeError)
    six = ecviz.open_trace(write_synthetic_trace(tmp_path / "e.zarr", samples=10, steps=6, layers=2, experts=4,
                                                 grid=4, group_size=32, prompts=PROMPTS, seed=9))
    with pytest.raises(TraceError, match=r"step 1 is t = .* in A and t = .* in B"):
        A.compare_maps(syn, 5, six, 5, step=1, layer="all")
    # "all" steps of two schedules: the timesteps both have, paired by t (it paired step labels: A's whole
    # trajectory against B's first half)
    shared = [t for t in syn.t.values if np.isclose(six.t.values, t).any()]
    steps_a = [int(syn.step[np.isclose(syn.t.values, t)][0]) for t in shared]
    steps_b = [int(six.step[np.isclose(six.t.values, t)][0]) for t in shared]
    assert steps_a != steps_b and len(shared) >= 2
    m = A.compare_maps(syn, 5, six, 5, step="all", layer="all")
    assert m.attrs["steps"] == steps_a and m.attrs["steps_b"] == steps_b
    assert np.allclose(m["a"].values, A.heatmap(syn.sel(step=steps_a), 5, step="all", layer="all").values)
    assert np.allclose(m["b"].values, A.heatmap(six.sel(step=steps_b), 5, step="all", layer="all").values)
    with pytest.raises(TraceError, match=r"no timestep t in common \(A: \[0\.0"):
        A.compare_maps(syn, 5, six.isel(step=[1]), 5, step="all")


def test_object_background_can_average_probe_timesteps_first():
    probe = A.open_probe("checkpoints/ec-dit-shapes")
    out = A.object_background(probe, n_boot=50, mean_over=("t",))
    assert "t" not in out.dims and out.ratio.dims == ("train_step", "layer")
    c = probe.expert_count.values.astype(float).mean(2)  # (train_step, probe, layer, token)
    frac = probe.object_fraction.values  # (probe, token)
    obj = np.nanmean(np.where(frac[None, :, None] >= 0.5, c, np.nan), -1).mean(1)
    bg = np.nanmean(np.where(frac[None, :, None] == 0, c, np.nan), -1).mean(1)
    assert np.allclose(out.ratio.values, obj / bg, rtol=1e-5)
    assert (out.ratio_lo.values <= out.ratio.values + 1e-6).all() and (out.ratio.values <= out.ratio_hi + 1e-6).all()


# ---- finding and opening stores ---------------------------------------------------------------------------------
def test_find_stores_lists_traces_and_runs_and_picks_the_newest_trace(tmp_path, syn_path):
    root = tmp_path
    for name in ("traces/a.zarr", "traces/sub/b.zarr", "traces/.c.zarr.tmp"):
        shutil.copytree(syn_path, root / name)
    (root / "traces" / "notes").mkdir()
    for run in ("runs/ec", "checkpoints/tc"):
        (root / run / "routing.zarr").mkdir(parents=True)
    (root / "runs" / "no-probe").mkdir()
    old = 1_000_000_000
    for p in (root / "traces/a.zarr", root / "traces/a.zarr/zarr.json"):
        os.utime(p, (old, old))
    found = A.find_stores(root)
    assert [(s.label, s.kind) for s in found] == [("traces/a.zarr", "trace"), ("traces/sub/b.zarr", "trace"),
                                                  ("runs/ec", "run"), ("checkpoints/tc", "run")]
    assert A.newest_trace(found).label == "traces/sub/b.zarr"
    assert A.newest_trace([s for s in found if s.kind == "run"]) is None
    before = A.stamp(root / "traces/a.zarr")
    ecviz_done = zarr.open_group(str(root / "traces/a.zarr"), mode="r+")["done"]
    ecviz_done[0] = True  # a resumed run rewrites its flags
    assert A.stamp(root / "traces/a.zarr") != before and A.stamp(root / "nothing") == ""


@pytest.mark.parametrize("how", list(BROKEN))
def test_opening_an_unusable_store_says_what_is_wrong_and_what_to_do(syn_path, tmp_path, how):
    bad = break_store(syn_path, tmp_path / "bad.zarr", how)
    with pytest.raises(TraceError) as e:
        A.open_store(bad)
    assert BROKEN[how] in str(e.value) and "\n" not in str(e.value)


def test_every_reader_of_a_probe_stops_at_its_committed_rows(tmp_path):
    """A trainer killed between growing the probe's arrays and committing the row count leaves a row of fill
    values (train step 0, zero counts); open_probe (report, notebooks) and open_store (the app) both drop it."""
    probe = shutil.copytree("checkpoints/ec-dit-shapes/routing.zarr", tmp_path / "routing.zarr")
    steps = A.open_probe(probe).train_step.values.tolist()
    zarr.open_group(str(probe), mode="r+").attrs["rows"] = len(steps) - 1
    for opener in A.open_probe, A.open_routing, A.open_store:
        assert opener(probe).train_step.values.tolist() == steps[:-1], opener


def test_a_damaged_or_lost_probe_chunk_is_named_not_read_as_zeros(tmp_path, capsys):
    """A probe chunk that fails its checksum was a 90-line traceback out of `ecviz report`; a lost one read back as
    fill values (zero counts: no expert took any token at that train step), without a word."""
    from helpers import assert_bad_input, ecviz_here

    run = tmp_path / "run"
    shutil.copytree("checkpoints/ec-dit-shapes/routing.zarr", run / "routing.zarr")
    good = A.allocation_stats(A.open_probe(run)).compute()
    (run / "routing.zarr" / "expert_count" / "c" / "3" / "0" / "0" / "0" / "0").write_bytes(b"xx")
    probe = A.open_probe(run)  # lazy: found when read, as with traces
    assert A.expert_load(probe).compute().equals(A.expert_load(A.open_probe("checkpoints/ec-dit-shapes")).compute())
    with pytest.raises(TraceError, match=r"cannot read `expert_count`, the store is damaged \(its checksum does"):
        A.allocation_stats(probe).compute()
    assert_bad_input(ecviz_here(capsys, "report", run, "--out", tmp_path / "r"), "`expert_count`",
                     "the store is damaged", "written by ecviz train: move it away")
    shutil.rmtree(run / "routing.zarr" / "expert_load" / "c" / "5")
    for opener in A.open_probe, A.open_store:
        with pytest.raises(TraceError, match=r"`expert_load` of train step 2500 is missing: the training probe is"):
            opener(run)
    assert good["mean"].notnull().all()


def test_open_store_opens_traces_and_runs_and_explains_errors_met_later(syn_path, tmp_path):
    with pytest.raises(TraceError, match=r"not found; write one with ecviz trace \(./run.sh demo"):
        A.open_store(tmp_path / "missing.zarr")
    ds = A.open_store(syn_path)
    assert ds.attrs["path"] == str(syn_path) and ds.sizes["sample"] == 10
    probe = A.open_store("checkpoints/ec-dit-shapes")
    assert probe.sizes["train_step"] == probe.attrs["rows"]
    # a damaged chunk past the first sample is found only when read: explain() names it as damage
    bad = shutil.copytree(syn_path, tmp_path / "late.zarr")
    shard = sorted(f for f in (bad / "expert_count" / "c").rglob("*") if f.is_file())[-1]
    shard.write_bytes(shard.read_bytes()[:40])
    late = A.open_store(bad)
    with pytest.raises(Exception) as e:
        A.heatmap(late, 9)
    assert "the store is damaged" in A.explain(e.value, bad)
    # a label the first page lists (the prompts) with a done batch's file emptied: zarr would read '' without a
    # word; opening names the samples instead
    empty = shutil.copytree(syn_path, tmp_path / "empty.zarr")
    shard = sorted(f for f in (empty / "prompt" / "c").rglob("*") if f.is_file())[-1]
    shard.write_bytes(b"")
    with pytest.raises(DamagedTraceError, match="missing or empty") as e:
        A.open_store(empty)
    assert e.value.samples and e.value.samples[-1] == 9
    try:
        np.zeros(2)[5]
    except IndexError as z:
        assert A.explain(z).startswith("unexpected error (IndexError: index 5 is out of bounds") and \
            "a bug in ecviz" in A.explain(z)


# ---- figure pieces --------------------------------------------------------------------------------------------
def test_images_are_upscaled_without_smoothing():
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    big = P.decode_uri(P.image_uri(img, 100))
    assert big.shape == (112, 112, 3)  # the smallest integer factor (7) reaching 100 px
    assert np.array_equal(big, np.repeat(np.repeat(img, 7, 0), 7, 1))
    fig = P.heatmap_figure(np.ones((4, 4)), img)
    assert np.array_equal(P.decode_uri(fig.layout.images[0].source)[:: P.IMAGE_PX // 16, :: P.IMAGE_PX // 16], img)


def test_words_html_colours_words_by_importance():
    html = P.words_html(["a", "red", "circle", ""], [1.0, 2.5, 0.5, np.nan], [0.1, 0.5, -0.2, np.nan], selected=1)
    spans = re.findall(r'<span data-word="(\d)"(?: data-importance="([^"]+)")?.*?background:rgb\((\d+), (\d+), '
                       r"(\d+)\).*?>(\w+)</span>", html)
    assert [(w, float(v), t) for w, v, *_, t in spans] == [("0", 1.0, "a"), ("1", 2.5, "red"), ("2", 0.5, "circle")]
    (_, _, *white, _), (_, _, *red, _), (_, _, *blue, _) = spans
    r, b = [int(x) for x in red], [int(x) for x in blue]
    assert r[0] > r[2] + 50 and b[2] > b[0] + 50  # more experts: red; fewer: blue; 1 (the mean): near white
    assert min(int(x) for x in white) > 200
    assert "text-decoration:underline" in html.split('data-word="1"')[1].split("</span>")[0]
    assert 'data-correlation="0.5"' in html and "circle" in html and html.count("<span") == 3


def test_grid_figures_wrap_into_rows_and_charts_download_png():
    import xarray as xr

    maps = xr.DataArray(np.arange(12 * 16, dtype=float).reshape(12, 4, 4), dims=("step", "row", "col"),
                        coords={"step": np.arange(12)})
    fig = P.grid_figure(maps, "step", per_row=5)
    assert len(fig.data) == 12 and all(np.array_equal(fig.data[i].z, maps[i].values) for i in range(12))
    assert fig.data[11].xaxis == "x12" and fig.layout.xaxis12.domain == fig.layout.xaxis2.domain  # 3 rows of 5
    cfg = P.export_config("name")
    assert cfg["toImageButtonOptions"] == {"format": "png", "filename": "name", "scale": 2}


def test_image_heatmap_pairs_draw_each_samples_image_beside_its_mean_layer_heatmap(syn):
    from ecviz.plots.figures import image_heatmap_pairs

    fig = image_heatmap_pairs(syn, [0, 3, 7], step=-1, layer="all", columns=2)
    drawn = [ax.images[-1].get_array() for ax in fig.axes if ax.images]
    assert len(drawn) == 6  # image, heatmap per sample; the empty fourth pair draws nothing
    for k, i in enumerate([0, 3, 7]):
        np.testing.assert_array_equal(drawn[2 * k], syn["image"].isel(sample=i).values)
        heat = A.heatmap(syn, sample=i, step=-1, layer="all").values
        np.testing.assert_allclose(np.asarray(drawn[2 * k + 1]), heat, rtol=1e-6)
    titles = [t for ax in fig.axes if (t := ax.get_title(loc="left"))]
    assert titles == [str(syn["prompt"].values[i]) for i in (0, 3, 7)]


def test_a_wrong_argument_is_refused_naming_it_not_answered_wrongly(syn, tmp_path):
    """What a fuzzing pass of the Python API found: each case gave a silently wrong result or a deep library
    error; now a TraceError naming the argument and what is allowed."""
    from ecviz.analysis.words import by_word, text_importance
    from ecviz.plots import figures as F

    cases = [
        (lambda: A.heatmap(syn, 0, step=-4), "step -4 is out of range (3 recorded)"),  # an IndexError from dask
        (lambda: A.heatmap(syn, 1.5), "sample 1.5: a position is a whole number"),  # all-zero maps
        (lambda: A.heatmap(syn, 0, reduce="max"), "reduce 'max': 'mean' or 'sum'"),  # AttributeError
        (lambda: A.subset(syn, [0.9, 2.7]), "samples of dtype float64"),  # kept samples 0 and 2
        (lambda: A.filter_samples(syn, category="Simpel"), "category 'Simpel': not in this trace (it has: "),
        (lambda: A.coselection(syn, steps=[]), "steps []: no step chosen"),  # NaN everywhere
        (lambda: A.coselection(syn, steps=2), "steps 2: 'spaced', 'all' or a list"),  # TypeError
        (lambda: A.expert_load(syn.isel(sample=[0, 1])), "cut with isel"),  # the whole trace's load
        (lambda: A.expert_positions(syn, branch="both"), "branch 'both' is not in this trace"),  # ValueError
        (lambda: A.allocation_stats(syn.isel(sample=[])), "no samples: the selection is empty"),  # NaN everywhere
        (lambda: A.word_map(syn, 0, 0, layer=[1]), "layer [1]: one recorded layer"),  # (block, row, col)
        (lambda: A.heatmaps(syn, 0, over="block"), "over='block': one of step, layer"),  # xarray's dims error
        (lambda: A.object_background(syn, level=95), "level=95"),  # numpy's quantile error
        (lambda: A.object_background(syn, mean_over="step"), "a tuple of dimensions"),  # "'s' not found"
        (lambda: F.allocation_grid(syn, 0, use="imgae"), "use='imgae'"),  # drew no picture without a word
        (lambda: F.image_heatmap_pairs(syn, []), "give at least one sample"),  # max() of an empty sequence
    ]
    for call, says in cases:
        with pytest.raises(TraceError, match=re.escape(says)):
            call()
    mask = np.arange(syn.sizes["sample"]) % 2 == 0  # a boolean mask is a mask (it kept samples 0 and 1)
    assert A.subset(syn, mask).attrs["subset_of"] == np.flatnonzero(mask).tolist()
    simple = A.filter_samples(syn, category="Simple").tolist()
    assert simple == A.filter_samples(syn, category=["Simple"]).tolist()
    assert simple == A.filter_samples(syn, category=["Simple", "Food"]).tolist()  # one of several may be absent
    assert A.subset(syn, np.array([3, 1], dtype=object)).attrs["subset_of"] == [1, 3]  # whole numbers, boxed
    assert A.select(A.experts_per_token(syn), sample=slice(0, 2), step=-1, layer="all").sizes["sample"] == 2
    last = int(syn.step[-1])  # -1 in a list is the last step too (it was "step -1 is not recorded")
    assert A.select(A.experts_per_token(syn), sample=0, step=[-1], layer="all").step.values.tolist() == [last]
    assert A.coselection(syn, steps=[-1]).attrs["steps"] == [last]
    sub = A.subset(syn, [1, 2, 3])
    imp = text_importance(sub).mean(["step", "layer"]).compute()
    assert by_word(imp, sub, by="category")["n"].sum() > 0
    with pytest.raises(TraceError, match="not those of the trace"):  # rows matched by position: wrong labels
        by_word(imp, syn, by="category")
    probe = A.open_probe(ecviz.__path__[0] + "/../checkpoints/ec-dit-shapes")
    with pytest.raises(TraceError, match="a training probe has train_step and t, not step"):  # step was ignored
        A.heatmap(probe, 0, step=3)
    for call in (lambda: A.subset(probe, [0]), lambda: A.expert_steps(probe), lambda: A.word_scores(probe, 0),
                 lambda: A.matching_sample(syn, 0, probe)):  # KeyErrors: 'sample', 'gate_mass'
        with pytest.raises(TraceError, match=re.escape("takes a trace (ecviz.open_trace), not a training probe")):
            call()
    with pytest.raises(TraceError, match="takes a training probe"):  # KeyError 'object_fraction'
        A.object_vs_background(syn)
    with pytest.raises(TraceError, match="needs `image`"):  # KeyError 'image'
        A.image_object_fraction(syn.drop_vars("image"))
