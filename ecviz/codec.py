"""Latent codecs: map images in [-1, 1] to the space the diffusion model works in, and back.

`"pixel"` is the identity (small presets train on pixels); `"vae:<dir>"` a frozen diffusers AutoencoderKL.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ecviz.errors import EcvizError
from ecviz.frozen import Frozen


class LatentCodec(Frozen):
    """Base class: encode images (B, 3, H, W) in [-1, 1] to latents (B, C, H/f, W/f), decode them back."""

    name: str  # spec string: "pixel" or "vae:<dir>"
    channels: int  # latent channels C
    downsample: int  # spatial factor f, image -> latent

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError



class PixelCodec(LatentCodec):
    """Identity codec: the model sees the pixels themselves."""

    name = "pixel"
    channels = 3
    downsample = 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images  # (B, 3, H, W)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)  # (B, 3, H, W)


class VAECodec(LatentCodec):
    """A frozen diffusers AutoencoderKL from a local directory; latents use its scaling/shift factors."""

    def __init__(self, path: str | Path, name: str | None = None):
        super().__init__()
        path = Path(path).expanduser()
        self.name = name or f"vae:{path}"
        try:
            from diffusers import AutoencoderKL
        except ImportError as e:
            raise EcvizError(
                f"latent codec {self.name!r} needs the optional extra: pip install 'ecviz[vae]'"
            ) from e
        if not path.is_dir():
            raise EcvizError(f"latent codec {self.name!r}: directory not found")
        try:
            self.vae = AutoencoderKL.from_pretrained(path, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise EcvizError(f"latent codec {self.name!r}: cannot load an AutoencoderKL from {path} (its weights must "
                             "be safetensors)") from e
        self.freeze()
        config = self.vae.config
        self.channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.scale = float(config.scaling_factor)
        self.shift = float(getattr(config, "shift_factor", None) or 0.0)

    def _dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Posterior mean (deterministic), shifted and scaled to roughly unit variance."""
        z = self.vae.encode(images.to(self._dtype())).latent_dist.mean  # (B, C, H/f, W/f)
        return ((z - self.shift) * self.scale).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self._dtype()) / self.scale + self.shift  # (B, C, H/f, W/f)
        return self.vae.decode(z).sample.float().clamp(-1, 1)  # (B, 3, H, W)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [-1, 1] -> (B, H, W, 3) uint8, rounded to nearest."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]; exact inverse of `to_uint8` on uint8 data."""
    return torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def load_codec(spec: str = "pixel") -> LatentCodec:
    """Build the codec named by `spec`: "pixel" or "vae:<dir>"."""
    if spec == "pixel":
        return PixelCodec()
    if spec.startswith("vae:") and spec[4:]:
        return VAECodec(spec[4:], name=spec)
    raise EcvizError(f"latent codec {spec!r}: unknown spec (use 'pixel' or 'vae:<directory>')")
