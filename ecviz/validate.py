"""Checks of user input that every command shares: numeric ranges, device strings and output paths.

Bad input must end in one line and exit status 2 *before any work*: before a model loads, a process starts or
a file is written. So every numeric option of every command has a range here (`RANGES`, by option name, with
per-command exceptions), which the command line applies as the option's argparse type (`apply_ranges`): an
out-of-range, non-finite or non-numeric value is refused while the arguments are parsed. The Python API
(`TrainConfig`, `TraceSettings`, ...) checks the same ranges with `check`. 0 is a value like any other, never
"not given" (that is None). tests/test_cli.py builds its table of bad values from the parser, so an option
added without a range fails it.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

from ecviz.errors import EcvizError, UsageError, sample_ranges


@dataclass(frozen=True)
class Number:
    """A numeric option's type and range: `kind` int or float (always finite), bounds `lo`/`hi` (None: none),
    `open_lo`/`open_hi` to exclude a bound. Called on a command-line string it parses and checks it."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False

    @property
    def rule(self) -> str:
        """'an integer >= 1', 'a number in [0, 1)', 'a finite number > 0', ..."""
        what = "an integer" if self.kind is int else "a finite number"
        lo, hi = (None if b is None else f"{b:,}" if self.kind is int else f"{b:g}" for b in (self.lo, self.hi))
        if lo is not None and hi is not None:  # integer bounds in full: 10,000,000, not 1e+07
            return f"{what} in {'(' if self.open_lo else '['}{lo}, {hi}{')' if self.open_hi else ']'}"
        if lo is not None:
            return f"{what} {'>' if self.open_lo else '>='} {lo}"
        if hi is not None:
            return f"{what} {'<' if self.open_hi else '<='} {hi}"
        return what

    def ok(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind is int and not (isinstance(value, int) or float(value).is_integer()):
            return False
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.open_lo else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.open_hi else value > self.hi))

    def check(self, value, option: str) -> None:
        """Raise a one-line UsageError naming the option unless value is in range (None: not given, passes)."""
        if value is not None and not self.ok(value):
            raise UsageError(f"{option} {value}: must be {self.rule}")

    def __call__(self, text: str):
        """argparse type: the parsed value, or ArgumentTypeError (argparse names the option)."""
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {self.rule}") from None
        if not self.ok(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {self.rule}")
        return value

    def out_of_range(self) -> list[str]:
        """Command-line values this range refuses (for tests): past each bound, and nan/inf for floats."""
        out = []
        step = 1 if self.kind is int else 0.5
        if self.lo is not None:
            out.append(str(self.kind(self.lo) if self.open_lo else self.kind(self.lo - step)))
        if self.hi is not None:
            out.append(str(self.kind(self.hi) if self.open_hi else self.kind(self.hi + step)))
        if self.kind is float:
            out += ["nan", "inf"]
        elif self.lo is None and self.hi is None:
            out.append("1.5")
        return out


COUNT = Number(int, 1)  # at least one
SEED = Number(int, 0, 2**63 - 1)
GUIDANCE = Number(float, 0, 100)
MAX_NPROC = max(64, os.cpu_count() or 1)
MAX_STEPS = 10**7  # denoising or training steps: far above any use (what a run records is checked: check_fits)

# numeric options by argparse dest, the same range in every command that has one; then per-command exceptions
RANGES: dict[str, Number] = {
    "steps": Number(int, 1, MAX_STEPS), "n": Number(int, 1, 4096), "images_per_prompt": Number(int, 1, 4096),
    "batch_size": COUNT,
    "group_size": COUNT, "infer_group_size": COUNT, "limit": COUNT, "guidance": GUIDANCE, "seed": SEED,
    "capacity_factor": Number(float, 0, open_lo=True),
    "data_seed": SEED,
    "sample": Number(int, 0), "scale": Number(int, 1, 64), "grid_prompts": COUNT, "nproc": Number(int, 1, MAX_NPROC),
    "lr": Number(float, 0, open_lo=True), "warmup": Number(int, 0), "text_dropout": Number(float, 0, 1),
    "mask_ratio": Number(float, 0, 1, open_hi=True), "unmask_last": Number(int, 0), "ema": Number(float, 0, 1),
    "grad_clip": Number(float, 0, open_lo=True), "ckpt_every": COUNT, "probe_every": COUNT, "log_every": COUNT,
    "image_size": COUNT,
    "t_mu": Number(float), "t_sigma": Number(float, 0, open_lo=True), "data_workers": Number(int, 0, 64),
    "momentum": Number(float, 0, 1, open_hi=True), "rms_alpha": Number(float, 0, 1, open_lo=True, open_hi=True),
    "lr_min_ratio": Number(float, 0, 1),
}
# options that name a file or directory, by argparse dest (and any option whose metavar is DIR, STORE, FILE, PATH)
PATHS = {"out", "ckpt", "prompts", "json", "grid", "trace", "from_trace", "data", "data_cache"}
COMMAND_RANGES: dict[tuple[str, str], Number] = {
    ("probe-groups", "limit"): Number(int, 2),  # partners need a second sample
}


def range_of(command: str, dest: str) -> Number | None:
    return COMMAND_RANGES.get((command, dest), RANGES.get(dest))


def path_text(text: str) -> str:
    """argparse type of a path option: any text but an empty one (`--json ''` was ignored, `--out ''` wrote
    into the working directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; name a file or directory")
    return text


def apply_ranges(command: str, parser: argparse.ArgumentParser) -> None:
    """Give every int or float option of `command` its range as its argparse type (options without one keep
    their plain type, which tests/test_cli.py refuses), and every path option (metavar or name in PATHS) the
    type path_text."""
    for action in parser._actions:
        if action.type in (int, float) and (r := range_of(command, action.dest)) is not None:
            if r.kind is not action.type:
                raise TypeError(f"ecviz {command} {action.dest}: range is for {r.kind.__name__}")
            action.type = r
        elif action.type is None and action.option_strings and action.nargs in (None, "?") and (
                action.dest in PATHS or action.metavar in ("DIR", "STORE", "FILE", "PATH")):
            action.type = path_text


def check_all(values: dict, prefix: str = "--") -> None:
    """Check every value whose name has a range (names as in `RANGES`; None: not given)."""
    for name, value in values.items():
        r = RANGES.get(name)
        if r is not None:
            r.check(value, prefix + name.replace("_", "-"))


def check_sparse_options(cfg, given: dict) -> None:
    """Routing options ({flag: value or None}) given for a dense model: a one-line UsageError (they were accepted
    and ignored)."""
    for flag, value in given.items():
        if value is not None and not cfg.sparse:
            raise UsageError(f"{flag} {value:g}: a dense model has no experts to route")


def check_routing(cfg, group_size: int | None = None, capacity_factor: float | None = None) -> None:
    """--group-size and --capacity-factor (the inference routing of `sample`, `trace`, `eval` and `ablate-words`)
    against a model's config, read before its weights load: a one-line UsageError naming the options where the
    model cannot route so (a dense model has no experts; a group must hold whole images or an equal share of one; a
    capacity must fit the group)."""
    check_sparse_options(cfg, {"--group-size": group_size, "--capacity-factor": capacity_factor})
    if cfg.sparse and (group_size is not None or capacity_factor is not None):
        try:
            replace(cfg, infer_group_size=group_size or cfg.infer_group_size,
                    infer_capacity_factor=capacity_factor or cfg.infer_capacity_factor)
        except EcvizError as e:
            given = [f"{flag} {v:g}" for flag, v in (("--group-size", group_size),
                                                     ("--capacity-factor", capacity_factor)) if v is not None]
            raise UsageError(f"{', '.join(given)}: {e}") from None


def host_memory() -> int | None:
    """This machine's physical memory in bytes (None where the system does not say)."""
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def check_layers(cfg, layers=None, name: str = "layers") -> list[int]:
    """The sorted sparse layers (block indices; default: all) of a model of config cfg, or a one-line UsageError
    (`name`: the option or argument that gave them): what `trace --record-layers` and the experiments take."""
    layers = cfg.sparse_layers if layers is None else sorted({int(b) for b in layers})
    if not layers or not set(layers) <= set(cfg.sparse_layers):
        if not cfg.sparse:
            raise UsageError(f"{name}: a dense model has no sparse layers")
        sparse = cfg.sparse_layers
        raise UsageError(f"{name} {index_text(layers) or 'nothing'}: the sparse layers are block"
                         f"{'s' if len(sparse) > 1 else ''} {index_text(sparse)}")
    return layers


def check_fits(need: int, what: str, remedy: str, processes: int = 1) -> None:
    """Refuse, in one line and before anything is written, work that would need more than this machine's memory
    (`--steps 10000000` ran out of it a batch in, with a traceback, its store already replaced). need: one
    process's bytes; processes: how many such processes share this machine (`dist.ranks().local_world`)."""
    have = host_memory()
    if have is not None and need * processes > have:
        each = f" per process ({processes} here: {need * processes / 2**30:,.0f} GiB)," if processes > 1 else ","
        fewer = ", or run fewer processes on this machine (--nproc, LOCAL_WORLD_SIZE)" if processes > 1 else ""
        raise UsageError(f"{what} needs about {need / 2**30:,.0f} GiB{each} more than this machine's "
                         f"{have / 2**30:,.0f} GiB; {remedy}{fewer}")


def check_device(spec: str, nproc: int | None = None) -> None:
    """`spec` must name a device this machine has: cpu, cuda or cuda:N, as `ecviz.dist.resolve_device` reads it
    (the one place that does). nproc: the processes the `--nproc` launcher is about to start here, one GPU each
    with cuda (so the machine needs nproc of them; cuda:N would put them all on one). None or 1: this process
    alone, or its own place under torchrun (LOCAL_RANK; cuda:N is refused there too, where WORLD_SIZE > 1)."""
    from ecviz import dist  # imports torch: only for commands that take a device

    several = nproc is not None and nproc > 1
    dist.resolve_device(spec, local_rank=nproc - 1 if several else None)  # the last process's GPU
    world = dist.ranks().world  # torchrun by hand: each rank checks its own device
    if (several or world > 1) and str(spec).startswith("cuda:"):
        how = f"--nproc {nproc}" if several else f"{world} processes (WORLD_SIZE)"
        raise UsageError(f"--device {spec} with {how}: every process would share one GPU "
                         f"(use --device cuda: one GPU each)")


STORE_KINDS = {"ecviz_schema_version": "an ecviz trace", "ecviz_probe_version": "a training probe (routing.zarr)",
               "ecviz_ablation_version": "a word-ablation store"}  # by the attribute that marks each


def store_kind(path: str | Path) -> str | None:
    """What ecviz store is at path ("an ecviz trace", ...: STORE_KINDS), "a Zarr store" for any other, None for
    no store (or one whose metadata does not read: the writer that meets it says so)."""
    import json

    meta = Path(path) / "zarr.json"
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return None if not meta.exists() else "a Zarr store"
    return next((what for key, what in STORE_KINDS.items() if key in attrs), "a Zarr store")


def check_store_kind(path: str | Path, option: str, want: str) -> None:
    """Refuse, whatever --overwrite says, an existing ecviz store of another kind than `want` at path: a trace
    written over a run's training probe, or an ablation over a trace, would delete what only a rerun of its own
    command (a training run) could make again."""
    have = store_kind(path)
    if have is not None and have != want and have != "a Zarr store":
        raise UsageError(f"{option} {path}: is {have}, not {want}; --overwrite replaces only {want}: write it "
                         "elsewhere")


def check_output(path: str | Path, option: str, kind: str = "file") -> Path:
    """Refuse, naming the option and the path, an output that cannot be written: a `kind` ("file", "dir",
    "checkpoint": a directory that is not a training run's, or "store": a Zarr store that is built beside its
    path and swapped in whole, so never the working directory or one above it, nor a directory of other files,
    which replacing it would delete) path whose existing part is the wrong kind or not writable, a file that is
    part of a checkpoint, or a path inside a Zarr store (a trace), whose readers would meet a stranger in it.
    Creates nothing."""
    path = Path(path)
    full = Path(os.path.abspath(path))
    for above in full.parents:
        if (above / "zarr.json").is_file():
            raise UsageError(f"{option} {path}: is inside the Zarr store {above}; write it elsewhere")
    if kind in ("file", "checkpoint"):
        from ecviz.checkpoint import CHECKPOINT_FILES, CONFIG, RUN_CHECKPOINT, TRAIN_STATE, WEIGHTS, is_run_directory
    if kind == "file" and path.name in CHECKPOINT_FILES and (path.parent / CONFIG).is_file() \
            and (path.parent / WEIGHTS).is_file():
        raise UsageError(f"{option} {path}: is a file of the checkpoint {path.parent}, which writing it would "
                         "break; write it elsewhere")
    if kind == "checkpoint":  # a checkpoint's directory, never an `ecviz train` run's: its config.json there
        if is_run_directory(path):  # would stand in for checkpoint/
            raise UsageError(f"{option} {path}: is an `ecviz train` run directory; write the checkpoint to a "
                             "directory of its own")
        if full.name == RUN_CHECKPOINT and (full / TRAIN_STATE).exists():  # its training state, its run's record
            raise UsageError(f"{option} {path}: is the checkpoint of the `ecviz train` run {full.parent} (its "
                             "training state and record would describe other weights); write it elsewhere")
        kind = "dir"
    if kind == "store":
        here = Path.cwd()
        if full == here or full in here.parents:
            raise UsageError(f"{option} {path}: is the working directory or one above it; name the store itself, "
                             f"for example {option} traces/NAME.zarr")
        if path.is_dir() and not (path / "zarr.json").exists():
            other = sorted(p.name for p in path.iterdir())
            if other:  # what --overwrite would delete
                raise UsageError(f"{option} {path}: exists and is not a Zarr store (it holds {other[0]!r}); name a "
                                 "new path or move it away")
        kind = "dir"
    elif kind == "dir" and (path / "zarr.json").exists():
        raise UsageError(f"{option} {path}: is a Zarr store (a trace); write it elsewhere")
    if path.exists():
        if kind == "dir" and not path.is_dir():
            raise UsageError(f"{option} {path}: exists and is not a directory")
        if kind == "file" and path.is_dir():
            raise UsageError(f"{option} {path}: is a directory")
        if kind == "file" and not path.is_file():  # a device, a FIFO or a socket: an atomic write replaces it
            raise UsageError(f"{option} {path}: is not a regular file (a device, pipe or socket); name a file")
        if not os.access(path, os.W_OK) or (kind == "dir" and not os.access(path, os.X_OK)):
            raise UsageError(f"{option} {path}: not writable")
        parent = path.parent
        if not os.access(parent, os.W_OK | os.X_OK):  # atomic writes put a temporary beside it
            raise UsageError(f"{option} {path}: its directory {parent} is not writable")
        return path
    first = path.absolute().parent
    while not first.exists():
        if first.is_symlink():  # a dangling link
            raise UsageError(f"{option} {path}: {first} is a broken link")
        first = first.parent
    if not first.is_dir():
        raise UsageError(f"{option} {path}: {first} is not a directory")
    if not os.access(first, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: cannot create it ({first} is not writable)")
    return path


MAX_INDICES = 100_000  # an index list names steps, layers or experts: far fewer than this


def index_text(indices) -> str:
    """Sorted indices as `parse_index_list` reads them back, runs as ranges: [0, 1, 2, 5] -> '0-2,5'."""
    return sample_ranges(indices, ",")


def parse_index_list(spec: str | None, name: str) -> list[int] | None:
    """'all' or None -> None; '0,5,10-12' -> [0, 5, 10, 11, 12]. More than MAX_INDICES indices are refused
    before they are listed (0-1000000000 would fill the memory first)."""
    if spec is None or spec == "all":
        return None
    out: list[int] = []
    try:
        for part in spec.split(","):
            a, dash, b = part.partition("-")
            first, last = int(a), int(b) if dash else int(a)  # "3-" is no range: int("") raises
            if last < first:
                raise ValueError(part)
            if len(out) + last - first + 1 > MAX_INDICES:
                raise UsageError(f"{name} {spec!r}: more than {MAX_INDICES:,} indices; name the ones there are")
            out += range(first, last + 1)
    except UsageError:  # a ValueError too: not to be taken for a malformed list
        raise
    except ValueError:
        raise UsageError(f"{name} {spec!r}: expected 'all' or a list like 0,5,10-12 (ranges ascending)") from None
    return sorted(set(out))
