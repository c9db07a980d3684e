"""The shapes benchmark's evaluator: analysis recovers rendered factors, noise scores at chance, SWD orders sets,
and launch/evaluate.py scores a real pipeline folder, counting denoiser calls."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets_prep.synth import COLOURS, FACTORS, draw_factors, render
from datasets_prep.synth_analysis import ALL, ALL_BUT_POSITION, CHANCE, SCORED, adherence, analyse, score
from datasets_prep.synth_distance import sliced_wasserstein
from launch.cli import run_cli
from launch.evaluate import WORLD2_KEYS, evaluate, load_pipeline, main

REPO = Path(__file__).resolve().parents[1]
CHANCE_MARGIN = 0.15  # noise may beat a fixed guess by luck of the draw, never by much


def rendered(n: int, side: int, seed: int) -> tuple[list, list[dict]]:
    """n rendered images with their factors, drawn as synth's dataset draws them (every factor uniform)."""
    drawn = [draw_factors(seed, i) for i in range(n)]
    return [render(factors, side, render_seed) for factors, render_seed in drawn], [f for f, _ in drawn]


def noise(n: int, side: int, seed: int) -> list[np.ndarray]:
    """Uniformly random RGB pixels."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("side, n", [(32, 300), (64, 120)])
def test_rendered_images_are_scored_right_on_every_factor(side, n):
    images, factors = rendered(n, side, seed=7)
    assert {f["background"] for f in factors} == set(FACTORS["background"])
    rates, _ = adherence(images, factors)
    assert all(rate >= 0.98 for rate in rates.values()), rates


def test_noisy_speckled_renders_still_score_right():
    """Generated images are noisy: Gaussian pixel noise and stray saturated pixels must not move the verdict."""
    images, factors = rendered(150, 32, seed=11)
    rng = np.random.default_rng(0)
    noisy = []
    for image in images:
        pixels = np.asarray(image, dtype=float) + rng.normal(0, 20, (32, 32, 3))
        ys, xs = rng.integers(0, 32, (2, 6))
        pixels[ys, xs] = list(COLOURS.values())[rng.integers(len(COLOURS))]  # speckle of one shape colour
        noisy.append(np.clip(pixels, 0, 255).astype(np.uint8))
    rates, _ = adherence(noisy, factors)
    assert all(rate >= 0.95 for rate in rates.values()), rates


def test_uniform_noise_scores_no_better_than_chance():
    """Chance = a fixed guess against uniform factors: shape 1/4, colour 1/5, size 1/2, position 1/9,
    background 1/3, all 1/360, all but position 1/40."""
    _, factors = rendered(200, 32, seed=8)
    rates, detections = adherence(noise(200, 32, seed=1), factors)
    assert CHANCE["shape"] == 0.25 and CHANCE["position"] == pytest.approx(1 / 9)
    assert all(rates[k] <= CHANCE[k] + CHANCE_MARGIN for k in rates), rates
    assert all(d["shape"] is None for d in detections)  # a noise blob fits no template


@pytest.mark.parametrize("factor", SCORED)
def test_a_wrong_factor_is_scored_wrong_for_that_factor_only(factor):
    for index in range(12):
        expected, seed = draw_factors(21, index)
        values = FACTORS[factor]
        drawn = dict(expected, **{factor: values[(values.index(expected[factor]) + 1 + index) % len(values)]})
        if drawn[factor] == expected[factor]:
            continue
        hits = score(analyse(render(drawn, 32, seed)), expected)
        assert hits == {**{k: k != factor for k in SCORED}, "all": factor not in ALL,
                        "all_but_position": factor not in ALL_BUT_POSITION}, (drawn, expected)


def test_blank_background_has_no_shape_and_none_never_matches():
    factors = {"shape": "circle", "colour": "red", "size": "small", "position": "center", "background": "dark grey"}
    detected = analyse(Image.new("RGB", (32, 32), (70, 70, 70)))
    assert [detected[k] for k in ALL] == [None] * 4 and detected["background"] == "dark grey"
    assert score(detected, factors) == {**{k: k == "background" for k in SCORED}, "all": False,
                                        "all_but_position": False}


def test_swd_is_zero_for_identical_sets_and_orders_real_other_seeds_noise():
    real, _ = rendered(100, 32, seed=3)
    drawn = [draw_factors(3, i) for i in range(100)]
    other_seeds = [render(f, 32, s + 1) for f, s in drawn]
    assert sliced_wasserstein(real, real) == 0.0
    near, far = sliced_wasserstein(real, other_seeds), sliced_wasserstein(real, noise(100, 32, seed=2))
    assert near == sliced_wasserstein(real, other_seeds)  # fixed directions: the same sets, the same number
    assert 0 < near < far / 5, (near, far)
    assert sliced_wasserstein(real, other_seeds[:37]) > 0  # sets of different sizes compare through quantiles


def test_swd_of_two_single_images_is_their_rms_difference():
    a, b = (np.asarray(render(draw_factors(5, i)[0], 32, i), dtype=float) for i in range(2))
    rms = np.sqrt(np.mean((a - b) ** 2)) / 255
    assert sliced_wasserstein([a.astype(np.uint8)], [b.astype(np.uint8)], levels=(1,)) == pytest.approx(rms, rel=0.1)


def test_real_mode_writes_perfect_scores_and_a_grid(tmp_path):
    assert run_cli(main, ["--real", "--prompts", "5", "--images-per-prompt", "2", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["real"]["adherence"].values()) == {1.0} and results["runs"] == []
    assert Image.open(tmp_path / "grid-real.png").size == (2 * 32, 5 * 32)


def test_evaluate_script_on_a_tiny_pipeline(tiny_sd15, tmp_path):
    """The script as a user runs it: 2 prompts x 1 image at steps 1 and 2, with CFG (one batched call per step)."""
    out = tmp_path / "eval"
    done = subprocess.run([sys.executable, "launch/evaluate.py", "--pipeline", str(tiny_sd15), "--resolution", "64",
                           "--prompts", "2", "--images-per-prompt", "1", "--steps", "1,2", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    assert len(results["prompts"]) == 2 and results["scheduler"] == "DDIMScheduler"
    runs = {run["steps"]: run for run in results["runs"]}
    assert [(runs[n]["calls_per_image"], runs[n]["evaluations_per_image"]) for n in (1, 2)] == [(1, 2), (2, 4)]
    for run in runs.values():
        assert set(run["adherence"]) == {*SCORED, "all", "all_but_position"} and run["swd"] > 0
        assert run["seconds_per_image"] > 0 and len(run["detected"]) == 2
        assert Image.open(out / run["grid"]).size == (64, 2 * 64)
    table = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table] == ["| steps", "| real", "| 1", "| 2"]


def test_world_v2_real_mode_scores_full_adherence_and_the_coverage_floor(tmp_path):
    argv = ["--real", "--world", "v2", "--prompts", "6", "--images-per-prompt", "8", "--out", str(tmp_path)]
    assert run_cli(main, argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    real = results["real"]
    assert results["world"] == "v2" and len(results["specs"]) == 6
    assert all(v == 1.0 for v in real["adherence"].values() if v is not None)
    assert abs(real["coverage"]["coverage"]) < 0.1 and real["fd"] > 0 and real["swd"] > 0
    assert "| coverage | modes | SWD | FD |" in (tmp_path / "results.md").read_text()


def test_world_v2_on_a_tiny_pipeline(tiny_sd15):
    results = evaluate(tiny_sd15, [1], world="v2", prompts=2, images_per_prompt=2, resolution=64, device="cpu")
    run = results["runs"][0]
    assert results["world"] == "v2" and results["prompts"][0] != results["prompts"][1]
    assert set(run["adherence"]) == set(WORLD2_KEYS) and set(run["coverage"]) >= {"coverage", "modes"}
    assert run["fd"] > 0 and len(run["images"]) == 4 and (run["calls_per_image"], run["evaluations_per_image"]) == (1, 2)


@pytest.fixture
def coord_pipeline(tiny_sd15, tmp_path):
    """The tiny pipeline with the teacher's U-Net class (CoordUNet2DConditionModel) and v-prediction."""
    from diffusers import UNet2DConditionModel

    from trainers.backbones.coord_unet import CoordUNet2DConditionModel

    folder = tmp_path / "coord"
    shutil.copytree(tiny_sd15, folder)
    CoordUNet2DConditionModel.from_config(UNet2DConditionModel.load_config(tiny_sd15 / "unet")).save_pretrained(
        folder / "unet")
    for path, key, value in (("model_index.json", "unet", ["diffusers", "CoordUNet2DConditionModel"]),
                             ("scheduler/scheduler_config.json", "prediction_type", "v_prediction")):
        config = json.loads((folder / path).read_text())
        (folder / path).write_text(json.dumps(config | {key: value}))
    return folder


def test_evaluate_a_loaded_coord_unet_pipeline_without_guidance(coord_pipeline):
    pipe = load_pipeline(coord_pipeline, None, "cpu")
    assert type(pipe.unet).__name__ == "CoordUNet2DConditionModel"
    own = pipe.scheduler
    results = evaluate(pipe, [2], scheduler="dpmpp", guidance=1.0, prompts=1, images_per_prompt=2, resolution=64)
    run = results["runs"][0]
    assert (run["calls_per_image"], run["evaluations_per_image"]) == (2, 2)  # no CFG: one row per image per call
    assert results["prediction_type"] == "v_prediction" and results["scheduler"] == "DPMSolverMultistepScheduler"
    assert pipe.scheduler is own and len(run["images"]) == 2


@pytest.mark.parametrize("args, message", [
    (["--pipeline", "{missing}"], "pipeline folder not found"),
    (["--pipeline", "{missing}", "--only", "colour=pink"], "unknown colour 'pink'"),
    (["--pipeline", "{missing}", "--exclude", "colour"], "not of the form factor=value"),
    (["--pipeline", "{missing}", "--scheduler", "heun"], "unknown scheduler 'heun'"),
    (["--pipeline", "{missing}", "--steps", "2,0"], "--steps wants positive integers"),
    (["--pipeline", "{tiny}", "--controlnet", "{missing}"], "ControlNet folder has no config.json"),
    (["--pipeline", "{missing}", "--world", "v2", "--only", "colour=red"], "restrict world v1's factors"),
    (["--pipeline", "{missing}", "--world", "v2", "--resolution", "48"], "--world v2 renders at 32 or 64 px"),
    (["--pipeline", "{tiny}", "--world", "v2", "--controlnet", "{tiny}"], "--controlnet is scored on world v1"),
    (["--pipeline", "{missing}", "--world", "v2", "--prompts", "1", "--images-per-prompt", "1"],
     "needs at least two images"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, capsys, tiny_sd15, args, message):
    argv = [a.format(missing=tmp_path / "nothing", tiny=tiny_sd15) for a in args] + ["--out", str(tmp_path / "out")]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
