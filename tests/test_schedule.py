"""The noise-process seam: both Schedules against their closed forms, and configs that name no process refused."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainers import diffusion
from trainers.diffusion import FlowMatchSchedule, VPSchedule, schedule_from_config
from trainers.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SD15 = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1}


def pair(shape=(6, 4, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_vp_target_and_recovery_invert_each_other(prediction_type):
    schedule = VPSchedule.from_config(SD15, prediction_type)
    x0, eps = pair()
    t = torch.tensor([0, 1, 250, 500, 900, 999])
    x_t = schedule.add_noise(x0, eps, t)
    alpha, sigma = (c.view(-1, 1, 1, 1) for c in schedule.alpha_sigma(t))
    torch.testing.assert_close(x_t, alpha * x0 + sigma * eps)
    x0_hat, eps_hat = schedule.to_x0_eps(schedule.target(x0, eps, t), x_t, t)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-4, atol=2e-4)
    expected = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}[prediction_type]
    torch.testing.assert_close(schedule.target(x0, eps, t), expected)


def test_vp_snr_matches_alphas_cumprod():
    schedule = VPSchedule.from_config(SD15)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    acp = torch.cumprod(1 - betas, 0)
    t = torch.arange(1000)
    torch.testing.assert_close(schedule.snr(t).double(), acp / (1 - acp), rtol=1e-4, atol=0)
    assert schedule.num_train_timesteps == 1000 and schedule.model_timestep(t) is t
    alpha, sigma = schedule.alpha_sigma(torch.tensor([-1]))  # clean data, where DDIM ends
    assert alpha.item() == 1.0 and sigma.item() == 0.0


def test_vp_min_snr_weight_and_zero_terminal_snr():
    schedule = VPSchedule.from_config(SD15, "v_prediction")
    t = torch.tensor([10, 500, 990])
    snr = schedule.snr(t)
    torch.testing.assert_close(schedule.loss_weight(t, 5.0), torch.clamp(snr, max=5.0) / (snr + 1))
    assert schedule.loss_weight(t, None) is None
    rescaled = schedule.configured("v_prediction", zero_terminal_snr=True)
    assert rescaled.acp[-1].item() < 1e-9 and schedule.acp[-1].item() > 1e-3
    assert rescaled.sampling_config()["rescale_betas_zero_snr"] and rescaled.sampling_config()["timestep_spacing"] == "trailing"
    assert schedule.configured(None, False) is schedule


def test_flow_matching_follows_its_formulas():
    schedule = FlowMatchSchedule(shift=1.0)
    x0, eps = pair()
    t = torch.tensor([0.001, 0.1, 0.3, 0.5, 0.8, 0.999])
    tb = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(schedule.add_noise(x0, eps, t), (1 - tb) * x0 + tb * eps)
    v = schedule.target(x0, eps, t)
    torch.testing.assert_close(v, eps - x0)
    x0_hat, eps_hat = schedule.to_x0_eps(v, schedule.add_noise(x0, eps, t), t)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(schedule.snr(t), ((1 - t) / t) ** 2)
    torch.testing.assert_close(schedule.model_timestep(t), t * 1000)


def test_flow_loss_weightings_are_sd3s():
    t = torch.tensor([0.1, 0.5, 0.9])
    assert FlowMatchSchedule(weighting="none").loss_weight(t) is None
    torch.testing.assert_close(FlowMatchSchedule(weighting="sigma_sqrt").loss_weight(t), t**-2)
    torch.testing.assert_close(FlowMatchSchedule(weighting="cosmap").loss_weight(t), 2 / (math.pi * (1 - 2 * t + 2 * t**2)))


def test_shift_maps_t_as_sd3_writes_it():
    """SD3 (Esser et al. 2024, eq. 23): t_m = sqrt(m/n) t_n / (1 + (sqrt(m/n) - 1) t_n), which divides the SNR by
    m/n: an image with m pixels at t_m is as noisy as one with n pixels at t_n."""
    m, n = 1024 * 1024, 256 * 256
    alpha = math.sqrt(m / n)
    schedule = FlowMatchSchedule(shift=alpha)
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    shifted = schedule.shifted(t)
    torch.testing.assert_close(shifted, alpha * t / (1 + (alpha - 1) * t))
    torch.testing.assert_close(schedule.snr(shifted), schedule.snr(t) / alpha**2)
    assert shifted[49].item() == pytest.approx(0.8)  # t = 0.5 at shift 4


def test_dynamic_shift_is_fluxs_time_shift():
    schedule = FlowMatchSchedule(dynamic_shift=True, base_shift=0.5, max_shift=1.15, base_seq_len=256, max_seq_len=4096)
    assert schedule.mu(256) == pytest.approx(0.5) and schedule.mu(4096) == pytest.approx(1.15)
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    mu = schedule.mu(1024)
    torch.testing.assert_close(schedule.shifted(t, 1024), math.exp(mu) / (math.exp(mu) + (1 / t - 1)))


def test_logit_normal_histogram_matches_its_density():
    schedule = FlowMatchSchedule(sampler="logit_normal", logit_mean=0.3, logit_std=0.8)
    g = torch.Generator().manual_seed(0)
    n = 400_000
    t = schedule.from_uniform(torch.rand(n, generator=g), torch.randn(n, generator=g)).double()
    edges = torch.linspace(0, 1, 21, dtype=torch.float64)
    observed = torch.histc(t, bins=20, min=0, max=1) / n
    fine = torch.linspace(0, 1, 20 * 200 + 1, dtype=torch.float64)[1:-1]  # the density integrated per bin
    density = schedule.density(fine)
    expected = torch.stack([density[(fine >= a) & (fine < b)].sum() / (20 * 200) for a, b in zip(edges, edges[1:])])
    assert expected.sum().item() == pytest.approx(1.0, abs=1e-3)
    torch.testing.assert_close(observed, expected, rtol=0, atol=2.5e-3)
    uniform = FlowMatchSchedule(sampler="uniform").from_uniform(torch.rand(n, generator=g), torch.randn(n, generator=g))
    torch.testing.assert_close(torch.histc(uniform, bins=10, min=0, max=1) / n, torch.full((10,), 0.1), rtol=0, atol=3e-3)


def test_seeded_timesteps_repeat_and_stay_inside_the_interval():
    schedule = FlowMatchSchedule(shift=3.0, sampler="mode")
    seeds = list(range(64))
    t = schedule.sample_timesteps(seeds, "cpu")
    torch.testing.assert_close(t, schedule.sample_timesteps(seeds, "cpu"))
    assert t.shape == (64,) and (t > 0).all() and (t < 1).all()
    vp = VPSchedule.from_config(SD15).sample_timesteps(seeds, "cpu")
    assert vp.dtype == torch.long and 0 <= vp.min() and vp.max() < 1000


def test_config_kinds_are_read_from_the_fields_the_file_named(tmp_path):
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    vp = schedule_from_config(SD15)
    assert isinstance(vp, VPSchedule) and vp.prediction_type == "epsilon"
    torch.testing.assert_close(vp.acp, diffusion.alphas_cumprod(diffusion.make_betas("scaled_linear", 0.00085, 0.012, 1000)).float())
    trained = schedule_from_config({"trained_betas": [0.1, 0.2, 0.3], "num_train_timesteps": 3})
    assert isinstance(trained, VPSchedule) and trained.num_train_timesteps == 3
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(tmp_path / "flow")
    # read as DDPMScheduler (as an SD loader would), diffusers fills in linear betas: still flow matching
    as_ddpm = dict(DDPMScheduler.from_pretrained(tmp_path / "flow").config)
    assert as_ddpm["beta_schedule"] == "linear"
    for config in (as_ddpm, json.loads((tmp_path / "flow" / "scheduler_config.json").read_text())):
        flow = schedule_from_config(config)
        assert isinstance(flow, FlowMatchSchedule) and flow.shift == 3.0
    with pytest.raises(UserError, match="names neither betas .*beta_schedule.*nor flow matching"):
        schedule_from_config(dict(DDPMScheduler.from_config({"num_train_timesteps": 1000}).config))


def test_a_vp_scheduler_saved_by_recent_diffusers_stays_vp(tmp_path):
    """DPMSolverMultistepScheduler (PixArt's) writes use_dynamic_shifting: false and flow_shift: its betas decide;
    once it samples flow (use_flow_sigmas) it describes rectified flow."""
    from diffusers import DPMSolverMultistepScheduler

    DPMSolverMultistepScheduler(beta_schedule="linear").save_pretrained(tmp_path / "dpm")
    config = json.loads((tmp_path / "dpm" / "scheduler_config.json").read_text())
    assert config["use_dynamic_shifting"] is False and "flow_shift" in config
    assert isinstance(schedule_from_config(config), VPSchedule)
    assert isinstance(schedule_from_config(config | {"use_flow_sigmas": True}), FlowMatchSchedule)


def test_a_model_whose_scheduler_names_no_process_is_one_line(tiny_sd15, digits_data, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_sd15, model)
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "prediction_type": "epsilon"}))
    proc = subprocess.run([sys.executable, "launch/train.py", "recipes/demo/sd15_lora_tiny.yaml", "--dry-run",
                           f"model.pretrained={model}", f"data.source={digits_data}", f"output_dir={tmp_path}/o"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "beta_schedule" in errors[0] and "Traceback" not in proc.stderr


def test_flow_euler_in_a_vp_pipeline_takes_n_real_steps():
    """diffusers' default flow grid ends on sigma 0.001, so 2 steps sampled like 1; for_vp_pipeline gives Flux's
    grid (1, (N-1)/N, ..., 1/N, then 0, shifted as the scheduler says) and keeps sigmas a caller passes."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from trainers.schedulers import for_vp_pipeline

    plain = for_vp_pipeline(for_vp_pipeline(FlowMatchEulerDiscreteScheduler(shift=1.0)))  # wrapped once only
    plain.set_timesteps(2)
    assert plain.sigmas.tolist() == [1.0, 0.5, 0.0] and plain.timesteps.tolist() == [1000.0, 500.0]
    plain.set_timesteps(4)
    assert torch.allclose(plain.sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    shifted = for_vp_pipeline(FlowMatchEulerDiscreteScheduler(shift=3.0))
    shifted.set_timesteps(2)
    assert torch.allclose(shifted.sigmas, torch.tensor([1.0, 0.75, 0.0]))  # 3 * 0.5 / (1 + 2 * 0.5)
    shifted.set_timesteps(2, sigmas=[1.0, 0.3])
    assert torch.allclose(shifted.sigmas, torch.tensor([1.0, 3 * 0.3 / (1 + 2 * 0.3), 0.0]))
