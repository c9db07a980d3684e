"""Where a model comes from: a local diffusers folder, a single-file checkpoint, or a hub id."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from trainers.config import ModelConfig
from trainers.errors import UserError


@dataclass(frozen=True)
class ModelSource:
    ref: str                 # folder, file or hub id as the recipe gave it
    kind: str                # "folder" | "single_file" | "hub"
    revision: str | None = None
    variant: str | None = None

    def from_pretrained_kwargs(self) -> dict:
        kw = {"revision": self.revision} if self.revision else {}
        return kw | ({"variant": self.variant} if self.variant else {})


def resolve_source(cfg: ModelConfig) -> ModelSource:
    ref = cfg.pretrained
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(f"model.pretrained: {path} is not a diffusers pipeline folder (no model_index.json)")
        return ModelSource(str(path), "folder", cfg.revision, cfg.variant)
    if path.is_file():
        if path.suffix not in (".safetensors",):
            raise UserError(f"model.pretrained: {path}: only .safetensors single files are loaded "
                            "(pickled .ckpt/.bin can run code; convert it first)")
        return ModelSource(str(path), "single_file")
    if _looks_like_path(ref):
        raise UserError(f"model.pretrained: no such folder or file: {path}")
    return ModelSource(ref, "hub", cfg.revision, cfg.variant)


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or ref.count("/") != 1 or ref.endswith((".safetensors", ".ckpt"))


def model_index(source: ModelSource) -> dict:
    """A folder's (or hub repo's) model_index.json: its pipeline class and components."""
    try:
        if source.kind == "folder":
            return json.loads((Path(source.ref) / "model_index.json").read_text())
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(source.ref, **source.from_pretrained_kwargs())
    except Exception as e:
        raise UserError(f"model.pretrained: cannot read the model index of {source.ref!r}: {e}") from None


def pipeline_name_of(source: ModelSource) -> str:
    """The pipeline class a folder's (or hub repo's) model_index.json names ("" if none)."""
    return model_index(source).get("_class_name", "")


def has_component(source: ModelSource, name: str) -> bool:
    """Whether the model ships component `name` (model_index.json lists it with a class, not [null, null])."""
    entry = model_index(source).get(name)
    return isinstance(entry, (list, tuple)) and entry[0] is not None


_EMPTY = [False]


@contextlib.contextmanager
def empty_weights():
    """Within it, folder and hub models are built from their configs on the meta device and no weight is read: what a
    dry run needs for parameter counts and memory (a hub model downloads its configs only)."""
    _EMPTY[0] = True
    try:
        yield
    finally:
        _EMPTY[0] = False


def building_empty() -> bool:
    return _EMPTY[0]


def empty_module(cls, source: ModelSource, name: str, kwargs: dict):
    """A diffusers or transformers model of class `cls` from component `name`'s config, on the meta device."""
    import torch

    if getattr(cls, "config_class", None) is not None:  # transformers
        config = cls.config_class.from_pretrained(source.ref, subfolder=name, **kwargs)
        with torch.device("meta"):
            return cls(config)
    config = cls.load_config(source.ref, subfolder=name, **kwargs)
    with torch.device("meta"):
        return cls.from_config(config)
