"""Denoising loss of text-to-image runs at fixed noise levels, to see where one denoiser lags another (issue #5).

A run's training loss mixes every timestep; this evaluates each run's raw (non-EMA) weights at a checkpoint
on the same images, captions and noise at a few timesteps, in the run's own parameterisation (eps or v). Name a
run folder (with --step) or a checkpoint folder RUN/checkpoints/step-N.

    python bench/loss_by_timestep.py teacher_work/runs/unet_bench/checkpoints/step-3000 \
        teacher_work/runs/uvit_lowlr/checkpoints/step-2250 --data teacher_work/data/shapes
    # the mean over N evenly spaced timesteps estimates what the training loss averages (t uniform)
    python bench/loss_by_timestep.py RUN_A/checkpoints/step-N RUN_B/checkpoints/step-N --uniform 20
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.diffusion import add_noise, alpha_sigma, target_for  # noqa: E402

TIMESTEPS = (10, 50, 100, 200, 300, 500, 700, 900, 990)


def load_denoiser(run: Path, step: int):
    """(denoiser, text encoder, tokenizer, VAE, scheduler); denoiser and text encoder hold checkpoint `step`'s raw
    (non-EMA) weights."""
    import yaml
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer

    from trainers.backbones.coord_unet import CoordUNet2DConditionModel
    from trainers.backbones.uvit_model import UViT2DModel

    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    start = Path(recipe["model"]["pretrained"])
    final = run / "final" if (run / "final" / "scheduler").is_dir() else start  # a run stopped early: its start
    name = "transformer" if (final / "transformer").is_dir() else "unet"
    classes = {c.__name__: c for c in (UNet2DConditionModel, CoordUNet2DConditionModel, UViT2DModel)}
    config = json.loads((final / name / "config.json").read_text())
    denoiser = classes[config["_class_name"]].from_pretrained(final / name)
    text_encoder = CLIPTextModel.from_pretrained(final / "text_encoder" if (final / "text_encoder").is_dir()
                                                 else start / "text_encoder")
    weights = load_file(run / "checkpoints" / f"step-{step}" / "weights.safetensors")
    for prefix, module in ((f"model.{name}.", denoiser), ("model.text_encoder.", text_encoder)):
        state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        if state:
            module.load_state_dict(state)
    scheduler = DDPMScheduler.from_pretrained(final / "scheduler")
    return (denoiser.eval(), text_encoder.eval(), CLIPTokenizer.from_pretrained(start / "tokenizer"),
            AutoencoderKL.from_pretrained(start / "vae").eval(), scheduler)


def images_and_captions(data: Path, n: int) -> tuple[torch.Tensor, list[str]]:
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()[:n]]
    pixels = [np.asarray(Image.open(data / r["file_name"]).convert("RGB"), dtype=np.float32) for r in rows]
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) / 127.5 - 1, [r["text"] for r in rows]


@torch.no_grad()
def losses_by_timestep(run: Path, step: int, data: Path, n: int, timesteps=TIMESTEPS, chunk: int = 64) -> dict[int, float]:
    denoiser, text_encoder, tokenizer, vae, scheduler = load_denoiser(run, step)
    pixels, captions = images_and_captions(data, n)
    latents = torch.cat([vae.encode(p).latent_dist.mean for p in pixels.split(chunk)]) * vae.config.scaling_factor
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    context = text_encoder(ids)[0]
    acp = scheduler.alphas_cumprod
    prediction = scheduler.config.prediction_type
    generator = torch.Generator().manual_seed(0)  # the same noise for every run
    out = {}
    for t in timesteps:
        eps = torch.randn(latents.shape, generator=generator)
        alpha, sigma = alpha_sigma(acp, torch.full((n,), t))
        z = add_noise(latents, eps, alpha, sigma)
        pred = torch.cat([denoiser(z[i:i + chunk], torch.full((len(z[i:i + chunk]),), t), context[i:i + chunk]).sample
                          for i in range(0, n, chunk)])
        target = target_for(prediction, latents, eps, alpha, sigma)
        out[t] = torch.mean((pred - target) ** 2).item()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run folders, or checkpoint folders RUN/checkpoints/step-N")
    parser.add_argument("--step", type=int, help="the checkpoint of every run folder given")
    parser.add_argument("--data", type=Path, default=Path("teacher_work/data/shapes"))
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--uniform", type=int, metavar="N",
                        help=f"N evenly spaced timesteps (bin centres over 0-999) instead of {TIMESTEPS}")
    args = parser.parse_args(argv)
    timesteps = [int((k + 0.5) * 1000 / args.uniform) for k in range(args.uniform)] if args.uniform else TIMESTEPS
    table = {}
    for path in args.runs:
        run, step = ((path.parents[1], int(path.name.removeprefix("step-"))) if path.name.startswith("step-")
                     else (path, args.step))
        if step is None:
            parser.error(f"{path} is a run folder: give --step or a checkpoint folder")
        table[f"{run.name} @ {step}"] = losses_by_timestep(run, step, args.data, args.images, timesteps)
    print("| t | " + " | ".join(table) + " |\n|---:|" + "---:|" * len(table))
    for t in timesteps:
        print(f"| {t} | " + " | ".join(f"{table[name][t]:.4f}" for name in table) + " |")
    print("| mean | " + " | ".join(f"{np.mean(list(v.values())):.4f}" for v in table.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
