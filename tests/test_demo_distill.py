"""The world-v2 distillation chain (launch/demo_distill.py): four students trained and scored against the
teacher, a table, a plot and #24's and #25's verdicts read off the right rows."""
import json

import pytest

FAST = ("train.report_to=none", "validation.every_steps=0", "data.num_workers=0", "train.batch_size=2")


def result(rows: dict[int, tuple[float, float]]) -> dict:
    """An evaluate()-shaped result whose runs carry only what the verdicts read: steps -> (all, coverage)."""
    return {"runs": [{"steps": n, "adherence": {"all": a}, "coverage": {"coverage": c}, "fd": 0.0}
                     for n, (a, c) in rows.items()]}


def test_verdicts_read_the_acceptance_of_issue_24_off_the_right_rows():
    from launch.demo_distill import verdicts

    results = {"teacher/dpmpp": result({2: (0.2, 0.30), 25: (0.8, 0.10)}),
               "teacher/ddim": result({2: (0.4, 0.20), 25: (0.6, 0.10)}),
               "lcm-lora": result({4: (0.72, 0.11)}),  # at the bounds: 0.9 x 0.8 and 0.10 + 10%
               "lcm": result({2: (0.5, 0.21)}),  # against DPM-Solver++: closes 50% of 0.6 and 45% of 0.2
               "progressive": result({2: (0.49, 0.15)})}  # against DDIM: closes 45% of 0.2 and 50% of 0.1
    lines = verdicts(results)
    lcm_lora = next(line for line in lines if line.startswith("- LCM-LoRA"))
    assert "all-factor 0.72 against 0.80 (met)" in lcm_lora and "coverage 0.110 against 0.100 (met)" in lcm_lora
    lcm = next(line for line in lines if line.startswith("- full LCM"))
    assert "closes 50% of the gap, met" in lcm and "closes 45% of the gap, not met" in lcm
    progressive = next(line for line in lines if line.startswith("- progressive"))
    assert "all 0.49 (teacher 0.4 at 2, 0.6 at 25; closes 45% of the gap, not met)" in progressive
    assert "closes 50% of the gap, met" in progressive
    results["lcm-lora"] = result({4: (0.71, 0.111)})
    assert "(not met)" in verdicts(results)[0] and verdicts(results)[0].count("not met") == 2


def test_dmd2_verdicts_compare_one_step_with_its_rivals_and_four_steps_with_the_teacher_at_25():
    from launch.demo_distill import verdicts

    results = {"teacher/dpmpp": result({1: (0.1, 0.6), 2: (0.3, 0.2), 25: (0.8, 0.10)}),
               "teacher/ddim": result({25: (0.9, 0.05)}),
               "lcm-lora": result({1: (0.5, 0.09)}),
               "dmd2": result({1: (0.55, 0.095), 4: (0.72, 0.11)})}
    one = next(line for line in verdicts(results) if line.startswith("- DMD2 at 1 step"))
    assert "LCM-LoRA at 1: all 0.55 vs 0.50, coverage 0.095 vs 0.090 (not met)" in one  # coverage is worse
    assert "teacher at 1: all 0.55 vs 0.10, coverage 0.095 vs 0.600 (met)" in one and "teacher at 2" in one
    four = next(line for line in verdicts(results) if line.startswith("- DMD2 at 4 steps"))
    assert "all-factor 0.72 against 0.80 (met)" in four and "coverage 0.110 against 0.100 (met)" in four


@pytest.fixture(scope="module")
def tiny_teacher_v2(tmp_path_factory):
    from launch.demo_teacher import main

    work = tmp_path_factory.mktemp("teacher2")
    assert main(["--world", "v2", "--work", str(work / "work"), "--out", str(work / "teacher"), "--images", "64",
                 "--vae-steps", "2", "--unet-steps", "2", "--fill-steps", "2", "--scenes-steps", "2",
                 "train.batch_size=8", "ema.enabled=false",
                 "train.report_to=none", "validation.every_steps=0", "checkpoint.every_steps=0",
                 "data.num_workers=0"]) == 0
    return work / "teacher"


def test_the_chain_trains_four_students_and_scores_each_at_its_steps(tiny_teacher_v2, tmp_path):
    from launch.demo_distill import main

    out = tmp_path / "distill"
    assert main(["--teacher", str(tiny_teacher_v2), "--out", str(out), "--images", "16", "--prompts", "2",
                 "--images-per-prompt", "2",
                 *[f"--lcm-lora={o}" for o in ("train.max_steps=2", "checkpoint.every_steps=0", *FAST)],
                 *[f"--lcm={o}" for o in ("train.max_steps=2", "checkpoint.every_steps=0", *FAST)],
                 # five stages (guidance, 8, 4, 2, 1 steps) of one step, each kept: every student is scored
                 *[f"--progressive={o}" for o in ("train.max_steps=5", "checkpoint.every_steps=1", *FAST)],
                 *[f"--dmd2={o}" for o in ("train.max_steps=5", "checkpoint.every_steps=0", *FAST)]]) == 0
    table = (out / "table.md").read_text()
    for label in ("teacher, DPM-Solver++", "teacher, DDIM"):
        assert all(f"| {label} | {n} |" in table for n in (1, 2, 4, 8, 25))
    for label in ("LCM-LoRA", "full LCM", "progressive (guided)", "DMD2 LoRA"):
        assert all(f"| {label} | {n} |" in table for n in (1, 2, 4)) and f"| {label} | 8 |" not in table
    assert "- LCM-LoRA at 4 steps" in table and "- full LCM at 2 steps" in table and "- progressive" in table
    assert "- DMD2 at 1 step beats LCM-LoRA at 1" in table and "- DMD2 at 4 steps" in table
    assert (out / "quality_vs_steps.png").stat().st_size > 0
    progressive = json.loads((out / "eval" / "progressive" / "results.json").read_text())
    assert [r["steps"] for r in progressive["runs"]] == [1, 2, 4]
    assert progressive["student"].endswith("step-5")  # the last stage's student, exported from its checkpoint
    assert progressive["runs"][0]["calls_per_image"] == 1  # omega embedded: no CFG pass
    lora = json.loads((out / "eval" / "lcm-lora" / "results.json").read_text())
    assert lora["scheduler"] == "LCMScheduler" and lora["lora"].endswith("final")
    dmd2 = json.loads((out / "eval" / "dmd2" / "results.json").read_text())
    assert dmd2["scheduler"] == "LCMScheduler" and dmd2["runs"][0]["calls_per_image"] == 1  # its own, no CFG
