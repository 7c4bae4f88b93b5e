"""Shared fixtures: small real checkpoints, prompt files and the demo trace on disk (helpers: helpers.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, make_checkpoint


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
