"""Feed-forward layers of a DiT block: dense FFN, expert-choice MoE (EC-DiT) and top-k token-choice MoE.

All three map (B, S, d) -> (B, S, d). The sparse ones regroup the batch's B·S tokens into routing groups
of `group_size` consecutive tokens (the paper's (outer_batch, num_group, group_size) layout, so a group may
span several images) and dispatch without one-hot tensors: gather the chosen token rows, run every expert
at once as one batched matmul over stacked weights, and add the gated outputs back (Eq. 8).

Two implementations of that dispatch, equal up to float reassociation (tests hold both to Algorithm 1,
`expert_choice_reference`): `"torch"` (index_select, baddbmm, GELU, gate multiply, index_add_; the default on
every device) and `"triton"` (ecviz.kernels.moe: the gather, bias and GELU fused into the up-projection, the
gate multiply into a combine that sums each token's slots in place of zero-fill and atomic adds). Measured on
an H200 at the XL shape (BENCHMARKS.md), the fused path is 1.1-1.4x slower than the torch one (its gathered
up-projection runs at a fraction of cuBLAS's speed), so "auto" picks torch until a faster kernel lands;
`SparseMoE.dispatch` or the ECVIZ_DISPATCH variable chooses.
The router's logits, softmax and top-C are float32 in every number format (`route`).

Hook points (see `ecviz.hooks`), per sparse layer:
  hook_affinity  (G, g, E)  softmax router probabilities
  hook_group     (G, g)     flat token index (b·S + s) of each group member, i.e. the group layout
  hook_dispatch  (G, E, C)  index within the group of the token each expert took in each slot (-1: empty)
  hook_gate      (G, E, C)  gating weight of that slot (0 where empty)
token choice only:
  hook_choice      (G, g, k)  expert chosen by each token in each of its k choices (-1: dropped)
  hook_choice_gate (G, g, k)  its gate (renormalised over the k choices; top-1: the probability)

Token choice fills each expert's C slots in priority order: every first choice before any second choice and,
within a choice rank, tokens by their top-1 router probability, highest first: batch-prioritised routing
(Riquelme et al. 2021, V-MoE §3.1; `priority="score"`, the default). `priority="position"` is GShard's
order, tokens in group order, which drops late tokens (lower rows, later images) more for no learned reason.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from ecviz.errors import EcvizError
from ecviz.hooks import HookPoint


def capacity(group_size: int, factor: float, experts: int) -> int:
    """Expert capacity C = group_size·factor/E, rounded, at least 1 (paper §2.3)."""
    c = group_size * factor / experts
    if c > group_size:
        raise EcvizError(
            f"expert capacity {c:g} exceeds the routing group size {group_size} "
            f"(capacity factor {factor:g} > {experts} experts)"
        )
    return max(1, min(group_size, round(c)))


def check_group_size(group_size: int, tokens_per_image: int, name: str = "group_size", kept: str = "") -> None:
    """A routing group holds whole images or an equal share of one, so images never straddle groups unevenly.
    `name`: the setting the message names (a config field or an option); `kept`: what leaves fewer tokens."""
    if group_size <= 0 or (group_size % tokens_per_image and tokens_per_image % group_size):
        raise EcvizError(
            f"{name} {group_size} must be a multiple or a divisor of the {tokens_per_image} tokens per image{kept}"
        )


class FFN(nn.Module):
    """Two-layer GELU MLP: the dense FFN of a DiT block."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.aux_loss = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Experts(nn.Module):
    """E two-layer GELU MLPs with stacked weights, applied to E token batches by one batched matmul."""

    def __init__(self, experts: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(experts, dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(experts, 1, hidden))
        self.w2 = nn.Parameter(torch.empty(experts, hidden, dim))
        self.b2 = nn.Parameter(torch.zeros(experts, 1, dim))
        bound = math.sqrt(6 / (dim + hidden))  # xavier-uniform per expert, as DiT initialises its Linear layers
        nn.init.uniform_(self.w1, -bound, bound)
        nn.init.uniform_(self.w2, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (E, T, d) -> (E, T, d)
        h = F.gelu(torch.baddbmm(self.b1, x, self.w1), approximate="tanh")
        return torch.baddbmm(self.b2, h, self.w2)

    def one(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e alone on (..., d): the per-expert form Algorithm 1 uses."""
        h = F.gelu(x @ self.w1[e] + self.b1[e], approximate="tanh")
        return h @ self.w2[e] + self.b2[e]


DISPATCH_IMPLS = ("auto", "torch", "triton")


def dispatch_impl(impl: str) -> str:
    """The dispatch implementation `impl` names: "auto" is ECVIZ_DISPATCH if set, else "torch", the faster one
    on the CPU and, as measured on an H200, on CUDA too (BENCHMARKS.md, GPU)."""
    where = "dispatch"
    if impl == "auto" and os.environ.get("ECVIZ_DISPATCH"):  # set and not empty
        impl, where = os.environ["ECVIZ_DISPATCH"], "ECVIZ_DISPATCH"
    if impl not in DISPATCH_IMPLS:
        raise EcvizError(f"{where} {impl!r} is not one of {', '.join(DISPATCH_IMPLS)}")
    if impl == "triton":
        from ecviz.kernels import triton_available

        if not triton_available():
            raise EcvizError(f"{where} 'triton' needs Triton, which is not installed: pip install -e \".[triton]\" "
                             "(CUDA builds of torch bring it), or use the torch dispatch")
    return "torch" if impl == "auto" else impl


def dispatch_combine(x: torch.Tensor, slots: torch.Tensor, gates: torch.Tensor, experts: Experts,
                     impl: str = "auto", empty: bool = False) -> torch.Tensor:
    """Gather, expert, gated sum (Eq. 8). x (N, d); slots (G, E, C) rows of x (with `empty`: N marks an
    empty slot, whose gate is 0); gates (G, E, C) -> (N, d)."""
    if dispatch_impl(impl) == "triton":
        from ecviz.kernels.moe import expert_ffn

        return expert_ffn(x, slots, gates, experts)
    N, d = x.shape
    if empty:
        x = torch.cat([x, x.new_zeros(1, d)])  # row N: what empty slots gather
    E = slots.shape[1]
    rows = slots.transpose(0, 1).reshape(-1)  # (E·G·C,) expert-major
    x_in = x.index_select(0, rows).view(E, -1, d)  # (E, G·C, d)
    x_out = experts(x_in) * gates.transpose(0, 1).reshape(E, -1, 1).to(x_in.dtype)
    out = x.new_zeros(x.shape).index_add_(0, rows, x_out.view(-1, d))
    return out[:N] if empty else out


class SparseMoE(nn.Module):
    """What the two routers share: router weights, experts, group layout and its hook points."""

    def __init__(self, dim: int, hidden: int, experts: int, capacity_factor: float, group_size: int,
                 infer_capacity_factor: float | None = None, infer_group_size: int | None = None):
        super().__init__()
        self.num_experts = experts
        self.capacity_factor = capacity_factor
        self.group_size = group_size
        self.infer_capacity_factor = infer_capacity_factor or capacity_factor
        self.infer_group_size = infer_group_size or group_size
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = Experts(experts, dim, hidden)
        self.hook_affinity = HookPoint()
        self.hook_group = HookPoint(editable=False)  # the routing reads the groups from the layout, not from it
        self.hook_dispatch = HookPoint()
        self.hook_gate = HookPoint()
        self.aux_loss = None
        self.dispatch = "auto"  # see dispatch_impl: "auto", "torch" or "triton"

    def slots(self, group_size: int | None = None) -> int:
        """Expert capacity C at inference for a group of `group_size` tokens (default: the inference group)."""
        return capacity(group_size or self.infer_group_size, self.infer_capacity_factor, self.num_experts)

    @property
    def current_group_size(self) -> int:
        """The routing group in tokens for this mode: the training group, or in eval mode the inference one."""
        return self.group_size if self.training else self.infer_group_size

    def layout(self, n_tokens: int) -> tuple[int, int, float]:
        """(groups, group size, capacity factor) for this mode (training or inference)."""
        g = self.current_group_size
        f = self.capacity_factor if self.training else self.infer_capacity_factor
        if n_tokens % g:
            raise EcvizError(f"{n_tokens} tokens do not split into routing groups of {g}: "
                             f"the batch must hold a whole number of groups")
        return n_tokens // g, g, f

    def route(self, x: torch.Tensor, g: int) -> torch.Tensor:
        """Router logits, float32 under autocast and in a bf16 model alike, so bf16 never decides a top-C
        (Eq. 5). x (N, d) -> (G, g, E)."""
        with torch.autocast(x.device.type, enabled=False):
            w = self.router.weight
            logits = F.linear(x.to(torch.promote_types(x.dtype, torch.float32)),
                              w.to(torch.promote_types(w.dtype, torch.float32)))
        logits = logits.view(-1, g, self.num_experts)
        self.hook_group(torch.arange(x.shape[0], device=x.device).view(-1, g))
        return logits


class ExpertChoiceMoE(SparseMoE):
    """EC-DiT's sparse layer (Eq. 5-8): each expert takes its top-C tokens of every routing group."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, d = x.shape
        G, g, f = self.layout(B * S)
        C = capacity(g, f, self.num_experts)
        x = x.reshape(B * S, d)
        affinity = self.hook_affinity(self.route(x, g).softmax(-1))  # (G, g, E)
        gate, index = affinity.transpose(1, 2).topk(C, dim=-1)  # (G, E, C), best first
        index = self.hook_dispatch(index)
        slots = index + torch.arange(0, G * g, g, device=x.device).view(G, 1, 1)  # (G, E, C) rows of x
        edited = self.hook_dispatch.edited
        if edited:  # an edit may have emptied slots (-1): row G·g, gate 0 (as hook_gate sees)
            if ((index < -1) | (index >= g)).any():
                raise EcvizError(f"an edit of {self.hook_dispatch.name} gave a token index outside -1..{g - 1} "
                                 "(-1 empties a slot)")
            empty = index < 0
            slots, gate = slots.masked_fill(empty, G * g), gate.masked_fill(empty, 0.0)
        gate = self.hook_gate(gate)
        return dispatch_combine(x, slots, gate, self.experts, self.dispatch, empty=edited).view(B, S, d)


TC_PRIORITIES = ("score", "position")


class TokenChoiceMoE(SparseMoE):
    """GShard-style top-k token choice with expert capacity C = g·factor/E per group.

    The capacity factor counts expert slots per token as in EC, so k=2 with factor 2.0 matches EC's f_c=2
    compute. Assignments fill expert buffers in priority order: first choices first, then second choices;
    within a choice rank by top-1 router probability (`priority="score"`, batch-prioritised routing) or in
    token order (`"position"`). Overflow is dropped (the token passes through the residual only). Sets
    `aux_loss` (load balance, plus optional router z-loss) and `dropped` (a 0-dim tensor: assignments dropped
    in the last forward) out of `assignments` (N·k).
    """

    def __init__(self, *args, top_k: int = 2, aux_weight: float = 0.01, z_weight: float = 0.0,
                 priority: str = "score", **kwargs):
        super().__init__(*args, **kwargs)
        if priority not in TC_PRIORITIES:
            raise EcvizError(f"token-choice priority {priority!r} is not one of {', '.join(TC_PRIORITIES)}")
        self.top_k = top_k
        self.aux_weight = aux_weight
        self.z_weight = z_weight
        self.priority = priority
        self.hook_choice = HookPoint(editable=False)  # views of the choices for observers; edit hook_gate instead
        self.hook_choice_gate = HookPoint(editable=False)
        self.hook_dispatch.editable = False  # made from the slots only when observed
        self.dropped = torch.zeros((), dtype=torch.long)
        self.assignments = 0

    def buffer_slots(self, top_p: torch.Tensor, top_e: torch.Tensor) -> torch.Tensor:
        """Each assignment's slot in its expert's buffer, in priority order: (G, g, k) probabilities of the k
        choices (best first) and their experts -> (G, g, k) slot index (>= C: dropped).

        Sort-based, no one-hot: an assignment's priority is q = rank·g + (the token's place in the order); its
        slot is how many assignments to the same expert have a smaller q.
        """
        G, g, k = top_e.shape
        E = self.num_experts
        dev = top_e.device
        if self.priority == "score":  # best top-1 probability first; stable: ties keep token order
            order = top_p[..., 0].argsort(dim=1, descending=True, stable=True)  # (G, g) tokens by priority
            place = torch.empty_like(order).scatter_(1, order, torch.arange(g, device=dev).expand(G, g))  # (G, g)
        else:
            place = torch.arange(g, device=dev).expand(G, g)
        q = place[..., None] + g * torch.arange(k, device=dev)  # (G, g, k) in [0, k·g), unique per group
        key = (top_e * (k * g) + q).view(G, k * g)  # expert-major, then priority
        sorted_key, perm = key.sort(dim=1)  # (G, k·g)
        counts = torch.zeros(G, E, dtype=torch.long, device=dev).scatter_add_(1, top_e.view(G, -1),
                                                                             torch.ones_like(key))  # (G, E)
        first = counts.cumsum(1) - counts  # (G, E) where each expert's run starts in the sorted keys
        slot_sorted = torch.arange(k * g, device=dev) - first.gather(1, sorted_key.div(k * g, rounding_mode="floor"))
        return torch.empty_like(key).scatter_(1, perm, slot_sorted).view(G, g, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, d = x.shape
        N, E, k = B * S, self.num_experts, self.top_k
        G, g, f = self.layout(N)
        C = capacity(g, f, E)
        x = x.reshape(N, d)
        logits = self.route(x, g)
        probs = self.hook_affinity(logits.softmax(-1))  # (G, g, E)
        top_p, top_e = probs.topk(k, dim=-1)  # (G, g, k)
        pos = self.buffer_slots(top_p.detach(), top_e)  # (G, g, k) buffer slot
        if k > 1:  # renormalised over the k choices (GShard); top-1 keeps its probability (Switch): renormalised,
            top_p = top_p / top_p.sum(-1, keepdim=True)  # its gate would be 1 and the router learn only from aux
        keep = pos < C
        self.hook_choice(torch.where(keep, top_e, -1))
        self.hook_choice_gate(torch.where(keep, top_p, 0.0))
        self.dropped, self.assignments = (~keep).sum(), keep.numel()

        # Kept assignments scatter into their (group, expert, slot); dropped ones into one spare slot past the
        # end, cut off after. No nonzero(): nothing here waits for the device.
        spare = G * E * C
        base = torch.arange(0, spare, E * C, device=x.device).view(G, 1, 1)  # (G, 1, 1) each group's first slot
        where = torch.where(keep, base + top_e * C + pos, spare).view(-1)  # (G·g·k,)
        token = torch.arange(N, device=x.device).view(G, g, 1).expand(G, g, k).reshape(-1)
        slots = torch.full((spare + 1,), N, device=x.device).scatter(0, where, token)[:spare].view(G, E, C)
        gates = top_p.new_zeros(spare + 1).scatter(0, where, top_p.reshape(-1))[:spare].view(G, E, C)
        if self.hook_dispatch.active:
            self.hook_dispatch(torch.where(slots < N, slots - torch.arange(0, G * g, g, device=x.device)
                                           .view(G, 1, 1), -1))
        gates = self.hook_gate(gates)  # an edit (e.g. an expert's gates zeroed) is computed with

        frac_top1 = F.one_hot(top_e[..., 0], E).float().mean(1)  # (G, E)
        balance = E * (frac_top1 * probs.mean(1)).sum(-1).mean()
        z = torch.logsumexp(logits, -1).square().mean()
        self.aux_loss = self.aux_weight * balance + self.z_weight * z

        return dispatch_combine(x, slots, gates, self.experts, self.dispatch, empty=True).view(B, S, d)


def expert_choice_reference(moe: ExpertChoiceMoE, x: torch.Tensor) -> torch.Tensor:
    """The paper's Algorithm 1 verbatim (one-hot dispatch, loop over experts), on moe's weights.

    O(G·E·C·g) memory: kept only as the ground truth that tests compare the fast path against.
    """
    B, S, d = x.shape
    G, g, f = moe.layout(B * S)
    C = capacity(g, f, moe.num_experts)
    x_p = x.reshape(G, g, d)
    logits = torch.einsum("bsd,de->bse", x_p, moe.router.weight.t())
    affinity = torch.einsum("bse->bes", logits.softmax(-1))  # (G, E, g)
    gating, index = affinity.topk(C, dim=-1)  # (G, E, C)
    dispatch = F.one_hot(index, num_classes=g).to(x.dtype)  # (G, E, C, g)
    x_in = torch.einsum("becs,bsd->becd", dispatch, x_p)
    x_e = torch.stack([moe.experts.one(e, x_in[:, e]) for e in range(moe.num_experts)], dim=1)  # (G, E, C, d)
    return torch.einsum("becs,bec,becd->bsd", dispatch, gating, x_e).reshape(B, S, d)
