"""The fused Triton dispatch (ecviz.kernels.moe) equals the paper's Algorithm 1 and the torch path: outputs and
every gradient, in float32 and under bf16 autocast, for expert choice and for token choice with drops.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before Triton is imported);
with one, compiled on it. Skipped where Triton is not installed (`pip install -e ".[triton]"`)."""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined: they run in numpy
pytest.importorskip("triton", reason="Triton is not installed (the optional extra: pip install -e '.[triton]')")

from ecviz.kernels import moe  # noqa: E402
from ecviz.routing import ExpertChoiceMoE, TokenChoiceMoE, dispatch_impl, expert_choice_reference  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")
BF16_TOL = 2e-2  # bf16 keeps 8 bits of mantissa: products of ~100 terms land within a few 1e-3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def layer(cls, d, E, g, f, seed, **kw):
    torch.manual_seed(seed)
    m = cls(d, 4 * d, E, f, g, **kw).to(DEV)
    with torch.no_grad():  # non-zero biases so their gradients are checked too
        m.experts.b1.normal_()
        m.experts.b2.normal_()
    return m


def run(m, fn, x, grad_out, fmt=torch.float32):
    """(output, {input and parameter gradients}) of fn(m, x) under autocast in `fmt`."""
    m.zero_grad()
    xi = x.clone().requires_grad_(True)
    with torch.autocast(DEV.type, dtype=fmt, enabled=fmt != torch.float32):
        out = fn(m, xi)
    (out.float() * grad_out).sum().backward()
    return out.detach(), {"x": xi.grad} | {n: p.grad.clone() for n, p in m.named_parameters()}


def fused(m, x):
    m.dispatch = "triton"
    return m(x)


def plain(m, x):
    m.dispatch = "torch"
    return m(x)


@pytest.mark.parametrize(("B", "S", "d", "E", "g", "f"), [
    (4, 16, 32, 4, 32, 2.0),  # two images per group
    (2, 64, 24, 8, 16, 2.0),  # a quarter image per group; d not a multiple of the tiles
    (8, 16, 16, 3, 16, 1.5),  # odd expert count, capacity rounds
])
def test_fused_dispatch_equals_algorithm_1(B, S, d, E, g, f):
    m = layer(ExpertChoiceMoE, d, E, g, f, seed=B * 100 + E)
    x, grad_out = torch.randn(B, S, d, device=DEV), torch.randn(B, S, d, device=DEV)
    out, grads = run(m, fused, x, grad_out)
    ref, ref_grads = run(m, expert_choice_reference, x, grad_out)
    assert rel_err(out, ref) <= 1e-5
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) <= 1e-5, name
    assert grads["router.weight"].abs().sum() > 0  # the gates' gradient reaches the router


def test_fused_dispatch_in_bf16_is_algorithm_1_within_bf16_tolerance():
    """Under bf16 autocast the experts run in bf16 and routing stays float32 (the same tokens as Algorithm 1
    in float32 take each expert): outputs and gradients within bf16 tolerance of the float32 reference and as
    close to it as the torch path under autocast."""
    m = layer(ExpertChoiceMoE, 32, 4, 32, 2.0, seed=5)
    x, grad_out = torch.randn(4, 16, 32, device=DEV), torch.randn(4, 16, 32, device=DEV)
    ref, ref_grads = run(m, expert_choice_reference, x, grad_out)
    out, grads = run(m, fused, x, grad_out, torch.bfloat16)
    _, torch_grads = run(m, plain, x, grad_out, torch.bfloat16)
    assert out.dtype == torch.float32  # x's format, as the torch path returns it under autocast
    assert 0 < rel_err(out, ref) <= BF16_TOL  # not zero: the experts did run in bf16
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) <= BF16_TOL, name
        assert rel_err(grads[name], ref_grads[name]) <= 3 * rel_err(torch_grads[name], ref_grads[name]) + 1e-3, name


def test_fused_dispatch_of_a_bf16_model():
    m = layer(ExpertChoiceMoE, 32, 4, 32, 2.0, seed=6)
    x = torch.randn(4, 16, 32, device=DEV)
    with torch.no_grad():
        ref = expert_choice_reference(m, x)
        m.to(torch.bfloat16)
        out = fused(m, x.bfloat16())
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) <= BF16_TOL


@pytest.mark.parametrize("k", [2, 3])  # (k = 1: normalised gates are 1, the router gets no gradient to compare)
def test_fused_token_choice_equals_the_torch_path_with_drops(k):
    m = layer(TokenChoiceMoE, 24, 4, 32, 1.0, seed=7, top_k=k)
    with torch.no_grad():
        m.router.weight.mul_(4.0)[0] += 1.0  # peaked and unbalanced: buffers overflow, slots stay empty
    x, grad_out = torch.randn(3, 32, 24, device=DEV), torch.randn(3, 32, 24, device=DEV)
    out, grads = run(m, fused, x, grad_out)
    assert m.dropped > 0
    ref, ref_grads = run(m, plain, x, grad_out)
    assert rel_err(out, ref) <= 1e-5
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) <= 1e-5, name


def test_kernels_on_ragged_shapes():
    """Slot counts, widths and hidden sizes that fill no tile exactly; a slot table read back by hand."""
    torch.manual_seed(8)
    N, E, T, D, H = 37, 3, 21, 19, 45
    x = torch.randn(N, D, device=DEV)
    rows = torch.stack([torch.randperm(N + 5, device=DEV)[:T] for _ in range(E)]).clamp(max=N)  # some empty (N)
    w, b = torch.randn(E, D, H, device=DEV), torch.randn(E, H, device=DEV)
    h, z = moe.gather_up(x, rows, w, b, store_z=True)
    x_in = torch.cat([x, x.new_zeros(1, D)])[rows]  # (E, T, D)
    want_z = torch.bmm(x_in, w) + b[:, None]
    assert rel_err(z, want_z) <= 1e-5 and rel_err(h, torch.nn.functional.gelu(want_z, approximate="tanh")) <= 1e-5
    table = moe.slot_table(rows, N)
    for e in range(E):
        for t in range(T):
            r = int(rows[e, t])
            if r < N:
                assert table[r, e] == e * T + t
    assert (table >= 0).sum() == (rows < N).sum()
    y, gate = torch.randn(E * T, D, device=DEV), torch.rand(E * T, device=DEV)
    want = torch.zeros(N + 1, D, device=DEV).index_add_(0, rows.reshape(-1), y * gate[:, None])[:N]
    assert rel_err(moe.combine(y, gate, table), want) <= 1e-6
    dout = torch.randn(N, D, device=DEV)
    dy, dgate = moe.combine_bwd(dout, y, gate, rows.reshape(-1))
    g = torch.cat([dout, dout.new_zeros(1, D)])[rows.reshape(-1)]
    assert rel_err(dy, g * gate[:, None]) <= 1e-6 and rel_err(dgate, (g * y).sum(1)) <= 1e-5


def test_fused_dispatch_is_deterministic():
    """A fixed summation order (no atomics): the same input gives the same bits."""
    m = layer(ExpertChoiceMoE, 16, 4, 32, 2.0, seed=9)
    x, grad_out = torch.randn(4, 16, 16, device=DEV), torch.randn(4, 16, 16, device=DEV)
    (a, ga), (b, gb) = run(m, fused, x, grad_out), run(m, fused, x, grad_out)
    assert torch.equal(a, b) and all(torch.equal(ga[k], gb[k]) for k in ga)


def test_weights_cast_once_for_sampling_and_again_after_a_change():
    m = layer(ExpertChoiceMoE, 16, 4, 32, 2.0, seed=10)
    with torch.no_grad():
        first = moe.cast_params(m.experts, torch.bfloat16)
        assert all(a is b for a, b in zip(first, moe.cast_params(m.experts, torch.bfloat16), strict=True))
        m.experts.w1.add_(1.0)  # an optimizer step, a weight load: the cached copy is stale
        again = moe.cast_params(m.experts, torch.bfloat16)
    assert again[0] is not first[0] and torch.equal(again[0], m.experts.w1.bfloat16())
    trained = moe.cast_params(m.experts, torch.bfloat16)  # with gradients: cast in the graph, nothing kept
    assert trained[0].requires_grad and m.experts._ecviz_cast is None


def test_auto_is_torch_everywhere_and_cpu_tensors_need_the_interpreter(monkeypatch):
    """"auto" is the torch dispatch on CUDA too: the fused one measured slower on an H200 (BENCHMARKS.md)."""
    monkeypatch.delenv("ECVIZ_DISPATCH", raising=False)
    assert dispatch_impl("auto") == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not CUDA:
        with pytest.raises(ValueError, match="runs on CUDA tensors, or on the CPU under TRITON_INTERPRET=1"):
            fused(layer(ExpertChoiceMoE, 16, 4, 32, 2.0, seed=0), torch.zeros(2, 16, 16))


def test_every_kernel_compiles_for_hopper_without_a_gpu():
    """Ahead of time, for sm_90 with Triton's own ptxas: catches what the interpreter lets through and the GPU
    compiler refuses (a non-constexpr global read in a kernel failed this way on the first H200 run)."""
    import subprocess
    import sys

    code = "from ecviz.kernels.moe import compile_all; print(len(compile_all(90)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-1] == "10"  # gather_up x2, combine x2, combine_bwd: each for bf16 and float32
