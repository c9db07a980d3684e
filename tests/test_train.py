"""End to end on the tiny SD-1.5 model: learning, resume, accumulation, export that stock diffusers loads."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainers.engine import Trainer

ROOT = Path(__file__).resolve().parents[1]


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "logs" / "metrics.jsonl").read_text().splitlines()]


def lora_weights(trainer):
    return {k: p.detach().clone() for k, p in trainer.params.items()}


@pytest.fixture(params=["sd15", "sdxl"])
def family_model(request):
    """The tiny pipeline of each backbone family."""
    return request.getfixturevalue(f"tiny_{request.param}")


def test_loss_falls_over_60_steps(recipe_for, family_model):
    trainer = Trainer(recipe_for("train.max_steps=60", "train.log_every=1", "train.batch_size=4",
                                 "lr_schedule.name=constant", f"model.pretrained={family_model}"))
    result = trainer.fit()
    seq = losses(result.output_dir)
    assert len(seq) == 60
    first, last = sum(seq[:10]) / 10, sum(seq[-10:]) / 10
    assert last < first, (first, last)
    assert (result.final_dir / "pytorch_lora_weights.safetensors").is_file()
    assert (result.final_dir / "lora_kohya.safetensors").is_file()
    assert (result.final_dir / "README.md").read_text().startswith("---\n")
    assert (result.output_dir / "recipe.yaml").is_file() and (result.final_dir / "recipe.yaml").is_file()


def test_resume_mid_run_matches_uninterrupted(recipe_for, tmp_path, family_model):
    args = (f"model.pretrained={family_model}", "train.max_steps=20", "checkpoint.every_steps=10", "lr_schedule.name=cosine", "train.log_every=1",
            "lr_schedule.warmup_steps=3", "train.batch_size=2", "ema.enabled=true", "ema.decay=0.9")
    straight = Trainer(recipe_for(*args, out=tmp_path / "straight"))
    straight.fit()
    interrupted = Trainer(recipe_for(*args, out=tmp_path / "split"))
    assert interrupted.fit(until=10).final_dir is None
    assert (tmp_path / "split" / "checkpoints" / "step-10" / "state.json").is_file()
    resumed = Trainer(recipe_for(*args, "resume=auto", out=tmp_path / "split"))
    assert resumed.fit().step == 20
    a, b = lora_weights(straight), lora_weights(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    ema_a, ema_b = straight.ema.shadow, resumed.ema.shadow
    assert max((ema_a[k] - ema_b[k]).abs().max().item() for k in ema_a) < 1e-6
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")  # the per-step loss sequence, exactly
    final = load_file(tmp_path / "split" / "final" / "pytorch_lora_weights.safetensors")
    assert final.keys() == load_file(tmp_path / "straight" / "final" / "pytorch_lora_weights.safetensors").keys()


def test_metrics_log_follows_the_resumed_run(recipe_for, tmp_path):
    """A run killed after its last checkpoint logged steps it will train again; a fresh start (resume: none) in the
    same folder (allowed once the old checkpoints are gone) is a new run. Either way each step has one row, from the
    run that the weights come from."""
    import shutil

    args = ("train.max_steps=6", "checkpoint.every_steps=3", "train.log_every=1", "train.batch_size=2")
    out = tmp_path / "run"
    Trainer(recipe_for(*args, out=out)).fit()
    first = losses(out)
    shutil.rmtree(out / "checkpoints" / "step-6")  # as if killed after logging step 6, before its checkpoint,
    with open(out / "logs" / "metrics.jsonl", "a") as f:  # and in the middle of writing step 7's row
        f.write('{"step": 7, "lo')
    Trainer(recipe_for(*args, "resume=auto", out=out)).fit()
    assert [json.loads(x)["step"] for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert losses(out) == first
    from trainers.errors import UserError
    fresh = ("train.max_steps=2", "train.log_every=1", "train.batch_size=2", "resume=none")
    with pytest.raises(UserError, match="resume: none starts a new run, but .* holds checkpoints of an earlier one "
                                        r"\(newest step-6\)"):
        Trainer(recipe_for(*fresh, out=out))  # the earlier run's checkpoints would mix with this one's
    shutil.rmtree(out / "checkpoints")
    Trainer(recipe_for(*fresh, out=out)).fit()
    assert len(losses(out)) == 2


def test_accumulation_gives_the_same_first_update(recipe_for, tmp_path):
    # Adam's first step is lr * g / (|g| + eps): with the default eps it is nearly sign(g), blind to a wrongly
    # scaled gradient and chaotic where g ~ 0. A large eps makes the update proportional to g, so this compares
    # the accumulated gradients themselves.
    def first_update(batch, accum, name):
        t = Trainer(recipe_for("train.max_steps=1", f"train.batch_size={batch}", f"train.grad_accum={accum}",
                               "optimizer.name=adamw", "optimizer.eps=1.0", "optimizer.lr=1.0",
                               "optimizer.max_grad_norm=0", "optimizer.weight_decay=0", out=tmp_path / name))
        before = lora_weights(t)
        t.fit()
        return {k: p.detach() - before[k] for k, p in t.params.items()}

    a, b = first_update(4, 1, "b4"), first_update(2, 2, "b2x2")
    assert max(v.abs().max().item() for v in a.values()) > 1e-5  # something moved
    summed = first_update(2, 2, "b2x2_again")
    assert all(torch.equal(b[k], summed[k]) for k in b)  # deterministic
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-7)


LOAD_SCRIPT = textwrap.dedent("""
    import sys, torch
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file, save_file
    base, final, inputs, out = sys.argv[1:5]
    pipe = DiffusionPipeline.from_pretrained(base)
    x = load_file(inputs)
    encoders = [n for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]
    def run():
        with torch.no_grad():
            kw = {"encoder_hidden_states": x["h"]}
            if "text_embeds" in x:
                kw["added_cond_kwargs"] = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
            res = {"unet": pipe.unet(x["z"], x["t"], **kw).sample}
            return res | {n: getattr(pipe, n)(x["ids"])[0] for n in encoders}
    before = run()
    pipe.load_lora_weights(final)
    after = run()
    pipe.unload_lora_weights()
    pipe.load_lora_weights(final, weight_name="lora_kohya.safetensors")
    kohya = {f"kohya_{k}": v for k, v in run().items()}
    save_file({**{f"base_{k}": v for k, v in before.items()}, **after, **kohya}, out)
""")


def fixed_inputs(backbone):
    """Denoiser and text-encoder inputs that both processes feed to the model."""
    g = torch.Generator().manual_seed(0)
    dim = backbone.denoiser.config.cross_attention_dim
    x = {"z": torch.randn(2, 4, 8, 8, generator=g), "t": torch.tensor([10, 700]),
         "h": torch.randn(2, 77, dim, generator=g), "ids": backbone.tokenize(["a digit", "red"])}
    if backbone.family == "sdxl":
        x |= {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    return x


def outputs_in_this_process(backbone, x):
    kw = {"encoder_hidden_states": x["h"]}
    if "text_embeds" in x:
        kw["added_cond_kwargs"] = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
    with torch.no_grad():
        res = {"unet": backbone.denoiser.eval()(x["z"], x["t"], **kw).sample}
        return res | {n: enc.eval()(x["ids"])[0] for n, enc in backbone.text_encoders.items()}


@pytest.mark.parametrize("family, text_encoder, targets", [
    ("sd15", False, "[to_q, to_k, to_v, to_out.0, proj_in, ff.net.2]"),
    ("sd15", True, "[to_q, to_k, to_v, to_out.0]"),
    ("sdxl", True, "[to_q, to_k, to_v, to_out.0]"),
], ids=["sd15_unet_lora_wide_targets", "sd15_with_text_encoder_lora", "sdxl_with_text_encoders_lora"])
def test_exported_lora_loads_in_a_fresh_process(recipe_for, tiny_sd15, tiny_sdxl, tmp_path, family, text_encoder,
                                                targets):
    """Both files, diffusers format and kohya format, reproduce the trained model in stock diffusers."""
    base = {"sd15": tiny_sd15, "sdxl": tiny_sdxl}[family]
    trainer = Trainer(recipe_for("train.max_steps=15", "optimizer.lr=5e-3", "adapter.alpha=4", "adapter.rank=8",
                                 f"adapter.text_encoder={str(text_encoder).lower()}", f"model.pretrained={base}",
                                 f"adapter.target_modules={targets}"))
    final = trainer.fit().final_dir
    script, inputs, out = tmp_path / "load.py", tmp_path / "inputs.safetensors", tmp_path / "outputs.safetensors"
    script.write_text(LOAD_SCRIPT)
    x = fixed_inputs(trainer.backbone)
    save_file(x, inputs)
    proc = subprocess.run([sys.executable, str(script), str(base), str(final), str(inputs), str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh, ours = load_file(out), outputs_in_this_process(trainer.backbone, x)
    assert {k for k in fresh if not k.startswith(("base_", "kohya_"))} == ours.keys()
    for k in ours:
        torch.testing.assert_close(fresh[k], ours[k], rtol=0, atol=1e-5)
        torch.testing.assert_close(fresh[f"kohya_{k}"], ours[k], rtol=0, atol=1e-5)
    assert (fresh["unet"] - fresh["base_unet"]).abs().max() > 1e-4
    if text_encoder:
        for name in trainer.backbone.text_encoders:
            assert (fresh[name] - fresh[f"base_{name}"]).abs().max() > 1e-4


def test_full_finetune_exports_a_unet_folder(recipe_for, family_model):
    from diffusers import UNet2DConditionModel

    trainer = Trainer(recipe_for("adapter.kind=full", "train.max_steps=3", "optimizer.lr=1e-3",
                                 f"model.pretrained={family_model}"))
    final = trainer.fit().final_dir
    unet = UNet2DConditionModel.from_pretrained(final / "unet")
    ours = trainer.backbone.denoiser.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in unet.state_dict().items())
    assert (final / "scheduler" / "scheduler_config.json").is_file()


def test_validation_writes_sample_grids(recipe_for, family_model):
    trainer = Trainer(recipe_for("train.max_steps=2", f"model.pretrained={family_model}", "validation.every_steps=2", "validation.steps=2",
                                 "validation.images_per_prompt=2", "train.report_to=tensorboard"))
    result = trainer.fit()
    from PIL import Image

    grid = Image.open(result.output_dir / "samples" / "step-2.png")
    assert grid.size == (2 * 64, 2 * 64)
    assert (result.final_dir / "samples.png").is_file()
    assert list((result.output_dir / "logs").rglob("events.out.tfevents*"))


def run_cli(*args, **kw):
    return subprocess.run([*args], cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def test_dry_run_prints_parameter_counts(tiny_sd15, digits_data, tmp_path):
    proc = run_cli(sys.executable, "launch/train.py", "recipes/demo/sd15_lora_tiny.yaml", "--dry-run",
                   f"model.pretrained={tiny_sd15}", f"data.source={digits_data}", f"output_dir={tmp_path}/o")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "trainable parameters: 30,208" in proc.stdout and "frozen parameters:" in proc.stdout
    assert "training samples: 64" in proc.stdout
    assert not (tmp_path / "o").exists()


def test_missing_model_exits_2(digits_data, tmp_path):
    proc = run_cli(sys.executable, "launch/train.py", "recipes/demo/sd15_lora_tiny.yaml",
                   f"model.pretrained={tmp_path}/nope", f"data.source={digits_data}", f"output_dir={tmp_path}/o")
    assert proc.returncode == 2 and "model.pretrained" in proc.stderr and "Traceback" not in proc.stderr


def test_accelerate_launch_works_like_python(tiny_sd15, digits_data, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    proc = run_cli(str(accelerate), "launch", "--config_file", "accelerate_configs/cpu.yaml", "launch/train.py",
                   "recipes/demo/sd15_lora_tiny.yaml", f"model.pretrained={tiny_sd15}",
                   f"data.source={digits_data}", f"output_dir={tmp_path}/run", "train.max_steps=3",
                   "validation.every_steps=0", "checkpoint.every_steps=0", "data.num_workers=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoints" / "step-3" / "state.json").is_file()
