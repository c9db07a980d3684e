"""Objectives by name: the engine finds them here and never imports a concrete one.

Adding an objective is one line in OBJECTIVES; its recipe options (the section `objective.<name>`) are the
`Options` dataclass its class names, which the recipe loader reads through `options_of`.
"""
from __future__ import annotations

import importlib

from trainers.errors import ConfigError

OBJECTIVES = {"finetune": "trainers.objectives.finetune:FineTune",
              "autoencoder": "trainers.objectives.autoencoder:Autoencoder",
              "consistency": "trainers.objectives.consistency:Consistency",
              "progressive": "trainers.objectives.progressive:Progressive",
              "controlnet": "trainers.objectives.controlnet:ControlNet",
              "dmd2": "trainers.objectives.dmd2:DMD2"}


def get_objective(name: str):
    if name not in OBJECTIVES:
        raise ConfigError(f"'objective.name' must be one of {', '.join(map(repr, OBJECTIVES))}; got {name!r}")
    module, cls = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def options_of(name: str) -> type | None:
    """The dataclass of objective `name`'s own recipe section, or None when it has no options of its own."""
    return getattr(get_objective(name), "Options", None)
