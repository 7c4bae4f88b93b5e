"""Shapes data speed: the reference items, the vectorised fast path, the pre-rendered cache, the trainer's loader.

What: images/s at one resolution (default 32 px, the trained one) of
  reference   `collate([ds[i] for i in idx])`: per item a fresh generator, the scene and `shapes.render`
              (what the trainer did before);
  fast        `ds.batch(idx)`: the same items, rendered by `shapes_fast.render_batch` (every field);
  cached      `ds.batch(idx)` from a `ShapesCache` (every field, and the trainer's image + caption only);
  loader      the trainer's `Prefetch(StepBatches(...))` alone, steady state after its first batch: with the
              cache (one background thread) and without (DataLoader worker processes);
and the cache's build rate (items/s, every core); and, per item, where the time goes (stages: the generator
alone, the scene draw with it, the reference renderer, the vectorised one). Why: issue 10 asks that data never
bound training, with a target of >= 20,000 images/s at the chosen resolution on the project's 2-core CPU box.

Timing: the paths run interleaved (order reversed every other round), best rate of `--repeats` rounds (other
load only ever slows a round); every round's rate is kept. The load average is recorded before and after: the
box is shared, so read the numbers with it.

    python benchmarks/data.py [--size 32] [--repeats 5] [--out PATH]

Writes benchmarks/results/data.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ecviz.data.shapes import ShapesDataset, collate, render
from ecviz.data.shapes_cache import ShapesCache
from ecviz.data.shapes_fast import render_batch
from ecviz.io import atomic_write
from ecviz.train import Prefetch, StepBatches, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TARGET = 20_000  # images/s, issue 10
ALL = ("image", "caption", "category", "masks", "n_objects", "word_object")
TRAINER = ("image", "caption")  # what the training step uses


def rate(fn, images: int) -> float:
    t0 = time.perf_counter()
    fn()
    return images / (time.perf_counter() - t0)


def loader_rate(data, batch: int, steps: int, workers: int) -> float:
    """Images/s the trainer's loader hands over, after its first batch (worker start-up excluded)."""
    tc = TrainConfig(preset="EC-DiT-small-8E", out="-", batch_size=batch, steps=steps + 1)
    it = iter(Prefetch(StepBatches(data, tc, slice(0, batch), 0, shuffle=False), workers, depth=8))
    next(it)
    t0 = time.perf_counter()
    n = sum(len(captions) for _, captions in it)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache-items", type=int, default=4 * 16384, help="items in the benchmark's cache")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data.json"))
    args = ap.parse_args()
    load_start = os.getloadavg()
    n_ref, n_fast, n_cached = 256, 2048, 32768
    with tempfile.TemporaryDirectory(prefix="ecviz-data-bench-") as tmp:
        t0 = time.perf_counter()
        cache = ShapesCache(tmp, seed=0, size=args.size).ensure(args.cache_items)
        build_s = time.perf_counter() - t0
        plain = ShapesDataset(length=2**40, size=args.size)
        cached = ShapesDataset(length=2**40, size=args.size)
        cached.use_cache(cache)
        rng = np.random.default_rng(0)

        def indices(n: int, in_cache: bool) -> np.ndarray:
            """n consecutive indices (as a step's batch is), inside the cache or far beyond it."""
            start = int(rng.integers(0, args.cache_items - n)) if in_cache else 10**9 + int(rng.integers(10**9))
            return np.arange(start, start + n)

        def reference():
            idx = indices(n_ref, False)
            return lambda: collate([plain[int(i)] for i in idx])

        def batches(ds: ShapesDataset, n: int, b: int, fields: tuple, in_cache: bool):
            idx = indices(n, in_cache)
            return lambda: [ds.batch(idx[i:i + b], fields) for i in range(0, n, b)]

        def stage(what: str):
            """One stage of an item, for the breakdown: the generator, the scene draw, one renderer."""
            idx = indices(n_ref, False)
            if what == "generator":
                return lambda: [np.random.default_rng([0, int(i)]) for i in idx]
            if what == "scene":
                return lambda: [plain.scene(int(i)) for i in idx]
            scenes = [plain.scene(int(i)).objects for i in idx]
            if what == "render":
                return lambda: [render(sc, args.size) for sc in scenes]
            return lambda: render_batch(scenes, args.size)

        jobs = {  # name: (make a timed function, images it makes; None: it returns its own rate)
            "stage: generator only": (lambda: stage("generator"), n_ref),
            "stage: scene (generator + draws)": (lambda: stage("scene"), n_ref),
            "stage: shapes.render": (lambda: stage("render"), n_ref),
            "stage: shapes_fast.render_batch": (lambda: stage("render_batch"), n_ref),
            "reference": (reference, n_ref),
            "fast (every field)": (lambda: batches(plain, n_fast, 256, ALL, False), n_fast),
            "cached, batch 32 (every field)": (lambda: batches(cached, n_cached, 32, ALL, True), n_cached),
            "cached, batch 32 (image, caption)": (lambda: batches(cached, n_cached, 32, TRAINER, True), n_cached),
            "cached, batch 256 (image, caption)": (lambda: batches(cached, n_cached, 256, TRAINER, True), n_cached),
            "loader, cached, thread, batch 32": (lambda: lambda: loader_rate(cached, 32, 1000, 0), None),
            "loader, cached, thread, batch 256": (lambda: lambda: loader_rate(cached, 256, 125, 0), None),
            "loader, uncached, 1 worker, batch 32": (lambda: lambda: loader_rate(plain, 32, 40, 1), None),
            "loader, uncached, 2 workers, batch 32": (lambda: lambda: loader_rate(plain, 32, 60, 2), None),
        }
        rates: dict[str, list[float]] = {k: [] for k in jobs}
        for r in range(args.repeats):
            for name in jobs if r % 2 == 0 else reversed(jobs):
                make, images = jobs[name]
                fn = make()
                rates[name].append(fn() if images is None else rate(fn, images))
                print(f"round {r} {name}: {rates[name][-1]:.0f} images/s", file=sys.stderr, flush=True)
    best = {k: max(v) for k, v in rates.items()}
    result = {
        "meta": {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__, "numpy": np.__version__,
                 "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "size": args.size, "repeats": args.repeats, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "target_images_per_s": TARGET,
                 "rate": "best of the interleaved rounds; raw: every round"},
        "cache_build": {"items": args.cache_items, "seconds": build_s, "items_per_s": args.cache_items / build_s,
                        "workers": len(os.sched_getaffinity(0)),
                        "bytes_per_item": cache.dtype.itemsize},
        "images_per_s": best,
        "over_reference": {k: v / best["reference"] for k, v in best.items()},
        "raw_images_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()},
    }
    atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    print(f"| path ({args.size} px) | images/s (best) | x reference |")
    print("|---|---:|---:|")
    for k, v in best.items():
        print(f"| {k} | {v:,.0f} | {result['over_reference'][k]:.1f} |")
    cb = result["cache_build"]
    print(f"\ncache build: {cb['items_per_s']:,.0f} items/s with {cb['workers']} workers, "
          f"{cb['bytes_per_item']} B/item")
    print(f"load average {load_start[0]:.2f} before, {result['meta']['loadavg_end'][0]:.2f} after; wrote {args.out}")


if __name__ == "__main__":
    main()
