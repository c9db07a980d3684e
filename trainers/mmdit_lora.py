"""Single-file LoRAs of the MMDiT families (SD3, Flux) in the forms ComfyUI and Forge load.

Flux: sd-scripts' names (networks/lora_flux.py), which ComfyUI, Forge and diffusers' `_convert_kohya_flux_lora_to_
diffusers` read: `lora_unet_double_blocks_<i>_<layer>` and `lora_unet_single_blocks_<i>_<layer>` over Black Forest
Labs' module layout, `lora_te1_<CLIP-L path>`, each with lora_down / lora_up / alpha. BFL fuses what diffusers
splits: a double block's `img_attn.qkv` is diffusers' to_q, to_k and to_v, a single block's `linear1` is to_q, to_k,
to_v and proj_mlp. A LoRA on the parts is exactly a LoRA on the fused layer of rank k r: lora_down stacks the parts'
A, lora_up holds their B on the block diagonal (a part not trained gets zero factors), which is the "sparse" form
diffusers' converter splits back into the parts. A part's scale alpha/r is kept as the fused layer's alpha/(k r).

SD3: diffusers' own keys (`transformer.<path>.lora_A.weight`, `text_encoder.`, `text_encoder_2.`) are what
ComfyUI maps onto SD3 and what diffusers' SD3 loader reads (it has no converter, and rejects `.alpha` keys), but
ComfyUI ignores the LoraConfig metadata that carries alpha: so the single file folds alpha/r into lora_B.
"""
from __future__ import annotations

from pathlib import Path

import torch

from trainers.errors import UserError
from trainers.kohya import KOHYA_WEIGHTS, clip_path, peft_lora, write_atomically

DENOISER = "transformer"
# BFL layer in a double block -> the diffusers modules (in transformer_blocks.<i>) fused into it, in its row order
FLUX_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
# ... and in a single block (single_transformer_blocks.<i>)
FLUX_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
FLUX_TEXT_PREFIX = {"text_encoder": "lora_te1"}  # CLIP-L, as sd-scripts names it for Flux


def lora_parts(modules: dict[str, torch.nn.Module]) -> dict[str, dict[str, dict]]:
    """component -> module path -> {"A", "B", "scale"} of every plain LoRA layer (DoRA and LyCORIS refused)."""
    state, alphas = peft_lora(modules)
    out: dict[str, dict[str, dict]] = {}
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        for suffix, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
            if rest.endswith(suffix):
                path = rest[: -len(suffix)]
                out.setdefault(component, {}).setdefault(path, {})[part] = tensor
                break
        else:
            raise UserError(f"single-file export: {key} is not a plain LoRA factor (DoRA and LyCORIS layers have no "
                            "form that ComfyUI reads for this family)")
    for component, layers in out.items():
        for path, layer in layers.items():
            layer["scale"] = alphas[f"{component}.{path}"] / layer["A"].shape[0]
    return out


def fuse(parts: list[dict | None], in_features: int, out_features: list[int]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down, up, alpha) of one fused layer from its parts' LoRAs (None: that part untrained, zero factors).

    Every part gets the trained parts' rank r and its B is scaled by its own scale over the common one, so
    alpha / (k r) * up @ down is, row block by row block, each part's scale * B @ A.
    """
    trained = [p for p in parts if p is not None]
    r, scale = trained[0]["A"].shape[0], trained[0]["scale"]
    if any(p["A"].shape[0] != r for p in trained):
        raise UserError("single-file export: the parts of a fused layer (e.g. to_q, to_k, to_v) have different "
                        "ranks, which sd-scripts' fused form cannot hold")
    like = trained[0]["A"]
    downs, ups = [], []
    for part, rows in zip(parts, out_features):
        if part is None:
            downs.append(like.new_zeros(r, in_features))
            ups.append(like.new_zeros(rows, r))
        else:
            downs.append(part["A"])
            ups.append(part["B"] * (part["scale"] / scale))
    return torch.cat(downs), torch.block_diag(*ups), scale * r * len(parts)


def flux_kohya(modules: dict[str, torch.nn.Module], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The trained Flux LoRA (transformer and CLIP-L) under sd-scripts' names."""
    transformer = modules[DENOISER]

    def features(path: str) -> tuple[int, int]:
        layer = transformer.get_submodule(path)
        layer = getattr(layer, "base_layer", layer)  # under a peft LoRA
        return layer.in_features, layer.out_features

    layers = lora_parts(modules)
    unknown = sorted(set(layers) - {DENOISER, *FLUX_TEXT_PREFIX})
    if unknown:
        raise UserError(f"single-file export: no sd-scripts Flux name for {', '.join(unknown)}")
    out = flux_names(layers.get(DENOISER, {}), features, len(transformer.transformer_blocks),
                     len(transformer.single_transformer_blocks))
    for component, prefix in FLUX_TEXT_PREFIX.items():
        for path, part in layers.get(component, {}).items():
            key = f"{prefix}_{clip_path(path).replace('.', '_')}"
            out |= {f"{key}.lora_down.weight": part["A"], f"{key}.lora_up.weight": part["B"],
                    f"{key}.alpha": torch.tensor(float(part["scale"] * part["A"].shape[0]))}
    return {k: v.detach().to("cpu", dtype if v.dim() else torch.float32).contiguous() for k, v in out.items()}


def flux_names(layers: dict[str, dict], features, double_blocks: int, single_blocks: int) -> dict[str, torch.Tensor]:
    """Transformer LoRA layers (diffusers path -> {"A", "B", "scale"}) -> sd-scripts' fused layers; `features(path)`
    gives a layer's (in, out). Every trained layer must land in one of them."""
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    for bfl, diffusers_name, table, count in (("double_blocks", "transformer_blocks", FLUX_DOUBLE, double_blocks),
                                              ("single_blocks", "single_transformer_blocks", FLUX_SINGLE, single_blocks)):
        for i in range(count):
            for name, members in table.items():
                paths = [f"{diffusers_name}.{i}.{m}" for m in members]
                parts = [layers.get(p) for p in paths]
                if all(p is None for p in parts):
                    continue
                shapes = [features(p) for p in paths]
                if len({n_in for n_in, _ in shapes}) != 1:
                    raise UserError(f"single-file export: {paths} do not share an input, so they fuse into no layer")
                down, up, alpha = fuse(parts, shapes[0][0], [n_out for _, n_out in shapes])
                key = f"lora_unet_{bfl}_{i}_{name}"
                out |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": torch.tensor(float(alpha))}
                used |= {p for p, part in zip(paths, parts) if part is not None}
    missing = sorted(set(layers) - used)
    if missing:
        raise UserError(f"single-file export: {missing[0]} (and {len(missing) - 1} more) have no sd-scripts Flux name")
    return out


def sd3_single_file(modules: dict[str, torch.nn.Module], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """diffusers' SD3 keys with alpha/r folded into lora_B, so readers that ignore metadata apply the trained scale."""
    out = {}
    for component, layers in lora_parts(modules).items():
        for path, part in layers.items():
            out[f"{component}.{path}.lora_A.weight"] = part["A"]
            out[f"{component}.{path}.lora_B.weight"] = part["B"] * part["scale"]
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in out.items()}


WRITERS = {"flux": flux_kohya, "sd3": sd3_single_file}
METADATA = {  # what ComfyUI's and Forge's model browsers show (sd-scripts' ss_* and Stability's ModelSpec keys)
    "flux": {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1",
             "modelspec.architecture": "flux-1-dev/lora", "modelspec.implementation": "https://github.com/black-forest-labs/flux"},
    "sd3": {"ss_network_module": "networks.lora_sd3", "ss_base_model_version": "sd3",
            "modelspec.architecture": "stable-diffusion-v3-medium/lora",
            "modelspec.implementation": "https://github.com/Stability-AI/sd3-ref"},
}


def export(out_dir: str | Path, modules: dict[str, torch.nn.Module], family: str, title: str,
           dtype: torch.dtype) -> Path | None:
    """Write lora_kohya.safetensors for an MMDiT family atomically; None (with a warning) where the LoRA has no such
    form: the diffusers-format file beside it still holds it, and training is not lost to an export error."""
    try:
        tensors = WRITERS[family](modules, dtype)
    except UserError as e:
        print(f"warning: no {KOHYA_WEIGHTS} written: {e}", flush=True)
        return None
    return write_atomically(Path(out_dir) / KOHYA_WEIGHTS, tensors,
                            METADATA[family] | {"modelspec.title": title, "ss_training_comment": "difftune"})
