"""Diffusion math as pure functions of tensors: schedules, parameterisations, SNR weights, the DDIM step.

Notation follows Salimans & Ho (2022) and Kingma et al. (2021): z_t = alpha_t * x0 + sigma_t * eps with
alpha_t**2 + sigma_t**2 == 1 (variance preserving), SNR(t) = alpha_t**2 / sigma_t**2. Coefficients of shape
(B,) broadcast against (B, C, H, W) tensors through `_b`.
"""
from __future__ import annotations

import abc
import math

import torch

from trainers import seeding


def make_betas(schedule: str, beta_start: float, beta_end: float, num_timesteps: int) -> torch.Tensor:
    """Beta schedules as diffusers names them (float64 for exact alphas_cumprod)."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    if schedule == "scaled_linear":  # Stable Diffusion's: linear in sqrt(beta)
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    if schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal (2021) cosine schedule
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        t = torch.arange(num_timesteps, dtype=torch.float64)
        return torch.tensor([min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), 0.999) for i in t.tolist()],
                            dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {schedule!r}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2024), Algorithm 1: shift and scale sqrt(alphas_cumprod) so the last step has SNR 0."""
    sqrt_acp = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_acp[0].clone(), sqrt_acp[-1].clone()
    sqrt_acp = (sqrt_acp - last) * first / (first - last)
    acp = sqrt_acp**2
    alphas = torch.cat([acp[:1], acp[1:] / acp[:-1]])
    return 1 - alphas


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1 - betas, 0)


def alpha_sigma(acp: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t = sqrt(acp[t]), sigma_t = sqrt(1 - acp[t]) for integer timesteps t; t = -1 is clean data (1, 0),
    where a DDIM sampler with set_alpha_to_one ends."""
    acp = acp.to(t.device)
    a = torch.where(t >= 0, acp[t.clamp(min=0)], torch.ones((), dtype=acp.dtype, device=acp.device))
    return a.sqrt(), (1 - a).sqrt()


def _b(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample coefficient (B,) against x (B, ...), in x's dtype."""
    return coef.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def add_noise(x0: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """The forward process z_t = alpha_t x0 + sigma_t eps."""
    return _b(alpha_t, x0) * x0 + _b(sigma_t, x0) * eps


def v_from_x0_eps(x0, eps, alpha_t, sigma_t):
    """v-target of Salimans & Ho (2022); with alpha_t**2 + sigma_t**2 == 1 it inverts exactly."""
    return _b(alpha_t, x0) * eps - _b(sigma_t, x0) * x0


def x0_from_v(z_t, v, alpha_t, sigma_t):
    return _b(alpha_t, z_t) * z_t - _b(sigma_t, z_t) * v


def eps_from_v(z_t, v, alpha_t, sigma_t):
    return _b(sigma_t, z_t) * z_t + _b(alpha_t, z_t) * v


def x0_from_eps(z_t, eps, alpha_t, sigma_t):
    return (z_t - _b(sigma_t, z_t) * eps) / _b(alpha_t, z_t)


def eps_from_x0(z_t, x0, alpha_t, sigma_t):
    return (z_t - _b(alpha_t, z_t) * x0) / _b(sigma_t, z_t)


def target_for(prediction_type: str, x0, eps, alpha_t, sigma_t) -> torch.Tensor:
    """What a model of `prediction_type` should output for z_t made from (x0, eps)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return v_from_x0_eps(x0, eps, alpha_t, sigma_t)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def to_x0_eps(prediction_type: str, model_output, z_t, alpha_t, sigma_t):
    """Convert any parameterisation to (x0_hat, eps_hat), so samplers see one kind of model."""
    if prediction_type == "epsilon":
        return x0_from_eps(z_t, model_output, alpha_t, sigma_t), model_output
    if prediction_type == "v_prediction":
        return x0_from_v(z_t, model_output, alpha_t, sigma_t), eps_from_v(z_t, model_output, alpha_t, sigma_t)
    if prediction_type == "sample":
        return model_output, eps_from_x0(z_t, model_output, alpha_t, sigma_t)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def snr(alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    return alpha_t**2 / sigma_t**2


def min_snr_weight(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023) for an MSE on the model's own target.

    On x0 the weight is min(SNR, gamma); an eps-MSE already carries a factor SNR, a v-MSE a factor SNR + 1,
    so those divide it out.
    """
    clipped = torch.clamp(snr_t, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr_t
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1)
    return clipped


def ddim_step(x0_hat, eps_hat, alpha_s, sigma_s):
    """Deterministic DDIM step (Song et al. 2021, eta=0) to time s: z_s = alpha_s x0_hat + sigma_s eps_hat."""
    return add_noise(x0_hat, eps_hat, alpha_s, sigma_s)


def offset_noise(eps: torch.Tensor, offset: torch.Tensor, strength: float) -> torch.Tensor:
    """Offset noise (Guttenberg 2023): a per-sample, per-channel constant added to eps; offset is (B, C)."""
    return eps + strength * offset.to(eps.dtype)[..., None, None]


def consistency_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """(c_skip, c_out) of a consistency function f = c_skip z + c_out x0_hat (Song et al. 2023, LCM).

    Timesteps are scaled first, as diffusers' LCMScheduler does; c_skip(0) = 1 and c_out(0) = 0, so f is
    the identity at t = 0 (the boundary condition) and close to x0_hat a few timesteps above it.
    """
    scaled = t.double() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip.float(), c_out.float()


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """(B,) mean of sqrt((a - b)**2 + c**2) - c: L2-like for |a - b| >> c, quadratic and gentle below it."""
    return ((a.float() - b.float()).pow(2) + c * c).sqrt().sub(c).flatten(1).mean(1)


def guidance_embedding(omega: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, dim) sinusoidal features of the guidance scale omega (scaled by 1000, like a timestep).

    The same features diffusers' pipelines feed a U-Net with time_cond_proj_dim, from guidance_scale - 1.
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=omega.device) * -(math.log(10000.0) / (half - 1)))
    args = omega.float()[:, None] * 1000.0 * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def progressive_target(z_t, z_s, alpha_t, sigma_t, alpha_s, sigma_s) -> torch.Tensor:
    """x_tilde such that one DDIM step from z_t with x0_hat = x_tilde lands on z_s (Salimans & Ho 2022, Alg. 2).

    Solves z_s = alpha_s x + (sigma_s / sigma_t) (z_t - alpha_t x) for x; at s = -1 (sigma_s = 0) it is z_s.
    """
    ratio = _b(sigma_s / sigma_t, z_t)
    return (z_s - ratio * z_t) / (_b(alpha_s, z_t) - ratio * _b(alpha_t, z_t))


# ---- the noise process as one seam ---------------------------------------------------------------------------

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FLOW_SAMPLERS = ("uniform", "logit_normal", "mode")
FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


class Schedule(abc.ABC):
    """A backbone's noise process: how data becomes x_t, what the model predicts, how to read it back.

    Both kinds write x_t = alpha_t x0 + sigma_t eps, so objectives and solvers see one pair of coefficients:
    VP has alpha_t**2 + sigma_t**2 = 1 on integer timesteps; flow matching has alpha_t = 1 - t, sigma_t = t
    on t in [0, 1]. `model_timestep` is what the denoiser is called with.
    """

    kind = ""
    prediction_type = ""
    num_train_timesteps = 1000

    @abc.abstractmethod
    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) per sample."""

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return add_noise(x0, eps, *self.alpha_sigma(t))

    @abc.abstractmethod
    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model should output at x_t made from (x0, eps)."""

    @abc.abstractmethod
    def to_x0_eps(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """(x0_hat, eps_hat) from a model output, so solvers and losses see one kind of model."""

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self.alpha_sigma(t)
        return snr(alpha, sigma)

    @abc.abstractmethod
    def loss_weight(self, t: torch.Tensor, snr_gamma: float | None = None) -> torch.Tensor | None:
        """Per-sample weight of the MSE on the model's own target, or None for an unweighted mean."""

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        return t

    @abc.abstractmethod
    def sample_timesteps(self, seeds: list[int], device, latent_shape=None) -> torch.Tensor:
        """One training timestep per sample, drawn from its seed (so a resumed run draws the same); latent_shape
        (..., h, w) is what a resolution-dependent shift reads."""

    def at_train_timesteps(self, indices: torch.Tensor) -> torch.Tensor:
        """The schedule's t at integer training timesteps 0..num_train_timesteps-1 (a recipe's fixed ones)."""
        return indices

    @abc.abstractmethod
    def sampling_scheduler(self):
        """The diffusers scheduler that samples this process, for validation grids and exports."""

    def to(self, device) -> "Schedule":
        return self


class VPSchedule(Schedule):
    """Discrete variance-preserving diffusion (DDPM): betas -> alphas_cumprod on integer timesteps 0..T-1.

    t = -1 stands for clean data (alpha 1, sigma 0), where DDIM with set_alpha_to_one ends.
    """

    kind = "vp"

    def __init__(self, betas: torch.Tensor, prediction_type: str = "epsilon", config: dict | None = None,
                 zero_terminal_snr: bool = False):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction_type!r}")
        self.prediction_type, self.zero_terminal_snr = prediction_type, zero_terminal_snr
        self.config = dict(config or {})
        self.acp = alphas_cumprod(betas).float()
        self.num_train_timesteps = len(betas)

    @classmethod
    def from_config(cls, config: dict, prediction_type: str | None = None, zero_terminal_snr: bool = False):
        """From a diffusers scheduler config: its betas (trained or named schedule), optionally rescaled to
        zero terminal SNR (Lin et al. 2024), and its prediction type unless one is given."""
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
        else:
            betas = make_betas(config.get("beta_schedule", "linear"), config.get("beta_start", 0.0001),
                               config.get("beta_end", 0.02), config.get("num_train_timesteps", 1000))
        if zero_terminal_snr or config.get("rescale_betas_zero_snr"):
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas, prediction_type or config.get("prediction_type", "epsilon"), config, zero_terminal_snr)

    def configured(self, prediction_type: str | None = None, zero_terminal_snr: bool = False) -> "VPSchedule":
        """The same process with a recipe's parameterisation and terminal-SNR choice."""
        if not prediction_type and not zero_terminal_snr:
            return self
        return VPSchedule.from_config(self.config, prediction_type or self.prediction_type, zero_terminal_snr)

    def to(self, device) -> "VPSchedule":
        self.acp = self.acp.to(device)
        return self

    def alpha_sigma(self, t):
        return alpha_sigma(self.acp, t)

    def target(self, x0, eps, t):
        return target_for(self.prediction_type, x0, eps, *self.alpha_sigma(t))

    def to_x0_eps(self, output, x_t, t):
        return to_x0_eps(self.prediction_type, output, x_t, *self.alpha_sigma(t))

    def loss_weight(self, t, snr_gamma=None):
        """Min-SNR-gamma (Hang et al. 2023) when snr_gamma is set; else None (all timesteps alike)."""
        if not snr_gamma:
            return None
        return min_snr_weight(self.snr(t).clamp(min=1e-12), snr_gamma, self.prediction_type)

    def sample_timesteps(self, seeds, device, latent_shape=None):
        return seeding.randint(seeds, seeding.TIMESTEP, self.num_train_timesteps, device)

    def sampling_config(self) -> dict:
        """The training process as an exported model samples it: its parameterisation, and with zero terminal
        SNR the rescaled betas and trailing timesteps that reach SNR 0."""
        cfg = dict(self.config, prediction_type=self.prediction_type)
        if self.zero_terminal_snr:
            cfg |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
        return cfg

    def sampling_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.sampling_config())


class FlowMatchSchedule(Schedule):
    """Rectified flow (Liu et al. 2022; SD3, Esser et al. 2024): x_t = (1 - t) x0 + t eps on t in [0, 1],
    the model predicts the velocity eps - x0, and the denoiser sees t * num_train_timesteps.

    Training draws t from `sampler` (SD3 section 3.1: uniform, logit-normal, mode with heavy tails), then moves it
    by the shift t' = s t / (1 + (s - 1) t) (SD3 section 5.3.2), or with dynamic shifting (Flux) by a shift that
    grows with the image's token count.
    """

    kind = "flow"
    prediction_type = "flow"

    def __init__(self, shift: float = 1.0, num_train_timesteps: int = 1000, config: dict | None = None,
                 sampler: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29, weighting: str = "none", dynamic_shift: bool = False,
                 base_shift: float = 0.5, max_shift: float = 1.15, base_seq_len: int = 256, max_seq_len: int = 4096,
                 patch_size: int = 1):
        if sampler not in FLOW_SAMPLERS:
            raise ValueError(f"unknown flow timestep sampler {sampler!r}; known: {', '.join(FLOW_SAMPLERS)}")
        if weighting not in FLOW_WEIGHTINGS:
            raise ValueError(f"unknown flow loss weighting {weighting!r}; known: {', '.join(FLOW_WEIGHTINGS)}")
        self.shift, self.num_train_timesteps, self.config = shift, num_train_timesteps, dict(config or {})
        self.sampler, self.logit_mean, self.logit_std, self.mode_scale = sampler, logit_mean, logit_std, mode_scale
        self.weighting, self.dynamic_shift = weighting, dynamic_shift
        self.base_shift, self.max_shift, self.base_seq_len, self.max_seq_len = base_shift, max_shift, base_seq_len, max_seq_len
        self.patch_size = patch_size  # latent pixels per token side: an image's token count for dynamic shifting

    @classmethod
    def from_config(cls, config: dict, **options):
        return cls(shift=config.get("shift", 1.0), num_train_timesteps=config.get("num_train_timesteps", 1000),
                   config=config, dynamic_shift=bool(config.get("use_dynamic_shifting", False)),
                   base_shift=config.get("base_shift", 0.5), max_shift=config.get("max_shift", 1.15),
                   base_seq_len=config.get("base_image_seq_len", 256),
                   max_seq_len=config.get("max_image_seq_len", 4096), **options)

    def alpha_sigma(self, t):
        t = t.float()
        return 1 - t, t

    def target(self, x0, eps, t):
        return eps - x0

    def to_x0_eps(self, output, x_t, t):
        """x0 = x_t - t v and eps = x_t + (1 - t) v for velocity v = eps - x0."""
        return x_t - _b(t.float(), x_t) * output, x_t + _b(1 - t.float(), x_t) * output

    def loss_weight(self, t, snr_gamma=None):
        """SD3's weightings of the velocity MSE (diffusers' compute_loss_weighting_for_sd3); None: unweighted."""
        if self.weighting == "sigma_sqrt":
            return t.float().clamp(min=1e-6) ** -2.0
        if self.weighting == "cosmap":
            t = t.float()
            return 2 / (math.pi * (1 - 2 * t + 2 * t**2))
        return None

    def model_timestep(self, t):
        return t * self.num_train_timesteps

    def mu(self, seq_len: int) -> float:
        """Flux's log-shift for an image of seq_len tokens: linear from base_shift at base_seq_len to max_shift."""
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return self.base_shift + slope * (seq_len - self.base_seq_len)

    def shifted(self, t: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
        """t moved toward noise: s t / (1 + (s - 1) t), with s = exp(mu(seq_len)) under dynamic shifting."""
        s = math.exp(self.mu(seq_len)) if self.dynamic_shift and seq_len is not None else self.shift
        return s * t / (1 + (s - 1) * t)

    def density(self, t: torch.Tensor) -> torch.Tensor:
        """The sampler's density over unshifted t (the logit-normal pi_ln of SD3 eq. 19; 1 for uniform)."""
        if self.sampler == "logit_normal":
            logit = torch.log(t / (1 - t))
            return (torch.exp(-(logit - self.logit_mean) ** 2 / (2 * self.logit_std**2))
                    / (self.logit_std * math.sqrt(2 * math.pi) * t * (1 - t)))
        if self.sampler == "uniform":
            return torch.ones_like(t)
        raise ValueError("the mode sampler's density has no closed form (its map from u cannot be inverted in "
                         "closed form); only uniform and logit_normal have one")

    def from_uniform(self, u: torch.Tensor | None, normal: torch.Tensor | None) -> torch.Tensor:
        """Unshifted t from a uniform draw u (uniform, mode) or a standard normal one (logit_normal)."""
        if self.sampler == "logit_normal":
            return torch.sigmoid(self.logit_mean + self.logit_std * normal)
        if self.sampler == "mode":
            return 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u

    def sample_timesteps(self, seeds, device, latent_shape=None):
        normal = self.sampler == "logit_normal"  # one draw per sample, of the kind the sampler maps
        u = None if normal else seeding.rand(seeds, seeding.TIMESTEP, device)
        z = seeding.randn(seeds, seeding.TIMESTEP, (), device) if normal else None
        return self.shifted(self.from_uniform(u, z), self.tokens(latent_shape)).clamp(1e-5, 1 - 1e-5)

    def tokens(self, latent_shape) -> int | None:
        if latent_shape is None:
            return None
        h, w = latent_shape[-2:]
        return (h // self.patch_size) * (w // self.patch_size)

    def at_train_timesteps(self, indices):
        return indices.float() / self.num_train_timesteps

    def configured(self, **options) -> "FlowMatchSchedule":
        """The same process with a recipe's sampler, weighting or static shift (a shift turns dynamic shifting off)."""
        kw = {k: getattr(self, k) for k in ("shift", "num_train_timesteps", "config", "sampler", "logit_mean",
                                             "logit_std", "mode_scale", "weighting", "dynamic_shift", "base_shift",
                                             "max_shift", "base_seq_len", "max_seq_len", "patch_size")}
        if options.get("shift") is not None:
            kw["dynamic_shift"] = False
            kw["config"] = dict(self.config, shift=options["shift"], use_dynamic_shifting=False)
        return FlowMatchSchedule(**kw | {k: v for k, v in options.items() if v is not None})

    def sampling_scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.config)


BETA_FIELDS = ("beta_schedule", "trained_betas")
FLOW_FIELDS = ("shift", "use_dynamic_shifting")


def schedule_from_config(config: dict, patch_size: int = 1) -> Schedule:
    """The Schedule a diffusers scheduler config describes, read from the fields its file named.

    diffusers fills absent fields with defaults when a scheduler class loads a config (and lists them in
    `_use_default_values`): a flow-matching file read as DDPMScheduler gains linear betas. Only fields the
    file itself named count here, so such a config is flow matching, and one naming neither is refused. A VP
    scheduler saved by recent diffusers names flow fields too (DPMSolverMultistepScheduler writes
    `use_dynamic_shifting: false` and `flow_shift`): its betas decide, unless it samples flow (`use_flow_sigmas`).
    """
    from trainers.errors import UserError

    defaulted = set(config.get("_use_default_values", ()))
    named = lambda key: key in config and key not in defaulted and config[key] is not None  # noqa: E731
    name = str(config.get("_class_name", ""))
    if name.startswith("FlowMatch") or config.get("use_flow_sigmas") is True:
        return FlowMatchSchedule.from_config(config, patch_size=patch_size)
    if any(named(k) for k in BETA_FIELDS):
        return VPSchedule.from_config(config)
    if any(named(k) for k in FLOW_FIELDS):
        return FlowMatchSchedule.from_config(config, patch_size=patch_size)
    raise UserError(f"scheduler config{f' ({name})' if name else ''}: names neither betas "
                    f"({' or '.join(BETA_FIELDS)}) nor flow matching (a FlowMatch* scheduler, {' or '.join(FLOW_FIELDS)}), "
                    "so the model's noise process is unknown; add 'beta_schedule' (e.g. scaled_linear) to its "
                    "scheduler/scheduler_config.json")
