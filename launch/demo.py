"""`make demo`: the embedded benchmark chain on CPU, starting from the committed demo teacher.

1. Synthetic data: purple shapes (a colour the teacher never saw) and prior images of colours it knows.
2. A LoRA that teaches the teacher purple (recipes/demo/shapes_concept_lora_tiny.yaml).
3. An LCM-LoRA distilled from the teacher on the prior images (recipes/demo/sd15_lcm_lora_tiny.yaml).
4. A ControlNet that places the teacher's shapes where an edge map draws them (recipes/demo/sd15_controlnet_tiny.yaml).
5. The evaluator (launch/evaluate.py) on the teacher and on teacher + LoRA, for old prompts and for purple
   ones, the teacher's adherence against its number of sampling steps, the LCM-LoRA student's, and the
   ControlNet's from edge maps alone (empty prompts) against the teacher's from empty prompts.
6. demo_out/report.md: metric tables, sample grids, the loss curve and the adherence-against-steps plot.

Re-running resumes or reuses what exists. The teacher is assets/demo_teacher (launch/demo_teacher.py rebuilds it).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from launch.cli import run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "assets" / "demo_teacher"
RECIPE = ROOT / "recipes" / "demo" / "shapes_concept_lora_tiny.yaml"
LCM_RECIPE = ROOT / "recipes" / "demo" / "sd15_lcm_lora_tiny.yaml"
CONTROLNET_RECIPE = ROOT / "recipes" / "demo" / "sd15_controlnet_tiny.yaml"
EDGE_IMAGES = 4096  # the ControlNet's shapes with outlines: more than the LoRA's, it learns a whole new input
LCM_STEPS = (1, 2, 4)  # an LCM student samples in few steps; beyond that it does not improve
CONCEPT = {"colour": "purple"}  # held out of the teacher's data (launch/demo_teacher.py HELD_OUT)
SCHEDULER, GUIDANCE = "dpmpp", 3.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=Path("demo_out"), type=Path)
    parser.add_argument("--teacher", default=TEACHER, type=Path, help="the demo teacher pipeline folder")
    parser.add_argument("--images", type=int, default=512, help="purple images, and as many prior images")
    parser.add_argument("--prompts", type=int, default=20, help="held-out prompts per evaluation")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--steps", default="1,2,4,8,25", help="sampling steps the teacher is scored at")
    parser.add_argument("--lcm", action="append", default=[], metavar="KEY=VALUE",
                        help="a dotted override of the LCM-LoRA recipe (repeatable), e.g. --lcm train.max_steps=50")
    parser.add_argument("--controlnet", action="append", default=[], metavar="KEY=VALUE",
                        help="a dotted override of the ControlNet recipe (repeatable)")
    parser.add_argument("--edge-images", type=int, default=EDGE_IMAGES, help="shapes with outlines for the ControlNet")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the LoRA recipe, e.g. train.max_steps=50")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from trainers.errors import UserError

    if not (args.teacher / "model_index.json").is_file():
        raise UserError(f"no demo teacher at {args.teacher}; build one with `python launch/demo_teacher.py "
                        f"--out {args.teacher}` (about an hour on CPU)")
    out = args.out
    data = write_data(out / "data", args.images)
    final, run = train_lora(args.teacher, data, out / "runs" / "concept_lora", args.overrides)
    lcm_final = train(LCM_RECIPE, [f"model.pretrained={args.teacher}", f"data.source={data['prior']}",
                                   f"output_dir={out / 'runs' / 'lcm_lora'}", *args.lcm])
    edges = write_edges(out / "data" / "edges", args.edge_images)
    controlnet_final = train(CONTROLNET_RECIPE, [
        f"model.pretrained={args.teacher}", f"data.source={edges}", f"output_dir={out / 'runs' / 'controlnet'}",
        f"validation.conditioning_images=[{edges / 'conditioning' / '00000.png'}, {edges / 'conditioning' / '00001.png'}]",
        *args.controlnet])
    steps = [int(s) for s in args.steps.split(",")]
    evaluations = evaluate_all(args.teacher, final, steps, args.prompts, args.images_per_prompt)
    evaluations |= evaluate_lcm(args.teacher, lcm_final, [s for s in steps if s in LCM_STEPS] or [min(steps)],
                                args.prompts, args.images_per_prompt)
    evaluations |= evaluate_controlnet(args.teacher, controlnet_final, max(steps), args.prompts, args.images_per_prompt)
    from launch.demo_report import write_report

    report = write_report(out, run, evaluations, CONCEPT)
    print(f"demo done: LoRA in {final}, report in {report}")
    return 0


def write_data(where: Path, n: int) -> dict[str, Path]:
    """The concept's images and the prior's, each written once (seeds apart from the teacher's data, seed 0)."""
    from datasets_prep.synth import write_synth_dataset

    sets = {"purple": (1, {"only": CONCEPT}), "prior": (2, {"exclude": CONCEPT})}
    paths = {}
    for name, (seed, rule) in sets.items():
        paths[name] = where / name
        summary = paths[name] / "factors.json"
        if not summary.is_file() or json.loads(summary.read_text())["n"] != n:
            write_synth_dataset(paths[name], n=n, size=32, seed=seed, **rule)
    return paths


def write_edges(where: Path, n: int) -> Path:
    """Shapes of the colours the teacher knows, with their outlines (conditioning/), written once."""
    from datasets_prep.synth import write_synth_dataset

    summary = where / "factors.json"
    if not summary.is_file() or json.loads(summary.read_text())["n"] != n:
        write_synth_dataset(where, n=n, size=32, seed=3, edges=True, exclude=CONCEPT)
    return where


def train_lora(teacher: Path, data: dict[str, Path], run: Path, overrides: list[str]) -> tuple[Path, Path]:
    final = train(RECIPE, [f"model.pretrained={teacher}", f"data.source={data['purple']}",
                           f"data.extra_sources=[{{source: {data['prior']}}}]", f"output_dir={run}", *overrides])
    return final, run


def train(recipe_path: Path, overrides: list[str]) -> Path:
    from trainers.config import load_recipe
    from trainers.engine import Trainer

    return Trainer(load_recipe(recipe_path, overrides)).fit().final_dir  # a finished run resumes and re-exports


def evaluate_all(teacher: Path, lora: Path, steps: list[int], prompts: int, per_prompt: int) -> dict:
    """Teacher and teacher + LoRA on old prompts and on the concept's, the teacher at every step count."""
    from launch.evaluate import evaluate, load_pipeline

    common = dict(scheduler=SCHEDULER, guidance=GUIDANCE, prompts=prompts, images_per_prompt=per_prompt)
    most = [max(steps)]
    pipe = load_pipeline(teacher, None, "auto")
    results = {"teacher/old": evaluate(pipe, steps, exclude=CONCEPT, **common),
               "teacher/new": evaluate(pipe, most, only=CONCEPT, **common)}
    pipe = load_pipeline(teacher, lora, "auto")
    results |= {"lora/old": evaluate(pipe, most, exclude=CONCEPT, **common),
                "lora/new": evaluate(pipe, steps, only=CONCEPT, **common)}
    return results


def evaluate_lcm(teacher: Path, lcm_lora: Path, steps: list[int], prompts: int, per_prompt: int) -> dict:
    """The LCM-LoRA student on the old prompts: LCMScheduler, no CFG pass (guidance is distilled in)."""
    from launch.evaluate import evaluate, load_pipeline

    pipe = load_pipeline(teacher, lcm_lora, "auto")
    return {"lcm-lora/old": evaluate(pipe, steps, scheduler="lcm", guidance=1.0, exclude=CONCEPT, prompts=prompts,
                                     images_per_prompt=per_prompt)}


def evaluate_controlnet(teacher: Path, controlnet: Path, steps: int, prompts: int, per_prompt: int) -> dict:
    """From empty prompts, the teacher alone and the teacher with the ControlNet on each prompt's edge map; and the
    ControlNet with the full prompts (it must not cost the colour and background only the prompt names)."""
    from launch.evaluate import evaluate, load_pipeline

    common = dict(scheduler=SCHEDULER, guidance=GUIDANCE, prompts=prompts, images_per_prompt=per_prompt,
                  exclude=CONCEPT)
    results = {"teacher/empty": evaluate(load_pipeline(teacher, None, "auto"), [steps], captions="empty", **common)}
    pipe = load_pipeline(teacher, None, "auto", controlnet=controlnet)
    for captions in ("empty", "full"):
        results[f"controlnet/{captions}"] = evaluate(pipe, [steps], captions=captions, controlnet=controlnet, **common)
    return results


if __name__ == "__main__":
    sys.exit(run_cli(main))
