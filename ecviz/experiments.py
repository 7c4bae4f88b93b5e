"""Experiments that re-run a checkpoint to ask causal questions of its routing (they need the model; analyses
of stored traces do not).

- `ablate_words` (`ecviz ablate-words`): re-sample each prompt with one word at a time masked out of the text
  (the encoder still reads the whole prompt; the DiT's cross-attention cannot see the word's tokens), with the
  same noise, and measure how much the allocation maps and the image change: a causal word importance, set
  against the attention-based one of `ecviz.analysis.text_importance`.
- `probe_groups` (`ecviz probe-groups`): route the same samples alone, with their usual routing-group partners
  and with other partners (same noise), and measure which (token, expert) choices and pixels change. Expert
  choice ranks tokens against the whole group, so an image's compute depends on its company.
- `experts_removed`: a context manager under which chosen experts add nothing (their gates zeroed through
  `hook_gate` edits, `ecviz.hooks`): sample or trace inside it to see what an expert contributes.
- `tokens_skipped`: a context manager under which expert choice gives chosen tokens (say, an image's objects) no
  expert compute, or, as a control, takes as many slots from the other tokens: does the compute that routing
  puts on a region matter, more than the same compute elsewhere? `slots_taken` counts, without editing, the
  slots such tokens take. (notebooks/05_interventions.ipynb)
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

import ecviz.defaults as D
from ecviz.errors import UsageError
from ecviz.io import recover_dir, remove_stale_temps
from ecviz.lock import writing
from ecviz.progress import progress_bar
from ecviz.trace.ablation import ABLATION_VERSION, open_ablation, write_ablation
from ecviz.validate import check_layers, index_text

__all__ = ["ABLATION_VERSION", "ablate_words", "check_removal", "choices", "experts_removed", "inference_group",
           "open_ablation", "probe_groups", "slots_taken", "tokens_skipped"]


def check_removal(cfg, experts, layers=None, names=("experts", "layers")) -> tuple[list[int], list[int]]:
    """The sorted experts and sparse layers (default: all) that `experts_removed` would take for a model of
    config cfg, or a one-line UsageError naming what cannot be removed (`names`: the options that gave them)."""
    experts = sorted({int(e) for e in experts})
    if not cfg.sparse:
        raise UsageError("a dense model has no experts to remove")
    if not experts or experts[0] < 0 or experts[-1] >= cfg.experts:
        raise UsageError(f"{names[0]} {index_text(experts) or 'nothing'}: name experts 0..{cfg.experts - 1}")
    return experts, check_layers(cfg, layers, names[1])


@contextmanager
def experts_removed(model, experts, layers=None):
    """Within the block, `experts` (expert indices) add nothing in the sparse `layers` (block indices; default:
    every sparse layer): their gates are zeroed by `hook_gate` edits, exactly as if their output weights were
    zero. The router is not edited: an expert-choice expert still takes its top-C tokens where it is removed
    (its capacity is not handed to the others), so what changes there is what those tokens receive; later
    layers and denoising steps route the changed activations as they come. A recorder attached inside sees the
    zeroed gates. Hooks come off on exit, however it is left."""
    from ecviz.hooks import hooks

    experts, layers = check_removal(model.cfg, experts, layers)
    index = torch.tensor(experts)

    def zero(gate: torch.Tensor, name: str) -> torch.Tensor:  # (G, E, C)
        return gate.index_fill(1, index.to(gate.device), 0.0)

    with hooks(model, {f"blocks.{b}.moe.hook_gate": zero for b in layers}, edit=True):
        yield


def _marks(model, tokens, layers, what: str) -> tuple[torch.Tensor, list[int]]:
    """(tokens as an (images, S) bool tensor, the checked layers) for `tokens_skipped` and `slots_taken`."""
    cfg = model.cfg
    if cfg.routing != "ec":
        raise UsageError(f"{what} is for expert choice, and this model routes by {cfg.routing!r}")
    layers = check_layers(cfg, layers)
    tokens = torch.as_tensor(tokens, dtype=torch.bool)
    if tokens.dim() != 2 or tokens.shape[1] != cfg.tokens or not len(tokens):
        raise UsageError(f"tokens has shape {tuple(tokens.shape)}: give (images, {cfg.tokens}) marks, one row per "
                         "image of the batch")
    return tokens, layers


def _marked_slots(tokens: torch.Tensor, moe, index: torch.Tensor, name: str) -> torch.Tensor:
    """(G, E, C) bool: the slots of `index` (hook_dispatch's (G, E, C) token index within the group; -1 empty)
    that took a marked token, the forward's images being the rows of `tokens` repeated (guidance: twice)."""
    G = index.shape[0]
    n_images, extra = divmod(G * moe.current_group_size, len(tokens[0]))
    if extra or n_images % len(tokens):
        raise UsageError(f"{name}: a forward of {G * moe.current_group_size} tokens is not a whole number of repeats "
                         f"of the {len(tokens)} images that tokens marks")
    flat = tokens.to(index.device).repeat(n_images // len(tokens), 1).reshape(G, -1)  # (G, g)
    return flat.gather(1, index.clamp(min=0).reshape(G, -1)).reshape(index.shape) & (index >= 0)


def _count(counts: dict, block: int, **n: int) -> None:
    """Add to the totals and to block's own counts."""
    per = counts["layers"].setdefault(block, dict.fromkeys(n, 0))
    for k, v in n.items():
        counts[k] += v
        per[k] += v


@contextmanager
def tokens_skipped(model, tokens, layers=None, matched: bool = False, seed: int = 0):
    """Within the block, the expert-choice `layers` (block indices; default: every sparse layer) give the tokens
    that `tokens` marks ((n, S) bool: per image, per token) no expert compute: every slot that takes one is
    emptied (-1 in `hook_dispatch`, gate 0), so they keep only their residual there. The rows of `tokens` are
    the images of one forward: a guided forward of 2n images (the conditional then the unconditional ones)
    repeats them, so give the marks of the batch being sampled, not of a whole run. With `matched`, as many
    slots of each routing group are emptied among those that took the *other* tokens (of any expert), drawn at
    random (`seed`): a control that takes as much compute from elsewhere in the same group and forward, on its
    own trajectory (where the other tokens hold fewer slots than that, all of theirs). The router is not edited:
    each expert still ranks every token and emptied capacity is not handed on; later layers and steps route what
    they receive.

    Yields a dict of counts, updated as forwards run: `slots` (every slot seen), `marked` (slots that took a
    marked token) and `emptied` (slots emptied: `marked`, or with `matched` as many as the other tokens allow),
    and the same per block under `layers`. These are counted on the edited run, whose images drift from the
    unedited ones; `slots_taken` counts an unedited run. Hooks come off on exit, however it is left."""
    from ecviz.hooks import hooks

    tokens, layers = _marks(model, tokens, layers, "tokens_skipped")
    counts = {"slots": 0, "marked": 0, "emptied": 0, "layers": {}}
    gen = torch.Generator().manual_seed(seed)

    def skip(block: int):
        moe = model.blocks[block].moe

        def edit(index: torch.Tensor, name: str) -> torch.Tensor:  # (G, E, C) index within the group, -1: empty
            marked = _marked_slots(tokens, moe, index, name)
            drop = marked
            if matched:  # as many of the group's slots that took other tokens, any expert's, drawn at random
                G = index.shape[0]
                others = ((index >= 0) & ~marked).reshape(G, -1)  # (G, E·C)
                key = torch.rand(others.shape, generator=gen).to(index.device).masked_fill(~others, 2.0)
                rank = key.argsort(-1).argsort(-1)  # 0 for the first drawn of the other tokens' slots
                drop = (others & (rank < marked.reshape(G, -1).sum(-1, keepdim=True))).reshape(index.shape)
            _count(counts, block, slots=index.numel(), marked=int(marked.sum()), emptied=int(drop.sum()))
            return index.masked_fill(drop, -1)

        return edit

    with hooks(model, {f"blocks.{b}.moe.hook_dispatch": skip(b) for b in layers}, edit=True):
        yield counts


@contextmanager
def slots_taken(model, tokens, layers=None):
    """Within the block, count (without editing anything) the expert-choice slots that take the tokens `tokens`
    marks, as `tokens_skipped` reads its marks: yields {"slots", "marked", "layers": {block: {"slots",
    "marked"}}}, updated as forwards run. What share of its compute the model gives a region when left alone."""
    from ecviz.hooks import hooks

    tokens, layers = _marks(model, tokens, layers, "slots_taken")
    counts = {"slots": 0, "marked": 0, "layers": {}}

    def look(block: int):
        moe = model.blocks[block].moe
        return lambda index, name: _count(counts, block, slots=index.numel(),
                                          marked=int(_marked_slots(tokens, moe, index, name).sum()))

    with hooks(model, {f"blocks.{b}.moe.hook_dispatch": look(b) for b in layers}):
        yield counts


@contextmanager
def inference_group(model, group_size: int | None):
    """Route at inference in groups of `group_size` tokens for the duration (validated); restores on exit."""
    if group_size is None or not model.cfg.sparse:
        yield
        return
    before = model.cfg
    try:
        model.set_inference_group(group_size)
    except ValueError as e:
        raise UsageError(f"--group-size: {e}") from None
    try:
        yield
    finally:
        model.set_inference_group(before.infer_group)
        model.cfg = before


def choices(rec, images: int, S: int) -> np.ndarray:
    """(images, steps, layers, S, E) bool: which experts took each token, from a finished BatchRecord."""
    d = rec.dispatch  # (G, steps, layers, E, C)
    G, T, L, E, _ = d.shape
    out = np.zeros((T, L, images * S + 1, E), bool)  # last row: empty slots
    flat = np.where(d >= 0, np.take_along_axis(rec.group_tokens[:, None, None, None, :],
                                               np.where(d >= 0, d, 0).reshape(G, 1, 1, 1, -1), -1)
                    .reshape(d.shape), images * S)
    ti = np.broadcast_to(np.arange(T)[None, :, None, None, None], d.shape)
    li = np.broadcast_to(np.arange(L)[None, None, :, None, None], d.shape)
    ei = np.broadcast_to(np.arange(E)[None, None, None, :, None], d.shape)
    out[ti, li, flat, ei] = True
    return out[:, :, :-1].reshape(T, L, images, S, E).transpose(2, 0, 1, 3, 4)


def _check_fits(pipe, steps: int, samples: int, guidance: float, group_size: int, what, kept: int = 0) -> None:
    """A `_run` of `samples` images recording every step and sparse layer, with `kept` bytes of results held
    beside it, must fit in memory: refused before any sampling (`--steps 10000000` ran out of it after)."""
    from ecviz.trace.record import record_bytes
    from ecviz.validate import check_fits

    cfg = pipe.model.cfg
    need = record_bytes(cfg, what, steps, len(cfg.sparse_layers), samples, 2 if guidance != 1.0 else 1, group_size,
                        pipe.image_size)
    check_fits(need + kept, f"recording {steps:,} steps of {samples} images", "take fewer --steps")


def _run(pipe, y, mask, seeds, steps, guidance, layout_samples, group_size, what=("dispatch",)):
    """Sample one batch with the recorder on; returns (images, BatchRecord)."""
    from ecviz.trace.record import BatchLayout, record

    model = pipe.model
    branches = 2 if guidance != 1.0 else 1
    with torch.no_grad(), record(model, what, n_steps=steps) as rec:
        rec.begin(BatchLayout(np.asarray(layout_samples), branches, 0), group_size)
        images = pipe.sample(y, mask, seeds, steps=steps, guidance=guidance)
        batch = rec.end(image=images)
    return images, batch


# ---- word ablation ------------------------------------------------------------------------------------------------
def ablate_words(ckpt, prompts, out, images_per_prompt: int = 1, steps: int = D.STEPS,
                 guidance: float = D.GUIDANCE, seed: int = D.SEED, group_size: int | None = None,
                 limit: int | None = None, overwrite: bool = False, progress: bool = False,
                 capacity_factor: float | None = None) -> Path:
    """Write an ablation store (xarray/Zarr) to `out`; returns its path. See the module docstring.

    Each variant is routed in groups of `group_size` tokens (default: one image per group, so nothing but the
    text changes between an image and its ablations; with larger groups, a prompt's variants share groups),
    each expert taking `capacity_factor`/E of a group's tokens (default: the model's f_c, as trained)."""
    from ecviz.checkpoint import load_checkpoint
    from ecviz.pipeline import Pipeline
    from ecviz.prompts import read_prompts
    from ecviz.validate import check_all, check_output, check_routing, check_store_kind, store_kind

    def refuse_existing() -> None:
        if out.exists() and not overwrite:
            raise UsageError(f"--out {out} exists ({store_kind(out) or 'a directory'}; use --overwrite to replace "
                             "it)")

    started = time.time()
    check_all({"images_per_prompt": images_per_prompt, "steps": steps, "guidance": guidance, "seed": seed,
               "group_size": group_size, "limit": limit, "capacity_factor": capacity_factor})
    out = check_output(out, "--out", "store")
    check_store_kind(out, "--out", "a word-ablation store")
    refuse_existing()
    ps = read_prompts(prompts)
    model, ck = load_checkpoint(ckpt)
    if not model.cfg.sparse:
        raise UsageError(f"{ckpt}: a dense model routes nothing; ablate words of an EC or TC checkpoint")
    if capacity_factor is not None:
        check_routing(model.cfg, capacity_factor=capacity_factor)
        model.set_inference_capacity(capacity_factor)
    pipe = Pipeline.from_model(model)
    cfg = model.cfg
    S, E = cfg.tokens, cfg.experts
    g = group_size or S
    n_prompts = min(len(ps), limit) if limit is not None else len(ps)
    n = n_prompts * images_per_prompt
    per_group = max(1, g // S)
    most = max(cfg.text_len + 1, cfg.group_size // S)  # a prompt's variants at most, or the training group
    if per_group > most:  # every sample would be padded to it (10^8 tokens: hundreds of GB)
        raise UsageError(f"--group-size {g}: routing groups of {per_group} images, more than the {most} a sample's "
                         "variants or the training group fill; use a smaller --group-size")
    V = cfg.text_len + 1 + (-(cfg.text_len + 1) % per_group)  # a sample's variants at most, padded
    _check_fits(pipe, steps, V, guidance, g, ("dispatch", "cross_attn"),
                kept=n * V * steps * len(cfg.sparse_layers) * S)  # every sample's allocation (uint8)
    with inference_group(model, g), writing(out):  # a bad --group-size refused first, before any file; then one
        refuse_existing()  # writer (a second run replaced the first's store silently), and again under the lock
        recover_dir(out)  # a swap killed midway: put the store back, then drop what killed writes left
        remove_stale_temps(out, before=started)
        rows = _ablate_all(pipe, ps.prompts, n, images_per_prompt, seed, steps, guidance, g, per_group, progress)
        ds = _ablation_dataset(rows, cfg)
        ds.attrs.update({"checkpoint": str(ck.path), "steps": steps, "guidance": guidance, "seed": seed,
                         "group_size": g, "capacity_factor": cfg.inference_capacity_factor, "experts": E,
                         "prompt_file": str(ps.path), "images_per_prompt": images_per_prompt})
        return write_ablation(ds, out)


def _ablate_all(pipe, prompts: list[str], n: int, images_per_prompt: int, seed: int, steps: int, guidance: float,
                g: int, per_group: int, progress: bool) -> list[dict]:
    """Every sample's row (`_ablate_sample`), sample i of prompt i // images_per_prompt, with a bar if asked."""
    from ecviz.flow import sample_seed

    bar = progress_bar(n, "sample", "ablate") if progress else None
    rows = []
    for i in range(n):
        p = i // images_per_prompt
        rows.append(_ablate_sample(pipe, prompts[p], p, sample_seed(seed, i), steps, guidance, g, per_group))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return rows


def _ablate_sample(pipe, text: str, p: int, s: int, steps: int, guidance: float, g: int, per_group: int) -> dict:
    """One sample of prompt p: the original and one variant per word with that word masked, same noise s,
    padded with filler copies to whole routing groups of `per_group` images. Returns the row _ablation_dataset
    reads: the variants' allocation (conditional branch), images, the original's cross-attention and words."""
    from ecviz.trace.run import word_arrays

    y, mask, tb = pipe.encode_text([text])
    words = word_arrays([text], tb, tuple(mask.shape), False)
    tw = words["text_word"][0]
    # -1: nothing masked. Words are those the word dimension holds, the first text_len (as in a trace): words
    # without tokens (combining marks, control characters) still count, so a later word's index may lie past it
    variants = [-1, *sorted({int(w) for w in tw if 0 <= w < len(tw)})]
    V = len(variants)
    pad = -V % per_group
    ys = y.expand(V + pad, -1, -1).clone()
    ms = mask.expand(V + pad, -1).clone()
    for v, w in enumerate(variants):
        if w >= 0:
            ms[v, torch.from_numpy(tw == w)] = False
    if ms.sum(-1).min() == 0:
        raise UsageError(f"prompt {p}: masking a word leaves no text token; use prompts of two words or more")
    images, rec = _run(pipe, ys, ms, [s] * (V + pad), steps, guidance, list(range(V)) + [-1] * pad, g,
                       ("dispatch", "cross_attn"))
    arrays, _ = rec.arrays()
    return {"prompt": text, "prompt_index": p, "seed": s, "variants": variants,
            "count": arrays["expert_count"][:V, 0],  # (V, steps, layers, S) conditional branch
            "image": images[:V], "attn": rec.per_sample["cross_attn"][0].astype(np.float32),  # (steps, blocks, S, L)
            "text_word": tw, "words": words["prompt_word"][0]}


def _word_effects(r: dict, W: int, E: int, layers: np.ndarray) -> dict:
    """Per word of one sample (W,): how masking it changed the allocation and the image, and its attention-based
    importance and correlation in the original (NaN for words the prompt does not have)."""
    from ecviz.analysis.common import pearson_rows, row_ranks
    from ecviz.analysis.words import _importance_kernel

    out = {k: np.full(W, np.nan, np.float32) for k in ("alloc_change", "rank_change", "image_change",
                                                        "attn_importance", "attn_correlation")}
    base = r["count"][0].astype(np.float32)  # (T, L, S)
    rb = row_ranks(r["count"][0], E)
    for v, w in enumerate(r["variants"][1:], start=1):
        out["alloc_change"][w] = np.abs(r["count"][v].astype(np.float32) - base).mean() / base.mean()
        out["rank_change"][w] = 1 - np.nanmean(pearson_rows(row_ranks(r["count"][v], E), rb))
        out["image_change"][w] = np.abs(r["image"][v].astype(np.float32) - r["image"][0]).mean() / 255
    onehot = (r["text_word"][:, None] == np.arange(W)).astype(np.float32)  # (L_text, W)
    imp, corr = _importance_kernel(r["attn"][:, layers] @ onehot, r["count"][0], E)  # (T, layers, W)
    with warnings.catch_warnings():  # words without tokens (padding) are all-NaN columns
        warnings.simplefilter("ignore", RuntimeWarning)
        out["attn_importance"], out["attn_correlation"] = np.nanmean(imp, (0, 1)), np.nanmean(corr, (0, 1))
    return out


def _ablation_dataset(rows: list[dict], cfg):
    """The ablation store's Dataset from the per-sample rows (variants padded to the most any sample has)."""
    import xarray as xr

    n, Vmax = len(rows), max(len(r["variants"]) for r in rows)
    T, L = rows[0]["count"].shape[1:3]
    H = rows[0]["image"].shape[1]
    image = np.zeros((n, Vmax, H, H, 3), np.uint8)
    count = np.zeros((n, Vmax, T, L, cfg.tokens), np.uint8)
    variant_word = np.full((n, Vmax), -2, np.int16)  # -1 original, -2 padding
    layers = np.array(cfg.sparse_layers)
    effects = []
    for i, r in enumerate(rows):
        V = len(r["variants"])
        image[i, :V], count[i, :V], variant_word[i, :V] = r["image"], r["count"], r["variants"]
        effects.append(_word_effects(r, cfg.text_len, cfg.experts, layers))
    per_word = {k: (("sample", "word"), np.stack([e[k] for e in effects])) for k in effects[0]}
    return xr.Dataset(
        {"prompt": ("sample", np.array([r["prompt"] for r in rows], dtype=object)),
         "prompt_index": ("sample", np.array([r["prompt_index"] for r in rows], np.int32)),
         "seed": ("sample", np.array([r["seed"] for r in rows], np.int64)),
         "prompt_word": (("sample", "word"), np.stack([r["words"] for r in rows])),
         "variant_word": (("sample", "variant"), variant_word),
         "image": (("sample", "variant", "y", "x", "channel"), image),
         "expert_count": (("sample", "variant", "step", "layer", "token"), count), **per_word},
        coords={"layer": layers, "step": np.arange(T)})


# ---- group dependence -----------------------------------------------------------------------------------------
def partners(order: np.ndarray, per_group: int) -> list[frozenset]:
    """For each sample, the other samples of its routing group when the samples run in `order`, `per_group`
    consecutive ones per group."""
    group = np.empty(len(order), np.int64)
    group[np.asarray(order)] = np.arange(len(order)) // per_group  # group[sample]
    return [frozenset(np.flatnonzero(group == g).tolist()) - {i} for i, g in enumerate(group)]


def derangement(n: int, per_group: int, seed: int) -> np.ndarray:
    """An order of n samples (a multiple of per_group ≥ 2, two groups or more) in which every sample has other
    partners than in 0..n-1: a new group of the same samples in another place would keep them."""
    usual = partners(np.arange(n), per_group)
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        perm = rng.permutation(n)
        if all(a != b for a, b in zip(partners(perm, per_group), usual, strict=True)):
            return perm
    return np.arange(n).reshape(-1, per_group).T.reshape(-1)  # column by column: no group of one row's samples


def probe_groups(ckpt, prompts, limit: int | None = 8, steps: int = D.STEPS, guidance: float = D.GUIDANCE,
                 seed: int = D.SEED,
                 progress: bool = False) -> dict:
    """Route the first `limit` prompts (one image each, sample i's seed as in `ecviz trace`) alone (groups of
    one image), with their usual partners (consecutive samples, as `ecviz trace` batches them) and with other
    partners (a shuffled order), and compare. Returns a summary dict (also per sample)."""
    from ecviz.checkpoint import load_checkpoint
    from ecviz.flow import sample_seed
    from ecviz.pipeline import Pipeline
    from ecviz.prompts import read_prompts
    from ecviz.validate import check_all

    if limit is not None and limit < 2:
        raise UsageError(f"--limit {limit}: must be at least 2 (partners need a second sample)")
    check_all({"steps": steps, "guidance": guidance, "seed": seed})
    ps = read_prompts(prompts)
    model, _ = load_checkpoint(ckpt)
    cfg = model.cfg
    if not cfg.sparse:
        raise UsageError(f"{ckpt}: a dense model has no routing groups; probe an EC or TC checkpoint")
    pipe = Pipeline.from_model(model)
    S = cfg.tokens
    n = min(len(ps), limit) if limit is not None else len(ps)
    per_group = max(1, cfg.infer_group // S)
    if per_group < 2:
        raise UsageError(f"the model's inference routing group ({cfg.infer_group} tokens) holds part of one image: "
                         f"partners cannot matter; nothing to probe")
    n -= n % per_group
    if n < 2 * per_group:  # one group's partners can only be shuffled among themselves: the same partners
        raise UsageError(f"probe-groups needs at least {2 * per_group} prompts (two routing groups of "
                         f"{per_group} images, so that partners can change); {prompts} has {len(ps)}"
                         + (f", of which --limit {limit} takes {min(len(ps), limit)}" if limit is not None
                            and limit < len(ps) else ""))
    texts = [ps.prompts[i] for i in range(n)]
    seeds = [sample_seed(seed, i) for i in range(n)]
    y, mask, _ = pipe.encode_text(texts)
    other = derangement(n, per_group, seed)
    _check_fits(pipe, steps, n, guidance, cfg.infer_group, ("dispatch",),
                kept=3 * n * steps * len(cfg.sparse_layers) * S * cfg.experts)  # each run's choices (bool)

    def run(order, group):
        with inference_group(model, group):
            imgs, rec = _run(pipe, y[order], mask[order], [seeds[i] for i in order], steps, guidance,
                             list(range(n)), group)
        ch = choices(rec, n * (2 if guidance != 1.0 else 1), S)[:n]  # conditional branch
        back = np.argsort(order)
        return imgs[back], ch[back]

    ident = np.arange(n)
    result = {}
    runs = {"alone": run(ident, S), "usual": run(ident, cfg.infer_group), "other": run(other, cfg.infer_group)}
    for a, b in (("alone", "usual"), ("usual", "other"), ("alone", "other")):
        (ia, ca), (ib, cb) = runs[a], runs[b]
        changed = (ca & ~cb).sum((1, 2, 3, 4)) / np.maximum(ca.sum((1, 2, 3, 4)), 1)  # per sample
        pix = np.abs(ia.astype(np.float32) - ib).mean((1, 2, 3)) / 255
        result[f"{a}_vs_{b}"] = {"choices_changed": float(changed.mean()), "image_change": float(pix.mean()),
                                 "per_sample_choices_changed": changed.round(4).tolist()}
    result["samples"] = n
    result["images_per_group"] = per_group
    return result
