"""ShapesEval: GenEval's six checks, done programmatically on images of the synthetic shapes set.

`detect` segments an image by colour (each pixel's nearest palette chromaticity: on a black background an
anti-aliased edge is the colour scaled down), takes connected components per colour and names each one's shape
from a few geometric features. `score` applies GenEval's rules to the detections; `evaluate` averages them
per category, and overall as the mean of the categories (as GenEval does).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import product

import numpy as np
from scipy import ndimage

import ecviz.defaults as D
from ecviz.data.shapes import CATEGORIES, COLORS, NUMBERS, RELATIONS, SHAPES, plural
from ecviz.errors import EcvizError

REF_SIZE = 32  # pixel thresholds below are for 32x32 images, scaled by area or side for others
RELIABLE_SIZE = 28  # px: below it the shape features stop scaling (a 6-px diamond's profile reads as a cross);
# the data set's own images score 51-85% per category at 16 px, 95-100% at 24 px, 100% from 28 px up
MIN_ALPHA = 0.47  # a pixel is an object's when it is at least about half the colour's brightness ...
MAX_ANGLE = 20.0  # ... and within this many degrees of its chromaticity
MIN_AREA = 12  # px: smaller components are noise
MAX_ASPECT = 1.5  # every shape's box is square: components much wider than tall (or taller) are not shapes
POS_MARGIN = 3.0  # px: min centroid difference for a spatial relation

PALETTE_NAMES = tuple(COLORS)
PALETTE = np.array([COLORS[c] for c in PALETTE_NAMES], np.float64)  # (K, 3)


@dataclass
class Detection:
    shape: str | None  # one of SHAPES, or None for a blob that looks like none of them
    color: str
    cx: float  # centroid, pixels (pixel (0, 0) spans [0, 1]^2, as in ecviz.data.shapes)
    cy: float
    area: int  # pixels
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    mask: np.ndarray | None = field(default=None, repr=False, compare=False)  # (H, W) bool: its pixels


# ---- segmentation ------------------------------------------------------------------------------------------
def segment(image: np.ndarray) -> np.ndarray:
    """Per pixel, the index into PALETTE_NAMES of its colour, or -1 for background: (H, W) int."""
    rgb = image.astype(np.float64).reshape(-1, 3)  # (P, 3)
    norm = np.linalg.norm(PALETTE, axis=1)  # (K,)
    along = rgb @ PALETTE.T / norm  # (P, K) length along each colour's ray
    off2 = np.maximum((rgb**2).sum(1, keepdims=True) - along**2, 0)  # (P, K) squared distance from the ray
    k = off2.argmin(1)
    rows = np.arange(len(rgb))
    alpha = along[rows, k] / norm[k]
    angle = np.degrees(np.arctan2(np.sqrt(off2[rows, k]), np.maximum(along[rows, k], 1e-9)))
    keep = (alpha >= MIN_ALPHA) & (angle <= MAX_ANGLE)
    return np.where(keep, k, -1).reshape(image.shape[:2])


def label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a bool mask: (labels (H, W) int, 1..n; 0 outside, n)."""
    labels, n = ndimage.label(mask)
    return labels, int(n)


# ---- shape features ----------------------------------------------------------------------------------------
def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every background region that does not reach the border filled in."""
    padded = np.pad(~mask, 1, constant_values=True)
    labels, _ = label(padded)
    return (labels != labels[0, 0])[1:-1, 1:-1]


def _kurtosis(t: np.ndarray) -> float:
    return float((t**4).mean() / max((t**2).mean() ** 2, 1e-12))


def axiality(mask: np.ndarray) -> float:
    """How much more the mass spreads along the axes than along the diagonals (kurtosis difference):
    ~0.6 for a diamond, ~0.7 for a cross, ~0 for a circle or triangle, ~-0.6 for a square."""
    ys, xs = np.nonzero(mask)
    x, y = xs - xs.mean(), ys - ys.mean()
    u, v = (x + y) / np.sqrt(2), (x - y) / np.sqrt(2)
    return (_kurtosis(x) + _kurtosis(y) - _kurtosis(u) - _kurtosis(v)) / 2


def step(mask: np.ndarray) -> float:
    """The largest change in width between neighbouring rows (and in height between neighbouring columns),
    ends excluded, as a fraction of the box: a cross steps from arm to bar (~0.6), other shapes by <= 0.25."""
    rows, cols = mask.sum(1) / mask.shape[1], mask.sum(0) / mask.shape[0]
    return min(_inner_step(rows), _inner_step(cols))


def _inner_step(profile: np.ndarray) -> float:
    return float(np.abs(np.diff(profile[1:-1])).max()) if len(profile) > 3 else 0.0


def features(mask: np.ndarray) -> dict[str, float]:
    """Shape features of one component cropped to its box (see classify)."""
    h, w = mask.shape
    filled = fill_holes(mask)
    ys, _ = np.nonzero(filled)
    return {
        "hole": 1 - mask.sum() / filled.sum(),  # ring: ~0.25
        "fill": filled.sum() / (h * w),  # square 1, circle ~0.78, cross ~0.6, triangle and diamond ~0.55
        "aspect": max(h, w) / min(h, w),  # every shape's box is square
        "drop": (ys.mean() + 0.5 - h / 2) / h,  # centroid below the box centre: triangle ~1/6, others ~0
        "axiality": axiality(filled),
        "step": step(filled),
    }


def classify(mask: np.ndarray) -> str | None:
    """The shape of one component cropped to its box, or None when it looks like none of SHAPES."""
    f = features(mask)
    fill, ax = f["fill"], f["axiality"]
    if f["aspect"] > MAX_ASPECT or fill < 0.4:
        return None
    if f["hole"] > 0.08:
        return "ring" if f["hole"] < 0.5 and fill > 0.6 and abs(ax) < 0.35 else None
    if f["step"] > 0.33:
        return "cross" if fill < 0.8 and ax > 0.3 else None
    if f["drop"] > 0.08:
        return "triangle" if fill < 0.75 else None
    if fill > 0.85 and ax < -0.3:
        return "square"
    if fill < 0.75 and ax > 0.35:
        return "diamond"
    if fill > 0.6 and abs(ax) < 0.35:
        return "circle"
    return None


# ---- detection ---------------------------------------------------------------------------------------------
def detect(image: np.ndarray) -> list[Detection]:
    """Objects in an (H, W, 3) uint8 image: one per connected same-colour component of at least MIN_AREA
    (scaled with the image area) pixels."""
    h, w = image.shape[:2]
    min_area = max(3, round(MIN_AREA * h * w / REF_SIZE**2))
    colors = segment(image)
    out = []
    for k, name in enumerate(PALETTE_NAMES):
        labels, n = label(colors == k)
        for i, sl in enumerate(_boxes(labels, n), start=1):
            crop = labels[sl] == i
            area = int(crop.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(crop)
            y0, x0 = sl[0].start, sl[1].start
            full = np.zeros((h, w), bool)
            full[sl] = crop
            out.append(Detection(classify(crop), name, float(xs.mean() + x0 + 0.5), float(ys.mean() + y0 + 0.5),
                                 area, (x0, y0, sl[1].stop, sl[0].stop), full))
    return out


def _boxes(labels: np.ndarray, n: int) -> list[tuple[slice, slice]]:
    """The bounding-box slices of labels 1..n."""
    return ndimage.find_objects(labels, n)


# ---- captions ----------------------------------------------------------------------------------------------
_SHAPE = "|".join(SHAPES)
_PLURAL = "|".join(plural(s) for s in SHAPES)
_COLOR = "|".join(COLORS)
_REL = "|".join(RELATIONS)
_A = "an?"
PATTERNS = {
    "single_object": rf"{_A} (?P<a>{_SHAPE})",
    "two_object": rf"{_A} (?P<a>{_SHAPE}) and {_A} (?P<b>{_SHAPE})",
    "counting": rf"(?P<n>{'|'.join(NUMBERS.values())}) (?P<a>{_PLURAL})",
    "colors": rf"{_A} (?P<c>{_COLOR}) (?P<a>{_SHAPE})",
    "position": rf"{_A} (?P<a>{_SHAPE}) (?P<rel>{_REL}) {_A} (?P<b>{_SHAPE})",
    "color_attr": rf"{_A} (?P<c>{_COLOR}) (?P<a>{_SHAPE}) and {_A} (?P<d>{_COLOR}) (?P<b>{_SHAPE})",
}


def parse_caption(caption: str) -> dict:
    """The GenEval spec of a caption written by the shapes templates; ValueError for any other caption."""
    text = " ".join(caption.lower().split())
    for tag, pattern in PATTERNS.items():
        m = re.fullmatch(pattern, text)
        if m:
            return _spec_of(tag, m.groupdict())
    raise EcvizError(f"not a shapes caption: {caption!r}")


WORD_NONE, WORD_ALL = -1, -2  # word_objects: a word naming no object ("and", "left"), or every object


def word_objects(caption: str) -> tuple[list[int], list[dict]]:
    """For a Shapes caption: per word of caption.split(), the object it names (index in caption order, WORD_NONE or
    WORD_ALL), and the objects in caption order ({"class", "count", "color"?}). ValueError for other captions.
    The same map `ecviz.data.shapes` draws with each caption (articles belong to their object)."""
    text = " ".join(caption.lower().split())
    tag, m = next(((tag, m) for tag, pattern in PATTERNS.items() if (m := re.fullmatch(pattern, text))),
                  (None, None))
    if m is None:
        raise EcvizError(f"not a shapes caption: {caption!r}")
    g, spec = m.groupdict(), _spec_of(tag, m.groupdict())
    if tag == "single_object":
        return [0, 0], spec["include"]
    if tag == "two_object":
        return [0, 0, WORD_NONE, 1, 1], spec["include"]
    if tag == "counting":
        return [WORD_ALL, WORD_ALL], spec["include"]
    if tag == "colors":
        return [0, 0, 0], spec["include"]
    if tag == "position":
        a, b = spec["include"][1], spec["include"][0]
        return [0, 0, *[WORD_NONE] * len(g["rel"].split()), 1, 1], [{k: v for k, v in a.items() if k != "position"},
                                                                   b]
    return [0, 0, 0, WORD_NONE, 1, 1, 1], spec["include"]


def object_regions(dets: list[Detection], objects: list[dict], shape: tuple[int, int]) -> list[np.ndarray]:
    """Per caption object, the pixels of the detection that drew it: the largest detection of its class (and
    colour, where the caption gives one); for a counted class, all of them. Empty where nothing matches."""
    out = []
    for obj in objects:
        found = [d for d in dets if d.shape == obj["class"] and obj.get("color", d.color) == d.color]
        region = np.zeros(shape, bool)
        if obj["count"] > 1:
            for d in found:
                region |= d.mask
        elif found:
            region = max(found, key=lambda d: d.area).mask.copy()
        out.append(region)
    return out


def _one(shape: str, color: str | None = None) -> dict:
    return {"class": shape, "count": 1, **({"color": color} if color else {})}


def _spec_of(tag: str, g: dict) -> dict:
    if tag == "counting":
        n = {v: k for k, v in NUMBERS.items()}[g["n"]]
        include = [{"class": next(s for s in SHAPES if plural(s) == g["a"]), "count": n}]
    elif tag == "position":
        include = [_one(g["b"]), {**_one(g["a"]), "position": [g["rel"], 0]}]
    else:
        include = [_one(g["a"], g.get("c"))] + ([_one(g["b"], g.get("d"))] if "b" in g else [])
    return {"tag": tag, "include": include}


# ---- scoring -----------------------------------------------------------------------------------------------
def geneval_relation_holds(a: Detection, b: Detection, rel: str, margin: float) -> bool:
    """GenEval's test on centroids: a is `rel` b when the offset points within 60 degrees of that direction,
    and is at least `margin` along it."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    along = {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[rel]
    return along >= margin and 2 * along > np.hypot(dx, dy)


def score(image: np.ndarray, spec_or_caption: dict | str, detections: list[Detection] | None = None) -> bool:
    """Whether an (H, W, 3) uint8 image shows what the spec (or caption) asks, by GenEval's rules.

    counting: exactly `count` objects of the class; otherwise each include needs `count` objects of its own (1
    unless given) with the class (and colour), and the chosen objects must satisfy every position (each of an
    include's objects against the first of the include it is relative to).
    """
    spec = parse_caption(spec_or_caption) if isinstance(spec_or_caption, str) else spec_or_caption
    dets = detect(image) if detections is None else detections
    includes = spec["include"]
    found = [[d for d in dets if d.shape == inc["class"] and inc.get("color", d.color) == d.color]
             for inc in includes]
    if spec["tag"] == "counting":
        return all(len(f) == inc["count"] for f, inc in zip(found, includes, strict=True))
    margin = POS_MARGIN * image.shape[1] / REF_SIZE
    slots = [k for k, inc in enumerate(includes) for _ in range(int(inc.get("count", 1)))]  # an object each
    if any(len(found[k]) < slots.count(k) for k in set(slots)):
        return False
    first = {k: slots.index(k) for k in set(slots)}
    for chosen in product(*(found[k] for k in slots)):
        if len({id(d) for d in chosen}) < len(chosen):
            continue
        if all(geneval_relation_holds(chosen[i], chosen[first[includes[k]["position"][1]]],
                                      includes[k]["position"][0], margin)
               for i, k in enumerate(slots) if "position" in includes[k]):
            return True
    return False


# ---- why two-object prompts fail ----------------------------------------------------------------------------
OUTCOMES = {  # per category with two named objects, the outcomes `diagnose` counts (each image has exactly one)
    "two_object": ("no_shape", "one_shape", "right"),
    "position": ("no_shape", "one_shape", "right", "reversed", "neither"),
    "color_attr": ("no_shape", "one_shape", "right", "swapped", "partly", "neither"),
}


def diagnosable(spec: dict) -> bool:
    """Whether `outcome` applies: a two-object, position or colour-attribution spec of two single objects (with
    their colours for colour attribution), as the Shapes templates write them."""
    inc = spec.get("include", [])
    return (spec.get("tag") in OUTCOMES and len(inc) == 2 and all(i.get("count", 1) == 1 for i in inc)
            and (spec["tag"] != "color_attr" or all("color" in i for i in inc))
            and (spec["tag"] != "position" or "position" in inc[1]))


def outcome(spec: dict, dets: list[Detection], image_width: int) -> str:
    """What an image of a two-object prompt got wrong, by GenEval's matching (each named shape its own object):
    `no_shape` / `one_shape` when fewer than both named shapes are drawn, whatever their colours; with both drawn,
    `right` (the prompt holds), `reversed` (position: the relation holds the other way round), `swapped`
    (colour attribution: each shape has the other's colour), `partly` (one shape has its colour) or `neither`."""
    a, b = spec["include"]
    if spec["tag"] == "position":  # include[1] is the located object, include[0] the reference
        a, b = b, a
    A = [d for d in dets if d.shape == a["class"]]
    B = [d for d in dets if d.shape == b["class"]]
    pairs = [(x, y) for x, y in product(A, B) if x is not y]
    if not pairs:
        return "one_shape" if A or B else "no_shape"
    if spec["tag"] == "two_object":
        return "right"
    if spec["tag"] == "position":
        rel, margin = a["position"][0], POS_MARGIN * image_width / REF_SIZE
        if any(geneval_relation_holds(x, y, rel, margin) for x, y in pairs):
            return "right"
        return "reversed" if any(geneval_relation_holds(y, x, rel, margin) for x, y in pairs) else "neither"
    ca, cb = a["color"], b["color"]
    if any(x.color == ca and y.color == cb for x, y in pairs):
        return "right"
    if any(x.color == cb and y.color == ca for x, y in pairs):
        return "swapped"
    return "partly" if any(x.color == ca or y.color == cb for x, y in pairs) else "neither"


def diagnose(images, specs: list[dict]) -> dict[str, dict[str, int]]:
    """{category: {outcome: images}} for the images of two-object, position and colour-attribution prompts
    (`outcome`): whether a miss is a shape not drawn or, with both drawn, a relation or colours that went the
    wrong way. Not a score (GenEval has none such); it says which of drawing and binding to work on. `evaluate`
    returns it too, as "diagnosis"."""
    return evaluate(images, specs)["diagnosis"]


def format_diagnosis(diagnosis: dict[str, dict[str, int]]) -> str:
    """A markdown table of `diagnose`: per category, the share of its images with each outcome."""
    names = list(dict.fromkeys(n for tag in diagnosis for n in OUTCOMES[tag]))
    lines = ["| category | " + " | ".join(n.replace("_", " ") for n in names) + " |",
             "|---|" + "---:|" * len(names)]
    for tag, counts in diagnosis.items():
        n = sum(counts.values())
        cells = [f"{counts[k] / n:.0%}" if k in counts else "" for k in names]
        lines.append(f"| {tag} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- per category ------------------------------------------------------------------------------------------
def evaluate(images, captions_or_specs, categories: list[str] | None = None) -> dict:
    """Score images against their captions/specs: {"accuracy": {category: fraction}, "correct", "count" (per
    category), "overall" (mean of the per-category accuracies, as GenEval), "interval", "overall_interval" (95%),
    "diagnosis" (`diagnose`: what the two-object prompts' images got wrong), "image_size" (px; scores below
    RELIABLE_SIZE are not to be trusted)}. Categories default to spec tags."""
    specs = [parse_caption(s) if isinstance(s, str) else s for s in captions_or_specs]
    categories = categories or [s["tag"] for s in specs]
    if not len(images) == len(specs) == len(categories):
        raise ValueError(f"{len(images)} images, {len(specs)} captions/specs and {len(categories)} categories")
    if not specs:
        raise ValueError("no images to score")
    correct: dict[str, int] = {}
    count: dict[str, int] = {}
    diagnosis = {tag: dict.fromkeys(names, 0) for tag, names in OUTCOMES.items()}
    for image, spec, cat in zip(images, specs, categories, strict=True):
        image = np.asarray(image)
        dets = detect(image)
        count[cat] = count.get(cat, 0) + 1
        correct[cat] = correct.get(cat, 0) + bool(score(image, spec, dets))
        if diagnosable(spec):
            diagnosis[spec["tag"]][outcome(spec, dets, image.shape[1])] += 1
    order = [c for c in CATEGORIES if c in count] + sorted(set(count) - set(CATEGORIES))
    accuracy = {c: correct[c] / count[c] for c in order}
    overall = float(np.mean(list(accuracy.values())))
    return {"accuracy": accuracy, "correct": {c: correct[c] for c in order}, "count": {c: count[c] for c in order},
            "overall": overall, "interval": {c: wilson(correct[c], count[c]) for c in order},
            "overall_interval": mean_interval([correct[c] for c in order], [count[c] for c in order]),
            "diagnosis": {tag: n for tag, n in diagnosis.items() if sum(n.values())},
            "image_size": int(np.asarray(images[0]).shape[0])}


Z95 = 1.959964  # two-sided 95% normal quantile


def wilson(k: int, n: int, z: float = Z95) -> list[float]:
    """The Wilson score interval (95%) of a proportion k / n: [low, high], sound at 0 / n and n / n too."""
    p, shrink = k / n, 1 + z * z / n
    centre = (p + z * z / (2 * n)) / shrink
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / shrink
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def mean_interval(correct: list[int], count: list[int], z: float = Z95) -> list[float]:
    """A 95% normal interval of the mean of per-category proportions (GenEval's overall score), each category an
    independent binomial: standard error sqrt(sum p(1 - p) / n) / categories, with p shrunk by one success and
    one failure (Agresti-Coull style) so that 0 / n and n / n still carry their uncertainty."""
    p = [(k + 1) / (n + 2) for k, n in zip(correct, count, strict=True)]
    mean = float(np.mean([k / n for k, n in zip(correct, count, strict=True)]))
    se = float(np.sqrt(sum(q * (1 - q) / n for q, n in zip(p, count, strict=True)))) / len(count)
    return [max(0.0, mean - z * se), min(1.0, mean + z * se)]


def format_table(result: dict) -> str:
    """A markdown table of an `evaluate` result: one row per category, then overall."""
    lines = ["| category | accuracy | 95% interval | correct / n |", "|---|---:|---:|---:|"]
    for c, acc in result["accuracy"].items():
        lo, hi = result["interval"][c]
        lines.append(f"| {c} | {acc:.1%} | {lo:.0%}–{hi:.0%} | {result['correct'][c]} / {result['count'][c]} |")
    total, n = sum(result["correct"].values()), sum(result["count"].values())
    lo, hi = result["overall_interval"]
    lines.append(f"| **overall** | **{result['overall']:.1%}** | {lo:.0%}–{hi:.0%} | {total} / {n} |")
    return "\n".join(lines)


def check_spec(spec: dict, where: str) -> None:
    """EcvizError unless a spec is one ShapesEval can score: `include` a non-empty list of objects, each a Shapes
    class with a whole `count` of at least 1, a Shapes colour if any, and a `position` [relation, index of
    another object] if any. (GenEval's own metadata names COCO classes, which no Shapes model draws: scoring them
    would report 0% without saying why; a malformed spec failed only after every image was sampled.)"""
    include = spec.get("include")
    if not isinstance(include, list) or not include or not all(isinstance(o, dict) for o in include):
        raise EcvizError(f"{where}: \"include\" must be a non-empty list of objects")
    for k, obj in enumerate(include):
        count, position = obj.get("count"), obj.get("position")
        if type(count) is not int or count < 1:
            raise EcvizError(f"{where}: object {k + 1} needs a whole \"count\" of at least 1")
        if position is not None and not (isinstance(position, list) and len(position) == 2):
            raise EcvizError(f"{where}: object {k + 1}'s \"position\" must be [relation, index of another object]")
        bad = next(((what, v, known) for what, v, known in (("class", obj.get("class"), SHAPES),
                                                            ("colour", obj.get("color"), COLORS),
                                                            ("relation", (position or [None])[0], RELATIONS))
                    if (v is not None or what == "class") and (not isinstance(v, str) or v not in known)), None)
        if bad:
            what, v, known = bad
            kinds = {"class": "classes", "colour": "colours", "relation": "relations"}[what]
            raise EcvizError(f"{where}: {what} {v!r} is not one ShapesEval detects ({kinds}: "
                             f"{', '.join(known)}); score Shapes prompts, e.g. --prompts shapes-eval")
        if position is not None and not (type(position[1]) is int and 0 <= position[1] < len(include)
                                         and position[1] != k):  # a list of two: checked above
            raise EcvizError(f"{where}: object {k + 1}'s \"position\" must be [relation, index of another object]")


# ---- a checkpoint, end to end -------------------------------------------------------------------------------
@dataclass
class CheckpointEval:
    result: dict  # what `evaluate` returns
    images: np.ndarray  # (prompts, images_per_prompt, H, W, 3) uint8
    prompts: list[str]
    specs: list[dict]
    group_size: int | None = None  # the inference routing the images were sampled with (None: dense)
    capacity_factor: float | None = None


def eval_checkpoint(ckpt, prompts=None, images_per_prompt: int = D.EVAL_IMAGES_PER_PROMPT, steps: int = D.STEPS,
                    guidance: float = D.GUIDANCE, seed: int = D.SEED, batch_size: int = D.EVAL_BATCH,
                    progress: bool = False, device="cpu", dtype=None, within=None,
                    only: Sequence[int] | None = None, group_size: int | None = None,
                    capacity_factor: float | None = None) -> CheckpointEval:
    """Sample every prompt of a Shapes prompt file (default: the bundled set `shapes`; or a PromptSet read
    before, so that a pipe is read once) and score the images.

    Sample i = prompt·images_per_prompt + image, sampled by `Pipeline.generate_samples` as `ecviz trace` and
    `ecviz sample` sample it: with the same seed and batch size, the same image. device, dtype, group_size and
    capacity_factor (the inference routing; default: the checkpoint's): as `Pipeline.load` takes them.
    `within(model)`, if given, is a context manager the images are sampled inside (an intervention such as
    `ecviz.experiments.experts_removed`): the same images with that one thing changed.
    With `only` (prompt indices), just those prompts' images are sampled, each the image the whole evaluation
    gives it, and nothing is scored (`result` is empty; `images` holds those prompts' rows in that order): a
    grid of a few prompts (`ecviz eval --grid-only`) at a fraction of the evaluation's cost.
    """
    from ecviz.pipeline import Pipeline
    from ecviz.validate import check_all

    check_all({"images_per_prompt": images_per_prompt, "steps": steps, "guidance": guidance, "seed": seed,
               "batch_size": batch_size, "group_size": group_size, "capacity_factor": capacity_factor})
    ps, specs = read_specs(prompts)
    pipe = Pipeline.load(ckpt, device=device, dtype=dtype, group_size=group_size, capacity_factor=capacity_factor)
    n = len(ps) * images_per_prompt
    texts = [ps.prompts[i // images_per_prompt] for i in range(n)]
    samples = None if only is None else [p * images_per_prompt + k for p in only for k in range(images_per_prompt)]
    with within(pipe.model) if within else nullcontext():
        images = pipe.generate_samples(texts, seed, steps=steps, guidance=guidance, batch_size=batch_size,
                                       progress=progress, only=samples)
    result = evaluate(images, [specs[i // images_per_prompt] for i in range(n)]) if only is None else {}
    cfg = pipe.model.cfg
    return CheckpointEval(result, images.reshape(-1, images_per_prompt, *images.shape[1:]), ps.prompts, specs,
                          pipe.group_size, cfg.inference_capacity_factor if cfg.sparse else None)


def read_specs(prompts=None):
    """(PromptSet, specs): a Shapes prompt file (default: the bundled set `shapes`; or a PromptSet already read)
    and each prompt's spec, from its GenEval metadata or else its caption; a one-line EcvizError for a spec that
    cannot be scored."""
    from ecviz.prompts import PromptSet, read_prompts

    ps = prompts if isinstance(prompts, PromptSet) else read_prompts(prompts or "shapes")
    specs = []
    for i, p in enumerate(ps.prompts):
        if ps.meta and "include" in ps.meta[i]:
            specs.append({"tag": (ps.category or [""] * len(ps))[i], **ps.meta[i]})
            continue
        try:
            specs.append(parse_caption(p))
        except EcvizError:
            raise EcvizError(f"{ps.path.name}, prompt {i + 1}: {p!r} is not a Shapes caption; ShapesEval scores "
                             "Shapes prompts (the bundled shapes and shapes-eval, captions ecviz.data.shapes writes, "
                             "or GenEval metadata with `include`)") from None
    for i, spec in enumerate(specs):
        check_spec(spec, f"{ps.path.name}, prompt {i + 1}")
    return ps, specs


def tags_of(specs: list[dict]) -> list[str]:
    return [spec.get("tag", "") for spec in specs]


def grid_png(images: np.ndarray, rows: list[int], prompts: list[str], specs: list[dict], note: str = ""):
    """The PNG (PIL image) of `ecviz eval --grid`: one row per prompt of `rows` (images (len(rows),
    images_per_prompt, H, W, 3), in that order), labelled with its category and prompt, plus `note`."""
    from ecviz.plots import sample_grid

    tags = tags_of(specs)
    return sample_grid(images, scale=2, labels=[f"{tags[i]}: {prompts[i]}{note}" for i in rows])


def grid_prompts(tags: list[str], k: int) -> list[int]:
    """Indices of k prompts for a sample grid, from every category: round-robin over the categories (in
    order of first appearance), each time the next prompt of that category; returned grouped by category."""
    order = list(dict.fromkeys(tags))
    queues = {t: [i for i, x in enumerate(tags) if x == t] for t in order}
    picked: list[int] = []
    while len(picked) < min(k, len(tags)):
        for t in order:
            if queues[t] and len(picked) < k:
                picked.append(queues[t].pop(0))
    return sorted(picked, key=lambda i: (order.index(tags[i]), i))
