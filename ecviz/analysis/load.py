"""Expert load and specialisation: who does the work, how evenly, with whom, on which tokens and words.

Expert choice balances load by construction (every expert takes exactly C tokens of every routing group; a
trace where that fails is flagged); token choice balances it only through its auxiliary loss and drops what
overflows. Per (step, layer) of a trace: tokens and gate mass per expert, load imbalance (max/mean), the
dropped-assignment share of token choice and where in the image and the routing group drops happen, the
expert co-selection matrix (how often two experts take the same token), and each expert's preference for
token positions, denoising steps and text words. Training probes give the same along `train_step`.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ecviz.analysis.common import kind, require, routing_kind
from ecviz.errors import TraceError

GROUP_CHUNK = 8  # routing groups per dask task (dispatch blocks of ~6M slots at the paper's XL sizes)
COSELECTION_STEPS = 10  # coselection() default: this many evenly spaced recorded steps


def _groups_chunked(da: xr.DataArray) -> xr.DataArray:
    return da.chunk({d: (GROUP_CHUNK if d == "group" else -1) for d in da.dims})


def expert_load(ds: xr.Dataset) -> xr.Dataset:
    """Tokens and gate mass per expert. Trace: per (step, layer, expert), summed over routing groups; probe:
    per (train_step, t, layer, expert) from its recorded load. Lazy.

    Variables: tokens (assignments the expert processed), capacity_used (tokens over capacity: 1 for expert choice),
    gate_mass (sum of its gates; traces only), share (its fraction of all assignments), imbalance (max / mean
    tokens over experts), and for traces full_capacity: whether every expert took exactly C tokens in every
    routing group, as expert choice must (False flags a broken trace or a non-EC layer)."""
    if kind(ds) == "probe":
        require(ds, "expert_load", what="expert load")
        load = ds["expert_load"]
        out = xr.Dataset({"capacity_used": load, "share": load / load.sum("expert"),
                          "imbalance": load.max("expert") / load.mean("expert")})
        return out
    require(ds, "dispatch", "gate", what="expert load")
    filled = _groups_chunked(ds["dispatch"]) >= 0  # (group, step, layer, expert, slot)
    per_group = filled.sum("slot")  # (group, step, layer, expert)
    tokens = per_group.sum("group")
    C = ds.sizes["slot"]
    capacity = ds.sizes["group"] * C
    gate = _groups_chunked(ds["gate"]).astype(np.float32).sum(("group", "slot"))
    out = xr.Dataset({
        "tokens": tokens,
        "capacity_used": tokens / capacity,
        "gate_mass": gate,
        "share": tokens / tokens.sum("expert"),
        "imbalance": tokens.max("expert") / tokens.mean("expert"),
    })
    if routing_kind(ds) == "ec":
        out["full_capacity"] = (per_group.min(("group", "expert")) == C) & (per_group.max(("group", "expert")) == C)
    out.attrs.update(capacity_per_group=C, groups=ds.sizes["group"], routing=routing_kind(ds))
    return out


def check_full_capacity(ds: xr.Dataset) -> None:
    """Raise a TraceError if an expert-choice trace has an expert that did not take exactly C tokens of a group."""
    load = expert_load(ds)
    if "full_capacity" not in load:
        return
    full = load["full_capacity"].compute()
    if not bool(full.all()):
        bad = full.where(~full, drop=True)
        where = list(zip(bad.step.values.tolist(), bad.layer.values.tolist(), strict=True))[:3]
        raise TraceError(f"expert choice broken: an expert took other than C = {load.attrs['capacity_per_group']} "
                         f"tokens of a group at (step, layer) {where}")


def group_mean(ds: xr.Dataset) -> xr.DataArray:
    """(group, step, layer): experts per token over a whole routing group (expert choice: f_c exactly). Lazy."""
    require(ds, "dispatch", what="group means")
    g = ds.attrs["routing"]["group_size"]
    return (_groups_chunked(ds["dispatch"]) >= 0).sum(("expert", "slot")) / g


def sample_groups(ds: xr.Dataset) -> xr.Dataset:
    """Where each image was routed: group (sample, branch) its first token's group, member (its position in the
    group), partners (real images sharing the group, itself included) and filler (the group holds padding
    copies). Computed (small): use it to condition per-image statistics on group composition."""
    require(ds, "group_member_sample", "group_member_branch", "group_member_offset", what="group membership")
    ms = ds["group_member_sample"].values
    mb = ds["group_member_branch"].values
    mo = ds["group_member_offset"].values
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
            partners[s, b] = int((ms[gi] >= 0).sum())
            filler[s, b] = bool((ms[gi] < 0).any())
    dims = ("sample", "branch")
    coords = {"branch": ds["branch"].values} if "branch" in ds.coords else {}
    return xr.Dataset({"group": (dims, group), "member": (dims, member), "partners": (dims, partners),
                       "filler": (dims, filler)}, coords=coords)


def image_vs_group(ds: xr.Dataset) -> xr.Dataset:
    """Per image (sample, branch, step, layer): its own mean experts per token next to the mean of the routing
    group it was in, with `partners` and `filler` to condition on. Expert choice fixes only the group's mean."""
    require(ds, "expert_count", what="image vs group means")
    img = ds["expert_count"].astype(np.float32).mean("token").compute()
    gm = group_mean(ds).compute()  # (group, step, layer)
    where = sample_groups(ds)
    gidx = where["group"].clip(min=0)
    per = gm.isel(group=gidx.values.ravel()).values.reshape(*gidx.shape, *gm.shape[1:])
    out = xr.Dataset({"image_mean": img,
                      "group_mean": (("sample", "branch", "step", "layer"), per),
                      "partners": where["partners"], "filler": where["filler"]})
    return out


def token_choice_drops(ds: xr.Dataset) -> xr.Dataset:
    """Token choice: share of top-k assignments dropped over capacity, per (step, layer) and by where the token
    was: by_token (layer, token) image position, by_member (layer, member) position of its image in the routing
    group, by_choice (layer, k). Training probes: tc_drop_rate per (train_step, t, layer)."""
    if kind(ds) == "probe":
        require(ds, "tc_drop_rate", what="token-choice drops")
        return xr.Dataset({"share": ds["tc_drop_rate"]})
    if routing_kind(ds) != "tc":
        raise TraceError(f"token-choice drops need a token-choice trace; this one is {routing_kind(ds)}")
    require(ds, "tc_expert", what="token-choice drops")
    dropped = (ds["tc_expert"] < 0).astype(np.float32)  # (sample, branch, step, layer, token, k)
    where = sample_groups(ds)
    by_member = dropped.mean(("step", "token", "k")).compute().groupby(
        where["member"].rename("member_index")).mean(...)
    out = xr.Dataset({
        "share": dropped.mean(("sample", "branch", "token", "k")),
        "by_token": dropped.mean(("sample", "branch", "step", "k")),
        "by_choice": dropped.mean(("sample", "branch", "step", "token")),
    }).compute()
    out["by_member"] = by_member.rename(member_index="member")
    return out


def coselection(ds: xr.Dataset, steps="spaced") -> xr.Dataset:
    """Expert co-selection per layer, over tokens of all routing groups and the given steps (step labels;
    default "spaced": COSELECTION_STEPS evenly spaced recorded steps, the last included; "all": every step):
    count (layer, expert, expert_b) tokens both experts took (diagonal: tokens the expert took), conditional
    P(expert_b took the token | expert took it), and lift (count over what independent experts would give:
    1 = no association). Lazy until computed; computed as one matrix product per block of groups."""
    require(ds, "dispatch", what="co-selection")
    d = ds["dispatch"]
    if isinstance(steps, str) and steps == "spaced":
        n = d.sizes["step"]
        d = d.isel(step=np.unique(np.linspace(n - 1, 0, min(n, COSELECTION_STEPS)).round().astype(int)))
    elif not (isinstance(steps, str) and steps == "all") and steps is not None:
        d = d.sel(step=steps)
    d = _groups_chunked(d)
    E = ds.sizes["expert"]
    L = d.sizes["layer"]
    g = int(ds.attrs["routing"]["group_size"])

    def kernel(x):  # (Gc, steps, layers, E, C) -> (1, layers, E, E)
        Gc, T, Lb, Eb, _ = x.shape
        out = np.zeros((Lb, Eb, Eb), np.float64)
        for s in range(T):
            inc = np.zeros((Lb, Gc * g + 1, Eb), np.float32)  # last row: where empty slots (-1) land
            rows = np.where(x[:, s] >= 0, x[:, s] + g * np.arange(Gc)[:, None, None, None], Gc * g)  # (Gc, L, E, C)
            li = np.broadcast_to(np.arange(Lb)[None, :, None, None], rows.shape)
            ei = np.broadcast_to(np.arange(Eb)[None, None, :, None], rows.shape)
            inc[li, rows, ei] = 1
            inc[:, -1] = 0
            out += np.einsum("lne,lnf->lef", inc, inc, optimize=True)
        return out[None]

    import dask.array as dsa

    arr = d.transpose("group", "step", "layer", "expert", "slot").data
    blocks = dsa.map_blocks(kernel, arr, dtype=np.float64, chunks=((1,) * arr.numblocks[0], (L,), (E,), (E,)),
                            drop_axis=[4], new_axis=None)
    count = xr.DataArray(blocks.sum(0), dims=("layer", "expert", "expert_b"),
                         coords={"layer": d["layer"].values, "expert": np.arange(E), "expert_b": np.arange(E)})
    diag = xr.DataArray(np.einsum("lee->le", count.data), dims=("layer", "expert"), coords={"layer": count.layer})
    n_tokens = ds.sizes["group"] * g * d.sizes["step"]
    cond = count / diag
    lift = count * n_tokens / (diag * diag.rename(expert="expert_b"))
    out = xr.Dataset({"count": count, "conditional": cond, "lift": lift})
    out.attrs["steps"] = [int(s) for s in d["step"].values]
    return out


def expert_positions(ds: xr.Dataset, branch: str | None = None) -> xr.DataArray:
    """(layer, expert, token): how often each expert took each image position, over real images, steps and
    routing groups, relative to a uniform choice (1 = no preference). Lazy until computed."""
    require(ds, "dispatch", "group_member_sample", "group_member_offset", what="position preferences")
    S = ds.sizes["token"]
    g = int(ds.attrs["routing"]["group_size"])
    seg = min(g, S)
    E, L = ds.sizes["expert"], ds.sizes["layer"]
    bsel = None if branch is None else list(ds["branch"].values).index(branch)

    def kernel(x, ms, mb, mo):  # x (Gc, T, L, E, C), ms/mb/mo (Gc, M, 1, 1, 1) -> (1, L, E, S)
        ms, mb, mo = ms[:, :, 0, 0, 0], mb[:, :, 0, 0, 0], mo[:, :, 0, 0, 0]
        valid = x >= 0
        v = np.where(valid, x, 0)
        m = v // seg  # member
        gi = np.arange(x.shape[0])[:, None, None, None, None]
        sample = ms[gi, m]
        ok = valid & (sample >= 0)
        if bsel is not None:
            ok &= mb[gi, m] == bsel
        pos = mo[gi, m] + v % seg
        li = np.broadcast_to(np.arange(x.shape[2])[None, None, :, None, None], x.shape)
        ei = np.broadcast_to(np.arange(x.shape[3])[None, None, None, :, None], x.shape)
        idx = (li * E + ei) * S + pos
        return np.bincount(idx[ok], minlength=L * E * S).reshape(1, L, E, S).astype(np.float64)

    import dask.array as dsa

    x = _groups_chunked(ds["dispatch"]).transpose("group", "step", "layer", "expert", "slot").data
    ms, mb, mo = (_groups_chunked(ds[n]).data for n in ("group_member_sample", "group_member_branch",
                                                          "group_member_offset"))
    blocks = dsa.map_blocks(kernel, x, ms[:, :, None, None, None], mb[:, :, None, None, None],
                            mo[:, :, None, None, None], dtype=np.float64,
                            chunks=((1,) * x.numblocks[0], (L,), (E,), (S,)), drop_axis=[4], new_axis=None)
    counts = blocks.sum(0)
    rel = counts / counts.mean(-1, keepdims=True)
    return xr.DataArray(rel, dims=("layer", "expert", "token"),
                        coords={"layer": ds["layer"].values, "expert": np.arange(E), "token": np.arange(S)})


def expert_steps(ds: xr.Dataset) -> xr.DataArray:
    """(step, layer, expert): each expert's share of its total gate mass at each denoising step, relative to an
    even spread over steps (1 = no preference). Expert choice gives every expert the same tokens per step, so
    gate mass is where a timestep preference shows."""
    mass = expert_load(ds)["gate_mass"]
    return mass / mass.mean("step")
