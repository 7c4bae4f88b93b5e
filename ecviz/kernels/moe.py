"""Fused expert-choice dispatch (Triton): the layer of `ecviz.routing.dispatch_combine` in three kernels.

EC-DiT's sparse layer (Eq. 7-8) computes, for every expert e and each of its T = G·C slots t holding token
row r = rows[e, t] with gate w = gates[e, t],

    out[n] = Σ_{(e, t): rows[e, t] = n} w · (GELU(x[r] W1[e] + b1[e]) W2[e] + b2[e]).

The pure-torch path (`dispatch="torch"`) does this in eight passes: gather x[rows], batched matmul with
bias, GELU, batched matmul with bias, gate multiply, a zero-filled output, and an atomic `index_add_`. On an
H100 everything but the two matmuls ran as unfused element-wise work (issue 11's profile). Here:

1. `_gather_up`: one grouped matmul whose A operand is gathered from x by row index (no x[rows] copy) and
   whose epilogue adds the bias and applies GELU (tanh form), writing h (E, T, H) (and, for training, the
   pre-activation z that the backward needs).
2. the down-projection stays `torch.baddbmm` (cuBLAS, with its bias).
3. `_combine`: each token's output is the gate-weighted sum of its slots' rows, read through a (N, E) table
   of slot indices (an expert takes a token at most once per group, so a token has at most one slot per
   expert): no zero fill, no atomics, the gate multiply fused, a fixed summation order (deterministic).

The backward: `_combine_bwd` gives d_y = w · d_out[r] and d_w = <d_out[r], y> in one pass over the slots; the
up-projection's weight gradients are batched matmuls, and its input gradient is `_combine` again (ungated).
Token choice uses the same path: its empty slots hold row N and are masked.

Number formats: under autocast the inputs and expert weights are cast to the autocast format (bf16 on CUDA);
products accumulate in float32; the combine sums in float32 and returns x's dtype, as the torch path does.
Without a gradient the cast weights are kept per weight version (`cast_params`), so a sampling loop casts them
once, as autocast's own cache does within its context. Under Triton's interpreter (TRITON_INTERPRET=1, numpy
on the CPU) the kernels upcast bf16 operands to float32 before `tl.dot`, which multiplies bf16 values exactly
as the tensor cores do; the tests run them that way against Algorithm 1.

GPU speed, measured on an H200 (2026-11-27, bf16, XL shape, `benchmarks/gpu.py`; BENCHMARKS.md): this path
is 1.1-1.4x SLOWER than the torch one (EC forward at group 1024: 0.75 against 0.66 ms; the dense FFN of equal
FLOPs 0.28 ms), so "auto" does not pick it. `benchmarks/gpu_profile.py` lists the kernels; the gathered
up-projection (`_gather_up_kernel`, untuned tiles) is what to make faster first. Every kernel here compiles
for sm_90 without a GPU (tests/test_kernels.py builds them ahead of time), and runs under the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ecviz.errors import EcvizError
from ecviz.kernels import interpreting

GELU_C = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi); a global a kernel reads must be a constexpr


# ---- kernels ------------------------------------------------------------------------------------------------
@triton.jit
def _gather_up_kernel(x_ptr, rows_ptr, w_ptr, b_ptr, h_ptr, z_ptr, N, T, D, H,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, STORE_Z: tl.constexpr,
                      UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """h[e, t] = GELU(x[rows[e, t]] @ W[e] + b[e]) for a (BM slots, BN hidden) tile of expert e.
    x (N, D); rows (E, T), N: an empty slot (reads zeros); W (E, D, H); b (E, H); h, z (E, T, H)."""
    pid = tl.program_id(0)
    e = tl.program_id(1).to(tl.int64)
    num_m = tl.cdiv(T, BM)
    pid_m = pid % num_m  # slot tiles fastest: the tiles sharing a weight tile run together (L2 reuse)
    pid_n = pid // num_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    in_m = offs_m < T
    in_n = offs_n < H
    r = tl.load(rows_ptr + e * T + offs_m, mask=in_m, other=N).to(tl.int64)
    valid = in_m & (r < N)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, D, BK):
        kk = k + offs_k
        a = tl.load(x_ptr + r[:, None] * D + kk[None, :], mask=valid[:, None] & (kk[None, :] < D), other=0.0)
        b = tl.load(w_ptr + e * D * H + kk[:, None] * H + offs_n[None, :],
                    mask=(kk[:, None] < D) & in_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=PRECISION)
    bias = tl.load(b_ptr + e * H + offs_n, mask=in_n, other=0.0).to(tl.float32)
    z = acc + bias[None, :]
    u = GELU_C * (z + 0.044715 * z * z * z)
    u = tl.minimum(tl.maximum(u, -20.0), 20.0)  # tanh(±20) is ±1 in float32; exp stays finite
    h = z * tl.sigmoid(2.0 * u)  # 0.5·z·(1 + tanh(u)) = z·sigmoid(2u)
    out = e * T * H + offs_m[:, None] * H + offs_n[None, :]
    mask = in_m[:, None] & in_n[None, :]
    tl.store(h_ptr + out, h.to(h_ptr.dtype.element_ty), mask=mask)
    if STORE_Z:
        tl.store(z_ptr + out, z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_kernel(y_ptr, gate_ptr, table_ptr, out_ptr, N, D, E,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GATED: tl.constexpr):
    """out[n] = Σ_e gate[s]·y[s] over s = table[n, e] >= 0, for a (BLOCK_N tokens, BLOCK_D) tile.
    y (E·T, D) slot rows; gate (E·T,); table (N, E) flat slot index or -1; out (N, D)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_n = offs_n < N
    in_d = offs_d < D
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for e in range(E):
        s = tl.load(table_ptr + offs_n.to(tl.int64) * E + e, mask=in_n, other=-1).to(tl.int64)
        has = s >= 0
        v = tl.load(y_ptr + s[:, None] * D + offs_d[None, :], mask=has[:, None] & in_d[None, :], other=0.0)
        v = v.to(tl.float32)
        if GATED:
            w = tl.load(gate_ptr + s, mask=has, other=0.0).to(tl.float32)
            v = v * w[:, None]
        acc += v
    tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=in_n[:, None] & in_d[None, :])


@triton.jit
def _combine_bwd_kernel(dout_ptr, y_ptr, gate_ptr, rows_ptr, dy_ptr, dgate_ptr, S, N, D,
                        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """For BLOCK_S slots s with token r = rows[s]: dy[s] = gate[s]·dout[r] and dgate[s] = <dout[r], y[s]>
    (both 0 for an empty slot, r = N). dout (N, D); y, dy (S, D); gate, dgate, rows (S,)."""
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    in_s = offs_s < S
    r = tl.load(rows_ptr + offs_s, mask=in_s, other=N).to(tl.int64)
    valid = in_s & (r < N)
    w = tl.load(gate_ptr + offs_s, mask=valid, other=0.0).to(tl.float32)
    dot = tl.zeros((BLOCK_S,), dtype=tl.float32)
    slot = offs_s.to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        in_d = offs_d < D
        go = tl.load(dout_ptr + r[:, None] * D + offs_d[None, :], mask=valid[:, None] & in_d[None, :], other=0.0)
        go = go.to(tl.float32)
        yv = tl.load(y_ptr + slot[:, None] * D + offs_d[None, :], mask=valid[:, None] & in_d[None, :], other=0.0)
        dot += tl.sum(go * yv.to(tl.float32), axis=1)
        tl.store(dy_ptr + slot[:, None] * D + offs_d[None, :], (go * w[:, None]).to(dy_ptr.dtype.element_ty),
                 mask=in_s[:, None] & in_d[None, :])
    tl.store(dgate_ptr + offs_s, dot, mask=in_s)


# ---- launch ----------------------------------------------------------------------------------------------------
def _tiles(device: torch.device) -> dict:
    """Tile sizes and launch settings of `_gather_up_kernel`: small ones for the interpreter (any size runs
    there; small tiles keep tiny test shapes quick), Hopper-sized ones on a GPU (not tuned on one yet)."""
    if device.type != "cuda":
        return dict(BM=16, BN=32, BK=16)
    return dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for bf16 and fp16 operands


def gather_up(x: torch.Tensor, rows: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
              store_z: bool, tiles: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(h, z): h = GELU(x[rows] @ w + b), (E, T, H), and its pre-activation z if asked. tiles: BM, BN, BK
    (and on a GPU num_warps, num_stages) instead of `_tiles`' (benchmarks/gpu_anatomy.py sweeps them)."""
    N, D = x.shape
    E, T = rows.shape
    H = w.shape[2]
    h = torch.empty(E, T, H, device=x.device, dtype=x.dtype)
    z = torch.empty_like(h) if store_z else h  # z_ptr is not written without STORE_Z
    t = tiles or _tiles(x.device)
    grid = (triton.cdiv(T, t["BM"]) * triton.cdiv(H, t["BN"]), E)
    _gather_up_kernel[grid](x, rows, w, b, h, z, N, T, D, H, STORE_Z=store_z, UPCAST=interpreting(),
                            PRECISION=_precision(x.dtype), **t)
    return h, (z if store_z else None)


def combine(y: torch.Tensor, gate: torch.Tensor | None, table: torch.Tensor,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """out (N, D) = Σ over each token's slots of gate·y (gate None: plain sum), summed in float32 and stored in
    `dtype` (default y's). y (E·T, D); table (N, E)."""
    N, E = table.shape
    D = y.shape[1]
    out = torch.empty(N, D, device=y.device, dtype=dtype or y.dtype)
    block_d = min(128, triton.next_power_of_2(D))
    grid = (triton.cdiv(N, 16), triton.cdiv(D, block_d))
    _combine_kernel[grid](y, y if gate is None else gate, table, out, N, D, E, BLOCK_N=16, BLOCK_D=block_d,
                          GATED=gate is not None)
    return out


def combine_bwd(dout: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy (S, D), dgate (S,) float32) of `combine`; rows (S,) each slot's token (N: empty)."""
    S, D = y.shape
    dy = torch.empty_like(y)
    dgate = torch.empty(S, device=y.device, dtype=torch.float32)
    block_d = min(128, triton.next_power_of_2(D))
    _combine_bwd_kernel[(triton.cdiv(S, 16),)](dout, y, gate, rows, dy, dgate, S, dout.shape[0], D,
                                               BLOCK_S=16, BLOCK_D=block_d)
    return dy, dgate


def slot_table(rows: torch.Tensor, n: int) -> torch.Tensor:
    """(N, E) int32: the flat slot index e·T + t of token n in expert e's slots, or -1. rows (E, T), n: empty."""
    E, T = rows.shape
    table = torch.full(((n + 1) * E,), -1, dtype=torch.int32, device=rows.device)  # row n: where empties land
    expert = torch.arange(E, device=rows.device).repeat_interleave(T)
    table[rows.reshape(-1) * E + expert] = torch.arange(E * T, dtype=torch.int32, device=rows.device)
    return table.view(n + 1, E)[:n].contiguous()


def compile_all(arch: int = 90) -> dict[str, int]:
    """Compile every kernel ahead of time for CUDA compute capability `arch` (90: Hopper), as the launches above
    configure them on a GPU, for bf16 and float32 operands, without a GPU (Triton's own ptxas): {kernel
    variant: shared memory bytes}. Raises what Triton raises, e.g. for code the interpreter accepts and the
    compiler does not. Needs TRITON_INTERPRET unset (the kernels must be JIT functions, not interpreted)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    tiles = _tiles(torch.device("cuda"))
    launch = {k: tiles.pop(k) for k in ("num_warps", "num_stages")}
    out = {}

    def build(fn, signature: dict, constexprs: dict, name: str, **options) -> None:
        sig = {**signature, **{k: "constexpr" for k in constexprs}}
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target,
                                options=options)
        out[name] = kernel.metadata.shared

    for dt, torch_dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for store_z in (True, False):
            build(_gather_up_kernel, {"x_ptr": f"*{dt}", "rows_ptr": "*i64", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}",
                                      "h_ptr": f"*{dt}", "z_ptr": f"*{dt}", "N": "i32", "T": "i32", "D": "i32",
                                      "H": "i32"},
                  {**tiles, "STORE_Z": store_z, "UPCAST": False, "PRECISION": _precision(torch_dt)},
                  f"gather_up[{dt}, store_z={store_z}]", **launch)
        for gated in (True, False):
            build(_combine_kernel, {"y_ptr": f"*{dt}", "gate_ptr": "*fp32", "table_ptr": "*i32",
                                    "out_ptr": f"*{dt}", "N": "i32", "D": "i32", "E": "i32"},
                  {"BLOCK_N": 16, "BLOCK_D": 128, "GATED": gated}, f"combine[{dt}, gated={gated}]")
        build(_combine_bwd_kernel, {"dout_ptr": f"*{dt}", "y_ptr": f"*{dt}", "gate_ptr": "*fp32",
                                    "rows_ptr": "*i64", "dy_ptr": f"*{dt}", "dgate_ptr": "*fp32", "S": "i32",
                                    "N": "i32", "D": "i32"},
              {"BLOCK_S": 16, "BLOCK_D": 128}, f"combine_bwd[{dt}]")
    return out


# ---- autograd --------------------------------------------------------------------------------------------------
class GatherUp(torch.autograd.Function):
    """h = GELU(x[rows] @ w1 + b1), (E, T, H); x (N, D), rows (E, T), table (N, E), w1 (E, D, H), b1 (E, H).
    train: whether a backward will follow (then the pre-activation is kept for it)."""

    @staticmethod
    def forward(ctx, x, rows, table, w1, b1, train):
        h, z = gather_up(x, rows, w1, b1, store_z=train)
        if train:
            ctx.save_for_backward(x, rows, table, w1, z)
        return h

    @staticmethod
    def backward(ctx, dh):
        x, rows, table, w1, z = ctx.saved_tensors
        D = x.shape[1]
        E, T = rows.shape
        dz = torch.ops.aten.gelu_backward(dh.contiguous(), z, approximate="tanh")  # (E, T, H)
        x_in = torch.cat([x, x.new_zeros(1, D)]).index_select(0, rows.reshape(-1)).view(E, T, D)
        dw1 = torch.bmm(x_in.transpose(1, 2), dz) if ctx.needs_input_grad[3] else None  # (E, D, H)
        db1 = dz.sum(1) if ctx.needs_input_grad[4] else None  # (E, H)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = combine(torch.bmm(dz, w1.transpose(1, 2)).view(E * T, D), None, table)  # (N, D)
        return dx, None, None, dw1, db1, None


class Combine(torch.autograd.Function):
    """out (N, D) = Σ over each token's slots of gate·y, in `dtype`; y (E, T, D), gate (E, T) float32,
    rows (E, T), table (N, E)."""

    @staticmethod
    def forward(ctx, y, gate, rows, table, dtype):
        E, T, D = y.shape
        ctx.save_for_backward(y, gate, rows)
        return combine(y.view(E * T, D), gate.reshape(-1), table, dtype)

    @staticmethod
    def backward(ctx, dout):
        y, gate, rows = ctx.saved_tensors
        E, T, D = y.shape
        dy, dgate = combine_bwd(dout.contiguous(), y.view(E * T, D), gate.reshape(-1), rows.reshape(-1))
        return dy.view(E, T, D), dgate.view(E, T).to(gate.dtype), None, None, None


def cast_params(experts, dtype: torch.dtype) -> list[torch.Tensor]:
    """The experts' (w1, b1 (E, H), w2, b2) in `dtype`. With gradients the casts are part of the graph (once
    per forward, as under autocast); without, they are kept and reused while the weights are unchanged."""
    params = [experts.w1, experts.b1.squeeze(1), experts.w2, experts.b2]
    if all(p.dtype == dtype for p in params):
        return params
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        experts._ecviz_cast = None  # training: no stale copies held beside the optimizer's weights
        return [p.to(dtype) for p in params]
    key = (dtype, *((p.data_ptr(), p._version) for p in (experts.w1, experts.b1, experts.w2, experts.b2)))
    cached = getattr(experts, "_ecviz_cast", None)
    if cached is None or cached[0] != key:
        cached = (key, [p.detach().to(dtype).contiguous() for p in params])
        experts._ecviz_cast = cached
    return cached[1]


def expert_ffn(x: torch.Tensor, slots: torch.Tensor, gates: torch.Tensor, experts) -> torch.Tensor:
    """`ecviz.routing.dispatch_combine` fused: x (N, d); slots (G, E, C) rows of x (N: empty); gates (G, E, C)
    -> (N, d) in x's dtype (as the torch path gives it); the experts run in the autocast format if autocast
    is on, else in x's."""
    if not (x.is_cuda or interpreting()):
        raise EcvizError("the triton dispatch runs on CUDA tensors, or on the CPU under TRITON_INTERPRET=1")
    N, E = x.shape[0], slots.shape[1]
    kind = x.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
    rows = slots.transpose(0, 1).reshape(E, -1).contiguous()  # (E, T) expert-major, T = G·C
    gate = gates.transpose(0, 1).reshape(E, -1).float().contiguous()  # (E, T)
    table = slot_table(rows, N)  # (N, E)
    w1, b1, w2, b2 = cast_params(experts, dtype)
    x_in = x.to(dtype).contiguous()
    train = torch.is_grad_enabled() and any(t.requires_grad for t in (x_in, w1, b1))
    with torch.autocast(kind, enabled=False):
        h = GatherUp.apply(x_in, rows, table, w1, b1, train)  # (E, T, H)
        y = torch.baddbmm(b2, h, w2)  # (E, T, d)
        return Combine.apply(y, gate, rows, table, x.dtype)  # (N, d)
