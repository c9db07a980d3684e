"""Non-finite guard: a NaN or inf gradient skips its update; too many in a row stops the run.

Detection stays on the device. Fused AdamW takes a `found_inf` flag and skips the step (moments and step
count included) without a host sync; the fp16 loss scaler already skips such steps itself. Other optimizers
(bitsandbytes) need the flag on the host, one sync per step. The count is read at log steps only.
"""
from __future__ import annotations

import torch

from trainers.errors import UserError


class NonFiniteGuard:
    def __init__(self, device: torch.device, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.total = torch.zeros((), dtype=torch.int64, device=device)
        self.in_a_row = torch.zeros((), dtype=torch.int64, device=device)
        self.longest = torch.zeros((), dtype=torch.int64, device=device)  # since the last check
        self.last_good = torch.zeros((), dtype=torch.int64, device=device)  # the newest step whose update counted

    def record(self, finite: torch.Tensor, step: int) -> None:
        self.last_good.masked_fill_(finite, step)
        bad = (~finite).long()
        self.total += bad
        self.in_a_row.mul_(bad).add_(bad)  # reset to 0 on a finite step, else count up
        torch.maximum(self.longest, self.in_a_row, out=self.longest)

    def allows_step(self, optimizer, finite: torch.Tensor, scaler_active: bool) -> bool:
        """Whether to call optimizer.step(); for fused optimizers the skip happens inside the step."""
        if scaler_active:
            return True  # GradScaler finds the inf/NaN gradients and skips the step
        inner = getattr(optimizer, "optimizer", optimizer)
        if inner.defaults.get("fused"):
            inner.found_inf = (~finite).float()
            inner.grad_scale = None
            return True
        return bool(finite.item())  # host sync: only for optimizers that cannot skip on the device

    def check(self, step: int) -> int:
        """At a log step: the total skipped so far; raise if the last `max_in_a_row` all failed."""
        in_a_row, total = int(self.longest.item()), int(self.total.item())
        self.longest.copy_(self.in_a_row)
        if in_a_row >= self.max_in_a_row:
            raise UserError(f"training diverged: {in_a_row} non-finite losses or gradients in a row up to step "
                            f"{step} ({total} skipped in all); lower optimizer.lr, keep optimizer.max_grad_norm, "
                            "or use precision: bf16 instead of fp16")
        return total

    def check_progress(self, since: int, step: int) -> None:
        """At the end of a run: refuse to call it done when every update after step `since` was skipped, since then
        the last checkpoint's weights are all the run has (one sync)."""
        if int(self.last_good.item()) <= since:
            raise UserError(f"every update after step {since} was skipped as non-finite (steps {since + 1}-{step}), so "
                            "the run is not done and final/ is not written; lower optimizer.lr, keep "
                            "optimizer.max_grad_norm, or resume from an earlier checkpoint")
