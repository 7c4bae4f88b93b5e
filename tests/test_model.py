"""The DiT backbone: presets and parameter counts, hook points, checkpoints, sampler, a short training loop."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from ecviz.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from ecviz.errors import CheckpointError, EcvizError
from ecviz.flow import euler_sample, flow_loss, interpolate, noise_for, sample_timesteps, velocity
from ecviz.hooks import hooks
from ecviz.model import PRESETS, DiT, ModelConfig, count_flops, count_params, preset

# Paper Table 1, billions: (dense total, {experts: sparse total}, activated)
TABLE_1 = {
    "XL": (1.47, {8: 2.51, 16: 3.70, 32: 6.08}, 1.62),
    "XXL": (2.35, {8: 4.87, 16: 7.73, 32: 13.47}, 2.71),
    "3XL": (4.50, {8: 10.74, 16: 17.87, 32: 32.15}, 5.18),
    "M": (8.03, {64: 97.21}, 8.27),
}


def batch(cfg: ModelConfig, B: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    y = torch.randn(B, cfg.text_len, cfg.text_dim, generator=g)
    mask = torch.arange(cfg.text_len)[None] < torch.randint(1, cfg.text_len, (B, 1), generator=g)
    return x, y, mask


@pytest.mark.parametrize("size", list(TABLE_1))
def test_table_1_sparse_minus_dense_parameters(size):
    """Total − Dense matches the paper within 1% for every Table 1 preset (the expert and router weights)."""
    dense_paper, sparse_paper, _ = TABLE_1[size]
    dense = count_params(preset(f"DENSE-{size}"))["total"]
    for experts, total_paper in sparse_paper.items():
        n = count_params(preset(f"EC-DiT-{size}-{experts}E"))
        want = (total_paper - dense_paper) * 1e9
        assert abs((n["total"] - dense) - want) <= 0.01 * want, (size, experts)
        # the top-2 token-choice twin has the same parameters
        assert count_params(preset(f"TC-{size}-{experts}E")) == n


@pytest.mark.parametrize("size", ["XL", "XXL"])
def test_table_1_activated_minus_dense(size):
    """Activated − Dense: one extra FFN per sparse layer (f_c = 2), within 1% of the paper."""
    dense_paper, sparse_paper, activated_paper = TABLE_1[size]
    dense = count_params(preset(f"DENSE-{size}"))["total"]
    for experts in sparse_paper:
        activated = count_params(preset(f"EC-DiT-{size}-{experts}E"))["activated"]
        want = (activated_paper - dense_paper) * 1e9
        assert abs((activated - dense) - want) <= 0.01 * want


def test_table_1_activated_3xl_and_m_follow_the_total_column():
    """3XL and M activated counts disagree with the paper's own Total column (see docs/model.md).

    The Total column implies 21 sparse 3XL layers of 8d² expert weights, so one extra FFN each is 0.89B,
    not the 0.68B that 5.18 − 4.50 gives; M's activated depends on an unstated dense layer size. We assert
    the arithmetic the Total column implies.
    """
    d = 2304
    expert = 8 * d * d + 5 * d  # two linears with biases, hidden 4d
    dense = count_params(preset("DENSE-3XL"))["total"]
    ec = count_params(preset("EC-DiT-3XL-8E"))
    assert ec["activated"] - dense == 21 * (expert + 8 * d)  # one extra expert + the router, per sparse layer
    m = preset("EC-DiT-M-64E")
    assert len(m.sparse_layers) == 19 and m.depth == 38 and preset("DENSE-M").depth == 46


def test_presets_cover_the_paper_and_cpu_sizes():
    for size in ("XL", "XXL", "3XL"):
        for e in (8, 16, 32):
            assert f"EC-DiT-{size}-{e}E" in PRESETS and f"TC-{size}-{e}E" in PRESETS
    for name in ("DENSE-M", "EC-DiT-M-64E", "DENSE-tiny", "EC-DiT-tiny-4E", "TC-tiny-4E", "EC-DiT-small-8E"):
        assert name in PRESETS
    xl = preset("EC-DiT-XL-8E")
    assert xl.sparse_layers == list(range(1, 28, 2))  # every even-numbered layer, starting from the second
    assert (xl.width, xl.heads, xl.kv_heads, xl.group_size, xl.infer_group) == (1152, 18, 6, 1024, 512)
    with pytest.raises(ValueError, match="unknown preset 'EC-DiT-XL-7E'"):
        preset("EC-DiT-XL-7E")
    with pytest.raises(ValueError, match="multiple or a divisor"):
        preset("EC-DiT-small-8E", group_size=96)
    with pytest.raises(ValueError, match="exceeds the routing group size"):
        preset("EC-DiT-tiny-4E", capacity_factor=8.0)


@pytest.mark.parametrize("name", ["EC-DiT-tiny-4E", "TC-tiny-4E", "DENSE-tiny"])
def test_forward_shapes_and_hook_points(name):
    cfg = preset(name)
    model = DiT(cfg)
    x, y, mask = batch(cfg, 4)
    t = torch.rand(4)
    seen = {}
    want = ["blocks.*"]
    with hooks(model, {p: (lambda v, n: seen.__setitem__(n, v.shape)) for p in want}):
        out = model(x, t, y, mask)
    assert out.shape == x.shape
    S, L, E, H = cfg.tokens, cfg.text_len, cfg.experts, cfg.heads
    assert seen["blocks.0.cross_attn.hook_attn"] == (4, H, S, L)
    if cfg.routing == "dense":
        assert not any("moe" in n for n in model.hook_points)
        return
    G, g = 4 * S // cfg.group_size, cfg.group_size
    C = g * 2 // E
    assert seen["blocks.1.moe.hook_dispatch"] == (G, E, C)
    assert seen["blocks.1.moe.hook_gate"] == (G, E, C)
    assert seen["blocks.1.moe.hook_affinity"] == (G, g, E)
    assert seen["blocks.1.moe.hook_group"] == (G, g)
    if cfg.routing == "tc":
        assert seen["blocks.1.moe.hook_choice"] == (G, g, cfg.top_k)


def listening(model: DiT) -> DiT:
    """The model with its zero-initialised out-projections drawn at random, which would hide the text entirely."""
    for b in model.blocks:
        torch.nn.init.normal_(b.cross_attn.proj.weight, std=0.1)
        torch.nn.init.normal_(b.adaLN_modulation[-1].weight, std=0.1)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    return model


def test_cross_attention_ignores_padded_text():
    cfg = preset("EC-DiT-tiny-4E")
    model = listening(DiT(cfg))
    x, y, mask = batch(cfg, 2)
    y2 = y.clone()
    y2[~mask] = 100.0  # garbage where the mask says padding
    t = torch.full((2,), 0.5)
    seen = []
    with hooks(model, {"blocks.0.cross_attn.hook_attn": lambda a, n: seen.append(a)}):
        a = model(x, t, y, mask)
    b = model(x, t, y2, mask)
    assert torch.allclose(a, b, atol=1e-6)
    assert seen[0][~mask[:, None, None, :].expand_as(seen[0])].abs().max() == 0
    assert not torch.allclose(a, model(x, t, y + 1.0, mask))  # and it does listen to the real tokens


def test_maskdit_keep_runs_only_kept_tokens():
    cfg = preset("EC-DiT-tiny-4E", group_size=16)
    model = DiT(cfg)
    x, y, mask = batch(cfg, 4)
    keep = torch.stack([torch.randperm(cfg.tokens)[: cfg.tokens // 2] for _ in range(4)])
    out = model(x, torch.rand(4), y, mask, keep=keep)
    assert out.shape == (4, cfg.tokens // 2, cfg.patch_size**2 * cfg.in_channels)


def test_zero_init_makes_a_fresh_model_predict_zero():
    cfg = preset("EC-DiT-tiny-4E")
    x, y, mask = batch(cfg, 2)
    assert DiT(cfg)(x, torch.rand(2), y, mask).abs().max() == 0


def test_patchify_round_trip():
    model = DiT(preset("DENSE-tiny"))
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model.unpatchify(model.patchify(x)), x)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DiT(preset("TC-tiny-4E"))
    save_checkpoint(model, tmp_path / "ck", preset="TC-tiny-4E", meta={"step": 7})
    loaded, info = load_checkpoint(tmp_path / "ck")
    assert info.preset == "TC-tiny-4E" and info.meta == {"step": 7} and info.config == model.cfg
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    doc = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert doc["model"]["routing"] == "tc" and doc["model"]["text_encoder"] == "minilm"
    assert len(info.sha256) == 64
    assert not list((tmp_path / "ck").glob("*.tmp")) and not list((tmp_path / "ck").glob(".*"))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "ck" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # as any file they write


def test_text_attend_words_hides_each_captions_first_and_last_token_from_cross_attention():
    """text_attend="words": [CLS] and [SEP] (the first and last valid token) get no attention and do not change
    the output; other tokens still do; a caption of two tokens keeps both (no row attends to nothing)."""
    cfg = preset("EC-DiT-tiny-4E", text_attend="words")
    model = listening(DiT(cfg))
    x, y, mask = batch(cfg, 2)
    mask[:] = False
    mask[0, :6], mask[1, :2] = True, True  # a caption of 6 tokens and one of 2
    t = torch.full((2,), 0.5)
    seen = []
    with hooks(model, {"blocks.0.cross_attn.hook_attn": lambda a, n: seen.append(a)}):
        a = model(x, t, y, mask)
    attn = seen[0]  # (B, H, S, L)
    assert attn[0, ..., [0, 5]].abs().max() == 0 and attn[0, ..., 1:5].sum(-1).allclose(torch.ones(1))
    assert attn[1, ..., :2].sum(-1).allclose(torch.ones(1)) and torch.isfinite(a).all()
    special = y.clone()
    special[0, [0, 5]] += 100.0
    assert torch.allclose(a[0], model(x, t, special, mask)[0], atol=1e-6)
    word = y.clone()
    word[0, 2] += 1.0
    assert not torch.allclose(a[0], model(x, t, word, mask)[0])
    plain = DiT(preset("EC-DiT-tiny-4E"))
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(a[0], plain(x, t, special, mask)[0])  # "all" (the default) does listen to them
    # a word masked out inside the caption (ablate-words) hides that word alone: the last word still speaks
    holed = mask.clone()
    holed[0, 2] = False
    seen.clear()
    with hooks(model, {"blocks.0.cross_attn.hook_attn": lambda a, n: seen.append(a)}):
        model(x, t, y, holed)
    assert seen[0][0, ..., [0, 2, 5]].abs().max() == 0
    assert (seen[0][0, ..., [1, 3, 4]] > 0).all() and seen[0][0].sum(-1).allclose(torch.ones(1))
    with pytest.raises(ValueError, match="text_attend 'cls' is not one of all, words"):
        preset("EC-DiT-tiny-4E", text_attend="cls")


def test_cross_attention_reads_text_as_a_set_and_the_text_refiner_gives_it_order():
    """Without a refiner, permuting a caption's tokens leaves the output unchanged: "a white ring and a red circle"
    and its colour swap are the same set of words. text_refiner=N adds position and context, so order matters;
    padding still does not, and cross-attention reads the refined text at the model's width."""
    x, y, mask = batch(preset("DENSE-tiny"), 2)
    mask[:] = False
    mask[:, :6] = True
    t = torch.full((2,), 0.5)
    perm = torch.tensor([0, 3, 2, 1, 5, 4, *range(6, y.shape[1])])  # swap two pairs of real tokens
    torch.manual_seed(0)
    plain = listening(DiT(preset("DENSE-tiny")))
    assert torch.allclose(plain(x, t, y, mask), plain(x, t, y[:, perm], mask), atol=1e-5)
    torch.manual_seed(0)
    cfg = preset("DENSE-tiny", text_refiner=2)
    refined = listening(DiT(cfg))
    assert cfg.text_width == cfg.width and refined.blocks[0].cross_attn.kv.in_features == cfg.width
    a = refined(x, t, y, mask)
    assert (a - refined(x, t, y[:, perm], mask)).abs().max() > 1e-3
    garbage = y.clone()
    garbage[~mask] = 100.0
    assert torch.allclose(a, refined(x, t, garbage, mask), atol=1e-5)
    assert DiT(cfg)(x, t, y, mask).abs().max() == 0  # still zero-initialised
    with pytest.raises(ValueError, match="text_refiner -1 must be 0"):
        preset("DENSE-tiny", text_refiner=-1)


def test_a_size_of_zero_is_one_line_not_a_division_by_zero():
    """Every count and size of the config is checked before anything divides by it (experts=0 was a
    ZeroDivisionError traceback from `ecviz train --model experts=0` and from a checkpoint's config.json)."""
    from ecviz.model import POSITIVE_SIZES

    for name in POSITIVE_SIZES:
        for routing in ("EC-DiT-tiny-4E", "DENSE-tiny"):
            with pytest.raises(ValueError, match=f"^{name} 0 must be at least 1$"):
                preset(routing, **{name: 0})
    for name in ("mlp_ratio", "capacity_factor", "infer_capacity_factor"):
        for bad in ("nan", "inf"):  # inf: an OverflowError building the FFN
            with pytest.raises(ValueError, match=f"^{name} {bad} must be a positive number$"):
                preset("EC-DiT-tiny-4E", **{name: float(bad)})
    for name in ("aux_loss_weight", "z_loss_weight"):  # nan trained a loss of nan, with exit status 0
        for bad in ("nan", "inf", "-1"):
            with pytest.raises(ValueError, match=f"^{name} {float(bad)} must be a number of 0 or more$"):
                preset("TC-tiny-4E", **{name: float(bad)})
    with pytest.raises(ValueError, match="sparse_start -1 must be 0 or more"):
        preset("EC-DiT-tiny-4E", sparse_start=-1)


def test_text_pos_starts_as_the_model_without_it_and_then_gives_the_caption_order():
    """text_pos=True adds a learned position embedding to the text tokens, at zero: the weights of a model without
    it load (all but text_pos) and compute exactly what they did; once it has moved, permuting a caption's tokens
    changes the output, and padding still does not."""
    x, y, mask = batch(preset("EC-DiT-tiny-4E"), 2)
    mask[:] = False
    mask[:, :6] = True
    t = torch.full((2,), 0.5)
    perm = torch.tensor([0, 3, 2, 1, 5, 4, *range(6, y.shape[1])])
    torch.manual_seed(0)
    plain = listening(DiT(preset("EC-DiT-tiny-4E")))
    placed = DiT(preset("EC-DiT-tiny-4E", text_pos=True))
    assert placed.starts_as_identity() == {"text_pos"} and plain.starts_as_identity() == set()
    missing, unexpected = placed.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["text_pos"] and unexpected == []
    assert torch.equal(placed(x, t, y, mask), plain(x, t, y, mask))
    with torch.no_grad():
        placed.text_pos.normal_(std=0.5)
    a = placed(x, t, y, mask)
    assert (a - placed(x, t, y[:, perm], mask)).abs().max() > 1e-3
    assert torch.allclose(plain(x, t, y, mask), plain(x, t, y[:, perm], mask), atol=1e-5)
    garbage = y.clone()
    garbage[~mask] = 100.0
    assert torch.allclose(a, placed(x, t, garbage, mask), atol=1e-5)


def test_token_choice_priority_config_and_old_checkpoints(tmp_path):
    """tc_priority reaches every TC layer; a checkpoint saved before the key existed loads with the default."""
    model = DiT(preset("TC-tiny-4E", tc_priority="position"))
    assert [b.moe.priority for b in model.blocks if hasattr(b, "moe")] == ["position"]
    assert preset("TC-tiny-4E").tc_priority == "score"
    with pytest.raises(ValueError, match="tc_priority 'token' is not one of score, position"):
        preset("TC-tiny-4E", tc_priority="token")
    ck = save_checkpoint(DiT(preset("TC-tiny-4E", tc_priority="position")), tmp_path / "ck")
    doc = json.loads((ck / "config.json").read_text())
    assert doc["model"].pop("tc_priority") == "position"
    (ck / "config.json").write_text(json.dumps(doc))  # as written before tc_priority existed
    save_file(load_file(ck / "model.safetensors"), ck / "model.safetensors")  # nor did weights carry a config
    loaded, info = load_checkpoint(ck)
    assert info.config.tc_priority == "score" and loaded.blocks[1].moe.priority == "score"


def test_weights_changed_after_writing_or_not_finite_are_refused(tmp_path, capsys):
    """A flipped byte in the tensor data loaded silently and drew other images; a NaN drew black ones: both with
    exit status 0. The tensors' digest (config.json's weights_digest) and a finiteness check now refuse them
    in one line, before anything is drawn."""
    from helpers import assert_bad_input, ecviz_here

    model = DiT(preset("EC-DiT-tiny-4E"))
    ck = save_checkpoint(model, tmp_path / "ck")
    raw = bytearray((ck / "model.safetensors").read_bytes())
    raw[-3] ^= 0x10  # a byte of the last tensor's data: names, shapes and the header unchanged
    (ck / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="its tensors' digest differs"):
        load_checkpoint(ck)
    state = model.state_dict()
    state["blocks.0.adaLN_modulation.1.bias"][3] = float("nan")
    nan = save_checkpoint(model, tmp_path / "nan", state=state)  # written so: the digest agrees
    assert_bad_input(ecviz_here(capsys, "sample", "--ckpt", nan, "--prompt", "a red circle", "--n", 1,
                                "--steps", 1, "--out", tmp_path / "s.png"),
                     "weight 'blocks.0.adaLN_modulation.1.bias' holds NaN or infinite values")
    assert not (tmp_path / "s.png").exists()


def test_checkpoint_errors_name_the_problem(tmp_path):
    model = DiT(preset("EC-DiT-tiny-4E"))
    ck = save_checkpoint(model, tmp_path / "ck")
    with pytest.raises(CheckpointError, match="no such directory"):
        read_checkpoint(tmp_path / "nothing")
    # weights that do not match the config: another expert count
    cfg = json.loads((ck / "config.json").read_text())
    cfg["model"]["experts"] = 8
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"weight 'blocks.1.moe.router.weight' has shape \(4, 64\), "
                                              r"the config expects \(8, 64\)"):
        load_checkpoint(ck)
    cfg["model"]["experts"] = 4
    (ck / "config.json").write_text(json.dumps(cfg))
    w = load_file(ck / "model.safetensors")
    save_file({k: (v * 100).to(torch.int32) if k.startswith("blocks.1") else v for k, v in w.items()},
              ck / "model.safetensors")  # the right names and shapes, cast to whole numbers: it loaded
    with pytest.raises(CheckpointError, match=r"weight 'blocks\.1\.\S+' is stored as I32, not a floating-point"):
        load_checkpoint(ck)
    del w["blocks.0.attn.q.weight"]
    save_file(w, ck / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.attn\.q\.weight' is missing"):
        load_checkpoint(ck)
    (ck / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="is unreadable"):
        load_checkpoint(ck)
    (ck / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        load_checkpoint(ck)
    cfg["model"]["bogus"] = 1
    (ck / "config.json").write_text(json.dumps(cfg))
    save_checkpoint(model, tmp_path / "ck2")
    (tmp_path / "ck2" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown model config key 'bogus'"):
        load_checkpoint(tmp_path / "ck2")


def trained_tiny(routing: str = "ec") -> DiT:
    torch.manual_seed(0)
    name = {"ec": "EC-DiT-tiny-4E", "tc": "TC-tiny-4E", "dense": "DENSE-tiny"}[routing]
    model = DiT(preset(name))
    for p in model.parameters():  # move off the zero init so routing and CFG matter
        if p.requires_grad:
            p.data.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def test_sampler_is_deterministic_and_per_sample():
    model = trained_tiny()
    cfg = model.cfg
    _, y, mask = batch(cfg, 4)
    noise = noise_for([10, 11, 12, 13], (3, 16, 16))
    steps = []
    a = euler_sample(model, noise, y, mask, steps=5, guidance=3.0, callback=steps.append)
    b = euler_sample(model, noise.clone(), y, mask, steps=5, guidance=3.0)
    assert torch.equal(a, b)
    assert [s.index for s in steps] == list(range(5)) and [s.t for s in steps] == [0, 0.2, 0.4, 0.6, 0.8]
    assert torch.equal(steps[-1].x, a)
    assert torch.equal(noise_for([12], (3, 16, 16))[0], noise[2])  # noise depends on the seed only
    assert not torch.allclose(a, euler_sample(model, noise, y, mask, steps=5, guidance=1.0))  # guidance matters


def test_flow_conventions():
    x, eps = torch.randn(3, 2), torch.randn(3, 2)
    assert torch.equal(interpolate(x, eps, torch.zeros(3)), eps)  # t = 0 is noise
    assert torch.equal(interpolate(x, eps, torch.ones(3)), x)  # t = 1 is data
    t = torch.tensor([0.3, 0.5, 0.9])
    h = 1e-3
    fd = (interpolate(x, eps, t + h) - interpolate(x, eps, t - h)) / (2 * h)
    assert torch.allclose(fd, velocity(x, eps), atol=1e-3)
    ts = sample_timesteps(20000, mu=0.0, sigma=1.0, generator=torch.Generator().manual_seed(0))
    assert 0 < ts.min() and ts.max() < 1 and abs(ts.median() - 0.5) < 0.02
    assert sample_timesteps(20000, mu=1.0, generator=torch.Generator().manual_seed(0)).median() > 0.7
    pred, target = torch.zeros(2, 4, 3), torch.ones(2, 4, 3)
    target[0, 0] = 3.0
    m = torch.ones(2, 4)
    m[0, 0] = 0
    assert flow_loss(pred, target, m).item() == pytest.approx(1.0)
    assert flow_loss(pred, target).item() > 1.0


@pytest.mark.parametrize("routing", ["ec", "tc"])
def test_two_training_steps_lower_the_loss_on_a_fixed_batch(routing):
    torch.manual_seed(0)
    model = DiT(preset({"ec": "EC-DiT-tiny-4E", "tc": "TC-tiny-4E"}[routing])).train()
    cfg = model.cfg
    x, y, mask = batch(cfg, 8, seed=3)
    noise = torch.randn_like(x)
    t = sample_timesteps(8, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3, momentum=0.9)

    def loss_fn():
        pred = model.patchify(model(interpolate(x, noise, t), t, y, mask))
        return flow_loss(pred, model.patchify(velocity(x, noise))) + model.aux_loss()

    losses = []
    for _ in range(3):
        loss = loss_fn()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[2] < losses[1] < losses[0]
    expert_grad = model.blocks[1].moe.experts.w1.grad
    assert expert_grad is not None and expert_grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["EC-DiT-tiny-4E", "TC-tiny-4E", "DENSE-tiny", "DENSE-small-matched",
                                  "EC-DiT-small-8E", "EC-DiT-tiny-4E:text_refiner=2"])
def test_flop_count_equals_the_matrix_products_of_a_forward(name):
    """count_flops (from the config alone) equals torch's FLOP counter on a real forward: inference, and a MaskDiT
    training forward (half the tokens kept, routed in the training groups)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    name, _, refiner = name.partition(":text_refiner=")
    cfg = preset(name, text_refiner=int(refiner or 0))
    model = DiT(cfg)
    B, kept = 16, cfg.tokens // 2  # whole training groups of kept tokens
    x, y, mask = batch(cfg, B)
    keep = torch.rand(B, cfg.tokens).argsort(-1)[:, :kept].sort(-1).values
    for training, kw in ((False, {}), (True, {"keep": keep})):
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model.train(training)(x, torch.rand(B), y, mask, **kw)  # the math attention: its products counted
        want = count_flops(cfg, B, kept=kept if training else None, training=training)
        assert counter.get_total_flops() == want, (training, counter.get_flop_counts()["Global"])


def test_ec_does_the_matched_dense_models_compute_plus_its_routers():
    ec, dense = preset("EC-DiT-XL-32E"), preset("DENSE-XL-matched")
    routers = 2 * 16 * ec.tokens * ec.width * ec.experts * len(ec.sparse_layers)
    assert count_flops(ec, 16) - count_flops(dense, 16) == routers
    assert count_flops(ec, 16) / count_flops(preset("DENSE-XL"), 16) == pytest.approx(1.265, abs=0.001)  # sampling


def test_weights_carry_their_config_so_a_half_finished_write_is_refused(tmp_path):
    """A checkpoint is two files, each written atomically, not the pair: a write cut short between them left
    new weights beside the old config. EC and TC weights of one size have the same names and shapes, so the TC
    weights loaded silently as an EC model. The weights now carry the config they were written for; loading
    refuses a config.json that disagrees, except in the inference-only settings a user may change."""
    ec = save_checkpoint(DiT(preset("EC-DiT-tiny-4E")), tmp_path / "ec")
    tc = save_checkpoint(DiT(preset("TC-tiny-4E")), tmp_path / "tc")
    assert set(load_file(ec / "model.safetensors")) == set(load_file(tc / "model.safetensors"))  # same names
    (ec / "model.safetensors").write_bytes((tc / "model.safetensors").read_bytes())  # the weights' rename only
    with pytest.raises(CheckpointError, match=r"says routing='ec' but model\.safetensors was written for "
                                              r"routing='tc'.*write the checkpoint again"):
        load_checkpoint(ec)
    cfg = json.loads((tc / "config.json").read_text())
    cfg["model"]["infer_group_size"] = 16  # a user's own inference setting: allowed
    (tc / "config.json").write_text(json.dumps(cfg))
    assert load_checkpoint(tc)[0].cfg.infer_group_size == 16


def test_weights_beside_another_writes_config_of_the_same_model_are_refused(tmp_path):
    """`export --overwrite` cut short between its two files left the new weights beside the old config.json:
    the same model config, so they loaded under the earlier write's `meta` (its step and command). Both files
    now carry a digest of the tensors; the same weights written twice give the same config.json."""
    first, second = DiT(preset("EC-DiT-tiny-4E")), DiT(preset("EC-DiT-tiny-4E"))
    a = save_checkpoint(first, tmp_path / "a", meta={"step": 100})
    b = save_checkpoint(second, tmp_path / "b", meta={"step": 200})
    (a / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes())  # the weights' rename only
    with pytest.raises(CheckpointError, match=r"model\.safetensors and config\.json come from two different "
                                              r"writes.*write the checkpoint again"):
        load_checkpoint(a)
    again = save_checkpoint(second, tmp_path / "again", meta={"step": 200})
    assert (again / "config.json").read_bytes() == (b / "config.json").read_bytes()
    assert load_checkpoint(again)[1].meta == {"step": 200}


def test_a_hand_edited_config_of_the_wrong_type_is_named(tmp_path):
    """`"depth": 6.0` in config.json used to fail deep inside the model with a TypeError traceback."""
    ck = save_checkpoint(DiT(preset("EC-DiT-tiny-4E")), tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    for key, value, expected in (("depth", 2.0, "int"), ("text_pos", 1, "bool"), ("routing", 3, "str"),
                                 ("infer_group_size", "32", "int or null")):
        (ck / "config.json").write_text(json.dumps(cfg | {"model": cfg["model"] | {key: value}}))
        with pytest.raises(CheckpointError, match=f"model config {key}={value!r}: expected {expected}"):
            read_checkpoint(ck)
    (ck / "config.json").write_text(json.dumps(cfg | {"model": cfg["model"] | {"capacity_factor": 2}}))
    assert read_checkpoint(ck).config.capacity_factor == 2  # an int where a float goes is fine


def test_configs_the_model_cannot_build_are_named():
    """Each used to pass the config and fail later with a traceback: a width not a multiple of 4 in the position
    embedding, an EC model whose sparse_start left no sparse layer in the training probe, an FFN of no units."""
    for kw, words in ((dict(width=66, heads=2, kv_heads=1), "width 66 must be a multiple of 4"),
                      (dict(sparse_start=2), "sparse_start 2 leaves no sparse layer in 2 blocks"),
                      (dict(mlp_ratio=0.001), "leaves an FFN of no hidden units")):
        with pytest.raises(ValueError, match=words):
            preset("EC-DiT-tiny-4E", **kw)
    assert preset("DENSE-tiny", sparse_start=2).sparse_layers == []  # a dense model needs none


def test_hooks_on_a_submodule_leave_the_models_names_alone():
    """hooks() named the hook points relative to the module it was given, for good: after one call on a block,
    an observer of the whole model was told `moe.hook_gate` instead of `blocks.1.moe.hook_gate`."""
    model = DiT(preset("EC-DiT-tiny-4E")).eval()
    c = model.cfg
    x, t = torch.randn(2, c.in_channels, c.input_size, c.input_size), torch.rand(2)
    y, mask = torch.randn(2, c.text_len, c.text_dim), torch.ones(2, c.text_len, dtype=torch.bool)
    seen = []
    with hooks(model.blocks[1], {"moe.hook_gate": lambda _, name: seen.append(name)}), torch.no_grad():
        model(x, t, y, mask)
    handle = model.hook_points["blocks.1.moe.hook_gate"].add_hook(lambda _, name: seen.append(name))
    with torch.no_grad():
        model(x, t, y, mask)
    handle.remove()
    assert seen == ["moe.hook_gate", "blocks.1.moe.hook_gate"]


@pytest.mark.parametrize("name", ["EC-DiT-tiny-4E", "TC-tiny-4E"])
def test_an_edit_hook_that_zeroes_an_experts_gates_removes_exactly_that_expert(name):
    """hooks(edit=True): a hook's returned tensor is what the model computes with. Zeroing expert 2's gates in
    block 1 gives the output of the same model with expert 2's output weights zeroed (it then adds nothing),
    for expert and token choice alike (token choice ignored the edit), and an observer attached alongside sees
    the edited gates. An observer's return value changes nothing."""
    torch.manual_seed(0)
    model = DiT(preset(name)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # adaLN-zero starts every block as the identity
    x, y, mask = batch(model.cfg, 4)
    t = torch.full((4,), 0.5)
    moe = model.blocks[1].moe
    e = 2

    def drop_expert(gate, _):
        gate = gate.clone()
        gate[:, e] = 0
        return gate

    seen = []
    with torch.no_grad():
        plain = model(x, t, y, mask)
        with hooks(model, {"blocks.1.moe.hook_gate": lambda g, _: seen.append(g)}), \
                hooks(model, {"blocks.1.moe.hook_gate": drop_expert}, edit=True):
            edited = model(x, t, y, mask)
        with hooks(model, {"blocks.1.moe.hook_gate": lambda g, _: torch.zeros_like(g)}):  # observer: no effect
            assert torch.equal(model(x, t, y, mask), plain)
        moe.experts.w2[e] = 0
        moe.experts.b2[e] = 0
        without = model(x, t, y, mask)
    assert not torch.allclose(edited, plain, atol=1e-4)
    torch.testing.assert_close(edited, without, atol=1e-5, rtol=1e-5)
    assert seen[0][:, e].abs().max() == 0 and seen[0].abs().max() > 0  # recorded as computed
    with pytest.raises(ValueError, match="observe-only"):
        with hooks(model, {"blocks.1.moe.hook_group": lambda v, _: v}, edit=True):
            pass
    with pytest.raises(ValueError, match="must return a tensor of shape"), torch.no_grad():
        with hooks(model, {"blocks.1.moe.hook_gate": lambda g, _: g[:1]}, edit=True):
            model(x, t, y, mask)
    calls = []
    with torch.no_grad(), hooks(model, {"blocks.1.moe.*": (f := lambda v, n: calls.append(n)),
                                        "blocks.1.moe.hook_gate": f}):
        model(x, t, y, mask)
    assert calls.count("blocks.1.moe.hook_gate") == 1  # one function, matched twice, attached once


def test_an_expert_choice_dispatch_edit_of_minus_one_empties_the_slot():
    """-1 in an edited hook_dispatch empties that slot (HOOK_DOCS): the same output as zeroing its gate, in
    any routing group (it sent the slot to the previous group's last token, or failed in group 0)."""
    torch.manual_seed(0)
    model = DiT(preset("EC-DiT-tiny-4E", infer_group_size=16)).eval()  # a group per image: G = 4
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, y, mask = batch(model.cfg, 4)
    t = torch.full((4,), 0.5)
    chosen = {}

    def empty(index, _):
        chosen["index"] = index.clone()
        index = index.clone()
        index[:, 1, 0] = -1  # expert 1's best token, in every group
        return index

    def zero(gate, _):
        gate = gate.clone()
        gate[:, 1, 0] = 0
        return gate

    seen = []
    with torch.no_grad():
        with hooks(model, {"blocks.1.moe.hook_dispatch": empty}, edit=True), \
                hooks(model, {"blocks.1.moe.hook_gate": lambda g, _: seen.append(g)}):
            emptied = model(x, t, y, mask)
        assert seen[0][:, 1, 0].abs().max() == 0 and seen[0][:, 1, 1:].abs().min() > 0  # HOOK_DOCS: 0 where empty
        with hooks(model, {"blocks.1.moe.hook_gate": zero}, edit=True):
            zeroed = model(x, t, y, mask)
        plain = model(x, t, y, mask)
        assert not torch.allclose(emptied, plain, atol=1e-4)
        torch.testing.assert_close(emptied, zeroed, atol=1e-5, rtol=1e-5)
        with hooks(model, {"blocks.1.moe.hook_dispatch": lambda i, _: i + 100}, edit=True), \
                pytest.raises(EcvizError, match=r"outside -1\.\.15"):
            model(x, t, y, mask)


@pytest.mark.parametrize("name", ["EC-DiT-tiny-4E", "TC-tiny-4E"])
def test_experts_removed_is_the_model_with_their_output_weights_zeroed(name):
    """ecviz.experiments.experts_removed: the experts named add nothing in the layers named (all by default),
    the same as zeroing their output weights, and the model is itself again on exit."""
    from ecviz.experiments import experts_removed

    torch.manual_seed(0)
    model = DiT(preset(name)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, y, mask = batch(model.cfg, 4)
    t = torch.full((4,), 0.5)
    with torch.no_grad():
        plain = model(x, t, y, mask)
        with experts_removed(model, [1, 3]):
            removed = model(x, t, y, mask)
        assert torch.equal(model(x, t, y, mask), plain)  # hooks off
        zeroed = DiT(model.cfg).eval()
        zeroed.load_state_dict(model.state_dict())
        for moe in zeroed.moe_layers():
            moe.experts.w2[[1, 3]] = 0
            moe.experts.b2[[1, 3]] = 0
        torch.testing.assert_close(removed, zeroed(x, t, y, mask), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(removed, plain, atol=1e-4)
    with pytest.raises(EcvizError, match=r"name experts 0\.\.3"), experts_removed(model, [4]):
        pass
    with pytest.raises(EcvizError, match=r"the sparse layers are block 1$"), experts_removed(model, [0], layers=[0]):
        pass


def test_tokens_skipped_gives_the_marked_tokens_no_expert_and_its_control_takes_as_many_slots_elsewhere():
    """ecviz.experiments.tokens_skipped: every slot that took a marked token is emptied (marking every token is
    every expert removed), a batch of twice the images (guidance's) repeats the marks, `layers` edits those
    blocks only, and `matched` empties as many slots of each group among the other tokens' instead (all of them
    where they hold fewer), leaving the marked tokens' slots as they were; `slots_taken` counts without editing."""
    import dataclasses

    from ecviz.experiments import experts_removed, slots_taken, tokens_skipped

    torch.manual_seed(0)
    model = DiT(dataclasses.replace(preset("EC-DiT-tiny-4E"), depth=4)).eval()  # sparse blocks 1 and 3
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = model.cfg
    x, y, mask = batch(cfg, 4)
    t = torch.full((4,), 0.5)
    marks = torch.rand(2, cfg.tokens, generator=torch.Generator().manual_seed(1)) < 0.3  # 2 images, repeated
    seen, now = {}, {"marks": marks}

    def look(index, name):  # observers at an edited point see the edited value
        flat = now["marks"].repeat(2, 1).view(-1)  # (4·S,) the forward's tokens
        G = index.shape[0]
        rows = index + torch.arange(G).view(G, 1, 1) * (flat.numel() // G)  # (G, E, C) rows of the batch
        seen[name] = (flat[rows.clamp(min=0)] & (index >= 0), index < 0)  # (slot on a marked token, empty)

    names = [f"blocks.{b}.moe.hook_dispatch" for b in cfg.sparse_layers]
    with torch.no_grad():
        plain = model(x, t, y, mask)
        with slots_taken(model, marks) as taken, hooks(model, dict.fromkeys(names, look)):
            assert torch.equal(model(x, t, y, mask), plain)  # counting edits nothing
        before = {n: v[0] for n, v in seen.items()}  # the slots that take marked tokens, unedited
        assert taken["marked"] == sum(int(b.sum()) for b in before.values()) > 0
        assert taken["layers"][3]["marked"] == int(before[names[1]].sum())
        with tokens_skipped(model, marks) as counts, hooks(model, dict.fromkeys(names, look)):
            skipped = model(x, t, y, mask)
        on_marked, empty = seen[names[0]]  # the first sparse layer sees the same input: the same choices, emptied
        assert not on_marked.any() and torch.equal(empty, before[names[0]])
        assert not seen[names[1]][0].any()
        assert counts["marked"] == counts["emptied"] > 0 and counts["slots"] == taken["slots"]
        with tokens_skipped(model, marks, layers=[3]) as late, hooks(model, dict.fromkeys(names, look)):
            model(x, t, y, mask)
        assert torch.equal(seen[names[0]][0], before[names[0]]) and not seen[names[0]][1].any()  # block 1 as it was
        assert not seen[names[1]][0].any() and list(late["layers"]) == [3]
        assert late["emptied"] == int(before[names[1]].sum())
        with tokens_skipped(model, marks, matched=True, seed=3) as matched, hooks(model, dict.fromkeys(names, look)):
            control = model(x, t, y, mask)
        on_marked, empty = seen[names[0]]
        assert torch.equal(on_marked, before[names[0]])  # the marked tokens keep their slots
        assert torch.equal(empty.flatten(1).sum(1), before[names[0]].flatten(1).sum(1))  # as many, per group
        assert matched["emptied"] == matched["marked"]
        now["marks"] = most = torch.rand(2, cfg.tokens, generator=torch.Generator().manual_seed(2)) < 0.9
        with tokens_skipped(model, most, matched=True) as few, hooks(model, dict.fromkeys(names, look)):
            model(x, t, y, mask)
        on_marked, empty = seen[names[0]]
        assert few["emptied"] < few["marked"] and not (~on_marked & ~empty).any()  # few others: all emptied
        with tokens_skipped(model, torch.ones(1, cfg.tokens, dtype=torch.bool)):
            every = model(x, t, y, mask)
        with experts_removed(model, range(cfg.experts)):
            torch.testing.assert_close(every, model(x, t, y, mask), atol=1e-6, rtol=1e-6)
        assert torch.equal(model(x, t, y, mask), plain)  # hooks off
    for a, b in ((skipped, plain), (control, plain), (skipped, control)):
        assert not torch.allclose(a, b, atol=1e-4)
    with pytest.raises(EcvizError, match=r"tokens has shape \(3, 5\)"), tokens_skipped(model, torch.ones(3, 5)):
        pass
    with pytest.raises(EcvizError, match=r"layers 2: the sparse layers are blocks 1,3"), \
            slots_taken(model, marks, layers=[2]):
        pass
    with pytest.raises(EcvizError, match="not a whole number of repeats of the 3 images"), torch.no_grad(), \
            tokens_skipped(model, torch.ones(3, cfg.tokens)):
        model(x, t, y, mask)
    with pytest.raises(EcvizError, match="routes by 'tc'"), tokens_skipped(DiT(preset("TC-tiny-4E")), marks):
        pass
