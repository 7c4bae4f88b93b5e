"""Routing over training: a fixed probe batch whose routing the trainer appends to `routing.zarr`.

The probe is the first `n` items of the training data with fixed noise, run through the model in eval mode
(inference routing groups) at a few fixed timesteps every `probe_every` steps. Each record appends one row
along `train_step`; the committed row count (`rows` attribute) is written last, so a killed trainer leaves
whole rows only, and a resumed one overwrites the rows from its step on.

Variables (dims): expert_count (train_step, probe, t, layer, token) uint8; expert_load (train_step, t, layer,
expert) float32, tokens each expert processed over its capacity (1 for expert choice); aux_loss (train_step,
t); tc_drop_rate (train_step, t, layer); and, once: image (probe, y, x, channel), caption (probe),
object_fraction (probe, token) when the data has object masks (Shapes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr

from ecviz.codec import to_uint8
from ecviz.errors import EcvizError
from ecviz.flow import interpolate
from ecviz.grid import patch_coverage
from ecviz.io import atomic_dir
from ecviz.model import DiT, ModelConfig
from ecviz.trace.format import constant_array, growing_array, jsonable
from ecviz.trace.record import BatchLayout, record

PROBE_T = (0.25, 0.5, 0.75)  # the timesteps probed (0 noise, 1 data)
PROBE_VERSION = 1
PER_STEP = ("expert_count", "expert_load", "aux_loss", "tc_drop_rate")


class Probe:
    """A fixed batch (images, captions, noise) whose routing `record` appends to a Zarr store.

    texts: callable captions -> (y, mask), e.g. the trainer's text cache. Under data parallelism every rank
    must call `record` (the forward may be collective); only the one built with write=True writes.
    """

    def __init__(self, cfg: ModelConfig, data, texts, path: Path, seed: int = 0, n: int = 8, write: bool = True,
                 codec=None, fresh: bool = True):
        per_group = max(1, cfg.infer_group // cfg.tokens)
        n = -(-n // per_group) * per_group  # whole inference routing groups
        items = [data[i % len(data)] for i in range(n)]  # a data set smaller than the probe repeats
        self.pixels = torch.stack([b["image"] for b in items])  # (P, 3, H, W) in [-1, 1]
        f = codec.downsample if codec is not None else 1
        self.captions = [b["caption"] for b in items]
        self.y, self.mask = texts(self.captions)
        shape = (n, cfg.in_channels, cfg.input_size, cfg.input_size)
        self.noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 12345))
        self.codec, self.cfg, self.path, self.n, self.write = codec, cfg, Path(path), n, write
        self.object_fraction = token_coverage(items, cfg.patch_size * f) if "masks" in items[0] else None
        # a new run replaces a store already there (a run's that never reached its first checkpoint); a resumed
        # one checks it is its own now, before any step
        self.root = open_store(self.path, cfg, self, fresh=fresh) if write else None

    @torch.no_grad()
    def record(self, model: DiT, step: int) -> None:
        cfg, P = self.cfg, self.n
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        x = self.pixels.to(device)
        x = self.codec.encode(x) if self.codec is not None else x  # (P, C, h, w) what the model sees
        noise, y, mask = self.noise.to(device), self.y.to(device), self.mask.to(device)
        aux, drops = [], []
        try:
            with record(model, ("dispatch",), steps=list(range(len(PROBE_T)))) as rec:
                rec.begin(BatchLayout(np.arange(P), 1, 0), cfg.infer_group)
                for t in PROBE_T:
                    tt = torch.full((P,), t, device=device)
                    model(interpolate(x, noise, tt), tt, y, mask)
                    aux.append(float(model.aux_loss()))
                    drops.append([moe_drop_rate(m) for m in model.moe_layers()])
                batch = rec.end()
        finally:  # a caller that catches an error here goes on training a model in training mode
            model.train(was_training)
        if not self.write:
            return
        arrays, groups = batch.arrays()
        count = arrays["expert_count"][:, 0]  # (P, t, layer, token)
        filled = (groups["dispatch"] >= 0).sum(axis=(0, 4))  # (t, layer, expert) tokens per expert
        capacity = groups["dispatch"].shape[0] * groups["dispatch"].shape[-1]
        self.append(step, {"expert_count": count, "expert_load": (filled / capacity).astype(np.float32),
                           "aux_loss": np.array(aux, np.float32), "tc_drop_rate": np.array(drops, np.float32)})

    def append(self, step: int, values: dict[str, np.ndarray]) -> None:
        r = self.root
        steps = r["train_step"][: r.attrs["rows"]]
        i = int(np.searchsorted(steps, step))  # a resumed run overwrites what came after its checkpoint
        if i < r.attrs["rows"]:  # commit the cut first: killed after the resize, a reopen must not grow it back
            r.attrs["rows"] = i
        for name in ("train_step", *PER_STEP):
            r[name].resize((i + 1, *r[name].shape[1:]))
        for name in PER_STEP:
            r[name][i] = values[name]
        r["train_step"][i] = step
        r.attrs.update(jsonable({"rows": i + 1, "last_step": step}))  # last: the row is now committed


def moe_drop_rate(moe) -> float:
    """Token choice: the share of the last forward's top-k assignments dropped over capacity (0 otherwise)."""
    return float(moe.dropped) / max(1, moe.assignments) if hasattr(moe, "dropped") else 0.0


def token_coverage(items, patch: int) -> np.ndarray:
    """(P, S) per probe image and token: the fraction of the patch covered by any object (ground truth)."""
    fg = np.stack([b["masks"].any(0).numpy() for b in items])  # (P, H, W)
    return patch_coverage(fg, fg.shape[1] // patch, fg.shape[2] // patch)


def open_store(path: Path, cfg: ModelConfig, probe: Probe, fresh: bool = False) -> zarr.Group:
    """routing.zarr: appendable along train_step. A fresh run creates it whole (built beside, then swapped in:
    replacing what a run killed before its first checkpoint left); a resumed one reopens it, trimmed to its
    committed rows, after checking it is this run's probe (one line otherwise)."""
    if fresh or not path.exists():
        atomic_dir(path, lambda tmp: create_store(Path(tmp), cfg, probe))
        return zarr.open_group(str(path), mode="r+")
    try:
        root = zarr.open_group(str(path), mode="r+")
        attrs = dict(root.attrs)
        version, n = attrs.get("ecviz_probe_version"), root["caption"].shape[0]
        config = ModelConfig.from_dict(attrs.get("model_config"))
        growing = {name: root[name] for name in ("train_step", *PER_STEP)}
    except Exception as e:  # not a store, one without its arrays, or a config this ecviz cannot read
        raise EcvizError(f"{path}: not a readable routing probe ({type(e).__name__}); move it away to resume "
                         f"without it") from None
    if version != PROBE_VERSION or config != cfg or n != probe.n:
        raise EcvizError(f"{path}: the routing probe of another model or probe size; move it away to resume "
                         f"without it")
    check_same_items(path, root, probe)
    rows = int(attrs.get("rows", 0))
    for array in growing.values():
        array.resize((rows, *array.shape[1:]))
    return root


def check_same_items(path: Path, root: zarr.Group, probe: Probe) -> None:
    """The probe's images and captions, as stored, are still those the data gives: an image or caption edited in
    place under a resumed run went on into rows computed from other items than the store shows."""
    try:
        captions, images = root["caption"][:].tolist(), root["image"][:]
    except Exception as e:
        raise EcvizError(f"{path}: not a readable routing probe ({type(e).__name__}); move it away to resume "
                         f"without it") from None
    now = to_uint8(probe.pixels)
    changed = next((i for i, c in enumerate(captions) if c != probe.captions[i]), None)
    if changed is None and not np.array_equal(images, now):
        changed = int(np.flatnonzero((images != now).reshape(len(images), -1).any(1))[0])
    if changed is not None:
        raise EcvizError(f"{path}: probe image {changed} ({captions[changed]!r}) is no longer the data's: its "
                         "image or caption changed since the run began; restore the data, or move the probe away "
                         "to resume without it")


def create_store(path: Path, cfg: ModelConfig, probe: Probe) -> None:
    """A new, empty routing.zarr at path: the fixed arrays (t, layer, caption, image, object_fraction) and the
    growing ones with no rows."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    P, T, L, S, E = probe.n, len(PROBE_T), len(cfg.sparse_layers), cfg.tokens, cfg.experts

    def growing(name, shape, dtype, dims):
        growing_array(root, name, shape, dtype, ("train_step", *dims))

    growing("train_step", (), np.int64, ())
    growing("expert_count", (P, T, L, S), np.uint8, ("probe", "t", "layer", "token"))
    growing("expert_load", (T, L, E), np.float32, ("t", "layer", "expert"))
    growing("aux_loss", (T,), np.float32, ("t",))
    growing("tc_drop_rate", (T, L), np.float32, ("t", "layer"))

    def fixed(name, values, dims, dtype=None):
        constant_array(root, name, np.asarray(values, dtype=dtype), dims)

    fixed("t", np.array(PROBE_T, np.float32), ("t",))
    fixed("layer", np.array(cfg.sparse_layers, np.int32), ("layer",))
    fixed("caption", probe.captions, ("probe",), dtype=object)
    fixed("image", to_uint8(probe.pixels), ("probe", "y", "x", "channel"))
    if probe.object_fraction is not None:
        fixed("object_fraction", probe.object_fraction, ("probe", "token"))
    grid = cfg.input_size // cfg.patch_size
    root.attrs.update(jsonable({"ecviz_probe_version": PROBE_VERSION, "model_config": cfg.to_dict(),
                                "tokens_per_image": S, "grid": [grid, grid], "rows": 0}))
