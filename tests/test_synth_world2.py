"""World v2: captions that leave factors open, and an evaluator that scores adherence and coverage from pixels.

The evaluator's self-checks: real renders reach full adherence and a coverage distance near 0; a mode-collapsed
generator (one image per prompt), a blurred-average generator (the mean of K renders of the caption) and noise
score badly on coverage, and the last two on adherence too.
"""
import json
from collections import Counter

import numpy as np
import pytest

from datasets_prep.__main__ import main
from datasets_prep.synth_world2 import (BACKGROUNDS, OBJECT_FACTORS, PATTERN_LEVELS, caption, cell, draw_record,
                                        object_mask, relation_holds, render, scenes_for, write_world2_dataset)
from datasets_prep.synth_world2_analysis import adherence, analyse, coverage, hits
from datasets_prep.synth_world2_baselines import baselines, other_draws

K = 8


def rows(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_runs_are_reproducible_and_a_smaller_n_is_a_prefix(tmp_path):
    write_world2_dataset(tmp_path / "a", n=10, seed=4, edges=True)
    write_world2_dataset(tmp_path / "b", n=10, seed=4, edges=True)
    write_world2_dataset(tmp_path / "c", n=6, seed=4)
    write_world2_dataset(tmp_path / "d", n=10, seed=5)
    read = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if p.is_file()}
    assert all((tmp_path / "b" / name).read_bytes() == data for name, data in read.items())
    assert rows(tmp_path / "c") == [{k: v for k, v in r.items() if k != "conditioning_image"}
                                    for r in rows(tmp_path / "a")[:6]]
    assert [r["text"] for r in rows(tmp_path / "d")] != [r["text"] for r in rows(tmp_path / "a")]


def test_captions_name_exactly_what_the_spec_fixes_and_the_scene_obeys_it():
    forms, counts, open_colours = Counter(), Counter(), 0
    for i in range(600):
        spec, scene = draw_record(0, i)
        text = caption(spec)
        forms[spec["form"]] += 1
        counts[scene["count"]] += 1
        assert len(scene["objects"]) == scene["count"] == spec["count"]
        assert len({o["position"] for o in scene["objects"]}) == scene["count"]  # distinct cells
        for want, got in zip(spec["objects"], scene["objects"]):
            assert all(got[k] == v for k, v in want.items())
            open_colours += "colour" not in want
        if spec["count"] == 1:  # one object: a word of a factor is in the caption iff the spec fixes that factor
            for name in ("shape", "colour", "size", "fill"):
                named = [v for v in OBJECT_FACTORS[name] if v in text.split()]
                assert named == ([spec["objects"][0][name]] if name in spec["objects"][0] else []), (text, spec)
        if spec["relation"]:
            assert spec["relation"] in text
            assert relation_holds(spec["relation"], scene["objects"][0]["position"], scene["objects"][1]["position"])
        if spec["form"] == "count":
            assert text.startswith(("two shapes", "three shapes")) and not any(spec["objects"])
        assert (f"on a {spec['background']} background" in text) == bool(spec["background"])
        assert scene["background"] == (spec["background"] or scene["background"])
    assert set(forms) == {"list", "relation", "count"} and set(counts) == {1, 2, 3}
    assert open_colours > 300  # most objects leave their colour to chance: the caption's images are many


def test_open_factors_vary_across_draws_of_one_caption():
    spec = next(s for s, _ in (draw_record(1, i) for i in range(100)) if s["form"] == "count" and s["count"] == 2)
    scenes = scenes_for(spec, 200, seed=0)
    colours = Counter(o["colour"] for s in scenes for o in s["objects"])
    positions = Counter(o["position"] for s in scenes for o in s["objects"])
    assert set(colours) == set(OBJECT_FACTORS["colour"]) and set(positions) == set(OBJECT_FACTORS["position"])


@pytest.mark.parametrize("side", [32, 64])
def test_renders_paint_objects_in_their_cells_over_grey(side):
    for i in range(40):
        _, scene = draw_record(2, i)
        pixels = np.asarray(render(scene, side)).astype(int)
        chroma = pixels.max(axis=2) - pixels.min(axis=2)
        painted = np.zeros((side, side), dtype=bool)
        for obj in scene["objects"]:
            mask = object_mask(obj, side)
            ys, xs = np.nonzero(mask)
            row, col = cell(obj["position"])
            assert (ys * 3 // side == row).all() and (xs * 3 // side == col).all()  # inside its own cell
            assert (chroma[mask] >= 120).all()
            painted |= mask
        assert (chroma[~painted] == 0).all()  # every background pixel is grey
        if scene["background"] in ("checkered", "banded"):
            assert set(np.unique(pixels[~painted, 0])) == set(PATTERN_LEVELS)


def test_cli_writes_world_v2_and_it_loads_for_training_and_v1_options_are_refused(tmp_path):
    from trainers.config import DataConfig
    from trainers.data import build_dataset

    out = tmp_path / "v2"
    assert main(["synth", "--world", "v2", "--out", str(out), "--n", "5", "--size", "64", "--edges"]) == 0
    records = rows(out)
    assert json.loads((out / "world.json").read_text())["world"] == "v2"
    assert json.loads(records[0]["scene"])["count"] == records[0]["count"]
    dataset = build_dataset(DataConfig(source=str(out), resolution=64))
    assert dataset[(0, 1)]["caption"] == records[0]["text"]
    assert main(["synth", "--world", "v2", "--out", str(out), "--n", "2", "--exclude", "colour=red"]) == 2
    assert main(["synth", "--out", str(out), "--n", "3"]) == 0  # v1 over it: v2's world.json goes
    assert not (out / "world.json").exists() and (out / "factors.json").exists()


def test_a_curriculum_keeps_its_object_counts_and_always_names_its_attributes(tmp_path, capsys):
    """`--objects 1 --always-name fill` (the v2 teacher's fill curriculum): every scene one object whose caption
    names its fill (or says nothing of any object, never the other fill), other attributes still left open; the
    world's default stream is untouched, so every earlier v2 figure reproduces."""
    out = tmp_path / "fill"
    assert main(["synth", "--world", "v2", "--out", str(out), "--n", "60", "--objects", "1", "--always-name", "fill",
                 "--seed", "3"]) == 0
    records = rows(out)
    specs, scenes = [json.loads(r["spec"]) for r in records], [json.loads(r["scene"]) for r in records]
    assert all(s["count"] == 1 == len(sc["objects"]) for s, sc in zip(specs, scenes))
    assert all(s["objects"][0]["fill"] == sc["objects"][0]["fill"] and sc["objects"][0]["fill"] in r["text"]
               for s, sc, r in zip(specs, scenes, records))
    assert 10 < sum("colour" in s["objects"][0] for s in specs) < 50  # the rest stay open as often as before
    assert json.loads((out / "world.json").read_text())["always_named"] == ["fill"]
    assert [draw_record(3, i) for i in range(20)] == [draw_record(3, i, (1, 2, 3), ()) for i in range(20)]
    capsys.readouterr()
    assert main(["synth", "--world", "v2", "--out", str(out), "--n", "2", "--always-name", "mood"]) == 2
    assert "cannot always name mood" in capsys.readouterr().err
    assert main(["synth", "--world", "v2", "--out", str(out), "--n", "2", "--objects", "4"]) == 2
    assert "object counts must be among (1, 2, 3), got (4,)" in capsys.readouterr().err
    assert main(["synth", "--out", str(out), "--n", "2", "--objects", "1"]) == 2  # world v1 has no such option
    assert "world v2's" in capsys.readouterr().err


@pytest.fixture(scope="module")
def judged():
    specs, made = baselines(30, K)
    return {name: (adherence([analyse(i) for i in images], specs), coverage([analyse(i) for i in images], specs, K))
            for name, images in made.items()}


def test_real_renders_score_full_adherence_and_near_zero_coverage_distance(judged):
    rates, cover = judged["real"]
    assert all(v >= 0.97 for v in rates.values() if v is not None), rates
    assert rates["relation"] is not None and rates["background"] is not None
    assert abs(cover["coverage"]) <= 0.05 and cover["modes"] >= 0.9, cover


def test_a_mode_collapsed_generator_adheres_but_fails_coverage(judged):
    rates, cover = judged["collapsed"]
    assert rates["all"] >= 0.97  # every image is a real render of its caption
    assert cover["coverage"] >= 0.3 and cover["modes"] <= 0.6, cover


def test_blurred_averages_and_noise_fail_adherence_and_coverage(judged):
    for name in ("blurred", "noise"):
        rates, cover = judged[name]
        assert rates["all"] <= 0.5 and cover["coverage"] >= 0.2, (name, rates, cover)
    assert judged["noise"][0]["count"] == 0.0


def test_a_missing_object_or_a_broken_relation_is_scored_as_such():
    spec = {"count": 2, "form": "relation", "relation": "left of", "background": "dark grey",
            "objects": [{"colour": "blue", "shape": "circle"}, {"size": "small"}]}
    right = {"count": 2, "background": "dark grey", "objects": [
        {"shape": "circle", "colour": "blue", "size": "large", "fill": "plain", "position": "left"},
        {"shape": "square", "colour": "green", "size": "small", "fill": "striped", "position": "right"}]}
    assert hits(spec, analyse(render(right, 32)))["all"] == [True]
    swapped = {**right, "objects": [dict(right["objects"][0], position="right"),
                                    dict(right["objects"][1], position="left")]}
    assert hits(spec, analyse(render(swapped, 32)))["relation"] == [False]
    alone = {**right, "count": 1, "objects": right["objects"][:1]}
    found = hits(spec, analyse(render(alone, 32)))
    assert found["count"] == [False] and found["size"] == [False] and found["colour"] == [True]
    for background in BACKGROUNDS:
        assert analyse(render({**right, "background": background}, 64))["background"] == background


@pytest.mark.parametrize("side", [32, 64])
def test_noisy_speckled_renders_still_score_right(side):
    """Generated images are noisy: pixel noise (std 20) and a speckle of one object colour must not add objects,
    change a background's pattern or flip a fill."""
    from datasets_prep.synth import COLOURS

    rng = np.random.default_rng(0)
    specs, images = [], []
    for i in range(150):
        spec, scene = draw_record(11, i)
        pixels = np.asarray(render(scene, side), dtype=float) + rng.normal(0, 20, (side, side, 3))
        ys, xs = rng.integers(0, side, (2, 6))
        pixels[ys, xs] = list(COLOURS.values())[rng.integers(len(COLOURS))]
        images.append(np.clip(pixels, 0, 255).astype(np.uint8))
        specs.append(spec)
    rates = adherence([analyse(image) for image in images], specs)
    assert all(v >= 0.93 for v in rates.values()), rates


def test_frechet_distance_is_zero_for_one_set_and_matches_the_closed_form():
    from datasets_prep.synth_features import frechet

    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet(a, a) == pytest.approx(0, abs=1e-9)
    b = rng.normal(size=(4000, 3)) * 2 + 1  # N(1, 4I) against N(0, I): 3 * 1 + 3 * (1 + 4 - 2 * 2) = 6
    assert frechet(a, b) == pytest.approx(6, rel=0.1)


def test_the_committed_feature_network_orders_real_collapsed_blurred_and_noise():
    """On its features, renders of other draws of the same captions are closer than any broken generator."""
    from datasets_prep.synth_features import features, frechet, load

    net = load()
    specs, made = baselines(30, K)
    reference = features(other_draws(specs, K), net)
    distance = {name: frechet(features(images, net), reference) for name, images in made.items()}
    assert distance["real"] < 0.6 * min(distance["collapsed"], distance["blurred"], distance["noise"]), distance


def test_a_damaged_feature_network_is_one_line(tmp_path):
    from datasets_prep.synth_features import load
    from trainers.errors import UserError

    bad = tmp_path / "net.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read the feature network"):
        load(bad)
    with pytest.raises(UserError, match="not found"):
        load(tmp_path / "missing.safetensors")
