"""Per-sample randomness: every draw for a sample comes from (recipe seed, sample position, purpose).

Noise, timesteps, crops and caption dropout then do not depend on how samples are grouped into micro-batches
or processes, so batch 4 x accumulation 1, batch 2 x accumulation 2 and 2-process DDP see the same draws,
and a resumed run continues exactly.
"""
from __future__ import annotations

import random

import numpy as np
import torch

_MASK = (1 << 63) - 1


def mix(*parts: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 finaliser applied in turn)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & _MASK


# Purposes, so that two draws for one sample never share a stream.
NOISE, TIMESTEP, DROPOUT, OFFSET, AUGMENT, LATENT, GUIDANCE, CONTROL_DROPOUT = range(8)


def _generators(seeds: list[int], purpose: int, device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(mix(s, purpose)) for s in seeds]


def randn(seeds: list[int], purpose: int, shape: tuple[int, ...], device, dtype=torch.float32) -> torch.Tensor:
    """(B, *shape) standard normal draws, row i from seeds[i]."""
    gens = _generators(seeds, purpose, torch.device(device))
    return torch.stack([torch.randn(shape, generator=g, device=device, dtype=dtype) for g in gens])


def rand(seeds: list[int], purpose: int, device) -> torch.Tensor:
    """(B,) uniform [0, 1) draws, one per sample."""
    gens = _generators(seeds, purpose, torch.device(device))
    return torch.cat([torch.rand(1, generator=g, device=device) for g in gens])


def randint(seeds: list[int], purpose: int, high: int, device) -> torch.Tensor:
    """(B,) integers in [0, high), one per sample."""
    gens = _generators(seeds, purpose, torch.device(device))
    return torch.cat([torch.randint(high, (1,), generator=g, device=device) for g in gens])


def numpy_rng(seed: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng(mix(seed, purpose))


def seed_everything(seed: int) -> None:
    """Seed the global generators (used only by what we do not control, such as dropout)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
