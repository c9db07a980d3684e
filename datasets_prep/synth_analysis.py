"""Recover the synthetic-shapes factors from pixels alone, so a generated image can be checked against its prompt.

Deterministic numpy, no learned model: the shape is the largest connected blob of saturated pixels (every
background is grey, R == G == B), its colour the nearest of `synth.COLOURS` to the blob's median RGB, its shape
and size the `synth.shape_mask` template that overlaps it best (IoU), its position the 3x3 cell of the fitted
centre, and the background the nearest grey level of `synth.BACKGROUNDS` among the remaining pixels.
"""
from __future__ import annotations

from functools import lru_cache
from math import prod
from typing import NamedTuple

import numpy as np
from PIL import Image

from datasets_prep.synth import BACKGROUNDS, COLOURS, FACTORS, centre, shape_mask

SCORED = ("shape", "colour", "size", "position", "background")
ALL = ("shape", "colour", "size", "position")  # what the prompt asks of the object; background is scored apart
ALL_BUT_POSITION = ("shape", "colour", "size")


def chance(allowed: dict = FACTORS) -> dict[str, float]:
    """Adherence of the best fixed guess, made without looking, when each factor is uniform over `allowed`."""
    return {**{name: 1 / len(allowed[name]) for name in SCORED},
            "all": 1 / prod(len(allowed[name]) for name in ALL),
            "all_but_position": 1 / prod(len(allowed[name]) for name in ALL_BUT_POSITION)}


CHANCE = chance()  # the benchmark's own draw: shape 1/4, colour 1/5, size 1/2, position 1/9, background 1/3

CHROMA_THRESHOLD = 100  # max-min channel; half the least saturated colour's (green, purple: 200), so a blurred
                        # edge is cut at its midpoint and grey pixels plus noise stay well below
MIN_IOU = 0.3           # a blob overlapping no template this well is no shape of ours (e.g. noise): shape unknown
MIN_BLOB_FRACTION = 0.25  # a blob under this fraction of the smallest template's area is speckle, not a shape
HALO = 1                # pixels around the blob left out of the background: blurred edges are neither
SEARCH = 1              # template offsets tried either side of the centroid match, in pixels
MIN_BACKGROUND_FRACTION = 0.1  # fewer grey pixels than this fraction of the image: background unknown


class Template(NamedTuple):
    shape: str
    size: str
    mask: np.ndarray            # (side, side) bool, drawn at the image centre
    centre: np.ndarray          # (x, y) of the shape's centre in pixels
    centroid: np.ndarray        # (x, y) of its pixels' mean; differs from centre for the triangle


def to_rgb(image) -> np.ndarray:
    """(side, side, 3) float array from a PIL image or uint8 array; the analysis assumes square images."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[0] != pixels.shape[1]:
        raise ValueError(f"expected a square RGB image, got an array of shape {pixels.shape}")
    return pixels


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (empty mask -> empty).

    Min-label propagation with pointer jumping: every pixel takes the smallest label among its neighbours, then
    the label of the pixel its label names, so long winding blobs (noise) converge in few passes.
    """
    h, w = mask.shape
    index = np.arange(h * w).reshape(h, w)
    big = h * w
    labels = np.where(mask, index, big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = [padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        new = np.where(mask, np.minimum.reduce(neighbours), big)
        flat = np.append(new.ravel(), big)
        new = flat[new]  # pointer jump: a label names a pixel of the same component, take that pixel's label
        if np.array_equal(new, labels):
            break
        labels = new
    if not mask.any():
        return mask.copy()
    counts = np.bincount(labels[mask])
    return labels == counts.argmax()


@lru_cache(maxsize=8)
def templates(side: int) -> tuple[Template, ...]:
    """Every shape x size drawn by synth.shape_mask at the image centre (the same pixels it draws anywhere)."""
    out = []
    for shape in FACTORS["shape"]:
        for size in FACTORS["size"]:
            factors = {"shape": shape, "size": size, "position": "center"}
            mask = shape_mask(factors, side, seed=0)
            ys, xs = np.nonzero(mask)
            out.append(Template(shape, size, mask, np.array(centre(factors, side, seed=0)),
                                np.array([xs.mean() + 0.5, ys.mean() + 0.5])))
    return tuple(out)


def shifted(mask: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """The mask moved by whole pixels, with what leaves the frame dropped (no wrap-around)."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    if abs(dx) < w and abs(dy) < h:
        out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
            mask[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def fit_template(blob: np.ndarray, centroid: np.ndarray,
                 candidates: tuple[Template, ...] | None = None) -> tuple[float, Template | None, np.ndarray]:
    """Best IoU over templates (default: this world's) placed with their centroid on the blob's, +-SEARCH pixels;
    (iou, template, centre)."""
    best = (0.0, None, centroid)
    for template in candidates or templates(blob.shape[0]):
        base = np.round(centroid - template.centroid).astype(int)
        for oy in range(-SEARCH, SEARCH + 1):
            for ox in range(-SEARCH, SEARCH + 1):
                dx, dy = int(base[0] + ox), int(base[1] + oy)
                moved = shifted(template.mask, dx, dy)
                iou = (moved & blob).sum() / (moved | blob).sum()
                if iou > best[0]:
                    best = (float(iou), template, template.centre + (dx, dy))
    return best


def position_of(point: np.ndarray, side: int) -> str:
    """The 3x3 grid cell holding an (x, y) point, named as in synth.FACTORS['position']."""
    col, row = (int(np.clip(v * 3 // side, 0, 2)) for v in point)
    return FACTORS["position"][row * 3 + col]


def nearest(value, table: dict) -> str:
    """The key of `table` whose value is closest (Euclidean) to `value`."""
    return min(table, key=lambda k: float(np.sum((np.asarray(table[k], dtype=float) - value) ** 2)))


def dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Grow a mask by `steps` pixels (8-neighbourhood)."""
    for _ in range(steps):
        padded = np.pad(mask, 1)
        h, w = mask.shape
        mask = np.logical_or.reduce([padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                                     for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    return mask


def detect_background(rgb: np.ndarray, chroma: np.ndarray, blob: np.ndarray) -> dict:
    """Nearest grey level of BACKGROUNDS by the median of grey pixels away from the blob.

    The three levels are far apart (70, 128, 200), so the level decides alone; the spread (textured: +-12) is
    returned for inspection only, because a VAE smooths fine texture away while keeping the level.
    """
    grey = rgb.mean(axis=2)[(chroma < CHROMA_THRESHOLD) & ~dilate(blob, HALO)]
    if grey.size < MIN_BACKGROUND_FRACTION * chroma.size:
        return {"background": None, "background_level": None, "background_spread": None}
    level = float(np.median(grey))
    spread = float(1.4826 * np.median(np.abs(grey - level)))  # MAD scaled to a Gaussian's std
    return {"background": nearest(level, BACKGROUNDS), "background_level": level, "background_spread": spread}


def analyse(image) -> dict:
    """Detected factors of one image (None where undecidable), plus the evidence: centre, iou, pixels, level.

    Factor keys are those of synth.FACTORS, so `score(analyse(img), factors)` compares like with like.
    """
    rgb = to_rgb(image)
    side = rgb.shape[0]
    chroma = rgb.max(axis=2) - rgb.min(axis=2)
    blob = largest_component(chroma > CHROMA_THRESHOLD)
    out = {"shape": None, "colour": None, "size": None, "position": None, "centre": None, "iou": 0.0,
           "pixels": int(blob.sum())}
    smallest = min(int(t.mask.sum()) for t in templates(side))
    if out["pixels"] >= MIN_BLOB_FRACTION * smallest:
        ys, xs = np.nonzero(blob)
        centroid = np.array([xs.mean() + 0.5, ys.mean() + 0.5])
        iou, template, fitted = fit_template(blob, centroid)
        if template is not None and iou >= MIN_IOU:
            out |= {"shape": template.shape, "size": template.size, "iou": iou}
            centroid = fitted  # the template corrects the triangle's centroid, which sits below its centre
        out |= {"colour": nearest(np.median(rgb[blob], axis=0), COLOURS), "position": position_of(centroid, side),
                "centre": [float(v) for v in centroid]}
    return out | detect_background(rgb, chroma, blob)


def score(detected: dict, expected: dict) -> dict[str, bool]:
    """Per factor, whether it was detected as expected (None never matches); 'all' and 'all_but_position' too."""
    hits = {name: detected.get(name) is not None and detected.get(name) == expected[name] for name in SCORED}
    hits["all"] = all(hits[name] for name in ALL)
    hits["all_but_position"] = all(hits[name] for name in ALL_BUT_POSITION)
    return hits


def adherence(images, expected: list[dict]) -> tuple[dict[str, float], list[dict]]:
    """Fraction of images right per score key, and each image's detection, for images paired with factors."""
    detections = [analyse(image) for image in images]
    if len(detections) != len(expected) or not detections:
        raise ValueError(f"need as many factor dicts as images (>0), got {len(expected)} for {len(detections)}")
    hits = [score(d, e) for d, e in zip(detections, expected)]
    return {key: float(np.mean([h[key] for h in hits])) for key in hits[0]}, detections
