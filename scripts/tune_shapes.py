"""Short tuning runs for the shipped Shapes models: train a configuration for a few thousand steps, then score
it on a slice of the evaluation prompts (ShapesEval) and by its held-out loss (scripts/heldout_loss.py), and append
the result to runs/tune/results.jsonl.

    python scripts/tune_shapes.py NAME --steps 1500 [--eval-per-category 12] -- [ecviz train options]

e.g. `python scripts/tune_shapes.py lr2e-4 --steps 1500 -- --preset EC-DiT-shapes-8E --lr 2e-4`. A rerun
resumes the training run. checkpoints/README.md records the sweep and the choices made from it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--eval-per-category", type=int, default=12)
    ap.add_argument("--images-per-prompt", type=int, default=2)
    ap.add_argument("--guidance", "--cfg", type=float, nargs="+", default=[4.0])
    ap.add_argument("--sample-steps", type=int, default=25)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    train = argv[cut + 1:]  # everything after "--" goes to ecviz train
    out = ROOT / "runs" / "tune" / args.name
    cmd = [sys.executable, "-m", "ecviz", "train", *train, "--steps", str(args.steps), "--out", str(out),
           "--probe-every", "500", "--ckpt-every", "250", "--quiet", "--data-cache"]
    if (out / "checkpoint").is_dir():
        cmd.append("--resume")
    t0 = time.time()
    subprocess.run(cmd, check=True)
    train_s = time.time() - t0

    from heldout_loss import heldout_loss  # scripts/, beside this file
    from shipped_figures import train_seconds

    from ecviz.data.shapes import eval_prompts
    from ecviz.plots import read_metrics
    from ecviz.shapes_eval import eval_checkpoint

    prompts = out / "eval_prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in eval_prompts(args.eval_per_category)))
    metrics = read_metrics(out / "metrics.jsonl")
    # over every resumed stretch (`time` restarts at 0 in each): the median step time of the fastest one
    step_s = train_seconds(metrics)[0] / metrics[-1]["step"] if metrics else None
    tail = [m["loss"] for m in metrics if m["step"] > args.steps - 250]
    heldout = heldout_loss(str(out))["mean"]
    for guidance in args.guidance:
        t1 = time.time()
        ev = eval_checkpoint(out, prompts, images_per_prompt=args.images_per_prompt, steps=args.sample_steps,
                             guidance=guidance, seed=0)
        row = {"name": args.name, "train": train, "steps": args.steps, "train_seconds": round(train_s),
               "run_seconds": round(train_seconds(metrics)[1]) if metrics else None, "sec_per_step": step_s,
               "loss_last_250": sum(tail) / max(1, len(tail)), "heldout_loss": heldout, "guidance": guidance,
               "sample_steps": args.sample_steps,
               "overall": ev.result["overall"], "accuracy": ev.result["accuracy"],
               "images": sum(ev.result["count"].values()), "eval_seconds": round(time.time() - t1)}
        print(json.dumps(row))
        with open(ROOT / "runs" / "tune" / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
