"""Reference generators for the world-v2 evaluator's self-checks: what a perfect, a collapsed, a blurring and a
useless sampler would draw for the same captions, made from renders alone.

    python -m datasets_prep.synth_world2_baselines [--prompts 40] [--k 8] [--side 32]   # prints their scores
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
from PIL import Image

from datasets_prep.synth_world2 import draw_record, render, scenes_for

GENERATORS = ("real", "collapsed", "blurred", "noise")


def baselines(prompts: int, k: int, side: int = 32, seed: int = 7) -> tuple[list[dict], dict[str, list]]:
    """Specs (k per prompt, prompt-major) and each generator's k images per prompt: "real" (renders of fresh draws),
    "collapsed" (one render repeated), "blurred" (each image the mean of k renders), "noise" (uniform pixels)."""
    specs, out = [], {name: [] for name in GENERATORS}
    rng = np.random.default_rng(0)
    for i in range(prompts):
        spec, _ = draw_record(seed, i)
        images = [np.asarray(render(s, side), dtype=np.float64) for s in scenes_for(spec, k + k * k, seed=50 + i)]
        for j in range(k):
            specs.append(spec)
            out["real"].append(Image.fromarray(images[j].astype(np.uint8)))
            out["collapsed"].append(Image.fromarray(images[0].astype(np.uint8)))
            average = np.mean(images[k + j * k:k + (j + 1) * k], axis=0)
            out["blurred"].append(Image.fromarray(average.round().astype(np.uint8)))
            out["noise"].append(Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)))
    return specs, out


def other_draws(specs: list[dict], k: int, side: int = 32) -> list:
    """Renders of other draws of the same captions: the reference the distances compare with."""
    return [render(s, side) for i, spec in enumerate(specs[::k]) for s in scenes_for(spec, k, seed=999 + i)]


def main(argv=None) -> int:
    from datasets_prep.synth_distance import sliced_wasserstein
    from datasets_prep.synth_features import features, frechet, load
    from datasets_prep.synth_world2_analysis import adherence, analyse, coverage

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--side", type=int, choices=(32, 64), default=32)
    args = parser.parse_args(argv)
    specs, made = baselines(args.prompts, args.k, args.side)
    reference = other_draws(specs, args.k, args.side)
    net = load()
    ref_features = features(reference, net)
    print("| images | count | all-factor | coverage | modes | SWD | FD |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, images in made.items():
        found = [analyse(image) for image in images]
        rates, cover = adherence(found, specs), coverage(found, specs, args.k)
        print(f"| {name} | {rates['count']:.2f} | {rates['all']:.2f} | {cover['coverage']:.3f} | {cover['modes']:.2f} "
              f"| {sliced_wasserstein(images, reference):.4f} | {frechet(features(images, net), ref_features):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
