"""`make demo`: the embedded benchmark chain on CPU, starting from the committed demo teacher.

1. Synthetic data: purple shapes (a colour the teacher never saw) and prior images of colours it knows.
2. A LoRA that teaches the teacher purple (recipes/demo/shapes_concept_lora_tiny.yaml).
3. An LCM-LoRA distilled from the teacher on the prior images (recipes/demo/sd15_lcm_lora_tiny.yaml).
4. A ControlNet that places the teacher's shapes where an edge map draws them (recipes/demo/sd15_controlnet_tiny.yaml).
5. The evaluator (launch/evaluate.py) on the teacher and on teacher + LoRA, for old prompts and for purple
   ones, the teacher's adherence against its number of sampling steps, the LCM-LoRA student's, and the
   ControlNet's from edge maps alone (empty prompts) against the teacher's from empty prompts.
6. demo_out/report.md: metric tables, sample grids, the loss curve and the adherence-against-steps plot.
7. With `--full` and a world-v2 teacher (assets/demo_teacher_v2): the distillation chain on benchmark world v2
   (launch/demo_distill.py: LCM-LoRA, full LCM and progressive students against the teacher at 1-25 steps), whose
   table and quality-vs-steps plot join the report.

By default the chain is shortened to fit 8 minutes on 2 CPU cores (FAST: fewer steps and images, the same
recipes); `--full` (`make demo FULL=1`) runs the committed recipes in full. Each keeps its runs in
runs/fast/ or runs/full/, and the report says which ran. Re-running resumes or reuses what exists.
The teacher is assets/demo_teacher (launch/demo_teacher.py rebuilds it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from launch.cli import run_cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "assets" / "demo_teacher"
RECIPE = ROOT / "recipes" / "demo" / "shapes_concept_lora_tiny.yaml"
LCM_RECIPE = ROOT / "recipes" / "demo" / "sd15_lcm_lora_tiny.yaml"
CONTROLNET_RECIPE = ROOT / "recipes" / "demo" / "sd15_controlnet_tiny.yaml"
LCM_STEPS = (1, 2, 4)  # an LCM student samples in few steps; beyond that it does not improve
CONCEPT = {"colour": "purple"}  # held out of the teacher's data (launch/demo_teacher.py HELD_OUT)
SCHEDULER, GUIDANCE = "dpmpp", 3.0


@dataclass(frozen=True)
class Plan:
    """How much the demo trains and evaluates. `seconds` is each stage's time on the 2-core CPU machine (FAST's
    measured, bench/README.md "make demo"; FULL's scaled from its step counts); it only feeds the estimate of what
    remains."""

    name: str
    images: int  # purple images, and as many prior images
    edge_images: int  # shapes with outlines for the ControlNet: more than the LoRA's, it learns a whole new input
    prompts: int
    images_per_prompt: int
    steps: str  # sampling steps the teacher is scored at
    lora: tuple[str, ...]  # overrides of each recipe: the committed recipes are the full figures
    lcm: tuple[str, ...]
    controlnet: tuple[str, ...]
    seconds: dict[str, float] = field(default_factory=dict)
    distill_v2: bool = False  # the world-v2 distillation chain (launch/demo_distill.py), when a v2 teacher exists


FULL = Plan("full", images=512, edge_images=4096, prompts=20, images_per_prompt=4, steps="1,2,4,8,25", lora=(),
            lcm=(), controlnet=(), seconds={"data": 2, "lora": 200, "lcm": 430, "edges": 5, "controlnet": 290,
                                            "evaluate": 250, "distill_v2": 2700, "report": 2}, distill_v2=True)
FAST = Plan("fast", images=512, edge_images=1024, prompts=10, images_per_prompt=4, steps="1,2,4,25",
            lora=("train.max_steps=400", "checkpoint.every_steps=400", "validation.every_steps=200"),
            lcm=("train.max_steps=120", "train.batch_size=16", "checkpoint.every_steps=120",
                 "validation.every_steps=120"),
            controlnet=("train.max_steps=160", "train.batch_size=16", "checkpoint.every_steps=160",
                        "validation.every_steps=160"),
            seconds={"data": 1, "lora": 131, "lcm": 91, "edges": 1, "controlnet": 59, "evaluate": 101, "report": 1})


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=Path("demo_out"), type=Path)
    parser.add_argument("--teacher", default=TEACHER, type=Path, help="the demo teacher pipeline folder")
    parser.add_argument("--teacher-v2", default=None, type=Path,
                        help="the world-v2 teacher the full chain distils (default assets/demo_teacher_v2)")
    parser.add_argument("--full", action="store_true",
                        help="the committed recipes' full step counts and evaluations (about 20 min on 2 cores) "
                             "instead of the shortened chain (under 8 min)")
    parser.add_argument("--images", type=int, help="purple images, and as many prior images")
    parser.add_argument("--prompts", type=int, help="held-out prompts per evaluation")
    parser.add_argument("--images-per-prompt", type=int)
    parser.add_argument("--steps", help="sampling steps the teacher is scored at, e.g. 1,2,4,25")
    parser.add_argument("--lcm", action="append", default=[], metavar="KEY=VALUE",
                        help="a dotted override of the LCM-LoRA recipe (repeatable), e.g. --lcm train.max_steps=50")
    parser.add_argument("--controlnet", action="append", default=[], metavar="KEY=VALUE",
                        help="a dotted override of the ControlNet recipe (repeatable)")
    parser.add_argument("--edge-images", type=int, help="shapes with outlines for the ControlNet")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the LoRA recipe, e.g. train.max_steps=50")
    return parser.parse_args(argv)


def plan_from(args: argparse.Namespace) -> Plan:
    """The preset, with what the command line names on top (its overrides after the preset's: the last one wins)."""
    base = FULL if args.full else FAST
    picked = {key: getattr(args, key) for key in ("images", "edge_images", "prompts", "images_per_prompt", "steps")}
    return replace(base, **{k: v for k, v in picked.items() if v is not None},
                   lora=(*base.lora, *args.overrides), lcm=(*base.lcm, *args.lcm),
                   controlnet=(*base.controlnet, *args.controlnet))


class Stages:
    """One line per finished stage: its time, the total so far, and what remains, scaled by how fast this machine
    has been against the plan's measured figures (once a minute of them has passed)."""

    def __init__(self, plan: Plan):
        self.plan, self.start, self.done = plan, time.monotonic(), []
        self.last = self.start

    def finished(self, stage: str, what: str) -> None:
        now = time.monotonic()
        self.done.append(stage)
        planned_done = sum(self.plan.seconds.get(s, 0) for s in self.done)
        left = sum(v for s, v in self.plan.seconds.items() if s not in self.done)
        pace = (now - self.start) / planned_done if planned_done >= 60 else 1.0  # a short stage says little
        print(f"[demo {len(self.done)}/{len(self.plan.seconds)}] {what}: {now - self.last:.0f} s; "
              f"{now - self.start:.0f} s so far, about {left * pace:.0f} s left", flush=True)
        self.last = now

    def elapsed(self) -> float:
        return time.monotonic() - self.start


def main(argv=None) -> int:
    args = parse_args(argv)
    from trainers.errors import UserError

    if not (args.teacher / "model_index.json").is_file():
        raise UserError(f"no demo teacher at {args.teacher}; build one with `python launch/demo_teacher.py "
                        f"--out {args.teacher}` (about an hour on CPU)")
    plan, out = plan_from(args), args.out
    runs = out / "runs" / plan.name  # the shortened and the full chain each resume only themselves
    print(f"demo ({plan.name}): " + ("the committed recipes in full" if plan.name == "full" else
                                     "shortened; `make demo FULL=1` runs the committed recipes in full"), flush=True)
    stages = Stages(plan)
    data = write_data(out / "data", plan.images)
    stages.finished("data", f"{plan.images} purple and {plan.images} prior images")
    final, run = train_lora(args.teacher, data, runs / "concept_lora", list(plan.lora))
    stages.finished("lora", "concept LoRA trained")
    lcm_final = train(LCM_RECIPE, [f"model.pretrained={args.teacher}", f"data.source={data['prior']}",
                                   f"output_dir={runs / 'lcm_lora'}", *plan.lcm])
    stages.finished("lcm", "LCM-LoRA distilled")
    edges = write_edges(out / "data" / "edges", plan.edge_images)
    stages.finished("edges", f"{plan.edge_images} shapes with outlines")
    controlnet_final = train(CONTROLNET_RECIPE, [
        f"model.pretrained={args.teacher}", f"data.source={edges}", f"output_dir={runs / 'controlnet'}",
        f"validation.conditioning_images=[{edges / 'conditioning' / '00000.png'}, {edges / 'conditioning' / '00001.png'}]",
        *plan.controlnet])
    stages.finished("controlnet", "ControlNet trained")
    steps = [int(s) for s in plan.steps.split(",")]
    evaluations = evaluate_all(args.teacher, final, steps, plan.prompts, plan.images_per_prompt)
    evaluations |= evaluate_lcm(args.teacher, lcm_final, [s for s in steps if s in LCM_STEPS] or [min(steps)],
                                plan.prompts, plan.images_per_prompt)
    evaluations |= evaluate_controlnet(args.teacher, controlnet_final, max(steps), plan.prompts, plan.images_per_prompt)
    stages.finished("evaluate", f"{len(evaluations)} evaluations")
    sections = distill_v2(args.teacher_v2, out / "distill_v2", plan, stages)
    from launch.demo_report import write_report

    report = write_report(out, run, evaluations, CONCEPT, plan_note(plan), sections)
    stages.finished("report", "report written")
    print(f"demo done in {stages.elapsed():.0f} s: LoRA in {final}, report in {report}")
    return 0


def distill_v2(teacher: Path | None, out: Path, plan: Plan, stages: Stages) -> list[str]:
    """The world-v2 distillation chain's report section: run when the plan asks and a v2 teacher exists (None:
    the committed one)."""
    if not plan.distill_v2:
        return []
    from launch.demo_distill import IMAGES, IMAGES_PER_PROMPT, PROMPTS, TEACHER_V2, run_chain

    teacher = teacher or TEACHER_V2
    if not (teacher / "model_index.json").is_file():
        stages.finished("distill_v2", f"world-v2 distillation skipped: no v2 teacher at {teacher}")
        return ["## Distillation on world v2", "", f"Skipped: no world-v2 teacher at `{teacher}` (`python "
                "launch/demo_teacher.py --world v2` builds one; `--teacher-v2` names another).", ""]
    lines = run_chain(teacher, out, IMAGES, PROMPTS, IMAGES_PER_PROMPT)
    stages.finished("distill_v2", "world-v2 students distilled and scored")
    return [line.replace("](quality_vs_steps.png)", f"]({out.name}/quality_vs_steps.png)") for line in lines]


def plan_note(plan: Plan) -> str:
    """The report's line on which chain ran."""
    if plan.name == "full":
        return "Run: the full chain (`make demo FULL=1`): the committed recipes' step counts."
    overrides = "; ".join(f"{stage}: {' '.join(o)}" for stage, o in
                          (("LoRA", plan.lora), ("LCM-LoRA", plan.lcm), ("ControlNet", plan.controlnet)) if o)
    return (f"Run: the shortened chain (`make demo`; `make demo FULL=1` runs the committed recipes in full): "
            f"{plan.edge_images} edge images, {plan.prompts} prompts x {plan.images_per_prompt} images per "
            f"evaluation, recipe overrides {overrides}.")


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
    from launch.cli import fit_stage
    from trainers.config import load_recipe

    return fit_stage(load_recipe(recipe_path, overrides)).final_dir  # a finished run resumes and re-exports


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
