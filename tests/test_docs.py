"""Every Python example of the README and the docs runs as written.

Each fenced ```python block of every Markdown file in the repository (README.md, docs/, BENCHMARKS.md, any
README.md below; new files and blocks are picked up by themselves) runs in its own interpreter, from a
directory that looks like the repository root: every top-level entry is a link to the real one, except
`traces/`, which holds a small demo trace (`scripts/demo.sh` on 3 prompts, 4 steps) at `traces/demo.zarr`,
where `./run.sh demo` puts the real one. So examples use the paths a user has after `./run.sh demo`, and the
test never writes into the checkout. A block that must not run is marked by a `<!-- norun -->` line right
before its fence; keep such marks rare.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

NORUN = "<!-- norun -->"
SKIP_DIRS = {".venv", "node_modules", "runs", "tmp"}  # and hidden folders


def markdown_files() -> list[Path]:
    files = []
    for path in sorted(ROOT.rglob("*.md")):
        parts = path.relative_to(ROOT).parts[:-1]
        if not any(p in SKIP_DIRS or p.startswith(".") for p in parts):
            files.append(path)
    return files


def python_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """(line of the opening fence, code, runs) for every ```python block of a Markdown file."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        if re.fullmatch(r"\s*```python\s*", lines[i]):
            before = [line.strip() for line in lines[:i] if line.strip()]
            start, i = i, i + 1
            body = []
            while i < len(lines) and not re.fullmatch(r"\s*```\s*", lines[i]):
                body.append(lines[i])
                i += 1
            out.append((start + 1, "\n".join(body) + "\n", not (before and before[-1] == NORUN)))
        i += 1
    return out


BLOCKS = [pytest.param(path, code, id=f"{path.relative_to(ROOT)}:{line}",
                       marks=[] if runs else pytest.mark.skip(reason="marked <!-- norun -->"))
          for path in markdown_files() for line, code, runs in python_blocks(path)]


@pytest.fixture(scope="session")
def example_root(demo_trace, tmp_path_factory) -> Path:
    """A stand-in for the repository root: links to every top-level entry, and traces/ with the demo trace."""
    root = tmp_path_factory.mktemp("examples")
    for entry in ROOT.iterdir():
        if entry.name not in ("traces", ".git"):
            (root / entry.name).symlink_to(entry)
    (root / "traces").symlink_to(demo_trace[0].parent)
    return root


def test_the_docs_have_python_examples():
    names = {str(p.relative_to(ROOT)) for p in markdown_files()}
    assert {"README.md", "docs/trace-format.md"} <= names
    assert sum(1 for p in BLOCKS if "README.md" == p.id.split(":")[0]) >= 4
    assert sum(1 for p in BLOCKS if p.marks) <= 2, "<!-- norun --> marks should stay rare"


@pytest.mark.parametrize(("path", "code"), BLOCKS)
def test_python_example_runs_as_written(path, code, example_root):
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                        "MPLBACKEND": "Agg"}
    r = subprocess.run([sys.executable, "-c", code], cwd=example_root, capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, f"{path.name} example failed:\n{code}\n{r.stderr[-3000:]}"
