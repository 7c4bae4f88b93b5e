"""ecviz.analysis against plain-Python loops over small random traces, plus the invariants routing must keep."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from scipy.stats import spearmanr

import ecviz
from ecviz import analysis as A
from ecviz.errors import TraceError
from ecviz.trace.synthetic import write_synthetic_trace


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> xr.Dataset:
    p = write_synthetic_trace(tmp_path_factory.mktemp("syn") / "ec.zarr", samples=10, steps=4, layers=2,
                              experts=4, grid=4, group_size=32, seed=1)
    return ecviz.open_trace(p)


@pytest.fixture(scope="module")
def syn_tc(tmp_path_factory) -> xr.Dataset:
    p = write_synthetic_trace(tmp_path_factory.mktemp("syn") / "tc.zarr", samples=8, steps=2, layers=2,
                              experts=4, grid=4, group_size=32, routing="tc", seed=2)
    return ecviz.open_trace(p)


def gini(x: np.ndarray) -> float:
    """Textbook Gini: mean absolute difference over twice the mean."""
    x = x.astype(float)
    return np.abs(x[:, None] - x[None, :]).mean() / (2 * x.mean()) if x.mean() > 0 else 0.0


def test_allocation_stats_equal_loops(syn):
    s = A.allocation_stats(syn).compute()
    c = syn.expert_count.sel(branch="cond").values.astype(int)  # (sample, step, layer, token)
    E, S = 4, c.shape[-1]
    for si in range(c.shape[1]):
        for li in range(c.shape[2]):
            rows = c[:, si, li]  # (sample, token)
            at = s.isel(step=si, layer=li)
            assert at["skipped"] == pytest.approx((rows == 0).mean())
            assert at["max"] == rows.max() and at["min"] == rows.min() and at["max_share"] == rows.max() / E
            assert at["mean"] == pytest.approx(rows.mean(), rel=1e-5)
            assert at["gini"] == pytest.approx(np.mean([gini(r) for r in rows]), rel=1e-4)
            assert at["cv"] == pytest.approx(np.mean([r.std() / r.mean() for r in rows]), rel=1e-4)
            ent = []
            for r in rows:
                p = r[r > 0] / r.sum()
                ent.append(-(p * np.log(p)).sum() / np.log(S))
            assert at["entropy"] == pytest.approx(np.mean(ent), rel=1e-4)
            for t in range(1, E + 1):
                assert at["at_least"].sel(threshold=t) == pytest.approx((rows >= t).mean())
            assert at["histogram"].values.tolist() == [int((rows == v).sum()) for v in range(E + 1)]


def test_expert_choice_counts_sum_to_E_times_C_per_group(syn):
    E, C, g, S = 4, syn.sizes["slot"], 32, 16
    stored = syn.expert_count.sum(("sample", "branch", "token")).values  # (step, layer), real samples only
    d, ms = syn.dispatch.values, syn.group_member_sample.values
    filler = np.zeros(stored.shape, np.int64)
    for gi in range(d.shape[0]):
        member = np.where(d[gi] >= 0, d[gi] // S, 0)
        filler += ((ms[gi][member] < 0) & (d[gi] >= 0)).sum((-1, -2)).astype(np.int64)
    assert filler.sum() > 0  # the last batch is padded
    assert (stored + filler == syn.sizes["group"] * E * C).all()
    gm = A.group_mean(syn).compute()
    assert np.allclose(gm.values, E * C / g)  # every group averages f_c experts per token
    load = A.expert_load(syn).compute()
    assert bool(load.full_capacity.all()) and (load.capacity_used == 1).all()


def test_a_broken_expert_choice_trace_is_flagged(syn, tmp_path):
    broken = syn.load().copy(deep=True)
    d = broken.dispatch.values.copy()
    d[0, 0, 0, 0, -1] = -1  # one expert left a slot empty in one group
    broken["dispatch"] = (broken.dispatch.dims, d)
    assert not bool(A.expert_load(broken).full_capacity.isel(step=0, layer=0))
    with pytest.raises(TraceError, match="expert choice broken"):
        A.check_full_capacity(broken)


def test_load_and_coselection_equal_loops(syn):
    d, w = syn.dispatch.values, syn.gate.values.astype(np.float32)
    G, T, L, E, _ = d.shape
    load = A.expert_load(syn).compute()
    co = A.coselection(syn).compute()
    for li in range(L):
        pair = np.zeros((E, E))
        for gi in range(G):
            for t in range(T):
                sets = [set(d[gi, t, li, e][d[gi, t, li, e] >= 0].tolist()) for e in range(E)]
                for a in range(E):
                    for b in range(E):
                        pair[a, b] += len(sets[a] & sets[b])
        assert np.array_equal(co["count"].isel(layer=li).values, pair)
        for t in range(T):
            assert load.tokens.isel(step=t, layer=li).values.tolist() == [(d[:, t, li, e] >= 0).sum() for e in range(E)]
            assert np.allclose(load.gate_mass.isel(step=t, layer=li).values, w[:, t, li].sum((0, 2)), rtol=1e-3)
    cond = co["conditional"].values
    assert np.allclose(np.einsum("lee->le", cond), 1)


def test_expert_positions_equal_loop(syn):
    d = syn.dispatch.values
    ms, mo = syn.group_member_sample.values, syn.group_member_offset.values
    S, seg = 16, 16
    G, T, L, E, _ = d.shape
    counts = np.zeros((L, E, S))
    for gi in range(G):
        for t in range(T):
            for li in range(L):
                for e in range(E):
                    for v in d[gi, t, li, e]:
                        if v >= 0 and ms[gi, v // seg] >= 0:
                            counts[li, e, mo[gi, v // seg] + v % seg] += 1
    got = A.expert_positions(syn).compute().values
    assert np.allclose(got, counts / counts.mean(-1, keepdims=True))
    both = A.routing_pass(syn)  # positions of both branches: not the conditional one's (branch was ignored)
    with pytest.raises(TraceError, match="branch 'both', not 'cond': pass routing_pass"):
        A.expert_positions(syn, "cond", summary=both)
    cond = A.routing_pass(syn, branch="cond")
    assert np.allclose(A.expert_positions(syn, "cond", summary=cond), A.expert_positions(syn, "cond"))


def test_settling_and_layer_agreement_equal_scipy(syn):
    c = syn.expert_count.sel(branch="cond").values.astype(float)
    st = A.settling(syn, threshold=0.5)
    for li in range(c.shape[2]):
        for si in range(c.shape[1]):
            rho = [spearmanr(c[n, si, li], c[n, -1, li]).statistic for n in range(c.shape[0])]
            assert st.similarity.isel(step=si, layer=li) == pytest.approx(np.mean(rho), rel=1e-4)
        sim = st.similarity.isel(layer=li).values
        ok = [all(sim[k:-1] >= 0.5) for k in range(len(sim) - 1)]  # the last step alone settles nothing: -1
        assert st.settle_step.isel(layer=li) == (syn.step.values[ok.index(True)] if any(ok) else -1)
    never = A.settling(syn, threshold=1.1)  # no step but the last (its own 1) passes: it was the last step
    assert (never.settle_step == -1).all()
    ag = A.layer_agreement(syn).compute()
    rho = np.mean([spearmanr(c[n, s, 0], c[n, s, 1]).statistic for n in range(c.shape[0]) for s in range(c.shape[1])])
    assert ag.isel(layer=0, layer_b=1) == pytest.approx(rho, rel=1e-4) and ag.isel(layer=0, layer_b=0) == 1


def test_image_vs_group_means_and_membership(syn):
    iv = A.image_vs_group(syn)
    c = syn.expert_count.values.astype(float).mean(-1)  # (sample, branch, step, layer)
    assert np.allclose(iv.image_mean.values, c)
    ms, mb = syn.group_member_sample.values, syn.group_member_branch.values
    where = A.sample_groups(syn)
    for s in range(syn.sizes["sample"]):
        for b in range(2):
            g = where.group.values[s, b]
            assert s in ms[g] and mb[g][list(ms[g]).index(s)] == b
    # per-image means scatter around the group's f_c, and average to it over whole groups
    assert iv.image_mean.std() > 0 and np.allclose(iv.group_mean, 2.0)


def test_token_choice_drops_equal_loops(syn_tc):
    e = syn_tc.tc_expert.values  # (sample, branch, step, layer, token, k)
    drops = A.token_choice_drops(syn_tc)
    assert np.allclose(drops.share.values, (e < 0).mean((0, 1, 4, 5)))
    assert np.allclose(drops.by_token.values, (e < 0).mean((0, 1, 2, 5)).T.T)
    assert drops.share.max() > 0  # the synthetic router overflows
    ec_like = syn_tc.copy()
    ec_like.attrs = dict(syn_tc.attrs, routing=dict(syn_tc.attrs["routing"], kind="ec"))
    with pytest.raises(TraceError, match="token-choice trace"):
        A.token_choice_drops(ec_like)


def test_heatmap_selects_by_label_and_reduces(syn):
    c = syn.expert_count.sel(branch="cond")
    hm = A.heatmap(syn, sample=3, step=2, layer=3)
    assert hm.dims == ("row", "col") and np.array_equal(hm.values.ravel(), c.isel(sample=3).sel(step=2, layer=3))
    allm = A.heatmap(syn, sample=3, step="all", layer="all")
    assert np.allclose(allm.values.ravel(), c.isel(sample=3).values.mean((0, 1)))
    with pytest.raises(TraceError, match="layer 2 is not recorded"):
        A.heatmap(syn, layer=2)
    grid = A.heatmaps(syn, sample=1, over="step", layer=1)
    assert grid.dims == ("step", "row", "col") and grid.sizes["step"] == 4


def test_missing_variable_names_the_record_flag(syn):
    with pytest.raises(TraceError, match="--record cross_attn"):
        A.text_importance(syn)


def test_expert_maps_add_up_to_the_experts_per_token_map(syn, syn_tc, tmp_path):
    """A.expert_maps decodes the routing groups' dispatch into each expert's tokens of one image: summed over the
    experts, the stored experts-per-token map, for expert and token choice, whole images or split over groups,
    one step and layer or their mean, and in a subset; its gates sit where the tokens were taken."""
    tc8 = ecviz.open_trace(write_synthetic_trace(tmp_path / "tc8.zarr", samples=6, steps=2, layers=2, experts=4,
                                                 grid=4, group_size=8, routing="tc", seed=4))
    sub = A.subset(syn, [1, 4, 7])
    for ds, samples in ((syn, (0, 5, 9)), (syn_tc, (0, 7)), (tc8, (2, 5)), (sub, (0, 2))):
        for sample in samples:
            for branch in ("cond", "uncond"):
                for step, layer in ((-1, -1), (0, int(ds.layer[0])), ("all", "all")):
                    m = A.expert_maps(ds, sample, step=step, layer=layer, branch=branch)
                    want = A.heatmap(ds, sample, step=step, layer=layer, branch=branch)
                    assert np.allclose(m.taken.sum("expert").values, want.values, atol=1e-6), (sample, step)
                    assert (m.gate.values[m.taken.values == 0] == 0).all()
    m = A.expert_maps(syn, 3, step=1, layer=int(syn.layer[1]))
    d = syn.dispatch.sel(step=1, layer=int(syn.layer[1])).values  # (group, expert, slot)
    ms = syn.group_member_sample.values
    by_hand = np.zeros((syn.sizes["expert"], 16))
    for gi in range(ms.shape[0]):
        for e in range(syn.sizes["expert"]):
            for v in d[gi, e]:
                if v >= 0 and ms[gi, v // 16] == 3 and syn.group_member_branch.values[gi, v // 16] == 0:
                    by_hand[e, v % 16] = 1
    assert np.array_equal(m.taken.values.reshape(syn.sizes["expert"], 16), by_hand)
    with pytest.raises(TraceError, match="step 99 is not recorded"):
        A.expert_maps(syn, 0, step=99)
    with pytest.raises(TraceError, match="sample 10 is out of range"):
        A.expert_maps(syn, 10)
    with pytest.raises(TraceError, match="no step chosen"):  # NaN maps before
        A.expert_maps(syn, 0, step=[])


def with_objects(ds: xr.Dataset, seed: int = 0) -> xr.Dataset:
    """A loaded copy whose images are black (background) on a random 40% of the patches and on most pixels of
    some others (partly drawn patches): object masks for the ground-truth statistics."""
    ds = ds.load().copy(deep=True)
    rows, cols = ds.attrs["grid"]
    n, h, w, _ = ds.image.shape
    rng = np.random.default_rng(seed)
    dark = rng.random((n, rows, cols)) < 0.4
    ds["image"].values[np.repeat(np.repeat(dark, h // rows, 1), w // cols, 2)] = 0
    part = np.repeat(np.repeat(rng.random((n, rows, cols)) < 0.3, h // rows, 1), w // cols, 2)
    ds["image"].values[part & (rng.random((n, h, w)) < 0.8)] = 0  # mostly black: partly drawn patches
    ds["image"].values[:, :, :, :] = np.where(ds["image"].values == 0, 0, np.maximum(ds["image"].values, 64))
    return ds


def test_expert_objects_equal_the_per_expert_maps_against_the_masks(syn, syn_tc, tmp_path):
    """A.expert_objects counts, per (step, layer, expert), the tokens each expert took on the generated images'
    objects and background: equal to summing A.expert_maps (itself checked against a hand-decoded loop) over
    the images against their masks, for expert and token choice, an image split over groups, a subset and the
    other branch; its interval holds the estimate, and an expert-choice expert takes its C tokens whatever."""
    tc8 = ecviz.open_trace(write_synthetic_trace(tmp_path / "tc8.zarr", samples=6, steps=2, layers=2, experts=4,
                                                 grid=4, group_size=8, routing="tc", seed=4))
    cases = [(with_objects(syn), "cond"), (with_objects(syn_tc, 1), "cond"), (with_objects(tc8, 2), "cond"),
             (A.subset(with_objects(syn), [1, 4, 7]), "cond"), (with_objects(syn), "uncond")]
    for ds, branch in cases:
        got = A.expert_objects(ds, branch=branch, n_boot=200)
        frac = A.image_object_fraction(ds).values  # (sample, token)
        obj, bg = frac >= A.OBJECT_MIN, frac == 0
        assert obj.any() and bg.any() and (~obj & ~bg).any()  # all three kinds of token
        E = ds.sizes["expert"]
        for step in ds.step.values:
            for layer in ds.layer.values:
                taken = np.stack([A.expert_maps(ds, s, step=int(step), layer=int(layer), branch=branch)
                                  .taken.values.reshape(E, -1) for s in range(ds.sizes["sample"])])  # (n, E, S)
                at = got.sel(step=step, layer=layer)
                total = taken.sum((0, 2))
                want_obj = (taken * obj[:, None]).sum((0, 2))
                want_bg = (taken * bg[:, None]).sum((0, 2))
                with np.errstate(invalid="ignore", divide="ignore"):
                    assert np.allclose(at.object_share.values, want_obj / total, equal_nan=True)
                    assert np.allclose(at.background_share.values, want_bg / total, equal_nan=True)
                    assert np.allclose(at.object_coverage.values, want_obj / obj.sum())
                    assert np.allclose(at.background_coverage.values, want_bg / bg.sum())
                    assert np.allclose(at.enrichment.values, want_obj / total / obj.mean(), equal_nan=True)
        assert float(got.object_tokens) == pytest.approx(obj.mean())
        ok = np.isfinite(got.enrichment.values)
        assert ok.any()
        assert (got.enrichment_lo.values[ok] <= got.enrichment.values[ok] + 1e-9).all()
        assert (got.enrichment.values[ok] <= got.enrichment_hi.values[ok] + 1e-9).all()
        assert got.attrs["n"] == ds.sizes["sample"] and got.attrs["clusters"] >= 2
    with pytest.raises(TraceError, match="branch 'both' is not in this trace"):
        A.expert_objects(with_objects(syn), branch="both")


def test_tokens_taken_at_a_step_are_the_per_expert_maps_of_every_image(syn, syn_tc, tmp_path):
    tc8 = ecviz.open_trace(write_synthetic_trace(tmp_path / "tc8.zarr", samples=6, steps=2, layers=2, experts=4,
                                                 grid=4, group_size=8, routing="tc", seed=4))
    for ds, branch, step in ((syn, "cond", -1), (syn, "uncond", 1), (syn_tc, "cond", -1), (tc8, "uncond", 0),
                             (A.subset(syn, [1, 4, 7]), "cond", -1)):
        got = A.tokens_taken(ds, step=step, branch=branch)
        assert got.dims == ("sample", "layer", "expert", "token") and got.dtype == bool
        for s in range(ds.sizes["sample"]):
            for layer in ds.layer.values:
                m = A.expert_maps(ds, s, step=step, layer=int(layer), branch=branch).taken
                assert np.array_equal(got.sel(layer=layer).values[s], m.values.reshape(m.shape[0], -1) > 0)
    last = int(syn.layer[-1])  # one layer decoded alone: the same as its slice of all of them
    assert np.array_equal(A.tokens_taken(syn, layer=[last]).values, A.tokens_taken(syn).sel(layer=[last]).values)
    for bad, match in (("all", "name one recorded step"), ([0, 1], "name one recorded step"),
                       (99, "step 99 is not recorded"), (-9, "step -9 is out of range")):
        with pytest.raises(TraceError, match=match):
            A.tokens_taken(syn, step=bad)


def test_expert_words_average_each_words_object_coverage_over_its_images(syn):
    """A.expert_words: per caption word, the mean share of the word's object tokens each expert took, over the
    images where the object was found; the regions given here, random (word_regions finds them in Shapes
    images: test_report)."""
    rng = np.random.default_rng(3)
    n, W, S = syn.sizes["sample"], syn.sizes["word"], syn.sizes["token"]
    region = (rng.random((n, W, S)) < 0.3).astype(np.float32) * rng.choice([0.25, 1.0], (n, W, S))
    found = rng.random((n, W)) < 0.7
    found[:, 3:] = False  # padding words name nothing
    regions = xr.Dataset({"region": (("sample", "word", "token"), region), "found": (("sample", "word"), found)})
    layer = int(syn.layer[0])
    got = A.expert_words(syn, step=-1, layer=layer, regions=regions)
    want: dict[str, list] = {}
    for s in range(n):
        taken = A.expert_maps(syn, s, step=-1, layer=layer).taken.values.reshape(syn.sizes["expert"], -1)
        for w in range(W):
            obj = (region[s, w] >= A.OBJECT_MIN) & found[s, w]
            if obj.any():
                want.setdefault(str(syn.prompt_word.values[s, w]).lower(), []).append(taken[:, obj].mean(1))
    assert got.word.values.tolist() == sorted(want) and len(want) > 3
    for word, rows in want.items():
        assert np.allclose(got.coverage.sel(word=word).values, np.mean(rows, 0))
        assert got.n.sel(word=word) == len(rows)
    assert got.attrs == {"step": int(syn.step[-1]), "layer": layer}
    with pytest.raises(TraceError, match="name one sparse layer"):
        A.expert_words(syn, layer="all", regions=regions)


def test_an_image_split_over_groups_is_compared_with_all_of_them(tmp_path):
    """Token choice in groups smaller than an image (8 of 16 tokens): an image's group mean is the mean over the
    groups holding its tokens (it was its first group's alone)."""
    ds = ecviz.open_trace(write_synthetic_trace(tmp_path / "tc8.zarr", samples=6, steps=2, layers=2, experts=4,
                                                grid=4, group_size=8, routing="tc", seed=4))
    iv = A.image_vs_group(ds)
    gm = A.group_mean(ds).compute().values  # (group, step, layer)
    ms, mb = ds.group_member_sample.values, ds.group_member_branch.values
    differs = False
    for s in range(ds.sizes["sample"]):
        for b in range(2):
            groups = [g for g in range(ms.shape[0]) if any(ms[g, m] == s and mb[g, m] == b
                                                           for m in range(ms.shape[1]))]
            assert len(groups) == 2  # 16 tokens in groups of 8
            assert np.allclose(iv.group_mean.values[s, b], gm[groups].mean(0), atol=1e-6)
            differs |= not np.allclose(gm[groups[0]], gm[groups].mean(0))
    assert differs  # the first group alone would have been another number


def test_unfinished_trace_says_how_many_are_done(syn, syn_tc):
    part = syn.copy()
    part["done"] = ("sample", np.arange(syn.sizes["sample"]) < 3)
    with pytest.raises(TraceError, match="3 of 10 samples done"):
        A.check_complete(part)
    # statistics on it warn (the undone samples read as zeros: the Gini of a killed demo fell from 0.3 to 0.1)
    part.attrs = dict(syn.attrs) | {"complete": False}
    with pytest.warns(UserWarning, match="7 of 10 samples of this trace are not done"):
        A.allocation_stats(part)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        A.allocation_stats(A.subset(part, np.flatnonzero(part.done.values)))  # the done ones: no warning
    tc = syn_tc.copy()
    tc["done"] = ("sample", np.arange(syn_tc.sizes["sample"]) < 3)
    tc.attrs = dict(syn_tc.attrs) | {"complete": False}
    with pytest.raises(TraceError, match=r"token-choice drops: .* not done"):  # unwritten choices read as dropped
        A.token_choice_drops(tc)


def test_probe_statistics_follow_train_step():
    from pathlib import Path

    probe = A.open_probe(Path(__file__).resolve().parents[1] / "checkpoints" / "ec-dit-shapes")
    s = A.allocation_stats(probe).compute()
    assert s["gini"].dims == ("train_step", "t", "layer")
    c = probe.expert_count.isel(train_step=-1, t=0, layer=0).values  # (probe, token)
    assert float(s["skipped"].isel(train_step=-1, t=0, layer=0)) == pytest.approx((c == 0).mean())
    ob = A.object_background(probe, n_boot=200)
    frac = probe.object_fraction.values
    obj = np.nanmean(np.where(frac >= 0.5, c, np.nan), 1)
    bg = np.nanmean(np.where(frac == 0, c, np.nan), 1)
    at = ob.isel(train_step=-1, t=0, layer=0)
    assert float(at.ratio) == pytest.approx(obj.mean() / bg.mean(), rel=1e-5)
    assert float(at.ratio_lo) <= float(at.ratio) <= float(at.ratio_hi)
    # a probe's routing is its model's: a token-choice run that never dropped a token is still token choice
    from ecviz.analysis.common import routing_kind

    tc = A.open_probe(Path(__file__).resolve().parents[1] / "checkpoints" / "tc-shapes")
    assert routing_kind(tc) == "tc" and routing_kind(tc.assign(tc_drop_rate=tc.tc_drop_rate * 0)) == "tc"
    assert routing_kind(probe) == "ec"
    # what a probe cannot answer is said, not answered with zeros or the conditional branch (the review of 11-29)
    with pytest.raises(TraceError, match="token-choice drops need a token-choice probe; this one is ec"):
        A.token_choice_drops(probe)
    with pytest.raises(TraceError, match="a training probe records the conditional branch only"):
        A.allocation_stats(probe, branch="uncond")
    with pytest.raises(TraceError, match="'probe' is not a dimension to average over here"):
        A.object_background(probe, mean_over=("probe",))  # each image's counts go with its own masks


def test_options_that_name_no_dimension_or_grid_are_refused_in_a_line(syn):
    """mean_over and token_grid's rows reached xarray as they came: its errors, or for mean_over=("token",) a
    ratio of 1 that meant nothing."""
    for bad in (("foo",), ("token",), ("sample",)):
        with pytest.raises(TraceError, match=f"{bad[0]!r} is not a dimension to average over here"):
            A.object_background(syn, mean_over=bad)
    assert A.object_background(syn, mean_over=("step",), n_boot=10).ratio.dims == ("layer",)
    count = A.experts_per_token(syn)
    for rows in (3, 0, -1, 300):
        with pytest.raises(TraceError, match=f"rows={rows}: the 16 tokens make no grid"):
            A.token_grid(count, rows=rows)
    assert A.token_grid(count, rows=2).sizes["col"] == 8


def test_edge_interior_equals_a_neighbour_loop(syn):
    ds = syn.load().copy(deep=True)
    rows, cols = ds.attrs["grid"]
    n, h, w, _ = ds.image.shape
    dark = np.random.default_rng(0).random((n, rows, cols)) < 0.4  # black out 40% of the patches: background
    ds["image"].values[np.repeat(np.repeat(dark, h // rows, 1), w // cols, 2)] = 0
    frac = A.image_object_fraction(ds).values  # (sample, token)
    assert (frac == 0).any() and (frac == 1).any() and ((frac > 0) & (frac < 1)).any()
    count = ds.expert_count.sel(branch="cond").values.astype(float)  # (sample, step, layer, token)
    edges, inner = [], []
    for i in range(frac.shape[0]):
        e, n = np.zeros(rows * cols, bool), np.zeros(rows * cols, bool)
        for r in range(rows):
            for c in range(cols):
                k = r * cols + c
                if frac[i, k] < 0.5:
                    continue
                nbrs = [(r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)]
                outside = any(not (0 <= a < rows and 0 <= b < cols) or frac[i, a * cols + b] < 0.5 for a, b in nbrs)
                e[k] = outside or frac[i, k] < 1
                n[k] = not e[k]
        edges.append(e)
        inner.append(n)
    edges, inner = np.array(edges), np.array(inner)
    assert edges.any() and inner.any()  # the random images have both
    assert (A.object_edges(A.image_object_fraction(ds), (rows, cols)).values == edges).all()
    both = edges.any(1) & inner.any(1)
    out = A.edge_interior(ds, n_boot=100)
    for s in range(ds.sizes["step"]):
        for layer in range(ds.sizes["layer"]):
            c = count[both, s, layer]
            e = np.mean([row[m].mean() for row, m in zip(c, edges[both], strict=True)])
            n = np.mean([row[m].mean() for row, m in zip(c, inner[both], strict=True)])
            at = out.isel(step=s, layer=layer)
            assert float(at.edge) == pytest.approx(e, rel=1e-5) and float(at.interior) == pytest.approx(n, rel=1e-5)
            assert float(at.ratio_lo) <= float(at.ratio) <= float(at.ratio_hi)
    assert out.attrs["n"] == int(both.sum())


def test_check_full_capacity_names_failures_off_the_diagonal(syn):
    broken = syn.load().copy(deep=True)
    d = broken.dispatch.values.copy()
    d[0, 1, 0, 0, -1] = -1  # step 1 fails in both layers: one step label, two layer labels
    d[0, 1, 1, 0, -1] = -1
    broken["dispatch"] = (broken.dispatch.dims, d)
    with pytest.raises(TraceError, match=r"at \(step, layer\) \[\(1, 1\), \(1, 3\)\]"):
        A.check_full_capacity(broken)


def test_token_choice_drops_by_member_keeps_the_layer(syn_tc):
    drops = A.token_choice_drops(syn_tc)
    assert drops.by_member.dims == ("layer", "member")
    rate = (syn_tc.tc_expert.values < 0).mean((2, 4, 5))  # (sample, branch, layer)
    ms, mb = syn_tc.group_member_sample.values, syn_tc.group_member_branch.values
    per = {}  # member -> rows of (layer) drop rates of the images in that position
    for gi in range(ms.shape[0]):
        for m in range(ms.shape[1]):
            if ms[gi, m] >= 0:
                per.setdefault(m, []).append(rate[ms[gi, m], mb[gi, m]])
    assert drops.member.values.tolist() == sorted(per)
    for m, rows in per.items():
        assert np.allclose(drops.by_member.sel(member=m).values, np.mean(rows, 0))


def test_figures_draw_a_training_probe_over_its_images():
    from pathlib import Path

    from ecviz.plots import figures as F

    probe = A.open_probe(Path(__file__).resolve().parents[1] / "checkpoints" / "ec-dit-shapes")
    assert np.array_equal(F.background(probe, 1), probe.image.isel(probe=1).values)
    assert F.background(probe, 1, use="none") is None
    for fig in (F.allocation_grid(probe, 0, over="layer", train_step=-1, t="all"),
                F.image_heatmap_pairs(probe, [0, 1], layer="all")):
        assert fig.axes
        F._plt().close(fig)


def test_allocation_grid_over_the_mean_of_all_steps_draws_on_the_final_image(tmp_path):
    from ecviz.plots import figures as F

    ds = ecviz.open_trace(write_synthetic_trace(tmp_path / "x0.zarr", samples=4, record=("dispatch", "x0")))
    assert np.array_equal(F.background(ds, 1, step="all", use="x0"), ds.image.isel(sample=1).values)
    fig = F.allocation_grid(ds, 1, over="layer", step="all", use="x0")
    assert len(fig.axes) == ds.sizes["layer"] + 1  # a panel per layer and the colour bar
    F._plt().close(fig)


def test_the_unfinished_trace_message_gives_code_that_keeps_the_finished_samples(tmp_path):
    import zarr

    p = write_synthetic_trace(tmp_path / "killed.zarr", samples=10, steps=2, layers=2, experts=4, grid=4,
                              group_size=32, seed=3)
    root = zarr.open_group(str(p), mode="r+")  # as a kill after the first batch of 4 leaves it
    ms = root["group_member_sample"][...]
    unwritten = ~((ms >= 0) & (ms < 4)).any(1)  # groups of the batches never written
    root["done"][4:] = False
    ms[unwritten] = -1
    root["group_member_sample"][...] = ms
    d = root["dispatch"][...]
    d[unwritten] = -1
    root["dispatch"][...] = d
    root.attrs["complete"] = False
    part = ecviz.open_trace(p)
    with pytest.raises(TraceError, match="4 of 10 samples done") as e:
        A.check_complete(part)
    code = str(e.value).rsplit(" with ", 1)[1]
    done = eval(code, {"ecviz": ecviz, "np": np, "ds": part})  # the message's own code, as a user pastes it
    A.check_complete(done)
    assert done.sizes["sample"] == 4 and done.sizes["group"] == int((~unwritten).sum())
    assert (A.expert_load(done).capacity_used.values == 1).all()
    A.check_full_capacity(done)
    # statistics over routing groups refuse the unfinished trace itself: its unwritten groups read as groups no
    # expert filled (capacity used 0.4, "expert choice broken", the undone images in group 0), with no word
    for fn in (A.routing_pass, A.expert_load, A.check_full_capacity, A.coselection, A.image_vs_group,
               A.expert_objects):
        with pytest.raises(TraceError, match=r"6 of 10 samples of this trace are not done, and their routing "
                                             r"groups would count as empty; analyse the done ones with"):
            fn(part).compute() if fn in (A.routing_pass, A.expert_load, A.coselection) else fn(part)


def test_group_statistics_of_a_sliced_trace_point_to_subset(syn, syn_tc):
    for fn, ds in ((A.sample_groups, syn), (A.image_vs_group, syn), (A.token_choice_drops, syn_tc)):
        with pytest.raises(TraceError, match=r"cut with isel; select samples with ecviz\.analysis\.subset"):
            fn(ds.isel(sample=slice(0, 2)))
    with pytest.raises(TraceError, match=r"cut with isel; select samples with ecviz\.analysis\.subset"):  # was clamped
        A.subset(syn.isel(sample=slice(0, 4)), [0, 1])
    with pytest.raises(TraceError, match="cut with isel"):  # it put images of other prompts and groups together
        A.image_clusters(syn.isel(sample=[3, 4]))
    # reordered or repeated, the same length: the groups paired each image with another's dispatch, silently
    n = syn.sizes["sample"]
    for order in (np.arange(n)[::-1], np.r_[0, np.arange(n - 1)], np.random.default_rng(1).permutation(n)):
        for fn in (A.sample_groups, A.image_vs_group, A.image_clusters, lambda d: A.expert_maps(d, 0),
                   lambda d: A.routing_pass(d).compute(), lambda d: A.subset(d, [0])):
            with pytest.raises(TraceError, match=r"reordered, repeated or cut with isel; select samples with"):
                fn(syn.isel(sample=order))
        with pytest.raises(TraceError, match="reordered, repeated"):  # a subset's too
            A.image_vs_group(A.subset(syn, [1, 2, 3]).isel(sample=[2, 1, 0]))
    assert syn.store_sample.values.tolist() == list(range(n))  # in-memory only: open_trace's, not the store's
    same = syn.isel(sample=slice(None))  # a selection that keeps the store's order passes
    assert A.image_vs_group(same).equals(A.image_vs_group(syn))
    part = A.subset(A.subset(syn, [1, 2, 3, 7]), [1, 3])  # a subset's subset keeps the store's numbers
    assert part.store_sample.values.tolist() == part.attrs["subset_of"] == [2, 7]
    assert A.original_samples(syn.isel(sample=[5, 1])).tolist() == [5, 1]  # any selection: it said [0, 1]
    assert A.sample_groups(syn.isel(group=[])).group.values.max() == -1  # no groups: none named, no crash
    assert len(np.unique(A.image_clusters(A.subset(syn, [3, 4])))) == len(np.unique(A.image_clusters(syn)[[3, 4]]))
    for bad in ([0, syn.sizes["sample"]], [-1]):  # an IndexError traceback before
        with pytest.raises(TraceError, match="out of range"):
            A.subset(syn, bad)


def test_a_subset_reports_the_partners_and_fillers_of_the_full_trace(tmp_path):
    ds = ecviz.open_trace(write_synthetic_trace(tmp_path / "odd.zarr", samples=9, steps=2, layers=2, experts=4,
                                                grid=4, group_size=32, seed=4))  # sample 8 shares with padding
    full = A.sample_groups(ds)
    assert full.filler.values[8].all() and not full.filler.values[:8].any()
    keep = [0, 3, 8]  # 0 and 3 without the image they shared their group with
    for sub in (A.subset(ds, keep), A.subset(A.subset(ds, [0, 2, 3, 7, 8]), [0, 2, 4])):
        got = A.sample_groups(sub)
        assert np.array_equal(got.partners.values, full.partners.values[keep])
        assert np.array_equal(got.filler.values, full.filler.values[keep])
        assert np.array_equal(A.image_vs_group(sub).filler.values, full.filler.values[keep])
    assert A.sample_groups(A.subset(ds, keep)).partners.values.tolist() == [[2, 2], [2, 2], [1, 1]]


def test_group_membership_and_done_flags_are_read_once_per_open_trace(tmp_path):
    """Every group statistic needs the routing groups' members and the done flags; reading them costs a file per
    writer batch, so of a finished trace opened by open_trace they are read once per open (and per selection
    made from it). A trace still being written, or opened by xr.open_zarr, is read each time."""
    import zarr

    from ecviz.analysis.common import bookkeeping, samples_done
    from ecviz.errors import DamagedTraceError

    p = write_synthetic_trace(tmp_path / "t.zarr", samples=10, steps=2, layers=2, experts=4, grid=4,
                              group_size=32, seed=5)
    ds = ecviz.open_trace(p)
    root = zarr.open_group(str(p), mode="r+")
    for name in ("done", "group_member_sample", "group_member_branch", "group_member_offset"):
        first = bookkeeping(ds, name)
        assert np.array_equal(first, root[name][...]) and not first.flags.writeable
        assert bookkeeping(ds, name) is first  # not read again
    picked = ds.isel(group=[3, 1])
    assert np.array_equal(bookkeeping(picked, "group_member_sample"), root["group_member_sample"][[3, 1]])
    groups = A.sample_groups(ds)
    plain = xr.open_zarr(p, consolidated=False)  # named by path, not by open: never kept
    assert np.array_equal(bookkeeping(plain, "group_member_sample"), root["group_member_sample"][...])
    expected = root["group_member_sample"][...]
    expected[0, 0] = 9  # the store changes on disk: an open made before keeps what it read, a new open sees it
    root["group_member_sample"][...] = expected
    assert bookkeeping(ds, "group_member_sample")[0, 0] != 9
    assert bookkeeping(ecviz.open_trace(p), "group_member_sample")[0, 0] == 9
    assert bookkeeping(xr.open_zarr(p, consolidated=False), "group_member_sample")[0, 0] == 9
    xr.testing.assert_identical(A.sample_groups(ds), groups)
    root.attrs["complete"] = False  # being written: its flags change under an open Dataset, read each time
    live = ecviz.open_trace(p)
    assert bookkeeping(live, "done").all()
    root["done"][8:] = False
    assert samples_done(live) == (8, 10)
    sub = A.subset(ds, [0, 1])  # in memory: a read-only view of it, the subset's own array untouched
    got = bookkeeping(sub, "group_member_sample")
    assert np.shares_memory(got, sub["group_member_sample"].values) and not got.flags.writeable
    assert sub["group_member_sample"].values.flags.writeable
    root.attrs["complete"] = True
    shard = next(f for f in (p / "group_member_offset" / "c").rglob("*") if f.is_file())
    shard.write_bytes(shard.read_bytes()[:5])  # damaged: raises, and nothing is kept that would hide it
    fresh = ecviz.open_trace(p)
    for _ in range(2):
        with pytest.raises(DamagedTraceError):
            bookkeeping(fresh, "group_member_offset")


def test_done_flags_that_cannot_be_listed_open_without_a_traceback(tmp_path):
    """Opening checks that every done batch's files are there; a flags directory that cannot be listed (here a
    file in its place) leaves those batches 'may be done' and their data checked, as before, not an OSError."""
    import shutil

    from ecviz.errors import DamagedTraceError

    p = write_synthetic_trace(tmp_path / "t.zarr", samples=10, steps=2, layers=2, experts=4, grid=4,
                              group_size=32, seed=6)
    shutil.rmtree(p / "done" / "c")
    (p / "done" / "c").write_bytes(b"x")
    ds = ecviz.open_trace(p)
    assert ds.sizes["sample"] == 10
    shard = next(f for f in (p / "dispatch" / "c").rglob("*") if f.is_file())
    shard.unlink()  # a batch that may be done lacks a file: named when read, not read back as fill values
    with pytest.raises(DamagedTraceError, match="missing or empty"):
        ecviz.open_trace(p).dispatch.values  # noqa: B018


def test_objects_vs_background_of_a_dense_trace_is_a_trace_error(syn):
    routed = ("dispatch", "gate", "group_member_sample", "group_member_branch", "group_member_offset",
              "expert_count", "gate_sum")
    dense = syn.drop_vars([v for v in routed if v in syn])
    dense.attrs = dict(syn.attrs, routing={"kind": "dense"})
    for statistic in (A.trace_object_vs_background, A.sample_groups, A.image_vs_group):  # not "record dispatch"
        with pytest.raises(TraceError, match="a dense model has no routing"):
            statistic(dense)


def test_the_ablation_summaries_the_docs_name_are_in_the_package():
    from ecviz.analysis import ablation

    assert A.ablation_summary is ablation.ablation_summary and A.ablation_by_word is ablation.ablation_by_word
    assert {"ablation_summary", "ablation_by_word"} <= set(A.__all__)
    assert all(hasattr(A, name) for name in A.__all__)


def test_bootstrap_intervals_resample_prompts_and_routing_groups_whole(syn):
    """Images of one prompt, or of one routing group, are not independent: a bootstrap that resampled single
    images called 4 copies of one image 4 observations. `image_clusters` joins images by prompt and by group
    (transitively), and region_ratio resamples those clusters whole: 10 clusters of 4 identical images give
    the interval of the 10 distinct images, about twice as wide as resampling the 40 one by one."""
    assert A.image_clusters(syn).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # groups of 2 images, 1 per prompt
    rng = np.random.default_rng(0)
    first = rng.uniform(1, 3, 10).repeat(4)  # (40,) experts per token on region one, 4 copies per cluster
    second = rng.uniform(1, 3, 10).repeat(4)
    left, right = np.r_[[1] * 4, [0] * 4], np.r_[[0] * 4, [1] * 4]  # (token,) the two regions
    count = xr.DataArray(first[:, None] * left + second[:, None] * right, dims=("sample", "token"))
    mask = xr.DataArray(np.tile(np.r_[[True] * 4, [False] * 4], (40, 1)), dims=("sample", "token"))
    clusters = np.arange(10).repeat(4)
    whole = A.region_ratio(count, mask, ~mask, "sample", ("a", "b"), n_boot=2000, clusters=clusters)
    single = A.region_ratio(count, mask, ~mask, "sample", ("a", "b"), n_boot=2000)
    distinct = A.region_ratio(count.isel(sample=slice(0, None, 4)), mask.isel(sample=slice(0, None, 4)),
                              ~mask.isel(sample=slice(0, None, 4)), "sample", ("a", "b"), n_boot=2000)
    width = {k: float(r.ratio_hi - r.ratio_lo) for k, r in (("whole", whole), ("single", single),
                                                            ("distinct", distinct))}
    assert float(whole.ratio) == pytest.approx(float(single.ratio)) and whole.attrs["clusters"] == 10
    assert width["whole"] == pytest.approx(width["distinct"], rel=0.15)
    assert width["whole"] > 1.6 * width["single"]
    ob = A.object_background(syn, n_boot=50)
    assert ob.attrs["clusters"] <= 5  # the trace's own clusters were used
    one = A.region_ratio(count, mask, ~mask, "sample", ("a", "b"), clusters=np.zeros(40, int))
    assert np.isfinite(float(one.ratio)) and np.isnan(float(one.ratio_lo)) and np.isnan(float(one.ratio_hi))


def test_figures_keep_their_scales_labels_and_panels_honest(syn, tmp_path):
    """What a figure's colour bar and axes say is what it shows: lift's white is 1 (it sat at 1.3-1.5 on the demo,
    drawing sharing pairs blue) on one scale for every block; Fig. 6a draws every sparse layer (it thinned them
    to 8); the expert maps share one scale white at 1 and the step map labels the recorded steps; a single
    step is drawn, not an empty plot; step=-1 is the last step everywhere; the report's probe "max" is the most
    any token got at any t (it was averaged over t); a metrics.jsonl cut mid-line still reads."""
    from ecviz.plots import figures as F
    from ecviz.plots.training import loss_curve, read_metrics

    cosel = A.coselection(syn).compute()
    fig = F.coselection_heatmap(cosel)
    norms = {im.norm for ax in fig.axes for im in ax.images}
    assert len(norms) == 1 and norms.pop().vcenter == 1.0
    F._plt().close(fig)

    many = xr.concat([syn.isel(layer=[0]).assign_coords(layer=[2 * i + 1]) for i in range(10)], "layer",
                     data_vars="minimal", coords="minimal", compat="override")
    fig = F.allocation_grid(many, 0, over="layer", step=-1)
    assert [ax.get_title() for ax in fig.axes[:-1]] == [f"block {2 * i + 1}" for i in range(10)]
    F._plt().close(fig)

    fig = F.expert_grid(syn, 2, step=1, layer=-1)  # a panel per expert, its tokens coloured, the rest clear
    E, taken = syn.sizes["expert"], A.expert_maps(syn, 2, step=1, layer=-1).taken.values
    assert [ax.get_title() for ax in fig.axes[:E]] == [f"expert {e}: {int(taken[e].sum())} tokens" for e in range(E)]
    assert all(np.array_equal(~ax.images[-1].get_array().mask, taken[e] > 0) for e, ax in enumerate(fig.axes[:E]))
    F._plt().close(fig)

    summary = A.routing_pass(syn).compute()
    fig = F.expert_position_maps(A.expert_positions(syn, summary=summary), layer=-1)
    assert len({im.norm for ax in fig.axes for im in ax.images}) == 1 and fig.axes[0].images[0].norm.vcenter == 1
    F._plt().close(fig)
    sub = syn.isel(step=[0, 2])
    fig = F.expert_step_map(A.expert_steps(sub, A.routing_pass(sub).compute()), layer=-1)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [str(v) for v in sub.step.values]
    F._plt().close(fig)

    one = A.settling(syn).similarity.isel(step=[-1])
    fig = F.curves(one, "step", "similarity")
    assert all(len(line.get_xdata()) == 1 and line.get_marker() == "o" for line in fig.axes[0].lines)
    F._plt().close(fig)
    stats = A.allocation_stats(syn).compute()
    for fig in (F.allocation_histogram(stats, step=np.int64(-1)), F.load_bars(A.expert_load(syn), step=-1)):
        F._plt().close(fig)

    probe = A.open_probe(Path(__file__).resolve().parents[1] / "checkpoints" / "ec-dit-shapes")
    from ecviz.report import write_report

    early = probe.isel(train_step=slice(0, 5))  # where the probe's timesteps disagree
    got = write_report(early, tmp_path / "rep")["allocation"]["max_experts"]
    most = A.allocation_stats(early)["max"].isel(train_step=-1)  # (t, layer)
    assert (most.max("t") > most.mean("t")).any()
    assert got == {str(int(k)): float(v) for k, v in zip(most.layer.values, most.max("t").values, strict=True)}

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 10, "loss": 0.5}\n{"step": 20, "loss": 0.4}\n{"step": 30, "lo')
    assert [r["step"] for r in read_metrics(metrics)] == [10, 20]
    loss_curve([metrics], tmp_path / "loss.png")
