"""What the checkpoint integrity record costs: a save of the tiny recipe with and without it, and the digest of a
full-size SDXL LoRA checkpoint (recipes/sdxl_lora.yaml: rank 32 on the U-Net's attention, 8-bit AdamW).

    OMP_NUM_THREADS=1 python bench/checkpoint_integrity.py [--saves 20]

The SDXL LoRA's parameter count is read off the real SDXL U-Net config built on the meta device (nothing is
allocated); its checkpoint is written as random tensors of that size with the same layout (weights in float32,
two 8-bit moments per weight as the recipe's optimizer keeps them), then saved and verified.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers import checkpoint, integrity  # noqa: E402


def timed_saves(out: Path, tensors: dict, state: dict, n: int) -> tuple[list[float], list[float]]:
    """Save times (seconds) without and with the record, interleaved so that disk noise hits both alike."""
    real, times = integrity.record, ([], [])
    try:
        for i in range(2 * n):
            with_record = i % 2 == 1
            integrity.record = real if with_record else (lambda folder, skip: {})
            start = time.perf_counter()
            checkpoint.save(out, i + 1, tensors, state, {"name": "bench"}, keep_last=1)
            times[with_record].append(time.perf_counter() - start)
        return times
    finally:
        integrity.record = real


def tiny_checkpoint() -> tuple[dict, dict]:
    """The tiny SD-1.5 LoRA recipe's checkpoint content (recipes/demo/sd15_lora_tiny.yaml on the tiny model)."""
    from launch.make_tiny_model import make_tiny_model
    from trainers.config import load_recipe
    from trainers.engine import Trainer

    work = Path(tempfile.mkdtemp())
    model = make_tiny_model(arch="sd15", out=work / "tiny", size="tiny", seed=0)
    from datasets_prep.digits import write_digits_dataset

    write_digits_dataset(work / "digits", n=16, size=64, seed=0)
    trainer = Trainer(load_recipe("recipes/demo/sd15_lora_tiny.yaml", [
        f"model.pretrained={model}", f"data.source={work / 'digits'}", f"output_dir={work / 'run'}",
        "train.max_steps=2", "train.report_to=none", "data.num_workers=0", "validation.every_steps=0",
        "checkpoint.every_steps=0"]))
    trainer.fit()
    return trainer.checkpoint_tensors(), {"optimizer": trainer.optimizer.state_dict()}


def sdxl_lora_parameters(rank: int, targets: tuple[str, ...]) -> int:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from launch.make_tiny_model import sdxl_unet_config

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(sdxl_unet_config("full"))
    total = 0
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in targets):
            total += rank * (module.in_features + module.out_features)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tensors, state = tiny_checkpoint()
    size = sum(v.numel() * v.element_size() for v in tensors.values())
    with tempfile.TemporaryDirectory() as tmp:
        timed_saves(Path(tmp), tensors, state, 3)  # warm-up
        without, with_record = timed_saves(Path(tmp), tensors, state, args.saves)
        folder = checkpoint.complete_checkpoints(Path(tmp))[-1]
        start = time.perf_counter()
        for _ in range(args.saves):
            integrity.record(folder, skip=(checkpoint.STATE,))
        alone = (time.perf_counter() - start) / args.saves
    plain = statistics.median(without)
    extra = statistics.median(b - a for a, b in zip(without, with_record))  # pairwise: robust to disk drift
    print(f"tiny recipe ({size / 2**20:.2f} MiB of weights, {args.saves} interleaved pairs): save {plain * 1e3:.1f} ms "
          f"without the record; the record adds {extra * 1e3:.2f} ms (median pairwise difference, "
          f"{extra / plain * 100:+.1f}%); the record alone, timed by itself: {alone * 1e3:.2f} ms "
          f"({alone / plain * 100:.1f}%)")

    params = sdxl_lora_parameters(32, ("to_q", "to_k", "to_v", "to_out.0"))
    weights = {"model.lora": torch.randn(params)}
    moments = {"optimizer": {"state": {0: {"state1": torch.randint(0, 255, (params,), dtype=torch.uint8),
                                           "state2": torch.randint(0, 255, (params,), dtype=torch.uint8)}}}}
    with tempfile.TemporaryDirectory() as tmp:
        plain, recorded = map(statistics.median, timed_saves(Path(tmp), weights, moments, 3))
        ckpt = checkpoint.complete_checkpoints(Path(tmp))[-1]
        nbytes = sum(p.stat().st_size for p in ckpt.iterdir())
        start = time.perf_counter()
        checkpoint.verify(ckpt)
        verify = time.perf_counter() - start
        start = time.perf_counter()
        integrity.record(ckpt, skip=(checkpoint.STATE,))
        digest = time.perf_counter() - start
    print(f"SDXL LoRA rank 32 ({params / 1e6:.1f} M parameters, checkpoint {nbytes / 2**20:.0f} MiB): save "
          f"{plain:.2f} s without the record, {recorded:.2f} s with it; the digests alone {digest:.2f} s "
          f"({nbytes / 2**20 / digest:.0f} MiB/s); verify before resume (digests + finiteness) {verify:.2f} s")


if __name__ == "__main__":
    main()
