"""launch/slurm/train.sbatch on a real Slurm: tests/slurm/cluster.sh stands up slurmctld and two slurmd here.

Run by `make test-slurm` (root: it installs Debian's slurm-wlm and munge and starts daemons); skipped otherwise.
"""
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
RECIPE = "recipes/demo/sd15_lora_tiny.yaml"
RUN = ("train.max_steps=300", "train.log_every=1", "checkpoint.every_steps=100", "train.report_to=none",
       "validation.every_steps=0")

pytestmark = [
    pytest.mark.skipif(os.environ.get("DIFFTUNE_SLURM_TESTS") != "1",
                       reason="Slurm tests run with `make test-slurm` (root: installs and starts a local cluster)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a local Slurm cluster needs root"),
    pytest.mark.timeout(900),
]


@pytest.fixture(scope="module")
def cluster():
    subprocess.run([str(CLUSTER), "start"], check=True, timeout=600)
    yield
    subprocess.run([str(CLUSTER), "stop"], timeout=60)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The tiny model and digits in a folder every 'node' (this host) reads."""
    from datasets_prep.digits import write_digits_dataset
    from launch.make_tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("slurm")
    make_tiny_model("sd15", root / "sd15")
    write_digits_dataset(root / "digits", n=64, size=64)
    return root


def sbatch(assets, out: Path, *overrides, flags=(), nodes=1, config="cpu.yaml", per_node=1) -> str:
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
           "ACCELERATE_CONFIG": f"accelerate_configs/{config}", "GPUS_PER_NODE": str(per_node)}
    proc = subprocess.run(
        ["sbatch", "--parsable", "--chdir", str(ROOT), "--nodes", str(nodes), "--cpus-per-task", "2",
         f"--output={out}.slurm-%j.out", *flags, "launch/slurm/train.sbatch", RECIPE,
         f"model.pretrained={assets / 'sd15'}", f"data.source={assets / 'digits'}", f"output_dir={out}", *overrides],
        env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job(job_id: str) -> dict:
    fields = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout.split()
    return dict(f.split("=", 1) for f in fields if "=" in f)


def wait_for(job_id: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=600, until=None) -> dict:
    """The job's fields once it is in one of `states` (or `until(fields)` holds)."""
    done = until or (lambda info: info.get("JobState") in states)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job(job_id)
        if done(info):
            return info
        time.sleep(2)
    raise AssertionError(f"job {job_id} still {job(job_id).get('JobState')} after {timeout} s")


def logged_steps(out: Path) -> int:
    path = out / "logs" / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def no_trainer_left(assets: Path):
    """No trainer of these tests' jobs outlived them (those of other suites running beside this one are theirs)."""
    left = subprocess.run(["pgrep", "-af", f"launch/train.py .*{assets}/"], capture_output=True, text=True).stdout
    assert not left.strip(), f"processes left behind: {left}"


@pytest.fixture(scope="module")
def uninterrupted(cluster, assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "straight"
    info = wait_for(sbatch(assets, out, *RUN))
    return out, info


def test_a_run_completes_with_exit_code_zero(uninterrupted, assets):
    out, info = uninterrupted
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0")
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file() and logged_steps(out) == 300
    no_trainer_left(assets)


def test_a_failed_run_ends_failed_not_completed(cluster, assets, tmp_path):
    info = wait_for(sbatch(assets, tmp_path / "bad", "data.source=/nonexistent/data"))
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0"
    assert info["Restarts"] == "0"  # a failure is not requeued
    no_trainer_left(assets)


def test_preemption_checkpoints_the_step_requeues_and_resumes_exactly(uninterrupted, assets, tmp_path):
    """`scancel --batch --signal=USR1` (what --signal=B:USR1@N sends at the time limit): the trainer checkpoints
    the step it is on, the job requeues itself, and the second attempt ends where the uninterrupted run did."""
    straight, _ = uninterrupted
    out = tmp_path / "preempted"
    job_id = sbatch(assets, out, *RUN)
    deadline = time.monotonic() + 300
    while logged_steps(out) < 60 and time.monotonic() < deadline:  # past step 60, between periodic checkpoints
        time.sleep(0.5)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    info = wait_for(job_id, timeout=900)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1")
    log = next(tmp_path.glob("preempted.slurm-*.out")).read_text(errors="replace")
    stopped = [line for line in log.splitlines() if line.startswith("stopped by a signal: step")]
    assert len(stopped) == 1 and "attempt 1 of" in log and "attempt 2 of" in log  # one log, both attempts
    step = int(stopped[0].split()[5].rstrip(":"))
    assert step > 60  # the step it was on when the signal came, not the last periodic checkpoint
    assert f"resumed from {out / 'checkpoints' / f'step-{step}'}" in log
    assert losses(out) == losses(straight)  # bitwise, all 300 steps, before and after the requeue
    a, b = (load_file(run / "final" / "pytorch_lora_weights.safetensors") for run in (out, straight))
    assert all(torch.equal(a[k], b[k]) for k in a)
    no_trainer_left(assets)


def launcher_started(out: Path) -> bool:
    """node.sh has started this job's `accelerate launch`: every shell on the way has its USR1 trap, no trainer has
    its handler."""
    return subprocess.run(["pgrep", "-f", f"bin/accelerate launch .*output_dir={out}( |$)"],
                          capture_output=True).returncode == 0


def resumed_every_stop(log: str, out: Path) -> list[int]:
    """The steps each attempt stopped at; each must be where the next attempt resumed."""
    stops = [int(line.split()[5].rstrip(":")) for line in log.splitlines() if line.startswith("stopped by a signal: step")]
    for step in stops:
        assert f"resumed from {out / 'checkpoints' / f'step-{step}'}" in log, (step, log[-3000:])
    return stops


def test_a_time_limit_signal_checkpoints_requeues_and_the_run_ends_as_uninterrupted(uninterrupted, assets, tmp_path):
    """--time with --signal=B:USR1@N (the script's own #SBATCH form): Slurm signals the batch shell before the limit
    (its timer has a 60 s resolution, so here seconds after the start); the attempt checkpoints the step it is on
    and requeues. Once it has, the test gives the job a longer limit (as an admin's `scontrol update` would), so the
    next attempt finishes, with the uninterrupted run's losses, bitwise: two attempts, not one per half-minute."""
    straight, _ = uninterrupted
    out = tmp_path / "timed"
    job_id = sbatch(assets, out, *RUN, flags=("--time=2", "--signal=B:USR1@90"))
    first = wait_for(job_id, timeout=300,
                     until=lambda info: int(info.get("Restarts", 0)) >= 1 or info.get("JobState") == "COMPLETED")
    if int(first.get("Restarts", 0)) >= 1:  # else the first attempt was never signalled: the asserts say so
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=15"], check=True)
    info = wait_for(job_id, timeout=900)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0")
    log = next(tmp_path.glob("timed.slurm-*.out")).read_text(errors="replace")
    stops = resumed_every_stop(log, out)
    assert stops and int(info["Restarts"]) == len(stops)
    assert losses(out) == losses(straight)
    no_trainer_left(assets)


def test_a_signal_during_start_up_ends_cleanly_and_still_requeues(uninterrupted, assets, tmp_path):
    """The stop arrives before any trainer installed its handler: the trainers (started with USR1 ignored) get it
    again once they listen, stop after their first step with a checkpoint, and the job requeues and completes."""
    straight, _ = uninterrupted
    out = tmp_path / "early"
    job_id = sbatch(assets, out, *RUN)
    deadline = time.monotonic() + 120
    while not launcher_started(out) and time.monotonic() < deadline:  # "RUNNING" can precede the batch shell's trap
        time.sleep(0.1)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
    assert logged_steps(out) == 0  # sent before the first step (the trainers were still loading)
    info = wait_for(job_id, timeout=900)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1")
    log = next(tmp_path.glob("early.slurm-*.out")).read_text(errors="replace")
    stops = resumed_every_stop(log, out)
    assert len(stops) == 1 and stops[0] < 100  # well before the first periodic checkpoint
    assert "Traceback" not in log
    assert losses(out) == losses(straight)
    no_trainer_left(assets)


def test_two_nodes_train_what_one_node_with_two_processes_does(cluster, assets, tmp_path):
    """DDP across the two slurmd (one process each, rendezvous at node1) against both processes on one node."""
    args = ("train.max_steps=20", "train.log_every=1", "checkpoint.every_steps=10")
    runs = {"two_nodes": dict(nodes=2, per_node=1), "one_node": dict(nodes=1, per_node=2)}
    for name, kw in runs.items():
        info = wait_for(sbatch(assets, tmp_path / name, *args, config="cpu_ddp.yaml", **kw))
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), name
    a, b = (load_file(tmp_path / name / "final" / "pytorch_lora_weights.safetensors") for name in runs)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert losses(tmp_path / "two_nodes") == pytest.approx(losses(tmp_path / "one_node"), rel=1e-6)
    no_trainer_left(assets)
