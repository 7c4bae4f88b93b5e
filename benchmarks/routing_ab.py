"""A/B of the CPU dispatch: this checkout's `ecviz/routing.py` against the one of a git revision.

What: the EC and top-2 TC layers at the XL shape (d = 1152, E = 32 experts of hidden 4d, f_c = 2, N = 4096
tokens), forward (no_grad, eval) and forward+backward (train), float32 on the CPU, with identical weights in
both versions. Why: a change to the routing code must not make the CPU default path slower; the machine is
shared and noisy, so both versions run interleaved (order reversed every other round) and the ratio is of the
best times (the median of per-round ratios beside it). The old module is loaded from `git show REV:...`.

Usage: python benchmarks/routing_ab.py --rev 978004d [--group 512] [--rounds 5] [--out PATH]
Writes benchmarks/results/routing_ab.json (one entry per group, merged into what is there) and prints it.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from timing import interleaved, layer_passes  # noqa: E402

from ecviz import routing as new  # noqa: E402
from ecviz.io import atomic_write  # noqa: E402


def old_module(rev: str):
    src = subprocess.run(["git", "show", f"{rev}:ecviz/routing.py"], cwd=HERE.parent, capture_output=True,
                         text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="ecviz-ab-")) / "routing_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("routing_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rev", required=True, help="git revision whose ecviz/routing.py is the baseline")
    p.add_argument("--group", type=int, default=512, help="routing group (tokens)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds")
    p.add_argument("--out", type=Path, default=HERE / "results" / "routing_ab.json")
    args = p.parse_args(argv)
    d, E, N, g = 1152, 32, 4096, args.group
    versions = {"old": old_module(args.rev), "new": new}
    layers = {}
    for kind in ("ec", "tc"):
        for ver, mod in versions.items():
            torch.manual_seed(0)
            cls = mod.ExpertChoiceMoE if kind == "ec" else mod.TokenChoiceMoE
            layers[f"{kind}_{ver}"] = cls(d, 4 * d, E, 2.0, g, infer_group_size=g)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N // 256, 256, d, generator=gen)
    grad = torch.randn(x.shape, generator=gen)
    fwd, fwd_bwd = layer_passes(x, grad)
    load_start = os.getloadavg()
    times = interleaved({f"{name}_{ph}": functools.partial(fn, m) for name, m in layers.items()
                         for ph, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd))}, args.rounds, collect=True)
    row = {"group": g, "rev": args.rev, "rounds": args.rounds, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "load_start": load_start, "load_end": os.getloadavg(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "best_ms": {k: round(1e3 * min(v), 1) for k, v in times.items()}, "new_over_old": {},
           "new_over_old_median": {}}
    for kind in ("ec", "tc"):
        for ph in ("fwd", "fwd_bwd"):
            a, b = times[f"{kind}_new_{ph}"], times[f"{kind}_old_{ph}"]
            row["new_over_old"][f"{kind}_{ph}"] = round(min(a) / min(b), 3)
            paired = statistics.median(x / y for x, y in zip(a, b, strict=True))
            row["new_over_old_median"][f"{kind}_{ph}"] = round(paired, 3)
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    doc[str(g)] = row
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2) + "\n"))
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
