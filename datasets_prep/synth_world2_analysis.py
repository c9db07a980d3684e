"""Score world-v2 images from pixels alone: adherence to what a caption fixes, coverage of what it leaves open.

Deterministic numpy, no learned model. Each of the 3x3 cells is read on its own: its largest blob of saturated
pixels is an object (every background pixel is grey), its shape and size the template that overlaps it best,
its colour the nearest named colour to its brighter pixels, its fill striped when a good share of its interior
is the darker shade. The background is told by the greys left over: a flat level, or a pattern whose changes
run in both directions (checkered) or across only (banded).

Adherence matches the caption's objects to the detected ones (the assignment that satisfies most fixed
factors) and scores the count, each fixed attribute, the relation and the background. Coverage compares, per
prompt, the values the open factors take over K images with the values they take in the data for that caption
(draws of `synth_world2.draw_scene`): total-variation distance and the share of the data's modes hit, each
against what K exact draws from the data reach, so real renders score a coverage distance near 0 and a mode
ratio near 1, and a sampler that collapses or blurs does not.
"""
from __future__ import annotations

import json
from functools import lru_cache
from itertools import permutations

import numpy as np

from datasets_prep.synth import COLOURS
from datasets_prep.synth_analysis import Template, dilate, fit_template, largest_component, nearest, to_rgb
from datasets_prep.synth_world2 import (FLAT_LEVEL, HALF_EXTENT, OBJECT_FACTORS, SHADE, mask_at, centre,
                                        relation_holds, scenes_for)

CHROMA_THRESHOLD = 80     # two thirds of the least saturated shade (a green or purple stripe: 120); grey plus
                          # pixel noise of std 20 passes it at one pixel in 60
MIN_IOU = 0.3             # below this no template fits: an object is there, its shape and size unknown
MIN_BLOB_FRACTION = 0.5   # a blob under this share of the smallest template's area (a small cross: 9 px at 32)
                          # is speckle, not an object
DARK_RATIO = (1 + SHADE) / 2   # an interior pixel darker than this share of the object's brightness is a stripe
STRIPED_FRACTION = 0.2    # striped when more of the interior than this is stripe (renders: 0 or about 0.4-0.6)
LEVEL_TOLERANCE = 35      # a flat background's median grey lies within this of its level
CHANGE = 30               # grey step between neighbours that counts as a pattern edge (half the pattern's 60)
PATTERN_FRACTION = 0.15   # neighbour pairs across a pattern edge (renders: 0.5 along changes, 0 along bands)
BANDED_RATIO = 2          # banded: at least this many more changes across the bands than down them
MIN_BACKGROUND_FRACTION = 0.1
SCORED = ("count", "shape", "colour", "size", "fill", "position", "relation", "background", "all")
MODE_PROBABILITY = 0.02   # an open value at least this likely in the data is a mode to be hit
REFERENCE_DRAWS = 400     # data scenes per prompt for the open factors' distribution
FLOOR_TRIALS = 32         # K-draw sets per prompt for what exact samples reach


@lru_cache(maxsize=8)
def templates(side: int) -> tuple[Template, ...]:
    """Every shape and size of world v2, drawn in the centre cell (the same pixels it draws in any cell)."""
    out = []
    cx, cy = centre("center", side)
    for shape in OBJECT_FACTORS["shape"]:
        for size in OBJECT_FACTORS["size"]:
            mask = mask_at(shape, cx, cy, HALF_EXTENT[size] * side, side)
            ys, xs = np.nonzero(mask)
            out.append(Template(shape, size, mask, np.array([cx, cy]), np.array([xs.mean() + 0.5, ys.mean() + 0.5])))
    return tuple(out)


def cell_window(position: str, side: int) -> tuple[slice, slice]:
    index = OBJECT_FACTORS["position"].index(position)
    row, col = divmod(index, 3)
    bounds = [round(k * side / 3) for k in range(4)]
    return slice(bounds[row], bounds[row + 1]), slice(bounds[col], bounds[col + 1])


def erode(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def read_object(rgb: np.ndarray, blob: np.ndarray, position: str) -> dict:
    """One object's factors from its blob (a full-image mask inside one cell)."""
    ys, xs = np.nonzero(blob)
    iou, template, _ = fit_template(blob, np.array([xs.mean() + 0.5, ys.mean() + 0.5]), templates(blob.shape[0]))
    pixels = rgb[blob]
    brightness = pixels.max(axis=1)
    full = max(float(np.percentile(brightness, 90)), 1.0)  # the colour at full strength (stripes are darker)
    colour = nearest(np.median(pixels[brightness >= DARK_RATIO * full], axis=0), COLOURS)
    interior = erode(blob) if erode(blob).sum() >= 4 else blob
    level = rgb[interior].max(axis=1) / full
    fill = "striped" if float(np.mean(level < DARK_RATIO)) > STRIPED_FRACTION else "plain"
    known = iou >= MIN_IOU
    return {"shape": template.shape if known else None, "size": template.size if known else None, "colour": colour, "fill": fill,
            "position": position, "iou": iou}


def read_background(rgb: np.ndarray, objects_mask: np.ndarray, chroma: np.ndarray) -> str | None:
    """Flat light or dark grey by level; checkered or banded by where the grey changes; None when unclear."""
    grey = rgb.mean(axis=2)
    keep = (chroma < CHROMA_THRESHOLD) & ~dilate(objects_mask, 1)
    if keep.sum() < MIN_BACKGROUND_FRACTION * keep.size:
        return None
    level = float(np.median(grey[keep]))
    for name, flat in FLAT_LEVEL.items():
        if abs(level - flat) < LEVEL_TOLERANCE:
            return name
    across = changes(grey, keep, axis=1)  # neighbours in a row: banded and checkered both change
    down = changes(grey, keep, axis=0)    # neighbours in a column: only checkered changes
    if across < PATTERN_FRACTION:
        return None  # flat at a level of neither grey, or bars the wrong way: not a background of this world
    if across >= BANDED_RATIO * down:
        return "banded"
    return "checkered" if down >= PATTERN_FRACTION else None


def changes(grey: np.ndarray, keep: np.ndarray, axis: int) -> float:
    """Share of neighbouring background pairs along `axis` whose grey differs by more than CHANGE."""
    a, b = (grey[:, :-1], grey[:, 1:]) if axis == 1 else (grey[:-1], grey[1:])
    ka, kb = (keep[:, :-1], keep[:, 1:]) if axis == 1 else (keep[:-1], keep[1:])
    both = ka & kb
    return float(np.mean(np.abs(a - b)[both] > CHANGE)) if both.any() else 0.0


def analyse(image) -> dict:
    """{"objects": [per occupied cell, grid order], "count", "background"} read from one image."""
    rgb = to_rgb(image)
    side = rgb.shape[0]
    chroma = rgb.max(axis=2) - rgb.min(axis=2)
    saturated = chroma > CHROMA_THRESHOLD
    smallest = min(int(t.mask.sum()) for t in templates(side))
    objects, occupied = [], np.zeros_like(saturated)
    for position in OBJECT_FACTORS["position"]:
        rows, cols = cell_window(position, side)
        inside = np.zeros_like(saturated)
        inside[rows, cols] = saturated[rows, cols]
        blob = largest_component(inside)
        if blob.sum() >= MIN_BLOB_FRACTION * smallest:
            objects.append(read_object(rgb, blob, position))
            occupied |= inside
    return {"objects": objects, "count": len(objects), "background": read_background(rgb, occupied, chroma)}


def match(spec: dict, detected: list[dict]) -> list[dict | None]:
    """The detected object for each of the caption's objects (None where too few were found): the assignment that
    satisfies most fixed attributes and the relation, the earliest in grid order among equals."""
    wanted = spec["objects"]
    slots = list(detected) + [None] * len(wanted)
    best, best_score = [None] * len(wanted), (-1, -1)
    for chosen in permutations(range(len(slots)), len(wanted)):
        picked = [slots[i] for i in chosen]
        met = sum(p is not None and p.get(k) == v for p, want in zip(picked, wanted) for k, v in want.items())
        if spec.get("relation") and picked[0] is not None and picked[1] is not None:
            met += relation_holds(spec["relation"], picked[0]["position"], picked[1]["position"])
        score = (met, sum(p is not None for p in picked))  # then as many objects as possible
        if score > best_score:
            best, best_score = picked, score
    return best


def hits(spec: dict, found: dict) -> dict[str, list[bool]]:
    """Per scored factor, one bool per fixed instance in this image ("all": one, over everything fixed)."""
    out: dict[str, list[bool]] = {key: [] for key in SCORED}
    out["count"].append(found["count"] == spec["count"])
    matched = match(spec, found["objects"])
    for want, got in zip(spec["objects"], matched):
        for name, value in want.items():
            out[name].append(got is not None and got.get(name) == value)
    if spec.get("relation"):
        a, b = matched[:2]
        out["relation"].append(a is not None and b is not None
                               and relation_holds(spec["relation"], a["position"], b["position"]))
    if spec.get("background"):
        out["background"].append(found["background"] == spec["background"])
    out["all"].append(all(all(v) for k, v in out.items() if k != "all"))
    return out


def adherence(analyses: list[dict], specs: list[dict]) -> dict[str, float | None]:
    """Share of fixed instances met per factor over all images (None for a factor no caption fixed)."""
    if len(analyses) != len(specs) or not specs:
        raise ValueError(f"need one spec per image (>0), got {len(specs)} for {len(analyses)}")
    pooled: dict[str, list[bool]] = {key: [] for key in SCORED}
    for found, spec in zip(analyses, specs):
        for key, values in hits(spec, found).items():
            pooled[key] += values
    return {key: float(np.mean(v)) if v else None for key, v in pooled.items()}


def open_values(spec: dict, objects: list[dict | None], background: str | None) -> dict[str, list]:
    """Per open factor, the values this image gives it ("missing" for a caption object not found)."""
    out: dict[str, list] = {}
    for want, got in zip(spec["objects"], objects):
        for name in OBJECT_FACTORS:
            if name not in want:
                out.setdefault(name, []).append("missing" if got is None or got.get(name) is None else got[name])
    if not spec.get("background"):
        out["background"] = [background or "missing"]
    return out


def histograms(samples: list[dict[str, list]]) -> dict[str, dict]:
    counts: dict[str, dict] = {}
    for values in samples:
        for name, vals in values.items():
            for v in vals:
                counts.setdefault(name, {}).setdefault(v, 0)
                counts[name][v] += 1
    return {name: {v: c / sum(table.values()) for v, c in table.items()} for name, table in counts.items()}


def compare(samples: list[dict[str, list]], reference: dict[str, dict]) -> tuple[float, float]:
    """(mean total-variation distance over open factors, mean share of the data's modes hit)."""
    seen = histograms(samples)
    tv, modes = [], []
    for name, ref in reference.items():
        got = seen.get(name, {})
        tv.append(0.5 * sum(abs(got.get(v, 0.0) - ref.get(v, 0.0)) for v in set(got) | set(ref)))
        wanted = [v for v, p in ref.items() if p >= MODE_PROBABILITY]
        modes.append(np.mean([got.get(v, 0.0) > 0 for v in wanted]))
    return float(np.mean(tv)), float(np.mean(modes))


def data_values(spec: dict, count: int, seed: int) -> list[dict[str, list]]:
    return [open_values(spec, scene["objects"], scene["background"]) for scene in scenes_for(spec, count, seed)]


@lru_cache(maxsize=4096)
def _reference(spec_key: str, k: int) -> tuple[dict, float, float]:
    spec = json.loads(spec_key)
    reference = histograms(data_values(spec, REFERENCE_DRAWS, seed=0))
    trials = [compare(data_values(spec, k, seed=1 + t), reference) for t in range(FLOOR_TRIALS)]
    return reference, float(np.mean([t[0] for t in trials])), float(np.mean([t[1] for t in trials]))


def reference_for(spec: dict, k: int) -> tuple[dict, float, float]:
    """The data's open-factor distribution for a caption, and the TV and mode share K exact draws reach."""
    return _reference(json.dumps(spec, sort_keys=True), k)


def coverage(analyses: list[dict], specs: list[dict], per_prompt: int) -> dict[str, float | None]:
    """Per prompt (K = per_prompt consecutive images of one spec), TV and mode share of the open factors against
    the data's, each set against K exact draws: "coverage" = TV - floor (0: as close as data samples get),
    "modes" = share hit / share K draws hit (1: as many); raw figures too. None when no prompt leaves a factor open."""
    if len(analyses) != len(specs) or len(specs) % per_prompt:
        raise ValueError(f"need per_prompt images for each spec, got {len(analyses)} images for {len(specs)} specs")
    rows = []
    for start in range(0, len(specs), per_prompt):
        spec = specs[start]
        reference, floor_tv, floor_modes = reference_for(spec, per_prompt)
        if not reference:
            continue
        samples = []
        for found in analyses[start:start + per_prompt]:
            samples.append(open_values(spec, match(spec, found["objects"]), found["background"]))
        tv, modes = compare(samples, reference)
        rows.append((tv, modes, floor_tv, floor_modes))
    if not rows:
        return {"coverage": None, "modes": None, "tv": None, "tv_floor": None, "modes_hit": None}
    tv, modes, floor_tv, floor_modes = (float(np.mean(c)) for c in zip(*rows))
    return {"coverage": tv - floor_tv, "modes": modes / floor_modes, "tv": tv, "tv_floor": floor_tv,
            "modes_hit": modes}
