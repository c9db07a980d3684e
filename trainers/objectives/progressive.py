"""Progressive distillation (Salimans & Ho 2022), with guided distillation for CFG models (Meng et al. 2023).

A stage trains a student that takes N DDIM steps to land where its teacher lands in 2N: on the student's grid
(the timesteps diffusers' DDIMScheduler visits with trailing spacing, t -> t - T//N, the last step to clean data),
the frozen teacher takes two DDIM steps t -> m -> s and the student regresses the x_tilde that makes its one step
from z_t land on the teacher's z_s, weighted by the truncated SNR max(SNR_t, 1). Stages halve N from
`teacher_steps / 2` to `student_steps`; at each stage boundary the student's weights become the teacher's.
train.max_steps is split evenly over the stages, so the stage of a step is a pure function of it and a run
resumes inside any stage (the current teacher is in the checkpoint).

Guided: a first stage distils the classifier-free-guided teacher (omega drawn per sample) into a student with an
omega embedding at the same timesteps; the halving stages then run on omega-conditioned teachers with no CFG pass.
The student's parameterisation is objective.prediction_type (default: the teacher's). A v-prediction student of
an epsilon teacher starts from the teacher's weights with its output read as v: the first stage re-learns the
output, and only v (or x0) keeps the one-step student well-posed at SNR 0.

LoRA students (adapter.kind: lora) keep one denoiser in memory: the original teacher is it with the adapters
off (and no omega embedding), a later stage's teacher is it with the last stage's trainable tensors (LoRA and, when
guided, the omega embedding) swapped in. They export merged into a plain denoiser, since the omega embedding is
a new module that a LoRA file cannot carry.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from trainers import adapters, diffusion, seeding, solvers
from trainers.config import ranged
from trainers.errors import ConfigError
from trainers.objectives import inputs
from trainers.objectives.base import Objective

GUIDANCE_STAGE, HALVING_STAGE = "guidance", "halving"
KEY = "objective.progressive.guidance_embedding_dim"


@dataclass(frozen=True)
class ProgressiveOptions:
    """objective.progressive: the options of this objective (recipe section objective.progressive)."""
    # Progressive distillation (Salimans & Ho 2022); guided: Meng et al. (2023). train.max_steps is split evenly
    # over the stages; each stage's student starts from the last one and takes half its DDIM steps.
    teacher_steps: int = ranged(64, min=2)  # DDIM steps of the first teacher
    student_steps: int = ranged(4, min=1)   # DDIM steps of the final student (teacher_steps / 2^k)
    guided: bool = False                # first stage: distil classifier-free guidance into an omega-conditioned student
    omega_min: float = ranged(0.0, min=0.0)  # guided: omega ~ U[min, max] (the paper's omega = guidance_scale - 1)
    omega_max: float = ranged(4.0, min=0.0)
    guidance_embedding_dim: int = ranged(256, min=1)  # guided: the student U-Net's time_cond_proj_dim


class Progressive(Objective):
    Options = ProgressiveOptions
    name = "progressive"
    card_tags = ("progressive-distillation",)

    def __init__(self, recipe, backbone):
        super().__init__(recipe, backbone)
        self.cfg = cfg = recipe.objective.progressive
        check_recipe(recipe)
        self.stages = plan_stages(cfg, recipe.train.max_steps)
        self.stage_len = recipe.train.max_steps // len(self.stages)
        # the teacher's parameterisation is the model's; the student's is objective.prediction_type (same betas)
        self.student_schedule = self.training_schedule(vp_only="distils DDIM steps of a discrete VP teacher")
        self.teacher_schedule = backbone.schedule
        self.timesteps = backbone.schedule.num_train_timesteps
        self.lora = recipe.adapter.low_rank
        embedding = cfg.guidance_embedding_dim if cfg.guided else 0
        self.base = backbone.denoiser  # the original teacher, frozen
        if self.lora:  # one denoiser: base weights frozen, LoRA (and the omega embedding) trained
            self.student = adapters.student_from(self.base, embedding, KEY) if embedding else self.base
            adapters.add_lora(self.student, recipe.adapter, recipe.adapter.target_modules or backbone.lora_targets)
            if embedding:
                self.student.time_embedding.cond_proj.requires_grad_(True)
                backbone.denoiser = self.base = self.student  # the original is the student with adapters off
            self.layers = adapters.tuner_layers(self.student)
        else:
            self.student = adapters.student_from(self.base, embedding, KEY)
        self.teacher = None  # the last stage's student, frozen: a copy, or (LoRA) its trainable tensors
        self.stage = 0       # the stage whose teacher is in place

    def trained_modules(self):
        return {self.backbone.denoiser_key: self.student}

    def to(self, device, frozen_dtype, inputs_cached: bool = False):
        self.frozen_dtype = frozen_dtype
        if self.lora:  # the base weights in the compute dtype, the trainable ones float32
            self.place(device, frozen_dtype, frozen=[self.student], trained=[], inputs_cached=inputs_cached)
            self.lora_params = self.trainable_named_parameters()  # LoRA (and omega embedding), float32
            self.teacher = {k: p.detach().clone() for k, p in self.lora_params.items()}
        else:
            self.teacher = copy.deepcopy(self.student).requires_grad_(False)
            self.place(device, frozen_dtype, frozen=[self.base, self.teacher], trained=[self.student],
                       inputs_cached=inputs_cached)
        self.teacher_schedule.to(self.device)
        self.student_schedule.to(self.device)
        self.grids = {n: student_grid(self.timesteps, n, self.device) for _, n in self.stages}  # made once, on device
        self.text = inputs.FrozenText(self.backbone, self.device, encoders_on_cpu=inputs_cached)

    def param_groups(self):
        # every student parameter, frozen base weights of a LoRA student included (they never get a gradient, so
        # no state): checkpoints already written index their optimizer state by this list
        return [{"params": list(self.student.parameters()), "lr": self.recipe.optimizer.lr}]

    # ---- stages --------------------------------------------------------------------------------------

    def stage_of(self, step: int) -> int:
        return min((step - 1) // self.stage_len, len(self.stages) - 1)

    def enter(self, stage: int) -> None:
        """From the second stage on, the teacher is the student as it ended the stage before."""
        if stage != self.stage:
            with torch.no_grad():
                teacher = self.teacher_tensors()
                for name, p in self.student_tensors().items():
                    teacher[name].copy_(p)
            self.stage = stage

    def student_tensors(self) -> dict[str, torch.Tensor]:
        return self.lora_params if self.lora else dict(self.student.named_parameters())

    def teacher_tensors(self) -> dict[str, torch.Tensor]:
        return self.teacher if self.lora else dict(self.teacher.named_parameters())

    def state_for_checkpoint(self):
        key = self.backbone.denoiser_key
        state = {"stage": torch.tensor(self.stage)}
        if self.stage > 0:
            state |= {f"teacher.{n}": p for n, p in self.teacher_tensors().items()}
        return {f"{key}.{k}": v for k, v in state.items()}

    def load_checkpoint_state(self, state):
        key = self.backbone.denoiser_key
        self.stage = int(state[f"{key}.stage"])
        if self.stage > 0:
            with torch.no_grad():
                for n, p in self.teacher_tensors().items():
                    p.copy_(state[f"{key}.teacher.{n}"])

    # ---- the loss ------------------------------------------------------------------------------------

    def loss(self, batch, step):
        stage = self.stage_of(step)
        self.enter(stage)
        kind, n_steps = self.stages[stage]
        seeds, device = batch["seeds"], self.device
        x0 = inputs.latents(self.backbone, batch, device)
        eps = seeding.randn(seeds, seeding.NOISE, x0.shape[1:], device)
        omega = self.omega(seeds)
        if kind == GUIDANCE_STAGE:  # any training timestep: the student serves every grid later stages use
            t = self.student_schedule.sample_timesteps(seeds, device)
        else:
            t = self.grids[n_steps][seeding.randint(seeds, seeding.TIMESTEP, n_steps, device)]
        z_t = self.student_schedule.add_noise(x0, eps, t)
        cond, teacher = self.condition_and_teacher(batch, stage, omega)
        student_cond = self.student_cond(cond, omega)
        student = lambda z, tt: self.predict_x0(self.wrapped[self.backbone.denoiser_key], z, tt, student_cond,  # noqa: E731
                                                self.student_schedule)
        if kind == GUIDANCE_STAGE:
            per_sample = guidance_loss(student, teacher, z_t, t, self.student_schedule)
        else:
            per_sample = progressive_loss(student, teacher, z_t, t, t - self.timesteps // n_steps, self.student_schedule)
        loss = per_sample.mean()
        return loss, {"loss": loss.detach()}

    def omega(self, seeds):
        if not self.cfg.guided:
            return None
        u = seeding.rand(seeds, seeding.GUIDANCE, self.device)
        return self.cfg.omega_min + (self.cfg.omega_max - self.cfg.omega_min) * u

    def condition_and_teacher(self, batch, stage: int, omega):
        """The student's text kwargs and the stage's teacher as (z, t) -> (x0_hat, eps_hat)."""
        if self.cfg.guided and stage == 0:  # the CFG-guided original: cond and uncond as one batch
            cond, uncond = self.text.pair(batch)
            return cond, self.guided_base(cond, uncond, omega)
        cond = self.text(batch, inputs.dropped_captions(batch["seeds"], self.recipe.objective.caption_dropout))
        if stage == 0:
            return cond, self.denoiser_fn(self.base, cond, self.teacher_schedule, self.as_base)
        teacher = self.student if self.lora else self.teacher
        return cond, self.denoiser_fn(teacher, self.student_cond(cond, omega), self.student_schedule, self.as_teacher)

    def denoiser_fn(self, module, cond, schedule, context):
        def denoise(z, t):
            with context():
                return self.predict_x0(module, z, t, cond, schedule, both=True, frozen=True)
        return denoise

    def guided_base(self, cond, uncond, omega):
        def pair(z, t, kwargs):
            with self.as_base():
                return self.predict_x0(self.base, z, t, kwargs, self.teacher_schedule, both=True, frozen=True)
        return solvers.guided_teacher(pair, cond, uncond, omega)

    @contextlib.contextmanager
    def as_base(self):
        """The original teacher: a LoRA student with its adapters off (its omega embedding is unused without
        timestep_cond); a full student has the base beside it."""
        with adapters.adapters_off(self.layers) if self.lora else contextlib.nullcontext():
            yield

    @contextlib.contextmanager
    def as_teacher(self):
        """A LoRA student with the last stage's trainable tensors in place of its own, for one teacher pass."""
        with adapters.swapped_in(self.lora_params, self.teacher) if self.lora else \
                contextlib.nullcontext():
            yield

    def predict_x0(self, module, z, t, cond, schedule, both: bool = False, frozen: bool = False):
        """x0_hat (and eps_hat with both) of a denoiser read through `schedule` (the teacher's or the student's
        parameterisation); frozen (teacher) passes run in the compute dtype."""
        with torch.autocast(self.device.type, self.frozen_dtype, enabled=frozen and self.frozen_dtype != torch.float32):
            x0, eps = self.backbone.denoise(z, t, cond, module, schedule)
        return (x0, eps) if both else x0

    def student_cond(self, cond, omega):
        if omega is None:
            return cond
        return {**cond, "timestep_cond": diffusion.guidance_embedding(omega, self.cfg.guidance_embedding_dim)}

    # ---- sampling and export -------------------------------------------------------------------------

    def scheduler(self):
        """DDIM on exactly the student's grid: trailing spacing, the last step to clean data."""
        from diffusers import DDIMScheduler

        config = {k: v for k, v in self.student_schedule.config.items() if not k.startswith("_")}
        return DDIMScheduler.from_config({**config, "prediction_type": self.student_schedule.prediction_type, "timestep_spacing": "trailing",
                                          "set_alpha_to_one": True, "steps_offset": 0, "clip_sample": False,
                                          "rescale_betas_zero_snr": False})

    def validation_pipeline(self):
        return self.backbone.pipeline(self.student, self.backbone.text_encoders, self.scheduler())

    def export(self, out_dir: Path) -> list[Path]:
        key, dtype = self.backbone.denoiser_key, getattr(torch, self.recipe.export.dtype)
        if self.lora:
            adapters.merged_copy(self.student).to(dtype).save_pretrained(out_dir / key, safe_serialization=True)
        else:
            self.student.to(dtype).save_pretrained(out_dir / key, safe_serialization=True)
            self.student.float()
        self.scheduler().save_pretrained(out_dir / "scheduler")
        return [out_dir / key, out_dir / "scheduler"]

    def usage_snippet(self, where: str) -> str:
        cls = self.backbone.pipeline_class()
        pipe, model = cls.__name__, type(self.student).__name__
        lib = "diffusers" if cls.__module__.startswith("diffusers") else cls.__module__
        key, cfg = self.backbone.denoiser_key, self.cfg
        guidance = (f"{(cfg.omega_min + cfg.omega_max) / 2 + 1:g}  # omega + 1, embedded: no CFG pass" if cfg.guided
                    else "3.0  # classifier-free guidance as with the teacher")
        return (f"import torch\nfrom diffusers import DDIMScheduler\nfrom {lib} import {pipe}, {model}\n\n"
                f"{key} = {model}.from_pretrained({where!r}, subfolder={key!r}, torch_dtype=torch.float16)\n"
                f"scheduler = DDIMScheduler.from_pretrained({where!r}, subfolder=\"scheduler\")\n"
                f"pipe = {pipe}.from_pretrained({self.recipe.model.pretrained!r}, {key}={key}, scheduler=scheduler,\n"
                f"    torch_dtype=torch.float16).to(\"cuda\")\n"
                f"image = pipe(\"your prompt\", num_inference_steps={self.stages[self.stage][1]}, "
                f"guidance_scale={guidance}).images[0]\n")


def progressive_loss(student, teacher: solvers.Denoise, z_t, t, s, schedule) -> torch.Tensor:
    """(B,) truncated-SNR-weighted x-space error of the student against the x_tilde that makes its one DDIM step
    t -> s land where the teacher's two steps (t -> midpoint -> s) do; s = -1 is clean data.

    student maps (z, t) to x0_hat; the teacher, (z, t) to (x0_hat, eps_hat), runs without gradients.
    """
    s = s.clamp(min=-1)
    with torch.no_grad():
        z_s = solvers.solve(teacher, z_t, t, s, schedule, "ddim", substeps=2)
        target = diffusion.progressive_target(z_t, z_s, *schedule.alpha_sigma(t), *schedule.alpha_sigma(s))
    return truncated_snr(schedule, t) * (student(z_t, t) - target).pow(2).flatten(1).mean(1)


def guidance_loss(student, teacher: solvers.Denoise, z_t, t, schedule) -> torch.Tensor:
    """(B,) the same weighted x-space error against the (guided) teacher's own x0_hat at the same z_t and t."""
    with torch.no_grad():
        target = teacher(z_t, t)[0]
    return truncated_snr(schedule, t) * (student(z_t, t) - target).pow(2).flatten(1).mean(1)


def truncated_snr(schedule, t) -> torch.Tensor:
    """max(SNR_t, 1): an x0 loss where the SNR is high, a v-like loss where it is low (Salimans & Ho 2022)."""
    return schedule.snr(t).clamp(min=1.0)


def plan_stages(cfg, max_steps: int) -> list[tuple[str, int]]:
    """(kind, student DDIM steps) per stage: [guidance at teacher_steps,] then halving down to student_steps."""
    ratio = cfg.teacher_steps / cfg.student_steps
    halvings = round(math.log2(ratio)) if ratio >= 2 else 0
    if halvings < 1 or 2 ** halvings != ratio:
        raise ConfigError(f"'objective.progressive.teacher_steps' ({cfg.teacher_steps}) must be student_steps "
                          f"({cfg.student_steps}) times a power of 2 (at least 2)")
    stages = [(GUIDANCE_STAGE, cfg.teacher_steps)] if cfg.guided else []
    stages += [(HALVING_STAGE, cfg.teacher_steps >> k) for k in range(1, halvings + 1)]
    if max_steps % len(stages):
        raise ConfigError(f"'train.max_steps' ({max_steps}) must split evenly over the {len(stages)} stages "
                          f"({', '.join(f'{kind} {n}' for kind, n in stages)})")
    return stages


def student_grid(num_train_timesteps: int, n: int, device) -> torch.Tensor:
    """The timesteps DDIMScheduler visits in n steps with trailing spacing (its set_timesteps, exactly)."""
    ratio = num_train_timesteps / n
    return torch.round(torch.arange(num_train_timesteps, 0, -ratio, dtype=torch.float64)).long().to(device) - 1


def check_recipe(recipe) -> None:
    cfg, obj = recipe.objective.progressive, recipe.objective
    if recipe.adapter.init_from:
        raise ConfigError("'adapter.init_from' is for fine-tuning; a progressive LoRA student starts a new LoRA")
    if recipe.adapter.text_encoder:
        raise ConfigError("'adapter.text_encoder': progressive distillation trains the denoiser only; set it false")
    if recipe.ema.enabled:
        raise ConfigError("'ema.enabled': each stage restarts from the last student, and an EMA across stages would "
                          "mix students of different step counts; set it false")
    for key, set_ in {"snr_gamma": obj.snr_gamma is not None, "noise_offset": obj.noise_offset != 0,
                      "zero_terminal_snr": obj.zero_terminal_snr, "mask_floor": obj.mask_floor != 0}.items():
        if set_:
            raise ConfigError(f"'objective.{key}' does not apply to objective.name: progressive (its loss is "
                              "weighted by the truncated SNR); remove it")
    if cfg.guided and obj.caption_dropout:
        raise ConfigError("'objective.caption_dropout' does not apply with objective.progressive.guided (the student "
                          "learns the guided output); set it 0")
    if cfg.omega_min > cfg.omega_max:
        raise ConfigError(f"'objective.progressive.omega_min' ({cfg.omega_min}) is above omega_max ({cfg.omega_max})")
    v = recipe.validation
    if v.every_steps and v.prompts and v.scheduler != "ddim":
        raise ConfigError(f"'validation.scheduler' must be ddim for a progressive student (got {v.scheduler}): it "
                          "is trained for DDIM on its own grid")
