"""How the trained modules are wrapped, stepped and their optimizer checkpointed, per distributed backend.

The loop calls the same methods whatever runs underneath: plain Accelerate (one device, DDP, FSDP) owns an
optimizer the engine steps; one DeepSpeed ZeRO engine clips, steps and zeroes inside its own backward() and keeps
the optimizer state sharded across ranks, so a checkpoint holds it as per-rank files rather than in state.json.
"""
from __future__ import annotations

from pathlib import Path

import torch

from trainers import checkpoint, optimizers
from trainers.config import Recipe
from trainers.errors import UserError


class Accelerated:
    """Accelerate's own wrapping: the engine's optimizer, stepped here, its state in the checkpoint's state.json."""

    sharded = False  # the optimizer state lives in per-rank files (checkpoint.save(staged=True) then)

    def __init__(self, accelerator, recipe: Recipe, device: torch.device, dtype: torch.dtype):
        self.acc, self.recipe, self.device, self.dtype = accelerator, recipe, device, dtype

    def check(self, trained_modules: dict) -> None:
        """Refuse, before training and in a dry run, what this backend cannot run."""

    def prepare(self, modules: tuple, optimizer) -> tuple[tuple, object]:
        """(wrapped modules, wrapped optimizer)."""
        wrapped = self.acc.prepare(*modules)
        wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
        return wrapped, self.acc.prepare(optimizer)

    def grad_norm(self, params: list, max_norm: float | None = None) -> torch.Tensor:
        """The gradients' norm before clipping (clipped to max_norm, default optimizer.max_grad_norm, when that is
        > 0); on the device."""
        max_norm = self.recipe.optimizer.max_grad_norm if max_norm is None else max_norm
        if max_norm > 0:
            return self.acc.clip_grad_norm_(params, max_norm)
        grads = [p.grad for p in params if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))

    def step(self, optimizer, finite: torch.Tensor, guard) -> None:
        """Step unless the guard skips a non-finite step (a fused optimizer or GradScaler skips on the device)."""
        if guard.allows_step(optimizer, finite, self.acc.scaler is not None):
            optimizer.step()

    def save_optimizer(self, optimizer, out: Path, step: int, is_main: bool) -> dict:
        """Every process calls it; what the main process adds to the checkpoint's state."""
        return {"optimizer": optimizer.state_dict()} if is_main else {}

    def load_optimizer(self, optimizer, path: Path, state: dict) -> None:
        if "optimizer" not in state:
            raise UserError(f"resume: {path} was written under DeepSpeed ZeRO (its optimizer state is sharded in "
                            f"{checkpoint.DEEPSPEED}/): resume it with the DeepSpeed config and process count it ran with")
        optimizer.load_state_dict(state["optimizer"])


class DeepSpeedZero(Accelerated):
    """One DeepSpeed engine around the one trained module and its optimizer; the recipe fills the JSON's "auto"s."""

    sharded = True

    def check(self, trained_modules: dict) -> None:
        r = self.recipe
        if len(trained_modules) != 1:
            raise UserError(f"DeepSpeed trains one module, this recipe trains {', '.join(trained_modules)}: "
                            "set adapter.text_encoder: false or use accelerate_configs/multi_gpu.yaml")
        if r.optimizer.name in optimizers.BNB_OPTIMIZERS:
            raise UserError(f"optimizer.name: {r.optimizer.name} (bitsandbytes) cannot be sharded by DeepSpeed "
                            "ZeRO; use optimizer.name: adamw with DeepSpeed, or a DDP config")
        if r.optimizer.name != "adamw":  # Prodigy's global d and schedule-free's x/y swap need whole tensors
            raise UserError(f"optimizer.name: {r.optimizer.name} cannot run on DeepSpeed ZeRO's sharded state; use "
                            "optimizer.name: adamw with DeepSpeed, or a DDP config")
        ds = self.acc.state.deepspeed_plugin.deepspeed_config
        for block in ("optimizer", "scheduler"):
            if block in ds:
                raise UserError(f"the DeepSpeed JSON has an {block!r} block, which would replace the recipe's "
                                f"optimizer.name / lr_schedule; remove it: the recipe chooses them (ZeRO-Offload "
                                "swaps AdamW for DeepSpeedCPUAdam by itself)")

    def prepare(self, modules: tuple, optimizer) -> tuple[tuple, object]:
        from accelerate.utils import convert_outputs_to_fp32

        r = self.recipe
        self.acc.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=r.train.batch_size, gradient_accumulation_steps=r.train.grad_accum,
            gradient_clipping=r.optimizer.max_grad_norm)
        module = modules[0]
        if r.precision != "no":  # accelerate autocasts a prepared forward (fp32 outputs) except under DeepSpeed,
            # which casts the module but not its inputs: autocast it here as elsewhere
            module.forward = convert_outputs_to_fp32(torch.autocast(self.device.type, self.dtype)(module.forward))
        self.engine, optimizer = self.acc.prepare(module, optimizer)  # the engine saves its ZeRO shard
        return (self.engine,), optimizer

    def grad_norm(self, params: list, max_norm: float | None = None) -> torch.Tensor:
        # clipped, stepped and zeroed in the last backward(); DeepSpeed reports a non-finite norm as inf
        return torch.tensor(self.acc.clip_grad_norm_(params, self.recipe.optimizer.max_grad_norm) or 0.0)

    def step(self, optimizer, finite: torch.Tensor, guard) -> None:
        """Nothing: DeepSpeed stepped in backward() and skips a non-finite step itself."""

    def save_optimizer(self, optimizer, out: Path, step: int, is_main: bool) -> dict:
        """Each rank writes its shard into the staging folder the main process made (collectives: all ranks)."""
        if is_main:
            checkpoint.stage(out, step)
        self.acc.wait_for_everyone()
        checkpoint.save_deepspeed(self.engine, out, step)
        self.acc.wait_for_everyone()
        return {}

    def load_optimizer(self, optimizer, path: Path, state: dict) -> None:
        """Each rank its own shard; this also sets the weights from DeepSpeed's fp32 master copy."""
        checkpoint.load_deepspeed(self.engine, path, self.acc.num_processes)


def strategy_for(accelerator, recipe: Recipe, device: torch.device, dtype: torch.dtype) -> Accelerated:
    cls = DeepSpeedZero if accelerator.distributed_type == "DEEPSPEED" else Accelerated
    return cls(accelerator, recipe, device, dtype)
