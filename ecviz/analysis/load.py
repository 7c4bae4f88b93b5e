"""Expert load and specialisation: who does the work, how evenly, with whom, on which tokens and words.

Expert choice balances load by construction (every expert takes exactly C tokens of every routing group; a
trace where that fails is flagged); token choice balances it only through its auxiliary loss and drops what
overflows. Per (step, layer) of a trace: tokens and gate mass per expert, load imbalance (max/mean), the
dropped-assignment share of token choice and where in the image and the routing group drops happen, the
expert co-selection matrix (how often two experts take the same token), and each expert's preference for
token positions, denoising steps and text words. Per image: which tokens each expert took (`expert_maps`).
Training probes give the same along `train_step`.
"""

from __future__ import annotations

import operator

import numpy as np
import xarray as xr
from threadpoolctl import threadpool_limits

from ecviz.analysis.common import (
    bookkeeping,
    branch_index,
    check_uncut,
    kind,
    require,
    require_done,
    require_trace,
    routing_kind,
)
from ecviz.errors import TraceError

GROUP_CHUNK = 8  # routing groups per dask task (dispatch blocks of ~6M slots at the paper's XL sizes)
COSELECTION_STEPS = 10  # coselection() default: this many evenly spaced recorded steps


def _groups_chunked(da: xr.DataArray) -> xr.DataArray:
    return da.chunk({d: (GROUP_CHUNK if d == "group" else -1) for d in da.dims})


def _spaced_steps(labels: np.ndarray, steps) -> list[int]:
    """Positions of the co-selection steps: "spaced" (COSELECTION_STEPS evenly spaced, the last included),
    "all", or a list of step labels."""
    n = len(labels)
    if isinstance(steps, str) and steps == "spaced":
        return np.unique(np.linspace(n - 1, 0, min(n, COSELECTION_STEPS)).round().astype(int)).tolist()
    if steps is None or (isinstance(steps, str) and steps == "all"):
        return list(range(n))
    if isinstance(steps, str) or not hasattr(steps, "__iter__"):
        raise TraceError(f"steps {steps!r}: 'spaced', 'all' or a list of recorded step labels")
    if len(steps) == 0:
        raise TraceError("steps []: no step chosen; name some, or 'spaced' or 'all'")
    pos = {int(v): i for i, v in enumerate(labels)}
    steps = [int(labels[s]) if int(s) < 0 and -n <= int(s) else s for s in steps]  # -1: the last, as elsewhere
    missing = [s for s in steps if int(s) not in pos]
    if missing:
        raise TraceError(f"step {missing[0]} is not recorded")
    return [pos[int(s)] for s in steps]


SUB_GROUPS = 2  # groups reduced at a time inside a block: keeps temporaries small (see _block_pass)


def _block_pass(x, w, ms, mb, mo, g: int, S: int, cosel: tuple[int, ...], branch: int | None) -> dict:
    """Everything the dispatch-based statistics need from one block of routing groups, read once.

    x (Gc, T, L, E, C) slot -> token within its group (-1 empty), w (Gc, T, L, E, C) gates, ms/mb/mo (Gc, M)
    the group members' sample, branch and first token. Returns partial sums (see routing_pass).

    The block is reduced SUB_GROUPS groups at a time: a whole shard's temporaries (tens of MB each) are
    fresh memory maps that the kernel zero-fills page by page on every call, which cost as much as the
    arithmetic; temporaries of a few groups stay under the allocator's reuse threshold."""
    parts = [_sub_pass(x[i:i + SUB_GROUPS], w[i:i + SUB_GROUPS], ms[i:i + SUB_GROUPS], mb[i:i + SUB_GROUPS],
                       mo[i:i + SUB_GROUPS], g, S, cosel, branch) for i in range(0, x.shape[0], SUB_GROUPS)]
    return _merge(parts)


def _sub_pass(x, w, ms, mb, mo, g: int, S: int, cosel: tuple[int, ...], branch: int | None) -> dict:
    Gc, _, L, E, _ = x.shape
    filled = x >= 0
    per_group = filled.sum(-1)  # (Gc, T, L, E)
    out = {"tokens": per_group.sum(0).astype(np.int64), "gate_mass": w.sum((0, 4), dtype=np.float32).astype(np.float64),
           "fill_min": per_group.min((0, 3)), "fill_max": per_group.max((0, 3)),
           "group_valid": per_group.sum(-1).astype(np.int32)}  # (Gc, T, L)
    # co-selection: per layer, the (E, tokens) incidence of the chosen steps and one matrix product
    xs = x[:, list(cosel)]  # (Gc, T', L, E, C)
    n = Gc * len(cosel) * g
    run = (np.arange(Gc)[:, None] * len(cosel) + np.arange(len(cosel))[None, :])[:, :, None, None, None] * g
    rows = np.where(xs >= 0, xs + run, n)
    inc = np.zeros((L, E, n + 1), np.float32)  # (layer, expert, token): the expert took the token; column n: empty
    base = (np.arange(L * E, dtype=np.int64) * (n + 1)).reshape(1, 1, L, E, 1)
    inc.reshape(-1)[(rows + base).ravel()] = 1  # one flat scatter: far faster than three broadcast index arrays
    inc[:, :, n] = 0
    with threadpool_limits(1):  # dask already runs one task per core; nested BLAS threads thrash
        co = np.matmul(inc, inc.transpose(0, 2, 1)).astype(np.float64)  # (L, E, E)
    out["coselection"] = co
    # positions: slot value v -> member v // seg, image position mo[member] + v % seg, real members only
    seg = min(g, S)
    M = ms.shape[1]
    real = ms >= 0
    if branch is not None:
        real &= mb == branch
    pos = np.zeros((L * E, S), np.float64)
    if real.all() and (mo == 0).all() and seg == S:  # whole real images in every group: bins (layer, expert, v)
        size = L * E * g
        offset = np.arange(L * E, dtype=np.int32).reshape(1, 1, L, E, 1) * g
        per_v = np.bincount(np.where(filled, x + offset, size).ravel(), minlength=size + 1)[:size]
        pos += per_v.reshape(L * E, M, S).sum(1)
    else:  # fillers, one branch only, or groups that are parts of images: bins per group, folded member by member
        size = Gc * L * E * g
        offset = np.arange(Gc * L * E, dtype=np.int32).reshape(Gc, 1, L, E, 1) * g
        per_v = np.bincount(np.where(filled, x + offset, size).ravel(), minlength=size + 1)[:size]
        per_v = per_v.reshape(Gc, L * E, M, seg)
        for gi in range(Gc):
            for m in range(M):
                if real[gi, m]:
                    pos[:, mo[gi, m]:mo[gi, m] + seg] += per_v[gi, :, m]
    out["positions"] = pos.reshape(L, E, S)
    return out


def _merge(parts: list[dict]) -> dict:
    out = dict(parts[0])
    for p in parts[1:]:
        for k, v in p.items():
            if k == "fill_min":
                out[k] = np.minimum(out[k], v)
            elif k == "fill_max":
                out[k] = np.maximum(out[k], v)
            elif k == "group_valid":
                out[k] = np.concatenate([out[k], v])
            else:
                out[k] = out[k] + v
    return out


def routing_pass(ds: xr.Dataset, steps="spaced", branch: str | None = None) -> xr.Dataset:
    """One pass over the dispatch (and gate) arrays, block by block of routing groups, that every
    dispatch-based statistic derives from; lazy. Each block is read once and reduced at once, so memory stays at
    a few blocks whatever the trace's size; compute it once (or compute the statistics built on it together).

    Variables: tokens, gate_mass (step, layer, expert); fill_min, fill_max (step, layer): fewest and most
    tokens one expert took of one group; group_valid (group, step, layer): filled slots per group; coselection
    (layer, expert, expert_b) over the `steps` (see coselection); positions (layer, expert, token): how often
    each expert took each image position, over real images (of `branch`, default both)."""
    import dask
    import dask.array as dsa

    require(ds, "dispatch", "gate", "group_member_sample", "group_member_branch", "group_member_offset",
            what="routing statistics")
    require_done(ds, "routing statistics")
    check_uncut(ds)  # its groups would still count every sample of the store
    g, S = int(ds.attrs["routing"]["group_size"]), ds.sizes["token"]
    G, T, L, E = ds.sizes["group"], ds.sizes["step"], ds.sizes["layer"], ds.sizes["expert"]
    labels = ds["step"].values
    cosel = tuple(_spaced_steps(labels, steps))
    bsel = None if branch is None else branch_index(ds, branch)
    arrays = [_groups_chunked(ds[n]).data for n in ("dispatch", "gate", "group_member_sample",
                                                     "group_member_branch", "group_member_offset")]
    blocks = [a.to_delayed().ravel() for a in arrays]
    fn = dask.delayed(_block_pass, pure=True)
    parts = [fn(*b, g, S, cosel, bsel) for b in zip(*blocks, strict=True)]
    while len(parts) > 1:  # tree reduction
        parts = [dask.delayed(_merge, pure=True)(parts[i:i + 8]) for i in range(0, len(parts), 8)]
    res = parts[0]

    def lazy(key, shape, dtype):
        return dsa.from_delayed(dask.delayed(operator.getitem, pure=True)(res, key), shape, dtype=dtype)

    step, layer = ds["step"].values, ds["layer"].values
    expert = np.arange(E)
    out = xr.Dataset({
        "tokens": (("step", "layer", "expert"), lazy("tokens", (T, L, E), np.int64)),
        "gate_mass": (("step", "layer", "expert"), lazy("gate_mass", (T, L, E), np.float64)),
        "fill_min": (("step", "layer"), lazy("fill_min", (T, L), np.int64)),
        "fill_max": (("step", "layer"), lazy("fill_max", (T, L), np.int64)),
        "group_valid": (("group", "step", "layer"), lazy("group_valid", (G, T, L), np.int32)),
        "coselection": (("layer", "expert", "expert_b"), lazy("coselection", (L, E, E), np.float64)),
        "positions": (("layer", "expert", "token"), lazy("positions", (L, E, S), np.float64)),
    }, coords={"step": step, "layer": layer, "expert": expert, "expert_b": expert, "token": np.arange(S)})
    out.attrs.update(coselection_steps=[int(labels[i]) for i in cosel], group_size=g,
                     capacity_per_group=int(ds.sizes["slot"]), positions_branch=branch or "both")
    return out


def expert_load(ds: xr.Dataset, summary: xr.Dataset | None = None) -> xr.Dataset:
    """Tokens and gate mass per expert. Trace: per (step, layer, expert), summed over routing groups; probe:
    per (train_step, t, layer, expert) from its recorded load. Lazy; pass `summary` (a routing_pass result)
    to reuse one pass.

    Variables: tokens (assignments the expert processed), capacity_used (tokens over capacity: 1 for expert
    choice), gate_mass (sum of its gates; traces only), share (its fraction of all assignments), imbalance (max /
    mean tokens over experts), and for expert-choice traces full_capacity: whether every expert took exactly C
    tokens in every routing group, as expert choice must (False flags a broken trace)."""
    if kind(ds) == "probe":
        require(ds, "expert_load", what="expert load")
        load = ds["expert_load"]
        return xr.Dataset({"capacity_used": load, "share": load / load.sum("expert"),
                           "imbalance": load.max("expert") / load.mean("expert")})
    s = summary if summary is not None else routing_pass(ds)
    C = s.attrs["capacity_per_group"]
    tokens = s["tokens"]
    out = xr.Dataset({
        "tokens": tokens,
        "capacity_used": tokens / (ds.sizes["group"] * C),
        "gate_mass": s["gate_mass"],
        "share": tokens / tokens.sum("expert"),
        "imbalance": tokens.max("expert") / tokens.mean("expert"),
    })
    if routing_kind(ds) == "ec":
        out["full_capacity"] = (s["fill_min"] == C) & (s["fill_max"] == C)
    out.attrs.update(capacity_per_group=C, groups=ds.sizes["group"], routing=routing_kind(ds))
    return out


def check_full_capacity(ds: xr.Dataset, summary: xr.Dataset | None = None) -> None:
    """Raise a TraceError if an expert-choice trace has an expert that did not take exactly C tokens of a group
    (`summary`: a routing_pass result to reuse)."""
    load = expert_load(ds, summary)
    if "full_capacity" not in load:
        return
    full = load["full_capacity"].compute().transpose("step", "layer")
    if not bool(full.all()):
        steps, layers = full["step"].values, full["layer"].values
        where = [(int(steps[t]), int(layers[li])) for t, li in np.argwhere(~full.values)[:3]]
        raise TraceError(f"expert choice broken: an expert took other than C = {load.attrs['capacity_per_group']} "
                         f"tokens of a group at (step, layer) {where}")


def group_mean(ds: xr.Dataset, summary: xr.Dataset | None = None) -> xr.DataArray:
    """(group, step, layer): experts per token over a whole routing group (expert choice: f_c exactly). Lazy."""
    s = summary if summary is not None else routing_pass(ds)
    return s["group_valid"] / s.attrs["group_size"]


def _group_members(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each routing-group member's image as positions in this Dataset: (position, branch, real), each (group,
    member). position: index along `sample` (-1: not in this Dataset); real: a real image, not a padding
    filler, whether or not it is in this Dataset (a `subset` drops partners; `group_member_removed` marks them).

    Raises a TraceError when the trace was cut, reordered or repeated with `isel` (`check_uncut`), which leaves
    the groups numbered as in the store, so which image each member is cannot be known."""
    require(ds, "group_member_sample", "group_member_branch", "group_member_offset", what="group membership")
    ms = bookkeeping(ds, "group_member_sample").astype(np.int64)  # (group, member)
    check_uncut(ds, ms)
    real = ms >= 0
    if "group_member_removed" in ds:
        real |= bookkeeping(ds, "group_member_removed")
    return ms, bookkeeping(ds, "group_member_branch"), real


def sample_groups(ds: xr.Dataset) -> xr.Dataset:
    """Where each image was routed: group (sample, branch) its first token's group, member (its position in the
    group), partners (real images sharing the group, itself included, also those a `subset` left out) and filler
    (the group holds padding copies). Computed (small): use it to condition per-image statistics on group
    composition."""
    ms, mb, real = _group_members(ds)
    mo = bookkeeping(ds, "group_member_offset")
    n, nb = ds.sizes["sample"], ds.sizes.get("branch", 1)
    group = np.full((n, nb), -1, np.int32)
    member = np.full((n, nb), -1, np.int32)
    partners = np.zeros((n, nb), np.int32)
    filler = np.zeros((n, nb), bool)
    for gi in range(ms.shape[0]):
        for m in range(ms.shape[1]):
            s, b = ms[gi, m], mb[gi, m]
            if s < 0 or mo[gi, m] != 0 or group[s, b] >= 0:
                continue
            group[s, b], member[s, b] = gi, m
            partners[s, b] = int(real[gi].sum())
            filler[s, b] = bool((~real[gi]).any())
    dims = ("sample", "branch")
    coords = {"branch": ds["branch"].values} if "branch" in ds.coords else {}
    return xr.Dataset({"group": (dims, group), "member": (dims, member), "partners": (dims, partners),
                       "filler": (dims, filler)}, coords=coords)


def image_vs_group(ds: xr.Dataset) -> xr.Dataset:
    """Per image (sample, branch, step, layer): its own mean experts per token next to the mean of the routing
    group it was in (groups smaller than an image: the token-weighted mean of the groups its tokens were in),
    with `partners` and `filler` (of its first token's group) to condition on. Expert choice fixes only the
    group's mean."""
    require(ds, "expert_count", what="image vs group means")
    img = ds["expert_count"].astype(np.float32).mean("token").compute()
    gm = group_mean(ds).compute().values  # (group, step, layer)
    ms, mb, _ = _group_members(ds)
    n, nb = ds.sizes["sample"], ds.sizes.get("branch", 1)
    gi, m = np.nonzero(ms >= 0)  # every member that is an image here; each covers the same share of its image
    total = np.zeros((n, nb, *gm.shape[1:]))
    count = np.zeros((n, nb))
    np.add.at(total, (ms[gi, m], mb[gi, m]), gm[gi])
    np.add.at(count, (ms[gi, m], mb[gi, m]), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per = total / count[..., None, None]  # NaN: an image in no group of this Dataset
    where = sample_groups(ds)
    return xr.Dataset({"image_mean": img,
                       "group_mean": (("sample", "branch", "step", "layer"), per.astype(np.float32)),
                       "partners": where["partners"], "filler": where["filler"]})


def token_choice_drops(ds: xr.Dataset) -> xr.Dataset:
    """Token choice: share of top-k assignments dropped over capacity, per (step, layer) and by where the token
    was: by_token (layer, token) image position, by_member (layer, member) position of its image in the routing
    group, by_choice (layer, k); over both guidance branches (each routed in groups of its own: drops are the
    capacity's, whichever branch a group holds). Training probes: tc_drop_rate per (train_step, t, layer)."""
    if routing_kind(ds) != "tc":  # an expert-choice probe's tc_drop_rate is all zeros: no answer either
        raise TraceError(f"token-choice drops need a token-choice {kind(ds)}; this one is {routing_kind(ds)}")
    if kind(ds) == "probe":
        require(ds, "tc_drop_rate", what="token-choice drops")
        return xr.Dataset({"share": ds["tc_drop_rate"]})
    require(ds, "tc_expert", what="token-choice drops")
    require_done(ds, "token-choice drops")  # a sample not written reads as every choice dropped
    dropped = (ds["tc_expert"] < 0).astype(np.float32)  # (sample, branch, step, layer, token, k)
    member = sample_groups(ds)["member"].values  # (sample, branch)
    per_image = dropped.mean(("step", "token", "k")).transpose("sample", "branch", "layer").values
    members = np.unique(member[member >= 0])
    by_member = np.stack([per_image[member == m].mean(0) for m in members], -1) if members.size else \
        np.zeros((per_image.shape[-1], 0), np.float32)  # (layer, member)
    out = xr.Dataset({
        "share": dropped.mean(("sample", "branch", "token", "k")),
        "by_token": dropped.mean(("sample", "branch", "step", "k")),
        "by_choice": dropped.mean(("sample", "branch", "step", "token")),
    }).compute()
    out["by_member"] = xr.DataArray(by_member, dims=("layer", "member"),
                                    coords={"layer": ds["layer"].values, "member": members.astype(np.int32)})
    return out


def coselection(ds: xr.Dataset, steps="spaced", summary: xr.Dataset | None = None) -> xr.Dataset:
    """Expert co-selection per layer, over tokens of all routing groups and the given steps (step labels;
    default "spaced": COSELECTION_STEPS evenly spaced recorded steps, the last included; "all": every step):
    count (layer, expert, expert_b) tokens both experts took (diagonal: tokens the expert took), conditional
    P(expert_b took the token | expert took it), and lift (count over what independent experts would give:
    1 = no association). Lazy."""
    s = summary if summary is not None else routing_pass(ds, steps)
    count = s["coselection"]
    diag = xr.DataArray(np.einsum("lee->le", count.data), dims=("layer", "expert"),
                        coords={"layer": count["layer"], "expert": count["expert"]})
    n_tokens = ds.sizes["group"] * s.attrs["group_size"] * len(s.attrs["coselection_steps"])
    out = xr.Dataset({"count": count, "conditional": count / diag,
                      "lift": count * n_tokens / (diag * diag.rename(expert="expert_b"))})
    out.attrs["steps"] = s.attrs["coselection_steps"]
    return out


def expert_positions(ds: xr.Dataset, branch: str | None = None, summary: xr.Dataset | None = None) -> xr.DataArray:
    """(layer, expert, token): how often each expert took each image position, over real images, steps and
    routing groups, relative to a uniform choice (1 = no preference). Lazy. A `summary` must be of the same
    `branch` (routing_pass(ds, branch=...))."""
    s = summary if summary is not None else routing_pass(ds, branch=branch)
    if s.attrs.get("positions_branch", branch or "both") != (branch or "both"):
        raise TraceError(f"the summary counts positions of branch {s.attrs['positions_branch']!r}, not "
                         f"{branch or 'both'!r}: pass routing_pass(ds, branch={branch!r})")
    counts = s["positions"]
    mean = counts.mean("token")
    return counts / mean.where(mean > 0)  # NaN: an expert that took no real image's token (only fillers)


def expert_maps(ds: xr.Dataset, sample: int, step=-1, layer=-1, branch: str = "cond") -> xr.Dataset:
    """Which tokens of one image each expert took, (expert, row, col), computed: `taken` is the share of the
    chosen (step, layer) pairs in which the expert took the token (0 or 1 for one step and layer), `gate` its
    gate weight averaged over those pairs (counting 0 where it did not take it). step/layer: a label, -1 (the
    last) or "all" (every one recorded), or a non-empty list. From the routing groups' dispatch (`--record
    dispatch`), so for expert choice and token choice alike; the sum of `taken` over experts is the image's
    experts-per-token map (`heatmap`)."""
    from ecviz.analysis.allocation import check_position, picked_labels, token_grid

    require(ds, "dispatch", "gate", "group_member_sample", "group_member_branch", "group_member_offset",
            what="per-expert maps")
    require_done(ds, "per-expert maps")
    ms, mb, _ = _group_members(ds)
    check_position("sample", sample, ds.sizes["sample"])
    sample = sample % ds.sizes["sample"]
    bi = branch_index(ds, branch)
    g, S, E = int(ds.attrs["routing"]["group_size"]), ds.sizes["token"], ds.sizes["expert"]
    seg = min(g, S)  # tokens of one image in a group: the whole image, or the group's share of it
    groups, members = np.nonzero((ms == sample) & (mb == bi))
    steps, layers = picked_labels(ds, "step", step), picked_labels(ds, "layer", layer)
    pick = {"group": groups}
    disp = ds["dispatch"].isel(pick).sel(step=steps, layer=layers).values  # (n, T, L, E, C)
    gate = ds["gate"].isel(pick).sel(step=steps, layer=layers).values.astype(np.float32)
    taken = np.zeros((len(steps), len(layers), E, S), np.float32)
    mass = np.zeros_like(taken)
    offsets = bookkeeping(ds, "group_member_offset")
    for k, (gi, m) in enumerate(zip(groups, members, strict=True)):
        d = disp[k]
        ok = (d >= 0) & (d // seg == m)  # slots holding a token of this member, the image
        t, li, e, _ = np.nonzero(ok)
        token = offsets[gi, m] + d[ok] % seg
        np.add.at(taken, (t, li, e, token), 1.0)
        np.add.at(mass, (t, li, e, token), gate[k][ok])
    da = xr.DataArray(np.stack([taken.mean((0, 1)), mass.mean((0, 1))]), dims=("what", "expert", "token"),
                      coords={"what": ["taken", "gate"], "expert": np.arange(E)})
    grid = token_grid(da)
    out = xr.Dataset({"taken": grid.sel(what="taken", drop=True), "gate": grid.sel(what="gate", drop=True)})
    out.attrs.update(sample=int(sample), steps=steps, layers=layers, branch=branch)
    return out


def tokens_taken(ds: xr.Dataset, step=-1, branch: str = "cond", layer="all") -> xr.DataArray:
    """(sample, layer, expert, token) bool: which tokens of every image each expert took at one recorded step
    (a label or -1, the last), decoded from the routing groups' dispatch a few groups at a time (`expert_maps`
    gives one image over any steps). Images of `branch`; a token-choice token dropped over capacity is taken by
    no expert. `layer`: the sparse layers to decode (a label, -1, a list; default every one). Computed."""
    from ecviz.analysis.allocation import picked_labels

    require(ds, "dispatch", "group_member_sample", "group_member_branch", "group_member_offset",
            what="the tokens each expert took")
    require_done(ds, "the tokens each expert took")
    ms, mb, _ = _group_members(ds)
    bi = branch_index(ds, branch)
    if isinstance(step, (list, tuple, np.ndarray)) or (isinstance(step, str) and step == "all"):
        raise TraceError(f"step {step!r}: name one recorded step (a label, or -1 for the last)")
    (label,) = picked_labels(ds, "step", step)  # a negative one checked and counted from the end
    layers = picked_labels(ds, "layer", layer)
    mo = bookkeeping(ds, "group_member_offset")
    n, S, L, E = ds.sizes["sample"], ds.sizes["token"], len(layers), ds.sizes["expert"]
    seg = min(int(ds.attrs["routing"]["group_size"]), S)
    out = np.zeros((n, L, E, S), bool)
    disp = ds["dispatch"].sel(step=label, layer=layers)
    mine = np.flatnonzero(((ms >= 0) & (mb == bi)).any(1))  # groups holding this branch's images here
    for k in range(0, len(mine), 8 * GROUP_CHUNK):
        groups = mine[k:k + 8 * GROUP_CHUNK]
        x = disp.isel(group=groups).transpose("group", "layer", "expert", "slot").values  # (Gc, L, E, C)
        gi, li, e, c = np.nonzero(x >= 0)
        v = x[gi, li, e, c].astype(np.int64)
        gi = groups[gi]
        m = v // seg
        s = ms[gi, m]
        keep = (s >= 0) & (mb[gi, m] == bi)
        out[s[keep], li[keep], e[keep], (mo[gi, m] + v % seg)[keep]] = True
    return xr.DataArray(out, dims=("sample", "layer", "expert", "token"),
                        coords={"layer": np.asarray(layers), "expert": np.arange(E)},
                        attrs={"step": int(label), "branch": branch})


def expert_steps(ds: xr.Dataset, summary: xr.Dataset | None = None) -> xr.DataArray:
    """(step, layer, expert): each expert's share of its total gate mass at each denoising step, relative to an
    even spread over steps (1 = no preference). Expert choice gives every expert the same tokens per step, so
    gate mass is where a timestep preference shows."""
    require_trace(ds, "expert_steps (gate mass is recorded in traces)")
    mass = expert_load(ds, summary)["gate_mass"]
    return mass / mass.mean("step")
