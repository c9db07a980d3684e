"""Each student of a progressive-distillation run against its teacher's own DDIM at the same steps (issue #12).

Exports the student that ends each stage (`launch/export.py` on the stage's last checkpoint, so the run must keep
one per stage: checkpoint.every_steps = the stage length, keep_last >= the number of stages), scores it on the
embedded benchmark with its own DDIM scheduler, and scores the teacher with DDIM on the same trailing timesteps
at every student's step count and at --reference steps. Prints one Markdown table.

    python launch/train.py recipes/demo/sd15_progressive_tiny.yaml data.source=teacher_work/data/shapes \\
        output_dir=teacher_work/runs/prog/guided16 train.max_steps=1500 checkpoint.every_steps=300 \\
        checkpoint.keep_last=5
    python bench/progressive_vs_teacher.py teacher_work/runs/prog/guided16 --out teacher_work/eval/prog
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.evaluate import SCORE_KEYS, evaluate, write_results  # noqa: E402
from launch.export import export_stage_students  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--teacher", type=Path, default=Path("assets/demo_teacher"))
    parser.add_argument("--guidance", type=float, default=3.0, help="guidance_scale of teacher and students")
    parser.add_argument("--reference", type=int, default=64, help="the teacher's many-step reference")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--images-per-prompt", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    common = dict(guidance=args.guidance, prompts=args.prompts, images_per_prompt=args.images_per_prompt,
                  exclude={"colour": ["purple"]}, device="cpu")
    rows = []
    students = export_stage_students(args.run)
    teacher_steps = sorted({steps for steps, _, _ in students} | {args.reference})
    teacher = evaluate(args.teacher, teacher_steps, scheduler="ddim", timestep_spacing="trailing", **common)
    write_results(teacher, args.out / "teacher_ddim")
    rows += [("teacher, DDIM", run) for run in teacher["runs"]]
    for steps, at, export in students:
        result = evaluate(args.teacher, [steps], student=export, scheduler=None, **common)
        write_results(result, args.out / f"student_{steps}")
        rows += [(f"student after step {at}", run) for run in result["runs"]]
    keys = [k.replace("_", " ") for k in SCORE_KEYS]
    lines = ["| model | steps | evals/img | " + " | ".join(keys) + " | SWD |", "|---" * (4 + len(keys)) + "|"]
    for label, run in sorted(rows, key=lambda r: (r[1]["steps"], r[0].startswith("student"))):
        rates = " | ".join(f"{run['adherence'][k]:.2f}" for k in SCORE_KEYS)
        lines.append(f"| {label} | {run['steps']} | {run['evaluations_per_image']:g} | {rates} | {run['swd']:.4f} |")
    table = "\n".join(lines) + "\n"
    (args.out / "table.md").write_text(table)
    (args.out / "rows.json").write_text(json.dumps([{"model": label, **{k: v for k, v in run.items() if k != "images"}}
                                                    for label, run in rows], indent=2))
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
