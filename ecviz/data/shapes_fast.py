"""Shapes items by the batch: the reference renderer's output, vectorised over every object of a batch.

`ecviz.data.shapes.render` draws one scene on a full (H·s, W·s) sub-sample grid and is kept as the oracle.
`render_batch` computes the same images and masks bit for bit (tests compare them on hundreds of items) but
evaluates each shape only on a pixel-aligned window around its bounding box, for all objects of a batch at
once, and counts coverage per pixel with integer sums: a pixel's colour is round(Σ_i n_i·colour_i / s²) with
n_i its sub-samples topmost-covered by object i (exactly the reference's float64 mean, since the sum is exact),
and object i's mask is n_i / s² >= 0.5.

What stays per item is drawing the scene (`ShapesDataset.scene`: a fresh generator per item and a few dozen
small draws), so an uncached batch costs about that; `ecviz.data.shapes_cache` stores items so that training
need not pay it at all.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from ecviz.data.shapes import (
    BACKGROUND,
    COLORS,
    CROSS_ARM,
    MAX_OBJECTS,
    RING_HOLE,
    SHAPES,
    Obj,
    Scene,
)

FIELDS = ("image", "caption", "category", "masks", "n_objects", "word_object")


def to_float(images: np.ndarray) -> torch.Tensor:
    """`codec.from_uint8` in numpy, bit for bit ((B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]): a
    loader thread then never competes with the training step for torch's intra-op threads."""
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.float32)
    x /= np.float32(127.5)
    x -= np.float32(1)
    return torch.from_numpy(x)


def _inside(shape: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """`shapes.inside` for many objects: shape (M,) index into SHAPES, u (M, 1, W), v (M, W, 1) -> (M, W, W)."""
    out = np.zeros(np.broadcast_shapes(u.shape, v.shape), bool)
    for k, name in enumerate(SHAPES):
        m = np.flatnonzero(shape == k)
        if not len(m):
            continue
        uk, vk = u[m], v[m]
        au, av = np.abs(uk), np.abs(vk)
        if name == "circle":
            hit = uk * uk + vk * vk <= 1
        elif name == "square":
            hit = (au <= 1) & (av <= 1)
        elif name == "diamond":
            hit = au + av <= 1
        elif name == "triangle":
            hit = (vk <= 1) & (au <= (vk + 1) / 2)
        elif name == "cross":
            hit = (au <= 1) & (av <= 1) & ((au <= CROSS_ARM) | (av <= CROSS_ARM))
        else:  # ring
            r2 = uk * uk + vk * vk
            hit = (r2 <= 1) & (r2 >= RING_HOLE**2)
        out[m] = hit
    return out


def render_batch(scenes: list[list[Obj]], size: int = 32, supersample: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """`shapes.render` of every scene: (images (B, H, W, 3) uint8, masks (B, MAX_OBJECTS, H, W) bool,
    zero-padded past each scene's objects). Scenes hold at most MAX_OBJECTS objects."""
    s, B = supersample, len(scenes)
    if not 1 <= s * s <= 255:  # sub-samples per pixel are counted in uint8
        raise ValueError(f"supersample {s}: render_batch counts s*s sub-samples per pixel in uint8 (1 <= s <= 15)")
    if any(len(sc) > MAX_OBJECTS for sc in scenes):
        raise ValueError(f"render_batch draws at most {MAX_OBJECTS} objects per scene")
    objs = [(b, j, o) for b, sc in enumerate(scenes) for j, o in enumerate(sc)]
    counts = np.zeros((B, MAX_OBJECTS, size, size), np.uint8)  # (B, n, H, W) topmost sub-samples per object
    if objs:
        item = np.array([b for b, _, _ in objs])  # (M,)
        slot = np.array([j for _, j, _ in objs])  # (M,) drawing order within the scene
        shape = np.array([SHAPES.index(o.shape) for _, _, o in objs])
        side = np.array([o.size for _, _, o in objs])
        cx = np.array([o.cx for _, _, o in objs], np.float64)
        cy = np.array([o.cy for _, _, o in objs], np.float64)
        # shapes.extent, operation for operation (so every float matches)
        h = side / 2
        tri = shape == SHAPES.index("triangle")
        x0, x1 = cx - h, cx + h
        y0 = np.where(tri, cy - 4 * h / 3, cy - h)
        y1 = np.where(tri, cy + 2 * h / 3, cy + h)
        # a window of P = side + 1 pixels from floor(x0) holds the box: sub-samples outside it lie >= 1/(2s)
        # pixel outside the box, where no shape reaches
        P = np.minimum(side + 1, size)  # (M,)
        px = np.clip(np.floor(x0).astype(np.int64), 0, size - P)  # (M,) the window's first pixel
        py = np.clip(np.floor(y0).astype(np.int64), 0, size - P)
        top = np.full((B, size * s, size * s), -1, np.int8)  # (B, Hs, Ws) topmost object
        groups = []  # objects by window size: (members, window, covered sub-samples (m, Ps, Ps))
        for p in np.unique(P):
            m = np.flatnonzero(P == p)
            sub = np.arange(p * s)  # (Ps,)
            gx = ((px[m, None] * s + sub) + 0.5) / s  # (m, Ps) sub-sample centres, as shapes.render's grid
            gy = ((py[m, None] * s + sub) + 0.5) / s
            u = ((gx - ((x0[m] + x1[m]) / 2)[:, None]) / h[m, None])[:, None, :]  # (m, 1, Ps)
            v = ((gy - ((y0[m] + y1[m]) / 2)[:, None]) / h[m, None])[:, :, None]  # (m, Ps, 1)
            groups.append((m, int(p) * s, _inside(shape[m], u, v)))
        windows = {w: sliding_window_view(top, (w, w), axis=(1, 2), writeable=True) for w in {g[1] for g in groups}}
        for j in range(MAX_OBJECTS):  # later objects on top; a slot holds one object per scene: no clashes
            for m, w, hit in groups:
                sel = slot[m] == j
                if sel.any():
                    at = (item[m][sel], py[m][sel] * s, px[m][sel] * s)
                    windows[w][at] = np.where(hit[sel], np.int8(j), windows[w][at])  # (k, Ps, Ps)
        for m, w, _ in groups:  # every sub-sample an object ends up topmost on lies in its window
            mine = (windows[w][item[m], py[m] * s, px[m] * s] == slot[m, None, None]).view(np.uint8)  # (m, Ps, Ps)
            mine = mine.reshape(len(m), w // s, s, w // s, s)
            n = sum(mine[:, :, a, :, b] for a in range(s) for b in range(s))  # (m, P, P) sub-samples per pixel
            view = sliding_window_view(counts, (w // s, w // s), axis=(2, 3), writeable=True)
            view[item[m], slot[m], py[m], px[m]] = n
    palette = np.zeros((B, MAX_OBJECTS, 3), np.int32)  # (B, n, 3) each object's colour
    for b, j, o in objs:
        palette[b, j] = COLORS[o.color]
    n = counts.reshape(B, MAX_OBJECTS, size * size, 1).astype(np.int32)  # (B, n, H·W, 1)
    # the exact integer sum of the s² sub-samples' colours, then the reference's float64 mean and rounding
    total = (s * s - n.sum(1)) * np.array(BACKGROUND, np.int32)  # (B, H·W, 3) background
    for j in range(MAX_OBJECTS):
        total += n[:, j] * palette[:, j, None, :]
    images = np.round(total / (s * s)).astype(np.uint8).reshape(B, size, size, 3)
    return images, 2 * counts.astype(np.int32) >= s * s  # n/s² >= 0.5, exactly


def scene_items(scenes: list[Scene], size: int, fields=FIELDS) -> dict:
    """Collated items of drawn scenes, as `collate([ShapesDataset[i] ...])` gives them (only `fields`)."""
    out = {}
    if {"image", "masks"} & set(fields):
        images, masks = render_batch([sc.objects for sc in scenes], size)
        if "image" in fields:
            out["image"] = to_float(images)  # (B, 3, H, W) in [-1, 1]
        if "masks" in fields:
            out["masks"] = torch.from_numpy(masks)  # (B, 4, H, W)
    if "caption" in fields:
        out["caption"] = [sc.caption for sc in scenes]
    if "category" in fields:
        out["category"] = [sc.category for sc in scenes]
    if "n_objects" in fields:
        out["n_objects"] = torch.tensor([len(sc.objects) for sc in scenes])
    if "word_object" in fields:
        out["word_object"] = [list(sc.word_object) for sc in scenes]
    return out


def interleave(parts: list[tuple[np.ndarray, dict]], n: int) -> dict:
    """One collated batch of n items from parts (positions (b,), collated items at those positions)."""
    nonempty = [(at, items) for at, items in parts if len(at)]
    if len(nonempty) <= 1:
        return (nonempty or parts)[0][1]
    parts = nonempty
    out = {}
    for key, first in parts[0][1].items():
        if isinstance(first, torch.Tensor):
            out[key] = first.new_empty((n, *first.shape[1:]))
            for at, items in parts:
                out[key][torch.from_numpy(at)] = items[key]
        else:
            values = [None] * n
            for at, items in parts:
                for i, v in zip(at, items[key], strict=True):
                    values[i] = v
            out[key] = values
    return out
