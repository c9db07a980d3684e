"""Exponential moving average of the trained weights (Polyak averaging), kept in float32."""
from __future__ import annotations

import torch


class EMA:
    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = {k: p.detach().float().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self, keep: torch.Tensor | None = None) -> None:
        """shadow <- decay * shadow + (1 - decay) * param in one fused op; keep=0 (a skipped step) leaves it."""
        keys = list(self.shadow)
        weight = 1.0 - self.decay if keep is None else keep.float() * (1.0 - self.decay)
        torch._foreach_lerp_([self.shadow[k] for k in keys], [self.params[k].detach().float() for k in keys],
                             weight)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for k, p in self.params.items():
            p.copy_(self.shadow[k].to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema.{k}": v for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k in self.shadow:
            self.shadow[k].copy_(state[f"ema.{k}"])
