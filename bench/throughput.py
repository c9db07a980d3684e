"""Throughput per memory configuration: the engine's median step, images/s and peak memory, against a bare
forward + backward + optimizer step of the same model, data and options in the same process (the engine's
overhead as a ratio), and model FLOPs utilisation on a GPU.

    # the engine-overhead figure: tiny SD-1.5 LoRA on CPU
    OMP_NUM_THREADS=1 python bench/throughput.py [--steps 60] [--batch 8] [--workers 1]
    # full-size random-initialised models on a GPU (built once by launch/make_tiny_model.py --size full)
    python bench/throughput.py --arch sd15 --size full --batch 8 --precision bf16 \\
        --configs plain adamw8bit checkpointing xformers compile checkpointing+adamw8bit
    python bench/throughput.py --arch sdxl --size full --batch 1 --precision bf16 \\
        --configs checkpointing checkpointing+adamw8bit checkpointing+nf4
    # a ControlNet (recipes/sd15_controlnet.yaml) on synthetic shapes with outlines; engine only (no bare step)
    python bench/throughput.py --objective controlnet --arch sd15 --size full --batch 4 --precision fp16 \\
        --configs checkpointing+adamw8bit checkpointing+adamw8bit+xformers

A configuration is a name from CONFIGS or several joined by "+". The bare step encodes the same images and
captions, draws noise and timesteps with torch's global generator and runs the denoiser, the MSE, backward,
clipping and the optimizer, with the configuration's memory options and optimizer: what a hand-written loop does.
The engine adds data loading, per-sample seeding, accumulation bookkeeping and the non-finite guard. A
configuration the engine refuses (xformers without a GPU, say) is reported as refused, with the reason.
--json FILE appends one JSON object per configuration (bench/gpu_suite.py collects them into its table).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.cache_step_time import median_step_seconds, reset_accelerate  # noqa: E402

CONFIGS = {
    "plain": [],
    "sdpa": ["memory.attention=sdpa"],
    "xformers": ["memory.attention=xformers"],
    "adamw8bit": ["optimizer.name=adamw8bit"],
    "checkpointing": ["memory.gradient_checkpointing=true"],
    "channels_last": ["memory.channels_last=true"],
    "compile": ["memory.compile=true"],
    "cudagraphs": ["memory.compile=true", "memory.compile_mode=reduce-overhead"],  # the step captured as a graph
    "nf4": ["memory.quantize_base=nf4"],
    "int8": ["memory.quantize_base=int8"],
}
RECIPES = {"sd15": "recipes/demo/sd15_lora_tiny.yaml", "sdxl": "recipes/demo/sdxl_lora_tiny.yaml",
           "sd3": "recipes/demo/sd3_lora_tiny.yaml", "flux": "recipes/demo/flux_lora_tiny.yaml"}
CONTROLNET_RECIPES = {"sd15": "recipes/sd15_controlnet.yaml", "sdxl": "recipes/sdxl_controlnet.yaml"}
RESOLUTION = {("sd15", "tiny"): 64, ("sdxl", "tiny"): 64, ("sd3", "tiny"): 64, ("flux", "tiny"): 64,
              ("sd15", "full"): 512, ("sdxl", "full"): 1024, ("sd3", "full"): 1024, ("flux", "full"): 512}


def overrides_of(config: str) -> list[str]:
    unknown = [c for c in config.split("+") if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration {'+'.join(unknown)!r}; known: {', '.join(CONFIGS)}")
    return [o for c in config.split("+") for o in CONFIGS[c]]


class PeakMemory:
    """Peak bytes allocated on the GPU inside the block; None on CPU (the process RSS never goes down)."""

    def __enter__(self):
        self.peak = None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()


def bare_step_seconds(recipe, steps: int, warmup: int) -> tuple[float, int | None]:
    """The hand-written loop over one fixed batch, with the recipe's precision, memory options and optimizer."""
    from trainers import adapters, memory, optimizers, quantize
    from trainers.backbones import load_backbone
    from trainers.data import StepSampler, build_dataset, collate
    from trainers.engine import DTYPES

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[recipe.precision]
    with PeakMemory() as peak:
        bb = load_backbone(recipe.model)
        if recipe.memory.quantize_base != "none":
            quantize.quantize_linears(bb.denoiser, recipe.memory.quantize_base, dtype)
        for m in (bb.denoiser, bb.vae, *bb.text_encoders.values()):
            m.requires_grad_(False).to(device)
            if next(m.parameters()).dtype != dtype:  # diffusers warns on any cast
                m.to(dtype)
        adapters.add_lora(bb.denoiser, recipe.adapter, recipe.adapter.target_modules or bb.lora_targets)
        params = [p for p in bb.denoiser.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()  # LoRA weights train in float32 under autocast, as in the engine
        memory.configure({bb.denoiser_key: bb.denoiser}, bb.denoiser_key, recipe.memory)
        opt = optimizers.make_optimizer([{"params": params, "lr": recipe.optimizer.lr}], recipe.optimizer)
        data = build_dataset(recipe.data)
        keys = next(iter(StepSampler(data.buckets(), recipe.train.batch_size, 1, 0)))
        batch = collate([data[k] for k in keys])
        pixels = batch["pixel_values"].to(device)
        schedule = bb.schedule.to(device)
        flow = schedule.kind == "flow"
        times = []
        for _ in range(steps):
            tick = time.perf_counter()
            with torch.no_grad(), torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
                dist = bb.encode_images(pixels)
                x0 = bb.latents_from(dist, torch.randn_like(dist.mean))
                h = bb.encode_text(batch["captions"], device)
            eps = torch.randn_like(x0)
            t = (schedule.shifted(torch.sigmoid(torch.randn(x0.shape[0], device=device)), schedule.tokens(x0.shape))
                 if flow else torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), device=device))
            with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
                pred = bb.predict(schedule.add_noise(x0, eps, t), schedule.model_timestep(t),
                                  bb.denoiser_kwargs(h, batch, device))
            loss = torch.nn.functional.mse_loss(pred.float(), schedule.target(x0, eps, t))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, recipe.optimizer.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - tick)
    return statistics.median(times[warmup:]), peak.peak


def forward_flops(recipe) -> float:
    """FLOPs of one denoiser forward per image at the recipe's resolution: torch's FLOP counter over a real
    batch-1 forward on the CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    from trainers.backbones import load_backbone

    bb = load_backbone(recipe.model)
    side = recipe.data.resolution // (2 ** (len(bb.vae.config.block_out_channels) - 1))
    x = torch.randn(1, bb.vae.config.latent_channels, side, side)
    with torch.no_grad():
        h = bb.encode_text(["a photo"], "cpu")
        batch = {"original_size": [(recipe.data.resolution,) * 2], "crop_top_left": [(0, 0)],
                 "target_size": [(recipe.data.resolution,) * 2]}
        with FlopCounterMode(display=False) as counter:
            bb.predict(x, bb.schedule.model_timestep(bb.schedule.at_train_timesteps(torch.tensor([500]))),
                       bb.denoiser_kwargs(h, batch, "cpu"))
    return counter.get_total_flops()


def prepare(args) -> tuple[Path, Path]:
    from datasets_prep.digits import write_digits_dataset
    from launch.make_tiny_model import make_tiny_model

    w = args.workdir
    model = w / f"{args.arch}-{args.size}"
    if not (model / "model_index.json").exists():
        make_tiny_model(args.arch, model, size=args.size)
    if args.objective == "controlnet":  # shapes with outlines, resized to the resolution by the loader
        from datasets_prep.synth import write_synth_dataset

        data = w / "edges"
        if not (data / "metadata.jsonl").exists():
            write_synth_dataset(data, n=max(64, 4 * args.batch), size=64, edges=True)
        return model, data
    data = w / f"digits-{args.resolution}"
    if not (data / "metadata.jsonl").exists():
        write_digits_dataset(data, n=max(64, 4 * args.batch), size=args.resolution)
    return model, data


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(RECIPES), default="sd15")
    parser.add_argument("--objective", choices=("lora", "controlnet"), default="lora",
                        help="controlnet: the ControlNet recipe of --arch, timed by the engine only")
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--resolution", type=int, default=None,
                        help="default: 64 tiny, 512 SD-1.5 and Flux, 1024 SDXL and SD3")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the median (compiles, allocator)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers decoding images")
    parser.add_argument("--configs", nargs="+", default=["plain"], help=f"names or a+b: {', '.join(CONFIGS)}")
    parser.add_argument("--no-bare", action="store_true", help="time the engine only")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense peak for MFU (H100 SXM bf16: 989); default: 989 on CUDA, none on CPU")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_throughput"))
    parser.add_argument("--compile-backend", default=None, choices=("inductor", "cudagraphs", "aot_eager", "eager"),
                        help="memory.compile_backend for the compile configurations (eager: a CPU dry run)")
    parser.add_argument("--json", type=Path, default=None, help="append each row here as a JSON line")
    args = parser.parse_args(argv)
    args.resolution = args.resolution or RESOLUTION[(args.arch, args.size)]
    recipe_path = RECIPES[args.arch] if args.objective == "lora" else CONTROLNET_RECIPES[args.arch]
    args.no_bare = args.no_bare or args.objective == "controlnet"  # the bare loop is a LoRA step
    configs = {c: overrides_of(c) for c in args.configs}
    if args.compile_backend:
        configs = {c: o + ([f"memory.compile_backend={args.compile_backend}"] if "memory.compile=true" in o else [])
                   for c, o in configs.items()}

    from trainers.config import load_recipe
    from trainers.engine import Trainer
    from trainers.errors import UserError

    model, data = prepare(args)
    base = [f"model.pretrained={model}", f"data.source={data}", f"data.resolution={args.resolution}",
            "resume=none", f"train.max_steps={args.steps}", "train.log_every=1", f"train.batch_size={args.batch}",
            f"precision={args.precision}", f"adapter.rank={args.rank}", f"adapter.alpha={args.rank}",
            "train.report_to=none", "validation.every_steps=0", "checkpoint.every_steps=0",
            f"data.num_workers={args.workers}", "objective.caption_dropout=0", "lr_schedule.name=constant",
            "train.grad_accum=1", "data.random_flip=false"]
    if args.objective == "controlnet":  # the recipe's optimizer and memory options are what --configs varies
        base += ["optimizer.name=adamw", "memory.gradient_checkpointing=false"]
    peak_tflops = args.peak_tflops or (989.0 if torch.cuda.is_available() else None)
    flops = forward_flops(load_recipe(recipe_path, base + [f"output_dir={args.workdir / 'flops'}"]))
    what = "ControlNet" if args.objective == "controlnet" else f"LoRA rank {args.rank}"
    print(f"{args.arch} {args.size} at {args.resolution} px, batch {args.batch}, {what}, "
          f"precision {args.precision}, {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}; "
          f"denoiser forward {flops / 1e12:.3f} TFLOP per image\n")
    print("| configuration | engine step (ms) | images/s | peak GiB | MFU | bare step (ms) | bare peak GiB "
          "| engine / bare |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    gib = lambda b: f"{b / 2**30:.2f}" if b is not None else "-"  # noqa: E731
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    case = {"arch": args.arch, "size": args.size, "objective": args.objective, "resolution": args.resolution,
            "batch": args.batch, "rank": args.rank, "precision": args.precision, "device": device}

    def record(**row):
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(case | row) + "\n")

    for name, overrides in configs.items():
        run = args.workdir / "runs" / name
        shutil.rmtree(run, ignore_errors=True)  # metrics.jsonl would keep an earlier run's rows
        recipe = load_recipe(recipe_path, base + overrides + [f"output_dir={run}"])
        reset_accelerate()
        try:
            with PeakMemory() as peak:
                Trainer(recipe).fit()
        except UserError as e:
            print(f"| {name} | refused: {e} | | | | | | |")
            record(config=name, refused=str(e))
            continue
        engine = median_step_seconds(run, warmup=args.warmup)
        images = args.batch / engine
        # forward + 2x backward of the denoiser; a ControlNet step runs more than that, so no figure for it
        mfu = f"{3 * flops * images / (peak_tflops * 1e12):.1%}" if peak_tflops and args.objective == "lora" else "-"
        bare, bare_peak = (None, None) if args.no_bare else bare_step_seconds(recipe, args.steps, args.warmup)
        ratio = f"{engine / bare:.3f}" if bare else "-"
        bare_ms = f"{bare * 1000:.1f}" if bare else "-"
        print(f"| {name} | {engine * 1000:.1f} | {images:.1f} | {gib(peak.peak)} | {mfu} | {bare_ms} | "
              f"{gib(bare_peak)} | {ratio} |", flush=True)
        record(config=name, step_ms=engine * 1000, images_per_s=images, peak_gib=gib(peak.peak), mfu=mfu,
               bare_ms=bare_ms, bare_peak_gib=gib(bare_peak), engine_over_bare=ratio)


if __name__ == "__main__":
    main()
