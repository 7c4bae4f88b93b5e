"""Routing benchmark: what expert-choice dispatch costs over a dense FFN of the same activated FLOPs.

What: for four routing-group shapes (d=1152, E=32 experts of hidden 4d, f_c=2, N=4096 tokens per batch, or
one group where it is larger), times the fast `ExpertChoiceMoE`, a top-2 `TokenChoiceMoE` (capacity factor
2.0) and the paper's one-hot Algorithm 1 (`expert_choice_reference`) against the floor, a dense
`FFN(d, f_c·4d)`, and measures the activation-memory peak of each. CPU, float32, torch's default thread count.
Why: EC-DiT's case is that sparse routing adds little over the dense layer it matches in FLOPs; the project
issue sets targets for that on this 2-core CPU (`TARGETS`), and this script checks them.

Timing: layers run interleaved (dense, EC, TC, one-hot, alternating order each repeat) so drift on a noisy
machine hits all alike; forward under no_grad in eval mode, fwd+bwd in train mode with x and the parameters
requiring grad (gradients reset to None outside the timer). Ratios are of the best (minimum) times, as timeit
advises, since interference only ever adds time (on a shared 2-core VM single rounds vary by up to 1.7x); the
medians of the per-round ratios are kept too (`*_median`). Noise: meta.foreign_cpu_fraction is the share of
the machine's CPU time other processes took meanwhile; raw per-repeat times are kept in the JSON.
Memory: each layer runs in a fresh subprocess (`--_mem KIND`) with glibc's mmap threshold pinned low so
freed tensors go back to the OS; peak = VmHWM (reset via /proc/self/clear_refs) minus the RSS before.
Parameters and their gradients are not activation memory: the baseline holds the parameters, each
parameter's gradient is dropped once accumulated, and the largest one (which briefly exists) is subtracted
from the backward peak.

Usage: python benchmarks/routing.py [--quick] [--tokens N] [--repeats K] [--out PATH]
Writes benchmarks/results/routing.json ({"meta", "targets", "shapes"}) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timing  # benchmarks/timing.py: this script runs from benchmarks/
import torch

from ecviz.io import atomic_write
from ecviz.routing import FFN, ExpertChoiceMoE, TokenChoiceMoE, capacity, expert_choice_reference

HERE = Path(__file__).resolve().parent
ROUTING_SRC = HERE.parent / "ecviz" / "routing.py"
FACTOR = 2.0  # f_c: expert slots per token, for EC and for top-2 TC alike
HIDDEN_MULT = 4  # expert hidden = 4d; the dense floor has f_c·4d
IMG_TOKENS = 256  # tokens per image (256-px latent, patch 2): only shapes x, the layers flatten it
SLOW_ONEHOT_S = 5.0  # a one-hot forward slower than this gets MIN_REPEATS repeats only
MIN_REPEATS = 3
# Shapes: XL inference and training groups, a 1024-px-equivalent group and, without targets, a group twice that
# (one-hot cost grows with the group; N is raised to one group where the group exceeds it).
FULL = {"dim": 1152, "experts": 32, "tokens": 4096,
        "groups": {"xl_infer": 512, "xl_train": 1024, "px1024": 4096, "g8192": 8192}}
QUICK = {"dim": 256, "experts": 8, "tokens": 1024,
         "groups": {"xl_infer": 128, "xl_train": 256, "px1024": 1024, "g8192": 2048}}
XL = ["xl_infer", "xl_train"]
TARGETS = {
    "ec_over_dense_fwd": {"max": 1.15, "shapes": XL},
    "ec_over_dense_fwd_bwd": {"max": 1.3, "shapes": XL},
    "onehot_over_ec_fwd": {"min": 2.0, "shapes": ["px1024"]},
    "peak_mem_ec_over_dense": {"max": 1.3, "shapes": [*XL, "px1024"]},
}
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # fixed threshold: large blocks mmapped, unmapped on free
MIB = 2**20


# ---------------------------------------------------------------- layers and inputs

def cores() -> int:
    return len(os.sched_getaffinity(0))


def build(kind: str, dim: int, experts: int, group: int, seed: int = 0) -> torch.nn.Module:
    """The dense floor, EC or top-2 TC layer; 'onehot' is the EC layer (the reference runs on its weights)."""
    torch.manual_seed(seed)
    hidden = HIDDEN_MULT * dim
    if kind == "dense":
        return FFN(dim, int(FACTOR * hidden))
    if kind in ("ec", "onehot"):
        return ExpertChoiceMoE(dim, hidden, experts, FACTOR, group, infer_group_size=group)
    if kind == "tc":
        return TokenChoiceMoE(dim, hidden, experts, FACTOR, group, infer_group_size=group, top_k=2)
    raise ValueError(kind)


def inputs(tokens: int, dim: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, S, d) requiring grad and a fixed random output gradient of the same shape."""
    gen = torch.Generator().manual_seed(seed)
    shape = (tokens // IMG_TOKENS, IMG_TOKENS, dim) if tokens % IMG_TOKENS == 0 else (1, tokens, dim)
    x = torch.randn(shape, generator=gen).requires_grad_()
    return x, torch.randn(shape, generator=gen)


def call(kind: str, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return expert_choice_reference(layer, x) if kind == "onehot" else layer(x)


# ---------------------------------------------------------------- timing

def forward_job(kind: str, layer, x) -> tuple[Callable, Callable]:
    """(run, reset): one no_grad eval forward; reset runs outside the timer."""
    def run():
        with torch.no_grad():
            call(kind, layer, x)
    return run, layer.eval


def fwd_bwd_job(kind: str, layer, x, grad) -> tuple[Callable, Callable]:
    """(run, reset): one train forward + backward; reset clears all gradients to None outside the timer."""
    def run():
        call(kind, layer, x).backward(grad)

    def reset():
        layer.train()
        layer.zero_grad(set_to_none=True)
        x.grad = None
    return run, reset


def interleaved(jobs: dict[str, tuple[Callable, Callable]], repeats: int) -> dict[str, list[float]]:
    """`timing.interleaved` with gc before every call and the warm-up timed: the one-hot reference, if its
    warm-up exceeds SLOW_ONEHOT_S, runs only MIN_REPEATS timed rounds."""
    warm = {name: timing.interleaved({name: job}, 1, collect=True, warmup=0)[name][0] for name, job in jobs.items()}
    slow = {"onehot": MIN_REPEATS} if warm.get("onehot", 0) > SLOW_ONEHOT_S else {}
    return timing.interleaved(jobs, repeats, collect=True, warmup=0, rounds=slow)


def best_ratio(num: list[float], den: list[float]) -> float:
    """Ratio of the best (minimum) times."""
    return min(num) / min(den)


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of per-round ratios (rounds are adjacent in time, so drift cancels)."""
    return statistics.median(a / b for a, b in zip(num, den, strict=False))


def ms(ts: list[float]) -> float:
    """The best time, in ms."""
    return round(1e3 * min(ts), 2)


def time_shape(cfg: dict, group: int, tokens: int, repeats: int) -> dict:
    """Forward and fwd+bwd times (ms) and ratios for one group shape."""
    layers = {k: build(k, cfg["dim"], cfg["experts"], group) for k in ("dense", "ec", "tc")}
    layers["onehot"] = layers["ec"]
    x, grad = inputs(tokens, cfg["dim"])
    fwd = interleaved({k: forward_job(k, m, x) for k, m in layers.items()}, repeats)
    fb = interleaved({k: fwd_bwd_job(k, layers[k], x, grad) for k in ("dense", "ec", "tc")}, repeats)
    row = {
        "ms_fwd": {k: ms(v) for k, v in fwd.items()},
        "ms_fwd_bwd": {k: ms(v) for k, v in fb.items()},
        "raw_ms_fwd": {k: [round(1e3 * t, 1) for t in v] for k, v in fwd.items()},
        "raw_ms_fwd_bwd": {k: [round(1e3 * t, 1) for t in v] for k, v in fb.items()},
    }
    pairs = {"ec_over_dense_fwd": (fwd, "ec", "dense"), "ec_over_dense_fwd_bwd": (fb, "ec", "dense"),
             "onehot_over_ec_fwd": (fwd, "onehot", "ec"), "tc_over_dense_fwd": (fwd, "tc", "dense"),
             "tc_over_dense_fwd_bwd": (fb, "tc", "dense")}
    for name, (times, a, b) in pairs.items():
        row[name] = best_ratio(times[a], times[b])
        row[name + "_median"] = paired_ratio(times[a], times[b])
    return row


# ---------------------------------------------------------------- memory (runs in a child process)

def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def peak() -> int:
    with open("/proc/self/status") as f:
        kb = next(line for line in f if line.startswith("VmHWM:")).split()[1]
    return int(kb) * 1024


def settle() -> int:
    """Collect garbage, reset the peak counter, return the RSS baseline."""
    gc.collect()
    base = rss()
    reset_peak()
    return base


def mem_forward(kind: str, layer, x) -> int:
    """Activation peak (bytes) of one no_grad eval forward."""
    layer.eval()
    with torch.no_grad():
        call(kind, layer, x)  # warm-up
        base = settle()
        out = call(kind, layer, x)
        used = peak() - base
    del out
    return used


def mem_fwd_bwd(kind: str, layer, x, grad) -> dict[str, int]:
    """Activation peaks (bytes) of a train forward and of its backward, parameter gradients excluded."""
    layer.train()
    params = list(layer.parameters())
    for p in params:
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    biggest_grad = max(p.numel() * p.element_size() for p in params)
    call(kind, layer, x).backward(grad)  # warm-up
    x.grad = None
    base = settle()
    out = call(kind, layer, x)
    fwd = peak() - base
    reset_peak()
    out.backward(grad)
    bwd = peak() - base - biggest_grad
    return {"fwd_bwd": max(fwd, bwd), "train_fwd": fwd, "bwd_less_grad": bwd, "biggest_grad": biggest_grad}


def mem_child(kind: str, dim: int, experts: int, group: int, tokens: int) -> dict:
    torch.set_num_threads(cores())
    layer = build(kind, dim, experts, group)
    x, grad = inputs(tokens, dim)
    result = {"fwd": mem_forward(kind, layer, x)}
    if kind != "onehot":
        result.update(mem_fwd_bwd(kind, layer, x, grad))
    result["params"] = sum(p.numel() * p.element_size() for p in layer.parameters())
    return result


def measure_memory(kind: str, cfg: dict, group: int, tokens: int) -> dict:
    """Run mem_child in a fresh interpreter; its JSON line (bytes) comes back in MiB."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_mem", kind, "--_dim", str(cfg["dim"]),
           "--_experts", str(cfg["experts"]), "--_group", str(group), "--tokens", str(tokens)]
    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": str(HERE.parent)}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return {k: round(v / MIB, 1) for k, v in json.loads(out.strip().splitlines()[-1]).items()}


def memory_shape(cfg: dict, group: int, tokens: int) -> dict:
    mem = {k: measure_memory(k, cfg, group, tokens) for k in ("dense", "ec", "tc", "onehot")}
    return {
        "mem_mib": mem,
        "peak_mem_ec_over_dense": mem["ec"]["fwd_bwd"] / mem["dense"]["fwd_bwd"],
        "peak_mem_tc_over_dense": mem["tc"]["fwd_bwd"] / mem["dense"]["fwd_bwd"],
        "peak_mem_ec_over_dense_fwd": mem["ec"]["fwd"] / mem["dense"]["fwd"],
        "peak_mem_onehot_over_ec": mem["onehot"]["fwd"] / mem["ec"]["fwd"],
    }


# ---------------------------------------------------------------- results

def targets_met(name: str, row: dict) -> dict[str, bool]:
    met = {}
    for metric, t in TARGETS.items():
        if name in t["shapes"]:
            met[metric] = row[metric] <= t["max"] if "max" in t else row[metric] >= t["min"]
    return met


def run_shape(cfg: dict, name: str, group: int, repeats: int) -> dict:
    tokens = max(cfg["tokens"], group)
    row = {"N": tokens, "group": group, "G": tokens // group, "C": capacity(group, FACTOR, cfg["experts"])}
    row |= time_shape(cfg, group, tokens, repeats)
    row |= memory_shape(cfg, group, tokens)
    row["targets_met"] = targets_met(name, row)
    return row


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + vals[4]  # idle + iowait
    return sum(vals) - idle, sum(vals)


def own_jiffies() -> int:
    """CPU time of this process and its finished children, in jiffies."""
    t = os.times()
    return round((t.user + t.system + t.children_user + t.children_system) * os.sysconf("SC_CLK_TCK"))


def foreign_load(start: tuple[int, int, int]) -> float:
    """Fraction of the machine's CPU time that other processes used since `start`: the noise in these timings."""
    busy, total = cpu_jiffies()
    return round(max(0, busy - start[0] - (own_jiffies() - start[2])) / max(1, total - start[1]), 3)


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "unknown")


def meta(args, cfg: dict, load_start: tuple[float, ...], cpu_start: tuple[int, int, int]) -> dict:
    return {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cores": cores(),
        "cpu": cpu_model(), "python": platform.python_version(), "dtype": "float32",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick, "repeats": args.repeats, "dim": cfg["dim"], "experts": cfg["experts"],
        "expert_hidden": HIDDEN_MULT * cfg["dim"], "dense_hidden": int(FACTOR * HIDDEN_MULT * cfg["dim"]),
        "capacity_factor": FACTOR, "tc_top_k": 2, "tokens": cfg["tokens"],
        "routing_py_sha256": hashlib.sha256(ROUTING_SRC.read_bytes()).hexdigest(),
        "malloc_env_mem": MALLOC_ENV, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "foreign_cpu_fraction": foreign_load(cpu_start),
        "ratio": "best (minimum) time over best time; *_median: median of per-round ratios (layers interleaved)",
        "mem": "activation peak: VmHWM - RSS before, parameter gradients excluded (see module docstring)",
    }


def table(shapes: dict) -> str:
    cols = [("N", "N"), ("group", "group"), ("G", "G"), ("C", "C"),
            ("ec/dense fwd", "ec_over_dense_fwd"), ("ec/dense fwd+bwd", "ec_over_dense_fwd_bwd"),
            ("tc/dense fwd", "tc_over_dense_fwd"), ("tc/dense fwd+bwd", "tc_over_dense_fwd_bwd"),
            ("onehot/ec fwd", "onehot_over_ec_fwd"), ("mem ec/dense", "peak_mem_ec_over_dense"),
            ("mem onehot/ec fwd", "peak_mem_onehot_over_ec")]
    lines = ["| shape | " + " | ".join(c for c, _ in cols) + " | targets |",
             "|---" * (len(cols) + 2) + "|"]
    for name, row in shapes.items():
        cells = [f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k]) for _, k in cols]
        met = ", ".join(f"{k}:{'ok' if v else 'MISS'}" for k, v in row["targets_met"].items())
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {met} |")
    lines += ["", "| shape | layer | fwd ms (best) | fwd+bwd ms (best) | act peak fwd MiB | act peak fwd+bwd MiB |",
              "|---|---|---|---|---|---|"]
    for name, row in shapes.items():
        for k in ("dense", "ec", "tc", "onehot"):
            mem = row["mem_mib"][k]
            lines.append(f"| {name} | {k} | {row['ms_fwd'][k]} | {row['ms_fwd_bwd'].get(k, '-')} | "
                         f"{mem['fwd']} | {mem.get('fwd_bwd', '-')} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="d=256, E=8, N=1024, groups 128/256/1024")
    p.add_argument("--tokens", type=int, help="tokens per batch N (default 4096; 1024 with --quick)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per layer (default 7)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "routing.json")
    p.add_argument("--_mem", choices=["dense", "ec", "tc", "onehot"], help=argparse.SUPPRESS)
    p.add_argument("--_dim", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_experts", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_group", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args._mem:
        print(json.dumps(mem_child(args._mem, args._dim, args._experts, args._group, args.tokens)))
        return
    torch.set_num_threads(cores())
    cfg = dict(QUICK if args.quick else FULL)
    cfg["tokens"] = args.tokens or cfg["tokens"]
    for name, group in cfg["groups"].items():
        if max(cfg["tokens"], group) % group:
            raise SystemExit(f"--tokens {cfg['tokens']} is not a whole number of {name} groups of {group}")
    load_start, cpu_start, shapes = os.getloadavg(), (*cpu_jiffies(), own_jiffies()), {}
    for name, group in cfg["groups"].items():
        print(f"[{name}] group {group} ...", file=sys.stderr, flush=True)
        shapes[name] = run_shape(cfg, name, group, args.repeats)
    result = {"meta": meta(args, cfg, load_start, cpu_start), "targets": TARGETS, "shapes": shapes}
    atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    print(table(shapes))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
