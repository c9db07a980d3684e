"""Sampler names that recipes and `launch/sample.py` accept, and the one way a pipeline's scheduler is swapped."""
from __future__ import annotations

SCHEDULERS = {
    "dpmsolver": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "lcm": "LCMScheduler",
}


def set_scheduler(pipe, name: str) -> None:
    """Swap the scheduler, keeping the trained noise schedule from the current one's config."""
    import diffusers

    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)
