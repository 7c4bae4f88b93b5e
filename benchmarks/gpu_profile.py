"""Where the sparse layers' GPU time goes (issue 11): torch.profiler kernel tables for the layers that
benchmarks/gpu.py times, so that a missed target points at the kernel to fuse or retile next.

For one routing group size (default 1024, the training group) at the XL shape (d = 1152, E = 32, f_c = 2,
N = 32,768 tokens or --tokens, bf16), each of dense, EC and top-2 TC with each dispatch, forward (no_grad, eval) and
forward+backward (train): a few warm-up calls, then `--calls` profiled calls, and the kernels sorted by their
GPU time, in ms per call. The layers are built as in gpu.py (`gpu.layers_at`'s construction). Run it alone
on the GPU: another process's kernels, time-sliced with these, stretch their measured durations (the first
H200 run, beside three training jobs, read the dense FFN's GELU at 0.48 ms).

Usage: python benchmarks/gpu_profile.py [--group 1024] [--calls 10] [--rows 12] [--out FILE.txt]
       python benchmarks/gpu_profile.py --device cpu --tiny     (a smoke test: CPU operator times)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import gpu  # noqa: E402  (benchmarks/gpu.py: the shapes and the layers it times)
import timing  # noqa: E402  (benchmarks/timing.py: the forward and forward+backward passes)


def kernel_table(prof, calls: int, rows: int, cuda: bool) -> str:
    """The top `rows` entries by self device time, kernels only on a GPU (the operators that launch them would
    count the same time twice), CPU operators otherwise; ms per call."""
    def us(e) -> float:  # torch < 2.4 names the device time self_cuda_time_total
        if not cuda:
            return e.self_cpu_time_total
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    events = list(prof.key_averages())
    kernels = [e for e in events if getattr(getattr(e, "device_type", None), "name", "") == "CUDA"]
    events = sorted(kernels if cuda and kernels else events, key=us, reverse=True)  # not ops and their kernels
    total = sum(map(us, events)) / 1e3 / calls
    lines = [f"  total {total:.3f} ms per call", "  " + "ms/call".rjust(9) + "  share  count  name"]
    for e in events[:rows]:
        t = us(e) / 1e3 / calls
        if t <= 0:
            break
        lines.append(f"  {t:9.4f}  {t / total:5.1%}  {e.count // calls:5d}  {e.key[:110]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = gpu.diagnostic_parser(__doc__)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--out", type=Path, default=None, help="also write the tables to this file")
    setup = gpu.diagnostic_setup(p, argv, "gpu_profile.py")
    if setup is None:
        return 2
    args, device, cfg, group = setup
    cuda = device.type == "cuda"
    dispatches = ["torch", "triton"] if gpu.fused_available(device) else ["torch"]
    mods = gpu.make_layers(cfg, group, device)
    x, grad = gpu.layer_inputs(cfg, device)
    passes = dict(zip(("fwd", "fwd_bwd"), timing.layer_passes(x, grad), strict=True))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    report = [f"# {torch.cuda.get_device_name(device) if cuda else 'cpu'}, torch {torch.__version__}, "
              f"N = {cfg['tokens']}, d = {cfg['dim']}, E = {cfg['experts']}, group {group}, bf16"]
    for name, m in mods.items():
        for impl in ([None] if name == "dense" else dispatches):
            if impl:
                m.dispatch = impl
            for phase, run in passes.items():
                def call(run=run, m=m):
                    run(m)
                for _ in range(3):
                    call()
                if cuda:
                    torch.cuda.synchronize(device)
                with profile(activities=activities) as prof:
                    for _ in range(args.calls):
                        call()
                    if cuda:
                        torch.cuda.synchronize(device)
                report += ["", f"## {name}{'_' + impl if impl else ''} {phase}",
                           kernel_table(prof, args.calls, args.rows, cuda)]
    text = "\n".join(report)
    print(text)
    if args.out:
        from ecviz.io import atomic_write

        atomic_write(args.out, lambda tmp: Path(tmp).write_text(text + "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
