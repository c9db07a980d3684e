"""World v2 of the shapes benchmark: scenes of one to three objects whose captions leave factors open.

In world v1 a caption names every factor, so its image distribution is nearly a point and a few-step sampler
cannot be caught averaging modes. Here a caption fixes some factors ("a red shape", "a triangle on the left",
"two shapes", "a blue circle left of a small green square") and leaves the rest to chance, so one caption has
many images. Each record keeps both the scene it drew (`scene`) and what its caption fixes (`spec`); the
evaluator (`synth_world2_analysis`) scores adherence on the fixed factors and coverage of the open ones.

Layout: objects sit in distinct cells of a 3x3 grid (centre snapped to a pixel, no antialiasing), so an
evaluator reads each cell on its own even where a generated object bleeds over a cell border. Objects are
plain or striped (horizontal bands of the colour and a darker shade of it); backgrounds are flat light or dark
grey, a grey checkerboard, or vertical grey bands. Every background pixel is grey (R == G == B) and every
object pixel saturated, so object and background separate by chroma alone.
"""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from datasets_prep.synth import COLOURS, PREPOSITION, mask_at, write_imagefolder

OBJECT_FACTORS = {
    "shape": ("circle", "square", "triangle", "cross"),
    "colour": ("red", "green", "blue", "yellow", "purple"),
    "size": ("small", "large"),
    "fill": ("plain", "striped"),
    "position": ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"),
}
BACKGROUNDS = ("light grey", "dark grey", "checkered", "banded")
COUNTS = (1, 2, 3)
RELATIONS = ("left of", "right of", "above", "below")
COUNT_WORDS = {2: "two", 3: "three"}
SIZES = (32, 64)

FLAT_LEVEL = {"light grey": 200, "dark grey": 70}
PATTERN_LEVELS = (105, 165)   # checkered and striped alternate these greys: mean 135, between the flat levels
HALF_EXTENT = {"small": 0.085, "large": 0.13}  # of the side; two large objects in adjacent cells keep a gap
SHADE = 0.6                   # a stripe's darker shade: every colour keeps chroma >= 120 (green, purple)
FIXED_PROBABILITY = 0.5       # each attribute of a described object is named with this probability
BACKGROUND_PROBABILITY = 0.5  # the caption names the background with this probability
FORMS = {1: {"list": 1.0}, 2: {"count": 0.2, "relation": 0.4, "list": 0.4}, 3: {"count": 0.3, "list": 0.7}}
ATTRIBUTES = ("size", "fill", "colour", "shape", "position")  # the order words take in a description


def period(side: int) -> int:
    """Stripe and checker period in pixels: 4 at 32 px, 8 at 64, so a 2x or 8x VAE can still draw it."""
    return side // 8


def cell(position: str) -> tuple[int, int]:
    """(row, column) of a position on the 3x3 grid, row 0 at the top."""
    index = OBJECT_FACTORS["position"].index(position)
    return index // 3, index % 3


def centre(position: str, side: int) -> tuple[float, float]:
    """The cell's centre (x, y), snapped to a pixel centre so a shape has the same pixels in every cell."""
    row, col = cell(position)
    return tuple(float(np.floor((k + 0.5) * side / 3)) + 0.5 for k in (col, row))


def object_mask(obj: dict, side: int) -> np.ndarray:
    cx, cy = centre(obj["position"], side)
    return mask_at(obj["shape"], cx, cy, HALF_EXTENT[obj["size"]] * side, side)


def background(name: str, side: int) -> np.ndarray:
    """(side, side) grey levels; the patterned ones alternate PATTERN_LEVELS every half period."""
    if name in FLAT_LEVEL:
        return np.full((side, side), FLAT_LEVEL[name], dtype=np.uint8)
    half = period(side) // 2
    ys, xs = np.mgrid[0:side, 0:side] // half
    odd = (xs + ys) % 2 if name == "checkered" else xs % 2  # banded: vertical bars
    if name not in ("checkered", "banded"):
        raise ValueError(f"unknown background {name!r}; expected one of {', '.join(BACKGROUNDS)}")
    return np.where(odd == 1, PATTERN_LEVELS[1], PATTERN_LEVELS[0]).astype(np.uint8)


def render(scene: dict, side: int) -> Image.Image:
    """The scene's objects over its background, hard-edged; nothing random is left, so a scene has one image."""
    pixels = np.repeat(background(scene["background"], side)[..., None], 3, axis=2)
    for obj in scene["objects"]:
        mask = object_mask(obj, side)
        colour = np.array(COLOURS[obj["colour"]], dtype=np.float64)
        pixels[mask] = colour.astype(np.uint8)
        if obj["fill"] == "striped":  # bands counted from the object's top row: every object starts bright
            top = int(np.nonzero(mask.any(axis=1))[0][0])
            dark = ((np.arange(side) - top) // (period(side) // 2)) % 2 == 1
            pixels[mask & dark[:, None]] = np.round(colour * SHADE).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def outline(scene: dict, side: int) -> Image.Image:
    """ControlNet conditioning: every object's boundary pixels in white on black."""
    edge = np.zeros((side, side), dtype=bool)
    for obj in scene["objects"]:
        mask = np.pad(object_mask(obj, side), 1)
        interior = mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        edge |= mask[1:-1, 1:-1] & ~interior
    return Image.fromarray(np.repeat(edge.astype(np.uint8)[..., None] * 255, 3, axis=2), mode="RGB")


def describe(fixed: dict) -> str:
    """One object's words: "a small striped red triangle on the left"; "a shape" when nothing is fixed."""
    words = [fixed[name] for name in ("size", "fill", "colour") if name in fixed]
    words.append(fixed.get("shape", "shape"))
    text = "a " + " ".join(words)
    if "position" in fixed:
        position = fixed["position"]
        text += " " + PREPOSITION.get(position, f"in the {position}")
    return text


def caption(spec: dict) -> str:
    """The caption of a spec; it names exactly the factors the spec fixes (and always the object count)."""
    objects = spec["objects"]
    if spec["form"] == "count":
        text = f"{COUNT_WORDS[spec['count']]} shapes"
    elif spec["form"] == "relation":
        text = f"{describe(objects[0])} {spec['relation']} {describe(objects[1])}"
    else:
        parts = [describe(o) for o in objects]
        text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if spec.get("background"):
        text += f" on a {spec['background']} background"
    return text


def pick(rng: np.random.Generator, values):
    return values[int(rng.integers(len(values)))]


def draw_spec(rng: np.random.Generator, counts: tuple[int, ...] = COUNTS, always: tuple[str, ...] = ()) -> dict:
    """What one caption fixes: the count, a form, each described object's named attributes, maybe the background.

    Named positions are distinct cells; a relation names no position (it constrains them instead). `counts` and
    `always` (attributes every described object names) draw a curriculum from the same world (`write_world2_dataset`).
    """
    count = pick(rng, counts)
    forms = FORMS[count]
    form = str(rng.choice(list(forms), p=list(forms.values())))
    objects: list[dict] = [{} for _ in range(count)]
    if form != "count":
        cells = list(rng.permutation(len(OBJECT_FACTORS["position"])))
        for i, obj in enumerate(objects):
            for name in ATTRIBUTES:
                if name == "position" and form == "relation":
                    continue
                if rng.random() < FIXED_PROBABILITY or name in always:
                    obj[name] = OBJECT_FACTORS[name][cells[i]] if name == "position" else pick(rng, OBJECT_FACTORS[name])
    spec = {"count": count, "form": form, "objects": objects,
            "relation": pick(rng, RELATIONS) if form == "relation" else None,
            "background": pick(rng, BACKGROUNDS) if rng.random() < BACKGROUND_PROBABILITY else None}
    return spec


def relation_holds(kind: str, a: str, b: str) -> bool:
    """Whether object a stands in `kind` to object b, read from their cells (a strict row or column order)."""
    (ra, ca), (rb, cb) = cell(a), cell(b)
    return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[kind]


def draw_scene(spec: dict, rng: np.random.Generator) -> dict:
    """A scene the spec's caption describes: open factors uniform, positions distinct (and related), by rejection."""
    positions = OBJECT_FACTORS["position"]
    while True:
        taken = {o["position"] for o in spec["objects"] if "position" in o}
        objects = []
        for fixed in spec["objects"]:
            obj = {name: fixed.get(name) or pick(rng, values) for name, values in OBJECT_FACTORS.items()
                   if name != "position"}
            if "position" in fixed:
                obj["position"] = fixed["position"]
            else:
                obj["position"] = pick(rng, [p for p in positions if p not in taken])
                taken.add(obj["position"])
            objects.append(obj)
        if spec["relation"] is None or relation_holds(spec["relation"], objects[0]["position"],
                                                      objects[1]["position"]):
            break
    return {"count": spec["count"], "objects": objects, "background": spec["background"] or pick(rng, BACKGROUNDS)}


def draw_record(seed: int, index: int, counts: tuple[int, ...] = COUNTS,
                always: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """(spec, scene) of one record from a per-index stream, so a smaller `n` is a prefix of a larger run."""
    rng = np.random.default_rng([seed, index, 2])
    spec = draw_spec(rng, counts, always)
    return spec, draw_scene(spec, rng)


def scenes_for(spec: dict, count: int, seed: int) -> list[dict]:
    """`count` independent scenes of one spec: the data's own distribution for that caption."""
    rng = np.random.default_rng([seed, 3])
    return [draw_scene(spec, rng) for _ in range(count)]


def write_world2_dataset(out, n: int, size: int = 32, seed: int = 0, edges: bool = False,
                         counts: tuple[int, ...] = COUNTS, always: tuple[str, ...] = ()) -> int:
    """Write an imagefolder: images/*.png, metadata.jsonl (file_name, text, count, background, and the scene and
    spec as JSON strings), world.json; edges adds ControlNet outlines under conditioning/.

    `counts` keeps scenes of those object counts and `always` names those attributes on every described object:
    a curriculum for a factor the model learns too slowly from the world's own captions (the v2 teacher's fill,
    whose latent signal is a tenth of a colour's). Every such caption is still one the world can draw.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size}")
    if not counts or any(c not in COUNTS for c in counts):
        raise ValueError(f"object counts must be among {COUNTS}, got {counts}")
    unknown = [name for name in always if name not in ATTRIBUTES]
    if unknown:
        raise ValueError(f"cannot always name {', '.join(unknown)}: attributes are {', '.join(ATTRIBUTES)}")

    def records():
        for i in range(n):
            spec, scene = draw_record(seed, i, counts, always)
            row = {"text": caption(spec), "count": scene["count"], "background": scene["background"],
                   "scene": json.dumps(scene), "spec": json.dumps(spec)}
            yield row, render(scene, size), lambda s=scene: outline(s, size)

    summary = {"world": "v2", "object_factors": OBJECT_FACTORS, "backgrounds": BACKGROUNDS, "counts": COUNTS,
               "relations": RELATIONS, "colours": COLOURS, "size": size, "seed": seed, "n": n,
               "object_counts": list(counts), "always_named": list(always)}
    return write_imagefolder(out, records(), edges, "world.json", summary)
