"""trainers/objectives/finetune.py and the options every fine-tune recipe can turn on."""
import math

import pytest
import torch

from trainers.engine import Trainer
from trainers.errors import ConfigError


@pytest.mark.parametrize("options", [
    ("objective.prediction_type=v_prediction", "objective.zero_terminal_snr=true", "objective.snr_gamma=5"),
    ("objective.snr_gamma=5", "objective.noise_offset=0.1"),
    ("optimizer.name=adamw8bit",),
    ("optimizer.name=paged_adamw8bit",),
    ("optimizer.name=lion8bit", "optimizer.lr=1e-4", "optimizer.betas=[0.9, 0.99]"),
    ("memory.gradient_checkpointing=true", "adapter.text_encoder=true"),
    ("precision=bf16",),
    ("adapter.kind=full", "ema.enabled=true", "lr_schedule.name=linear"),
], ids=["v_ztsnr_minsnr", "minsnr_offset", "adamw8bit", "paged_adamw8bit", "lion8bit", "checkpointing_te", "bf16", "full_ema"])
def test_options_train_with_finite_loss(recipe_for, options):
    trainer = Trainer(recipe_for("train.max_steps=2", "train.log_every=1", "train.batch_size=2", *options))
    before = {k: p.detach().clone() for k, p in trainer.params.items()}
    result = trainer.fit()
    assert result.last_loss is not None and math.isfinite(result.last_loss)
    assert any(not torch.equal(before[k], p) for k, p in trainer.params.items())


def test_adamw8bit_is_bitsandbytes(recipe_for):
    import bitsandbytes as bnb

    trainer = Trainer(recipe_for("optimizer.name=adamw8bit", "train.max_steps=1"))
    trainer.fit()
    assert isinstance(trainer.optimizer.optimizer, bnb.optim.AdamW8bit)


def test_zero_terminal_snr_needs_v_prediction(recipe_for):
    with pytest.raises(ConfigError, match="objective.zero_terminal_snr"):
        Trainer(recipe_for("objective.zero_terminal_snr=true", "objective.prediction_type=epsilon"))


def test_caption_dropout_encodes_the_empty_prompt(recipe_for):
    trainer = Trainer(recipe_for("objective.caption_dropout=1.0"))
    obj = trainer.objective
    dropped = obj.condition({"captions": ["a red seven", "a blue two"]}, [1, 2])["encoder_hidden_states"]
    empty = obj.condition({"captions": ["", ""]}, [1, 2])["encoder_hidden_states"]
    kept = Trainer(recipe_for("objective.caption_dropout=0.0")).objective.condition({"captions": ["a red seven"]}, [1])
    assert torch.equal(dropped, empty)
    assert not torch.equal(kept["encoder_hidden_states"][0], empty[0])


def test_v_prediction_target_and_zero_snr_schedule(recipe_for):
    obj = Trainer(recipe_for("objective.prediction_type=v_prediction", "objective.zero_terminal_snr=true")).objective
    assert obj.schedule.prediction_type == "v_prediction"
    assert obj.schedule.acp[-1].item() < 1e-9  # the last timestep is pure noise
    cfg = obj.schedule.sampling_config()
    assert cfg["prediction_type"] == "v_prediction" and cfg["rescale_betas_zero_snr"] is True


def test_lora_starts_as_the_base_model(recipe_for, tiny_sd15):
    from diffusers import UNet2DConditionModel

    trainer = Trainer(recipe_for("adapter.rank=4"))
    base = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    z, t, h = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(trainer.backbone.denoiser(z, t, encoder_hidden_states=h).sample,
                                   base(z, t, encoder_hidden_states=h).sample)


def test_hub_push_uploads_final(recipe_for, monkeypatch, tmp_path):
    """hub.push: true commits final/ at the end of fit: the real client against tests/test_hub.py's local hub."""
    from test_hub import LocalHub, point_at

    with LocalHub() as hub:
        point_at(monkeypatch, hub.url, tmp_path)
        result = Trainer(recipe_for("train.max_steps=1", "hub.push=true", "hub.repo_id=me/tiny-lora",
                                    "hub.revision=exp")).fit()
    (commit,) = hub.commits
    assert hub.repos["me/tiny-lora"]["private"] is True and commit["revision"] == "exp"
    assert {"README.md", "recipe.yaml", "pytorch_lora_weights.safetensors"} <= set(commit["files"])
    weights = result.final_dir / "pytorch_lora_weights.safetensors"
    assert commit["files"]["pytorch_lora_weights.safetensors"] == weights.read_bytes()
    assert "load_lora_weights('me/tiny-lora')" in commit["files"]["README.md"].decode()


def test_hub_push_needs_a_repo_id(recipe_for):
    with pytest.raises(ConfigError, match="hub.repo_id"):
        recipe_for("hub.push=true")


def test_card_carries_the_recipe_trigger_words(recipe_for):
    import yaml

    final = Trainer(recipe_for("train.max_steps=1", "data.trigger_words=[ohwx]")).fit().final_dir
    front = yaml.safe_load((final / "README.md").read_text().split("---")[1])
    assert front["instance_prompt"] == "ohwx" and "lora" in front["tags"]


def test_lora_targets_default_to_the_family_and_typos_are_named(recipe_for):
    trainer = Trainer(recipe_for("adapter.target_modules=null"))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in trainer.backbone.denoiser.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"to_q", "to_k", "to_v", "0"}  # to_out.0
    with pytest.raises(ConfigError, match="to_qq"):
        Trainer(recipe_for("adapter.target_modules=[to_qq, to_k]"))


def test_heldout_loss_is_logged_reproducible_and_falls(recipe_for, digits_data):
    import json

    trainer = Trainer(recipe_for(f"validation.loss_source={digits_data}", "validation.loss_samples=8",
                                 "validation.every_steps=20", "validation.prompts=[]", "train.max_steps=40",
                                 "train.batch_size=4", "lr_schedule.name=constant", "optimizer.lr=2e-3"))
    before = trainer.heldout_loss()
    assert trainer.heldout_loss() == before  # fixed noise and timesteps: the same weights score the same
    result = trainer.fit()
    logged = [json.loads(line) for line in (result.output_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    val = {m["step"]: m["val_loss"] for m in logged if "val_loss" in m}
    assert sorted(val) == [20, 40]
    assert val[40] < before


def test_heldout_loss_source_errors_are_named(recipe_for, digits_data, tmp_path):
    from trainers.errors import UserError

    with pytest.raises(UserError, match="validation.loss_source"):
        Trainer(recipe_for(f"validation.loss_source={tmp_path / 'missing'}"))
    with pytest.raises(UserError, match="validation.loss_source"):
        Trainer(recipe_for(f"validation.loss_source={digits_data}", "objective.name=autoencoder", "adapter.kind=full",
                           "validation.prompts=[]", "data.use_cache=false"))


def test_a_model_saved_in_float16_fine_tunes_in_float32(recipe_for, tiny_sd15, tmp_path):
    """Hub models often ship float16 weights; from_pretrained keeps them, the LoRA's float32 input must not clash."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(tiny_sd15).to(torch.float16).save_pretrained(tmp_path / "fp16")
    trainer = Trainer(recipe_for(f"model.pretrained={tmp_path / 'fp16'}", "train.max_steps=1"))
    assert math.isfinite(trainer.fit().last_loss)
    assert trainer.backbone.denoiser.dtype == torch.float32
