"""The `ecviz` command as a user runs it: real processes, one-line errors with exit status 2."""

import numpy as np
from conftest import assert_bad_input, ecviz
from PIL import Image


def test_presets_lists_parameter_counts():
    r = ecviz("presets", "EC-DiT-XL-32E")
    assert r.returncode == 0
    assert "EC-DiT-XL-32E" in r.stdout and "5441.7M" in r.stdout


def test_init_then_sample(tmp_path):
    ck = tmp_path / "ck"
    r = ecviz("init", "--preset", "EC-DiT-tiny-4E", "--out", ck)
    assert r.returncode == 0, r.stderr
    assert (ck / "model.safetensors").is_file() and (ck / "config.json").is_file()
    out = tmp_path / "a.png"
    r = ecviz("sample", "--ckpt", ck, "--prompt", "a red circle", "--out", out, "--n", 2, "--steps", 2,
              "--scale", 1)
    assert r.returncode == 0, r.stderr
    img = np.asarray(Image.open(out))
    assert img.shape == (16, 32, 3)
    # refusing to overwrite keeps what is there
    before = (ck / "model.safetensors").read_bytes()
    assert_bad_input(ecviz("init", "--preset", "DENSE-tiny", "--out", ck), "already holds a checkpoint")
    assert (ck / "model.safetensors").read_bytes() == before


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    assert_bad_input(ecviz("init", "--preset", "EC-DiT-XL-7E", "--out", tmp_path / "x"), "unknown preset")
    assert_bad_input(ecviz("init", "--preset", "EC-DiT-small-8E", "--group-size", "96", "--out", tmp_path / "x"),
                     "group_size 96", "multiple or a divisor")
    assert_bad_input(ecviz("sample", "--ckpt", tmp_path / "none", "--prompt", "x", "--out", tmp_path / "a.png"),
                     "no such directory")
    assert_bad_input(ecviz("sample", "--ckpt", tmp_path / "none", "--prompt", "x", "--out", tmp_path / "a.xyz"),
                     "unknown image type '.xyz'")
    ck = tmp_path / "ck"
    assert ecviz("init", "--preset", "EC-DiT-tiny-4E", "--out", ck).returncode == 0
    (ck / "model.safetensors").unlink()
    assert_bad_input(ecviz("sample", "--ckpt", ck, "--prompt", "x", "--out", tmp_path / "a.png"),
                     "model.safetensors is missing")
