"""`ecviz train`: the paper's recipe (§3.1) scaled down to a CPU.

RMSProp with momentum, linear learning-rate warm-up, logit-normal timesteps, text dropout for classifier-free
guidance, optional MaskDiT-style token masking, EMA weights and gradient clipping. Every random draw of a
step comes from a generator seeded with (seed, step) over the *global* batch, of which each data-parallel
rank takes its slice: a resumed run continues exactly, and N ranks compute what one process would with the
N-times batch (as long as each rank's slice holds whole routing groups). Every `probe_every` steps a fixed
probe batch appends its routing to `routing.zarr` (see ecviz.trace.probe). Batches are made ahead of their step
(`Prefetch`: DataLoader worker processes or a background thread), from the indices `batch_indices` names;
Shapes items can come pre-rendered from a cache (`--data-cache`, ecviz.data.shapes_cache): the same items
either way, so neither changes a run. One run writes a run directory at a time: its writer lock (ecviz.lock)
refuses a second one while the first lives.
"""

from __future__ import annotations

import functools
import json
import math
import os
import queue
import shlex
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ecviz import dist
from ecviz.checkpoint import TRAIN_STATE, read_checkpoint, save_checkpoint
from ecviz.codec import load_codec
from ecviz.errors import CheckpointError, UsageError
from ecviz.flow import flow_loss, interpolate, sample_seed, sample_timesteps, velocity
from ecviz.io import atomic_dir, atomic_write, recover_dir, remove_stale_temps, same_path, write_safetensors
from ecviz.lock import writing
from ecviz.model import DiT, ModelConfig, preset
from ecviz.pipeline import pad_text
from ecviz.progress import progress_bar
from ecviz.routing import check_group_size
from ecviz.text import TextTable, load_text_encoder
from ecviz.validate import check_all, check_output, check_sparse_options, host_memory

MAX_TOKENS = 65536  # image tokens per image a run may ask for: a 256×256 grid, 256× the paper's (256 px, patch 2)


@dataclass
class TrainConfig:
    preset: str
    out: str
    data: str = "shapes"
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-4  # the paper's
    warmup: int = 200
    momentum: float = 0.9
    rms_alpha: float = 0.99
    t_mu: float = 0.0  # logit-normal timesteps
    t_sigma: float = 1.0
    text_dropout: float = 0.1
    mask_ratio: float = 0.0  # MaskDiT: fraction of image tokens hidden from the blocks (paper: 0.5)
    unmask_last: int = 0  # with mask_ratio: the last this many steps see every token (MaskDiT's unmasked tuning)
    ema: float = 0.999
    grad_clip: float = 1.0
    ckpt_every: int = 500
    probe_every: int = 250
    log_every: int = 10
    seed: int = 0
    data_seed: int = 0  # Shapes: the stream's seed (item i is a function of (data_seed, i)); another one trains
    # a checkpoint on (--init) with images it has not seen (--seed alone changes noise, timesteps and dropout)
    image_size: int | None = None  # data resolution (default: the preset's input size)
    group_size: int | None = None  # training routing group, overriding the preset
    codec: str | None = None  # latent codec, overriding the preset: "pixel" or "vae:<dir>"
    text_encoder: str | None = None  # text encoder, overriding the preset: "minilm" or "hf:<dir>"
    text_table: str | None = None  # precomputed caption embeddings of that encoder (ecviz.text.TextTable)
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the ranks (FSDP2)
    data_cache: str | None = None  # Shapes only: pre-render the run's items into this cache root ("auto": default)
    data_workers: int | None = None  # loader processes (0: one background thread); None: 0 when cached, else some
    device: str = "cpu"  # "cpu", "cuda" (one GPU per rank under torchrun: cuda:LOCAL_RANK) or "cuda:N"
    dtype: str = "auto"  # autocast format: "auto" (bf16 on CUDA, float32 on the CPU), "float32" or "bfloat16"
    model: str | None = None  # model overrides on the preset, "KEY=VALUE,...", e.g. "width=96,depth=8"
    lr_decay: str = "constant"  # after warm-up: "constant" or "cosine" (to lr_min_ratio·lr at the last step)
    lr_min_ratio: float = 0.1
    init: str | None = None  # a checkpoint whose weights start the model (fine-tuning): see SAME_ON_INIT

    def overrides(self) -> dict:
        """This run's changes to the preset: --model's, then the flags that name a config field (--group-size,
        --codec, --text-encoder), which win."""
        overrides = parse_model_overrides(self.model)
        return overrides | {k: v for k in ("group_size", "codec", "text_encoder") if (v := getattr(self, k))}

    def model_config(self, codec=None, text_dim: int | None = None) -> ModelConfig:
        """The preset with this run's overrides, its input shaped to the latent codec's output and its
        cross-attention to the text encoder's width."""
        overrides = self.overrides()
        downsample = codec.downsample if codec is not None else 1
        if codec is not None:
            overrides["in_channels"] = codec.channels
        if text_dim is not None:
            overrides["text_dim"] = text_dim
        if self.image_size:
            if self.image_size % downsample:
                raise UsageError(f"--image-size {self.image_size} is not a multiple of the codec's {downsample}")
            patch = overrides.get("patch_size", preset(self.preset).patch_size) * downsample  # in pixels
            if self.image_size % patch:
                raise UsageError(f"--image-size {self.image_size} is not a multiple of the model's {patch} px patches")
            overrides["input_size"] = self.image_size // downsample
        cfg = preset(self.preset, **overrides)
        if self.image_size and cfg.tokens > MAX_TOKENS:  # its position table alone would be tokens × width floats
            raise UsageError(f"--image-size {self.image_size} gives {cfg.tokens} tokens per image (patch "
                             f"{cfg.patch_size}), more than {MAX_TOKENS} (a 256×256 token grid)")
        return cfg

    def encoders(self) -> tuple[str, str, int]:
        """(codec, text encoder, text_len) of this run's model, from the same overrides as `model_config`: what
        the data is encoded with must be what the checkpoint's config says."""
        overrides, base = self.overrides(), preset(self.preset)
        return tuple(overrides.get(k, getattr(base, k)) for k in ("codec", "text_encoder", "text_len"))

    def kept_tokens(self, cfg: ModelConfig) -> int:
        """Image tokens per image that enter the blocks while masking: all, or what MaskDiT masking leaves."""
        return cfg.tokens - int(cfg.tokens * self.mask_ratio)

    def masked(self, step: int) -> bool:
        """Whether step (0-based) hides tokens: mask_ratio > 0 and the step is before the unmasked last ones."""
        return self.mask_ratio > 0 and step < self.steps - self.unmask_last

    def check(self, world: int = 1, resume: bool = False) -> None:
        """What needs no model: every number in its range (ecviz.validate), the device and number format, the
        output directory, the data cache, --init (unless resuming, which never reads it)."""
        check_all(asdict(self))
        shapes = shapes_spec(self.data)  # an unknown category is a usage error before anything starts
        # the device (this process's own: under torchrun its LOCAL_RANK's GPU) and the number format
        dist.resolve_dtype(self.dtype, dist.resolve_device(self.device))
        if self.fsdp and world == 1:  # silently ignored before: one process has nothing to shard over
            raise UsageError("--fsdp shards the model over processes, and this run has one: give --nproc 2 or "
                             "more, or leave --fsdp out")
        if self.batch_size % world:
            raise UsageError(f"--batch-size {self.batch_size} does not split over {world} processes "
                             f"(use a multiple of {world})")
        if self.lr_decay not in ("constant", "cosine"):
            raise UsageError(f"--lr-decay {self.lr_decay!r}: use constant or cosine")
        if self.unmask_last and not self.mask_ratio:  # silently ignored before
            raise UsageError(f"--unmask-last {self.unmask_last}: the last steps of a masked run train unmasked; "
                             "without --mask-ratio every step is unmasked already")
        check_output(self.out, "--out", "dir")
        if self.data_cache not in (None, "auto"):
            check_output(self.data_cache, "--data-cache", "dir")
        if self.data_cache and shapes is False:
            raise UsageError(f"--data-cache is for --data shapes, not {self.data}")
        if self.data_seed and shapes is False:  # silently ignored: an image-text set's items are its files
            raise UsageError(f"--data-seed {self.data_seed} is for --data shapes (it draws the synthetic items), "
                             f"not {self.data}")
        if self.init is not None and not resume:
            from ecviz.checkpoint import read_checkpoint

            try:
                read_checkpoint(self.init)  # a checkpoint or run directory: its config, not yet its weights
            except CheckpointError as e:
                raise UsageError(f"--init: {e}") from None
        if self.init is not None and resume:  # the same command again resumes: --init must be the run's own
            self.check_resumed_init()
        if self.text_table is not None and not Path(self.text_table).is_file():
            raise UsageError(f"--text-table {self.text_table}: no such file (make one with scripts/text_table.py)")

    def check_resumed_init(self) -> None:
        """With --resume, the weights come from the run's checkpoint and --init is read only as part of the
        command that started it (scripts/train_shipped.sh reruns it whole): it must name what the run started
        from, else it is refused rather than silently ignored (a path that did not exist went through)."""
        from ecviz.checkpoint import read_checkpoint

        try:
            meta = read_checkpoint(Path(self.out) / "checkpoint").meta
        except CheckpointError:
            return  # no checkpoint to resume: the resume's own check says so
        started = (meta.get("train_config") or {}).get("init")  # the --init it was started with
        if started is None:
            raise UsageError(f"--init {self.init}: {self.out} started from fresh weights; resume it without --init")
        if not same_path(started, self.init):
            raise UsageError(f"--init {self.init}: {self.out} started from {started}; resume it with that --init "
                             "or none")

    def validate(self, cfg: ModelConfig, world: int, resume: bool = False) -> None:
        self.check(world, resume)
        if self.init is not None and not resume:
            check_init_config(self.init, cfg)
        self.check_memory(cfg, world)
        check_sparse_options(cfg, {"--group-size": self.group_size})
        if cfg.sparse:
            for kept in sorted({self.kept_tokens(cfg)} | ({cfg.tokens} if self.unmask_last else set())):
                masked = f" that --mask-ratio {self.mask_ratio:g} keeps" if kept < cfg.tokens else ""
                check_group_size(cfg.group_size, kept, "the routing group of", masked)
                if (self.batch_size // world) * kept % cfg.group_size:
                    raise UsageError(f"--batch-size {self.batch_size} over {world} process(es) gives "
                                     f"{self.batch_size // world} images of {kept} tokens{masked} per process, not "
                                     f"a whole number of routing groups of {cfg.group_size}")

    def check_memory(self, cfg: ModelConfig, world: int) -> None:
        """Refuse a model whose training state cannot fit before allocating it (`--model experts=100000` was
        killed by the kernel a minute in, without a word): 20 bytes a parameter (float32 weights, gradients, the
        optimizer's square average and momentum, the EMA copy), sharded over the processes under --fsdp, against
        this machine's memory (the CPU's processes share it) or the GPU's. Activations come on top; a batch
        whose residual stream alone (what every block keeps for the backward pass) cannot fit is refused too."""
        from ecviz.model import count_params

        params = count_params(cfg)["total"]
        each = params * (20 if self.momentum else 16) / (world if self.fsdp else 1)  # no momentum: no buffer
        # a floor for the batch: the residual stream every block keeps for the backward pass, float32
        # (--batch-size 1000000000 ran out of memory in the loader, with a traceback)
        batch = self.batch_size // world * self.kept_tokens(cfg) * cfg.width * cfg.depth * 4
        device = dist.resolve_device(self.device)
        if device.type == "cuda":
            have, where, need, here = torch.cuda.get_device_properties(device).total_memory, f"{device}'s", each, 1
        elif (have := host_memory()) is not None:
            here = dist.ranks().local_world  # the processes on this machine share its memory
            where, need = "this machine's", each * here
        else:
            return
        if batch * here > have:
            raise UsageError(f"--batch-size {self.batch_size}: its activations alone need over "
                             f"{batch / 2**30:,.0f} GiB per process, more than {where} {have / 2**30:,.0f} GiB; "
                             "choose a smaller batch")
        if need > have:
            raise UsageError(f"{self.preset}: {params / 1e6:,.0f}M parameters need about {need / 2**30:,.0f} GiB to "
                             f"train (weights, gradients, optimizer state and EMA), more than {where} "
                             f"{have / 2**30:,.0f} GiB; choose a smaller model" +
                             ("" if self.fsdp or world == 1 else ", or shard it with --fsdp"))


# What the weights mean: an --init checkpoint must agree on these, or its weights (the same names and shapes: EC and
# TC routers, two text encoders or codecs of one width) would start another model silently. Others may change for
# fine-tuning: routing groups and capacities, losses, text_attend, text_pos (starts at zero), inference settings.
SAME_ON_INIT = ("routing", "text_encoder", "codec", "null_text")


def check_init_config(path: str, cfg: ModelConfig) -> None:
    """UsageError naming the first SAME_ON_INIT field in which --init's checkpoint differs from this run's model."""
    from ecviz.checkpoint import read_checkpoint

    theirs = read_checkpoint(path).config
    for key in SAME_ON_INIT:
        if getattr(theirs, key) != getattr(cfg, key):
            raise UsageError(f"--init {path}: its model has {key} {getattr(theirs, key)!r}, this run's "
                             f"{getattr(cfg, key)!r}; use a checkpoint of the same preset and --model overrides")


# ---- data --------------------------------------------------------------------------------------------------
MAX_WEIGHT = 16  # --data shapes:CATEGORY*N: at most this many shares of one category


def shapes_spec(spec: str) -> list[str] | bool | None:
    """--data 'shapes' -> None (every caption category, uniformly), 'shapes:position,color_attr' -> those
    categories, 'shapes:colors,position*3' -> weighted ones (a category N times in the list: ShapesDataset draws
    each entry of it uniformly, so it gets N shares); any other spec -> False (not Shapes). UsageError for an
    unknown category or a bad weight."""
    from ecviz.data.shapes import CATEGORIES

    name, sep, cats = spec.partition(":")
    if name != "shapes":
        return False
    if not sep:
        return None
    chosen: dict[str, int] = {}
    for item in cats.split(","):
        cat, star, weight = (part.strip() for part in item.partition("*"))
        if cat not in CATEGORIES:
            raise UsageError(f"--data {spec}: unknown Shapes category {cat!r}; use shapes, or shapes:CATEGORY,... "
                             f"(CATEGORY*N for N shares) with categories from {', '.join(CATEGORIES)}")
        if star and not (weight.isascii() and weight.isdigit() and 1 <= int(weight) <= MAX_WEIGHT):
            raise UsageError(f"--data {spec}: weight {weight!r} of {cat} must be a whole number from 1 to "
                             f"{MAX_WEIGHT} (CATEGORY*N)")
        chosen[cat] = int(weight) if star else chosen.get(cat, 1)  # a name given twice still counts once
    return [cat for cat, n in chosen.items() for _ in range(n)]


def load_dataset(spec: str, size: int, seed: int = 0):
    """'shapes' (the synthetic set with ground truth; 'shapes:CAT,CAT' only those caption categories; item i a
    function of (seed, i)) or a folder / WebDataset tar shards of image-text pairs (seed unused)."""
    categories = shapes_spec(spec)
    if categories is not False:
        from ecviz.data.shapes import ShapesDataset

        return ShapesDataset(length=2**40, size=size, seed=seed, categories=categories)
    from ecviz.data.imagetext import load_imagetext

    return load_imagetext(spec, size)


def shapes_cache(settings: TrainConfig, data, start: int, rank: int, progress: bool) -> None:
    """Pre-render the Shapes items of steps [start, settings.steps) into settings.data_cache and read them from there
    (the items are the same ones: a run trains bit-identically with or without the cache)."""
    from ecviz.data.shapes_cache import ShapesCache, default_cache_dir

    root = default_cache_dir() if settings.data_cache == "auto" else Path(settings.data_cache)
    cache = ShapesCache(root, data.seed, data.size, list(data.categories))
    n = settings.batch_size
    data.use_cache(cache.ensure(settings.steps * n, start * n, progress=progress and rank == 0))


class StepBatches(torch.utils.data.Dataset):
    """Item j: the (images (B, C, H, W), captions) of step start + j, this rank's rows of the global batch."""

    def __init__(self, data, settings: TrainConfig, rows: slice, start: int, shuffle: bool):
        self.data, self.settings, self.rows, self.start, self.shuffle = data, settings, rows, start, shuffle

    def __len__(self) -> int:
        return max(0, self.settings.steps - self.start)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, list[str]]:
        settings = self.settings
        idx = batch_indices(self.start + j, settings.batch_size, len(self.data), settings.seed, self.shuffle)[self.rows]
        if hasattr(self.data, "batch"):  # Shapes: vectorised, or read from its cache
            b = self.data.batch(idx, ("image", "caption"))
            return b["image"], b["caption"]
        items = [self.data[int(i)] for i in idx]
        return torch.stack([b["image"] for b in items]), [b["caption"] for b in items]


class Prefetch:
    """Iterate `batches` in order, each made ahead of its step: by `workers` DataLoader processes, or (workers=0)
    by one background thread, `depth` batches ahead. close() stops the making."""

    def __init__(self, batches: torch.utils.data.Dataset, workers: int, depth: int = 4):
        self.batches, self.workers, self.depth = batches, workers, depth
        self.stop = threading.Event()
        self.running = None

    def __iter__(self):
        self.running = self.make()
        return self.running

    def make(self):
        if self.workers > 0:
            yield from torch.utils.data.DataLoader(self.batches, batch_size=None, num_workers=self.workers,
                                                   prefetch_factor=self.depth)
            return
        q: queue.Queue = queue.Queue(self.depth)

        def put(entry) -> bool:
            while not self.stop.is_set():
                try:
                    q.put(entry, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def make() -> None:
            try:
                for j in range(len(self.batches)):
                    if not put((self.batches[j], None)):
                        return
            except BaseException as e:  # handed to the training loop, which raises it
                put((None, e))

        threading.Thread(target=make, daemon=True, name="ecviz-batches").start()
        for _ in range(len(self.batches)):
            batch, err = q.get()
            if err is not None:
                raise err
            yield batch

    def close(self) -> None:
        self.stop.set()
        if self.running is not None:
            self.running.close()  # a DataLoader's workers stop with its iterator


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(step: int, batch: int, n: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """Dataset indices of a step's global batch, a pure function of step: epochs of seeded permutations, or
    (shuffle=False, for procedural data whose every index is a fresh sample) the indices in order."""
    pos = np.arange(step * batch, (step + 1) * batch)
    if not shuffle:
        return pos % n
    epochs = pos // n
    out = np.empty(batch, np.int64)
    for e in np.unique(epochs):
        out[epochs == e] = epoch_order(seed, int(e), n)[pos[epochs == e] % n]
    return out


class TextCache:
    """Frozen text embeddings by caption, the most recent `size` kept: Shapes captions repeat, so the encoder
    need not run twice on one; on real data, where they rarely do, memory stays bounded. With a `TextTable`
    (precomputed embeddings of the same encoder), its captions are read from the table and the encoder is
    loaded only for a caption the table lacks: a run whose captions it all holds never loads it."""

    def __init__(self, spec: str, max_len: int, size: int = 4096, table: TextTable | None = None):
        if table is not None:
            table.check_for(spec, max_len)
        self.spec, self.max_len, self.size, self.table = spec, max_len, size, table
        self._encoder = None if table is not None else load_text_encoder(spec, max_len)
        self.cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = load_text_encoder(self.spec, self.max_len)
        return self._encoder

    @property
    def dim(self) -> int:
        """d_y, the width of the embeddings."""
        return self.table.dim if self.table is not None else self.encoder.dim

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(y (B, max_len, d_y), mask (B, max_len))."""
        table = self.table if self.table is not None else ()
        new = sorted({c for c in captions if c not in self.cache and c not in table})
        if new:
            tb = self.encoder.encode(new)
            emb, mask = pad_text(tb.emb, tb.mask, self.max_len)
            for i, c in enumerate(new):
                self.cache[c] = (emb[i].clone(), mask[i].clone())  # clones: an entry must not pin its batch
        rows = [self.table.lookup(c) if c in table else self.cache[c] for c in captions]
        for c in captions:
            if c in self.cache:
                self.cache.move_to_end(c)
        while len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


# ---- one step ----------------------------------------------------------------------------------------------
@dataclass
class StepDraws:
    """Every random draw of a step, for the global batch (or, after `part`, a rank's slice of it)."""

    noise: torch.Tensor  # (B, C, H, W)
    t: torch.Tensor  # (B,)
    drop_text: torch.Tensor  # (B,) bool
    keep: torch.Tensor | None  # (B, S') sorted kept token indices

    def part(self, rows: slice) -> StepDraws:
        return StepDraws(self.noise[rows], self.t[rows], self.drop_text[rows],
                         None if self.keep is None else self.keep[rows])

    def to(self, device: torch.device) -> StepDraws:
        """Drawn on the CPU (the same on every device), used where the model is."""
        return StepDraws(self.noise.to(device), self.t.to(device), self.drop_text.to(device),
                         None if self.keep is None else self.keep.to(device))


def draws(settings: TrainConfig, cfg: ModelConfig, step: int, batch: int) -> StepDraws:
    g = torch.Generator().manual_seed(sample_seed(settings.seed, step))
    noise = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = sample_timesteps(batch, settings.t_mu, settings.t_sigma, generator=g)
    drop = torch.rand(batch, generator=g) < settings.text_dropout
    keep = None
    if settings.masked(step):
        keep = torch.rand(batch, cfg.tokens, generator=g).argsort(-1)[:, : settings.kept_tokens(cfg)].sort(-1).values
    return StepDraws(noise, t, drop, keep)


def training_loss(model: DiT, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor, d: StepDraws,
                  forward=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(flow loss, auxiliary loss) of one batch: velocity regression on the (kept) patch tokens.

    forward: what runs the model (its DDP wrapper); default the model itself.
    """
    forward = forward or model
    x_t = interpolate(x, d.noise, d.t)
    target = model.patchify(velocity(x, d.noise))  # (B, S, p²C)
    pred = forward(x_t, d.t, y, y_mask, keep=d.keep, drop_text=d.drop_text)
    if d.keep is None:
        pred = model.patchify(pred)
    else:
        target = target.gather(1, d.keep[..., None].expand(-1, -1, target.shape[-1]))
    return flow_loss(pred, target), model.aux_loss()


def lr_at(settings: TrainConfig, step: int) -> float:
    """Linear warm-up to settings.lr, then constant or cosine decay to lr_min_ratio·lr at the last step."""
    if step < settings.warmup or settings.lr_decay == "constant":
        return settings.lr * min(1.0, (step + 1) / max(1, settings.warmup))
    frac = (step - settings.warmup) / max(1, settings.steps - 1 - settings.warmup)
    low = settings.lr_min_ratio
    return settings.lr * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def parse_model_overrides(spec: str | None) -> dict:
    """"width=96,depth=8" -> {"width": 96, "depth": 8}, typed as ModelConfig's fields; UsageError otherwise."""
    import dataclasses

    from ecviz.errors import UsageError

    if not spec:
        return {}
    types = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    out = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in types:
            raise UsageError(f"--model {item!r}: expected KEY=VALUE with KEY a model config field "
                             f"({', '.join(sorted(types))})")
        kind = str(types[key])
        try:
            if "bool" in kind:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                out[key] = value.lower() in ("true", "1")
            elif "int" in kind and "float" not in kind:
                out[key] = int(value)
            elif "float" in kind:
                out[key] = float(value)
            else:
                out[key] = value
        except ValueError:
            raise UsageError(f"--model {key}={value}: not a valid {kind}") from None
    return out


# ---- distributed -------------------------------------------------------------------------------------------
def wrap(model: DiT, settings: TrainConfig, world: int) -> torch.nn.Module:
    """What runs the forward: the model, DDP over it, or (settings.fsdp) the model itself, sharded in place by
    FSDP2 block by block (parameters, gradients and optimizer state then live as DTensor shards)."""
    if world == 1:
        return model
    if settings.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    return torch.nn.parallel.DistributedDataParallel(model)


def full(v: torch.Tensor) -> torch.Tensor:
    """A tensor whole: FSDP's DTensor shards gathered (a collective: every rank must call it)."""
    return v.full_tensor() if hasattr(v, "full_tensor") else v


def shard_like(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out as `like` is (sharded where `like` is an FSDP DTensor)."""
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(v, like.device_mesh, like.placements)
    return v


# ---- state ---------------------------------------------------------------------------------------------------
def make_optimizer(model: torch.nn.Module, settings: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.RMSprop(params, lr=settings.lr, alpha=settings.rms_alpha, momentum=settings.momentum, eps=1e-8)


def save_state(out: Path, model: DiT, ema: dict[str, torch.Tensor], opt: torch.optim.Optimizer, step: int,
               settings: TrainConfig, command: str, write: bool = True, init_from: dict | None = None,
               data: dict | None = None) -> None:
    """out/checkpoint, swapped in whole: model.safetensors holds the EMA weights (what sampling uses),
    train_state.safetensors the raw weights and optimizer state that resuming needs; config.json's meta the step,
    the command, the settings, for a run started with --init `init_from` (`init_weights`) and for an image-text
    set the `data` identity (`data_identity`). Every rank calls it (gathering FSDP shards is collective); only the
    one with write=True writes."""
    names = {id(p): n for n, p in model.named_parameters()}
    weights = {f"model.{k}": full(v) for k, v in model.state_dict().items()}  # gathering is collective
    weights |= {f"opt.{names[id(p)]}.{k}": full(v) for p, st in opt.state.items() for k, v in st.items()}
    ema_full = {k: full(v) for k, v in ema.items()}
    if not write:
        return
    tensors = {k: v.detach().cpu().reshape(-1) if k.startswith("opt.") and v.dim() == 0 else
               v.detach().cpu().contiguous() for k, v in weights.items()}  # optimizer steps: 0-d, saved as (1,)
    # the --init the run started from, as its first command gave it: a resume may name it otherwise (same_path)
    config = asdict(settings) | ({"init": init_from["path"]} if init_from else {})
    meta = {"step": str(step), "train_config": json.dumps(config)}

    def write_dir(tmp: Path) -> None:  # atomic_write: safetensors alone would create the file 0600, not by umask
        write_safetensors(tmp / TRAIN_STATE, tensors, meta)
        save_checkpoint(model, tmp, preset=settings.preset, state=ema_full,
                        meta={"step": step, "command": command, "train_config": config, "weights": "ema"}
                        | ({"init_from": init_from} if init_from else {}) | ({"data": data} if data else {}))

    atomic_dir(out / "checkpoint", write_dir)


# What a step computes: a resume that changed one would not continue the run it names, but train another from its
# weights without saying so (--init does that openly). --steps may change (a run is extended so), and with it
# where a cosine decay or --unmask-last ends; the device, format, loader, sharding and logging settings may too.
SAME_ON_RESUME = ("data", "batch_size", "lr", "warmup", "momentum", "rms_alpha", "t_mu", "t_sigma", "text_dropout",
                  "mask_ratio", "ema", "grad_clip", "seed", "data_seed", "image_size", "lr_decay", "lr_min_ratio")


def check_same_run(ck: Path, saved: dict, settings: TrainConfig) -> None:
    """CheckpointError naming the first SAME_ON_RESUME setting that differs from the run's (keys a checkpoint
    written before them lacks are not compared)."""
    for key in SAME_ON_RESUME:
        if key == "data" and isinstance(saved.get(key), str) and same_path(saved[key], settings.data):
            continue  # a folder or shard named by another path: the same data (check_same_data compares its items)
        if key in saved and saved[key] != getattr(settings, key):
            flag = "--" + key.replace("_", "-")
            raise CheckpointError(f"cannot resume {ck}: the run was trained with {flag} {saved[key]!r}, this command "
                                  f"says {getattr(settings, key)!r}; a resume continues the same run (repeat its "
                                  "settings, change --steps only), or start another with --init")


def data_identity(data) -> dict | None:
    """Which items an image-text set holds (`identity`: their number and keys), which its checkpoints record and
    a resume checks; None for Shapes, whose items --data and --data-seed name (SAME_ON_RESUME)."""
    return data.identity() if hasattr(data, "identity") else None


def check_same_data(ck: Path, saved: dict | None, now: dict | None, settings: TrainConfig) -> None:
    """CheckpointError if --data now holds other items than the run trained on (the shuffled order of every later
    epoch, and which image each step reads, would change under the resumed half without a word)."""
    if saved is None or now is None or saved == now:
        return
    what = (f"{now['items']} image-caption pairs, the run trained on {saved['items']}" if now["items"] !=
            saved["items"] else f"{now['items']} image-caption pairs, as many as the run trained on, but others")
    raise CheckpointError(f"cannot resume {ck}: --data {settings.data} now holds {what}; a resume continues the "
                          "same run on the same images (restore them), or start another with --init")


def load_state(out: Path, model: DiT, opt: torch.optim.Optimizer, settings: TrainConfig,
               data: dict | None = None) -> tuple[int, dict, dict | None]:
    """Restore model, optimizer and EMA from out/checkpoint (sharded like the model), checking the run's data
    against the checkpoint's (`data`: this run's `data_identity`); returns (step, ema, init_from: what the run's
    weights started from, as its checkpoint records it)."""
    ck = out / "checkpoint"
    info = read_checkpoint(ck)
    if info.preset != settings.preset or info.config != model.cfg:
        raise CheckpointError(f"cannot resume from {ck}: it is a {info.preset} checkpoint, this run trains "
                              f"{settings.preset}" + ("" if info.preset != settings.preset else " with another config"))
    if not (ck / TRAIN_STATE).is_file():
        raise CheckpointError(f"cannot resume from {ck}: {TRAIN_STATE} is missing")
    check_same_run(ck, info.meta.get("train_config") or {}, settings)
    check_same_data(ck, info.meta.get("data"), data, settings)
    step = saved_step(ck, info.meta)
    if step > settings.steps:  # would train nothing, and the last probe would file this model under an earlier
        # step, cutting the probe's later rows
        raise CheckpointError(f"cannot resume {ck}: it is at step {step}, past --steps {settings.steps}; give "
                              f"--steps {step} or more")
    tensors, ema = read_weights(ck / TRAIN_STATE), read_weights(ck / "model.safetensors")
    like = model.state_dict()
    check_resumed(ck, info, like, tensors, ema, step)  # before anything is loaded, or metrics trimmed to the step
    model.load_state_dict({k: shard_like(tensors[f"model.{k}"].to(v.device), v) for k, v in like.items()})
    for n, p in model.named_parameters():
        prefix = f"opt.{n}."
        st = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        if st:
            bad = next((k for k, v in st.items() if k != "step" and v.shape != p.shape), None)
            if bad:  # a size-mismatch traceback from deep in the optimizer's first step
                raise CheckpointError(f"cannot resume from {ck}: {TRAIN_STATE}'s {prefix + bad!r} has shape "
                                      f"{tuple(st[bad].shape)}, the parameter's {tuple(p.shape)} (a damaged file); "
                                      f"{RESUME_REMEDY}")
            opt.state[p] = {k: v.reshape(()) if k == "step" else shard_like(v.to(p.device), p)
                            for k, v in st.items()}
    return step, {k: shard_like(ema[k].to(v.device), v) for k, v in like.items()}, info.meta.get("init_from")


def saved_step(ck: Path, meta: dict) -> int:
    """The step a checkpoint was saved at (its config.json's meta), or a CheckpointError: a damaged one was an
    int() traceback, and a negative one trimmed the run's metrics to nothing before failing."""
    step = meta.get("step")
    if type(step) is not int or step < 0:
        raise CheckpointError(f"cannot resume from {ck}: its config.json's meta.step is {json.dumps(step)}, not a "
                              f"step count (a damaged file); {RESUME_REMEDY}")
    return step


RESUME_REMEDY = "resume from a copy of the run, or start it again"


def check_resumed(ck: Path, info, like: dict, tensors: dict, ema: dict, step: int) -> None:
    """A CheckpointError unless the checkpoint holds what a resume loads: every weight of the model, by name and
    shape, in train_state (raw) and model.safetensors (EMA), finite, the EMA weights those config.json's digest
    names (a damaged one was loaded and written back with a fresh digest, silently), and train_state saved at
    the step config.json says."""
    from ecviz.checkpoint import check_weights

    for file, prefix, found in ((TRAIN_STATE, "model.", tensors), ("model.safetensors", "", ema)):
        for k, v in like.items():
            got = found.get(prefix + k)
            problem = ("is missing" if got is None else
                       f"has shape {tuple(got.shape)}, the model's {tuple(v.shape)}" if got.shape != v.shape else
                       "holds NaN or infinite values" if prefix and got.is_floating_point() and
                       not torch.isfinite(got).all() else None)  # the EMA's: check_weights, below
            if problem:
                raise CheckpointError(f"cannot resume from {ck}: {file}'s {k!r} {problem} (a damaged file); "
                                      f"{RESUME_REMEDY}")
    check_weights(info, ema)
    with safe_open(ck / TRAIN_STATE, framework="pt") as f:
        saved = (f.metadata() or {}).get("step")
    if saved not in (None, str(step)):
        raise CheckpointError(f"cannot resume from {ck}: {TRAIN_STATE} was saved at step {saved}, its config.json "
                              f"says {step} (files of two saves); {RESUME_REMEDY}")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file of the checkpoint to resume from; an unreadable one (truncated by a full disk) is one
    CheckpointError, not safetensors' traceback."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot resume from {path.parent}: {path.name} is unreadable ({e}); "
                              f"{RESUME_REMEDY}") from None


@torch.no_grad()
def update_ema(ema: dict[str, torch.Tensor], model: DiT, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·weights, for every floating tensor at once (two multi-tensor kernels, not
    two per tensor: a small model's step on a GPU is bound by kernel launches); other tensors copied."""
    state = model.state_dict()  # parameters only (pos_embed is not persistent): under FSDP all DTensors, which
    floats = [k for k, v in state.items() if v.dtype.is_floating_point]  # one foreach call must not mix with
    if floats:  # plain tensors
        averaged = [ema[k] for k in floats]
        torch._foreach_mul_(averaged, decay)
        torch._foreach_add_(averaged, [state[k].detach() for k in floats], alpha=1 - decay)
    for k, v in state.items():
        if not v.dtype.is_floating_point:
            ema[k].copy_(v)


def keep_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint so the log reads as one uninterrupted run."""
    if not path.exists():
        return
    from ecviz.plots.training import parse_metrics_line

    text = path.read_text(errors="replace")  # bytes that are not text: a line no row parses from, dropped
    rows = [(line, parse_metrics_line(line)) for line in text.splitlines()]
    lines = [line for line, row in rows if row and row["step"] <= step]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in lines)))


# ---- the loop --------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One training run's parts, as train() sets them up step by step."""

    settings: TrainConfig
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    cfg: ModelConfig
    codec: object
    texts: TextCache
    out: Path
    data: object
    shuffle: bool
    command: str
    data_id: dict | None = None  # which items an image-text set holds (data_identity): saved, and checked on resume
    model: DiT | None = None
    forward: torch.nn.Module | None = None
    opt: torch.optim.Optimizer | None = None
    ema: dict | None = None
    init_from: dict | None = None  # what --init started the weights from (init_weights)
    start: int = 0
    rows: slice | None = None
    probe: object = None
    bar: object = None

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"


def train(settings: TrainConfig, command: str | None = None, resume: bool = False, progress: bool = True) -> dict:
    """Train (or resume) a model; returns the last metrics. Runs alone or under torchrun (DDP or FSDP). The run
    directory is written under its writer lock (ecviz.lock), taken once every input is checked (a refused input
    leaves no file): from then on a second run on the directory is refused."""
    run = prepare(settings, command, resume, progress)
    dist.start(run.device)  # several processes: join the process group (before the lock, which every rank agrees on)
    with writing(run.out, run.command):
        check_run_dir(run.out, resume)  # again, under the lock: what it finds cannot change until the run ends
        if run.rank == 0:  # leftovers of saves killed before this run, which owns out/checkpoint from here on
            remove_stale_temps(run.out / "checkpoint", before=time.time())
        return run_steps(run, resume, progress)


def run_steps(run: Run, resume: bool, progress: bool) -> dict:
    """Build the model (restored on resume), open the outputs and train to settings.steps; returns the last metrics."""
    settings = run.settings
    build(run, resume)
    open_outputs(run, progress)
    batches = StepBatches(run.data, settings, run.rows, run.start, run.shuffle)
    loader = Prefetch(batches, loader_workers(settings, run.world))
    last, clock = {}, StepClock()
    try:
        for step, (images, captions) in zip(range(run.start, settings.steps), loader, strict=True):
            if run.probe is not None and step % settings.probe_every == 0:
                run.probe.record(run.model, step)
            loss, aux, grad_norm = train_step(run, step, images, captions)
            clock.steps += 1
            log = (step + 1) % settings.log_every == 0 or step + 1 == settings.steps
            if log:  # reading values syncs the device (and, data-parallel, the ranks): only when they are logged
                last = metrics_row(run, step, loss, aux, grad_norm, clock)
            after_step(run, step, last, log)
    finally:
        loader.close()
    if run.probe is not None and settings.steps % settings.probe_every == 0:
        run.probe.record(run.model, settings.steps)
    if run.bar is not None:
        run.bar.close()
    dist.finish()
    return last


def prepare(settings: TrainConfig, command: str | None, resume: bool, progress: bool = False) -> Run:
    """Check the settings (a resume's against its checkpoint's), then load what the run reads (codec, text
    encoder, data: every image opened once) and check its directory; nothing is written yet."""
    rank, world = dist.ranks().rank, dist.ranks().world  # under torchrun; 0 of 1 alone
    settings.check(world, resume)  # before loading anything
    device = dist.resolve_device(settings.device)  # cuda: this rank's GPU, cuda:LOCAL_RANK
    dtype = dist.resolve_dtype(settings.dtype, device)
    codec_spec, encoder, text_len = settings.encoders()
    codec = load_codec(codec_spec)
    table = TextTable.load(settings.text_table) if settings.text_table else None
    texts = TextCache(encoder, text_len, table=table)
    cfg = settings.model_config(codec, texts.dim)
    settings.validate(cfg, world, resume)
    codec.to(device)
    out = Path(settings.out)
    check_run_dir(out, resume, recover=False)  # only a look: a run may be writing there (refused once locked)
    if resume and (out / "checkpoint").is_dir():  # before the data is read and checked image by image (an hour
        # for a million images); load_state checks the rest (and a checkpoint a killed save left half swapped)
        check_same_run(out / "checkpoint", read_checkpoint(out / "checkpoint").meta.get("train_config") or {},
                       settings)
    data = load_dataset(settings.data, cfg.input_size * codec.downsample, settings.data_seed)
    if hasattr(data, "verify") and rank == 0:
        data.verify(progress=progress)
    if getattr(data, "skipped_no_caption", 0) and rank == 0:
        n, shown = data.skipped_no_caption, ", ".join(data.skipped_examples)
        print(f"skipped {n} image{'s' if n > 1 else ''} without a caption: {shown}" + (", ..." if n > len(
            data.skipped_examples) else ""), file=sys.stderr)
    return Run(settings, rank, world, device, dtype, cfg, codec, texts, out, data,
               shuffle=not getattr(data, "procedural", False),
               command=command or "ecviz " + shlex.join(sys.argv[1:]), data_id=data_identity(data))


RUN_FILES = {"checkpoint", "metrics.jsonl", "loss.png", "routing.zarr"}  # and hidden temporaries and swaps


def check_run_dir(out: Path, resume: bool, recover: bool = True) -> None:
    """Refuse a run directory that holds a run unless resuming, or lacks one to resume. With recover (under the
    writer lock only: another run may be in the middle of a swap) first put back a checkpoint swap a killed run
    left half done; without, count such a half-done swap as the checkpoint it is."""
    ck = out / "checkpoint"
    if not resume and out.is_dir():  # a checkpoint, a trace, anyone's folder: a run would overwrite its files
        other = sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES and not p.name.startswith("."))
        if other:
            raise UsageError(f"{out} holds {other[0]!r}, which is not an ecviz train run's: use another --out")
    if recover:
        recover_dir(ck)
    held = ck.is_dir() or (not recover and any(ck.with_name(f".{ck.name}.{end}").is_dir() for end in ("new", "old")))
    if not resume and (held or ck.exists()):
        raise UsageError(f"{out} already holds a run: use --resume to continue it or another --out")
    if resume and not held:
        raise UsageError(f"cannot resume: {ck} does not exist")


def build(run: Run, resume: bool) -> None:
    """The model (seeded, initialised on the CPU: the same weights on any device; --init's where it gives them),
    its data-parallel wrapper, optimizer and EMA, restored from the checkpoint on resume; this rank's rows of each
    batch."""
    settings = run.settings
    torch.manual_seed(settings.seed)
    run.model = DiT(run.cfg).train()
    if settings.init and not resume:
        run.init_from = init_weights(run.model, settings.init)  # before the wrapper shards anything
    run.model.to(run.device)
    run.forward = wrap(run.model, settings, run.world)
    run.opt = make_optimizer(run.model, settings)
    run.ema = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    if resume:
        run.start, run.ema, run.init_from = load_state(run.out, run.model, run.opt, settings, run.data_id)
    run.rows = slice(run.rank * settings.batch_size // run.world, (run.rank + 1) * settings.batch_size // run.world)


def init_weights(model: DiT, path: str) -> dict:
    """--init: start from a checkpoint's weights (the EMA ones a run saves), to fine-tune it or train it on with
    new data; every weight must match the model's by name and shape, except those that start as identity (the
    model's `starts_as_identity`, e.g. `text_pos`), which a checkpoint trained without them lacks. Returns what
    the run's checkpoints record as `init_from`: that checkpoint's path (as given: a later checkpoint may take its
    place there), the sha256 of its weights file (as traces record theirs), its tensors' `weights_digest` (None
    for checkpoints written before it existed) and its meta (its command and settings, and its own `init_from`
    if it too was trained on from another), so that a model trained in stages names every stage's command, the
    first innermost, and the weights each started from."""
    from ecviz.checkpoint import load_checkpoint

    try:
        source, info = load_checkpoint(path)
    except CheckpointError as e:
        raise UsageError(f"--init: {e}") from None
    theirs, ours = source.state_dict(), model.state_dict()
    problems = [f"{k!r} is not in this model" if k not in ours else
                f"{k!r} has shape {tuple(v.shape)}, this model's {tuple(ours[k].shape)}"
                for k, v in theirs.items() if k not in ours or ours[k].shape != v.shape]
    added = model.starts_as_identity()  # e.g. text_pos: kept at its zero start
    problems += [f"this model's {k!r} is missing from it" for k in ours if k not in theirs and k not in added]
    if problems:
        raise UsageError(f"--init {path}: its weights do not fit this model ({problems[0]}); use a checkpoint of "
                         "the same preset and --model overrides")
    model.load_state_dict(theirs, strict=False)
    return {"path": str(path), "sha256": info.sha256, "digest": info.digest, "meta": info.meta}


def open_outputs(run: Run, progress: bool) -> None:
    """The Shapes cache, the run directory, the routing probe, the metrics (trimmed to the resumed step) and the
    progress bar."""
    settings = run.settings
    if settings.data_cache:  # first: a cache refused leaves the run directory as it was (it writes elsewhere)
        shapes_cache(settings, run.data, run.start, run.rank, progress)
    run.out.mkdir(parents=True, exist_ok=True)
    if run.cfg.sparse:  # then: a resumed run refuses a probe store not its own before it changes any file
        from ecviz.trace.probe import Probe

        run.probe = Probe(run.cfg, run.data, run.texts, run.out / "routing.zarr", settings.seed, write=run.rank == 0,
                          codec=run.codec, fresh=run.start == 0)
    if run.rank == 0:
        keep_metrics(run.metrics_path, run.start)
    if progress and run.rank == 0:

        run.bar = progress_bar(settings.steps, "step", "train", initial=run.start)


def loader_workers(settings: TrainConfig, world: int) -> int:
    """Loader processes: as set, else none for a cache (read faster than a process hands batches over)."""
    if settings.data_workers is not None:
        return settings.data_workers
    return 0 if settings.data_cache else min(8, max(1, (os.cpu_count() or 1) // world - 1))


def train_step(run: Run, step: int, images: torch.Tensor, captions: list[str]):
    """One optimizer step on this rank's rows: encode, flow loss (+ aux) under autocast, clip, step, EMA.
    Returns (loss, aux, grad_norm) as tensors (not synced)."""
    settings, device = run.settings, run.device
    with torch.no_grad():
        x = run.codec.encode(images.to(device))  # (B, C, H, W)
    y, y_mask = (v.to(device) for v in run.texts(captions))
    d = draws(settings, run.cfg, step, settings.batch_size).part(run.rows).to(device)
    for group in run.opt.param_groups:
        group["lr"] = lr_at(settings, step)
    with dist.autocast(device, run.dtype):  # bf16 on CUDA by default; the router stays float32
        loss, aux = training_loss(run.model, x, y, y_mask, d, run.forward)
    run.opt.zero_grad(set_to_none=True)
    (loss + aux).backward()
    grad_norm = full(torch.nn.utils.clip_grad_norm_(run.model.parameters(), settings.grad_clip))
    run.opt.step()
    update_ema(run.ema, run.model, min(settings.ema, (1 + step) / (10 + step)))
    return loss, aux, grad_norm


class StepClock:
    """Wall time since the start, and steps since the last metrics row (for steps_per_s)."""

    def __init__(self):
        self.t0 = self.window_start = time.perf_counter()
        self.steps = 0


def metrics_row(run: Run, step: int, loss, aux, grad_norm, clock: StepClock) -> dict:
    """The metrics row after `step` (means over the ranks), and the clock's window restarted."""
    loss_v, aux_v = loss.item(), aux.item()
    if run.world > 1:
        loss_v, aux_v = dist.all_mean(loss_v), dist.all_mean(aux_v)
    now = time.perf_counter()
    row = {"step": step + 1, "loss": loss_v, "aux_loss": aux_v, "lr": lr_at(run.settings, step),
           "grad_norm": grad_norm.item(), "time": now - clock.t0,
           "steps_per_s": clock.steps / (now - clock.window_start)}
    if run.cfg.routing == "tc":
        from ecviz.trace.probe import moe_drop_rate

        moes = run.model.moe_layers()
        row["tc_drop_rate"] = sum(map(moe_drop_rate, moes)) / len(moes)
    clock.window_start, clock.steps = time.perf_counter(), 0
    return row


def after_step(run: Run, step: int, last: dict, log: bool) -> None:
    """On rank 0 the metrics row, then the checkpoint when due (every rank takes part), then on rank 0 the loss
    plot and the bar. The row goes first: killed between the two, a resumed run trims it (`keep_metrics`) and
    logs the step again; the other way round, the new checkpoint would outlive a row never written."""
    settings = run.settings
    due = (step + 1) % settings.ckpt_every == 0 or step + 1 == settings.steps
    if log and run.rank == 0:
        with open(run.metrics_path, "a") as f:
            f.write(json.dumps(last) + "\n")
    if due:
        save_state(run.out, run.model, run.ema, run.opt, step + 1, settings, run.command, write=run.rank == 0,
                   init_from=run.init_from, data=run.data_id)
    if run.rank != 0:
        return
    if due and run.metrics_path.exists():
        from ecviz.plots import loss_curve  # (no rows yet when checkpoints come before the first log)

        loss_curve([run.metrics_path], run.out / "loss.png", title=settings.preset)
    if run.bar is not None:
        if log:
            run.bar.set_postfix(loss=f"{last['loss']:.4f}", refresh=False)
        run.bar.update(1)
