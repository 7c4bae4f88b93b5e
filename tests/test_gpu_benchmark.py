"""benchmarks/gpu.py, the GPU benchmark a GPU session runs: its smoke test on tiny shapes runs here and writes
every number the issue asks for; without CUDA the real run refuses in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_bad_input

from ecviz.model import count_flops, preset

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def test_smoke_run_writes_every_ratio(tmp_path):
    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # tests/test_kernels.py sets it
    r = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--repeats", "1",
                        "--tokens", "512", "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["meta"]["device_name"] == "cpu" and doc["meta"]["torch"] == torch.__version__
    assert doc["meta"]["shapes"]["tokens"] == 512  # --tokens; the full run's default is the 32,768
    for group in ("64", "128"):
        assert doc["layers"][group]["N"] == 512
        row = doc["layers"][group]["by_dispatch"]["torch"]
        for k in ("ec_over_dense_fwd", "ec_over_dense_fwd_bwd", "tc_over_dense_fwd"):
            assert row[k] > 0 and f"{k}@{group}" in doc["summary"] and f"{k}@{group}" in doc["targets_met"]
    m = doc["model"]
    ec, dense = preset("EC-DiT-tiny-4E"), preset("DENSE-tiny")
    assert m["theoretical_ratio"] == count_flops(ec, 8) / count_flops(dense, 8)  # 4 images, guidance on
    assert m["sampling_over_theoretical"] == pytest.approx(m["sampling_ratio"] / m["theoretical_ratio"])
    assert set(m["sampling_step_ms"]) == set(m["train_fwd_bwd_ms"]) == {"EC-DiT-tiny-4E", "DENSE-tiny"}
    assert all(isinstance(v, float) for v in m["optimizer_step_ms"].values())
    assert doc["trace"]["trace_overhead"] > 0 and "sampling (batch 8)" in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_refuses_in_one_line(tmp_path):
    for args in ([], ["--device", "cpu"]):
        r = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(tmp_path / "x.json")],
                           capture_output=True, text=True, timeout=120)
        assert_bad_input(r, "benchmarks/gpu.py")
    tiny = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(tmp_path / "x.json")]
    r = subprocess.run([*tiny, "--tokens", "300"], capture_output=True, text=True, timeout=120)
    assert_bad_input(r, "--tokens 300: use a positive multiple of 128")  # was timed as 256 and reported as 300
    r = subprocess.run(tiny, capture_output=True, text=True, timeout=120, env=os.environ | {"ECVIZ_DISPATCH": "x"})
    assert_bad_input(r, "ECVIZ_DISPATCH 'x' is not one of")  # was a traceback
    assert not (tmp_path / "x.json").exists()


def test_every_benchmark_interleaves_through_one_timer_that_alternates_order_and_keeps_resets_untimed():
    sys.path.insert(0, str(SCRIPT.parent))
    import timing

    calls = []
    jobs = {"a": lambda: calls.append("a"), "b": (lambda: calls.append("b"), lambda: calls.append("reset b")),
            "c": lambda: calls.append("c")}
    timer_saw = []
    times = timing.interleaved(jobs, 4, warmup=1, rounds={"c": 1},
                               timer=lambda fn: (fn(), timer_saw.append(calls[-1]), 1.0)[2])
    assert calls[:4] == ["a", "reset b", "b", "c"]  # the warm-up
    assert [c for c in calls[4:] if c != "reset b"] == ["a", "b", "c", "b", "a", "a", "b", "b", "a"]
    assert "reset b" not in timer_saw and times == {"a": [1.0] * 4, "b": [1.0] * 4, "c": [1.0]}
    for script in ("routing.py", "gpu.py", "routing_ab.py", "tc_fill.py", "text_encoder.py"):
        src = (SCRIPT.parent / script).read_text()
        assert "timing" in src and "for r in range(repeats)" not in src, script  # no loop of its own


def test_the_gpu_sessions_diagnostics_run_on_tiny_shapes(tmp_path, monkeypatch, capsys):
    """benchmarks/gpu_anatomy.py (the EC layer's stages alone) and gpu_profile.py (kernel tables), which a GPU
    session runs beside gpu.py: on the CPU with tiny shapes they time every stage and profile every layer.
    In this process (their `main`), without Triton's interpreter (tests/test_kernels.py sets it)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu_anatomy
    import gpu_profile

    out = tmp_path / "anatomy.json"
    assert gpu_anatomy.main(["--device", "cpu", "--tiny", "--repeats", "1", "--out", str(out)]) == 0
    stages = json.loads(out.read_text())["stages"]
    assert {"dense.all", "ec.route", "ec.gather", "ec.up_bmm", "ec.combine_index_add", "ec.all_torch"} <= set(stages)
    assert all(s["ms"] > 0 for s in stages.values()) and "| ec.all_torch |" in capsys.readouterr().out
    # the candidates a GPU session would adopt: each equal to what it replaces, or recorded as not running
    assert {"cand.up_lt_gelu", "cand.combine_f32", "cand.all"} <= set(stages)
    assert all(stages[n]["max_rel_err"] < 2e-2 for n in stages if n.startswith("cand.") and n != "cand.csr_build")
    assert set(json.loads(out.read_text())["failed"]) <= {"cand.combine_csr"}  # CPU: no bf16 sparse matmul
    assert gpu_profile.main(["--device", "cpu", "--tiny", "--calls", "1", "--rows", "3", "--out",
                             str(tmp_path / "p.txt")]) == 0
    text = (tmp_path / "p.txt").read_text()
    assert all(f"## {layer} {phase}\n" in text for layer in ("dense", "ec_torch", "tc_torch")
               for phase in ("fwd", "fwd_bwd"))
    assert gpu_anatomy.main(["--device", "cuda:7", "--tiny"]) == 2 and "cuda:7" in capsys.readouterr().err
    assert gpu_anatomy.main(["--device", "cpu", "--tiny", "--group", "96"]) == 2  # was a traceback
    assert "--group 96: use a divisor of the 256 tokens" in capsys.readouterr().err
