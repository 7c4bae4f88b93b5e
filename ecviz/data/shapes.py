"""Synthetic shapes with ground truth: coloured shapes on black, captioned in GenEval's six categories.

Every pixel's object (`masks`) and every caption word's object (`word_object`) are known, so routing can be
checked against them. Images are small (default 32x32) and the shapes big and flat-coloured, so a tiny model
can learn them and `ecviz.shapes_eval` can score generated images programmatically.

`render`, `sample_scene` and `ShapesDataset[i]` are the reference; `ShapesDataset.batch` gives the same items
many at a time, rendered vectorised (`ecviz.data.shapes_fast`) or read from a pre-rendered cache
(`ecviz.data.shapes_cache`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch.utils.data import Dataset

from ecviz.codec import from_uint8
from ecviz.data import collate  # noqa: F401  (re-exported: the DataLoader collate_fn of this data)
from ecviz.errors import EcvizError

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
# Chromaticities far apart (>= 22 degrees in RGB): anti-aliased edges are the colour scaled towards black.
COLORS = {
    "red": (255, 0, 0),
    "orange": (255, 106, 0),
    "yellow": (255, 255, 0),
    "green": (0, 255, 0),
    "cyan": (0, 255, 255),
    "blue": (0, 0, 255),
    "purple": (170, 0, 255),
    "white": (255, 255, 255),
}
BACKGROUND = (0, 0, 0)
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {2: "two", 3: "three", 4: "four"}
MAX_OBJECTS = 4
ALL = -2  # word_object: the word refers to every object ("three squares")
NONE = -1  # word_object: the word refers to no object ("a", "and", "left", "of")

CROSS_ARM = 0.36  # arm width / size
RING_HOLE = 0.5  # inner / outer radius
REF_SIZE = 32  # the sizes and distances below are in pixels at this image size, scaled for others
SIZE_RANGE = {1: (12, 16), 2: (10, 15), 3: (9, 13), 4: (9, 12)}  # object size by number of objects
GAP = 2.0  # min free pixels between two objects' boxes
BORDER = 1.0  # min free pixels between an object's box and the image edge
CUT_JITTER = 0.1  # layout cells: cut at the middle +- this fraction
MIN_SIZE = 3  # px: the smallest object, where a layout cell is smaller than the size drawn
MIN_OFFSET = 6.0  # position: min centroid difference along the relation's axis


@dataclass
class Obj:
    """One shape: `size` is its bounding-box side, (cx, cy) its centroid, in pixels (image spans [0, size])."""

    shape: str
    color: str
    size: int
    cx: float
    cy: float


@dataclass
class Scene:
    """A scene before rendering: what `draw_scene` draws from the generator."""

    objects: list[Obj]  # in caption order, drawn in this order (later on top)
    caption: str
    category: str
    word_object: list[int]
    spec: dict


@dataclass
class ShapesSample:
    image: np.ndarray  # (H, W, 3) uint8
    masks: np.ndarray  # (n, H, W) bool, one per object
    objects: list[Obj]  # in caption order
    caption: str
    category: str
    word_object: list[int]  # per caption.split(" ") word: object index, NONE or ALL
    spec: dict  # GenEval metadata: {"tag", "include": [{"class", "count", "color"?, "position"?}]}


# ---- rendering ---------------------------------------------------------------------------------------------
def extent(obj: Obj) -> tuple[float, float, float, float]:
    """The shape's bounding box (x0, y0, x1, y1); a triangle's centroid sits a third of the way up its box."""
    h = obj.size / 2
    if obj.shape == "triangle":
        return obj.cx - h, obj.cy - 4 * h / 3, obj.cx + h, obj.cy + 2 * h / 3
    return obj.cx - h, obj.cy - h, obj.cx + h, obj.cy + h


def inside(obj: Obj, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Which points (x, y) the shape covers; u, v are box-normalised coordinates in [-1, 1]."""
    x0, y0, x1, y1 = extent(obj)
    u = (x - (x0 + x1) / 2) / (obj.size / 2)
    v = (y - (y0 + y1) / 2) / (obj.size / 2)
    au, av = np.abs(u), np.abs(v)
    if obj.shape == "circle":
        return u * u + v * v <= 1
    if obj.shape == "square":
        return (au <= 1) & (av <= 1)
    if obj.shape == "diamond":
        return au + av <= 1
    if obj.shape == "triangle":  # apex up, base at the bottom of the box
        return (v <= 1) & (au <= (v + 1) / 2)
    if obj.shape == "cross":
        return (au <= 1) & (av <= 1) & ((au <= CROSS_ARM) | (av <= CROSS_ARM))
    if obj.shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1) & (r2 >= RING_HOLE**2)
    raise ValueError(f"unknown shape {obj.shape!r}")


def render(objects: list[Obj], size: int = 32, supersample: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Draw objects in order (later on top), anti-aliased: (image (H, W, 3) uint8, masks (n, H, W) bool).

    A pixel belongs to object i when i is the topmost object on at least half of the pixel's sub-samples.
    """
    s = supersample
    grid = (np.arange(size * s) + 0.5) / s  # sub-sample centres, in pixels
    x, y = grid[None, :], grid[:, None]
    top = np.full((size * s, size * s), -1)  # (Hs, Ws) index of the topmost object
    for i, obj in enumerate(objects):
        top[inside(obj, x, y)] = i
    palette = np.array([*(COLORS[o.color] for o in objects), BACKGROUND], np.float64)  # (n + 1, 3)
    hi = palette[top].reshape(size, s, size, s, 3)  # background is index -1
    image = np.round(hi.mean(axis=(1, 3))).astype(np.uint8)  # (H, W, 3)
    n = len(objects)
    cover = (top == np.arange(n)[:, None, None]).reshape(n, size, s, size, s).mean(axis=(2, 4))  # (n, H, W)
    return image, cover >= 0.5


# ---- captions ----------------------------------------------------------------------------------------------
def article(word: str) -> str:
    """'a' or 'an', as GenEval writes it ("an orange circle")."""
    return "an" if word[0] in "aeiou" else "a"


def plural(shape: str) -> str:
    return shape + "es" if shape.endswith(("s", "x", "sh", "ch")) else shape + "s"


def describe(rng: np.random.Generator, category: str) -> tuple[list[tuple[str, str]], str, list[int], dict]:
    """Draw what a caption says: ([(shape, colour)] in caption order, caption, word_object, spec)."""
    pick = partial(_pick, rng)
    names = list(COLORS)
    if category == "single_object":
        (a,) = pick(SHAPES, 1)
        return [(a, pick(names, 1)[0])], f"a {a}", [0, 0], _spec(category, [a])
    if category == "two_object":
        a, b = pick(SHAPES, 2)
        objs = list(zip((a, b), pick(names, 2), strict=True))
        return objs, f"a {a} and a {b}", [0, 0, NONE, 1, 1], _spec(category, [a, b])
    if category == "counting":
        (a,), n = pick(SHAPES, 1), int(rng.integers(2, MAX_OBJECTS + 1))
        colors = [names[i] for i in rng.integers(len(names), size=n)]
        return [(a, c) for c in colors], f"{NUMBERS[n]} {plural(a)}", [ALL, ALL], _spec(category, [a], count=n)
    if category == "colors":
        (a,), (c,) = pick(SHAPES, 1), pick(names, 1)
        return [(a, c)], f"{article(c)} {c} {a}", [0, 0, 0], _spec(category, [a], [c])
    if category == "position":
        a, b = pick(SHAPES, 2)
        rel = RELATIONS[rng.integers(len(RELATIONS))]
        objs = list(zip((a, b), pick(names, 2), strict=True))
        caption = f"a {a} {rel} a {b}"
        spec = {"tag": category, "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}]}
        return objs, caption, [0, 0, *[NONE] * len(rel.split()), 1, 1], spec
    if category == "color_attr":
        (a, b), (c, d) = pick(SHAPES, 2), pick(names, 2)
        caption = f"{article(c)} {c} {a} and {article(d)} {d} {b}"
        return [(a, c), (b, d)], caption, [0, 0, 0, NONE, 1, 1, 1], _spec(category, [a, b], [c, d])
    raise EcvizError(f"unknown category {category!r}; expected one of {', '.join(CATEGORIES)}")


def all_captions() -> list[str]:
    """Every caption `describe` can write, category by category (1,902 of them): what a table of precomputed
    text embeddings for Shapes training must hold (`ecviz.text.TextTable`)."""
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    colour_pairs = [(c, d) for c in COLORS for d in COLORS if c != d]
    return [
        *(f"a {a}" for a in SHAPES),
        *(f"a {a} and a {b}" for a, b in pairs),
        *(f"{NUMBERS[n]} {plural(a)}" for a in SHAPES for n in NUMBERS),
        *(f"{article(c)} {c} {a}" for a in SHAPES for c in COLORS),
        *(f"a {a} {rel} a {b}" for a, b in pairs for rel in RELATIONS),
        *(f"{article(c)} {c} {a} and {article(d)} {d} {b}" for a, b in pairs for c, d in colour_pairs),
    ]


def _pick(rng: np.random.Generator, options, k: int) -> list:
    """k distinct options, in random order."""
    return [options[i] for i in rng.choice(len(options), k, replace=False)]


def _spec(tag: str, shapes: list[str], colors: list[str] | None = None, count: int = 1) -> dict:
    include = [{"class": s, "count": count} for s in shapes]
    for inc, c in zip(include, colors or [], strict=False):
        inc["color"] = c
    return {"tag": tag, "include": include}


# ---- layout ------------------------------------------------------------------------------------------------
def relation_is_clear(a: Obj, b: Obj, rel: str, min_offset: float) -> bool:
    """`a` is clearly `rel` `b`: along the axis by >= min_offset and by more than along the other axis."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    along, other = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[rel]
    return along >= min_offset and along > abs(other)


def _cells(rng: np.random.Generator, n: int, box: tuple[float, float, float, float]) -> list[tuple]:
    """Split box (x0, y0, x1, y1) into n cells by guillotine cuts across the longer side, near its middle."""
    if n == 1:
        return [box]
    x0, y0, x1, y1 = box
    k = int(rng.integers(n // 2, n - n // 2 + 1))  # objects on the first side
    t = 0.5 + rng.uniform(-CUT_JITTER, CUT_JITTER)
    w, h = x1 - x0, y1 - y0
    if w > h or (w == h and rng.random() < 0.5):
        first, second = (x0, y0, x0 + t * w, y1), (x0 + t * w, y0, x1, y1)
    else:
        first, second = (x0, y0, x1, y0 + t * h), (x0, y0 + t * h, x1, y1)
    return _cells(rng, k, first) + _cells(rng, n - k, second)


def _place(rng: np.random.Generator, shape: str, color: str, size: float, cell: tuple) -> Obj:
    """An object of at most `size` (capped to fit) at a uniform position with its box inside cell."""
    x0, y0, x1, y1 = cell
    obj = Obj(shape, color, max(MIN_SIZE, int(min(size, x1 - x0, y1 - y0))), 0.0, 0.0)
    ex0, ey0, ex1, ey1 = extent(obj)  # relative to the centroid at (0, 0)
    obj.cx = rng.uniform(x0 - ex0, max(x0 - ex0, x1 - ex1))
    obj.cy = rng.uniform(y0 - ey0, max(y0 - ey0, y1 - ey1))
    return obj


def layout(rng: np.random.Generator, parts: list[tuple[str, str]], size: int, rel: str | None = None,
           tries: int = 1000) -> list[Obj]:
    """Sizes and positions for the objects, one per guillotine cell (so boxes stay GAP apart and BORDER inside
    the image); for a position caption, reject-sampled until object 0 is clearly `rel` object 1."""
    scale = size / REF_SIZE
    lo, hi = SIZE_RANGE[len(parts)]
    inset = GAP * scale / 2
    image = (BORDER * scale - inset, BORDER * scale - inset, size - BORDER * scale + inset,
             size - BORDER * scale + inset)
    for _ in range(tries):
        cells = _cells(rng, len(parts), image)
        order = rng.permutation(len(parts))
        objs = []
        for (shape, color), j in zip(parts, order, strict=True):
            x0, y0, x1, y1 = cells[j]
            cell = (x0 + inset, y0 + inset, x1 - inset, y1 - inset)
            objs.append(_place(rng, shape, color, round(rng.integers(lo, hi + 1) * scale), cell))
        if rel is None or relation_is_clear(objs[0], objs[1], rel, MIN_OFFSET * scale):
            return objs
    raise RuntimeError(f"no layout with object 0 {rel} object 1 at size {size} in {tries} tries")


def draw_scene(rng: np.random.Generator, size: int = 32, category: str | None = None) -> Scene:
    """Everything random about a scene, before rendering; the category is drawn uniformly when None."""
    if category is None:
        category = CATEGORIES[rng.integers(len(CATEGORIES))]
    parts, caption, word_object, spec = describe(rng, category)
    rel = spec["include"][1]["position"][0] if category == "position" else None
    return Scene(layout(rng, parts, size, rel), caption, category, word_object, spec)


def sample_scene(rng: np.random.Generator, size: int = 32, category: str | None = None) -> ShapesSample:
    """One captioned scene; the category is drawn uniformly when None. The caption names every object."""
    sc = draw_scene(rng, size, category)
    image, masks = render(sc.objects, size)
    return ShapesSample(image, masks, sc.objects, sc.caption, sc.category, sc.word_object, sc.spec)


# ---- dataset -----------------------------------------------------------------------------------------------
MIN_IMAGE_SIZE = 8  # px: below it a layout with one shape clearly beside another may not exist


class ShapesDataset(Dataset):
    """Map-style: item i comes from np.random.default_rng([seed, i]), so it does not depend on order or workers.

    Items: {"image": (3, H, W) float32 in [-1, 1], "caption", "category", "masks": (4, H, W) bool zero-padded,
    "n_objects": int, "word_object": list[int]}.
    """

    procedural = True  # every index is an independent fresh scene: a trainer need not shuffle
    cache = None  # a ShapesCache of this stream (see `use_cache`): `batch` reads the items it holds

    def __init__(self, length: int = 100_000, size: int = 32, seed: int = 0, categories: list[str] | None = None):
        bad = sorted(set(categories or ()) - set(CATEGORIES))
        if bad:
            raise EcvizError(f"unknown categories {bad}; expected some of {', '.join(CATEGORIES)}")
        if size < MIN_IMAGE_SIZE:
            raise EcvizError(f"Shapes images of {size} px: at least {MIN_IMAGE_SIZE} px are needed to draw two shapes "
                             "apart (the model's input_size, or its latent grid times the codec's downsampling)")
        self.length, self.size, self.seed = length, size, seed
        self.categories = tuple(categories) if categories else CATEGORIES

    def __len__(self) -> int:
        return self.length

    def scene(self, i: int) -> Scene:
        """Item i before rendering: its objects, caption and ground truth, from np.random.default_rng([seed, i])."""
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for ShapesDataset of length {self.length}")
        rng = np.random.default_rng([self.seed, i])
        category = self.categories[rng.integers(len(self.categories))]
        return draw_scene(rng, self.size, category)

    def sample(self, i: int) -> ShapesSample:
        """The full ground truth of item i (objects, spec) as numpy."""
        sc = self.scene(i)
        image, masks = render(sc.objects, self.size)
        return ShapesSample(image, masks, sc.objects, sc.caption, sc.category, sc.word_object, sc.spec)

    def use_cache(self, cache) -> None:
        """Let `batch` read items from `cache` (an `ecviz.data.shapes_cache.ShapesCache` of this very stream)."""
        if (cache.seed, cache.size, cache.categories) != (self.seed, self.size, self.categories):
            raise EcvizError(f"shapes cache of seed {cache.seed}, size {cache.size}, categories "
                             f"{list(cache.categories)} used for seed {self.seed}, size {self.size}, categories "
                             f"{list(self.categories)}")
        self.cache = cache

    def batch(self, indices, fields=("image", "caption", "category", "masks", "n_objects", "word_object")) -> dict:
        """Items `indices`, collated: exactly `collate([self[i] for i in indices])` (its `fields` only), but
        from the cache where it holds them and otherwise rendered by `shapes_fast.render_batch`."""
        from ecviz.data.shapes_fast import interleave, scene_items

        idx = np.asarray(indices, np.int64).reshape(-1)
        if len(idx) and not (0 <= idx.min() and idx.max() < self.length):
            raise IndexError(f"index {idx.max() if idx.max() >= self.length else idx.min()} out of range for "
                             f"ShapesDataset of length {self.length}")
        cached = self.cache.has(idx) if self.cache is not None else np.zeros(len(idx), bool)
        parts = []
        if cached.any():
            parts.append((np.flatnonzero(cached), self.cache.items(idx[cached], fields)))
        if not cached.all() or not len(idx):
            fresh = [self.scene(int(i)) for i in idx[~cached]]
            parts.append((np.flatnonzero(~cached), scene_items(fresh, self.size, fields)))
        return interleave(parts, len(idx))

    def __getitem__(self, i: int) -> dict:
        s = self.sample(int(i))
        masks = np.zeros((MAX_OBJECTS, self.size, self.size), bool)  # (4, H, W)
        masks[: len(s.objects)] = s.masks
        image = from_uint8(s.image[None])[0]  # (3, H, W) in [-1, 1]
        return {"image": image, "caption": s.caption, "category": s.category, "masks": torch.from_numpy(masks),
                "n_objects": len(s.objects), "word_object": s.word_object}



def shapes_prompts(n_per_category: int = 8, seed: int = 1234) -> list[dict]:
    """Deterministic GenEval-style prompt rows {"tag", "include", "prompt"}, no duplicates: n per category, or
    all there are where a category has fewer (single_object has one per shape)."""
    rng = np.random.default_rng(seed)
    rows = []
    for category in CATEGORIES:
        seen: set[str] = set()
        for _ in range(200 * n_per_category):
            if len(seen) == n_per_category:
                break
            _, caption, _, spec = describe(rng, category)
            if caption not in seen:
                seen.add(caption)
                rows.append({**spec, "prompt": caption})
    return rows


def eval_prompts(n_per_category: int = 48, seed: int = 2026) -> list[dict]:
    """The evaluation prompt set: n GenEval-style rows per category, drawn with their own seed (not the
    bundled demo set's), distinct where the category has that many captions; categories with fewer (single
    objects: one per shape) repeat theirs in turn, so every category gets n rows (each row's images get their
    own seeds when sampled)."""
    rows = []
    for category in CATEGORIES:
        rng = np.random.default_rng([seed, CATEGORIES.index(category)])
        distinct: dict[str, dict] = {}
        for _ in range(500 * n_per_category):
            if len(distinct) == n_per_category:
                break
            _, caption, _, spec = describe(rng, category)
            distinct.setdefault(caption, {**spec, "prompt": caption})
        found = list(distinct.values())
        rows += [found[i % len(found)] for i in range(n_per_category)]
    return rows
