"""U-ViT against the demo teacher's U-Net, both trained from scratch on the embedded benchmark (issue #5).

Both start from the demo teacher's starting point (its trained VAE, the random text encoder and tokenizer
`launch/demo_teacher.py` builds, its v-prediction schedule) and train with the teacher's own stage-2 recipe (text
encoder jointly, same data, seed, batch and learning rate); only the denoiser differs. Prints both runs'
training losses at the same steps. Without teacher_work/with_vae (the teacher's stage-1 output), it is rebuilt
from the deterministic initial pipeline and the committed teacher's VAE.

    python bench/uvit_vs_unet.py --work teacher_work --steps 1000 [--hidden 176 --layers 9]
    # or the two runs side by side, then the table:
    python bench/uvit_vs_unet.py --model unet & python bench/uvit_vs_unet.py --model uvit; wait
    python bench/uvit_vs_unet.py --model none
    # a U-ViT run with its own optimizer settings, compared with the same U-Net run:
    python bench/uvit_vs_unet.py --model uvit --name uvit_lr3e-4 --set optimizer.lr=3e-4 optimizer.betas=[0.9,0.99]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.demo_teacher import (MAX_TOKENS, RESOLUTION, UNET_RECIPE, build_initial, train_stage,  # noqa: E402
                                 with_component)

ROOT = Path(__file__).resolve().parents[1]


def uvit_config(hidden: int, layers: int, patch: int = 2) -> dict:
    return {"sample_size": RESOLUTION // 2, "patch_size": patch, "in_channels": 4, "hidden_size": hidden,
            "num_layers": layers, "num_attention_heads": 4, "mlp_ratio": 4.0, "qkv_bias": False,
            "cross_attention_dim": 64, "num_text_tokens": MAX_TOKENS, "use_conv_out": True}


def build(start: Path, out: Path, hidden: int, layers: int, patch: int, pos_init: str = "sincos") -> Path:
    """The teacher's stage-2 starting folder with a random U-ViT in place of the U-Net."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    from trainers.backbones.uvit_pipeline import UViT2DModel, UViTPipeline

    torch.manual_seed(0)
    transformer = UViT2DModel(**uvit_config(hidden, layers, patch))
    if pos_init == "normal":  # U-ViT's own start (the runs before session 6; redrawn, so not their exact values)
        torch.nn.init.trunc_normal_(transformer.pos_embed, std=0.02)
    pipe = UViTPipeline(vae=AutoencoderKL.from_pretrained(start / "vae"),
                        text_encoder=CLIPTextModel.from_pretrained(start / "text_encoder"),
                        tokenizer=CLIPTokenizer.from_pretrained(start / "tokenizer"),
                        transformer=transformer,
                        scheduler=DDPMScheduler.from_pretrained(start / "scheduler"))
    shutil.rmtree(out, ignore_errors=True)
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.copytree(start / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    print(f"U-ViT {sum(p.numel() for p in pipe.transformer.parameters()):,} parameters")
    return out


def losses(run: Path) -> dict[int, float]:
    if not (run / "logs" / "metrics.jsonl").is_file():
        return {}
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def starting_point(work: Path) -> Path:
    """The teacher's stage-2 starting folder: the initial pipeline (seed 0) with the trained VAE."""
    start = work / "with_vae"
    if not (start / "model_index.json").is_file():
        initial = work / "initial"
        if not (initial / "model_index.json").is_file():
            build_initial(initial, 0)
        with_component(initial, "vae", ROOT / "assets" / "demo_teacher" / "vae", start)
    return start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("teacher_work"))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--hidden", type=int, default=176)  # 3.89M parameters, the U-Net 3.74M
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--patch", type=int, default=2, help="patch side in latent pixels (1: 256 tokens at 16x16)")
    parser.add_argument("--pos-init", choices=("sincos", "normal"), default="sincos",
                        help="initial patch position embeddings: 2-D sin-cos (the model's), or U-ViT's N(0, 0.02)")
    parser.add_argument("--model", choices=("both", "unet", "uvit", "none"), default="both",
                        help="which run to train here (none: only print the table of finished runs)")
    parser.add_argument("--name", default="uvit", help="the U-ViT run's folder under WORK/runs")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="recipe overrides for the U-ViT run only (its own learning rate, betas, ...)")
    args = parser.parse_args(argv)
    start = starting_point(args.work)
    runs = {"unet": args.work / "runs" / "unet_bench", "uvit": args.work / "runs" / args.name}
    data = args.work / "data" / "shapes"
    for name in ("unet", "uvit") if args.model == "both" else (args.model,) if args.model != "none" else ():
        folder = start if name == "unet" else build(start, args.work / f"{args.name}_initial", args.hidden,
                                                                    args.layers, args.patch, args.pos_init)
        train_stage(UNET_RECIPE, [f"model.pretrained={folder}", f"data.source={data}", f"output_dir={runs[name]}",
                                  f"train.max_steps={args.steps}", "validation.every_steps=0",
                                  *(args.set if name == "uvit" else ())])
    unet, uvit = losses(runs["unet"]), losses(runs["uvit"])
    print("| step | U-Net loss | U-ViT loss | ratio |\n|---:|---:|---:|---:|")
    for step in sorted(set(uvit) & set(unet)):
        print(f"| {step} | {unet[step]:.4f} | {uvit[step]:.4f} | {uvit[step] / unet[step]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
