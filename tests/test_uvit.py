"""trainers/backbones/uvit*.py: the U-ViT network, its pipeline and LoRA files, and training it through the engine."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainers.backbones.uvit_model import UViT2DModel, patchify, unpatchify
from trainers.backbones.uvit_pipeline import UViTPipeline

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = dict(prompt=["a handwritten digit seven"], num_inference_steps=2, guidance_scale=3.0, height=64, width=48)


def inputs(side=(8, 8), seed=0):
    """Latents (2, 4, h, w), two timesteps and 77 tiny-CLIP-wide text states."""
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(2, 4, *side, generator=g), "timestep": torch.tensor([10, 700]),
            "encoder_hidden_states": torch.randn(2, 77, 32, generator=g)}


@pytest.fixture(scope="module")
def model(tiny_uvit):
    return UViT2DModel.from_pretrained(tiny_uvit / "transformer").eval()


@pytest.fixture(scope="module")
def pipe(tiny_uvit):
    pipe = UViTPipeline.from_pretrained(tiny_uvit)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def test_output_has_the_latent_shape(model):
    assert model(**inputs()).sample.shape == (2, 4, 8, 8)
    assert model(**inputs(side=(8, 12))).sample.shape == (2, 4, 8, 12)  # position embeddings resized
    x = inputs()
    x["timestep"] = torch.tensor(10)  # a pipeline's scalar timestep is broadcast
    assert model(**x, return_dict=False)[0].shape == (2, 4, 8, 8)


def test_unpatchify_inverts_patchify_in_the_patch_embeddings_order(model):
    x = torch.randn(2, 4, 8, 12)
    assert torch.equal(unpatchify(patchify(x, 2), 4, 4, 6), x)
    # The conv patch embedding is a Linear over patchify's (p1, p2, C) vectors: token k is patch k of unpatchify.
    conv = model.patch_embed
    linear = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)  # (D, p*p*C)
    tokens = conv(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(patchify(x, 2) @ linear.T + conv.bias, tokens, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_each_out_block_joins_its_mirrored_in_block(model):
    ins, skips = {}, {}
    hooks = [b.register_forward_hook(lambda m, a, out, i=i: ins.__setitem__(i, out))
             for i, b in enumerate(model.in_blocks)]
    hooks += [b.register_forward_pre_hook(lambda m, args, i=i: skips.__setitem__(i, args[1]))
              for i, b in enumerate(model.out_blocks)]
    base = model(**inputs()).sample
    for h in hooks:
        h.remove()
    depth = len(model.in_blocks)
    assert depth == 2 and all(torch.equal(skips[i], ins[depth - 1 - i]) for i in range(depth))
    w = model.out_blocks[0].skip_linear.weight
    saved = w.clone()
    w[:, w.shape[1] // 2:] = 0  # drop the skip half of [x, skip]
    changed = model(**inputs()).sample
    w.copy_(saved)
    assert (changed - base).abs().max() > 1e-4


def test_patch_position_embeddings_start_as_2d_sincos():
    """Strong and smooth in both axes from step 0: with U-ViT's N(0, 0.02) start, a small U-ViT from scratch still
    placed shapes poorly after 2250 steps (#5)."""
    m = UViT2DModel(sample_size=8, patch_size=2, hidden_size=64, num_layers=3, num_attention_heads=4,
                    cross_attention_dim=32, num_text_tokens=77)
    grid = m.pos_embed[0, m.extras:].detach().reshape(4, 4, -1)  # raster order, as the patch tokens

    def dist(a, b):
        return (grid[a] - grid[b]).norm().item()

    assert grid.std() > 0.3
    assert dist((0, 0), (0, 1)) < dist((0, 0), (0, 3)) and dist((0, 0), (1, 0)) < dist((0, 0), (3, 0))
    assert dist((1, 1), (1, 2)) < dist((1, 1), (1, 3)) and dist((1, 1), (2, 1)) < dist((1, 1), (3, 1))
    assert m.pos_embed[0, :m.extras].std() < 0.05  # the time and text slots keep U-ViT's start
    with pytest.raises(ValueError, match="multiple of 4"):
        UViT2DModel(sample_size=8, hidden_size=66, num_layers=3, num_attention_heads=3, cross_attention_dim=32)


@torch.no_grad()
def test_save_and_load_give_identical_outputs(model, tmp_path):
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    again = UViT2DModel.from_pretrained(tmp_path).eval()
    assert torch.equal(again(**inputs()).sample, model(**inputs()).sample)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_uvit):
    def loss_and_grads(m):
        loss = (m(**inputs()).sample - 1).pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    m = UViT2DModel.from_pretrained(tiny_uvit / "transformer").train()
    plain = loss_and_grads(m)
    m.zero_grad()
    m.enable_gradient_checkpointing()
    assert m.is_gradient_checkpointing
    checkpointed = loss_and_grads(m)
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=1e-7)


def test_full_config_is_uvit_h2_sized():
    """make_tiny_model --size full: U-ViT-H/2's 14 + 1 + 14 blocks of width 1152, on the meta device (no weights)."""
    from launch.make_tiny_model import uvit_configs

    with torch.device("meta"):
        m = UViT2DModel(**uvit_configs("full")["transformer"])
    assert (len(m.in_blocks), len(m.out_blocks), m.pos_embed.shape) == (14, 14, (1, 1 + 77 + 256, 1152))
    assert sum(p.numel() for p in m.parameters()) == 511_275_044


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"])
def test_pipeline_samples_with_any_scheduler(pipe, scheduler):
    import diffusers
    from PIL import Image

    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    images = pipe(**SAMPLE, num_images_per_prompt=2, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 2 and all(isinstance(im, Image.Image) and im.size == (48, 64) for im in images)


def recipe(tiny_uvit, digits_data, out, *overrides):
    from trainers.config import load_recipe

    return load_recipe(ROOT / "recipes/demo/uvit_lora_tiny.yaml", [
        f"model.pretrained={tiny_uvit}", f"data.source={digits_data}", f"output_dir={out}", "train.report_to=none",
        "validation.every_steps=0", "checkpoint.every_steps=0", *overrides])


@pytest.fixture(scope="module")
def lora_run(tiny_uvit, digits_data, tmp_path_factory):
    """40 LoRA steps on the transformer and the text encoder, with the real engine."""
    from trainers.engine import Trainer

    trainer = Trainer(recipe(tiny_uvit, digits_data, tmp_path_factory.mktemp("uvit_lora"), "train.max_steps=40",
                             "train.batch_size=4", "train.log_every=1", "optimizer.lr=1e-2", "adapter.alpha=4",
                             "lr_schedule.name=constant", "lr_schedule.warmup_steps=0", "adapter.text_encoder=true"))
    return trainer, trainer.fit()


def test_lora_loss_falls(lora_run):
    from trainers.backbones.uvit import UViTBackbone

    trainer, result = lora_run
    assert isinstance(trainer.backbone, UViTBackbone)  # model.family: auto read model_index.json
    seq = [json.loads(line)["loss"] for line in (result.output_dir / "logs/metrics.jsonl").read_text().splitlines()]
    assert len(seq) == 40
    first, last = sum(seq[:10]) / 10, sum(seq[-10:]) / 10
    assert last < first, (first, last)
    assert (result.final_dir / "pytorch_lora_weights.safetensors").is_file()
    assert not (result.final_dir / "lora_kohya.safetensors").exists()  # kohya has no U-ViT naming


def test_full_finetune_exports_a_transformer_folder(tiny_uvit, digits_data, tmp_path):
    """As recipes/uvit_scratch.yaml: every weight, EMA, gradient checkpointing; plus a validation grid."""
    from PIL import Image

    from trainers.engine import Trainer

    trainer = Trainer(recipe(tiny_uvit, digits_data, tmp_path / "run", "adapter.kind=full", "train.max_steps=3",
                             "train.batch_size=2", "optimizer.lr=1e-3", "ema.enabled=true", "ema.decay=0.5",
                             "memory.gradient_checkpointing=true", "validation.every_steps=3", "validation.steps=2"))
    assert trainer.backbone.denoiser.is_gradient_checkpointing
    final = trainer.fit().final_dir
    assert Image.open(tmp_path / "run" / "samples" / "step-3.png").size == (2 * 64, 2 * 64)
    ours = trainer.backbone.denoiser.state_dict()
    loaded = UViT2DModel.from_pretrained(final / "transformer").state_dict()
    assert loaded.keys() == ours.keys() and all(torch.equal(v, ours[k]) for k, v in loaded.items())
    base = UViT2DModel.from_pretrained(tiny_uvit / "transformer").state_dict()
    assert any(not torch.equal(v, base[k]) for k, v in loaded.items())
    assert (final / "scheduler" / "scheduler_config.json").is_file()


FRESH_PROCESS = textwrap.dedent("""
    import sys, torch
    import trainers.backbones.uvit_pipeline  # registers UViTPipeline with diffusers
    from diffusers import DDIMScheduler, DiffusionPipeline
    from safetensors.torch import load_file, save_file
    base, final, inputs, out = sys.argv[1:5]
    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    x = load_file(inputs)
    def run():
        with torch.no_grad():
            h = pipe.text_encoder(x["ids"])[0]
            return {"transformer": pipe.transformer(x["z"], x["t"], encoder_hidden_states=x["h"]).sample,
                    "text_encoder": h}
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    image = pipe(["a handwritten digit seven"], num_inference_steps=2, guidance_scale=3.0, height=64, width=48,
                 generator=torch.Generator().manual_seed(0), output_type="pt").images
    before = run()
    pipe.load_lora_weights(final)
    save_file({"image": image, **{f"base_{k}": v for k, v in before.items()}, **run()}, out)
""")


def test_saved_pipeline_and_lora_load_in_a_fresh_process(lora_run, tiny_uvit, tmp_path):
    """Stock diffusers calls reproduce the saved pipeline's samples and the trained LoRA's outputs."""
    from diffusers import DDIMScheduler

    from launch.make_tiny_model import build_uvit

    trainer, result = lora_run
    g = torch.Generator().manual_seed(0)
    x = {"z": torch.randn(2, 4, 8, 8, generator=g), "t": torch.tensor([10, 700]),
         "h": torch.randn(2, 77, 32, generator=g), "ids": trainer.backbone.tokenize(["a digit", "red"])}
    save_file(x, tmp_path / "inputs.safetensors")
    (tmp_path / "load.py").write_text(FRESH_PROCESS)
    proc = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(tiny_uvit), str(result.final_dir),
                           str(tmp_path / "inputs.safetensors"), str(tmp_path / "out.safetensors")],
                          capture_output=True, text=True, cwd=tmp_path, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = load_file(tmp_path / "out.safetensors")

    built = build_uvit("tiny", seed=0)  # what make_tiny_model saved, before save_pretrained
    built.set_progress_bar_config(disable=True)
    built.scheduler = DDIMScheduler.from_config(built.scheduler.config)
    image = built(**SAMPLE, generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(fresh["image"], image, rtol=0, atol=1e-6)

    with torch.no_grad():
        ours = {"transformer": trainer.backbone.denoiser.eval()(x["z"], x["t"], encoder_hidden_states=x["h"]).sample,
                "text_encoder": trainer.backbone.text_encoder.eval()(x["ids"])[0]}
    for k, v in ours.items():
        torch.testing.assert_close(fresh[k], v, rtol=0, atol=1e-5)
        assert (fresh[k] - fresh[f"base_{k}"]).abs().max() > 1e-4


def test_xformers_is_refused_for_the_uvit_not_ignored(model):
    from diffusers import UNet2DConditionModel

    from trainers.errors import UserError
    from trainers.memory import enable_xformers

    with pytest.raises(UserError, match="does not apply to UViT2DModel"):
        enable_xformers(model)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                                cross_attention_dim=8, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    with pytest.raises(UserError) as refused:  # a U-Net gets past the family check (then: no xformers, or no GPU)
        enable_xformers(unet)
    assert "does not apply" not in str(refused.value)
