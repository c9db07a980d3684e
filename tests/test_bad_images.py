"""Bad input never crashes and is never dropped silently; odd modes become upright RGB (datasets_prep.sanitize)."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from datasets_prep import sanitize
from datasets_prep.prepare import PrepareOptions, prepare
from datasets_prep.reader import PreparedDataset
from datasets_prep.sanitize import Rejected
from prep_images import EXPECTED_SKIPS, MARKER, write_acceptance_source

OPTIONS = PrepareOptions(resolution=256, max_pixels=200_000, shard_rows=5)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The acceptance fixture prepared once; tests read its report, skips and records."""
    root = tmp_path_factory.mktemp("acceptance")
    report = prepare([str(write_acceptance_source(root / "src"))], root / "out", OPTIONS)
    return root / "out", report


def test_report_counts_match_exactly(prepared):
    out, report = prepared
    assert report["kept"] == 16 and report["inputs"] == 24 and report["duplicates"] == 1
    assert report["skipped_by_reason"] == {reason: 1 for reason in EXPECTED_SKIPS.values()}
    assert json.loads((out / "report.json").read_text()) == report
    assert sum(b["count"] for b in report["buckets"]) == 16


def test_skipped_jsonl_names_each_bad_file(prepared):
    out, _ = prepared
    lines = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {line["key"]: line["reason"] for line in lines} == EXPECTED_SKIPS
    assert all(line["path"].endswith(line["key"]) and line["detail"] for line in lines)


def test_kept_images_are_rgb_at_their_bucket_size(prepared):
    out, _ = prepared
    dataset = PreparedDataset(out)
    buckets = json.loads((out / "buckets.json").read_text())["buckets"]
    keys = set()
    for i in range(len(dataset)):
        record = dataset.record(i)
        keys.add(record["key"])
        assert record["image"].mode == "RGB"
        assert record["image"].size == (record["width"], record["height"]) == tuple(buckets[record["bucket"]])
    assert {"cmyk.jpg", "grey16.png", "rgba.png", "palette.png", "rotated.jpg", "a_dup1.jpg"} <= keys
    assert not keys & set(EXPECTED_SKIPS)


def by_key(out, key):
    dataset = PreparedDataset(out)
    return next(dataset.record(i) for i in range(len(dataset)) if dataset.record(i)["key"] == key)


def test_exif_orientation_is_applied_first(prepared):
    record = by_key(prepared[0], "rotated.jpg")
    assert (record["original_width"], record["original_height"]) == (200, 300)  # stored as 300x200
    pixels = np.asarray(record["image"], dtype=int)
    assert np.abs(pixels[4, -5] - MARKER).max() < 40, "the marker stored top-left belongs top-right"
    assert np.abs(pixels[4, 4] - MARKER).max() > 100 and np.abs(pixels[-5, -5] - MARKER).max() > 100


def test_transparency_becomes_white(prepared):
    for key in ("rgba.png", "palette.png"):
        pixels = np.asarray(by_key(prepared[0], key)["image"], dtype=int)
        assert (pixels[:, :100] >= 250).all(), key  # transparent left half
        assert pixels[:, -60:].mean(axis=(0, 1))[0 if key == "palette.png" else 1] > 190, key


def test_sixteen_bit_grey_is_scaled_not_clipped():
    grey = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert grey.mode == "I;16"
    assert np.asarray(sanitize.to_rgb(grey))[0, :, 0].tolist() == [0, 100, 255]
    as_i = Image.fromarray(np.array([[257 * 7, 65535]], dtype=np.int32))
    assert as_i.mode == "I" and np.asarray(sanitize.to_rgb(as_i))[0, :, 0].tolist() == [7, 255]


@pytest.mark.parametrize("mode,value", [("LA", (10, 0)), ("La", (10, 0)), ("PA", (0, 0)), ("RGBa", (1, 2, 3, 0))])
def test_alpha_modes_composite_on_white(mode, value):
    assert sanitize.to_rgb(Image.new(mode, (2, 2), value)).getpixel((0, 0)) == (255, 255, 255)


def test_cmyk_and_trns_convert():
    assert sanitize.to_rgb(Image.new("CMYK", (2, 2), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    rgb = Image.new("RGB", (2, 2), (1, 2, 3))
    rgb.info["transparency"] = (1, 2, 3)
    assert sanitize.to_rgb(rgb).getpixel((0, 0)) == (255, 255, 255)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge size but holds no pixel data: decoding it would allocate width*height*3 bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("max_pixels", [178_956_970, 10**12])
def test_bomb_refused_from_header(max_pixels):
    data = png_header_only(40_000, 40_000) if max_pixels < 10**12 else png_header_only(2_000_000, 1_000_000)
    with sanitize.pil_limits(max_pixels), pytest.raises(Rejected) as rejected:
        sanitize.open_image(data, max_pixels, 64)
    assert rejected.value.reason == "too_many_pixels"


def test_decoder_errors_become_reasons():
    with pytest.raises(Rejected) as rejected:
        sanitize.decode(sanitize.open_image(png_header_only(100, 100), 10**8, 1))
    assert rejected.value.reason == "corrupt"
    with pytest.raises(Rejected) as rejected:
        sanitize.open_image(b"GIF89a\x00", 10**8, 1)
    assert rejected.value.reason in ("corrupt", "not_an_image")


def test_pil_limit_restored_and_warnings_contained():
    before = Image.MAX_IMAGE_PIXELS
    with sanitize.pil_limits(123):
        assert Image.MAX_IMAGE_PIXELS == 123
    assert Image.MAX_IMAGE_PIXELS == before
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, "PNG")
    with sanitize.pil_limits(100), pytest.raises(Rejected):
        sanitize.open_image(buffer.getvalue(), 10**9, 1)  # 256 px > PIL's limit of 100: the warning is our error
