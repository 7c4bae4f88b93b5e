"""What each expert contributes, by removing it: ShapesEval of a checkpoint with one expert at a time adding
nothing in every sparse layer (`ecviz.experiments.experts_removed`: its gates zeroed, the router not edited), on
the same prompts and noise as the model's own images, broken down by category, by colour word and by shape
word (each image counts for every colour and shape its prompt names).

    python scripts/expert_removal.py --images-per-prompt 1     # the shipped EC-DiT on the evaluation set
    python scripts/expert_removal.py --categories colors --images-per-prompt 4 \
        --json benchmarks/results/expert_removal_colors.json   # one object of one colour: which expert draws it
    python scripts/expert_removal.py --ckpt checkpoints/tc-shapes --json /tmp/tc.json

A specialised expert shows as a large drop on a few words and little elsewhere; an expert whose removal costs
the same everywhere does shared work. `ecviz sample --remove-experts E` shows the images; `ecviz eval
--remove-experts E` scores one removal. Writes JSON (every table, each image's score and the mean pixel change
each removal makes) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import ecviz.defaults as D
from ecviz.data.shapes import CATEGORIES
from ecviz.errors import EcvizError, UsageError
from ecviz.experiments import experts_removed
from ecviz.io import atomic_write
from ecviz.pipeline import Pipeline
from ecviz.prompts import read_prompts
from ecviz.shapes_eval import evaluate, score
from ecviz.validate import check_all, check_output


def words_of(spec: dict) -> tuple[set[str], set[str]]:
    """The colour words and the shape words a prompt's spec names."""
    objects = spec["include"]
    return {o["color"] for o in objects if o.get("color")}, {o["class"] for o in objects}


def by_word(ok: list[bool], specs: list[dict], pick) -> dict[str, float]:
    """Accuracy over the images whose prompt names each word (`pick(spec)`: its words)."""
    words = sorted({w for sp in specs for w in pick(sp)})
    return {w: float(np.mean([o for o, sp in zip(ok, specs, strict=True) if w in pick(sp)])) for w in words}


def scores(images: np.ndarray, specs: list[dict]) -> dict:
    result = evaluate(images, specs)
    ok = [bool(score(im, sp)) for im, sp in zip(images, specs, strict=True)]
    return {"overall": result["overall"], "category": result["accuracy"],
            "colour": by_word(ok, specs, lambda sp: words_of(sp)[0]),
            "shape": by_word(ok, specs, lambda sp: words_of(sp)[1]), "correct": ok}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default="checkpoints/ec-dit-shapes")
    ap.add_argument("--prompts", default="shapes-eval", help="a Shapes prompt set with GenEval metadata")
    ap.add_argument("--images-per-prompt", type=int, default=2)
    ap.add_argument("--steps", type=int, default=D.STEPS)
    ap.add_argument("--guidance", type=float, default=D.GUIDANCE)
    ap.add_argument("--seed", type=int, default=1, help="noise seed (the evaluation set's scores use 0)")
    ap.add_argument("--json", default="benchmarks/results/expert_removal.json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--every", type=int, default=1, help="every k-th prompt only (a quick look)")
    ap.add_argument("--categories", help="only these ShapesEval categories, e.g. colors,color_attr (default: all)")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except EcvizError as e:  # bad input: one line, as ecviz's commands
        print(f"expert_removal.py: error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    check_all({"images_per_prompt": args.images_per_prompt, "steps": args.steps, "guidance": args.guidance,
               "seed": args.seed})
    if args.every < 1:
        raise UsageError(f"--every {args.every}: take every k-th prompt, k >= 1")
    unknown = set(args.categories.split(",")) - set(CATEGORIES) if args.categories else set()
    if unknown:
        raise UsageError(f"--categories: unknown {', '.join(sorted(unknown))}; choose from {', '.join(CATEGORIES)}")
    check_output(args.json, "--json")
    t0 = time.time()
    pipe = Pipeline.load(args.ckpt, device=args.device)
    cfg = pipe.model.cfg
    if not cfg.sparse:
        raise UsageError(f"{args.ckpt}: a dense model has no experts to remove")
    ps = read_prompts(args.prompts)
    wanted = set(args.categories.split(",")) if args.categories else set(ps.category)
    kept = [i for i in range(0, len(ps), args.every) if ps.category[i] in wanted]
    if not kept:
        raise UsageError(f"{args.prompts}: no prompt of {', '.join(sorted(wanted))}")
    specs = [{"tag": ps.category[i], **ps.meta[i]} for i in kept for _ in range(args.images_per_prompt)]
    texts = [ps.prompts[i] for i in kept for _ in range(args.images_per_prompt)]

    def sample() -> np.ndarray:
        return pipe.generate_samples(texts, args.seed, steps=args.steps, guidance=args.guidance)

    plain = sample()
    runs = {"none": scores(plain, specs) | {"image_change": 0.0}}
    for e in range(cfg.experts):
        with experts_removed(pipe.model, [e]):
            images = sample()
        change = float(np.abs(images.astype(np.float32) - plain).mean() / 255)  # mean |Δpixel|, 0..1
        runs[str(e)] = scores(images, specs) | {"image_change": change}
        print(f"expert {e}: overall {runs[str(e)]['overall']:.1%} ({time.time() - t0:.0f} s)", file=sys.stderr)
    doc = {"checkpoint": args.ckpt, "prompts": args.prompts, "categories": sorted(wanted), "images": len(texts),
           "texts": texts, "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
           "layers": cfg.sparse_layers, "seconds": time.time() - t0, "command": " ".join(["python", *sys.argv]),
           "removed": runs}
    atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2) + "\n"))
    base = runs["none"]
    print("| expert removed | overall | image change | largest drops (accuracy with all experts → without) |\n"
          "|---|---:|---:|---|")
    for name, r in runs.items():
        drops = sorted(((base[kind][w] - r[kind][w], w, base[kind][w], r[kind][w]) for kind in ("colour", "shape")
                        for w in r[kind]), reverse=True)[:3]
        where = "" if name == "none" else ", ".join(f"{w} {b:.0%} → {a:.0%}" for _, w, b, a in drops)
        print(f"| {name} | {r['overall']:.1%} | {r['image_change']:.1%} | {where} |")
    return 0

if __name__ == "__main__":
    sys.exit(main())
