"""Aspect-ratio buckets: SDXL-style sizes, nearest-aspect assignment, and the cover-resize + centre crop."""

import math

STEP = 64  # bucket sides are multiples of 64 so every latent side (1/8) is a multiple of 8
MAX_RATIO = 4.0  # SDXL trains from 1:4 to 4:1
AREA_TOLERANCE = 0.10  # a bucket's area lies in [(1 - tol) * R², R²]
KINDS = ("sdxl", "square")


def sdxl_buckets(resolution: int) -> list[tuple[int, int]]:
    """One (w, h) per height: the widest multiple of 64 with w*h <= R², as in SDXL's table (Podell et al. 2023, 2.3).

    Kept only where the area is within AREA_TOLERANCE of R² and the aspect ratio within 1:4..4:1, so every
    bucket costs about the same memory; transposes are added so landscape and portrait are served alike.
    Ordered from tallest to widest.
    """
    if resolution % STEP:
        raise ValueError(f"sdxl buckets need a resolution that is a multiple of {STEP}, got {resolution}")
    area = resolution * resolution
    buckets = []
    for h in range(STEP, int(MAX_RATIO * resolution) + 1, STEP):
        w = area // h // STEP * STEP
        if w >= STEP and 1 / MAX_RATIO <= w / h <= MAX_RATIO and w * h >= (1 - AREA_TOLERANCE) * area:
            buckets.append((w, h))
    return sorted(set(buckets) | {(h, w) for w, h in buckets}, key=lambda b: b[0] / b[1])


def make_buckets(kind: str, resolution: int) -> list[tuple[int, int]]:
    """The bucket list for a --buckets choice; `square` is the single R x R bucket of SD-1.5-style training."""
    if kind == "sdxl":
        return sdxl_buckets(resolution)
    if kind == "square":
        if resolution % 8:
            raise ValueError(f"square buckets need a resolution that is a multiple of 8, got {resolution}")
        return [(resolution, resolution)]
    raise ValueError(f"unknown bucket kind {kind!r}; choose one of {', '.join(KINDS)}")


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket with the closest log aspect ratio (2:1 and 1:2 are as far from 1:1); ties pick the first."""
    target = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - target))


def cover_crop(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int, int, int]:
    """Resize that covers the bucket (scale = max(bw/w, bh/h)) and the centred crop offsets.

    Returns (resized_width, resized_height, crop_left, crop_top); the offsets are in pixels of the resized
    image, which is what SDXL's crop micro-conditioning expects.
    """
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    rw, rh = max(bw, round(width * scale)), max(bh, round(height * scale))
    return rw, rh, (rw - bw) // 2, (rh - bh) // 2
