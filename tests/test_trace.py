"""Routing traces on real Zarr stores: invariants, multi-process equality, kill and resume, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from helpers import assert_bad_input, ecviz, ecviz_here, make_checkpoint

import ecviz as ev
from ecviz.checkpoint import load_checkpoint
from ecviz.trace import record
from ecviz.trace.run import TraceSettings, run_trace


def trace(ckpt, prompts, out, **kw) -> xr.Dataset:
    kw = {"steps": 3, "guidance": 3.0, "images_per_prompt": 2, "batch_size": 4, "progress": False} | kw
    run_trace(TraceSettings(ckpt=ckpt, prompts=prompts, out=out, **kw))
    return ev.open_trace(out).load()


def recount(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(expert_count, gate_sum) rebuilt by hand from dispatch, gate and the recorded group members only."""
    seg = min(ds.sizes["token"], ds.attrs["routing"]["group_size"])
    count = np.zeros(ds.expert_count.shape, np.int64)  # (sample, branch, step, layer, token)
    gates = np.zeros(ds.expert_count.shape, np.float64)
    d, w = ds.dispatch.values, ds.gate.values.astype(np.float64)  # (group, step, layer, expert, slot)
    for g in range(ds.sizes["group"]):
        for v in np.unique(d[g][d[g] >= 0]):
            m = v // seg
            sample = ds.group_member_sample.values[g, m]
            if sample < 0:
                continue
            branch = ds.group_member_branch.values[g, m]
            token = ds.group_member_offset.values[g, m] + v % seg
            count[sample, branch, :, :, token] += (d[g] == v).sum(axis=(-1, -2))
            gates[sample, branch, :, :, token] += np.where(d[g] == v, w[g], 0).sum(axis=(-1, -2))
    return count, gates


def test_ec_trace_invariants(ckpts, prompt_file, tmp_path):
    ds = trace(ckpts["ec"], prompt_file, tmp_path / "ec.zarr", record=("dispatch", "cross_attn", "affinity", "x0"))
    r = ds.attrs["routing"]
    C, g, E = r["capacity"], r["group_size"], r["experts"]
    assert (C, g, E) == (16, 32, 4) and ds.sizes["slot"] == C
    assert ds.sizes["sample"] == 10 and bool(ds.done.all()) and ds.attrs["complete"]
    d = ds.dispatch.values
    # every expert holds exactly C distinct tokens of its group, at every step and layer
    assert d.min() >= 0 and d.max() < g
    srt = np.sort(d, axis=-1)
    assert (np.diff(srt, axis=-1) > 0).all()
    count, gate_sum = recount(ds)
    assert np.array_equal(ds.expert_count.values, count)
    assert np.allclose(ds.gate_sum.values.astype(np.float64), gate_sum, atol=5e-3)
    # every slot is accounted for: Σ counts over all tokens = groups·E·C at each step and layer
    per_step = ds.expert_count.sum(("sample", "branch", "token"))
    assert (per_step == ds.sizes["group"] * E * C).all()
    assert ds.expert_count.min() < ds.expert_count.max() <= E  # heterogeneous compute per token
    # the conditional and unconditional branches of one sample route differently (guidance is on)
    assert not np.array_equal(ds.expert_count.sel(branch="cond").values, ds.expert_count.sel(branch="uncond").values)
    # affinities are the router softmax; gates are the affinities of chosen tokens
    assert np.allclose(ds.affinity.values.astype(np.float32).sum(-1), 1, atol=1e-2)
    # cross attention: rows sum to 1 over real text tokens, 0 on padding
    ca = ds.cross_attn.values.astype(np.float32)
    mask = ds.text_mask.values
    assert np.allclose(ca.sum(-1), 1, atol=1e-2)
    assert np.abs(ca * ~mask[:, None, None, None, :]).max() == 0
    assert ds.x0.shape == (10, 3, 16, 16, 3)
    assert list(ds.text_token.values[0][mask[0]]) == ["[CLS]", "a", "red", "circle", "[SEP]"]
    assert ds.text_word.values[0][mask[0]].tolist() == [-1, 0, 1, 2, -1] and (ds.text_word.values[~mask] == -1).all()
    assert ds.prompt_word.values[2][:8].tolist() == "a blue square left of a green triangle".split()
    assert ds.prompt_word.values[2][8] == "" and "word_object" not in ds  # "three yellow stars" is no Shapes caption
    assert list(ds.prompt.values[:4]) == ["a red circle"] * 2 + ["a blue square left of a green triangle"] * 2
    assert list(ds.prompt.values[6:8]) == ["  a purple heart  "] * 2  # exact text
    assert list(ds.image_index.values) == [0, 1] * 5
    assert len(set(ds.seed.values.tolist())) == 10
    assert ds.t.values.tolist() == pytest.approx([0, 1 / 3, 2 / 3])
    assert ds.layer.values.tolist() == [1] and ds.row.values.tolist()[:5] == [0, 0, 0, 0, 1]
    attrs = ds.attrs
    assert attrs["ecviz_schema_version"] == ev.trace.SCHEMA_VERSION and attrs["model_config"]["routing"] == "ec"
    assert attrs["sampler"]["steps"] == 3 and attrs["prompt_file"] == "shapes.txt"
    assert len(attrs["checkpoint_sha256"]) == 64


def test_trace_matches_a_direct_forward(ckpts, prompt_file, tmp_path):
    """The recorded dispatch is what the model decided: replay step 0 of sample 0's group by hand."""
    ds = trace(ckpts["ec"], prompt_file, tmp_path / "a.zarr", guidance=1.0, images_per_prompt=1, limit=2)
    model, _ = load_checkpoint(ckpts["ec"])
    from ecviz.pipeline import Pipeline

    pipe = Pipeline.from_model(model)
    y, mask, _ = pipe.encode_text(list(ds.prompt.values))
    from ecviz.flow import noise_for

    x = noise_for(ds.seed.values.tolist(), (3, 16, 16))
    seen = []
    with torch.no_grad(), ev.trace.record(model, steps=[0], n_steps=1) as rec:
        from ecviz.trace.record import BatchLayout

        rec.begin(BatchLayout(np.array([0, 1]), 1, 0), 32)
        model(x, torch.zeros(2), y, mask)
        seen.append(rec.end())
    assert np.array_equal(seen[0].dispatch[:, 0], ds.dispatch.values[:, 0])


@pytest.mark.parametrize("kind", ["ec", "tc"])
def test_deferred_host_copies_record_the_same(ckpts, kind):
    """What a GPU does (copies started in the hooks, written into the buffers once per step) records exactly
    what copying at once does: every variable, every step, guidance on."""
    from ecviz.flow import euler_sample
    from ecviz.trace.record import BatchLayout

    model, _ = load_checkpoint(ckpts[kind])
    c = model.cfg
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=g)
    y, mask = torch.randn(2, c.text_len, c.text_dim, generator=g), torch.ones(2, c.text_len, dtype=torch.bool)
    out, in_flight = [], []
    for defer in (False, True):
        with torch.no_grad(), record(model, ("dispatch", "affinity", "cross_attn"), n_steps=3, defer=defer) as rec:
            rec.begin(BatchLayout(np.arange(2), 2, 0), c.infer_group)

            def step(s, rec=rec):
                in_flight.append(len(rec.pending))  # copies waiting for the step's end
                rec.on_step(s)

            euler_sample(model, x, y, mask, steps=3, guidance=3.0, callback=step)
            out.append(rec.end().arrays())
    assert in_flight[:3] == [0, 0, 0] and min(in_flight[3:]) > 0
    (a, ga), (b, gb) = out
    assert a.keys() == b.keys() and ga.keys() == gb.keys() and {"affinity", "cross_attn", "expert_count"} <= set(a)
    assert all(np.array_equal(a[k], b[k]) for k in a) and all(np.array_equal(ga[k], gb[k]) for k in ga)
    assert (a["expert_count"] > 0).any()


def test_masked_forward_routing_maps_back_to_image_positions():
    """MaskDiT forwards route kept tokens only: the recorder puts their experts back at image positions, each
    forward's through its own kept tokens, also for a training forward that builds gradients."""
    from ecviz.hooks import hooks
    from ecviz.model import DiT, preset
    from ecviz.trace.record import BatchLayout

    torch.manual_seed(0)
    model = DiT(preset("EC-DiT-tiny-4E")).train()
    c, B = model.cfg, 4  # 16 tokens per image, 8 kept: one routing group of 32 spans all four
    S, kept = c.tokens, c.tokens // 2
    keeps = [torch.rand(B, S).argsort(-1)[:, :kept].sort(-1).values for _ in range(2)]  # (B, S') each
    raw = {"group": [], "dispatch": []}
    with record(model, steps=[0, 1]) as rec, hooks(model, {
            "blocks.1.moe.hook_group": lambda v, n: raw["group"].append(v.clone()),
            "blocks.1.moe.hook_dispatch": lambda v, n: raw["dispatch"].append(v.clone())}):
        rec.begin(BatchLayout(np.arange(B), 1, 0), c.group_size, kept=kept)
        for step, keep in enumerate(keeps):
            with torch.set_grad_enabled(step == 1):  # the second as a training step: with gradients
                out = model(torch.randn(B, 3, 16, 16), torch.rand(B), torch.randn(B, c.text_len, c.text_dim),
                            torch.ones(B, c.text_len, dtype=torch.bool), keep=keep)
            assert out.requires_grad == (step == 1)
        arrays, groups = rec.end().arrays()
    for step, keep in enumerate(keeps):
        count = arrays["expert_count"][:, 0, step, 0]  # (B, S)
        seen = raw["group"][step].gather(1, raw["dispatch"][step].flatten(1)).flatten()  # kept order b·S' + s'
        image, rank = seen // kept, seen % kept
        want = np.bincount((image * S + keep[image, rank]).numpy(), minlength=B * S).reshape(B, S)
        assert np.array_equal(count, want) and count.sum() == B * kept * c.capacity_factor, step
        hidden = np.ones((B, S), bool)
        hidden[np.arange(B)[:, None], keep.numpy()] = False
        assert count[hidden].sum() == 0 and count[~hidden].max() > 0, step
    assert groups["dispatch"].shape[0] == 1 and groups["group_member_sample"].tolist() == [[0, 1, 2, 3]]
    assert groups["group_member_offset"].tolist() == [[0, 0, 0, 0]]  # offsets count kept tokens


def test_token_choice_and_dense_traces(ckpts, prompt_file, tmp_path):
    tc = trace(ckpts["tc"], prompt_file, tmp_path / "tc.zarr", limit=2)
    kept = (tc.tc_expert.values >= 0).sum(-1)
    assert np.array_equal(kept, tc.expert_count.values)
    assert (tc.dispatch.values >= -1).all() and tc.attrs["routing"]["kind"] == "tc"
    assert tc.tc_expert.shape[-1] == 2
    dense = trace(ckpts["dense"], prompt_file, tmp_path / "dense.zarr", limit=2, record=("dispatch", "cross_attn"))
    assert "dispatch" not in dense and "expert_count" not in dense and "cross_attn" in dense
    assert bool(dense.done.all())
    # bfloat16 on the CPU: autocast leaves attention in bfloat16, which numpy lacks (a TypeError traceback)
    bf = trace(ckpts["ec"], prompt_file, tmp_path / "bf16.zarr", limit=2, steps=2, dtype="bfloat16",
               record=("dispatch", "cross_attn"))
    attn = bf.cross_attn.values.astype(np.float32)  # (sample, step, block, token, text): rows sum to 1
    assert bool(bf.done.all()) and np.allclose(attn.sum(-1), 1, atol=0.03)


def test_record_detaches_hooks_on_error(ckpts):
    model, _ = load_checkpoint(ckpts["ec"])
    with pytest.raises(RuntimeError, match="boom"), record(model, n_steps=1):
        assert any(p._forward_hooks for p in model.hook_points.values())
        raise RuntimeError("boom")
    assert not any(p._forward_hooks for p in model.hook_points.values())


def test_plain_xarray_opens_a_trace_without_warnings(ckpts, prompt_file, tmp_path):
    trace(ckpts["ec"], prompt_file, tmp_path / "x.zarr", limit=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(tmp_path / "x.zarr", consolidated=False)
        assert ds.prompt.dtype.kind in "OT" and ds.expert_count.dtype == np.uint8
        assert set(ds.coords) >= {"step", "t", "layer", "token", "row", "col", "branch"}
        assert ds.expert_count.encoding["chunks"][0] == 1 and ds.dispatch.encoding["chunks"][0] == 1
        # one shard per writer batch: 4 samples (2 images of the prompt, rounded to whole groups), 4 groups
        assert ds.expert_count.encoding["shards"][0] == 4 and ds.dispatch.encoding["shards"][0] == 4


def test_group_part_of_an_image(ckpts, prompt_file, tmp_path):
    """Groups of 8 tokens (half an image) record their members' token offsets."""
    ds = trace(ckpts["ec"], prompt_file, tmp_path / "half.zarr", group_size=8, limit=1, guidance=1.0)
    assert ds.sizes["member"] == 1 and ds.group_member_offset.values[:4, 0].tolist() == [0, 8, 0, 8]
    assert np.array_equal(ds.expert_count.values, recount(ds)[0])


def test_two_process_torchrun_equals_one_process(ckpts, prompt_file, tmp_path):
    args = ["--ckpt", ckpts["ec"], "--prompts", prompt_file, "--steps", 2, "--images-per-prompt", 2,
            "--batch-size", 2, "--record", "dispatch,cross_attn", "--quiet"]
    ecviz("trace", *args, "--out", tmp_path / "one.zarr", check=True)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(29500 + os.getpid() % 1000), "-m", "ecviz", "trace", *map(str, args),
                        "--out", str(tmp_path / "two.zarr")], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout and "10 written now" in r.stdout
    one, two = ev.open_trace(tmp_path / "one.zarr").load(), ev.open_trace(tmp_path / "two.zarr").load()
    xr.testing.assert_identical(one, two)


def test_killed_run_resumes_to_the_same_store(ckpts, prompt_file, tmp_path):
    args = ["--ckpt", ckpts["ec"], "--prompts", prompt_file, "--steps", 20, "--images-per-prompt", 4,
            "--batch-size", 2, "--quiet"]
    ecviz("trace", *args, "--out", tmp_path / "full.zarr", check=True)
    out = tmp_path / "killed.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "ecviz", "trace", *map(str, args), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            done = int(zarr.open_group(str(out), mode="r")["done"][:].sum())
        except Exception:
            done = 0
        if done >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = ev.open_trace(out).load()
    n_done = int(partial.done.sum())
    assert 0 < n_done < 20, "the kill should land mid-run"
    full = ev.open_trace(tmp_path / "full.zarr").load()
    per_sample = [v for v in full.data_vars if "sample" in full[v].dims]
    for i in np.flatnonzero(partial.done.values):  # nothing marked done is missing data
        xr.testing.assert_identical(partial[per_sample].isel(sample=i).drop_attrs(deep=False),
                                    full[per_sample].isel(sample=i).drop_attrs(deep=False))
    (out / "image" / "leftover.partial").write_bytes(b"x")  # what a killed writer may leave
    summary = run_trace(TraceSettings(ckpt=ckpts["ec"], prompts=prompt_file, out=out, steps=20, images_per_prompt=4,
                                      batch_size=2, progress=False))  # the rerun, in process: its summary
    assert 20 - n_done <= summary["written"] < 20 and summary["skipped_done"] == 20 - summary["written"]
    assert not list(out.rglob("*.partial"))
    xr.testing.assert_identical(ev.open_trace(out).load(), full)


def shard(store: Path, name: str, batch: int) -> Path:
    """The file holding writer batch `batch` of a variable (one shard per batch along sample or group)."""
    top = store / name / "c" / str(batch)
    return top if top.is_file() else next(f for f in top.rglob("*") if f.is_file())


def test_damaged_chunks_are_named_and_a_rerun_repairs_them_to_the_reference(ckpts, prompt_file, tmp_path):
    """A finished store with a truncated shard, altered bytes inside a chunk, a removed file and an emptied one:
    open_trace and `--verify` name the damaged samples (one line, status 2, the remedy), undamaged samples still
    read, and the rerun with the same arguments computes exactly those batches again, equal to an undamaged run."""
    args = ["--ckpt", ckpts["ec"], "--prompts", prompt_file, "--steps", 2, "--images-per-prompt", 2,
            "--batch-size", 2, "--record", "dispatch,x0", "--quiet"]
    ref, out = tmp_path / "ref.zarr", tmp_path / "damaged.zarr"
    ecviz("trace", *args, "--out", ref, check=True)
    shutil.copytree(ref, out)  # 10 samples in 5 batches of 2: batch b holds samples 2b, 2b + 1
    f = shard(out, "image", 1)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated (a disk full, a copy cut short)
    f = shard(out, "expert_count", 3)
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x40  # one bit inside a chunk's compressed bytes
    f.write_bytes(bytes(data))
    shard(out, "dispatch", 4).unlink()  # a removed file: zarr alone reads it back as fill values
    shard(out, "prompt", 0).write_bytes(b"")  # an emptied file: the same

    assert ev.trace.verify_trace(out) == [0, 1, 2, 3, 6, 7, 8, 9]
    ds = ev.open_trace(out)
    xr.testing.assert_identical(ds.isel(sample=[4, 5]).image.load(), ev.open_trace(ref).isel(sample=[4, 5]).image)
    with pytest.raises(ev.trace.DamagedTraceError, match="rerun ecviz trace with the same arguments") as e:
        ds.expert_count.isel(sample=slice(6, 8)).values  # noqa: B018
    assert e.value.samples == [6, 7] and "cannot read `expert_count`" in str(e.value)
    assert "its checksum does not match" in str(e.value) and "Stored:" not in str(e.value)  # no raw bytes
    with pytest.raises(ev.trace.DamagedTraceError) as e:
        ds.dispatch.values  # noqa: B018  (missing: known at open, never read back as -1)
    assert e.value.samples == [8, 9]
    with pytest.raises(ev.trace.DamagedTraceError) as e:
        ev.open_trace(out, verify=True)
    assert e.value.samples == [0, 1, 2, 3, 6, 7, 8, 9]
    assert_bad_input(ecviz("trace", *args, "--out", out, "--verify"), "samples 0-3, 6-9",
                     "rerun ecviz trace with the same arguments to repair")

    summary = run_trace(TraceSettings(ckpt=ckpts["ec"], prompts=prompt_file, out=out, steps=2, images_per_prompt=2,
                                      batch_size=2, record=("dispatch", "x0"), progress=False))
    assert (summary["written"], summary["skipped_done"], summary["repaired"]) == (8, 2, [0, 1, 2, 3, 6, 7, 8, 9])
    repaired = ev.open_trace(out, verify=True).load()
    xr.testing.assert_identical(repaired, ev.open_trace(ref).load())
    assert repaired.attrs["complete"] is True
    r = ecviz("trace", *args, "--out", out, "--verify", check=True)
    assert "no damage" in r.stdout


def test_a_short_last_batch_is_repaired_alone(ckpts, prompt_file, tmp_path):
    """10 samples in batches of 4, 4 and 2: the last batch holds fewer routing groups. Damage to it alone is
    named as its samples, and the repair takes out its shards only: the other batches keep theirs, and the
    rerun ends equal to the undamaged run (dividing the groups evenly over the batches deleted batch 1's)."""
    settings = dict(ckpt=ckpts["ec"], prompts=prompt_file, steps=2, images_per_prompt=2, batch_size=4,
                    guidance=3.0, progress=False)
    ref, out = tmp_path / "ref.zarr", tmp_path / "damaged.zarr"
    run_trace(TraceSettings(out=ref, **settings))
    shutil.copytree(ref, out)
    shard(out, "dispatch", 2).write_bytes(b"")  # the last batch's group shard
    kept = {b: shard(out, "dispatch", b).read_bytes() for b in (0, 1)}
    assert ev.trace.verify_trace(out) == [8, 9]
    summary = run_trace(TraceSettings(out=out, **settings))
    assert summary["repaired"] == [8, 9] and summary["written"] == 2
    assert {b: shard(out, "dispatch", b).read_bytes() for b in (0, 1)} == kept
    assert ev.trace.verify_trace(out) == []
    xr.testing.assert_identical(ev.open_trace(out).load(), ev.open_trace(ref).load())


def test_damaged_metadata_is_one_line_not_a_traceback(ckpts, prompt_file, tmp_path, capsys):
    """Store metadata a rerun cannot repair (a truncated zarr.json, `done` gone, a lost variable): report, verify
    and the rerun say so in one line with the remedy, exit status 2."""
    args = ["--ckpt", ckpts["ec"], "--prompts", prompt_file, "--steps", 1, "--quiet"]
    ref = tmp_path / "ref.zarr"
    assert ecviz_here(capsys, "trace", *args, "--out", ref).returncode == 0
    for how in ("dispatch-json", "done-gone", "gate-gone", "count-shape"):
        bad = shutil.copytree(ref, tmp_path / f"{how}.zarr")
        if how == "dispatch-json":
            meta = bad / "dispatch" / "zarr.json"
            meta.write_text(meta.read_text()[:50])
        elif how == "count-shape":  # the rerun said "already done" of a store that no longer opened, status 0
            meta = bad / "expert_count" / "zarr.json"
            doc = json.loads(meta.read_text())
            doc["shape"][0] += 1
            meta.write_text(json.dumps(doc))
        else:
            shutil.rmtree(bad / how.split("-")[0])
        words = "lacks `gate`" if how == "gate-gone" else "the store is damaged"
        assert_bad_input(ecviz_here(capsys, "trace", *args, "--out", bad), words, "--overwrite")
        assert_bad_input(ecviz_here(capsys, "trace", *args, "--out", bad, "--verify"), words, "--overwrite")
        if how != "gate-gone":
            assert_bad_input(ecviz_here(capsys, "report", "--trace", bad, "--out", tmp_path / how), words)


def test_a_damaged_coordinate_is_refused_not_read_back_as_fill_values(ckpts, prompt_file, tmp_path, capsys):
    """The coordinates (t, layer, row, ...) are written once when the store is made and belong to no batch: a
    removed chunk used to read back as fill values (every `layer` 0, every `t` 0) through open_trace, `--verify`
    said "no damage" and a rerun repaired nothing; an altered one failed later with a traceback. Now each is
    refused in one line by open_trace, report, `--verify` and the rerun, with the remedy."""
    args = ["--ckpt", ckpts["ec"], "--prompts", prompt_file, "--steps", 2, "--quiet"]
    ref = tmp_path / "ref.zarr"
    assert ecviz_here(capsys, "trace", *args, "--out", ref).returncode == 0
    for name, how in (("layer", "removed"), ("t", "altered")):
        bad = shutil.copytree(ref, tmp_path / f"{name}.zarr")
        chunk = next(f for f in (bad / name / "c").rglob("*") if f.is_file())
        if how == "removed":
            chunk.unlink()
        else:
            chunk.write_bytes(bytes(b ^ 0x40 for b in chunk.read_bytes()))
        with pytest.raises(ev.trace.TraceError, match=f"`{name}`.*--overwrite"):
            ev.open_trace(bad)
        for cmd in (["trace", *args, "--out", bad], ["trace", *args, "--out", bad, "--verify"],
                    ["report", "--trace", bad, "--out", tmp_path / f"r-{name}"]):
            assert_bad_input(ecviz_here(capsys, *cmd), f"`{name}`", "is damaged")


def test_damaged_array_metadata_prints_one_line_and_nothing_after_it(ckpts, prompt_file, tmp_path):
    """A truncated `dispatch/zarr.json`, in a fresh interpreter: zarr used to open every array at once, and the
    ones still pending when the error ended the run printed pages of asyncio tracebacks after the one-line error
    (in about a third of the runs). A `zarr.json` that is JSON but not an object is no ecviz trace either."""
    args = ["--ckpt", ckpts["ec"], "--prompts", prompt_file, "--steps", 1, "--quiet"]
    ref = tmp_path / "ref.zarr"
    ecviz("trace", *args, "--out", ref, check=True)
    bad = shutil.copytree(ref, tmp_path / "bad.zarr")
    meta = bad / "dispatch" / "zarr.json"
    meta.write_text(meta.read_text()[:50])
    for _ in range(3):
        assert_bad_input(ecviz("trace", *args, "--out", bad, "--verify"), "the store is damaged")
    odd = tmp_path / "odd.zarr"
    odd.mkdir()
    for text in ("[]", "null", '{"zarr_format": 3, "node_type": "group", "attributes": []}'):
        (odd / "zarr.json").write_text(text)
        with pytest.raises(ev.trace.TraceError, match="not an ecviz trace"):
            ev.open_trace(odd)


def test_a_store_of_more_experts_than_the_format_holds_is_refused(tmp_path, prompt_file, capsys):
    """`tc_expert` is int8 (-1: dropped) and `expert_count` uint8: a token-choice model of 130 experts wrapped
    experts 128 and 129 to negative numbers, read back as drops. Such a model is refused before any work."""
    ckpt = make_checkpoint(tmp_path / "tc130", "TC-tiny-4E", experts=130, group_size=160, infer_group_size=160)
    assert_bad_input(ecviz_here(capsys, "trace", "--ckpt", ckpt, "--prompts", prompt_file, "--steps", 1,
                                "--images-per-prompt", 10, "--out", tmp_path / "t.zarr"),
                     "130 experts", "128 for tc routing")
    assert not (tmp_path / "t.zarr").exists()


def test_the_working_directory_is_refused_as_a_store(ckpts, prompt_file, tmp_path, monkeypatch, capsys):
    """`--out .` (or `..`) would have the store built beside the working directory and swapped in for it; it
    was a ValueError traceback, and in a non-empty directory the suggested --overwrite led to the same."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", "..", str(work)):
        assert_bad_input(ecviz_here(capsys, "trace", "--ckpt", ckpts["ec"], "--prompts", prompt_file, "--steps", 1,
                                    "--out", out, "--overwrite"), f"--out {out}", "working directory")
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_verify_knows_the_variables_of_every_routing_kind_and_prompt_file(ckpts, tmp_path, capsys):
    """`--verify` passes an intact dense and token-choice trace, and names a lost variable of either kind: one
    that follows the routing (`tc_gate`), the prompt file's columns (`category`) or Shapes captions
    (`word_object`), which the store's `variables` attribute lists."""
    parti = tmp_path / "p.tsv"
    parti.write_text("Prompt\tCategory\tChallenge\tNote\na red circle\tAbstract\tBasic\t\n"
                     "a blue square\tAbstract\tColors\t\n")
    for kind, lose in (("dense", "category"), ("tc", "tc_gate"), ("ec", "word_object")):
        out = tmp_path / f"{kind}.zarr"
        args = ["--ckpt", ckpts[kind], "--prompts", parti, "--steps", 1, "--quiet", "--out", out]
        assert ecviz_here(capsys, "trace", *args).returncode == 0
        names = ev.open_trace(out).attrs["variables"]
        assert {"category", "challenge", "word_object", "done"} <= set(names) and ("tc_gate" in names) == (kind == "tc")
        assert set(names) <= set(zarr.open_group(str(out)).array_keys())
        r = ecviz_here(capsys, "trace", *args, "--verify")
        assert r.returncode == 0 and "no damage" in r.stdout, r.stderr
        shutil.rmtree(out / lose)
        assert_bad_input(ecviz_here(capsys, "trace", *args, "--verify"), f"lacks `{lose}`", "--overwrite")
    # a lost coordinate too: xarray numbered the dimension 0..n-1 in its place, and --verify said "no damage"
    out = tmp_path / "coords.zarr"
    args = ["--ckpt", ckpts["ec"], "--prompts", parti, "--steps", 4, "--record-steps", "1,3", "--quiet", "--out", out]
    assert ecviz_here(capsys, "trace", *args).returncode == 0
    assert ev.open_trace(out).step.values.tolist() == [1, 3]
    (out / "step" / "zarr.json").unlink()
    assert_bad_input(ecviz_here(capsys, "trace", *args, "--verify"), "lacks `step`", "--overwrite")
    with pytest.raises(ev.trace.TraceError, match="lacks `step`"):
        ev.open_trace(out)


def as_schema_3(src: Path, dst: Path) -> Path:
    """A copy of a trace with the attributes schema 3 wrote: the guidance scale under `sampler.cfg`, no
    `variables`."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "zarr.json").read_text())
    a = meta["attributes"]
    a["ecviz_schema_version"] = 3
    a["sampler"]["cfg"] = a["sampler"].pop("guidance")
    del a["variables"]
    (dst / "zarr.json").write_text(json.dumps(meta))
    return dst


def test_a_schema_3_store_still_opens_reports_and_redraws(ckpts, prompt_file, tmp_path, capsys):
    """open_trace gives a schema-3 store schema 4's names (`sampler.guidance`); report, --verify (the lost
    variables it can infer) and `sample --from-trace` work on it; `ecviz trace` does not resume into it."""
    from ecviz.pipeline import reproduce

    args = ["--ckpt", ckpts["ec"], "--prompts", prompt_file, "--steps", 2, "--guidance", 2.5, "--limit", 2, "--quiet"]
    assert ecviz_here(capsys, "trace", *args, "--out", tmp_path / "v4.zarr").returncode == 0
    old = as_schema_3(tmp_path / "v4.zarr", tmp_path / "v3.zarr")
    ds = ev.open_trace(old)
    assert ds.attrs["ecviz_schema_version"] == 3 and ds.attrs["sampler"]["guidance"] == 2.5
    assert "cfg" not in ds.attrs["sampler"]
    assert np.array_equal(reproduce(old, 1), ds.image.values[1])  # the guidance it read is the one traced with
    r = ecviz_here(capsys, "report", "--trace", old, "--out", tmp_path / "report")
    assert r.returncode == 0, r.stderr
    assert ecviz_here(capsys, "trace", *args, "--out", old, "--verify").returncode == 0
    assert_bad_input(ecviz_here(capsys, "trace", *args, "--out", old), "schema version 3", "--overwrite")
    shutil.rmtree(old / "gate")
    assert_bad_input(ecviz_here(capsys, "trace", *args, "--out", old, "--verify"), "lacks `gate`")


def test_a_store_whose_attributes_a_hand_edit_broke_is_refused_in_one_line(ckpts, prompt_file, tmp_path, capsys):
    """Root attributes of the wrong type (a fuzzing pass: `variables=5`, `grid="x"`, `routing=null`, ...) were
    tracebacks in report, --verify and --from-trace, and a rerun of `ecviz trace` called such a store done. Each
    is now one line naming the attribute, and the store is left as it was."""
    from ecviz.trace.format import ATTRIBUTES

    args = ["--ckpt", ckpts["ec"], "--prompts", prompt_file, "--steps", 1, "--limit", 1, "--quiet"]
    good = tmp_path / "good.zarr"
    assert ecviz_here(capsys, "trace", *args, "--out", good).returncode == 0
    attrs = json.loads((good / "zarr.json").read_text())["attributes"]
    assert set(attrs) == set(ATTRIBUTES)  # the table is what store_attrs writes
    for name, value, says in (("variables", 5, "`variables` is 5, not a list of variable names"),
                              ("grid", "x", '`grid` is "x", not a list of two positive integers'),
                              ("routing", None, "`routing` is null, not a record"),
                              ("record", "x", "`record` is \"x\""),
                              ("sampler", {}, "`sampler.name` is missing"),
                              ("sampler.batch_size", 0, "`sampler.batch_size` is 0, not a positive integer"),
                              ("routing.kind", "moe", "`routing.kind` is \"moe\", not one of 'ec', 'tc', 'dense'"),
                              ("variables", [["x"]], "not a list of variable names"),  # the check's own TypeError
                              ("sampler.guidance", 10**400, "`sampler.guidance` is 1000")):  # np.isfinite's
        bad = tmp_path / "bad.zarr"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(good, bad)
        meta = json.loads((bad / "zarr.json").read_text())
        where = meta["attributes"]
        *up, last = name.split(".")
        for key in up:
            where = where[key]
        where[last] = value
        (bad / "zarr.json").write_text(json.dumps(meta))
        before = (bad / "zarr.json").read_bytes()
        with pytest.raises(ev.trace.TraceError, match="the store's metadata is damaged"):
            ev.open_trace(bad)
        for cmd in (["report", "--trace", bad, "--out", tmp_path / "rep"], ["trace", *args, "--out", bad, "--verify"],
                    ["sample", "--from-trace", bad, "--sample", 0, "--out", tmp_path / "x.png"]):
            assert_bad_input(ecviz_here(capsys, *cmd), says, "--overwrite")
        assert_bad_input(ecviz_here(capsys, "trace", *args, "--out", bad), says, "use --overwrite to replace it")
        assert (bad / "zarr.json").read_bytes() == before
    assert not (tmp_path / "rep").exists() and not (tmp_path / "x.png").exists()
    from ecviz.trace.synthetic import write_synthetic_trace

    old = write_synthetic_trace(tmp_path / "old.zarr", samples=2, steps=1)  # as written before sampler.null_text
    meta = json.loads((old / "zarr.json").read_text())
    del meta["attributes"]["sampler"]["null_text"]
    (old / "zarr.json").write_text(json.dumps(meta))
    assert ev.open_trace(old).sizes["sample"] == 2


def test_leftovers_of_interrupted_runs_do_not_block_the_next(ckpts, prompt_file, tmp_path):
    """A hidden build of a store that a killed run left (`.NAME.zarr.*.tmp`) is removed by the next run that owns
    the store; an empty directory and a store in which no sample is done (a run stopped before its first batch)
    are replaced whatever settings made them, since nothing in them is lost."""
    base = ["trace", "--ckpt", ckpts["ec"], "--prompts", prompt_file, "--limit", 1, "--quiet"]
    out = tmp_path / "t.zarr"
    stale = tmp_path / ".t.zarr.0123456789ab.tmp"
    stale.mkdir()
    (stale / "zarr.json").write_text("{}")
    os.utime(stale, (time.time() - 60, time.time() - 60))
    out.mkdir()  # empty
    ecviz(*base, "--steps", 1, "--out", out, check=True)
    assert not stale.exists() and ev.open_trace(out).attrs["complete"] is True
    g = zarr.open_group(str(out), mode="r")
    shutil.rmtree(out / g["done"].path / "c")  # as a run stopped before its first batch leaves it: no sample done
    ecviz(*base, "--steps", 2, "--out", out, check=True)  # other settings, no --overwrite needed
    assert ev.open_trace(out).attrs["sampler"]["steps"] == 2


def test_rerun_skips_done_samples(ckpts, prompt_file, tmp_path):
    args = ["--ckpt", ckpts["ec"], "--prompts", prompt_file, "--steps", 2, "--quiet", "--out", tmp_path / "r.zarr"]
    ecviz("trace", *args, check=True)
    r = ecviz("trace", *args, "--nproc", 2, check=True)  # the launcher: two ranks as torchrun would start them
    assert "0 written now, 5 already done" in r.stdout and "2 process(es)" in r.stdout


def test_record_steps_and_layers_from_the_cli(ckpts, prompt_file, tmp_path):
    out = tmp_path / "s.zarr"
    r = ecviz("trace", "--ckpt", ckpts["ec"], "--prompts", prompt_file, "--steps", 4, "--record-steps", "0,2-3",
              "--record-layers", "1", "--record", "dispatch,cross_attn,x0", "--quiet", "--out", out, check=True)
    assert "traced 5 samples" in r.stdout and "1 blank prompt lines skipped" in r.stdout
    assert f"report on it: ecviz report {out}   browse it: streamlit run app/main.py -- --trace {out}" in r.stdout
    ds = ev.open_trace(out)
    assert ds.step.values.tolist() == [0, 2, 3] and ds.t.values.tolist() == pytest.approx([0, 0.5, 0.75])
    assert ds.layer.values.tolist() == [1] and ds.attrs["record"]["steps"] == [0, 2, 3]
    assert ds.dispatch.sizes["step"] == ds.cross_attn.sizes["step"] == ds.x0.sizes["step"] == 3
    assert_bad_input(ecviz("trace", "--ckpt", ckpts["ec"], "--prompts", prompt_file, "--steps", 4,
                           "--record-steps", "4", "--out", tmp_path / "b.zarr"), "--record-steps")
    assert_bad_input(ecviz("trace", "--ckpt", ckpts["ec"], "--prompts", prompt_file, "--record-layers", "0",
                           "--out", tmp_path / "b.zarr"), "--record-layers 0: the sparse layers are block 1")
    for bad in ("3-1", "2-", ""):  # a descending range was an empty list: a full-cost run recording nothing
        assert_bad_input(ecviz("trace", "--ckpt", ckpts["ec"], "--prompts", prompt_file, "--steps", 4,
                               "--record-steps", bad, "--out", tmp_path / "b.zarr"), "--record-steps", "ascending")
    assert not (tmp_path / "b.zarr").exists()
    # the defaults written out in full are the defaults: a rerun resumes (it was refused as other settings)
    args = ["--ckpt", ckpts["ec"], "--prompts", prompt_file, "--steps", 2, "--quiet", "--out", tmp_path / "d.zarr"]
    ecviz("trace", *args, check=True)
    r = ecviz("trace", *args, "--record-steps", "0-1", "--record-layers", "1", "--record", "dispatch,dispatch",
              check=True)
    assert "0 written now" in r.stdout
    assert_bad_input(ecviz("trace", *args, "--record-steps", "1"), "other record settings")
    assert_bad_input(ecviz("trace", *args, "--group-size", 16),
                     "other inference settings (infer_group_size 32, this run's 16)")


def test_trace_bad_input(capsys, ckpts, prompt_file, tmp_path):
    def here(*args):
        return ecviz_here(capsys, *args)

    out = tmp_path / "t.zarr"
    base = ["trace", "--prompts", prompt_file, "--steps", 2, "--quiet"]
    assert_bad_input(here(*base, "--ckpt", tmp_path / "nope", "--out", out), "no such directory")
    bad = tmp_path / "bad"
    shutil.copytree(ckpts["ec"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model"]["width"] = 32
    (bad / "config.json").write_text(json.dumps(cfg))
    assert_bad_input(here(*base, "--ckpt", bad, "--out", out), "has shape", "the config expects")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    assert_bad_input(here("trace", "--ckpt", ckpts["ec"], "--prompts", empty, "--out", out), "no prompts")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    assert_bad_input(here("trace", "--ckpt", ckpts["ec"], "--prompts", latin, "--out", out), "not UTF-8",
                     "offset 3")
    assert_bad_input(here("trace", "--ckpt", ckpts["ec"], "--prompts", tmp_path, "--out", out), "is a directory")
    assert_bad_input(here("trace", "--ckpt", ckpts["ec"], "--prompts", tmp_path / "missing.txt", "--out", out),
                     "not found")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_bad_input(here(*base, "--ckpt", ckpts["ec"], "--out", blocker / "t.zarr"), "--out", "not a directory")
    assert_bad_input(here(*base, "--ckpt", ckpts["ec"], "--out", out, "--group-size", 12),
                     "--group-size 12: infer_group_size 12 must")
    assert_bad_input(here(*base, "--ckpt", ckpts["ec"], "--out", out, "--record", "dispatch,bogus"), "bogus")

    # a good store is never damaged by a run that is refused
    ecviz(*base, "--ckpt", ckpts["ec"], "--out", out, check=True)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert_bad_input(here(*base, "--ckpt", ckpts["dense"], "--out", out), "another checkpoint", "--overwrite")
    assert_bad_input(here(*base, "--ckpt", ckpts["tc"], "--out", out), "another checkpoint")
    edited = shutil.copytree(ckpts["ec"], tmp_path / "edited")  # the same weights, an inference setting changed
    cfg = json.loads((edited / "config.json").read_text())
    cfg["model"]["infer_capacity_factor"] = 1.0
    (edited / "config.json").write_text(json.dumps(cfg))
    assert_bad_input(here(*base, "--ckpt", edited, "--out", out),
                     "other inference settings (infer_capacity_factor 2.0, this run's 1.0)")
    # under the --nproc launcher too: one line, status 2, whichever ranks found it (here rank 0 alone)
    assert_bad_input(ecviz(*base, "--ckpt", edited, "--out", out, "--nproc", 2), "other inference settings")
    assert_bad_input(here(*base, "--ckpt", ckpts["ec"], "--out", out, "--steps", 3),
                     "other sampler settings (steps 2, this run's 3)")  # which one: it named none
    mine = tmp_path / "mine.txt"  # the same prompt file, a line added: "another prompt file" said nothing of it
    mine.write_text("a red circle\n")
    ecviz("trace", "--prompts", mine, "--steps", 2, "--quiet", "--ckpt", ckpts["ec"], "--out", tmp_path / "m.zarr",
          check=True)
    mine.write_text("a red circle\na blue square\n")
    assert_bad_input(here("trace", "--prompts", mine, "--steps", 2, "--quiet", "--ckpt", ckpts["ec"], "--out",
                          tmp_path / "m.zarr"), "another version of the prompt file mine.txt (its lines changed")
    # more than memory holds, with --overwrite: refused before the store is replaced (it was, then a traceback)
    assert_bad_input(here(*base, "--ckpt", ckpts["ec"], "--out", out, "--steps", 10**7, "--overwrite"),
                     "recording 10,000,000 steps", "GiB")
    original = (out / "zarr.json").read_bytes()
    meta = json.loads(original)
    other = ev.trace.SCHEMA_VERSION + 1
    meta["attributes"]["ecviz_schema_version"] = other
    (out / "zarr.json").write_text(json.dumps(meta))
    assert_bad_input(here(*base, "--ckpt", ckpts["ec"], "--out", out), f"schema version {other}")
    (out / "zarr.json").write_bytes(original)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    with pytest.raises(ev.trace.TraceError, match="not an ecviz trace"):
        ev.open_trace(tmp_path)
    # --overwrite replaces it
    ecviz(*base, "--ckpt", ckpts["tc"], "--out", out, "--overwrite", check=True)
    assert ev.open_trace(out).attrs["routing"]["kind"] == "tc"


def test_a_store_through_a_symlink_is_written_at_its_target_and_locked_there(ckpts, prompt_file, tmp_path, capsys):
    """--out a link to a store on a bigger disk: its swaps replaced the link with a directory, so the data
    landed beside the link and the next run took another lock than the one the first held (two writers at once,
    a damaged store). The target is written and locked; the link stays a link."""
    from ecviz.lock import writing

    real = tmp_path / "disk" / "t.zarr"
    real.mkdir(parents=True)
    link = tmp_path / "t.zarr"
    link.symlink_to(real)
    base = ["trace", "--ckpt", ckpts["ec"], "--prompts", prompt_file, "--steps", 2, "--quiet", "--out", link]
    for again in ([], ["--overwrite"]):
        assert ecviz_here(capsys, *base, *again).returncode == 0
        assert link.is_symlink() and (real / "zarr.json").is_file() and ev.open_trace(link).attrs["complete"]
    with writing(real):  # a writer of the target: a run through the link is refused
        assert_bad_input(ecviz(*base, "--overwrite"), "is being written by")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".t.zarr")] == []  # nothing beside the link


def test_several_processes_refuse_prompts_from_a_pipe(ckpts, tmp_path):
    """Each rank reads the prompt file whole: from a pipe each got part of the stream, and the store mixed the
    ranks' prompts (exit 0) or failed with a traceback."""
    r = ecviz("trace", "--ckpt", ckpts["ec"], "--prompts", "/dev/stdin", "--steps", 1, "--nproc", 2, "--out",
              tmp_path / "p.zarr", input="a red circle\na blue square\n")
    assert_bad_input(r, "--prompts /dev/stdin: a pipe or device", "write it to a file first")
    assert not (tmp_path / "p.zarr").exists()


def test_readme_command_on_a_fresh_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    ecviz("init", "--preset", "EC-DiT-small-8E", "--out", ck, check=True)
    p = Path(tmp_path / "p.txt")
    p.write_text("a red circle\n")
    r = ecviz("trace", "--ckpt", ck, "--prompts", p, "--steps", 2, "--quiet", cwd=tmp_path, check=True)
    assert "traces/ck-p.zarr" in r.stdout and (tmp_path / "traces" / "ck-p.zarr").is_dir()
    from ecviz.trace.run import TraceSettings, default_out

    # a run's checkpoint/ by its run's name: every run's traces were named checkpoint-PROMPTS
    assert default_out(TraceSettings(ckpt="runs/x/checkpoint/", prompts="parti.txt")) == Path("traces/x-parti.zarr")


def test_format_doc_lists_every_variable():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "trace-format.md").read_text()
    for name, v in ev.trace.VARIABLES.items():
        row = [line for line in doc.splitlines() if line.startswith(f"| `{name}` |")]
        assert row, name
        assert f"({', '.join(v.dims)})" in row[0], name


def test_compute_on_the_objects_of_generated_images(ckpts, prompt_file, tmp_path):
    from ecviz.analysis import image_object_fraction, trace_object_vs_background

    ds = trace(ckpts["ec"], prompt_file, tmp_path / "o.zarr", limit=2)
    frac = image_object_fraction(ds)  # (sample, token) on the 4x4 grid of 4x4-pixel patches
    fg = (ds.image.values >= 64).any(-1)
    assert frac.shape == (4, 16) and frac.values[1, 5] == fg[1, 4:8, 4:8].mean()
    split = trace_object_vs_background(ds)
    assert split.dims == ("region", "step", "layer")
    counts = ds.expert_count.sel(branch="cond").values[:, 2, 0]  # (sample, token) at step 2
    for region, mask in (("object", frac.values >= 0.5), ("background", frac.values == 0)):
        expect = counts[mask].mean() if mask.any() else np.nan  # noise images may have no clean background
        assert np.allclose(split.sel(region=region).values[2, 0], expect, equal_nan=True)
    assert (frac.values >= 0.5).any()


def test_open_trace_never_imports_torch(ckpts, prompt_file, tmp_path):
    """Reading a trace (and `import ecviz`) needs only xarray and zarr: checked in a fresh interpreter."""
    trace(ckpts["ec"], prompt_file, tmp_path / "r.zarr", limit=1)
    code = ("import sys, ecviz, ecviz.trace; ds = ecviz.open_trace(sys.argv[1]); ds.expert_count.values.sum(); "
            "from ecviz.analysis import trace_object_vs_background; trace_object_vs_background(ds); "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); assert not bad, bad[:5]")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "r.zarr")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    with pytest.raises(ev.trace.TraceError, match="not found"):
        ev.open_trace(tmp_path / "missing.zarr")
    assert callable(ev.trace.record) and ev.trace.BatchLayout.__name__ == "BatchLayout"  # still there, lazily


def test_the_recording_check_counts_every_process_on_this_machine(ckpts, prompt_file, tmp_path, monkeypatch):
    """Under --nproc (or torchrun) each rank records its own batches: its need is checked against the memory of
    this machine times the ranks on it (LOCAL_WORLD_SIZE), which the message says, with the remedy of fewer."""
    from ecviz import validate
    from ecviz.errors import UsageError
    from ecviz.trace.run import check_recording_fits, plan

    p = plan(TraceSettings(ckpt=ckpts["ec"], prompts=prompt_file, out=tmp_path / "t.zarr", steps=2,
                           record_layers=[1, 1]))
    assert p.settings.record_layers == [1]  # checked, once each (the API took [1, 1] as given)
    monkeypatch.setattr(validate, "host_memory", lambda: 1)  # a machine where nothing fits
    with pytest.raises(UsageError, match="recording 2 steps of a batch") as alone:
        check_recording_fits(p)
    assert "per process" not in str(alone.value) and "--nproc" not in str(alone.value)
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match=r"GiB per process \(2 here: \d+ GiB\), more than this machine's 0 GiB; .*"
                                         r"or run fewer processes on this machine \(--nproc, LOCAL_WORLD_SIZE\)"):
        check_recording_fits(p)
