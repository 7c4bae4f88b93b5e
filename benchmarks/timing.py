"""Timing helpers shared by the benchmark scripts (imported as `timing`: the scripts run from benchmarks/).

`interleaved` times named callables in rounds, in reversed order every other round, so that a slow spell of
the shared machine does not fall on one variant (every benchmark that compares variants uses it, the GPU one
with its own timer); `layer_passes` gives the forward and forward+backward calls
of a routing layer that the scripts time.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import torch

Job = Callable | tuple[Callable, Callable]  # run, or (run, reset): reset runs before each call, outside the timer


def seconds(fn: Callable) -> float:
    """The default timer: wall seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(jobs: dict[str, Job], repeats: int, collect: bool = False, warmup: int = 1,
                timer: Callable[[Callable], float] = seconds,
                rounds: dict[str, int] | None = None) -> dict[str, list[float]]:
    """{name: [time of each timed call]}: every job warmed up `warmup` times, then timed in `repeats` rounds, in
    reversed order every other round. collect: gc before every timed call; timer: what times one call (default
    wall seconds; the GPU benchmark passes CUDA-event milliseconds); rounds: fewer timed rounds for some jobs."""
    pairs = {n: j if isinstance(j, tuple) else (j, nothing) for n, j in jobs.items()}
    for run, reset in pairs.values():
        for _ in range(warmup):
            reset()
            run()
    limit = {n: min(repeats, (rounds or {}).get(n, repeats)) for n in pairs}
    times: dict[str, list[float]] = {n: [] for n in pairs}
    for r in range(repeats):
        for n in pairs if r % 2 == 0 else reversed(pairs):
            if len(times[n]) < limit[n]:
                run, reset = pairs[n]
                reset()
                if collect:
                    gc.collect()
                times[n].append(timer(run))
    return times


def nothing() -> None:
    """A reset that does nothing."""


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
