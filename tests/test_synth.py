"""The synthetic shapes benchmark: its ground truth must be recoverable from pixels, and runs reproducible."""

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets_prep.__main__ import main
from datasets_prep.synth import (BACKGROUNDS, COLOURS, FACTORS, caption, cell, draw_factors, outline, render,
                                 shape_mask, write_synth_dataset)

ALL_FACTORS = [dict(zip(FACTORS, values)) for values in itertools.product(*FACTORS.values())]


def rows(folder: Path) -> list[dict]:
    """metadata.jsonl as a list of records."""
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def files(folder: Path) -> dict[str, bytes]:
    """Every file under folder, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path):
    write_synth_dataset(tmp_path / "a", n=12, seed=3, edges=True)
    write_synth_dataset(tmp_path / "b", n=12, seed=3, edges=True)
    a = files(tmp_path / "a")
    assert len(a) == 2 * 12 + 2  # images, outlines, metadata.jsonl, factors.json
    assert a == files(tmp_path / "b")
    write_synth_dataset(tmp_path / "c", n=12, seed=4, edges=True)
    assert rows(tmp_path / "c") != rows(tmp_path / "a")


def test_smaller_n_is_a_prefix_and_rerun_drops_stale_images(tmp_path):
    write_synth_dataset(tmp_path / "big", n=20, seed=1)
    write_synth_dataset(tmp_path / "small", n=7, seed=1)
    big, small = files(tmp_path / "big"), files(tmp_path / "small")
    assert rows(tmp_path / "small") == rows(tmp_path / "big")[:7]
    assert all(small[name] == big[name] for name in small if name.startswith("images/"))
    write_synth_dataset(tmp_path / "big", n=7, seed=1)  # re-run smaller into the same folder
    assert files(tmp_path / "big").keys() == small.keys()


def test_counts_vocabularies_and_uniform_factors(tmp_path):
    assert write_synth_dataset(tmp_path, n=30, size=64) == 30
    records = rows(tmp_path)
    assert len(records) == 30 and len(list((tmp_path / "images").glob("*.png"))) == 30
    summary = json.loads((tmp_path / "factors.json").read_text())
    assert summary["factors"] == {k: list(v) for k, v in FACTORS.items()}
    for record in records:
        assert {k: record[k] for k in FACTORS} in ALL_FACTORS
        assert Image.open(tmp_path / record["file_name"]).size == (64, 64)
    drawn = [draw_factors(0, i)[0] for i in range(3000)]
    for name, values in FACTORS.items():
        counts = Counter(f[name] for f in drawn)
        expected = len(drawn) / len(values)
        assert set(counts) == set(values)
        assert all(abs(c - expected) < 0.15 * expected for c in counts.values()), (name, counts)


def test_captions_name_every_factor():
    assert caption(dict(shape="triangle", colour="red", size="small", position="top left",
                        background="light grey")) == "a small red triangle in the top left on a light grey background"
    assert "in the center" in caption(dict(ALL_FACTORS[0], position="center"))
    for factors in ALL_FACTORS:
        text = caption(factors)
        assert all(value in text for value in factors.values()), text


@pytest.mark.parametrize("size", [32, 64])
def test_shape_pixels_have_the_named_colour_and_lie_in_the_named_cell(size):
    for k, factors in enumerate(ALL_FACTORS):
        pixels = np.asarray(render(factors, size, seed=k))
        coloured = (pixels == COLOURS[factors["colour"]]).all(axis=-1)
        assert (coloured == shape_mask(factors, size, seed=k)).all(), factors
        assert (pixels[~coloured][:, 0] == pixels[~coloured][:, 2]).all()  # everything else is grey
        ys, xs = np.nonzero(coloured)
        row, col = cell(factors["position"])
        assert row * size / 3 <= ys.mean() < (row + 1) * size / 3, factors
        assert col * size / 3 <= xs.mean() < (col + 1) * size / 3, factors
        # fully inside: as many pixels as the same shape drawn in the centre, and clear of the border
        assert coloured.sum() == shape_mask(dict(factors, position="center"), size, seed=k).sum()
        assert xs.min() > 0 and ys.min() > 0 and xs.max() < size - 1 and ys.max() < size - 1


@pytest.mark.parametrize("size", [32, 64])
def test_small_and_large_differ_in_area(size):
    for shape in FACTORS["shape"]:
        base = dict(ALL_FACTORS[0], shape=shape)
        small = shape_mask(dict(base, size="small"), size, 0).sum()
        large = shape_mask(dict(base, size="large"), size, 0).sum()
        assert large > 1.8 * small, (shape, small, large)


def test_backgrounds_never_use_a_shape_colour():
    for name, seed in itertools.product(BACKGROUNDS, range(5)):
        pixels = np.asarray(render(dict(ALL_FACTORS[0], background=name), 64, seed)).astype(int)
        mask = shape_mask(ALL_FACTORS[0], 64, seed)
        background = pixels[~mask]
        assert (background.max(axis=-1) == background.min(axis=-1)).all(), name  # pure grey
        for colour in COLOURS.values():
            assert np.abs(background - np.array(colour)).max(axis=-1).min() >= 55, (name, colour)
    assert all(max(c) - min(c) >= 150 for c in COLOURS.values())  # saturated, so never mistaken for grey


def test_edges_write_outlines_of_the_same_size(tmp_path):
    write_synth_dataset(tmp_path, n=8, size=32, seed=2, edges=True)
    for record in rows(tmp_path):
        edge = np.asarray(Image.open(tmp_path / record["conditioning_image"]))
        assert edge.shape == (32, 32, 3)
        assert set(np.unique(edge)) == {0, 255}
        factors = {k: record[k] for k in FACTORS}
        mask = shape_mask(factors, 32, record["render_seed"])
        white = edge[..., 0] == 255
        assert white.any() and (white <= mask).all() and white.sum() < mask.sum()
        assert (edge == np.asarray(outline(factors, 32, record["render_seed"]))).all()


def test_cli_writes_the_dataset_and_it_loads_for_training(tmp_path):
    from trainers.config import DataConfig
    from trainers.data import build_dataset

    out = tmp_path / "synth"
    assert main(["synth", "--out", str(out), "--n", "6", "--seed", "5", "--edges"]) == 0
    records = rows(out)
    assert len(records) == 6 and (out / records[0]["conditioning_image"]).is_file()
    dataset = build_dataset(DataConfig(source=str(out), resolution=32))
    assert len(dataset) == 6
    assert dataset[(0, 1)]["caption"] == records[0]["text"]
    with pytest.raises(SystemExit):
        main(["synth", "--out", str(out), "--n", "6", "--size", "48"])


def test_only_and_exclude_restrict_factors_and_bad_rules_are_named(tmp_path):
    write_synth_dataset(tmp_path / "held", n=40, exclude={"colour": "purple"})
    assert {r["colour"] for r in rows(tmp_path / "held")} == {"red", "green", "blue", "yellow"}
    write_synth_dataset(tmp_path / "new", n=10, only={"colour": ["purple"], "shape": "cross"})
    assert {(r["colour"], r["shape"]) for r in rows(tmp_path / "new")} == {("purple", "cross")}
    assert json.loads((tmp_path / "new" / "factors.json").read_text())["factors"]["colour"] == ["purple"]
    assert main(["synth", "--out", str(tmp_path / "cli"), "--n", "5", "--exclude", "colour=purple,red"]) == 0
    assert {r["colour"] for r in rows(tmp_path / "cli")} <= {"green", "blue", "yellow"}
    for bad in (["--only", "hue=red"], ["--only", "colour=pink"], ["--exclude", "size=small,large"], ["--only", "x"]):
        assert main(["synth", "--out", str(tmp_path / "bad"), "--n", "2", *bad]) == 2
