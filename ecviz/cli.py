"""The `ecviz` command line. Bad input ends in one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

EXIT_BAD_INPUT = 2


class UsageError(ValueError):
    """Bad input from the user: reported as one line, exit status 2."""


def cmd_presets(args) -> None:
    from ecviz.model import PRESETS, count_params, preset

    names = [args.preset] if args.preset else list(PRESETS)
    print(f"{'preset':<18} {'routing':<7} {'layers':>6} {'width':>6} {'E':>3} {'total':>10} {'activated':>10}")
    for name in names:
        cfg = preset(name)
        n = count_params(cfg)
        experts = cfg.experts if cfg.routing != "dense" else "-"
        print(f"{name:<18} {cfg.routing:<7} {cfg.depth:>6} {cfg.width:>6} {experts:>3} "
              f"{n['total'] / 1e6:>9.1f}M {n['activated'] / 1e6:>9.1f}M")


def cmd_init(args) -> None:
    import torch

    from ecviz.checkpoint import save_checkpoint
    from ecviz.model import DiT, preset

    out = Path(args.out)
    if (out / "model.safetensors").exists() and not args.overwrite:
        raise UsageError(f"{out} already holds a checkpoint (use --overwrite to replace it)")
    overrides = {k: v for k, v in (("group_size", args.group_size), ("infer_group_size", args.infer_group_size))
                 if v is not None}
    cfg = preset(args.preset, **overrides)
    torch.manual_seed(args.seed)
    save_checkpoint(DiT(cfg), out, preset=args.preset, meta={"step": 0, "init_seed": args.seed})
    print(f"wrote a freshly initialised {args.preset} checkpoint to {out}")


def cmd_sample(args) -> None:
    import torch
    from PIL import Image

    from ecviz.checkpoint import load_checkpoint
    from ecviz.pipeline import Pipeline

    torch.set_grad_enabled(False)
    model, _ = load_checkpoint(args.ckpt)
    if args.group_size:
        for block in model.blocks:
            if hasattr(block, "moe"):
                block.moe.infer_group_size = args.group_size
    n = args.n
    images = Pipeline.from_model(model).generate([args.prompt] * n, [args.seed + i for i in range(n)],
                                                 steps=args.steps, cfg=args.cfg)
    grid = images.transpose(1, 0, 2, 3).reshape(images.shape[1], -1, 3)  # side by side
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * args.scale, grid.shape[0] * args.scale), Image.NEAREST).save(out)
    print(f"wrote {out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ecviz", description="See where an expert-choice diffusion transformer "
                                "spends its compute.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("presets", help="list model presets with total and activated parameter counts")
    s.add_argument("preset", nargs="?")
    s.set_defaults(fn=cmd_presets)

    s = sub.add_parser("init", help="write a freshly initialised checkpoint of a preset")
    s.add_argument("--preset", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--group-size", type=int, help="routing group (tokens) in training")
    s.add_argument("--infer-group-size", type=int, help="routing group (tokens) at inference")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_init)

    s = sub.add_parser("sample", help="sample images for one prompt into a PNG")
    s.add_argument("--ckpt", required=True)
    s.add_argument("--prompt", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=4, help="images, side by side")
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--cfg", type=float, default=4.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--group-size", type=int, help="inference routing group (tokens); n·S must hold whole groups")
    s.add_argument("--scale", type=int, default=4, help="pixel upscale of the PNG")
    s.set_defaults(fn=cmd_sample)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.simplefilter("default")
    try:
        args.fn(args)
    except (ValueError, OSError) as e:  # CheckpointError and UsageError are ValueErrors
        print(f"ecviz {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"ecviz {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
