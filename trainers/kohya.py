"""LoRA in kohya's key format, the one ComfyUI, AUTOMATIC1111 and kohya's sd-scripts load.

A kohya file holds, per adapted layer, `<name>.lora_down.weight` (A, (r, in)), `<name>.lora_up.weight`
(B, (out, r)) and `<name>.alpha` (a 0-dim tensor); every loader computes W0 x + (alpha / r) B A x. We write
the real lora_alpha: diffusers' `convert_state_dict_to_kohya` writes alpha = r (and `lora_te1_` for SD-1.5's
only text encoder), which changes the strength of any LoRA trained with alpha != r.

`<name>` is a prefix and the layer's module path with "." turned into "_". Which module path, for the U-Net?
- kohya-ss/sd-scripts networks/lora.py, `LoRANetwork.__init__` -> `create_modules`: `lora_name = prefix + "."
  + name + "." + child_name`, then `.replace(".", "_")`, over the U-Net it trains. For SD 1.x that U-Net is
  library/original_unet.py's `UNet2DConditionModel`, a copy of diffusers 0.10.2 with diffusers' module names,
  even when training from an original .ckpt (library/train_util.py `_load_target_model` converts it), so
  kohya writes `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`; only SDXL
  (library/sdxl_original_unet.py) gives LDM names, `lora_unet_input_blocks_4_1_...`. Its loader,
  `create_network_from_weights`, rebuilds the network from the model's own module names and looks each file
  name up in them (`modules_dim`), so an SD-1 file with LDM names loads nothing there; `get_block_index` and
  `prepare_optimizer_params` even read "input_blocks" in a name as "this is SDXL", and
  `convert_diffusers_to_sai_if_needed` converts diffusers names to LDM ones for SDXL only.
  library/sai_model_spec.py `determine_implementation` labels SD-1 LoRAs "diffusers" and SDXL ones "sgm".
- comfyanonymous/ComfyUI comfy/lora.py `model_lora_keys_unet` maps both `lora_unet_<LDM path>` (the model's
  state-dict keys) and `lora_unet_<diffusers path>` (through comfy/utils.py `unet_to_diffusers`) onto the same
  weight; `model_lora_keys_clip` maps `lora_te_text_model_encoder_layers_<i>_self_attn_q_proj` (and
  `lora_te1_`/`lora_te2_` for SDXL's two encoders).
- AUTOMATIC1111/stable-diffusion-webui extensions-builtin/Lora/networks.py `load_network` first runs
  `convert_diffusers_name_to_compvis`, which turns `lora_unet_down_blocks_...` into the LDM module name, and
  only then falls back to reading the name as LDM ("SDXL loras seem to already have correct compvis keys").
- diffusers loaders/lora_conversion_utils.py `_convert_unet_lora_key` says the same: "kohya-ss trains SD 1.x
  on the diffusers UNet (not the sgm UNet it uses for SDXL)"; and `StableDiffusionPipeline.load_lora_weights`
  (diffusers 0.42) rejects an SD-1.5 file with LDM names: `lora_state_dict` remaps input_blocks only when given
  `unet_config`, which only the SDXL pipeline passes.
So each family is written as kohya itself writes it (SD-1.5: diffusers paths, which all four loaders read;
SDXL: LDM paths), and `from_kohya` reads either spelling.

LoHa and LoKr layers are written under LyCORIS' names, which peft shares (`hada_w1_a`, ..., `lokr_w1`, `lokr_w2_a`,
...) with alpha = scale x rank; a LoKr of two whole matrices, which LyCORIS and ComfyUI do not scale, has its scale
folded into `lokr_w2` instead.

DoRA adds `<name>.dora_scale`, LyCORIS's spelling of peft's magnitude m, shaped (out, 1) for a Linear: LyCORIS
(lycoris/modules/locon.py, `wd_on_out`) applies m (W0 + s B A) / ||W0 + s B A|| row by row, as peft does, and a
test reads our file with it. ComfyUI (comfy/weight_adapter/base.py `weight_decompose`, v0.3.77) divides by the
rows of W0 instead when dora_scale lies on the output axis, so there a DoRA lands off by ||W0 + s B A|| / ||W0||
per row (1 at the start of training); diffusers' loader drops dora_scale keys (the diffusers-format file beside
this one keeps its DoRA).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch

from trainers.errors import UserError

KOHYA_WEIGHTS = "lora_kohya.safetensors"
UNET = "unet"  # the U-Net's component name in pipelines, diffusers LoRA files and alpha keys
UNET_PREFIX = "lora_unet"


@dataclass(frozen=True)
class Family:
    """How kohya-style tools name one model family's LoRA layers, and what they show about the file."""

    unet_names: str                # "diffusers" (down_blocks_0_attentions_0) or "ldm" (input_blocks_1_1)
    text_encoders: dict[str, str]  # pipeline component -> kohya prefix
    layers_per_block: int          # resnets per U-Net down block: LDM block numbers depend on it
    base_model_version: str        # ss_base_model_version
    architecture: str              # modelspec.architecture
    implementation: str            # modelspec.implementation
    resolution: int                # the side modelspec.resolution defaults to
    up_attention: tuple[bool, ...] = ()  # which U-Net up blocks hold attentions: where LDM puts their upsampler


FAMILIES = {
    "sd15": Family("diffusers", {"text_encoder": "lora_te"}, 2, "sd_v1", "stable-diffusion-v1/lora",
                   "diffusers", 512, (False, True, True, True)),
    # The seam for SDXL: kohya's SDXL U-Net has LDM names; two text encoders, lora_te1_ (CLIP-L), lora_te2_ (bigG).
    "sdxl": Family("ldm", {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}, 2, "sdxl_base_v1-0",
                   "stable-diffusion-xl-v1-base/lora", "https://github.com/Stability-AI/generative-models", 1024,
                   (True, True, False)),
}

# How a LoRA factor's key ends: peft (lora_A/lora_B), diffusers' U-Net and text-encoder spellings.
_FACTOR_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up",
                    ".lora.down.weight": "down", ".lora.up.weight": "up",
                    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
                    ".lora_magnitude_vector": "magnitude"}  # DoRA's m, one per output feature
# LoHa and LoKr: peft names its factors as LyCORIS does, so they are written under the same names
LYCORIS_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                 "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_FACTOR_SUFFIXES |= {f".{part}": part for part in LYCORIS_PARTS}
# DoRA's m is LyCORIS's `dora_scale` (its wd_on_out form: shape (out, 1, ...), the norm taken of the merged weight)
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "dora_scale": "magnitude",
                **{part: part for part in LYCORIS_PARTS}}

# Module-name words that hold an underscore; every other "_" in a kohya name stands for a ".".
_WORDS = {"down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
          "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
          "time_embedding", "linear_1", "linear_2", "add_embedding", "class_embedding", "input_blocks",
          "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers", "skip_connection",
          "time_embed", "label_emb", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
          "text_projection", "final_layer_norm", "layer_norm1", "layer_norm2"}


class KohyaLora(NamedTuple):
    """A kohya file read back into peft's terms; unpacks as (unet, text_encoders, alphas)."""

    unet: dict[str, torch.Tensor]                      # "<path>.lora_A.weight" / ".lora_B.weight" (/ DoRA's
                                                       # ".lora_magnitude_vector")
    text_encoders: dict[str, dict[str, torch.Tensor]]  # component -> the same, paths spelt "text_model...."
    alphas: dict[str, float]                           # "<component>.<path>" -> alpha (the rank if the file had none)

    @property
    def kind(self) -> str:
        """What adapter.kind must be to go on from the file: loha / lokr (LyCORIS names), dora (dora_scale), lora."""
        keys = [k for s in (self.unet, *self.text_encoders.values()) for k in s]
        for kind, mark in (("loha", ".hada_"), ("lokr", ".lokr_"), ("dora", ".lora_magnitude_vector")):
            if any(mark in k for k in keys):
                return kind
        return "lora"


def family_of(family: str | Family) -> Family:
    if isinstance(family, Family):
        return family
    if family not in FAMILIES:
        raise UserError(f"kohya export: no kohya naming for model family {family!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[family]


def family_for(name: str, unet: torch.nn.Module) -> Family:
    """FAMILIES[name] with this U-Net's block layout (LDM block numbers depend on it; tiny models differ)."""
    return replace(family_of(name), layers_per_block=unet.config.layers_per_block,
                   up_attention=tuple("CrossAttn" in t for t in unet.config.up_block_types))


# diffusers -> LDM (sgm) names: a ResNet block's layers, and the layers outside the down/mid/up blocks
_RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP_LDM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_RESNET_DIFFUSERS = {v: k for k, v in _RESNET_LDM.items()}
_TOP_DIFFUSERS = {v: k for k, v in _TOP_LDM.items()}


def ldm_path(path: str, layers_per_block: int, up_attention: tuple[bool, ...] = ()) -> str:
    """diffusers U-Net module path -> the original SD (LDM) one: down_blocks.1.attentions.0.X -> input_blocks.4.1.X.

    Down block x holds layers_per_block resnet+attention pairs and a downsampler, so its layer i is LDM input block
    1 + (layers_per_block + 1) x + i (resnet at .0, attention at .1) and its downsampler input block
    (layers_per_block + 1)(x + 1), `.0.op`. An up block has one pair more and puts its upsampler in its last block,
    after the attention if it has one (`up_attention`).
    """
    n = layers_per_block + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path):
        return f"input_blocks.{1 + n * int(m[1]) + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", path):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path):
        return f"output_blocks.{n * int(m[1]) + int(m[2])}.1.{m[3]}"
    if (m := re.fullmatch(r"(down|mid|up)_blocks?\.(?:(\d+)\.)?resnets\.(\d+)\.(\w+)", path)) and m[4] in _RESNET_LDM:
        layer = _RESNET_LDM[m[4]]
        if m[1] == "down":
            return f"input_blocks.{1 + n * int(m[2]) + int(m[3])}.0.{layer}"
        if m[1] == "mid":
            return f"middle_block.{2 * int(m[3])}.{layer}"
        return f"output_blocks.{n * int(m[2]) + int(m[3])}.0.{layer}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path):
        return f"input_blocks.{n * (int(m[1]) + 1)}.0.op"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path):
        block = int(m[1])
        if block >= len(up_attention):
            raise UserError(f"kohya export: where LDM puts {path!r} depends on the U-Net's up_block_types; "
                            "use kohya.family_for(name, unet)")
        return f"output_blocks.{n * block + n - 1}.{2 if up_attention[block] else 1}.conv"
    if path in _TOP_LDM:
        return _TOP_LDM[path]
    raise UserError(f"kohya export: U-Net layer {path!r} has no LDM name")


def diffusers_path(path: str, layers_per_block: int) -> str:
    """The inverse of `ldm_path`; a path already in diffusers' names comes back unchanged."""
    n = layers_per_block + 1
    resnet = _RESNET_DIFFUSERS
    if path in _TOP_DIFFUSERS:
        return _TOP_DIFFUSERS[path]
    if m := re.fullmatch(r"input_blocks\.(\d+)\.([01])\.(.+)", path):
        block, layer = divmod(int(m[1]) - 1, n)
        if layer < layers_per_block and m[2] == "1":
            return f"down_blocks.{block}.attentions.{layer}.{m[3]}"
        if layer < layers_per_block and m[3] in resnet:
            return f"down_blocks.{block}.resnets.{layer}.{resnet[m[3]]}"
        if layer == layers_per_block and (m[2], m[3]) == ("0", "op"):
            return f"down_blocks.{block}.downsamplers.0.conv"
    elif m := re.fullmatch(r"middle_block\.1\.(.+)", path):
        return f"mid_block.attentions.0.{m[1]}"
    elif (m := re.fullmatch(r"middle_block\.([02])\.(.+)", path)) and m[2] in resnet:
        return f"mid_block.resnets.{int(m[1]) // 2}.{resnet[m[2]]}"
    elif m := re.fullmatch(r"output_blocks\.(\d+)\.([012])\.(.+)", path):
        block, layer = divmod(int(m[1]), n)
        if m[3] == "conv" and m[2] != "0":  # an attention has no layer named plain "conv"
            return f"up_blocks.{block}.upsamplers.0.conv"
        if m[2] == "1":
            return f"up_blocks.{block}.attentions.{layer}.{m[3]}"
        if m[2] == "0" and m[3] in resnet:
            return f"up_blocks.{block}.resnets.{layer}.{resnet[m[3]]}"
    if path.startswith(("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")):
        raise UserError(f"kohya import: LDM U-Net layer {path!r} has no diffusers name")
    return path


def clip_path(path: str) -> str:
    """CLIP text-model path as kohya spells it: transformers 5's CLIPTextModel dropped the `text_model.` level."""
    return path if path.startswith(("text_model.", "text_projection")) else f"text_model.{path}"


def dotted(name: str) -> str:
    """A kohya module name without prefix back to a module path: 'attn1_to_out_0' -> 'attn1.to_out.0'."""
    parts, path, i = name.split("_"), [], 0
    while i < len(parts):
        k = next((k for k in (3, 2) if "_".join(parts[i:i + k]) in _WORDS), 1)
        path.append("_".join(parts[i:i + k]))
        i += k
    return ".".join(path)


def to_kohya(state: dict[str, torch.Tensor], alphas: dict[str, float] | float,
             family: str | Family = "sd15") -> dict[str, torch.Tensor]:
    """peft/diffusers LoRA weights -> kohya keys, with each module's real alpha.

    Args:
        state: keys "<component>.<module path>.<factor>", component "unet" or a text encoder ("text_encoder"),
            factor peft's `lora_A.weight`/`lora_B.weight` or diffusers' `lora.down.weight`/`lora.up.weight`/
            `lora_linear_layer.down.weight`/... (what `save_lora_weights` writes, or peft state dicts prefixed).
        alphas: one alpha for all, or a dict keyed "<component>.<module path>" or "<component>".
        family: a name in FAMILIES or a Family.
    Returns:
        "<prefix>_<path with _>.lora_down.weight" / ".lora_up.weight" / ".alpha" (0-dim float32) per module.
    """
    fam = family_of(family)
    prefixes = {UNET: UNET_PREFIX, **fam.text_encoders}
    out = {}
    for (component, path), factor in _factors(state, prefixes).items():
        kohya_path = (ldm_path(path, fam.layers_per_block, fam.up_attention)
                      if component == UNET and fam.unet_names == "ldm" else path)
        name = f"{prefixes[component]}_{kohya_path.replace('.', '_')}"
        if "down" in factor:
            out[f"{name}.lora_down.weight"] = factor["down"]
            out[f"{name}.lora_up.weight"] = factor["up"]
        else:  # LoHa / LoKr factors keep their names
            out |= {f"{name}.{part}": tensor for part, tensor in factor.items()}
        out[f"{name}.alpha"] = torch.tensor(float(_alpha_for(alphas, component, path)))
        if "magnitude" in factor:
            up = factor["up"]
            out[f"{name}.dora_scale"] = factor["magnitude"].reshape(up.shape[0], *[1] * (up.dim() - 1))
    return out


def _factors(state: dict[str, torch.Tensor], prefixes: dict[str, str]) -> dict[tuple[str, str], dict]:
    """Group LoRA factors by (component, module path); text-encoder paths in kohya's `text_model.` spelling."""
    modules: dict[tuple[str, str], dict] = {}
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        suffix = next((s for s in _FACTOR_SUFFIXES if rest.endswith(s)), None)
        if component not in prefixes or suffix is None:
            raise UserError(f"kohya export: {key!r} is not '<{'|'.join(prefixes)}>.<module>.lora_A.weight' "
                            f"(or lora_B, lora.down/up, lora_linear_layer.down/up)")
        path = rest[: -len(suffix)].removeprefix("base_model.model.")
        path = path if component == UNET else clip_path(path)
        modules.setdefault((component, path), {})[_FACTOR_SUFFIXES[suffix]] = tensor
    for (component, path), factor in modules.items():
        if not ({"down", "up"} <= set(factor) or set(factor) <= set(LYCORIS_PARTS)):
            raise UserError(f"kohya export: {component}.{path} has only its {', '.join(factor)} factor")
    return modules


def _alpha_for(alphas: dict[str, float] | float, component: str, path: str) -> float:
    if not isinstance(alphas, dict):
        return alphas
    wanted = (f"{component}.{path}", f"{component}.{path.removeprefix('text_model.')}", component)
    found = next((alphas[k] for k in wanted if k in alphas), None)
    if found is None:
        raise UserError(f"kohya export: no alpha for {component}.{path} (give one per module or per component)")
    return found


def from_kohya(state: dict[str, torch.Tensor], family: str | Family = "sd15") -> KohyaLora:
    """kohya keys -> peft keys per component, plus each module's alpha; reads diffusers and LDM U-Net names."""
    fam = family_of(family)
    components = {prefix: component for component, prefix in {UNET: UNET_PREFIX, **fam.text_encoders}.items()}
    modules: dict[tuple[str, str], dict] = {}
    for key, tensor in state.items():
        name, _, part = key.partition(".")
        prefix = next((p for p in components if name.startswith(p + "_")), None)
        if prefix is None:
            raise UserError(f"kohya import: {key!r} starts with none of {', '.join(components)}")
        if part not in _KOHYA_PARTS:
            raise UserError(f"kohya import: {key!r} is not a LoRA, DoRA, LoHa or LoKr weight (lora_down.weight, "
                            f"lora_up.weight, alpha, dora_scale, hada_*, lokr_*)")
        component, path = components[prefix], dotted(name[len(prefix) + 1:])
        path = diffusers_path(path, fam.layers_per_block) if component == UNET else clip_path(path)
        modules.setdefault((component, path), {})[_KOHYA_PARTS[part]] = tensor
    out = KohyaLora({}, {}, {})
    for (component, path), part in modules.items():
        target = out.unet if component == UNET else out.text_encoders.setdefault(component, {})
        lycoris = set(part) & set(LYCORIS_PARTS)
        if lycoris:  # peft names LoHa/LoKr factors as LyCORIS does; a LoKr of whole matrices has its scale folded in
            target |= {f"{path}.{name}": part[name] for name in lycoris}
            whole = lycoris <= {"lokr_w1", "lokr_w2"}  # two whole matrices: readers apply no scale, whatever alpha
            out.alphas[f"{component}.{path}"] = float(part["alpha"].item()) if "alpha" in part and not whole \
                else float("nan")  # nan: scale 1 (load_lora sets alpha = r)
            continue
        if not {"down", "up"} <= set(part):
            raise UserError(f"kohya import: {component}.{path} lacks lora_down or lora_up")
        target[f"{path}.lora_A.weight"] = part["down"]
        target[f"{path}.lora_B.weight"] = part["up"]
        if "magnitude" in part:
            target[f"{path}.lora_magnitude_vector"] = part["magnitude"].flatten()
        rank = part["down"].shape[0]
        out.alphas[f"{component}.{path}"] = float(part["alpha"].item()) if "alpha" in part else float(rank)
    return out


def peft_lora(modules: dict[str, torch.nn.Module]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The 'default' peft adapter of each component as (state, alphas), both keyed "<component>.<path>..."."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer
    from peft.utils import get_peft_model_state_dict

    state, alphas = {}, {}
    for component, module in modules.items():
        weights = get_peft_model_state_dict(module, save_embedding_layers=False)
        state |= {f"{component}.{key}": value for key, value in weights.items()}
        for path, layer in module.named_modules():
            if isinstance(layer, LoraLayer) and "default" in layer.r:
                alpha, r = layer.lora_alpha["default"], layer.r["default"]
                if not math.isclose(layer.scaling["default"], alpha / r):
                    alpha = layer.scaling["default"] * r  # rsLoRA scales by alpha/sqrt(r); kohya's scale is alpha/r
                alphas[f"{component}.{path}"] = float(alpha)
            elif isinstance(layer, LycorisLayer) and "default" in layer.r:
                scaling, r = layer.scaling["default"], layer.r["default"]
                if _full_kronecker(layer):  # LyCORIS and ComfyUI scale a LoKr of two whole matrices by 1: fold it in
                    key = f"{component}.{path}.lokr_w2"
                    state[key] = state[key] * scaling
                    alphas[f"{component}.{path}"] = 1.0
                else:  # alpha / (the factors' rank), as both read it
                    alphas[f"{component}.{path}"] = float(scaling * r)
    return state, alphas


def _full_kronecker(layer) -> bool:
    """A LoKr layer whose factors are both whole matrices (no low-rank pair), which readers do not scale."""
    return "default" in getattr(layer, "lokr_w1", {}) and "default" in getattr(layer, "lokr_w2", {})


def load_lora(module: torch.nn.Module, state: dict[str, torch.Tensor], alphas: dict[str, float],
              component: str, adapter=None) -> None:
    """Freeze `module` and add a trainable peft adapter 'default' shaped like `state` (per-layer r and alpha).

    `state` is one component of `from_kohya`; `alphas` its alphas, keyed "<component>.<path>". Text-encoder paths
    lose their `text_model.` level where the module has none (transformers 5's CLIPTextModel), as diffusers does.
    LoHa and LoKr need `adapter` (the recipe's AdapterConfig): a LoKr's factor options decide its factor shapes,
    and they must be the file's.
    """
    from peft.utils import set_peft_model_state_dict

    if component != UNET and not hasattr(module, "text_model"):
        state = {key.removeprefix("text_model."): value for key, value in state.items()}
        alphas = {key.replace(".text_model.", ".", 1): value for key, value in alphas.items()}
    kind = KohyaLora(state, {}, {}).kind
    ranks = _ranks(state, kind, adapter)
    layer_alphas = {path: alphas[f"{component}.{path}"] for path in ranks}
    layer_alphas = {path: float(ranks[path]) if math.isnan(a) else a for path, a in layer_alphas.items()}  # scale 1
    dora = {key.removesuffix(".lora_magnitude_vector") for key in state if key.endswith(".lora_magnitude_vector")}
    if dora and dora != set(ranks):
        raise UserError(f"kohya import: {component} mixes DoRA and plain LoRA layers (e.g. "
                        f"{next(iter(set(ranks) - dora))} has no dora_scale), which one peft adapter cannot hold")
    module.requires_grad_(False)
    module.add_adapter(lora_config(ranks, layer_alphas, bool(dora), kind, adapter))
    try:
        result = set_peft_model_state_dict(module, state)
    except RuntimeError as e:  # a factor of another shape: a LoKr split differently
        raise UserError(f"kohya import: {component}'s {kind} factors do not fit the layers peft made "
                        f"({str(e).splitlines()[0][:160]}); a LoKr needs the file's adapter.lokr_factor and "
                        "adapter.lokr_decompose_both") from None
    if result.unexpected_keys:
        raise UserError(f"kohya import: {component} has no layer for {', '.join(result.unexpected_keys[:3])}")


def _ranks(state: dict[str, torch.Tensor], kind: str, adapter) -> dict[str, int]:
    """Each adapted layer's rank, read from its factors' shapes (a LoKr of whole matrices: the recipe's rank)."""
    if kind == "loha":
        return {k.removesuffix(".hada_w1_b"): v.shape[0] for k, v in state.items() if k.endswith(".hada_w1_b")}
    if kind == "lokr":
        paths = {k.rsplit(".", 1)[0] for k in state}
        low = {k.rsplit(".", 1)[0]: v.shape[0] for k, v in state.items() if k.endswith((".lokr_w2_b", ".lokr_w1_b"))}
        return {path: low.get(path, adapter.rank) for path in paths}
    return {k.removesuffix(".lora_A.weight"): v.shape[0] for k, v in state.items() if k.endswith(".lora_A.weight")}


def lora_config(ranks: dict[str, int], alphas: dict[str, float], dora: bool = False, kind: str = "lora",
                adapter=None):
    """A peft config of `kind` for exactly these layers; layers off the most common r or alpha go in
    rank/alpha_pattern."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    common = dict(r=r, target_modules=sorted(ranks), rank_pattern={path: v for path, v in ranks.items() if v != r},
                  alpha_pattern={path: v for path, v in alphas.items() if v != alpha})
    if kind == "loha":
        return LoHaConfig(alpha=alpha, **common)
    if kind == "lokr":
        return LoKrConfig(alpha=alpha, decompose_factor=adapter.lokr_factor, decompose_both=adapter.lokr_decompose_both,
                          **common)
    return LoraConfig(lora_alpha=alpha, use_dora=dora, **common)


def kohya_metadata(rank: int, alpha: float, title: str, family: str | Family = "sd15",
                   resolution: int | None = None, base_model: str | None = None,
                   date: datetime.datetime | None = None, kind: str = "lora") -> dict[str, str]:
    """The safetensors metadata kohya-style tools show (ss_* of sd-scripts, modelspec.* of Stability's ModelSpec)."""
    fam = family_of(family)
    side = resolution or fam.resolution
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_base_model_version": fam.base_model_version,
        "ss_resolution": str((side, side)),  # sd-scripts writes str() of its (width, height) tuple
        "ss_training_comment": "difftune",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": fam.architecture,
        "modelspec.implementation": fam.implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{side}x{side}",
        "modelspec.date": (date or datetime.datetime.now()).isoformat(timespec="seconds"),
    }
    if base_model:
        meta["ss_sd_model_name"] = base_model
    if kind != "lora":  # what LyCORIS writes: its algo, and DoRA as weight decomposition on the output axis
        meta["ss_network_module"] = "lycoris.kohya"
        args = {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"} if kind == "dora" else {"algo": kind}
        meta["ss_network_args"] = json.dumps(args)
    return meta


def save_kohya(path: str | Path, state: dict[str, torch.Tensor], alphas: dict[str, float] | float,
               metadata: dict[str, str], family: str | Family = "sd15") -> Path:
    """Convert with `to_kohya` and write it with `write_atomically`."""
    return write_atomically(path, to_kohya(state, alphas, family), metadata)


def write_atomically(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Safetensors written to a temp file beside `path`, then renamed over it: a reader never sees half a file."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def export_trained(out_dir: str | Path, modules: dict[str, torch.nn.Module], family_name: str, recipe,
                   dtype: torch.dtype) -> Path | None:
    """The trained LoRA modules under kohya's names with their real alphas, for ComfyUI, AUTOMATIC1111 and
    sd-scripts; None (with a warning) where the family or a layer has no kohya name: the diffusers-format
    file beside it still holds the LoRA, and hours of training are not lost to an export error."""
    if family_name not in FAMILIES:
        return None
    try:
        state, alphas = peft_lora(modules)
        state = {k: v.detach().to("cpu", dtype) for k, v in state.items()}
        family = family_for(family_name, modules[UNET])
        ad = recipe.adapter
        meta = kohya_metadata(ad.rank, ad.alpha, recipe.name, family, resolution=recipe.data.resolution,
                              base_model=recipe.model.pretrained, kind=ad.kind)
        return save_kohya(Path(out_dir) / KOHYA_WEIGHTS, state, alphas, meta, family)
    except UserError as e:
        print(f"warning: no {KOHYA_WEIGHTS} written: {e}", flush=True)
        return None
