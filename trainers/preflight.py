"""Checks that run before an hour of model loading: each failure is one line naming what to fix."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from trainers.config import Recipe
from trainers.errors import UserError


def check_output_dir(output_dir: Path) -> None:
    """The output folder, or its nearest existing parent, must be writable."""
    path = Path(output_dir).resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"output_dir: {existing} exists and is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output_dir: cannot write to {existing}")


def check_model_folder(recipe: Recipe) -> None:
    """Every component model_index.json names must have its folder (a partial download fails here, not later)."""
    root = Path(recipe.model.pretrained).expanduser()
    index = root / "model_index.json"
    if not index.is_file():
        return  # a hub id or single file: resolved when loading
    try:
        components = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"model.pretrained: {index} is not valid JSON ({e})") from None
    for name, spec in components.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue  # metadata, or an optional component the pipeline leaves out
        if not (root / name).is_dir():
            raise UserError(f"model.pretrained: {root} has no '{name}' component folder (incomplete download?)")


def check_disk(output_dir: Path, checkpoint_bytes: int, keep_last: int = 1, export_bytes: int = 0) -> str | None:
    """Room for two checkpoints (the one being written beside the last complete one), else a UserError; a warning
    line when there is less than the run will fill: keep_last + 1 checkpoints (one being staged) plus final/."""
    path = Path(output_dir).resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < 2 * checkpoint_bytes:
        raise UserError(f"output_dir: {free / 2**30:.1f} GiB free on {existing}, a checkpoint needs about "
                        f"{checkpoint_bytes / 2**30:.1f} GiB and two must fit")
    wanted = (keep_last + 1) * checkpoint_bytes + export_bytes
    if free < wanted:
        from trainers.integrity import gib

        return (f"warning: {gib(free)} free on {existing}, the run will need about {gib(wanted)} ({keep_last + 1} "
                f"checkpoints of {gib(checkpoint_bytes)} and the export); a save may fail for lack of space: free "
                "some, or lower checkpoint.keep_last")
    return None


def checkpoint_bytes(trainable: int, optimizer: str, ema: bool) -> int:
    """Trainable weights in float32, the optimizer's two moments, and the EMA copy."""
    from trainers.optimizers import optimizer_state_bytes

    return trainable * (4 + optimizer_state_bytes(optimizer) + (4 if ema else 0))
