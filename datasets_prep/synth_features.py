"""A Fréchet distance for the shapes worlds on features of a small classifier trained on renders only.

FID's Inception features know nothing of 32-px shapes; this network is trained (by this module, from renders of
world v2, no downloaded weights) to name each cell's object and the background, so its penultimate layer
summarises what the evaluator cares about. The distance is Fréchet's between Gaussians fitted to the two
feature sets, as in FID (Heusel et al. 2017).

    python -m datasets_prep.synth_features --out assets/synth_features_v2.safetensors [--images 6000] [--epochs 12]

rebuilds the committed weights (CPU, one thread, seeded: the same bytes with the same torch; about two minutes). Images of either side are resized to
32 px (box filter) before the network sees them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

SIDE = 32
FEATURES = 64
CELL_CLASSES = 1 + 5 * 4  # empty, or colour x shape
HEADS = {"cells": 9 * CELL_CLASSES, "background": 4}
WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "synth_features_v2.safetensors"


def network():
    """Four 3x3 convolutions (32 -> 4 px) then a 64-d feature and linear heads per cell and for the background."""
    import torch.nn as nn

    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]

    body = nn.Sequential(*block(3, 32, 1), *block(32, 64, 2), *block(64, 64, 2), *block(64, 64, 2),
                         nn.Flatten(), nn.Linear(64 * 16, FEATURES), nn.SiLU())
    head = nn.Linear(FEATURES, sum(HEADS.values()))
    return nn.ModuleDict({"body": body, "head": head})


def as_batch(images):
    """(N, 3, 32, 32) float tensor in [-1, 1] from PIL images or uint8 arrays of any square size."""
    import torch
    from PIL import Image

    arrays = []
    for image in images:
        image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
        image = image.convert("RGB")
        if image.size != (SIDE, SIDE):
            image = image.resize((SIDE, SIDE), Image.Resampling.BOX)
        arrays.append(np.asarray(image, dtype=np.float32))
    return torch.from_numpy(np.stack(arrays) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def targets(scene: dict) -> tuple[list[int], int]:
    from datasets_prep.synth_world2 import BACKGROUNDS, OBJECT_FACTORS

    cells = [0] * 9
    for obj in scene["objects"]:
        colour = OBJECT_FACTORS["colour"].index(obj["colour"])
        shape = OBJECT_FACTORS["shape"].index(obj["shape"])
        cells[OBJECT_FACTORS["position"].index(obj["position"])] = 1 + colour * 4 + shape
    return cells, BACKGROUNDS.index(scene["background"])


def train(images: int = 6000, epochs: int = 12, seed: int = 0, progress=print):
    """The classifier, trained on world-v2 renders at 32 and 64 px (seeded; CPU, one thread)."""
    import torch
    import torch.nn.functional as F

    from datasets_prep.synth_world2 import draw_record, render

    torch.manual_seed(seed)
    torch.set_num_threads(1)  # one thread sums in one order: the same weights on every run of this torch
    scenes = [draw_record(10_000 + seed, i)[1] for i in range(images)]
    x = as_batch([render(s, 32 if i % 2 else 64) for i, s in enumerate(scenes)])
    cells, backgrounds = zip(*(targets(s) for s in scenes))
    cells, backgrounds = torch.tensor(cells), torch.tensor(backgrounds)
    net = network()
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    order = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        total = 0.0
        for batch in torch.randperm(images, generator=order).split(128):
            logits = net["head"](net["body"](x[batch]))
            cell_logits = logits[:, :HEADS["cells"]].reshape(-1, CELL_CLASSES)
            loss = F.cross_entropy(cell_logits, cells[batch].reshape(-1)) + \
                F.cross_entropy(logits[:, HEADS["cells"]:], backgrounds[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        progress(f"epoch {epoch + 1}/{epochs}: loss {total / images:.4f}")
    return net


def load(path: Path = WEIGHTS):
    """The committed classifier (safetensors, read back against the network's own shapes)."""
    from safetensors.torch import load_file

    from trainers.errors import UserError

    if not Path(path).is_file():
        raise UserError(f"feature network not found: {path} (rebuild: python -m datasets_prep.synth_features)")
    net = network()
    try:
        net.load_state_dict(load_file(str(path)))
    except Exception as error:  # a damaged or foreign file: one line, not a traceback
        raise UserError(f"cannot read the feature network {path}: {error}") from None
    return net.eval()


def features(images, net=None) -> np.ndarray:
    """(N, 64) float64 penultimate features of the classifier."""
    import torch

    net = net if net is not None else load()
    with torch.no_grad():
        return np.concatenate([net["body"](chunk).double().numpy() for chunk in as_batch(images).split(256)])


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) between Gaussians fitted to two (N, D) sets.

    The trace of the matrix root is the sum of sqrt eigenvalues of S_a^1/2 S_b S_a^1/2 (symmetric, so eigh)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("a Fréchet distance needs at least two images per set")
    mu = a.mean(axis=0) - b.mean(axis=0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(sa)
    root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root @ sb @ root)
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(np.clip(middle, 0, None)).sum())


def frechet_distance(images_a, images_b, net=None) -> float:
    """Fréchet distance between two image sets on the classifier's features."""
    net = net if net is not None else load()
    return frechet(features(images_a, net), features(images_b, net))


def main(argv=None) -> int:
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    net = train(args.images, args.epochs, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
