"""Checkpoints: a directory with `model.safetensors` and `config.json`. Never pickled, always written atomically.

Wherever a checkpoint is expected, an `ecviz train` run directory works too: its `checkpoint/` is meant.

config.json holds the format tag, the preset name (if any), the full ModelConfig (routing kind, experts,
capacity, groups, text encoder, latent codec) and free-form metadata (e.g. training step and command).
Loading checks every weight against the config and names the first mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ecviz.errors import CheckpointError
from ecviz.io import atomic_write, remove, remove_stale_temps, resolve_dir, sha256_file, write_safetensors
from ecviz.model import DiT, ModelConfig

FORMAT = "ecviz-checkpoint"
WEIGHTS, CONFIG = "model.safetensors", "config.json"
TRAIN_STATE = "train_state.safetensors"  # a run's checkpoint/ also holds the raw weights and optimizer state
CHECKPOINT_FILES = (CONFIG, WEIGHTS, TRAIN_STATE)  # what a checkpoint is made of
RUN_CHECKPOINT = "checkpoint"  # where `ecviz train --out RUN` keeps the run's checkpoint
# beside a checkpoint, what describes its weights: the training run's record (scripts/train_shipped.sh copies it)
# and the evaluation; replacing the weights (`init`/`export --overwrite`) removes them, which would describe others
RECORDS = ("metrics.jsonl", "loss.png", "routing.zarr", "shapes_eval.json", "samples.png")


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    preset: str | None = None
    meta: dict = field(default_factory=dict)
    digest: str | None = None  # `weights_digest`: that of the weights written with config.json (None: older)

    @property
    def sha256(self) -> str:
        """Hash of the weights file: what trace stores record to tie a trace to its weights."""
        return sha256_file(self.path / WEIGHTS)


def save_checkpoint(model: DiT, path: str | Path, preset: str | None = None, meta: dict | None = None,
                    state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write model weights (or `state` instead of model.state_dict()) and config to directory `path`.

    Each file is written atomically, but not the pair: a write cut short between them leaves new weights beside
    the old config. So the weights carry the model config they were written for (safetensors metadata `model`)
    and a digest of their tensors (`weights_digest`, also in config.json), and loading refuses a config.json
    that says otherwise (`check_pair`): EC and TC weights of one size have the same names and shapes, and would
    otherwise load silently as the wrong model; other weights of the same model beside an earlier write's
    config.json would load under its `meta` (training step, command). The digest is of the tensors, so the same
    weights always write the same config.json."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in (state or model.state_dict()).items()}
    digest = tensors_digest(tensors)
    stamp = {"format": FORMAT, "model": json.dumps(model.cfg.to_dict(), sort_keys=True), "weights_digest": digest}
    write_safetensors(path / WEIGHTS, tensors, stamp)
    doc = {"format": FORMAT, "version": 1, "preset": preset, "model": model.cfg.to_dict(), "meta": meta or {},
           "weights_digest": digest}
    atomic_write(path / CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2) + "\n"))
    return path


def drop_records(path: str | Path) -> list[str]:
    """Remove the RECORDS beside the checkpoint in `path` (once its weights are replaced they describe others);
    the names removed."""
    gone = [name for name in RECORDS if (Path(path) / name).exists()]
    for name in gone:
        remove(Path(path) / name)
    for name in RECORDS:  # what an earlier removal, killed midway, left under a hidden name
        remove_stale_temps(Path(path) / name, before=time.time())
    return gone


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of named tensors: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def export_checkpoint(src: str | Path, out: str | Path, dtype: str = "float16") -> Checkpoint:
    """Copy the checkpoint `src` names (or a run directory's) to `out` with its floating-point weights stored as
    `dtype`: float16 halves the file, and loading casts the weights back to the model's format (the shipped
    checkpoints are such copies, and their reported scores are those of these weights). Integer and boolean
    tensors stay as they are; `meta.weights_dtype` records the format."""
    if dtype not in WEIGHT_DTYPES:
        raise CheckpointError(f"--dtype {dtype!r}: choose from {', '.join(WEIGHT_DTYPES)}")
    ck = read_checkpoint(src)
    out = Path(out)
    if out.resolve() == ck.path.resolve():
        raise CheckpointError(f"{out}: the export must go to another directory than {ck.path}")
    if is_run_directory(out):  # its config.json would stand in for the run's checkpoint/ wherever it is named
        raise CheckpointError(f"{out} is an `ecviz train` run directory: export to a directory of its own")
    model, _ = load_checkpoint(ck.path)  # checks every name and shape first
    to = WEIGHT_DTYPES[dtype]
    state = {k: v.to(to) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    created = not out.exists()
    try:
        save_checkpoint(model, out, preset=ck.preset, meta={**ck.meta, "weights_dtype": dtype}, state=state)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a failed export (a full disk) leaves no empty directory behind
        raise
    return read_checkpoint(out)


def checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint directory `path` names: itself, or for an `ecviz train` run directory its `checkpoint/`
    (while the trainer swaps a new one in, or if it was killed doing so, the complete one standing in for it)."""
    path = Path(path)
    if not (path / CONFIG).exists():
        run_ckpt = resolve_dir(path / RUN_CHECKPOINT)
        if (run_ckpt / CONFIG).is_file():
            return run_ckpt
    return path


def is_run_directory(path: str | Path) -> bool:
    """Whether path is an `ecviz train` run directory: it holds checkpoint/ (or a swap of it under way)."""
    path = Path(path)
    return (path / RUN_CHECKPOINT).exists() or any(path.glob(f".{RUN_CHECKPOINT}.*"))


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate config.json (not the weights) of a checkpoint or run directory (see checkpoint_dir)."""
    path = checkpoint_dir(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: a file, not a checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: no such directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise CheckpointError(f"checkpoint {path}: cannot read the directory (permission denied)")
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing (give a checkpoint directory or an "
                                  f"`ecviz train` run directory)")
        if not os.access(path / name, os.R_OK):
            raise CheckpointError(f"checkpoint {path}: cannot read {name} (permission denied)")
    try:
        doc = json.loads((path / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: {CONFIG} is not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {CONFIG} ({e.strerror})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("model"), dict):
        raise CheckpointError(f"checkpoint {path}: {CONFIG} is not an ecviz checkpoint config")
    if doc.get("version", 1) != 1:  # written by a later ecviz: its fields may mean other things
        raise CheckpointError(f"checkpoint {path}: {CONFIG} is checkpoint format version {doc['version']!r}, this "
                              "ecviz reads version 1; use the ecviz that wrote it")
    try:
        cfg = ModelConfig.from_dict(doc["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: bad model config: {e}") from None
    meta = doc.get("meta") or {}
    if not isinstance(meta, dict) or not isinstance(doc.get("preset"), str | None):
        raise CheckpointError(f"checkpoint {path}: {CONFIG}'s \"meta\" must be an object and \"preset\" a name")
    digest = doc.get("weights_digest")
    return Checkpoint(path, cfg, doc.get("preset"), meta, digest if isinstance(digest, str) else None)


def check_pair(ckpt: Checkpoint, stamp: dict[str, str]) -> None:
    """CheckpointError unless config.json describes the model the weights were written for (their metadata
    `model`; checkpoints written before it have none). Settings used only at inference (`infer_*`) may differ:
    they are for the user to change; so may keys only one of the two knows (written by another ecviz version).
    Where both files carry a `weights_digest` (written since it exists), they must carry the same one."""
    if "model" not in stamp:
        return
    try:
        written = json.loads(stamp["model"])
    except json.JSONDecodeError:
        written = None
    if not isinstance(written, dict):
        raise CheckpointError(f"checkpoint {ckpt.path}: {WEIGHTS} has unreadable metadata")
    mine = ckpt.config.to_dict()
    for key in sorted(set(written) & set(mine)):  # a key one ecviz version lacks is the other's default
        if not key.startswith("infer_") and written[key] != mine[key]:
            raise CheckpointError(f"checkpoint {ckpt.path}: {CONFIG} says {key}={mine[key]!r} but {WEIGHTS} was "
                                  f"written for {key}={written[key]!r} (a write cut short between the two "
                                  "files?); write the checkpoint again")
    if ckpt.digest is not None and "weights_digest" in stamp and stamp["weights_digest"] != ckpt.digest:
        raise CheckpointError(f"checkpoint {ckpt.path}: {WEIGHTS} and {CONFIG} come from two different writes "
                              "(one cut short?); write the checkpoint again")


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors' names of the types weights may be stored in


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[DiT, Checkpoint]:
    """Build the model its config describes and load the weights, after checking names and shapes."""
    ckpt = read_checkpoint(path)
    model = DiT(ckpt.config)
    expected = model.state_dict()
    try:
        with safe_open(ckpt.path / WEIGHTS, framework="pt") as f:
            names = set(f.keys())
            for name, param in expected.items():
                if name not in names:
                    raise CheckpointError(f"checkpoint {ckpt.path}: weight {name!r} is missing from {WEIGHTS}")
                piece = f.get_slice(name)
                shape = tuple(piece.get_shape())
                if shape != tuple(param.shape):
                    raise CheckpointError(f"checkpoint {ckpt.path}: weight {name!r} has shape {shape}, "
                                          f"the config expects {tuple(param.shape)}")
                if param.is_floating_point() and piece.get_dtype() not in FLOAT_DTYPES:  # int32 loaded, cast
                    raise CheckpointError(f"checkpoint {ckpt.path}: weight {name!r} is stored as "
                                          f"{piece.get_dtype()}, not a floating-point type; write the checkpoint "
                                          "again")
            extra = sorted(names - set(expected))
            if extra:
                raise CheckpointError(f"checkpoint {ckpt.path}: weight {extra[0]!r} is not in the model "
                                      f"its config describes")
            check_pair(ckpt, f.metadata() or {})
            state = {name: f.get_tensor(name) for name in expected}
    except SafetensorError as e:
        raise CheckpointError(f"checkpoint {ckpt.path}: {WEIGHTS} is unreadable ({e})") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {ckpt.path}: cannot read {WEIGHTS} ({e.strerror or e})") from None
    check_weights(ckpt, state)
    model.load_state_dict(state)
    return model.to(device).eval(), ckpt


def check_weights(ckpt: Checkpoint, state: dict[str, torch.Tensor]) -> None:
    """CheckpointError unless the weights read are those written: their digest is config.json's (where it has
    one: every checkpoint written since it exists) and every value is finite. A flipped byte loaded silently and
    drew other images, a NaN drew black ones, each with exit status 0."""
    if ckpt.digest is not None and tensors_digest(state) != ckpt.digest:
        raise CheckpointError(f"checkpoint {ckpt.path}: {WEIGHTS} is not what was written with {CONFIG} (its "
                              "tensors' digest differs: a damaged or altered file); restore it or write it again")
    for name in sorted(state):
        t = state[name]
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"checkpoint {ckpt.path}: weight {name!r} holds NaN or infinite values (a run "
                                  "that diverged, or a damaged file); use an earlier checkpoint")
