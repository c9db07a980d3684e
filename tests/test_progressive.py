"""Progressive distillation: the target's algebra and a one-stage student on an analytic Gaussian teacher, then
stages, guidance, resume and export on the tiny SD-1.5 model."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from trainers import diffusion, solvers
from trainers.config import load_recipe
from trainers.engine import Trainer
from trainers.errors import ConfigError, UserError
from trainers.objectives.progressive import plan_stages, progressive_loss, student_grid

SCHEDULE = diffusion.VPSchedule(diffusion.make_betas("scaled_linear", 0.00085, 0.012, 1000))
ACP = SCHEDULE.acp
MU, S = torch.tensor([1.0, -0.5]), 0.5


def gaussian_teacher(z, t):
    """The exact (x0_hat, eps_hat) for N(MU, S^2 I) data."""
    a, sg = (c[:, None] for c in diffusion.alpha_sigma(ACP, t))
    r2 = a**2 * S**2 + sg**2
    return MU + a * S**2 * (z - a * MU) / r2, sg * (z - a * MU) / r2


@pytest.mark.parametrize("t0, s0", [(999, 499), (624, 499), (249, -1)])
def test_target_makes_one_student_ddim_step_equal_the_teachers_two(t0, s0):
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    t, s = torch.full((64,), t0), torch.full((64,), s0)
    z_s = solvers.solve(gaussian_teacher, z, t, s, SCHEDULE, "ddim", substeps=2)
    two_steps = solvers.solve(gaussian_teacher, solvers.solve(gaussian_teacher, z, t, (t + s + 1) // 2, SCHEDULE, "ddim"),
                              (t + s + 1) // 2, s, SCHEDULE, "ddim")
    torch.testing.assert_close(z_s, two_steps)  # solve(substeps=2) is two DDIM steps through the midpoint
    alpha_t, sigma_t = diffusion.alpha_sigma(ACP, t)
    x_tilde = diffusion.progressive_target(z, z_s, alpha_t, sigma_t, *diffusion.alpha_sigma(ACP, s))
    one_step = diffusion.ddim_step(x_tilde, diffusion.eps_from_x0(z, x_tilde, alpha_t, sigma_t),
                                   *diffusion.alpha_sigma(ACP, s))
    torch.testing.assert_close(one_step, z_s, rtol=1e-4, atol=1e-5)


def ddim_sample(model, z, n_steps):
    """Stock-DDIM sampling (trailing grid, last step to clean data) with a (z, t) -> (x0, eps) model."""
    for t0 in student_grid(1000, n_steps, "cpu").tolist():
        t = torch.full((len(z),), t0)
        z = solvers.solve(model, z, t, (t - 1000 // n_steps).clamp(min=-1), SCHEDULE, "ddim")
    return z


def test_student_grid_is_what_diffusers_ddim_samples():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=0)
    for n in (1, 2, 4, 8, 16, 64):
        scheduler.set_timesteps(n)
        assert student_grid(1000, n, "cpu").tolist() == scheduler.timesteps.tolist()


def test_one_stage_student_of_the_analytic_teacher_reproduces_its_two_steps_per_step():
    """A per-timestep affine student, started as the teacher, learns 2-step sampling from the teacher's 4 steps."""
    a, sg = diffusion.alpha_sigma(ACP, torch.arange(1000))
    gain = (a * S**2 / (a**2 * S**2 + sg**2))[:, None]
    slope, bias = torch.nn.Parameter(gain.repeat(1, 2)), torch.nn.Parameter(MU * (1 - a[:, None] * gain))
    student_x0 = lambda z, t: slope[t] * z + bias[t]  # noqa: E731

    def student(z, t):
        x0 = student_x0(z, t)
        return x0, diffusion.eps_from_x0(z, x0, *diffusion.alpha_sigma(ACP, t))

    g = torch.Generator().manual_seed(1)
    z_T = torch.randn(2000, 2, generator=g)
    reference = ddim_sample(gaussian_teacher, z_T, 4)
    with torch.no_grad():
        before = (ddim_sample(student, z_T, 2) - reference).pow(2).mean().sqrt().item()
    opt = torch.optim.Adam([slope, bias], lr=1e-2)
    grid = student_grid(1000, 2, "cpu")
    for _ in range(300):
        x0 = MU + S * torch.randn(256, 2, generator=g)
        t = grid[torch.randint(2, (256,), generator=g)]
        z_t = diffusion.add_noise(x0, torch.randn(256, 2, generator=g), *diffusion.alpha_sigma(ACP, t))
        loss = progressive_loss(student_x0, gaussian_teacher, z_t, t, t - 500, SCHEDULE).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = (ddim_sample(student, z_T, 2) - reference).pow(2).mean().sqrt().item()
    assert before > 0.05 and after < 0.01 and after < before / 10, (before, after)


def test_stage_plan():
    from trainers.objectives.progressive import ProgressiveOptions as P

    assert plan_stages(P(teacher_steps=16, student_steps=1), 400) == [("halving", n) for n in (8, 4, 2, 1)]
    assert plan_stages(P(teacher_steps=8, student_steps=2, guided=True), 300) == [
        ("guidance", 8), ("halving", 4), ("halving", 2)]
    with pytest.raises(ConfigError, match="power of 2"):
        plan_stages(P(teacher_steps=12, student_steps=4), 400)
    with pytest.raises(ConfigError, match="train.max_steps"):
        plan_stages(P(teacher_steps=8, student_steps=1), 400)


# ---- on the tiny SD-1.5 model -----------------------------------------------------------------------------

@pytest.fixture
def prog_recipe(tiny_sd15, digits_data, tmp_path):
    def build(*overrides, out=None):
        base = [f"model.pretrained={tiny_sd15}", f"data.source={digits_data}", "data.resolution=64",
                f"output_dir={out or tmp_path / 'run'}", "train.report_to=none", "validation.every_steps=0",
                "checkpoint.every_steps=0", "train.batch_size=4", "train.log_every=1", "lr_schedule.warmup_steps=0",
                "objective.progressive.teacher_steps=4", "objective.progressive.student_steps=1",
                "objective.progressive.guidance_embedding_dim=16", "train.max_steps=6", "optimizer.lr=1e-3"]
        return load_recipe("recipes/demo/sd15_progressive_tiny.yaml", base + list(overrides))
    return build


LORA = ("adapter.kind=lora", "adapter.rank=4", "adapter.alpha=4")
KINDS = pytest.mark.parametrize("kind", [(), LORA], ids=["full", "lora"])


@KINDS
def test_each_stage_starts_from_the_last_student(prog_recipe, kind):
    trainer = Trainer(prog_recipe("objective.progressive.guided=false", *kind))  # stages 2 and 1 steps, 3 steps each
    obj = trainer.objective
    trainer.fit(until=3)
    end_of_first = {n: p.detach().clone() for n, p in obj.student_tensors().items()}
    assert obj.stage == 0 and any(p.abs().max() > 0 for n, p in end_of_first.items() if "lora_B" in n) == bool(kind)
    trainer2 = Trainer(prog_recipe("objective.progressive.guided=false", *kind))
    trainer2.fit()
    assert trainer2.objective.stage == 1
    teacher = trainer2.objective.teacher_tensors()
    assert set(teacher) == set(end_of_first)
    for n, p in teacher.items():
        torch.testing.assert_close(p.float(), end_of_first[n])


@KINDS
def test_guided_stage_matches_the_cfg_combination_of_the_base(prog_recipe, tiny_sd15, kind):
    from diffusers import UNet2DConditionModel

    trainer = Trainer(prog_recipe(*kind))
    obj = trainer.objective
    assert obj.student.config.time_cond_proj_dim == 16 and obj.stages[0] == ("guidance", 4)
    with torch.no_grad():  # a trained student: the teacher must still be the original model
        for p in obj.student.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    batch = {"captions": ["a digit 3", "a digit 7"], "seeds": [1, 2]}
    omega = torch.tensor([1.0, 3.0])
    _, teacher = obj.condition_and_teacher(batch, 0, omega)
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([99, 899])
    x0 = teacher(z, t)[0]
    cond, uncond = obj.text.pair(batch)
    original = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    with torch.no_grad():
        x_c = obj.predict_x0(original, z, t, cond, obj.teacher_schedule)
        x_u = obj.predict_x0(original, z, t, uncond, obj.teacher_schedule)
    torch.testing.assert_close(x0, x_c + omega[:, None, None, None] * (x_c - x_u), rtol=1e-4, atol=1e-5)


LOAD_AND_SAMPLE = textwrap.dedent("""
    import sys, numpy as np, torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    base, final, out = sys.argv[1:4]
    pipe = StableDiffusionPipeline.from_pretrained(base, unet=UNet2DConditionModel.from_pretrained(final, subfolder="unet"),
                                                   scheduler=DDIMScheduler.from_pretrained(final, subfolder="scheduler"),
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a digit 3", "a digit 8"], num_inference_steps=1, guidance_scale=3.0,
                  generator=torch.Generator("cpu").manual_seed(0), output_type="np").images
    np.save(out, images)
""")


@KINDS
def test_exported_student_samples_the_same_in_a_fresh_process(prog_recipe, tiny_sd15, tmp_path, kind):
    trainer = Trainer(prog_recipe(*kind))
    final = trainer.fit().final_dir
    assert (final / "unet" / "config.json").is_file() and (final / "scheduler" / "scheduler_config.json").is_file()
    assert "num_inference_steps=1" in (final / "README.md").read_text()
    script = tmp_path / "load.py"
    script.write_text(LOAD_AND_SAMPLE)
    proc = subprocess.run([sys.executable, str(script), str(tiny_sd15), str(final), str(tmp_path / "x.npy")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pipe = trainer.objective.validation_pipeline()
    pipe.set_progress_bar_config(disable=True)
    trainer.objective.student.eval()
    with torch.no_grad():
        ours = pipe(["a digit 3", "a digit 8"], num_inference_steps=1, guidance_scale=3.0,
                    generator=torch.Generator("cpu").manual_seed(0), output_type="np").images
    np.testing.assert_allclose(np.load(tmp_path / "x.npy"), ours, atol=2e-4)


@KINDS
def test_a_run_killed_mid_stage_resumes_at_that_stage_and_step(prog_recipe, tmp_path, kind):
    args = ("checkpoint.every_steps=2", "train.max_steps=9", *kind)  # 3 stages (guidance, 2 steps, 1 step) of 3 steps
    straight = Trainer(prog_recipe(*args, out=tmp_path / "straight"))
    straight.fit()
    split = Trainer(prog_recipe(*args, out=tmp_path / "split"))
    split.fit(until=4)  # inside the second stage: its teacher must come back from the checkpoint
    assert split.objective.stage == 1
    resumed = Trainer(prog_recipe(*args, out=tmp_path / "split"))
    assert resumed.fit().step == 9
    a, b = straight.params, resumed.params
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    read = lambda d: [line.split('"lr"')[0] for line in (d / "logs" / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert read(tmp_path / "split") == read(tmp_path / "straight")


@pytest.mark.parametrize("override, names", [
    ("adapter.init_from=x.safetensors", "adapter.init_from"),
    ("ema.enabled=true", "ema.enabled"),
    ("objective.snr_gamma=5", "objective.snr_gamma"),
    ("objective.caption_dropout=0.1", "objective.caption_dropout"),
    ("objective.progressive.student_steps=3", "teacher_steps"),
    ("train.max_steps=7", "train.max_steps"),
    ("validation.scheduler=lcm", "validation.scheduler"),
])
def test_options_that_do_not_apply_are_named(prog_recipe, override, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        Trainer(prog_recipe(override, "validation.every_steps=5"))


def test_a_stage_end_checkpoint_exports_that_stages_student(prog_recipe, tiny_sd15, tmp_path):
    from launch.evaluate import evaluate
    from launch.export import main as export_main
    from safetensors.torch import load_file

    run = tmp_path / "run"
    Trainer(prog_recipe("checkpoint.every_steps=3", "checkpoint.keep_last=3", "train.max_steps=9", "export.dtype=float32",
                      out=run)).fit()
    ckpt = run / "checkpoints" / "step-6"  # the end of the 2-step stage (guidance 4, halving 2, halving 1)
    recipe_before = (run / "recipe.yaml").read_text()
    assert export_main([str(ckpt), "--out", str(tmp_path / "two_step")]) == 0
    out = tmp_path / "two_step"
    assert "num_inference_steps=2" in (out / "README.md").read_text()
    assert (out / "scheduler" / "scheduler_config.json").is_file()
    exported, saved = load_file(out / "unet" / "diffusion_pytorch_model.safetensors"), load_file(ckpt / "weights.safetensors")
    assert set(exported) == {k[len("model.unet."):] for k in saved if k.startswith("model.unet.")}
    for name, value in exported.items():
        torch.testing.assert_close(value, saved[f"model.unet.{name}"])
    assert (run / "recipe.yaml").read_text() == recipe_before
    result = evaluate(tiny_sd15, [2], student=out, scheduler=None, guidance=3.0, prompts=2, images_per_prompt=1,
                      resolution=32, device="cpu")
    run2 = result["runs"][0]  # the student's own DDIM grid, omega embedded: one batch row per step, no CFG pass
    assert result["scheduler"] == "DDIMScheduler" and run2["calls_per_image"] == 2 and run2["evaluations_per_image"] == 2
    with pytest.raises(UserError, match="not a complete checkpoint"):
        export_main([str(run / "checkpoints"), "--out", str(tmp_path / "x")])
