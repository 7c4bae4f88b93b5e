"""`ecviz trace`: sample images from a checkpoint and stream their routing into a trace store.

Samples are prompt-major (sample = prompt·images_per_prompt + image); sample i's noise comes from (seed, i)
alone and batches are fixed runs of consecutive samples holding whole routing groups (`ecviz.pipeline.
layout_batches`, shared with eval and sample), so a batch is computed the same way whichever process runs it:
N processes write the same store as one. Under torchrun each rank
takes every N-th unfinished batch; rank 0 creates the store before anyone writes and finalises it at the end.
One run writes a store at a time: its writer lock (ecviz.lock) refuses a second one while the first lives.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import ecviz.defaults as D
from ecviz import dist
from ecviz._version import version
from ecviz.checkpoint import RUN_CHECKPOINT, Checkpoint, load_checkpoint
from ecviz.errors import UsageError
from ecviz.io import atomic_dir, recover_dir, remove_stale_temps
from ecviz.lock import writing
from ecviz.model import ModelConfig
from ecviz.pipeline import Pipeline, SampleBatch
from ecviz.progress import progress_bar
from ecviz.prompts import PromptSet, check_readable_by_every_rank, read_prompts
from ecviz.routing import capacity
from ecviz.trace.format import (
    BRANCHES,
    RECORDABLE,
    SCHEMA_VERSION,
    VARIABLES,
    TraceError,
    check_attrs,
    create_store,
    jsonable,
    max_experts,
    schema_version,
    variables_for,
)
from ecviz.trace.integrity import array_names, expected_variables, find_damage, metadata_errors, repair
from ecviz.trace.record import BatchLayout, record, record_bytes
from ecviz.trace.store import TraceWriter, remove_partials
from ecviz.validate import (
    check_all,
    check_device,
    check_fits,
    check_layers,
    check_output,
    check_routing,
    check_store_kind,
)

FINGERPRINT = ("checkpoint_sha256", "model_config", "routing", "prompt_file_sha256", "sampler", "record")


@dataclass
class TraceSettings:
    ckpt: Path
    prompts: str | Path  # a prompt file, or the name of a bundled set (ecviz.prompts.BUNDLED)
    out: Path | None = None
    images_per_prompt: int = D.TRACE_IMAGES_PER_PROMPT
    steps: int = D.STEPS
    guidance: float = D.GUIDANCE  # classifier-free guidance scale (--guidance; 1: off)
    seed: int = D.SEED
    batch_size: int = D.TRACE_BATCH
    group_size: int | None = None  # inference routing group; default: the checkpoint's
    capacity_factor: float | None = None  # inference f_c (slots per token); default: the checkpoint's
    record: tuple[str, ...] = ("dispatch",)
    record_steps: list[int] | None = None  # default: all
    record_layers: list[int] | None = None  # default: all sparse layers
    limit: int | None = None  # first N prompts
    overwrite: bool = False
    progress: bool = True
    device: str = "cpu"  # cpu, cuda (this process's GPU: cuda:LOCAL_RANK) or cuda:N
    dtype: str = "auto"  # autocast format: auto (bf16 on CUDA, float32 on the CPU), float32 or bfloat16


@dataclass
class Plan:
    """Everything a run decides before touching the store."""

    settings: TraceSettings
    ckpt: Checkpoint
    pipe: Pipeline
    prompts: PromptSet
    n_prompts: int
    group_size: int
    batches: list[SampleBatch] = field(default_factory=list)  # ecviz.pipeline.layout_batches
    first_group: list[int] = field(default_factory=list)
    n_groups: int = 0

    @functools.cached_property
    def shapes(self) -> bool:
        """Every prompt is a Shapes caption: the trace records which object each word names."""
        return shapes_captions(self.prompts.prompts[: self.n_prompts])

    @property
    def n_samples(self) -> int:
        return self.n_prompts * self.settings.images_per_prompt

    @property
    def branches(self) -> int:
        return 2 if self.settings.guidance != 1.0 else 1


def check_settings(s: TraceSettings, out: Path) -> None:
    """What needs no model: numbers in range (ecviz.validate), --record, the device and the output path."""
    check_all({name: getattr(s, name) for name in ("images_per_prompt", "steps", "seed", "batch_size", "group_size",
                                                   "capacity_factor", "limit", "guidance")})
    unknown = sorted(set(s.record) - set(RECORDABLE))
    if unknown:
        raise UsageError(f"--record {unknown[0]!r}: choose from {', '.join(RECORDABLE)}")
    if not s.record:
        raise UsageError(f"--record names nothing to record: choose from {', '.join(RECORDABLE)}")
    check_device(s.device)
    check_output(out, "--out", "store")
    check_store_kind(out, "--out", "an ecviz trace")


def plan(s: TraceSettings) -> Plan:
    """Validate every input and lay out the batches; raises ValueError (one line) on bad input."""
    check_settings(s, Path(s.out or default_out(s)))
    device = dist.resolve_device(s.device)
    dtype = dist.resolve_dtype(s.dtype, device)
    check_readable_by_every_rank(s.prompts, dist.ranks().world)  # torchrun by hand: the launcher checked --nproc
    prompts = read_prompts(s.prompts)
    model, ckpt = load_checkpoint(s.ckpt, device=device)
    cfg = model.cfg
    g = s.group_size or cfg.infer_group
    check_routing(cfg, s.group_size, s.capacity_factor)
    if cfg.sparse:
        if cfg.experts > max_experts(cfg.routing):
            raise UsageError(f"{s.ckpt}: {cfg.experts} experts, more than a trace stores ({max_experts(cfg.routing)} "
                             f"for {cfg.routing} routing, docs/trace-format.md)")
    if s.record_steps is not None and not set(s.record_steps) <= set(range(s.steps)):
        raise UsageError(f"--record-steps must lie in 0..{s.steps - 1}")
    if s.record_layers is not None:  # sorted, once each (the Python API may give [3, 1, 1])
        s = dataclasses.replace(s, record_layers=check_layers(cfg, s.record_layers, "--record-layers"))
    pipe = Pipeline.from_model(model, dtype=dtype)
    pipe.set_group_size(g)
    if s.capacity_factor is not None:
        pipe.set_capacity_factor(s.capacity_factor)
    n_prompts = min(len(prompts), s.limit) if s.limit is not None else len(prompts)
    p = Plan(s, ckpt, pipe, prompts, n_prompts, g)
    p.batches = pipe.layout(p.n_samples, s.batch_size, s.seed)
    for batch in p.batches:
        p.first_group.append(p.n_groups)
        p.n_groups += len(batch.samples) * p.branches * cfg.tokens // g if cfg.sparse else 0
    check_recording_fits(p)
    return p


def check_recording_fits(p: Plan) -> None:
    """A batch's recording, which grows with its recorded steps and layers, must fit in this machine's memory:
    refused here, before the store is created or replaced."""
    s, cfg = p.settings, p.pipe.model.cfg
    steps = len(s.record_steps) if s.record_steps is not None else s.steps
    layers = len(s.record_layers) if s.record_layers is not None else len(cfg.sparse_layers)
    samples = len(p.batches[0].samples)  # the first batch is the largest
    check_fits(record_bytes(cfg, s.record, steps, layers, samples, p.branches, p.group_size, p.pipe.image_size),
               f"recording {steps:,} steps of a batch of {samples} images",
               "record fewer steps (--record-steps), take fewer --steps or a smaller --batch-size",
               processes=dist.ranks().local_world)  # --nproc: each process records its own batch


def store_attrs(p: Plan) -> dict:
    s, cfg = p.settings, p.pipe.model.cfg
    return jsonable({
        "ecviz_schema_version": SCHEMA_VERSION,
        "ecviz_version": version(),
        "checkpoint": str(p.ckpt.path),
        "checkpoint_sha256": p.ckpt.sha256,
        "preset": p.ckpt.preset,
        "model_config": cfg.to_dict(),
        "routing": {"kind": cfg.routing, "experts": cfg.experts, "capacity_factor": cfg.inference_capacity_factor,
                    "group_size": p.group_size, "top_k": cfg.top_k,
                    "capacity": capacity(p.group_size, cfg.inference_capacity_factor, cfg.experts)
                    if cfg.sparse else None},
        "sampler": {"name": "euler", "steps": s.steps, "guidance": s.guidance, "seed": s.seed,
                    "images_per_prompt": s.images_per_prompt, "batch_size": len(p.batches[0].samples),
                    "n_prompts": p.n_prompts, "null_text": cfg.null_text}
                   | ({"dtype": dist.dtype_name(p.pipe.dtype)} if p.pipe.dtype != torch.float32 else {}),
        "seed": s.seed,
        "record": {"what": sorted(set(s.record)), "steps": s.record_steps, "layers": s.record_layers},
        "prompt_file": p.prompts.path.name,
        "prompt_file_sha256": p.prompts.sha256,
        "prompt_file_kind": p.prompts.kind,
        "tokens_per_image": cfg.tokens,
        "grid": [cfg.input_size // cfg.patch_size] * 2,
        "patch_size": cfg.patch_size,
        "variables": sorted(store_layout(p)[1]),
    })


def as_routed(model_config: dict) -> dict:
    """A model config as it routes at inference: an `infer_*` setting left at None (as trained) is the training
    value it stands for, so a run that names the checkpoint's own group or capacity factor is the same run."""
    return model_config | {f"infer_{k}": model_config.get(f"infer_{k}") or model_config.get(k)
                           for k in ("group_size", "capacity_factor")}


def same_setting(key: str, old, new, attrs: dict) -> bool:
    """Whether a store's fingerprint entry `key` (old) is this run's (new). The recorded steps and layers
    compare as the lists they stand for: all of them written out is the default (null); model configs as they
    route (`as_routed`)."""
    if key == "model_config" and isinstance(old, dict) and isinstance(new, dict):
        return as_routed(old) == as_routed(new)
    if key != "record" or not (isinstance(old, dict) and isinstance(new, dict)):
        return old == new
    every = {"steps": list(range(attrs["sampler"]["steps"])), "layers": ModelConfig.from_dict(
        attrs["model_config"]).sparse_layers}

    def norm(r: dict) -> tuple:
        return (sorted(set(r.get("what") or ())),
                *(sorted(r[k]) if r.get(k) is not None else every[k] for k in ("steps", "layers")))

    return norm(old) == norm(new)


def store_layout(p: Plan):
    """(sizes, variable names, coordinates, recorded steps, recorded layers) of the store this plan writes."""
    s, cfg = p.settings, p.pipe.model.cfg
    steps = s.record_steps if s.record_steps is not None else list(range(s.steps))
    layers = s.record_layers if s.record_layers is not None else cfg.sparse_layers
    side = p.pipe.image_size
    grid = cfg.input_size // cfg.patch_size
    has = {n for n, col in (("category", p.prompts.category), ("challenge", p.prompts.challenge)) if col}
    if p.shapes:
        has.add("shapes")
    names = variables_for(cfg.routing, set(s.record), has)
    C = capacity(p.group_size, cfg.inference_capacity_factor, cfg.experts) if cfg.sparse else 0
    sizes = {"sample": p.n_samples, "branch": p.branches, "step": len(steps), "layer": len(layers),
             "token": cfg.tokens, "expert": cfg.experts, "slot": C, "k": cfg.top_k, "group": p.n_groups,
             "member": max(1, p.group_size // cfg.tokens), "text": cfg.text_len, "word": cfg.text_len, "y": side,
             "x": side, "channel": 3, "block": cfg.depth}
    coords = {
        "step": ("step", np.array(steps, np.int32)),
        "t": ("step", np.array(steps, np.float32) / s.steps),
        "layer": ("layer", np.array(layers, np.int32)),
        "block": ("block", np.arange(cfg.depth, dtype=np.int32)),
        "token": ("token", np.arange(cfg.tokens, dtype=np.int32)),
        "row": ("token", np.arange(cfg.tokens, dtype=np.int32) // grid),
        "col": ("token", np.arange(cfg.tokens, dtype=np.int32) % grid),
        "branch": ("branch", np.array(BRANCHES[: p.branches], dtype=object)),
        "expert": ("expert", np.arange(cfg.experts, dtype=np.int32)),
    }
    return sizes, names, coords, steps, layers


def open_or_create(p: Plan, out: Path, rank: int, barrier, started: float | None = None) -> tuple[object, list[int]]:
    """Check an existing store against this run (or replace it with --overwrite); rank 0 creates it, or, resuming,
    finds damaged chunks of done samples and takes their batches out so that they are computed again. Returns
    the open store and the repaired samples. A store in which no sample is done yet (what an interrupted or
    refused run leaves) is replaced like with --overwrite: nothing in it is lost."""
    import zarr

    attrs = store_attrs(p)
    if rank == 0:  # leftovers of interrupted creations, a swap killed midway: this run owns `out` now
        recover_dir(out)
        remove_stale_temps(out, before=started if started is not None else time.time())
    barrier()
    replace = p.settings.overwrite or holds_nothing(out)
    if out.exists() and not replace:
        version = schema_version(out)
        if version is None:
            raise TraceError(f"{out} exists and is not an ecviz trace (use --overwrite to replace it)")
        if version != SCHEMA_VERSION:
            raise TraceError(f"{out}: trace schema version {version}, this ecviz writes version {SCHEMA_VERSION} "
                             f"(use --overwrite to replace it)")
        old = zarr.open_group(str(out), mode="r").attrs
        check_attrs(out, dict(old), "use --overwrite to replace it")  # before they are read as a fingerprint
        for key in FINGERPRINT:
            if not same_setting(key, old.get(key), attrs[key], attrs):
                what = {"checkpoint_sha256": "another checkpoint", "prompt_file_sha256": "another prompt file",
                        "model_config": "another model config"}.get(key, f"other {key} settings")
                if key == "prompt_file_sha256" and old.get("prompt_file") == attrs.get("prompt_file"):
                    what = f"another version of the prompt file {attrs.get('prompt_file')} (its lines changed since)"
                elif isinstance(old.get(key), dict) and key != "model_config":  # name what differs
                    was, now = old[key], attrs[key]
                    what += " (" + ", ".join(f"{k} {was.get(k)}, this run's {now.get(k)}" for k in sorted(
                        set(was) | set(now)) if was.get(k) != now.get(k)) + ")"
                if key == "model_config" and isinstance(old.get(key), dict):
                    was, now = as_routed(old[key]), as_routed(attrs[key])
                    differ = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
                    if all(k.startswith("infer_") for k in differ):  # the same model, routed otherwise
                        what = "other inference settings (" + ", ".join(
                            f"{k} {was.get(k)}, this run's {now.get(k)}" for k in differ) + ")"
                raise TraceError(f"{out} was made with {what}; use --overwrite to replace it or --out elsewhere")
        lacking = sorted(expected_variables(attrs) - array_names(out))
        if lacking:  # made with these settings, so a variable was lost: nothing per batch can bring it back
            raise TraceError(f"{out} lacks `{lacking[0]}`, which this run writes: the store is damaged; rewrite it "
                             "with --overwrite")
        check_shapes(out, p)
    barrier()  # every rank has looked at the store before rank 0 replaces or repairs it
    repaired: list[int] = []
    if rank == 0:
        if not out.exists() or replace:
            sizes, names, coords, _, _ = store_layout(p)
            per = len(p.batches[0].samples)  # every batch but the last holds this many samples: one shard each
            shards = {"sample": per, "group": per * p.branches * p.pipe.model.cfg.tokens // p.group_size}
            atomic_dir(out, lambda tmp: create_store(tmp, sizes, names, coords, attrs | {"complete": False},
                                                     shards))  # the store appears whole or not at all
        else:
            remove_partials(out)
            damage = find_damage(out)  # reads each done sample's chunks once: damage is found, not trusted
            if damage:  # unfinished first: a kill during the repair must not leave `complete` claiming otherwise
                zarr.open_group(str(out), mode="r+").attrs.update({"complete": False})
                repaired = repair(out, damage)
    barrier()
    return zarr.open_group(str(out), mode="r+"), repaired


@metadata_errors  # unreadable metadata: one line, not zarr's traceback
def check_shapes(out: Path, p: Plan) -> None:
    """A one-line TraceError if a variable of the store has another shape or type than this run writes: its
    metadata was altered (a rerun went on to say "done" of a store that no longer opened)."""
    import zarr

    sizes, names = store_layout(p)[:2]
    root = zarr.open_group(str(out), mode="r")
    for name in names:
        v, arr = VARIABLES[name], root[name]
        want = tuple(sizes[d] for d in v.dims)
        if arr.shape != want or (v.dtype is not str and arr.dtype != np.dtype(v.dtype)):  # str: zarr's own type
            raise TraceError(f"{out}: `{name}` is {arr.dtype} of shape {arr.shape}, this run writes "
                             f"{'text' if v.dtype is str else np.dtype(v.dtype)} of shape {want}: the store is "
                             "damaged; rewrite it with --overwrite")


def holds_nothing(out: Path) -> bool:
    """An empty directory, or an ecviz trace store of any settings in which no sample is done (nothing to lose)."""
    import zarr

    if not out.is_dir():
        return False
    if not any(out.iterdir()):
        return True
    if schema_version(out) is None:
        return False
    try:
        done = zarr.open_group(str(out), mode="r")["done"]
        return not any((out / done.path / "c").rglob("*")) if (out / done.path / "c").exists() else True
    except Exception:
        return False


def default_out(s: TraceSettings) -> Path:
    """traces/MODEL-PROMPTS.zarr: MODEL the checkpoint directory's name, or its run's for a run's checkpoint/
    (runs/x/checkpoint: x; every run's traces were all named checkpoint-...), PROMPTS the prompt file's stem."""
    ckpt = Path(os.path.abspath(s.ckpt))
    name = ckpt.parent.name if ckpt.name == RUN_CHECKPOINT else ckpt.name
    return Path("traces") / f"{name}-{Path(s.prompts).stem}.zarr"


def run_trace(s: TraceSettings) -> dict:
    """Run (or resume) a trace; returns a summary. Works alone or under torchrun (one call per rank). The
    store is written under its writer lock (ecviz.lock), taken once every input is checked (a refused input
    leaves no file): from then on a second run on the store is refused."""
    ranks = dist.start(dist.resolve_device(s.device))  # several processes: join the process group
    out = Path(s.out or default_out(s))
    started = time.time()
    p = plan(s)
    with writing(out):
        return write_trace(p, out, ranks, started)


def write_trace(p: Plan, out: Path, ranks: dist.Ranks, started: float) -> dict:
    """Check the store against the plan (or create it; leftovers of runs before `started` go), then sample and
    record this rank's unfinished batches."""
    s = p.settings
    rank, world, barrier = ranks.rank, ranks.world, dist.barrier
    pipe, model = p.pipe, p.pipe.model
    root, repaired = open_or_create(p, out, rank, barrier, started)
    _, _, _, steps, layers = store_layout(p)

    done = root["done"][:]
    barrier()  # every rank reads `done` before any rank writes, so all partition the same list of batches
    todo = [b for b in p.batches if not done[b.samples[b.real]].all()]
    mine = todo[rank::world]
    skipped = p.n_samples - sum(int(b.real.sum()) for b in todo)
    texts = [p.prompts.prompts[i // s.images_per_prompt] for i in range(p.n_samples)]  # sample i's prompt
    t0 = time.perf_counter()
    writer = TraceWriter(root)
    bar = None
    if s.progress and rank == 0:

        bar = progress_bar(sum(int(b.real.sum()) for b in mine), "sample", "trace")
    try:
        with torch.no_grad(), record(model, s.record, steps=steps, layers=layers, codec=pipe.codec) as rec:
            def begin(b: SampleBatch) -> None:
                rec.begin(BatchLayout(b.samples, p.branches, p.first_group[b.index]), p.group_size)

            for res in pipe.run_batches(texts, mine, steps=s.steps, guidance=s.guidance, callback=rec.on_step,
                                        before=begin):
                b = res.batch
                extra = per_sample_arrays(p, [texts[i] for i in b.source], b.source // s.images_per_prompt,
                                          b.source, b.seeds, res.text, res.mask)
                writer.put(rec.end(image=res.images, **extra))
                if bar is not None:
                    bar.update(int(b.real.sum()))
    finally:
        try:
            writer.close()
        finally:
            if bar is not None:
                bar.close()
    elapsed = time.perf_counter() - t0
    written = int(dist.all_sum(writer.written))
    barrier()
    summary = {"samples": p.n_samples, "written": written, "skipped_done": skipped, "repaired": repaired,
               "seconds": elapsed, "store": str(out), "blank_lines_skipped": p.prompts.skipped_blank,
               "processes": world}
    if rank == 0:
        complete = bool(root["done"][:].all())
        root.attrs.update({"complete": complete})
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        summary |= {"complete": complete, "store_bytes": size, "bytes_per_sample": size / max(1, p.n_samples)}
    dist.finish()
    return summary


def shapes_captions(prompts: list[str]) -> bool:
    """Whether every prompt is a Shapes caption, so its words' objects are known (`word_object`)."""
    from ecviz.shapes_eval import word_objects

    try:
        for text in prompts:
            word_objects(text)
    except ValueError:
        return False
    return True


def word_arrays(texts: list[str], tb, shape: tuple[int, int], shapes: bool) -> dict[str, np.ndarray]:
    """text_word (B, text), prompt_word (B, word) and, for Shapes captions, word_object (B, word)."""
    B, L = shape
    tok_word = np.full((B, L), -1, np.int16)
    words = np.full((B, L), "", dtype=object)
    for i, text in enumerate(texts):
        if tb.word_index is not None:
            tok_word[i, : len(tb.word_index[i])] = tb.word_index[i]
        w = text.split()[:L]
        words[i, : len(w)] = w
    out = {"text_word": tok_word, "prompt_word": words}
    if shapes:
        from ecviz.shapes_eval import word_objects

        obj = np.full((B, L), -1, np.int8)
        for i, text in enumerate(texts):
            wo = word_objects(text)[0][:L]
            obj[i, : len(wo)] = wo
        out["word_object"] = obj
    return out


def per_sample_arrays(p: Plan, texts, prompt_idx, real, seeds, tb, mask) -> dict[str, np.ndarray]:
    tok = np.full(tuple(mask.shape), "", dtype=object)
    for i, row in enumerate(tb.tokens):
        tok[i, : len(row)] = row
    out = {
        "prompt": np.array(texts, dtype=object),
        "prompt_index": prompt_idx.astype(np.int32),
        "image_index": (real % p.settings.images_per_prompt).astype(np.int32),
        "seed": np.array(seeds, np.int64),
        "text_token": tok,
        "text_mask": mask.cpu().numpy(),
    } | word_arrays(texts, tb, tuple(mask.shape), p.shapes)
    if p.prompts.category:
        out["category"] = np.array([p.prompts.category[i] for i in prompt_idx], dtype=object)
    if p.prompts.challenge:
        out["challenge"] = np.array([p.prompts.challenge[i] for i in prompt_idx], dtype=object)
    return out
