"""Resume state of an output folder: complete shards, the source items they consumed, the skip log's length.

A shard is complete when progress.json lists it. Each entry records how many source items had been consumed
when the shard closed and how long skipped.jsonl was then, so a re-run drops anything written after it,
skips that many items and goes on: no input is lost or written twice.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from datasets_prep.process import Skipped
from datasets_prep.shards import write_atomically
from trainers.errors import UserError

PROGRESS = "progress.json"
OUTPUTS = ("report.json", "report.md", "skipped.jsonl", "buckets.json", PROGRESS)  # besides shards/


@dataclass
class Progress:
    """progress.json: the parameters, one entry per complete shard, and `finished` once the source ran out."""

    params: dict
    shards: list[dict] = field(default_factory=list)  # name, rows, consumed, skipped_bytes, last_key
    finished: dict | None = None  # consumed, skipped_bytes

    @property
    def last(self) -> dict:
        return self.finished or (self.shards[-1] if self.shards else {"consumed": 0, "skipped_bytes": 0})

    def save(self, out: Path) -> None:
        write_atomically(out / PROGRESS, json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, out: Path) -> Progress | None:
        try:
            return cls(**json.loads((out / PROGRESS).read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as error:
            raise UserError(f"{out / PROGRESS} is damaged ({error}); pass --overwrite to start over") from None


def clear(out: Path) -> None:
    """Remove what prepare writes, and nothing else that may share the folder."""
    shutil.rmtree(out / "shards", ignore_errors=True)
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)


def differences(old: dict, new: dict) -> str:
    """`key: old -> new` for each parameter that changed, for the refusal message."""
    keys = sorted(set(old) | set(new))
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def prune(out: Path, progress: Progress) -> None:
    """Keep the listed shards up to the first missing one; delete temporary and unlisted shard files."""
    folder = out / "shards"
    for k, entry in enumerate(progress.shards):
        if not (folder / entry["name"]).is_file():
            progress.shards = progress.shards[:k]
            progress.finished = None
            break
    listed = {entry["name"] for entry in progress.shards}
    for path in folder.glob("*") if folder.is_dir() else ():
        if path.name not in listed:
            path.unlink()


def open_output(out: Path, params: dict, overwrite: bool) -> Progress:
    """The progress to continue from: fresh, resumed with the same parameters, or refused."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    progress = Progress.load(out) if out.is_dir() else None
    if overwrite:
        clear(out)
        progress = None
    elif progress is not None and progress.params != params:
        state = "a finished" if progress.finished else "an unfinished"
        raise UserError(f"--out {out} holds {state} dataset prepared with other parameters "
                        f"({differences(progress.params, params)}); pass --overwrite to replace it")
    elif progress is None and out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty and was not written by prepare; choose a new folder "
                        "or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    if progress is None:
        progress = Progress(params)
        progress.save(out)
    prune(out, progress)
    return progress


class SkipLog:
    """skipped.jsonl, one JSON object per skipped input; cut back on resume to the last recorded length."""

    def __init__(self, path: Path, length: int):
        if length > (path.stat().st_size if path.exists() else 0):
            raise UserError(f"{path} is shorter than {PROGRESS} records; pass --overwrite to start over")
        self.file = open(path, "r+b" if path.exists() else "wb")
        self.file.truncate(length)
        self.file.seek(length)

    def write(self, skipped: Skipped) -> None:
        self.file.write(json.dumps(asdict(skipped), ensure_ascii=False).encode("utf-8", "backslashreplace") + b"\n")

    def commit(self) -> int:
        """Make the lines durable and return the length to record with the shard that closes now."""
        self.file.flush()
        os.fsync(self.file.fileno())
        return self.file.tell()

    def close(self) -> None:
        self.file.close()


def seen_hashes(out: Path, progress: Progress) -> set[bytes]:
    """sha256 prefixes of every kept image in complete shards, so duplicates are still caught after a resume.

    16 of the 32 bytes: collisions stay out of reach (2^-64 per pair) at half the memory of full digests.
    """
    seen = set()
    for entry in progress.shards:
        column = pq.read_table(out / "shards" / entry["name"], columns=["sha256"]).column("sha256")
        seen.update(bytes.fromhex(h[:32]) for h in column.to_pylist())
    return seen
