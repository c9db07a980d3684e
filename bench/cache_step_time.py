"""Training step time with and without the latent/text cache, on the tiny SD-1.5 model (CPU by default).

    python bench/cache_step_time.py [--steps 60] [--batch 8] [--workdir /tmp/bench_cache]

Prints a Markdown table: median step time (after a warm-up) of the same recipe reading images (VAE and text
encoder run every step) and reading a `datasets_prep cache` (they do not).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def median_step_seconds(run_dir: Path, warmup: int) -> float:
    rows = [json.loads(x) for x in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(1 / r["steps_per_s"] for r in rows[warmup:])


def reset_accelerate() -> None:
    """Another Trainer in the same process (another precision, say): accelerate keeps its state per process."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_cache"))
    args = parser.parse_args()

    from datasets_prep.__main__ import main as prep
    from datasets_prep.digits import write_digits_dataset
    from launch.make_tiny_model import make_tiny_model
    from trainers.config import load_recipe
    from trainers.engine import Trainer

    w = args.workdir
    model = w / "tiny-sd15"
    if not (model / "model_index.json").exists():
        make_tiny_model("sd15", model)
    if not (w / "digits" / "metadata.jsonl").exists():
        write_digits_dataset(w / "digits", n=512)
    if not (w / "prepared" / "report.json").exists():
        prep(["prepare", "--source", str(w / "digits"), "--out", str(w / "prepared"), "--resolution", "64",
              "--min-size", "8"])
    prep(["cache", "--data", str(w / "prepared"), "--model", str(model), "--dtype", "float16"])
    results = {}
    for name, use_cache in (("images", False), ("cache", True)):
        out = w / f"run-{name}"
        shutil.rmtree(out, ignore_errors=True)  # a new run each time (resume: none refuses an old run's folder)
        recipe = load_recipe("recipes/demo/sd15_lora_tiny.yaml", [
            f"model.pretrained={model}", f"data.source={w / 'prepared'}", f"output_dir={out}", "resume=none",
            f"data.use_cache={str(use_cache).lower()}", f"train.max_steps={args.steps}", "train.log_every=1",
            f"train.batch_size={args.batch}", "train.report_to=none", "validation.every_steps=0",
            "checkpoint.every_steps=0", "data.num_workers=0"])
        Trainer(recipe).fit()
        results[name] = median_step_seconds(out, warmup=10)
        reset_accelerate()
    print(f"| input | median step (ms), batch {args.batch} |\n|---|---:|")
    for name, sec in results.items():
        print(f"| {name} | {sec * 1000:.1f} |")
    print(f"\ncached / uncached step time: {results['cache'] / results['images']:.2f}")


if __name__ == "__main__":
    main()
