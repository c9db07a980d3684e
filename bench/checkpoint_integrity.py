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


def timed_saves(out: Path, tensors: dict, state: dict, n: int, with_record: bool) -> list[float]:
    real = integrity.record
    if not with_record:
        integrity.record = lambda folder, skip: {}
    try:
        times = []
        for i in range(n):
            start = time.perf_counter()
            checkpoint.save(out, i + 1, tensors, state, {"name": "bench"}, keep_last=1)
            times.append(time.perf_counter() - start)
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
    parser.add_argument("--saves", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tensors, state = tiny_checkpoint()
    size = sum(v.numel() * v.element_size() for v in tensors.values())
    with tempfile.TemporaryDirectory() as tmp:
        timed_saves(Path(tmp), tensors, state, 3, True)  # warm-up
        plain = statistics.median(timed_saves(Path(tmp), tensors, state, args.saves, False))
        recorded = statistics.median(timed_saves(Path(tmp), tensors, state, args.saves, True))
    print(f"tiny recipe ({size / 2**20:.2f} MiB of weights): save {plain * 1e3:.1f} ms without the record, "
          f"{recorded * 1e3:.1f} ms with it (+{(recorded / plain - 1) * 100:.1f}%)")

    params = sdxl_lora_parameters(32, ("to_q", "to_k", "to_v", "to_out.0"))
    weights = {"model.lora": torch.randn(params)}
    moments = {"optimizer": {"state": {0: {"state1": torch.randint(0, 255, (params,), dtype=torch.uint8),
                                           "state2": torch.randint(0, 255, (params,), dtype=torch.uint8)}}}}
    with tempfile.TemporaryDirectory() as tmp:
        plain = timed_saves(Path(tmp), weights, moments, 1, False)[0]
        recorded = timed_saves(Path(tmp), weights, moments, 1, True)[0]
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
