"""The sparse layers: fast EC dispatch equals the paper's Algorithm 1; capacity, grouping and token choice."""

import pytest
import torch

from ecviz.hooks import hooks
from ecviz.routing import (
    ExpertChoiceMoE,
    TokenChoiceMoE,
    capacity,
    check_group_size,
    dispatch_impl,
    expert_choice_reference,
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(
    "B,S,d,E,g,f",
    [
        (4, 16, 32, 4, 32, 2.0),  # two images per group
        (2, 64, 48, 8, 64, 2.0),  # one image per group
        (2, 64, 24, 8, 16, 2.0),  # a quarter image per group
        (3, 32, 24, 16, 96, 2.0),  # three images per group, many experts
        (8, 16, 16, 3, 16, 1.5),  # capacity rounds (16·1.5/3 = 8), odd expert count
        (1, 128, 64, 32, 128, 2.0),  # E=32 as in the paper's largest layers
    ],
)
def test_fast_expert_choice_equals_algorithm_1(B, S, d, E, g, f):
    torch.manual_seed(B * 1000 + S + E)
    fast = ExpertChoiceMoE(d, 4 * d, E, f, g)
    with torch.no_grad():  # non-zero biases so their gradients are checked too
        fast.experts.b1.normal_()
        fast.experts.b2.normal_()
    x = torch.randn(B, S, d)
    grad_out = torch.randn(B, S, d)

    def run(fn):
        fast.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = fn(fast, xi)
        (out * grad_out).sum().backward()
        grads = {"x": xi.grad} | {n: p.grad.clone() for n, p in fast.named_parameters()}
        return out.detach(), grads

    out, grads = run(lambda m, xi: m(xi))
    ref, ref_grads = run(expert_choice_reference)
    assert rel_err(out, ref) <= 1e-5
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) <= 1e-5, name
    assert grads["router.weight"].abs().sum() > 0  # the router learns through the gates


def record(moe, x, names=("hook_dispatch", "hook_gate", "hook_group", "hook_affinity")):
    seen = {}
    with hooks(moe, {n: (lambda t, name: seen.__setitem__(name, t.clone())) for n in names}):
        out = moe(x)
    return out, seen


def test_each_expert_takes_exactly_C_distinct_tokens_of_its_group():
    torch.manual_seed(0)
    moe = ExpertChoiceMoE(32, 64, experts=8, capacity_factor=2.0, group_size=64).eval()
    x = torch.randn(4, 32, 32)  # 128 tokens: 2 groups of 64 tokens (2 images each)
    _, seen = record(moe, x)
    dispatch, gate, group, aff = seen["hook_dispatch"], seen["hook_gate"], seen["hook_group"], seen["hook_affinity"]
    assert dispatch.shape == (2, 8, 16) and capacity(64, 2.0, 8) == 16
    for gi in range(2):
        for e in range(8):
            idx = dispatch[gi, e]
            assert len(set(idx.tolist())) == 16 and idx.min() >= 0 and idx.max() < 64
            # they are this expert's 16 highest-affinity tokens of the group, best first
            assert torch.equal(idx, aff[gi, :, e].topk(16).indices)
            assert torch.all(gate[gi, e][:-1] >= gate[gi, e][1:])
    assert torch.equal(group, torch.arange(128).view(2, 64))  # consecutive tokens: images 0-1, then 2-3
    assert torch.allclose(aff.sum(-1), torch.ones(2, 64))


def test_groups_route_independently():
    """Changing one group's tokens never changes another group's routing or output."""
    torch.manual_seed(1)
    moe = ExpertChoiceMoE(16, 32, experts=4, capacity_factor=2.0, group_size=32)
    x = torch.randn(4, 16, 16)
    y = x.clone()
    y[2:] = torch.randn(2, 16, 16)  # second group only
    (a, sa), (b, sb) = record(moe, x), record(moe, y)
    assert torch.equal(a[:2], b[:2]) and torch.equal(sa["hook_dispatch"][0], sb["hook_dispatch"][0])
    assert not torch.equal(a[2:], b[2:])


def test_training_and_inference_group_sizes_differ():
    moe = ExpertChoiceMoE(16, 32, experts=4, capacity_factor=2.0, group_size=64, infer_group_size=16,
                          infer_capacity_factor=1.0)
    x = torch.randn(4, 16, 16)
    _, train = record(moe.train(), x)
    _, infer = record(moe.eval(), x)
    assert train["hook_dispatch"].shape == (1, 4, 32)
    assert infer["hook_dispatch"].shape == (4, 4, 4)


def test_token_choice_respects_capacity_and_priority():
    torch.manual_seed(2)
    E, g, k = 4, 32, 2
    moe = TokenChoiceMoE(16, 32, E, 1.0, g, top_k=k, aux_weight=0.01, z_weight=0.001)  # C = 8 slots
    with torch.no_grad():
        moe.router.weight[0] += 3.0  # unbalanced router: many tokens want expert 0, so some are dropped
    x = torch.randn(2, 32, 16) + 1.0
    out, seen = record(moe, x, ("hook_dispatch", "hook_gate", "hook_choice", "hook_affinity"))
    dispatch, choice, probs = seen["hook_dispatch"], seen["hook_choice"], seen["hook_affinity"]
    C = capacity(g, 1.0, E)
    assert dispatch.shape == (2, E, C) and choice.shape == (2, g, k)
    dropped = int((choice < 0).sum())
    assert dropped > 0 and int(moe.dropped) == dropped
    kept = (dispatch >= 0).sum()
    assert int(kept) == 2 * g * k - dropped
    top = probs.topk(k, -1).indices
    for gi in range(2):
        for e in range(E):
            tokens = dispatch[gi, e][dispatch[gi, e] >= 0].tolist()
            assert len(tokens) == len(set(tokens)) <= C
            for s in tokens:  # a token in expert e's buffer chose e
                assert e in choice[gi, s].tolist() and e in top[gi, s].tolist()
        # first choices fill buffers before any second choice: a kept second choice of expert e means
        # no first choice of e was dropped
        for e in range(E):
            first_dropped = ((top[gi, :, 0] == e) & (choice[gi, :, 0] < 0)).any()
            second_kept = (choice[gi, :, 1] == e).any()
            assert not (first_dropped and second_kept)
    assert moe.aux_loss > 0
    # a dropped token gets no expert output: with every assignment of a token dropped its output is 0
    none = (choice < 0).all(-1)
    if none.any():
        assert out.view(2, g, 16)[none].abs().max() == 0


def fill_buffers(probs: torch.Tensor, k: int, C: int, priority: str) -> tuple[list[list[int]], list[list[int]]]:
    """Plain-Python oracle for one group: probs (g, E) -> (each expert's buffer of tokens in slot order, each
    token's k kept experts, -1 where dropped). First choices before second; within a rank by top-1
    probability (stable: ties keep token order) or by position."""
    g, E = probs.shape
    top_p, top_e = probs.topk(k, -1)
    tokens = list(range(g))
    if priority == "score":
        tokens = sorted(tokens, key=lambda s: -top_p[s, 0].item())
    buffers: list[list[int]] = [[] for _ in range(E)]
    choice = [[-1] * k for _ in range(g)]
    for r in range(k):
        for s in tokens:
            e = int(top_e[s, r])
            if len(buffers[e]) < C:
                buffers[e].append(s)
                choice[s][r] = e
    return buffers, choice


@pytest.mark.parametrize("priority", ["score", "position"])
@pytest.mark.parametrize("E,g,k,f", [(4, 32, 2, 1.0), (8, 16, 2, 2.0), (3, 24, 1, 1.0), (6, 48, 3, 1.5)])
def test_token_choice_keeps_exactly_the_highest_priority_assignments(priority, E, g, k, f):
    """The fast buffer fill equals a plain loop over assignments in priority order: same buffers, same slots."""
    C = capacity(g, f, E)
    for seed in range(3):
        torch.manual_seed(seed)
        moe = TokenChoiceMoE(8, 16, E, f, g, top_k=k, priority=priority)
        with torch.no_grad():
            moe.router.weight.mul_(4.0)[0] += 1.0  # peaked and unbalanced: buffers overflow
        x = torch.randn(3, g, 8)  # 3 groups
        _, seen = record(moe, x, ("hook_dispatch", "hook_gate", "hook_choice", "hook_choice_gate", "hook_affinity"))
        assert moe.dropped > 0
        for gi in range(3):
            buffers, choice = fill_buffers(seen["hook_affinity"][gi], k, C, priority)
            assert seen["hook_choice"][gi].tolist() == choice
            for e in range(E):
                assert len(buffers[e]) <= C
                assert seen["hook_dispatch"][gi, e].tolist() == buffers[e] + [-1] * (C - len(buffers[e]))
                for slot, s in enumerate(buffers[e]):  # the slot's gate is that token's gate for e
                    r = choice[s].index(e)
                    assert seen["hook_gate"][gi, e, slot] == seen["hook_choice_gate"][gi, s, r] > 0


def half_drop_gap(priority: str, groups: int = 400, g: int = 64) -> float:
    """z-score of (drop rate of a group's first half of tokens - its second half), over many groups of a
    random router on random tokens: ~N(0, 1) when drops do not depend on position."""
    torch.manual_seed(0)
    moe = TokenChoiceMoE(16, 32, 8, 1.0, g, top_k=2, priority=priority)  # C = 8: half the assignments drop
    with torch.no_grad():
        moe.router.weight.normal_()
    _, seen = record(moe, torch.randn(groups, g, 16), ("hook_choice",))
    dropped = (seen["hook_choice"] < 0).float().mean(-1)  # (G, g) fraction of each token's choices dropped
    gap = dropped[:, : g // 2].mean(1) - dropped[:, g // 2:].mean(1)  # (G,) independent across groups
    assert 0.3 < dropped.mean() < 0.7
    return (gap.mean() / (gap.std() / groups**0.5)).item()


def test_token_choice_drops_do_not_depend_on_position():
    """By router score, early and late tokens of a group are dropped alike; in position order (GShard) the
    second half is dropped far more: the artefact that used to show in every token-choice heatmap."""
    assert abs(half_drop_gap("score")) < 3
    assert half_drop_gap("position") < -20


def test_token_choice_priority_is_checked():
    with pytest.raises(ValueError, match="priority 'random'"):
        TokenChoiceMoE(8, 16, 4, 2.0, 16, priority="random")


def test_token_choice_balanced_loss_is_minimal_for_uniform_router():
    moe = TokenChoiceMoE(8, 16, 4, 2.0, 16, top_k=2, aux_weight=1.0)
    with torch.no_grad():
        moe.router.weight.zero_()
    moe(torch.randn(1, 16, 8))
    # uniform probabilities: E · Σ_e (frac_e · 1/E) = 1
    assert moe.aux_loss.item() == pytest.approx(1.0)


def test_bad_group_and_capacity_settings():
    with pytest.raises(ValueError, match="multiple or a divisor"):
        check_group_size(48, 64)
    check_group_size(128, 64)
    check_group_size(16, 64)
    with pytest.raises(ValueError, match="exceeds the routing group size"):
        capacity(32, 16.0, 8)
    assert capacity(4, 0.1, 8) == 1  # at least one token per expert
    moe = ExpertChoiceMoE(8, 16, 4, 2.0, group_size=64)
    with pytest.raises(ValueError, match="do not split into routing groups of 64"):
        moe(torch.randn(3, 16, 8))


def test_auto_dispatches_with_torch_unless_told(monkeypatch):
    """"auto" is the torch path (the Triton kernels, slower on an H200 as they stand, are chosen by name); the
    layer's `dispatch` or ECVIZ_DISPATCH (empty: unset) overrides it; an unknown name is refused, naming where it
    came from, and so is "triton" where Triton is not installed (it was a ModuleNotFoundError traceback)."""
    from ecviz.kernels import triton_available

    monkeypatch.setenv("ECVIZ_DISPATCH", "")
    assert dispatch_impl("auto") == "torch"
    monkeypatch.setenv("ECVIZ_DISPATCH", "triton")
    assert dispatch_impl("torch") == "torch"
    if triton_available():
        assert dispatch_impl("auto") == "triton" and dispatch_impl("triton") == "triton"
    else:
        for impl, where in (("auto", "ECVIZ_DISPATCH"), ("triton", "dispatch")):
            with pytest.raises(ValueError, match=f"{where} 'triton' needs Triton, which is not installed"):
                dispatch_impl(impl)
    with pytest.raises(ValueError, match="dispatch 'cuda' is not one of auto, torch, triton"):
        dispatch_impl("cuda")
    monkeypatch.setenv("ECVIZ_DISPATCH", "bogus")
    with pytest.raises(ValueError, match="ECVIZ_DISPATCH 'bogus' is not one of"):
        dispatch_impl("auto")


def test_top1_token_choice_router_learns_from_the_task_loss():
    """With k = 1 the gate renormalised over one choice was exactly 1: the router got no gradient from the task
    loss (only from the aux loss). It keeps its probability (Switch), so the task loss reaches the router."""
    torch.manual_seed(0)
    moe = TokenChoiceMoE(16, 32, 4, 2.0, 32, top_k=1, aux_weight=0.0)
    moe(torch.randn(2, 16, 16)).pow(2).sum().backward()
    assert moe.router.weight.grad.abs().max() > 1e-2
