"""Score a VAE's reconstructions of held-out renders with the evaluator, before any U-Net is trained on its latents.

A U-Net can draw no better than its VAE decodes, so a teacher's first check is whether encode -> decode keeps
what the evaluator reads (demo teacher v1: a 300-step L1 VAE blurred shapes away and the U-Net on it scored 0.01).

    python bench/vae_reconstruction.py --vae teacher2_work/with_vae --world v2 [--images 400] [--resolution 32]

Prints adherence per factor for the renders and for their reconstructions, and the SWD (v2: and FD) between them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.evaluate import held_out_factors, held_out_specs, real_images, world2_images  # noqa: E402


def reconstruct(vae, images: list, batch: int = 64) -> list:
    from PIL import Image

    out = []
    for start in range(0, len(images), batch):
        chunk = np.stack([np.asarray(i, dtype=np.float32) for i in images[start:start + batch]]) / 127.5 - 1
        x = torch.from_numpy(chunk).permute(0, 3, 1, 2)
        with torch.no_grad():
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        pixels = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        out += [Image.fromarray(p) for p in pixels]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", type=Path, required=True, help="a pipeline folder (its vae/) or a vae folder")
    parser.add_argument("--world", choices=("v1", "v2"), default="v2")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args(argv)
    from diffusers import AutoencoderKL

    folder = args.vae / "vae" if (args.vae / "vae" / "config.json").is_file() else args.vae
    vae = AutoencoderKL.from_pretrained(folder).float().eval()
    from datasets_prep.synth_distance import sliced_wasserstein

    if args.world == "v2":
        from datasets_prep import synth_world2_analysis as analysis
        from datasets_prep.synth_features import frechet_distance

        specs = held_out_specs(args.images)
        images = world2_images(specs, 1, args.resolution)
        score = lambda imgs: analysis.adherence([analysis.analyse(i) for i in imgs], specs)  # noqa: E731
    else:
        from datasets_prep.synth_analysis import adherence

        drawn = held_out_factors(args.images)
        images = real_images(drawn, 1, args.resolution)
        score = lambda imgs: adherence(imgs, [f for f, _ in drawn])[0]  # noqa: E731
    decoded = reconstruct(vae, images)
    for name, imgs in (("renders", images), ("reconstructions", decoded)):
        rates = score(imgs)
        print(f"{name:16s} " + "  ".join(f"{k} {v:.3f}" for k, v in rates.items() if v is not None))
    line = f"SWD renders vs reconstructions {sliced_wasserstein(images, decoded):.4f}"
    if args.world == "v2":
        line += f", FD {frechet_distance(images, decoded):.1f}"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
