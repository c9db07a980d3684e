"""SIGTERM (preemption) leaves a checkpoint at the current step and exits 0; the run then resumes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _stop_a_run(tiny_sd15, digits_data, out, send, workers=0):
    """Start a long run, let it log three steps, `send(proc)` a stop and return what it printed."""
    args = ["recipes/demo/sd15_lora_tiny.yaml", f"model.pretrained={tiny_sd15}", f"data.source={digits_data}",
            f"output_dir={out}", "train.max_steps=100000", "train.log_every=1", "train.report_to=none",
            "validation.every_steps=0", "checkpoint.every_steps=0", f"data.num_workers={workers}",
            "train.batch_size=1"]
    proc = subprocess.Popen([sys.executable, "launch/train.py", *args], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "logs" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    send(proc)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    saved = [int(p.name[5:]) for p in (out / "checkpoints").glob("step-*") if (p / "state.json").is_file()]
    assert saved == [logged[-1]] and logged[-1] >= 3
    assert not (out / "final").exists()
    assert f"stopped by a signal: step {logged[-1]} checkpointed in {out / 'checkpoints' / f'step-{logged[-1]}'}" \
        in stdout.splitlines()[-1]  # the last line names the checkpoint
    return stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT], ids=lambda s: s.name)
def test_stop_signal_checkpoints_the_current_step_and_exits_0(tiny_sd15, digits_data, tmp_path, sig):
    _stop_a_run(tiny_sd15, digits_data, tmp_path / "run", lambda proc: proc.send_signal(sig))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_stop_sent_to_the_whole_process_group_spares_the_loader_workers(tiny_sd15, digits_data, tmp_path, sig):
    """`kill -- -PGID`, Slurm's stops (which signal every process of a step) and systemd's reach the DataLoader
    workers too; a worker dying of one used to end the run in a loader traceback with no checkpoint."""
    stderr = _stop_a_run(tiny_sd15, digits_data, tmp_path / "run", lambda proc: os.killpg(proc.pid, sig), workers=1)
    assert "Traceback" not in stderr


def test_second_ctrl_c_aborts_at_once():
    import os

    from trainers.signals import StopRequest

    # Python's own handler to start from, whatever the runner left (a background `cmd &` ignores SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_stopped_run_marks_itself_for_the_batch_script_and_a_finished_one_does_not(tiny_sd15, digits_data, tmp_path):
    """DIFFTUNE_STOP_MARKER (set by launch/slurm/train.sbatch) gets the checkpoint of a stopped run only: a stop
    signal that arrives after the last step must not requeue a finished job."""
    from launch.train import mark_stopped
    from trainers.engine import TrainResult

    marker = tmp_path / "job.stopped"
    os.environ["DIFFTUNE_STOP_MARKER"] = str(marker)
    try:
        mark_stopped(TrainResult(tmp_path / "run", None, 7, 0.1, stopped=True))
        assert marker.read_text().strip() == str(tmp_path / "run" / "checkpoints" / "step-7")
        marker.unlink()
        proc = subprocess.run([sys.executable, "launch/train.py", "recipes/demo/sd15_lora_tiny.yaml",
                               f"model.pretrained={tiny_sd15}", f"data.source={digits_data}",
                               f"output_dir={tmp_path / 'done'}", "train.max_steps=2", "train.report_to=none",
                               "validation.every_steps=0", "checkpoint.every_steps=0", "data.num_workers=0"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert not marker.exists()
    finally:
        del os.environ["DIFFTUNE_STOP_MARKER"]


def test_a_chain_stopped_in_a_stage_ends_there_with_its_checkpoint_named(tmp_path):
    """launch/demo_teacher.py (like the demo and the distillation chain) runs stages in turn: a stop during one
    must end the chain with exit 0 and the checkpoint named, not hand the next stage a run that did not finish."""
    work, out = tmp_path / "work", tmp_path / "teacher"
    proc = subprocess.Popen([sys.executable, "launch/demo_teacher.py", "--world", "v2", "--work", str(work),
                             "--out", str(out), "--images", "64", "--vae-steps", "2", "--unet-steps", "100000",
                             "train.batch_size=2", "train.log_every=1", "train.report_to=none",
                             "validation.every_steps=0", "checkpoint.every_steps=0", "data.num_workers=1"],
                            cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = work / "runs" / "unet" / "logs" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
    step = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert stdout.splitlines()[-1] == (f"stopped by a signal: step {step} of demo_teacher2_unet checkpointed in "
                                       f"{work / 'runs' / 'unet' / 'checkpoints' / f'step-{step}'}; the same "
                                       "command resumes the chain")
    assert not out.exists()  # no teacher assembled from a stage that did not finish
