"""Timing helpers shared by the CPU benchmark scripts (imported as `timing`: the scripts run from benchmarks/).

`interleaved` times named callables in rounds, in reversed order every other round, so that a slow spell of
the shared machine does not fall on one variant; `layer_passes` gives the forward and forward+backward calls
of a routing layer that the scripts time.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import torch


def interleaved(fns: dict[str, Callable], repeats: int, collect: bool = False) -> dict[str, list[float]]:
    """Seconds of each call, `repeats` rounds after one warm-up call each; `collect`: gc before every call."""
    times: dict[str, list[float]] = {n: [] for n in fns}
    for n in fns:  # warm-up
        fns[n]()
    for r in range(repeats):
        for n in fns if r % 2 == 0 else reversed(fns):
            if collect:
                gc.collect()
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def layer_passes(x: torch.Tensor, grad: torch.Tensor) -> tuple[Callable, Callable]:
    """fwd(m): eval-mode forward without autograd; fwd_bwd(m): train-mode forward and backward of `grad`."""

    def fwd(m):
        m.eval()
        with torch.no_grad():
            m(x)

    def fwd_bwd(m):
        m.train()
        m.zero_grad(set_to_none=True)
        m(x.clone().requires_grad_(True)).backward(grad)

    return fwd, fwd_bwd
