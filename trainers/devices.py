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
