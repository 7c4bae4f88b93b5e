"""The `ecviz` command line. Bad input ends in one line on stderr and exit status 2, never a traceback, and
before any work: numeric options are range-checked while parsing (ecviz.validate), devices and output paths
before a model loads or a process starts."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings
from pathlib import Path

import ecviz.defaults as D
from ecviz.errors import EcvizError, UsageError
from ecviz.validate import (
    apply_ranges,
    check_device,
    check_output,
    check_routing,
    check_sparse_options,
    parse_index_list,
)

EXIT_BAD_INPUT = 2
ERROR_FILE_ENV = "ECVIZ_ERROR_FILE"  # set by the --nproc launcher: where a rank reports bad input
SAMPLE_N = 4  # `ecviz sample --n`: images of the prompt, side by side


def cmd_presets(args) -> None:
    from ecviz.model import PRESETS, count_params, preset

    names = [args.preset] if args.preset is not None else list(PRESETS)
    for name in names:
        preset(name)  # an unknown name: one line, before the table's header
    w = max(map(len, names))
    print(f"{'preset':<{w}} {'routing':<7} {'layers':>6} {'width':>6} {'E':>3} {'total':>10} {'activated':>10}")
    for name in names:
        cfg = preset(name)
        n = count_params(cfg)
        experts = cfg.experts if cfg.sparse else "-"
        print(f"{name:<{w}} {cfg.routing:<7} {cfg.depth:>6} {cfg.width:>6} {experts:>3} "
              f"{n['total'] / 1e6:>9.1f}M {n['activated'] / 1e6:>9.1f}M")


def cmd_export(args) -> None:
    from ecviz.checkpoint import WEIGHTS, export_checkpoint

    out = check_output(args.out, "--out", "checkpoint")
    replacing = (out / WEIGHTS).exists()
    if replacing and not args.overwrite:
        raise UsageError(f"{out} already holds a checkpoint (use --overwrite to replace it)")
    ck = export_checkpoint(args.ckpt, out, args.dtype)
    size = (ck.path / WEIGHTS).stat().st_size
    print(f"wrote {ck.path} ({args.dtype} weights, {size / 1e6:.1f} MB){dropped(out) if replacing else ''}")


def dropped(out: Path) -> str:
    """Remove the replaced weights' records beside a checkpoint just written over them (checkpoint.RECORDS); the
    words that say so, or ''."""
    from ecviz.checkpoint import drop_records

    gone = drop_records(out)
    return f"; removed the replaced model's {', '.join(gone)}" if gone else ""


def cmd_init(args) -> None:
    import torch

    from ecviz.checkpoint import WEIGHTS, save_checkpoint
    from ecviz.model import DiT, preset

    out = check_output(args.out, "--out", "checkpoint")
    replacing = (out / WEIGHTS).exists()
    if replacing and not args.overwrite:
        raise UsageError(f"{out} already holds a checkpoint (use --overwrite to replace it)")
    overrides = {k: v for k, v in (("group_size", args.group_size), ("infer_group_size", args.infer_group_size))
                 if v is not None}
    check_sparse_options(preset(args.preset), {"--group-size": args.group_size,
                                               "--infer-group-size": args.infer_group_size})
    cfg = preset(args.preset, **overrides)
    check_init_memory(args.preset, cfg)
    torch.manual_seed(args.seed)
    save_checkpoint(DiT(cfg), out, preset=args.preset, meta={"step": 0, "init_seed": args.seed})
    print(f"wrote a freshly initialised {args.preset} checkpoint to {out}{dropped(out) if replacing else ''}")


def check_init_memory(name: str, cfg) -> None:
    """Refuse a preset whose float32 weights, and the file's copy of them as it is written, exceed this machine's
    memory (`init --preset EC-DiT-XXL-32E`, 13B parameters, was killed by the kernel after a minute, silently)."""
    from ecviz.model import count_params
    from ecviz.validate import host_memory

    params = count_params(cfg)["total"]
    need, have = params * 4 * 2, host_memory()
    if have is not None and need > have:
        raise UsageError(f"{name}: {params / 1e9:,.1f}B parameters need about {need / 2**30:,.0f} GiB to initialise "
                         f"and write in float32, more than this machine's {have / 2**30:,.0f} GiB; choose a smaller "
                         "preset")


def writes_rgb(fmt: str, size: tuple[int, int] = (1, 1)) -> bool:
    """Whether Pillow writes an RGB image of `size` (width, height) in format `fmt`: tried on a blank one before
    any sampling (WebP holds at most 16383 px a side, JPEG 65500)."""
    import io

    from PIL import Image

    try:
        Image.new("RGB", size).save(io.BytesIO(), format=fmt)
    except (KeyError, OSError, ValueError):
        return False
    return True


def cmd_sample(args) -> None:
    import numpy as np
    from PIL import Image

    from ecviz.checkpoint import read_checkpoint
    from ecviz.io import atomic_write
    from ecviz.pipeline import Pipeline, reproduce
    from ecviz.plots import sample_grid

    out = Path(args.out)
    if out.is_dir():  # its empty suffix read as an unknown image type
        raise UsageError(f"--out {out}: is a directory; name the image file, for example {out / 'sample.png'}")
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None or not writes_rgb(fmt):  # Pillow reads .psd, .xpm, ... but cannot write them; .xbm not in RGB
        raise UsageError(f"--out {out}: {'unknown' if fmt is None else 'unwritable'} image type {out.suffix!r} "
                         f"(use .png)")
    check_output(out, "--out")
    if args.prompt is not None and args.from_trace is not None:
        raise UsageError("--prompt and --from-trace are alternatives: --from-trace takes the prompt from the store")
    if args.prompt is None and args.from_trace is None:
        raise UsageError("give --prompt TEXT, or --from-trace STORE with --sample I")
    if args.from_trace is None and args.sample != 0:
        raise UsageError(f"--sample {args.sample}: picks a sample of --from-trace; with --prompt use --n and --seed")
    removal = removal_of(args)
    device = resolve_device(args.device)
    if args.from_trace is not None:
        fixed = {"--steps": (args.steps, D.STEPS), "--guidance": (args.guidance, D.GUIDANCE),
                 "--seed": (args.seed, D.SEED), "--n": (args.n, SAMPLE_N),
                 "--batch-size": (args.batch_size, D.TRACE_BATCH), "--group-size": (args.group_size, None),
                 "--capacity-factor": (args.capacity_factor, None), "--dtype": (args.dtype, "auto")}
        given = next(((flag, v) for flag, (v, default) in fixed.items() if v != default), None)
        if given:  # silently ignored before
            raise UsageError(f"{given[0]} {given[1]}: --from-trace reproduces the trace's own settings (steps, "
                             "guidance, seed, batch, routing group and capacity, format); drop it")
        def again(within=None) -> np.ndarray:  # (1, H, W, 3)
            return reproduce(args.from_trace, args.sample, ckpt=args.ckpt, device=device, within=within)[None]

        without = again(removal) if removal else None  # first: bad experts are refused before any sampling
        rows = [again()] + ([without] if removal else [])  # as traced; the same sample and partners without them
    else:
        if args.ckpt is None:
            raise UsageError("--ckpt is required with --prompt")
        if not args.prompt.strip():  # as trace refuses a blank prompt; the null text is --guidance's business
            raise UsageError("--prompt is empty")
        cfg = read_checkpoint(args.ckpt).config  # what it refuses, refused before the weights load
        check_routing(cfg, args.group_size, args.capacity_factor)
        if removal:
            removal.check(cfg)
        pipe = Pipeline.load(args.ckpt, device=device, dtype=args.dtype, group_size=args.group_size,
                             capacity_factor=args.capacity_factor)
        if removal:
            removal.check(pipe.model)  # before any sampling; it also names the rows
        H, n_rows = pipe.image_size, 2 if removal else 1
        pixels = n_rows * args.n * (H * args.scale) ** 2  # the images alone, without the gaps between them
        if pixels > Image.MAX_IMAGE_PIXELS:  # and before the blank strip below is allocated
            raise UsageError(f"--n {args.n} --scale {args.scale}: a strip of over {pixels / 1e6:.0f} million px, more "
                             f"than Pillow opens without a decompression-bomb warning "
                             f"({Image.MAX_IMAGE_PIXELS / 1e6:.0f} million); use fewer or smaller images")
        strip = sample_grid(np.zeros((n_rows, args.n, H, H, 3), np.uint8), scale=args.scale,
                            labels=removal.labels if removal else None).size  # what is written
        if not writes_rgb(fmt, strip):
            raise UsageError(f"--out {out}: {fmt} cannot hold an image of {strip[0]}×{strip[1]} px (--n {args.n}, "
                             f"--scale {args.scale}); use .png, or fewer or smaller images")

        def generate() -> np.ndarray:  # (n, H, W, 3)
            return pipe.generate_samples([args.prompt] * args.n, args.seed, steps=args.steps, guidance=args.guidance,
                                         batch_size=args.batch_size)

        rows = [generate()]
        if removal:
            with removal(pipe.model):
                rows.append(generate())  # the same noise and partners without the experts
    png = sample_grid(np.stack(rows), scale=args.scale, labels=removal.labels if removal else None)  # side by side
    atomic_write(out, lambda tmp: png.save(tmp, format=fmt))
    print(f"wrote {out}")


class Removal:
    """`ecviz sample` / `eval --remove-experts E --remove-layers B`: a callable giving the `experts_removed`
    context of a model, checked against its config with the options' names in the message."""

    NAMES = ("--remove-experts", "--remove-layers")

    def __init__(self, experts: list[int] | None, layers: list[int] | None):
        self.experts, self.layers = experts, layers  # None: every expert / every sparse layer
        self.labels: list[str] = []
        self.removed: dict = {}  # once checked: {"experts": [...], "layers": [...]}

    def check(self, model) -> tuple[list[int], list[int]]:
        """Check against a model or its config (read from config.json before the weights load)."""
        from ecviz.experiments import check_removal

        cfg = getattr(model, "cfg", model)
        experts = range(cfg.experts) if self.experts is None and cfg.sparse else self.experts or []
        experts, layers = check_removal(cfg, experts, self.layers, names=self.NAMES)
        what = "every expert" if len(experts) == cfg.experts else \
            f"expert{'s' * (len(experts) > 1)} {', '.join(map(str, experts))}"
        where = "" if layers == cfg.sparse_layers else \
            f" in block{'s' * (len(layers) > 1)} {', '.join(map(str, layers))}"
        self.labels = ["all experts", f"without {what}{where}"]
        self.removed = {"experts": experts, "layers": layers}
        return experts, layers

    def __call__(self, model):
        from ecviz.experiments import experts_removed

        return experts_removed(model, *self.check(model))


def removal_of(args) -> Removal | None:
    """The experts `ecviz sample` or `eval` removes, parsed (not yet checked against a model), or None."""
    if args.remove_experts is None:
        if args.remove_layers is not None:
            raise UsageError("--remove-layers says where --remove-experts removes experts; give --remove-experts")
        return None
    experts = parse_index_list(args.remove_experts, "--remove-experts")  # None: 'all'
    return Removal(experts, parse_index_list(args.remove_layers, "--remove-layers"))


def cmd_hooks(args) -> None:
    import torch

    from ecviz.checkpoint import load_checkpoint
    from ecviz.hooks import HOOK_DOCS, hooks

    model, info = load_checkpoint(args.ckpt)
    cfg = model.cfg
    B = max(1, cfg.infer_group // cfg.tokens) if cfg.sparse else 1  # one inference routing group
    seen: dict[str, tuple] = {}
    x = torch.zeros(B, cfg.in_channels, cfg.input_size, cfg.input_size)
    y, mask = torch.zeros(B, cfg.text_len, cfg.text_dim), torch.ones(B, cfg.text_len, dtype=torch.bool)
    with torch.no_grad(), hooks(model, {"*": lambda v, name: seen.setdefault(name, tuple(v.shape))}):
        model(x, torch.full((B,), 0.5), y, mask)
    print(f"hook points of {info.path} ({info.preset or cfg.routing}): `model.hook_points[NAME]`, "
          f"`ecviz.hooks.hooks(model, {{NAME: fn}})` to observe, with edit=True to replace a value; shapes in one "
          f"forward of {B} image(s) of {cfg.tokens} tokens"
          f"{' (one inference routing group)' if cfg.routing != 'dense' else ''}")
    w = max(map(len, model.hook_points))
    for name, point in model.hook_points.items():
        shape = str(seen[name]) if name in seen else "-"
        only = "" if point.editable else "observe-only: "
        print(f"{name:<{w}}  {shape:<16}  {only}{HOOK_DOCS.get(name.rsplit('.', 1)[-1], '')}")


def cmd_trace(args) -> None:
    from ecviz.trace.run import TraceSettings, default_out, run_trace

    if args.verify:
        if args.overwrite:
            raise UsageError("--verify only reads the store, and --overwrite would replace it: give one of them")
        return verify_trace_store(Path(args.out or default_out(args)))
    check_device(args.device, nproc=args.nproc)
    check_output(args.out or default_out(args), "--out", "store")
    if args.group_size is not None or args.capacity_factor is not None:  # before any rank starts
        from ecviz.checkpoint import read_checkpoint

        check_routing(read_checkpoint(args.ckpt).config, args.group_size, args.capacity_factor)
    if args.nproc > 1:
        from ecviz.prompts import check_readable_by_every_rank

        check_readable_by_every_rank(args.prompts, args.nproc)
        return relaunch(args.argv, args.nproc, Path(args.out or default_out(args)))
    what = tuple(w for w in args.record.split(",") if w) if args.record else ()
    s = TraceSettings(
        ckpt=Path(args.ckpt), prompts=args.prompts, out=Path(args.out) if args.out else None,
        images_per_prompt=args.images_per_prompt, steps=args.steps, guidance=args.guidance, seed=args.seed,
        batch_size=args.batch_size, group_size=args.group_size, capacity_factor=args.capacity_factor, record=what,
        record_steps=parse_index_list(args.record_steps, "--record-steps"),
        record_layers=parse_index_list(args.record_layers, "--record-layers"),
        limit=args.limit, overwrite=args.overwrite, progress=not args.quiet, device=args.device, dtype=args.dtype)
    summary = run_trace(s)
    if "store_bytes" in summary:
        n = summary["samples"]
        print(f"traced {n} samples ({summary['written']} written now, {summary['skipped_done']} already done) "
              f"in {summary['seconds']:.1f} s with {summary['processes']} process(es); "
              f"store {summary['store']}: {summary['store_bytes'] / 1e6:.1f} MB, "
              f"{summary['bytes_per_sample'] / 1e3:.1f} kB/sample"
              + (f"; {summary['blank_lines_skipped']} blank prompt lines skipped"
                 if summary["blank_lines_skipped"] else ""))
        if summary.get("repaired"):
            from ecviz.errors import sample_ranges

            print(f"repaired {len(summary['repaired'])} damaged samples: {sample_ranges(summary['repaired'])}")
        print(f"open it in Python: ecviz.open_trace({summary['store']!r})")
        print(f"report on it: ecviz report {shlex.quote(str(summary['store']))}   browse it: streamlit run app/main.py "
              f"-- --trace {shlex.quote(str(summary['store']))}")


def verify_trace_store(out: Path) -> None:
    """`ecviz trace --verify`: read every chunk of the done samples once; one line either way (damage: status 2)."""
    from ecviz.trace.format import open_trace

    ds = open_trace(out, verify=True)  # raises DamagedTraceError naming the samples and the remedy
    done, n = int(ds.done.values.sum()), ds.sizes["sample"]
    print(f"{out}: no damage, every chunk of the {done} done samples checks out"
          + (f" ({n - done} of {n} not done yet: rerun ecviz trace with the same arguments to finish)"
             if done < n else ""))


def cmd_train(args) -> None:
    from ecviz import dist
    from ecviz.train import TrainConfig, train

    fields = {f: getattr(args, f) for f in TrainConfig.__dataclass_fields__ if getattr(args, f, None) is not None}
    settings = TrainConfig(**fields)
    check_device(settings.device, nproc=args.nproc)  # a GPU for each process to start
    world = max(args.nproc, dist.ranks().world)  # --nproc here, torchrun's world in each process it starts
    settings.check(world=world, resume=args.resume)  # the rest that needs no model: before any process starts
    if args.nproc > 1:
        return relaunch(args.argv, args.nproc, Path(settings.out))
    last = train(settings, resume=args.resume, progress=not args.quiet)
    if last and dist.ranks().rank == 0:  # the process group has ended: torchrun's variables say which this was
        print(f"step {last['step']}: loss {last['loss']:.4f}, {last['steps_per_s']:.2f} steps/s; "
              f"checkpoint in {Path(args.out) / 'checkpoint'}")


def cmd_eval(args) -> None:
    import json

    import ecviz.shapes_eval as se
    from ecviz.checkpoint import read_checkpoint
    from ecviz.io import atomic_write

    for option in ("json", "grid"):
        if getattr(args, option):
            check_output(getattr(args, option), "--" + option)
    if args.grid_prompts is not None and not args.grid:
        raise UsageError(f"--grid-prompts {args.grid_prompts} sets the prompts of the --grid: give --grid FILE.png too")
    args.grid_prompts = D.GRID_PROMPTS if args.grid_prompts is None else args.grid_prompts
    if args.grid_only and (not args.grid or args.json):
        raise UsageError("--grid-only draws the --grid alone, without scores: give --grid FILE.png and no --json")
    if args.grid and Path(args.grid).suffix.lower() != ".png":  # it is written as PNG whatever the name says
        raise UsageError(f"--grid {args.grid}: the grid is a PNG; name it NAME.png")
    if args.grid and args.json and Path(args.grid).resolve() == Path(args.json).resolve():
        raise UsageError(f"--json and --grid both name {args.grid}: the grid would replace the scores")
    removal = removal_of(args)
    info = read_checkpoint(args.ckpt)  # what it refuses, refused before the weights load
    cfg = info.config
    check_routing(cfg, args.group_size, args.capacity_factor)
    settings = info.meta.get("train_config")  # (meta is a dict: read_checkpoint checks it; this may not be)
    data = settings.get("data") if isinstance(settings, dict) else None
    if isinstance(data, str) and not data.startswith("shapes"):  # scores of a task the model never saw
        warnings.warn(f"{args.ckpt} was trained on --data {data}, not Shapes: ShapesEval scores how well it draws "
                      "Shapes scenes, which says little of it", stacklevel=1)
    if removal:  # and before the prompts' encoding
        removal.check(cfg)
    rows, prompts = None, args.prompts
    if args.grid_only:  # the grid's prompts, known from the prompt file alone (read once: it may be a pipe)
        prompts, specs = se.read_specs(args.prompts)
        rows = se.grid_prompts(se.tags_of(specs), args.grid_prompts)
    ev = se.eval_checkpoint(args.ckpt, prompts, images_per_prompt=args.images_per_prompt, steps=args.steps,
                            guidance=args.guidance, seed=args.seed, batch_size=args.batch_size,
                            progress=not args.quiet, device=resolve_device(args.device), dtype=args.dtype,
                            within=removal, only=rows, group_size=args.group_size,
                            capacity_factor=args.capacity_factor)
    if not args.grid_only:
        print(se.format_table(ev.result))
        if ev.result["image_size"] < se.RELIABLE_SIZE:
            print(f"ecviz eval: warning: ShapesEval is calibrated for images of {se.RELIABLE_SIZE} px and more; at "
                  f"{ev.result['image_size']} px it misreads correctly drawn shapes, so these scores are low by an "
                  "unknown amount", file=sys.stderr)
        if ev.result["diagnosis"]:
            print("\nwhat the two-object prompts' images got wrong (share of each category's images):\n"
                  + se.format_diagnosis(ev.result["diagnosis"]))
    if args.json:
        doc = ev.result | {"checkpoint": str(args.ckpt), "prompts": str(args.prompts),
                           "images_per_prompt": args.images_per_prompt, "steps": args.steps, "guidance": args.guidance,
                           "seed": args.seed, "group_size": ev.group_size, "capacity_factor": ev.capacity_factor}
        doc |= {"removed": removal.removed} if removal else {}
        atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2) + "\n"))
    if args.grid:
        if rows is None:
            rows = se.grid_prompts(se.tags_of(ev.specs), args.grid_prompts)  # from every category
            images = ev.images[rows]
        else:
            images = ev.images  # the rows alone were sampled
        removed = f" ({removal.labels[1]})" if removal else ""  # the grid says what it was sampled without
        png = se.grid_png(images, rows, ev.prompts, ev.specs, removed)
        atomic_write(Path(args.grid), lambda tmp: png.save(tmp, format="png"))
        if args.grid_only:
            print(f"wrote {args.grid}: {len(rows)} prompts x {args.images_per_prompt} images, each as the whole "
                  "evaluation samples it")


def cmd_report(args) -> None:
    from ecviz.report import default_out, write_report

    if args.source is not None and args.trace is not None:
        raise UsageError(f"the trace is given twice ({args.source} and --trace {args.trace}): give it once")
    source = args.trace if args.trace is not None else args.source
    if source is None:
        raise UsageError("no trace: ecviz report TRACE (a trace store, or a run/checkpoint directory with "
                         "routing.zarr)")
    out = args.out if args.out is not None else default_out(source)
    check_output(out, "--out" if args.out is not None else "--out (by default)", "dir")
    summary = write_report(source, out, sample=args.sample)
    print(f"wrote {len(summary['figures'])} figures, summary.json and summary.md to {out}")
    for what, why in summary.get("not_applicable", {}).items():  # each with its reason (what to record)
        print(f"  not applicable: {what}: {why}")


def cmd_ablate_words(args) -> None:
    from ecviz.experiments import ablate_words

    check_output(args.out, "--out", "store")
    out = ablate_words(args.ckpt, args.prompts, args.out, images_per_prompt=args.images_per_prompt,
                       steps=args.steps, guidance=args.guidance, seed=args.seed, group_size=args.group_size,
                       capacity_factor=args.capacity_factor, limit=args.limit, overwrite=args.overwrite,
                       progress=not args.quiet)
    from ecviz.analysis.ablation import ablation_summary

    s = ablation_summary(out)
    rho = s["spearman_alloc_vs_attention"]
    rho = f"{rho:.3f}" if rho == rho else "n/a (needs 3 words with both scores, neither all equal)"
    print(f"wrote {out}: {s['words']} words of {s['samples']} samples; causal importance (allocation change) vs "
          f"attention importance: Spearman {rho}")


def cmd_probe_groups(args) -> None:
    import json

    from ecviz.experiments import probe_groups
    from ecviz.io import atomic_write

    if args.json:
        check_output(args.json, "--json")
    r = probe_groups(args.ckpt, args.prompts, limit=args.limit, steps=args.steps, guidance=args.guidance,
                     seed=args.seed)
    print(f"{r['samples']} samples, {r['images_per_group']} images per routing group")
    print("| comparison | (token, expert) choices changed | mean pixel change |")
    print("|---|---|---|")
    for k, v in r.items():
        if isinstance(v, dict):
            print(f"| {k.replace('_', ' ')} | {v['choices_changed']:.1%} | {v['image_change']:.2%} |")
    if args.json:
        atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(json.dumps(r, indent=2) + "\n"))


def relaunch(argv: list[str], nproc: int, out: Path) -> None:
    """Run this very command (`argv`, without --nproc) again as `nproc` ranks on this machine, with the
    environment torchrun gives its workers (ecviz.dist.launch: they end with this process, however it ends).
    This process holds the writer lock of `out` (ecviz.lock) for the whole run and hands it to the ranks, so a
    second run on `out` is refused while any of them lives. A bad input in any rank ends the whole run with
    that rank's one-line error and exit status 2: the rank reports it in ERROR_FILE_ENV and waits; the
    launcher stops every rank."""
    import tempfile
    import time

    from ecviz import dist, lock

    command, argv = "ecviz " + shlex.join(argv), without_nproc(argv)
    with lock.writing(out, command) as held, \
            tempfile.TemporaryDirectory(prefix="ecviz-launch-") as errors:
        report = [Path(errors, str(rank)) for rank in range(nproc)]
        fds = (held.fd,) if held.fd is not None else ()  # none where there is no flock (not POSIX)
        with dist.launch([sys.executable, "-m", "ecviz", *argv], nproc, pass_fds=fds,
                         env=lambda rank: {ERROR_FILE_ENV: str(report[rank]), lock.LOCK_FD_ENV: str(held.fd)}) \
                as procs:
            while True:
                codes = [p.poll() for p in procs]
                bad = [f for f in report if f.exists()]
                if bad or all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                    break
                time.sleep(0.05)
        if bad:
            first = next(f for f in report if f.exists())  # the lowest rank's
            print(first.read_text().strip(), file=sys.stderr)
            raise SystemExit(EXIT_BAD_INPUT)
    rank, code = next(((r, c) for r, c in enumerate(codes) if c), (None, 0))
    if code:
        if code < 0:  # killed by a signal: it could say nothing itself
            import signal

            again = "the same command" if argv[:1] != ["train"] or "--resume" in argv else "it with --resume"
            print(f"ecviz: rank {rank} of {nproc} was killed by {signal.Signals(-code).name}; rerun {again} "
                  "to resume", file=sys.stderr)
        raise SystemExit(code if code > 0 else 128 - code)


def without_nproc(argv: list[str]) -> list[str]:
    """`argv` less every --nproc N or --nproc=N, and any abbreviation argparse took for it (--np 2)."""
    rest, value_next = [], False
    for a in argv:
        if value_next:
            value_next = False
        elif len(name := a.split("=", 1)[0]) > 2 and "--nproc".startswith(name):
            value_next = "=" not in a
        else:
            rest.append(a)
    return rest


def report_to_launcher(path: str, message: str) -> None:
    """Write the error where the launcher looks (complete once renamed), then wait to be stopped: exiting
    now would break the other ranks' collectives and make them fail noisily first."""
    import time

    from ecviz.io import atomic_write

    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(message + "\n"))
    time.sleep(60)


REPLACE_HELP = ("replace a checkpoint already in --out, and remove what described the replaced weights beside it "
                "(its training record and evaluation: metrics.jsonl, loss.png, routing.zarr, shapes_eval.json, "
                "samples.png)")


class Parser(argparse.ArgumentParser):
    """Parse errors (a missing or unknown option, a value out of range) are one line too, not usage + error."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments:") and ".tar" in message:  # bash expanded a brace pattern
            message += " (a brace pattern the shell expanded? quote it: --data \"shards/{00000..00009}.tar\")"
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default; options whose default is None or off say theirs in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and "%(default)" not in text and "(default:" not in text
                and action.default is not None
                and action.default is not False and action.default is not argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


SEED_HELP = ("noise seed of the run: sample i (prompt-major, prompt*images_per_prompt + image) draws its noise "
             "from SeedSequence([seed, i]), in every command")
GROUP_NOTE = """
An expert-choice sample depends on more than its prompt and seed: each expert takes its top tokens within a
routing group, so a sample's image also depends on the images it shares a group with (its group partners:
the neighbouring samples of its batch) and on the batch size, group size and capacity factor. Every command
lays out batches the same way (consecutive samples in whole groups; conditional and unconditional branches of
guidance never share a group), so the same prompt, seed, sample index, batch size, group size and capacity
factor give the same image in `ecviz sample`, `ecviz trace` and `ecviz eval`. To reproduce one traced sample
exactly, with its partners: `ecviz sample --from-trace STORE --sample I --out x.png`."""


DEVICE_HELP = "cpu, cuda (with several processes: one GPU each, cuda:LOCAL_RANK) or cuda:N"
DTYPE_HELP = ("number format: auto (bf16 autocast on CUDA, float32 on the CPU), float32 or bfloat16; router "
              "logits and top-C stay float32")


def add_sampler_options(s: argparse.ArgumentParser, batch: int, batch_help: str) -> None:
    """--steps, --guidance, --seed and --batch-size, as `ecviz sample`, `trace` and `eval` take them
    (ecviz.defaults). --cfg, the name the guidance scale had before, still works."""
    s.add_argument("--steps", type=int, default=D.STEPS, help="Euler steps")
    s.add_argument("--guidance", "--cfg", type=float, default=D.GUIDANCE,
                   help="classifier-free guidance scale (1: off), or --cfg")
    s.add_argument("--seed", type=int, default=D.SEED, help=SEED_HELP)
    s.add_argument("--batch-size", type=int, default=batch, help=batch_help)


def add_experiment_sampling(s: argparse.ArgumentParser, seed_help: str) -> None:
    """--steps, --guidance (or --cfg) and --seed of the experiments (ablate-words, probe-groups), defaults
    spelled out."""
    s.add_argument("--steps", type=int, default=D.STEPS, help=f"denoising steps (default: {D.STEPS})")
    s.add_argument("--guidance", "--cfg", type=float, default=D.GUIDANCE,
                   help=f"classifier-free guidance scale, or --cfg (default: {D.GUIDANCE})")
    s.add_argument("--seed", type=int, default=D.SEED, help=f"{seed_help} (default: {D.SEED})")


def add_removal_options(s: argparse.ArgumentParser, what: str) -> None:
    """--remove-experts and --remove-layers, as `ecviz sample` and `eval` take them (ecviz.experiments)."""
    s.add_argument("--remove-experts", metavar="EXPERTS",
                   help=f"expert indices, e.g. 2 or 0,5-7 or all, that add nothing (their gates zeroed; routing "
                        f"not edited: ecviz.experiments.experts_removed): {what} (default: none)")
    s.add_argument("--remove-layers", metavar="BLOCKS",
                   help="with --remove-experts: the sparse blocks to remove them from, e.g. 1,3 (default: all)")


CAPACITY_HELP = ("inference f_c: expert slots per token, C = group x f_c / experts (expert choice: experts per "
                 "token on average; default: the model's, as trained)")


def add_routing_options(s: argparse.ArgumentParser) -> None:
    """--group-size and --capacity-factor, the inference routing of `ecviz sample`, `trace` and `eval`."""
    s.add_argument("--group-size", type=int, help="inference routing group in tokens (default: the model's)")
    s.add_argument("--capacity-factor", type=float, help=CAPACITY_HELP)


def add_device_options(s: argparse.ArgumentParser) -> None:
    """--device and --dtype, as `ecviz train`, `trace`, `eval` and `sample` take them (see ecviz.dist)."""
    s.add_argument("--device", default="cpu", help=DEVICE_HELP)
    s.add_argument("--dtype", default="auto", help=DTYPE_HELP)


def resolve_device(spec: str):
    from ecviz.dist import resolve_device

    return resolve_device(spec)


CKPT_HELP = "checkpoint directory, or an `ecviz train` run directory (its checkpoint/)"


def add_model_commands(command) -> None:
    """The model commands: presets, init, sample and hooks."""
    s = command("presets", "list model presets with total and activated parameter counts")
    s.add_argument("preset", nargs="?", help="one preset name (default: all)")
    s.set_defaults(fn=cmd_presets)

    s = command("init", "write a freshly initialised checkpoint of a preset")
    s.add_argument("--preset", required=True, help="preset name (see `ecviz presets`)")
    s.add_argument("--out", required=True, help="checkpoint directory to write")
    s.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    s.add_argument("--group-size", type=int, help="routing group (tokens) in training (default: the preset's)")
    s.add_argument("--infer-group-size", type=int,
                   help="routing group (tokens) at inference (default: the preset's)")
    s.add_argument("--overwrite", action="store_true", help=REPLACE_HELP)
    s.set_defaults(fn=cmd_init)

    s = command("export", "copy a checkpoint with its weights in float16 (half the size) or another format")
    s.add_argument("--ckpt", required=True, help=CKPT_HELP)
    s.add_argument("--out", required=True, help="checkpoint directory to write")
    s.add_argument("--dtype", default="float16", help="weight format: float16, bfloat16 or float32")
    s.add_argument("--overwrite", action="store_true", help=REPLACE_HELP)
    s.set_defaults(fn=cmd_export)

    s = command("sample", "sample images for one prompt into a PNG strip, or reproduce a traced sample",
                epilog=GROUP_NOTE)
    s.add_argument("--ckpt", help=CKPT_HELP + " (default with --from-trace: the trace's)")
    s.add_argument("--prompt", help="the prompt (default: none; give it or --from-trace)")
    s.add_argument("--out", required=True, help="image file to write (.png; .jpg, .webp and other types Pillow "
                   "writes as their suffix says)")
    s.add_argument("--n", type=int, default=SAMPLE_N, help="images, samples 0..n-1 of the prompt, side by side")
    add_sampler_options(s, D.TRACE_BATCH, "samples per model batch (rounded up to whole routing groups), as in "
                        "`ecviz trace`")
    add_routing_options(s)
    s.add_argument("--from-trace", metavar="STORE",
                   help="reproduce sample --sample of this trace exactly (its prompt, seed, settings and "
                        "group partners) instead of --prompt (default: none)")
    s.add_argument("--sample", type=int, default=0, help="with --from-trace: which sample")
    s.add_argument("--scale", type=int, default=4, help="pixel upscale of the PNG")
    add_removal_options(s, "sample again with them removed and write both rows, with and without them, from the "
                        "same noise")
    add_device_options(s)
    s.set_defaults(fn=cmd_sample)

    s = command("hooks", "list a model's hook points with the shapes they see and what they mean")
    s.add_argument("--ckpt", required=True, help=CKPT_HELP)
    s.set_defaults(fn=cmd_hooks)



def add_sampling_commands(command) -> None:
    """The sampling commands: trace (record routing) and eval (score on Shapes)."""
    s = command("trace", "sample from a checkpoint and record its routing into a Zarr trace", epilog=GROUP_NOTE)
    s.add_argument("--ckpt", required=True, help=CKPT_HELP)
    s.add_argument("--prompts", required=True,
                   help="bundled set parti, geneval, shapes or shapes-eval, or a prompt file: .txt (one a line), "
                        "PartiPrompts .tsv or GenEval .jsonl")
    s.add_argument("--out", help="trace store (default: traces/CKPT-PROMPTS.zarr)")
    s.add_argument("--images-per-prompt", type=int, default=D.TRACE_IMAGES_PER_PROMPT, help="samples per prompt")
    add_sampler_options(s, D.TRACE_BATCH, "samples per batch (rounded up to whole groups)")
    add_routing_options(s)
    s.add_argument("--record", default="dispatch", help="comma list of dispatch,affinity,cross_attn,x0")
    s.add_argument("--record-steps", help="denoising steps to record, e.g. 0,5,10-12 (default: all)")
    s.add_argument("--record-layers", help="sparse block indices to record, e.g. 1,3 (default: all)")
    s.add_argument("--limit", type=int, help="only the first N prompts (default: all)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing store made differently (as the run "
                   "starts: stopped, it leaves the new store partial, and the same command without --overwrite "
                   "finishes it)")
    s.add_argument("--verify", action="store_true",
                   help="only check the store: read every chunk of its done samples and name damaged ones (exit "
                        "status 2); a run without it checks them too, and computes damaged samples again")
    s.add_argument("--nproc", type=int, default=1, help="processes, started as torchrun would start them")
    add_device_options(s)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_trace)

    s = command("eval", "ShapesEval: sample a checkpoint on Shapes prompts and score it per category",
                epilog=GROUP_NOTE)
    s.add_argument("--ckpt", required=True, help=CKPT_HELP)
    s.add_argument("--prompts", default="shapes", help="bundled set name or a GenEval-style JSONL or plain Shapes "
                   "captions file")
    s.add_argument("--images-per-prompt", type=int, default=D.EVAL_IMAGES_PER_PROMPT, help="samples per prompt")
    add_sampler_options(s, D.EVAL_BATCH, "samples per batch (rounded up to whole groups)")
    s.add_argument("--json", help="also write the result as JSON here (default: no file)")
    s.add_argument("--grid", help="also write a PNG of samples, one labelled row per prompt, prompts from every "
                   "category (default: no file)")
    s.add_argument("--grid-prompts", type=int, help=f"with --grid: prompts in the grid, spread over the categories "
                   f"(default: {D.GRID_PROMPTS})")
    s.add_argument("--grid-only", action="store_true", help="write the --grid alone, no scores: only the batches "
                   "that hold its prompts' images are sampled (a fraction of the evaluation), each image the one the "
                   "whole evaluation gives it")
    add_routing_options(s)
    add_removal_options(s, "score the model without them (the same noise; --json records them)")
    add_device_options(s)
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_eval)



def add_train_command(command) -> None:
    """The train command, with every TrainConfig setting as an option."""
    s = command("train", "train a model (Shapes or image-text data), with checkpoints and probes")
    s.add_argument("--preset", required=True, help="preset name (see `ecviz presets`)")
    s.add_argument("--data", default="shapes", help="'shapes' (shapes:CATEGORY,... for some caption categories "
                   "only, CATEGORY*N for N shares of one), a folder of image+.txt pairs, or .tar shards")
    s.add_argument("--steps", type=int, default=2000, help="optimizer steps in all (with --resume: the new end)")
    s.add_argument("--out", required=True, help="run directory, e.g. runs/NAME (the checkpoint: runs/NAME/checkpoint)")
    s.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    # default None: TrainConfig's default applies (stated in the help; tests/test_cli.py checks they agree)
    for name, typ, text in (("batch_size", int, "global batch (default: 32)"),
                            ("lr", float, "peak learning rate (default: 0.0001)"),
                            ("warmup", int, "linear warm-up steps (default: 200)"),
                            ("text_dropout", float, "share of captions dropped, for guidance (default: 0.1)"),
                            ("mask_ratio", float, "MaskDiT token masking, paper: 0.5 (default: 0.0)"),
                            ("unmask_last", int, "with --mask-ratio: the last N steps see every token, "
                                                 "MaskDiT's unmasked tuning (default: 0)"),
                            ("ema", float, "EMA decay of the saved weights (default: 0.999)"),
                            ("grad_clip", float, "max gradient norm (default: 1.0)"),
                            ("ckpt_every", int, "steps between checkpoints (default: 500)"),
                            ("probe_every", int, "steps between routing probes (default: 250)"),
                            ("log_every", int, "steps between metrics rows (default: 10)"),
                            ("seed", int, "seed of data order, noise and timesteps (default: 0)"),
                            ("data_seed", int, "shapes only: the seed of the image stream; another one gives a "
                                               "checkpoint trained on (--init) new images (default: 0)"),
                            ("image_size", int, "data resolution (default: the preset's input size)"),
                            ("group_size", int, "training routing group in tokens (default: the preset's)"),
                            ("t_mu", float, "logit-normal timestep mean (default: 0.0)"),
                            ("t_sigma", float, "logit-normal timestep std (default: 1.0)"),
                            ("codec", str, "latent codec: pixel or vae:DIR (default: the preset's)"),
                            ("text_encoder", str, "minilm or hf:DIR (default: the preset's)"),
                            ("text_table", str, "precomputed caption embeddings of that encoder "
                                                "(scripts/device_kit.sh makes one for Shapes): no encoder is "
                                                "loaded for the captions it holds (default: none)"),
                            ("device", str, DEVICE_HELP + " (default: cpu)"),
                            ("dtype", str, DTYPE_HELP + " (default: auto)"),
                            ("model", str, "model config overrides on the preset, KEY=VALUE,... e.g. width=96,depth=8 "
                                           "(default: none)"),
                            ("lr_decay", str, "after warm-up: constant or cosine (default: constant)"),
                            ("lr_min_ratio", float, "cosine decay ends at this share of --lr (default: 0.1)"),
                            ("init", str, "a checkpoint directory whose weights start the model, to fine-tune it "
                                          "or train it on (same preset and --model overrides; default: fresh "
                                          "weights)")):
        s.add_argument("--" + name.replace("_", "-"), type=typ, help=text)
    s.add_argument("--data-cache", nargs="?", const="auto", metavar="DIR",
                   help="shapes only: pre-render the run's items once into a cache under DIR (default "
                        "$ECVIZ_CACHE, else $XDG_CACHE_HOME/ecviz, else ~/.cache/ecviz), reused by later runs; "
                        "results are identical without it")
    s.add_argument("--data-workers", type=int,
                   help="processes that make batches ahead (0: a background thread; default: 0 with "
                        "--data-cache, else up to 8)")
    s.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes, started as torchrun would start them")
    s.add_argument("--fsdp", action="store_true", default=None,
                   help="with several processes: shard the model (FSDP2) instead of replicating it (DDP)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_train)



def analysis_command(sub, name: str, text: str) -> argparse.ArgumentParser:
    """A subcommand whose --help starts with what it does, as every other's does."""
    return sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".", formatter_class=HelpFormatter)


def add_analysis_commands(sub) -> None:
    """The analysis commands: report, ablate-words and probe-groups."""
    s = analysis_command(sub, "report", "figures, summary.json and summary.md of a trace or a training run's routing")
    s.add_argument("source", nargs="?", metavar="TRACE",
                   help="trace store, or a run/checkpoint directory with routing.zarr (or --trace)")
    s.add_argument("--trace", help="TRACE as an option (default: the argument)")
    s.add_argument("--out", help="output directory: new, empty or this record's report (default: reports/NAME for "
                   "traces/NAME.zarr, reports/NAME-training for a run NAME's probe)")
    s.add_argument("--sample", type=int, default=0, help="sample shown in the per-image figures (default: 0)")
    s.set_defaults(fn=cmd_report)

    s = analysis_command(sub, "ablate-words", "re-sample each prompt with one word masked out; causal word importance")
    s.add_argument("--ckpt", required=True, help="checkpoint directory")
    s.add_argument("--prompts", required=True, help="prompt file")
    s.add_argument("--out", required=True, help="output store (Zarr)")
    s.add_argument("--images-per-prompt", type=int, default=1, help="(default: 1)")
    add_experiment_sampling(s, "run seed; sample i's noise as in ecviz trace")
    s.add_argument("--group-size", type=int, help="inference routing group in tokens (default: one image)")
    s.add_argument("--capacity-factor", type=float, help=CAPACITY_HELP)
    s.add_argument("--limit", type=int, help="only the first N prompts (default: all)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_ablate_words)

    s = analysis_command(sub, "probe-groups", "how much a sample's routing depends on its routing-group partners")
    s.add_argument("--ckpt", required=True, help="checkpoint directory")
    s.add_argument("--prompts", required=True, help="prompt file")
    s.add_argument("--limit", type=int, default=8, help="first N prompts, one image each (default: 8)")
    add_experiment_sampling(s, "run seed")
    s.add_argument("--json", help="also write the result here as JSON (default: print only)")
    s.set_defaults(fn=cmd_probe_groups)


WORKFLOW = """a first look (ecviz COMMAND --help for each):
  ecviz trace --ckpt checkpoints/ec-dit-shapes --prompts shapes --record dispatch,cross_attn --out traces/mine.zarr
  ecviz report traces/mine.zarr                            # figures and statistics in reports/mine
  streamlit run app/main.py -- --trace traces/mine.zarr    # browse it over the generated images"""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="ecviz", description="See where an expert-choice diffusion transformer "
                                "spends its compute.", formatter_class=HelpFormatter, epilog=WORKFLOW)
    from ecviz._version import version

    p.add_argument("--version", action="version", version=f"ecviz {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, epilog: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".", epilog=epilog,
                              formatter_class=HelpFormatter)

    add_model_commands(command)
    add_sampling_commands(command)
    add_train_command(command)
    add_analysis_commands(sub)
    for name, command_parser in sub.choices.items():
        apply_ranges(name, command_parser)  # every int and float option gets its range (ecviz.validate)
    return p


PACKAGE = Path(__file__).resolve().parent  # warnings raised in here are ours


def out_of_memory(e: BaseException) -> bool:
    """Whether `e` says an allocation failed: numpy's and Python's MemoryError, torch's OutOfMemoryError (CUDA)
    and its CPU allocator's RuntimeError. What the up-front checks (`validate.check_fits`) did not foresee."""
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "Caught MemoryError" in str(e)))


def one_line_text(e: BaseException) -> str:
    """An exception's message on one line, at most 200 characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def bad_input_text(e: BaseException) -> str:
    """The message of bad input. One raised in a DataLoader worker reaches here re-raised by torch with the
    worker's traceback in its message ("Caught EcvizError in DataLoader worker process 0. Original Traceback
    ..."): its own message is the traceback's last line, after the exception's name."""
    text = str(e)
    if "\nOriginal Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    name = f"{type(e).__module__}.{type(e).__qualname__}: "
    return last.split(name, 1)[1] if name in last else last


def refuse(args, text: str) -> int:
    """Say `text` as the command's one-line error (a rank of `--nproc` also reports it to the launcher, which
    says it once and stops the others); the exit status of bad input."""
    message = f"ecviz {args.command}: error: {text}"
    if os.environ.get(ERROR_FILE_ENV):
        report_to_launcher(os.environ[ERROR_FILE_ENV], message)
    print(message, file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    args.argv = argv  # what `--nproc` runs again in each rank
    warnings.simplefilter("default")
    plain = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None):  # ours: one line, like the errors
        if category is UserWarning and Path(filename).resolve().is_relative_to(PACKAGE):
            return f"ecviz {args.command}: warning: {message}\n"
        return plain(message, category, filename, lineno, line)  # a library's: where it comes from

    warnings.formatwarning = one_line
    try:
        if os.environ.get("ECVIZ_LAUNCHER_PID"):  # ecviz.dist.LAUNCHER_ENV: a rank of `--nproc`, not to outlive it
            from ecviz.dist import die_with_launcher

            die_with_launcher()
        args.fn(args)
    except BrokenPipeError:  # `ecviz presets | head`: the reader has gone, and so do we, quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (EcvizError, OSError) as e:  # bad input; any other exception is a bug and keeps its traceback
        return refuse(args, bad_input_text(e))
    except (MemoryError, RuntimeError) as e:  # torch's CPU and CUDA allocators raise RuntimeErrors
        if not out_of_memory(e):
            raise  # a bug: its traceback
        return refuse(args, f"out of memory ({one_line_text(e)}); ask for less at once (fewer steps or images, a "
                            "smaller batch)")
    except KeyboardInterrupt:
        print(f"ecviz {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = plain  # main() called from Python (tests) leaves the process as it was
    return 0
