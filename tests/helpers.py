"""Helpers shared by the test modules (fixtures live in conftest.py): running the command line for real or
in process, the one-line bad-input check, tiny checkpoints, small image-text data sets on disk, traces damaged
in known ways, and batch equality."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
import zarr
from PIL import Image

from ecviz.checkpoint import save_checkpoint
from ecviz.model import DiT, preset

ROOT = Path(__file__).resolve().parents[1]


# ---- the command line ----------------------------------------------------------------------------------
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


# ---- checkpoints --------------------------------------------------------------------------------------
def make_checkpoint(path: Path, name: str, seed: int = 0, **overrides) -> Path:
    """A tiny checkpoint moved off its zero init, so images, routing and guidance all vary."""
    torch.manual_seed(seed)
    model = DiT(preset(name, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return save_checkpoint(model, path, preset=name)


# ---- image-text data on disk ------------------------------------------------------------------------
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
SIZE = 32


def banded(w: int, h: int, bands: list[tuple[int, tuple]]) -> Image.Image:
    """An RGB image of vertical colour bands: each (start column, colour) runs to the next start."""
    img = Image.new("RGB", (w, h))
    ends = [start for start, _ in bands[1:]] + [w]
    for (start, colour), end in zip(bands, ends, strict=True):
        img.paste(colour, (start, 0, end, h))
    return img


WIDE = banded(128, 64, [(0, RED), (40, GREEN), (88, RED)])  # green middle, red edges
TALL = banded(48, 64, [(0, RED), (24, BLUE)])  # left half red, right half blue
SAMPLES = {  # key: (image, file extension, caption file text or None)
    "00000/000000000": (WIDE, "png", "a green band between red edges\n"),
    "00000/000000001": (TALL, "png", "  café au lait ☕ \n\n"),
    "00001/000000002": (banded(256, 160, [(0, BLUE), (128, GREEN)]), "jpg", "a big jpeg"),
    "00001/000000003": (banded(64, 40, [(0, GREEN)]), "png", None),  # no caption: skipped
}
CAPTIONS = {"00000/000000000": "a green band between red edges", "00000/000000001": "café au lait ☕",
            "00001/000000002": "a big jpeg"}


def write_sample(root: Path, key: str, img: Image.Image, ext: str, caption: str | None) -> None:
    path = root / f"{key}.{ext}"
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")


def make_folder(root: Path) -> Path:
    for key in reversed(list(SAMPLES)):  # written out of order: the dataset sorts
        write_sample(root, key, *SAMPLES[key])
    return root


def make_shards(folder: Path, out: Path) -> Path:
    """img2dataset layout: shard NNNNN.tar holds NNNNN/<key>.{jpg,txt,json}, grouped by key."""
    out.mkdir(parents=True, exist_ok=True)
    for shard in sorted(p.name for p in folder.iterdir()):
        with tarfile.open(out / f"{shard}.tar", "w") as tf:
            for path in sorted((folder / shard).iterdir()):
                tf.add(path, arcname=f"{shard}/{path.name}")
                if path.suffix == ".txt":  # img2dataset's metadata sidecar, which the loader ignores
                    meta = b'{"url": "http://example.invalid", "status": "success"}'
                    info = tarfile.TarInfo(f"{shard}/{path.stem}.json")
                    info.size = len(meta)
                    tf.addfile(info, io.BytesIO(meta))
    return out


# ---- traces damaged in known ways ----------------------------------------------------------------------
def break_store(src, dst, how: str):
    """A copy of the trace src at dst, made unusable in one way."""
    shutil.copytree(src, dst)
    meta = dst / "zarr.json"
    if how == "unfinished":  # as a killed `ecviz trace` leaves it: later flags unset, `complete` not yet true
        g = zarr.open_group(str(dst), mode="r+")
        g["done"][3:] = False
        g.attrs["complete"] = False
    elif how == "json":
        meta.write_text(meta.read_text()[:200])
    elif how == "version":
        doc = json.loads(meta.read_text())
        doc["attributes"]["ecviz_schema_version"] = 1
        meta.write_text(json.dumps(doc))
    elif how == "chunk":
        shard = next(f for f in sorted((dst / "expert_count" / "c").rglob("*")) if f.is_file())
        shard.write_bytes(shard.read_bytes()[:40])
    elif how == "not-ecviz":
        doc = json.loads(meta.read_text())
        doc["attributes"] = {}
        meta.write_text(json.dumps(doc))
    elif how == "plain-dir":
        shutil.rmtree(dst)
        dst.mkdir()
    elif how == "not-object":  # JSON, but no group's metadata: was called a bug in ecviz
        meta.write_text("[1, 2]")
    elif how in ("version-text", "experts", "no-routing"):  # a version "4" was 'version 4, this ecviz reads 3,
        doc = json.loads(meta.read_text())  # 4'; experts 0 a reshape error called a bug in ecviz; a record lost
        if how == "version-text":  # whole a TypeError (its placeholder shown as JSON)
            doc["attributes"]["ecviz_schema_version"] = "4"
        elif how == "experts":
            doc["attributes"]["routing"]["experts"] = 0
        else:
            del doc["attributes"]["routing"]
        meta.write_text(json.dumps(doc))
    return dst


BROKEN = {
    "unfinished": "the trace is unfinished: 3 of 10 samples done; rerun the same ecviz trace command",
    "json": "cannot read `zarr.json`, the store is damaged (JSONDecodeError",
    "version": "trace schema version 1, this ecviz reads versions 3, 4; rewrite it with the ecviz trace command",
    "chunk": "cannot read `expert_count`, the store is damaged",
    "not-ecviz": "a Zarr store but not an ecviz trace or training probe; write one with ecviz trace",
    "plain-dir": "not a Zarr store (no zarr.json)",
    "not-object": "its zarr.json is not a Zarr group's metadata (an object with attributes); the store is damaged",
    "version-text": 'trace schema version "4", this ecviz reads versions 3, 4',
    "experts": "attribute `routing.experts` is 0, not a positive integer: the store's metadata is damaged",
    "no-routing": "attribute `routing` is missing: the store's metadata is damaged",
}


# ---- batches ------------------------------------------------------------------------------------------
def assert_same_batch(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
        else:
            assert got[k] == v, k


# ---- traces with Shapes-like images ------------------------------------------------------------------
GREEN = (40, 220, 60)


def draw_shapes(path: Path) -> None:
    """Replace a trace's images by a green square on black, placed per sample, so that Shapes' object and
    background regions exist (the tiny random checkpoints paint noise)."""
    root = zarr.open_group(str(path), mode="r+")
    n, h, w, _ = root["image"].shape
    img = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        y, x = (i % 3) * 3, (i * 5) % 8
        img[i, y:y + 8, x:x + 8] = GREEN
    root["image"][...] = img
