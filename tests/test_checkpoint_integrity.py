"""Checkpoints prove themselves: a damaged one is named, moved aside and the previous one resumed exactly; nothing
non-finite is exported or pushed; a full disk or a file that is not plain data is one line with its exit code."""
import errno
import json
import os
import pickle
import shutil
import struct

import pytest
from safetensors.torch import load_file

from launch.cli import run_cli
from trainers import checkpoint
from trainers.config import load_recipe
from trainers.engine import Trainer
from trainers.errors import UserError
from trainers.integrity import DiskFull

ARGS = ("train.max_steps=12", "checkpoint.every_steps=3", "checkpoint.keep_last=3", "train.log_every=1",
        "train.batch_size=2", "lr_schedule.name=constant", "train.report_to=none", "data.num_workers=0",
        "validation.every_steps=0")


def recipe(tiny_sd15, digits_data, out, *extra):
    return load_recipe("recipes/demo/sd15_lora_tiny.yaml", [f"model.pretrained={tiny_sd15}",
                                                             f"data.source={digits_data}", f"output_dir={out}",
                                                             *ARGS, *extra])


def losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "logs" / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


@pytest.fixture(scope="module")
def straight(tiny_sd15, digits_data, tmp_path_factory):
    """An uninterrupted run's per-step losses."""
    out = tmp_path_factory.mktemp("straight")
    Trainer(recipe(tiny_sd15, digits_data, out)).fit()
    return losses(out)


@pytest.fixture(scope="module")
def stopped_at_9(tiny_sd15, digits_data, tmp_path_factory):
    """A run stopped after step 9: checkpoints step-3, step-6, step-9 (copied afresh for each test)."""
    out = tmp_path_factory.mktemp("stopped")
    Trainer(recipe(tiny_sd15, digits_data, out)).fit(until=9)
    return out


@pytest.fixture
def run(stopped_at_9, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped_at_9, out)
    return out


def resume(tiny_sd15, digits_data, out, *extra):
    return Trainer(recipe(tiny_sd15, digits_data, out, *extra)).fit()


def error_lines(stderr):
    """What the entry point said: its error lines (model loading's own progress bars aside), never a traceback."""
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.strip().splitlines() if line.startswith("error:")]


def first_float_tensor_offset(path):
    """Byte offset of the first float32 tensor's data in a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    start = min(v["data_offsets"][0] for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    return 8 + n + start


def write_nan_into_weights(ckpt):
    weights = ckpt / "weights.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.seek(first_float_tensor_offset(weights))
        f.write(struct.pack("<f", float("nan")))
    assert weights.stat().st_size == size  # length intact: only the digest or the finiteness check sees it


def truncate(ckpt):
    weights = ckpt / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def remove_training_state(ckpt):
    (ckpt / "training_state.pt").unlink()


def flip_a_byte_of_training_state(ckpt):
    state = ckpt / "training_state.pt"
    raw = bytearray(state.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    state.write_bytes(bytes(raw))


FAULTS = {"truncated": truncate, "nan_bytes": write_nan_into_weights, "missing_file": remove_training_state,
          "digest_mismatch": flip_a_byte_of_training_state}
SEEN = {"truncated": "bytes", "nan_bytes": "digest", "missing_file": "missing", "digest_mismatch": "digest"}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_previous_resumes_exactly(
        tiny_sd15, digits_data, run, straight, fault, capsys):
    FAULTS[fault](run / "checkpoints" / "step-9")
    files_before = sorted(p.name for p in (run / "checkpoints" / "step-9").iterdir())
    result = resume(tiny_sd15, digits_data, run)
    out = capsys.readouterr().out
    warning = [line for line in out.splitlines() if line.startswith("warning: checkpoint step-9 is damaged")]
    assert len(warning) == 1 and SEEN[fault] in warning[0], out
    assert "resumed from" in out and "step-6" in out
    assert result.step == 12 and result.final_dir is not None
    aside = run / "checkpoints" / "damaged-step-9"
    assert sorted(p.name for p in aside.iterdir()) == files_before  # moved, never deleted
    assert losses(run) == straight  # steps 7-12 trained again from step 6, exactly as the uninterrupted run


def test_a_checkpoint_without_a_record_is_still_read_and_its_nan_is_still_found(
        tiny_sd15, digits_data, run, straight, capsys):
    for step in (6, 9):  # as written before records existed
        state = run / "checkpoints" / f"step-{step}" / "state.json"
        meta = json.loads(state.read_text())
        del meta["files"]
        state.write_text(json.dumps(meta))
    write_nan_into_weights(run / "checkpoints" / "step-9")
    resume(tiny_sd15, digits_data, run)
    out = capsys.readouterr().out
    assert "step-9 is damaged (weights.safetensors holds NaN or inf in model." in out
    assert "predates integrity records" in out
    assert losses(run) == straight


def test_state_json_records_every_file_with_size_and_digest(run):
    meta = json.loads((run / "checkpoints" / "step-9" / "state.json").read_text())
    assert set(meta["files"]) == {"weights.safetensors", "training_state.pt"}
    for name, entry in meta["files"].items():
        assert entry["size"] == (run / "checkpoints" / "step-9" / name).stat().st_size
        assert len(entry["sha256"]) == 64


def test_an_explicit_damaged_checkpoint_is_one_line_and_exit_2(tiny_sd15, digits_data, run, capsys):
    from launch.train import main

    ckpt = run / "checkpoints" / "step-9"
    truncate(ckpt)
    code = run_cli(main, ["recipes/demo/sd15_lora_tiny.yaml", f"model.pretrained={tiny_sd15}",
                          f"data.source={digits_data}", f"output_dir={run}", *ARGS, f"resume={ckpt}"])
    err = error_lines(capsys.readouterr().err)
    assert code == 2 and len(err) == 1 and f"resume: {ckpt} is damaged" in err[0], err
    assert ckpt.is_dir()  # an explicit choice is not moved


def test_no_intact_checkpoint_is_one_line_and_nothing_moves(tiny_sd15, digits_data, run):
    for step in (3, 6, 9):
        truncate(run / "checkpoints" / f"step-{step}")
    with pytest.raises(UserError, match="resume: auto found no intact checkpoint .*step-9: .*step-3: "):
        resume(tiny_sd15, digits_data, run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-3", "step-6", "step-9"]


def test_a_training_state_that_would_run_code_is_refused_in_one_line(tiny_sd15, digits_data, run, tmp_path, capsys):
    from launch.train import main

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    ckpt = run / "checkpoints" / "step-9"
    (ckpt / "training_state.pt").write_bytes(pickle.dumps({"optimizer": Payload()}))
    meta = json.loads((ckpt / "state.json").read_text())
    del meta["files"]  # the digest would catch the swap; without a record the plain-data check must
    (ckpt / "state.json").write_text(json.dumps(meta))
    code = run_cli(main, ["recipes/demo/sd15_lora_tiny.yaml", f"model.pretrained={tiny_sd15}",
                          f"data.source={digits_data}", f"output_dir={run}", *ARGS, f"resume={ckpt}"])
    err = error_lines(capsys.readouterr().err)
    assert code == 2 and len(err) == 1 and "will not load as plain data" in err[0], err
    assert not marker.exists()  # nothing in it ran


def test_a_full_disk_during_a_save_is_one_line_keeps_every_checkpoint_and_resumes_exactly(
        tiny_sd15, digits_data, tmp_path, straight, monkeypatch, capsys):
    out = tmp_path / "run"
    real = checkpoint.save_file

    def fills_the_disk(tensors, path):
        if path.parent.name == ".tmp-step-9":
            with open(path, "wb") as f:  # part of the file made it to disk
                f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", fills_the_disk)
    code = run_cli(lambda: Trainer(recipe(tiny_sd15, digits_data, out)).fit())
    err = error_lines(capsys.readouterr().err)
    assert code == DiskFull.exit_code == 74
    assert len(err) == 1 and "checkpoint step-9 not saved: No space left on device" in err[0], err
    assert "free, the save needed about" in err[0] and "newest intact checkpoint is" in err[0] and "step-6" in err[0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-3", "step-6"]  # no staging folder left
    for ckpt in (out / "checkpoints").iterdir():
        checkpoint.verify(ckpt)
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert resume(tiny_sd15, digits_data, out).step == 12
    assert losses(out) == straight


def test_a_disk_error_inside_safetensors_message_is_recognised():
    from trainers.integrity import disk_error

    assert disk_error(Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                '"No space left on device" })')) == "No space left on device"
    assert disk_error(OSError(errno.EROFS, "Read-only file system")) == "Read-only file system"
    assert disk_error(ValueError("shape mismatch")) is None


def test_nonfinite_weights_are_never_exported(tiny_sd15, digits_data, run):
    trainer = Trainer(recipe(tiny_sd15, digits_data, run))
    trainer._load_weights(run / "checkpoints" / "step-9")
    name, param = next(iter(trainer.params.items()))
    param.data.view(-1)[0] = float("inf")
    with pytest.raises(UserError, match=r"export of step 12 refused: .*\.safetensors holds NaN or inf in tensor"):
        trainer.export()
    assert not (run / "final").exists() and not (run / ".tmp-final").exists()


def test_export_py_refuses_a_checkpoint_whose_weights_are_not_finite(tiny_sd15, digits_data, run, capsys):
    """Even with a consistent record (the NaN was trained, not a damaged byte), nothing non-finite is written."""
    from launch.export import main
    from trainers import integrity

    ckpt = run / "checkpoints" / "step-9"
    write_nan_into_weights(ckpt)
    meta = json.loads((ckpt / "state.json").read_text())
    meta["files"] = integrity.record(ckpt, skip=("state.json",))
    (ckpt / "state.json").write_text(json.dumps(meta))
    code = run_cli(main, [str(ckpt), "--out", str(run / "exported")])
    err = error_lines(capsys.readouterr().err)
    assert code == 2 and len(err) == 1 and "holds NaN or inf" in err[0], err
    assert not (run / "exported").exists()


def test_push_refuses_nonfinite_weights_before_any_upload(tmp_path):
    import torch
    from safetensors.torch import save_file

    from trainers.hub import push_folder

    save_file({"lora.weight": torch.tensor([1.0, float("nan")])}, tmp_path / "pytorch_lora_weights.safetensors")
    (tmp_path / "README.md").write_text("card")
    with pytest.raises(UserError, match="not pushed: pytorch_lora_weights.safetensors holds NaN or inf in tensor "
                                        "lora.weight"):
        push_folder(tmp_path, "me/lora", endpoint="http://127.0.0.1:9", tries=1)


def test_a_run_whose_updates_since_its_last_checkpoint_were_all_skipped_is_not_done(tiny_sd15, digits_data, tmp_path):
    trainer = Trainer(recipe(tiny_sd15, digits_data, tmp_path / "run"))
    loss = trainer.objective.loss

    def nan_after_step_9(batch, step):
        value, logs = loss(batch, step)
        return (value * float("nan") if step > 9 else value), logs

    trainer.objective.loss = nan_after_step_9
    with pytest.raises(UserError, match=r"every update after step 9 was skipped as non-finite \(steps 10-12\)"):
        trainer.fit()
    assert not (tmp_path / "run" / "final").exists()


def test_sample_refuses_a_lora_file_that_is_not_safetensors(tiny_sd15, tmp_path, capsys):
    from launch.sample import main

    fake = tmp_path / "lora.safetensors"
    fake.write_bytes(pickle.dumps({"not": "a lora"}))
    code = main(["--pipeline", str(tiny_sd15), "--lora", str(fake), "--prompt", "x", "--steps", "1",
                 "--out", str(tmp_path / "grid.png")])
    err = error_lines(capsys.readouterr().err)
    assert code == 2 and len(err) == 1 and "is not a LoRA weights file" in err[0], err


def test_preflight_warns_when_the_run_will_not_fit(tmp_path):
    import shutil as sh

    from trainers import preflight

    free = sh.disk_usage(tmp_path).free
    assert preflight.check_disk(tmp_path, 1000, keep_last=3, export_bytes=1000) is None
    warning = preflight.check_disk(tmp_path, free // 3, keep_last=3)  # two fit, four do not
    assert warning.startswith("warning:") and "lower checkpoint.keep_last" in warning


def test_every_written_checkpoint_verifies(run):
    for ckpt in checkpoint.complete_checkpoints(run):
        assert checkpoint.verify(ckpt) is True
        load_file(ckpt / "weights.safetensors")


def test_a_really_full_disk_is_one_line_too(tiny_sd15, digits_data, stopped_at_9, tmp_path, capsys):
    """A tmpfs with room for two checkpoints: torch.save's own error on a full disk carries no errno, and must
    still end as the one line and exit 74, the half-written save removed."""
    import subprocess

    one = sum(p.stat().st_size for p in (stopped_at_9 / "checkpoints" / "step-3").iterdir())
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(2.5 * one) + 65536}", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        out = disk / "run"
        code = run_cli(lambda: Trainer(recipe(tiny_sd15, digits_data, out, "checkpoint.keep_last=12")).fit())
        err = error_lines(capsys.readouterr().err)
        assert code == 74 and len(err) == 1 and "not saved: No space left on device" in err[0], err
        left = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert left and all(name.startswith("step-") for name in left)  # no staging folder left behind
        for name in left:
            checkpoint.verify(out / "checkpoints" / name)
    finally:
        subprocess.run(["umount", str(disk)])
