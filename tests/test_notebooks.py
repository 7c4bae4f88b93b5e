"""The exploration notebooks run top to bottom (nbclient, a real kernel) against a trace of the shipped EC
checkpoint, and are stored without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from ecviz.trace.run import TraceSettings, run_trace

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def shipped_trace(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nb") / "demo.zarr"
    run_trace(TraceSettings(ckpt=ROOT / "checkpoints" / "ec-dit-shapes",
                            prompts=ROOT / "ecviz" / "assets" / "prompts" / "shapes.jsonl", out=out, steps=4,
                            images_per_prompt=2, limit=8, record=("dispatch", "cross_attn", "x0"), progress=False))
    return out


def test_there_are_five_notebooks_stored_without_outputs():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(not c.outputs and c.execution_count is None for c in code), path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, shipped_trace, monkeypatch):
    monkeypatch.setenv("ECVIZ_TRACE", str(shipped_trace))
    monkeypatch.setenv("ECVIZ_ABLATION_LIMIT", "2")
    monkeypatch.setenv("ECVIZ_ABLATION_STEPS", "3")
    monkeypatch.setenv("ECVIZ_INTERVENE_LIMIT", "4")  # 05: 4 prompts, 2 images each, 3 steps
    monkeypatch.setenv("ECVIZ_INTERVENE_STEPS", "3")
    monkeypatch.setenv("ECVIZ_STEPS", "3")  # 01: your own prompts, traced in 3 steps
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend, as in JupyterLab
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # figures were drawn and shown
