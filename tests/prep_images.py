"""Generated raw inputs for the datasets_prep tests: ten good images and one of each kind of bad file."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

GOOD_SIZES = [(320, 240), (240, 320), (400, 200), (200, 400), (256, 256),
              (500, 300), (300, 500), (640, 160), (160, 640), (350, 350)]
MARKER = (255, 0, 0)


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A smooth gradient with a bright square, different per seed, so encodings and hashes differ."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, 3)
    pixels = np.stack([(base[c] + 80 * np.sin(x / (17 + 5 * c + seed) + y / (23 + seed))) for c in range(3)], -1)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    image.paste(tuple(int(v) for v in rng.integers(0, 255, 3)), (width // 4, height // 4, width // 2, height // 2))
    return image


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def good_samples() -> list[tuple[str, bytes, str]]:
    """(file name, bytes, caption) for the ten good images; every third one is a PNG."""
    samples = []
    for k, (w, h) in enumerate(GOOD_SIZES):
        fmt, ext = ("PNG", "png") if k % 3 == 2 else ("JPEG", "jpg")
        caption = f"good picture number {k} of {w} by {h}"
        samples.append((f"good_{k:02d}.{ext}", encoded(picture(w, h, k), fmt), caption))
    return samples


def write_caption_folder(root: Path, samples) -> Path:
    """Images with same-stem .txt captions."""
    root.mkdir(parents=True, exist_ok=True)
    for name, data, caption in samples:
        (root / name).write_bytes(data)
        if caption is not None:
            (root / name).with_suffix(".txt").write_bytes(caption if isinstance(caption, bytes) else caption.encode())
    return root


def rotated_jpeg() -> bytes:
    """Stored 300x200 with a red marker top-left and EXIF orientation 6: upright it is 200x300, marker top-right."""
    image = Image.new("RGB", (300, 200), (40, 90, 200))
    image.paste(MARKER, (0, 0, 60, 60))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(image, "JPEG", quality=95, exif=exif.tobytes())


def special_images() -> dict[str, bytes]:
    """Inputs that must be converted and kept: CMYK, 16-bit grey, RGBA, palette with transparency, EXIF-rotated."""
    rgba = Image.new("RGBA", (200, 200), (0, 0, 0, 0))  # fully transparent black...
    rgba.paste((0, 200, 0, 255), (100, 0, 200, 200))  # ...left half; right half opaque green
    palette = Image.new("P", (200, 160), 0)
    palette.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    palette.paste(1, (100, 0, 200, 160))
    grey16 = Image.fromarray((np.arange(160 * 120).reshape(120, 160) * 3).astype(np.uint16))
    return {
        "cmyk.jpg": encoded(Image.new("CMYK", (180, 240), (0, 255, 255, 0)), "JPEG"),
        "grey16.png": encoded(grey16, "PNG"),
        "rgba.png": encoded(rgba, "PNG"),
        "palette.png": encoded(palette, "PNG", transparency=0),
        "rotated.jpg": rotated_jpeg(),
    }


def bad_images() -> dict[str, bytes]:
    """Inputs that must be skipped, each for one reason (captions are written for all of them)."""
    full = encoded(picture(200, 200, 99), "JPEG")
    return {
        "truncated.jpg": full[: len(full) // 2],
        "empty.png": b"",
        "text.png": b"this is a text file, not a PNG\n",
        "tiny.png": encoded(picture(8, 8, 5), "PNG"),
        "huge.png": encoded(Image.new("RGB", (600, 600), (9, 9, 9)), "PNG"),
    }


def write_acceptance_source(root: Path) -> Path:
    """The acceptance fixture: 24 inputs, of which 16 are kept (see EXPECTED_SKIPS)."""
    duplicate = encoded(picture(300, 220, 42), "JPEG")
    samples = good_samples() + [(n, d, f"special {n}") for n, d in special_images().items()]
    samples += [(n, d, f"bad {n}") for n, d in bad_images().items()]
    samples += [("a_dup1.jpg", duplicate, "a duplicated picture"), ("z_dup2.jpg", duplicate, "the same picture again"),
                ("no_caption.jpg", encoded(picture(200, 300, 7), "JPEG"), None),
                ("latin1.jpg", encoded(picture(300, 200, 8), "JPEG"), "café au lait".encode("latin-1"))]
    return write_caption_folder(root, samples)


EXPECTED_SKIPS = {"truncated.jpg": "corrupt", "empty.png": "empty_file", "text.png": "not_an_image",
                  "tiny.png": "too_small", "huge.png": "too_many_pixels", "no_caption.jpg": "no_caption",
                  "latin1.jpg": "caption_not_utf8", "z_dup2.jpg": "duplicate"}


def write_imagefolder(root: Path, samples) -> Path:
    """images/*.ext plus metadata.jsonl (file_name, text)."""
    (root / "images").mkdir(parents=True)
    lines = []
    for name, data, caption in samples:
        (root / "images" / name).write_bytes(data)
        lines.append(json.dumps({"file_name": f"images/{name}", "text": caption}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def write_hf_dataset(root: Path, samples) -> Path:
    """A Dataset with an Image feature, saved with save_to_disk."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    data = {"image": [{"bytes": d, "path": n} for n, d, _ in samples], "text": [c for _, _, c in samples]}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(root))
    return root


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tars(root: Path, samples, per_tar: int = 5) -> Path:
    """Webdataset shards; even samples captioned by .txt, odd ones by .json {"caption": ...}."""
    root.mkdir(parents=True)
    for t in range(0, len(samples), per_tar):
        with tarfile.open(root / f"{t // per_tar:05d}.tar", "w") as tar:
            for k, (name, data, caption) in enumerate(samples[t:t + per_tar], t):
                key = f"{k:06d}"
                add_member(tar, f"{key}.{name.rsplit('.', 1)[1]}", data)
                if k % 2 == 0:
                    add_member(tar, f"{key}.txt", caption.encode())
                else:
                    add_member(tar, f"{key}.json", json.dumps({"caption": caption}).encode())
    return root


def write_parquet(path: Path, samples) -> Path:
    """One parquet file in the Hugging Face layout: image as {bytes, path}, caption in `text`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"image": [{"bytes": d, "path": n} for n, d, _ in samples], "text": [c for _, _, c in samples]})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=4)
    return path


def crash_on_marker(item):
    """process_item, except that an input whose key holds "crash" kills its worker process, as a segfault would."""
    import os

    from datasets_prep.process import process_item

    if "crash" in item.key:
        os._exit(139)
    return process_item(item)
