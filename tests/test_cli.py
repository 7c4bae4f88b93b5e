"""The `ecviz` command as a user runs it: real processes, one-line errors with exit status 2."""

import argparse
import dataclasses
import json
import os
import re
import shutil
import stat

import numpy as np
import pytest
import torch
import zarr
from helpers import assert_bad_input, ecviz, ecviz_here
from PIL import Image

import ecviz as ev
from ecviz.checkpoint import load_checkpoint
from ecviz.cli import build_parser, main, without_nproc
from ecviz.errors import EcvizError, UsageError
from ecviz.plots import GAP, GAP_FILL
from ecviz.train import TrainConfig
from ecviz.validate import Number


def test_presets_lists_parameter_counts():
    r = ecviz("presets", "EC-DiT-XL-32E")
    assert r.returncode == 0
    assert "EC-DiT-XL-32E" in r.stdout and "5441.7M" in r.stdout


def test_init_then_sample(tmp_path):
    ck = tmp_path / "ck"
    r = ecviz("init", "--preset", "EC-DiT-tiny-4E", "--out", ck)
    assert r.returncode == 0, r.stderr
    assert (ck / "model.safetensors").is_file() and (ck / "config.json").is_file()
    out = tmp_path / "a.png"
    r = ecviz("sample", "--ckpt", ck, "--prompt", "a red circle", "--out", out, "--n", 2, "--steps", 2,
              "--scale", 1)
    assert r.returncode == 0, r.stderr
    img = np.asarray(Image.open(out))
    assert img.shape == (16, 32 + GAP, 3) and (img[:, 16:16 + GAP] == GAP_FILL).all()  # a gap between images
    # refusing to overwrite keeps what is there
    before = (ck / "model.safetensors").read_bytes()
    assert_bad_input(ecviz("init", "--preset", "DENSE-tiny", "--out", ck), "already holds a checkpoint")
    assert (ck / "model.safetensors").read_bytes() == before


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    """In this process (`ecviz_here`): other tests check the same through `python -m ecviz`."""

    def cli(*args):
        return ecviz_here(capsys, *args)

    assert_bad_input(cli("init", "--preset", "EC-DiT-XL-7E", "--out", tmp_path / "x"), "unknown preset")
    from ecviz.model import count_params, preset
    from ecviz.validate import host_memory

    big = "EC-DiT-M-64E"  # 97B parameters: killed by the kernel, or hung, without a word
    if (host_memory() or 0) < 8 * count_params(preset(big))["total"]:
        assert_bad_input(cli("init", "--preset", big, "--out", tmp_path / "x"), "97.5B parameters",
                         "choose a smaller preset")
        assert not (tmp_path / "x").exists()
    assert_bad_input(cli("train", "--preset", "EC-DiT-tiny-4E", "--model", "depth=100000", "--out", tmp_path / "t"),
                     "depth 100000: at most 1000 layers")  # minutes counting parameters on the meta device
    assert_bad_input(cli("init", "--preset", "EC-DiT-small-8E", "--group-size", "96", "--out", tmp_path / "x"),
                     "group_size 96", "multiple or a divisor")
    assert_bad_input(cli("sample", "--ckpt", tmp_path / "none", "--prompt", "x", "--out", tmp_path / "a.png"),
                     "no such directory")
    assert_bad_input(cli("sample", "--ckpt", tmp_path / "none", "--prompt", "x", "--out", tmp_path / "a.xyz"),
                     "unknown image type '.xyz'")
    assert_bad_input(cli("sample", "--ckpt", tmp_path / "none", "--prompt", "x", "--out", tmp_path / "a.psd"),
                     "unwritable image type '.psd'")  # Pillow reads it, cannot write it: was a late KeyError
    assert_bad_input(cli("sample", "--ckpt", tmp_path / "none", "--prompt", "x", "--out", tmp_path / "a.xbm"),
                     "unwritable image type '.xbm'")  # Pillow writes it, but not in RGB: was an error after sampling
    assert_bad_input(cli("sample", "--ckpt", tmp_path / "none", "--prompt", "x", "--out", tmp_path),
                     "is a directory; name the image file")  # it said "unknown image type ''"
    ck = tmp_path / "ck"
    assert cli("init", "--preset", "EC-DiT-tiny-4E", "--out", ck).returncode == 0
    huge = 16 * 10**6  # tokens: a million tiny images, every batch padded to them (was a MemoryError traceback)
    for command in (["sample", "--prompt", "x", "--out", tmp_path / "a.png"], ["trace", "--prompts", "shapes",
                                                                               "--out", tmp_path / "t.zarr"]):
        assert_bad_input(cli(*command, "--ckpt", ck, "--group-size", huge),
                         f"routing groups of {huge} tokens hold 1000000 images", "smaller --group-size")
    # a group of the model's own size padded out is fine (--n 1 --batch-size 1: an image and its filler)
    r = cli("sample", "--ckpt", ck, "--prompt", "x", "--n", 1, "--batch-size", 1, "--steps", 1, "--out",
            tmp_path / "one.png")
    assert r.returncode == 0, r.stderr
    # a strip wider than the format holds (WebP: 16383 px) is refused before sampling, not a late traceback
    assert_bad_input(cli("sample", "--ckpt", ck, "--prompt", "x", "--n", 600, "--scale", 2, "--out",
                         tmp_path / "wide.webp"), "WEBP cannot hold an image of", "use .png")
    assert_bad_input(cli("eval", "--ckpt", ck, "--prompts", "shapes", "--json", tmp_path / "same.png", "--grid",
                         tmp_path / "same.png"), "--json and --grid both name")
    assert_bad_input(cli("sample", "--ckpt", ck, "--prompt", "x", "--sample", 3, "--out", tmp_path / "s.png"),
                     "--sample 3: picks a sample of --from-trace")  # was silently ignored
    (ck / "model.safetensors").unlink()
    assert_bad_input(cli("sample", "--ckpt", ck, "--prompt", "x", "--out", tmp_path / "a.png"),
                     "model.safetensors is missing")


def test_version_is_the_installed_packages(capsys):
    from importlib.metadata import version

    r = ecviz_here(capsys, "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"ecviz {version('ecviz')}"


def subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_export_halves_the_weights_and_loads_them_back_as_float32(ckpts, tmp_path, capsys):
    """`ecviz export`: float16 weights (half the file; what the shipped checkpoints are), the same config and
    meta plus weights_dtype; loading casts them back, so the model equals the original rounded to float16."""
    from safetensors import safe_open

    half = tmp_path / "half"
    assert main(["export", "--ckpt", ckpts["ec"], "--out", half]) == 0
    src, dst = ckpts["ec"] / "model.safetensors", half / "model.safetensors"
    assert dst.stat().st_size < 0.55 * src.stat().st_size
    with safe_open(dst, framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    a, ck_a = load_checkpoint(ckpts["ec"])
    b, ck_b = load_checkpoint(half)
    assert ck_b.config == ck_a.config and ck_b.meta["weights_dtype"] == "float16"
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert pb.dtype == torch.float32 and torch.equal(pb, pa.half().float()), name
    before = dst.read_bytes()
    assert_bad_input(ecviz_here(capsys, "export", "--ckpt", ckpts["ec"], "--out", half), "already holds")
    assert_bad_input(ecviz_here(capsys, "export", "--ckpt", half, "--out", half, "--overwrite"), "another directory")
    assert dst.read_bytes() == before
    run = tmp_path / "run"  # into the run directory it came from: its config.json would hide the run's checkpoint/
    shutil.copytree(ckpts["ec"], run / "checkpoint")
    assert_bad_input(ecviz_here(capsys, "export", "--ckpt", run, "--out", run, "--overwrite"), "run directory")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint"]


def test_replacing_a_checkpoint_removes_what_described_the_old_weights(ckpts, tmp_path, capsys):
    """`init`/`export --overwrite` over a checkpoint with its training record and evaluation beside it (as the
    shipped ones have): those described the replaced weights, and the app would show them for the new ones. They
    go, and the output says which; other files stay; without --overwrite nothing changes."""
    from ecviz.checkpoint import RECORDS

    ck = tmp_path / "ck"
    assert ecviz_here(capsys, "init", "--preset", "DENSE-tiny", "--out", ck).returncode == 0
    for argv in (["init", "--preset", "DENSE-tiny", "--out", ck], ["export", "--ckpt", ckpts["ec"], "--out", ck]):
        (ck / "routing.zarr").mkdir(exist_ok=True)
        (ck / "routing.zarr" / "zarr.json").write_text("{}")
        for name in ("metrics.jsonl", "shapes_eval.json", "notes.txt"):
            (ck / name).write_text("old\n")
        (ck / ".routing.zarr.0123456789ab.tmp").mkdir()  # an earlier removal's, killed midway
        os.utime(ck / ".routing.zarr.0123456789ab.tmp", (1, 1))
        assert_bad_input(ecviz_here(capsys, *argv), "already holds")
        assert (ck / "shapes_eval.json").exists()
        r = ecviz_here(capsys, *argv, "--overwrite")
        assert r.returncode == 0, r.stderr
        assert "removed the replaced model's metrics.jsonl, routing.zarr, shapes_eval.json" in r.stdout
        assert sorted(p.name for p in ck.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    for name in ("init", "export"):
        assert all(f in " ".join(subcommands()[name].format_help().split()) for f in RECORDS), name
    run = tmp_path / "run"  # a run's checkpoint/: its training state and the run's record would stay behind
    shutil.copytree(ck, run / "checkpoint")
    (run / "checkpoint" / "train_state.safetensors").write_bytes(b"state")
    for argv in (["init", "--preset", "DENSE-tiny"], ["export", "--ckpt", ckpts["ec"]]):
        assert_bad_input(ecviz_here(capsys, *argv, "--out", run / "checkpoint", "--overwrite"),
                         "is the checkpoint of the `ecviz train` run")
    assert (run / "checkpoint" / "train_state.safetensors").read_bytes() == b"state"
    again = tmp_path / "models" / "checkpoint"  # a directory of that name that is no run's: replaced as any other
    for _ in range(2):
        assert ecviz_here(capsys, "init", "--preset", "DENSE-tiny", "--out", again, "--overwrite").returncode == 0


def test_only_bad_input_is_one_line_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """The error boundary: EcvizError and OSError are the user's to fix (one line, exit status 2); a ValueError
    from inside a library is a bug and must reach the user with its traceback, not pose as bad input."""
    import safetensors.torch

    (tmp_path / "file.txt").write_text("")
    assert main(["init", "--preset", "DENSE-tiny", "--out", tmp_path / "file.txt" / "x"]) == 2  # a path under a file
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["init", "--preset", "DENSE-tiny-4E", "--out", tmp_path / "a"]) == 2  # no such preset
    assert "unknown preset" in capsys.readouterr().err

    def broken(*args, **kwargs):
        raise ValueError("a library bug, not the user's input")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(ValueError, match="a library bug"):
        main(["init", "--preset", "DENSE-tiny", "--out", tmp_path / "b"])
    assert not (tmp_path / "b" / "model.safetensors").exists()


def test_the_command_line_and_the_python_api_share_their_defaults():
    """trace, eval, sample and the experiments take their defaults from ecviz.defaults, as the functions behind
    them do: a default changed in one place changes everywhere."""
    import inspect

    from ecviz.experiments import ablate_words, probe_groups
    from ecviz.pipeline import Pipeline
    from ecviz.shapes_eval import eval_checkpoint
    from ecviz.trace.run import TraceSettings

    def defaults(fn):
        return {k: p.default for k, p in inspect.signature(fn).parameters.items()}

    parse = build_parser().parse_args
    t = parse(["trace", "--ckpt", "c", "--prompts", "p"])
    ts = TraceSettings(ckpt="c", prompts="p")
    assert (t.steps, t.guidance, t.seed, t.batch_size, t.images_per_prompt) == (
        ts.steps, ts.guidance, ts.seed, ts.batch_size, ts.images_per_prompt)
    e, api = parse(["eval", "--ckpt", "c"]), defaults(eval_checkpoint)
    assert (e.steps, e.guidance, e.seed, e.batch_size, e.images_per_prompt) == (
        api["steps"], api["guidance"], api["seed"], api["batch_size"], api["images_per_prompt"])
    sa, api = parse(["sample", "--out", "x.png"]), defaults(Pipeline.generate_samples)
    assert (sa.steps, sa.guidance, sa.seed, sa.batch_size) == (api["steps"], api["guidance"], api["seed"],
                                                          api["batch_size"])
    for args, fn in ((["ablate-words", "--out", "o"], ablate_words), (["probe-groups"], probe_groups)):
        a, api = parse([*args, "--ckpt", "c", "--prompts", "p"]), defaults(fn)
        assert (a.steps, a.guidance, a.seed) == (api["steps"], api["guidance"], api["seed"]), args


def test_every_option_has_help_with_its_default():
    for name, parser in subcommands().items():
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"ecviz {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and len(action.help) > 8, where
            if action.required or not action.option_strings or action.nargs == 0:  # required, positional, flag
                continue
            if action.default is None:  # the default is a rule, said in words
                assert "default" in action.help, where
            else:
                assert f"(default: {action.default})" in " ".join(text.split()), where
    # ecviz train leaves its options None so that TrainConfig decides: the help must state TrainConfig's values
    train = subcommands()["train"]
    for f in dataclasses.fields(TrainConfig):
        action = next((a for a in train._actions if a.dest == f.name), None)
        if action is None or action.default is not None or f.default in (None, dataclasses.MISSING, False):
            continue
        stated = re.search(r"\(default: ([^)]+)\)", action.help)
        assert stated and type(f.default)(stated.group(1)) == f.default, (f.name, action.help)
    r = ecviz("sample", "--help")
    assert r.returncode == 0 and "group partners" in r.stdout and "--from-trace" in r.stdout


def test_run_directory_is_accepted_as_a_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    ecviz("train", "--preset", "EC-DiT-tiny-4E", "--steps", 1, "--batch-size", 4, "--quiet", "--out", run, check=True)
    assert not (run / "config.json").exists() and (run / "checkpoint" / "config.json").is_file()
    _, info = load_checkpoint(run)
    assert info.path == run / "checkpoint" and info.preset == "EC-DiT-tiny-4E"
    r = ecviz_here(capsys, "hooks", "--ckpt", run)
    assert r.returncode == 0 and "blocks.1.moe.hook_dispatch" in r.stdout
    p = tmp_path / "p.txt"
    p.write_text("a red circle\n")
    ecviz("trace", "--ckpt", run, "--prompts", p, "--steps", 1, "--quiet", "--out", tmp_path / "t.zarr", check=True)
    assert ev.open_trace(tmp_path / "t.zarr").attrs["checkpoint"] == str(run / "checkpoint")
    (run / "checkpoint" / "model.safetensors").unlink()
    assert_bad_input(ecviz_here(capsys, "hooks", "--ckpt", run), "model.safetensors is missing", "run directory")


def test_hooks_lists_every_hook_point_with_its_shape(ckpts):
    model, _ = load_checkpoint(ckpts["tc"])
    r = ecviz("hooks", "--ckpt", ckpts["tc"], check=True)
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:]}
    assert set(rows) == set(model.hook_points)
    S, g = model.cfg.tokens, model.cfg.infer_group
    E, C = model.cfg.experts, model.blocks[1].moe.slots()
    assert f"({g // S},)" in rows["hook_t"] and f"(1, {E}, {C})" in rows["blocks.1.moe.hook_dispatch"]
    assert f"(1, {g}, 2)" in rows["blocks.1.moe.hook_choice"] and "dropped" in rows["blocks.1.moe.hook_choice"]
    assert rows["hook_keep"].split()[1] == "-"  # only MaskDiT training forwards reach it
    only = {n for n, line in rows.items() if "observe-only:" in line}  # views an edit would not change
    assert only == {f"blocks.{b}.moe.{h}" for b in model.cfg.sparse_layers
                    for h in ("hook_group", "hook_dispatch", "hook_choice", "hook_choice_gate")}


def test_every_file_and_directory_follows_the_umask(ckpts, prompt_file, tmp_path):
    """What the commands write (checkpoints and a run's train_state, traces, probes, images, reports, JSON)
    gets the mode the user's umask gives new files and directories, like any other program's output."""
    out = tmp_path / "out"
    trace = out / "t.zarr"
    commands = [
        ["init", "--preset", "EC-DiT-tiny-4E", "--out", out / "init"],
        ["export", "--ckpt", out / "init", "--out", out / "half"],
        ["train", "--preset", "EC-DiT-tiny-4E", "--steps", 2, "--batch-size", 4, "--ckpt-every", 1,
         "--probe-every", 1, "--data-workers", 0, "--quiet", "--out", out / "run"],
        ["sample", "--ckpt", ckpts["ec"], "--prompt", "a red circle", "--n", 2, "--steps", 2, "--out", out / "s.png"],
        ["trace", "--ckpt", ckpts["ec"], "--prompts", prompt_file, "--steps", 2, "--limit", 2, "--quiet",
         "--record", "dispatch,cross_attn", "--out", trace],
        ["report", "--trace", trace, "--out", out / "report"],
        ["eval", "--ckpt", out / "run", "--prompts", "shapes", "--images-per-prompt", 1, "--steps", 1, "--quiet",
         "--json", out / "e.json", "--grid", out / "g.png"],
        ["ablate-words", "--ckpt", ckpts["ec"], "--prompts", prompt_file, "--limit", 1, "--steps", 1, "--quiet",
         "--out", out / "ablation.zarr"],
    ]
    old = os.umask(0o002)  # group-writable: neither the default 022 nor what a hard-coded mode would give
    try:
        for argv in commands:
            assert main([str(a) for a in argv]) == 0, argv
    finally:
        os.umask(old)
    assert (out / "run" / "checkpoint" / "train_state.safetensors").is_file()
    wrong = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777) for p in out.rglob("*")
             if p.stat().st_mode & 0o777 != (0o775 if p.is_dir() else 0o664)}
    assert not wrong, wrong


OUTPUTS = {"out", "json", "grid", "data_cache"}  # options naming something a command writes
FREE = {"prompt"}  # any text is a prompt
FLAGS = (argparse._StoreTrueAction, argparse._HelpAction)


def bad_values(action: argparse.Action, missing: str) -> list[str]:
    """Values the option must refuse: out of its range, non-finite, an unknown or absent device or format, a
    path that is not there, a word the option does not know. `missing`: a path that does not exist."""
    if isinstance(action.type, Number):
        return action.type.out_of_range()
    if action.dest == "device":
        import torch

        return ["bogus", "cpu:0", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"])
    return {"dtype": ["float8"], "preset": ["EC-DiT-tiny-9E"], "ckpt": [missing], "from_trace": [missing],
            "prompts": [missing], "trace": [missing], "source": [missing], "init": [missing],
            "record": ["dispatch,bogus"],
            "data": [missing, "shapes:bogus", "shapes:colors*0", "shapes:colors*x", "shapes:colors*²"],
            "record_steps": ["x", "99"], "record_layers": ["x", "99"], "codec": ["bogus"],
            "remove_experts": ["x", "99", "0-1000000000"], "remove_layers": ["x", "99", "0"],
            "text_encoder": ["bogus"], "text_table": [missing], "model": ["bogus=1", "width=abc"],
            "lr_decay": ["linear"]}.get(action.dest, [])


def test_every_option_of_every_command_refuses_bad_values_in_one_line(ckpts, prompt_file, tmp_path, capsys):
    """The table, built from the parser: every option of every command (and the presets argument) with values
    it must refuse: numbers past their range (and nan/inf), devices this machine lacks, an unknown --dtype,
    outputs that cannot be created, inputs that are not there, words an option does not know. Each ends in one
    line naming the option or the user's value, exit status 2, no traceback, and nothing written. An option
    added without a range or a row here fails it."""
    from ecviz.trace.synthetic import write_synthetic_trace

    trace = write_synthetic_trace(tmp_path / "in" / "syn.zarr", samples=4)
    out = tmp_path / "out"
    base = {
        "presets": [],
        "init": ["--preset", "EC-DiT-tiny-4E", "--out", out / "init"],
        "export": ["--ckpt", ckpts["ec"], "--out", out / "half"],
        "sample": ["--ckpt", ckpts["ec"], "--prompt", "a red circle", "--out", out / "s.png"],
        "hooks": ["--ckpt", ckpts["ec"]],
        "trace": ["--ckpt", ckpts["ec"], "--prompts", prompt_file, "--out", out / "t.zarr"],
        "eval": ["--ckpt", ckpts["ec"], "--json", out / "e.json"],
        "train": ["--preset", "EC-DiT-tiny-4E", "--out", out / "run"],
        "report": ["--trace", trace, "--out", out / "report"],
        "ablate-words": ["--ckpt", ckpts["ec"], "--prompts", prompt_file, "--out", out / "a.zarr"],
        "probe-groups": ["--ckpt", ckpts["ec"], "--prompts", prompt_file, "--json", out / "p.json"],
    }
    alone = {("sample", "--from-trace"): ["--out", out / "s.png"],  # instead of --prompt, not with it
             ("report", None): ["--out", out / "report"]}  # the trace as an argument, instead of --trace
    for name in ("sample", "eval"):  # --remove-layers says where --remove-experts removes: with it, or refused
        alone[(name, "--remove-layers")] = [*base[name], "--remove-experts", "0"]
    assert set(base) == set(subcommands()), "a new command needs its row here"
    blocker = tmp_path / "in" / "file"
    blocker.write_text("")
    missing = str(tmp_path / "in" / "none")
    cases = []
    for name, parser in subcommands().items():
        for action in parser._actions:
            assert action.type not in (int, float), f"ecviz {name} {action.option_strings}: no range (ecviz.validate)"
            if isinstance(action, FLAGS) or action.dest in FREE:
                continue
            values = bad_values(action, missing) + ([str(blocker / "x")] if action.dest in OUTPUTS else [])
            assert values, f"ecviz {name} {action.option_strings or action.dest}: no bad value in the table"
            option = action.option_strings[0] if action.option_strings else None
            cases += [(name, option, v) for v in values]
    assert len(cases) > 120
    failures = []
    for name, option, value in cases:
        argv = [name, *map(str, alone.get((name, option), base[name])), *([option] if option else []), value]
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        named = len(lines) == 1 and ((option or value) in lines[0] or value in lines[0])
        if code != 2 or not named or "Traceback" in err or out.exists():
            failures.append((argv[0], option, value, code, err[-300:]))
    assert not failures, failures


def test_inputs_refused_only_in_combination_are_refused_before_any_work(ckpts, prompt_file, tmp_path, capsys):
    """Values in range that the model or the other options rule out: one line and exit status 2 too, before a
    progress bar, a rank or a file."""
    out = tmp_path / "out"
    sparse = ["--ckpt", ckpts["ec"], "--prompts", prompt_file]
    other = tmp_path / "other.txt"
    other.write_text("a red circle\na photo of a dog\n")
    cases = [
        (["ablate-words", *sparse, "--out", out / "a.zarr", "--group-size", 7], "--group-size"),
        (["ablate-words", *sparse, "--out", out / "a.zarr", "--capacity-factor", 100], "--capacity-factor 100: expert"),
        (["trace", *sparse, "--out", out / "t.zarr", "--group-size", 7], "--group-size 7: infer_group_size 7 must be"),
        (["sample", "--ckpt", ckpts["ec"], "--prompt", "x", "--out", out / "s.png", "--group-size", 7],
         "--group-size 7: infer_group_size 7"),
        (["sample", "--ckpt", ckpts["ec"], "--prompt", "x", "--out", out / "s.png", "--capacity-factor", 100],
         "--capacity-factor 100: expert capacity"),
        (["trace", *sparse, "--out", out / "t.zarr", "--capacity-factor", 100], "--capacity-factor 100: expert"),
        (["trace", *sparse, "--out", out / "t.zarr", "--capacity-factor", 5, "--nproc", 2], "--capacity-factor 5"),
        (["eval", "--ckpt", ckpts["ec"], "--json", out / "e.json", "--group-size", 7], "--group-size 7"),
        (["eval", "--ckpt", ckpts["dense"], "--json", out / "e.json", "--capacity-factor", 1],
         "a dense model has no experts"),
        (["trace", "--ckpt", ckpts["dense"], "--prompts", prompt_file, "--out", out / "t.zarr",
          "--capacity-factor", 1], "a dense model"),
        # routing options for a dense model were accepted and ignored (the review of 11-29)
        (["trace", "--ckpt", ckpts["dense"], "--prompts", prompt_file, "--out", out / "t.zarr",
          "--group-size", 512], "--group-size 512: a dense model has no experts"),
        (["sample", "--ckpt", ckpts["dense"], "--prompt", "x", "--out", out / "s.png", "--group-size", 16],
         "--group-size 16: a dense model"),
        (["train", "--preset", "DENSE-tiny", "--out", out / "r", "--group-size", 64], "--group-size 64: a dense"),
        (["init", "--preset", "DENSE-tiny", "--out", out / "i", "--infer-group-size", 64], "--infer-group-size 64"),
        (["init", "--preset", "EC-DiT-tiny-4E", "--out", out / "i", "--infer-group-size", 7], "infer_group_size 7"),
        (["train", "--preset", "EC-DiT-tiny-4E", "--out", out / "r", "--batch-size", 3, "--nproc", 2],
         "--batch-size 3 does not split over 2 processes"),
        (["train", "--preset", "EC-DiT-tiny-4E", "--out", out / "r", "--image-size", 7],
         "--image-size 7 is not a multiple of the model's 4 px patches"),
        (["train", "--preset", "DENSE-tiny", "--out", out / "r", "--data-cache", "--data", prompt_file],
         "--data-cache is for --data shapes"),
        (["train", "--preset", "DENSE-tiny", "--out", out / "r", "--data", "shapes:position,colour"],
         "unknown Shapes category 'colour'"),
        (["probe-groups", "--ckpt", ckpts["dense"], "--prompts", prompt_file], "dense"),
        # sizes each in range that together would allocate tens of GB before any message (the sweep of 11-28)
        (["ablate-words", *sparse, "--out", out / "a.zarr", "--group-size", 16 * 10**6], "routing groups of 10"),
        (["train", "--preset", "EC-DiT-tiny-4E", "--out", out / "r", "--image-size", 100000],
         "--image-size 100000 gives 625000000 tokens per image"),
        (["sample", "--ckpt", ckpts["ec"], "--prompt", "x", "--out", out / "s.png", "--n", 4096, "--scale", 64],
         "a strip of over"),
        (["trace", *sparse, "--out", out / "t.zarr", "--record", ","], "--record names nothing to record"),
        (["train", "--preset", "DENSE-tiny", "--out", out / "r", "--unmask-last", 5], "without --mask-ratio"),
        (["train", "--preset", "EC-DiT-tiny-4E", "--out", out / "r", "--model", "experts=1000000"],
         "33,152M parameters need about 618 GiB to train"),  # killed by the kernel a minute in, without a word
        (["sample", "--ckpt", ckpts["ec"], "--prompt", " ", "--out", out / "s.png"], "--prompt is empty"),
        # what the fuzzing of 11-29 found: a traceback a batch in (its store replaced), a wrong message, options
        # silently ignored or conflicting
        (["trace", *sparse, "--out", out / "t.zarr", "--steps", 10**7], "recording 10,000,000 steps of a batch"),
        (["ablate-words", *sparse, "--out", out / "a.zarr", "--steps", 10**7], "recording 10,000,000 steps"),
        (["probe-groups", *sparse, "--steps", 10**7], "recording 10,000,000 steps"),
        (["train", "--preset", "EC-DiT-tiny-4E", "--out", out / "r", "--batch-size", 10**9],
         "--batch-size 1000000000: its activations alone need over"),
        (["trace", *sparse, "--out", out / "t.zarr", "--record-steps", "0-1000000000"], "more than 100,000 indices"),
        (["trace", "--ckpt", ckpts["dense"], "--prompts", prompt_file, "--out", out / "t.zarr", "--record-layers",
          "1"], "--record-layers: a dense model has no sparse layers"),
        (["sample", "--ckpt", ckpts["ec"], "--prompt", "x", "--remove-experts", "0-99", "--out", out / "s.png"],
         "--remove-experts 0-99: name experts 0..3"),
        (["trace", *sparse, "--out", out / "t.zarr", "--verify", "--overwrite"], "--verify only reads the store"),
        (["eval", "--ckpt", ckpts["ec"], "--json", out / "e.json", "--grid-prompts", 3], "--grid-prompts 3 sets"),
        (["eval", "--ckpt", ckpts["ec"], "--prompts", other, "--json", out / "e.json"],
         "other.txt, prompt 2: 'a photo of a dog' is not a Shapes caption"),
        (["sample", "--ckpt", ckpts["ec"], "--prompt", "x", "--from-trace", out / "t.zarr", "--out", out / "s.png"],
         "--prompt and --from-trace are alternatives"),
        (["presets", ""], "unknown preset ''"),
    ]
    for command in (["train", "--preset", "DENSE-tiny", "--out", out / "r"], ["trace", *sparse, "--out", out / "t"]):
        for nproc in (2, 64):  # a GPU for each process, and cuda:N would be one for all
            if torch.cuda.device_count() < nproc:
                cases.append(([*command, "--device", "cuda", "--nproc", nproc], "--device cuda"))
            cases.append(([*command, "--device", "cuda:0", "--nproc", nproc], "--device cuda:0"))
    for argv, words in cases:
        r = ecviz_here(capsys, *argv)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and words in lines[0], (argv, r.stderr[-500:])
        assert not out.exists(), argv


def test_the_launcher_reruns_the_command_without_its_nproc():
    assert without_nproc(["trace", "--nproc", "2", "--steps", "3"]) == ["trace", "--steps", "3"]
    assert without_nproc(["train", "--nproc=2", "--out", "r", "--np", "3"]) == ["train", "--out", "r"]
    assert without_nproc(["trace", "--n", "2", "--prompts", "p"]) == ["trace", "--prompts", "p"]


def test_the_bad_values_the_issue_found_are_refused_by_the_real_command(ckpts, prompt_file, tmp_path):
    """The cases that went through before: a traceback, a whole prompt file for --limit 0, black images for nan."""
    out = tmp_path / "out"
    assert_bad_input(ecviz("trace", "--ckpt", ckpts["ec"], "--prompts", prompt_file, "--device", "bogus",
                           "--out", out / "t.zarr"), "--device bogus", "unknown device")
    assert_bad_input(ecviz("trace", "--ckpt", ckpts["ec"], "--prompts", prompt_file, "--limit", 0,
                           "--out", out / "t.zarr"), "--limit", "0 is out of range")
    assert_bad_input(ecviz("sample", "--ckpt", ckpts["ec"], "--prompt", "x", "--n", 0, "--out", out / "a.png"),
                     "--n", "0 is out of range")
    for name in ("--guidance", "--cfg"):  # --cfg: the guidance scale's former name, still accepted
        assert_bad_input(ecviz("sample", "--ckpt", ckpts["ec"], "--prompt", "x", name, "nan", "--out",
                               out / "a.png"), "--guidance", "nan is out of range", "finite")
    assert_bad_input(ecviz("presets", "EC-DiT-tiny-9E"), "unknown preset")
    assert not out.exists()


def test_overwrite_replaces_only_stores_and_no_command_writes_over_what_is_not_its_own(ckpts, prompt_file, tmp_path,
                                                                                       capsys):
    """`--overwrite` deleted whatever --out named (the input checkpoint, a folder of notes), `train --out` wrote
    its run over a checkpoint's files, `init` into a trace store: each is refused in one line, nothing touched."""
    ck = shutil.copytree(ckpts["ec"], tmp_path / "ck")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    kept = {p: p.read_bytes() for d in (ck, notes) for p in d.iterdir()}
    for out in (ck, notes):
        assert_bad_input(ecviz_here(capsys, "trace", "--ckpt", ck, "--prompts", prompt_file, "--steps", 2,
                                    "--out", out, "--overwrite", "--quiet"), "is not a Zarr store")
        assert_bad_input(ecviz_here(capsys, "ablate-words", "--ckpt", ck, "--prompts", prompt_file, "--steps", 2,
                                    "--out", out, "--overwrite", "--quiet"), "is not a Zarr store")
    assert_bad_input(ecviz_here(capsys, "train", "--preset", "EC-DiT-tiny-4E", "--steps", 1, "--batch-size", 4,
                                "--quiet", "--out", ck), "holds 'config.json', which is not an ecviz train run's")
    # a JSON report over a checkpoint's own files (it replaced model.safetensors with 666 bytes of JSON)
    for name in ("config.json", "model.safetensors"):
        assert_bad_input(ecviz_here(capsys, "eval", "--ckpt", ck, "--prompts", "shapes-eval", "--steps", 1,
                                    "--json", ck / name), f"is a file of the checkpoint {ck}")
        assert_bad_input(ecviz_here(capsys, "probe-groups", "--ckpt", ck, "--prompts", prompt_file, "--steps", 1,
                                    "--json", ck / name), f"is a file of the checkpoint {ck}")
    assert {p: p.read_bytes() for d in (ck, notes) for p in d.iterdir()} == kept
    # a checkpoint written into a training run's directory would stand in for its checkpoint/ (init; export was
    # refused already)
    run = tmp_path / "run"
    shutil.copytree(ck, run / "checkpoint")
    assert_bad_input(ecviz_here(capsys, "init", "--preset", "DENSE-tiny", "--out", run), "is an `ecviz train` run")
    assert_bad_input(ecviz_here(capsys, "export", "--ckpt", ck, "--out", run), "is an `ecviz train` run")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint"]
    # --overwrite replaces a store of its own kind only: not a run's training probe, nor a trace by an ablation
    probe, trace = run / "routing.zarr", tmp_path / "t.zarr"
    zarr.open_group(str(probe), mode="w").attrs["ecviz_probe_version"] = 1
    zarr.open_group(str(trace), mode="w").attrs["ecviz_schema_version"] = 4
    assert_bad_input(ecviz_here(capsys, "trace", "--ckpt", ck, "--prompts", prompt_file, "--steps", 2, "--out",
                                probe, "--overwrite", "--quiet"), "is a training probe (routing.zarr), not an ecviz")
    assert_bad_input(ecviz_here(capsys, "ablate-words", "--ckpt", ck, "--prompts", prompt_file, "--steps", 2,
                                "--out", trace, "--overwrite", "--quiet"), "is an ecviz trace, not a word-ablation")
    assert zarr.open_group(str(probe), mode="r").attrs["ecviz_probe_version"] == 1
    assert zarr.open_group(str(trace), mode="r").attrs["ecviz_schema_version"] == 4
    store = tmp_path / "x.zarr"
    store.mkdir()
    (store / "zarr.json").write_text("{}")
    assert_bad_input(ecviz_here(capsys, "init", "--preset", "DENSE-tiny", "--out", store), "is a Zarr store")
    assert_bad_input(ecviz_here(capsys, "init", "--preset", "DENSE-tiny", "--out", store / "ck"),
                     "inside the Zarr store")
    assert sorted(p.name for p in store.iterdir()) == ["zarr.json"]


def test_a_full_disk_and_a_hand_edited_checkpoint_are_one_line(ckpts, tmp_path, monkeypatch, capsys):
    """safetensors reports a full disk as its own SafetensorError, which escaped the error boundary as a
    traceback; a config.json whose "meta" is not an object, or weights whose `model` metadata is not one, too."""
    import safetensors.torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", full)
        assert_bad_input(ecviz_here(capsys, "init", "--preset", "DENSE-tiny", "--out", tmp_path / "a"),
                         "model.safetensors: cannot write it", "No space left on device")
        assert_bad_input(ecviz_here(capsys, "export", "--ckpt", ckpts["ec"], "--out", tmp_path / "x"),
                         "cannot write it")
    assert not (tmp_path / "a" / "model.safetensors").exists()
    assert not (tmp_path / "x").exists()  # a failed export left an empty directory
    meta = shutil.copytree(ckpts["ec"], tmp_path / "meta")
    doc = json.loads((meta / "config.json").read_text())
    (meta / "config.json").write_text(json.dumps({**doc, "meta": 5}))
    assert_bad_input(ecviz_here(capsys, "export", "--ckpt", meta, "--out", tmp_path / "e"), '"meta" must be an object')
    stamp = shutil.copytree(ckpts["ec"], tmp_path / "stamp")
    save_file(load_file(stamp / "model.safetensors"), stamp / "model.safetensors", metadata={"model": "5"})
    assert_bad_input(ecviz_here(capsys, "hooks", "--ckpt", stamp), "unreadable metadata")
    later = shutil.copytree(ckpts["ec"], tmp_path / "later")  # a later format: it loaded without a word
    (later / "config.json").write_text(json.dumps({**doc, "version": 2}))
    assert_bad_input(ecviz_here(capsys, "hooks", "--ckpt", later), "checkpoint format version 2, this ecviz reads")
    assert_bad_input(ecviz_here(capsys, "export", "--ckpt", later / "config.json", "--out", tmp_path / "f"),
                     "a file, not a checkpoint directory")  # it said "no such directory"


def test_a_warning_of_ours_is_one_line_like_an_error(ckpts, tmp_path):
    """A prompt cut to the text length warned in two lines (file:line, then the source line of the call)."""
    r = ecviz("sample", "--ckpt", ckpts["ec"], "--prompt", " ".join(["a red circle"] * 20), "--steps", 1,
              "--out", tmp_path / "s.png", check=True)
    assert r.stderr.strip().splitlines() == [
        "ecviz sample: warning: text encoder: 1 prompt longer than 16 tokens truncated (46 tokens cut), e.g. "
        "'a red circle a red circle a red circle a red circle a red ci'..."]  # which one: a group partner's too


def test_a_fuzzed_input_is_one_line_and_nothing_is_replaced(ckpts, prompt_file, tmp_path, capsys, monkeypatch):
    """What a fuzzing pass found crashing or replacing: an output that is a pipe (an atomic write renamed a file
    over it; /dev/full too), counts so large that the layout exhausted memory, an endless prompt file, an empty
    path (ignored, or the working directory), a spec's "position" or colour of
    the wrong type, an unreadable Shapes cache key, garbage torchrun variables or --nproc's own."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    assert_bad_input(ecviz_here(capsys, "sample", "--ckpt", ckpts["ec"], "--prompt", "x", "--steps", 1, "--out",
                                fifo), "--out", "is not a regular file")
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    for opt, bound in (("--steps", "10,000,000]"), ("--images-per-prompt", "4,096]")):  # was "1e+07]"
        assert_bad_input(ecviz_here(capsys, "trace", "--ckpt", ckpts["ec"], "--prompts", prompt_file, opt,
                                    10**11, "--out", tmp_path / "t.zarr"), opt, "out of range", bound)
    assert_bad_input(ecviz_here(capsys, "trace", "--ckpt", ckpts["ec"], "--prompts", "/dev/zero", "--out",
                                tmp_path / "t.zarr"), "/dev/zero: larger than 64 MiB")  # it read until memory ran out
    for argv in (["eval", "--ckpt", ckpts["ec"], "--prompts", prompt_file, "--json", ""],  # was ignored
                 ["init", "--preset", "DENSE-tiny", "--out", ""], ["report", "--trace", "x", "--out", ""]):  # cwd
        assert_bad_input(ecviz_here(capsys, *argv), "argument --", "an empty path")
    for obj, says in (({"position": 5}, '"position" must be'), ({"color": {"r": 1}}, "colour {'r': 1}")):
        spec = tmp_path / "spec.jsonl"
        spec.write_text(json.dumps({"prompt": "a red circle", "tag": "single_object",
                                    "include": [{"class": "circle", "count": 1, **obj}]}) + "\n")
        assert_bad_input(ecviz_here(capsys, "eval", "--ckpt", ckpts["ec"], "--prompts", spec, "--steps", 1), says)
    from ecviz.data.shapes_cache import ShapesCache

    cache = ShapesCache(tmp_path / "cache", size=32, seed=0)
    cache.dir.mkdir(parents=True)
    (cache.dir / "key.json").write_text("{bad")
    with pytest.raises(EcvizError, match=r"unreadable key\.json"):
        cache.check_key()
    for env, says in ((("WORLD_SIZE", "abc"),), "WORLD_SIZE='abc': not an integer"), \
                     ((("WORLD_SIZE", "2"),), "without RANK, MASTER_ADDR"), \
                     ((("ECVIZ_LAUNCHER_PID", str(os.getpid())),), "internal to --nproc"):  # a silent SIGKILL
        # (a living process, not this one's parent: pid 1 is the parent of a test run whose shell has gone)
        for k, v in env:
            monkeypatch.setenv(k, v)
        assert_bad_input(ecviz_here(capsys, "trace", "--ckpt", ckpts["ec"], "--prompts", prompt_file, "--steps", 1,
                                    "--out", tmp_path / "w.zarr"), says)
        for k, _ in env:
            monkeypatch.delenv(k, raising=False)
    assert not (tmp_path / "t.zarr").exists() and not (tmp_path / "w.zarr").exists()


def test_an_allocation_that_fails_is_told_apart_from_a_bug():
    """What the up-front memory checks miss ends in one line and status 2 (`main`), a bug keeps its traceback:
    numpy's MemoryError, torch's CPU allocator and a loader worker's MemoryError are allocations, not bugs."""
    from ecviz.cli import one_line_text, out_of_memory

    assert out_of_memory(MemoryError("Unable to allocate 229. GiB"))
    assert out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate "
                                      "memory: you tried to allocate 245954199552 bytes."))
    assert out_of_memory(RuntimeError("Caught MemoryError in DataLoader worker process 0.\nOriginal Traceback"))
    assert not out_of_memory(RuntimeError("shape mismatch")) and not out_of_memory(ValueError("x"))
    text = one_line_text(RuntimeError("Caught MemoryError in DataLoader worker process 0.\n" + "x " * 300))
    assert "\n" not in text and len(text) == 200 and text.endswith("...")


def test_the_memory_check_counts_every_process_on_this_machine(monkeypatch):
    """`--nproc 2` runs two recorders side by side: each process's need is checked against the machine's memory
    times the processes there (each checked alone, two traces of 16 GiB were let onto 24 GiB). The trace's
    check reads the count from torchrun's LOCAL_WORLD_SIZE, as `dist.ranks().local_world`."""
    from ecviz import dist
    from ecviz.validate import check_fits, host_memory

    have = host_memory()
    check_fits(int(have * 0.6), "recording", "record less")  # one process: fits
    with pytest.raises(UsageError, match=r"recording needs about \d+ GiB per process \(2 here: \d+ GiB\), more "
                                         r"than this machine's \d+ GiB; record less"):
        check_fits(int(have * 0.6), "recording", "record less", processes=2)
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    assert dist.ranks().local_world == 2


def test_the_first_look_in_ecviz_help_is_commands_that_parse():
    """`ecviz --help` ends with a first look (trace, report, the app): its ecviz lines are what the parser takes,
    and the report goes where it says."""
    import shlex

    from ecviz.cli import WORKFLOW, build_parser

    r = ecviz("--help")
    assert r.returncode == 0 and "a first look" in r.stdout and "streamlit run app/main.py" in r.stdout
    lines = [shlex.split(line.split("#")[0]) for line in WORKFLOW.splitlines()[1:]]
    assert [line[0] for line in lines] == ["ecviz", "ecviz", "streamlit"]
    for line in lines[:2]:
        build_parser().parse_args(line[1:])
    from ecviz.report import default_out

    assert str(default_out(lines[1][2])) in WORKFLOW  # reports/mine


class _Unreadable(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        from ecviz.errors import EcvizError

        raise EcvizError(f"corrupt image data/img{i}.png: cannot identify image file")


def test_bad_input_met_in_a_dataloader_worker_is_its_own_one_line():
    """torch re-raises a worker's exception with the worker's traceback in its message: `ecviz train` printed 20
    lines (an image overwritten while a run read it). The error boundary keeps the worker's own message."""
    from ecviz.cli import bad_input_text
    from ecviz.errors import EcvizError

    with pytest.raises(EcvizError) as e:
        next(iter(torch.utils.data.DataLoader(_Unreadable(), num_workers=1)))
    assert "Original Traceback" in str(e.value)  # what torch gives
    assert bad_input_text(e.value) == "corrupt image data/img0.png: cannot identify image file"
    assert bad_input_text(EcvizError("plain\nsecond line")) == "plain\nsecond line"  # others untouched
