"""Pretrained parts used as they are (the text encoder, the latent codec): one base class that holds them
frozen, so that neither an optimizer nor a parent's `.train()` can change what they compute."""

from __future__ import annotations

from torch import nn


class Frozen(nn.Module):
    """A module without gradients that stays in eval mode (dropout off) whatever a parent asks."""

    def freeze(self) -> None:
        """Call once the weights are loaded."""
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Frozen:
        return super().train(False)
