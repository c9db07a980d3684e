"""A quantised frozen base under a LoRA (QLoRA-style): the denoiser's Linear layers become bitsandbytes int8 or
4-bit NF4 layers before the LoRA wraps them, so the frozen weights of those layers take 1 or about 0.5 bytes a
parameter instead of 2 (bf16) or 4. Convolutions stay as they are (bitsandbytes has no quantised conv).

The quantisation happens when the layers first move to their device (bitsandbytes does it in `.to()`), on the
machine that trains; nothing quantised is ever written: checkpoints and exports hold the LoRA alone, and a resumed
run quantises the same base again. Works on CUDA and, more slowly, on CPU (bitsandbytes >= 0.45).
"""
from __future__ import annotations

import torch

from trainers.config import Recipe
from trainers.errors import UserError


def check(recipe: Recipe, objective_cls, deepspeed: bool) -> None:
    """Refuse, before anything loads, the combinations a quantised base cannot serve."""
    kind = recipe.memory.quantize_base
    if not recipe.adapter.low_rank:
        raise UserError(f"memory.quantize_base: {kind} quantises the frozen base under a LoRA, but adapter.kind is "
                        f"{recipe.adapter.kind!r} (every weight trains); use adapter.kind: lora or "
                        "memory.quantize_base: none")
    if recipe.adapter.lycoris:
        raise UserError(f"memory.quantize_base: peft's {recipe.adapter.kind} layers wrap plain Linear layers, not "
                        "bitsandbytes' quantised ones; use adapter.kind: lora or dora, or memory.quantize_base: none")
    if not objective_cls.exports_adapter_only:
        raise UserError(f"memory.quantize_base: the {recipe.objective.name} objective exports weights merged with "
                        "the base, which a quantised base would degrade; use memory.quantize_base: none")
    if deepspeed:
        raise UserError("memory.quantize_base: DeepSpeed ZeRO cannot shard bitsandbytes' quantised weights; use a "
                        "DDP config (accelerate_configs/multi_gpu.yaml) or memory.quantize_base: none")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(f"memory.quantize_base: {kind} needs bitsandbytes (pip install bitsandbytes)") from None


def nf4_fits(linear: torch.nn.Linear) -> bool:
    """NF4 quantises blocks of 64 weights, and bitsandbytes' CPU kernels pack 32 output rows at a time. Every Linear
    of real SD-1.5/SDXL/PixArt models fits (widths 320, 640, 768, 1152, 1280, ...); narrower ones (tiny models)
    stay as they are."""
    return linear.in_features % 64 == 0 and linear.out_features % 32 == 0


def quantize_linears(module: torch.nn.Module, kind: str, compute_dtype: torch.dtype) -> int:
    """Replace the nn.Linear layers of `module` by frozen bitsandbytes layers with the same weights; returns how many.

    The rest of the module is cast to `compute_dtype` first, so that nothing casts the quantised weights later.
    """
    if any(p.dtype != compute_dtype for p in module.parameters()):  # diffusers warns on any cast
        module.to(compute_dtype)
    module.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # the layers' own init draws must not shift the run's seeded stream
        count = _replace_linears(module, kind, compute_dtype)
    return count


def _replace_linears(module: torch.nn.Module, kind: str, compute_dtype: torch.dtype) -> int:
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and (kind != "nf4" or nf4_fits(child)):
                setattr(parent, name, _quantized(child, kind, compute_dtype))
                count += 1
    return count


def _quantized(linear: torch.nn.Linear, kind: str, compute_dtype: torch.dtype) -> torch.nn.Module:
    import bitsandbytes as bnb

    has_bias = linear.bias is not None
    weight = linear.weight.data
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                  compute_dtype=compute_dtype, quant_type="nf4", device=weight.device)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    elif kind == "int8":  # LLM.int8(): outlier features above the threshold stay in 16 bits
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=6.0, device=weight.device)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        raise ValueError(f"unknown quantisation {kind!r}")
    if has_bias:
        layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    # bitsandbytes returns the input's dtype, where an autocast Linear returns the compute dtype: a float32 input (a
    # time embedding, say) would then meet bf16 weights in the next layer
    layer.register_forward_hook(lambda _module, _args, out: out.to(compute_dtype))
    return layer


def quantized_layers(module: torch.nn.Module) -> int:
    """How many of `module`'s layers hold bitsandbytes-quantised weights (after they reached their device)."""
    return sum(type(p).__name__ in ("Params4bit", "Int8Params") and p.dtype in (torch.uint8, torch.int8)
               for p in module.parameters())


def logical_numel(p: torch.Tensor) -> int:
    """Parameters a tensor stands for: a packed 4-bit weight holds two in each byte."""
    state = getattr(p, "quant_state", None)
    return state.shape.numel() if state is not None and p.dtype == torch.uint8 else p.numel()


def bytes_saved(module: torch.nn.Module, kind: str) -> int:
    """What quantize_linears would save on `module`'s frozen weights, counted without quantising (dry runs on the
    meta device): 1 byte a weight for int8, half a byte for NF4, instead of the weights' own size."""
    per_weight = {"int8": 1.0, "nf4": 0.5}[kind]
    return int(sum(m.weight.numel() * (m.weight.element_size() - per_weight) for m in module.modules()
                   if type(m) is torch.nn.Linear and not m.weight.requires_grad and (kind != "nf4" or nf4_fits(m))))
