"""Sampler names that recipes and `launch/sample.py` accept, and the one way a pipeline's scheduler is swapped."""
from __future__ import annotations

import contextlib

from trainers.errors import UserError

SCHEDULERS = {
    "dpmsolver": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "lcm": "LCMScheduler",
}
FLOW_SCHEDULERS = ("dpmsolver", "euler")  # what samples a rectified-flow model (a velocity on sigma in [0, 1])


def check_steps(scheduler, steps: int) -> None:
    """LCMScheduler samples at most original_inference_steps steps: a distilled student's own grid (a 1-step DMD2
    generator's is one step). Name the limit rather than let diffusers' ValueError escape."""
    most = scheduler.config.get("original_inference_steps") if type(scheduler).__name__ == "LCMScheduler" else None
    if most is not None and steps > most:
        raise UserError(f"this model's LCMScheduler samples at most {most} steps (original_inference_steps: the grid "
                        f"it was distilled on), not {steps}")


def is_flow(scheduler) -> bool:
    """A FlowMatch* scheduler, or one already swapped to sample flow (DPM-Solver on flow sigmas). The class, not
    the config's `_class_name`: a scheduler built in memory (`from_config`) has none until it is saved."""
    config = scheduler.config
    return type(scheduler).__name__.startswith("FlowMatch") or bool(config.get("use_flow_sigmas"))


def set_scheduler(pipe, name: str) -> None:
    """Swap the pipeline's scheduler for `name` (see `swapped`)."""
    pipe.scheduler = swapped(pipe.scheduler, name)


def swapped(scheduler, name: str):
    """The sampler `name`, keeping the trained noise schedule from the current scheduler's config.

    A flow-matching model keeps flow sampling: euler is FlowMatchEulerDiscreteScheduler, dpmsolver is DPM-Solver++
    on flow sigmas with the model's shift (as diffusers samples SANA); ddim and lcm have no flow form.
    """
    import diffusers

    config = dict(scheduler.config)
    if not is_flow(scheduler):
        return getattr(diffusers, SCHEDULERS[name]).from_config(config)
    if name == "euler":
        if type(scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
            scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
        return for_vp_pipeline(scheduler)  # a VP model's pipeline (SD, SDXL) trained by rectified flow calls both
    if name == "dpmsolver":
        return diffusers.DPMSolverMultistepScheduler.from_config(
            config, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=config.get("shift", 1.0))
    raise UserError(f"scheduler {name!r} has no flow-matching form; a rectified-flow model samples with "
                    f"{' or '.join(FLOW_SCHEDULERS)}")


def for_vp_pipeline(scheduler):
    """A flow scheduler made callable by pipelines written for VP schedulers, which scale the initial noise by
    `init_noise_sigma` and the model input by `scale_model_input`: FlowMatch schedulers need neither (1 and the
    identity), so lack both. Other schedulers come back as they are.

    The flow Euler sampler also gets Flux's grid of N steps, sigma = 1, (N-1)/N, ..., 1/N (before the shift):
    diffusers' default ends on sigma 0.001, so its last step (0.001 -> 0) does nothing and 2 steps sample like 1
    (bench/README.md, session 15). Every flow Euler sampler our tools make passes here (`swapped`, so validation
    and `--scheduler euler` for any family, SD3's included; the U-ViT and DiT pipelines); sigmas a caller passes
    (FluxPipeline passes this same grid) are kept."""
    if not hasattr(scheduler, "init_noise_sigma"):
        scheduler.init_noise_sigma = 1.0
    if not hasattr(scheduler, "scale_model_input"):
        scheduler.scale_model_input = lambda sample, *args, **kwargs: sample
    if type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and "set_timesteps" not in vars(scheduler):
        scheduler.set_timesteps = _with_trailing_sigmas(scheduler.set_timesteps)
    return scheduler


def _with_trailing_sigmas(set_timesteps):
    import numpy as np

    def trailing(num_inference_steps=None, device=None, sigmas=None, **kwargs):
        if sigmas is None and kwargs.get("timesteps") is None and num_inference_steps:
            sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        return set_timesteps(num_inference_steps, device, sigmas=sigmas, **kwargs)

    return trailing


@contextlib.contextmanager
def seeded_sampling(seed: int):
    """torch's global generators seeded for one pipeline call and restored after it. A stochastic sampler (a flow
    DMD2 generator's FlowMatchEulerDiscreteScheduler with stochastic_sampling) re-noises between steps from them:
    SD3's and Flux's pipelines do not hand their `generator` to scheduler.step, so without this the same seed
    would give other images on every call."""
    import torch

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
