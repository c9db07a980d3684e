"""The digits imagefolder: what training reads must be complete, described by its captions and reproducible."""

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from datasets_prep.digits import DIGIT_WORDS, write_digits_dataset

REPO = Path(__file__).resolve().parents[1]


def rows(folder: Path) -> list[dict]:
    """metadata.jsonl as a list of records."""
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_writes_n_images_with_captions(tmp_path):
    assert write_digits_dataset(tmp_path, n=20, size=16) == 20
    records = rows(tmp_path)
    assert len(records) == 20
    for record in records:
        assert (tmp_path / record["file_name"]).is_file()
        assert any(f"digit {word} in" in record["text"] for word in DIGIT_WORDS)
        image = Image.open(tmp_path / record["file_name"])
        assert (image.mode, image.size) == ("RGB", (16, 16))


def test_same_seed_gives_byte_identical_files(tmp_path):
    write_digits_dataset(tmp_path / "a", n=10, size=16, seed=3)
    write_digits_dataset(tmp_path / "b", n=10, size=16, seed=3)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 11
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    write_digits_dataset(tmp_path / "c", n=10, size=16, seed=4)
    assert rows(tmp_path / "c") != rows(tmp_path / "a")


def test_rerun_overwrites_and_drops_stale_images(tmp_path):
    write_digits_dataset(tmp_path, n=12, size=16)
    first = rows(tmp_path)
    write_digits_dataset(tmp_path, n=5, size=16)
    assert rows(tmp_path) == first[:5]
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"{k:05d}.png" for k in range(5)]


def test_loads_as_imagefolder(tmp_path):
    from datasets import load_dataset

    write_digits_dataset(tmp_path / "data", n=6, size=16)
    dataset = load_dataset("imagefolder", data_dir=str(tmp_path / "data"), split="train", cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 6
    assert dataset[0]["image"].size == (16, 16) and dataset[0]["text"].startswith("a handwritten digit")


def test_cli_writes_dataset(tmp_path):
    args = [sys.executable, "-m", "datasets_prep", "digits", "--out", str(tmp_path), "--n", "20"]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    records = rows(tmp_path)
    assert len(records) == 20
    assert Image.open(tmp_path / records[0]["file_name"]).size == (64, 64)


def test_cli_bad_argument_exits_2(tmp_path):
    args = [sys.executable, "-m", "datasets_prep", "digits", "--out", str(tmp_path), "--n", "0"]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert "--n" in result.stderr and "Traceback" not in result.stderr
