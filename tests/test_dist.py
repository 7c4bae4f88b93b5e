"""Devices, number formats and processes (ecviz.dist): what --device and --dtype mean in every command, bf16
runs on the CPU, and the one-line errors for a device or format this machine cannot give. The ranks of
`--nproc` die with their launcher, and one run at a time writes a store or run directory (ecviz.lock): real
processes, started and killed as a user would."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from helpers import assert_bad_input, ecviz, ecviz_here

from ecviz import dist
from ecviz.errors import UsageError
from ecviz.hooks import hooks
from ecviz.model import DiT, preset
from ecviz.pipeline import Pipeline, reproduce
from ecviz.trace.format import open_trace
from ecviz.trace.run import TraceSettings, run_trace
from ecviz.train import TrainConfig, train

CUDA = torch.cuda.is_available()


def test_cuda_means_this_processes_gpu(monkeypatch):
    assert dist.resolve_device("cpu") == torch.device("cpu")
    assert dist.resolve_device("cuda", local_rank=0, cuda_count=1) == torch.device("cuda", 0)
    assert dist.resolve_device("cuda", local_rank=3, cuda_count=4) == torch.device("cuda", 3)
    assert dist.resolve_device("cuda:1", local_rank=0, cuda_count=2) == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("RANK", "6")
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(UsageError, match="without RANK, MASTER_ADDR and MASTER_PORT"):  # torch's traceback, before
        dist.ranks()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert dist.ranks() == dist.Ranks(rank=6, world=8, local_rank=2, local_world=8)  # without LOCAL_WORLD_SIZE: all
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's: two machines of four
    assert dist.ranks() == dist.Ranks(rank=6, world=8, local_rank=2, local_world=4)
    for bad in ("2", "9"):  # LOCAL_RANK 2 is not among 2 local processes; 9 on this machine of a run of 8
        monkeypatch.setenv("LOCAL_WORLD_SIZE", bad)
        with pytest.raises(UsageError, match=f"LOCAL_WORLD_SIZE={bad} with LOCAL_RANK=2 and WORLD_SIZE=8: not a "):
            dist.ranks()
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):  # LOCAL_RANK alone picks a GPU (as before)
        monkeypatch.delenv(name)
    assert dist.ranks() == dist.Ranks(rank=0, world=1, local_rank=2, local_world=1)
    assert dist.resolve_device("cuda", cuda_count=4) == torch.device("cuda", 2)  # torchrun's LOCAL_RANK


def test_devices_this_machine_lacks_are_refused():
    with pytest.raises(UsageError, match="--device cuda: no CUDA device available"):
        dist.resolve_device("cuda", cuda_count=0)
    with pytest.raises(UsageError, match=r"--device cuda:7: this machine has 1 CUDA device\(s\), cuda:0..cuda:0"):
        dist.resolve_device("cuda:7", cuda_count=1)
    with pytest.raises(UsageError, match="process 2 on this machine needs GPU 2, but there are 2"):
        dist.resolve_device("cuda", local_rank=2, cuda_count=2)
    for bad in ("tpu", "cpu:0", "cuda:", "cuda:x", "CUDA", ""):
        with pytest.raises(UsageError, match="use cpu, cuda or cuda:N"):
            dist.resolve_device(bad)


@pytest.mark.parametrize("gpus", [0, 1, 2])
def test_the_launcher_checks_a_gpu_for_each_process_it_starts(monkeypatch, gpus):
    """ecviz.validate.check_device (what the command line checks before `--nproc` starts anything) reads
    devices as ecviz.dist does, on a machine with 0, 1 or 2 GPUs."""
    from ecviz.validate import check_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    for spec, nproc in (("cpu", None), ("cpu", 8), ("cuda", None), ("cuda", 1), ("cuda", 2), ("cuda:1", None),
                        ("cuda:0", 2), ("bogus", None)):
        ok = spec == "cpu" or (spec != "bogus" and gpus >= max(nproc or 1, int(spec[5:] or 0) + 1)
                                and not (spec.startswith("cuda:") and (nproc or 1) > 1))
        if ok:
            check_device(spec, nproc)
        else:
            with pytest.raises(UsageError, match=f"^--device {spec}"):
                check_device(spec, nproc)
    for k, v in (("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(k, v)  # a rank of torchrun by hand: cuda:N would put every rank on GPU N
    if gpus:
        check_device("cuda", None)
        with pytest.raises(UsageError, match=r"^--device cuda:0 with 2 processes \(WORLD_SIZE\): every process would"):
            check_device("cuda:0", None)


def test_dtype_names_and_the_default_per_device():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert dist.resolve_dtype("auto", cpu) == torch.float32 and dist.resolve_dtype(None, cpu) == torch.float32
    assert dist.resolve_dtype("auto", gpu) == torch.bfloat16
    for name, want in (("float32", torch.float32), ("fp32", torch.float32), ("bfloat16", torch.bfloat16),
                       ("bf16", torch.bfloat16)):
        assert dist.resolve_dtype(name, gpu) == want
    for bad in ("float8", "half", "float16", "int8"):
        with pytest.raises(UsageError, match=f"--dtype '{bad}': choose auto, float32 or bfloat16"):
            dist.resolve_dtype(bad, cpu)
    with dist.autocast(cpu, torch.float32):
        assert not torch.is_autocast_enabled("cpu")
    with dist.autocast(cpu, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_alone_the_collectives_are_the_identity():
    assert not dist.active()
    assert dist.all_sum(3.5) == 3.5 and dist.all_mean(2.0) == 2.0
    dist.barrier()
    dist.finish()


def tiny_model(name: str) -> DiT:
    torch.manual_seed(0)
    model = DiT(preset(name)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("name", ["EC-DiT-tiny-4E", "TC-tiny-4E", "DENSE-tiny"])
def test_a_model_cast_to_bf16_runs_without_autocast(name):
    """float32 images, timesteps and text into a bf16 model (the timestep embedder's float32 frequencies used to
    meet bf16 weights): a bf16 velocity close to the float32 model's, routed by float32 router logits."""
    model = tiny_model(name)
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    y, mask = torch.randn(2, 16, 384), torch.ones(2, 16, dtype=torch.bool)
    with torch.no_grad():
        ref = model(x, t, y, mask)
        seen = {}
        names = [n for n in model.hook_points if n.endswith("hook_affinity")]
        with hooks(model.to(torch.bfloat16), {n: lambda v, name: seen.setdefault(name, v.dtype) for n in names}):
            out = model(x, t, y, mask)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()
    assert set(seen.values()) <= {torch.float32} and (len(seen) > 0) == (name != "DENSE-tiny")


def test_bf16_autocast_keeps_routing_in_float32():
    """Under bf16 autocast the experts run in bf16 but the router's logits, softmax and top-C are float32:
    every expert takes exactly the tokens it takes in float32."""
    model = tiny_model("EC-DiT-tiny-4E")
    x, t = torch.randn(4, 3, 16, 16), torch.rand(4)
    y, mask = torch.randn(4, 16, 384), torch.ones(4, 16, dtype=torch.bool)
    moe = model.blocks[1].moe
    x_in = torch.randn(4, 64, model.cfg.width)

    def routing(fmt):
        seen = {}
        with torch.no_grad(), dist.autocast("cpu", fmt), hooks(moe, {
                n: (lambda v, name: seen.__setitem__(name, v)) for n in ("hook_affinity", "hook_dispatch")}):
            out = moe(x_in)
        return out, seen

    (a, ra), (b, rb) = routing(torch.float32), routing(torch.bfloat16)
    assert rb["hook_affinity"].dtype == torch.float32 and torch.equal(ra["hook_affinity"], rb["hook_affinity"])
    assert torch.equal(ra["hook_dispatch"], rb["hook_dispatch"])
    assert (a - b).abs().max() <= 0.02 * a.abs().max()
    with torch.no_grad(), dist.autocast("cpu", torch.bfloat16):
        assert torch.isfinite(model(x, t, y, mask)).all()


def test_bf16_training_sampling_and_tracing_on_the_cpu(tmp_path):
    """--dtype bfloat16 everywhere: a training run learns (finite losses), a trace records its format and a
    traced sample is reproduced in that format, bit for bit."""
    run = tmp_path / "run"
    last = train(TrainConfig(preset="EC-DiT-tiny-4E", out=str(run), steps=3, batch_size=4, warmup=1, log_every=1,
                             probe_every=100, dtype="bfloat16"), progress=False)
    assert np.isfinite(last["loss"]) and last["step"] == 3
    prompts = tmp_path / "p.txt"
    prompts.write_text("a ring\na square\n")  # bundled Shapes prompts: scripts/device_check.sh runs this too
    run_trace(TraceSettings(ckpt=run, prompts=prompts, out=tmp_path / "t.zarr", steps=2, guidance=3.0,
                            images_per_prompt=2, batch_size=2, progress=False, dtype="bfloat16"))
    ds = open_trace(tmp_path / "t.zarr")
    assert ds.attrs["sampler"]["dtype"] == "bfloat16"
    assert (reproduce(ds, 3) == ds.image[3].values).all()
    assert Pipeline.load(run, dtype="bf16").dtype == torch.bfloat16 and Pipeline.load(run).dtype == torch.float32


def test_bad_device_and_dtype_are_one_line_and_exit_2(ckpts, prompt_file, tmp_path):
    png = tmp_path / "a.png"
    common = {"trace": ["--ckpt", ckpts["ec"], "--prompts", prompt_file, "--steps", 1, "--out", tmp_path / "t.zarr"],
              "eval": ["--ckpt", ckpts["ec"], "--steps", 1],
              "sample": ["--ckpt", ckpts["ec"], "--prompt", "a red circle", "--steps", 1, "--out", png],
              "train": ["--preset", "DENSE-tiny", "--steps", 1, "--out", tmp_path / "run"]}
    assert_bad_input(ecviz("eval", *common["eval"], "--dtype", "float8", "--quiet"), "--dtype 'float8'",
                     "auto, float32 or bfloat16")
    assert_bad_input(ecviz("train", *common["train"], "--dtype", "half", "--quiet"), "--dtype 'half'")
    if not CUDA:
        assert_bad_input(ecviz("trace", *common["trace"], "--device", "cuda", "--quiet"), "--device cuda",
                         "no CUDA device")
        assert_bad_input(ecviz("sample", *common["sample"], "--device", "cuda:7"), "--device cuda:7", "no CUDA")
    elif torch.cuda.device_count() == 1:
        assert_bad_input(ecviz("sample", *common["sample"], "--device", "cuda:7"), "--device cuda:7",
                         "1 CUDA device(s)")
    assert not png.exists() and not (tmp_path / "run" / "checkpoint").exists()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_every_command_runs_on_cuda(ckpts, tmp_path):
    """`--device cuda` (bf16 autocast by default) in train, trace, eval and sample alike. Every prompt is a
    Shapes caption, so that on the GPU machine, which lacks the text encoder, the tables of scripts/device_kit.sh
    serve them (ECVIZ_TEXT_TABLE)."""
    ecviz("train", "--preset", "EC-DiT-tiny-4E", "--steps", 2, "--batch-size", 4, "--device", "cuda", "--quiet",
          "--out", tmp_path / "run", check=True)
    ecviz("trace", "--ckpt", ckpts["ec"], "--prompts", "shapes", "--limit", 3, "--steps", 2, "--device", "cuda",
          "--quiet", "--out", tmp_path / "t.zarr", check=True)
    assert open_trace(tmp_path / "t.zarr").attrs["sampler"]["dtype"] == "bfloat16"
    ecviz("eval", "--ckpt", ckpts["ec"], "--images-per-prompt", 1, "--steps", 2, "--device", "cuda", "--quiet",
          check=True)
    ecviz("sample", "--ckpt", ckpts["ec"], "--prompt", "a ring", "--steps", 2, "--device", "cuda",
          "--out", tmp_path / "a.png", check=True)


# ---- the launcher owns its ranks; one writer at a time --------------------------------------------------------
@contextlib.contextmanager
def launched(*args):
    """`ecviz ARGS` in its own session (a signal to it reaches it alone, as `kill PID` would), killed if it
    is still running when the block ends."""
    proc = subprocess.Popen([sys.executable, "-m", "ecviz", *map(str, args)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    """Whether any thread of process `pid` still runs. A zombie has ended (it only waits to be reaped), but its
    main thread turns zombie before its other threads have finished ending, and the process's files (the
    writer lock among them) close only with the last one."""
    states = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
        except OSError:  # that thread has gone
            continue
    return any(state not in ("Z", "X") for state in states)


def wait_until(what, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.time() + timeout
    while not what():
        assert proc.poll() is None, f"the launcher ended early: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def kill_launcher(proc: subprocess.Popen, sig: int) -> None:
    """Kill the launcher with `sig` and check that its ranks (two) end with it: none runs 20 s later."""
    ranks = children(proc.pid)
    assert len(ranks) == 2, ranks
    proc.send_signal(sig)
    proc.wait(timeout=60)
    deadline = time.time() + 20
    while any(map(alive, ranks)) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, ranks)), f"ranks still running after the launcher got {signal.Signals(sig).name}"
    if sig == signal.SIGTERM:  # it stopped them on its way out and says so, in its exit status and a line
        err = proc.stderr.read()
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "ecviz: stopped by SIGTERM (its 2 ranks with it)" in err, err[-2000:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_ranks_die_with_their_launcher_mid_trace(ckpts, prompt_file, tmp_path, capsys, sig):
    """While a `--nproc 2` trace writes, a second writer is refused with one line naming the holder; killing the
    launcher ends its ranks; after SIGKILL (no handler runs) a rerun takes the store over and resumes it."""
    out = tmp_path / "t.zarr"
    args = ["trace", "--ckpt", ckpts["ec"], "--prompts", prompt_file, "--steps", 100, "--images-per-prompt", 6,
            "--batch-size", 2, "--quiet", "--out", out]
    def writing() -> bool:
        try:
            return bool(zarr.open_group(str(out), mode="r")["done"][:].any())
        except Exception:  # not created yet
            return False

    with launched(*args, "--nproc", 2) as proc:
        wait_until(writing, 300, proc)
        holder = f"is being written by pid {proc.pid} on "
        assert_bad_input(ecviz_here(capsys, *args), str(out), holder, "--nproc 2)", "wait for it or stop it")
        assert_bad_input(ecviz_here(capsys, *args, "--nproc", 2), holder)
        # a reader is told the store is being written (not to rerun the command, which would be refused)
        report = ["report", "--trace", out, "--out", tmp_path / "report"]
        assert_bad_input(ecviz_here(capsys, *report), f"the trace is being written by pid {proc.pid} on ",
                         "samples done so far; look again when it finishes")
        kill_launcher(proc, sig)
    done = int(zarr.open_group(str(out), mode="r")["done"][:].sum())
    assert 0 < done < 30, "the kill should land mid-run"
    assert_bad_input(ecviz_here(capsys, *report), f"the trace is unfinished: {done} of 30 samples done; rerun")
    if sig == signal.SIGKILL:
        r = ecviz_here(capsys, *args)
        assert r.returncode == 0, r.stderr
        written = int(r.stdout.split(" written now")[0].split("(")[-1])
        assert 30 - done <= written < 30 and f"{30 - written} already done" in r.stdout  # it resumed
        assert int(zarr.open_group(str(out), mode="r")["done"][:].sum()) == 30


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_ranks_die_with_their_launcher_mid_training(tmp_path, capsys, sig):
    """As for a trace: a second `ecviz train` on a live run directory is refused, killing the `--nproc 2`
    launcher ends its ranks, and after SIGKILL `--resume` continues from the last checkpoint at once: the
    ranks' DataLoader workers, which outlive them for seconds, hold no copy of the lock."""
    out = tmp_path / "run"
    args = ["train", "--preset", "EC-DiT-tiny-4E", "--batch-size", 4, "--ckpt-every", 1, "--log-every", 1,
            "--probe-every", 1000, "--data-workers", 1, "--quiet", "--out", out]
    with launched(*args, "--steps", 100000, "--nproc", 2) as proc:
        wait_until(lambda: (out / "checkpoint" / "config.json").exists(), 300, proc)
        assert_bad_input(ecviz_here(capsys, *args, "--steps", 1, "--resume"), str(out),
                         f"is being written by pid {proc.pid} on ", "ecviz train", "wait for it or stop it")
        kill_launcher(proc, sig)
    if sig == signal.SIGKILL:
        step = json.loads((out / "checkpoint" / "config.json").read_text())["meta"]["step"]
        r = ecviz_here(capsys, *args, "--steps", step + 1, "--resume")
        assert r.returncode == 0, r.stderr
        assert json.loads((out / "checkpoint" / "config.json").read_text())["meta"]["step"] == step + 1


def test_every_torchrun_rank_refuses_a_busy_store_in_one_line(ckpts, prompt_file, tmp_path):
    """Under torchrun by hand only rank 0 takes the writer lock. When it was taken, rank 0 said so in one line
    and rank 1, not knowing, went on to its next collective and died there with a traceback ("Connection closed
    by peer"). Now every rank raises the same
    BusyError (exit status 2) and nothing is written."""
    from ecviz import lock

    out, command = tmp_path / "t.zarr", "trace"
    args = ["trace", "--ckpt", ckpts["ec"], "--prompts", prompt_file, "--steps", 1, "--quiet"]
    held = lock.acquire(out)
    try:
        env = os.environ | {"OMP_NUM_THREADS": "1"}
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                            str(29600 + os.getpid() % 1000), "-m", "ecviz", *map(str, args), "--out", str(out)],
                           capture_output=True, text=True, timeout=300, env=env)
    finally:
        held.release()
    # torchrun stops the other rank once one exits, so rank 1 may not get to say it; the two may share a line
    errors = re.findall(rf"ecviz {command}: error: (.*?)(?=ecviz {command}: error:|\n|$)", r.stderr)
    assert r.returncode != 0 and errors, r.stderr[-3000:]
    assert all("is being written by" in e and "wait for it or stop it" in e for e in errors), errors
    assert "Connection closed" not in r.stderr, r.stderr[-3000:]
    assert not re.search(r'File "[^"]*ecviz/(?:trace|lock|dist|train|cli)', r.stderr), r.stderr[-3000:]
    assert not out.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_rank_killed_mid_trace_is_named_by_the_launcher(ckpts, prompt_file, tmp_path):
    """One rank of a `--nproc 2` trace killed from outside (the OOM killer, a user) cannot say anything itself:
    the launcher ended with status 137 and no word. It names the rank and the signal, and the remedy."""
    out = tmp_path / "t.zarr"
    args = ["trace", "--ckpt", ckpts["ec"], "--prompts", prompt_file, "--steps", 100, "--images-per-prompt", 6,
            "--batch-size", 2, "--quiet", "--out", out, "--nproc", 2]

    def writing() -> bool:
        try:
            return bool(zarr.open_group(str(out), mode="r")["done"][:].any())
        except Exception:  # not created yet
            return False

    with launched(*args) as proc:
        wait_until(writing, 300, proc)
        os.kill(sorted(children(proc.pid))[-1], signal.SIGKILL)
        proc.wait(timeout=120)
        err = proc.stderr.read()
    assert proc.returncode == 128 + signal.SIGKILL
    assert "was killed by SIGKILL; rerun the same command to resume" in err, err
