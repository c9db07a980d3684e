"""Several processes on CPU: 2-process DDP (gloo) ends where 1 process with accumulation 2 ends; resume under DDP.

The processes are started the way users start them, `accelerate launch --config_file accelerate_configs/cpu_ddp.yaml`,
with no extra environment: the engine itself asks accelerate for CPU processes when torchrun started several and
there is no GPU (accelerate alone would leave each process training as rank 0 of 1). Every process runs with one thread: the 1-process reference
too, so both sides run the same kernels and the comparison can be tight. With one thread each the weights agree
bit for bit (averaging 2 gradients over gloo and adding 2 halves are the same float operations); a reference on
2 threads differs by ~2e-5 after 4 steps (AdamW magnifies rounding where a gradient is near 0).
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainers.engine import Trainer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/demo/sd15_lora_tiny.yaml"
CONFIGS = ROOT / "accelerate_configs"
# max_grad_norm stays at the recipe's 1.0: clipping sees the all-reduced gradient, the same on both sides.
COMMON = ("train.report_to=none", "data.num_workers=0", "validation.every_steps=0", "train.batch_size=2",
          "train.log_every=1", "lr_schedule.name=constant", "lr_schedule.warmup_steps=0", "train.seed=0")
TOL = 1e-6  # measured: 0.0; a gradient twice too large moves the step-4 weights by ~1e-3


def launch(config, tiny_sd15, digits_data, out, *overrides, extra_args=(), timeout=240):
    """`accelerate launch --config_file accelerate_configs/CONFIG launch/train.py RECIPE ...`, from the repo root."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "DEEPSPEED_"))}
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config), *extra_args,
           "launch/train.py", RECIPE, f"model.pretrained={tiny_sd15}", f"data.source={digits_data}",
           f"output_dir={out}", *COMMON, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def weights(run_dir, step):
    return load_file(Path(run_dir) / "checkpoints" / f"step-{step}" / "weights.safetensors")


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_run(tiny_sd15, digits_data, tmp_path_factory):
    """2 processes x batch 2, 4 steps, checkpoints at 2 and 4: the reference for the tests below."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    proc = launch("cpu_ddp.yaml", tiny_sd15, digits_data, out, "train.max_steps=4", "checkpoint.every_steps=2")
    return out, proc


def test_two_process_ddp_matches_one_process_with_accumulation(ddp_run, recipe_for, tmp_path):
    out, proc = ddp_run
    assert proc.stdout.count("done: step 4") == 1, proc.stdout  # printed by the main process only
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels as the launched processes (one thread each)
    try:
        Trainer(recipe_for(*COMMON, "train.max_steps=4", "checkpoint.every_steps=2", "train.grad_accum=2",
                           out=tmp_path / "one")).fit()
    finally:
        torch.set_num_threads(threads)
    ddp_metrics, one_metrics = metrics(out), metrics(tmp_path / "one")
    assert [m["step"] for m in ddp_metrics] == [1, 2, 3, 4]  # one line per step: only rank 0 writes
    for a, b in zip(ddp_metrics, one_metrics):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (ddp_metrics, one_metrics)
    for step in (2, 4):
        diff = max_diff(weights(out, step), weights(tmp_path / "one", step))
        assert diff < TOL, f"step {step}: 2-process DDP vs 1 process x accumulation 2 differ by {diff:.3g}"
    final = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    assert max_diff(final, load_file(tmp_path / "one" / "final" / "pytorch_lora_weights.safetensors")) < TOL


def test_ddp_with_accumulation_is_the_same_run(ddp_run, tiny_sd15, digits_data, tmp_path):
    """2 processes x batch 1 x accumulation 2: DDP skips the all-reduce on the first micro-batch (no_sync)."""
    straight, _ = ddp_run
    out = tmp_path / "b1x2"
    launch("cpu_ddp.yaml", tiny_sd15, digits_data, out, "train.max_steps=4", "checkpoint.every_steps=2",
           "train.batch_size=1", "train.grad_accum=2")
    diff = max_diff(weights(out, 4), weights(straight, 4))
    # measured 3.5e-6 (batch-1 kernels round differently); a doubled or unsynced gradient moves weights ~1e-3
    assert diff < 1e-4, f"2 x batch 1 x accumulation 2 vs 2 x batch 2: step-4 weights differ by {diff:.3g}"


def test_resume_under_two_processes_matches_uninterrupted(ddp_run, tiny_sd15, digits_data, tmp_path):
    straight, _ = ddp_run
    out = tmp_path / "split"
    # A constant LR is a function of the step alone, so stopping at max_steps=2 and going on to 4 is one run.
    first = launch("cpu_ddp.yaml", tiny_sd15, digits_data, out, "train.max_steps=2", "checkpoint.every_steps=2")
    assert first.stdout.count("done: step 2") == 1, first.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()

    second = launch("cpu_ddp.yaml", tiny_sd15, digits_data, out, "train.max_steps=4", "checkpoint.every_steps=2",
                    "resume=auto")
    assert second.stdout.count("done: step 4") == 1, second.stdout
    assert (second.stdout + second.stderr).count("resumed from") == 1  # the main process says it, once
    assert str(out / "checkpoints" / "step-2") in second.stdout + second.stderr

    # Everything written once, by the main process: no leftovers of concurrent or interrupted writes.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "final", "logs", "recipe.yaml"]
    assert sorted(p.name for p in (out / "final").iterdir()) == \
        sorted(p.name for p in (straight / "final").iterdir())
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    assert [m["loss"] for m in metrics(out)] == pytest.approx([m["loss"] for m in metrics(straight)], rel=1e-5)

    diff = max_diff(weights(out, 4), weights(straight, 4))
    assert diff < TOL, f"2-process run resumed at step 2 vs uninterrupted: step-4 weights differ by {diff:.3g}"
    final = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    assert max_diff(final, load_file(straight / "final" / "pytorch_lora_weights.safetensors")) < TOL
    state = [torch.load(d / "checkpoints" / "step-4" / "training_state.pt", weights_only=True)["optimizer"]["state"]
             for d in (out, straight)]
    assert state[0].keys() == state[1].keys()
    for k in state[0]:  # Adam's moments continue too
        for name in ("exp_avg", "exp_avg_sq"):
            assert (state[0][k][name] - state[1][k][name]).abs().max().item() < TOL


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    ds_file = (config.deepspeed_config or {}).get("deepspeed_config_file")
    if ds_file:
        ds = json.loads((ROOT / ds_file).read_text())  # paths are relative to the repo root, where runs start
        assert ds["zero_optimization"]["stage"] == 2
        offload = ds["zero_optimization"].get("offload_optimizer", {}).get("device", "none")
        assert offload == ("cpu" if "offload" in path.name else "none")
        # what the recipe decides stays "auto" (filled from the Accelerator and the recipe)
        assert all(ds[k] == "auto" for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"))


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed (extra: deepspeed)")
def test_deepspeed_zero2_config_dry_run(tiny_sd15, digits_data, tmp_path):
    """The ZeRO-2 config and its JSON get through accelerate and DeepSpeed's set-up (training under it: see README)."""
    # the first DeepSpeed run on a CPU machine compiles its shared-memory comm op (~80 s), later ones ~12 s
    proc = launch("deepspeed_zero2.yaml", tiny_sd15, digits_data, tmp_path / "ds", "--dry-run",
                  extra_args=("--num_processes", "1"), timeout=400)
    assert "is valid" in proc.stdout
