"""Sliced Wasserstein distance between two sets of images: how far generated images are from real ones.

SW_1(A, B) = E_theta W_1(<theta, A>, <theta, B>) over unit directions theta (Rabin et al. 2011; Bonneel et al.
2015), estimated with a fixed, seeded set of directions so the same sets always give the same number. Images are
flattened float vectors in [0, 1], compared at each level of a small pyramid (full resolution for edges and
texture, 4x average-pooled for layout and colour), and the levels averaged.

Scale: projections are multiplied by sqrt(pi / 2), which makes the distance between two one-image sets their
RMS pixel difference (in expectation over directions, for images of more than a few dozen values). So 0 means
identical sets, and a value reads like a per-pixel error on a 0..1 scale. For 100 rendered shapes (32 or 64
px): the same prompts rendered with other seeds are about 0.015 away, other prompts 0.04, uniform noise 0.14.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

PROJECTIONS = 256           # directions per level; the estimate's spread shrinks as 1/sqrt(this)
LEVELS = (1, 4)             # average-pooling factors of the pyramid: full resolution, then 4x coarser
SCALE = np.sqrt(np.pi / 2)  # E|<theta, v>| ~ |v| * sqrt(2 / (pi * D)) for a random unit theta in D dimensions


def as_array(images) -> np.ndarray:
    """(N, H, W, 3) float32 in [0, 1] from a list of PIL images or uint8 arrays."""
    arrays = [np.asarray(i.convert("RGB") if isinstance(i, Image.Image) else i, dtype=np.float32) for i in images]
    if not arrays:
        raise ValueError("need at least one image per set")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images of one set must share a size; got {sorted(shapes)}")
    return np.stack(arrays) / 255.0


def pool(x: np.ndarray, factor: int) -> np.ndarray:
    """Average-pool (N, H, W, C) by `factor` in both directions (H and W cropped to a multiple of it)."""
    if factor == 1:
        return x
    n, h, w, c = x.shape
    h, w = h // factor * factor, w // factor * factor
    return x[:, :h, :w].reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


@lru_cache(maxsize=8)
def directions(dim: int, count: int, seed: int) -> np.ndarray:
    """(dim, count) unit vectors, uniform on the sphere (normalised Gaussians), the same for the same arguments."""
    theta = np.random.default_rng([seed, dim]).standard_normal((dim, count))
    return (theta / np.linalg.norm(theta, axis=0)).astype(np.float32)


def quantiles(projected: np.ndarray, count: int) -> np.ndarray:
    """(count, P) quantiles at (k + 0.5) / count: exactly the sorted values when count == N, so equal-size sets
    are matched point to point, and interpolated when the sets differ in size."""
    q = (np.arange(count) + 0.5) / count
    return np.quantile(projected, q, axis=0, method="hazen")


def sliced_wasserstein_level(a: np.ndarray, b: np.ndarray, projections: int, seed: int) -> float:
    """SW_1 between two (N, ...) float arrays flattened to vectors."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    theta = directions(a.shape[1], projections, seed)
    count = max(len(a), len(b))
    gap = quantiles(a @ theta, count) - quantiles(b @ theta, count)  # (count, P)
    return float(SCALE * np.abs(gap).mean())


def sliced_wasserstein_levels(a, b, projections: int = PROJECTIONS, seed: int = 0,
                              levels: tuple[int, ...] = LEVELS) -> list[float]:
    """SW_1 at each pyramid level, finest first; images are PIL or uint8 arrays, both sets of one size."""
    a, b = as_array(a), as_array(b)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"the two sets differ in image size: {a.shape[1:]} vs {b.shape[1:]}")
    return [sliced_wasserstein_level(pool(a, f), pool(b, f), projections, seed) for f in levels]


def sliced_wasserstein(a, b, projections: int = PROJECTIONS, seed: int = 0,
                       levels: tuple[int, ...] = LEVELS) -> float:
    """Mean over pyramid levels of SW_1 between image sets a and b (see the module docstring for the scale)."""
    return float(np.mean(sliced_wasserstein_levels(a, b, projections, seed, levels)))
