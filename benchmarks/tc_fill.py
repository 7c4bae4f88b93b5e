"""Token choice's buffer fill: the sort-based, score-ordered fill against the one-hot cumsum it replaced.

What: at the routing benchmark's XL size (d=1152, E=32 experts of hidden 4d, top-2, capacity factor 2, N=4096
tokens), (1) the fill alone: each assignment's slot in its expert's buffer, from (G, g, 2) top-2 choices, by
the old rule (one-hot (G, 2g, E) cumsum, position order) and by `TokenChoiceMoE.buffer_slots` with
priority "position" (which must agree with the old rule exactly) and "score"; (2) the whole layer, forward
(no_grad, eval) and forward + backward (train), old fill against the new default. Why: issue 10 made the
score order the default; this checks it costs nothing the routing benchmark's TC rows would notice.

Timing: variants interleaved (order reversed every other round), best of `--repeats` rounds; every round kept,
and the median of per-round ratios (`score_over_old_median`), which drift on a shared machine hits alike.

    python benchmarks/tc_fill.py [--repeats K] [--groups 1024,4096] [--out PATH]

Writes benchmarks/results/tc_fill.json and prints a table.
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
import torch.nn.functional as F
from timing import interleaved, layer_passes

from ecviz.io import atomic_write
from ecviz.routing import TokenChoiceMoE

ROOT = Path(__file__).resolve().parents[1]
DIM, EXPERTS, TOKENS, K = 1152, 32, 4096, 2


class OneHotFill(TokenChoiceMoE):
    """The fill before issue 10: one-hot cumsum over choices in position order."""

    def buffer_slots(self, top_p: torch.Tensor, top_e: torch.Tensor) -> torch.Tensor:
        G, g, k = top_e.shape
        chosen = F.one_hot(top_e.transpose(1, 2).reshape(G, k * g), self.num_experts)  # (G, k·g, E)
        return ((chosen.cumsum(1) - 1) * chosen).sum(-1).view(G, k, g).transpose(1, 2).contiguous()  # (G, g, k)


def fill_times(group: int, repeats: int) -> dict:
    G = max(1, TOKENS // group)
    torch.manual_seed(0)
    top_p, top_e = torch.randn(G, group, EXPERTS).softmax(-1).topk(K, -1)
    variants = (("one-hot (old)", OneHotFill, "position"), ("sort, position", TokenChoiceMoE, "position"),
                ("sort, score", TokenChoiceMoE, "score"))
    layers = {name: cls(8, 8, EXPERTS, 2.0, group, top_k=K, priority=p) for name, cls, p in variants}
    slots = {n: m.buffer_slots(top_p, top_e) for n, m in layers.items()}
    assert torch.equal(slots["one-hot (old)"], slots["sort, position"])
    return interleaved({n: (lambda m=m: m.buffer_slots(top_p, top_e)) for n, m in layers.items()}, 10 * repeats)


def layer_times(group: int, repeats: int) -> dict:
    torch.manual_seed(0)
    old = OneHotFill(DIM, 4 * DIM, EXPERTS, 2.0, group, top_k=K, priority="position")
    new = TokenChoiceMoE(DIM, 4 * DIM, EXPERTS, 2.0, group, top_k=K)
    new.load_state_dict(old.state_dict())
    x = torch.randn(TOKENS // 256, 256, DIM)
    grad = torch.randn_like(x)

    fwd, fwd_bwd = layer_passes(x, grad)
    return interleaved({"old fwd": lambda: fwd(old), "score fwd": lambda: fwd(new),
                        "old fwd+bwd": lambda: fwd_bwd(old), "score fwd+bwd": lambda: fwd_bwd(new)}, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--groups", default="1024,4096")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tc_fill.json"))
    args = ap.parse_args()
    load_start, rows = os.getloadavg(), {}
    for group in map(int, args.groups.split(",")):
        print(f"group {group} ...", file=sys.stderr, flush=True)
        rows[group] = {"fill": fill_times(group, args.repeats), "layer": layer_times(group, args.repeats)}
    ms = {g: {part: {n: round(1e3 * min(v), 3) for n, v in t.items()} for part, t in r.items()}
          for g, r in rows.items()}
    result = {
        "meta": {"command": " ".join(["python", *sys.argv]), "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "dim": DIM, "experts": EXPERTS, "tokens": TOKENS, "top_k": K, "capacity_factor": 2.0,
                 "repeats": args.repeats, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "ms_best": ms,
        "score_over_old": {g: {kind: ms[g]["layer"][f"score {kind}"] / ms[g]["layer"][f"old {kind}"]
                               for kind in ("fwd", "fwd+bwd")} for g in ms},
        "score_over_old_median": {g: {kind: statistics.median(
            a / b for a, b in zip(r["layer"][f"score {kind}"], r["layer"][f"old {kind}"], strict=True))
            for kind in ("fwd", "fwd+bwd")} for g, r in rows.items()},
        "raw_ms": {g: {part: {n: [round(1e3 * x, 2) for x in v] for n, v in t.items()} for part, t in r.items()}
                   for g, r in rows.items()},
    }
    atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    print("| group | fill one-hot (old) | fill sort, position | fill sort, score | layer fwd old / score | "
          "layer fwd+bwd old / score | median ratio fwd, fwd+bwd |")
    print("|---|---|---|---|---|---|---|")
    for g, m in ms.items():
        f, lay = m["fill"], m["layer"]
        print(f"| {g} | {f['one-hot (old)']} | {f['sort, position']} | {f['sort, score']} | "
              f"{lay['old fwd']:.0f} / {lay['score fwd']:.0f} | "
              f"{lay['old fwd+bwd']:.0f} / {lay['score fwd+bwd']:.0f} | "
              f"{result['score_over_old_median'][g]['fwd']:.2f}, {result['score_over_old_median'][g]['fwd+bwd']:.2f} |")
    print(f"\nms, best of rounds; load average {load_start[0]:.2f} before, {result['meta']['loadavg_end'][0]:.2f} "
          f"after; wrote {args.out}")


if __name__ == "__main__":
    main()
