"""Host-to-device copies that do not stall the step."""
from __future__ import annotations

import torch


def host_to_device(values, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host tensor on the device without a stream sync: pinned memory, then an asynchronous copy.

    (`torch.tensor(x, device="cuda")` copies from pageable memory, which waits for every queued kernel.)
    """
    t = torch.as_tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`module` in `dtype` through torch's Module.to: diffusers' ModelMixin.to adds only a warning about
    `_keep_in_fp32_modules`, which it prints on every cast of an SD3 or Flux transformer (whose list is empty)."""
    return torch.nn.Module.to(module, dtype)
