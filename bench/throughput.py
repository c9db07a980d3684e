"""Engine overhead: the engine's median step time against a bare forward + backward + AdamW step of the same
model and data in the same process (tiny SD-1.5 LoRA on CPU by default).

    OMP_NUM_THREADS=1 python bench/throughput.py [--steps 60] [--batch 8] [--workers 1] [--workdir DIR]

The bare step encodes the same images and captions, draws noise and timesteps with torch's global generator,
and runs the U-Net, the MSE, backward and the optimizer: what a hand-written loop does. The engine adds data
loading, per-sample seeding, accumulation bookkeeping, the non-finite guard and clipping.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.cache_step_time import median_step_seconds  # noqa: E402


def bare_step_seconds(recipe, steps: int, warmup: int) -> float:
    from trainers import adapters, diffusion, memory
    from trainers.backbones import load_backbone
    from trainers.data import StepSampler, build_dataset, collate
    from trainers.objectives.finetune import noise_betas

    bb = load_backbone(recipe.model)
    adapters.add_lora(bb.denoiser, recipe.adapter, recipe.adapter.target_modules or bb.lora_targets)
    params = [p for p in bb.denoiser.parameters() if p.requires_grad]
    opt = memory.make_optimizer([{"params": params, "lr": recipe.optimizer.lr}], recipe.optimizer)
    data = build_dataset(recipe.data)
    keys = next(iter(StepSampler(data.buckets(), recipe.train.batch_size, 1, 0)))
    batch = collate([data[k] for k in keys])
    acp = diffusion.alphas_cumprod(noise_betas(bb.scheduler_config, False)).float()
    times = []
    for _ in range(steps):
        tick = time.perf_counter()
        with torch.no_grad():
            dist = bb.encode_images(batch["pixel_values"])
            x0 = bb.latents_from(dist, torch.randn_like(dist.mean))
            h = bb.encode_text(batch["captions"], "cpu")
        eps = torch.randn_like(x0)
        t = torch.randint(0, len(acp), (x0.shape[0],))
        a, s = diffusion.alpha_sigma(acp, t)
        pred = bb.denoiser(diffusion.add_noise(x0, eps, a, s), t, **bb.denoiser_kwargs(h, batch, "cpu")).sample
        loss = torch.nn.functional.mse_loss(pred.float(), eps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.optimizer.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - tick)
    return statistics.median(times[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers decoding images")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_throughput"))
    args = parser.parse_args()

    from datasets_prep.digits import write_digits_dataset
    from launch.make_tiny_model import make_tiny_model
    from trainers.config import load_recipe
    from trainers.engine import Trainer

    w = args.workdir
    if not (w / "tiny-sd15" / "model_index.json").exists():
        make_tiny_model("sd15", w / "tiny-sd15")
    if not (w / "digits" / "metadata.jsonl").exists():
        write_digits_dataset(w / "digits", n=512)
    recipe = load_recipe("recipes/demo/sd15_lora_tiny.yaml", [
        f"model.pretrained={w / 'tiny-sd15'}", f"data.source={w / 'digits'}", f"output_dir={w / 'run'}",
        "resume=none", f"train.max_steps={args.steps}", "train.log_every=1", f"train.batch_size={args.batch}",
        "train.report_to=none", "validation.every_steps=0", "checkpoint.every_steps=0", f"data.num_workers={args.workers}",
        "objective.caption_dropout=0", "lr_schedule.name=constant"])
    Trainer(recipe).fit()
    engine = median_step_seconds(w / "run", warmup=10)
    bare = bare_step_seconds(recipe, args.steps, warmup=10)
    print(f"| loop | median step (ms), batch {args.batch} |\n|---|---:|")
    print(f"| engine (launch/train.py path) | {engine * 1000:.1f} |\n| bare step | {bare * 1000:.1f} |")
    print(f"\nengine / bare: {engine / bare:.3f}")


if __name__ == "__main__":
    main()
