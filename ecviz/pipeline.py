"""Text to image with a checkpoint: frozen text encoder + DiT + rectified-flow sampler + latent codec.

`Pipeline` is the high-level Python API (`Pipeline.load(ckpt).generate_samples(prompts, seed)`), and
`layout_batches` + `Pipeline.run_batches` the one sampling loop that `ecviz trace`, `ecviz eval`, `ecviz
sample` and benchmarks/trace_overhead.py share, so a sample's image is the same whichever computes it.
`reproduce` computes a traced sample's image again, exactly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import ecviz.defaults as D
from ecviz import dist
from ecviz.codec import LatentCodec, load_codec, to_uint8
from ecviz.errors import EcvizError, UsageError
from ecviz.flow import Step, euler_sample, noise_for, sample_seed
from ecviz.model import DiT
from ecviz.progress import progress_bar
from ecviz.text import TextBatch, TextEncoder, load_text_encoder


def pad_text(emb: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad (B, L, d_y) embeddings and their mask to a fixed length, so every batch has one shape."""
    extra = length - emb.shape[1]
    if extra < 0:
        raise EcvizError(f"text has {emb.shape[1]} tokens, more than {length}")
    return torch.nn.functional.pad(emb, (0, 0, 0, extra)), torch.nn.functional.pad(mask, (0, extra))


@dataclass(frozen=True)
class SampleBatch:
    """One model batch of a run: consecutive samples in whole routing groups, fillers at the end.

    Sample i of a run seeded `seed` has noise seed `sample_seed(seed, i)`; a filler in slot k of a batch has
    `sample_seed(seed, n + k)` (a seed no sample uses) and repeats the batch's last real sample's prompt.
    """

    index: int  # position of the batch in the run
    samples: np.ndarray  # (B,) sample index of each slot; -1: filler
    source: np.ndarray  # (B,) sample whose prompt each slot uses (a filler: the batch's last real sample)
    seeds: list[int]  # (B,) noise seed of each slot

    @property
    def real(self) -> np.ndarray:
        """(B,) bool: which slots are samples (not fillers)."""
        return self.samples >= 0


def layout_batches(n: int, batch_size: int, per_group: int, seed: int) -> list[SampleBatch]:
    """The batch layout of every command that samples (`ecviz trace`, `eval`, `sample`, the benchmark).

    Samples 0..n-1 in batches of `batch_size` (rounded up to whole groups of `per_group` images) consecutive
    samples; the last batch is filled up to whole groups. Expert choice ranks a routing group's tokens
    together, so a sample's image depends on its group partners: with this one layout it is a function of
    (prompt, seed, sample index, batch size, group size) alone, whichever command computes it, and for a sample
    of a batch with fillers also of n (the fillers' seeds and prompt follow from it). Guidance
    doubles the model batch to [conditional; unconditional] images of whole groups each, so no group ever
    mixes the two branches.
    """
    if n < 1 or batch_size < 1 or per_group < 1:
        raise ValueError(f"layout_batches needs n, batch_size and per_group >= 1, got {n}, {batch_size}, {per_group}")
    size = -(-batch_size // per_group) * per_group
    out = []
    for start in range(0, n, size):
        idx = np.arange(start, min(start + size, n))
        samples = np.concatenate([idx, np.full(-len(idx) % per_group, -1)])
        seeds = [sample_seed(seed, int(i)) if i >= 0 else sample_seed(seed, n + k) for k, i in enumerate(samples)]
        out.append(SampleBatch(len(out), samples, np.where(samples >= 0, samples, idx[-1]), seeds))
    return out


@dataclass
class BatchOutput:
    """What `Pipeline.run_batches` yields for one batch."""

    batch: SampleBatch
    images: np.ndarray  # (B, H, W, 3) uint8, fillers included
    text: TextBatch  # the encoded prompts (token strings)
    mask: torch.Tensor  # (B, text_len) bool, padded to the model's text length


@dataclass
class Pipeline:
    """A checkpoint ready to sample: `Pipeline.load("checkpoints/ec-dit-shapes")`."""

    model: DiT
    text: TextEncoder
    codec: LatentCodec
    dtype: torch.dtype = torch.float32  # the model runs under autocast in this format (ecviz.dist.autocast)

    @classmethod
    def load(cls, ckpt: str | Path, device: str | torch.device = "cpu", group_size: int | None = None,
             dtype: str | torch.dtype | None = None, capacity_factor: float | None = None) -> Pipeline:
        """Load a checkpoint directory (or an `ecviz train` run directory) with its text encoder and codec;
        `group_size` sets the inference routing group (tokens; default: the checkpoint's) and `capacity_factor`
        the inference f_c (default: the checkpoint's); `dtype` the autocast format (default: bf16 on CUDA,
        float32 on the CPU; see ecviz.dist)."""
        from ecviz.checkpoint import load_checkpoint

        device = dist.resolve_device(device)
        dtype = dist.resolve_dtype(dtype, device)  # a bad device or format is refused before the checkpoint loads
        pipe = cls.from_model(load_checkpoint(ckpt, device=device)[0], dtype=dtype)
        if group_size:
            pipe.set_group_size(group_size)
        if capacity_factor is not None:
            pipe.set_capacity_factor(capacity_factor)
        return pipe

    @classmethod
    def from_model(cls, model: DiT, dtype: str | torch.dtype | None = None) -> Pipeline:
        cfg = model.cfg
        text = load_text_encoder(cfg.text_encoder, cfg.text_len)
        if text.dim != cfg.text_dim:
            raise EcvizError(f"text encoder {cfg.text_encoder!r} gives {text.dim}-d embeddings, "
                             f"the model expects text_dim {cfg.text_dim}")
        device = next(model.parameters()).device
        dtype = dist.resolve_dtype(dtype, device)
        return cls(model, text, load_codec(cfg.codec).to(device), dtype)  # a VAE decodes where the latents are

    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, TextBatch]:
        """(y (B, text_len, d_y), mask (B, text_len), the TextBatch with token strings)."""
        batch = self.text.encode(prompts)
        y, mask = pad_text(batch.emb, batch.mask, self.model.cfg.text_len)
        device = next(self.model.parameters()).device
        return y.to(device), mask.to(device), batch

    def generate(self, prompts: list[str], seeds: list[int], steps: int = D.STEPS, guidance: float = 1.0,
                 callback: Callable[[Step], None] | None = None) -> np.ndarray:
        """Images (B, H, W, 3) uint8, one per prompt; sample i's noise comes from seeds[i] alone."""
        y, mask, _ = self.encode_text(prompts)
        return self.sample(y, mask, seeds, steps, guidance, callback)

    def sample(self, y: torch.Tensor, mask: torch.Tensor, seeds: list[int], steps: int = D.STEPS, guidance: float = 1.0,
               callback: Callable[[Step], None] | None = None) -> np.ndarray:
        """Images (B, H, W, 3) uint8 from encoded text (see encode_text). The model samples in eval mode (its
        inference routing groups), whatever mode it is in, and is left in that mode. Guided, the B images must
        fill whole routing groups (`euler_sample`); `generate_samples` pads to them."""
        c = self.model.cfg
        noise = noise_for(seeds, (c.in_channels, c.input_size, c.input_size)).to(y.device)
        training = self.model.training
        self.model.eval()
        try:
            with dist.autocast(y.device, self.dtype):  # one context for all steps: weights are cast once
                latents = euler_sample(self.model, noise, y, mask, steps=steps, guidance=guidance, callback=callback)
        finally:
            self.model.train(training)
        return to_uint8(self.codec.decode(latents.float()))

    @property
    def image_size(self) -> int:
        return self.model.cfg.input_size * self.codec.downsample

    @property
    def group_size(self) -> int | None:
        """The inference routing group in tokens (None for a dense model)."""
        cfg = self.model.cfg
        return cfg.infer_group if cfg.sparse else None

    def set_group_size(self, group_size: int) -> None:
        """Route inference in groups of `group_size` tokens (a multiple or a divisor of the tokens per image)."""
        self.model.set_inference_group(group_size)

    def set_capacity_factor(self, factor: float) -> None:
        """Give each expert capacity for `factor` slots per token at inference (C = group·factor/E; the
        checkpoint's f_c by default): experts per token on average, for expert choice; a dense model refuses."""
        self.model.set_inference_capacity(factor)

    @property
    def images_per_group(self) -> int:
        """Images per inference routing group (1 for a dense model or groups within an image)."""
        return max(1, (self.group_size or 0) // self.model.cfg.tokens)

    def layout(self, n: int, batch_size: int, seed: int) -> list[SampleBatch]:
        """`layout_batches` for this model's routing groups. UsageError for a group of more images than the run
        has in a batch and than the model's training group: every batch would be padded to it (a group of 10^8
        tokens: hundreds of GB). Groups up to the training group's images are padded as needed (`--n 1`)."""
        cfg = self.model.cfg
        per_group, most = self.images_per_group, max(n, batch_size)
        if per_group > max(most, cfg.group_size // cfg.tokens):
            raise UsageError(f"routing groups of {self.group_size} tokens hold {per_group} images, more than the "
                             f"{most} a batch of this run can hold (--batch-size, prompts × images); use a smaller "
                             "--group-size")
        return layout_batches(n, batch_size, per_group, seed)

    def run_batches(self, texts: Sequence[str], batches: Iterable[SampleBatch], steps: int = D.STEPS,
                    guidance: float = D.GUIDANCE,
                    callback: Callable[[Step], None] | None = None,
                    before: Callable[[SampleBatch], None] | None = None) -> Iterator[BatchOutput]:
        """Sample batches from `layout` (texts[i]: sample i's prompt); `before(batch)` runs before each batch's
        forwards (a recorder's begin), `callback` after every step. The one sampling loop of ecviz."""
        for batch in batches:
            if before is not None:
                before(batch)
            y, mask, tb = self.encode_text([texts[i] for i in batch.source])
            images = self.sample(y, mask, batch.seeds, steps=steps, guidance=guidance, callback=callback)
            yield BatchOutput(batch, images, tb, mask)

    def generate_samples(self, texts: Sequence[str], seed: int = D.SEED, steps: int = D.STEPS,
                         guidance: float = D.GUIDANCE, batch_size: int = D.TRACE_BATCH,
                         progress: bool = False, only: Sequence[int] | None = None) -> np.ndarray:
        """Images (n, H, W, 3) uint8 of samples 0..n-1 of a run seeded `seed`, texts[i] sample i's prompt:
        what `ecviz trace`, `ecviz eval` and `ecviz sample` compute for the same arguments. With `only`, the
        images of those samples, in that order, each the image the whole run gives it: only the batches that
        hold them are run (a grid of a few samples of a large evaluation, at a fraction of its cost)."""
        from ecviz.validate import check_all

        check_all({"steps": steps, "batch_size": batch_size, "guidance": guidance, "seed": seed})
        if not texts:
            raise UsageError("no prompts to sample")
        batches = self.layout(len(texts), batch_size, seed)
        if only is not None:
            wanted = np.asarray(only)
            if wanted.size and wanted.dtype.kind not in "iu":
                raise UsageError(f"only: sample indices are integers, not {wanted.dtype}")
            if wanted.size and not (0 <= wanted.min() and wanted.max() < len(texts)):
                raise UsageError(f"samples {wanted.min()}..{wanted.max()}: the run has samples 0..{len(texts) - 1}")
            batches = [b for b in batches if np.isin(b.samples, wanted).any()]
            if not batches:
                return np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
        bar = progress_bar(sum(int(b.real.sum()) for b in batches), "image", "sample") if progress else None
        images, index = [], []
        with torch.no_grad():
            for out in self.run_batches(texts, batches, steps, guidance):
                images.append(out.images[out.batch.real])
                index.append(out.batch.samples[out.batch.real])
                if bar is not None:
                    bar.update(int(out.batch.real.sum()))
        if bar is not None:
            bar.close()
        images = np.concatenate(images)
        if only is None:
            return images
        where = {int(s): k for k, s in enumerate(np.concatenate(index))}
        return images[[where[int(s)] for s in wanted]]


def trace_checkpoint(ds, ckpt: str | Path | None = None) -> Path:
    """The checkpoint a trace was made with, found from here: `ckpt` if given; else its recorded path (`ecviz
    trace --ckpt` as given: relative to where it ran) as it is, then relative to each directory above the store
    (where the trace most likely ran: a default --out is traces/NAME.zarr below it). A one-line CheckpointError
    naming the remedy when none exists; whether it holds the trace's weights is `reproduce`'s check (sha256)."""
    from ecviz.errors import CheckpointError

    if ckpt is not None:
        return Path(ckpt)
    recorded = Path(ds.attrs["checkpoint"])
    store = ds.encoding.get("source") or ds.attrs.get("path")
    above = Path(os.path.abspath(store)).parents if store and not recorded.is_absolute() else []
    found = next((c for c in (recorded, *(d / recorded for d in above)) if c.exists()), None)
    if found is None:
        raise CheckpointError(f"checkpoint {recorded} (as the trace records it) is not found from here nor from the "
                              "directories above the trace; give its location (--ckpt, or ckpt=)")
    return found


def reproduce(trace, sample: int, ckpt: str | Path | None = None, device: str = "cpu",
              within: Callable[[DiT], AbstractContextManager] | None = None) -> np.ndarray:
    """The image (H, W, 3) uint8 of sample `sample` of a trace (a path or an opened Dataset), computed again.

    Reruns the sample's whole batch as `ecviz trace` ran it: the same checkpoint (by default the one the trace
    names; its weights must hash to the recorded `checkpoint_sha256`), prompts, seeds, steps, guidance, routing
    group size and capacity factor, number format and batch layout, hence the same group partners. Every sample
    of that batch must be done. `within(model)`, if given, is a context manager the batch is sampled inside (an
    intervention such as `ecviz.experiments.experts_removed`): the same sample with that one thing changed.
    """
    from ecviz.checkpoint import read_checkpoint
    from ecviz.errors import CheckpointError, TraceError
    from ecviz.trace.format import open_trace, upgrade_attrs

    ds = open_trace(trace) if isinstance(trace, str | Path) else trace
    a = upgrade_attrs(ds.attrs)
    n = ds.sizes["sample"]
    if not 0 <= sample < n:
        raise UsageError(f"--sample {sample}: the trace holds samples 0..{n - 1}")
    # each sample's place in the store: open_trace's coordinate follows any selection; a subset's attribute
    ids = ds.coords.get("store_sample")
    kept = ids.values if ids is not None else a.get("subset_of")
    whole = n == a["sampler"]["n_prompts"] * a["sampler"]["images_per_prompt"]
    if not (whole and (kept is None or np.array_equal(kept, np.arange(n)))):  # not the store in its order: the
        where = ds.encoding.get("source") or a.get("path")  # batch's partners come from the store
        if kept is None or where is None:
            raise UsageError("reproduce takes a trace opened with ecviz.open_trace (or a subset of one), not one "
                             "cut with isel from xr.open_zarr: pass the store and the sample's index in it")
        ds, sample = open_trace(where), int(kept[sample])
        a, n = upgrade_attrs(ds.attrs), ds.sizes["sample"]
    info = read_checkpoint(trace_checkpoint(ds, ckpt))
    if info.sha256 != a["checkpoint_sha256"]:
        raise CheckpointError(f"checkpoint {info.path}: not the weights this trace was made with (their sha256 "
                              f"differs); give the right one with --ckpt")
    pipe = Pipeline.load(info.path, device=device, dtype=a["sampler"].get("dtype", "float32"))
    if a["routing"]["kind"] != "dense":
        pipe.set_group_size(a["routing"]["group_size"])
        pipe.set_capacity_factor(a["routing"]["capacity_factor"])  # as traced (ecviz trace --capacity-factor)
    s = a["sampler"]
    batch = next(b for b in pipe.layout(n, s["batch_size"], a["seed"]) if sample in b.samples)
    members = batch.samples[batch.real]
    if not ds.done.values[members].all():
        raise TraceError(f"sample {sample}: its batch (samples {members[0]}..{members[-1]}) is not finished in "
                         f"this trace; rerun the same `ecviz trace` command to finish it")
    texts = dict(zip(members.tolist(), ds.prompt.values[members].tolist(), strict=True))
    with within(pipe.model) if within else nullcontext(), torch.no_grad():
        out = next(pipe.run_batches(texts, [batch], steps=s["steps"], guidance=s["guidance"]))
    return out.images[int(np.flatnonzero(batch.samples == sample)[0])]
