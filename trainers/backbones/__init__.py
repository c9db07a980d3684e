"""Backbone families: what a model family loads, how it encodes text and images, which pipeline samples it.

A family is one module here registered in FAMILIES; recipes name it in `model.family` or let `auto` read
the pipeline's own model_index.json.
"""
from __future__ import annotations

from trainers.backbones.base import Backbone
from trainers.backbones.dit import DiTBackbone
from trainers.backbones.loading import ModelSource, detect_family, resolve_source
from trainers.backbones.sd import SDBackbone
from trainers.backbones.sdxl import SDXLBackbone
from trainers.backbones.uvit import UViTBackbone
from trainers.config import ModelConfig
from trainers.errors import UserError

FAMILIES: dict[str, type[Backbone]] = {"sd15": SDBackbone, "sdxl": SDXLBackbone, "uvit": UViTBackbone,
                                        "dit": DiTBackbone}


def load_backbone(cfg: ModelConfig) -> Backbone:
    """Load every component of `model.pretrained` for the recipe's (or the detected) family."""
    source = resolve_source(cfg)
    family = detect_family(source) if cfg.family == "auto" else cfg.family
    if family not in FAMILIES:
        raise UserError(f"model.family: {family!r} is not supported (known: {', '.join(FAMILIES)})")
    backbone = FAMILIES[family].load(source)
    backbone.schedule  # noqa: B018  (an unknown noise process fails here, before anything trains)
    return backbone


__all__ = ["Backbone", "FAMILIES", "ModelSource", "load_backbone"]
