"""The recorder: attaches to a model's hook points and collects one batch of samples at a time.

Hooks only copy small tensors into preallocated numpy buffers on the sampling thread; everything derived
(expert counts, per-sample regrouping) happens in `BatchRecord.arrays()`, which the background writer calls.
On a GPU the hooks start asynchronous device-to-host copies and the buffers are filled once per denoising step
(`on_step`, `end`), so recording never stalls the GPU in the middle of a forward (a `.cpu()` per sparse layer
would synchronise 2-3 times per layer and step).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ecviz.codec import to_uint8
from ecviz.flow import Step
from ecviz.hooks import find_hook_points


@dataclass
class BatchLayout:
    """Which samples a model batch holds: images [cond samples; uncond samples] when `branches` is 2."""

    samples: np.ndarray  # (B,) sample index of each conditional image; -1 for padding fillers
    branches: int  # 1 (no guidance) or 2 (cond, uncond)
    first_group: int  # global index of the batch's first routing group

    @property
    def images(self) -> int:
        return len(self.samples) * self.branches


@dataclass
class BatchRecord:
    """Everything recorded for one batch; `arrays()` turns it into per-variable slabs for the store."""

    layout: BatchLayout
    tokens: int  # S
    seen: int  # tokens per image in the forward: S, or S' kept ones in a MaskDiT forward
    per_sample: dict[str, np.ndarray] = field(default_factory=dict)  # leading dim: the batch's B images
    per_image: dict[str, np.ndarray] = field(default_factory=dict)  # leading dim: model-batch images
    dispatch: np.ndarray | None = None  # (G, steps, layers, E, C) local slot indices
    gate: np.ndarray | None = None  # (G, steps, layers, E, C)
    group_tokens: np.ndarray | None = None  # (G, g) flat model-batch token position b·S + s (image positions)
    group_seen: np.ndarray | None = None  # (G, g) the same as the forward saw it, b·S' + s' (masked forwards)
    step_tokens: dict[int, np.ndarray] = field(default_factory=dict)  # masked forwards: group_tokens per step

    def arrays(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """({sample variable: array over the batch's real samples}, {group variable: array over its groups})."""
        L, S = self.layout, self.tokens
        real = L.samples >= 0
        out = {k: v[real] for k, v in self.per_sample.items()}
        for name, v in self.per_image.items():  # (B·branches, ...) -> (B, branches, ...)
            out[name] = np.swapaxes(v.reshape(L.branches, len(L.samples), *v.shape[1:]), 0, 1)[real]
        groups = {}
        if self.dispatch is not None:
            tokens = self.group_tokens
            if self.step_tokens:  # masked forwards, each with its own kept tokens: (steps, G, g)
                tokens = np.stack([self.step_tokens.get(s, tokens) for s in range(self.dispatch.shape[1])])
            count, gate_sum = expert_counts(self.dispatch, self.gate, tokens, L.images * S)
            for name, v in (("expert_count", count), ("gate_sum", gate_sum)):
                v = v.reshape(*v.shape[:2], L.branches, len(L.samples), S)  # (steps, layers, branch, B, S)
                out[name] = v.transpose(3, 2, 0, 1, 4)[real]
            out["expert_count"] = out["expert_count"].astype(np.uint8)
            out["gate_sum"] = out["gate_sum"].astype(np.float16)
            groups = {"dispatch": self.dispatch, "gate": self.gate.astype(np.float16)}
            groups.update(zip(("group_member_sample", "group_member_branch", "group_member_offset"),
                              members(self.group_seen, L.samples, self.seen), strict=True))
        return out, groups


def expert_counts(dispatch: np.ndarray, gate: np.ndarray, group_tokens: np.ndarray, n_tokens: int):
    """Experts per token and summed gates, (steps, layers, n_tokens), recounted from the dispatch slots.
    group_tokens: (G, g), or (steps, G, g) where each step's forward grouped other tokens (MaskDiT)."""
    G, n_steps, n_layers = dispatch.shape[:3]
    d = dispatch.transpose(1, 2, 0, 3, 4).reshape(n_steps * n_layers, G, -1)  # (SL, G, E·C)
    w = gate.transpose(1, 2, 0, 3, 4).reshape(n_steps * n_layers, G, -1).astype(np.float64)
    valid = d >= 0
    per_step = group_tokens.reshape(-1, 1, *group_tokens.shape[-2:])  # (steps or 1, 1, G, g)
    at = np.where(valid, d, 0).reshape(n_steps, n_layers, G, -1)
    flat = np.take_along_axis(per_step, at, axis=3).reshape(d.shape)  # (SL, G, E·C)
    idx = (np.arange(n_steps * n_layers)[:, None, None] * n_tokens + flat)[valid]
    size = n_steps * n_layers * n_tokens
    count = np.bincount(idx, minlength=size).reshape(n_steps, n_layers, n_tokens)
    gsum = np.bincount(idx, weights=w[valid], minlength=size).reshape(n_steps, n_layers, n_tokens)
    return count, gsum


def members(group_seen: np.ndarray, samples: np.ndarray, S: int):
    """Per group member (a run of consecutive tokens of one image): its sample, branch and first token.
    group_seen: (G, g) flat token index b·S + s in the forward's own token order, S tokens per image."""
    seg = min(group_seen.shape[1], S)
    first = group_seen[:, ::seg]  # (G, M) flat token of each member's first slot
    image = first // S
    B = len(samples)
    return samples[image % B].astype(np.int32), (image // B).astype(np.int8), (first % S).astype(np.int32)


def buffer_specs(cfg, what, n_steps: int, n_layers: int, layout: BatchLayout, groups: int, slots: int,
                 image_side: int) -> dict[str, tuple[str, tuple[int, ...], type, float]]:
    """What `Recorder.begin` allocates for one batch, {name: (where, shape, dtype, fill)}: `where` is "batch"
    (BatchRecord.dispatch and .gate: (G, steps, layers, E, C)), "per_image" or "per_sample". The one
    description of the buffers, which `record_bytes` also reads to refuse a run that cannot fit."""
    S, what = cfg.tokens, set(what)
    specs = {}
    if cfg.sparse and "dispatch" in what:
        slots_shape = (groups, n_steps, n_layers, cfg.experts, slots)
        specs["dispatch"] = ("batch", slots_shape, np.int32, -1)
        specs["gate"] = ("batch", slots_shape, np.float32, 0)
        if cfg.routing == "tc":
            specs["tc_expert"] = ("per_image", (layout.images, n_steps, n_layers, S, cfg.top_k), np.int8, -1)
            specs["tc_gate"] = ("per_image", (layout.images, n_steps, n_layers, S, cfg.top_k), np.float16, 0)
    if cfg.sparse and "affinity" in what:
        specs["affinity"] = ("per_image", (layout.images, n_steps, n_layers, S, cfg.experts), np.float16, 0)
    if "cross_attn" in what:
        specs["cross_attn"] = ("per_sample", (len(layout.samples), n_steps, cfg.depth, S, cfg.text_len),
                               np.float16, 0)
    if "x0" in what:
        specs["x0"] = ("per_sample", (len(layout.samples), n_steps, image_side, image_side, 3), np.uint8, 0)
    return specs


COUNTING_BYTES = 33  # per recorded slot, what `expert_counts` works with beside the buffers (float64 gates, int64
# indices, a mask)


def record_bytes(cfg, what, n_steps: int, n_layers: int, samples: int, branches: int, group_size: int,
                 image_side: int) -> int:
    """About the most memory recording one batch of `samples` images takes (`branches`: 2 with guidance), every
    image's tokens routed in groups of `group_size` at the model's inference capacity: its buffers
    (`buffer_specs`) and, for the dispatch, the working arrays of `expert_counts` that `BatchRecord.arrays`
    builds from it. What `trace` and the experiments check against memory before they write anything."""
    from ecviz.routing import capacity

    layout = BatchLayout(np.zeros(samples, np.int64), branches, 0)
    C = capacity(group_size, cfg.inference_capacity_factor, cfg.experts) if cfg.sparse else 0
    specs = buffer_specs(cfg, what, n_steps, n_layers, layout, layout.images * cfg.tokens // group_size, C,
                         image_side)
    total = sum(int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
                for _, shape, dtype, _ in specs.values())
    if "dispatch" in specs:
        total += int(np.prod(specs["dispatch"][1], dtype=np.float64)) * COUNTING_BYTES
    return total


class Recorder:
    """Collects routing (and optionally affinity, cross-attention, x0 previews) for one batch at a time."""

    def __init__(self, model: torch.nn.Module, what: set[str], steps: list[int], layers: list[int],
                 codec=None, defer: bool | None = None):
        self.model, self.what, self.codec = model, set(what), codec
        self.defer = defer  # copy to the host later, once per step: None = for tensors on a GPU only
        self.pending: list[tuple] = []  # (write, host tensor) copies in flight
        self.step_pos = {s: i for i, s in enumerate(steps)}  # denoising step -> position in the record
        self.layer_pos = {b: i for i, b in enumerate(layers)}  # block index -> position in the record
        self.cfg = model.cfg
        self.sparse = self.cfg.sparse  # the model routes (cfg.routing names how)
        self.batch: BatchRecord | None = None
        self.step = -1
        self.keep: np.ndarray | None = None  # (B, S') kept positions of the batch's MaskDiT forward

    # ---- hooks ----------------------------------------------------------------------------------------------
    def hook_fns(self) -> dict:
        fns = {"hook_t": self._on_t, "hook_keep": self._on_keep}
        if self.sparse and self.what & {"dispatch", "affinity"}:
            for b in self.layer_pos:
                p = f"blocks.{b}.moe."
                fns[p + "hook_group"] = self._on_group
                if "dispatch" in self.what:
                    fns[p + "hook_dispatch"] = self._slot_hook("dispatch", b)
                    fns[p + "hook_gate"] = self._slot_hook("gate", b)
                    if self.cfg.routing == "tc":
                        fns[p + "hook_choice"] = self._token_hook("tc_expert", b)
                        fns[p + "hook_choice_gate"] = self._token_hook("tc_gate", b)
                if "affinity" in self.what:
                    fns[p + "hook_affinity"] = self._token_hook("affinity", b)
        if "cross_attn" in self.what:
            for b in range(self.cfg.depth):
                fns[f"blocks.{b}.cross_attn.hook_attn"] = self._attn_hook(b)
        return fns

    def _pos(self, block: int) -> tuple[int, int] | None:
        s = self.step_pos.get(self.step)
        return None if s is None or self.batch is None else (s, self.layer_pos[block])

    def _on_t(self, t, name):
        self.step += 1

    def _on_keep(self, keep, name):
        """A MaskDiT forward: (B, S') kept token positions; routing indices get mapped back through them."""
        if self.batch is not None:
            if keep.shape[1] != self.batch.seen:
                raise ValueError(f"the forward keeps {keep.shape[1]} tokens per image; begin(kept=...) said "
                                 f"{self.batch.seen}")
            keep = keep.cpu().numpy()
            if self.keep is None or not np.array_equal(keep, self.keep):
                self.batch.group_tokens = None  # another forward's tokens: map its groups again
            self.keep = keep

    def _on_group(self, tokens, name):
        b = self.batch
        if b is None:
            return
        if b.group_tokens is None:  # once a batch, or once a masked forward
            b.group_seen = tokens.cpu().numpy()  # (G, g)
            if self.keep is None:
                b.group_tokens = b.group_seen
            else:  # kept-token order b·S' + s' -> image positions b·S + keep[b, s']
                image, rank = np.divmod(b.group_seen, b.seen)
                b.group_tokens = image * b.tokens + self.keep[image, rank]
        s = self.step_pos.get(self.step)
        if self.keep is not None and s is not None:
            b.step_tokens[s] = b.group_tokens

    def _host(self, x: torch.Tensor, write) -> None:
        """write(x as a numpy array): now, or (deferred) after an asynchronous copy, at the next flush."""
        if x.dtype == torch.bfloat16:  # numpy has no bfloat16 (CPU autocast leaves attention in it)
            x = x.float()
        if not (x.is_cuda if self.defer is None else self.defer):
            write(x.detach().cpu().numpy())  # a training forward records too
        elif x.is_cuda:
            self.pending.append((write, x.detach().to("cpu", non_blocking=True)))  # pinned, stream-ordered
        else:
            self.pending.append((write, x.detach().clone()))

    def flush(self) -> None:
        """Wait for the copies in flight and write them into the batch's buffers."""
        if not self.pending:
            return
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        pending, self.pending = self.pending, []
        for write, host in pending:
            write(host.numpy())

    def _slot_hook(self, var: str, block: int):
        def fn(x, name):
            pos = self._pos(block)
            if pos is not None:
                buf = getattr(self.batch, var)

                def write(a):
                    buf[:, pos[0], pos[1]] = a

                self._host(x, write)

        return fn

    def _token_hook(self, var: str, block: int):
        def fn(x, name):  # x (G, g, ...) in group order -> model-batch token order
            pos = self._pos(block)
            if pos is None:
                return
            buf = self.batch.per_image[var]  # (images, steps, layers, S, ...); hidden tokens keep the fill
            tokens = self.batch.group_tokens.reshape(-1)

            def write(a):
                flat = buf[:, pos[0], pos[1]].reshape(-1, *x.shape[2:])  # (images·S, ...)
                flat[tokens] = a.reshape(-1, *x.shape[2:])
                buf[:, pos[0], pos[1]] = flat.reshape(buf.shape[0], buf.shape[3], *x.shape[2:])

            self._host(x, write)

        return fn

    def _attn_hook(self, block: int):
        def fn(attn, name):  # (images, H, S, L); keep the conditional branch, mean over heads
            s = self.step_pos.get(self.step)
            if s is not None and self.batch is not None:
                buf = self.batch.per_sample["cross_attn"]

                def write(a):
                    buf[:, s, block] = a

                self._host(attn[: len(self.batch.layout.samples)].mean(1), write)

        return fn

    def on_step(self, step: Step) -> None:
        """Sampler callback: the step's routing into the buffers; x0 previews at recorded steps."""
        self.flush()
        s = self.step_pos.get(step.index)
        if "x0" in self.what and s is not None and self.batch is not None:
            self.batch.per_sample["x0"][:, s] = to_uint8(self.codec.decode(step.x0))

    # ---- batches --------------------------------------------------------------------------------------------
    def begin(self, layout: BatchLayout, group_size: int, kept: int | None = None) -> None:
        """Allocate the buffers of a batch; the next model forward is denoising step 0.

        kept: tokens per image the forwards keep, for MaskDiT forwards (`keep=`): their routing is recorded
        at image positions (hidden tokens: no experts, fills in per-token variables)."""
        rec = BatchRecord(layout, self.cfg.tokens, kept or self.cfg.tokens)
        C = self.model.blocks[next(iter(self.layer_pos))].moe.slots(group_size) if self.layer_pos else 0
        size = self.cfg.input_size * (self.codec.downsample if self.codec else 1)
        specs = buffer_specs(self.cfg, self.what, len(self.step_pos), len(self.layer_pos), layout,
                             layout.images * rec.seen // group_size, C, size)
        for name, (where, shape, dtype, fill) in specs.items():
            a = np.full(shape, fill, dtype)
            if where == "batch":
                setattr(rec, name, a)
            else:
                getattr(rec, where)[name] = a
        self.batch, self.step, self.keep, self.pending = rec, -1, None, []

    def end(self, **per_sample: np.ndarray) -> BatchRecord:
        """Close the batch, adding per-sample arrays (image, prompt, ...); returns it for the writer."""
        self.flush()
        rec, self.batch = self.batch, None
        rec.per_sample.update(per_sample)
        return rec


@contextmanager
def record(model: torch.nn.Module, what=("dispatch",), steps: list[int] | None = None,
           layers: list[int] | None = None, n_steps: int | None = None, codec=None,
           defer: bool | None = None) -> Iterator[Recorder]:
    """Attach a Recorder to the model's hook points for the duration of the block; always detach.

    steps: denoising steps to record (default: all `n_steps`); layers: sparse block indices (default: all);
    defer: copy recorded tensors to the host once per step instead of at once (default: on a GPU only).
    """
    if steps is None:
        if n_steps is None:
            raise ValueError("record() needs steps or n_steps")
        steps = list(range(n_steps))
    layers = model.cfg.sparse_layers if layers is None else list(layers)
    rec = Recorder(model, set(what), list(steps), layers, codec, defer)
    points = find_hook_points(model)
    handles = []
    try:
        for name, fn in rec.hook_fns().items():
            handles.append(points[name].add_hook(fn, name))
        yield rec
    finally:
        for h in handles:
            h.remove()
