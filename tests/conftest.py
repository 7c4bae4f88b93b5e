"""Shared fixtures: small real checkpoints and prompt files on disk."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ecviz.checkpoint import save_checkpoint
from ecviz.model import DiT, preset


def make_checkpoint(path: Path, name: str, seed: int = 0, **overrides) -> Path:
    """A tiny checkpoint moved off its zero init, so images, routing and guidance all vary."""
    torch.manual_seed(seed)
    model = DiT(preset(name, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return save_checkpoint(model, path, preset=name)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {kind: make_checkpoint(root / kind, name) for kind, name in
            (("ec", "EC-DiT-tiny-4E"), ("tc", "TC-tiny-4E"), ("dense", "DENSE-tiny"))}


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("prompts") / "shapes.txt"
    p.write_text("a red circle\n\na blue square left of a green triangle\nthree yellow stars\n"
                 "  a purple heart  \nan orange cross above a white ring\n")
    return p


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_trace(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`scripts/demo.sh` (the README's demo) on 3 prompts and 4 steps, into DIR/traces/demo.zarr and its report
    into DIR/reports/demo, run once: (the store, the finished process)."""
    root = tmp_path_factory.mktemp("demo")
    out = root / "traces" / "demo.zarr"
    r = subprocess.run(["bash", "scripts/demo.sh", "--limit", "3", "--steps", "4", "--quiet"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env=os.environ | {"ECVIZ_DEMO_OUT": str(out),
                                         "ECVIZ_DEMO_REPORT": str(root / "reports" / "demo"),
                                         "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert r.returncode == 0, r.stderr[-2000:]
    return out, r


def ecviz(*args, check=False, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "ecviz", *map(str, args)], capture_output=True, text=True,
                       timeout=600, **kw)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def ecviz_here(capsys, *args) -> subprocess.CompletedProcess:
    """The command line in this process (`ecviz.cli.main`, the code `python -m ecviz` runs, without starting an
    interpreter and importing torch again): for input refused before any work. Exit status and output as a
    CompletedProcess; a traceback would fail the test where it is raised."""
    from ecviz.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse
        code = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["ecviz", *map(str, args)], code, out.out, out.err)


def assert_bad_input(r: subprocess.CompletedProcess, *words: str) -> None:
    """Exit status 2 and exactly one line on stderr, naming the problem, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]
