"""trainers/backbones/dit*.py: PixArt-alpha behind the backbone seam, trained through the engine, loaded back."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = dict(prompt=["a handwritten digit seven"], num_inference_steps=2, guidance_scale=4.5, height=64, width=48,
              use_resolution_binning=False, clean_caption=False)


def losses(run_dir):
    rows = map(json.loads, (Path(run_dir) / "logs" / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory):
    """A 64x64-pixel PixArtAlphaPipeline folder: a 2-block PixArt transformer (width 32) on the tiny SD VAE and a T5."""
    from launch.make_tiny_model import make_tiny_model

    return make_tiny_model(arch="dit", out=tmp_path_factory.mktemp("tiny_dit"), size="tiny", seed=0)


@pytest.fixture(scope="module")
def backbone(tiny_dit):
    from trainers.backbones import load_backbone
    from trainers.config import ModelConfig

    return load_backbone(ModelConfig(pretrained=str(tiny_dit)))


def test_tiny_model_is_a_stock_pixart_folder_with_a_local_t5_tokenizer(tiny_dit):
    from transformers import T5TokenizerFast

    from launch.t5_tokenizer import build_t5_tokenizer

    index = json.loads((tiny_dit / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtAlphaPipeline"
    assert index["transformer"] == ["diffusers", "PixArtTransformer2DModel"]
    assert sorted(p.name for p in (tiny_dit / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    tok = T5TokenizerFast.from_pretrained(tiny_dit / "tokenizer")
    ids = tok(["a photo of a zebra"]).input_ids[0]
    assert ids == build_t5_tokenizer()(["a photo of a zebra"]).input_ids[0]
    assert (tok.pad_token_id, tok.eos_token_id, ids[-1]) == (0, 1, 1)  # T5's ids; every text ends with </s>
    assert tok.convert_ids_to_tokens(ids[:3]) == ["▁a", "▁photo", "▁of"]  # corpus words stay whole


def test_full_config_is_pixart_alpha_512_on_t5_xxl():
    """make_tiny_model --size full: PixArt-XL/2 (28 blocks, width 1152, learned sigma) and T5-XXL's encoder, on meta."""
    from diffusers import PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from launch.make_tiny_model import dit_configs

    configs = dit_configs("full")
    with torch.device("meta"):
        m = PixArtTransformer2DModel(**configs["transformer"])
        t5 = T5EncoderModel(T5Config(**configs["text_encoder"]))
    assert (len(m.transformer_blocks), m.inner_dim, m.out_channels, m.use_additional_conditions) == (28, 1152, 8, False)
    assert sum(p.numel() for p in m.parameters()) == 610_856_096  # "0.6B" in the paper
    assert sum(p.numel() for p in t5.parameters()) == 4_762_310_656
    assert configs["scheduler"]["beta_schedule"] == "linear" and configs["vae"]["scaling_factor"] == 0.18215


@torch.no_grad()
def test_text_and_unconditional_inputs_are_the_pipelines(backbone):
    """The prompt's and the empty negative prompt's T5 states and masks, as PixArtAlphaPipeline.encode_prompt."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(backbone.scheduler_config)
    pipe = backbone.pipeline(backbone.denoiser, backbone.text_encoders, scheduler)
    emb, mask, neg, neg_mask = pipe.encode_prompt(["A handwritten digit SEVEN "], negative_prompt="", device="cpu",
                                                  clean_caption=False)
    text, uncond = backbone.encode_text(["A handwritten digit SEVEN "], "cpu"), backbone.unconditional("cpu")
    assert text["hidden"].shape == (1, 120, 32) and 1 < text["mask"].sum() < 120  # padding is masked out
    torch.testing.assert_close(text["hidden"], emb, rtol=0, atol=0)
    torch.testing.assert_close(uncond["hidden"], neg, rtol=0, atol=0)
    assert torch.equal(text["mask"], mask) and torch.equal(uncond["mask"], neg_mask) and uncond["mask"].sum() == 1


@torch.no_grad()
def test_predict_keeps_the_eps_half_and_dropped_captions_get_the_empty_prompt(backbone):
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    cond = backbone.condition(["a digit", "red"], [False, True], {"target_size": [(64, 64)] * 2}, "cpu")
    assert cond["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}  # PixArt 512 has none
    uncond = backbone.unconditional("cpu")
    assert torch.equal(cond["encoder_attention_mask"][1], uncond["mask"][0])
    assert torch.equal(cond["encoder_hidden_states"][1], uncond["hidden"][0])
    out = backbone.denoiser(z, timestep=t, **cond).sample
    assert out.shape == (2, 8, 8, 8)  # eps and the variance interpolation
    assert torch.equal(backbone.predict(z, t, cond), out[:, :4])


def test_micro_conditions_follow_the_image_size_on_1024_models(backbone):
    """PixArt 1024 (sample_size 128) embeds the image's (h, w) and h / w, as its pipeline passes them."""
    from launch.make_tiny_model import dit_transformer_config
    from trainers.backbones.dit import DiTBackbone

    big = DiTBackbone.__new__(DiTBackbone)
    width = {"num_attention_heads": 3, "cross_attention_dim": 48}  # the size embeddings take a third each
    big.denoiser = type(backbone.denoiser)(**dit_transformer_config("tiny") | width, use_additional_conditions=True)
    kw = big.micro_conditions({"target_size": [(64, 48), (64, 48)]}, "cpu")
    assert kw["resolution"].tolist() == [[64.0, 48.0]] * 2
    assert kw["aspect_ratio"].flatten().tolist() == pytest.approx([64 / 48] * 2)
    cond = {"encoder_hidden_states": torch.randn(2, 120, 32), "added_cond_kwargs": kw}
    assert big.predict(torch.randn(2, 4, 8, 6), torch.tensor([1, 2]), cond).shape == (2, 4, 8, 6)


def recipe(tiny_dit, digits_data, out, *overrides):
    from trainers.config import load_recipe

    return load_recipe(ROOT / "recipes/demo/dit_lora_tiny.yaml", [
        f"model.pretrained={tiny_dit}", f"data.source={digits_data}", f"output_dir={out}", "train.report_to=none",
        "validation.every_steps=0", "checkpoint.every_steps=0", *overrides])


LORA_ARGS = ("train.max_steps=30", "train.batch_size=4", "train.log_every=1", "optimizer.lr=1e-2", "adapter.alpha=4",
             "lr_schedule.name=constant", "lr_schedule.warmup_steps=0", "adapter.text_encoder=true",
             "checkpoint.every_steps=15", "objective.caption_dropout=0.25")


@pytest.fixture(scope="module")
def lora_run(tiny_dit, digits_data, tmp_path_factory):
    """30 LoRA steps on the transformer and T5, with the real engine and caption dropout."""
    from trainers.engine import Trainer

    trainer = Trainer(recipe(tiny_dit, digits_data, tmp_path_factory.mktemp("dit_lora"), *LORA_ARGS))
    return trainer, trainer.fit()


def test_lora_loss_falls_and_exports_a_diffusers_file(lora_run):
    from trainers.backbones.dit import DiTBackbone

    trainer, result = lora_run
    assert isinstance(trainer.backbone, DiTBackbone)  # model.family: auto read model_index.json
    seq = list(losses(result.output_dir).values())
    assert len(seq) == 30
    first, last = sum(seq[:10]) / 10, sum(seq[-10:]) / 10
    assert last < first, (first, last)
    keys = load_file(result.final_dir / "pytorch_lora_weights.safetensors").keys()
    assert any(k.startswith("transformer.transformer_blocks.0.ff.net.2.lora_A") for k in keys)
    assert any(k.startswith("text_encoder.encoder.block.0.layer.0.SelfAttention.q.lora_B") for k in keys)
    assert not (result.final_dir / "lora_kohya.safetensors").exists()  # kohya has no PixArt naming
    assert "PixArtAlphaLoraPipeline" in (result.final_dir / "README.md").read_text()


def test_resume_from_a_checkpoint_continues_exactly(lora_run, tiny_dit, digits_data, tmp_path):
    from trainers.engine import Trainer

    trainer, result = lora_run
    step15 = result.output_dir / "checkpoints" / "step-15"
    resumed = Trainer(recipe(tiny_dit, digits_data, tmp_path / "resumed", *LORA_ARGS, f"resume={step15}"))
    assert resumed.fit().step == 30
    assert max((p - resumed.params[k]).abs().max().item() for k, p in trainer.params.items()) < 1e-6
    straight, again = losses(result.output_dir), losses(tmp_path / "resumed")
    assert min(again) == 16 and again == {s: v for s, v in straight.items() if s > 15}


FRESH_PROCESS = textwrap.dedent("""
    import sys, torch
    from diffusers import PixArtAlphaPipeline
    from safetensors.torch import load_file, save_file
    from trainers.backbones.dit_pipeline import PixArtAlphaLoraPipeline
    base, final, inputs, out = sys.argv[1:5]
    stock = PixArtAlphaPipeline.from_pretrained(base)
    stock.set_progress_bar_config(disable=True)
    image = stock(["a handwritten digit seven"], num_inference_steps=2, guidance_scale=4.5, height=64, width=48,
                  use_resolution_binning=False, clean_caption=False, generator=torch.Generator().manual_seed(0),
                  output_type="pt").images
    pipe = PixArtAlphaLoraPipeline.from_pretrained(base)
    assert isinstance(pipe, PixArtAlphaPipeline)
    x = load_file(inputs)
    def run():
        with torch.no_grad():
            h = pipe.text_encoder(x["ids"], attention_mask=x["mask"])[0]
            eps = pipe.transformer(x["z"], encoder_hidden_states=x["h"], encoder_attention_mask=x["mask"],
                                   timestep=x["t"], added_cond_kwargs={"resolution": None, "aspect_ratio": None})
            return {"transformer": eps.sample, "text_encoder": h}
    before = run()
    pipe.load_lora_weights(final)
    save_file({"image": image, **{f"base_{k}": v for k, v in before.items()}, **run()}, out)
""")


def test_saved_pipeline_and_lora_load_in_a_fresh_process(lora_run, tiny_dit, tmp_path):
    """Stock diffusers samples the saved folder as make_tiny_model built it; the LoRA reproduces the trained model."""
    from launch.make_tiny_model import build_dit

    trainer, result = lora_run
    g = torch.Generator().manual_seed(0)
    tokens = trainer.backbone.tokenize(["a digit", "red"])
    x = {"z": torch.randn(2, 4, 8, 8, generator=g), "t": torch.tensor([10, 700]),
         "h": torch.randn(2, 120, 32, generator=g), "ids": tokens.input_ids, "mask": tokens.attention_mask}
    save_file(x, tmp_path / "inputs.safetensors")
    (tmp_path / "load.py").write_text(FRESH_PROCESS)
    proc = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(tiny_dit), str(result.final_dir),
                           str(tmp_path / "inputs.safetensors"), str(tmp_path / "out.safetensors")],
                          capture_output=True, text=True, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = load_file(tmp_path / "out.safetensors")

    built = build_dit("tiny", seed=0)  # what make_tiny_model saved, before save_pretrained
    built.set_progress_bar_config(disable=True)
    image = built(**SAMPLE, generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(fresh["image"], image, rtol=0, atol=1e-6)

    with torch.no_grad():
        cond = {"encoder_hidden_states": x["h"], "encoder_attention_mask": x["mask"],
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
        ours = {"transformer": trainer.backbone.denoiser.eval()(x["z"], timestep=x["t"], **cond).sample,
                "text_encoder": trainer.backbone.text_encoder.eval()(x["ids"], attention_mask=x["mask"])[0]}
    for k, v in ours.items():
        torch.testing.assert_close(fresh[k], v, rtol=0, atol=1e-5)
        assert (fresh[k] - fresh[f"base_{k}"]).abs().max() > 1e-4


def test_full_finetune_exports_a_stock_transformer_folder(tiny_dit, digits_data, tmp_path):
    """Every transformer weight, gradient checkpointing, EMA; a validation grid through the pipeline."""
    from diffusers import PixArtTransformer2DModel
    from PIL import Image

    from trainers.engine import Trainer

    trainer = Trainer(recipe(tiny_dit, digits_data, tmp_path / "run", "adapter.kind=full", "train.max_steps=2",
                             "train.batch_size=2", "optimizer.lr=1e-3", "ema.enabled=true", "ema.decay=0.5",
                             "memory.gradient_checkpointing=true", "validation.every_steps=2", "validation.steps=2",
                             "validation.images_per_prompt=1"))
    assert trainer.backbone.denoiser.is_gradient_checkpointing
    final = trainer.fit().final_dir
    assert Image.open(tmp_path / "run" / "samples" / "step-2.png").size == (64, 2 * 64)
    assert json.loads((final / "transformer" / "config.json").read_text())["_class_name"] == "PixArtTransformer2DModel"
    loaded = PixArtTransformer2DModel.from_pretrained(final / "transformer").state_dict()
    ours = trainer.backbone.denoiser.state_dict()
    assert loaded.keys() == ours.keys() and all(torch.equal(v, ours[k]) for k, v in loaded.items())
    base = PixArtTransformer2DModel.from_pretrained(tiny_dit / "transformer").state_dict()
    assert any(not torch.equal(v, base[k]) for k, v in loaded.items())


def test_training_from_a_cache_matches_training_from_images(tiny_dit, digits_data, tmp_path):
    """The cache stores T5's states and mask per record; a dropped caption trains on the empty prompt's."""
    from datasets_prep.__main__ import main as prep
    from trainers.engine import Trainer

    prepared = tmp_path / "prepared"
    assert prep(["prepare", "--source", str(digits_data), "--out", str(prepared), "--resolution", "64",
                 "--min-size", "8"]) == 0
    assert prep(["cache", "--data", str(prepared), "--model", str(tiny_dit), "--dtype", "float32"]) == 0
    args = (f"data.source={prepared}", "train.max_steps=3", "train.log_every=1", "objective.caption_dropout=0.5",
            "train.batch_size=4")
    cached = Trainer(recipe(tiny_dit, digits_data, tmp_path / "cached", *args))
    assert cached.dataset.cache is not None and cached.dataset.cache.meta["text_keys"] == ["hidden", "mask"]
    cached.fit()
    images = Trainer(recipe(tiny_dit, digits_data, tmp_path / "images", *args, "data.use_cache=false"))
    images.fit()
    assert list(losses(tmp_path / "cached").values()) == pytest.approx(
        list(losses(tmp_path / "images").values()), rel=1e-5, abs=1e-6)


def test_sample_cli_applies_the_lora(lora_run, tiny_dit, tmp_path):
    """launch/sample.py --lora on a PixArt folder: the LoRA-loading subclass, no resolution bins for a tiny model."""
    from PIL import Image

    from launch.sample import main

    trainer, result = lora_run
    common = ["--pipeline", str(tiny_dit), "--steps", "2", "--prompt", "a handwritten digit seven", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "base.png")]) == 0
    assert main([*common, "--lora", str(result.final_dir), "--out", str(tmp_path / "lora.png")]) == 0
    base, lora = (Image.open(tmp_path / f"{name}.png") for name in ("base", "lora"))
    assert base.size == lora.size == (64, 64) and base.tobytes() != lora.tobytes()
