"""Score a text-to-image pipeline on the synthetic shapes benchmark: does each image show what its prompt names?

    python launch/evaluate.py --pipeline DIR [--lora DIR_OR_FILE] [--scheduler ddim|dpmpp|lcm|euler] \
        --steps 1,2,4,8 [--guidance 7.5] [--prompts 50] [--images-per-prompt 4] [--only colour=purple] \
        [--exclude colour=purple] [--seed 0] [--resolution 32] [--controlnet DIR] [--captions empty] --out DIR
    python launch/evaluate.py --real --prompts 100 --out DIR     # the same scores for rendered images
    python launch/evaluate.py --world v2 --pipeline DIR --images-per-prompt 8 ... # world v2: coverage too

Prompts are captions of factors drawn from datasets_prep.synth with a held-out seed. For every step count it
reports adherence per factor (datasets_prep.synth_analysis), the sliced Wasserstein distance to real renders of
the same prompts (datasets_prep.synth_distance), denoiser calls per image and wall seconds per image, and writes
results.json, results.md and grid-<steps>.png (one row per prompt). Errors print one line and exit 2.

--controlnet samples through a ControlNet given each prompt's edge map (the outline of a render of its factors);
--captions empty then drops the prompts, so position, shape and size can come from the edge map alone.

--world v2 prompts with world v2's captions, which leave factors open (datasets_prep/synth_world2.py): adherence
is scored on what each caption fixes, coverage on what it leaves open over the K images of a prompt
(datasets_prep/synth_world2_analysis.py), and a Fréchet distance on a classifier's features joins the SWD
(datasets_prep/synth_features.py). Coverage wants K of 8 or more.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from datasets_prep.synth import caption, draw_factors, outline, parse_rules, render, restrict  # noqa: E402
from datasets_prep.synth_analysis import SCORED, adherence, chance  # noqa: E402
from datasets_prep.synth_distance import sliced_wasserstein  # noqa: E402
from datasets_prep import synth_world2, synth_world2_analysis  # noqa: E402
from launch.cli import run_cli  # noqa: E402
from trainers.errors import UserError  # noqa: E402

SCHEDULERS = {  # name: (diffusers class, options beyond the pipeline's own scheduler config)
    "ddim": ("DDIMScheduler", {}),
    "dpmpp": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "lcm": ("LCMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
}
HELD_OUT_SEED = 1_000_000  # prompt and render stream offset, far from the small seeds training data is written with
SCORE_KEYS = (*SCORED, "all", "all_but_position")
CAPTIONS = ("full", "empty")  # what the pipeline is prompted with: each prompt, or the empty prompt
WORLDS = ("v1", "v2")
WORLD2_KEYS = synth_world2_analysis.SCORED
BATCH = 64                 # images per pipeline call; bounds memory without changing any image (per-image seeds)


def held_out_factors(prompts: int, only: dict | None = None, exclude: dict | None = None,
                     seed: int = 0) -> list[tuple[dict, int]]:
    """(factors, render seed) per prompt, drawn like synth's training data but from the held-out stream."""
    try:
        allowed = restrict(only, exclude)
    except ValueError as error:
        raise UserError(f"--only/--exclude: {error}") from None
    return [draw_factors(HELD_OUT_SEED + seed, index, allowed) for index in range(prompts)]


def stream_seed(*keys: int) -> int:
    """A 31-bit seed that depends on every key, so images and render sets never share noise by accident."""
    return int(np.random.default_rng(list(keys)).integers(2**31))


def real_images(drawn: list[tuple[dict, int]], per_prompt: int, resolution: int, variant: int = 0) -> list:
    """Rendered images, prompt-major like a pipeline's output; `variant` picks another set of render seeds."""
    return [render(factors, resolution, stream_seed(render_seed, k, variant))
            for factors, render_seed in drawn for k in range(per_prompt)]


def scheduler_name(name: str | None) -> str | None:
    """A SCHEDULERS key, or None for the pipeline's own ('default'); anything else is a one-line error."""
    if name in (None, "default"):
        return None
    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}; expected one of {', '.join(SCHEDULERS)} or default")
    return name


def make_scheduler(current, name: str | None, timestep_spacing: str | None = None):
    """A sampler named by the CLI (None: the pipeline's own), built from the pipeline's scheduler config (betas,
    prediction type, spacing). A model trained by rectified flow keeps sampling flow: euler is the flow Euler
    sampler, dpmpp DPM-Solver++ on flow sigmas; the others have no flow form."""
    import diffusers

    from trainers.schedulers import for_vp_pipeline, is_flow, swapped

    if is_flow(current):
        flow_names = {"euler": "euler", "dpmpp": "dpmsolver"}
        if name is None:
            return for_vp_pipeline(current)  # SD's pipeline asks any scheduler for both
        if name not in flow_names:
            raise UserError(f"--scheduler {name} has no rectified-flow form; this pipeline samples flow: use "
                            f"{' or '.join(flow_names)} (or default)")
        return swapped(current, flow_names[name])
    if name is None:
        return current
    config = current.config
    class_name, options = SCHEDULERS[name]
    if timestep_spacing is not None:
        options = {**options, "timestep_spacing": timestep_spacing}
    return getattr(diffusers, class_name).from_config(config, **options)


def load_pipeline(folder: Path, lora: Path | None, device: str, student: Path | None = None,
                  controlnet: Path | None = None):
    """DiffusionPipeline.from_pretrained on a folder, with the project's classes registered, then a distilled
    student's denoiser and scheduler (an export with unet/ or transformer/) or a LoRA in place."""
    if not (Path(folder) / "model_index.json").is_file():
        raise UserError(f"pipeline folder not found (no model_index.json): {folder}")
    if lora is not None and not Path(lora).exists():
        raise UserError(f"LoRA path not found: {lora}")
    if student is not None and not any((Path(student) / n / "config.json").is_file() for n in ("unet", "transformer")):
        raise UserError(f"student folder has no unet/ or transformer/ with a config.json: {student}")
    if controlnet is not None and not (Path(controlnet) / "config.json").is_file():
        raise UserError(f"ControlNet folder has no config.json: {controlnet}")
    from trainers.backbones import coord_unet, uvit_pipeline  # noqa: F401  (importing registers our classes)
    from launch.sample import (load_lora, load_pipeline as load_any, resolve_device, use_exported_scheduler,
                               with_trained_controlnet)

    try:
        pipe = load_any(Path(folder), resolve_device(device), "float32")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"cannot load a pipeline from {folder}: {error}") from None
    if student is not None:
        use_exported_denoiser(pipe, Path(student))
        use_exported_scheduler(pipe, Path(student))
    if lora is not None:
        load_lora(pipe, Path(lora))
        use_exported_scheduler(pipe, Path(lora))
    if controlnet is not None:
        pipe = with_trained_controlnet(pipe, Path(controlnet), "float32")
    return pipe


def use_exported_denoiser(pipe, folder: Path) -> None:
    """A distilled student's weights replace the base's denoiser (same class; a guidance embedding may be added)."""
    name = "unet" if (folder / "unet" / "config.json").is_file() else "transformer"
    base = denoiser(pipe)
    try:
        module = type(base).from_pretrained(folder, subfolder=name, torch_dtype=base.dtype)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"cannot load the student's {name} from {folder}: {error}") from None
    pipe.register_modules(**{name: module.to(base.device)})


def denoiser(pipe):
    """The network each sampling step calls: a U-Net, or a transformer (U-ViT, DiT)."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if module is not None:
            return module
    raise UserError(f"{type(pipe).__name__} has neither a unet nor a transformer to count calls of")


class CallCounter:
    """Counts forward calls of a module and the batch rows they carry (CFG doubles the rows, not the calls)."""

    def __init__(self, module):
        self.module, self.calls, self.rows = module, 0, 0

    def __enter__(self):
        self.handle = self.module.register_forward_hook(self.count, with_kwargs=True)
        return self

    def count(self, module, args, kwargs, output):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self.calls += 1
        self.rows += int(sample.shape[0])

    def __exit__(self, *exc):
        self.handle.remove()


def generate(pipe, captions: list[str], per_prompt: int, steps: int, guidance: float, seed: int,
             resolution: int, conditioning: list | None = None) -> tuple[list, dict]:
    """Images prompt-major, and cost per image: denoiser calls, evaluations (batch rows) and wall seconds.

    conditioning: a ControlNet pipeline's image per prompt.

    Every image has its own generator, seeded by (seed, image index), so it starts from the same noise for every
    step count and batch split. A stochastic sampler's re-noising (a flow DMD2 generator's) draws from torch's global
    generators, seeded per batch.
    """
    import torch

    from trainers.schedulers import seeded_sampling

    images, calls, rows, seconds = [], 0.0, 0, 0.0
    chunk = max(1, BATCH // per_prompt)
    for start in range(0, len(captions), chunk):
        prompts = captions[start:start + chunk]
        first = start * per_prompt
        generators = [torch.Generator("cpu").manual_seed(stream_seed(seed, first + i))
                      for i in range(len(prompts) * per_prompt)]
        extra = {"image": conditioning[start:start + chunk]} if conditioning is not None else {}
        with CallCounter(denoiser(pipe)) as counter, seeded_sampling(stream_seed(seed, first)):
            began = time.perf_counter()
            out = pipe(prompt=prompts, num_images_per_prompt=per_prompt, num_inference_steps=steps,
                       guidance_scale=guidance, generator=generators, height=resolution, width=resolution, **extra)
            seconds += time.perf_counter() - began  # PIL output has already synchronised with the device
        images += out.images
        calls += counter.calls * len(generators)  # every image of the batch went through every call
        rows += counter.rows
    n = len(images)
    return images, {"calls_per_image": calls / n, "evaluations_per_image": rows / n, "seconds_per_image": seconds / n}


def scores(images: list, drawn: list[tuple[dict, int]], per_prompt: int, reference: list) -> dict:
    """Adherence per score key, SWD to the reference renders, and each image's detected factors."""
    expected = [factors for factors, _ in drawn for _ in range(per_prompt)]
    rates, detections = adherence(images, expected)
    return {"adherence": rates, "swd": sliced_wasserstein(images, reference), "detected": detections}


def held_out_specs(prompts: int, seed: int = 0) -> list[dict]:
    """World v2: what each held-out caption fixes, from the held-out stream."""
    return [synth_world2.draw_record(HELD_OUT_SEED + seed, index)[0] for index in range(prompts)]


def world2_images(specs: list[dict], per_prompt: int, resolution: int, variant: int = 0) -> list:
    """Renders of scenes each caption describes (its open factors drawn anew per image), prompt-major."""
    return [synth_world2.render(scene, resolution) for index, spec in enumerate(specs)
            for scene in synth_world2.scenes_for(spec, per_prompt, stream_seed(HELD_OUT_SEED, index, variant))]


def world2_scores(images: list, specs: list[dict], per_prompt: int, reference: list) -> dict:
    """Adherence to the fixed factors, coverage of the open ones, SWD and Fréchet distance to the renders."""
    from datasets_prep.synth_features import frechet_distance

    expected = [spec for spec in specs for _ in range(per_prompt)]
    found = [synth_world2_analysis.analyse(image) for image in images]
    return {"adherence": synth_world2_analysis.adherence(found, expected),
            "coverage": synth_world2_analysis.coverage(found, expected, per_prompt),
            "swd": sliced_wasserstein(images, reference), "fd": frechet_distance(images, reference),
            "detected": found}


def world2_benchmark(prompts: int, per_prompt: int, seed: int, resolution: int) -> tuple[dict, list, list]:
    """world v2's `benchmark`: settings and the real row (renders against other renders of the same captions)."""
    if resolution not in synth_world2.SIZES:
        raise UserError(f"--world v2 renders at {' or '.join(map(str, synth_world2.SIZES))} px, not {resolution}")
    if prompts * per_prompt < 2:
        raise UserError("--world v2 needs at least two images (--prompts x --images-per-prompt) for its Fréchet "
                        "distance")
    specs = held_out_specs(prompts, seed)
    reference = world2_images(specs, per_prompt, resolution)
    images = world2_images(specs, per_prompt, resolution, variant=1)
    real = world2_scores(images, specs, per_prompt, reference) | {"images": images}
    results = {"world": "v2", "prompts": [synth_world2.caption(spec) for spec in specs], "specs": specs,
               "images_per_prompt": per_prompt, "resolution": resolution, "seed": seed, "only": {}, "exclude": {},
               "real": real, "runs": []}
    return results, specs, reference


def settings(drawn, per_prompt, resolution, seed, only, exclude) -> dict:
    """What every results dict records about its prompts, so runs can be compared like for like."""
    return {"prompts": [caption(factors) for factors, _ in drawn], "factors": [f for f, _ in drawn],
            "images_per_prompt": per_prompt, "resolution": resolution, "seed": seed,
            "only": only or {}, "exclude": exclude or {}, "chance": chance(restrict(only, exclude))}


def benchmark(prompts: int, images_per_prompt: int, only: dict | None, exclude: dict | None, seed: int,
              resolution: int, world: str = "v1") -> tuple[dict, list, list]:
    """Results holding the settings and the real-image row, plus the drawn factors (v2: specs) and the
    reference renders."""
    if world not in WORLDS:
        raise UserError(f"unknown world {world!r}; expected one of {', '.join(WORLDS)}")
    if world == "v2":
        if only or exclude:
            raise UserError("--only/--exclude restrict world v1's factors; world v2 draws every value")
        return world2_benchmark(prompts, images_per_prompt, seed, resolution)
    drawn = held_out_factors(prompts, only, exclude, seed)
    reference = real_images(drawn, images_per_prompt, resolution)
    images = real_images(drawn, images_per_prompt, resolution, variant=1)
    real = scores(images, drawn, images_per_prompt, reference) | {"images": images}
    results = settings(drawn, images_per_prompt, resolution, seed, only, exclude) | {"real": real, "runs": []}
    return {"world": "v1"} | results, drawn, reference


def evaluate_real(prompts: int = 20, images_per_prompt: int = 4, only: dict | None = None,
                  exclude: dict | None = None, seed: int = 0, resolution: int = 32, world: str = "v1") -> dict:
    """Score rendered images as if generated: the ceiling a perfect generator reaches (adherence 1, SWD floor).

    Returns the settings plus "real": {"adherence", "swd", "detected", "images"} and "runs": []; the SWD is
    between two render-seed sets of the same prompts, i.e. the distance's sampling floor.
    """
    return benchmark(prompts, images_per_prompt, only, exclude, seed, resolution, world)[0]


def evaluate(pipe_or_dir, steps: list[int], *, lora=None, student=None, scheduler: str | None = "ddim",
             timestep_spacing: str | None = None, guidance: float = 7.5, prompts: int = 20,
             images_per_prompt: int = 4, only: dict | None = None, exclude: dict | None = None, seed: int = 0,
             resolution: int = 32, device: str = "auto", controlnet=None, captions: str = "full",
             world: str = "v1") -> dict:
    """Sample held-out prompts at each step count and score them; `evaluate_real`'s dict plus one run per count.

    pipe_or_dir: a pipeline folder or a loaded pipeline (its scheduler is restored afterwards; `lora`, if given,
    stays loaded on it). scheduler: a SCHEDULERS name, or None / "default" for the pipeline's own.
    controlnet: a ControlNet folder; each prompt's edge map conditions it. captions: "full", or "empty" to sample
    every image from the empty prompt (scores still compare with the drawn factors, which the edge map draws).
    Each run: {"steps", "adherence", "swd", "calls_per_image", "evaluations_per_image", "seconds_per_image",
    "detected", "images"}; "images" (PIL, prompt-major) is left out of results.json.
    """
    if not steps or any(int(n) < 1 for n in steps):
        raise UserError(f"steps must be positive integers, got {steps}")
    if world == "v2" and controlnet is not None:
        raise UserError("--controlnet is scored on world v1 (an edge map fixes what v2 leaves open)")
    results, drawn, reference = benchmark(prompts, images_per_prompt, only, exclude, seed, resolution, world)
    score = world2_scores if world == "v2" else scores
    loaded = hasattr(pipe_or_dir, "scheduler")
    if captions not in CAPTIONS:
        raise UserError(f"--captions must be one of {', '.join(CAPTIONS)}, got {captions!r}")
    pipe = pipe_or_dir if loaded else load_pipeline(Path(pipe_or_dir), lora, device, student, controlnet)
    if loaded and lora is not None:
        from launch.sample import load_lora

        load_lora(pipe, Path(lora))
    pipe.set_progress_bar_config(disable=True)
    check_resolution(pipe, resolution)
    own = pipe.scheduler
    pipe.scheduler = make_scheduler(own, scheduler_name(scheduler), timestep_spacing)
    from trainers.schedulers import check_steps

    try:
        for n in steps:
            check_steps(pipe.scheduler, int(n))
    except UserError:
        pipe.scheduler = own
        raise
    texts = results["prompts"] if captions == "full" else [""] * len(results["prompts"])
    edges = [outline(factors, resolution, render_seed) for factors, render_seed in drawn] if controlnet else None
    try:
        generate(pipe, texts[:1], 1, 1, guidance, seed, resolution, edges and edges[:1])  # warm-up: first-call costs
        for n in steps:
            images, cost = generate(pipe, texts, images_per_prompt, int(n), guidance, seed, resolution, edges)
            run = score(images, drawn, images_per_prompt, reference)
            results["runs"].append({"steps": int(n), **run, **cost, "images": images})
    finally:
        sampler = type(pipe.scheduler).__name__
        pipe.scheduler = own
    source = {"pipeline": type(pipe).__name__ if loaded else str(pipe_or_dir),
              "lora": None if lora is None else str(lora), "student": None if student is None else str(student),
              "controlnet": None if controlnet is None else str(controlnet), "captions": captions,
              "scheduler": sampler,
              "prediction_type": own.config.get("prediction_type"), "guidance": guidance}
    return source | results


def check_resolution(pipe, resolution: int) -> None:
    """Refuse a side the VAE cannot map to latents, naming the factor instead of a traceback mid-sampling."""
    factor = getattr(pipe, "vae_scale_factor", 1)
    if resolution % factor:
        raise UserError(f"--resolution {resolution} is not a multiple of the VAE scale factor {factor}")


def row(label, entry: dict, world: str = "v1") -> str:
    """One Markdown table row: cost columns (blank for real images), adherence per key, then the distances
    (v1: SWD; v2: coverage distance, mode ratio, SWD, Fréchet distance)."""
    cost = [f"{entry[k]:g}" if k in entry else "–" for k in ("calls_per_image", "evaluations_per_image")]
    cost.append(f"{entry['seconds_per_image']:.3g}" if "seconds_per_image" in entry else "–")
    keys = WORLD2_KEYS if world == "v2" else SCORE_KEYS
    rates = ["–" if entry["adherence"][k] is None else f"{entry['adherence'][k]:.2f}" for k in keys]
    if world == "v2":
        cover = entry["coverage"]
        rates += ["–" if cover[k] is None else f"{cover[k]:.3f}" for k in ("coverage", "modes")]
        return f"| {label} | " + " | ".join(cost + rates) + f" | {entry['swd']:.4f} | {entry['fd']:.1f} |"
    return f"| {label} | " + " | ".join(cost + rates) + f" | {entry['swd']:.4f} |"


def markdown(results: dict) -> str:
    """results.md: a header naming what ran, then one table row per step count below the real-image row."""
    head = ["# Synthetic-shapes evaluation", "",
            f"pipeline `{results.get('pipeline', 'none (real images)')}`"
            + (f", LoRA `{results['lora']}`" if results.get("lora") else "")
            + (f", ControlNet `{results['controlnet']}` on each prompt's edge map" if results.get("controlnet") else "")
            + (", every image from the empty prompt" if results.get("captions") == "empty" else "")
            + (f", {results['scheduler']} ({results['prediction_type']}), guidance {results['guidance']:g}"
               if "scheduler" in results else ""),
            f"{len(results['prompts'])} held-out prompts x {results['images_per_prompt']} images, "
            f"{results['resolution']} px, seed {results['seed']}"
            + (f", only {results['only']}" if results["only"] else "")
            + (f", exclude {results['exclude']}" if results["exclude"] else ""), ""]
    world = results.get("world", "v1")
    if world == "v2":
        keys = [*WORLD2_KEYS, "coverage", "modes", "SWD", "FD"]
        head[0] += " (world v2)"
    else:
        keys = [k.replace("_", " ") for k in SCORE_KEYS] + ["SWD"]
    table = ["| steps | calls/img | evals/img | s/img | " + " | ".join(keys) + " |",
             "|---" * (4 + len(keys)) + "|", row("real", results["real"], world)]
    table += [row(run["steps"], run, world) for run in results["runs"]]
    cost = ("A call is one denoiser forward; evals counts batch rows (2 per call with classifier-free guidance); "
            "s/img is a batched call's wall time per image.")
    if world == "v2":
        notes = ["", "Adherence: the share of what the captions fix that the images show (count, each named "
                 "attribute, the relation, the background; all: every fixed factor of an image). coverage: total-"
                 "variation distance of the open factors over each prompt's images to the data's, less what as "
                 "many exact draws reach (0 = as close as data samples); modes: the share of the data's modes hit, "
                 "over what exact draws hit (1 = as many). SWD and FD (Fréchet distance on the shapes classifier's "
                 "features) are to renders of the same captions; the real row is their sampling floor. " + cost]
    else:
        rates = ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in results["chance"].items())
        notes = ["", f"Chance (the best fixed guess over the prompts' factor values): {rates}.",
                 "SWD: sliced Wasserstein distance to renders of the same prompts, about an RMS pixel difference on "
                 "a 0..1 scale; the real row is its sampling floor. " + cost]
    return "\n".join(head + table + notes) + "\n"


def write_results(results: dict, out_dir) -> Path:
    """results.json (without images), results.md and grid-<steps>.png / grid-real.png; returns out_dir."""
    from trainers.images import make_grid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, cols = len(results["prompts"]), results["images_per_prompt"]
    entries = [("real", results["real"])] + [(str(run["steps"]), run) for run in results["runs"]]
    for label, entry in entries:
        make_grid(entry["images"], rows=rows, cols=cols).save(out / f"grid-{label}.png")
    plain = {k: v for k, v in results.items() if k not in ("real", "runs")}
    plain["real"] = without_images(results["real"])
    plain["runs"] = [without_images(run) | {"grid": f"grid-{run['steps']}.png"} for run in results["runs"]]
    (out / "results.json").write_text(json.dumps(plain, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    return out


def without_images(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "images"}


def parse_steps(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; anything else is a one-line error."""
    try:
        steps = [int(part) for part in text.split(",")]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1:
        raise UserError(f"--steps wants positive integers separated by commas, e.g. 1,2,4; got {text!r}")
    return steps


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", type=Path, help="diffusers pipeline folder (model_index.json)")
    parser.add_argument("--real", action="store_true", help="score rendered images instead of a pipeline")
    parser.add_argument("--lora", type=Path, help="LoRA folder or .safetensors file to load on top")
    parser.add_argument("--student", type=Path,
                        help="a distilled student's export (unet/ or transformer/, scheduler/) to sample instead "
                             "of the pipeline's denoiser; --scheduler default samples with its own scheduler")
    parser.add_argument("--controlnet", type=Path, help="a ControlNet folder: each prompt's edge map conditions it")
    parser.add_argument("--captions", choices=CAPTIONS, default="full",
                        help="empty: sample from the empty prompt (scored against the edge map's factors)")
    parser.add_argument("--scheduler", default="ddim", help=f"{'|'.join(SCHEDULERS)} or 'default' (the pipeline's)")
    parser.add_argument("--timestep-spacing", choices=("leading", "trailing", "linspace"),
                        help="override the pipeline's spacing (few-step sampling usually wants trailing)")
    parser.add_argument("--steps", default="1,2,4,8", help="step counts, comma-separated")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance; <= 1 turns it off")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--only", action="append", help="factor=value[,value]: keep these (repeatable)")
    parser.add_argument("--exclude", action="append", help="factor=value[,value]: drop these (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--world", choices=WORLDS, default="v1",
                        help="v2: open captions, scored for adherence and coverage (use --images-per-prompt 8+)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", required=True, type=Path)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        only, exclude = parse_rules(args.only), parse_rules(args.exclude)
    except ValueError as error:
        raise UserError(f"--only/--exclude: {error}") from None
    held_out_factors(1, only, exclude)  # rules are checked before any model loads
    if min(args.prompts, args.images_per_prompt, args.resolution) < 1:
        raise UserError("--prompts, --images-per-prompt and --resolution must be positive")
    common = dict(prompts=args.prompts, images_per_prompt=args.images_per_prompt, only=only, exclude=exclude,
                  seed=args.seed, resolution=args.resolution, world=args.world)
    if args.real:
        results = evaluate_real(**common)
    else:
        if args.pipeline is None:
            raise UserError("--pipeline DIR is required (or --real to score rendered images)")
        scheduler = scheduler_name(args.scheduler)  # checked before the model loads, like the rules
        results = evaluate(args.pipeline, parse_steps(args.steps), lora=args.lora, student=args.student,
                           scheduler=scheduler,
                           timestep_spacing=args.timestep_spacing, guidance=args.guidance, device=args.device,
                           controlnet=args.controlnet, captions=args.captions,
                           **common)
    out = write_results(results, args.out)
    print((out / "results.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
