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
