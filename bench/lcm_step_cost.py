"""Cost of a distillation step (LCM-LoRA, progressive, DMD2) against a plain LoRA fine-tuning step of the same model
and batch.

    python bench/lcm_step_cost.py --model assets/demo_teacher --data teacher_work/data/shapes --batch 32
    python bench/lcm_step_cost.py --model /path/to/sd15 --data DIR --resolution 512 --batch 4 --precision bf16 \
        --objectives finetune consistency progressive dmd2 dmd2_full

finetune, consistency and dmd2 use recipes/demo/sd15_lcm_lora_tiny.yaml's LoRA targets and rank (the DMD2 recipe
has the same); progressive is recipes/demo/sd15_progressive_tiny.yaml's full-weight student (a teacher DDIM pair and
the student per step); dmd2_full is DMD2 with a full float32 copy as the fake score (objective.dmd2.fake_score:
full) instead of a second LoRA on the shared base. Each row is the engine's steps/s over the logging intervals after
the first (warm-up excluded) and, on a GPU, the run's peak memory. A DMD2 engine step is a fake-score update, with a
generator update every objective.dmd2.fake_updates of them: its row's time is the average step; per generator update
it is that times fake_updates. --json FILE appends one JSON object per objective.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
LCM = ROOT / "recipes" / "demo" / "sd15_lcm_lora_tiny.yaml"
DMD2 = ROOT / "recipes" / "demo" / "sd15_dmd2_lora_tiny.yaml"
PROGRESSIVE = ROOT / "recipes" / "demo" / "sd15_progressive_tiny.yaml"
OBJECTIVES = ("finetune", "consistency", "progressive", "dmd2", "dmd2_full")


def steps_per_second(objective: str, args, out: Path) -> tuple[float, int | None]:
    """(mean steps/s after the first logging interval, peak GPU bytes or None on CPU)."""
    import torch

    from bench.cache_step_time import reset_accelerate
    from trainers.config import load_recipe
    from trainers.engine import Trainer

    overrides = [f"model.pretrained={args.model}", f"data.source={args.data}", f"data.resolution={args.resolution}",
                 f"output_dir={out}", f"train.batch_size={args.batch}", f"train.max_steps={args.steps}",
                 f"train.log_every={args.interval}", "train.report_to=none", "validation.every_steps=0",
                 "checkpoint.every_steps=0", f"precision='{args.precision}'", f"data.num_workers={args.workers}"]
    recipe = LCM
    if objective == "finetune":  # the same LoRA, trained on the plain denoising loss
        overrides += ["objective.name=finetune", "validation.scheduler=dpmsolver"]
    elif objective == "progressive":
        recipe = PROGRESSIVE
    elif objective.startswith("dmd2"):
        recipe = DMD2
        overrides += ["objective.dmd2.fake_score=full"] if objective == "dmd2_full" else []
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    reset_accelerate()
    Trainer(load_recipe(recipe, overrides)).fit()
    peak = torch.cuda.max_memory_allocated() if cuda else None
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["steps_per_s"] for r in rows if "steps_per_s" in r]
    rates = rates[1:] or rates
    return sum(rates) / len(rates), peak


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "assets" / "demo_teacher"))
    parser.add_argument("--data", required=True)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--interval", type=int, default=15)
    parser.add_argument("--precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--workers", type=int, default=0, help="data.num_workers (0: decode in the training process)")
    parser.add_argument("--objectives", nargs="+", default=["finetune", "consistency", "dmd2"], choices=OBJECTIVES)
    parser.add_argument("--json", type=Path, default=None, help="append each row here as a JSON line")
    args = parser.parse_args(argv)
    names = ["finetune", *(n for n in args.objectives if n != "finetune")]
    print("| objective | steps/s | relative step time | peak GiB |\n|---|---:|---:|---:|", flush=True)
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            rates[name], peak = steps_per_second(name, args, Path(tmp) / name)
            peak_gib = f"{peak / 2**30:.2f}" if peak is not None else "-"
            relative = rates["finetune"] / rates[name]
            print(f"| {name} | {rates[name]:.3f} | {relative:.2f}x | {peak_gib} |", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({"objective": name, "steps_per_s": rates[name], "relative": relative,
                                        "peak_gib": peak_gib, "batch": args.batch, "resolution": args.resolution,
                                        "precision": args.precision}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
