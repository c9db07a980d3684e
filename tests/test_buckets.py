"""SDXL-style buckets: sizes a U-Net takes, areas near R², nearest-aspect assignment (datasets_prep.buckets)."""

import math

import numpy as np
import pytest

from datasets_prep.buckets import cover_crop, make_buckets, nearest_bucket, sdxl_buckets


@pytest.mark.parametrize("resolution", [256, 512, 768, 1024])
def test_sdxl_bucket_properties(resolution):
    buckets = sdxl_buckets(resolution)
    assert (resolution, resolution) in buckets and len(buckets) == len(set(buckets))
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 0.9 * resolution**2 <= w * h <= resolution**2
        assert 1 / 4 <= w / h <= 4
        assert (h, w) in buckets  # portrait and landscape alike
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)


def test_sdxl_1024_matches_known_sdxl_sizes():
    buckets = sdxl_buckets(1024)
    for size in [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (1344, 768), (1536, 640), (512, 2048)]:
        assert size in buckets
    assert min(w / h for w, h in buckets) == 0.25 and max(w / h for w, h in buckets) == 4.0


def test_square_and_bad_resolutions():
    assert make_buckets("square", 512) == [(512, 512)]
    with pytest.raises(ValueError):
        make_buckets("sdxl", 500)
    with pytest.raises(ValueError):
        make_buckets("round", 512)


def test_nearest_bucket_compares_log_aspect_ratios():
    buckets = sdxl_buckets(1024)
    rng = np.random.default_rng(0)
    for w, h in rng.integers(64, 5000, size=(200, 2)):
        chosen = nearest_bucket(int(w), int(h), buckets)
        distances = [abs(math.log(bw / bh) - math.log(w / h)) for bw, bh in buckets]
        assert distances[chosen] == min(distances)
    assert buckets[nearest_bucket(4000, 1000, buckets)] == (2048, 512)
    assert buckets[nearest_bucket(1000, 1000, buckets)] == (1024, 1024)
    assert buckets[nearest_bucket(10, 1000, buckets)] == (512, 2048)  # beyond 1:4 goes to the extreme bucket


@pytest.mark.parametrize("size", [(4000, 3000), (300, 500), (1023, 1024), (100, 100), (5000, 400)])
def test_cover_crop_covers_and_centres(size):
    bucket = (832, 1216) if size[1] > size[0] else (1216, 832)
    rw, rh, left, top = cover_crop(*size, bucket)
    assert rw >= bucket[0] and rh >= bucket[1]
    assert rw == bucket[0] or rh == bucket[1]  # the scale is the larger ratio, so one side fits exactly
    assert left == (rw - bucket[0]) // 2 and top == (rh - bucket[1]) // 2
    assert abs(rw / rh - size[0] / size[1]) < 0.01 * max(rw / rh, 1)
