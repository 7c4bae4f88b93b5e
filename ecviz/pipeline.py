"""Text to image with a checkpoint: frozen text encoder + DiT + rectified-flow sampler + latent codec."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ecviz.codec import LatentCodec, load_codec, to_uint8
from ecviz.flow import Step, euler_sample, noise_for, sample_seed
from ecviz.model import DiT
from ecviz.text import TextBatch, TextEncoder, load_text_encoder


def pad_text(emb: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad (B, L, d_y) embeddings and their mask to a fixed length, so every batch has one shape."""
    extra = length - emb.shape[1]
    if extra < 0:
        raise ValueError(f"text has {emb.shape[1]} tokens, more than {length}")
    return torch.nn.functional.pad(emb, (0, 0, 0, extra)), torch.nn.functional.pad(mask, (0, extra))


def sample_batches(n: int, batch_size: int, per_group: int) -> list[np.ndarray]:
    """Sample indices 0..n-1 in batches of consecutive samples, each a whole number of routing groups of
    `per_group` images (batch_size rounded up); the last is padded with -1 fillers. Expert choice mixes a
    group's images, so sample i's image depends on this layout: `ecviz trace` and `ecviz eval` share it."""
    size = -(-batch_size // per_group) * per_group
    out = []
    for start in range(0, n, size):
        idx = np.arange(start, min(start + size, n))
        out.append(np.concatenate([idx, np.full(-len(idx) % per_group, -1)]))
    return out


def batch_seeds(batch: np.ndarray, seed: int, n: int) -> list[int]:
    """Noise seeds of a batch from `sample_batches`: sample i's is sample_seed(seed, i), the k-th slot's
    filler gets sample_seed(seed, n + k), a seed no sample uses."""
    return [sample_seed(seed, int(i)) if i >= 0 else sample_seed(seed, n + k) for k, i in enumerate(batch)]


@dataclass
class Pipeline:
    model: DiT
    text: TextEncoder
    codec: LatentCodec

    @classmethod
    def from_model(cls, model: DiT) -> Pipeline:
        cfg = model.cfg
        text = load_text_encoder(cfg.text_encoder, cfg.text_len)
        if text.dim != cfg.text_dim:
            raise ValueError(f"text encoder {cfg.text_encoder!r} gives {text.dim}-d embeddings, "
                             f"the model expects text_dim {cfg.text_dim}")
        return cls(model, text, load_codec(cfg.codec))

    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, TextBatch]:
        """(y (B, text_len, d_y), mask (B, text_len), the TextBatch with token strings)."""
        batch = self.text.encode(prompts)
        y, mask = pad_text(batch.emb, batch.mask, self.model.cfg.text_len)
        device = next(self.model.parameters()).device
        return y.to(device), mask.to(device), batch

    def generate(self, prompts: list[str], seeds: list[int], steps: int = 25, cfg: float = 1.0,
                 callback: Callable[[Step], None] | None = None) -> np.ndarray:
        """Images (B, H, W, 3) uint8, one per prompt; sample i's noise comes from seeds[i] alone."""
        y, mask, _ = self.encode_text(prompts)
        return self.sample(y, mask, seeds, steps, cfg, callback)

    def sample(self, y: torch.Tensor, mask: torch.Tensor, seeds: list[int], steps: int = 25, cfg: float = 1.0,
               callback: Callable[[Step], None] | None = None) -> np.ndarray:
        """Images (B, H, W, 3) uint8 from encoded text (see encode_text)."""
        c = self.model.cfg
        noise = noise_for(seeds, (c.in_channels, c.input_size, c.input_size)).to(y.device)
        latents = euler_sample(self.model, noise, y, mask, steps=steps, cfg=cfg, callback=callback)
        return to_uint8(self.codec.decode(latents))

    @property
    def image_size(self) -> int:
        return self.model.cfg.input_size * self.codec.downsample
