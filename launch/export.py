"""Export a checkpoint as the end of its run would: `python launch/export.py RUN/checkpoints/step-N --out DIR`.

Useful whenever a run's middle is worth keeping: each stage of a progressive distillation ends with a student
for twice the steps of the final one (a 64 -> 4 run also makes the 8-step model), and a LoRA run can be exported
at the checkpoint that looked best. The run's own resolved recipe (RUN/recipe.yaml) rebuilds the models; overrides
after the checkpoint change it, e.g. `data.source=...` when the data moved since.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from launch.cli import run_cli  # noqa: E402
from trainers.errors import UserError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint folder: RUN/checkpoints/step-N")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the run's recipe")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default RUN/exports/step-N)")
    return parser.parse_intermixed_args(argv)


def progressive_stages(run: Path) -> list[tuple[int, int, Path]]:
    """(student steps, checkpoint step, checkpoint folder) of every stage's end of a progressive run, from the
    run's own recipe; the run must have kept them (checkpoint.every_steps = the stage length, keep_last >= the
    number of stages)."""
    from trainers.config import load_recipe
    from trainers.objectives.progressive import plan_stages

    recipe = load_recipe(run / "recipe.yaml", [])
    stages = plan_stages(recipe.objective.progressive, recipe.train.max_steps)
    length = recipe.train.max_steps // len(stages)
    found = []
    for k, (_, steps) in enumerate(stages):
        ckpt = run / "checkpoints" / f"step-{(k + 1) * length}"
        if not (ckpt / "state.json").is_file():
            raise UserError(f"{ckpt} is missing: keep a checkpoint at every stage's end (checkpoint.every_steps="
                            f"{length}, checkpoint.keep_last>={len(stages)})")
        found.append((steps, (k + 1) * length, ckpt))
    return found


def export_stage_students(run: Path) -> list[tuple[int, int, Path]]:
    """Each stage's student exported once under RUN/exports/step-N: (student steps, step, export folder)."""
    exported = []
    for steps, at, ckpt in progressive_stages(run):
        out = run / "exports" / ckpt.name
        if not (out / "scheduler").is_dir():
            main([str(ckpt), "--out", str(out)])
        exported.append((steps, at, out))
    return exported


def main(argv=None) -> int:
    args = parse_args(argv)
    ckpt = args.checkpoint.resolve()
    if not (ckpt / "state.json").is_file():
        raise UserError(f"{args.checkpoint}: not a complete checkpoint (no state.json)")
    run = ckpt.parent.parent
    if not (run / "recipe.yaml").is_file():
        raise UserError(f"{args.checkpoint}: the run's recipe {run / 'recipe.yaml'} is missing")
    from trainers.config import load_recipe
    from trainers.engine import Trainer

    recipe = load_recipe(run / "recipe.yaml", [*args.overrides, f"output_dir={run}", f"resume={ckpt}",
                                               "hub.push=false"])
    out = args.out or run / "exports" / ckpt.name
    final = Trainer(recipe).export_checkpoint(out)
    print(f"exported {ckpt.name} to {final}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
