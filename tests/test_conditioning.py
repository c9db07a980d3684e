"""`prepare --conditioning canny`: edge maps derived at the bucket size, given conditioning images kept
(datasets_prep.conditioning, datasets_prep.process)."""

import io
import json
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from datasets_prep.__main__ import main
from datasets_prep.prepare import PrepareOptions, prepare
from datasets_prep.reader import PreparedDataset
from prep_images import write_imagefolder
from trainers.errors import UserError

# 640x420 goes to the 320x192 bucket at R=256: scaled by 1/2 to 320x210, then 9 rows cropped from the top.
# The rectangle at x 160..479, y 96..287 of the source is x 80..239, y 39..134 of the bucket.
SOURCE_SIZE, RECTANGLE, IN_BUCKET = (640, 420), (160, 96, 480, 288), (80, 39, 240, 135)
OWN = (10, 200, 30)  # colour of the conditioning image that record "own.png" brings along
OPTIONS = PrepareOptions(resolution=256, image_format="png", conditioning="canny")


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def rectangle_picture() -> Image.Image:
    image = Image.new("RGB", SOURCE_SIZE, (60, 60, 60))
    image.paste((220, 220, 220), RECTANGLE)
    return image


def write_source(root):
    """An imagefolder: a rectangle without a conditioning image, and a picture with its own (flat green)."""
    samples = [("rect.png", png(rectangle_picture()), "a grey rectangle"),
               ("own.png", png(Image.new("RGB", (320, 192), (90, 40, 200))), "a purple field")]
    source = write_imagefolder(root, samples)
    Image.new("RGB", (320, 192), OWN).save(root / "images" / "own_hint.png")
    lines = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    lines[1]["conditioning_image"] = "images/own_hint.png"
    (root / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return source


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("canny")
    prepare([str(write_source(root / "src"))], root / "out", OPTIONS)
    dataset = PreparedDataset(root / "out")
    return {r["key"]: r for r in (dataset.record(i) for i in range(len(dataset)))}


def test_edges_lie_on_the_rectangle_border_only(records):
    record = records["images/rect.png"]
    edges = np.asarray(record["conditioning_image"])  # (H, W, 3)
    assert record["conditioning_image"].size == (record["width"], record["height"]) == (320, 192)
    assert (edges[..., 0] == edges[..., 1]).all() and (edges[..., 0] == edges[..., 2]).all()
    assert set(np.unique(edges)) == {0, 255}  # white on black, nothing between
    x0, y0, x1, y1 = IN_BUCKET
    band = np.zeros(edges.shape[:2], bool)  # pixels within 2 px of the rectangle's border
    band[y0 - 2:y1 + 2, x0 - 2:x1 + 2] = True
    band[y0 + 2:y1 - 2, x0 + 2:x1 - 2] = False
    white = edges[..., 0] == 255
    assert white.any() and not (white & ~band).any()
    # ...and the whole border is drawn: each column has an edge near the top and bottom, each row near both sides
    assert white[y0 - 2:y0 + 3, x0:x1].any(axis=0).all() and white[y1 - 3:y1 + 2, x0:x1].any(axis=0).all()
    assert white[y0:y1, x0 - 2:x0 + 3].any(axis=1).all() and white[y0:y1, x1 - 3:x1 + 2].any(axis=1).all()


def test_edges_are_found_on_the_stored_image(records):
    """Derived after resize and crop: Canny on the (lossless) stored image gives the stored edge map exactly."""
    record = records["images/rect.png"]
    expected = cv2.Canny(np.asarray(record["image"]), 100, 200)
    assert (np.asarray(record["conditioning_image"])[..., 0] == expected).all()


def test_a_given_conditioning_image_is_kept(records):
    hint = records["images/own.png"]["conditioning_image"]
    assert hint.size == (320, 192) and set(hint.getdata()) == {OWN}


def test_thresholds_are_parameters_of_the_output(tmp_path):
    source = write_source(tmp_path / "src")
    prepare([str(source)], tmp_path / "out", OPTIONS)
    params = json.loads((tmp_path / "out" / "progress.json").read_text())["params"]
    assert (params["conditioning"], params["canny_low"], params["canny_high"]) == ("canny", 100, 200)
    with pytest.raises(UserError, match="canny_high: 200 -> 150"):
        prepare([str(source)], tmp_path / "out", PrepareOptions(**{**vars(OPTIONS), "canny_high": 150}))
    with pytest.raises(UserError, match="conditioning: 'canny' -> None"):
        prepare([str(source)], tmp_path / "out", PrepareOptions(resolution=256, image_format="png"))
    assert "conditioning" not in PrepareOptions().params([str(source)])  # older outputs still resume


def test_two_workers_derive_the_same_edges(records, tmp_path):
    prepare([str(write_source(tmp_path / "src"))], tmp_path / "out", OPTIONS, workers=2)
    dataset = PreparedDataset(tmp_path / "out")
    for record in (dataset.record(i) for i in range(len(dataset))):
        assert record["conditioning_image"].tobytes() == records[record["key"]]["conditioning_image"].tobytes()


def test_missing_opencv_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # makes `import cv2` raise ImportError
    with pytest.raises(UserError, match="pip install opencv-python-headless"):
        prepare([str(write_source(tmp_path / "src"))], tmp_path / "out", OPTIONS)


@pytest.mark.parametrize("flags, message", [
    (["--canny-low", "50"], "apply only with --conditioning canny"),
    (["--conditioning", "canny", "--canny-low", "220"], "need 0 <= low <= high"),
])
def test_cli_refuses_bad_canny_flags(tmp_path, capsys, flags, message):
    source = write_source(tmp_path / "src")
    assert main(["prepare", "--source", str(source), "--out", str(tmp_path / "out"), *flags]) == 2
    assert message in capsys.readouterr().err


def test_cli_derives_edges(tmp_path):
    source = write_source(tmp_path / "src")
    argv = ["prepare", "--source", str(source), "--out", str(tmp_path / "out"), "--resolution", "256",
            "--workers", "1", "--conditioning", "canny", "--canny-low", "50", "--canny-high", "150"]
    assert main(argv) == 0
    record = PreparedDataset(tmp_path / "out").record(0)
    assert record["key"] == "images/rect.png" and record["conditioning_image"].size == (320, 192)
