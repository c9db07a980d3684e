"""Where metrics go besides logs/metrics.jsonl (always written): TensorBoard, or Weights & Biases, via accelerate.

wandb is an optional extra, imported only when a recipe asks for it. It keeps its files under the run's logs/,
names the run after the recipe, and takes an id derived from the output folder, so a resumed run (same folder)
continues the same wandb run. Offline use is wandb's own switch: WANDB_MODE=offline (no network, no key). The
API key is read by wandb from its environment or netrc; nothing here reads, logs or prints it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from trainers.config import Recipe, to_dict
from trainers.errors import UserError


def check(recipe: Recipe) -> None:
    """Refuse a tracker that is not installed before anything loads, naming the extra that brings it."""
    if recipe.train.report_to == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("train.report_to: wandb needs the wandb package: pip install 'difftune[wandb]' "
                            "(or report_to: tensorboard)") from None


def log_with(recipe: Recipe) -> str | None:
    return None if recipe.train.report_to == "none" else recipe.train.report_to


def run_id(out: Path) -> str:
    """Stable per output folder: a resumed run logs on into the run it continues."""
    return hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:16]


def start(accelerator, recipe: Recipe, out: Path) -> None:
    """accelerate's init_trackers with each tracker's own settings (main process only; accelerate checks)."""
    if recipe.train.report_to == "wandb":
        accelerator.init_trackers(recipe.name, config=to_dict(recipe), init_kwargs={"wandb": {
            "dir": str(Path(out) / "logs"), "name": recipe.name, "id": run_id(out), "resume": "allow"}})
    else:
        accelerator.init_trackers(recipe.name)


def log_image(accelerator, recipe: Recipe, grid, step: int) -> None:
    """A validation grid (PIL image) to the tracker, beside samples/step-N.png."""
    import numpy as np

    if recipe.train.report_to == "tensorboard":
        accelerator.get_tracker("tensorboard").log_images({"validation": np.asarray(grid)[None]}, step=step,
                                                          dataformats="NHWC")
    elif recipe.train.report_to == "wandb":
        accelerator.get_tracker("wandb").log_images({"validation": [grid]}, step=step)
