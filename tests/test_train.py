"""The trainer on real runs: exact resume, data parallelism (DDP and FSDP over torchrun), the routing probe,
image-text data, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from helpers import assert_bad_input, ecviz, ecviz_here, make_folder, make_shards
from PIL import Image
from safetensors.torch import load_file

from ecviz.analysis import object_vs_background, token_grid
from ecviz.checkpoint import load_checkpoint, read_checkpoint
from ecviz.data.imagetext import load_imagetext
from ecviz.data.shapes import ShapesDataset, all_captions, describe
from ecviz.errors import EcvizError
from ecviz.pipeline import Pipeline
from ecviz.text import TextTable, load_text_encoder
from ecviz.train import Prefetch, StepBatches, TextCache, TrainConfig, batch_indices, train

TIMING = ("steps_per_s", "time")
REPO = Path(__file__).resolve().parents[1]


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def config(out: Path, **kw) -> TrainConfig:
    base = dict(preset="EC-DiT-tiny-4E", out=str(out), steps=6, batch_size=4, warmup=2, log_every=1,
                ckpt_every=3, probe_every=2)
    return TrainConfig(**(base | kw))


RESUME = dict(steps=64, ckpt_every=16, probe_every=16)  # stopped at 32: the resumed half is 32 steps long


def assert_identical_runs(a: Path, b: Path) -> None:
    """Bit for bit: every metrics row, the whole training state (weights, EMA, optimizer) and the probe store."""
    assert metrics(a) == metrics(b)
    sa, sb = (load_file(r / "checkpoint" / "train_state.safetensors") for r in (a, b))
    assert sa.keys() == sb.keys() and any(k.endswith("momentum_buffer") for k in sa)
    assert [k for k in sa if not sa[k].equal(sb[k])] == []
    if (a / "routing.zarr").exists():
        pa, pb = (xr.open_zarr(r / "routing.zarr", consolidated=False).load() for r in (a, b))
        xr.testing.assert_identical(pa, pb)


@pytest.mark.parametrize(("preset", "mask_ratio"), [("EC-DiT-tiny-4E", 0.5), ("TC-tiny-4E", 0.0),
                                                    ("DENSE-tiny", 0.0)])
def test_resume_continues_exactly(tmp_path, preset, mask_ratio):
    """32 steps, stop, resume to 64 == 64 steps straight, bit for bit: losses, weights, optimizer state and
    the probe store. The resumed run starts with an empty caption cache, so this also holds the text
    encoder to embedding a caption the same whatever else shares its batch."""
    whole = tmp_path / "whole"
    train(config(whole, preset=preset, mask_ratio=mask_ratio, **RESUME), progress=False)
    split = tmp_path / "split"
    train(config(split, preset=preset, mask_ratio=mask_ratio, **RESUME | dict(steps=32)), progress=False)
    assert len(metrics(split)) == 32
    train(config(split, preset=preset, mask_ratio=mask_ratio, **RESUME), resume=True, progress=False)
    assert len(metrics(whole)) == 64
    assert_identical_runs(whole, split)
    if preset.startswith("TC"):
        assert "tc_drop_rate" in metrics(whole)[0] and metrics(whole)[0]["aux_loss"] > 0
    a = load_file(whole / "checkpoint" / "train_state.safetensors")
    assert load_file(whole / "checkpoint" / "model.safetensors").keys() == {k[6:] for k in a if k[:6] == "model."}
    if preset != "DENSE-tiny":
        probe = xr.open_zarr(whole / "routing.zarr", consolidated=False)
        assert probe.train_step.values.tolist() == [0, 16, 32, 48, 64]
    assert (whole / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # the checkpoint holds the EMA weights and samples
    model, ck = load_checkpoint(whole / "checkpoint")
    assert ck.meta["step"] == 64 and ck.meta["weights"] == "ema" and ck.preset == preset
    images = Pipeline.from_model(model).generate(["a red circle"] * 2, [0, 1], steps=2)
    assert images.shape == (2, 16, 16, 3)


def test_two_process_resume_continues_exactly(tmp_path):
    """Under --nproc 2 as in one process: 32 steps, stop, resume to 64 == 64 steps straight, bit for bit.
    EC-DiT only: what resuming restores is the same for every routing (test_resume_continues_exactly covers
    all three in one process), and each case here costs three two-process launches (about 50 s)."""
    args = ["train", "--preset", "EC-DiT-tiny-4E", "--batch-size", 4, "--warmup", 2, "--log-every", 1,
            "--ckpt-every", 16, "--probe-every", 16, "--quiet", "--nproc", 2]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    ecviz(*args, "--steps", 64, "--out", tmp_path / "whole", check=True, env=env)
    ecviz(*args, "--steps", 32, "--out", tmp_path / "split", check=True, env=env)
    ecviz(*args, "--steps", 64, "--out", tmp_path / "split", "--resume", check=True, env=env)
    assert len(metrics(tmp_path / "whole")) == 64
    assert_identical_runs(tmp_path / "whole", tmp_path / "split")


def test_a_cached_or_prefetched_run_is_the_same_run(tmp_path):
    """--data-cache and the loader's workers change where batches come from, never what they are: losses,
    weights and optimizer state are bit-identical to the run that renders every item in a background thread."""
    train(config(tmp_path / "thread", data_workers=0, steps=4), progress=False)
    train(config(tmp_path / "cached", data_cache=str(tmp_path / "cache"), steps=4), progress=False)
    train(config(tmp_path / "workers", data_workers=2, steps=4), progress=False)
    for run in ("cached", "workers"):
        assert metrics(tmp_path / run) == metrics(tmp_path / "thread")
        a, b = (load_file(tmp_path / r / "checkpoint" / "train_state.safetensors") for r in ("thread", run))
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), run
    (cache,) = (tmp_path / "cache").iterdir()  # one cache, of the run's 16 px items
    assert cache.name.startswith("shapes-16px-seed0-") and (cache / "chunk-000000.npy").is_file()
    assert json.loads((tmp_path / "cached" / "checkpoint" / "config.json").read_text())["meta"]["train_config"][
        "data_cache"] == str(tmp_path / "cache")
    # a run refused for its cache leaves nothing in its directory (it left routing.zarr, opened first)
    (cache / "key.json").write_text("{}")
    with pytest.raises(EcvizError, match="holds items of another key"):
        train(config(tmp_path / "refused", data_cache=str(tmp_path / "cache"), steps=4), progress=False)
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_hands_over_the_steps_batches_in_order(tmp_path, workers):
    """Prefetch(StepBatches) yields, step by step, this rank's rows of exactly the items batch_indices names."""
    folder = make_folder(tmp_path / "folder")
    for data, shuffle in ((ShapesDataset(length=2**40, size=16), False),
                          (load_imagetext(folder, 16), True)):
        tc = config(tmp_path / "run", batch_size=4, steps=5)
        rows = slice(2, 4)  # rank 1 of 2
        loader = Prefetch(StepBatches(data, tc, rows, 1, shuffle), workers)
        got = list(loader)
        assert len(got) == 4
        for step, (images, captions) in enumerate(got, start=1):
            items = [data[int(i)] for i in batch_indices(step, 4, len(data), tc.seed, shuffle)[rows]]
            assert torch.equal(images, torch.stack([b["image"] for b in items]))
            assert captions == [b["caption"] for b in items]


def test_data_seed_gives_a_run_new_shapes_images_and_seed_alone_does_not(tmp_path):
    """Shapes items are a function of (data seed, index), in order: --seed changes noise, timesteps and text
    dropout but not the images, so a continuation (--init) needs --data-seed for images it has not seen."""
    captions = {}
    for name, kw in (("a", {}), ("b", dict(seed=1)), ("c", dict(data_seed=1))):
        train(config(tmp_path / name, steps=1, ckpt_every=1, probe_every=1, **kw), progress=False)
        captions[name] = xr.open_zarr(tmp_path / name / "routing.zarr", consolidated=False).caption.values.tolist()
    assert captions["a"] == captions["b"] != captions["c"]
    assert load_checkpoint(tmp_path / "c" / "checkpoint")[1].meta["train_config"]["data_seed"] == 1


def test_a_fresh_run_replaces_a_stale_probe_and_a_resumed_one_refuses_a_foreign_one(tmp_path, capsys):
    """A run killed before its first checkpoint leaves routing.zarr behind: a fresh run in that directory builds
    its own (it reopened the old one: a broadcast traceback for another model, silently mixed rows otherwise);
    a resume finds a probe of another model and says so in one line before any step."""
    run = tmp_path / "run"
    train(config(run, steps=2, ckpt_every=100, probe_every=1, model="experts=2"), progress=False)
    shutil.rmtree(run / "checkpoint")  # as if killed before it: only the probe (and metrics) remain
    train(config(run, steps=2, ckpt_every=1, probe_every=1), progress=False)
    ds = xr.open_zarr(run / "routing.zarr", consolidated=False)
    assert ds.train_step.values.tolist() == [0, 1, 2] and ds.sizes["expert"] == 4
    foreign = tmp_path / "foreign"
    train(config(foreign, steps=1, ckpt_every=1, probe_every=1, model="experts=2"), progress=False)
    shutil.rmtree(run / "routing.zarr")
    shutil.copytree(foreign / "routing.zarr", run / "routing.zarr")
    with open(run / "metrics.jsonl", "a") as f:  # a row past the checkpoint, as a killed run leaves
        f.write('{"step": 3, "loss": 1.0}\n')
    logged = (run / "metrics.jsonl").read_bytes()
    r = ecviz_here(capsys, "train", "--preset", "EC-DiT-tiny-4E", "--steps", 4, "--batch-size", 4, "--warmup", 2,
                   "--quiet", "--resume", "--out", run)
    assert_bad_input(r, "routing probe of another model")
    assert load_checkpoint(run / "checkpoint")[1].meta["step"] == 2  # nothing trained
    assert (run / "metrics.jsonl").read_bytes() == logged  # refused before the metrics were trimmed


def test_probe_store_shape_and_invariants(tmp_path):
    run = tmp_path / "run"
    train(config(run, steps=4), progress=False)
    ds = xr.open_zarr(run / "routing.zarr", consolidated=False).load()
    P, T, L, S, E = 8, 3, 1, 16, 4
    assert ds.expert_count.shape == (3, P, T, L, S) and ds.expert_load.shape == (3, T, L, E)
    assert ds.train_step.values.tolist() == [0, 2, 4] and ds.t.values.tolist() == [0.25, 0.5, 0.75]
    assert ds.layer.values.tolist() == [1] and ds.image.shape == (P, 16, 16, 3) and ds.sizes["probe"] == P
    # every expert fills its C slots in every inference group: counts sum to groups·E·C; load is exactly 1
    C = 32 * 2 // E  # inference group 32 tokens, f_c = 2
    assert (ds.expert_count.sum(("probe", "token")) == (P * S // 32) * E * C).all()
    assert (ds.expert_load == 1).all() and (ds.tc_drop_rate == 0).all()
    assert len(set(ds.caption.values.tolist())) > 1
    frac = ds.object_fraction.values
    assert frac.shape == (P, S) and 0 <= frac.min() and frac.max() <= 1 and frac.max() > 0.5
    assert ds.attrs["rows"] == 3 and ds.attrs["last_step"] == 4
    # its rows have the trace chunks' checksum: an altered row fails to read instead of reading back wrong
    chunk = sorted(f for f in (run / "routing.zarr" / "expert_count" / "c").rglob("*") if f.is_file())[1]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(Exception, match=r"(?i)checksum|crc"):
        zarr.open_array(str(run / "routing.zarr" / "expert_count"), mode="r")[1]
    assert np.array_equal(zarr.open_array(str(run / "routing.zarr" / "expert_count"), mode="r")[0],
                          ds.expert_count.values[0])
    # analyses of it
    split = object_vs_background(ds)
    assert split.dims == ("region", "train_step", "t", "layer") and split.region.values.tolist() == [
        "object", "background"]
    on_objects = ds.expert_count.where(ds.object_fraction >= 0.5).mean(("probe", "token"))
    assert np.allclose(split.sel(region="object"), on_objects)
    grid = token_grid(ds.expert_count.isel(train_step=0, t=0, layer=0))
    assert grid.dims == ("probe", "row", "col") and grid.shape == (P, 4, 4)
    assert grid.values[2, 1, 3] == ds.expert_count.values[0, 2, 0, 0, 1 * 4 + 3]


def test_batch_indices():
    a = batch_indices(5, 8, 20, seed=1)
    assert a.tolist() == batch_indices(5, 8, 20, seed=1).tolist()
    epoch = np.concatenate([batch_indices(s, 4, 20, seed=1) for s in range(5)])
    assert sorted(epoch.tolist()) == list(range(20))  # one epoch: a permutation
    assert batch_indices(3, 4, 10**12, seed=0, shuffle=False).tolist() == [12, 13, 14, 15]


def distributed(*args, nproc=2, timeout=600) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                        "--master-port", str(29600 + os.getpid() % 1000), "-m", "ecviz", *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def assert_same_run(a: Path, b: Path) -> None:
    """Same losses and weights up to float reassociation (gradients are summed in another order)."""
    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    assert np.allclose([m["loss"] for m in ma], [m["loss"] for m in mb], rtol=1e-5)
    sa, sb = (load_file(r / "checkpoint" / "train_state.safetensors") for r in (a, b))
    assert sa.keys() == sb.keys()
    for k in sa:
        scale = sa[k].abs().max().item() + 1e-12
        assert (sa[k] - sb[k]).abs().max().item() <= 1e-4 * scale, k


def test_two_processes_equal_one_with_the_doubled_batch(tmp_path):
    """DDP (via the --nproc launcher) and FSDP (torchrun by hand): each rank takes half the global batch."""
    args = ["--preset", "EC-DiT-tiny-4E", "--steps", 3, "--batch-size", 8, "--log-every", 1, "--probe-every", 2,
            "--quiet"]
    ecviz("train", *args, "--out", tmp_path / "one", check=True)
    r = ecviz("train", *args, "--out", tmp_path / "ddp", "--nproc", 2, check=True, env=os.environ | {
        "OMP_NUM_THREADS": "1"})
    assert r.stdout.count("checkpoint in") == 1  # rank 0 reports
    assert_same_run(tmp_path / "one", tmp_path / "ddp")
    distributed("train", *args, "--out", tmp_path / "fsdp", "--fsdp")
    assert_same_run(tmp_path / "one", tmp_path / "fsdp")
    one, fsdp = (xr.open_zarr(tmp_path / r / "routing.zarr", consolidated=False).load() for r in ("one", "fsdp"))
    xr.testing.assert_identical(one, fsdp)
    # FSDP resumes from its gathered checkpoint, one step further
    distributed("train", *args, "--out", tmp_path / "fsdp", "--fsdp", "--resume", "--steps", 4)
    assert [m["step"] for m in metrics(tmp_path / "fsdp")] == [1, 2, 3, 4]


def test_train_on_image_text_folder_and_shards(tmp_path):
    folder = make_folder(tmp_path / "folder")  # 3 captioned images and one without a caption
    shards = make_shards(folder, tmp_path / "shards")
    for data, out, name in ((folder, "f", "DENSE-tiny"), (shards, "s", "EC-DiT-tiny-4E")):
        r = ecviz("train", "--preset", name, "--data", data, "--steps", 2, "--batch-size", 2, "--log-every", 1,
                  "--out", tmp_path / out, "--quiet", check=True)
        assert "skipped 1 image without a caption: 00001/000000003\n" in r.stderr  # which one, to caption it
        assert len(metrics(tmp_path / out)) == 2
    probe = xr.open_zarr(tmp_path / "s" / "routing.zarr", consolidated=False)  # 8 probe images from 3
    assert probe.sizes["probe"] == 8 and len(set(probe.caption.values.tolist())) == 3
    # a resume over a folder that gained, or renamed, an image was taken on other data without a word (every
    # later batch changes): refused, naming the counts; the same images resume
    resume = ["train", "--preset", "DENSE-tiny", "--data", folder, "--steps", 3, "--batch-size", 2, "--log-every", 1,
              "--out", tmp_path / "f", "--quiet", "--resume"]
    (folder / "00001" / "000000003.txt").write_text("now captioned")
    assert_bad_input(ecviz(*resume), "now holds 4 image-caption pairs, the run trained on 3", "--init")
    moved = tmp_path / "moved.jpg"
    (folder / "00001" / "000000002.jpg").rename(moved)
    assert_bad_input(ecviz(*resume), "3 image-caption pairs, as many as the run trained on, but others")
    assert len(metrics(tmp_path / "f")) == 2
    (folder / "00001" / "000000003.txt").unlink()
    moved.rename(folder / "00001" / "000000002.jpg")
    image = folder / "00000" / "000000000.png"  # the settings are checked before every image is opened (an hour
    good = image.read_bytes()  # of a million images): a resume that changed one hears so first
    image.write_bytes(b"\x89PNG not really")
    assert_bad_input(ecviz(*resume, "--lr", 1e-3), "trained with --lr")
    image.write_bytes(good)
    respelt = [f"{folder}/" if a == folder else a for a in resume]  # compared as a string, it was another --data
    ecviz(*respelt, check=True)
    assert len(metrics(tmp_path / "f")) == 3
    r = ecviz("eval", "--ckpt", tmp_path / "f", "--prompts", "shapes", "--images-per-prompt", 1, "--steps", 1,
              "--quiet", "--json", tmp_path / "f.json", check=True)  # scored on Shapes without a word
    assert f"was trained on --data {folder}/, not Shapes" in r.stderr  # (as the last resume spelt it)
    # a caption edited in place keeps the set's keys, but the probe's stored caption no longer described its rows
    ec = ["train", "--preset", "EC-DiT-tiny-4E", "--data", folder, "--batch-size", 2, "--log-every", 1, "--quiet",
          "--out", tmp_path / "e"]
    (folder / "00001" / "000000003.txt").write_text("captioned")  # every image captioned: one line of output
    ecviz(*ec, "--steps", 1, check=True)
    (folder / "00000" / "000000000.txt").write_text("another caption")
    assert_bad_input(ecviz(*ec, "--steps", 2, "--resume"), "probe image 0", "no longer the data's")


def test_train_bad_input(tmp_path, capsys):
    def here(*args):
        return ecviz_here(capsys, *args)

    base = ["train", "--steps", 1, "--batch-size", 2, "--quiet"]
    assert_bad_input(here(*base, "--preset", "EC-DiT-tiny-5E", "--out", tmp_path / "a"), "unknown preset")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_bad_input(here(*base, "--preset", "DENSE-tiny", "--data", empty, "--out", tmp_path / "b"),
                     "no image-caption pairs")
    corrupt = make_folder(tmp_path / "corrupt")
    (corrupt / "00000" / "000000000.png").write_bytes(b"\x89PNG not really")
    assert_bad_input(here(*base, "--preset", "DENSE-tiny", "--data", corrupt, "--out", tmp_path / "c"),
                     "corrupt image", "000000000.png")
    assert not (tmp_path / "c" / "checkpoint").exists()
    assert_bad_input(here(*base, "--preset", "EC-DiT-tiny-4E", "--batch-size", 3, "--out", tmp_path / "d"),
                     "routing groups")
    assert_bad_input(here(*base, "--preset", "DENSE-tiny", "--data", empty, "--data-cache", "--out",
                           tmp_path / "d"), "--data-cache is for --data shapes")
    assert_bad_input(here(*base, "--preset", "DENSE-tiny", "--data", empty, "--data-seed", 3, "--out",
                          tmp_path / "d"), "--data-seed 3 is for --data shapes")  # silently ignored before
    assert_bad_input(here(*base, "--preset", "DENSE-tiny", "--data", "s/0.tar", "s/1.tar", "--out", tmp_path / "d"),
                     "unrecognized arguments: s/1.tar", "quote it")  # what an unquoted {0..1} pattern gives
    assert_bad_input(here(*base, "--preset", "DENSE-tiny", "--data-workers", -1, "--out", tmp_path / "d"),
                     "--data-workers", "-1 is out of range")
    for nproc in ([], ["--nproc", 1]):  # silently ignored before
        assert_bad_input(here(*base, "--preset", "DENSE-tiny", "--fsdp", *nproc, "--out", tmp_path / "d"),
                         "--fsdp shards the model over processes, and this run has one")
    if not torch.cuda.is_available():
        assert_bad_input(here(*base, "--preset", "DENSE-tiny", "--device", "cuda", "--out", tmp_path / "d"),
                         "--device cuda", "no CUDA device")
    ecviz(*base, "--preset", "DENSE-tiny", "--out", tmp_path / "e", check=True)
    before = (tmp_path / "e" / "checkpoint" / "model.safetensors").read_bytes()
    assert_bad_input(here(*base, "--preset", "EC-DiT-tiny-4E", "--out", tmp_path / "e", "--resume"),
                     "cannot resume", "DENSE-tiny")
    assert_bad_input(here(*base, "--preset", "DENSE-tiny", "--out", tmp_path / "e"), "already holds a run")
    assert_bad_input(ecviz(*base, "--preset", "DENSE-tiny", "--out", tmp_path / "e", "--nproc", 2),
                     "already holds a run")
    assert (tmp_path / "e" / "checkpoint" / "model.safetensors").read_bytes() == before
    assert_bad_input(here(*base, "--preset", "DENSE-tiny", "--out", tmp_path / "f", "--resume"), "cannot resume")


def test_model_overrides_of_the_text_length_and_encoders_are_what_the_data_is_encoded_with(tmp_path):
    """--model text_len=8 trained on captions of the preset's 16 tokens (a ValueError at the first step) and
    --model codec=... was written into the checkpoint but not used: the run now encodes with its model's."""
    assert config(tmp_path, model="text_len=8").encoders() == ("pixel", "minilm", 8)
    assert config(tmp_path, model="codec=vae:x,text_encoder=hf:y").encoders() == ("vae:x", "hf:y", 16)
    assert config(tmp_path, model="codec=vae:x", codec="pixel").encoders()[0] == "pixel"  # the flag wins
    with pytest.warns(UserWarning, match="longer than 8 tokens truncated"):  # encoded at the model's 8
        train(config(tmp_path / "r", steps=1, ckpt_every=1, probe_every=1, model="text_len=8"), progress=False)
    _, info = load_checkpoint(tmp_path / "r" / "checkpoint")
    assert info.config.text_len == 8


def test_init_starts_a_run_from_a_trained_checkpoint(tmp_path, capsys, ckpts):
    """--init starts from a checkpoint's weights: a step at a vanishing learning rate leaves them as they were
    (a fresh run's differ), and the run records where it started. A checkpoint whose weights do not fit, one of
    another routing (TC weights have EC's names and shapes), or no checkpoint at all, is one line and exit
    status 2, before anything is written; a resume never reads --init's weights, so a moved one does not block
    it, but it must be the --init the run started with."""
    train(config(tmp_path / "a", steps=4, ckpt_every=4, probe_every=4, lr=1e-3, ema=0.0), progress=False)
    init = str(tmp_path / "a")  # a run directory, as everywhere a checkpoint is expected
    still = dict(steps=1, ckpt_every=1, probe_every=1, warmup=0, seed=4, lr=1e-12, ema=0.0)
    train(config(tmp_path / "b", **still, init=init), progress=False)
    train(config(tmp_path / "c", **still), progress=False)
    a, b, c = (load_file(tmp_path / r / "checkpoint" / "model.safetensors") for r in "abc")
    assert all(torch.allclose(a[k], b[k], atol=1e-9) for k in a)
    assert not all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)
    _, info = load_checkpoint(tmp_path / "b" / "checkpoint")
    _, source = load_checkpoint(init)
    assert info.meta["train_config"]["init"] == init
    assert info.meta["init_from"] == {"path": init, "sha256": source.sha256, "digest": source.digest,
                                      "meta": source.meta}  # a's command, and which weights
    out = tmp_path / "e"
    args = ["train", "--preset", "EC-DiT-tiny-4E", "--steps", 1, "--batch-size", 4, "--quiet", "--out", out]
    ecviz("train", "--preset", "DENSE-tiny", "--steps", 1, "--batch-size", 4, "--quiet", "--out", tmp_path / "f",
          check=True)
    assert_bad_input(ecviz_here(capsys, *args, "--init", tmp_path / "f" / "checkpoint"),
                     "routing 'dense', this run's 'ec'")
    assert_bad_input(ecviz_here(capsys, *args, "--model", "text_refiner=1", "--init", init),
                     "do not fit this model", "cross_attn.kv.weight' has shape (128, 384)")
    assert_bad_input(ecviz_here(capsys, *args, "--init", tmp_path), "--init", "config.json is missing")
    assert_bad_input(ecviz_here(capsys, *args, "--init", ckpts["tc"]), "--init", "routing 'tc'", "'ec'")
    assert_bad_input(ecviz_here(capsys, *args, "--model", "experts=0"), "experts 0 must be at least 1")
    assert not out.exists()
    # a weight that starts as identity (text_pos) may be missing from the checkpoint: it starts at zero
    train(config(tmp_path / "g", **still, init=init, model="text_pos=true"), progress=False)
    g = load_file(tmp_path / "g" / "checkpoint" / "model.safetensors")
    assert set(g) == set(a) | {"text_pos"} and all(torch.allclose(a[k], g[k], atol=1e-9) for k in a)
    assert g["text_pos"].abs().max() < 1e-6
    resume = ["train", "--preset", "EC-DiT-tiny-4E", "--steps", 2, "--batch-size", 4, "--warmup", 0, "--seed", 4,
              "--lr", 1e-12, "--ema", 0.0, "--ckpt-every", 1, "--probe-every", 1, "--quiet", "--resume",
              "--out", tmp_path / "b", "--init"]
    # another --init than the run started from is refused, not ignored; so is one for a run of fresh weights
    assert_bad_input(ecviz_here(capsys, *resume, tmp_path / "elsewhere"), f"started from {init}")
    assert ecviz_here(capsys, *resume, Path(os.path.relpath(init))).returncode == 0  # the same one, relative: it
    # was refused as another
    assert_bad_input(ecviz_here(capsys, *resume[:-3], "--out", tmp_path / "c", "--init", init),
                     "started from fresh weights")
    shutil.move(init, tmp_path / "moved")
    assert ecviz_here(capsys, *resume, init).returncode == 0  # b's command, its --init since moved away
    _, resumed = load_checkpoint(tmp_path / "b" / "checkpoint")
    assert resumed.meta["step"] == 2 and resumed.meta["init_from"] == info.meta["init_from"]  # kept, not reread
    # a model trained in stages names every stage: b's export, trained on, records b's lineage within its own
    ecviz("export", "--ckpt", tmp_path / "b", "--out", tmp_path / "b16", check=True)
    doc = json.loads((tmp_path / "b16" / "config.json").read_text())
    del doc["weights_digest"]  # as in checkpoints written before it existed (the shipped ones): the sha256 says
    (tmp_path / "b16" / "config.json").write_text(json.dumps(doc))
    train(config(tmp_path / "h", **still, init=str(tmp_path / "b16")), progress=False)
    _, h = load_checkpoint(tmp_path / "h" / "checkpoint")
    assert h.meta["init_from"]["meta"]["init_from"]["meta"]["command"] == source.meta["command"]
    assert h.meta["init_from"]["digest"] is None and h.meta["init_from"]["sha256"] == read_checkpoint(
        tmp_path / "b16").sha256
    assert "init_from" not in source.meta


def test_eval_cli_on_a_trained_checkpoint(tmp_path):
    run = tmp_path / "run"
    train(config(run, steps=2, preset="DENSE-tiny", probe_every=100), progress=False)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a circle\nthree squares\na red ring and a blue cross\n")
    r = ecviz("eval", "--ckpt", run, "--prompts", prompts, "--images-per-prompt", 2, "--steps", 2,
              "--quiet", "--json", tmp_path / "e.json", "--grid", tmp_path / "g.png", check=True)
    assert "| single_object |" in r.stdout and "| counting |" in r.stdout and "**overall**" in r.stdout
    assert "warning: ShapesEval is calibrated for images of 28 px" in r.stderr  # these are 16 px
    doc = json.loads((tmp_path / "e.json").read_text())
    assert doc["count"] == {"single_object": 2, "counting": 2, "color_attr": 2}
    assert list(doc["diagnosis"]) == ["color_attr"] and sum(doc["diagnosis"]["color_attr"].values()) == 2
    assert "got wrong" in r.stdout and "| color_attr |" in r.stdout.split("got wrong")[1]
    with Image.open(tmp_path / "g.png") as grid:  # a labelled row per prompt, every category, gaps between images
        size = grid.size
    assert size[1] >= 3 * 2 * 16 and size[0] > 2 * (2 * 16 + 1)  # (3 rows, 2 images) of 16 px, x2
    assert_bad_input(ecviz("eval", "--ckpt", run / "checkpoint", "--prompts", prompts, "--steps", 0),
                     "--steps", "0 is out of range")


def test_train_and_trace_in_a_vae_latent_space(tmp_path):
    """With the `vae` extra: a tiny random AutoencoderKL; the model takes its latent shape, probes and traces
    keep pixel images. (The converse, the extra missing, is test_text_codec.test_vae_needs_extra.)"""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    diffusers.AutoencoderKL(block_out_channels=(32, 64), latent_channels=4, sample_size=32,
                            down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(tmp_path / "vae")
    ecviz("train", "--preset", "EC-DiT-tiny-4E", "--codec", f"vae:{tmp_path / 'vae'}", "--image-size", 32,
          "--steps", 2, "--batch-size", 4, "--probe-every", 1, "--quiet", "--out", tmp_path / "run", check=True)
    model, _ = load_checkpoint(tmp_path / "run" / "checkpoint")
    assert (model.cfg.in_channels, model.cfg.input_size) == (4, 16)
    probe = xr.open_zarr(tmp_path / "run" / "routing.zarr", consolidated=False)
    assert probe.image.shape[1:] == (32, 32, 3) and probe.object_fraction.shape[1] == model.cfg.tokens
    assert Pipeline.from_model(model).generate(["a red circle"] * 2, [0, 1], steps=2).shape == (2, 32, 32, 3)


def test_a_run_killed_while_swapping_its_checkpoint_stays_loadable(tmp_path):
    """Killed between the two renames that swap a new checkpoint in, a run directory holds no `checkpoint/`, only
    the complete `.checkpoint.new` and the previous `.checkpoint.old` (and maybe a half-written build of an
    older save, `.checkpoint.*.tmp`): sample, trace and eval read the new one meanwhile, and the resumed run puts
    it in place and removes the leftovers (issue 14, item 3)."""
    run = tmp_path / "run"
    train(config(run, steps=2, preset="DENSE-tiny", probe_every=100), progress=False)
    ck = run / "checkpoint"
    shutil.copytree(ck, run / ".checkpoint.new")
    os.replace(ck, run / ".checkpoint.old")
    half = run / ".checkpoint.0123456789ab.tmp"
    half.mkdir()
    (half / "train_state.safetensors").write_bytes(b"cut short")
    info = load_checkpoint(run)[1]
    assert info.path == run / ".checkpoint.new" and info.meta["step"] == 2
    ecviz("sample", "--ckpt", run, "--prompt", "a circle", "--steps", 1, "--out", tmp_path / "s.png",
          check=True)
    train(config(run, steps=3, preset="DENSE-tiny", probe_every=100), resume=True, progress=False)
    assert load_checkpoint(run)[1].meta["step"] == 3 and load_checkpoint(run)[1].path == ck
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def test_unmask_last_trains_the_last_steps_on_every_token(tmp_path):
    """MaskDiT's unmasked tuning: with --mask-ratio 0.5 --unmask-last 2 the first 4 of 6 steps hide half the
    tokens and the last 2 see all of them; a batch whose full images make no whole routing group is refused."""
    from ecviz.train import draws

    s = config(tmp_path / "u", mask_ratio=0.5, unmask_last=2)
    cfg = s.model_config()
    keeps = [draws(s, cfg, step, 4).keep for step in range(6)]
    assert [k is None for k in keeps] == [False] * 4 + [True] * 2
    assert all(k.shape == (4, cfg.tokens // 2) for k in keeps[:4])
    assert draws(config(tmp_path / "m", mask_ratio=0.5), cfg, 5, 4).keep is not None  # without it: all masked
    train(s, progress=False)
    assert [r["step"] for r in metrics(tmp_path / "u")] == list(range(1, 7))
    # EC-DiT-tiny has 16 tokens per image: 4 images of 12 kept tokens fill a group of 48, 4 whole ones do not
    odd = dict(mask_ratio=0.25, group_size=48, batch_size=4)
    config(tmp_path / "v", **odd).validate(config(tmp_path / "v", **odd).model_config(), 1)
    bad = config(tmp_path / "w", **odd, unmask_last=1)
    with pytest.raises(ValueError, match="4 images of 16 tokens per process, not a whole number of routing groups"):
        bad.validate(bad.model_config(), 1)


def test_heldout_loss_of_a_zero_init_model_is_the_mean_squared_velocity(tmp_path):
    """scripts/heldout_loss.py (the tuning sweep's loss): a model at DiT's zero init predicts 0, so at every t
    its loss is mean((x - noise)^2) over the held-out items, what the script's own data and noise give."""
    from ecviz.checkpoint import save_checkpoint
    from ecviz.model import DiT, preset

    ckpt = save_checkpoint(DiT(preset("DENSE-tiny")), tmp_path / "zero", preset="DENSE-tiny")
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "heldout_loss.py"), str(ckpt)], check=True,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    row = json.loads(r.stdout)
    x = ShapesDataset(length=128, size=16, seed=999).batch(range(128), fields=("image",))["image"]
    noise = torch.randn(5, *x.shape, generator=torch.Generator().manual_seed(7))
    for j, t in enumerate((0.1, 0.3, 0.5, 0.7, 0.9)):
        assert row[f"t={t}"] == pytest.approx((x - noise[j]).square().mean().item(), abs=2e-5)
    assert row["mean"] == pytest.approx(sum(row[f"t={t}"] for t in (0.1, 0.3, 0.5, 0.7, 0.9)) / 5, abs=1e-5)


def test_binding_probe_swaps_roles_and_compares_the_same_images_and_noise(tmp_path, monkeypatch):
    """scripts/binding_probe.py: every held-out position and colour-attribution caption parses, its swap is
    another caption whose swap is the original; a model that ignores text (DiT's zero init predicts 0) loses
    exactly the same under its own, the swapped and another caption, so no item is "bound"."""
    from ecviz.checkpoint import save_checkpoint
    from ecviz.model import DiT, preset

    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import binding_probe as B

    held = B.held_out(16, items=64)
    for category, (x, captions) in held.items():
        assert x.shape == (64, 3, 16, 16) and len(set(captions)) > 5
        for c in captions:
            s = B.swapped(c, category)
            assert s != c and B.swapped(s, category) == c and sorted(s.split()) == sorted(c.split()), c
    assert B.swapped("a red ring and an orange circle", "color_attr") == "an orange ring and a red circle"
    ckpt = save_checkpoint(DiT(preset("EC-DiT-tiny-4E")), tmp_path / "zero", preset="EC-DiT-tiny-4E")
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "binding_probe.py"), str(ckpt)], check=True,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    row = json.loads(r.stdout)
    for category in B.CATEGORIES:
        m = row[category]
        assert m["items"] == B.ITEMS and m["loss_own"] > 0
        assert m["loss_own"] == m["loss_swapped"] == m["loss_other"]
        assert m["binding"] == m["other_beaten"] == 0 and m["rel_gap"] == m["rel_gap_other"] == 0
        assert m["by_t"] == {str(t): {"binding": 0, "rel_gap": 0} for t in B.T_GRID}


def test_a_text_table_run_is_the_same_run_and_never_loads_the_encoder(tmp_path, monkeypatch):
    """With every caption in a float32 table the run is bit for bit the encoder's run, and loads no encoder
    (the GPU machine has none); a float16 table gives the same embeddings to about 1e-3."""
    train(config(tmp_path / "encoder"), progress=False)
    captions = sorted({ShapesDataset(size=16).scene(i).caption for i in range(64)})  # the run's and the probe's
    encoder = load_text_encoder("minilm", 16)  # EC-DiT-tiny-4E's text_len
    table = TextTable.build(encoder, captions, batch=5)
    for dtype in (torch.float32, torch.float16):
        table.save(tmp_path / f"{dtype}.safetensors", dtype)
    exact = TextCache("minilm", 16)(captions)

    def no_encoder(*a, **k):
        raise AssertionError("the text encoder was loaded")

    monkeypatch.setattr("ecviz.train.load_text_encoder", no_encoder)
    cache = TextCache("minilm", 16, table=TextTable.load(tmp_path / "torch.float32.safetensors"))
    assert all(a.equal(b) for a, b in zip(cache(captions), exact, strict=True))
    half = TextCache("minilm", 16, table=TextTable.load(tmp_path / "torch.float16.safetensors"))(captions)
    assert half[1].equal(exact[1]) and torch.allclose(half[0], exact[0], rtol=2e-3, atol=2e-3)
    train(config(tmp_path / "table", text_table=str(tmp_path / "torch.float32.safetensors")), progress=False)
    assert_identical_runs(tmp_path / "encoder", tmp_path / "table")


def test_all_captions_is_every_caption_shapes_writes():
    rng = np.random.default_rng(0)
    every = all_captions()
    drawn = {describe(rng, c)[1] for c in ("single_object", "two_object", "counting", "colors", "position")
             for _ in range(3000)} | {describe(rng, "color_attr")[1] for _ in range(40000)}
    assert len(every) == len(set(every)) == 1902 and drawn == set(every)


def test_train_refuses_a_missing_foreign_or_mismatched_text_table(tmp_path, capsys):
    base = ["train", "--steps", 1, "--batch-size", 4, "--quiet", "--preset", "EC-DiT-tiny-4E"]
    assert_bad_input(ecviz_here(capsys, *base, "--text-table", tmp_path / "none", "--out", tmp_path / "a"),
                     "--text-table", "no such file")
    (tmp_path / "foreign").write_bytes(b"not a table")
    assert_bad_input(ecviz_here(capsys, *base, "--text-table", tmp_path / "foreign", "--out", tmp_path / "b"),
                     "text table", "cannot read it")
    TextTable.build(load_text_encoder("minilm", 32), ["a ring"]).save(tmp_path / "t32")
    assert_bad_input(ecviz_here(capsys, *base, "--text-table", tmp_path / "t32", "--out", tmp_path / "c"),
                     "max_len 32", "max_len 16")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_a_resume_that_changes_what_a_step_computes_is_refused(tmp_path, capsys):
    """Only the preset and model config were compared: a `--resume` with another --lr, --seed or --batch-size
    (or one that left out a flag of the original command, taking its default) went on silently, no longer the
    run it claimed to continue. Now each is refused in one line; --steps (extending the run) may change."""
    out = tmp_path / "run"
    args = ["train", "--preset", "EC-DiT-tiny-4E", "--batch-size", 4, "--lr", 3e-4, "--warmup", 1, "--ckpt-every", 2,
            "--probe-every", 100, "--log-every", 1, "--quiet", "--out", out]
    assert ecviz_here(capsys, *args, "--steps", 2).returncode == 0
    step_before = json.loads((out / "checkpoint" / "config.json").read_text())["meta"]["step"]
    changed = {"--lr": ["--lr", 1e-4], "--seed": ["--seed", 1], "--batch-size": ["--batch-size", 8]}
    for flag, extra in changed.items():
        cut = [a for i, a in enumerate(args) if not (a == flag or (i and args[i - 1] == flag))]
        assert_bad_input(ecviz_here(capsys, *cut, *extra, "--steps", 4, "--resume"), f"trained with {flag}", "--init")
    assert json.loads((out / "checkpoint" / "config.json").read_text())["meta"]["step"] == step_before
    assert ecviz_here(capsys, *args, "--steps", 4, "--resume").returncode == 0
    assert len(metrics(out)) == 4
    # --steps below the checkpoint's step trained nothing, yet filed the step-4 model in the probe as step 2
    probe = xr.open_zarr(out / "routing.zarr", consolidated=False).load()
    assert_bad_input(ecviz_here(capsys, *args, "--steps", 2, "--resume"), "at step 4, past --steps 2")
    xr.testing.assert_identical(xr.open_zarr(out / "routing.zarr", consolidated=False).load(), probe)
    assert len(metrics(out)) == 4


def test_a_resume_over_damaged_run_files_is_one_line_or_goes_on(tmp_path, capsys):
    """A probe store that lost an array was a KeyError traceback on resume, and a metrics.jsonl holding bytes
    that are not text a UnicodeDecodeError: the first is refused in one line, the second's unreadable lines are
    dropped like a partial line and the run goes on."""
    run = tmp_path / "run"
    args = ["train", "--preset", "EC-DiT-tiny-4E", "--batch-size", 4, "--warmup", 1, "--ckpt-every", 1,
            "--probe-every", 1, "--log-every", 1, "--quiet", "--out", run]
    assert ecviz_here(capsys, *args, "--steps", 1).returncode == 0
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\xfe garbage\n")
    probe = run / "routing.zarr"
    shutil.move(probe / "expert_count", tmp_path / "expert_count")
    assert_bad_input(ecviz_here(capsys, *args, "--steps", 2, "--resume"), "not a readable routing probe")
    shutil.move(tmp_path / "expert_count", probe / "expert_count")
    assert ecviz_here(capsys, *args, "--steps", 2, "--resume").returncode == 0
    assert [row["step"] for row in metrics(run)] == [1, 2]
    # a checkpoint damaged by hand: refused in one line before anything is loaded or the metrics trimmed (a
    # negative step emptied metrics.jsonl, then failed; damaged EMA weights were loaded and saved again under a
    # fresh digest; a lost or reshaped tensor was a KeyError or size-mismatch traceback)
    from safetensors import safe_open
    from safetensors.torch import save_file

    def damaged(name: str, edit) -> Path:
        bad = shutil.copytree(run, tmp_path / name)
        edit(bad / "checkpoint")
        return bad

    def rewrite(path: Path, change) -> None:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
        save_file(change(load_file(path)), path, metadata=meta)

    def step_of(value):
        def edit(ck):
            doc = json.loads((ck / "config.json").read_text())
            doc["meta"]["step"] = value
            (ck / "config.json").write_text(json.dumps(doc))
        return edit

    def big(d):
        d["final_layer.linear.bias"] = d["final_layer.linear.bias"] + 1e30
        return d

    cases = {
        "step-neg": (step_of(-5), "meta.step is -5, not a step count"),
        "step-text": (step_of("abc"), 'meta.step is "abc", not a step count'),
        "step-gone": (step_of(None), "meta.step is null"),
        "ema": (lambda ck: rewrite(ck / "model.safetensors", big), "its tensors' digest differs"),
        "lost": (lambda ck: rewrite(ck / "train_state.safetensors",
                                    lambda d: {k: v for k, v in d.items() if k != "model.null_text"}),
                 "train_state.safetensors's 'null_text' is missing"),
        "opt-shape": (lambda ck: rewrite(ck / "train_state.safetensors", lambda d: d | {
            k: v[:1] for k, v in d.items() if k.startswith("opt.") and k.endswith(".square_avg") and v.dim() > 1}),
                      "has shape"),
        "stale": (step_of(1), "train_state.safetensors was saved at step 2, its config.json says 1"),
    }
    for name, (edit, says) in cases.items():
        bad = damaged(name, edit)
        before = (bad / "metrics.jsonl").read_bytes()
        assert_bad_input(ecviz_here(capsys, *args[:-1], bad, "--steps", 3, "--resume"), says, "checkpoint")
        assert (bad / "metrics.jsonl").read_bytes() == before, name
    # a hand-damaged metrics row (no loss) is dropped like a partial line: it failed the loss curve later
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 1}\n')
    assert ecviz_here(capsys, *args, "--steps", 3, "--resume").returncode == 0
