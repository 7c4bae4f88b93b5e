"""Text encoders (real packaged MiniLM, offline) and latent codecs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ecviz.codec import PixelCodec, from_uint8, load_codec, to_uint8
from ecviz.text import TableEncoder, TextBatch, TextTable, load_text_encoder, minilm_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def enc():
    return load_text_encoder("minilm", 32)


def test_shapes_mask_tokens(enc):
    batch = enc.encode(["a red circle", "two small blue squares on the left"])
    assert isinstance(batch, TextBatch)
    assert enc.dim == 384 and enc.max_len == 32 and enc.name == "minilm"
    assert batch.tokens[0] == ["[CLS]", "a", "red", "circle", "[SEP]"]
    lens = [len(t) for t in batch.tokens]
    assert batch.emb.shape == (2, max(lens), 384) and batch.emb.dtype == torch.float32
    assert batch.mask.dtype == torch.bool
    assert batch.mask.sum(1).tolist() == lens
    assert torch.all(batch.emb[~batch.mask] == 0)


def test_calling_the_encoder_encodes(enc):
    called, encoded = enc(["a red circle"]), enc.encode(["a red circle"])
    assert called.tokens == encoded.tokens and torch.equal(called.emb, encoded.emb)


def test_deterministic_and_distinct(enc):
    a = enc.encode(["a red circle"]).emb[0]
    assert torch.equal(enc.encode(["a red circle"]).emb[0], a)
    twice = enc.encode(["a red circle", "a red circle"]).emb
    assert torch.equal(twice[0], twice[1]) and torch.equal(twice[0], a)
    c = enc.encode(["a green circle"]).emb[0]
    assert not torch.allclose(a, c)


def test_empty_prompt(enc):
    batch = enc.encode(["", "a red circle"])
    assert batch.tokens[0] == ["[CLS]", "[SEP]"]
    assert batch.mask[0].sum() == 2


def test_truncation_warning(enc):
    short = "a red circle"
    long1 = " ".join(["red"] * 40)  # 42 tokens with [CLS]/[SEP]: 10 cut
    long2 = " ".join(["blue"] * 50)  # 52 tokens: 20 cut
    with pytest.warns(UserWarning) as rec:
        batch = enc.encode([short, long1, long2])
    msgs = [str(w.message) for w in rec if "text encoder" in str(w.message)]
    assert len(msgs) == 1
    assert "2 prompts longer than 32 tokens" in msgs[0] and "(30 tokens cut), e.g. 'red red" in msgs[0]
    assert batch.emb.shape[1] == 32
    assert [len(t) for t in batch.tokens] == [5, 32, 32]
    assert batch.tokens[1][-1] == "[SEP]"


def test_no_warning_for_short_prompts(enc):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.encode(["a red circle", "a blue square"])


def test_minilm_here_equals_transformers_bit_for_bit(enc):
    """The small BERT of ecviz.text and transformers' BertModel (through the hf: spec, on the same files) give
    the same tokens, word map and embeddings, bit for bit, truncation and sub-word pieces included."""
    other = load_text_encoder(f"hf:{minilm_path()}", 32)
    assert other is not enc and other.dim == 384
    prompts = ["a red circle", "two blue squares on the left", "", "a purple tri-angle", " ".join(["red"] * 40)]
    with pytest.warns(UserWarning, match="1 prompt"):
        a, b = enc.encode(prompts), other.encode(prompts)
    assert a.tokens == b.tokens and a.word_index == b.word_index and torch.equal(a.mask, b.mask)
    assert torch.equal(a.emb, b.emb)


def test_a_prompt_embeds_the_same_in_any_batch(enc):
    """Padding is always to max_len, so batchmates never change a prompt's embedding (a resumed run's empty
    caption cache relies on it): alone, among longer prompts, at any position."""
    alone = enc.encode(["a red circle"]).emb[0]
    for batch in (["a red circle", "three green squares below a white ring"],
                  ["two blue squares on the left", "an orange cross", "a red circle"]):
        out = enc.encode(batch)
        assert torch.equal(out.emb[batch.index("a red circle"), : alone.shape[0]], alone)


def test_cache(enc):
    assert load_text_encoder("minilm", 32) is enc


@pytest.mark.parametrize("spec", ["hf:/nope/does/not/exist", "clip", "hf:"])
def test_bad_text_spec(spec):
    with pytest.raises(ValueError, match="text encoder") as info:
        load_text_encoder(spec, 32)
    assert spec in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("max_len", [0, 1, 513])
def test_a_max_len_without_room_for_cls_and_sep_or_past_the_positions_is_refused(max_len):
    with pytest.raises(ValueError, match=f"max_len {max_len} outside 2..512") as info:
        load_text_encoder("minilm", max_len)
    assert "\n" not in str(info.value)


def test_frozen(enc):
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.model.training
    emb = enc.encode(["a red circle"]).emb
    assert not emb.requires_grad and not emb.is_inference()


def test_minilm_loads_without_network(tmp_path):
    script = textwrap.dedent(
        """
        import socket

        def refuse(*args, **kwargs):
            raise RuntimeError("network access attempted")

        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse

        from ecviz.text import load_text_encoder

        batch = load_text_encoder("minilm", 32).encode(["a red circle"])
        assert batch.emb.shape == (1, 5, 384), batch.emb.shape
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert "warn" not in out.stderr.lower() and "%|" not in out.stderr, out.stderr  # quiet load


def test_pixel_codec_round_trip():
    codec = load_codec("pixel")
    assert isinstance(codec, PixelCodec) and codec.channels == 3 and codec.downsample == 1
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (2, 3, 8, 8)
    assert torch.equal(codec.decode(z), x)
    assert codec.decode(x * 3).abs().max() <= 1


def test_uint8_round_trip():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(2, 5, 7, 3), dtype=np.uint8)
    img[0, 0, 0] = [0, 255, 128]
    x = from_uint8(img)
    assert x.shape == (2, 3, 5, 7) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    back = to_uint8(x)
    assert back.dtype == np.uint8 and np.array_equal(back, img)
    assert np.array_equal(to_uint8(from_uint8(torch.from_numpy(img))), img)


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is not None, reason="diffusers is installed")
def test_vae_needs_extra(tmp_path):
    spec = f"vae:{tmp_path}"
    with pytest.raises(ValueError, match=r"needs the optional extra: pip install 'ecviz\[vae\]'") as info:
        load_codec(spec)
    assert spec in str(info.value)


@pytest.mark.parametrize("spec", ["jpeg", "vae:", ""])
def test_bad_codec_spec(spec):
    with pytest.raises(ValueError, match="latent codec"):
        load_codec(spec)


def test_a_float32_text_table_encodes_as_the_encoder(enc, tmp_path):
    """TableEncoder (what ECVIZ_TEXT_TABLE serves) gives the encoder's TextBatch bit for bit, in any batch:
    embeddings, mask, token strings and their words, a truncated prompt too."""
    prompts = ["a red circle", "two small blue squares on the left", "an orange cross-shaped ring",
               " ".join(["a green triangle above a white diamond"] * 6)]  # 40+ tokens: truncated to 32
    with pytest.warns(UserWarning, match="truncated"):
        TextTable.build(enc, prompts, batch=3).save(tmp_path / "t", torch.float32)
    table = TableEncoder(TextTable.load(tmp_path / "t"))
    assert (table.name, table.dim, table.max_len) == ("minilm", 384, 32)
    for batch in (prompts, prompts[::-1], prompts[:1], prompts[1:3]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = enc.encode(batch)
        b = table.encode(batch)
        assert a.tokens == b.tokens and a.word_index == b.word_index
        assert a.emb.equal(b.emb) and a.mask.equal(b.mask)


def test_words_of_sentencepiece_tokens_and_a_left_padding_tokenizer(tmp_path, enc):
    """T5's pieces ("▁red") have spans that start at the space before their word: every word but the first fell
    in no word (-1), so word-level analyses saw specials. An hf: tokenizer configured to pad on the left gave
    `encode` padding as the prompt."""
    from ecviz.text import token_words

    prompt = "a red  circle, left"  # as T5's tokenizer offsets it: "▁a", "▁red", "▁circle", ",", "▁left", "</s>"
    offsets, special = [(0, 1), (1, 5), (6, 13), (13, 14), (14, 19), (0, 0)], [0, 0, 0, 0, 0, 1]
    assert token_words(prompt, offsets, special) == [0, 1, 2, 2, 3, -1]
    pytest.importorskip("transformers")
    left = tmp_path / "left"
    left.mkdir()
    for f in minilm_path().iterdir():
        if f.is_file():
            (left / f.name).symlink_to(f) if f.suffix == ".safetensors" else (left / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((left / "tokenizer_config.json").read_text())
    (left / "tokenizer_config.json").write_text(json.dumps(cfg | {"padding_side": "left", "truncation_side": "left"}))
    prompts = ["the cat", "a red triangle left of two blue squares"]
    got, want = load_text_encoder(f"hf:{left}", 32).encode(prompts), load_text_encoder(f"hf:{minilm_path()}",
                                                                                         32).encode(prompts)
    assert got.tokens == want.tokens and got.word_index == want.word_index and torch.equal(got.mask, want.mask)
    assert torch.allclose(got.emb, want.emb, atol=1e-6)


def test_hugging_face_weights_load_only_as_safetensors(tmp_path):
    """An hf: directory holding its weights only as a pickle (`pytorch_model.bin`) used to be unpickled, and a
    malicious one ended in an UnpicklingError traceback. Weights come through safetensors only: one line."""
    pytest.importorskip("transformers")
    src = minilm_path()
    d = tmp_path / "binonly"
    d.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    torch.save({"not": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"model\.safetensors") as info:
        load_text_encoder(f"hf:{d}", 32)
    assert "\n" not in str(info.value)


def test_a_prompt_that_is_not_unicode_text_is_named(enc, tmp_path):
    """Bytes that are not UTF-8 on a command line reach Python as lone surrogates, which the tokenizer refused
    with a TypeError traceback."""
    with pytest.raises(ValueError, match=r"prompt 'a \\udcff circle': not valid text at character 3"):
        enc.encode(["a red square", "a \udcff circle"])
    r = subprocess.run([sys.executable, "-m", "ecviz", "sample", "--ckpt", "checkpoints/ec-dit-shapes", "--prompt",
                        b"a \xff circle", "--steps", "1", "--out", str(tmp_path / "x.png")],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not valid text" in r.stderr, r.stderr
    assert not (tmp_path / "x.png").exists()
