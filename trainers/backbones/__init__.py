"""Backbone families: what a model family loads, how it encodes text and images, which pipeline samples it.

FAMILIES is the one registry of model families: recipes name a key in `model.family` (or `auto` reads the
pipeline class from model_index.json and finds the family whose `pipeline_name` it is); sampling, ControlNet,
kohya export and launch/make_tiny_model.py read what a family supports from its class here.
"""
from __future__ import annotations

from trainers.backbones.base import Backbone
from trainers.backbones.dit import DiTBackbone
from trainers.backbones.flux import FluxBackbone
from trainers.backbones.loading import ModelSource, pipeline_name_of, resolve_source
from trainers.backbones.sd import SDBackbone
from trainers.backbones.sd3 import SD3Backbone
from trainers.backbones.sdxl import SDXLBackbone
from trainers.backbones.uvit import UViTBackbone
from trainers.config import ModelConfig
from trainers.errors import UserError

FAMILIES: dict[str, type[Backbone]] = {"sd15": SDBackbone, "sdxl": SDXLBackbone, "uvit": UViTBackbone,
                                        "dit": DiTBackbone, "sd3": SD3Backbone, "flux": FluxBackbone}


def family_of_pipeline(pipeline_name: str) -> str | None:
    """The family whose folders a pipeline class samples (e.g. StableDiffusionXLPipeline -> sdxl), or None."""
    return next((name for name, cls in FAMILIES.items() if cls.pipeline_name == pipeline_name), None)


def detect_family(source: ModelSource) -> str:
    """The family of a folder or hub id from its model_index.json; single files default to SD-1.5."""
    if source.kind == "single_file":
        return "sd15"
    name = pipeline_name_of(source)
    family = family_of_pipeline(name)
    if family is None:
        known = ", ".join(cls.pipeline_name for cls in FAMILIES.values())
        raise UserError(f"model.pretrained: {source.ref!r} is a {name or 'unknown'} pipeline, "
                        f"not one of {known}; set model.family to override")
    return family


def load_backbone(cfg: ModelConfig) -> Backbone:
    """Load every component of `model.pretrained` for the recipe's (or the detected) family."""
    source = resolve_source(cfg)
    family = detect_family(source) if cfg.family == "auto" else cfg.family
    if family not in FAMILIES:
        raise UserError(f"model.family: {family!r} is not supported (known: {', '.join(FAMILIES)})")
    check_options(cfg, family)
    backbone = FAMILIES[family].load(source, cfg)
    backbone.schedule  # noqa: B018  (an unknown noise process fails here, before anything trains)
    return backbone


def check_options(cfg: ModelConfig, family: str) -> None:
    """A model option that the family does not read is an error, never silently ignored."""
    defaults = ModelConfig(pretrained="")
    for key in ("t5", "max_sequence_length", "guidance"):
        if getattr(cfg, key) != getattr(defaults, key) and key not in FAMILIES[family].model_options:
            readers = [name for name, cls in FAMILIES.items() if key in cls.model_options]
            raise UserError(f"model.{key}: {family} models do not read it (only {', '.join(readers)}); remove it")


__all__ = ["Backbone", "FAMILIES", "ModelSource", "detect_family", "family_of_pipeline", "load_backbone"]
