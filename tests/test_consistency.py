"""Latent consistency distillation: the math on an analytic Gaussian teacher, then LCM-LoRA and full LCM on the tiny
models (one denoiser in memory, export that stock diffusers samples, exact resume with an EMA target)."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from trainers import diffusion, solvers
from trainers.config import load_recipe
from trainers.engine import Trainer
from trainers.errors import ConfigError
from trainers.adapters import adapters_off
from trainers.objectives.consistency import ConsistencyOptions, consistency_fn, consistency_loss

# ---- an analytic teacher: data x0 ~ N(mu, S^2 I) has the exact denoiser in closed form -------------------

SCHEDULE = diffusion.VPSchedule(diffusion.make_betas("scaled_linear", 0.00085, 0.012, 1000))
ACP = SCHEDULE.acp
MU_C, MU_U, S = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.0]), 0.5


def gaussian_denoiser(mu):
    """E[x0 | z_t] and the matching eps for N(mu, S^2 I) data: x0_hat = mu + alpha S^2 (z - alpha mu) / r^2."""
    def denoise(z, t):
        a, sg = (c[:, None] for c in diffusion.alpha_sigma(ACP, t))
        r2 = a**2 * S**2 + sg**2
        return mu + a * S**2 * (z - a * mu) / r2, sg * (z - a * mu) / r2
    return denoise


def radius(t):
    a, sg = diffusion.alpha_sigma(ACP, t)
    return (a**2 * S**2 + sg**2).sqrt()[:, None]


def exact_flow(z, t, s, mu=MU_C):
    """The probability-flow ODE keeps (z - alpha mu) / r fixed: z_s = alpha_s mu + r_s / r_t (z - alpha_t mu)."""
    a_t, a_s = diffusion.alpha_sigma(ACP, t)[0][:, None], diffusion.alpha_sigma(ACP, s)[0][:, None]
    return a_s * mu + radius(s) / radius(t) * (z - a_t * mu)


def batch(t, s, n=500):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0)), torch.full((n,), t), torch.full((n,), s)


def test_ddim_step_matches_its_closed_form():
    z, t, s = batch(799, 519)
    a_t, s_t = (c[:, None] for c in diffusion.alpha_sigma(ACP, t))
    a_s, s_s = (c[:, None] for c in diffusion.alpha_sigma(ACP, s))
    expected = a_s * MU_C + (a_s * a_t * S**2 + s_s * s_t) / radius(t) ** 2 * (z - a_t * MU_C)
    torch.testing.assert_close(solvers.solve(gaussian_denoiser(MU_C), z, t, s, SCHEDULE, "ddim"), expected)


def test_guidance_combines_cond_and_uncond_as_the_paper_writes_it():
    z, t, _ = batch(599, 0)
    omega = torch.linspace(0, 8, len(z))
    (x_c, e_c), (x_u, e_u) = gaussian_denoiser(MU_C)(z, t), gaussian_denoiser(MU_U)(z, t)
    w = omega[:, None]
    torch.testing.assert_close(solvers.guided(e_c, e_u, omega), (1 + w) * e_c - w * e_u)
    torch.testing.assert_close(solvers.guided(x_c, x_u, omega), (1 + w) * x_c - w * x_u)
    # diffusers pipelines: uncond + guidance_scale (cond - uncond), with guidance_scale = omega + 1
    torch.testing.assert_close(solvers.guided(e_c, e_u, omega), e_u + (w + 1) * (e_c - e_u))
    torch.testing.assert_close(solvers.guided(e_c, e_u, torch.zeros(len(z))), e_c)


def test_guidance_embedding_is_what_diffusers_pipelines_feed_for_guidance_scale_omega_plus_1():
    from diffusers import StableDiffusionPipeline

    omega = torch.tensor([0.0, 1.5, 7.0])
    for dim in (256, 33):
        ours = diffusion.guidance_embedding(omega, dim)
        theirs = StableDiffusionPipeline.get_guidance_scale_embedding(None, omega + 1 - 1, embedding_dim=dim)
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("solver", solvers.SOLVERS)
def test_solvers_converge_to_the_exact_flow(solver):
    for t0, s0 in [(999, 0), (519, 259)]:
        z, t, s = batch(t0, s0)
        errors = [(solvers.solve(gaussian_denoiser(MU_C), z, t, s, SCHEDULE, solver, m) - exact_flow(z, t, s)).abs().max()
                  for m in (2, 20, 100)]
        assert errors[0] > errors[1] > errors[2] and errors[2] < 0.06, (t0, s0, errors)


def test_dpmpp_2m_is_ddim_in_one_sub_step_and_more_accurate_in_several():
    z, t, s = batch(519, 259)
    teacher = gaussian_denoiser(MU_C)
    torch.testing.assert_close(solvers.solve(teacher, z, t, s, SCHEDULE, "dpmpp_2m", 1),
                               solvers.solve(teacher, z, t, s, SCHEDULE, "ddim", 1))
    err = {k: (solvers.solve(teacher, z, t, s, SCHEDULE, k, 5) - exact_flow(z, t, s)).abs().max() for k in ("ddim", "dpmpp_2m")}
    assert err["dpmpp_2m"] < err["ddim"] / 3, err
    # sub-steps of no length (more sub-steps than timesteps) change nothing
    z2, t2, s2 = batch(20, 19)
    assert torch.isfinite(solvers.solve(teacher, z2, t2, s2, SCHEDULE, "dpmpp_2m", 5)).all()


def test_boundary_condition_and_the_stock_lcm_scheduler_scalings():
    from diffusers import LCMScheduler

    c_skip, c_out = diffusion.consistency_scalings(torch.tensor([0]))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    stock = LCMScheduler()
    for t in (0, 19, 259, 999):
        ours = diffusion.consistency_scalings(torch.tensor([t]), 0.5, 10.0)
        theirs = stock.get_scalings_for_boundary_condition_discrete(t)
        assert abs(ours[0].item() - theirs[0]) < 1e-6 and abs(ours[1].item() - theirs[1]) < 1e-6


def test_lcd_on_the_analytic_teacher_moves_one_step_samples_to_the_guided_flow():
    """A per-timestep affine student, started as the unguided teacher, learns the guided teacher's 1-step map.

    The reference is the teacher's own N-step DDIM (the ODE the student distils) from the same noise.
    """
    cfg = ConsistencyOptions(num_teacher_timesteps=10, distance="l2")
    stride, omega = 100, 2.0
    grid = torch.arange(1, 11) * stride - 1
    cond, uncond = gaussian_denoiser(MU_C), gaussian_denoiser(MU_U)

    def teacher(z, t):
        (x_c, e_c), (x_u, e_u) = cond(z, t), uncond(z, t)
        w = torch.full((len(z),), omega)
        return solvers.guided(x_c, x_u, w), solvers.guided(e_c, e_u, w)

    a, sg = diffusion.alpha_sigma(ACP, torch.arange(1000))
    gain = (a * S**2 / (a**2 * S**2 + sg**2))[:, None]
    slope = torch.nn.Parameter(gain.repeat(1, 2))                 # x0_hat = slope[t] z + bias[t]: the unguided
    bias = torch.nn.Parameter(MU_C * (1 - a[:, None] * gain))     # teacher's exact denoiser at the start
    student = lambda z, t: slope[t] * z + bias[t]  # noqa: E731

    g = torch.Generator().manual_seed(1)
    z_T = torch.randn(2000, 2, generator=g)
    reference = z_T
    for n in range(9, -1, -1):
        t = torch.full((len(z_T),), int(grid[n]))
        reference = solvers.solve(teacher, reference, t, (t - stride).clamp(min=0), SCHEDULE, "ddim")

    def errors():
        with torch.no_grad():
            x = consistency_fn(student, z_T, torch.full((len(z_T),), 999), cfg)
        return ((x.mean(0) - reference.mean(0)).abs().max().item(), (x.std(0) - reference.std(0)).abs().max().item(),
                (x - reference).pow(2).mean().sqrt().item())

    before = errors()
    opt = torch.optim.Adam([slope, bias], lr=1e-2)
    for _ in range(400):
        x0 = MU_C + S * torch.randn(256, 2, generator=g)
        t = grid[torch.randint(10, (256,), generator=g)]
        z_t = diffusion.add_noise(x0, torch.randn(256, 2, generator=g), *diffusion.alpha_sigma(ACP, t))
        loss = consistency_loss(student, student, teacher, z_t, t, (t - stride).clamp(min=0), SCHEDULE, cfg).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = errors()
    assert before[0] > 1.0 and before[1] > 0.3  # the unguided start is far from the guided flow
    assert after[0] < before[0] / 10 and after[1] < before[1] / 5 and after[2] < before[2] / 10, (before, after)


def test_pseudo_huber_is_l2_like_far_and_quadratic_near():
    a, b = torch.zeros(1, 4), torch.full((1, 4), 3.0)
    assert abs(diffusion.pseudo_huber(a, b, 0.001).item() - 3.0) < 1e-2
    small = torch.full((1, 4), 1e-5)
    assert abs(diffusion.pseudo_huber(a, small, 0.001).item() / (1e-10 / 0.002) - 1) < 1e-2  # d^2 / 2c


# ---- the objective on the tiny models ----------------------------------------------------------------------

RECIPE = "recipes/demo/sd15_lcm_lora_tiny.yaml"


@pytest.fixture
def lcm_recipe(tiny_sd15, digits_data, tmp_path):
    def build(*overrides, out=None):
        base = [f"model.pretrained={tiny_sd15}", f"data.source={digits_data}", "data.resolution=64",
                f"output_dir={out or tmp_path / 'run'}", "train.report_to=none", "validation.every_steps=0",
                "checkpoint.every_steps=0", "train.batch_size=4", "train.log_every=1",
                "objective.consistency.omega_min=1", "objective.consistency.omega_max=3"]
        return load_recipe(RECIPE, base + list(overrides))
    return build


def test_teacher_is_the_base_model_with_the_adapters_off(lcm_recipe, tiny_sd15):
    from diffusers import UNet2DConditionModel

    trainer = Trainer(lcm_recipe())
    obj = trainer.objective
    for name, p in obj.student.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    base = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet").eval()
    z, t, h = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 77, base.config.cross_attention_dim)
    with torch.no_grad():
        with adapters_off(obj.lora):
            teacher = obj.teacher(z, t, encoder_hidden_states=h).sample
        student = obj.student(z, t, encoder_hidden_states=h).sample
        expected = base(z, t, encoder_hidden_states=h).sample
    torch.testing.assert_close(teacher, expected, rtol=0, atol=1e-5)
    assert (student - expected).abs().max() > 1e-3
    assert all(p.requires_grad for n, p in obj.student.named_parameters() if "lora_" in n)


def test_batched_guided_teacher_equals_separate_cond_and_uncond_calls(lcm_recipe, digits_data):
    trainer = Trainer(lcm_recipe())
    obj = trainer.objective
    batch = {"captions": ["a digit 3", "a digit 7"], "seeds": [1, 2]}
    cond, uncond = obj.text.pair(batch)
    z, t, omega = torch.randn(2, 4, 8, 8), torch.tensor([99, 899]), torch.tensor([1.0, 4.0])
    x0, eps = obj.guided_teacher(cond, uncond, omega)(z, t)
    alpha, sigma = diffusion.alpha_sigma(obj.schedule.acp, t)
    with torch.no_grad(), adapters_off(obj.lora):
        out_c = obj.teacher(z, t, **cond).sample
        out_u = obj.teacher(z, t, **uncond).sample
    eps_c = diffusion.to_x0_eps(obj.schedule.prediction_type, out_c, z, alpha, sigma)[1]
    eps_u = diffusion.to_x0_eps(obj.schedule.prediction_type, out_u, z, alpha, sigma)[1]
    torch.testing.assert_close(eps, eps_c + omega[:, None, None, None] * (eps_c - eps_u), rtol=1e-4, atol=1e-5)
    empty = obj.backbone.encode_text([""], "cpu")["hidden"]
    torch.testing.assert_close(uncond["encoder_hidden_states"], empty.expand(2, -1, -1))


LOAD_AND_SAMPLE = textwrap.dedent("""
    import sys, numpy as np, torch
    from diffusers import LCMScheduler, StableDiffusionPipeline
    base, final, out, unet = sys.argv[1:5]
    kwargs = {}
    if unet != "-":
        from diffusers import UNet2DConditionModel
        kwargs["unet"] = UNet2DConditionModel.from_pretrained(unet)
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False, **kwargs)
    if unet == "-":
        pipe.load_lora_weights(final)
    pipe.scheduler = LCMScheduler.from_pretrained(final, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a digit 3", "a digit 8"], num_inference_steps=4, guidance_scale=float(sys.argv[5]),
                  generator=torch.Generator("cpu").manual_seed(0), output_type="np").images
    np.save(out, images)
""")


def sample_in_process(obj, guidance):
    pipe = obj.validation_pipeline()
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(["a digit 3", "a digit 8"], num_inference_steps=4, guidance_scale=guidance,
                    generator=torch.Generator("cpu").manual_seed(0), output_type="np").images


def test_lcm_lora_export_samples_the_same_in_stock_diffusers_in_a_fresh_process(lcm_recipe, tiny_sd15, tmp_path):
    trainer = Trainer(lcm_recipe("train.max_steps=6", "optimizer.lr=1e-2", "lr_schedule.warmup_steps=0"))
    result = trainer.fit()
    final = result.final_dir
    assert {p.name for p in final.iterdir()} >= {"pytorch_lora_weights.safetensors", "lora_kohya.safetensors",
                                                 "scheduler", "README.md"}
    assert "LCMScheduler" in (final / "README.md").read_text() and "lcm-lora" in (final / "README.md").read_text()
    script = tmp_path / "load.py"
    script.write_text(LOAD_AND_SAMPLE)
    proc = subprocess.run([sys.executable, str(script), str(tiny_sd15), str(final), str(tmp_path / "x.npy"), "-", "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    trainer.objective.student.eval()
    np.testing.assert_allclose(np.load(tmp_path / "x.npy"), sample_in_process(trainer.objective, 1.0), atol=2e-4)


def test_full_lcm_starts_as_the_teacher_and_exports_a_unet_stock_diffusers_samples(lcm_recipe, tiny_sd15, tmp_path):
    trainer = Trainer(lcm_recipe("adapter.kind=full", "train.max_steps=4", "optimizer.lr=1e-3",
                                 "objective.consistency.guidance_embedding_dim=32"))
    obj = trainer.objective
    assert obj.student is not obj.teacher and obj.student.config.time_cond_proj_dim == 32
    z, t, h = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 77, obj.teacher.config.cross_attention_dim)
    with torch.no_grad():
        emb = diffusion.guidance_embedding(torch.tensor([1.0, 5.0]), 32)
        torch.testing.assert_close(obj.student(z, t, encoder_hidden_states=h, timestep_cond=emb).sample,
                                   obj.teacher(z, t, encoder_hidden_states=h).sample)
    final = trainer.fit().final_dir
    assert (final / "unet" / "config.json").is_file() and not list(final.glob("*lora*"))
    script = tmp_path / "load.py"
    script.write_text(LOAD_AND_SAMPLE)
    proc = subprocess.run([sys.executable, str(script), str(tiny_sd15), str(final), str(tmp_path / "x.npy"),
                           str(final / "unet"), "3"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    obj.student.eval()
    np.testing.assert_allclose(np.load(tmp_path / "x.npy"), sample_in_process(obj, 3.0), atol=2e-4)
    assert "guidance_scale=3" in (final / "README.md").read_text()


@pytest.mark.parametrize("variant", [("adapter.kind=lora", "objective.consistency.target=ema"),
                                     ("adapter.kind=full", "objective.consistency.guidance_embedding_dim=16")],
                         ids=["lora_ema_target", "full"])
def test_resume_mid_distillation_is_exact_with_the_ema_target(lcm_recipe, tmp_path, variant):
    args = (*variant, "train.max_steps=6", "checkpoint.every_steps=3", "objective.consistency.target_ema_decay=0.5",
            "optimizer.lr=5e-3", "lr_schedule.warmup_steps=0")
    straight = Trainer(lcm_recipe(*args, out=tmp_path / "straight"))
    straight.fit()
    split = Trainer(lcm_recipe(*args, out=tmp_path / "split"))
    split.fit(until=3)
    resumed = Trainer(lcm_recipe(*args, out=tmp_path / "split"))
    assert resumed.fit().step == 6
    for a, b in [(straight.params, resumed.params),
                 (straight.objective.target_ema.shadow, resumed.objective.target_ema.shadow)]:
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    start = split.objective.target_ema.shadow  # the target moved away from the student's start
    assert max((start[k] - straight.objective.target_ema.shadow[k]).abs().max().item() for k in start) > 1e-5
    read = lambda d: (d / "logs" / "metrics.jsonl").read_text().splitlines()  # noqa: E731
    assert [line.split('"lr"')[0] for line in read(tmp_path / "split")] == \
        [line.split('"lr"')[0] for line in read(tmp_path / "straight")]


@pytest.mark.parametrize("override, names", [
    ("objective.consistency.omega_min=20", "omega_min"),
    ("objective.caption_dropout=0.1", "objective.caption_dropout"),
    ("objective.snr_gamma=5", "objective.snr_gamma"),
    ("adapter.text_encoder=true", "adapter.text_encoder"),
    ("objective.consistency.skip=50", "objective.consistency.skip"),
    ("objective.consistency.solver=heun", "objective.consistency.solver"),
    ("validation.scheduler=ddim", "validation.scheduler"),
])
def test_options_that_do_not_apply_are_named(lcm_recipe, override, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        Trainer(lcm_recipe(override, "validation.every_steps=5"))


def test_full_lcm_guidance_embedding_needs_a_unet(tiny_uvit, digits_data, tmp_path):
    recipe = load_recipe("recipes/uvit_lcm_lora.yaml", [
        f"model.pretrained={tiny_uvit}", f"data.source={digits_data}", "data.resolution=64",
        f"output_dir={tmp_path}", "adapter.kind=full", "objective.consistency.guidance_embedding_dim=64",
        "train.report_to=none"])
    with pytest.raises(ConfigError, match="guidance_embedding_dim"):
        Trainer(recipe)


@pytest.mark.parametrize("family", ["sdxl", "uvit"])
def test_lcm_lora_recipes_of_other_families_distil_and_export(request, family, digits_data, tmp_path):
    model = request.getfixturevalue(f"tiny_{family}")
    recipe = load_recipe(f"recipes/{family}_lcm_lora.yaml", [
        f"model.pretrained={model}", f"data.source={digits_data}", "data.resolution=64", f"output_dir={tmp_path}",
        "train.max_steps=3", "train.batch_size=2", "train.report_to=none", "validation.every_steps=0",
        "checkpoint.every_steps=0", "precision='no'", "adapter.rank=4", "data.num_workers=0", "train.log_every=1"])
    result = Trainer(recipe).fit()
    assert np.isfinite(result.last_loss)
    assert (result.final_dir / "pytorch_lora_weights.safetensors").is_file()
    assert (result.final_dir / "scheduler" / "scheduler_config.json").is_file()
