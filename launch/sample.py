"""Render one PNG grid (rows = prompts, columns = images per prompt) from a pipeline folder, to look at a result.

With --controlnet DIR and --image FILE (one per prompt, or one for all) a trained ControlNet conditions the
pipeline (StableDiffusion(XL)ControlNetPipeline around the same components)."""

import argparse
import sys
from pathlib import Path

from trainers.errors import UserError
from trainers.schedulers import SCHEDULERS, for_vp_pipeline, set_scheduler
from trainers.versions import check_versions


def positive_int(text: str) -> int:
    """Reject zero and negatives at parse time, so the user gets argparse's one-line error."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; sizes default to None so the pipeline picks its own."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pipeline", required=True, type=Path, help="diffusers pipeline folder (model_index.json)")
    parser.add_argument("--lora", type=Path, help="LoRA folder or weights file to load on top")
    parser.add_argument("--controlnet", type=Path, help="a ControlNet folder (config.json) to condition on --image")
    parser.add_argument("--image", type=Path, action="append", default=[],
                        help="the ControlNet's conditioning image; repeat for one per prompt")
    parser.add_argument("--scheduler", choices=["default", *SCHEDULERS], default="default")
    parser.add_argument("--steps", required=True, type=positive_int, help="inference steps")
    parser.add_argument("--prompt", required=True, action="append", help="repeat for more rows")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images-per-prompt", type=positive_int, default=1)
    parser.add_argument("--height", type=positive_int, help="default: the pipeline's own")
    parser.add_argument("--width", type=positive_int, help="default: the pipeline's own")
    parser.add_argument("--out", type=Path, default=Path("samples.png"))
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    return parser.parse_args(argv)


def check_paths(args: argparse.Namespace) -> None:
    """Fail before importing torch, so a mistyped path costs one line and no wait."""
    if not (args.pipeline / "model_index.json").is_file():
        raise UserError(f"pipeline folder not found (no model_index.json): {args.pipeline}")
    if args.lora is not None and not args.lora.exists():
        raise UserError(f"LoRA path not found: {args.lora}")
    if args.controlnet is not None and not (args.controlnet / "config.json").is_file():
        raise UserError(f"ControlNet folder not found (no config.json): {args.controlnet}")
    if (args.controlnet is None) != (not args.image):
        raise UserError("--controlnet and --image go together: a ControlNet samples from a conditioning image")
    if len(args.image) not in (0, 1, len(args.prompt)):
        raise UserError(f"{len(args.image)} --image for {len(args.prompt)} --prompt; give one per prompt, or one")
    for image in args.image:
        if not image.is_file():
            raise UserError(f"--image not found: {image}")


def resolve_device(name: str) -> str:
    """Pick CUDA when asked for auto and present; refuse cuda without it rather than crash later."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda given but CUDA is not available")
    return name


def load_pipeline(path: Path, device: str, dtype: str):
    """Load any DiffusionPipeline, leaving out the safety checker where the pipeline has one."""
    import torch
    from diffusers import DiffusionPipeline

    from trainers.backbones import FAMILIES, coord_unet, family_of_pipeline, uvit_pipeline  # noqa: F401

    config = DiffusionPipeline.load_config(path)
    extra = {}
    if "safety_checker" in config:
        extra["safety_checker"] = None
    if "requires_safety_checker" in config:
        extra["requires_safety_checker"] = False
    family = family_of_pipeline(config.get("_class_name", ""))  # e.g. stock PixArt has no load_lora_weights:
    cls = FAMILIES[family].pipeline_class() if family else DiffusionPipeline  # its family's class adds it
    pipe = cls.from_pretrained(path, dtype=getattr(torch, dtype), **extra)
    return pipe.to(device)


def check_size(pipe, args: argparse.Namespace) -> None:
    """Refuse sizes the VAE cannot map to latents, naming the factor instead of a traceback."""
    factor = getattr(pipe, "vae_scale_factor", 1)
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value % factor:
            raise UserError(f"{flag} {value} is not a multiple of the VAE scale factor {factor}")


def conditioning_images(paths: list[Path], prompts: int) -> list:
    """The --image files as RGB, one per prompt."""
    from PIL import Image

    images = []
    for path in paths:
        try:
            images.append(Image.open(path).convert("RGB"))
        except OSError as error:
            raise UserError(f"--image {path}: {error}") from None
    return images * prompts if len(images) == 1 else images


def generate(pipe, args: argparse.Namespace) -> list:
    """Run the pipeline once for all prompts; images come back prompt by prompt."""
    import torch

    from trainers.schedulers import check_steps, seeded_sampling

    check_steps(pipe.scheduler, args.steps)
    sizes = {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}
    if args.image:
        sizes["image"] = conditioning_images(args.image, len(args.prompt))
    with seeded_sampling(args.seed):
        return pipe(
            prompt=args.prompt,
            num_images_per_prompt=args.images_per_prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=torch.Generator("cpu").manual_seed(args.seed),
            **sizes,
        ).images


def sample(args: argparse.Namespace) -> Path:
    """Load, configure, generate and save the grid; returns where it was written."""
    from trainers.images import make_grid

    check_paths(args)
    device = resolve_device(args.device)
    try:
        pipe = load_pipeline(args.pipeline, device, args.dtype)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"cannot load a pipeline from {args.pipeline}: {str(error).splitlines()[0]}") from None
    check_size(pipe, args)
    if args.lora is not None:
        load_lora(pipe, args.lora)
        use_exported_scheduler(pipe, args.lora)  # then --scheduler picks among what samples it (flow stays flow)
    if args.scheduler != "default":
        set_scheduler(pipe, args.scheduler)
    if args.controlnet is not None:
        pipe = with_trained_controlnet(pipe, args.controlnet, args.dtype)
    grid = make_grid(generate(pipe, args), rows=len(args.prompt), cols=args.images_per_prompt)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    return args.out


def use_exported_scheduler(pipe, lora: Path) -> None:
    """An export's own sampler (an LCM-LoRA's scheduler/: its grid and timestep scaling; a LoRA trained by rectified
    flow: its flow scheduler) replaces the base's."""
    config_file = lora / "scheduler" / "scheduler_config.json"
    if lora.is_dir() and config_file.is_file():
        import json

        import diffusers

        config = json.loads(config_file.read_text())
        pipe.scheduler = for_vp_pipeline(getattr(diffusers, config["_class_name"]).from_config(config))


def with_trained_controlnet(pipe, folder: Path, dtype: str):
    """The ControlNet pipeline of `pipe` with the ControlNet in `folder` (its own class, our CoordControlNetModel
    included); a folder that cannot load is a UserError."""
    import torch

    from trainers.objectives.controlnet import load_controlnet, with_controlnet

    try:
        controlnet = load_controlnet(folder, torch_dtype=getattr(torch, dtype))
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"cannot load the ControlNet in {folder}: {error}") from None
    return with_controlnet(pipe, controlnet.to(pipe.device))


def load_lora(pipe, lora: Path) -> None:
    """pipe.load_lora_weights on a folder, or on a single weights file (its folder plus weight_name); a file that
    is not safetensors is refused before anything reads it (no pickles), and a LoRA that will not load is one line."""
    from trainers.integrity import Damaged, nonfinite_tensor

    lora = Path(lora)
    if lora.is_file():
        try:
            nonfinite_tensor(lora)
        except Damaged as error:
            raise UserError(f"--lora {lora} is not a LoRA weights file: {error}") from None
    where = {"weight_name": lora.name} if lora.is_file() else {}
    try:
        pipe.load_lora_weights(str(lora.parent if lora.is_file() else lora), **where)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise UserError(f"cannot load LoRA {lora}: {str(error).strip().splitlines()[0]}") from None


def main(argv: list[str] | None = None) -> int:
    """Entry point; a UserError becomes one line on stderr and exit code 2, not a traceback."""
    args = parse_args(argv)
    try:
        check_versions()
        print(sample(args))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
