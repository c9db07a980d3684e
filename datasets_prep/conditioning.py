"""ControlNet conditioning images derived from the image itself, for sources that do not carry their own.

`canny`: Canny's edge detector (Canny 1986) through OpenCV, run on the final RGB pixels at the bucket size,
as diffusers' ControlNet examples run it on the image they feed the pipeline: white edges on black, 3 channels.
OpenCV is imported only here and only when --conditioning is used, so other runs do not need it.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from trainers.errors import UserError

KINDS = ("canny",)


def opencv():
    """cv2, or a UserError that says which package provides it."""
    try:
        import cv2
    except ImportError:
        raise UserError("--conditioning canny needs OpenCV: pip install opencv-python-headless") from None
    return cv2


def check(kind: str, low: int, high: int) -> None:
    """Refuse an unknown kind or thresholds Canny cannot use, before any input is read; and make sure of cv2."""
    if kind not in KINDS:
        raise UserError(f"--conditioning: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not 0 <= low <= high:
        raise UserError(f"--canny-low/--canny-high: need 0 <= low <= high, got {low} and {high}")
    opencv()


def canny(image: Image.Image, low: int, high: int) -> Image.Image:
    """Edge map of an RGB image: 255 where cv2.Canny finds an edge, 0 elsewhere, repeated on 3 channels.

    Hysteresis thresholds on the Sobel gradient magnitude (3x3, L1 norm, the largest over the colour channels):
    pixels above `high` start an edge, pixels above `low` connected to one continue it.
    """
    edges = opencv().Canny(np.asarray(image), low, high)  # (H, W) uint8, 0 or 255
    return Image.fromarray(edges, "L").convert("RGB")


def derive(image: Image.Image, kind: str, low: int, high: int) -> Image.Image:
    """The conditioning image of kind `kind` for `image` (already resized and cropped to its bucket)."""
    if kind == "canny":
        return canny(image, low, high)
    raise ValueError(f"unknown conditioning kind {kind!r}")  # check() refuses it earlier
