"""A procedural shapes dataset with known ground truth: the project's embedded benchmark.

Every image is one flat-coloured shape on a grey background, drawn without antialiasing, so an evaluator can
recover shape, colour, size and position from pixels alone (`render` and `caption` are reused there).
"""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from datasets_prep.digits import png_bytes, remove_stale, write_atomically

FACTORS = {
    "shape": ("circle", "square", "triangle", "cross"),
    "colour": ("red", "green", "blue", "yellow", "purple"),
    "size": ("small", "large"),
    "position": ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"),
    "background": ("light grey", "dark grey", "textured"),
}
COLOURS = {  # saturated, far from every grey (R == G == B) background
    "red": (255, 0, 0),
    "green": (0, 200, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (160, 0, 200),
}
BACKGROUNDS = {"light grey": 200, "dark grey": 70, "textured": 128}  # grey level; textured adds noise around it
TEXTURE_AMPLITUDE = 12      # textured: per-pixel grey in 128 +- 12, faint enough to keep the shape's edges obvious
HALF_EXTENT = {"small": 0.1, "large": 0.16}  # half the shape's side, as a fraction of the image side
JITTER = 0.05               # centre offset from the grid cell's centre, at most this fraction of the side
PREPOSITION = {"top": "at the top", "bottom": "at the bottom", "left": "on the left", "right": "on the right"}


def cell(position: str) -> tuple[int, int]:
    """(row, column) of a position on the 3x3 grid, row 0 at the top."""
    index = FACTORS["position"].index(position)
    return index // 3, index % 3


def centre(factors: dict, size: int, seed: int) -> tuple[float, float]:
    """The shape's centre (x, y) in pixels: its cell's centre plus seeded jitter, clamped so the shape fits.

    The centre is snapped to a pixel centre, so each shape is symmetric and has the same pixels wherever it is.
    """
    row, col = cell(factors["position"])
    jitter = np.random.default_rng([seed, 0]).uniform(-JITTER, JITTER, size=2) * size
    reach = np.floor(HALF_EXTENT[factors["size"]] * size)  # whole pixels the shape spans either side of its centre
    snapped = [np.floor((k + 0.5) * size / 3 + j) + 0.5 for k, j in ((col, jitter[0]), (row, jitter[1]))]
    lo, hi = reach + 1.5, size - 1.5 - reach  # one background pixel between shape and border, so its outline closes
    x, y = (float(np.clip(v, lo, hi)) for v in snapped)
    return x, y


def shape_mask(factors: dict, size: int, seed: int) -> np.ndarray:
    """Boolean (size, size) mask of the shape, tested at pixel centres so edges are hard (no antialiasing)."""
    cx, cy = centre(factors, size, seed)
    return mask_at(factors["shape"], cx, cy, HALF_EXTENT[factors["size"]] * size, size)


def mask_at(kind: str, cx: float, cy: float, h: float, size: int) -> np.ndarray:
    """A shape of half extent h centred at (cx, cy), as a (size, size) mask; world v2 draws with it too."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = xs - cx, ys - cy
    if kind == "circle":
        return dx**2 + dy**2 <= h**2
    if kind == "square":
        return (np.abs(dx) <= 0.85 * h) & (np.abs(dy) <= 0.85 * h)  # 0.85: area close to the circle's
    if kind == "triangle":  # apex up, base at the bottom of the h-box: half width grows from 0 to h
        return (dy >= -h) & (dy <= h) & (np.abs(dx) <= (dy + h) / 2)
    if kind == "cross":
        arm = 0.3 * h  # thin arms, so a small cross does not blur into a disc
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= h)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= h))
    raise ValueError(f"unknown shape {kind!r}; expected one of {FACTORS['shape']}")


def background(name: str, size: int, seed: int) -> np.ndarray:
    """(size, size, 3) uint8 grey background; all channels equal, so no pixel can match a shape colour."""
    grey = np.full((size, size), BACKGROUNDS[name], dtype=np.int16)
    if name == "textured":
        grey += np.random.default_rng([seed, 1]).integers(-TEXTURE_AMPLITUDE, TEXTURE_AMPLITUDE + 1, (size, size))
    return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)


def render(factors: dict, size: int, seed: int) -> Image.Image:
    """Draw one image: the shape in its exact colour over the background; `seed` fixes jitter and texture."""
    pixels = background(factors["background"], size, seed)
    pixels[shape_mask(factors, size, seed)] = COLOURS[factors["colour"]]
    return Image.fromarray(pixels, mode="RGB")


def outline(factors: dict, size: int, seed: int) -> Image.Image:
    """ControlNet conditioning: the shape's boundary pixels (a 4-neighbour outside it) in white on black."""
    mask = shape_mask(factors, size, seed)
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    edge = (mask & ~interior).astype(np.uint8) * 255
    return Image.fromarray(np.repeat(edge[..., None], 3, axis=2), mode="RGB")


def caption(factors: dict) -> str:
    """E.g. "a small red triangle in the top left on a light grey background"; names every factor."""
    position = factors["position"]
    where = PREPOSITION.get(position, f"in the {position}")
    return (f"a {factors['size']} {factors['colour']} {factors['shape']} {where} "
            f"on a {factors['background']} background")


def restrict(only: dict | None = None, exclude: dict | None = None) -> dict[str, tuple[str, ...]]:
    """The factor values allowed after `only` (keep these) and `exclude` (drop these), e.g. to hold a colour out.

    Both map a factor name to a value or a list of values; an unknown name or value, or a factor left with no
    value, raises ValueError naming it.
    """
    allowed = dict(FACTORS)
    for rule, keep in ((only or {}, True), (exclude or {}, False)):
        for name, values in rule.items():
            if name not in FACTORS:
                raise ValueError(f"unknown factor {name!r}; expected one of {', '.join(FACTORS)}")
            values = (values,) if isinstance(values, str) else tuple(values)
            unknown = [v for v in values if v not in FACTORS[name]]
            if unknown:
                raise ValueError(f"unknown {name} {unknown[0]!r}; expected one of {', '.join(FACTORS[name])}")
            allowed[name] = tuple(v for v in allowed[name] if (v in values) == keep)
            if not allowed[name]:
                raise ValueError(f"no {name} is left after only/exclude")
    return allowed


def parse_rules(items: list[str] | None) -> dict[str, list[str]]:
    """['colour=purple', 'shape=cross,circle'] -> {'colour': ['purple'], 'shape': ['cross', 'circle']}."""
    rules: dict[str, list[str]] = {}
    for item in items or ():
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"{item!r} is not of the form factor=value[,value...]")
        rules.setdefault(name.strip(), []).extend(v.strip() for v in values.split(","))
    return rules


def draw_factors(seed: int, index: int, allowed: dict | None = None) -> tuple[dict, int]:
    """Factors (each uniform over its allowed values, independent) and a render seed for one record.

    A per-index stream makes `--n` a prefix of any larger run with the same seed and restriction.
    """
    rng = np.random.default_rng([seed, index])
    factors = {name: str(values[rng.integers(len(values))]) for name, values in (allowed or FACTORS).items()}
    return factors, int(rng.integers(2**31))


def write_synth_dataset(out, n: int, size: int = 32, seed: int = 0, edges: bool = False,
                        only: dict | None = None, exclude: dict | None = None) -> int:
    """Write an imagefolder (images/*.png, metadata.jsonl with the factors as columns, factors.json).

    edges: also write conditioning/*.png outlines and a `conditioning_image` column, for ControlNet.
    only/exclude: restrict factor values (see `restrict`), e.g. exclude={"colour": "purple"} for a teacher
    that never sees purple, only={"colour": "purple"} for the concept a LoRA then teaches.
    """
    allowed = restrict(only, exclude)

    def records():
        for i in range(n):
            factors, render_seed = draw_factors(seed, i, allowed)
            row = {"text": caption(factors), **factors, "render_seed": render_seed}
            yield row, render(factors, size, render_seed), lambda f=factors, r=render_seed: outline(f, size, r)

    summary = {"factors": allowed, "colours": COLOURS, "backgrounds": BACKGROUNDS, "size": size, "seed": seed, "n": n}
    return write_imagefolder(out, records(), edges, "factors.json", summary)


SUMMARIES = ("factors.json", "world.json")  # world v1's and world v2's: a folder holds one world's


def write_imagefolder(out, records, edges: bool, summary_name: str, summary: dict) -> int:
    """Write (row, image, outline-maker) records as images/NNNNN.png, conditioning/NNNNN.png (edges),
    metadata.jsonl and the summary file; images, outlines and the other world's summary left from an earlier run
    in the same folder go, so a smaller or edgeless run never leaves rows the metadata no longer lists."""
    out = Path(out)
    images, conditioning = out / "images", out / "conditioning"
    images.mkdir(parents=True, exist_ok=True)
    if edges:
        conditioning.mkdir(exist_ok=True)
    rows = []
    for i, (row, image, make_outline) in enumerate(records):
        name = f"{i:05d}.png"
        write_atomically(images / name, png_bytes(image))
        row = {"file_name": f"images/{name}", **row}
        if edges:
            write_atomically(conditioning / name, png_bytes(make_outline()))
            row["conditioning_image"] = f"conditioning/{name}"
        rows.append(row)
    keep = {f"{i:05d}.png" for i in range(len(rows))}
    remove_stale(images, keep)
    if conditioning.is_dir():
        remove_stale(conditioning, keep if edges else set())
    for other in SUMMARIES:
        if other != summary_name:
            (out / other).unlink(missing_ok=True)
    write_atomically(out / summary_name, (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    write_atomically(out / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))
    return len(rows)
