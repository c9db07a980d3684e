"""DMD2 (#25) through the engine: two update groups with their own optimizers, the generator stepping every
`fake_updates` engine steps; exact resume inside an alternation; the LoRA export in stock diffusers."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from trainers import adapters
from trainers.config import load_recipe
from trainers.engine import Trainer
from trainers.errors import ConfigError
from trainers.objectives.dmd2 import generator_timesteps
from trainers.schedulers import seeded_sampling

RECIPE = "recipes/demo/sd15_dmd2_lora_tiny.yaml"


@pytest.fixture
def dmd_recipe(tiny_sd15, digits_data, tmp_path):
    def build(*overrides, out=None):
        base = [f"model.pretrained={tiny_sd15}", f"data.source={digits_data}", "data.resolution=64",
                f"output_dir={out or tmp_path / 'run'}", "train.report_to=none", "validation.every_steps=0",
                "checkpoint.every_steps=0", "train.batch_size=2", "train.log_every=1", "objective.dmd2.fake_updates=5",
                "optimizer.lr=1e-2", "objective.dmd2.fake_optimizer.lr=1e-2"]
        return load_recipe(RECIPE, base + list(overrides))
    return build


def generator_tensors(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items() if ".default." in k}


def fake_tensors(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items() if ".fake." in k or k.startswith("model.gan_head.")}


def test_the_generator_steps_every_fake_updates_steps_and_never_in_between(dmd_recipe, tmp_path):
    from safetensors.torch import load_file

    trainer = Trainer(dmd_recipe("train.max_steps=10", "checkpoint.every_steps=1", "checkpoint.keep_last=20"))
    trainer.fit()
    gen, fake = trainer.optimizers
    state = lambda opt: {int(s["step"]) for s in opt.optimizer.state.values()}  # noqa: E731
    assert state(gen) == {2} and state(fake) == {10}  # updates: the generator at steps 5 and 10, the fake at all
    weights = {s: load_file(tmp_path / "run" / "checkpoints" / f"step-{s}" / "weights.safetensors")
               for s in range(1, 11)}
    changed = lambda pick, a, b: any(not torch.equal(pick(weights[a])[k], pick(weights[b])[k])  # noqa: E731
                                     for k in pick(weights[a]))
    for s in range(2, 11):
        assert changed(generator_tensors, s - 1, s) == (s in (5, 10)), s
        assert changed(fake_tensors, s - 1, s), s
    assert generator_tensors(weights[1]) and fake_tensors(weights[1])
    rows = [json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "dm_loss" in r] == [5, 10]
    assert all("fake_loss" in r and "gan_d_loss" in r for r in rows)


def test_resume_inside_an_alternation_is_exact(dmd_recipe, tmp_path):
    args = ("train.max_steps=7", "checkpoint.every_steps=3")
    straight = Trainer(dmd_recipe(*args, out=tmp_path / "straight"))
    straight.fit()
    Trainer(dmd_recipe(*args, out=tmp_path / "split")).fit(until=3)  # the generator's first update is at step 5
    resumed = Trainer(dmd_recipe(*args, out=tmp_path / "split"))
    assert resumed.fit().step == 7
    assert max((straight.params[k] - resumed.params[k]).abs().max().item() for k in straight.params) < 1e-7
    read = lambda d: [json.loads(line) for line in (d / "logs" / "metrics.jsonl").read_text().splitlines()]  # noqa
    a, b = read(tmp_path / "straight"), read(tmp_path / "split")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 8))
    for x, y in zip(a, b):
        losses = [k for k in x if k.endswith("loss")]
        assert losses and [k for k in y if k.endswith("loss")] == losses
        assert all(abs(x[k] - y[k]) <= 1e-7 * max(1.0, abs(x[k])) for k in losses), (x, y)
    for opt_a, opt_b in zip(straight.optimizers, resumed.optimizers):
        for s_a, s_b in zip(opt_a.optimizer.state.values(), opt_b.optimizer.state.values()):
            assert torch.equal(s_a["step"], s_b["step"]) and torch.allclose(s_a["exp_avg"], s_b["exp_avg"], atol=1e-9)


def test_captions_are_encoded_once_per_micro_batch_however_many_losses_read_them(dmd_recipe):
    """The generator step's three readers (the fake score's update, then the generator's cond and uncond) share one
    encoding of the batch's captions; each new batch is encoded afresh."""
    trainer = Trainer(dmd_recipe("train.max_steps=5"))  # the generator's first update is at step 5
    backbone, captions = trainer.objective.backbone, []
    encode = backbone.encode_text
    backbone.encode_text = lambda texts, *a, **kw: captions.append(list(texts)) or encode(texts, *a, **kw)
    trainer.fit()
    assert captions.count([""]) == 1  # the unconditional input, once for the run
    assert len(captions) - 1 == 5  # five engine steps, one micro-batch each; the memo-less code encoded 7


def test_the_teacher_is_the_base_and_both_students_start_as_it(dmd_recipe, tiny_sd15, digits_data):
    from diffusers import UNet2DConditionModel

    trainer = Trainer(dmd_recipe("train.max_steps=5"))
    obj = trainer.objective
    stock = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    z, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 400])
    cond = {"encoder_hidden_states": torch.randn(2, 77, stock.config.cross_attention_dim,
                                                 generator=torch.Generator().manual_seed(1))}

    def outputs():
        with torch.no_grad():
            with adapters.adapters_off(obj.layers):
                teacher = obj.base(z, t, **cond).sample
            generator = obj.generator(z, t, **cond).sample
            with obj.fake_active():
                fake = obj.fake_module(z, t, **cond).sample
        return teacher, generator, fake

    with torch.no_grad():
        expected = stock(z, t, **cond).sample
    teacher, generator, fake = outputs()
    assert torch.allclose(teacher, expected, atol=1e-6)
    assert torch.allclose(generator, expected, atol=1e-6) and torch.allclose(fake, expected, atol=1e-6)
    trainer.fit()
    teacher, generator, fake = outputs()
    assert torch.allclose(teacher, expected, atol=1e-6)  # still the base model, two trained adapters beside it
    assert not torch.allclose(generator, expected, atol=1e-4) and not torch.allclose(fake, expected, atol=1e-4)
    assert not torch.allclose(generator, fake, atol=1e-4)


LOAD_AND_SAMPLE = textwrap.dedent("""
    import sys, numpy as np, torch
    from diffusers import LCMScheduler, StableDiffusionPipeline
    base, final, out = sys.argv[1:4]
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(final)
    pipe.scheduler = LCMScheduler.from_pretrained(final, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249], pipe.scheduler.timesteps
    images = pipe(["a digit 3", "a digit 8"], num_inference_steps=4, guidance_scale=1.0,
                  generator=torch.Generator("cpu").manual_seed(0), output_type="np").images
    np.save(out, images)
""")


def test_the_exported_lora_samples_the_same_in_stock_diffusers_at_the_cards_timesteps(dmd_recipe, tiny_sd15, tmp_path):
    trainer = Trainer(dmd_recipe("train.max_steps=5"))
    final = trainer.fit().final_dir
    assert {p.name for p in final.iterdir()} >= {"pytorch_lora_weights.safetensors", "lora_kohya.safetensors",
                                                 "scheduler", "README.md"}
    card = (final / "README.md").read_text()
    assert "[999, 749, 499, 249]" in card and "guidance_scale=1.0" in card and "dmd2" in card
    script = tmp_path / "load.py"
    script.write_text(LOAD_AND_SAMPLE)
    proc = subprocess.run([sys.executable, str(script), str(tiny_sd15), str(final), str(tmp_path / "x.npy")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pipe = trainer.objective.validation_pipeline()
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        mine = pipe(["a digit 3", "a digit 8"], num_inference_steps=4, guidance_scale=1.0,
                    generator=torch.Generator("cpu").manual_seed(0), output_type="np").images
    np.testing.assert_allclose(np.load(tmp_path / "x.npy"), mine, atol=2e-4)
    with torch.no_grad(), adapters.adapters_off(trainer.objective.layers):  # the LoRA did change the samples
        base = pipe(["a digit 3", "a digit 8"], num_inference_steps=4, guidance_scale=1.0,
                    generator=torch.Generator("cpu").manual_seed(0), output_type="np").images
    assert np.abs(base - mine).max() > 1e-3


def test_the_generator_timesteps_are_what_lcm_scheduler_visits():
    from diffusers import LCMScheduler

    assert generator_timesteps(4, 1000).tolist() == [999, 749, 499, 249]
    assert generator_timesteps(1, 1000).tolist() == [999]
    for k in (1, 2, 4):
        scheduler = LCMScheduler(original_inference_steps=k)
        scheduler.set_timesteps(k)
        assert scheduler.timesteps.tolist() == generator_timesteps(k, 1000).tolist()


@pytest.mark.parametrize("override, names", [
    ("objective.caption_dropout=0.1", "objective.caption_dropout"),
    ("adapter.kind=loha", "adapter.kind"),
    ("adapter.text_encoder=true", "adapter.text_encoder"),
    ("objective.dmd2.match_t_min=0.99", "match_t_min"),
    ("validation.scheduler=ddim", "validation.scheduler"),
    ("validation.steps=8", "validation.steps"),
    ("objective.dmd2.fake_lr_schedule.decay_steps=5", "objective.dmd2.fake_lr_schedule.decay_steps"),
])
def test_options_that_do_not_apply_are_named(dmd_recipe, override, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        Trainer(dmd_recipe("validation.every_steps=5", override))


def test_a_full_generator_and_full_fake_score_train_and_export_a_unet(dmd_recipe, tmp_path):
    trainer = Trainer(dmd_recipe("adapter.kind=full", "objective.dmd2.fake_score=full", "train.max_steps=5",
                                 "optimizer.lr=1e-4", "objective.dmd2.fake_optimizer.lr=1e-4"))
    assert set(trainer.objective.trained_modules()) == {"unet", "fake_unet", "gan_head"}
    final = trainer.fit().final_dir
    assert (final / "unet" / "config.json").is_file() and (final / "scheduler").is_dir()
    assert "UNet2DConditionModel.from_pretrained" in (final / "README.md").read_text()


def test_the_sdxl_recipe_distils_with_gradient_accumulation_and_exports(tiny_sdxl, digits_data, tmp_path):
    recipe = load_recipe("recipes/sdxl_dmd2_lora.yaml", [
        f"model.pretrained={tiny_sdxl}", f"data.source={digits_data}", "data.resolution=64", f"output_dir={tmp_path}",
        "train.max_steps=5", "train.batch_size=1", "train.grad_accum=2", "train.report_to=none",
        "validation.every_steps=0", "checkpoint.every_steps=0", "precision='no'", "adapter.rank=4",
        "data.num_workers=0", "train.log_every=5"])
    result = Trainer(recipe).fit()
    assert np.isfinite(result.last_loss)  # step 5 is the generator's
    assert (result.final_dir / "pytorch_lora_weights.safetensors").is_file()
    assert (result.final_dir / "scheduler" / "scheduler_config.json").is_file()


def test_a_uvit_generator_trains_without_the_gan_head_which_needs_a_unet(tiny_uvit, digits_data, tmp_path):
    args = [f"model.pretrained={tiny_uvit}", f"data.source={digits_data}", "data.resolution=64",
            f"output_dir={tmp_path}", "train.max_steps=5", "train.batch_size=2", "train.report_to=none",
            "validation.every_steps=0", "checkpoint.every_steps=0", "adapter.target_modules=null", "train.log_every=5"]
    with pytest.raises(ConfigError, match="gan_generator_weight"):
        Trainer(load_recipe(RECIPE, args))
    no_gan = ["objective.dmd2.gan_generator_weight=0", "objective.dmd2.gan_discriminator_weight=0"]
    result = Trainer(load_recipe(RECIPE, args + no_gan)).fit()
    assert np.isfinite(result.last_loss) and (result.final_dir / "pytorch_lora_weights.safetensors").is_file()


def test_gradient_checkpointing_recomputes_each_block_with_the_adapter_it_ran_with(dmd_recipe, tmp_path):
    """Both adapters share one U-Net and switch between forwards; a block recomputed in backward must use the one
    it ran forward with (and the GAN pass's frozen fake weights): the run matches one without checkpointing."""
    runs = {}
    for flag in ("true", "false"):
        trainer = Trainer(dmd_recipe("train.max_steps=5", f"memory.gradient_checkpointing={flag}",
                                     out=tmp_path / flag))
        trainer.fit()
        runs[flag] = trainer.params
    assert max((runs["true"][k] - runs["false"][k]).abs().max().item() for k in runs["true"]) < 1e-6


def test_the_fake_score_adapter_takes_its_own_rank(dmd_recipe):
    layers = Trainer(dmd_recipe("objective.dmd2.fake_rank=2")).objective.layers
    lora = [layer for layer in layers if hasattr(layer, "r")]
    assert lora and all(layer.r["default"] == 16 and layer.r["fake"] == 2 for layer in lora)
    assert all(layer.scaling["fake"] == 1.0 for layer in lora)  # alpha = rank


def test_sampling_a_student_past_its_grid_is_one_line_naming_the_limit():
    from diffusers import LCMScheduler

    from trainers.errors import UserError
    from trainers.schedulers import check_steps

    one_step = LCMScheduler(original_inference_steps=1)
    check_steps(one_step, 1)
    with pytest.raises(UserError, match="at most 1 steps"):
        check_steps(one_step, 2)  # diffusers' own ValueError would escape as a traceback


def test_bf16_mixed_precision_trains_both_groups_in_float32_weights(dmd_recipe):
    trainer = Trainer(dmd_recipe("precision=bf16", "train.max_steps=5"))
    result = trainer.fit()
    assert np.isfinite(result.last_loss)
    assert all(p.dtype == torch.float32 for p in trainer.params.values())  # LoRAs and head; the base is bf16
    assert next(p for n, p in trainer.objective.base.named_parameters() if "lora_" not in n).dtype == torch.bfloat16


@pytest.fixture
def cpu_loss_scaler(monkeypatch):
    """What Accelerate does for fp16 on CUDA (autocast to float16 and one GradScaler for every optimizer), on the
    CPU, where it keeps neither: the scale starts high enough that the first updates overflow and are skipped."""
    import accelerate

    class ScaledOnCPU(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.state.mixed_precision == "fp16":
                self.native_amp = True
                self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 20, growth_interval=3)

    monkeypatch.setattr(accelerate, "Accelerator", ScaledOnCPU)


def test_fp16_loss_scaling_skips_what_overflowed_per_group_and_resumes_exactly(dmd_recipe, cpu_loss_scaler, tmp_path):
    """One scaler serves both optimizers: an overflowing update of either group is skipped (not applied to the
    other), the guard counts exactly the updates the scaler skipped, and the scale resumes with the checkpoint."""
    args = ("precision=fp16", "train.max_steps=20", "checkpoint.every_steps=12")  # 12: inside an alternation
    straight = Trainer(dmd_recipe(*args, out=tmp_path / "straight"))
    result = straight.fit()
    assert np.isfinite(result.last_loss)
    assert all(p.dtype == torch.float32 for p in straight.params.values())
    stepped = [max(int(s["step"]) for s in o.optimizer.state.values()) for o in straight.optimizers]
    updates = [20 // 5, 20]  # generator every 5th engine step, fake score every step
    assert all(0 < n < u for n, u in zip(stepped, updates)), stepped  # some of each group's updates were skipped
    assert int(straight.nonfinite.total.item()) == sum(updates) - sum(stepped)

    Trainer(dmd_recipe(*args, out=tmp_path / "split")).fit(until=12)
    resumed = Trainer(dmd_recipe(*args, out=tmp_path / "split"))
    assert resumed.fit().step == 20
    assert resumed.accelerator.scaler.get_scale() == straight.accelerator.scaler.get_scale()
    assert max((straight.params[k] - resumed.params[k]).abs().max().item() for k in straight.params) < 1e-7
    rows = lambda d: map(json.loads, (d / "logs" / "metrics.jsonl").read_text().splitlines())  # noqa: E731
    read = lambda d: [r["loss"] for r in rows(d) if "loss" in r]  # noqa: E731
    assert read(tmp_path / "straight") == pytest.approx(read(tmp_path / "split"), rel=1e-7, abs=1e-9)


# ---- rectified-flow teachers (SD3, Flux): the same objective through the Schedule seam ---------------------------

FLOW_RECIPE = "recipes/demo/sd3_dmd2_lora_tiny.yaml"


@pytest.fixture(scope="module")
def tiny_flow(tmp_path_factory):
    from launch.make_tiny_model import make_tiny_model

    return {f: make_tiny_model(arch=f, out=tmp_path_factory.mktemp(f"tiny_{f}"), size="tiny", seed=0)
            for f in ("sd3", "flux")}


def flow_recipe(folder, digits_data, out, *overrides):
    return load_recipe(FLOW_RECIPE, [f"model.pretrained={folder}", f"data.source={digits_data}", f"output_dir={out}",
                                     "train.report_to=none", "validation.every_steps=0", "checkpoint.every_steps=0",
                                     "train.batch_size=2", "train.log_every=1", "optimizer.lr=1e-2",
                                     "objective.dmd2.fake_optimizer.lr=1e-2", *overrides])


LOAD_AND_SAMPLE_FLOW = textwrap.dedent("""
    import json, sys, numpy as np, torch, diffusers
    base, final, sigmas, guidance, out = sys.argv[1:6]
    sigmas, guidance = json.loads(sigmas), float(guidance)
    name = json.load(open(f"{base}/model_index.json"))["_class_name"]
    pipe = getattr(diffusers, name).from_pretrained(base)
    pipe.load_lora_weights(final)
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(final, subfolder="scheduler")
    assert pipe.scheduler.config.stochastic_sampling
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)  # as the card says: the stochastic sampler re-noises from torch's global generator
    images = pipe(["a digit 3", "a digit 8"], num_inference_steps=len(sigmas), sigmas=sigmas, guidance_scale=guidance,
                  height=64, width=64, max_sequence_length=32, generator=torch.Generator("cpu").manual_seed(0),
                  output_type="np").images
    np.save(out, images)
""")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_flow_generator_samples_the_same_in_stock_diffusers_at_the_cards_sigmas(family, tiny_flow, digits_data,
                                                                                   tmp_path):
    """Trained on SD3 (static shift 3) or Flux (shift by token count): the generator's grid is what the exported
    stochastic Euler sampler visits, and the LoRA samples in a fresh stock pipeline as in the trainer's."""
    trainer = Trainer(flow_recipe(tiny_flow[family], digits_data, tmp_path / "run", "train.max_steps=5"))
    objective = trainer.objective
    final = trainer.fit().final_dir
    assert {p.name for p in final.iterdir()} >= {"pytorch_lora_weights.safetensors", "lora_kohya.safetensors",
                                                 "scheduler", "README.md"}
    card = (final / "README.md").read_text()
    assert "sigmas=[1, 0.75, 0.5, 0.25]" in card and "FlowMatchEulerDiscreteScheduler" in card
    scheduler = objective.scheduler()
    schedule = objective.schedule
    mu = schedule.mu(16) if schedule.dynamic_shift else None  # 8x8 latents: 16 tokens of 2x2
    scheduler.set_timesteps(4, mu=mu)  # no sigmas given: our tools' default grid
    grid = objective.timesteps_for((16, 8, 8))
    torch.testing.assert_close(scheduler.sigmas[:-1], grid)
    if family == "sd3":
        torch.testing.assert_close(grid, torch.tensor([1.0, 0.9, 0.75, 0.5]))
    else:
        assert 0.25 < grid[-1] < 0.5 and grid[0] == 1  # shifted by exp(mu(16)) < 1 for so few tokens

    guidance = 1.0
    script = tmp_path / "load.py"
    script.write_text(LOAD_AND_SAMPLE_FLOW)
    proc = subprocess.run([sys.executable, str(script), str(tiny_flow[family]), str(final), "[1.0, 0.75, 0.5, 0.25]",
                           str(guidance), str(tmp_path / "x.npy")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pipe = objective.validation_pipeline()
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=4, guidance_scale=guidance, height=64, width=64, max_sequence_length=32,
                output_type="np")
    with torch.no_grad(), seeded_sampling(0):
        mine = pipe(["a digit 3", "a digit 8"], generator=torch.Generator("cpu").manual_seed(0), **call).images
    np.testing.assert_allclose(np.load(tmp_path / "x.npy"), mine, atol=2e-4)
    with torch.no_grad(), seeded_sampling(0):  # the same seed samples the same again: the re-noising is seeded
        again = pipe(["a digit 3", "a digit 8"], generator=torch.Generator("cpu").manual_seed(0), **call).images
    np.testing.assert_array_equal(again, mine)
    with torch.no_grad(), adapters.adapters_off(objective.layers), seeded_sampling(0):
        base = pipe(["a digit 3", "a digit 8"], generator=torch.Generator("cpu").manual_seed(0), **call).images
    assert np.abs(base - mine).max() > 1e-3


def test_a_guidance_distilled_teacher_embeds_the_real_scores_guidance(tiny_flow, digits_data, tmp_path):
    """Flux.1-dev has no CFG pass: its real score is the teacher with guidance_scale in its guidance embedding,
    while the generator and fake score run at the recipe's model.guidance."""
    trainer = Trainer(flow_recipe(tiny_flow["flux"], digits_data, tmp_path / "run", "model.guidance=1.0",
                                  "objective.dmd2.guidance_scale=4.0"))
    objective, backbone = trainer.objective, trainer.backbone
    assert backbone.guidance_distilled and not objective.real_needs_uncond
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        cond = backbone.condition(["a digit 3", "a digit 8"], [False, False], {}, "cpu")
        real = objective.real_x0(x, t, cond, None)
        with adapters.adapters_off(objective.layers):
            at = lambda g: backbone.denoise(x, t, dict(cond, guidance=torch.full((2,), g)), backbone.denoiser,  # noqa: E731
                                            objective.schedule)[0]
            torch.testing.assert_close(real, at(4.0))
            assert (real - at(1.0)).abs().max() > 1e-4
    assert torch.equal(cond["guidance"], torch.ones(2))  # the caller's conditioning is left as it was


def test_flow_options_that_do_not_apply_are_named(tiny_flow, tiny_sd15, digits_data, tmp_path):
    with pytest.raises(ConfigError, match=r"'objective\.schedule'"):  # a VP teacher is read as VP
        Trainer(load_recipe(RECIPE, [f"model.pretrained={tiny_sd15}", f"data.source={digits_data}",
                                     "objective.schedule=flow", "validation.every_steps=0"]))
    with pytest.raises(ConfigError, match=r"'validation\.scheduler' must be euler"):
        Trainer(flow_recipe(tiny_flow["sd3"], digits_data, tmp_path, "validation.every_steps=5",
                            "validation.scheduler=dpmsolver"))
    with pytest.raises(ConfigError, match="gan_generator_weight"):
        Trainer(flow_recipe(tiny_flow["sd3"], digits_data, tmp_path, "objective.dmd2.gan_generator_weight=0.005"))
