"""Write a randomly initialised diffusion pipeline in the real on-disk format.

Tests, demos and CI cannot download SD-1.5, yet the code they exercise must load a model exactly
the way it loads SD-1.5: `from_pretrained` on a directory holding unet/, vae/, text_encoder/,
tokenizer/ and scheduler/, with SD-1.5's module paths, block types and scheduler config. This
script writes such a directory with random weights, either tiny (fast on CPU, about 2 MB) or at
SD-1.5's full size (for GPU benchmarks). Nothing is downloaded: even the CLIP BPE tokenizer is
learnt here from a small built-in caption corpus.

    python launch/make_tiny_model.py --arch sd15 --out DIR [--size tiny|full] [--seed N]
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

SIZES = ("tiny", "full")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77

# Lowercase ASCII words only: CLIP's pre-tokenizer splits them on spaces and byte-level BPE maps them to themselves.
CAPTION_CORPUS = """
a photo of a red circle on a white background
a photo of a small blue square in the top left corner
a photo of a large green triangle in the bottom right corner
a picture of a yellow star in the center of the image
an image of an orange rectangle on a black background
a drawing of a purple hexagon in the middle
a pink heart and a brown diamond on a gray background
a cyan ellipse next to a magenta cross
a small dark dot above a large light line
a bright striped circle below a plain solid square
a handwritten digit zero
a handwritten digit one
a handwritten digit two
a handwritten digit three
a handwritten digit four
a handwritten digit five
a handwritten digit six
a handwritten digit seven
a handwritten digit eight
a handwritten digit nine
the number zero one two three four five six seven eight nine written in white on black
a photo of a dog and a cat in front of a house
a photo of a person next to a car under a tree
a photo of the sky with clouds at sunset
a red shape in the top right and a blue shape in the bottom left
a tiny object at the left edge and a big object at the right edge
a medium sized outlined square with a filled circle inside
three small green circles and two large red squares
a close up photo of a colorful pattern with many shapes
a black and white photo of a digit on a plain background
"""


def bytes_to_unicode() -> list[str]:
    """CLIP's 256 base symbols in CLIP's vocab order: printable bytes as themselves, the rest shifted past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = range(256, 512 - len(printable))
    return [chr(c) for c in (*printable, *shifted)]


def merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Apply one BPE merge to a word, left to right, as CLIP's tokenizer does."""
    out, i = [], 0
    while i < len(symbols):
        if symbols[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def train_bpe(corpus: str) -> list[tuple[str, str]]:
    """Merge the most frequent pair until every corpus word is one token; ties break on the pair, so runs agree."""
    counts = collections.Counter(corpus.split())
    words = {w: (*w[:-1], w[-1] + END_OF_WORD) for w in counts}
    merges = []
    while True:
        pairs = collections.Counter()
        for word, symbols in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += counts[word]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words = {w: merge_pair(s, best) for w, s in words.items()}
    return merges


@functools.lru_cache(maxsize=1)
def clip_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges laid out as CLIP's: bytes, bytes+</w>, merge results, then BOS and EOS."""
    merges = train_bpe(CAPTION_CORPUS)
    base = bytes_to_unicode()
    tokens = [*base, *(b + END_OF_WORD for b in base), *("".join(m) for m in merges), BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_bpe_files(directory: Path) -> None:
    """Write vocab.json and merges.txt, the files every transformers version can build a CLIPTokenizer from."""
    vocab, merges = clip_bpe()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(" ".join(m) for m in merges)]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_tokenizer() -> CLIPTokenizer:
    """Load the CLIP tokenizer from files: the one constructor shared by transformers 4 and 5."""
    with tempfile.TemporaryDirectory() as tmp:
        write_bpe_files(Path(tmp))
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=MODEL_MAX_LENGTH)


def sd15_unet_config(size: str) -> dict:
    """SD-1.5's U-Net block layout; tiny keeps every block and module path, only narrower and shallower."""
    config = {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "attention_head_dim": 8,
        "cross_attention_dim": 768,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }
    if size == "tiny":
        config |= {
            "sample_size": 8,
            "block_out_channels": (16, 16, 32, 32),
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "cross_attention_dim": 32,
        }
    return config


def sd15_vae_config(size: str) -> dict:
    """SD-1.5's VAE: four encoder/decoder blocks, so latents are 8x smaller than images in both sizes."""
    config = {
        "sample_size": 512,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "latent_channels": 4,
        "act_fn": "silu",
        "scaling_factor": 0.18215,
    }
    if size == "tiny":
        config |= {
            "sample_size": 64,
            "block_out_channels": (8, 16, 16, 16),
            "layers_per_block": 1,
            "norm_num_groups": 8,
        }
    return config


def sd15_text_encoder_config(size: str) -> dict:
    """CLIP ViT-L/14's text tower; special-token ids are the local tokenizer's, not OpenAI's."""
    vocab, _ = clip_bpe()
    config = {
        "vocab_size": 49408,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
        "bos_token_id": vocab[BOS],
        "eos_token_id": vocab[EOS],
        "pad_token_id": vocab[EOS],
    }
    if size == "tiny":
        config |= {
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "projection_dim": 32,
        }
    return config


def sd15_scheduler_config() -> dict:
    """SD-1.5's shipped scheduler_config.json, so noise schedules match the real checkpoint."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "prediction_type": "epsilon",
        "steps_offset": 1,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "timestep_spacing": "leading",
    }


def sd15_configs(size: str) -> dict:
    """All component configs for one size, as plain dicts, so they can be checked without allocating weights."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return {
        "unet": sd15_unet_config(size),
        "vae": sd15_vae_config(size),
        "text_encoder": sd15_text_encoder_config(size),
        "scheduler": sd15_scheduler_config(),
    }


def seeded(seed: int, factory, *args, **kwargs):
    """Build one component right after reseeding, so each one's weights depend only on the seed."""
    torch.manual_seed(seed)
    return factory(*args, **kwargs)


def build_sd15(size: str, seed: int) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline with SD-1.5's structure and random weights."""
    configs = sd15_configs(size)
    return StableDiffusionPipeline(
        unet=seeded(seed, UNet2DConditionModel, **configs["unet"]),
        vae=seeded(seed, AutoencoderKL, **configs["vae"]),
        text_encoder=seeded(seed, CLIPTextModel, CLIPTextConfig(**configs["text_encoder"])),
        tokenizer=build_tokenizer(),
        scheduler=PNDMScheduler.from_config(configs["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


ARCHS = {"sd15": build_sd15}


def write_pipeline(pipe: StableDiffusionPipeline, out: str | Path) -> Path:
    """Save as safetensors, plus vocab.json/merges.txt, which transformers 5 no longer writes but 4 needs."""
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    write_bpe_files(out / "tokenizer")
    return out


def make_tiny_model(arch: str, out: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Build and write one model; the in-process entry point for tests and other code."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    return write_pipeline(ARCHS[arch](size, seed), out)


def summary(pipe: StableDiffusionPipeline, out: Path) -> str:
    """One line: parameter count per component and where it went."""
    names = ("unet", "vae", "text_encoder")
    counts = (f"{name} {sum(p.numel() for p in getattr(pipe, name).parameters()):,}" for name in names)
    return f"wrote {', '.join(counts)} params, tokenizer {len(pipe.tokenizer)} tokens -> {out}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; --arch choices come from ARCHS so new arches need no CLI change."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, choices=sorted(ARCHS))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--size", default="tiny", choices=SIZES)
    parser.add_argument("--seed", default=0, type=int)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Build, write and report."""
    args = parse_args(argv)
    pipe = ARCHS[args.arch](args.size, args.seed)
    print(summary(pipe, write_pipeline(pipe, args.out)))


if __name__ == "__main__":
    main()
