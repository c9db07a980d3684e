"""SD3/3.5 and Flux.1 behind the backbone seam: stock folders, the pipelines' own inputs, rectified-flow training."""
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
FAMILIES = ("sd3", "flux")
T5_TOKENS = 32  # the demo recipes' model.max_sequence_length


def losses(run_dir, key="loss"):
    rows = map(json.loads, (Path(run_dir) / "logs" / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r[key] for r in rows if key in r}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> a 64x64-pixel stock pipeline folder (StableDiffusion3Pipeline, FluxPipeline) with random weights."""
    from launch.make_tiny_model import make_tiny_model

    return {f: make_tiny_model(arch=f, out=tmp_path_factory.mktemp(f"tiny_{f}"), size="tiny", seed=0)
            for f in FAMILIES}


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    """`datasets_prep synth` shapes (64 to train on, 32 held out, another seed), as the acceptance asks."""
    from datasets_prep.synth import write_synth_dataset

    root = tmp_path_factory.mktemp("synth")
    write_synth_dataset(root / "train", n=64, size=64, seed=0)
    write_synth_dataset(root / "heldout", n=32, size=64, seed=1)
    return root


def backbone_of(folder, **options):
    from trainers.backbones import load_backbone
    from trainers.config import ModelConfig

    return load_backbone(ModelConfig(pretrained=str(folder), max_sequence_length=T5_TOKENS, **options))


def recipe(family, tiny, digits_data, out, *overrides):
    from trainers.config import load_recipe

    return load_recipe(ROOT / f"recipes/demo/{family}_lora_tiny.yaml", [
        f"model.pretrained={tiny[family]}", f"data.source={digits_data}", f"output_dir={out}",
        "train.report_to=none", "validation.every_steps=0", "checkpoint.every_steps=0", *overrides])


def test_tiny_folders_are_stock_pipelines_and_full_configs_are_the_released_ones(tiny):
    from launch.make_tiny_model import flux_configs, sd3_configs
    from trainers.backbones import FAMILIES as REGISTRY, detect_family
    from trainers.backbones.loading import ModelSource

    for family in FAMILIES:
        index = json.loads((tiny[family] / "model_index.json").read_text())
        assert index["_class_name"] == REGISTRY[family].pipeline_name
        assert detect_family(ModelSource(str(tiny[family]), "folder")) == family
    sd3 = sd3_configs("full")
    assert sd3["transformer"]["num_layers"] == 24 and sd3["transformer"]["caption_projection_dim"] == 1536
    assert sd3["transformer"]["dual_attention_layers"] == tuple(range(13)) and sd3["transformer"]["qk_norm"] == "rms_norm"
    assert (sd3["vae"]["latent_channels"], sd3["vae"]["scaling_factor"], sd3["vae"]["shift_factor"]) == (16, 1.5305, 0.0609)
    assert sd3["text_encoder_2"]["hidden_size"] == 1280 and sd3["text_encoder_3"]["d_model"] == 4096
    flux = flux_configs("full")
    assert (flux["transformer"]["num_layers"], flux["transformer"]["num_single_layers"]) == (19, 38)
    assert flux["transformer"]["guidance_embeds"] and not flux_configs("full", guidance=False)["transformer"]["guidance_embeds"]
    assert (flux["vae"]["scaling_factor"], flux["vae"]["shift_factor"]) == (0.3611, 0.1159)
    assert flux["scheduler"]["use_dynamic_shifting"] and flux["scheduler"]["max_shift"] == 1.15


@pytest.mark.parametrize("family", FAMILIES)
def test_one_denoise_is_the_stock_pipelines_one_euler_step(family, tiny):
    """From sigma 1 one Euler step of the stock pipeline lands on x - v; our x0_hat at t = 1 must be the same.

    That checks the text inputs (CLIP/T5 layout, pooled outputs), packing and position ids, the timestep scale
    and Flux's guidance embedding against diffusers' own pipeline.
    """
    import diffusers

    from trainers.backbones import flux

    guidance = {"guidance": 3.5} if family == "flux" else {}
    backbone = backbone_of(tiny[family], **guidance)
    pipe = getattr(diffusers, backbone.pipeline_name).from_pretrained(tiny[family])
    pipe.set_progress_bar_config(disable=True)
    x = torch.randn(2, 16, 8, 6, generator=torch.Generator().manual_seed(0))
    prompts = ["a handwritten digit seven", "red"]
    stock_latents = flux.pack(x) if family == "flux" else x
    out = pipe(prompts, num_inference_steps=1, guidance_scale=3.5 if family == "flux" else 1.0, height=64, width=48,
               latents=stock_latents, max_sequence_length=T5_TOKENS, output_type="latent").images
    stock = flux.unpack(out, 8, 6) if family == "flux" else out
    with torch.no_grad():
        cond = backbone.condition(prompts, [False, False], {}, "cpu")
        x0, _ = backbone.denoise(x, torch.ones(2), cond)
    torch.testing.assert_close(x0, stock, rtol=0, atol=1e-5)


def test_pack_and_unpack_are_fluxpipelines_and_inverse():
    from diffusers import FluxPipeline

    from trainers.backbones.flux import image_ids, pack, unpack

    x = torch.randn(2, 16, 6, 10)
    torch.testing.assert_close(pack(x), FluxPipeline._pack_latents(x, 2, 16, 6, 10), rtol=0, atol=0)
    torch.testing.assert_close(unpack(pack(x), 6, 10), x, rtol=0, atol=0)
    torch.testing.assert_close(image_ids(6, 10, "cpu", torch.float32),
                               FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32), rtol=0, atol=0)


def test_sd3_without_t5_uses_zero_t5_tokens_as_the_pipeline_does(tiny):
    from diffusers import StableDiffusion3Pipeline

    backbone = backbone_of(tiny["sd3"], t5=False)
    assert "text_encoder_3" not in backbone.text_encoders
    text = backbone.encode_text(["a digit"], "cpu")
    assert sorted(text) == ["clip_g", "clip_l", "pooled_g", "pooled_l"]  # nothing T5-sized to cache
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny["sd3"], text_encoder_3=None, tokenizer_3=None)
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt("a digit", None, None, do_classifier_free_guidance=False,
                                                   max_sequence_length=T5_TOKENS)
        kwargs = backbone.denoiser_kwargs(text, {}, "cpu")
    torch.testing.assert_close(kwargs["encoder_hidden_states"], hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(kwargs["pooled_projections"], pooled, rtol=0, atol=1e-6)


def test_model_options_a_family_does_not_read_are_refused(tiny, tiny_sd15):
    from trainers.errors import UserError

    with pytest.raises(UserError, match="model.guidance: sd3 models do not read it"):
        backbone_of(tiny["sd3"], guidance=3.5)
    with pytest.raises(UserError, match="model.t5: flux models do not read it"):
        backbone_of(tiny["flux"], t5=False)
    from trainers.backbones import load_backbone
    from trainers.config import ModelConfig

    with pytest.raises(UserError, match="model.max_sequence_length: sd15"):
        load_backbone(ModelConfig(pretrained=str(tiny_sd15), max_sequence_length=77))


def test_flux_training_timesteps_shift_with_the_image_size(tiny):
    """Flux's dynamic shift: more latent tokens move the drawn t toward noise (mu from base/max_shift)."""
    schedule = backbone_of(tiny["flux"]).schedule
    seeds = list(range(256))
    small = schedule.sample_timesteps(seeds, "cpu", (16, 32, 32))      # 256 tokens: mu = base_shift
    large = schedule.sample_timesteps(seeds, "cpu", (16, 128, 128))    # 4096 tokens: mu = max_shift
    assert (large > small).all()
    u = schedule.configured(shift=1.0).sample_timesteps(seeds, "cpu")  # the same draws, unshifted
    s = torch.exp(torch.tensor(schedule.mu(256)))
    torch.testing.assert_close(small, (s * u / (1 + (s - 1) * u)).clamp(1e-5, 1 - 1e-5))


LORA_ARGS = ("train.max_steps=30", "train.batch_size=4", "train.log_every=1", "optimizer.lr=1e-2", "adapter.alpha=4",
             "lr_schedule.name=constant", "lr_schedule.warmup_steps=0", "checkpoint.every_steps=15",
             "validation.loss_samples=32", "validation.every_steps=30", "validation.prompts=[]")


@pytest.fixture(scope="module")
def lora_runs(tiny, synth_data, tmp_path_factory):
    """family -> (trainer, result, held-out loss at step 0) after 30 LoRA steps with a held-out loss at step 30."""
    from trainers.engine import Trainer

    runs = {}
    for family in FAMILIES:
        trainer = Trainer(recipe(family, tiny, synth_data / "train", tmp_path_factory.mktemp(f"{family}_lora"),
                                 *LORA_ARGS, f"validation.loss_source={synth_data / 'heldout'}"))
        before = trainer.heldout_loss()
        runs[family] = trainer, trainer.fit(), before
    return runs


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_lowers_the_heldout_loss(family, lora_runs):
    from trainers.diffusion import FlowMatchSchedule

    trainer, result, before = lora_runs[family]
    assert isinstance(trainer.objective.schedule, FlowMatchSchedule)
    assert len(losses(result.output_dir)) == 30
    after = losses(result.output_dir, "val_loss")[30]
    assert after < 0.97 * before, (before, after)  # deterministic (fixed noise and t): any fall is learning


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_is_exact(family, lora_runs, tiny, synth_data, tmp_path):
    from trainers.engine import Trainer

    trainer, result, _ = lora_runs[family]
    step15 = result.output_dir / "checkpoints" / "step-15"
    resumed = Trainer(recipe(family, tiny, synth_data / "train", tmp_path / "resumed", *LORA_ARGS,
                             f"validation.loss_source={synth_data / 'heldout'}", f"resume={step15}"))
    assert resumed.fit().step == 30
    straight, again = losses(result.output_dir), losses(tmp_path / "resumed")
    assert min(again) == 16
    for step, value in again.items():
        assert abs(value - straight[step]) <= 1e-7, (step, value, straight[step])


FRESH_PROCESS = textwrap.dedent("""
    import sys, torch, diffusers
    from safetensors.torch import load_file, save_file
    pipeline, base, final, inputs, out = sys.argv[1:6]
    pipe = getattr(diffusers, pipeline).from_pretrained(base)
    x = load_file(inputs)
    cond = {k: v for k, v in x.items() if k not in ("z", "t")}
    def run():
        with torch.no_grad():
            return pipe.transformer(hidden_states=x["z"], timestep=x["t"], **cond).sample
    before = run()
    pipe.load_lora_weights(final)
    save_file({"base": before, "lora": run()}, out)
""")


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_lora_loads_into_the_stock_pipeline(family, lora_runs, tmp_path):
    """`pipe.load_lora_weights(final)` in a fresh process reproduces the trained transformer."""
    trainer, result, _ = lora_runs[family]
    backbone = trainer.backbone
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 16, 8, 8, generator=g)
    with torch.no_grad():
        cond = backbone.condition(["a digit", "red"], [False, False], {}, "cpu")
    if family == "flux":
        from trainers.backbones.flux import image_ids, pack

        x = {"z": pack(z), "t": torch.tensor([0.1, 0.7]), "img_ids": image_ids(8, 8, "cpu", torch.float32), **cond}
    else:
        x = {"z": z, "t": torch.tensor([100.0, 700.0]), **cond}
    save_file({k: v.contiguous() for k, v in x.items()}, tmp_path / "inputs.safetensors")
    (tmp_path / "load.py").write_text(FRESH_PROCESS)
    proc = subprocess.run([sys.executable, str(tmp_path / "load.py"), backbone.pipeline_name,
                           str(trainer.recipe.model.pretrained), str(result.final_dir),
                           str(tmp_path / "inputs.safetensors"), str(tmp_path / "out.safetensors")],
                          capture_output=True, text=True, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = load_file(tmp_path / "out.safetensors")
    with torch.no_grad():
        ours = backbone.denoiser.eval()(hidden_states=x["z"], timestep=x["t"],
                                        **{k: v for k, v in x.items() if k not in ("z", "t")}).sample
    torch.testing.assert_close(fresh["lora"], ours, rtol=0, atol=1e-5)
    assert (fresh["lora"] - fresh["base"]).abs().max() > 1e-4


def test_full_finetune_of_sd3_lowers_the_heldout_loss(tiny, synth_data, tmp_path):
    from diffusers import SD3Transformer2DModel

    from trainers.engine import Trainer

    trainer = Trainer(recipe("sd3", tiny, synth_data / "train", tmp_path / "run", "adapter.kind=full", "optimizer.lr=1e-3",
                             "train.max_steps=30", "train.batch_size=4", "lr_schedule.name=constant",
                             "lr_schedule.warmup_steps=0", f"validation.loss_source={synth_data / 'heldout'}",
                             "validation.loss_samples=16", "validation.every_steps=30", "validation.prompts=[]",
                             "memory.gradient_checkpointing=true"))
    before = trainer.heldout_loss()
    final = trainer.fit().final_dir
    assert losses(tmp_path / "run", "val_loss")[30] < 0.97 * before
    loaded = SD3Transformer2DModel.from_pretrained(final / "transformer").state_dict()
    ours = trainer.backbone.denoiser.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in loaded.items())
    scheduler = json.loads((final / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 3.0


@pytest.mark.parametrize("objective", ["consistency", "progressive"])
def test_distillation_on_a_flow_model_exits_2_with_one_line(objective, tiny, digits_data, tmp_path):
    proc = subprocess.run([sys.executable, "launch/train.py", "recipes/demo/sd3_lora_tiny.yaml",
                           f"model.pretrained={tiny['sd3']}", f"data.source={digits_data}",
                           f"output_dir={tmp_path / 'run'}", f"objective.name={objective}", "validation.every_steps=0",
                           "objective.caption_dropout=0", "train.report_to=none"],
                          capture_output=True, text=True, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert "Traceback" not in proc.stderr
    assert any(f"{objective}" in line and "rectified flow" in line for line in lines), proc.stderr[-2000:]


def delta(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return scale * b.double() @ a.double()


def test_flux_kohya_names_convert_back_through_diffusers_to_the_same_weights():
    """At Flux.1's real widths (diffusers' converter assumes them): fused qkv and linear1 split back exactly."""
    from diffusers import FluxPipeline

    from trainers.mmdit_lora import flux_names

    width, mlp, r = 3072, 12288, 4
    g = torch.Generator().manual_seed(0)
    shapes = {"attn.to_q": (width, width), "attn.to_k": (width, width), "attn.to_v": (width, width),
              "attn.to_out.0": (width, width), "attn.add_q_proj": (width, width), "attn.add_k_proj": (width, width),
              "attn.add_v_proj": (width, width), "attn.to_add_out": (width, width), "ff.net.2": (4 * width, width),
              "proj_mlp": (width, mlp), "proj_out": (width + mlp, width)}
    trained = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
               "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.add_q_proj",
               "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.add_v_proj",
               "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.ff.net.2",
               "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
               "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_out"]  # proj_mlp untrained
    features = lambda path: shapes[path.split(".", 2)[2]]  # noqa: E731
    layers = {p: {"A": torch.randn(r, features(p)[0], generator=g) / 50,
                  "B": torch.randn(features(p)[1], r, generator=g) / 50, "scale": 2.0} for p in trained}
    kohya = flux_names(layers, features, double_blocks=1, single_blocks=1)
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (3 * r, width)
    assert kohya["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * width + mlp, 4 * r)
    converted = FluxPipeline.lora_state_dict(dict(kohya))
    for path, part in layers.items():
        back = delta(converted[f"transformer.{path}.lora_A.weight"], converted[f"transformer.{path}.lora_B.weight"])
        torch.testing.assert_close(back, delta(part["A"], part["B"], part["scale"]), rtol=1e-6, atol=1e-9)
    zero = delta(converted["transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight"],
                 converted["transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight"])
    assert zero.abs().max() == 0  # an untrained part of linear1 stays untouched


def test_exported_single_files_hold_the_trained_weights(lora_runs):
    """Tiny Flux: every fused layer's rows are its parts' scaled B A; SD3: diffusers' keys with the scale folded in
    load through the stock loader to the trained weights."""
    from diffusers import StableDiffusion3Pipeline

    from trainers.mmdit_lora import FLUX_DOUBLE, FLUX_SINGLE, lora_parts

    trainer, result, _ = lora_runs["flux"]
    layers = lora_parts(trainer.objective.trained_modules())["transformer"]
    kohya = load_file(result.final_dir / "lora_kohya.safetensors")
    transformer = trainer.backbone.denoiser
    for bfl, name, table in (("double_blocks", "transformer_blocks", FLUX_DOUBLE),
                             ("single_blocks", "single_transformer_blocks", FLUX_SINGLE)):
        for fused, members in table.items():
            key = f"lora_unet_{bfl}_0_{fused}"
            if f"{key}.alpha" not in kohya:
                assert all(f"{name}.0.{m}" not in layers for m in members)
                continue
            down, up = kohya[f"{key}.lora_down.weight"], kohya[f"{key}.lora_up.weight"]
            full = delta(down, up, kohya[f"{key}.alpha"].item() / down.shape[0])
            row = 0
            for m in members:
                rows = getattr(transformer.get_submodule(f"{name}.0.{m}"), "out_features", None) or \
                    transformer.get_submodule(f"{name}.0.{m}").base_layer.out_features
                part = layers.get(f"{name}.0.{m}")
                want = torch.zeros_like(full[row:row + rows]) if part is None else delta(part["A"], part["B"], part["scale"])
                torch.testing.assert_close(full[row:row + rows], want, rtol=1e-5, atol=1e-7)
                row += rows
    assert any(k.startswith("lora_unet_single_blocks_0_linear1") for k in kohya)

    trainer, result, _ = lora_runs["sd3"]
    single = StableDiffusion3Pipeline.lora_state_dict(str(result.final_dir / "lora_kohya.safetensors"))
    for path, part in lora_parts(trainer.objective.trained_modules())["transformer"].items():
        back = delta(single[f"transformer.{path}.lora_A.weight"], single[f"transformer.{path}.lora_B.weight"])
        torch.testing.assert_close(back, delta(part["A"], part["B"], part["scale"]), rtol=1e-5, atol=1e-8)


def test_one_key_trains_a_vp_transformer_by_rectified_flow(tiny_uvit, digits_data, tmp_path):
    """objective.schedule: flow on U-ViT: velocity loss, validation grids with both flow samplers, a held-out loss that
    falls, and an export that ships the scheduler the LoRA must be sampled with."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from PIL import Image

    from trainers.backbones.uvit_pipeline import UViTPipeline
    from trainers.config import load_recipe
    from trainers.diffusion import FlowMatchSchedule
    from trainers.engine import Trainer

    def run(out, *overrides):
        return Trainer(load_recipe(ROOT / "recipes/demo/uvit_lora_tiny.yaml", [
            f"model.pretrained={tiny_uvit}", f"data.source={digits_data}", f"output_dir={out}", "train.report_to=none",
            "checkpoint.every_steps=0", "objective.schedule=flow", "train.batch_size=4", "optimizer.lr=1e-2",
            "lr_schedule.name=constant", "lr_schedule.warmup_steps=0", "validation.steps=2",
            "validation.images_per_prompt=1", *overrides]))

    trainer = run(tmp_path / "run", "train.max_steps=30", "validation.every_steps=30", "validation.scheduler=euler",
                  f"validation.loss_source={digits_data}", "validation.loss_samples=16")
    assert isinstance(trainer.objective.schedule, FlowMatchSchedule)
    before = trainer.heldout_loss()
    final = trainer.fit().final_dir
    assert losses(tmp_path / "run", "val_loss")[30] < 0.97 * before
    assert Image.open(tmp_path / "run" / "samples" / "step-30.png").size[0] > 0
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(final, subfolder="scheduler")
    assert "FlowMatchEulerDiscreteScheduler" in (final / "README.md").read_text()
    pipe = UViTPipeline.from_pretrained(tiny_uvit)
    pipe.load_lora_weights(final)
    pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a digit", num_inference_steps=2, output_type="np").images.shape[-1] == 3
    run(tmp_path / "dpm", "train.max_steps=1", "validation.every_steps=1", "validation.scheduler=dpmsolver").fit()
    assert (tmp_path / "dpm" / "samples" / "step-1.png").is_file()


def test_flow_settings_on_a_vp_recipe_and_vp_settings_on_a_flow_one_are_named(recipe_for, tiny, digits_data, tmp_path):
    from trainers.engine import Trainer
    from trainers.errors import ConfigError

    with pytest.raises(ConfigError, match="'objective.flow' applies to rectified flow"):
        Trainer(recipe_for("objective.flow.weighting=cosmap"))
    with pytest.raises(ConfigError, match="'objective.prediction_type' applies to discrete"):
        Trainer(recipe("sd3", tiny, digits_data, tmp_path / "a", "objective.prediction_type=epsilon"))
    with pytest.raises(ConfigError, match="'validation.scheduler': ddim has no rectified-flow form"):
        Trainer(recipe("flux", tiny, digits_data, tmp_path / "b", "validation.every_steps=5", "validation.scheduler=ddim"))
    with pytest.raises(ConfigError, match="'data.resolution' 72 is not a multiple of 16"):
        Trainer(recipe("flux", tiny, digits_data, tmp_path / "c", "data.resolution=72"))


@pytest.mark.parametrize("family,options,keys", [("sd3", ("--no-t5",), ["clip_g", "clip_l", "pooled_g", "pooled_l"]),
                                                 ("flux", (), ["pooled", "t5"])])
def test_training_from_a_cache_matches_training_from_images(family, options, keys, tiny, digits_data, tmp_path):
    """The cache is keyed by the options that shape the text (no T5, T5 length) and trains like the encoders."""
    from datasets_prep.__main__ import main as prep
    from trainers.engine import Trainer

    prepared = tmp_path / "prepared"
    assert prep(["prepare", "--source", str(digits_data), "--out", str(prepared), "--resolution", "64",
                 "--min-size", "8"]) == 0
    assert prep(["cache", "--data", str(prepared), "--model", str(tiny[family]), "--dtype", "float32",
                 "--max-sequence-length", str(T5_TOKENS), *options]) == 0
    args = (f"data.source={prepared}", "train.max_steps=3", "train.log_every=1", "objective.caption_dropout=0.5",
            "train.batch_size=4", *(["model.t5=false"] if options else []))
    cached = Trainer(recipe(family, tiny, digits_data, tmp_path / "cached", *args))
    assert cached.dataset.cache is not None and cached.dataset.cache.meta["text_keys"] == keys
    cached.fit()
    images = Trainer(recipe(family, tiny, digits_data, tmp_path / "images", *args, "data.use_cache=false"))
    images.fit()
    assert list(losses(tmp_path / "cached").values()) == pytest.approx(
        list(losses(tmp_path / "images").values()), rel=1e-5, abs=1e-6)
    other = Trainer(recipe(family, tiny, digits_data, tmp_path / "other", *args, "model.max_sequence_length=16"))
    assert other.dataset.cache is None  # another T5 length: that cache does not fit


@pytest.mark.parametrize("recipe_name,arch,trainable", [
    ("sd3_lora", "sd3", None), ("flux_lora", "flux", 26_148_864), ("flux_full", "flux", 11_901_408_320)])
def test_dry_run_of_full_size_configs_counts_without_weights(recipe_name, arch, trainable, digits_data, tmp_path):
    """`--dry-run` builds the models from their configs on the meta device: full-size SD3.5 Medium and Flux.1-dev
    (a folder of configs only, kilobytes) give their parameter counts and memory on a CPU machine.

    Flux LoRA rank 16 on the default targets: 19 double blocks x 8 projections + 38 single blocks x 3 (q, k, v), each
    16 x (3072 + 3072) parameters = 26,148,864."""
    from launch.make_tiny_model import make_tiny_model

    folder = make_tiny_model(arch, tmp_path / "model", size="full", configs_only=True)
    assert not list(folder.rglob("*.safetensors"))
    proc = subprocess.run([sys.executable, "launch/train.py", f"recipes/{recipe_name}.yaml", "--dry-run",
                           f"model.pretrained={folder}", f"data.source={digits_data}", f"output_dir={tmp_path / 'o'}",
                           "data.resolution=512", "train.report_to=none"],
                          capture_output=True, text=True, cwd=ROOT, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"model family: {arch}" in proc.stdout and "estimated memory" in proc.stdout
    counts = {line.split(":")[0].strip(): int(line.split(":")[1].replace(",", ""))
              for line in proc.stdout.splitlines() if "parameters:" in line}
    if trainable is not None:
        assert counts["trainable parameters"] == trainable
    assert counts["trainable parameters"] + counts["frozen parameters"] > 7_000_000_000  # T5-XXL alone is 4.76B
    assert not (tmp_path / "o").exists()


def test_each_encoder_can_be_dropped_on_its_own(tiny, recipe_for):
    """caption_dropout_per_encoder: one seeded draw per encoder, and a dropped encoder's input alone becomes the
    empty prompt's."""
    from trainers.engine import Trainer
    from trainers.errors import ConfigError
    from trainers.objectives.inputs import dropped_captions

    backbone = backbone_of(tiny["sd3"])
    seeds = list(range(64))
    flags = dropped_captions(seeds, 0.5, backbone.text_groups)
    assert flags == dropped_captions(seeds, 0.5, backbone.text_groups)  # seeded: a resumed run draws the same
    assert flags["clip_l"] == flags["pooled_l"] and flags["clip_l"] != flags["clip_g"] != flags["t5"]
    assert 16 < sum(flags["t5"]) < 48
    captions = [f"a digit {i}" for i in range(4)]
    dropped = {"clip_l": [False] * 4, "pooled_l": [False] * 4, "clip_g": [False] * 4, "pooled_g": [False] * 4,
               "t5": [True, False, True, False]}
    with torch.no_grad():
        text, uncond = backbone.encode_text(captions, "cpu"), backbone.unconditional("cpu")
        mixed = backbone.condition(captions, dropped, {}, "cpu", text=text, uncond=uncond)
        want = backbone.denoiser_kwargs({**text, "t5": torch.stack([uncond["t5"][0], text["t5"][1],
                                                                     uncond["t5"][0], text["t5"][3]])}, {}, "cpu")
    for key in want:
        torch.testing.assert_close(mixed[key], want[key], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="caption_dropout_per_encoder' applies to fine-tuning sd3 and flux"):
        Trainer(recipe_for("objective.caption_dropout_per_encoder=true"))


@pytest.mark.parametrize("family,tag", [("sd3", "sd3"), ("flux", "flux")])
def test_model_card_names_the_family_its_tags_and_files(family, tag, lora_runs):
    import yaml

    _, result, _ = lora_runs[family]
    card = (result.final_dir / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert tag in front["tags"] and "lora" in front["tags"] and front["license"] == "other"
    assert f"({family})" in card and "lora_kohya.safetensors" in card and "load_lora_weights" in card


def test_an_sd_unet_trained_by_rectified_flow_is_sampled_by_flow_in_validation_and_evaluation(recipe_for, tiny_sd15,
                                                                                             tmp_path, monkeypatch):
    """objective.schedule: flow on SD-1.5: its validation scheduler (built in memory, so its config names no class)
    must stay a flow sampler, and StableDiffusionPipeline must be able to run it; launch/evaluate.py and
    launch/sample.py (which must take the LoRA's shipped flow scheduler) the same."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    from launch.evaluate import make_scheduler
    from trainers.engine import Trainer
    from trainers.errors import UserError
    from trainers.schedulers import set_scheduler

    trainer = Trainer(recipe_for("objective.schedule=flow"))
    pipe = trainer.objective.validation_pipeline()
    pipe.set_progress_bar_config(disable=True)
    set_scheduler(pipe, "euler")
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler  # was a VP EulerDiscreteScheduler
    size = trainer.recipe.data.resolution
    assert pipe("a digit", num_inference_steps=2, height=size, width=size, output_type="np").images.shape[-1] == 3
    set_scheduler(pipe, "dpmsolver")
    assert pipe.scheduler.config.use_flow_sigmas and pipe.scheduler.config.prediction_type == "flow_prediction"
    own = trainer.objective.schedule.sampling_scheduler()
    assert type(make_scheduler(own, "euler")) is FlowMatchEulerDiscreteScheduler
    dpm = make_scheduler(own, "dpmpp")
    assert isinstance(dpm, DPMSolverMultistepScheduler) and dpm.config.use_flow_sigmas
    assert make_scheduler(own, None).init_noise_sigma == 1.0
    with pytest.raises(UserError, match="--scheduler ddim has no rectified-flow form"):
        make_scheduler(own, "ddim")
    from launch import sample

    final = Trainer(recipe_for("objective.schedule=flow", "train.max_steps=1")).fit().final_dir
    used = []
    real_generate = sample.generate
    monkeypatch.setattr(sample, "generate", lambda pipe, args: used.append(pipe.scheduler) or real_generate(pipe, args))
    assert sample.main(["--pipeline", str(tiny_sd15), "--lora", str(final), "--steps", "2", "--prompt", "a digit",
                        "--out", str(tmp_path / "grid.png")]) == 0
    assert type(used[0]) is FlowMatchEulerDiscreteScheduler and (tmp_path / "grid.png").is_file()
