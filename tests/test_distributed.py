"""Several processes on CPU: 2-process DDP (gloo) ends where 1 process with accumulation 2 ends; resume under DDP;
DeepSpeed ZeRO-2 on 2 CPU processes ends where DDP ends (the EMA too), and resumes from its sharded checkpoints.

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
          "train.log_every=1", "lr_schedule.name=constant", "lr_schedule.warmup_steps=0", "train.seed=0",
          "ema.enabled=true", "ema.decay=0.5")  # the EMA (in checkpoints as ema.*, exported in final/) agrees too
TOL = 1e-6  # measured: 0.0; a gradient twice too large moves the step-4 weights by ~1e-3


def launch(config, tiny_sd15, digits_data, out, *overrides, extra_args=(), timeout=240, expect=0, recipe=RECIPE):
    """`accelerate launch --config_file accelerate_configs/CONFIG launch/train.py RECIPE ...`, from the repo root."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "DEEPSPEED_"))}
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config), *extra_args,
           "launch/train.py", recipe, f"model.pretrained={tiny_sd15}", f"data.source={digits_data}",
           f"output_dir={out}", *COMMON, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect if expect is not None else proc.returncode != 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
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


@pytest.mark.parametrize("optimizer", [("optimizer.name=prodigy", "optimizer.lr=1.0"),
                                       ("optimizer.name=adamw_schedulefree", "optimizer.lr=1e-2")],
                         ids=["prodigy", "schedulefree"])
def test_prodigy_and_schedule_free_under_ddp_match_one_process(optimizer, recipe_for, tiny_sd15, digits_data,
                                                               tmp_path):
    """Both keep optimizer-wide figures (Prodigy's d, schedule-free's weight sum) that must agree across ranks:
    2 processes x batch 2 train what 1 process x accumulation 2 does, to the exported (averaged) weights."""
    args = (*optimizer, "ema.enabled=false", "train.max_steps=3", "checkpoint.every_steps=3")
    launch("cpu_ddp.yaml", tiny_sd15, digits_data, tmp_path / "ddp", *args)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(recipe_for(*COMMON, *args, "train.grad_accum=2", out=tmp_path / "one")).fit()
    finally:
        torch.set_num_threads(threads)
    assert max_diff(weights(tmp_path / "ddp", 3), weights(tmp_path / "one", 3)) < 1e-5
    finals = [load_file(tmp_path / run / "final" / "pytorch_lora_weights.safetensors") for run in ("ddp", "one")]
    assert max_diff(*finals) < 1e-5


def test_two_optimizers_under_ddp_match_one_process(tiny_sd15, digits_data, tmp_path):
    """DMD2's generator and fake score (two LoRAs on one DDP-wrapped U-Net, each update leaving the other's weights
    without a gradient) under 2 processes train what 1 process x accumulation 2 does."""
    from trainers.config import load_recipe

    recipe = "recipes/demo/sd15_dmd2_lora_tiny.yaml"
    args = ("train.max_steps=5", "checkpoint.every_steps=5", "data.resolution=64", "optimizer.lr=1e-2",
            "objective.dmd2.fake_optimizer.lr=1e-2")
    launch("cpu_ddp.yaml", tiny_sd15, digits_data, tmp_path / "ddp", *args, recipe=recipe)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(load_recipe(recipe, [f"model.pretrained={tiny_sd15}", f"data.source={digits_data}",
                                     f"output_dir={tmp_path / 'one'}", *COMMON, *args, "train.grad_accum=2"])).fit()
    finally:
        torch.set_num_threads(threads)
    a, b = weights(tmp_path / "ddp", 5), weights(tmp_path / "one", 5)
    assert any(".fake." in k for k in a) and any(".default." in k for k in a)
    assert max_diff(a, b) < 1e-5
    assert [m["step"] for m in metrics(tmp_path / "ddp") if "dm_loss" in m] == [5]


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


def test_fsdp_without_gpus_is_refused(recipe_for, monkeypatch):
    """accelerate shards only over GPUs: on CPU processes fsdp.yaml would quietly train as DDP."""
    from trainers.errors import UserError

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: FSDP applies")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp.yaml` sets
    with pytest.raises(UserError, match="FSDP .* needs GPUs; without one use accelerate_configs/cpu_ddp.yaml"):
        Trainer(recipe_for(*COMMON))


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


# Only machines without deepspeed skip these: `make test` installs it (the dev extra).
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed not installed (pip install -e '.[deepspeed]')")
# The first DeepSpeed run on a machine compiles its shared-memory comm op (~85 s on 2 busy cores; cached in
# ~/.cache/torch_extensions), later launches take ~20 s: hence the longer timeouts.
DS_TIMEOUT = 400


@needs_deepspeed
def test_deepspeed_zero2_config_dry_run(tiny_sd15, digits_data, tmp_path):
    """The GPU ZeRO-2 config and its JSON get through accelerate and DeepSpeed's set-up."""
    proc = launch("deepspeed_zero2.yaml", tiny_sd15, digits_data, tmp_path / "ds", "--dry-run",
                  extra_args=("--num_processes", "1"), timeout=DS_TIMEOUT)
    assert "is valid" in proc.stdout


@pytest.mark.parametrize("config", ["cpu.yaml", "cpu_ddp.yaml", "cpu_zero2.yaml"])
def test_dry_run_under_every_cpu_config(config, tiny_sd15, digits_data, tmp_path):
    if "zero2" in config and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed not installed (pip install -e '.[deepspeed]')")
    proc = launch(config, tiny_sd15, digits_data, tmp_path / "dry", "--dry-run", timeout=DS_TIMEOUT)
    assert proc.stdout.count("is valid") == 1, proc.stdout  # the main process reports, once
    assert not (tmp_path / "dry").exists()  # a dry run writes nothing


@needs_deepspeed
@pytest.mark.parametrize("case", ["text_encoder", "bnb_optimizer", "prodigy", "json_optimizer", "two_optimizers"])
def test_deepspeed_refusals_before_training(case, tiny_sd15, digits_data, tmp_path):
    """What one DeepSpeed engine cannot run stops a dry run already, with the cause named (exit code 2)."""
    config, overrides, recipe = "deepspeed_zero2.yaml", (), RECIPE
    if case == "two_optimizers":  # DMD2's generator and fake score: one engine holds one optimizer
        overrides, message = ("data.resolution=64",), "objective.name: dmd2 trains 2 parameter groups with their own"
        recipe = "recipes/demo/sd15_dmd2_lora_tiny.yaml"
    elif case == "text_encoder":
        overrides, message = ("adapter.text_encoder=true",), "DeepSpeed trains one module, this recipe trains"
    elif case == "bnb_optimizer":
        overrides, message = ("optimizer.name=adamw8bit",), "optimizer.name: adamw8bit (bitsandbytes) cannot be"
    elif case == "prodigy":  # its global step-size estimate needs whole tensors, not ZeRO's shards
        overrides, message = ("optimizer.name=prodigy", "optimizer.lr=1.0"), "optimizer.name: prodigy cannot run on"
    else:  # DeepSpeed's own optimizer would silently override the recipe's
        ds = json.loads((CONFIGS / "deepspeed_zero2.json").read_text())
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3}}
        (tmp_path / "ds.json").write_text(json.dumps(ds))
        config = tmp_path / "ds.yaml"
        config.write_text((CONFIGS / "deepspeed_zero2.yaml").read_text().replace(
            "accelerate_configs/deepspeed_zero2.json", str(tmp_path / "ds.json")))
        message = "the DeepSpeed JSON has an 'optimizer' block"
    proc = launch(config, tiny_sd15, digits_data, tmp_path / "run", "--dry-run", *overrides, recipe=recipe,
                  extra_args=("--num_processes", "1"), timeout=DS_TIMEOUT, expect=None)  # torchrun: exit 1
    # the training process printed the cause on one line and exited 2 (no traceback of ours)
    assert f"error: {message}" in proc.stderr and "UserError" not in proc.stderr, proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def zero2_run(tiny_sd15, digits_data, tmp_path_factory):
    """ddp_run under DeepSpeed ZeRO-2: 2 CPU processes x batch 2, 4 steps, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("zero2") / "run"
    proc = launch("cpu_zero2.yaml", tiny_sd15, digits_data, out, "train.max_steps=4", "checkpoint.every_steps=2",
                  timeout=DS_TIMEOUT)
    return out, proc


def zero_files(run_dir, step):
    """(DeepSpeed's model states, [rank 0's optimizer shard, rank 1's]) of a checkpoint, read as plain data."""
    from trainers.checkpoint import read_deepspeed_file

    folder = Path(run_dir) / "checkpoints" / f"step-{step}" / "deepspeed" / "zero"
    return (read_deepspeed_file(folder / "mp_rank_00_model_states.pt"),
            [read_deepspeed_file(folder / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
             for r in (0, 1)])


@needs_deepspeed
def test_zero2_on_two_cpu_processes_matches_ddp(zero2_run, ddp_run):
    """Same ranks, same data shards, same math: ZeRO-2 ends on DDP's weights (measured: bit for bit, 0.0)."""
    out, proc = zero2_run
    ddp, _ = ddp_run
    assert proc.stdout.count("done: step 4") == 1, proc.stdout  # accelerate: rank 0 alone is the main process
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    assert [m["loss"] for m in metrics(out)] == pytest.approx([m["loss"] for m in metrics(ddp)], rel=1e-5)

    # DeepSpeed agrees: 2 data-parallel ranks, 2 x 2 samples a step, and each rank holds half the optimizer
    states, shards = zero_files(out, 4)
    assert (states["dp_world_size"], states["global_steps"], states["global_samples"]) == (2, 4, 16)
    assert states["ds_config"]["train_batch_size"] == 4 and states["ds_config"]["zero_optimization"]["stage"] == 2
    trained = torch.cat([v.flatten() for k, v in weights(out, 4).items() if k.startswith("model.")])
    halves = [torch.cat(s["single_partition_of_fp32_groups"]) for s in shards]  # fp32 master weights, flat
    assert halves[0].numel() == halves[1].numel() < trained.numel()
    padding = torch.zeros(2 * halves[0].numel() - trained.numel())  # ZeRO pads the flat group to split it evenly
    assert torch.equal(torch.cat(halves).sort().values, torch.cat([trained, padding]).sort().values)  # each once

    # fp32 both ways; DeepSpeed clips with its own gradient_clipping (= max_grad_norm, the same coefficient at 1.0).
    # The EMA follows the weights DeepSpeed writes back into the module's parameters after each sharded step.
    assert any(k.startswith("ema.") for k in weights(out, 4))
    for step in (2, 4):
        diff = max_diff(weights(out, step), weights(ddp, step))
        assert diff < TOL, f"step {step}: ZeRO-2 vs DDP on 2 processes differ by {diff:.3g}"
    final = load_file(out / "final" / "pytorch_lora_weights.safetensors")  # exported by the main process
    assert max_diff(final, load_file(ddp / "final" / "pytorch_lora_weights.safetensors")) < TOL
    assert sorted(p.name for p in (out / "final").iterdir()) == sorted(p.name for p in (ddp / "final").iterdir())
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "final", "logs", "recipe.yaml"]  # no .tmp-*


@needs_deepspeed
def test_zero2_with_accumulation_is_the_same_run(ddp_run, tiny_sd15, digits_data, tmp_path):
    """Batch 1 x accumulation 2: DeepSpeed steps once per 2 micro-batches (accelerate marks the boundary)."""
    out = tmp_path / "b1x2"
    launch("cpu_zero2.yaml", tiny_sd15, digits_data, out, "train.max_steps=2", "checkpoint.every_steps=2",
           "train.batch_size=1", "train.grad_accum=2", timeout=DS_TIMEOUT)
    diff = max_diff(weights(out, 2), weights(ddp_run[0], 2))
    # measured 3.6e-6, as DDP's (batch-1 kernels round differently); a step per micro-batch moves weights ~1e-3
    assert diff < 1e-4, f"ZeRO-2 2 x batch 1 x accumulation 2 vs DDP 2 x batch 2: step-2 weights differ by {diff:.3g}"


@needs_deepspeed
def test_zero2_resume_matches_uninterrupted(zero2_run, tiny_sd15, digits_data, tmp_path):
    straight, _ = zero2_run
    out = tmp_path / "split"
    launch("cpu_zero2.yaml", tiny_sd15, digits_data, out, "train.max_steps=2", "checkpoint.every_steps=2",
           timeout=DS_TIMEOUT)
    second = launch("cpu_zero2.yaml", tiny_sd15, digits_data, out, "train.max_steps=4", "checkpoint.every_steps=2",
                    "resume=auto", timeout=DS_TIMEOUT)
    assert (second.stdout + second.stderr).count("resumed from") == 1
    assert second.stdout.count("done: step 4") == 1, second.stdout

    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "final", "logs", "recipe.yaml"]
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    diff = max_diff(weights(out, 4), weights(straight, 4))
    assert diff < TOL, f"ZeRO-2 resumed at step 2 vs uninterrupted: step-4 weights differ by {diff:.3g}"
    final = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    assert max_diff(final, load_file(straight / "final" / "pytorch_lora_weights.safetensors")) < TOL
    # every rank's shard continued: fp32 master weights and Adam's moments
    for resumed, uninterrupted in zip(zero_files(out, 4)[1], zero_files(straight, 4)[1]):
        pairs = list(zip(resumed["single_partition_of_fp32_groups"], uninterrupted["single_partition_of_fp32_groups"]))
        for a, b in zip(resumed["base_optimizer_state"]["state"].values(),
                        uninterrupted["base_optimizer_state"]["state"].values()):
            pairs += [(a["exp_avg"], b["exp_avg"]), (a["exp_avg_sq"], b["exp_avg_sq"])]
        assert max((a - b).abs().max().item() for a, b in pairs) < TOL


@needs_deepspeed
def test_zero2_checkpoint_refusals(zero2_run, ddp_run, recipe_for, tmp_path):
    """Resuming across DDP and ZeRO, or onto another process count, stops with a message; so does a foreign pickle."""
    import pickle
    from collections import OrderedDict

    from trainers import checkpoint
    from trainers.errors import UserError

    zero_ckpt, ddp_ckpt = zero2_run[0] / "checkpoints" / "step-2", ddp_run[0] / "checkpoints" / "step-2"
    with pytest.raises(UserError, match="written without DeepSpeed"):
        checkpoint.load_deepspeed(None, ddp_ckpt, 2)
    with pytest.raises(UserError, match="--num_processes 2"):
        checkpoint.load_deepspeed(None, zero_ckpt, 1)
    with pytest.raises(UserError, match="written under DeepSpeed ZeRO"):
        Trainer(recipe_for(*COMMON, "train.max_steps=4", f"resume={zero_ckpt}")).fit()
    # DeepSpeed's own engine would unpickle anything (weights_only=False); ours takes plain data only
    torch.save({"x": OrderedDict(), "evil": pickle.PicklingError("not a record")}, tmp_path / "foreign.pt")
    with pytest.raises(pickle.UnpicklingError):
        checkpoint.read_deepspeed_file(tmp_path / "foreign.pt")
