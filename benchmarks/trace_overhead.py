"""What recording routing costs: sampling speed with the trace recorder on vs off, and bytes per sample.

Runs, interleaved and repeated in one process (this machine is noisy, so only ratios measured together
count): plain sampling with no recorder and no store (the floor), `ecviz trace` writing images only, and
`ecviz trace` recording dispatch (the default), plus dispatch with cross-attention. Every mode is timed end
to end from its settings (checkpoint and prompt loading included, as `ecviz trace` does them); ratios are
of the best times (interference only adds time; medians of per-round ratios are kept too). Writes
benchmarks/results/trace_overhead.json.

    python benchmarks/trace_overhead.py [--ckpt DIR] [--prompts FILE] [--limit N] [--steps N] [--repeats K]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ecviz.checkpoint import load_checkpoint, save_checkpoint
from ecviz.io import atomic_write
from ecviz.model import DiT, preset
from ecviz.prompts import read_prompts
from ecviz.trace.run import TraceSettings, plan, run_trace

ROOT = Path(__file__).resolve().parents[1]


def default_ckpt(tmp: Path) -> Path:
    shipped = ROOT / "checkpoints" / "ec-dit-shapes"
    if (shipped / "model.safetensors").exists():
        return shipped
    torch.manual_seed(0)
    return save_checkpoint(DiT(preset("EC-DiT-shapes-8E")), tmp / "ckpt", preset="EC-DiT-shapes-8E")


def plain_sampling(s: TraceSettings) -> float:
    """The floor: the same batches (fillers included) through the same sampling loop, no hooks and no store."""
    t0 = time.perf_counter()
    p = plan(s)
    texts = [p.prompts.prompts[i // s.images_per_prompt] for i in range(p.n_samples)]
    with torch.no_grad():
        for _ in p.pipe.run_batches(texts, p.batches, steps=s.steps, guidance=s.guidance):
            pass
    return time.perf_counter() - t0


def traced(s: TraceSettings) -> tuple[float, int]:
    if s.out.exists():
        shutil.rmtree(s.out)
    t0 = time.perf_counter()
    summary = run_trace(s)
    return time.perf_counter() - t0, summary["store_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt")
    ap.add_argument("--prompts", default="shapes", help="prompt file or bundled set (default: shapes)")
    ap.add_argument("--limit", type=int, help="only the first N prompts (default: all)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "trace_overhead.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ecviz-bench-"))
    ckpt = Path(args.ckpt) if args.ckpt else default_ckpt(tmp)
    base = dict(ckpt=ckpt, prompts=args.prompts, steps=args.steps, guidance=4.0, limit=args.limit,
                batch_size=8, progress=False)
    modes = {
        "images_only": dict(record=()),
        "dispatch": dict(record=("dispatch",)),
        "dispatch_cross_attn": dict(record=("dispatch", "cross_attn")),
    }
    times: dict[str, list[float]] = {"plain": [], **{m: [] for m in modes}}
    sizes: dict[str, int] = {}
    plain_sampling(TraceSettings(**base))  # warm-up: loads the text encoder, first-call allocations
    for r in range(args.repeats):
        order = list(times) if r % 2 == 0 else list(reversed(times))  # drift hits every mode alike
        for name in order:
            if name == "plain":
                times[name].append(plain_sampling(TraceSettings(**base)))
            else:
                t, sizes[name] = traced(TraceSettings(**base, out=tmp / f"{name}.zarr", **modes[name]))
                times[name].append(t)
    n = len(read_prompts(args.prompts).prompts[: args.limit])
    med = {k: statistics.median(v) for k, v in times.items()}

    def ratio(a: str, b: str) -> float:  # best over best: interference only ever adds time
        return min(times[a]) / min(times[b])

    def ratio_median(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    result = {
        "meta": {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                 "cpus": os.cpu_count(), "checkpoint": str(ckpt), "preset": load_checkpoint(ckpt)[1].preset,
                 "samples": n, "steps": args.steps, "guidance": 4.0, "repeats": args.repeats,
                 "ratio": "best time over best time, modes interleaved; *_median: median of per-round ratios"},
        "seconds_median": med,
        "samples_per_s": {k: n / v for k, v in med.items()},
        "seconds": times,
        "dispatch_over_plain": ratio("dispatch", "plain"),
        "images_only_over_plain": ratio("images_only", "plain"),
        "dispatch_over_images_only": ratio("dispatch", "images_only"),
        "dispatch_cross_attn_over_plain": ratio("dispatch_cross_attn", "plain"),
        "dispatch_over_plain_median": ratio_median("dispatch", "plain"),
        "bytes_per_sample": {k: v / n for k, v in sizes.items()},
        "target": {"dispatch_over_plain_max": 1.05},
    }
    result["target_met"] = result["dispatch_over_plain"] <= 1.05
    atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    print(f"{'mode':<22}{'s (median)':>12}{'samples/s':>12}{'x plain':>9}{'kB/sample':>11}")
    for k, v in med.items():
        kb = f"{sizes[k] / n / 1e3:.1f}" if k in sizes else "-"
        print(f"{k:<22}{v:>12.2f}{n / v:>12.2f}{ratio(k, 'plain'):>9.3f}{kb:>11}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
