"""The EC layer's forward taken apart (issue 11): each stage timed alone with CUDA events, beside the dense FFN's
stages, and the fused up-projection's tile sizes swept, so that one short GPU call says where the layer's time
over the dense FFN goes and which tiles to ship.

Why: benchmarks/gpu.py measured the EC layer at 2.3x the FLOP-matched dense FFN on an H200 (target 1.2x) and
the fused Triton path slower than the torch one; a kernel profile taken beside other jobs could not say why
(time-sliced kernels read long). Timing the stages alone, interleaved, answers it:

- dense: fc1 (addmm with its bias), GELU, fc2: the floor;
- EC, torch path: routing (float32 router matmul, softmax, top-C), the gather (index_select), the
  up-projection with its bias (baddbmm) and without (bmm), GELU, the down-projection, the gate multiply and
  the zero fill plus index_add_ combine;
- EC, fused path: the slot table, `_gather_up_kernel` at each tile configuration of `TILES` (gathered A rows,
  bias and GELU in the epilogue) and the combine kernel;
- candidates (`cand.*`), torch-level replacements for the torch path's slow stages, each checked against the
  stage it would replace (`max_rel_err` in the JSON, bf16 tolerance) so that the session that measures them can
  adopt a winner without another call: the up-projection as E cuBLASLt matmuls with bias and GELU in their
  epilogue (`torch._addmm_activation`), the combine accumulated in float32, the gate multiply and combine as
  one sparse CSR matmul (no zero fill, no atomics; its build timed apart), and the whole forward composed of
  the fastest of these. A candidate that does not run on the device is recorded with its error, not timed.

Each stage's TFLOP/s (matmuls) or GB/s (the rest: bytes read and written once) is printed beside its time.
Shapes as in gpu.py: d = 1152, E = 32, hidden 4d, f_c = 2, N = 32,768 tokens (or --tokens), bf16, group 1024
(or --group).

Usage: python benchmarks/gpu_anatomy.py [--group 1024] [--repeats 20] [--out benchmarks/results/gpu_anatomy.json]
       python benchmarks/gpu_anatomy.py --device cpu --tiny       (a smoke test; Triton parts under
                                                                    TRITON_INTERPRET=1 only)
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import gpu  # noqa: E402  (benchmarks/gpu.py: shapes, timer, interleaving)

from ecviz.routing import capacity  # noqa: E402

# (BM, BN, BK, num_warps, num_stages) of `_gather_up_kernel` to try on a GPU; the first is today's default
TILES = [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
         (128, 64, 64, 4, 4), (64, 256, 64, 8, 3), (128, 128, 32, 4, 5), (256, 128, 64, 8, 3)]
TINY_TILES = [(16, 32, 16, 4, 1)]


def stages(cfg: dict, group: int, device: torch.device, fused: bool, tiles: list) -> dict:
    """{stage: (callable, flops or None, bytes moved)} for the dense FFN and the EC layer at `group`."""
    d, E, N = cfg["dim"], cfg["experts"], cfg["tokens"]
    H = 4 * d
    bf = gpu.BF16
    layers = gpu.make_layers(cfg, group, device, kinds=("dense", "ec"))
    dense, ec = layers["dense"], layers["ec"].eval()
    G, C = N // group, capacity(group, gpu.FACTOR, E)
    T = G * C  # slots per expert
    x = gpu.layer_inputs(cfg, device)[0].view(N, d)
    with torch.no_grad():
        aff = ec.route(x, group).softmax(-1)  # (G, g, E)
        gate, index = aff.transpose(1, 2).topk(C, dim=-1)  # (G, E, C)
        slots = index + torch.arange(0, G * group, group, device=device).view(G, 1, 1)
        rows = slots.transpose(0, 1).reshape(-1)  # (E·T,)
        x_in = x.index_select(0, rows).view(E, T, d)
        w = ec.experts
        h = F.gelu(torch.baddbmm(w.b1, x_in, w.w1), approximate="tanh")  # (E, T, H)
        y = torch.baddbmm(w.b2, h, w.w2)  # (E, T, d)
        gates = gate.transpose(0, 1).reshape(E, -1, 1).to(bf)
        y_g = y * gates
        hd = dense.fc1(x)  # (N, f_c·4d)
    el = 2  # bytes per bf16 element
    mm_up, mm_down = 2 * E * T * d * H, 2 * E * T * H * d
    out = {
        "dense.fc1": (lambda: dense.fc1(x), 2 * N * d * hd.shape[1], None),
        "dense.gelu": (lambda: F.gelu(hd, approximate="tanh"), None, 2 * hd.numel() * el),
        "dense.fc2": (lambda: dense.fc2(hd), 2 * N * hd.shape[1] * d, None),
        "dense.all": (lambda: dense(x.view(1, N, d)), 2 * 2 * N * d * hd.shape[1], None),
        "ec.route": (lambda: ec.route(x, group).softmax(-1).transpose(1, 2).topk(C, dim=-1), None, None),
        "ec.gather": (lambda: x.index_select(0, rows), None, 2 * E * T * d * el),
        "ec.up_baddbmm": (lambda: torch.baddbmm(w.b1, x_in, w.w1), mm_up, None),
        "ec.up_bmm": (lambda: torch.bmm(x_in, w.w1), mm_up, None),
        "ec.gelu": (lambda: F.gelu(h, approximate="tanh"), None, 2 * h.numel() * el),
        "ec.down_baddbmm": (lambda: torch.baddbmm(w.b2, h, w.w2), mm_down, None),
        "ec.gate_mul": (lambda: y * gates, None, 2 * y.numel() * el),
        "ec.combine_index_add": (lambda: x.new_zeros(x.shape).index_add_(0, rows, y_g.view(-1, d)), None,
                                 (y.numel() + 2 * x.numel()) * el),
        "ec.all_torch": (lambda: ec(x.view(1, N, d)), mm_up + mm_down, None),
    }
    if fused:
        from ecviz.kernels import moe

        rows_et = slots.transpose(0, 1).reshape(E, -1).contiguous()
        table = moe.slot_table(rows_et, N)
        gate_f = gate.transpose(0, 1).reshape(-1).float().contiguous()
        w1, b1 = w.w1.contiguous(), w.b1.squeeze(1).contiguous()
        out["fused.slot_table"] = (lambda: moe.slot_table(rows_et, N), None, None)
        for bm, bn, bk, warps, st in tiles:
            t = dict(BM=bm, BN=bn, BK=bk) | (dict(num_warps=warps, num_stages=st) if device.type == "cuda" else {})
            out[f"fused.gather_up[{bm}x{bn}x{bk},w{warps},s{st}]"] = (
                lambda t=t: moe.gather_up(x, rows_et, w1, b1, store_z=False, tiles=t), mm_up, None)
        out["fused.combine"] = (lambda: moe.combine(y.view(-1, d), gate_f, table), None,
                                (y.numel() + x.numel()) * el)

        def fused_all():
            ec.dispatch = "triton"
            try:
                ec(x.view(1, N, d))
            finally:
                ec.dispatch = "auto"
        out["ec.all_fused"] = (fused_all, mm_up + mm_down, None)
    return out


def candidates(cfg: dict, group: int, device: torch.device) -> tuple[dict, dict]:
    """({stage: (callable, flops, bytes)}, {stage: max relative error against what it replaces, or the error
    message of a candidate that fails here}) for the `cand.*` stages (module docstring)."""
    d, E, N = cfg["dim"], cfg["experts"], cfg["tokens"]
    H = 4 * d
    el = 2
    ec = gpu.make_layers(cfg, group, device, kinds=("ec",))["ec"].eval()
    w = ec.experts
    G, C = N // group, capacity(group, gpu.FACTOR, E)
    T = G * C
    x = gpu.layer_inputs(cfg, device)[0].view(N, d)

    def route():
        gate, index = ec.route(x, group).softmax(-1).transpose(1, 2).topk(C, dim=-1)  # (G, E, C)
        rows = (index + torch.arange(0, G * group, group, device=device).view(G, 1, 1)).transpose(0, 1).reshape(-1)
        return rows, gate.transpose(0, 1).reshape(-1)  # (E·T,) expert-major, and their gates

    def up_lt(x_in):  # (E, T, d) -> (E, T, H): bias and GELU in each matmul's epilogue
        h = x_in.new_empty(E, T, H)
        for e in range(E):
            torch._addmm_activation(w.b1[e, 0], x_in[e], w.w1[e], use_gelu=True, out=h[e])
        return h

    def csr(rows, gates):  # the combine as an (N, E·T) CSR matrix of gates: token n sums its slots
        order = rows.argsort(stable=True)
        crow = torch.zeros(N + 1, dtype=torch.long, device=device)
        crow[1:] = torch.bincount(rows, minlength=N).cumsum(0)
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, order, gates[order].to(x.dtype), size=(N, E * T),
                                       check_invariants=False)

    def combine_f32(y, rows, gates):
        return torch.zeros(N, d, device=device).index_add_(0, rows, (y * gates[:, None]).float()).to(x.dtype)

    with torch.no_grad():
        rows, gates = route()
        x_in = x.index_select(0, rows).view(E, T, d)
        h = F.gelu(torch.baddbmm(w.b1, x_in, w.w1), approximate="tanh")
        y = torch.baddbmm(w.b2, h, w.w2).view(-1, d)  # (E·T, d)
        want = x.new_zeros(N, d).index_add_(0, rows, y * gates[:, None].to(y.dtype))
        whole = ec(x.view(1, N, d)).view(N, d)
    mm = 2 * E * T * d * H

    def all_candidate(up, combine):
        def run():
            r, g = route()
            xi = x.index_select(0, r).view(E, T, d)
            yy = torch.baddbmm(w.b2, up(xi), w.w2).view(-1, d)
            return combine(yy, r, g)
        return run

    trials = {
        "cand.up_lt_gelu": ((lambda: up_lt(x_in)), h, mm, None),
        "cand.combine_f32": ((lambda: combine_f32(y, rows, gates)), want, None, (y.numel() + 3 * x.numel()) * el),
        "cand.csr_build": ((lambda: csr(rows, gates)), None, None, None),
    }
    out, check = {}, {}
    with torch.no_grad():
        try:
            S = csr(rows, gates)
            trials["cand.combine_csr"] = ((lambda: S @ y), want, None, (y.numel() + x.numel()) * el)
        except Exception as e:  # recorded, not timed
            check["cand.combine_csr"] = _first_line(e)
        for name, (fn, ref, flops, nbytes) in trials.items():
            try:
                got = fn()
                if ref is not None:
                    check[name] = _rel_err(got, ref)
                out[name] = (fn, flops, nbytes)  # runs here: timed, and used by cand.all
            except Exception as e:
                check[name] = _first_line(e)
        up = up_lt if "cand.up_lt_gelu" in out else (
            lambda xi: F.gelu(torch.baddbmm(w.b1, xi, w.w1), approximate="tanh"))
        if "cand.combine_csr" in out:
            def combine(yy, r, g):
                return csr(r, g) @ yy
        else:
            combine = combine_f32
        fn = all_candidate(up, combine)
        try:
            check["cand.all"] = _rel_err(fn(), whole)
            out["cand.all"] = (fn, 2 * mm, None)
        except Exception as e:
            check["cand.all"] = _first_line(e)
    return out, check


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got = got.to_dense() if got.layout != torch.strided else got
    return round(((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item(), 5)


def _first_line(e: Exception) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:200]


def main(argv=None) -> int:
    p = gpu.diagnostic_parser(__doc__)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=HERE / "results" / "gpu_anatomy.json")
    setup = gpu.diagnostic_setup(p, argv, "gpu_anatomy.py")
    if setup is None:
        return 2
    args, device, cfg, group = setup
    cuda = device.type == "cuda"
    fused = gpu.fused_available(device)
    parts = stages(cfg, group, device, fused, TILES if cuda else TINY_TILES)
    cand, check = candidates(cfg, group, device)
    parts |= cand
    timer = gpu.Timer(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        times = gpu.interleaved(timer, {n: f for n, (f, _, _) in parts.items()}, args.repeats,
                                inner=5 if cuda else 1)
    rows = {}
    for name, (_, flops, nbytes) in parts.items():
        ms = min(times[name])
        rows[name] = {"ms": round(ms, 4),
                      "tflops": round(flops / (ms * 1e9), 1) if flops else None,
                      "gb_per_s": round(nbytes / (ms * 1e6), 1) if nbytes else None}
        if name in check:
            rows[name]["max_rel_err"] = check[name]
    failed = {name: msg for name, msg in check.items() if name not in rows}
    meta = {"device_name": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
            "group": group, "shapes": cfg, "repeats": args.repeats, "fused": fused,
            "command": " ".join(["python", *sys.argv]), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "stages": rows, "failed": failed}, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"# {meta['device_name']}, torch {meta['torch']}, group {group}, best of {args.repeats}, ms")
    print("| stage | ms | TFLOP/s | GB/s | max rel. err |\n|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        tf, gb, err = ("" if v is None else v for v in (r["tflops"], r["gb_per_s"], r.get("max_rel_err")))
        print(f"| {name} | {r['ms']:.4f} | {tf} | {gb} | {err} |")
    for name, msg in failed.items():
        print(f"{name}: does not run here ({msg})")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
