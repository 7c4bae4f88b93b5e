"""Training-step speed of the shipped model sizes: EC-DiT against its top-2 token-choice and dense twins.

What: one full training step (forward, backward, RMSProp step) of each preset on the same Shapes batch
(32 images, 32x32 at patch 2: 256 tokens each, with their captions' MiniLM embeddings), float32 on this CPU.
Why: the routing benchmark isolates one layer at the paper's sizes; this is the whole model at the size we
train, so it says what EC's routing costs end to end where the FFNs are a small part of the work.

Timing: presets interleaved (order reversed every other round), best of `--repeats` rounds after a warm-up;
ratios are of the best times (interference only adds time), per-round medians kept too.

    python benchmarks/train_step.py [--repeats K] [--batch-size B] [--out PATH]

Writes benchmarks/results/train_step.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ecviz.data.shapes import ShapesDataset
from ecviz.io import atomic_write
from ecviz.model import DiT, count_params, preset
from ecviz.train import StepDraws, TextCache, TrainConfig, draws, make_optimizer, training_loss

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("EC-DiT-shapes-8E", "TC-shapes-8E", "DENSE-shapes-matched", "DENSE-shapes")
BASE = "DENSE-shapes-matched"  # the compute-matched floor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
    args = ap.parse_args()
    data = ShapesDataset(length=args.batch_size)
    items = [data[i] for i in range(args.batch_size)]
    x = torch.stack([b["image"] for b in items])
    jobs = {}
    for name in PRESETS:
        torch.manual_seed(0)
        model = DiT(preset(name)).train()
        tc = TrainConfig(preset=name, out="-")
        y, mask = TextCache(model.cfg.text_encoder, model.cfg.text_len)([b["caption"] for b in items])
        d: StepDraws = draws(tc, model.cfg, 0, args.batch_size)
        jobs[name] = (model, make_optimizer(model, tc), y, mask, d)

    def step(name: str) -> float:
        model, opt, y, mask, d = jobs[name]
        t0 = time.perf_counter()
        loss, aux = training_loss(model, x, y, mask, d)
        opt.zero_grad(set_to_none=True)
        (loss + aux).backward()
        opt.step()
        return time.perf_counter() - t0

    for name in PRESETS:  # warm-up
        step(name)
    times: dict[str, list[float]] = {n: [] for n in PRESETS}
    for r in range(args.repeats):
        for name in PRESETS if r % 2 == 0 else reversed(PRESETS):
            times[name].append(step(name))
    best = {n: min(v) for n, v in times.items()}
    result = {
        "meta": {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "batch_size": args.batch_size, "repeats": args.repeats, "dtype": "float32",
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "ratio": f"best time over {BASE}'s best time; *_median: median of per-round ratios"},
        "params": {n: count_params(preset(n)) for n in PRESETS},
        "ms_best": {n: round(1e3 * v, 1) for n, v in best.items()},
        "steps_per_s": {n: 1 / v for n, v in best.items()},
        "over_matched_dense": {n: best[n] / best[BASE] for n in PRESETS},
        "over_matched_dense_median": {n: statistics.median(a / b for a, b in zip(times[n], times[BASE], strict=True))
                                      for n in PRESETS},
        "raw_ms": {n: [round(1e3 * t, 1) for t in v] for n, v in times.items()},
    }
    atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    print(f"| preset | total params | activated | ms/step (best) | steps/s | x {BASE} |")
    print("|---|---:|---:|---:|---:|---:|")
    for n in PRESETS:
        p = result["params"][n]
        print(f"| {n} | {p['total'] / 1e6:.2f}M | {p['activated'] / 1e6:.2f}M | {result['ms_best'][n]} | "
              f"{result['steps_per_s'][n]:.2f} | {result['over_matched_dense'][n]:.2f} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
