"""The EC-DiT text-to-image diffusion transformer (Sun et al., ICLR 2025), with dense and token-choice twins.

A DiT (Peebles & Xie) with PixArt-style cross-attention to text (Eq. 2-3) in every block. Every second FFN,
starting from the second block, is a sparse MoE layer whose router sees x' = x_s + MHCA(x_s) (Eq. 4), after
the block's adaLN modulation. Read top to bottom: config and presets, embeddings, attention, block, model,
parameter counts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ecviz.errors import EcvizError
from ecviz.hooks import HookPoint, name_hook_points
from ecviz.routing import FFN, TC_PRIORITIES, ExpertChoiceMoE, TokenChoiceMoE, capacity, check_group_size

ROUTINGS = ("ec", "tc", "dense")
TEXT_ATTEND = ("all", "words")
POSITIVE_SIZES = ("input_size", "in_channels", "patch_size", "width", "depth", "heads", "kv_heads", "text_dim",
                  "text_len", "experts", "sparse_every", "group_size", "top_k")
MAX_LAYERS = 1000  # blocks (or refiner layers): the paper's deepest has 46; a typo of 100000 took minutes to build


@dataclass
class ModelConfig:
    """Every hyper-parameter of a model; saved as JSON beside its weights."""

    input_size: int = 32  # spatial size of the model's input (pixels, or latents with a VAE codec)
    in_channels: int = 3
    patch_size: int = 4
    width: int = 128  # d_x
    depth: int = 6
    heads: int = 4
    kv_heads: int = 4  # grouped-query attention in self-attention; = heads for plain multi-head
    mlp_ratio: float = 4.0
    text_dim: int = 384  # d_y
    text_len: int = 32  # text tokens, padded or truncated to this length
    routing: str = "ec"  # "ec" expert choice | "tc" top-k token choice | "dense"
    experts: int = 8
    sparse_start: int = 1  # 0-based index of the first sparse block: "starting from the second layer"
    sparse_every: int = 2
    matched_ffn: bool = False  # dense only: FFNs at the MoE positions get f_c·4d hidden (EC's activated compute)
    capacity_factor: float = 2.0  # f_c: expert slots per token (EC and TC alike)
    group_size: int = 256  # routing group in training (tokens)
    infer_capacity_factor: float | None = None  # None: as in training
    infer_group_size: int | None = None  # None: as in training
    top_k: int = 2  # token choice only
    aux_loss_weight: float = 0.01  # token choice load-balancing loss
    z_loss_weight: float = 0.0  # token choice router z-loss
    tc_priority: str = "score"  # token choice buffer fill order: "score" (top-1 probability) | "position"
    null_text: str = "learned"  # "learned" | "zero": the unconditional text for classifier-free guidance
    text_attend: str = "all"  # "all" text tokens | "words": cross-attention never sees a caption's first and last
    # token (MiniLM's [CLS] and [SEP]), whose vectors barely tell "a red ring and a white circle" from its swap
    text_refiner: int = 0  # trainable transformer layers over the text tokens, with a learned position embedding,
    # before cross-attention (0: none, the paper's, whose T5 tokens carry their context; see TextRefiner)
    text_pos: bool = False  # a learned position embedding added to the text tokens, starting at zero (so a trained
    # model gains it unchanged and can be fine-tuned): tells cross-attention which word came first
    text_encoder: str = "minilm"  # see ecviz.text.load_text_encoder
    codec: str = "pixel"  # see ecviz.codec.load_codec

    def __post_init__(self):
        for name in POSITIVE_SIZES:  # before any division by them
            if not getattr(self, name) >= 1:
                raise EcvizError(f"{name} {getattr(self, name)} must be at least 1")
        for name in ("mlp_ratio", "capacity_factor", "infer_capacity_factor", "infer_group_size"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:  # inf: an OverflowError deep in the model
                raise EcvizError(f"{name} {value} must be a positive number")
        for name in ("aux_loss_weight", "z_loss_weight"):  # nan trained a loss of nan, with exit status 0
            if not 0 <= getattr(self, name) < math.inf:
                raise EcvizError(f"{name} {getattr(self, name)} must be a number of 0 or more")
        for name in ("depth", "text_refiner"):  # before anything builds (or counts on the meta device) the layers
            if getattr(self, name) > MAX_LAYERS:
                raise EcvizError(f"{name} {getattr(self, name)}: at most {MAX_LAYERS} layers (the paper's deepest "
                                 "model has 46)")
        if not self.sparse_start >= 0:
            raise EcvizError(f"sparse_start {self.sparse_start} must be 0 or more")
        if self.routing not in ROUTINGS:
            raise EcvizError(f"routing {self.routing!r} is not one of {', '.join(ROUTINGS)}")
        if self.input_size % self.patch_size:
            raise EcvizError(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % 4:
            raise EcvizError(f"width {self.width} must be a multiple of 4 (the 2-D sine-cosine position embedding "
                             "gives each axis a sine and a cosine half)")
        if int(self.width * self.mlp_ratio) < 1:
            raise EcvizError(f"mlp_ratio {self.mlp_ratio} leaves an FFN of no hidden units at width {self.width}")
        if self.width % self.heads or self.heads % self.kv_heads:
            raise EcvizError(f"width {self.width}, heads {self.heads}, kv_heads {self.kv_heads}: "
                             f"heads must divide width and kv_heads must divide heads")
        if self.matched_ffn and self.sparse:
            raise EcvizError("matched_ffn is for dense models only")
        if self.null_text not in ("learned", "zero"):
            raise EcvizError(f"null_text {self.null_text!r} is not 'learned' or 'zero'")
        if self.text_attend not in TEXT_ATTEND:
            raise EcvizError(f"text_attend {self.text_attend!r} is not one of {', '.join(TEXT_ATTEND)}")
        if self.text_refiner < 0:
            raise EcvizError(f"text_refiner {self.text_refiner} must be 0 (none) or a number of layers")
        if self.sparse and not self.sparse_layers:
            raise EcvizError(f"sparse_start {self.sparse_start} leaves no sparse layer in {self.depth} blocks: a "
                             f"{self.routing} model needs sparse_start below depth (or routing=dense)")
        if self.sparse:
            for name, g, f in (("group_size", self.group_size, self.capacity_factor),
                               ("infer_group_size", self.infer_group, self.inference_capacity_factor)):
                check_group_size(g, self.tokens, name)
                capacity(g, f, self.experts)
            if self.routing == "tc" and not 1 <= self.top_k <= self.experts:
                raise EcvizError(f"top_k {self.top_k} must be between 1 and the {self.experts} experts")
        if self.tc_priority not in TC_PRIORITIES:
            raise EcvizError(f"tc_priority {self.tc_priority!r} is not one of {', '.join(TC_PRIORITIES)}")

    @property
    def sparse(self) -> bool:
        """Whether the model routes (EC or TC MoE layers); a dense model has FFNs only."""
        return self.routing != "dense"

    @property
    def text_width(self) -> int:
        """The width of the text tokens cross-attention reads: d_y, or d_x after a text refiner."""
        return self.width if self.text_refiner else self.text_dim

    @property
    def tokens(self) -> int:
        """Image tokens per sample, S."""
        return (self.input_size // self.patch_size) ** 2

    @property
    def infer_group(self) -> int:
        """The routing group at inference, in tokens: infer_group_size, else the training group."""
        return self.infer_group_size or self.group_size

    @property
    def inference_capacity_factor(self) -> float:
        """f_c at inference: infer_capacity_factor, else the training one."""
        return self.infer_capacity_factor or self.capacity_factor

    def is_moe_position(self, i: int) -> bool:
        """Where a sparse model has its MoE layers (a dense one its FFNs in their place)."""
        return i >= self.sparse_start and (i - self.sparse_start) % self.sparse_every == 0

    def is_sparse(self, i: int) -> bool:
        return self.sparse and self.is_moe_position(i)

    @property
    def sparse_layers(self) -> list[int]:
        return [i for i in range(self.depth) if self.is_sparse(i)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise EcvizError(f"unknown model config key {unknown[0]!r}")
        hints = typing.get_type_hints(cls)
        for key, value in d.items():  # a hand-edited config.json ("depth": 6.0) fails here, not deep in the model
            if not _fits(value, hints[key]):
                raise EcvizError(f"model config {key}={value!r}: expected {_type_name(hints[key])}")
        return cls(**d)


def _fits(value, hint) -> bool:
    """Whether a JSON value fits a ModelConfig field's type (int, float, bool, str, or a union with None)."""
    if isinstance(hint, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return type(value) in (int, float)
    return type(value) is hint


def _type_name(hint) -> str:
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return " or ".join("null" if a is type(None) else a.__name__ for a in args)


# ---- presets: the paper's Table 1 backbones and small CPU ones --------------------------------------------
# Paper backbones see 256 px through an 8-channel VAE (32x32 latents, patch 2: 256 tokens), route 1024-token
# groups in training (128 kept tokens per image after 50% masking) and 512 at inference; d_y = 2048 is our
# assumption for their "670M T5-based" encoder (the paper does not say).
_PAPER = dict(input_size=32, in_channels=8, patch_size=2, text_dim=2048, text_len=128, group_size=1024,
              infer_group_size=512, codec="vae:", text_encoder="hf:")
SIZES = {  # name: backbone, then the expert counts it is scaled with
    "tiny": (dict(depth=2, width=64, heads=2, kv_heads=1, input_size=16, text_len=16, group_size=32), (4,)),
    "small": (dict(depth=6, width=128, heads=4, kv_heads=2, group_size=256, infer_group_size=128), (8,)),
    # the shipped Shapes models: 32 px with patch 2, the paper's 16x16 token grid and its group sizes, 1024
    # tokens in training (4 unmasked images here; the paper's masked images are 8) and 512 (2 images) at inference
    "shapes": (dict(depth=6, width=128, heads=4, kv_heads=2, input_size=32, patch_size=2, group_size=1024,
                    infer_group_size=512), (8,)),
    "XL": (dict(depth=28, width=1152, heads=18, kv_heads=6, **_PAPER), (8, 16, 32)),
    "XXL": (dict(depth=38, width=1536, heads=24, kv_heads=6, **_PAPER), (8, 16, 32)),
    "3XL": (dict(depth=42, width=2304, heads=36, kv_heads=6, **_PAPER), (8, 16, 32)),
    "M": (dict(depth=46, width=3072, heads=48, kv_heads=12, **_PAPER), (64,)),
}
SPARSE_DEPTH = {"M": 38}  # EC-DiT-M trades depth for experts (Table 1 footnote)

PRESETS: dict[str, dict] = {}
for _size, (_base, _experts) in SIZES.items():
    PRESETS[f"DENSE-{_size}"] = dict(_base, routing="dense")
    PRESETS[f"DENSE-{_size}-matched"] = dict(_base, routing="dense", matched_ffn=True)  # EC's activated compute
    for _e in _experts:
        _sparse = dict(_base, depth=SPARSE_DEPTH.get(_size, _base["depth"]), experts=_e)
        PRESETS[f"EC-DiT-{_size}-{_e}E"] = dict(_sparse, routing="ec")
        PRESETS[f"TC-{_size}-{_e}E"] = dict(_sparse, routing="tc")


def preset(name: str, **overrides) -> ModelConfig:
    """The named preset's config, with overrides."""
    if name not in PRESETS:
        raise EcvizError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


# ---- embeddings -------------------------------------------------------------------------------------------
def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (MAE/DiT), (grid², dim): half the channels per axis."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def axis(pos):
        out = pos.reshape(-1, 1) * omega  # (S, dim/4)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([axis(ys), axis(xs)], axis=1)).float()


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features of 1000·t -> two-layer MLP of width d (DiT)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000 * t.float()[:, None] * freqs[None]  # float32 whatever the model's format
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.mlp[0].weight.dtype))


def inner_tokens(y_mask: torch.Tensor) -> torch.Tensor:
    """y_mask (B, L) without each caption's first and last valid token (a BERT-style encoder's [CLS] and
    [SEP]); a caption of fewer than three tokens keeps them all, so no row is left with nothing to attend to.
    The valid tokens need not be one run: a word masked out (`ecviz ablate-words`) leaves a hole inside it."""
    n = y_mask.sum(1, keepdim=True)  # (B, 1) valid tokens
    pos = torch.arange(y_mask.shape[1], device=y_mask.device)  # (L,)
    first = torch.where(y_mask, pos, y_mask.shape[1]).amin(1, keepdim=True)  # (B, 1)
    last = torch.where(y_mask, pos, -1).amax(1, keepdim=True)  # (B, 1)
    inner = y_mask & (pos > first) & (pos < last)
    return torch.where(n >= 3, inner, y_mask)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ---- attention ----------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """Multi-head self-attention over image tokens with grouped-query attention (kv_heads key/value heads)."""

    def __init__(self, dim: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)  # (B, H, S, hd)
        k, v = self.kv(x).view(B, S, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, Hkv, S, hd)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.kv_heads != self.heads)
        return self.proj(out.transpose(1, 2).reshape(B, S, -1))


class CrossAttention(nn.Module):
    """Image tokens attend to text embeddings (Eq. 2-3); padded text tokens are masked out.

    Attention probabilities are computed explicitly (L text tokens is small) so `hook_attn` (B, H, S, L) sees
    exactly what the output was made from, whether or not anyone records it.
    """

    def __init__(self, dim: int, text_dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(text_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.hook_attn = HookPoint()

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)  # (B, H, S, hd)
        k, v = self.kv(y).view(B, -1, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, L, hd)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # (B, H, S, L)
        attn = self.hook_attn(scores.masked_fill(~y_mask[:, None, None, :], float("-inf")).softmax(-1))
        return self.proj((attn @ v).transpose(1, 2).reshape(B, S, -1))


class TextLayer(nn.Module):
    """A pre-norm transformer layer over text tokens: self-attention among a caption's real tokens, then an MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, y: torch.Tensor, y_mask: torch.Tensor) -> torch.Tensor:  # y (B, L, d), y_mask (B, L)
        B, L, d = y.shape
        q, k, v = self.qkv(self.norm1(y)).view(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=y_mask[:, None, None, :])  # (B, H, L, hd)
        y = y + self.proj(out.transpose(1, 2).reshape(B, L, d))
        return y + self.mlp(self.norm2(y))


class TextRefiner(nn.Module):
    """Gives a frozen encoder's text tokens back their order and context before cross-attention reads them.

    Cross-attention (Eq. 2) treats the text as a set: permute the tokens and every image token's output is the
    same. The paper's T5 tokens carry their place and neighbours; MiniLM's barely do ("ring" in "a white ring
    and a red circle" and in its colour swap: cosine 0.995), so "which colour is whose" and "which shape is
    left" are nearly lost. The refiner maps the tokens to the model width, adds a learned position embedding
    and runs `layers` TextLayers, once per forward, shared by every block: y (B, L, d_y) -> (B, L, d), which the
    blocks' cross-attention reads instead of the encoder's tokens.
    """

    def __init__(self, text_dim: int, dim: int, heads: int, layers: int, text_len: int):
        super().__init__()
        self.proj = nn.Linear(text_dim, dim)
        self.pos = nn.Parameter(torch.randn(text_len, dim) * 0.02)  # (L, d)
        self.layers = nn.ModuleList([TextLayer(dim, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, y: torch.Tensor, y_mask: torch.Tensor) -> torch.Tensor:  # y (B, L, d_y), y_mask (B, L)
        y = self.proj(y) + self.pos[: y.shape[1]]  # (B, L, d)
        for layer in self.layers:
            y = layer(y, y_mask)
        return self.norm(y)


# ---- block and model --------------------------------------------------------------------------------------
def make_ffn(cfg: ModelConfig, i: int) -> nn.Module:
    """Block i's feed-forward layer: a dense FFN, or an EC or TC MoE at the sparse positions."""
    hidden = int(cfg.width * cfg.mlp_ratio)
    if not cfg.is_sparse(i):
        wide = cfg.matched_ffn and cfg.is_moe_position(i)
        return FFN(cfg.width, round(hidden * cfg.capacity_factor) if wide else hidden)
    shape = dict(dim=cfg.width, hidden=hidden, experts=cfg.experts, capacity_factor=cfg.capacity_factor,
                 group_size=cfg.group_size, infer_capacity_factor=cfg.inference_capacity_factor,
                 infer_group_size=cfg.infer_group)
    if cfg.routing == "ec":
        return ExpertChoiceMoE(**shape)
    return TokenChoiceMoE(**shape, top_k=cfg.top_k, aux_weight=cfg.aux_loss_weight, z_weight=cfg.z_loss_weight,
                          priority=cfg.tc_priority)


class Block(nn.Module):
    """adaLN-Zero DiT block: self-attention, cross-attention to text, then a dense FFN or a sparse MoE."""

    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        d = cfg.width
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(d, cfg.heads, cfg.kv_heads)
        self.cross_attn = CrossAttention(d, cfg.text_width, cfg.heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        if cfg.is_sparse(i):
            self.moe = make_ffn(cfg, i)
        else:
            self.ffn = make_ffn(cfg, i)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    @property
    def mlp(self) -> nn.Module:
        return self.moe if hasattr(self, "moe") else self.ffn

    def forward(self, x, c, y, y_mask):  # x (B, S, d), c (B, d), y (B, L, d_y), y_mask (B, L)
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_sa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_sa, scale_sa))
        x = x + self.cross_attn(x, y, y_mask)  # x' of Eq. 4: what the router sees, after modulation
        x = x + gate_ff.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_ff, scale_ff))
        return x


class FinalLayer(nn.Module):
    """adaLN modulated norm, then a linear map of each token to its patch of output channels."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Velocity model v(x_t, t, text). Dense, EC or TC according to cfg.routing.

    forward(x (B, C, H, W), t (B,), y (B, L, d_y), y_mask (B, L), keep (B, S') | None, drop_text (B,) | None)
    -> (B, C, H, W); with `keep` (MaskDiT training) only the kept patch tokens enter the blocks and the output
    is their (B, S', p²·C) patches; samples flagged in `drop_text` are conditioned on the null text.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.width, cfg.patch_size
        self.x_embedder = nn.Conv2d(cfg.in_channels, d, kernel_size=p, stride=p)
        self.register_buffer("pos_embed", sincos_pos_embed(d, cfg.input_size // p)[None], persistent=False)
        self.t_embedder = TimestepEmbedder(d)
        self.null_text = nn.Parameter(torch.randn(cfg.text_len, cfg.text_dim) / math.sqrt(cfg.text_dim),
                                      requires_grad=cfg.null_text == "learned")
        self.text_refiner = (TextRefiner(cfg.text_dim, d, cfg.heads, cfg.text_refiner, cfg.text_len)
                             if cfg.text_refiner else None)
        self.text_pos = nn.Parameter(torch.zeros(cfg.text_len, cfg.text_dim)) if cfg.text_pos else None  # (L, d_y)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.depth)])
        self.final_layer = FinalLayer(d, p, cfg.in_channels)
        self.hook_t = HookPoint()
        self.hook_keep = HookPoint()
        self.initialize_weights()
        self.hook_points = name_hook_points(self)

    def initialize_weights(self):
        """DiT's init: xavier linears, zero biases; adaLN, the output layer and cross-attn out-proj at zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for lin in self.t_embedder.mlp[0], self.t_embedder.mlp[2]:
            nn.init.normal_(lin.weight, std=0.02)
        for block in self.blocks:
            for lin in block.adaLN_modulation[-1], block.cross_attn.proj:
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        for lin in self.final_layer.adaLN_modulation[-1], self.final_layer.linear:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        if self.cfg.null_text == "zero":
            nn.init.zeros_(self.null_text)

    def starts_as_identity(self) -> set[str]:
        """Weights that start at zero and leave the model's function unchanged, so a checkpoint trained without
        them loads into this model (`ecviz train --init`) and is fine-tuned with them from where it was."""
        return {"text_pos"} if self.text_pos is not None else set()

    def null_like(self, y: torch.Tensor, y_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconditional text in y's shape: the null sequence over all L positions."""
        L = y.shape[1]
        if L > self.cfg.text_len:
            raise ValueError(f"text has {L} tokens, more than the model's text_len {self.cfg.text_len}")
        return self.null_text[:L].to(y.dtype).expand(y.shape[0], -1, -1), torch.ones_like(y_mask)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, S, p²·C), tokens row-major like the position embedding."""
        p, C = self.cfg.patch_size, x.shape[1]
        h, w = x.shape[2] // p, x.shape[3] // p
        return x.reshape(-1, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(-1, h * w, p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, p²·C) -> (B, C, H, W)."""
        p, C = self.cfg.patch_size, self.cfg.in_channels
        h = w = math.isqrt(x.shape[1])
        return x.reshape(-1, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(-1, C, h * p, w * p)

    def forward(self, x, t, y, y_mask, keep=None, drop_text=None):
        dtype = self.x_embedder.weight.dtype  # a model cast to bf16 takes float32 images and text too
        x, y = x.to(dtype), y.to(dtype)
        if drop_text is not None:  # guidance training: these samples see the null text instead of theirs
            y_null, m_null = self.null_like(y, y_mask)
            y = torch.where(drop_text[:, None, None], y_null, y)
            y_mask = torch.where(drop_text[:, None], m_null, y_mask)
        if self.text_pos is not None:  # the null text too: where a token sits is part of what it says
            y = y + self.text_pos[: y.shape[1]].to(y.dtype)
        if self.text_refiner is not None:  # it reads every real token, [CLS] and [SEP] too
            y = self.text_refiner(y, y_mask)  # (B, L, d)
        if self.cfg.text_attend == "words":
            y_mask = inner_tokens(y_mask)
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, S, d)
        if keep is not None:
            x = x.gather(1, self.hook_keep(keep)[..., None].expand(-1, -1, x.shape[-1]))  # (B, S', d)
        c = self.t_embedder(self.hook_t(t))  # (B, d)
        for block in self.blocks:
            x = block(x, c, y, y_mask)
        x = self.final_layer(x, c)  # (B, S, p²·C)
        return x if keep is not None else self.unpatchify(x)

    def moe_layers(self) -> list[nn.Module]:
        """The sparse blocks' MoE layers, in block order (empty for a dense model)."""
        return [b.moe for b in self.blocks if hasattr(b, "moe")]

    def set_inference_group(self, group_size: int) -> None:
        """Route inference in groups of `group_size` tokens: the config is replaced (and so validated: a multiple
        or a divisor of the tokens per image, a capacity that fits) and every MoE layer follows it."""
        if not self.cfg.sparse:
            return
        self.cfg = dataclasses.replace(self.cfg, infer_group_size=group_size)  # raises ValueError if invalid
        for moe in self.moe_layers():
            moe.infer_group_size = group_size

    def set_inference_capacity(self, factor: float) -> None:
        """Give each expert capacity for `factor` slots per token at inference (f_c of Eq. 6: C = group·f_c/E),
        the router and the experts unchanged: below the training f_c an expert-choice model computes less per
        token, above it more (token choice: fewer or more buffer slots). The config is replaced (and so
        validated: a capacity that fits the group) and every MoE layer follows it. A dense model has no experts:
        an EcvizError, not a silent no-op."""
        if not self.cfg.sparse:
            raise EcvizError(f"capacity factor {factor:g}: a dense model has no experts")
        self.cfg = dataclasses.replace(self.cfg, infer_capacity_factor=factor)  # raises ValueError if invalid
        for moe in self.moe_layers():
            moe.infer_capacity_factor = factor

    def aux_loss(self) -> torch.Tensor:
        """Sum of the sparse layers' auxiliary losses from the last forward (0 for EC and dense)."""
        losses = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        return sum(losses, torch.zeros((), device=self.pos_embed.device))


# ---- parameter and FLOP counts ------------------------------------------------------------------------------
def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Total and activated DiT parameters, counted on the meta device (no weights are allocated).

    Activated counts, per sparse layer, f_c experts (EC: the average experts per token) or k (TC) instead of E.
    The frozen text encoder and the latent codec are not counted; the fixed position embedding is a buffer.
    """
    with torch.device("meta"):
        model = DiT(cfg)
    total = sum(p.numel() for p in model.parameters())
    per_token = cfg.capacity_factor if cfg.routing == "ec" else cfg.top_k
    inactive = 0
    for moe in model.moe_layers():
        expert = sum(p.numel() for p in moe.experts.parameters()) // cfg.experts
        inactive += round((cfg.experts - per_token) * expert)
    return {"total": total, "activated": total - inactive}


def count_flops(cfg: ModelConfig, images: int, kept: int | None = None, text_len: int | None = None,
                training: bool = False) -> int:
    """Activated FLOPs (2 per multiply-add, matrix products only) of one forward of `images` images.

    kept: image tokens per image that enter the blocks (MaskDiT training; default all S); text_len: text tokens
    (default cfg.text_len); training: route in the training groups and capacity (default: inference's). A
    sparse layer computes every one of its E·C slots per group (token choice too: dropped assignments leave
    slots empty), plus its router. Element-wise work (norms, softmax, GELU) is not counted.
    """
    d, S, L = cfg.width, cfg.tokens, text_len or cfg.text_len
    n = kept or S  # tokens per image in the blocks
    hd, h, out = d // cfg.heads, int(d * cfg.mlp_ratio), cfg.patch_size**2 * cfg.in_channels
    g, f = (cfg.group_size, cfg.capacity_factor) if training else (cfg.infer_group, cfg.inference_capacity_factor)
    embed = S * out * d + 256 * d + d * d  # patches (all S tokens), timestep MLP
    attn = 2 * n * d * d + 2 * n * d * cfg.kv_heads * hd + 2 * n * n * d  # q, proj; k, v; scores, values
    cross = 2 * n * d * d + 2 * L * cfg.text_width * d + 2 * n * L * d  # q, proj; text k, v; scores, values
    refiner = L * cfg.text_dim * d + cfg.text_refiner * (12 * L * d * d + 2 * L * L * d)  # in map; layers
    refiner = refiner if cfg.text_refiner else 0
    macs = images * (embed + refiner + cfg.depth * (6 * d * d + attn + cross) + 2 * d * d + n * d * out)  # adaLN, final
    for i in range(cfg.depth):
        if cfg.is_sparse(i):
            slots = images * n // g * cfg.experts * capacity(g, f, cfg.experts)  # E·C per group
            macs += images * n * d * cfg.experts + slots * 2 * d * h  # router; the experts' two products
        else:
            wide = cfg.matched_ffn and cfg.is_moe_position(i)
            macs += images * n * 2 * d * (round(h * cfg.capacity_factor) if wide else h)
    return 2 * macs
