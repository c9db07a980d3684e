"""trainers/objectives/autoencoder.py: a VAE trained through the engine, exported with its latent scaling."""
import json
import math

import pytest
import torch
from diffusers import AutoencoderKL

from trainers.engine import Trainer
from trainers.errors import ConfigError

AE = ("objective.name=autoencoder", "adapter.kind=full", "validation.prompts=[]", "data.use_cache=false")


def test_reconstruction_improves_and_export_carries_the_latent_scale(recipe_for):
    trainer = Trainer(recipe_for(*AE, "train.max_steps=60", "train.log_every=10", "train.batch_size=4",
                                 "optimizer.lr=3e-3", "lr_schedule.name=constant",
                                 "objective.autoencoder.latent_std_momentum=0.5"))
    frozen = {k: p.detach().clone() for k, p in trainer.backbone.denoiser.named_parameters()}
    result = trainer.fit()
    logs = [json.loads(line) for line in (result.output_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert logs[-1]["reconstruction"] < 0.9 * logs[0]["reconstruction"]  # 0.60 -> 0.49 seen
    vae = AutoencoderKL.from_pretrained(result.final_dir / "vae")
    assert math.isclose(vae.config.scaling_factor, 1 / trainer.objective.latent_std(), rel_tol=1e-3)
    assert vae.config.scaling_factor != 0.18215  # measured, not the tiny model's inherited value
    for k, p in vae.state_dict().items():
        assert torch.equal(p, trainer.backbone.vae.state_dict()[k])
    assert all(torch.equal(frozen[k], p) for k, p in trainer.backbone.denoiser.named_parameters())


def test_resume_restores_the_running_latent_moments(recipe_for, tmp_path):
    first = Trainer(recipe_for(*AE, "train.max_steps=4", "checkpoint.every_steps=2", out=tmp_path / "a"))
    first.fit()
    again = Trainer(recipe_for(*AE, "train.max_steps=4", out=tmp_path / "a"))
    again._prepare()
    assert again._resume() == 4
    assert torch.equal(again.objective.moments, first.objective.moments)


@pytest.mark.parametrize("bad, key", [(("adapter.kind=lora",), "adapter.kind"),
                                      (("validation.prompts=[a red seven]",), "validation.prompts")])
def test_misconfigured_autoencoder_recipes_are_named(recipe_for, bad, key):
    with pytest.raises(ConfigError, match=key):
        Trainer(recipe_for(*AE, *bad))


def test_full_finetune_can_train_the_text_encoder_too(recipe_for):
    trainer = Trainer(recipe_for("adapter.kind=full", "adapter.text_encoder=true", "train.max_steps=2",
                                 "optimizer.lr=1e-3"))
    encoder = trainer.backbone.text_encoders["text_encoder"]
    before = {k: p.detach().clone() for k, p in encoder.named_parameters()}
    result = trainer.fit()
    changed = [k for k, p in encoder.named_parameters() if not torch.equal(before[k], p)]
    assert len(changed) > len(before) // 2
    from transformers import CLIPTextModel

    saved = CLIPTextModel.from_pretrained(result.final_dir / "text_encoder")
    assert all(torch.equal(p, encoder.state_dict()[k]) for k, p in saved.state_dict().items() if k in encoder.state_dict())
