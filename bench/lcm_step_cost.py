"""Cost of an LCM-LoRA step and a DMD2 step against a plain LoRA fine-tuning step of the same model, LoRA and batch.

    python bench/lcm_step_cost.py --model assets/demo_teacher --data teacher_work/data/shapes --batch 32
    python bench/lcm_step_cost.py --model /path/to/sd15 --data DIR --resolution 512 --batch 8 --precision fp16

Every run uses recipes/demo/sd15_lcm_lora_tiny.yaml's LoRA targets and rank (the DMD2 recipe has the same), the
engine's own steps/s over the logging intervals after the first (warm-up excluded), and prints one table row per
objective plus the ratio. A DMD2 engine step is a fake-score update, with a generator update every
objective.dmd2.fake_updates of them: its row's time is the average step; per generator update it is that times
fake_updates.
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
OBJECTIVES = ("finetune", "consistency", "dmd2")


def steps_per_second(objective: str, args, out: Path) -> float:
    from trainers.config import load_recipe
    from trainers.engine import Trainer

    overrides = [f"model.pretrained={args.model}", f"data.source={args.data}", f"data.resolution={args.resolution}",
                 f"output_dir={out}", f"train.batch_size={args.batch}", f"train.max_steps={args.steps}",
                 f"train.log_every={args.interval}", "train.report_to=none", "validation.every_steps=0",
                 "checkpoint.every_steps=0", f"precision='{args.precision}'", f"data.num_workers={args.workers}"]
    if objective == "finetune":  # the same LoRA, trained on the plain denoising loss
        overrides += ["objective.name=finetune", "validation.scheduler=dpmsolver"]
    Trainer(load_recipe(DMD2 if objective == "dmd2" else LCM, overrides)).fit()
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["steps_per_s"] for r in rows if "steps_per_s" in r][1:]
    return sum(rates) / len(rates)


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
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    args = parser.parse_args(argv)
    names = ["finetune", *(n for n in args.objectives if n != "finetune")]
    with tempfile.TemporaryDirectory() as tmp:
        rates = {name: steps_per_second(name, args, Path(tmp) / name) for name in names}
    print("| objective | steps/s | relative step time |\n|---|---:|---:|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.3f} | {rates['finetune'] / rate:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
