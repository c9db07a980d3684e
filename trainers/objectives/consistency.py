"""Latent consistency distillation (Luo et al. 2023, Algorithm 1): LCM-LoRA and full LCM students.

Per sample: a grid point t = t_{n+k} of N teacher timesteps and a guidance scale omega; z_t from the forward
process; the frozen teacher, guided by omega, solves the ODE from t to s = t_n (trainers/solvers.py); the loss
is d(f_student(z_t, t), f_target(z_hat_s, s)) with the consistency function f = c_skip z + c_out x0_hat, which
is the identity at t = 0. Guidance follows the paper: eps_c + omega (eps_c - eps_u) (diffusers'
guidance_scale is omega + 1).

LCM-LoRA keeps one denoiser in memory: the teacher is it with the adapters switched off, the student is it
with them on, and the target is the student without gradient (or an EMA of the LoRA weights). A full student
is a float32 copy of the teacher with an omega embedding (time_cond_proj_dim, zero-initialised so it starts as
the teacher); its target is an EMA of it, and the teacher stays frozen beside it.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from trainers import adapters, diffusion, kohya, seeding, solvers
from trainers.ema import EMA
from trainers.config import ranged
from trainers.errors import ConfigError
from trainers.objectives import inputs
from trainers.objectives.base import Objective, refuse_denoising_options

LCM_SCHEDULER = "LCMScheduler"


@dataclass(frozen=True)
class ConsistencyOptions:
    """objective.consistency: the options of this objective (recipe section objective.consistency)."""
    # Latent consistency distillation (Luo et al. 2023, Algorithm 1). Guidance uses the paper's omega:
    # eps_c + omega * (eps_c - eps_u); a diffusers pipeline's guidance_scale is omega + 1.
    num_teacher_timesteps: int = ranged(50, min=2)  # N: the solver grid over the training timesteps (50 of 1000)
    skip: int = ranged(1, min=1)            # k: grid steps the teacher's solver jumps per loss term
    solver: Literal["ddim", "dpmpp_2m", "euler"] = "ddim"  # the teacher's ODE solver Psi (dpmpp_2m: k sub-steps)
    omega_min: float = ranged(5.0, min=0.0)  # guidance drawn uniformly in [omega_min, omega_max] per sample
    omega_max: float = ranged(15.0, min=0.0)
    distance: Literal["huber", "l2"] = "huber"  # pseudo-Huber sqrt(d^2 + c^2) - c, or squared L2
    huber_c: float = ranged(0.001, min=0.0)
    sigma_data: float = ranged(0.5, min=0.0)  # c_skip/c_out; stock LCMScheduler samples with 0.5
    timestep_scaling: float = ranged(10.0, min=0.0)  # c_skip/c_out see t * this (LCMScheduler's timestep_scaling)
    target: Optional[Literal["student", "ema"]] = None  # None: student (stop-gradient) for LoRA, ema for full
    target_ema_decay: float = ranged(0.95, min=0.0, max=1.0)  # with target: ema
    guidance_embedding_dim: int = ranged(256, min=0)  # full LCM: omega embedding size (U-Net time_cond_proj_dim); 0: none


class Consistency(Objective):
    Options = ConsistencyOptions
    name = "consistency"
    exports_adapter_only = True

    def __init__(self, recipe, backbone):
        super().__init__(recipe, backbone)
        self.cfg = cfg = recipe.objective.consistency
        check_recipe(recipe)
        self.schedule = self.training_schedule(vp_only="solves a discrete VP teacher's ODE on its timestep grid")
        steps = self.schedule.num_train_timesteps
        if cfg.num_teacher_timesteps > steps:
            raise ConfigError(f"'objective.consistency.num_teacher_timesteps' must be at most the model's "
                              f"{steps} training timesteps, got {cfg.num_teacher_timesteps}")
        self.stride = steps // cfg.num_teacher_timesteps
        self.grid = torch.arange(1, cfg.num_teacher_timesteps + 1) * self.stride - 1  # LCMScheduler's timesteps
        self.full = recipe.adapter.kind == "full"
        self.teacher = backbone.denoiser
        if self.full:
            self.student = adapters.student_from(self.teacher, cfg.guidance_embedding_dim,
                                                 "objective.consistency.guidance_embedding_dim")
            self.lora = []
        else:
            adapters.add_lora(self.teacher, recipe.adapter, recipe.adapter.target_modules or backbone.lora_targets)
            self.student = self.teacher
            self.lora = adapters.tuner_layers(self.student)
        self.target_kind = cfg.target or ("ema" if self.full else "student")

    # ---- what is trained, where it lives --------------------------------------------------------------

    def trained_modules(self):
        return {self.backbone.denoiser_key: self.student}

    def to(self, device, frozen_dtype, inputs_cached: bool = False):
        self.place(device, frozen_dtype, frozen=[self.teacher], trained=[self.student] if self.full else [],
                   inputs_cached=inputs_cached)  # a LoRA student is the teacher: only its LoRA weights go float32
        self.autocast = (torch.autocast(self.device.type, frozen_dtype) if frozen_dtype != torch.float32
                         else contextlib.nullcontext())
        self.schedule.to(self.device)
        self.grid = self.grid.to(self.device)
        self.text = inputs.FrozenText(self.backbone, self.device, encoders_on_cpu=inputs_cached)
        self.target_ema = None
        if self.target_kind == "ema":
            self.target_ema = EMA(self.trainable_named_parameters(), self.cfg.target_ema_decay)
        self.target = self.student
        if self.full and self.target_ema is not None:  # a module whose weights are the EMA's own tensors
            self.target = copy.deepcopy(self.student).requires_grad_(False)
            key = self.backbone.denoiser_key
            for name, p in self.target.named_parameters():
                p.data = self.target_ema.shadow[f"{key}.{name}"]

    def after_step(self, finite):
        if self.target_ema is not None:
            self.target_ema.update(keep=finite)

    def state_for_checkpoint(self):
        return self.target_ema.state_dict() if self.target_ema is not None else {}

    def load_checkpoint_state(self, state):
        if self.target_ema is not None:
            self.target_ema.load_state_dict(state)

    # ---- the loss ------------------------------------------------------------------------------------

    def loss(self, batch, step):
        cfg, seeds, device = self.cfg, batch["seeds"], self.device
        x0 = inputs.latents(self.backbone, batch, device)
        cond, uncond = self.text.pair(batch)
        n = seeding.randint(seeds, seeding.TIMESTEP, cfg.num_teacher_timesteps, device)
        t = self.grid[n]
        s = (t - cfg.skip * self.stride).clamp(min=0)
        omega = cfg.omega_min + (cfg.omega_max - cfg.omega_min) * seeding.rand(seeds, seeding.GUIDANCE, device)
        eps = seeding.randn(seeds, seeding.NOISE, x0.shape[1:], device)
        z_t = self.schedule.add_noise(x0, eps, t)
        student_cond = self.student_condition(cond, omega)
        per_sample = consistency_loss(
            student=self.x0_fn(self.wrapped[self.backbone.denoiser_key], student_cond),
            target=self.x0_fn(self.target, student_cond, frozen=True),
            teacher=self.guided_teacher(cond, uncond, omega), z_t=z_t, t=t, s=s, schedule=self.schedule, cfg=cfg)
        loss = per_sample.mean()
        return loss, {"loss": loss.detach()}

    def x0_fn(self, denoiser, cond, frozen: bool = False):
        """(z, t) -> x0_hat of a denoiser; frozen: the target pass, in the compute dtype with the target's weights."""
        def x0_hat(z, t):
            with self.autocast if frozen else contextlib.nullcontext(), \
                    self.target_weights() if frozen else contextlib.nullcontext():
                return self.backbone.denoise(z, t, cond, denoiser, self.schedule)[0]
        return x0_hat

    def guided_teacher(self, cond, uncond, omega):
        """(z, t) -> guided (x0_hat, eps_hat) of the frozen teacher; cond and uncond run as one batch."""
        def pair(z, t, kwargs):
            with self.autocast, adapters.adapters_off(self.lora):
                return self.backbone.denoise(z, t, kwargs, self.teacher, self.schedule)
        return solvers.guided_teacher(pair, cond, uncond, omega)

    def student_condition(self, cond, omega):
        if self.full and self.cfg.guidance_embedding_dim:
            return {**cond, "timestep_cond": diffusion.guidance_embedding(omega, self.cfg.guidance_embedding_dim)}
        return cond

    @contextlib.contextmanager
    def target_weights(self):
        """LoRA with an EMA target: the EMA's tensors stand in for the LoRA weights during the target pass."""
        if self.full or self.target_ema is None:
            yield
            return
        with adapters.swapped_in(self.target_ema.params, self.target_ema.shadow):
            yield

    # ---- sampling and export -------------------------------------------------------------------------

    def scheduler_config(self) -> dict:
        """LCMScheduler settings that sample exactly the grid and scalings the student was trained on."""
        return dict(self.schedule.config, prediction_type=self.schedule.prediction_type,
                    original_inference_steps=self.cfg.num_teacher_timesteps,
                    timestep_scaling=self.cfg.timestep_scaling, rescale_betas_zero_snr=False)

    def lcm_scheduler(self):
        import inspect

        import diffusers

        cls = getattr(diffusers, LCM_SCHEDULER)
        known = inspect.signature(cls.__init__).parameters  # DDPM's variance_type etc. would only warn
        return cls.from_config({k: v for k, v in self.scheduler_config().items() if k in known})

    def validation_pipeline(self):
        return self.backbone.pipeline(self.student, self.backbone.text_encoders, self.lcm_scheduler())

    def export(self, out_dir: Path) -> list[Path]:
        dtype = getattr(torch, self.recipe.export.dtype)
        if self.full:
            key = self.backbone.denoiser_key
            self.student.to(dtype).save_pretrained(out_dir / key, safe_serialization=True)
            self.student.float()
            files = [out_dir / key]
        else:
            files = [adapters.save_lora(out_dir, self.backbone.pipeline_class(), self.backbone.denoiser_key,
                                        self.student, {}, dtype)]
            kohya_file = kohya.export_trained(out_dir, self.trained_modules(), self.backbone.family, self.recipe, dtype)
            files += [kohya_file] if kohya_file else []
        self.lcm_scheduler().save_pretrained(out_dir / "scheduler")
        return [*files, out_dir / "scheduler"]

    def usage_snippet(self, where: str) -> str:
        cls = self.backbone.pipeline_class()
        pipe = cls.__name__
        lib = "diffusers" if cls.__module__.startswith("diffusers") else cls.__module__
        base = self.recipe.model.pretrained
        scheduler = f"LCMScheduler.from_pretrained({where!r}, subfolder=\"scheduler\")"
        if not self.full:
            return (f"import torch\nfrom diffusers import LCMScheduler\nfrom {lib} import {pipe}\n\n"
                    f"pipe = {pipe}.from_pretrained({base!r}, torch_dtype=torch.float16).to(\"cuda\")\n"
                    f"pipe.load_lora_weights({where!r})\npipe.scheduler = {scheduler}\n"
                    "# 1-8 steps; guidance is distilled in, so guidance_scale 1 (no CFG pass) to 2\n"
                    f"image = pipe(\"your prompt\", num_inference_steps=4, guidance_scale=1.0).images[0]\n")
        key, model = self.backbone.denoiser_key, type(self.student).__name__
        omega = (self.cfg.omega_min + self.cfg.omega_max) / 2
        guidance = ("# the student embeds omega = guidance_scale - 1 (trained on "
                    f"[{self.cfg.omega_min:g}, {self.cfg.omega_max:g}]) and runs no CFG pass\n"
                    f"image = pipe(\"your prompt\", num_inference_steps=4, guidance_scale={omega + 1:g}).images[0]\n"
                    if self.cfg.guidance_embedding_dim else
                    "image = pipe(\"your prompt\", num_inference_steps=4, guidance_scale=1.0).images[0]\n")
        return (f"import torch\nfrom diffusers import LCMScheduler\nfrom {lib} import {pipe}, {model}\n\n"
                f"{key} = {model}.from_pretrained({where!r}, subfolder={key!r}, torch_dtype=torch.float16)\n"
                f"pipe = {pipe}.from_pretrained({base!r}, {key}={key}, scheduler={scheduler},\n"
                f"    torch_dtype=torch.float16).to(\"cuda\")\n" + guidance)

    @property
    def card_tags(self):
        return ("lcm", "lcm-lora", "lora") if not self.full else ("lcm", "consistency-distillation")


def consistency_loss(student, target, teacher: solvers.Denoise, z_t, t, s, schedule, cfg) -> torch.Tensor:
    """(B,) d(f_student(z_t, t), f_target(Psi_teacher(z_t, t -> s), s)): the LCD loss of one batch.

    student and target map (z, t) to x0_hat; the teacher and the target run without gradients.
    """
    with torch.no_grad():
        z_s = solvers.solve(teacher, z_t, t, s, schedule, cfg.solver, cfg.skip if cfg.solver == "dpmpp_2m" else 1)
        f_target = consistency_fn(target, z_s, s, cfg)
    f_student = consistency_fn(student, z_t, t, cfg)
    if cfg.distance == "huber":
        return diffusion.pseudo_huber(f_student, f_target, cfg.huber_c)
    return (f_student.float() - f_target.float()).pow(2).flatten(1).mean(1)


def consistency_fn(x0_hat, z, t, cfg) -> torch.Tensor:
    """f(z, t) = c_skip(t) z + c_out(t) x0_hat(z, t)."""
    c_skip, c_out = diffusion.consistency_scalings(t, cfg.sigma_data, cfg.timestep_scaling)
    return diffusion._b(c_skip, z) * z + diffusion._b(c_out, z) * x0_hat(z, t)


def check_recipe(recipe) -> None:
    """Options that mean nothing to consistency distillation are refused, not ignored."""
    cfg = recipe.objective.consistency
    if cfg.omega_min > cfg.omega_max:
        raise ConfigError(f"'objective.consistency.omega_min' ({cfg.omega_min}) is above omega_max ({cfg.omega_max})")
    if cfg.skip >= cfg.num_teacher_timesteps:
        raise ConfigError(f"'objective.consistency.skip' must be below num_teacher_timesteps "
                          f"({cfg.num_teacher_timesteps}), got {cfg.skip}")
    refuse_denoising_options(recipe, "the student learns the teacher's guided ODE")
    if recipe.adapter.text_encoder:
        raise ConfigError("'adapter.text_encoder': consistency distillation trains the denoiser only; set it false")
    if recipe.adapter.lycoris:
        raise ConfigError(f"'adapter.kind': an LCM-LoRA is exported as a LoRA that diffusers loads; {recipe.adapter.kind} "
                          "is not one: use lora, dora or full")
    if recipe.adapter.init_from:
        raise ConfigError("'adapter.init_from' is for fine-tuning; consistency distillation starts a new LoRA")
    v = recipe.validation
    if v.every_steps and v.prompts and v.scheduler != "lcm":
        raise ConfigError(f"'validation.scheduler' must be lcm for a consistency student (got {v.scheduler}): other "
                          "samplers treat it as an ordinary denoiser")
    if cfg.sigma_data != 0.5:
        print(f"warning: objective.consistency.sigma_data {cfg.sigma_data}: stock LCMScheduler samples with 0.5, "
              "so the export needs a scheduler that uses yours")

