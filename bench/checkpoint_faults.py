"""Checkpoint faults made for real, through the command line, on the tiny SD-1.5 LoRA recipe: each damaged run is
resumed with `resume: auto` (or an explicit `resume: PATH`) and its outcome, exit code and per-step losses are
compared with an uninterrupted run. Prints a Markdown table (bench/README.md "Checkpoint faults").

    OMP_NUM_THREADS=1 python bench/checkpoint_faults.py [--work /tmp/faults]

The full-disk row mounts a small tmpfs (root only; skipped elsewhere), so the disk really fills during a save.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_checkpoint_integrity import (flip_a_byte_of_training_state, remove_training_state, truncate,  # noqa: E402
                                             write_nan_into_weights)

COMMON = ["recipes/demo/sd15_lora_tiny.yaml", "train.max_steps=12", "checkpoint.every_steps=3",
          "checkpoint.keep_last=3", "train.log_every=1", "train.batch_size=2", "lr_schedule.name=constant",
          "train.report_to=none", "data.num_workers=0", "validation.every_steps=0"]


def train(model: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/train.py", *COMMON, f"model.pretrained={model}",
                           f"data.source={data}", f"output_dir={out}", *extra], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def losses(out: Path) -> list:
    path = out / "logs" / "metrics.jsonl"
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def said(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in (done.stdout + done.stderr).splitlines()
             if line.startswith(("warning: checkpoint", "error:", "note:"))]
    return " / ".join(lines)[:160] or "-"


def malicious(ckpt: Path) -> None:
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {ckpt.parent.parent / 'RAN'}",)

    (ckpt / "training_state.pt").write_bytes(pickle.dumps({"optimizer": Payload()}))


def strip_record(ckpt: Path) -> None:
    meta = json.loads((ckpt / "state.json").read_text())
    meta.pop("files", None)
    (ckpt / "state.json").write_text(json.dumps(meta))


FAULTS = {
    "weights.safetensors cut to half its length": (truncate, None),
    "4 bytes of a LoRA weight overwritten with a NaN (length intact)": (write_nan_into_weights, None),
    "training_state.pt missing": (remove_training_state, None),
    "one byte of training_state.pt flipped (digest mismatch)": (flip_a_byte_of_training_state, None),
    "NaN weight in a checkpoint without a record (written before records)": (
        lambda c: (strip_record(c), strip_record(c.parent / "step-6"), write_nan_into_weights(c)), None),
    "training_state.pt replaced by a pickle that runs code, no record, resume: PATH": (
        lambda c: (strip_record(c), malicious(c)), "explicit"),
    "weights cut, resume: PATH": (truncate, "explicit"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/checkpoint_faults"))
    args = parser.parse_args()
    from datasets_prep.digits import write_digits_dataset
    from launch.make_tiny_model import make_tiny_model

    shutil.rmtree(args.work, ignore_errors=True)
    model = make_tiny_model(arch="sd15", out=args.work / "model", size="tiny", seed=0)
    data = args.work / "digits"
    write_digits_dataset(data, n=64, size=64, seed=0)
    reference = args.work / "straight"
    assert train(model, data, reference).returncode == 0
    straight = losses(reference)
    base = args.work / "base"
    assert train(model, data, base, "train.max_steps=9").returncode == 0  # constant lr: steps 1-9 as the 12-step run
    rows = ["| fault | outcome | exit | said | losses 1-12 as uninterrupted | nothing deleted |", "|---|---|---:|---|---|---|"]
    for name, (damage, mode) in FAULTS.items():
        out = args.work / f"fault{len(rows)}"
        shutil.copytree(base, out)
        ckpt = out / "checkpoints" / "step-9"
        damage(ckpt)
        before = sorted(p.name for p in ckpt.iterdir())
        start = time.perf_counter()
        done = train(model, data, out, *([f"resume={ckpt}"] if mode == "explicit" else []))
        seconds = time.perf_counter() - start
        aside = out / "checkpoints" / "damaged-step-9"
        kept = sorted(p.name for p in (aside if aside.is_dir() else ckpt).iterdir()) == before  # the damaged files
        same = losses(out) == straight if done.returncode == 0 else "-"
        outcome = ("fell back to step-6, finished" if done.returncode == 0 and "damaged" in said(done) else
                   "one-line error" if done.returncode == 2 else f"UNEXPECTED ({seconds:.0f} s)")
        if (out / "RAN").exists():
            outcome += "; THE PICKLE RAN"
        rows.append(f"| {name} | {outcome} | {done.returncode} | {said(done)} | {same} | {kept} |")
    rows.append(disk_full_row(model, data, args.work, straight))
    print("\n".join(rows))
    return 0


def disk_full_row(model: Path, data: Path, work: Path, straight: list) -> str:
    """A tmpfs too small for the run: the disk really fills inside a save; then it grows and the run resumes."""
    mount = work / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1300k", "tmpfs", str(mount)], capture_output=True).returncode:
        return "| disk full during a save (tmpfs) | skipped: cannot mount a tmpfs here (needs root) | | | | |"
    try:
        out = mount / "run"
        full = train(model, data, out, "checkpoint.keep_last=12")  # keep every checkpoint: the disk fills
        kept = [p.name for p in sorted((out / "checkpoints").iterdir())]
        intact = all(subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                                     "from trainers.checkpoint import verify; verify(Path(sys.argv[1]))", str(out /
                                     "checkpoints" / k)], cwd=ROOT).returncode == 0 for k in kept)
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        again = train(model, data, out, "checkpoint.keep_last=12")
        same = losses(out) == straight
        return (f"| disk full during a save (a 1.3 MB tmpfs, every checkpoint kept), then room made and run again | "
                f"exit {full.returncode} with checkpoints {', '.join(kept)} left, all verify: {intact}; the rerun "
                f"exits {again.returncode} | {full.returncode} | {said(full)} | {same} | {intact} |")
    finally:
        subprocess.run(["umount", str(mount)])


if __name__ == "__main__":
    sys.exit(main())
