"""Checkpoints: complete or absent. Written to a temporary folder, then renamed into place.

checkpoints/step-<N>/ holds weights.safetensors (trainable weights, EMA, objective state),
training_state.pt (optimizer, scaler, RNG; read back with weights_only=True, nothing unpickled) and
state.json (step, name, and every other file's size and sha256 digest), written last. `resume` verifies a
checkpoint against that record, and its weights for NaN and inf, before loading anything; a damaged one is moved
aside to checkpoints/damaged-step-N and the next newest is tried. Under DeepSpeed ZeRO the optimizer is sharded:
training_state.pt keeps scaler and RNG, and deepspeed/ holds DeepSpeed's own checkpoint, one optimizer file per
rank, each written by its rank (read back with weights_only=True too, see load_deepspeed).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from trainers import integrity
from trainers.errors import UserError
from trainers.integrity import Damaged

STATE = "state.json"


def step_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step}"


def step_of(path: Path) -> int | None:
    """N of a folder named step-N, else None."""
    prefix, _, number = Path(path).name.partition("-")
    return int(number) if prefix == "step" and number.isdigit() else None


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints (a state.json, written last), oldest first; not yet verified."""
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.iterdir() if step_of(p) is not None and (p / STATE).is_file()] if root.is_dir() else []
    return sorted(found, key=step_of)


def check_fresh_start(resume: str, output_dir: Path) -> None:
    """`resume: none` over an earlier run's checkpoints would mix two runs in one folder, and a later `resume: auto`
    could pick up the earlier run's newest step."""
    found = complete_checkpoints(output_dir) if resume == "none" else []
    if found:
        raise UserError(f"resume: none starts a new run, but {output_dir} holds checkpoints of an earlier one (newest "
                        f"{found[-1].name}): use resume: auto to continue it, another output_dir, or delete "
                        f"{Path(output_dir) / 'checkpoints'}")


def verify(path: Path) -> bool:
    """Raise integrity.Damaged unless the checkpoint is as it was written and its weights are finite. Returns
    whether it carried a record (checkpoints written before records existed get sizes-by-reading and finiteness)."""
    try:
        meta = json.loads((path / STATE).read_text())
        int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise Damaged(f"{STATE} cannot be read ({integrity.first_line(error)})") from None
    files = meta.get("files")
    if files is not None:
        integrity.check_record(path, files)
    else:
        for name in ("weights.safetensors", "training_state.pt"):
            if not (path / name).is_file():
                raise Damaged(f"{name} is missing")
        read_training_state(path, Damaged)
    bad = integrity.nonfinite_tensor(path / "weights.safetensors")
    if bad is not None:
        raise Damaged(f"weights.safetensors holds NaN or inf in {bad}")
    return files is not None


@dataclass
class Choice:
    """The checkpoint a run resumes from (None: a fresh start) and the damaged newer ones passed over."""

    path: Path | None
    damaged: list[tuple[Path, str]] = field(default_factory=list)
    recorded: bool = True


def choose(resume: str, output_dir: Path) -> Choice:
    """`auto`: the newest checkpoint that verifies; `none`; or an explicit folder, which must verify. Reads only:
    every process may call it, and `set_aside` (main process, after all have chosen) moves the damaged ones."""
    if resume == "none":
        return Choice(None)
    if resume != "auto":
        path = Path(resume)
        if not (path / STATE).is_file():
            raise UserError(f"resume: {path} is not a complete checkpoint folder (no {STATE})")
        try:
            return Choice(path, recorded=verify(path))
        except Damaged as error:
            raise UserError(f"resume: {path} is damaged: {error}") from None
    damaged = []
    for path in reversed(complete_checkpoints(output_dir)):
        try:
            return Choice(path, damaged, verify(path))
        except Damaged as error:
            damaged.append((path, str(error)))
    if damaged:
        raise UserError(f"resume: auto found no intact checkpoint in {Path(output_dir) / 'checkpoints'}: "
                        + "; ".join(f"{p.name}: {why}" for p, why in damaged)
                        + " (left in place; resume: none with another output_dir starts over)")
    return Choice(None)


def set_aside(damaged: list[tuple[Path, str]]) -> list[str]:
    """Move each damaged checkpoint to checkpoints/damaged-step-N (never deleted); one warning line each."""
    lines = []
    for path, why in damaged:
        target = path.with_name(f"damaged-{path.name}")
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"damaged-{path.name}-{n}")
        os.replace(path, target)
        lines.append(f"warning: checkpoint {path.name} is damaged ({why}); moved aside to {target}")
    return lines


def staging_dir(output_dir: Path, step: int) -> Path:
    final = step_dir(output_dir, step)
    return final.with_name(f".tmp-{final.name}")


def stage(output_dir: Path, step: int) -> Path:
    """An empty staging folder for step N (what an interrupted save left there is dropped)."""
    tmp = staging_dir(output_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save(output_dir: Path, step: int, tensors: dict[str, torch.Tensor], training_state: dict, meta: dict,
         keep_last: int, staged: bool = False) -> Path:
    """Write step N and make it visible by a rename; `staged`: other processes already wrote into stage(). A disk
    that refuses the write is one line (integrity.DiskFull) and leaves no staging folder."""
    final = step_dir(output_dir, step)
    tmp = staging_dir(output_dir, step) if staged else stage(output_dir, step)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    try:
        save_file(cpu, tmp / "weights.safetensors")
        torch.save(training_state | {"rng": rng_state()}, tmp / "training_state.pt")
        with ThreadPoolExecutor(1) as pool:  # the digests overlap the fsyncs (both release the GIL): no added wait
            files = pool.submit(integrity.record, tmp, (STATE,))
            _fsync_files(tmp)
            files = files.result()
        (tmp / STATE).write_text(json.dumps(meta | {"step": step, "files": files}, indent=2))
        _fsync_files(tmp, only=STATE)
    except Exception as error:
        needed = sum(v.numel() * v.element_size() for v in cpu.values()) + _state_bytes(training_state)
        reason = integrity.disk_error(error, tmp, needed)
        if reason is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        intact = complete_checkpoints(output_dir)
        raise integrity.disk_full(f"checkpoint step-{step}", Path(output_dir) / "checkpoints", needed, reason,
                                  intact[-1] if intact else None) from None
    if final.exists():  # a re-save of the same step (e.g. a final save after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in complete_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _state_bytes(state) -> int:
    """The tensors' bytes in a nested training state (the optimizer's moments dominate)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    return 0


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(tensors, training_state, meta); RNG states are restored here. `choose` has verified the folder."""
    tensors = load_file(path / "weights.safetensors")
    training_state = read_training_state(path, UserError)
    set_rng_state(training_state.pop("rng"))
    return tensors, training_state, json.loads((path / STATE).read_text())


def read_training_state(path: Path, error_type: type[Exception]) -> dict:
    """training_state.pt as plain data only (weights_only): a file that would run code, or is not a torch file,
    raises `error_type` with one line."""
    try:
        return torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        raise error_type(f"training_state.pt will not load as plain data (refused, nothing in it ran): "
                         f"{integrity.first_line(error)}") from None


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


def _fsync_files(folder: Path, only: str | None = None) -> None:
    """Flush every file (or the one named `only`) to disk before the rename makes the checkpoint visible."""
    for f in [folder / only] if only else folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


DEEPSPEED = "deepspeed"  # checkpoints/step-N/deepspeed/: DeepSpeed's own files, one optimizer shard per rank
DEEPSPEED_TAG = "zero"


def save_deepspeed(engine, output_dir: Path, step: int) -> None:
    """Every rank (a collective): the trained weights (rank 0) and this rank's ZeRO shard, into stage().

    DeepSpeed's own layout, so its tools read it (deepspeed/zero_to_fp32.py rebuilds full fp32 weights).
    """
    try:
        engine.save_checkpoint(str(staging_dir(output_dir, step) / DEEPSPEED), tag=DEEPSPEED_TAG, save_latest=False,
                               exclude_frozen_parameters=True)
    except Exception as error:
        reason = integrity.disk_error(error)
        if reason is None:
            raise
        intact = complete_checkpoints(output_dir)
        raise integrity.disk_full(f"checkpoint step-{step} (DeepSpeed shard)", Path(output_dir) / "checkpoints", 0,
                                  reason, intact[-1] if intact else None) from None


def load_deepspeed(engine, path: Path, world_size: int) -> None:
    """Every rank: restore its ZeRO shard (fp32 master weights, Adam moments) from a checkpoint's deepspeed/."""
    shards = sorted((path / DEEPSPEED / DEEPSPEED_TAG).glob("*zero_pp_rank_*_optim_states.pt"))  # bf16_zero_pp_...
    if not shards:
        raise UserError(f"resume: {path} was written without DeepSpeed (no {DEEPSPEED}/ shards), so its optimizer "
                        "state does not fit ZeRO: resume it under the config it ran with, or use a new output_dir")
    if len(shards) != world_size:
        raise UserError(f"resume: {path} holds ZeRO optimizer shards of {len(shards)} processes and this run has "
                        f"{world_size}: launch it with --num_processes {len(shards)}")
    # DeepSpeed's own reader unpickles with weights_only=False, which runs whatever code a file names, so it reads
    # through read_deepspeed_file instead, for this call only
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _WeightsOnlyLoads(inner)
    try:
        loaded, _ = engine.load_checkpoint(str(path / DEEPSPEED), tag=DEEPSPEED_TAG, load_lr_scheduler_states=False,
                                           load_module_strict=False)  # frozen weights are not in it
    except pickle.UnpicklingError as e:
        raise UserError(f"resume: {path / DEEPSPEED} holds objects that are not plain data; refusing to unpickle "
                        f"them ({str(e).splitlines()[0]})") from None
    finally:
        engine.checkpoint_engine = inner
    if loaded is None:
        raise UserError(f"resume: {path / DEEPSPEED} has no DeepSpeed checkpoint '{DEEPSPEED_TAG}'")


def read_deepspeed_file(path, map_location=None):
    """torch.load(weights_only=True), allowing only the plain record classes DeepSpeed's ZeRO files hold: a loss
    scaler, the stage enum and parameter slice addresses. Anything else stays refused (pickle.UnpicklingError)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


class _WeightsOnlyLoads:
    """DeepSpeed's checkpoint engine, its load() replaced by read_deepspeed_file."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def load(self, path, map_location=None):
        return read_deepspeed_file(path, map_location)
