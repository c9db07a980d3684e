"""One input to one shard row, or to a skip reason: what each worker process runs."""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from datasets_prep import conditioning, sanitize
from datasets_prep.buckets import cover_crop, nearest_bucket
from datasets_prep.sanitize import Rejected
from datasets_prep.items import SourceItem

MAX_FILE_BYTES = 512 * 2**20  # larger files are reported, not read into memory


@dataclass(frozen=True)
class ProcessConfig:
    """Everything a worker needs; sent once per worker through the pool initializer, not with every item."""

    buckets: tuple[tuple[int, int], ...]
    caption_policy: str = "skip"  # skip | empty
    max_pixels: int = 178_956_970  # PIL's DecompressionBombError threshold
    min_size: int = 64
    image_format: str = "jpeg"  # jpeg | png
    jpeg_quality: int = 95
    conditioning: str | None = None  # derive a conditioning image (canny) for inputs that have none
    canny_low: int = 100  # Canny hysteresis thresholds on the gradient magnitude
    canny_high: int = 200
    mask_from_alpha: bool = False  # an image's alpha channel becomes its mask (when it has no mask of its own)


@dataclass
class Skipped:
    """A skipped input, as written to skipped.jsonl."""

    key: str
    path: str
    reason: str
    detail: str = ""


CONFIG: ProcessConfig | None = None  # set per worker process by init_worker


def init_worker(config: ProcessConfig) -> None:
    """Pool initializer: keep the config in the worker so items travel alone."""
    global CONFIG
    CONFIG = config


def read_bytes(value: bytes | Path | None, what: str) -> bytes:
    """The bytes of an image or caption given inline or as a path; I/O problems become reasons."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if value is None:
        raise Rejected("missing_file", f"no {what}")
    try:
        if value.stat().st_size > MAX_FILE_BYTES:
            raise Rejected("file_too_large", f"{value}: {value.stat().st_size} bytes")
        return value.read_bytes()
    except FileNotFoundError:
        raise Rejected("missing_file", f"{what} not found: {value}") from None
    except OSError as error:
        raise Rejected("unreadable", f"{value}: {error}") from None


def read_caption(value: str | bytes | Path | None, policy: str) -> str:
    """Caption text, stripped; missing or empty ones are skipped or kept as "" by policy, non-UTF-8 always skipped."""
    if isinstance(value, Path):
        value = read_bytes(value, "caption file")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8-sig")  # a BOM from Windows editors is not part of the caption
        except UnicodeDecodeError as error:
            raise Rejected("caption_not_utf8", str(error)) from None
    if value is None:
        if policy == "skip":
            raise Rejected("no_caption", "no caption file or value")
        return ""
    text = value.strip()
    if not text and policy == "skip":
        raise Rejected("empty_caption", "caption is empty or whitespace")
    return text


def encode(image: Image.Image, image_format: str, quality: int) -> bytes:
    """Encode in memory: JPEG at high quality for photos, PNG when lossless storage is wanted."""
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def fit(image: Image.Image, resized: tuple[int, int], crop: tuple[int, int], bucket: tuple[int, int]) -> Image.Image:
    """Cover-resize to `resized` and crop the bucket at `crop` (left, top), in one resampling pass.

    The crop box is mapped back to source pixels, so PIL resamples only the kept region straight to the bucket
    size; this equals resizing the whole image and then cropping, at a fraction of the cost. Lanczos when
    shrinking (sharpest anti-aliasing); bicubic when enlarging, where Lanczos rings and costs twice as much.
    """
    sx, sy = image.width / resized[0], image.height / resized[1]
    left, top = crop
    box = (left * sx, top * sy, (left + bucket[0]) * sx, (top + bucket[1]) * sy)
    shrink = sx > 1 or sy > 1
    resample = Image.Resampling.LANCZOS if shrink else Image.Resampling.BICUBIC
    return image.resize(bucket, resample, box=box, reducing_gap=3.0 if shrink else None)


def conditioning_image(value: bytes | Path, resized, crop, bucket, config: ProcessConfig) -> bytes:
    """Resize and crop the conditioning image exactly as the image; PNG, since edge and depth maps suffer from JPEG."""
    return companion_png(value, "conditioning", "conditioning image", "RGB", resized, crop, bucket, config)


def mask_image(value: bytes | Path, size: tuple[int, int], resized, crop, bucket, config: ProcessConfig) -> bytes:
    """The mask resized and cropped exactly as its image, greyscale PNG; one of another aspect ratio (or unreadable)
    is a reason to skip the input, since it would weigh the wrong pixels."""
    return companion_png(value, "mask", "mask", "L", resized, crop, bucket, config, image_size=size)


def companion_png(value: bytes | Path, reason: str, what: str, mode: str, resized, crop, bucket, config: ProcessConfig,
                  image_size: tuple[int, int] | None = None) -> bytes:
    """An image that travels with the input (conditioning image, mask), cut as the image is and stored as PNG in
    `mode`; its problems are skip reasons prefixed `<reason>_`. With `image_size`, another aspect ratio is one."""
    try:
        data = read_bytes(value, what)
        if not data:
            raise Rejected("empty_file", f"{what} has 0 bytes")
        with sanitize.pil_limits(config.max_pixels):
            image = sanitize.open_image(data, config.max_pixels, 1)
            if image_size is not None:
                width, height = sanitize.upright_size(image)
                if abs(width * image_size[1] - height * image_size[0]) > 0.01 * image_size[0] * image_size[1]:
                    raise Rejected("size_mismatch", f"{what} {width}x{height}, image {image_size[0]}x{image_size[1]}")
            image = sanitize.decode(image, resized)
        return encode(fit(sanitize.to_rgb(image).convert(mode), resized, crop, bucket), "png", 0)
    except Rejected as error:
        raise Rejected(f"{reason}_{error.reason}", error.detail) from None


def alpha_mask(image: Image.Image) -> Image.Image | None:
    """The alpha channel of a decoded image (transparency included), or None when it has none."""
    if not sanitize.has_alpha(image):
        return None
    return image.convert("RGBA").getchannel("A")


def derived_conditioning(image: Image.Image, config: ProcessConfig) -> bytes:
    """A conditioning image computed from the final image at the bucket size, which is what the ControlNet sees.

    Edges found after resizing stay one pixel wide and binary; edges found on the source and then resized would
    be blurred to grey by the resampling and thinned or lost when shrinking. PNG, like given conditioning images.
    """
    return encode(conditioning.derive(image, config.conditioning, config.canny_low, config.canny_high), "png", 0)


def build_row(item: SourceItem, config: ProcessConfig) -> dict:
    """Validate, decode, bucket, resize and encode one input; raises Rejected with the reason to skip it."""
    if item.error:
        raise Rejected(*item.error)
    data = read_bytes(item.image, "image")
    if not data:
        raise Rejected("empty_file", "0 bytes")
    caption = read_caption(item.caption, config.caption_policy)
    with sanitize.pil_limits(config.max_pixels):
        image = sanitize.open_image(data, config.max_pixels, config.min_size)
        width, height = sanitize.upright_size(image)
        index = nearest_bucket(width, height, config.buckets)
        bucket = config.buckets[index]
        rw, rh, left, top = cover_crop(width, height, bucket)
        decoded = sanitize.decode(image, (rw, rh))
        alpha = alpha_mask(decoded) if config.mask_from_alpha and item.mask is None else None
        image = sanitize.to_rgb(decoded)
    image = fit(image, (rw, rh), (left, top), bucket)
    row = {
        "key": item.key, "image": encode(image, config.image_format, config.jpeg_quality),
        "caption": caption, "width": bucket[0], "height": bucket[1], "original_width": width,
        "original_height": height, "crop_top": top, "crop_left": left, "bucket": index,
        "sha256": hashlib.sha256(data).hexdigest(), "conditioning_image": None, "mask": None,
        "source_path": item.path,  # for the duplicate's skip line; popped before writing
    }
    if item.conditioning is not None:
        row["conditioning_image"] = conditioning_image(item.conditioning, (rw, rh), (left, top), bucket, config)
    elif config.conditioning:  # the source's own conditioning image, when it has one, always wins
        row["conditioning_image"] = derived_conditioning(image, config)
    if item.mask is not None:
        row["mask"] = mask_image(item.mask, (width, height), (rw, rh), (left, top), bucket, config)
    elif alpha is not None:
        row["mask"] = encode(fit(alpha, (rw, rh), (left, top), bucket), "png", 0)
    return row


def process_item(item: SourceItem) -> dict | Skipped:
    """Worker entry point: a shard row, or the reason this input is skipped."""
    try:
        return build_row(item, CONFIG)
    except Rejected as rejected:
        return Skipped(item.key, item.path, rejected.reason, rejected.detail)
