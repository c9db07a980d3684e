"""The typed recipe schema: one frozen dataclass per section, a default and a comment per field.

A recipe is YAML; `a.b=value` overrides on the command line change single fields. An unknown key, a wrong
type or an out-of-range value raises ConfigError naming the dotted key, so a typo never trains silently.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from trainers.errors import ConfigError

REQUIRED: Any = "???"  # a field the recipe must set


def _f(default: Any, *, min: float | None = None, max: float | None = None) -> Any:
    """A field with an optional inclusive range, checked at load time."""
    return field(default=default, metadata={"min": min, "max": max})


ranged = _f  # for the Options of objectives, declared in their own modules


@dataclass(frozen=True)
class ModelConfig:
    pretrained: str = REQUIRED          # hub id, local diffusers folder, or single-file .safetensors/.ckpt
    family: str = "auto"                # backbone family (sd15, ...); auto reads the model's own config
    revision: Optional[str] = None      # hub revision: branch, tag or commit
    variant: Optional[str] = None       # weight variant on the hub, e.g. "fp16"
    t5: bool = True                     # sd3: false leaves T5-XXL unloaded (its tokens zeros, ~9 GB less memory)
    max_sequence_length: Optional[int] = _f(None, min=1)  # T5 tokens per caption; None: the pipeline's (sd3 256,
                                        # flux 512); sampling uses the same
    guidance: Optional[float] = _f(None, min=0.0)  # flux dev (guidance-distilled): the guidance value training
                                        # feeds its guidance embedding; None: 1.0


@dataclass(frozen=True)
class SourceConfig:
    source: str = REQUIRED              # another prepared dataset or imagefolder
    repeats: int = _f(1, min=1)         # how often each image appears per epoch (kohya's repeats)
    loss_weight: float = _f(1.0, min=0.0)  # e.g. prior preservation's lambda for class images


@dataclass(frozen=True)
class DataConfig:
    source: str = REQUIRED              # `datasets_prep prepare` output, or an imagefolder with metadata.jsonl
    repeats: int = _f(1, min=1)         # of data.source, relative to extra_sources
    loss_weight: float = _f(1.0, min=0.0)
    extra_sources: tuple[SourceConfig, ...] = ()  # trained together with data.source (DreamBooth: class images)
    resolution: int = _f(512, min=8)    # imagefolder: square side after resize + crop; prepared: must match
    center_crop: bool = True            # False: a random crop (seeded per sample)
    random_flip: bool = False           # horizontal flip with p=0.5; off when captions name left/right
    caption_column: str = "text"
    num_workers: int = _f(2, min=0)     # DataLoader worker processes decoding images
    max_samples: Optional[int] = _f(None, min=1)  # use only the first N records (debugging)
    use_cache: bool = True              # use `datasets_prep cache` latents/text of this model when present
    trigger_words: tuple[str, ...] = ()  # words the captions use for the new concept (e.g. "sks"); on the card
    # masked loss: a greyscale image per training image (white = the subject the loss is about), named by this
    # metadata column of an imagefolder (prepared datasets carry the masks prepare found), or the image's alpha
    mask_column: str = "mask"
    mask_from_alpha: bool = False       # imagefolder: the image's alpha channel is its mask (opaque: all subject)


@dataclass(frozen=True)
class FlowConfig:
    # rectified-flow training (sd3 and flux models, or objective.schedule: flow): how t is drawn and the velocity
    # loss weighted (Esser et al. 2024, sections 3.1 and 5.3.2)
    timestep_sampler: Literal["uniform", "logit_normal", "mode"] = "logit_normal"
    logit_mean: float = 0.0             # logit_normal: t = sigmoid(mean + std * n)
    logit_std: float = _f(1.0, min=0.0)
    mode_scale: float = 1.29            # mode: heavier tails as it grows (SD3's s)
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"  # SD3's loss weightings; none: plain MSE
    shift: Optional[float] = _f(None, min=0.0)  # t -> s t / (1 + (s - 1) t); None: the model scheduler's (sd3: 3.0;
                                        # flux dev: by image size); setting it turns Flux's dynamic shift off


@dataclass(frozen=True)
class ObjectiveConfig:
    # What every objective reads; an objective's own options are the section named after it
    # (objective.consistency.skip, ...), declared as `Options` in its module (trainers/objectives/<name>.py).
    name: str = "finetune"              # which recipe trainer: see trainers/objectives/__init__.py
    prediction_type: Optional[Literal["epsilon", "v_prediction"]] = None  # None: the model scheduler's
    snr_gamma: Optional[float] = _f(None, min=0.0)  # min-SNR-gamma weighting (Hang et al. 2023); 5.0 typical
    noise_offset: float = _f(0.0, min=0.0)          # per-channel offset noise; 0.05-0.1 helps very dark/bright
    zero_terminal_snr: bool = False     # rescale betas so the last step is pure noise (Lin et al. 2024)
    caption_dropout: float = _f(0.0, min=0.0, max=1.0)  # p of training on the empty prompt (for CFG)
    caption_dropout_per_encoder: bool = False  # sd3, flux: each text encoder's input dropped on its own with
                                        # p = caption_dropout (SD3 trains so, which lets T5 be left out when sampling)
    mask_floor: float = _f(0.0, min=0.0, max=1.0)  # with masks: the loss weight of the background (0 ignores it)
    schedule: Literal["model", "flow"] = "model"  # the noise process trained: the model's own, or rectified flow
                                        # on a VP model (uvit, dit: the model learns velocity; exports sample with
                                        # FlowMatchEulerDiscreteScheduler)
    flow: FlowConfig = field(default_factory=FlowConfig)
    sections: dict = field(default_factory=dict, repr=False)  # objective name -> its Options (built by the loader)

    def __getattr__(self, name: str) -> Any:
        """`objective.<name>`: that objective's options as the recipe set them, or their defaults."""
        if name.startswith("_") or name == "sections":
            raise AttributeError(name)
        if name in self.sections:
            return self.sections[name]
        options = _objective_options(name)
        if options is None:
            raise AttributeError(f"objective has no option section {name!r}")
        return options()


@dataclass(frozen=True)
class AdapterConfig:
    # lora: low-rank factors B A; dora (Liu et al. 2024): LoRA on the direction plus a trained magnitude per output
    # feature (peft's use_dora; a little slower per step); loha: Hadamard product of two low-rank products (LyCORIS'
    # LoHa, rank r each: up to r^2); lokr: Kronecker product of a small and a low-rank factor (LyCORIS' LoKr);
    # full: train every denoiser weight
    kind: Literal["lora", "dora", "loha", "lokr", "full"] = "lora"
    rank: int = _f(4, min=1)
    alpha: float = _f(4.0, min=0.0)     # LoRA scale is alpha / rank
    dropout: float = _f(0.0, min=0.0, max=1.0)
    target_modules: Optional[tuple[str, ...]] = None  # None: the family's attention projections
    text_encoder: bool = False          # also train the text encoder(s): a LoRA, or all weights with kind: full
    text_encoder_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    init_from: Optional[str] = None     # a kohya/LyCORIS file (.safetensors) of adapter.kind to start from (LoRA,
                                        # DoRA, LoHa, LoKr: a LoKr's factor options must be the file's); its ranks win
    lokr_factor: int = _f(-1, min=-1)   # lokr: split each dimension as (factor, dim / factor); -1: as square as it goes
    lokr_decompose_both: bool = False   # lokr: the small Kronecker factor low-rank too

    @property
    def low_rank(self) -> bool:
        """An adapter over a frozen base (lora, dora, loha, lokr), exported alone, rather than every weight."""
        return self.kind != "full"

    @property
    def lycoris(self) -> bool:
        """LyCORIS' kinds (loha, lokr): peft trains them, but diffusers' LoRA loader does not read them."""
        return self.kind in ("loha", "lokr")


@dataclass(frozen=True)
class OptimizerConfig:
    # 8-bit (bitsandbytes) states take ~1/4 the memory; paged_ pages them to CPU under pressure (CUDA only);
    # lion8bit keeps one state (use ~3-10x lower lr than AdamW and betas [0.9, 0.99]);
    # prodigy (prodigyopt) estimates its own step size: lr multiplies it, so lr: 1.0;
    # adamw_schedulefree (schedulefree) needs no decay schedule (lr_schedule constant; warmup_steps applies) and
    # exports its averaged weights; adafactor (transformers') factored second moments, no first: full fine-tunes of
    # large models in little memory (lr as for AdamW's full fine-tunes, ~1e-5); came (came-pytorch): Adafactor's
    # factored second moment plus a first moment and a confidence scale (half AdamW's state)
    name: Literal["adamw", "adamw8bit", "paged_adamw8bit", "lion8bit", "prodigy", "adamw_schedulefree",
                  "adafactor", "came"] = "adamw"
    lr: float = _f(1e-4, min=0.0)
    text_encoder_lr: Optional[float] = _f(None, min=0.0)  # None: same as lr
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = _f(1e-2, min=0.0)
    eps: float = _f(1e-8, min=0.0)
    max_grad_norm: float = _f(1.0, min=0.0)  # 0 disables clipping
    d0: Optional[float] = _f(None, min=0.0)   # prodigy: the initial step-size estimate (None: 1e-6)
    d_coef: Optional[float] = _f(None, min=0.0)  # prodigy: scales the estimate (None: 1.0; <1 more cautious)
    safeguard_warmup: Optional[bool] = None   # prodigy: keep lr warmup out of d's estimate (None: false;
                                              # true recommended with lr_schedule.warmup_steps)


@dataclass(frozen=True)
class LRScheduleConfig:
    # wsd (warmup-stable-decay; Hu et al. 2024, Hagele et al. 2024): constant, then a linear decay to 0 over the
    # last decay_steps; a run can be lengthened while it is still stable, by raising train.max_steps on resume
    name: Literal["constant", "linear", "cosine", "wsd"] = "constant"
    warmup_steps: int = _f(0, min=0)    # linear warmup from 0, then the schedule
    decay_steps: int = _f(0, min=0)     # wsd: the length of its final decay (required, >= 1)


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = _f(1000, min=1)    # optimizer steps
    batch_size: int = _f(1, min=1)      # per process, per micro-batch
    grad_accum: int = _f(1, min=1)      # micro-batches per optimizer step
    seed: int = 0                       # all randomness (data order, noise, dropout) flows from it
    log_every: int = _f(10, min=1)      # loss is read back from the device only at these steps
    max_nonfinite_steps: int = _f(20, min=1)  # NaN/inf updates are skipped; this many in a row stops the run
    report_to: Literal["tensorboard", "wandb", "none"] = "tensorboard"  # wandb: pip install 'difftune[wandb]'


@dataclass(frozen=True)
class EMAConfig:
    enabled: bool = False               # keep an exponential moving average of the trained weights
    decay: float = _f(0.9999, min=0.0, max=1.0)


@dataclass(frozen=True)
class MemoryConfig:
    attention: Literal["sdpa", "xformers"] = "sdpa"  # xformers needs the package and a GPU
    gradient_checkpointing: bool = False  # ~30% slower steps for much less activation memory
    allow_tf32: bool = True             # faster fp32 matmuls on Ampere+ GPUs
    channels_last: bool = False         # the denoiser's conv weights in NHWC: faster convs on tensor-core GPUs
    # torch.compile the denoiser: the first steps (and each new bucket shape) pay the compile; the default backend
    # (inductor) needs a C++ compiler on CPU and Triton on GPU; reduce-overhead captures CUDA graphs
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    compile_backend: Literal["inductor", "cudagraphs", "aot_eager", "eager"] = "inductor"
    # QLoRA-style: the frozen denoiser's Linear layers held in 8 bits or 4-bit NF4 (bitsandbytes) under a LoRA
    quantize_base: Literal["none", "int8", "nf4"] = "none"


@dataclass(frozen=True)
class ValidationConfig:
    every_steps: int = _f(0, min=0)     # 0 disables sampling during training
    prompts: tuple[str, ...] = ()
    steps: int = _f(25, min=1)          # sampler steps
    guidance_scale: float = _f(7.5, min=0.0)
    images_per_prompt: int = _f(1, min=1)
    seed: int = 0
    scheduler: Literal["dpmsolver", "ddim", "euler", "lcm"] = "dpmsolver"  # lcm: consistency-distilled models
    conditioning_images: tuple[str, ...] = ()  # ControlNet: one image file per prompt (or one for all)
    # a sampler-free gauge: the objective's loss on held-out images at fixed timesteps and fixed noise
    loss_source: Optional[str] = None   # held-out imagefolder or prepared dataset; None: no held-out loss
    loss_samples: int = _f(64, min=1)   # its first N records
    loss_timesteps: tuple[int, ...] = (100, 300, 500, 700, 900)  # every sample is scored at each


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = _f(500, min=0)   # 0: only the final state is saved
    keep_last: int = _f(3, min=1)       # older checkpoints are deleted


@dataclass(frozen=True)
class ExportConfig:
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # dtype of the exported weights


@dataclass(frozen=True)
class HubConfig:
    push: bool = False                  # upload final/ at the end of training (token from HF_TOKEN)
    repo_id: Optional[str] = None       # OWNER/NAME; required when push is true
    private: bool = True
    revision: Optional[str] = None      # branch to commit to; None: the default branch


@dataclass(frozen=True)
class Recipe:
    output_dir: str = REQUIRED
    name: str = "difftune"              # shown in the model card and logs
    resume: str = "auto"                # auto: newest complete checkpoint in output_dir; none; or a path
    precision: Literal["no", "fp16", "bf16"] = "no"  # mixed precision of the trained model's compute
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LRScheduleConfig = field(default_factory=LRScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    hub: HubConfig = field(default_factory=HubConfig)


# ---- loading ---------------------------------------------------------------------------------------------

def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `a.b=value` overrides, and validate it against the schema."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: malformed YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of keys, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, item)
    return from_dict(data)


def apply_override(data: dict, item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (so 1e-4, true, [a, b] work)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    try:
        node[leaf] = yaml.safe_load(raw)
    except yaml.YAMLError:
        node[leaf] = raw


def from_dict(data: dict) -> Recipe:
    """Build a Recipe from plain data, naming the dotted key of any problem."""
    recipe = _build(Recipe, data, "")
    _check_combinations(recipe)
    return recipe


def _check_combinations(r: Recipe) -> None:
    """Settings that are valid alone but not together."""
    if r.hub.push and not r.hub.repo_id:
        raise ConfigError("'hub.repo_id' is required when hub.push is true")
    if r.validation.every_steps and not (r.validation.prompts or r.validation.loss_source):
        raise ConfigError("'validation.prompts' is empty but validation.every_steps is set; add prompts or "
                          "validation.loss_source, or set 0")


def to_dict(recipe: Recipe) -> dict:
    """Plain data for YAML: tuples become lists; objective sections sit under their names."""
    data = _plain(dataclasses.asdict(recipe))
    data["objective"] |= data["objective"].pop("sections")
    return data


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(to_dict(recipe), sort_keys=False)


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _objective_options(name: str) -> type | None:
    """The Options dataclass of a registered objective (None for a name that is not one, or has none)."""
    from trainers.objectives import OBJECTIVES, options_of  # the registry: objectives declare their own options

    return options_of(name) if name in OBJECTIVES else None


def _build_objective(data: Any, prefix: str) -> ObjectiveConfig:
    """The shared objective keys, then each section named after an objective, checked against its Options."""
    from trainers.objectives import OBJECTIVES

    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.')}' must be a mapping, got {_show(data)}")
    common = {k: v for k, v in data.items() if k not in OBJECTIVES}
    config = _build(ObjectiveConfig, common, prefix, extra_keys=list(OBJECTIVES))
    if config.name not in OBJECTIVES:
        raise ConfigError(f"'{prefix}name' must be one of {', '.join(map(repr, OBJECTIVES))}; got {config.name!r}")
    sections = {}
    for name in dict.fromkeys([*(k for k in data if k in OBJECTIVES), config.name]):  # each once, in order
        options = _objective_options(name)
        if options is None:
            if name in data:
                raise ConfigError(f"'{prefix}{name}': the {name} objective has no options of its own; remove it")
            continue
        sections[name] = _build(options, data.get(name, {}), f"{prefix}{name}.")
    return dataclasses.replace(config, sections=sections)


def _build(cls: type, data: Any, prefix: str, extra_keys: typing.Sequence[str] = ()) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'recipe'}' must be a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "sections"}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), [*fields, *extra_keys], n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}")
    values = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in data:
            if f.default is REQUIRED:
                raise ConfigError(f"missing required key '{key}'")
            if dataclasses.is_dataclass(hints[name]):  # an absent section may still have required keys
                values[name] = _coerce(hints[name], {}, key)
            continue
        values[name] = _coerce(hints[name], data[name], key)
        _check_range(f, values[name], key)
    return cls(**values)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting lists to tuples and ints to floats."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is ObjectiveConfig:
        return _build_objective(value, key + ".")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` (precision: no) as false
            value = "no"
        if value not in args:
            raise ConfigError(f"'{key}' must be one of {', '.join(map(repr, args))}; got {_show(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {_show(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"'{key}' must be a list of {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (str, bool):
        if type(value) is tp:
            return value
    else:
        raise TypeError(f"schema type {tp} of '{key}' is not supported")
    raise ConfigError(f"'{key}' must be {tp.__name__}, got {_show(value)}")


def _check_range(f: dataclasses.Field, value: Any, key: str) -> None:
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if value is None or isinstance(value, bool):
        return
    if lo is not None and value < lo or hi is not None and value > hi:
        bounds = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise ConfigError(f"'{key}' must be {bounds}, got {value!r}")


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"
