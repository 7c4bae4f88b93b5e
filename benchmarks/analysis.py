"""Analysis at PartiPrompts scale: every allocation and load statistic of a trace computed from its store.

What: a synthetic trace the size of tracing all of PartiPrompts with an EC-DiT-XL-32E-like model (1,632
prompts, guidance on so two branches, 50 denoising steps, 14 sparse layers, 32 experts, 256 tokens per image,
routing groups of 512 tokens: 1,632 groups, about 4.7 GB of dispatch indices before compression) is written
with `ecviz.trace.synthetic` (valid schema, expert choice's invariants hold), then a fresh process opens it
and computes, from the store: allocation_stats, per_image, settling, layer_agreement, expert_load (the
C-per-group check), coselection (10 evenly spaced steps, its default), expert_positions, expert_steps, group
means and per-image means with group membership, in one dask computation so each array is read once.
Why: the analysis issue's target is <= 60 s and <= 2 GB peak memory on a 2-core machine.

    python benchmarks/analysis.py [--store PATH] [--keep] [--prompts N] [--steps N] [--report] [--out PATH]

The store (about 3.7 GB) is written once to --store and reused with --keep. Peak memory is the child process's
maximum resident set size. With --report, `ecviz report` on the same store is timed too, in its own process
(what a user runs: every statistic with its figures, summary.json and summary.md). Writes
benchmarks/results/analysis.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(store: str) -> dict:
    """Run in a fresh process: open, compute everything, report times and peak RSS."""
    import dask

    import ecviz
    from ecviz import analysis as A

    dask.config.set(scheduler="threads", num_workers=os.cpu_count())
    t0 = time.perf_counter()
    ds = ecviz.open_trace(store)
    A.check_complete(ds)
    times = {"open": time.perf_counter() - t0}
    t = time.perf_counter()
    lazy = {"allocation_stats": A.allocation_stats(ds), "per_image": A.per_image(ds).mean("sample"),
            "settling": A.settling(ds), "layer_agreement": A.layer_agreement(ds), "expert_load": A.expert_load(ds),
            "coselection": A.coselection(ds), "expert_positions": A.expert_positions(ds),
            "expert_steps": A.expert_steps(ds), "group_mean": A.group_mean(ds).mean("group"),
            "image_mean": ds["expert_count"].astype("float32").mean("token")}
    times["graph"] = time.perf_counter() - t
    t = time.perf_counter()
    done = dict(zip(lazy, dask.compute(*lazy.values()), strict=True))  # one pass: shared reads of each array
    times["compute"] = time.perf_counter() - t
    t = time.perf_counter()
    groups = A.sample_groups(ds)  # small: membership of 1,632 groups
    times["sample_groups"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    alloc, settle, agree, load = (done[k] for k in ("allocation_stats", "settling", "layer_agreement", "expert_load"))
    cosel, pos, steps, gmean = (done[k] for k in ("coselection", "expert_positions", "expert_steps", "group_mean"))
    ivg_std, img = float(done["image_mean"].std()), done["per_image"]
    checks = {"full_capacity": bool(load["full_capacity"].all()), "mean_experts": float(alloc["mean"].mean()),
              "max_share": float(alloc["max_share"].max()), "settle_steps": settle["settle_step"].values.tolist(),
              "agreement_offdiag_mean": float((agree.sum() - agree.values.trace()) / (agree.size - len(agree))),
              "coselection_lift_max": float(cosel["lift"].max()), "positions_shape": list(pos.shape),
              "group_mean": float(gmean.mean()), "image_mean_std": ivg_std,
              "groups_with_fillers": int(groups["filler"].values.any(-1).sum()),
              "expert_steps_shape": list(steps.shape), "per_image_gini": float(img["gini"].mean())}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": times, "peak_rss_bytes": peak, "checks": checks}


def report_child(store: str) -> dict:
    """Run in a fresh process: `ecviz report STORE` into a temporary directory, as a user runs it."""
    import contextlib
    import io
    import tempfile

    from ecviz import cli

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            code = cli.main(["report", store, "--out", str(Path(tmp) / "report")])
        seconds = time.perf_counter() - t
        figures = len(list((Path(tmp) / "report").glob("*.png")))
    if code:
        raise SystemExit(f"ecviz report exited with {code}")
    return {"seconds": seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "figures": figures}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="/tmp/ecviz-bench-analysis.zarr")
    ap.add_argument("--keep", action="store_true", help="reuse --store if it exists")
    ap.add_argument("--prompts", type=int, default=1632)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "analysis.json"))
    ap.add_argument("--report", action="store_true", help="also time `ecviz report` on the store")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_report_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(child(args._child)))
        return
    if args._report_child:
        print(json.dumps(report_child(args._report_child)))
        return
    from ecviz.io import atomic_write
    from ecviz.trace.synthetic import write_synthetic_trace

    store = Path(args.store)
    t = time.perf_counter()
    if not (args.keep and store.exists()):
        import shutil

        shutil.rmtree(store, ignore_errors=True)
        write_synthetic_trace(store, samples=args.prompts, steps=args.steps, layers=args.layers,
                              experts=args.experts, grid=16, group_size=512, capacity_factor=2.0, batch=8,
                              branches=2, image_size=32, text_len=32, pool=4, seed=0,
                              progress=lambda n: print(f"\rwriting: {n}/{args.prompts} samples", end="",
                                                       file=sys.stderr))
        print(file=sys.stderr)
    write_s = time.perf_counter() - t
    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    r = subprocess.run([sys.executable, __file__, "--_child", str(store)], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"the analysis process failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if args.report:
        r = subprocess.run([sys.executable, __file__, "--_report_child", str(store)], capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"the report process failed:\n{r.stderr[-3000:]}")
        res["report"] = json.loads(r.stdout.strip().splitlines()[-1])
    load = os.getloadavg()
    result = {
        "meta": {"command": " ".join(["python", "benchmarks/analysis.py", *sys.argv[1:]]), "cpus": os.cpu_count(),
                 "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "loadavg_1_5_15": [round(v, 2) for v in load],
                 "trace": {"samples": args.prompts, "branches": 2, "steps": args.steps, "layers": args.layers,
                           "experts": args.experts, "tokens": 256, "group_size": 512, "store_bytes": size,
                           "write_seconds": round(write_s, 1)},
                 "targets": {"seconds": 60, "peak_bytes": 2 * 2**30}},
        **res,
    }
    atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    s = res["seconds"]
    print(" | ".join(f"{k} {v:.1f} s" for k, v in s.items()))
    print(f"peak memory {res['peak_rss_bytes'] / 2**30:.2f} GiB; store {size / 1e9:.2f} GB; load average {load}")
    if "report" in res:
        rep = res["report"]
        print(f"ecviz report: {rep['seconds']:.1f} s, {rep['figures']} figures, peak memory "
              f"{rep['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
