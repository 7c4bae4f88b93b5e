"""Analyses of real traces of real (tiny) checkpoints: text importance, Shapes ground truth, `ecviz report`,
`ecviz ablate-words` and `ecviz probe-groups`, with their bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from helpers import assert_bad_input, draw_shapes, ecviz, ecviz_here
from PIL import Image
from scipy.stats import spearmanr

import ecviz as ev
from ecviz import analysis as A
from ecviz.errors import TraceError
from ecviz.report import remove_stale_figures
from ecviz.trace.run import TraceSettings, run_trace

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red circle", "a square left of a triangle", "three rings",
            "an orange cross and a white diamond"]


@pytest.fixture(scope="module")
def shapes_prompts(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("sp") / "shapes.txt"
    p.write_text("\n".join(CAPTIONS) + "\n")
    return p


@pytest.fixture(scope="module")
def traces(ckpts, shapes_prompts, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tr")
    out = {}
    for k in ("ec", "tc", "dense"):
        out[k] = root / f"{k}.zarr"
        run_trace(TraceSettings(ckpt=ckpts[k], prompts=shapes_prompts, out=out[k], steps=3, guidance=3.0,
                                images_per_prompt=2, batch_size=4, record=("dispatch", "cross_attn", "x0"),
                                progress=False))
    return out


def test_a_report_on_one_image_says_what_it_cannot_say(ckpts, shapes_prompts, tmp_path, capsys):
    """One image is one cluster, and a bootstrap over one cluster gives no interval: the report said "none"
    (no expert seeks objects) beside ratios of 4. An image without objects drew empty figures. Each now says
    why, in the notes and the tables, and draws nothing empty."""
    one = tmp_path / "one.zarr"
    run_trace(TraceSettings(ckpt=ckpts["ec"], prompts=shapes_prompts, out=one, steps=2, limit=1,
                            images_per_prompt=1, progress=False))
    drawn, blank = shutil.copytree(one, tmp_path / "drawn.zarr"), shutil.copytree(one, tmp_path / "blank.zarr")
    draw_shapes(drawn)
    root = zarr.open_group(str(blank), mode="r+")
    root["image"][...] = 1  # black (a stored 0 would be an empty chunk: damage): no object anywhere
    assert ecviz_here(capsys, "report", "--trace", drawn, "--out", tmp_path / "d").returncode == 0
    md = (tmp_path / "d" / "summary.md").read_text()
    assert "no interval (one cluster of prompts and routing groups)" in md and "| none |" not in md
    assert "objects vs background: no interval, the images make one cluster" in md
    r = ecviz_here(capsys, "report", "--trace", blank, "--out", tmp_path / "b")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert "expert_objects" in s["not_applicable"] and "objects_vs_background.png" not in s["figures"]
    assert "expert_objects.png" not in s["figures"]
    md = (tmp_path / "b" / "summary.md").read_text()
    assert "no image has both object and background tokens" in md and "no image has objects with both" in md


def test_text_importance_equals_a_loop(traces):
    ds = ev.open_trace(traces["ec"]).load()
    imp = A.text_importance(ds).compute()
    attn, tw = ds.cross_attn.values.astype(np.float64), ds.text_word.values  # (sample, step, block, token, text)
    count = ds.expert_count.sel(branch="cond").values.astype(np.float64)  # (sample, step, layer, token)
    layers = ds.layer.values.tolist()
    for s in (0, 3, 6):
        words = ds.prompt_word.values[s]
        assert list(imp.word_text.values[s][: len(CAPTIONS[s // 2].split())]) == CAPTIONS[s // 2].split()
        for st in range(ds.sizes["step"]):
            for li, block in enumerate(layers):
                c = count[s, st, li]
                for w in range(len(CAPTIONS[s // 2].split())):
                    amap = attn[s, st, block][:, tw[s] == w].sum(1)  # pieces of the word summed
                    want = (amap / amap.sum() * c).sum() / c.mean()
                    got = imp.importance.values[s, st, li, w]
                    assert got == pytest.approx(want, rel=1e-3), (s, words[w])
                    rho = spearmanr(amap, c).statistic
                    assert imp.correlation.values[s, st, li, w] == pytest.approx(rho, rel=1e-3, abs=1e-4)
        assert np.isnan(imp.importance.values[s, :, :, len(CAPTIONS[s // 2].split()):]).all()  # padding
    for fn in (A.text_importance, A.token_importance):  # cond attention against uncond compute, without a word
        with pytest.raises(TraceError, match="cross-attention is recorded for the conditional branch only"):
            fn(ds, branch="uncond")
    with pytest.raises(TraceError, match="conditional branch only"):
        A.word_scores(ds, 0, branch="uncond")


def test_word_regions_find_the_objects_of_true_renders():
    """On ground-truth Shapes renders, each word's region is its object's true mask (as patches)."""
    import xarray as xr

    from ecviz.data.shapes import ShapesDataset
    from ecviz.grid import patch_coverage
    from ecviz.shapes_eval import word_objects

    data = ShapesDataset(seed=3)
    items = [data.sample(i) for i in range(24)]
    W = 8
    wo = np.full((len(items), W), -1, np.int8)
    for i, it in enumerate(items):
        m = word_objects(it.caption)[0]
        wo[i, : len(m)] = m
    ds = xr.Dataset({"image": (("sample", "y", "x", "channel"), np.stack([it.image for it in items])),
                     "prompt": ("sample", np.array([it.caption for it in items], dtype=object)),
                     "word_object": (("sample", "word"), wo)}, attrs={"grid": [8, 8]})
    wr = A.word_regions(ds)
    checked = 0
    for i, it in enumerate(items):
        for w in range(W):
            k = wo[i, w]
            if k < 0 or not wr.found.values[i, w]:
                continue
            true = patch_coverage(it.masks[k][None], 8, 8)[0]
            got = wr.region.values[i, w]
            iou = np.minimum(true, got).sum() / np.maximum(true, got).sum()
            assert iou > 0.8, (it.caption, w, iou)
            checked += 1
    assert checked >= 20
    assert wr.found.values[wo >= 0].mean() > 0.9  # ShapesEval finds nearly every drawn object


def test_report_on_ec_tc_dense_traces_and_a_probe(traces, tmp_path, capsys):
    """`ecviz report` (its command line in this process) on each kind of trace and on a training probe."""
    for k in ("ec", "tc", "dense"):
        r = ecviz_here(capsys, "report", "--trace", traces[k], "--out", tmp_path / k)
        assert r.returncode == 0 and "warning" not in r.stderr, r.stderr  # panels without a word drew a warning
        s = json.loads((tmp_path / k / "summary.json").read_text())
        md = (tmp_path / k / "summary.md").read_text()
        for name in [line.split("(")[-1].rstrip(")") for line in md.splitlines() if line.startswith("![")]:
            png = np.asarray(Image.open(tmp_path / k / name).convert("L"))
            assert png.std() > 5, name  # a drawn figure, not a blank page
        if k == "dense":
            assert {"allocation", "text_importance"} <= set(s["not_applicable"])
            assert "word_object_attention" in s  # attention against the drawn objects still applies
            continue
        ds = ev.open_trace(traces[k])
        stats = A.allocation_stats(ds).isel(step=-1).compute()
        assert s["allocation"]["gini"]["1"] == pytest.approx(float(stats.gini.sel(layer=1)), abs=1e-5)
        assert s["allocation"]["skipped_share"]["1"] == pytest.approx(float(stats.skipped.sel(layer=1)), abs=1e-5)
        assert (tmp_path / k / "fig6a_layers.png").is_file() and (tmp_path / k / "fig6b_steps.png").is_file()
        assert "objects_vs_background" in s and "text_importance" in s
        ei = A.edge_interior(ds, n_boot=10).isel(step=-1)
        assert s["edges_vs_interior"]["ratio"]["1"] == pytest.approx(float(ei.ratio.sel(layer=1)), abs=1e-5)
        assert "Object outlines over their insides" in (tmp_path / k / "summary.md").read_text()
        eo = A.expert_objects(ds, n_boot=10).isel(step=-1)
        for var in ("object_coverage", "enrichment"):
            want = [None if not np.isfinite(v) else v for v in eo[var].sel(layer=1).values]
            assert s["expert_objects"][var]["1"] == pytest.approx(want, abs=1e-5), var
        assert "Which experts take the objects" in md and (tmp_path / k / "expert_objects.png").is_file()
        # which experts take each word's object: on a copy whose images hold a square ShapesEval finds
        drawn = tmp_path / f"{k}-drawn.zarr"
        shutil.copytree(traces[k], drawn)
        draw_shapes(drawn)
        assert ecviz_here(capsys, "report", "--trace", drawn, "--out", tmp_path / f"{k}-drawn").returncode == 0
        got = json.loads((tmp_path / f"{k}-drawn" / "summary.json").read_text())["expert_words"]["coverage"]
        layers = [int(b) for b in ds.layer.values]
        assert sorted(map(int, got)) == sorted({layers[0], layers[len(layers) // 2], layers[-1]})
        ew = A.expert_words(ev.open_trace(drawn), step=-1, layer=layers[-1])
        assert "square" in ew.word.values and sorted(got[str(layers[-1])]) == sorted(ew.word.values.tolist())
        for w, cover in got[str(layers[-1])].items():
            assert cover == pytest.approx([None if not np.isfinite(v) else v for v in ew.coverage.sel(word=w).values])
        assert (tmp_path / f"{k}-drawn" / "expert_words.png").is_file()
        # each word's attention on its object: the ratio of the mean inside to the mean chance, word by word
        drawn_ds = ev.open_trace(drawn)
        wa = A.word_object_attention(drawn_ds).mean(["step", "block"]).compute()
        lift = A.word_object_lift(drawn_ds, wa)
        assert len(lift) and list(lift.columns) == ["inside", "chance", "lift", "n"]
        words = np.array([str(w).lower() for w in wa["word_text"].values.ravel()]).reshape(wa["inside"].shape)
        for word, row in lift.iterrows():
            found = (words == word) & np.isfinite(wa["inside"].values)
            assert row["n"] == found.sum() > 0, word
            assert row["lift"] == pytest.approx(wa["inside"].values[found].mean() / wa["chance"].values[found].mean())
        if k == "tc":
            assert s["token_choice_drops"]["share"] == pytest.approx(
                float((ds.tc_expert < 0).mean()), abs=1e-5)
        else:
            assert s["load"]["every_expert_took_C_per_group"] is True
    # a report rewrites its own directory in place, removing the figures its predecessor listed and it did not
    ec = tmp_path / "ec"
    before = json.loads((ec / "summary.json").read_text())
    (ec / "old.png").write_bytes(b"an earlier report's")
    (ec / "summary.json").write_text(json.dumps(before | {"figures": [*before["figures"], "old.png"]}))
    assert ecviz_here(capsys, "report", "--trace", traces["ec"], "--out", ec).returncode == 0
    assert sorted(p.name for p in ec.glob("*.png")) == sorted(before["figures"])
    # but never another source's report, nor a folder of other files: a report replaced the summary.md of a
    # folder of notes, one into a run's checkpoint/ was deleted by the run's next save, and a trace's report and
    # a probe's of one name replaced each other in reports/NAME
    assert_bad_input(ecviz_here(capsys, "report", "--trace", traces["dense"], "--out", ec), "holds the report of",
                     Path(traces["ec"]).name)
    (ec / "notes.txt").write_text("mine")
    assert_bad_input(ecviz_here(capsys, "report", "--trace", traces["ec"], "--out", ec),
                     "holds 'notes.txt', which is not a report's file")
    assert sorted(p.name for p in ec.glob("*.png")) == sorted(before["figures"])
    ck = tmp_path / "run" / "checkpoint"
    ck.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "train_state.safetensors"):
        (ck / name).write_bytes(b"{}")
    assert_bad_input(ecviz_here(capsys, "report", "--trace", traces["ec"], "--out", ck), "'config.json'")
    assert sorted(p.name for p in ck.iterdir()) == ["config.json", "model.safetensors", "train_state.safetensors"]
    (ec / "notes.png").write_bytes(b"not ours")
    for odd in (5, None, [["a"]], {"x.png": 1}, ["notes.png", 3]):  # a summary.json not as a report writes it: a
        (ec / "summary.json").write_text(json.dumps({"figures": odd}))  # TypeError traceback before
        remove_stale_figures(ec, before["figures"])
        assert (ec / "notes.png").exists() == (odd != ["notes.png", 3])  # only named PNGs go
    r = ecviz_here(capsys, "report", "--trace", ROOT / "checkpoints" / "ec-dit-shapes", "--out", tmp_path / "probe")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "probe" / "summary.json").read_text())
    assert s["record"]["kind"] == "probe" and s["objects_vs_background"]["images"] == 8
    # the app's Training view's numbers: counts averaged over the probe's t, then the ratio and its interval
    want = A.object_background(A.open_probe(ROOT / "checkpoints" / "ec-dit-shapes"), mean_over=("t",))
    for k in ("ratio", "ratio_lo", "ratio_hi"):
        got = s["objects_vs_background"][k]
        assert got == {str(int(v)): pytest.approx(float(want[k].isel(train_step=-1).sel(layer=v)), rel=1e-6)
                       for v in want.layer.values}, k
    # load and token-choice drops of the trained model, at the last probe row as the allocation (they were the
    # maximum over all of training: the untrained step 0's)
    r = ecviz_here(capsys, "report", "--trace", ROOT / "checkpoints" / "tc-shapes", "--out", tmp_path / "tcprobe")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "tcprobe" / "summary.json").read_text())
    probe = A.open_probe(ROOT / "checkpoints" / "tc-shapes")
    last = A.expert_load(probe).isel(train_step=-1)
    assert s["load"]["imbalance_max"] == pytest.approx(float(last.imbalance.max()), rel=1e-5)
    assert s["load"]["imbalance_max"] < float(A.expert_load(probe).imbalance.max())
    share = A.token_choice_drops(probe).share
    assert s["token_choice_drops"]["share"] == pytest.approx(float(share.isel(train_step=-1).mean()), rel=1e-5)
    assert s["load"]["at"] == s["token_choice_drops"]["at"] == f"last train step ({int(probe.train_step[-1])})"


def test_report_bad_input(traces, tmp_path):
    assert_bad_input(ecviz("report", "--trace", tmp_path / "none.zarr", "--out", tmp_path / "o"), "not found")
    assert_bad_input(ecviz("report", "--trace", ROOT / "checkpoints" / "dense-shapes", "--out", tmp_path / "o"),
                     "a checkpoint without a training probe")  # it said "not an ecviz trace store"
    run = tmp_path / "run"  # a run's checkpoint/: the probe is the run's, one level up (it said "a dense model's")
    shutil.copytree(ROOT / "checkpoints" / "ec-dit-shapes", run / "checkpoint")
    (run / "checkpoint" / "routing.zarr").rename(run / "routing.zarr")
    assert_bad_input(ecviz("report", "--trace", run / "checkpoint", "--out", tmp_path / "o"),
                     "a run's checkpoint; its training probe is the run's", str(run))
    part = tmp_path / "part.zarr"
    shutil.copytree(traces["ec"], part)
    done = zarr.open_group(str(part), mode="r+")["done"]
    done[2:] = False
    assert_bad_input(ecviz("report", "--trace", part, "--out", tmp_path / "o"), "2 of 8 samples done")
    zarr.open_group(str(part), mode="r+").attrs["ecviz_schema_version"] = 99
    assert_bad_input(ecviz("report", "--trace", part, "--out", tmp_path / "o"), "schema version 99")
    (tmp_path / "file").write_text("x")
    assert_bad_input(ecviz("report", "--trace", traces["ec"], "--out", tmp_path / "file" / "sub"), "--out")
    assert not (tmp_path / "o").exists()
    with pytest.raises(TraceError, match="--record cross_attn"):
        A.text_importance(ev.open_trace(_without_cross_attn(traces["ec"], tmp_path)))


def test_a_failed_report_leaves_the_report_before_it_whole_and_never_writes_into_a_store(traces, tmp_path, capsys):
    """Figures were saved into --out section by section: a report refused midway (a trace lacking `dispatch`)
    left its predecessor's summary beside some of its own figures. They are made aside and moved in at the end.
    An --out inside a trace store, or one that is a store, is refused (its readers would meet strangers)."""
    import shutil

    out = tmp_path / "rep"
    broken = shutil.copytree(traces["ec"], tmp_path / "broken.zarr")
    assert ecviz_here(capsys, "report", "--trace", broken, "--out", out).returncode == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    shutil.rmtree(broken / "dispatch")
    attrs = zarr.open_group(str(broken), mode="r+").attrs  # as if recorded without it: a section fails midway
    attrs["variables"] = [v for v in attrs["variables"] if v != "dispatch"]
    assert_bad_input(ecviz_here(capsys, "report", "--trace", broken, "--out", out), "needs `dispatch`")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind
    shutil.rmtree(tmp_path / "broken.zarr")  # lost, not left out: the store is damaged, and says so
    shutil.copytree(traces["ec"], broken)
    shutil.rmtree(broken / "dispatch")
    assert_bad_input(ecviz_here(capsys, "report", "--trace", broken, "--out", out), "lacks `dispatch`", "damaged")
    store = shutil.copytree(traces["ec"], tmp_path / "store.zarr")
    assert_bad_input(ecviz_here(capsys, "report", "--trace", store, "--out", store / "rep"), "inside the Zarr store")
    assert_bad_input(ecviz_here(capsys, "report", "--trace", store, "--out", store), "is a Zarr store")
    assert not (store / "rep").exists() and not (store / "summary.json").exists()


def _without_cross_attn(src: Path, tmp: Path) -> Path:
    import shutil

    dst = tmp / "nocross.zarr"
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "cross_attn")
    attrs = zarr.open_group(str(dst), mode="r+").attrs  # as recorded without it (else: a damaged store)
    attrs["variables"] = [v for v in attrs["variables"] if v != "cross_attn"]
    return dst


def test_an_ablation_store_has_one_writer(ckpts, shapes_prompts, tmp_path):
    """ablate-words took no writer lock: two runs on one --out both said "wrote", the second's store silently
    replacing the first's, and a killed one's temporary stayed beside the store for good."""
    from ecviz.lock import writing

    out = tmp_path / "abl.zarr"
    (tmp_path / ".abl.zarr.0123456789ab.tmp").mkdir()  # what a run killed mid-write left
    argv = ["ablate-words", "--ckpt", ckpts["ec"], "--prompts", shapes_prompts, "--out", out, "--limit", 1,
            "--steps", 2, "--quiet"]
    with writing(out):
        assert_bad_input(ecviz(*argv), "is being written by")
    assert not out.exists()
    ecviz(*argv, check=True)
    assert out.is_dir() and not (tmp_path / ".abl.zarr.0123456789ab.tmp").exists()


def test_ablating_nothing_reproduces_the_trace_and_words_change_allocation(ckpts, shapes_prompts, tmp_path):
    S = 16
    out = tmp_path / "abl.zarr"
    r = ecviz("ablate-words", "--ckpt", ckpts["ec"], "--prompts", shapes_prompts, "--out", out, "--limit", 2,
              "--steps", 3, "--guidance", 3.0, "--quiet")
    assert r.returncode == 0, r.stderr
    from ecviz.trace.ablation import open_ablation

    abl = open_ablation(out).load()
    assert abl.variant_word.values[0].tolist()[:3] == [-1, 0, 1]  # original, then "a", "red", "circle"
    assert abl.attrs["guidance"] == 3.0 and abl.attrs["ecviz_ablation_version"] == 3
    assert abl.attrs["capacity_factor"] == 2  # the checkpoint's own f_c, recorded
    meta = json.loads((out / "zarr.json").read_text())  # as version 1 wrote it: the guidance scale under `cfg`
    meta["attributes"] |= {"ecviz_ablation_version": 1, "cfg": meta["attributes"].pop("guidance")}
    (out / "zarr.json").write_text(json.dumps(meta))
    assert open_ablation(out).attrs["guidance"] == 3.0
    tr = tmp_path / "one.zarr"
    run_trace(TraceSettings(ckpt=ckpts["ec"], prompts=shapes_prompts, out=tr, steps=3, guidance=3.0, limit=2,
                            group_size=S, batch_size=1, progress=False))
    t = ev.open_trace(tr)
    # the unablated variant is exactly the traced sample: same seed rule, a group of one image
    assert np.array_equal(abl.image.values[:, 0], t.image.values)
    assert np.array_equal(abl.expert_count.values[:, 0], t.expert_count.sel(branch="cond").values)
    c = abl.expert_count.values.astype(float)
    for s in range(2):
        for v, w in enumerate(abl.variant_word.values[s]):
            if w >= 0:
                want = np.abs(c[s, v] - c[s, 0]).mean() / c[s, 0].mean()
                assert abl.alloc_change.values[s, w] == pytest.approx(want, rel=1e-5)
    assert np.nanmax(abl.alloc_change.values) > 0


def test_a_group_of_one_image_routes_the_same_whatever_its_partners(ckpts):
    from ecviz.checkpoint import load_checkpoint
    from ecviz.experiments import _run, choices, inference_group
    from ecviz.pipeline import Pipeline

    model, _ = load_checkpoint(ckpts["ec"])
    pipe = Pipeline.from_model(model)
    y, mask, _ = pipe.encode_text(CAPTIONS)
    S = model.cfg.tokens
    with inference_group(model, S):
        _, a = _run(pipe, y, mask, [1, 2, 3, 4], 2, 3.0, [0, 1, 2, 3], S)
        order = [2, 0, 3, 1]
        _, b = _run(pipe, y[order], mask[order], [3, 1, 4, 2], 2, 3.0, [0, 1, 2, 3], S)
    ca, cb = choices(a, 8, S)[:4], choices(b, 8, S)[:4]
    assert np.array_equal(ca[order], cb)
    with inference_group(model, 2 * S):  # with partners, routing depends on them
        _, c = _run(pipe, y, mask, [1, 2, 3, 4], 2, 3.0, [0, 1, 2, 3], 2 * S)
        _, d = _run(pipe, y[order], mask[order], [3, 1, 4, 2], 2, 3.0, [0, 1, 2, 3], 2 * S)
    assert not np.array_equal(choices(c, 8, S)[:4][order], choices(d, 8, S)[:4])
    assert torch.is_grad_enabled()  # _run left autograd as it found it


def test_other_partners_are_other_partners_for_every_sample():
    """The shuffled order was compared group by group with the group in the same place, so an order that moved
    a whole group ([3, 2, 0, 1] for groups {0, 1}, {2, 3}) passed: those samples kept their partners, and the
    "usual vs other" change came out 0% (seed 2, 4 prompts) or diluted. Every sample now gets a new partner."""
    from ecviz.experiments import derangement, partners

    assert partners(np.array([3, 2, 0, 1]), 2) == partners(np.arange(4), 2)  # the order that used to pass
    for n, per_group in ((4, 2), (8, 2), (6, 3), (8, 4), (12, 4)):
        usual = partners(np.arange(n), per_group)
        for seed in range(100):
            order = derangement(n, per_group, seed)
            assert sorted(order) == list(range(n))
            assert all(a != b for a, b in zip(partners(order, per_group), usual, strict=True)), (n, per_group, seed)


def test_probe_groups_cli(ckpts, shapes_prompts, tmp_path):
    r = ecviz("probe-groups", "--ckpt", ckpts["ec"], "--prompts", shapes_prompts, "--limit", 4, "--steps", 2,
              "--json", tmp_path / "g.json")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "g.json").read_text())
    assert res["samples"] == 4 and res["images_per_group"] == 2
    assert 0 < res["usual_vs_other"]["choices_changed"] <= 1
    assert_bad_input(ecviz("probe-groups", "--ckpt", ckpts["dense"], "--prompts", shapes_prompts),
                     "dense model")
    assert_bad_input(ecviz("probe-groups", "--ckpt", ckpts["ec"], "--prompts", shapes_prompts, "--limit", 3),
                     "needs at least 4 prompts", "--limit 3 takes 3")  # one group: partners cannot change


def test_ablation_takes_the_words_the_word_dimension_holds(ckpts, tmp_path, capsys):
    """Words without tokens (combining marks) still count as words, so with 20 of them first the caption's own
    words lay past the word dimension (text_len, 16 here) and ablate-words ended, after sampling everything, in
    an IndexError. It ablates the words the dimension holds, as a trace stores them."""
    prompts = tmp_path / "marks.txt"
    prompts.write_text("\u0301 " * 12 + "a red circle\n")  # words 12-14 have tokens, 15 and on would not fit
    out = tmp_path / "abl.zarr"
    r = ecviz_here(capsys, "ablate-words", "--ckpt", ckpts["ec"], "--prompts", prompts, "--out", out, "--steps", 1,
                   "--quiet")
    assert r.returncode == 0, r.stderr
    from ecviz.trace.ablation import open_ablation

    assert open_ablation(out).variant_word.values[0].tolist() == [-1, 12, 13, 14]
    prompts.write_text("\u0301 " * 20 + "a red circle\n")
    r = ecviz_here(capsys, "ablate-words", "--ckpt", ckpts["ec"], "--prompts", prompts, "--out", out, "--steps", 1,
                   "--quiet", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert open_ablation(out).variant_word.values[0].tolist() == [-1]


def test_a_report_takes_its_trace_as_an_argument_and_writes_under_reports_by_default(traces, tmp_path, capsys,
                                                                                      monkeypatch):
    """`ecviz report traces/NAME.zarr` writes reports/NAME (as the demo does), a run's probe reports/RUN-training;
    the trace given both ways, or not at all, is one line."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(traces["ec"], tmp_path / "traces" / "mine.zarr")
    r = ecviz_here(capsys, "report", "traces/mine.zarr")
    assert r.returncode == 0 and "to reports/mine" in r.stdout, r
    assert "  not applicable: token_choice_drops: expert choice drops nothing" in r.stdout  # with the reason
    assert json.loads((tmp_path / "reports" / "mine" / "summary.json").read_text())["figures"]
    from ecviz.report import default_out

    assert default_out(ROOT / "checkpoints" / "ec-dit-shapes" / "routing.zarr") == Path(
        "reports/ec-dit-shapes-training")
    assert default_out(ROOT / "checkpoints" / "ec-dit-shapes") == Path("reports/ec-dit-shapes-training")
    assert default_out(tmp_path / "runs" / "mine") == Path("reports/mine")  # no probe there: a name as given
    assert_bad_input(ecviz_here(capsys, "report", "a.zarr", "--trace", "b.zarr"), "the trace is given twice")
    assert_bad_input(ecviz_here(capsys, "report"), "no trace: ecviz report TRACE")
    assert_bad_input(ecviz_here(capsys, "report", "/"), "no name to write its report under; give --out")


def test_objects_draw_compute_is_spearman_within_routing_groups(traces, ckpts, shapes_prompts, tmp_path, capsys):
    """Across images that shared a routing group: Spearman's rho between each image's experts per token over its
    group's mean and its foreground share over its partners' mean, computed here image by image from the stored
    counts and pixels; the interval holds it; the report tabulates it; groups of one image say why not."""
    from scipy.stats import spearmanr

    ds = ev.open_trace(traces["ec"]).load()
    got = A.objects_draw_compute(ds, n_boot=300)
    where = A.sample_groups(ds).sel(branch="cond")
    count = ds.expert_count.sel(branch="cond").values.astype(np.float64).mean(-1)  # (sample, step, layer)
    area = (ds.image.values >= 64).any(-1).mean((1, 2))  # the foreground share of each image's pixels
    groups = where.group.values
    used = np.flatnonzero((where.partners.values > 1) & ~where.filler.values)
    assert got.attrs["n"] == len(used) == ds.sizes["sample"] > 3
    excess = np.stack([count[i] - count[used[groups[used] == groups[i]]].mean(0) for i in used])
    rel = np.array([area[i] - area[used[groups[used] == groups[i]]].mean() for i in used])
    for s in range(ds.sizes["step"]):
        for j in range(ds.sizes["layer"]):
            want = spearmanr(excess[:, s, j], rel).statistic
            assert float(got.rho.isel(step=s, layer=j)) == pytest.approx(want, abs=1e-5)
    inside = (got.rho_lo <= got.rho + 1e-6) & (got.rho <= got.rho_hi + 1e-6)
    assert bool(inside.all()), got
    # a subset that leaves out sample 1 leaves its partner without one: only whole groups count
    partner = int(used[(groups[used] == groups[1]) & (used != 1)][0])
    assert A.objects_draw_compute(A.subset(ds, [i for i in range(ds.sizes["sample"]) if i != 1]),
                                  n_boot=10).attrs["n"] == len(used) - 2 and partner != 1
    with pytest.raises(TraceError, match="0 of the 4 images here that shared a routing group have all their "):
        A.objects_draw_compute(A.subset(ds, [0, 2, 4, 6]))  # one image of each pair (groups of two in order)
    out = tmp_path / "r"
    assert ecviz_here(capsys, "report", traces["ec"], "--out", out).returncode == 0
    s = json.loads((out / "summary.json").read_text())["objects_draw_compute"]
    assert s["images"] == len(used) and s["rho"]["1"] == pytest.approx(float(got.rho.isel(step=-1).sel(layer=1)),
                                                                        abs=1e-5)
    assert "### Images that shared a routing group" in (out / "summary.md").read_text()
    # each image routed alone (a group of its own tokens): no partner to take compute from
    alone = tmp_path / "alone.zarr"
    run_trace(TraceSettings(ckpt=ckpts["ec"], prompts=shapes_prompts, out=alone, steps=2, images_per_prompt=2,
                            group_size=int(np.prod(ds.attrs["grid"])), progress=False))
    with pytest.raises(TraceError, match="0 images shared a routing group with another image"):
        A.objects_draw_compute(ev.open_trace(alone))
    assert ecviz_here(capsys, "report", alone, "--out", tmp_path / "a").returncode == 0
    na = json.loads((tmp_path / "a" / "summary.json").read_text())["not_applicable"]
    assert na["objects_draw_compute"].startswith("0 images shared a routing group")
