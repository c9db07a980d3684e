"""Memory and speed options: attention backend, gradient checkpointing, TF32, channels_last, torch.compile."""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from trainers.config import MemoryConfig
from trainers.errors import UserError


def configure(modules: dict[str, torch.nn.Module], denoiser_key: str, cfg: MemoryConfig,
              recompute_context: Optional[Callable] = None) -> None:
    """Apply the recipe's memory options to the trained modules (the denoiser first of all).

    recompute_context: called as each checkpointed block runs forward, it returns a context in which that block is
    recomputed during backward (an objective that switches adapters between forwards restores the one that ran).
    """
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.attention == "xformers":
        from diffusers import ModelMixin

        for module in modules.values():  # the denoiser, and a ControlNet beside it (text encoders keep SDPA)
            if isinstance(module, ModelMixin):
                enable_xformers(module)
    if cfg.gradient_checkpointing:
        for module in modules.values():
            if hasattr(module, "enable_gradient_checkpointing"):  # diffusers models
                module.enable_gradient_checkpointing(checkpointing_in(recompute_context) if recompute_context else None)
            else:  # transformers models
                module.gradient_checkpointing_enable()
    denoiser = modules.get(denoiser_key)
    if denoiser is not None and cfg.channels_last:
        denoiser.to(memory_format=torch.channels_last)  # 4-D weights only; convs then run NHWC whatever the input
    if denoiser is not None and cfg.compile:
        # in place (nn.Module.compile): parameter names, checkpoints and exports stay those of the plain module
        denoiser.compile(mode=None if cfg.compile_mode == "default" else cfg.compile_mode,
                         backend=cfg.compile_backend)


def enable_xformers(denoiser: torch.nn.Module) -> None:
    from diffusers import ModelMixin

    if not any(hasattr(m, "set_use_memory_efficient_attention_xformers") and not isinstance(m, ModelMixin)
               for m in denoiser.modules()):  # diffusers would find no attention layer to switch and say nothing
        raise UserError(f"memory.attention: xformers does not apply to {type(denoiser).__name__}: its attention is "
                        "PyTorch SDPA, which already picks a memory-efficient kernel; use memory.attention: sdpa")
    try:
        import xformers  # noqa: F401
    except ImportError:
        raise UserError("memory.attention: xformers is not installed (pip install 'difftune[xformers]'); "
                        "use memory.attention: sdpa") from None
    if not torch.cuda.is_available():
        raise UserError("memory.attention: xformers needs a CUDA GPU; use memory.attention: sdpa")
    denoiser.enable_xformers_memory_efficient_attention()


def checkpointing_in(recompute_context: Callable) -> Callable:
    """diffusers' gradient-checkpointing function (non-reentrant, as its default), with each block recomputed in
    the context `recompute_context()` captured when the block ran forward."""
    def checkpointed(module, *args):
        restore = recompute_context()
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False,
                                                 context_fn=lambda: (contextlib.nullcontext(), restore))
    return checkpointed
