"""Checkpoints: complete or absent. Written to a temporary folder, then renamed into place.

checkpoints/step-<N>/ holds weights.safetensors (trainable weights, EMA, objective state),
training_state.pt (optimizer, scaler, RNG; read back with weights_only=True, nothing unpickled) and
state.json (step and the recipe hash), written last.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from trainers.errors import UserError

STATE = "state.json"


def step_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step}"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if (p / STATE).is_file() and p.name[5:].isdigit()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def resolve_resume(resume: str, output_dir: Path) -> Path | None:
    """`auto`: the newest complete checkpoint (or none); `none`; or an explicit checkpoint folder."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE).is_file():
        raise UserError(f"resume: {path} is not a complete checkpoint folder (no {STATE})")
    return path


def save(output_dir: Path, step: int, tensors: dict[str, torch.Tensor], training_state: dict, meta: dict,
         keep_last: int) -> Path:
    final = step_dir(output_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp / "weights.safetensors")
    torch.save(training_state | {"rng": rng_state()}, tmp / "training_state.pt")
    (tmp / STATE).write_text(json.dumps(meta | {"step": step}, indent=2))
    _fsync_files(tmp)
    if final.exists():  # a re-save of the same step (e.g. a final save after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in complete_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors, training_state, meta); RNG states are restored here."""
    tensors = load_file(path / "weights.safetensors")
    training_state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    set_rng_state(training_state.pop("rng"))
    return tensors, training_state, json.loads((path / STATE).read_text())


def check_matches(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Refuse a checkpoint whose weights do not fit this recipe's model (changed rank, targets, adapter)."""
    missing = [k for k in expected if k not in tensors]
    wrong = [k for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if missing or wrong:
        example = (missing or wrong)[0]
        raise UserError(f"resume: {path} does not fit this recipe ({len(missing)} weights missing, "
                        f"{len(wrong)} of another shape, e.g. {example}); was adapter.rank, adapter.kind or "
                        "adapter.target_modules changed? Use a new output_dir or resume=none")


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _fsync_files(folder: Path) -> None:
    """Flush every file to disk before the rename makes the checkpoint visible."""
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
