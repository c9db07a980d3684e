"""The objective seam: what is trained and what the loss is. The engine owns everything else.

Objectives never call backward, save checkpoints or log: they return a loss and detached tensors to log.
"""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from trainers.backbones import Backbone
from trainers.config import FlowConfig, LRScheduleConfig, OptimizerConfig, Recipe
from trainers.diffusion import FlowMatchSchedule, Schedule, VPSchedule
from trainers.devices import cast
from trainers.errors import ConfigError
from trainers.schedulers import FLOW_SCHEDULERS


@dataclass
class UpdateGroup:
    """Parameters that one optimizer steps on their own loss, at every engine step divisible by `every`.

    Most objectives train one group; one that trains two networks against each other (DMD2's generator and fake
    score) declares two, each with its own optimizer, schedule and clipping. The first group is the model the run
    exports: EMA and `Objective.after_step` follow its updates.
    """
    name: str
    param_groups: list[dict]
    optimizer: OptimizerConfig
    lr_schedule: LRScheduleConfig
    every: int = 1
    loss: Optional[Callable] = None  # (batch, step) -> (loss, logs); None: the objective's `loss`


class Objective(abc.ABC):
    name = ""
    card_tags: tuple[str, ...] = ()
    # some trained parameters get no gradient in some updates (another group's): DDP must look for unused ones
    ddp_find_unused_parameters = False

    def __init__(self, recipe: Recipe, backbone: Backbone):
        self.recipe, self.backbone = recipe, backbone
        if recipe.objective.caption_dropout_per_encoder and (self.name != "finetune" or backbone.text_groups is None):
            raise ConfigError("'objective.caption_dropout_per_encoder' applies to fine-tuning sd3 and flux models "
                              f"(whose text encoders' inputs are kept apart), not {self.name} on {backbone.family}")

    def training_schedule(self, zero_terminal_snr: bool = False, vp_only: str = "") -> Schedule:
        """The noise process this objective trains on: the backbone's (or rectified flow, objective.schedule: flow)
        with the recipe's settings: prediction_type and, for losses on data, zero_terminal_snr (VP); the timestep
        sampler, weighting and shift (flow). vp_only names why an objective needs a discrete VP process."""
        obj, schedule = self.recipe.objective, self.backbone.schedule
        if obj.schedule == "flow" and isinstance(schedule, VPSchedule):
            schedule = FlowMatchSchedule(num_train_timesteps=schedule.num_train_timesteps,
                                         config={"num_train_timesteps": schedule.num_train_timesteps, "shift": 1.0},
                                         patch_size=self.backbone.patch_size)
        if not isinstance(schedule, VPSchedule):
            if vp_only:
                raise ConfigError(f"'objective.name': {self.name} {vp_only}; this recipe trains {self.backbone.family} "
                                  f"by rectified flow ({schedule.kind} matching)")
            for key in ("prediction_type", "zero_terminal_snr"):
                if getattr(obj, key):
                    raise ConfigError(f"'objective.{key}' applies to discrete (VP) diffusion; this recipe trains "
                                      f"{self.backbone.family} by rectified flow (a velocity): remove it")
            v = self.recipe.validation
            if v.every_steps and v.prompts and v.scheduler not in FLOW_SCHEDULERS:
                raise ConfigError(f"'validation.scheduler': {v.scheduler} has no rectified-flow form; use "
                                  f"{' or '.join(FLOW_SCHEDULERS)}")
            flow = obj.flow
            return schedule.configured(sampler=flow.timestep_sampler, logit_mean=flow.logit_mean,
                                       logit_std=flow.logit_std, mode_scale=flow.mode_scale, weighting=flow.weighting,
                                       shift=flow.shift)
        if obj.flow != FlowConfig():
            raise ConfigError(f"'objective.flow' applies to rectified flow; {self.backbone.family} models are trained "
                              "as VP diffusion (objective.schedule: flow trains them by rectified flow instead)")
        prediction_type = obj.prediction_type or schedule.prediction_type
        if zero_terminal_snr and prediction_type != "v_prediction":
            raise ConfigError("'objective.zero_terminal_snr' needs objective.prediction_type: v_prediction "
                              "(at SNR 0 an epsilon model cannot recover x0)")
        return schedule.configured(obj.prediction_type, zero_terminal_snr)

    @abc.abstractmethod
    def trained_modules(self) -> dict[str, torch.nn.Module]:
        """Modules holding trainable parameters; the engine wraps them (DDP, mixed precision)."""

    def use_wrapped(self, modules: dict[str, torch.nn.Module]) -> None:
        """Take back the engine's wrapped modules; `loss` calls these, export uses the unwrapped ones."""
        self._wrapped = modules

    @property
    def wrapped(self) -> dict[str, torch.nn.Module]:
        """What `loss` calls: the engine's wrapped modules once prepared, the plain ones before (tests, dry runs)."""
        return getattr(self, "_wrapped", None) or self.trained_modules()

    # with gradient checkpointing: a callable returning the context a block is recomputed in during backward,
    # captured as it runs forward (None: the model's state does not change between forward and backward)
    recompute_context = None

    def memory_modules(self) -> dict[str, torch.nn.Module]:
        """Modules the recipe's memory options (attention, gradient checkpointing) apply to: those that run forward
        with gradients."""
        return self.trained_modules()

    def to(self, device: torch.device, frozen_dtype: torch.dtype, inputs_cached: bool = False) -> None:
        """Put frozen parts on the device in the compute dtype; trainable weights stay float32.

        inputs_cached: the batches carry latents and text tensors, so encoders may stay off the device.
        By default the trained modules go float32 and the backbone's denoiser, when not among them, is frozen.
        """
        trained = list(self.trained_modules().values())
        frozen = [] if any(m is self.backbone.denoiser for m in trained) else [self.backbone.denoiser]
        self.place(device, frozen_dtype, frozen=frozen, trained=trained, inputs_cached=inputs_cached)

    offloaded: list = []  # parts `to` left on the CPU because the inputs are cached (the VAE, frozen encoders)

    def place(self, device, frozen_dtype, frozen: list, trained: list, inputs_cached: bool) -> None:
        """VAE and text encoders (left on the CPU when inputs are cached) and `frozen` modules in the compute dtype,
        `trained` ones in float32, on the device; trainable parameters (LoRA in a frozen model) in float32."""
        self.device = torch.device(device)
        backbone = self.backbone
        vae_dtype = torch.float32 if backbone.vae.config.get("force_upcast", False) else frozen_dtype  # SDXL's
        encoders = list(backbone.text_encoders.values())
        self.offloaded = [backbone.vae, *encoders] if inputs_cached else []
        for module, dtype in [(backbone.vae, vae_dtype), *[(m, frozen_dtype) for m in encoders + frozen],
                              *[(m, torch.float32) for m in trained]]:
            if not any(module is m for m in self.offloaded):
                module.to(self.device)
            if next(module.parameters()).dtype != dtype:  # diffusers warns on any cast: only when needed
                cast(module, dtype)
        for p in self.trainable_named_parameters().values():
            p.data = p.data.float()

    @contextlib.contextmanager
    def on_device_for_sampling(self):
        """A context in which every part a sampling pipeline needs is on the device (offloaded parts come back)."""
        for m in self.offloaded:
            m.to(self.device)
        try:
            yield
        finally:
            for m in self.offloaded:
                m.to("cpu")

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups (each may carry its own lr); by default one per trained module at optimizer.lr."""
        return [{"params": [p for p in m.parameters() if p.requires_grad], "lr": self.recipe.optimizer.lr}
                for m in self.trained_modules().values()]

    def update_groups(self) -> list[UpdateGroup]:
        """What the engine's optimizers step: by default one group, `param_groups` under the recipe's optimizer."""
        r = self.recipe
        return [UpdateGroup("main", self.param_groups(), r.optimizer, r.lr_schedule)]

    @abc.abstractmethod
    def loss(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one micro-batch and detached tensors to log (reduced by the engine at log steps)."""

    needs_conditioning_images = False  # batches carry conditioning_pixel_values (ControlNet)
    # with adapter.kind: lora the export is the LoRA alone, so the frozen base may be quantised (memory.quantize_base)
    exports_adapter_only = False

    def heldout_loss(self, batch: dict, timesteps: torch.Tensor) -> torch.Tensor:
        """Mean loss of a held-out batch at each of `timesteps`, with noise fixed by the batch's seeds; an objective
        that implements it lets recipes set validation.loss_source."""
        raise NotImplementedError

    @property
    def has_heldout_loss(self) -> bool:
        return type(self).heldout_loss is not Objective.heldout_loss

    def after_step(self, finite: torch.Tensor) -> None:
        """Called after each optimizer step of the first update group (finite: 0-dim bool, False when the step was skipped), e.g. to
        move an EMA target; on the device, without a host sync."""

    def state_for_checkpoint(self) -> dict[str, torch.Tensor]:
        """Tensors beyond the trainable weights and optimizer (e.g. an EMA target)."""
        return {}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        pass

    @abc.abstractmethod
    def export(self, out_dir: Path) -> list[Path]:
        """Write what users load into out_dir; returns the files written."""

    @abc.abstractmethod
    def validation_pipeline(self):
        """A diffusers pipeline over the current weights, without a scheduler swap."""

    def validation_inputs(self) -> dict:
        """Keyword arguments the validation pipeline needs beyond the prompts (a ControlNet's images)."""
        return {}

    def card_trained(self) -> str | None:
        """What the model card says was trained, where the recipe's adapter section does not say it."""
        return None

    def usage_snippet(self, repo_or_dir: str) -> str:
        """Python that loads the export, for the model card."""
        return ""

    def trainable_named_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Trainable parameters by stable name, for checkpoints and EMA."""
        return {f"{prefix}.{n}": p for prefix, m in self.trained_modules().items()
                for n, p in m.named_parameters() if p.requires_grad}


def refuse_denoising_options(recipe: Recipe, why: str) -> None:
    """A distillation objective refuses, by name, the options of the data's denoising loss it would ignore;
    `why` says what it trains instead."""
    obj = recipe.objective
    set_ = {"snr_gamma": obj.snr_gamma is not None, "noise_offset": obj.noise_offset != 0,
            "zero_terminal_snr": obj.zero_terminal_snr, "caption_dropout": obj.caption_dropout != 0,
            "mask_floor": obj.mask_floor != 0}
    for key, is_set in set_.items():
        if is_set:
            raise ConfigError(f"'objective.{key}' does not apply to objective.name: {obj.name} ({why}, not the data's "
                              "denoising loss); remove it")


def export_single_file(out_dir: Path, modules: dict[str, torch.nn.Module], family: str, recipe: Recipe,
                       dtype: torch.dtype) -> Path | None:
    """The single-file LoRA that ComfyUI and A1111/Forge load, for any family that has one: kohya's names for the
    U-Nets (trainers/kohya.py), trainers/mmdit_lora.py's forms for SD3 and Flux; None where there is none."""
    from trainers import kohya, mmdit_lora

    if family in mmdit_lora.WRITERS:
        return mmdit_lora.export(out_dir, modules, family, recipe.name, dtype)
    return kohya.export_trained(out_dir, modules, family, recipe, dtype)
