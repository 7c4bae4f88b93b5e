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

The ranks of `--nproc N` (`launch`) are owned by the process that starts them: they die with it, however it
ends. SIGTERM, SIGINT or SIGHUP to the launcher stops them (SIGTERM, then SIGKILL after STOP_GRACE_S) before
it exits; SIGKILL, which no handler sees, reaches them through the parent-death signal each rank asks the
kernel for as it starts (`die_with_launcher`: prctl(PR_SET_PDEATHSIG) on Linux, a thread watching its parent
elsewhere). Otherwise a killed launcher's ranks would go on writing, re-parented to init, beside a rerun.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

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
    local_world: int = 1  # the run's processes on this machine, which share its memory


def ranks() -> Ranks:
    """This process's rank, the number of processes and its local rank, from torchrun's variables."""
    env = os.environ

    def read(name: str, default: str) -> int:
        value = env.get(name) or default
        try:
            return int(value)
        except ValueError:
            raise UsageError(f"environment variable {name}={value!r}: not an integer (set by torchrun; unset it to "
                             "run one process)") from None

    world = read("WORLD_SIZE", "1")
    # LOCAL_WORLD_SIZE (torchrun and --nproc set it); without it, as many as could be here: all of them
    got = Ranks(read("RANK", "0"), world, read("LOCAL_RANK", "0"), read("LOCAL_WORLD_SIZE", str(world)))
    if got.world < 1 or not 0 <= got.rank < got.world or got.local_rank < 0:
        raise UsageError(f"RANK={got.rank}, WORLD_SIZE={got.world}, LOCAL_RANK={got.local_rank}: not a process of a "
                         "run (0 <= RANK < WORLD_SIZE, LOCAL_RANK >= 0); unset them to run one process")
    if env.get("LOCAL_WORLD_SIZE") and not got.local_rank < got.local_world <= got.world:
        raise UsageError(f"LOCAL_WORLD_SIZE={got.local_world} with LOCAL_RANK={got.local_rank} and WORLD_SIZE="
                         f"{got.world}: not a process of a run (LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE); unset "
                         "them to run one process")
    if got.world > 1 and not (env.get("RANK") and env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        raise UsageError(f"WORLD_SIZE={got.world} without RANK, MASTER_ADDR and MASTER_PORT: start the processes "
                         "with torchrun or --nproc, or unset WORLD_SIZE")
    return got


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


# ---- the processes of one run on this machine (the --nproc launcher) -----------------------------------------
LAUNCHER_ENV = "ECVIZ_LAUNCHER_PID"  # in a rank the launcher started: the launcher's pid
STOP_GRACE_S = 5.0  # a stopped launcher gives its ranks this long to end on SIGTERM, then kills them
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Stopped(BaseException):
    """The launcher got one of STOP_SIGNALS (raised by its handler, so its ranks are stopped on the way out)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def launch(command: list[str], nproc: int, env: Callable[[int], dict[str, str]] | None = None,
           pass_fds: tuple[int, ...] = ()) -> Iterator[list[subprocess.Popen]]:
    """Start `command` as the `nproc` ranks of one run on this machine, with the environment torchrun gives its
    workers (and `env(rank)`); yields their Popen objects. The ranks end with this block and with this process:
    leaving the block kills any still running; SIGTERM, SIGINT or SIGHUP stops them (SIGTERM, SIGKILL after
    STOP_GRACE_S) and then ends this process (KeyboardInterrupt for SIGINT, else exit status 128 + signal); on
    SIGKILL the kernel kills them (`die_with_launcher`). `pass_fds`: descriptors the ranks inherit."""
    port, threads = free_port(), max(1, (os.cpu_count() or 1) // nproc)
    procs: list[subprocess.Popen] = []
    handled = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS} if handled else {}

    def stop(signum, frame):
        raise Stopped(signum)

    for s in previous:
        signal.signal(s, stop)
    try:
        for rank in range(nproc):
            procs.append(subprocess.Popen(
                command, pass_fds=pass_fds, env={"OMP_NUM_THREADS": str(threads)} | dict(os.environ) | {
                    "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                    "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                    LAUNCHER_ENV: str(os.getpid())} | (env(rank) if env else {})))
        yield procs
    except Stopped as e:
        for s in previous:
            signal.signal(s, signal.SIG_IGN)  # a second signal must not cut the stopping short
        stop_ranks(procs, STOP_GRACE_S)
        if e.signum == signal.SIGINT:
            raise KeyboardInterrupt from None
        print(f"ecviz: stopped by {signal.Signals(e.signum).name} (its {nproc} ranks with it)", file=sys.stderr,
              flush=True)  # it ended without a word, in its exit status alone
        raise SystemExit(128 + e.signum) from None
    finally:
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        stop_ranks(procs, 0)
        for s, handler in previous.items():
            signal.signal(s, handler)


def stop_ranks(procs: list[subprocess.Popen], grace: float) -> None:
    """End every process still running: SIGTERM and up to `grace` seconds to go (none: SIGKILL at once), then
    SIGKILL; waits for each, so none is left a zombie."""
    running = [p for p in procs if p.poll() is None]
    if grace > 0:
        for p in running:
            p.terminate()
        for p in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=grace)  # the grace is shared: later ranks had it running meanwhile
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def die_with_launcher() -> None:
    """In a rank the --nproc launcher started (LAUNCHER_ENV): end the moment the launcher ends. On Linux the
    kernel sends SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG, via ctypes); elsewhere a thread polls
    the parent. If the launcher is already gone (it died before the signal was set), end now. A rank's data is
    safe to kill at any moment (traces mark samples done last, checkpoints are swapped in whole). A variable that
    names a living process other than the parent was not set by a launcher for this process: UsageError."""
    text = os.environ.pop(LAUNCHER_ENV, None)  # this process's own children are not ranks
    if not text:
        return
    launcher = int(text) if text.isdigit() else -1
    if os.getppid() != launcher and (launcher <= 0 or alive(launcher)):  # set by hand (or inherited), not a rank
        raise UsageError(f"environment variable {LAUNCHER_ENV}={text!r}: not this process's parent; it is internal "
                         "to --nproc, unset it")
    if not parent_death_signal(signal.SIGKILL):
        threading.Thread(target=watch_parent, args=(launcher,), name="ecviz-parent-watch", daemon=True).start()
    if os.getppid() != launcher:  # the launcher has ended already
        print(f"ecviz: the --nproc launcher (process {launcher}, {LAUNCHER_ENV}) has ended; this rank stops",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def alive(pid: int) -> bool:
    """Whether a process `pid` runs (another user's included; a zombie, ended but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:  # Linux: the state after the command's closing parenthesis
        return Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send this process `signum` when its parent ends (Linux); whether that was possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def watch_parent(parent: int, every: float = 0.5) -> None:
    """Kill this process once its parent is no longer `parent` (it ended and this one was re-parented)."""
    import time

    while os.getppid() == parent:
        time.sleep(every)
    os.kill(os.getpid(), signal.SIGKILL)


def free_port() -> int:
    """A TCP port free on this machine now: the rendezvous port of a launched run."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
