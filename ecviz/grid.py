"""The patch-token grid: which pixels each image token covers. Plain numpy, shared by probes and analyses."""

from __future__ import annotations

import numpy as np


def patch_coverage(fg: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(N, rows·cols) float32: the fraction of each token's patch where the mask fg (N, H, W) is set."""
    n, h, w = fg.shape
    return fg.reshape(n, rows, h // rows, cols, w // cols).mean(axis=(2, 4)).reshape(n, -1).astype(np.float32)
