"""Decode one image defensively: every bad file becomes a Rejected reason, every good one upright 8-bit RGB."""

import io
import warnings
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ORIENTATION = 0x0112  # EXIF tag
SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees, so width and height swap
GREY_16 = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
WHITE = (255, 255, 255, 255)


class Rejected(Exception):
    """An input we skip: `reason` is the report's key, `detail` the message for skipped.jsonl."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@contextmanager
def pil_limits(max_pixels: int):
    """Make PIL refuse images over our limit and keep its warnings from escaping.

    PIL warns above MAX_IMAGE_PIXELS and raises only above twice that; turning the warning into an error makes
    --max-pixels the one limit. Other PIL warnings (odd EXIF, palette transparency) are noise here.
    """
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def failure(error: Exception) -> Rejected:
    """Name a decoder exception: a bomb, or a corrupt file (PIL raises OSError, SyntaxError, ValueError, ...)."""
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return Rejected("too_many_pixels", f"{error} (--max-pixels)")
    return Rejected("corrupt", f"{type(error).__name__}: {error}")


def open_image(data: bytes, max_pixels: int, min_size: int) -> Image.Image:
    """Read only the header and check the size, so a decompression bomb is refused before any pixel is decoded."""
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # its message holds an object address; keep skipped.jsonl reproducible
        raise Rejected("not_an_image", "PIL recognises no image format in this file") from None
    except Exception as error:  # a damaged header raises anything from SyntaxError to struct.error
        raise failure(error) from None
    width, height = image.size
    if width * height > max_pixels:
        raise Rejected("too_many_pixels", f"{width}x{height} = {width * height} pixels > --max-pixels {max_pixels}")
    if min(width, height) < min_size:
        raise Rejected("too_small", f"{width}x{height}: short side under --min-size {min_size}")
    return image


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) once EXIF orientation is applied, known from the header so buckets are chosen before decoding."""
    try:
        orientation = image.getexif().get(ORIENTATION, 1)
    except Exception:  # unreadable EXIF: decode() applies the same tag and reports the file if it fails there
        orientation = 1
    width, height = image.size
    return (height, width) if orientation in SWAPS_SIDES else (width, height)


def decode(image: Image.Image, upright_target: tuple[int, int] | None = None) -> Image.Image:
    """Decode the pixels and apply EXIF orientation before anything else, so later sizes refer to the upright image.

    With `upright_target`, a JPEG is decoded at a reduced DCT scale no smaller than twice the target (PIL's
    thumbnail does the same): large photos decode several times faster with no visible loss after resizing.
    """
    try:
        if upright_target and image.format in ("JPEG", "MPO"):  # MPO: camera JPEGs with a preview frame
            tw, th = upright_target
            if upright_size(image) != image.size:  # the draft is asked for in stored, not upright, orientation
                tw, th = th, tw
            image.draft(None, (2 * tw, 2 * th))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return image
    except Exception as error:  # decoders raise OSError (truncated), SyntaxError, ValueError, zlib.error, ...
        raise failure(error) from None


def grey16_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit grey to 8-bit by v / 257 (65535 -> 255); PIL's own convert clips everything above 255 to white.

    Mode "I" (32-bit) is how PIL opened 16-bit PNGs for years, so it is read as 16-bit too, clipped to 0..65535.
    """
    values = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
    grey = np.round(values / 257).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def on_white(image: Image.Image) -> Image.Image:
    """Composite over white, so transparent areas train as white rather than whatever colour the hidden pixels hold."""
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")


def has_alpha(image: Image.Image) -> bool:
    """Alpha channel, or a tRNS/transparency entry on a palette, grey or RGB image."""
    return image.mode in ("RGBA", "LA", "PA") or (
        image.mode in ("P", "L", "RGB", "1") and image.info.get("transparency") is not None)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: CMYK converted, 16-bit scaled, alpha and transparency composited on white."""
    try:
        if image.mode in GREY_16:
            return grey16_to_rgb(image)
        if image.mode == "La":  # premultiplied: PIL converts it only to LA, which un-premultiplies
            image = image.convert("LA")
        elif image.mode == "RGBa":
            image = image.convert("RGBA")
        if has_alpha(image):
            return on_white(image)
        return image if image.mode == "RGB" else image.convert("RGB")
    except ValueError as error:  # e.g. LAB has no conversion to RGB without a colour profile
        raise Rejected("unsupported_mode", f"{image.mode}: {error}") from None
