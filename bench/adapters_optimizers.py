"""Adapter kinds and optimizers on the demo's concept LoRA (teach the demo teacher purple), at default settings.

    python bench/adapters_optimizers.py [--steps 300] [--variants lora dora loha lokr prodigy schedulefree]
    python bench/adapters_optimizers.py --variants full-adamw full-adafactor full-came   # optimizer.name for full
                                        [--workdir /tmp/bench_adapters]

Each variant is recipes/demo/shapes_concept_lora_tiny.yaml with one change (the adapter kind, or the optimizer at
its own convention: Prodigy lr 1.0, schedule-free a constant schedule), trained on the same data with the same
seed. Prints a Markdown table: trainable parameters, training loss (mean of the last fifth of the steps),
held-out loss (validation.loss_source: purple shapes no run trains on, fixed noise and timesteps) at the end, and
seconds per step relative to the LoRA/AdamW run.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cache_step_time import reset_accelerate  # noqa: E402

RECIPE = "recipes/demo/shapes_concept_lora_tiny.yaml"
VARIANTS = {
    "lora": [],
    "dora": ["adapter.kind=dora"],
    "loha": ["adapter.kind=loha", "adapter.rank=4", "adapter.alpha=4"],  # two rank-4 pairs: LoRA rank 8's size
    "lokr": ["adapter.kind=lokr", "adapter.lokr_factor=8"],  # kron(8x8, low-rank or whole): far fewer weights
    "prodigy": ["optimizer.name=prodigy", "optimizer.lr=1.0", "optimizer.safeguard_warmup=true"],
    "prodigy-dcoef0.5": ["optimizer.name=prodigy", "optimizer.lr=1.0", "optimizer.safeguard_warmup=true",
                         "optimizer.d_coef=0.5"],
    "schedulefree": ["optimizer.name=adamw_schedulefree", "lr_schedule.name=constant"],
    # full fine-tunes of the teacher's U-Net at one full-fine-tune lr: AdamW against the two low-memory optimizers
    "full-adamw": ["adapter.kind=full", "optimizer.lr=1e-4"],
    "full-adafactor": ["adapter.kind=full", "optimizer.name=adafactor", "optimizer.lr=1e-4"],
    "full-came": ["adapter.kind=full", "optimizer.name=came", "optimizer.lr=1e-4"],
}


def data(workdir: Path) -> dict[str, Path]:
    """The demo's purple and prior sets, and a held-out purple set of another seed."""
    from datasets_prep.synth import write_synth_dataset

    sets = {"purple": dict(n=512, only="colour=purple", seed=1), "prior": dict(n=512, exclude="colour=purple", seed=2),
            "heldout": dict(n=64, only="colour=purple", seed=3)}
    out = {}
    for name, kw in sets.items():
        out[name] = workdir / name
        if not (out[name] / "metadata.jsonl").exists():
            from datasets_prep.synth import parse_rules

            write_synth_dataset(out[name], n=kw["n"], size=32, seed=kw["seed"],
                                only=parse_rules([kw["only"]]) if "only" in kw else None,
                                exclude=parse_rules([kw["exclude"]]) if "exclude" in kw else None)
    return out


def run(name: str, overrides: list[str], sets: dict[str, Path], args) -> dict:
    from trainers.config import load_recipe
    from trainers.engine import Trainer

    out = args.workdir / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    recipe = load_recipe(RECIPE, [
        f"data.source={sets['purple']}", f"data.extra_sources=[{{source: {sets['prior']}}}]", f"output_dir={out}",
        f"train.max_steps={args.steps}", "train.log_every=10", "train.report_to=none", "checkpoint.every_steps=0",
        f"validation.every_steps={args.steps}", "validation.prompts=[]", f"validation.loss_source={sets['heldout']}",
        "lr_schedule.warmup_steps=20", *overrides])
    reset_accelerate()
    trainer = Trainer(recipe)
    trainable = trainer.parameter_counts()[0]
    trainer.fit()
    rows = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if "loss" in r]
    return {"params": trainable, "loss": statistics.mean(train[-max(1, len(train) // 5):]),
            "val": [r["val_loss"] for r in rows if "val_loss" in r][-1],
            "step_s": statistics.median(1 / r["steps_per_s"] for r in rows if "steps_per_s" in r)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["lora", "dora", "loha", "lokr",
                                                                                   "prodigy", "schedulefree"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_adapters"))
    args = parser.parse_args(argv)
    sets = data(args.workdir)
    results = {name: run(name, VARIANTS[name], sets, args) for name in args.variants}
    base = results.get("lora", next(iter(results.values())))["step_s"]
    print(f"\n{args.steps} steps of {RECIPE} on CPU\n")
    print("| variant | trainable params | train loss (last 20%) | held-out loss | step time vs lora |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['params']:,} | {r['loss']:.4f} | {r['val']:.4f} | {r['step_s'] / base:.2f} |")


if __name__ == "__main__":
    main()
