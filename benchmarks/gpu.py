"""GPU benchmark (issue 11): EC-DiT-XL's sparse layer and whole model against dense ones, bf16, one GPU.

What it times (CUDA events, after warm-up; what is compared runs interleaved, order reversed every other round;
ratios of best times, medians of per-round ratios beside them):

1. Layers at the XL shape of issue 11: d = 1152, E = 32 experts of hidden 4d, f_c = 2, N = 32,768 tokens (128
   images of 256; `--tokens` for another N: at a few thousand tokens the 32 experts' 0.68 GB of bf16 weights
   take about half the dense FFN's time just to read, a floor no dispatch removes), routing groups of 512
   (inference) and 1024 (training), weights cast to bf16. The floor is the dense FFN of
   hidden f_c·4d (EC's activated FLOPs); against it EC and top-2 token choice (capacity factor 2), each with
   the torch and, where Triton is installed, the fused Triton dispatch (`ExpertChoiceMoE.dispatch`). Forward:
   no_grad, eval; forward+backward: train, x and the parameters requiring grad.
   -> ec_over_dense_fwd (target <= 1.2), ec_over_dense_fwd_bwd (<= 1.25), tc_over_dense_fwd (<= 1.35), per group,
   for the dispatch `auto` picks on this machine (all dispatches under `by_dispatch`).
2. Whole models with random weights, float32 weights under bf16 autocast as `ecviz sample`/`trace`/`train` run
   them: EC-DiT-XL-32E against DENSE-XL. A sampling step: guidance on ([cond; uncond] in one batch), 16 images
   (32 in the batch), inference group 512, one autocast context over all steps (weights cast once, as in a
   sampling loop). A training step: 32 images, MaskDiT 50% (128 kept tokens each, the paper's recipe),
   training group 1024, forward+backward; the RMSprop step is timed apart, only where the GPU has memory for
   its state (EC-DiT-XL-32E's 5.4B parameters need about 87 GB with gradients and optimizer state: more than
   an H100 has). The theoretical ratio is the two models' activated FLOPs per step (`ecviz.model.count_flops`);
   target: sampling_over_theoretical = measured sampling ratio / theoretical <= 1.05.
3. Trace overhead: a sampling batch of a few Euler steps with the recorder (dispatch, `ecviz trace`'s default)
   over the same batch without it (target <= 1.05). The store writer is not included: it runs on a background
   thread in `ecviz trace`.

Needs only torch and numpy (and triton for the fused dispatch), which CUDA images have: no zarr, no text
encoder, no checkpoint. Without CUDA it refuses in one line (exit status 2), unless `--device cpu --tiny`: a
smoke test on tiny shapes, which the tests run.

Usage: python benchmarks/gpu.py [--out benchmarks/results/gpu.json] [--repeats 20]
       python benchmarks/gpu.py --device cpu --tiny --out /tmp/gpu.json
Writes the JSON ({"meta", "targets", "layers", "model", "trace", "targets_met"}) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing it

import timing  # noqa: E402  (benchmarks/timing.py, beside this script)

from ecviz import dist  # noqa: E402
from ecviz.errors import EcvizError  # noqa: E402
from ecviz.flow import euler_sample, flow_loss, interpolate, velocity  # noqa: E402
from ecviz.model import DiT, count_flops, preset  # noqa: E402
from ecviz.routing import FFN, ExpertChoiceMoE, TokenChoiceMoE, dispatch_impl  # noqa: E402

TARGETS = {"ec_over_dense_fwd": 1.2, "ec_over_dense_fwd_bwd": 1.25, "tc_over_dense_fwd": 1.35,
           "sampling_over_theoretical": 1.05, "trace_overhead": 1.05}
FULL = {"dim": 1152, "experts": 32, "tokens": 32768, "image_tokens": 256, "groups": (512, 1024),
        "models": ("EC-DiT-XL-32E", "DENSE-XL"), "sample_images": 16, "train_images": 32, "trace_steps": 5}
TINY = {"dim": 64, "experts": 4, "tokens": 256, "image_tokens": 64, "groups": (64, 128),
        "models": ("EC-DiT-tiny-4E", "DENSE-tiny"), "sample_images": 4, "train_images": 8, "trace_steps": 2}
FACTOR = 2.0  # f_c, and top-2 token choice's capacity factor
BF16 = torch.bfloat16


# ---------------------------------------------------------------- timing

class Timer:
    """Milliseconds of fn(): CUDA events on a GPU (the GPU's own time), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable, inner: int = 1) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) * 1e3 / inner


def interleaved(timer: Timer, jobs: dict[str, tuple[Callable, Callable]], repeats: int, warmup: int = 2,
                inner: int = 1) -> dict[str, list[float]]:
    """{name: [ms per call, one per round]}: `timing.interleaved` (each job (run, reset) warmed up, then timed
    round-robin with the order reversed every other round; reset outside the timer), timed by `timer`."""
    return timing.interleaved(jobs, repeats, warmup=warmup, timer=lambda fn: timer(fn, inner))


def ratios(times: dict[str, list[float]], num: str, den: str) -> tuple[float, float]:
    """(best over best, median of per-round ratios)."""
    return (min(times[num]) / min(times[den]),
            statistics.median(a / b for a, b in zip(times[num], times[den], strict=True)))


def best(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: round(min(v), 4) for k, v in times.items()}


# ---------------------------------------------------------------- 1. layers

def make_layers(cfg: dict, group: int, device: torch.device,
                kinds: tuple[str, ...] = ("dense", "ec", "tc")) -> dict[str, torch.nn.Module]:
    """The layers the GPU scripts time, from seed 0 in this order, in bf16 on `device`: the dense floor (hidden
    f_c·4d), EC and top-2 TC (E experts of hidden 4d) with routing groups of `group` tokens."""
    d, E = cfg["dim"], cfg["experts"]
    build = {"dense": lambda: FFN(d, int(FACTOR * 4 * d)),
             "ec": lambda: ExpertChoiceMoE(d, 4 * d, E, FACTOR, group, infer_group_size=group),
             "tc": lambda: TokenChoiceMoE(d, 4 * d, E, FACTOR, group, infer_group_size=group, top_k=2)}
    torch.manual_seed(0)
    return {k: build[k]().to(device=device, dtype=BF16) for k in kinds}


def layer_inputs(cfg: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, grad), (images, image tokens, d) in bf16 from seed 1: the input and output gradient of every layer timed."""
    S = cfg["image_tokens"]
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(cfg["tokens"] // S, S, cfg["dim"], device=device, dtype=BF16, generator=g)
    return x, torch.randn(x.shape, device=device, dtype=BF16, generator=g)


def layers_at(cfg: dict, group: int, device: torch.device, dispatches: list[str], timer: Timer,
              repeats: int) -> dict:
    """Forward and forward+backward times of the dense floor, EC and TC at one group size."""
    layers = make_layers(cfg, group, device)
    x, grad = layer_inputs(cfg, device)
    xg = x.clone().requires_grad_()

    def variants():  # (name, layer, dispatch)
        yield "dense", layers["dense"], None
        for kind in ("ec", "tc"):
            for impl in dispatches:
                yield f"{kind}_{impl}", layers[kind], impl

    def fwd(m, impl):
        def run():
            with torch.no_grad():
                m(x)

        def reset():
            m.eval()
            if impl:
                m.dispatch = impl
        return run, reset

    def fwd_bwd(m, impl):
        def run():  # each call starts without gradients, as a training step does: on a GPU the timer makes
            m.zero_grad(set_to_none=True)  # `inner` calls per reset, and accumulating into the last call's
            xg.grad = None  # gradients would add a read and write of every weight's gradient (EC's are 16x dense's)
            m(xg).backward(grad)

        def reset():
            m.train()
            if impl:
                m.dispatch = impl
        return run, reset

    inner = 5 if timer.cuda else 1
    tf = interleaved(timer, {n: fwd(m, i) for n, m, i in variants()}, repeats, inner=inner)
    tb = interleaved(timer, {n: fwd_bwd(m, i) for n, m, i in variants()}, repeats, inner=inner)
    row = {"N": cfg["tokens"], "group": group, "ms_fwd": best(tf), "ms_fwd_bwd": best(tb), "by_dispatch": {}}
    for impl in dispatches:
        r = {}
        for kind in ("ec", "tc"):
            for phase, times in (("fwd", tf), ("fwd_bwd", tb)):
                r[f"{kind}_over_dense_{phase}"], r[f"{kind}_over_dense_{phase}_median"] = ratios(
                    times, f"{kind}_{impl}", "dense")
        row["by_dispatch"][impl] = r
    for layer in layers.values():
        layer.cpu()
    return row


# ---------------------------------------------------------------- 2. models

def random_model(name: str, device: torch.device) -> DiT:
    """The preset built on the device, every weight drawn at random (no zero-initialised layers)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = DiT(preset(name))
    model.to(device)  # the position embedding is made on the CPU
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model


def text_batch(cfg, n: int, device: torch.device, g: torch.Generator):
    y = torch.randn(n, cfg.text_len, cfg.text_dim, device=device, generator=g)
    return y, torch.ones(n, cfg.text_len, dtype=torch.bool, device=device)


def models_section(cfg: dict, device: torch.device, timer: Timer, repeats: int) -> tuple[dict, dict]:
    """(the model comparison, the trace overhead), EC first model, dense second."""
    import gc

    names = cfg["models"]
    models = {name: random_model(name, device) for name in names}
    mcfg = models[names[0]].cfg
    g = torch.Generator(device=device).manual_seed(2)
    B, T = cfg["sample_images"], cfg["train_images"]
    shape = (mcfg.in_channels, mcfg.input_size, mcfg.input_size)
    noise = torch.randn(B, *shape, device=device, generator=g)
    y, mask = text_batch(mcfg, B, device, g)

    def sampling_step(m):
        def run():
            euler_sample(m, noise, y, mask, steps=1, guidance=4.0)  # one guided Euler step: a forward of 2B images
        return run, m.eval

    with dist.autocast(device, BF16):  # one context: weights cast once, as in a sampling loop
        ts = interleaved(timer, {n: sampling_step(m) for n, m in models.items()}, repeats)

    kept = mcfg.tokens // 2  # MaskDiT 50%
    x = torch.randn(T, *shape, device=device, generator=g)
    eps = torch.randn(T, *shape, device=device, generator=g)
    t = torch.rand(T, device=device, generator=g)
    keep = torch.rand(T, mcfg.tokens, device=device, generator=g).argsort(-1)[:, :kept].sort(-1).values
    yt, mt = text_batch(mcfg, T, device, g)
    x_t = interpolate(x, eps, t)

    def train_step(m):
        target = m.patchify(velocity(x, eps)).gather(1, keep[..., None].expand(-1, -1, m.patchify(x).shape[-1]))

        def run():
            with dist.autocast(device, BF16):
                loss = flow_loss(m(x_t, t, yt, mt, keep=keep), target)
            loss.backward()

        def reset():
            m.train()
            m.zero_grad(set_to_none=True)
        return run, reset

    tt = interleaved(timer, {n: train_step(m) for n, m in models.items()}, max(3, repeats // 2))
    for m in models.values():
        m.zero_grad(set_to_none=True)  # room for what follows
    ec, dense = names
    flops = {n: {"sampling_step": count_flops(m.cfg, 2 * B),
                 "train_fwd": count_flops(m.cfg, T, kept=kept, training=True)} for n, m in models.items()}
    out = {"models": list(names), "sample_images": B, "sample_batch": 2 * B, "train_images": T, "kept_tokens": kept,
           "sampling_step_ms": best(ts), "train_fwd_bwd_ms": best(tt), "flops": flops}
    out["sampling_ratio"], out["sampling_ratio_median"] = ratios(ts, ec, dense)
    out["train_ratio"], out["train_ratio_median"] = ratios(tt, ec, dense)
    out["theoretical_ratio"] = flops[ec]["sampling_step"] / flops[dense]["sampling_step"]
    out["train_theoretical_ratio"] = flops[ec]["train_fwd"] / flops[dense]["train_fwd"]
    out["sampling_over_theoretical"] = out["sampling_ratio"] / out["theoretical_ratio"]
    out["train_over_theoretical"] = out["train_ratio"] / out["train_theoretical_ratio"]
    out["sampling_tflops"] = {n: flops[n]["sampling_step"] / (1e9 * min(ts[n])) for n in names}
    out["train_tflops"] = {n: 3 * flops[n]["train_fwd"] / (1e9 * min(tt[n])) for n in names}  # fwd + 2x bwd

    trace = trace_overhead(models[ec], cfg, noise, y, mask, timer, repeats)
    out["optimizer_step_ms"] = optimizer_steps(models, timer, device)
    del models
    gc.collect()
    return out, trace


def optimizer_steps(models: dict, timer: Timer, device: torch.device) -> dict:
    """ms of one RMSprop step (momentum, as `ecviz train`) per model, where its state fits beside the weights."""
    out = {}
    for name, m in models.items():
        params = [p for p in m.parameters() if p.requires_grad]
        need = 3 * sum(p.numel() * p.element_size() for p in params)  # gradients, square average, momentum
        if device.type == "cuda":
            for other in models.values():
                other.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            free = torch.cuda.mem_get_info(device)[0]
            if need > 0.9 * free:
                out[name] = f"skipped: needs {need / 2**30:.1f} GiB for gradients and optimizer state, " \
                            f"{free / 2**30:.1f} GiB free"
                continue
        for p in params:
            p.grad = torch.zeros_like(p)
        opt = torch.optim.RMSprop(params, lr=1e-4, alpha=0.99, momentum=0.9, eps=1e-8)
        out[name] = round(min(interleaved(timer, {name: (opt.step, timing.nothing)}, 3)[name]), 3)
        del opt
        m.zero_grad(set_to_none=True)
    return out


def trace_overhead(model: DiT, cfg: dict, noise, y, mask, timer: Timer, repeats: int) -> dict:
    """A sampling batch of a few Euler steps with the recorder (dispatch) over the same batch without it."""
    from ecviz.trace.record import BatchLayout, record

    K, B = cfg["trace_steps"], noise.shape[0]

    def plain():
        euler_sample(model, noise, y, mask, steps=K, guidance=4.0)

    def traced():
        with record(model, ("dispatch",), n_steps=K) as rec:
            rec.begin(BatchLayout(np.arange(B), 2, 0), model.cfg.infer_group)
            euler_sample(model, noise, y, mask, steps=K, guidance=4.0, callback=rec.on_step)
            rec.end()

    with torch.no_grad(), dist.autocast(noise.device, BF16):
        times = interleaved(timer, {"plain": (plain, model.eval), "traced": (traced, model.eval)},
                            max(3, repeats // 4), warmup=1)
    overhead, median = ratios(times, "traced", "plain")
    return {"steps": K, "images": B, "what": ["dispatch"], "ms": best(times), "trace_overhead": overhead,
            "trace_overhead_median": median}


# ---------------------------------------------------------------- results

def summary(layers: dict, model: dict, trace: dict, default: str) -> tuple[dict, dict]:
    """(the headline ratios, whether each target is met) for the dispatch `auto` picks."""
    head = {}
    for group, row in layers.items():
        r = row["by_dispatch"][default]
        for k in ("ec_over_dense_fwd", "ec_over_dense_fwd_bwd", "tc_over_dense_fwd"):
            head[f"{k}@{group}"] = r[k]
    if "error" not in model:
        head["sampling_over_theoretical"] = model["sampling_over_theoretical"]
        head["trace_overhead"] = trace["trace_overhead"]
    met = {k: v <= TARGETS[k.split("@")[0]] for k, v in head.items()}
    return head, met


def table(result: dict) -> str:
    lines = [f"device: {result['meta']['device_name']}, torch {result['meta']['torch']}, dispatch "
             f"{result['meta']['dispatch_default']}", "",
             "| group | dispatch | ec/dense fwd | ec/dense fwd+bwd | tc/dense fwd | tc/dense fwd+bwd |",
             "|---|---|---|---|---|---|"]
    for group, row in result["layers"].items():
        for impl, r in row["by_dispatch"].items():
            lines.append(f"| {group} | {impl} | {r['ec_over_dense_fwd']:.3f} | {r['ec_over_dense_fwd_bwd']:.3f} | "
                         f"{r['tc_over_dense_fwd']:.3f} | {r['tc_over_dense_fwd_bwd']:.3f} |")
    m = result["model"]
    if "error" in m:
        return "\n".join([*lines, "", f"models: {m['error']}"])
    ec, dense = m["models"]
    lines += ["", "| step | " + ec + " ms | " + dense + " ms | measured ratio | theoretical | measured/theoretical |",
              "|---|---|---|---|---|---|",
              f"| sampling (batch {m['sample_batch']}) | {m['sampling_step_ms'][ec]:.2f} | "
              f"{m['sampling_step_ms'][dense]:.2f} | {m['sampling_ratio']:.3f} | {m['theoretical_ratio']:.3f} | "
              f"{m['sampling_over_theoretical']:.3f} |",
              f"| training fwd+bwd ({m['train_images']} images) | {m['train_fwd_bwd_ms'][ec]:.2f} | "
              f"{m['train_fwd_bwd_ms'][dense]:.2f} | {m['train_ratio']:.3f} | {m['train_theoretical_ratio']:.3f} | "
              f"{m['train_over_theoretical']:.3f} |", "",
              f"optimizer step: {m['optimizer_step_ms']}",
              f"trace overhead: {result['trace']['trace_overhead']:.3f} "
              f"(median {result['trace']['trace_overhead_median']:.3f})",
              "", "targets met: " + ", ".join(f"{k} {'ok' if v else 'MISS'}" for k, v in result["targets_met"].items())]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cuda:N; cpu only with --tiny")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and presets: a smoke test, on any device")
    p.add_argument("--repeats", type=int, default=20, help="timed rounds per comparison (default 20)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per layer call, a multiple of 1024 (default "
                   "32768, the issue's shape; 256 with --tiny)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "gpu.json")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = dist.resolve_device(args.device)
    except ValueError as e:
        print(f"benchmarks/gpu.py: {e}; run it on a GPU machine (or --device cpu --tiny for a smoke test)",
              file=sys.stderr)
        return 2
    if device.type != "cuda" and not args.tiny:
        print("benchmarks/gpu.py: the XL shapes are for a GPU; on the CPU only --tiny runs (a smoke test)",
              file=sys.stderr)
        return 2
    try:
        cfg = shapes(args)
    except ValueError as e:
        print(f"benchmarks/gpu.py: {e}", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timer = Timer(device)
    dispatches = ["torch", "triton"] if fused_available(device) else ["torch"]
    try:
        default = dispatch_impl("auto")  # ECVIZ_DISPATCH, where set
    except EcvizError as e:
        print(f"benchmarks/gpu.py: {e}", file=sys.stderr)
        return 2
    failed = {impl: err for impl in dispatches[1:] if (err := dispatch_fails(impl, device))}
    if failed or default not in dispatches:  # time what runs, and say what did not (a kernel that fails to
        dispatches = [d for d in dispatches if d not in failed]  # compile, say, or Triton off the GPU)
        os.environ["ECVIZ_DISPATCH"] = default = "torch"
    t0 = time.perf_counter()
    layers = {}
    for group in cfg["groups"]:
        print(f"[layers] group {group} ...", file=sys.stderr, flush=True)
        layers[str(group)] = layers_at(cfg, group, device, dispatches, timer, args.repeats)
        print(json.dumps({f"layers@{group}": layers[str(group)]}), flush=True)  # kept if a later part fails
    print("[models] sampling and training steps, trace overhead ...", file=sys.stderr, flush=True)
    try:
        model, trace = models_section(cfg, device, timer, args.repeats)
    except Exception as e:  # keep the layers' numbers
        import traceback

        traceback.print_exc()
        model = trace = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    head, met = summary(layers, model, trace, default)
    meta = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else "cpu", "torch": torch.__version__, "cuda": torch.version.cuda, "dtype": "bfloat16",
            "triton": _version("triton") if "triton" in dispatches else None, "dispatch_default": default,
            "dispatches": dispatches, "dispatch_errors": failed, "tiny": args.tiny, "repeats": args.repeats,
            "shapes": cfg,
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.perf_counter() - t0, 1),
            "ratio": "best (minimum) time over best time; *_median: median of per-round ratios (interleaved)",
            "measured": "GPU time by CUDA events" if device.type == "cuda" else "CPU wall time (smoke test only)"}
    result = {"meta": meta, "targets": TARGETS, "summary": head, "targets_met": met, "layers": layers,
              "model": model, "trace": trace}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(table(result))
    print(f"\nwrote {args.out}")
    return 0


def shapes(args: argparse.Namespace) -> dict:
    """The shapes a command line asks for: FULL or TINY, with --tokens in place of their token count; ValueError
    for a count that is not whole images and whole routing groups (it was rounded down, and reported unrounded)."""
    cfg = TINY if args.tiny else FULL
    if args.tokens is None:
        return cfg
    unit = math.lcm(cfg["image_tokens"], *cfg["groups"], getattr(args, "group", None) or 1)
    if args.tokens < unit or args.tokens % unit:
        raise ValueError(f"--tokens {args.tokens}: use a positive multiple of {unit} (whole images of "
                         f"{cfg['image_tokens']} tokens and whole routing groups)")
    return {**cfg, "tokens": args.tokens}


def fused_available(device: torch.device) -> bool:
    """Whether the fused (Triton) dispatch can run here: Triton installed, and a GPU or its interpreter."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    from ecviz.kernels import triton_available

    return triton_available()


def diagnostic_parser(doc: str) -> argparse.ArgumentParser:
    """The options gpu_anatomy.py and gpu_profile.py share: --device, --tiny and --group."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke test, on any device")
    p.add_argument("--group", type=int, default=None, help="routing group (default 1024; 128 with --tiny)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per layer call (default 32768; 256 with --tiny)")
    return p


def diagnostic_setup(parser: argparse.ArgumentParser, argv, script: str
                     ) -> tuple[argparse.Namespace, torch.device, dict, int] | None:
    """(arguments, device, shapes, group) of a diagnostic's command line, or None after a one-line error."""
    args = parser.parse_args(argv)
    try:
        device = dist.resolve_device(args.device)
        cfg = shapes(args)
        group = args.group or cfg["groups"][-1]
        if group < 1 or cfg["tokens"] % group:  # shapes() checks it against --tokens only where that is given
            raise ValueError(f"--group {group}: use a divisor of the {cfg['tokens']} tokens per call")
    except ValueError as e:
        print(f"benchmarks/{script}: {e}", file=sys.stderr)
        return None
    if device.type == "cuda":
        torch.cuda.set_device(device)  # CUDA events record on the current device's stream: cuda:N must be it
    return args, device, cfg, group


def dispatch_fails(impl: str, device: torch.device) -> str | None:
    """None if a small EC layer runs forward and backward with dispatch `impl` here, else the error's first line."""
    try:
        m = ExpertChoiceMoE(64, 128, 4, FACTOR, 64).to(device=device, dtype=BF16)
        m.dispatch = impl
        m(torch.randn(2, 64, 64, device=device, dtype=BF16, requires_grad=True)).sum().backward()
        m.eval()
        with torch.no_grad():
            m(torch.randn(2, 64, 64, device=device, dtype=BF16))
        return None
    except Exception as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        msg = f"{type(e).__name__}: {lines[-1] if lines else ''}"
        print(f"[dispatch {impl}] fails, left out: {msg}", file=sys.stderr, flush=True)
        return msg


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
