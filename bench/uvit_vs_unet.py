"""U-ViT against the demo teacher's U-Net, both trained from scratch on the embedded benchmark (issue #5).

Builds a UViTPipeline folder that shares everything but the denoiser with the demo teacher's starting point
(its trained VAE, its random text encoder and tokenizer, its v-prediction schedule), trains it with the teacher's
own stage-2 recipe (text encoder jointly, same data, seed, batch and learning rate), and prints both runs'
training losses at the same steps. The U-Net run is the teacher's (teacher_work/runs/unet).

    python bench/uvit_vs_unet.py --work teacher_work --steps 1000 [--hidden 176 --layers 9]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.demo_teacher import MAX_TOKENS, RESOLUTION, UNET_RECIPE, train_stage  # noqa: E402


def uvit_config(hidden: int, layers: int) -> dict:
    return {"sample_size": RESOLUTION // 2, "patch_size": 2, "in_channels": 4, "hidden_size": hidden,
            "num_layers": layers, "num_attention_heads": 4, "mlp_ratio": 4.0, "qkv_bias": False,
            "cross_attention_dim": 64, "num_text_tokens": MAX_TOKENS, "use_conv_out": True}


def build(start: Path, out: Path, hidden: int, layers: int) -> Path:
    """The teacher's stage-2 starting folder with a random U-ViT in place of the U-Net."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    from trainers.backbones.uvit_pipeline import UViT2DModel, UViTPipeline

    torch.manual_seed(0)
    pipe = UViTPipeline(vae=AutoencoderKL.from_pretrained(start / "vae"),
                        text_encoder=CLIPTextModel.from_pretrained(start / "text_encoder"),
                        tokenizer=CLIPTokenizer.from_pretrained(start / "tokenizer"),
                        transformer=UViT2DModel(**uvit_config(hidden, layers)),
                        scheduler=DDPMScheduler.from_pretrained(start / "scheduler"))
    shutil.rmtree(out, ignore_errors=True)
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.copytree(start / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    print(f"U-ViT {sum(p.numel() for p in pipe.transformer.parameters()):,} parameters")
    return out


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("teacher_work"))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=176)  # 3.89M parameters, the U-Net 3.74M
    parser.add_argument("--layers", type=int, default=9)
    args = parser.parse_args(argv)
    folder = build(args.work / "with_vae", args.work / "uvit_initial", args.hidden, args.layers)
    run = args.work / "runs" / "uvit"
    train_stage(UNET_RECIPE, [f"model.pretrained={folder}", f"data.source={args.work / 'data' / 'shapes'}",
                              f"output_dir={run}", f"train.max_steps={args.steps}", "validation.every_steps=0"])
    uvit, unet = losses(run), losses(args.work / "runs" / "unet")
    print("| step | U-Net loss | U-ViT loss | ratio |\n|---:|---:|---:|---:|")
    for step in sorted(set(uvit) & set(unet)):
        print(f"| {step} | {unet[step]:.4f} | {uvit[step]:.4f} | {uvit[step] / unet[step]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
