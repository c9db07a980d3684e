"""Distribution-matching distillation, DMD2 (Yin et al. 2024): a 1-4 step generator trained against two scores.

The generator maps noise at fixed timesteps to x0: K of them, 999 then every 1000/K down on a VP teacher (what
LCMScheduler samples with original_inference_steps K); sigmas 1, (K-1)/K, ..., 1/K moved by the model's shift on a
rectified-flow one (SD3, Flux: what their Euler sampler visits in K steps). For K > 1 its input at timestep k is
made by itself (backward simulation): from pure noise it denoises and re-noises k times, without gradients, as
sampling will. Per generator update, its x0 is re-noised at a random timestep and moved along the
distribution-matching gradient, fake score minus real score in x0 space (trainers/losses.py), so the noise process
only enters through the Schedule; the real score is the frozen teacher with classifier-free guidance (Flux.1-dev,
guidance-distilled: its guidance embedding). The fake score starts as the teacher and learns the generator's own
distribution by denoising its samples; a small GAN head on the fake score's bottleneck (U-Net mid-block) features
tells real latents from generated ones, and the generator is also trained to fool it.

Two update groups (trainers/objectives/base.py UpdateGroup): the fake score with the GAN head updates at every
engine step, the generator every `fake_updates` steps (DMD2's two time-scale rule), so train.max_steps counts
fake-score updates. With LoRAs on both sides (the default) one frozen base sits in memory with two adapters:
'default' (the generator, what is exported) and 'fake'; the teacher is the base with both switched off.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from trainers import adapters, optimizers, seeding, solvers
from trainers.config import LRScheduleConfig, OptimizerConfig, ranged
from trainers.diffusion import VPSchedule
from trainers.errors import ConfigError
from trainers.losses import distribution_matching_loss, gan_discriminator_loss, gan_generator_loss
from trainers.objectives import inputs
from trainers.objectives.base import Objective, UpdateGroup, export_single_file, refuse_denoising_options

FAKE = "fake"  # the fake score's peft adapter (the generator's is peft's 'default')
# purposes of this objective's draws, beyond seeding's own
STEP_INDEX, SIMULATION, MATCH_T, MATCH_NOISE, FAKE_PHASE = (seeding.mix(0xD3D2, i) for i in range(5))
LCM_SCHEDULER = "LCMScheduler"
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"


@dataclass(frozen=True)
class DMD2Options:
    """objective.dmd2: the options of this objective (recipe section objective.dmd2)."""
    # DMD2 (Yin et al. 2024). The generator samples in `steps` steps at timesteps 999, 999 - 1000/steps, ... (VP)
    # or sigmas 1, 1 - 1/steps, ... before the shift (rectified flow);
    # train.max_steps counts fake-score updates, the generator updates every fake_updates of them.
    steps: int = ranged(4, min=1)           # K: the generator's timesteps (1: one step from pure noise)
    guidance_scale: float = ranged(4.5, min=1.0)  # the real score's CFG (diffusers' guidance_scale)
    fake_updates: int = ranged(5, min=1)    # fake-score updates per generator update
    match_t_min: float = ranged(0.02, min=0.0, max=1.0)  # the matching gradient's re-noising timesteps, as
    match_t_max: float = ranged(0.98, min=0.0, max=1.0)  # fractions of the training timesteps
    gan_generator_weight: float = ranged(5e-3, min=0.0)  # the generator's non-saturating GAN loss (0: no GAN)
    gan_discriminator_weight: float = ranged(1e-2, min=0.0)  # the head's (and fake score's) classification loss
    fake_score: Literal["lora", "full"] = "lora"  # lora: an adapter on the shared frozen base; full: a copy
    fake_rank: Optional[int] = ranged(None, min=1)  # lora: the fake adapter's rank (None: adapter.rank)
    fake_optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)  # fake score + GAN head
    fake_lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)


class DMD2(Objective):
    Options = DMD2Options
    name = "dmd2"
    exports_adapter_only = True
    ddp_find_unused_parameters = True  # each update leaves the other group's weights without a gradient

    def __init__(self, recipe, backbone):
        super().__init__(recipe, backbone)
        self.cfg = cfg = recipe.objective.dmd2
        if recipe.objective.schedule == "flow" and isinstance(backbone.schedule, VPSchedule):
            raise ConfigError(f"'objective.schedule': DMD2 reads the frozen teacher in its own noise process; this "
                              f"{backbone.family} teacher is VP diffusion: remove objective.schedule: flow")
        self.schedule = self.training_schedule()
        self.flow = self.schedule.kind == "flow"
        check_recipe(recipe, self.flow)
        self.grid = flow_sigmas(cfg.steps) if self.flow else \
            generator_timesteps(cfg.steps, self.schedule.num_train_timesteps)
        self.distilled_guidance = bool(getattr(backbone, "guidance_distilled", False))
        self.full = recipe.adapter.kind == "full"
        self.base = backbone.denoiser  # the teacher: frozen, adapters off
        targets = recipe.adapter.target_modules or backbone.lora_targets
        self.fake = copy.deepcopy(self.base).float().requires_grad_(True) if cfg.fake_score == "full" else None
        if self.full:
            self.generator = adapters.student_from(self.base, 0)
            self.base.requires_grad_(False)
        else:
            adapters.add_lora(self.base, recipe.adapter, targets)
            self.generator = self.base
        if self.fake is None:
            fake_cfg = recipe.adapter if not cfg.fake_rank else \
                dataclasses.replace(recipe.adapter, rank=cfg.fake_rank, alpha=float(cfg.fake_rank))
            self.base.requires_grad_(False)
            with warnings.catch_warnings():  # peft warns of a second adapter: two are the point here
                warnings.simplefilter("ignore", UserWarning)
                self.base.add_adapter(adapters.adapter_config(fake_cfg, targets), adapter_name=FAKE)
            for name, p in self.base.named_parameters():  # add_adapter left only the newest adapter trainable
                p.requires_grad_(".lora_" in name)
        self.layers = adapters.tuner_layers(self.base)
        adapters.set_active(self.layers, "default" if not self.full else FAKE)
        self.head = None
        if cfg.gan_generator_weight or cfg.gan_discriminator_weight:
            mid = getattr(self.fake_module, "mid_block", None)
            if mid is None or "block_out_channels" not in self.fake_module.config:  # a U-Net's (U-ViT's holds tokens)
                raise ConfigError(f"'objective.dmd2.gan_generator_weight': the GAN head reads a U-Net's mid-block "
                                  f"features; {backbone.family} has none: set both gan weights to 0")
            self.head = GanHead(feature_channels(self.fake_module))
            mid.register_forward_hook(self._keep_features)
        self._features = None

    # ---- what is trained, where it lives --------------------------------------------------------------

    @property
    def fake_module(self) -> torch.nn.Module:
        return self.fake if self.fake is not None else self.base

    def trained_modules(self):
        key = self.backbone.denoiser_key
        modules = {key: self.generator}
        if self.fake is not None:
            modules[f"fake_{key}"] = self.fake
        elif self.full:
            modules[f"fake_{key}"] = self.base
        if self.head is not None:
            modules["gan_head"] = self.head
        return modules

    def memory_modules(self):
        return {k: m for k, m in self.trained_modules().items() if k != "gan_head"}

    def to(self, device, frozen_dtype, inputs_cached: bool = False):
        trained = [m for m in (self.fake, self.head) if m is not None] + ([self.generator] if self.full else [])
        self.place(device, frozen_dtype, frozen=[self.base], trained=trained, inputs_cached=inputs_cached)
        self.autocast = (torch.autocast(self.device.type, frozen_dtype) if frozen_dtype != torch.float32
                         else contextlib.nullcontext())
        self.schedule.to(self.device)
        self.grid = self.grid.to(self.device)
        self.text = inputs.FrozenText(self.backbone, self.device, encoders_on_cpu=inputs_cached)

    def _named(self, group: str) -> dict[str, torch.nn.Parameter]:
        key = self.backbone.denoiser_key
        named = self.trainable_named_parameters()
        if group == "generator":
            return {k: p for k, p in named.items() if k.startswith(f"{key}.") and (self.full or ".default." in k)}
        return {k: p for k, p in named.items()
                if k.startswith(("gan_head.", f"fake_{key}.")) or (k.startswith(f"{key}.") and f".{FAKE}." in k)}

    @functools.cached_property
    def fake_params(self) -> list[torch.nn.Parameter]:
        """Once: every generator step (and, under checkpointing, every recomputed block) freezes these."""
        return list(self._named("fake_score").values())

    def update_groups(self):
        r, cfg = self.recipe, self.cfg
        return [UpdateGroup("generator", [{"params": list(self._named("generator").values()),
                                           "lr": r.optimizer.lr}],
                            r.optimizer, r.lr_schedule, every=cfg.fake_updates, loss=self.generator_loss),
                UpdateGroup("fake_score", [{"params": self.fake_params,
                                            "lr": cfg.fake_optimizer.lr}],
                            cfg.fake_optimizer, cfg.fake_lr_schedule, loss=self.fake_score_loss)]

    def loss(self, batch, step):
        return self.generator_loss(batch, step)

    # ---- the two losses ------------------------------------------------------------------------------

    def generator_loss(self, batch, step):
        """Distribution matching (+ GAN) on the generator's samples; gradients reach the generator only through x0."""
        cfg, seeds = self.cfg, batch["seeds"]
        cond = self.text(batch, [False] * len(seeds))
        uncond = self.text(batch, [True] * len(seeds)) if self.real_needs_uncond else None
        x0 = self.generate(self.wrapped[self.backbone.denoiser_key], cond, seeds, self.latent_shape(batch), grad=True)
        t, eps = self.match_noise(seeds, x0)
        x_t = self.schedule.add_noise(x0, eps, t)
        with torch.no_grad():
            real = self.real_x0(x_t.detach(), t, cond, uncond)
            with self.autocast, self.fake_active():
                fake = self.backbone.denoise(x_t.detach(), t, cond, self.fake_module, self.schedule)[0]
        matching = distribution_matching_loss(x0, real, fake)
        logs = {"loss": matching.detach(), "dm_loss": matching.detach()}
        loss = matching
        if cfg.gan_generator_weight:  # through the fake score and head, whose weights take no gradient here
            with self.autocast, self.fake_active(), self.fake_frozen():
                self.backbone.predict(x_t, self.schedule.model_timestep(t), cond, self.fake_module)
                logits = self.head(self.take_features())
            gan = gan_generator_loss(logits)
            loss = loss + cfg.gan_generator_weight * gan
            logs["gan_g_loss"] = gan.detach()
        return loss, logs

    def fake_score_loss(self, batch, step):
        """The fake score denoises the generator's current samples; with the GAN, its head tells them from real."""
        cfg, seeds, device = self.cfg, batch["seeds"], self.device
        cond = self.text(batch, [False] * len(seeds))
        with torch.no_grad():
            x0 = self.generate(self.generator, cond, seeds, self.latent_shape(batch), grad=False)
        fake_seeds = [seeding.mix(s, FAKE_PHASE) for s in seeds]
        t = self.schedule.sample_timesteps(fake_seeds, device, x0.shape)
        eps = seeding.randn(fake_seeds, seeding.NOISE, x0.shape[1:], device)
        x_t = self.schedule.add_noise(x0, eps, t)
        gan = self.head is not None and cfg.gan_discriminator_weight > 0
        if gan:  # real latents at the same timesteps, in the same pass
            real = self.schedule.add_noise(inputs.latents(self.backbone, batch, device),
                                           seeding.randn(fake_seeds, seeding.OFFSET, x0.shape[1:], device), t)
            x_t, t, cond = torch.cat([x_t, real]), torch.cat([t, t]), solvers.cat_kwargs(cond, cond)
        key = self.backbone.denoiser_key
        module = self.wrapped[f"fake_{key}"] if f"fake_{key}" in self.wrapped else self.wrapped[key]
        with self.fake_active():
            out = self.backbone.predict(x_t, self.schedule.model_timestep(t), cond, module).float()
        n = len(x0)
        denoising = (out[:n] - self.schedule.target(x0, eps, t[:n])).pow(2).mean()
        logs = {"fake_loss": denoising.detach()}
        loss = denoising
        if gan:
            logits = self.wrapped["gan_head"](self.take_features())
            d_loss = gan_discriminator_loss(logits[n:], logits[:n])
            loss = loss + cfg.gan_discriminator_weight * d_loss
            logs["gan_d_loss"] = d_loss.detach()
        return loss, logs

    # ---- parts -----------------------------------------------------------------------------------------

    def generate(self, generator, cond, seeds, shape, grad: bool) -> torch.Tensor:
        """x0 of the generator at each sample's drawn timestep index k, its input made by k steps of itself."""
        device, grid = self.device, self.timesteps_for(shape)
        k = seeding.randint(seeds, STEP_INDEX, len(grid), "cpu")  # on the host: no sync for its max
        levels = int(k.max())
        k = k.to(device, non_blocking=True)
        x = seeding.randn(seeds, SIMULATION, shape, device)  # pure noise at the first timestep
        with torch.no_grad(), self.autocast:
            for level in range(levels):
                t = grid[level].expand(len(x))
                x0 = self.backbone.denoise(x, t, cond, self.generator, self.schedule)[0]
                eps = seeding.randn([seeding.mix(s, level + 1) for s in seeds], SIMULATION, shape, device)
                renoised = self.schedule.add_noise(x0, eps, grid[level + 1].expand(len(x)))
                x = torch.where((k > level).view(-1, 1, 1, 1), renoised, x)
        t = grid[k]
        with torch.no_grad() if not grad else contextlib.nullcontext(), \
                self.autocast if not grad else contextlib.nullcontext():
            return self.backbone.denoise(x, t, cond, generator, self.schedule)[0]

    def timesteps_for(self, shape) -> torch.Tensor:
        """The generator's K timesteps for latents of `shape`: VP's fixed ones, or the flow sigmas moved by the
        model's shift (which, under Flux's dynamic shifting, grows with the image's token count, as in sampling)."""
        if not self.flow:
            return self.grid
        return self.schedule.shifted(self.grid, self.schedule.tokens(shape))

    def latent_shape(self, batch) -> tuple[int, int, int]:
        """(C, h, w) of the batch's latents (its bucket's size), without encoding its images."""
        if "latent_mean" in batch:
            return tuple(batch["latent_mean"].shape[1:])
        config = self.backbone.vae.config
        factor = 2 ** (len(config.block_out_channels) - 1)
        height, width = batch["pixel_values"].shape[-2:]
        return (config.latent_channels, height // factor, width // factor)

    def match_noise(self, seeds, x0):
        """The matching gradient's re-noising: a timestep in [match_t_min, match_t_max) of the schedule (VP: of its
        integer timesteps; flow: of sigma before the shift, so noise levels are spread as sampling spreads them)
        and noise."""
        noise = seeding.randn(seeds, MATCH_NOISE, x0.shape[1:], self.device)
        u = seeding.rand(seeds, MATCH_T, self.device)
        if self.flow:
            u = self.cfg.match_t_min + (self.cfg.match_t_max - self.cfg.match_t_min) * u
            return self.schedule.shifted(u, self.schedule.tokens(x0.shape)), noise
        steps = self.schedule.num_train_timesteps
        low = int(self.cfg.match_t_min * steps)
        high = max(int(self.cfg.match_t_max * steps), low + 1)
        t = (low + (high - low) * u).long().clamp(max=high - 1)
        return t, noise

    @property
    def real_needs_uncond(self) -> bool:
        return not self.distilled_guidance and self.cfg.guidance_scale != 1.0

    def real_x0(self, x_t, t, cond, uncond) -> torch.Tensor:
        """The teacher's guided x0 estimate: x0_u + g (x0_c - x0_u), cond and uncond in one pass; a
        guidance-distilled teacher (Flux.1-dev) embeds g instead, in one conditional pass."""
        with self.autocast, adapters.adapters_off(self.layers):
            if not self.real_needs_uncond:
                if self.distilled_guidance:
                    cond = dict(cond, guidance=torch.full_like(cond["guidance"], self.cfg.guidance_scale))
                return self.backbone.denoise(x_t, t, cond, self.base, self.schedule)[0]
            x0 = self.backbone.denoise(torch.cat([x_t, x_t]), torch.cat([t, t]), solvers.cat_kwargs(cond, uncond),
                                       self.base, self.schedule)[0]
        x0_c, x0_u = x0.chunk(2)
        return x0_u + self.cfg.guidance_scale * (x0_c - x0_u)

    @contextlib.contextmanager
    def fake_active(self):
        """The fake score's adapter in place of the generator's (a no-op for a full fake score)."""
        if self.fake is not None:
            yield
            return
        with adapters.active(self.layers, FAKE):
            yield

    @contextlib.contextmanager
    def fake_frozen(self):
        """A forward in which the fake score and head are constants: no gradient is computed for them (a saving),
        and DDP, which has already marked them unused in this update, never sees one arrive (it would count them
        ready twice)."""
        params = self.fake_params
        for p in params:
            p.requires_grad_(False)
        self._frozen = True
        try:
            yield
        finally:
            self._frozen = False
            for p in params:
                p.requires_grad_(True)

    def recompute_context(self):
        """Gradient checkpointing recomputes a block in backward, after these contexts have exited: it must run with
        the adapter (and frozen fake weights) it ran with forward, captured here."""
        active = self.layers[0]._active_adapter if self.layers else None
        frozen = getattr(self, "_frozen", False)

        @contextlib.contextmanager
        def as_it_ran():
            with adapters.active(self.layers, active) if active is not None else contextlib.nullcontext(), \
                    self.fake_frozen() if frozen else contextlib.nullcontext():
                yield
        return as_it_ran()

    def _keep_features(self, module, args, output):
        self._features = output

    def take_features(self) -> torch.Tensor:
        features, self._features = self._features, None
        return features

    # ---- sampling and export -------------------------------------------------------------------------

    def scheduler(self):
        """VP: LCMScheduler with original_inference_steps K: `steps` of its steps visit exactly the generator's grid
        (fewer visit a subset: 2 of a 4-step student's, 999 and 499); each step denoises and re-noises afresh.
        Flow: the model's FlowMatchEulerDiscreteScheduler with stochastic sampling (each step denoises, then
        re-noises with fresh noise), which visits the grid when given its sigmas (the card's; FluxPipeline and our
        tools pass them by default)."""
        import inspect

        import diffusers

        if self.flow:
            from trainers.schedulers import for_vp_pipeline

            cls = getattr(diffusers, FLOW_SCHEDULER)
            return for_vp_pipeline(cls.from_config(dict(self.schedule.config, stochastic_sampling=True)))
        cls = getattr(diffusers, LCM_SCHEDULER)
        config = dict(self.schedule.config, prediction_type=self.schedule.prediction_type,
                      original_inference_steps=self.cfg.steps, rescale_betas_zero_snr=False)
        known = inspect.signature(cls.__init__).parameters
        return cls.from_config({k: v for k, v in config.items() if k in known})

    def validation_pipeline(self):
        return self.backbone.pipeline(self.generator, self.backbone.text_encoders, self.scheduler())

    def export(self, out_dir: Path) -> list[Path]:
        dtype = getattr(torch, self.recipe.export.dtype)
        key = self.backbone.denoiser_key
        if self.full:
            plain = copy.deepcopy(self.generator).to(dtype)
            plain.save_pretrained(out_dir / key, safe_serialization=True)
            files = [out_dir / key]
        else:
            files = [adapters.save_lora(out_dir, self.backbone.pipeline_class(), key, self.generator, {}, dtype)]
            kohya_file = export_single_file(out_dir, {key: self.generator}, self.backbone.family, self.recipe, dtype)
            files += [kohya_file] if kohya_file else []
        self.scheduler().save_pretrained(out_dir / "scheduler")
        return [*files, out_dir / "scheduler"]

    def usage_snippet(self, where: str) -> str:
        cls = self.backbone.pipeline_class()
        pipe = cls.__name__
        lib = "diffusers" if cls.__module__.startswith("diffusers") else cls.__module__
        base, steps = self.recipe.model.pretrained, self.cfg.steps
        sched = FLOW_SCHEDULER if self.flow else LCM_SCHEDULER
        scheduler = f"{sched}.from_pretrained({where!r}, subfolder=\"scheduler\")"
        dtype = "bfloat16" if self.flow else "float16"
        if self.flow:
            sigmas = "[" + ", ".join(f"{s:g}" for s in self.grid.tolist()) + "]"
            guidance = f"{self.backbone.guidance:g}" if self.distilled_guidance else "1.0"
            call = (f"# the generator's sigmas, before the model's shift: {sigmas}; guidance is distilled in: "
                    f"guidance_scale {guidance} (no CFG pass)\n"
                    "torch.manual_seed(0)  # re-noising between steps draws from torch's generator, not the "
                    "pipeline's\n"
                    f"image = pipe(\"your prompt\", num_inference_steps={steps}, sigmas={sigmas}, "
                    f"guidance_scale={guidance}).images[0]\n")
        else:
            timesteps = ", ".join(str(int(t)) for t in self.grid.tolist())
            call = (f"# the generator's timesteps: [{timesteps}]; guidance is distilled in: guidance_scale 1 "
                    f"(no CFG pass)\nimage = pipe(\"your prompt\", num_inference_steps={steps}, "
                    f"guidance_scale=1.0).images[0]\n")
        if not self.full:
            return (f"import torch\nfrom diffusers import {sched}\nfrom {lib} import {pipe}\n\n"
                    f"pipe = {pipe}.from_pretrained({base!r}, torch_dtype=torch.{dtype}).to(\"cuda\")\n"
                    f"pipe.load_lora_weights({where!r})\npipe.scheduler = {scheduler}\n" + call)
        key, model = self.backbone.denoiser_key, type(self.generator).__name__
        return (f"import torch\nfrom diffusers import {sched}\nfrom {lib} import {pipe}, {model}\n\n"
                f"{key} = {model}.from_pretrained({where!r}, subfolder={key!r}, torch_dtype=torch.{dtype})\n"
                f"pipe = {pipe}.from_pretrained({base!r}, {key}={key}, scheduler={scheduler},\n"
                f"    torch_dtype=torch.{dtype}).to(\"cuda\")\n" + call)

    @property
    def card_tags(self):
        return ("dmd2", "distribution-matching-distillation") + (() if self.full else ("lora",))


class GanHead(torch.nn.Module):
    """DMD2's classifier branch: bottleneck features -> one logit per sample (real vs generated)."""

    def __init__(self, channels: int):
        super().__init__()
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 3, padding=1),
                                       torch.nn.GroupNorm(groups, channels), torch.nn.SiLU(),
                                       torch.nn.Conv2d(channels, 1, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float()).mean(dim=(1, 2, 3))


def feature_channels(unet) -> int:
    return unet.config.block_out_channels[-1]


def generator_timesteps(steps: int, num_train_timesteps: int) -> torch.Tensor:
    """The K timesteps LCMScheduler visits with original_inference_steps = num_inference_steps = K:
    (T/K) (K - i) - 1 for i < K, e.g. 999, 749, 499, 249."""
    stride = num_train_timesteps // steps
    return torch.arange(steps, 0, -1) * stride - 1


def flow_sigmas(steps: int) -> torch.Tensor:
    """A flow generator's K sigmas before the shift, 1, (K-1)/K, ..., 1/K: what FluxPipeline and our flow Euler
    sampler (trainers/schedulers.py for_vp_pipeline) visit in K steps."""
    return 1 - torch.arange(steps, dtype=torch.float32) / steps


def check_recipe(recipe, flow: bool = False) -> None:
    """Options that mean nothing to DMD2 are refused, not ignored."""
    cfg = recipe.objective.dmd2
    optimizers.check_group(cfg.fake_optimizer, cfg.fake_lr_schedule, recipe.train.max_steps,
                           "objective.dmd2.fake_optimizer", "objective.dmd2.fake_lr_schedule")
    if cfg.match_t_min >= cfg.match_t_max:
        raise ConfigError(f"'objective.dmd2.match_t_min' ({cfg.match_t_min}) must be below match_t_max "
                          f"({cfg.match_t_max})")
    refuse_denoising_options(recipe, "the generator matches the teacher's distribution")
    ad = recipe.adapter
    if ad.text_encoder:
        raise ConfigError("'adapter.text_encoder': DMD2 trains the denoiser only; set it false")
    if ad.kind not in ("lora", "full"):
        raise ConfigError(f"'adapter.kind': a DMD2 generator is a LoRA (exported for diffusers and kohya) or a full "
                          f"copy, not {ad.kind}")
    if ad.init_from:
        raise ConfigError("'adapter.init_from' is for fine-tuning; DMD2 starts a new LoRA")
    if recipe.memory.quantize_base != "none" and (cfg.fake_score == "full" or ad.kind == "full"):
        raise ConfigError("'memory.quantize_base' needs LoRAs on both sides (adapter.kind: lora, "
                          "objective.dmd2.fake_score: lora): a full copy is trained in float32")
    v = recipe.validation
    if v.every_steps and v.prompts:
        want = "euler" if flow else "lcm"
        if v.scheduler != want:
            raise ConfigError(f"'validation.scheduler' must be {want} for a DMD2 generator (got {v.scheduler}): it "
                              "samples at its own timesteps, denoising and re-noising")
        if v.steps > cfg.steps:
            raise ConfigError(f"'validation.steps' ({v.steps}) must be at most objective.dmd2.steps ({cfg.steps})")
