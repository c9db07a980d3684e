"""train.report_to: wandb in wandb's offline mode (a local run folder, no network, no key)."""
import json
import sys
from pathlib import Path

import pytest

from trainers.engine import Trainer
from trainers.errors import UserError
from trainers.trackers import run_id

pytest.importorskip("wandb", reason="the wandb extra is not installed (pip install 'difftune[wandb]')")


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline run file: a LevelDB-style log (32 KiB blocks of crc, length, type records)
    of wandb's Record protobufs after a 7-byte header; wandb 0.31 has no Python reader of its own."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending, rows = run_file.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({".".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_writes_the_loss_series_and_a_resume_continues_the_run(recipe_for, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")  # must never be printed
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = ("train.report_to=wandb", "train.max_steps=4", "train.log_every=1", "checkpoint.every_steps=2")
    Trainer(recipe_for(*args)).fit(until=2)
    Trainer(recipe_for(*args, "resume=auto")).fit()
    out = tmp_path / "run"
    runs = sorted((out / "logs" / "wandb").glob(f"offline-run-*-{run_id(out)}"))
    assert len(runs) == 2  # one folder per attempt, both under the run's one id
    history = [row for run in runs for row in wandb_history(next(run.glob("run-*.wandb")))]
    losses = {row["_step"]: row["loss"] for row in history if "loss" in row}
    expected = {r["step"]: r["loss"] for r in map(json.loads, (out / "logs" / "metrics.jsonl").read_text().splitlines())}
    assert losses == pytest.approx(expected) and sorted(losses) == [1, 2, 3, 4]
    files = [p for run in runs for p in run.rglob("*") if p.is_file()]
    assert not any(b"0123456789abcdef0123456789abcdef01234567" in p.read_bytes() for p in files)


def test_without_wandb_installed_the_error_names_the_extra(recipe_for, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'difftune\[wandb\]'"):
        Trainer(recipe_for("train.report_to=wandb"))
    assert not (tmp_path / "run").exists()
