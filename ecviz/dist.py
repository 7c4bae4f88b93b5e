"""Processes, devices and number formats: the one place `ecviz train`, `trace`, `eval` and `sample` decide them.

What: read the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, as torchrun or the `--nproc` launcher set
it), pick a process's device (`cuda` means `cuda:LOCAL_RANK`, one GPU per process), pick the autocast format
(`--dtype`), and start, synchronise and end the process group. Why one place: the commands used to carry
their own copies, which chose the CUDA device differently (`ecviz train --device cuda` stopped at once on
`torch.cuda.set_device` with an index-less device).

Number format: on CUDA the model runs under bf16 autocast by default (weights stay float32; matrix products
in bf16, reductions and norms in float32 as autocast decides). The router's logits, softmax and top-C stay
float32 in every format (`ecviz.routing.SparseMoE.route`), so bf16 never decides which tokens an expert takes
(Eq. 5-6). On the CPU the default is float32: bf16 matrix products there are about 30x slower.

Bad input (a device this machine lacks, an unknown `--dtype`) raises `UsageError`: one line, exit status 2.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

import torch

from ecviz.errors import UsageError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
DTYPE_CHOICES = "auto, float32 or bfloat16"


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the processes of one run (1 process: rank 0 of 1)."""

    rank: int
    world: int
    local_rank: int  # its index on this machine: which GPU it takes


def ranks() -> Ranks:
    """This process's rank, the number of processes and its local rank, from torchrun's variables."""
    env = os.environ
    rank = int(env.get("RANK", "0"))
    return Ranks(rank, int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))


def resolve_device(spec: str | torch.device, local_rank: int | None = None,
                   cuda_count: int | None = None) -> torch.device:
    """The device `--device spec` names for this process: cpu, cuda (= cuda:LOCAL_RANK) or cuda:N.

    cuda_count: the CUDA devices to check against (default: this machine's)."""
    text = str(spec)
    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", text)
    if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
        raise UsageError(f"--device {text}: unknown device (use cpu, cuda or cuda:N)")
    if m.group(1) == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    if count == 0:
        raise UsageError(f"--device {text}: no CUDA device available on this machine (use cpu)")
    if m.group(2) is not None:
        index = int(m.group(2))
        if index >= count:
            raise UsageError(f"--device {text}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    else:
        index = ranks().local_rank if local_rank is None else local_rank
        if index >= count:
            raise UsageError(f"--device {text}: process {index} on this machine needs GPU {index}, but there "
                             f"are {count}; use fewer processes")
    return torch.device("cuda", index)


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The autocast format `--dtype spec` names: auto (bf16 on CUDA, float32 on the CPU), float32 or bfloat16."""
    if isinstance(spec, torch.dtype):
        if spec not in DTYPES.values():
            raise UsageError(f"--dtype {spec}: choose {DTYPE_CHOICES}")
        return spec
    if spec is None or spec == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if spec not in DTYPES:
        raise UsageError(f"--dtype {spec!r}: choose {DTYPE_CHOICES}")
    return DTYPES[spec]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def autocast(device: torch.device | str, dtype: torch.dtype):
    """A context that runs the model in `dtype`: autocast for bf16, nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


# ---- the process group --------------------------------------------------------------------------------------
def start(device: torch.device) -> Ranks:
    """Make `device` this process's CUDA device (if it is one) and, with several processes, join the process
    group (NCCL on CUDA, gloo on the CPU) and share the CPU cores out among them. Returns the ranks."""
    r = ranks()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if r.world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            if device.type == "cuda":
                dist.init_process_group("nccl", device_id=device)
            else:
                dist.init_process_group("gloo")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // r.world))
    return r


def active() -> bool:
    """Whether this process is one of several in a process group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait for every process (nothing to wait for when alone)."""
    if active():
        import torch.distributed as dist

        dist.barrier()


def all_sum(value: float) -> float:
    """The sum of `value` over the processes (`value` itself when alone)."""
    if not active():
        return value
    import torch.distributed as dist

    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.float64, device=on)
    dist.all_reduce(t)
    return float(t)


def all_mean(value: float) -> float:
    """The mean of `value` over the processes."""
    if not active():
        return value
    import torch.distributed as dist

    return all_sum(value) / dist.get_world_size()


def finish() -> None:
    """Wait for every process, then leave the process group (nothing when alone)."""
    if active():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
