"""The shipped checkpoints and the main job: they load with today's code, sample shapes ShapesEval
recognises, and the README's demo runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import xarray as xr

import ecviz
from ecviz.checkpoint import load_checkpoint
from ecviz.shapes_eval import eval_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {"ec-dit-small-shapes": "EC-DiT-small-8E", "tc-small-shapes": "TC-small-8E",
           "dense-small-shapes": "DENSE-small-matched"}


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_checkpoint_is_complete_and_loads(name):
    ck = ROOT / "checkpoints" / name
    model, info = load_checkpoint(ck)
    assert info.preset == SHIPPED[name] and info.meta["step"] == 6000 and info.meta["weights"] == "ema"
    assert info.meta["command"].startswith(f"ecviz train --preset {SHIPPED[name]} ")
    assert (ck / "model.safetensors").stat().st_size <= 25 * 2**20
    rows = [json.loads(line) for line in (ck / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6000 and rows[-1]["loss"] < rows[0]["loss"] / 5
    result = json.loads((ck / "shapes_eval.json").read_text())
    assert sum(result["count"].values()) == 36 * 4 and 0 < result["overall"] <= 1
    if model.cfg.routing != "dense":
        probe = xr.open_zarr(ck / "routing.zarr", consolidated=False)
        assert probe.train_step.values[-1] == 6000 and probe.sizes["train_step"] == 25


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_checkpoint_draws_shapes(name):
    """One image per bundled prompt: well above what noise or a broken sampler scores (0)."""
    ev = eval_checkpoint(ROOT / "checkpoints" / name, images_per_prompt=1, steps=25, guidance=4.0, seed=0)
    assert ev.images.shape == (36, 1, 32, 32, 3)
    assert ev.result["overall"] >= 0.08, ev.result


def test_demo_traces_the_shipped_checkpoint(demo_trace):
    out, r = demo_trace
    assert "traced 12 samples" in r.stdout and "block 1: objects" in r.stdout and "block 5: objects" in r.stdout
    report = out.parent.parent / "reports" / "demo"
    summary = json.loads((report / "summary.json").read_text())
    assert (report / "fig6a_layers.png").is_file() and summary["allocation"]["mean"]["1"] == 2.0
    ds = ecviz.open_trace(out)
    assert ds.attrs["preset"] == "EC-DiT-small-8E" and bool(ds.done.all())
    assert {"dispatch", "cross_attn", "x0", "category", "word_object"} <= set(ds.data_vars)
