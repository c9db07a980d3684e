"""Train a recipe: `accelerate launch launch/train.py RECIPE.yaml [key.sub=value ...] [--dry-run]`.

Also runs as plain `python launch/train.py ...` on one process. Configuration and data errors print one line
and exit 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from launch.cli import finish_line, run_cli  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate, build the models from their configs (no weights are read), print parameter "
                             "counts and memory, then exit")
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from trainers.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from trainers.engine import Trainer

    trainer = Trainer(recipe, dry_run=args.dry_run)
    if args.dry_run:
        if trainer.is_main:
            print(dry_run_report(trainer))
        return 0
    result = trainer.fit()
    if trainer.is_main:
        print(finish_line(result), flush=True)
        if result.stopped:
            mark_stopped(result)
    return 0


def mark_stopped(result) -> None:
    """Tell a batch script that this run stopped with a checkpoint to resume from (and did not finish): the file
    DIFFTUNE_STOP_MARKER names, when set, gets the checkpoint's path. launch/slurm/train.sbatch requeues on it only,
    so a stop signal that arrives after the last step (during the export, say) does not start another attempt."""
    import os

    from trainers.checkpoint import step_dir

    marker = os.environ.get("DIFFTUNE_STOP_MARKER")
    if marker:
        tmp = f"{marker}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{step_dir(result.output_dir, result.step)}\n")
        os.replace(tmp, marker)


def dry_run_report(trainer) -> str:
    samples = len(trainer.dataset)
    trainable, frozen = trainer.parameter_counts()
    size = trainer.memory_estimate()
    size = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
    return (f"recipe '{trainer.recipe.name}' is valid\n"
            f"  model family: {trainer.backbone.family}, objective: {trainer.recipe.objective.name}\n"
            f"  training samples: {samples:,}\n"
            f"  trainable parameters: {trainable:,}\n  frozen parameters: {frozen:,}\n"
            f"  estimated memory for weights, gradients and optimizer state: {size} (activations not included)"
            + (f"\n  disk: {trainer.disk_warning}" if trainer.disk_warning else ""))


if __name__ == "__main__":
    sys.exit(run_cli(main))
