"""LoRA and DoRA through peft: inject into a denoiser or text encoder, and save in diffusers' loadable format.

LoRA (Hu et al. 2021) adds W0 x + (alpha / r) B A x with B initialised to zero, so training starts from the
base model exactly. DoRA (Liu et al. 2024) trains a magnitude m per output feature beside it:
m (W0 + s B A) / ||W0 + s B A||, with m initialised to ||W0||, so it too starts at the base. The LoraConfig
travels in the safetensors metadata, so loaders use the real alpha/r scale (and know a DoRA file).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from trainers.config import AdapterConfig

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def add_lora(module: torch.nn.Module, cfg: AdapterConfig, target_modules: tuple[str, ...]) -> None:
    """Freeze `module` and add a trainable adapter of adapter.kind (LoRA, DoRA, LoHa, LoKr) named 'default' to its
    target layers."""
    from peft import LoraConfig

    from trainers.errors import ConfigError

    names = [name for name, _ in module.named_modules()]
    unmatched = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise ConfigError(f"'adapter.target_modules': {', '.join(unmatched)} match no layer of "
                          f"{type(module).__name__} (e.g. {', '.join(n for n in names[-3:] if n)})")
    module.requires_grad_(False)
    module.add_adapter(adapter_config(cfg, target_modules))


def adapter_config(cfg: AdapterConfig, target_modules: tuple[str, ...]):
    """peft's config for adapter.kind; each starts with a zero update (B, one Hadamard factor, the Kronecker w2)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    from trainers.errors import ConfigError

    if cfg.kind != "lokr" and (cfg.lokr_factor != -1 or cfg.lokr_decompose_both):
        raise ConfigError(f"'adapter.lokr_factor' and 'adapter.lokr_decompose_both' are LoKr options; adapter.kind "
                          f"is {cfg.kind}: remove them")
    if cfg.kind in ("lora", "dora"):
        return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, init_lora_weights=True,
                          target_modules=list(target_modules), use_dora=cfg.kind == "dora")
    if cfg.dropout:
        raise ConfigError(f"'adapter.dropout': {cfg.kind} has no input dropout (LyCORIS' rank and module dropout "
                          "are another thing); set it to 0")
    if cfg.kind == "loha":
        return LoHaConfig(r=cfg.rank, alpha=cfg.alpha, target_modules=list(target_modules), init_weights=True)
    return LoKrConfig(r=cfg.rank, alpha=cfg.alpha, target_modules=list(target_modules), init_weights=True,
                      decompose_factor=cfg.lokr_factor, decompose_both=cfg.lokr_decompose_both)


def save_peft(out_dir: Path, modules: dict[str, torch.nn.Module], dtype: torch.dtype) -> list[Path]:
    """Each component's adapter in peft's own layout, `<component>/adapter_config.json` and
    `adapter_model.safetensors`: what peft's `inject_adapter_in_model` + `set_peft_model_state_dict` load (diffusers'
    `load_lora_weights` reads LoRA and DoRA only)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    written = []
    for name, module in modules.items():
        folder = Path(out_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(module, save_embedding_layers=False)
        save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()},
                  folder / "adapter_model.safetensors")
        module.peft_config["default"].save_pretrained(str(folder))
        written.append(folder)
    return written


def lora_layers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights in peft spelling (lora_A/lora_B), which diffusers loads for every target layer.

    (diffusers' own .lora.down/.lora.up spelling covers attention projections only; a mixed file loses the
    rest on load.) CLIP keys get back the `text_model.` level that transformers 5 dropped, as ComfyUI expects;
    other models (a U-Net, a transformer, T5, whose keys also start with `encoder.`) keep their own paths.
    """
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(module, save_embedding_layers=False)
    is_clip = getattr(getattr(module, "config", None), "model_type", "").startswith("clip")
    if hasattr(module, "text_model") or not is_clip:
        return state
    return {("text_model." + k if k.startswith(("encoder.", "embeddings.", "final_layer_norm.")) else k): v
            for k, v in state.items()}


def lora_metadata(module: torch.nn.Module) -> dict:
    return module.peft_config["default"].to_dict()


def save_lora(out_dir: Path, pipeline_cls, denoiser_key: str, denoiser, text_encoders: dict,
              dtype: torch.dtype) -> Path:
    """Write pytorch_lora_weights.safetensors that `pipe.load_lora_weights(out_dir)` loads."""
    cast = lambda sd: {k: v.detach().to("cpu", dtype).contiguous() for k, v in sd.items()}  # noqa: E731
    kwargs = {f"{denoiser_key}_lora_layers": cast(lora_layers(denoiser)),
              f"{denoiser_key}_lora_adapter_metadata": lora_metadata(denoiser)}
    for name, encoder in text_encoders.items():
        if getattr(encoder, "peft_config", None):
            kwargs[f"{name}_lora_layers"] = cast(lora_layers(encoder))
            kwargs[f"{name}_lora_adapter_metadata"] = lora_metadata(encoder)
    pipeline_cls.save_lora_weights(str(out_dir), weight_name=LORA_WEIGHTS, safe_serialization=True, **kwargs)
    return Path(out_dir) / LORA_WEIGHTS


def merged_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A float32 copy of `module` with its LoRA folded into the weights and peft's layers gone: a plain model
    that saves and loads like the base (what a LoRA-trained student becomes when it needs new modules too)."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    out = copy.deepcopy(module).float()
    for name, layer in list(out.named_modules()):
        if isinstance(layer, BaseTunerLayer):
            layer.merge()
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent), child, layer.get_base_layer())
    if hasattr(out, "peft_config"):  # diffusers' mark of an attached adapter: there is none left
        del out.peft_config
    out._hf_peft_config_loaded = False
    return out.requires_grad_(False)


@contextlib.contextmanager
def swapped_in(params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]):
    """Run with `tensors` in place of the parameters' data (an EMA target, a previous stage's LoRA), no copies."""
    live = {k: p.data for k, p in params.items()}
    for k, p in params.items():
        p.data = tensors[k]
    try:
        yield
    finally:
        for k, p in params.items():
            p.data = live[k]


def tuner_layers(module: torch.nn.Module) -> list:
    """peft's adapter layers inside `module` (what adapters_off switches)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_off(layers: list):
    """The base model: every LoRA layer passes its input through the frozen weight alone.

    Sets peft's flag directly: its enable_adapters() would also flip requires_grad of the LoRA weights
    on every call (tests/test_consistency.py checks the result equals the base model).
    """
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer in layers:
            layer._disable_adapters = False


def set_active(layers: list, name: str) -> None:
    """Make adapter `name` the one peft's layers run, leaving every adapter's requires_grad as it is (peft's
    set_adapter would freeze the others, and two trained adapters share one model in DMD2)."""
    for layer in layers:
        layer._active_adapter = name


@contextlib.contextmanager
def active(layers: list, name: str):
    """Run with adapter `name` in place of the active one."""
    saved = [layer._active_adapter for layer in layers]
    set_active(layers, name)
    try:
        yield
    finally:
        for layer, before in zip(layers, saved):
            layer._active_adapter = before


def student_from(teacher: torch.nn.Module, embedding_dim: int, key: str = "guidance_embedding_dim") -> torch.nn.Module:
    """A float32 copy of a teacher denoiser; with embedding_dim, a U-Net with a guidance (omega) embedding that
    starts at zero, so the student begins as the teacher (full LCM, guided progressive distillation)."""
    import copy

    from trainers.errors import ConfigError

    if not embedding_dim:
        return copy.deepcopy(teacher).float().requires_grad_(True)
    if "time_cond_proj_dim" not in getattr(teacher, "config", {}):
        raise ConfigError(f"'{key}': {type(teacher).__name__} has no guidance embedding (only "
                          "U-Nets have time_cond_proj_dim); set it to 0")
    student = type(teacher).from_config({**teacher.config, "time_cond_proj_dim": embedding_dim})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("time_embedding.cond_proj") for k in missing), (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)  # omega enters as 0: the student is the teacher
    return student.float().requires_grad_(True)
