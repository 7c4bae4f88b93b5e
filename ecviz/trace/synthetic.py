"""Synthetic traces: valid schema stores with random but consistent routing, for tests and benchmarks.

Every expert takes exactly C distinct tokens of every routing group (expert choice) or every token picks k
experts and is dropped over capacity (token choice), recounted into `expert_count` by the recorder's own code,
with the same group layout `ecviz trace` uses: batches of consecutive samples, the model batch [cond; uncond],
groups of consecutive tokens. Scores are random with a per-token bias, so allocation is heterogeneous.
No model runs, so a PartiPrompts-size trace (1,632 prompts, 50 steps, 14 layers) takes minutes, not days.
Prompts are tokenised one text token per word between two special tokens, so the word variables (`text_word`,
`prompt_word`) are consistent; with `record` including "cross_attn" or "x0", random attention (rows summing to
1 over the text tokens) and random clean-image estimates are written too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ecviz.io import atomic_dir
from ecviz.trace.format import BRANCHES, SCHEMA_VERSION, create_store, jsonable, variables_for, writing
from ecviz.trace.record import expert_counts, members


def ec_dispatch(rng: np.random.Generator, G: int, g: int, E: int, C: int, sharp: float = 1.0) -> tuple:
    """(dispatch (G, E, C) int32 local token indices, gate (G, E, C) float32): expert e takes the C tokens of
    highest score bias[token] + noise[e, token] in its group (the bias makes some tokens popular)."""
    bias = rng.standard_normal((G, 1, g)) * sharp
    score = bias + rng.standard_normal((G, E, g))
    top = np.argpartition(-score, C - 1, axis=-1)[..., :C]  # (G, E, C), unordered
    val = np.take_along_axis(score, top, -1)
    order = np.argsort(-val, axis=-1)
    idx = np.take_along_axis(top, order, -1).astype(np.int32)
    gate = 1 / (1 + np.exp(-np.take_along_axis(val, order, -1)))
    return idx, gate.astype(np.float32)


def write_synthetic_trace(path, samples: int = 16, steps: int = 4, layers: int = 2, experts: int = 4,
                          grid: int = 4, group_size: int = 32, capacity_factor: float = 2.0, batch: int = 4,
                          branches: int = 2, routing: str = "ec", top_k: int = 2, image_size: int = 16,
                          text_len: int = 8, seed: int = 0, record: tuple[str, ...] = ("dispatch",),
                          categories: list[str] | None = None, prompts: list[str] | None = None,
                          pool: int | None = None, progress=None) -> Path:
    """Write a complete synthetic trace to `path` (atomically) and return it. Sizes as in a real trace;
    `batch` samples per writer batch (rounded to whole groups), `routing` "ec" or "tc". With `pool`, only that
    many distinct batches of routing are drawn and reused in turn (benchmark-size traces in minutes)."""
    path = Path(path)
    S = grid * grid
    per_group = max(1, group_size // S)
    batch = -(-batch // per_group) * per_group
    n_batches = -(-samples // batch)
    G = batch * branches * S // group_size  # groups per writer batch
    shape = dict(samples=samples, steps=steps, layers=layers, E=experts, g=group_size,
                 C=max(1, round(group_size * capacity_factor / experts)), S=S, branches=branches, routing=routing,
                 top_k=top_k)
    names = variables_for(routing, set(record), {"category"} if categories else set())
    sizes, coords = _layout(shape, grid, n_batches * G, per_group, text_len, image_size)
    attrs = _attributes(shape, grid, capacity_factor, batch, seed, record, image_size) | {"variables": sorted(names)}
    rng = np.random.default_rng(seed)

    def write(tmp: Path) -> None:
        import zarr

        create_store(tmp, sizes, names, coords, attrs, {"sample": batch, "group": G})
        root = zarr.open_group(str(tmp), mode="r+")
        with writing():
            arrays = {n: root[n] for n in names}
        drawn: list[dict] = []
        for b in range(n_batches):
            s0, s1 = b * batch, min((b + 1) * batch, samples)
            ids = np.arange(b * batch, (b + 1) * batch)
            ids = np.where(ids < samples, ids, -1)
            out = _routing_batch(rng, ids, b, batch, shape, pool, drawn)
            for name, v in out["per_sample"].items():
                if name in arrays:
                    arrays[name][s0:s1] = v[ids >= 0]
            for name, v in out["per_group"].items():
                arrays[name][b * G:(b + 1) * G] = v
            _write_samples(arrays, rng, s0, s1, shape, text_len, image_size, prompts, categories)
            if progress is not None:
                progress(s1)

    atomic_dir(path, write)
    return path


def _layout(shape: dict, grid: int, n_groups: int, per_group: int, text_len: int, image_size: int):
    """The store's dimension sizes and coordinates."""
    steps, layers, S, E = shape["steps"], shape["layers"], shape["S"], shape["E"]
    sizes = {"sample": shape["samples"], "branch": shape["branches"], "step": steps, "layer": layers, "token": S,
             "expert": E, "slot": shape["C"], "k": shape["top_k"], "group": n_groups, "member": per_group,
             "text": text_len, "word": text_len, "y": image_size, "x": image_size, "channel": 3,
             "block": 2 * layers}
    coords = {
        "step": ("step", np.arange(steps, dtype=np.int32)), "t": ("step", np.arange(steps, dtype=np.float32) / steps),
        "layer": ("layer", np.arange(1, 2 * layers, 2, dtype=np.int32)),
        "block": ("block", np.arange(2 * layers, dtype=np.int32)),
        "token": ("token", np.arange(S, dtype=np.int32)), "row": ("token", np.arange(S, dtype=np.int32) // grid),
        "col": ("token", np.arange(S, dtype=np.int32) % grid),
        "branch": ("branch", np.array(BRANCHES[:shape["branches"]], dtype=object)),
        "expert": ("expert", np.arange(E, dtype=np.int32)),
    }
    return sizes, coords


def _attributes(shape: dict, grid: int, capacity_factor: float, batch: int, seed: int, record, image_size: int):
    """The store's attributes, as `ecviz trace` writes them (marked synthetic)."""
    routing, E = shape["routing"], shape["E"]
    return jsonable({
        "ecviz_schema_version": SCHEMA_VERSION, "ecviz_version": "synthetic", "checkpoint": "synthetic",
        "checkpoint_sha256": "0" * 64, "preset": None, "model_config": {"routing": routing, "experts": E},
        "routing": {"kind": routing, "experts": E, "capacity_factor": capacity_factor, "group_size": shape["g"],
                    "top_k": shape["top_k"], "capacity": shape["C"]},
        "sampler": {"name": "synthetic", "steps": shape["steps"], "guidance": 4.0 if shape["branches"] == 2 else 1.0,
                    "seed": seed, "images_per_prompt": 1, "batch_size": batch, "n_prompts": shape["samples"],
                    "null_text": "learned"},
        "seed": seed, "record": {"what": sorted(record), "steps": None, "layers": None},
        "prompt_file": "synthetic", "prompt_file_sha256": "0" * 64, "prompt_file_kind": "text",
        "tokens_per_image": shape["S"], "grid": [grid, grid], "patch_size": image_size // grid, "complete": True,
    })


def _routing_batch(rng, ids: np.ndarray, b: int, batch: int, shape: dict, pool: int | None, drawn: list) -> dict:
    """Batch b's routing records: drawn afresh, or with `pool` the (b mod pool)-th drawn one, its group members
    renumbered to this batch's samples (a padded last batch is always drawn afresh)."""
    args = (shape["branches"], shape["S"], shape["g"], shape["E"], shape["C"], shape["steps"], shape["layers"],
            shape["routing"], shape["top_k"])
    if pool is None or b < pool:
        out = _batch(rng, ids, *args)
        if pool is not None:
            drawn.append(out)
        return out
    if ids[-1] < 0:
        return _batch(rng, ids, *args)
    out = drawn[b % pool]
    member = out["per_group"]["group_member_sample"]
    return {"per_sample": out["per_sample"], "per_group": dict(
        out["per_group"], group_member_sample=np.where(member >= 0, member % batch + b * batch, -1))}


def _write_samples(arrays: dict, rng, s0: int, s1: int, shape: dict, text_len: int, image_size: int,
                   prompts: list[str] | None, categories: list[str] | None) -> None:
    """Samples s0..s1's per-sample variables other than routing: prompts and words, random attention, x0 and
    images, indices and seeds, categories, and the done flags last."""
    steps, layers, S, n = shape["steps"], shape["layers"], shape["S"], s1 - s0
    text = [f"synthetic prompt {i}" for i in range(s0, s1)] if prompts is None else \
        [prompts[i % len(prompts)] for i in range(s0, s1)]
    arrays["prompt"][s0:s1] = np.array(text, dtype=object)
    for name, v in _words(text, text_len).items():
        arrays[name][s0:s1] = v
    if "cross_attn" in arrays:
        a = rng.random((n, steps, 2 * layers, S, text_len)) ** 4
        arrays["cross_attn"][s0:s1] = (a / a.sum(-1, keepdims=True)).astype(np.float16)
    if "x0" in arrays:
        arrays["x0"][s0:s1] = rng.integers(0, 256, (n, steps, image_size, image_size, 3), dtype=np.uint8)
    arrays["prompt_index"][s0:s1] = np.arange(s0, s1, dtype=np.int32)
    arrays["image_index"][s0:s1] = 0
    arrays["seed"][s0:s1] = np.arange(s0, s1)
    arrays["image"][s0:s1] = rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8)
    if categories:
        arrays["category"][s0:s1] = np.array([categories[i % len(categories)] for i in range(s0, s1)], dtype=object)
    arrays["done"][s0:s1] = True


def _words(texts: list[str], text_len: int) -> dict[str, np.ndarray]:
    """text_token, text_mask, text_word and prompt_word of prompts tokenised one token per word between <s> and
    </s>, padded (or cut) to text_len."""
    n = len(texts)
    token = np.full((n, text_len), "", dtype=object)
    mask = np.zeros((n, text_len), bool)
    word_of = np.full((n, text_len), -1, np.int16)
    words = np.full((n, text_len), "", dtype=object)
    for i, t in enumerate(texts):
        w = t.split()
        toks = ["<s>", *w[: text_len - 2], "</s>"]
        token[i, : len(toks)] = toks
        mask[i, : len(toks)] = True
        word_of[i, 1 : len(toks) - 1] = np.arange(len(toks) - 2)
        words[i, : min(len(w), text_len)] = w[:text_len]
    return {"text_token": token, "text_mask": mask, "text_word": word_of, "prompt_word": words}


def _batch(rng, ids, branches, S, g, E, C, steps, layers, routing, top_k) -> dict:
    """One writer batch: per-sample and per-group arrays, recounted as the recorder recounts them."""
    images = len(ids) * branches
    G = images * S // g
    dispatch = np.full((G, steps, layers, E, C), -1, np.int32)
    gate = np.zeros((G, steps, layers, E, C), np.float32)
    tc_e = np.full((images, steps, layers, S, top_k), -1, np.int8)
    tc_g = np.zeros((images, steps, layers, S, top_k), np.float16)
    for s in range(steps):
        for layer in range(layers):
            if routing == "ec":
                dispatch[:, s, layer], gate[:, s, layer] = ec_dispatch(rng, G, g, E, C)
            else:
                d, w, ce, cg = tc_dispatch(rng, G, g, E, C, top_k)
                dispatch[:, s, layer], gate[:, s, layer] = d, w
                tc_e[:, s, layer] = ce.reshape(images, S, top_k)
                tc_g[:, s, layer] = cg.reshape(images, S, top_k)
    tokens = np.arange(images * S).reshape(G, g)
    count, gsum = expert_counts(dispatch, gate, tokens, images * S)  # (steps, layers, images·S)
    B = len(ids)

    def per(v):  # (steps, layers, branch·B·S) -> (B, branch, steps, layers, S)
        return v.reshape(steps, layers, branches, B, S).transpose(3, 2, 0, 1, 4)

    per_sample = {"expert_count": per(count).astype(np.uint8), "gate_sum": per(gsum).astype(np.float16)}
    if routing == "tc":
        per_sample["tc_expert"] = np.swapaxes(tc_e.reshape(branches, B, *tc_e.shape[1:]), 0, 1)
        per_sample["tc_gate"] = np.swapaxes(tc_g.reshape(branches, B, *tc_g.shape[1:]), 0, 1)
    m_sample, m_branch, m_offset = members(tokens, ids, S)
    return {"per_sample": per_sample,
            "per_group": {"dispatch": dispatch, "gate": gate.astype(np.float16), "group_member_sample": m_sample,
                          "group_member_branch": m_branch, "group_member_offset": m_offset}}


def tc_dispatch(rng, G: int, g: int, E: int, C: int, k: int) -> tuple:
    """Token choice in position order (what fills first, stays): (dispatch (G, E, C), gate (G, E, C),
    choice (G·g, k) expert or -1, choice gate (G·g, k))."""
    p = rng.dirichlet(np.ones(E) * 0.5, size=(G, g))  # (G, g, E)
    top = np.argsort(-p, -1)[..., :k]  # (G, g, k)
    w = np.take_along_axis(p, top, -1)
    w = w / w.sum(-1, keepdims=True)
    dispatch = np.full((G, E, C), -1, np.int32)
    gate = np.zeros((G, E, C), np.float32)
    choice = np.full((G, g, k), -1, np.int8)
    cgate = np.zeros((G, g, k), np.float32)
    fill = np.zeros((G, E), np.int64)
    for j in range(k):
        for t in range(g):
            e = top[:, t, j]
            ok = fill[np.arange(G), e] < C
            gi = np.nonzero(ok)[0]
            dispatch[gi, e[gi], fill[gi, e[gi]]] = t
            gate[gi, e[gi], fill[gi, e[gi]]] = w[gi, t, j]
            choice[gi, t, j] = e[gi]
            cgate[gi, t, j] = w[gi, t, j]
            fill[gi, e[gi]] += 1
    return dispatch, gate, choice.reshape(G * g, k), cgate.reshape(G * g, k)
