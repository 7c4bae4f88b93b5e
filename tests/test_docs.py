"""Every Python example of the README and the docs runs as written; every `ecviz` command they show names a real
subcommand and real flags; every relative link and anchor resolves.

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


def outside_fences(text: str) -> str:
    """Markdown without its fenced blocks."""
    return re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M)


def outside_code(text: str) -> str:
    """Markdown without its fenced blocks and inline code spans (links there are not links)."""
    return re.sub(r"`[^`\n]*`", "", outside_fences(text))


def heading_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a file's headings: lower case, punctuation but - and _ dropped, spaces to -;
    a repeated one gets -1, -2, ..."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.*)$", outside_fences(path.read_text()), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        yield slug if seen[slug] == 0 else f"{slug}-{seen[slug]}"


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for md in markdown_files():
        for target in re.findall(r"\]\(([^)\s]+)\)", outside_code(md.read_text())):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (md.parent / path) if path else md
            if not dest.exists():
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in set(heading_anchors(dest)):
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


def shown_commands(md: Path) -> list[tuple[int, str]]:
    """(line, text) of every shell line in a bash/sh/plain fence and every inline code span holding `ecviz `."""
    out, fence = [], None
    for i, line in enumerate(md.read_text().splitlines(), 1):
        if m := re.match(r"\s*```(\w*)", line):
            fence = None if fence is not None else m.group(1)
        elif fence in ("bash", "sh", "console", ""):
            out.append((i, line.split(" #")[0]))
        elif fence is None:
            out += [(i, span) for span in re.findall(r"`([^`]*\becviz [a-z][^`]*)`", line)]
    return out


def test_every_ecviz_command_in_the_docs_names_real_flags():
    """`ecviz SUB --flag ...` in a shell block or inline code: SUB is a subcommand and each flag one of its own
    (a renamed or removed flag left in the docs fails here, not in a user's terminal)."""
    from ecviz.cli import build_parser

    subs = build_parser()._subparsers._group_actions[0].choices
    wrong, checked = [], 0
    for md in markdown_files():
        for line, text in shown_commands(md):
            for m in re.finditer(r"(?:^|[\s(=])(?:\S*/)?ecviz ([a-z][a-z-]*)([^|;&#]*)", text):
                sub, rest = m.groups()
                where = f"{md.relative_to(ROOT)}:{line}"
                if sub not in subs:
                    wrong.append(f"{where}: no subcommand {sub!r}")
                    continue
                options = {o for action in subs[sub]._actions for o in action.option_strings}
                for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
                    checked += 1
                    if flag not in options:
                        wrong.append(f"{where}: ecviz {sub} has no {flag}")
    assert wrong == [] and checked > 50
