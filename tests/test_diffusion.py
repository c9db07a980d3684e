"""trainers/diffusion.py against closed forms."""
import math

import pytest
import torch

from trainers import diffusion as D


def coefs(t, kind="scaled_linear"):
    acp = D.alphas_cumprod(D.make_betas(kind, 0.00085, 0.012, 1000))
    return D.alpha_sigma(acp, torch.as_tensor(t))


def test_scaled_linear_matches_diffusers():
    from diffusers import DDPMScheduler

    s = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ours = D.alphas_cumprod(D.make_betas("scaled_linear", 0.00085, 0.012, 1000)).float()
    torch.testing.assert_close(ours, s.alphas_cumprod, rtol=1e-6, atol=1e-7)


def test_zero_terminal_snr_rescale():
    betas = D.make_betas("scaled_linear", 0.00085, 0.012, 1000)
    acp, acp0 = D.alphas_cumprod(D.rescale_zero_terminal_snr(betas)), D.alphas_cumprod(betas)
    assert acp[-1].abs() < 1e-12
    assert torch.isclose(acp[0], acp0[0])
    assert (acp[1:] < acp[:-1]).all()


def test_parameterisations_invert_exactly():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    a, s = coefs([10, 500, 990])
    z = D.add_noise(x0, eps, a, s)
    v = D.v_from_x0_eps(x0, eps, a, s)
    torch.testing.assert_close(D.x0_from_v(z, v, a, s), x0)
    torch.testing.assert_close(D.eps_from_v(z, v, a, s), eps)
    torch.testing.assert_close(D.x0_from_eps(z, eps, a, s), x0)
    torch.testing.assert_close(D.eps_from_x0(z, x0, a, s), eps)
    for kind in ("epsilon", "v_prediction", "sample"):
        out = D.target_for(kind, x0, eps, a, s)
        x0_hat, eps_hat = D.to_x0_eps(kind, out, z, a, s)
        torch.testing.assert_close(x0_hat, x0)
        torch.testing.assert_close(eps_hat, eps)


def test_ddim_step_with_true_eps_lands_on_the_forward_process():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    a_t, s_t = coefs([800, 600])
    a_s, s_s = coefs([400, 100])
    z_t = D.add_noise(x0, eps, a_t, s_t)
    x0_hat, eps_hat = D.to_x0_eps("epsilon", eps, z_t, a_t, s_t)
    torch.testing.assert_close(D.ddim_step(x0_hat, eps_hat, a_s, s_s), D.add_noise(x0, eps, a_s, s_s))


def test_ideal_denoiser_for_gaussian_data():
    """For x0 ~ N(0, c^2): E[x0 | z_t] = alpha_t c^2 / (alpha_t^2 c^2 + sigma_t^2) z_t; check by regression."""
    c, n = 0.7, 200_000
    g = torch.Generator().manual_seed(2)
    x0, eps = c * torch.randn(n, dtype=torch.float64, generator=g), torch.randn(n, dtype=torch.float64, generator=g)
    a, s = coefs(300)
    z = a * x0 + s * eps
    slope = (z * x0).mean() / (z * z).mean()
    assert slope.item() == pytest.approx((a * c**2 / (a**2 * c**2 + s**2)).item(), rel=1e-2)


def test_min_snr_weights():
    snr = torch.tensor([0.5, 5.0, 20.0])
    torch.testing.assert_close(D.min_snr_weight(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.25]))
    torch.testing.assert_close(D.min_snr_weight(snr, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21]))
    torch.testing.assert_close(D.min_snr_weight(snr, 5.0, "sample"), torch.tensor([0.5, 5.0, 5.0]))


def test_cosine_schedule_follows_its_closed_form():
    """Nichol & Dhariwal: alphas_cumprod(t) = f(t) / f(0) with f(t) = cos((t/T + s) / (1 + s) * pi/2)^2."""
    betas = D.make_betas("squaredcos_cap_v2", 0, 0, 1000)
    assert betas.max() <= 0.999 and (betas > 0).all()
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    acp = D.alphas_cumprod(betas)
    assert acp[499].item() == pytest.approx(f(500) / f(0), rel=1e-9)
