"""A small real image-caption dataset, built offline from scikit-learn's handwritten digits."""

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
}
BACKGROUNDS = {"black": (0, 0, 0), "grey": (128, 128, 128)}


def render_digit(pixels: np.ndarray, size: int, colour: tuple, background: tuple) -> Image.Image:
    """Upscale an 8x8 0..16 digit smoothly and paint it, so the image shows both shape and colour."""
    mask = Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8), mode="L")
    alpha = np.asarray(mask.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)[..., None] / 255
    rgb = np.asarray(background, np.float32) * (1 - alpha) + np.asarray(colour, np.float32) * alpha
    return Image.fromarray(np.round(rgb).astype(np.uint8), mode="RGB")


def caption(digit: int, colour: str, background: str, subject: str | None = None) -> str:
    """Describe class, colour and background, so captions carry more than the label.

    `subject` replaces "handwritten digit <word>" (a DreamBooth instance set names its subject "sks digit").
    """
    return f"a {subject or 'handwritten digit ' + DIGIT_WORDS[digit]} in {colour} on a {background} background"


def plan(targets: np.ndarray, seed: int) -> list[tuple[int, str, str]]:
    """Draw order and colours for every sample at once, so a smaller n is a prefix of a larger one."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(targets))
    colours = rng.choice(list(COLOURS), size=len(targets))
    backgrounds = rng.choice(list(BACKGROUNDS), size=len(targets))
    return [(int(i), str(c), str(b)) for i, c, b in zip(order, colours, backgrounds)]


def png_bytes(image: Image.Image) -> bytes:
    """Encode in memory, so the file itself is written in one atomic step."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_atomically(path: Path, data: bytes) -> None:
    """Write through a temporary sibling, so an interrupted re-run never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def remove_stale(images: Path, keep: set[str]) -> None:
    """Drop PNGs from an earlier, larger run, so the folder holds exactly what metadata.jsonl lists."""
    for path in images.glob("*.png"):
        if path.name not in keep:
            path.unlink()


def write_digits_dataset(out, n: int | None = None, size: int = 64, seed: int = 0, only: int | None = None,
                         subject: str | None = None) -> int:
    """Write an imagefolder (images/*.png + metadata.jsonl) that training can load with no download.

    only: keep one digit class; subject: its name in the captions (see `caption`).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    chosen = [c for c in plan(digits.target, seed) if only is None or digits.target[c[0]] == only][:n]
    images = Path(out) / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, (index, colour, background) in enumerate(tqdm(chosen, desc="digits", unit="img", disable=None)):
        name = f"{k:05d}.png"
        image = render_digit(digits.images[index], size, COLOURS[colour], BACKGROUNDS[background])
        write_atomically(images / name, png_bytes(image))
        rows.append({"file_name": f"images/{name}", "text": caption(int(digits.target[index]), colour, background, subject)})
    remove_stale(images, {Path(r["file_name"]).name for r in rows})
    text = "".join(json.dumps(r) + "\n" for r in rows)
    write_atomically(Path(out) / "metadata.jsonl", text.encode("utf-8"))
    return len(rows)
