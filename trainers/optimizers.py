"""Optimizers by recipe name, the LR schedule, and what some optimizers need beyond step().

Adafactor factors Adam's second moment of each matrix into a row and a column vector and keeps no first moment:
for a full fine-tune of a large denoiser its state is a few MB where AdamW's is twice the weights. CAME (Luo et al.
2023) keeps Adafactor's factored second moment plus a first moment (half AdamW's state) and scales updates by a
factored estimate of their instability.

Prodigy (Mishchenko & Defazio 2023) estimates its own step size d; `optimizer.lr` multiplies it (1.0 by its
convention), and d is logged and checkpointed with the optimizer state. Schedule-free AdamW (Defazio et al. 2024)
takes gradients at one point y and averages another, x: validation and export must see x (`averaged_weights`),
training and checkpoints keep y, so no schedule is needed and resume stays exact.
"""
from __future__ import annotations

import contextlib
import io
import math

import torch

from trainers.config import LRScheduleConfig, OptimizerConfig, Recipe
from trainers.errors import ConfigError, UserError

BNB_OPTIMIZERS = {"adamw8bit": "AdamW8bit", "paged_adamw8bit": "PagedAdamW8bit", "lion8bit": "Lion8bit"}
PRODIGY_KEYS = ("d0", "d_coef", "safeguard_warmup")  # optimizer.<key>: Prodigy's own options
AVERAGING = ("adamw_schedulefree",)  # export averaged weights its optimizer state holds (`averaged_weights`)
# per trained weight: float32 moments (8-bit: 2); Adafactor keeps a row and a column of second moments per matrix
STATE_BYTES = {"adamw": 8, "lion8bit": 1, "prodigy": 16, "adamw_schedulefree": 8, "adafactor": 0, "came": 4}
CAME_BETA3 = 0.9999  # CAME's third beta (the instability moment), the paper's default


def optimizer_state_bytes(name: str) -> int:
    """Bytes of optimizer state per trainable parameter."""
    return STATE_BYTES.get(name, 2)


def check(recipe: Recipe) -> None:
    """Recipe combinations an optimizer cannot honour, refused before any model loads."""
    opt = recipe.optimizer
    check_group(opt, recipe.lr_schedule, recipe.train.max_steps)
    if opt.name == "adamw_schedulefree":
        if recipe.lr_schedule.name != "constant":
            raise ConfigError(f"'lr_schedule.name': schedule-free AdamW replaces the schedule ({recipe.lr_schedule.name}"
                              " would fight its averaging); set lr_schedule.name: constant (warmup_steps still applies)")
        if recipe.ema.enabled:
            raise ConfigError("'ema.enabled': schedule-free AdamW already averages the weights it exports; "
                              "set ema.enabled: false")
        if recipe.objective.name == "progressive":
            raise ConfigError("'optimizer.name': adamw_schedulefree cannot serve progressive distillation: each "
                              "stage's teacher would be the training point, not the averaged weights; use adamw")


def check_group(opt: OptimizerConfig, schedule: LRScheduleConfig, max_steps: int, key: str = "optimizer",
                schedule_key: str = "lr_schedule") -> None:
    """One optimizer and its LR schedule (the recipe's, or another update group's under its own keys)."""
    if schedule.name == "wsd" and not 1 <= schedule.decay_steps <= max_steps - schedule.warmup_steps:
        raise ConfigError(f"'{schedule_key}.decay_steps': wsd decays over the last decay_steps, which must be 1 to "
                          f"train.max_steps - warmup_steps ({max_steps - schedule.warmup_steps}); "
                          f"got {schedule.decay_steps}")
    if schedule.name != "wsd" and schedule.decay_steps:
        raise ConfigError(f"'{schedule_key}.decay_steps' belongs to the wsd schedule; {schedule_key}.name is "
                          f"{schedule.name}: remove it")
    if opt.name != "prodigy":
        for name in PRODIGY_KEYS:
            if getattr(opt, name) is not None:
                raise ConfigError(f"'{key}.{name}' is a Prodigy option; {key}.name is {opt.name}: remove it")
    else:
        for name in ("lr", "text_encoder_lr"):
            value = getattr(opt, name)
            if value is not None and value < 0.1:
                raise ConfigError(f"'{key}.{name}': Prodigy estimates the step size itself and multiplies it by "
                                  f"this; use 1.0 (its convention), not a hand-tuned step like {value:g}")


def make_optimizer(groups: list[dict], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps)
    if cfg.name in BNB_OPTIMIZERS:
        bnb = _import("bitsandbytes", cfg.name, "bitsandbytes")
        if cfg.name == "lion8bit":
            kwargs.pop("eps")  # Lion has no denominator
        return getattr(bnb.optim, BNB_OPTIMIZERS[cfg.name])(groups, **kwargs)
    if cfg.name == "prodigy":
        prodigyopt = _import("prodigyopt", cfg.name, "prodigyopt")
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its weight-decay mode on every construction
            return prodigyopt.Prodigy(groups, **kwargs, d0=_or(cfg.d0, 1e-6), d_coef=_or(cfg.d_coef, 1.0),
                                      safeguard_warmup=_or(cfg.safeguard_warmup, False))
    if cfg.name == "adafactor":  # Shazeer & Stern 2018 as transformers has it, at the recipe's lr (no relative step)
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    if cfg.name == "came":  # Luo et al. 2023: Adafactor's factored second moment with a confidence-guided
        came = _import("came_pytorch", cfg.name, "came-pytorch")  # first moment; its own eps (1e-30, 1e-16)
        return came.CAME(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(*cfg.betas, CAME_BETA3))
    if cfg.name == "adamw_schedulefree":
        schedulefree = _import("schedulefree", cfg.name, "schedulefree")
        optimizer = schedulefree.AdamWScheduleFree(groups, **kwargs)  # warmup: the engine's lr_schedule
        optimizer.train()
        return optimizer
    # fused AdamW skips a step on the device when told of non-finite gradients (engine: no host sync)
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def _or(value, default):
    return default if value is None else value


def _import(module: str, name: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"optimizer.name: {name} needs {package} (pip install {package})") from None


def _inner(optimizer):
    """The optimizer itself under accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def is_schedule_free(optimizer) -> bool:
    inner = _inner(optimizer)
    return bool(inner.param_groups) and "train_mode" in inner.param_groups[0]


@contextlib.contextmanager
def averaged_weights(optimizer):
    """The parameters hold a schedule-free optimizer's averaged weights x inside; its training point y after.

    eval()/train() convert in place, but y -> x -> y is not exact in floating point, so y is copied (to the CPU)
    and put back bit for bit: a run that validates stays identical to one that does not, on every process.
    A no-op for other optimizers.
    """
    if optimizer is None or not is_schedule_free(optimizer):
        yield
        return
    inner = _inner(optimizer)
    params = [p for g in inner.param_groups for p in g["params"] if "z" in inner.state[p]]  # those it has trained
    saved = [p.detach().to("cpu", copy=True) for p in params]
    inner.eval()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, y in zip(params, saved):
                p.copy_(y)
        for group in inner.param_groups:
            group["train_mode"] = True


def logs(optimizer) -> dict[str, float]:
    """Optimizer-side figures worth a log line: Prodigy's estimated step size d."""
    group = _inner(optimizer).param_groups[0]
    return {"prodigy_d": float(group["d"])} if "d" in group and "d0" in group else {}


def lr_factor(name: str, warmup_steps: int, max_steps: int, decay_steps: int = 0):
    """The LR multiplier as a pure function of the optimizer step, so resuming needs only the step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if name == "wsd":
            return min(1.0, (max_steps - step) / decay_steps)
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        if name == "linear":
            return max(0.0, 1.0 - progress)
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor
