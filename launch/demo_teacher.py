"""Train the demo teacher from scratch: the tiny text-to-image model `make demo`, tests and benchmarks start from.

No pretrained weights can be downloaded, so the project grows its own small world: 32-px procedural shapes
(`datasets_prep synth`, with one colour held out for the LoRA demo to teach), a 2x-downsampling VAE trained by
the autoencoder objective, then a text-to-image U-Net with its CLIP text encoder trained jointly by the
fine-tune objective on random-initialised weights. The result is a stock StableDiffusionPipeline folder (its
U-Net a CoordUNet2DConditionModel: SD's U-Net plus two coordinate input channels), saved in float16.

    python launch/demo_teacher.py --work teacher_work --out assets/demo_teacher [--vae-steps N] [--unet-steps N]
    python launch/demo_teacher.py --world v2 --work teacher2_work --out assets/demo_teacher_v2   # benchmark v2

--world v2 --flow then fine-tunes that teacher by rectified flow (recipes/demo/teacher2_flow.yaml) into a flow
teacher of the same size (OUT_flow, e.g. assets/demo_teacher_v2_flow), sampled with the flow Euler scheduler;
`--world v2 --flow-from assets/demo_teacher_v2` runs that stage alone on a teacher built before.

--world v2 trains the same layout on world v2 (datasets_prep/synth_world2.py: one to three shapes, captions that
leave factors open) with its own tokenizer (longer captions) and recipe (recipes/demo/teacher2_unet.yaml); the
VAE sees v2 images too (stripes and patterned backgrounds). Two curriculum stages go on from it: one-object
scenes that always name their fill mixed in (recipes/demo/teacher2_fill.yaml; from the world's own captions alone
the U-Net never learned what "striped" means, bench/README.md session 14), then two- and three-object scenes
that name every object's fill, at a lower rate (recipes/demo/teacher2_scenes.yaml; session 15).

Choices a CPU-only trial taught (issue #10): v-prediction on DDPM's linear schedule (beta_end 0.02), since
with SD's weaker schedule the last timestep of a 16x16 latent still shows the layout and the model learns to
read position from the starting noise instead of the prompt; coordinate channels, so positions are easy to
express; no flips or crops, which would contradict the position words.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dataclasses import dataclass  # noqa: E402

from launch.cli import run_cli  # noqa: E402
from launch.clip_bpe import write_bpe_files  # noqa: E402
from launch.sample import use_exported_scheduler  # noqa: E402
from trainers.errors import UserError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VAE_RECIPE = ROOT / "recipes" / "demo" / "teacher_vae.yaml"
UNET_RECIPE = ROOT / "recipes" / "demo" / "teacher_unet.yaml"
FLOW_RECIPE = ROOT / "recipes" / "demo" / "teacher2_flow.yaml"
HELD_OUT = {"colour": "purple"}  # never in the teacher's data: the concept the demo LoRA teaches
RESOLUTION = 32
MAX_TOKENS = 24  # the longest caption is 15 tokens with BOS and EOS


@dataclass(frozen=True)
class Scenes:
    """Curriculum data: scenes of `counts` objects whose captions name every described object's fill, written to
    work/data/FOLDER with seed + seed_offset, and mixed in `repeats` times per epoch."""
    folder: str
    counts: tuple[int, ...]
    seed_offset: int
    repeats: int


@dataclass(frozen=True)
class Curriculum:
    """A stage after the U-Net's, on the world's images mixed with scenes whose captions always name the fill,
    which the world's own captions did not teach (bench/README.md, sessions 14-15)."""
    name: str  # its run folder and its --NAME-steps option
    recipe: Path
    mix: tuple[Scenes, ...]


@dataclass(frozen=True)
class World:
    """What differs between the teachers of the two benchmark worlds."""
    name: str
    max_tokens: int
    unet_recipe: Path
    out: Path
    work: Path
    curriculum: tuple[Curriculum, ...] = ()


WORLDS = {
    "v1": World("v1", MAX_TOKENS, UNET_RECIPE, ROOT / "assets" / "demo_teacher", Path("teacher_work")),
    # the longest v2 caption (three objects, every attribute named, and a background) is about 40 tokens
    "v2": World("v2", 48, ROOT / "recipes" / "demo" / "teacher2_unet.yaml", ROOT / "assets" / "demo_teacher_v2",
                Path("teacher2_work"), (
                    Curriculum("fill", ROOT / "recipes" / "demo" / "teacher2_fill.yaml",
                               (Scenes("fill", (1,), 2, repeats=2),)),
                    Curriculum("scenes", ROOT / "recipes" / "demo" / "teacher2_scenes.yaml",
                               (Scenes("fill", (1,), 2, repeats=1), Scenes("fill_multi", (2, 3), 3, repeats=2))))),
}


def caption_corpus(world: str = "v1") -> str:
    """Every word a synthetic caption can use (v1: held-out colour included), so each is one token."""
    if world == "v2":
        from datasets_prep import synth_world2 as w2

        names = [*w2.OBJECT_FACTORS.values(), w2.BACKGROUNDS, w2.RELATIONS, w2.COUNT_WORDS.values()]
        examples = [w2.caption(w2.draw_record(0, i)[0]) for i in range(64)]
        words = {w for values in names for v in values for w in v.split()} | {w for e in examples for w in e.split()}
        return "\n".join([*examples, *sorted(words)])
    from datasets_prep.synth import FACTORS, caption

    words = {w for values in FACTORS.values() for v in values for w in v.split()}
    example = caption({name: values[0] for name, values in FACTORS.items()})
    return "\n".join([example, *sorted(words | set(example.split()))])


def write_curriculum(folder: Path, n: int, seed: int, counts: tuple[int, ...] = (1,)) -> None:
    """World v2's fill curriculum: scenes of `counts` objects whose captions always name the fill."""
    from datasets_prep.synth_world2 import write_world2_dataset

    if not (folder / "metadata.jsonl").is_file():
        write_world2_dataset(folder, n=n, size=RESOLUTION, seed=seed, counts=counts, always=("fill",))


def curriculum_sources(mix: tuple[Scenes, ...], work: Path, images: int, seed: int) -> str:
    """The data.extra_sources override of a curriculum's mix, its data written first (2/5 of the world's size)."""
    sources = []
    for scenes in mix:
        folder = work / "data" / scenes.folder
        write_curriculum(folder, images * 2 // 5, seed + scenes.seed_offset, scenes.counts)
        sources.append(f"{{source: {folder}, repeats: {scenes.repeats}}}")
    return f"data.extra_sources=[{', '.join(sources)}]"


def write_data(world: str, folder: Path, n: int, seed: int, every_colour: bool) -> None:
    """The training images of a world (v1 holds purple out unless every_colour, for the VAE)."""
    if (folder / "metadata.jsonl").is_file():
        return
    if world == "v2":
        from datasets_prep.synth_world2 import write_world2_dataset

        write_world2_dataset(folder, n=n, size=RESOLUTION, seed=seed)
        return
    from datasets_prep.synth import write_synth_dataset

    write_synth_dataset(folder, n=n, size=RESOLUTION, seed=seed, exclude=None if every_colour else HELD_OUT)


def unet_config() -> dict:
    """3.7M parameters at 16x16x4 latents: convolutions only at 16x16, attention at 8x8 and 4x4 (half the step
    time of attention at 16x16 on a CPU), small enough that the float16 pipeline stays under 10 MB."""
    return {
        "sample_size": RESOLUTION // 2,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (48, 96, 96),
        "layers_per_block": 1,
        "norm_num_groups": 16,
        "attention_head_dim": 4,
        "cross_attention_dim": 64,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


def vae_config() -> dict:
    """One downsampling: 32-px images to 16x16x4 latents."""
    return {
        "sample_size": RESOLUTION,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "norm_num_groups": 16,
        "latent_channels": 4,
        "act_fn": "silu",
        "mid_block_add_attention": False,  # 16x16 needs no attention to encode a shape; twice the speed without
        "scaling_factor": 1.0,  # set from the trained latents' std by the autoencoder objective
    }


def text_encoder_config(vocab: dict, max_tokens: int = MAX_TOKENS) -> dict:
    from launch.clip_bpe import BOS, EOS

    return {"vocab_size": len(vocab), "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 256, "max_position_embeddings": max_tokens, "hidden_act": "quick_gelu",
            "projection_dim": 64, "bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS], "pad_token_id": vocab[EOS]}


def scheduler_config() -> dict:
    """DDPM's linear betas with v-prediction; trailing spacing, so samplers start at the last, pure-noise step."""
    return {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
            "prediction_type": "v_prediction", "timestep_spacing": "trailing", "steps_offset": 0,
            "clip_sample": False, "set_alpha_to_one": False}


def build_initial(out: Path, seed: int = 0, world: str = "v1") -> Path:
    """The random-initialised pipeline both training stages start from."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from launch.clip_bpe import build_tokenizer, clip_bpe
    from launch.make_tiny_model import seeded
    from trainers.backbones.coord_unet import CoordUNet2DConditionModel

    corpus, max_tokens = caption_corpus(world), WORLDS[world].max_tokens
    vocab, _ = clip_bpe(corpus)
    pipe = StableDiffusionPipeline(
        unet=seeded(seed, CoordUNet2DConditionModel, **unet_config()),
        vae=seeded(seed, AutoencoderKL, **vae_config()),
        text_encoder=seeded(seed, CLIPTextModel, CLIPTextConfig(**text_encoder_config(vocab, max_tokens))),
        tokenizer=build_tokenizer(corpus, max_tokens), scheduler=DDPMScheduler.from_config(scheduler_config()),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    write_bpe_files(out / "tokenizer", corpus)
    return out


def with_component(base: Path, name: str, source: Path, out: Path) -> Path:
    """A copy of the pipeline folder `base` whose component `name` is the folder `source`."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp)
    shutil.rmtree(tmp / name)
    shutil.copytree(source, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def assemble(start: Path, unet_final: Path, out: Path, world: str = "v1") -> Path:
    """The teacher: trained U-Net and text encoder over `start` (tokenizer, trained VAE), all in float16."""
    from diffusers import StableDiffusionPipeline

    import trainers.backbones.coord_unet  # noqa: F401  (registers the U-Net class)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(start, tmp)
    for name in ("unet", "text_encoder"):
        shutil.rmtree(tmp / name)
        shutil.copytree(unet_final / name, tmp / name)
    pipe = StableDiffusionPipeline.from_pretrained(tmp)
    use_exported_scheduler(pipe, unet_final)  # the trained run's: DDPM, or flow after the flow stage
    shutil.rmtree(tmp)
    pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    write_bpe_files(tmp / "tokenizer", caption_corpus(world))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def assemble_checkpoint(start: Path, checkpoint: Path, out: Path, world: str = "v1") -> Path:
    """The teacher from a U-Net stage's checkpoint (stage 2, or the flow stage): its EMA weights where it kept an
    EMA, else its trained weights; a flow stage's checkpoint samples with the flow scheduler."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    import trainers.backbones.coord_unet  # noqa: F401  (registers the U-Net class)

    tensors = load_file(checkpoint / "weights.safetensors")
    prefix = "ema." if any(k.startswith("ema.") for k in tensors) else "model."
    pipe = StableDiffusionPipeline.from_pretrained(start)
    run_recipe = checkpoint.parent.parent / "recipe.yaml"
    if run_recipe.is_file():
        from trainers.config import load_recipe

        objective = load_recipe(run_recipe, []).objective
        if objective.schedule == "flow":  # what the flow stage's export ships (trainers/objectives/base.py)
            from diffusers import FlowMatchEulerDiscreteScheduler

            pipe.scheduler = FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=pipe.scheduler.config.num_train_timesteps, shift=objective.flow.shift or 1.0)
    for name in ("unet", "text_encoder"):
        module = getattr(pipe, name)
        state = {k[len(prefix) + len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{prefix}{name}.")}
        missing = set(dict(module.named_parameters())) - set(state)
        if missing:
            raise UserError(f"{checkpoint}: no {name} weights for {sorted(missing)[:3]}...")
        module.load_state_dict(state, strict=False)  # parameters only; buffers keep their initial values
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    write_bpe_files(tmp / "tokenizer", caption_corpus(world))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def train_stage(recipe: Path, overrides: list[str]) -> Path:
    from launch.cli import fit_stage
    from trainers.config import load_recipe

    return fit_stage(load_recipe(recipe, overrides)).final_dir


def shortened(recipe: Path, steps: int | None) -> list[str]:
    """Overrides that run a recipe for `steps` optimizer steps; a wsd decay keeps its share of the run (and the
    warmup yields to it), so a short trial of a stage still ends on its decay."""
    if steps is None:
        return []
    from trainers.config import load_recipe

    r = load_recipe(recipe, [])
    overrides = [f"train.max_steps={steps}"]
    if r.lr_schedule.name == "wsd":
        decay = max(1, steps * r.lr_schedule.decay_steps // r.train.max_steps)
        warmup = min(r.lr_schedule.warmup_steps, steps - decay)
        overrides += [f"lr_schedule.decay_steps={decay}", f"lr_schedule.warmup_steps={warmup}"]
    return overrides


def flow_stage(teacher: Path, start: Path, work: Path, data: Path, out: Path, world: str,
               args: argparse.Namespace, began: float) -> Path:
    """The last stage: the teacher fine-tuned by rectified flow, on the same data (v2: with the last curriculum
    stage's mix, so the flow teacher keeps the fill binding the curriculum taught)."""
    overrides = [f"model.pretrained={teacher}", f"output_dir={work / 'runs' / 'flow'}", f"data.source={data}",
                 f"train.seed={args.seed}", *shortened(FLOW_RECIPE, args.flow_steps)]
    if WORLDS[world].curriculum:
        overrides.append(curriculum_sources(WORLDS[world].curriculum[-1].mix, work, args.images, args.seed))
    flow = assemble(start, train_stage(FLOW_RECIPE, [*overrides, *args.overrides]), out, world)
    print(f"flow teacher in {flow} after {(time.perf_counter() - began) / 60:.1f} min")
    return flow


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=tuple(WORLDS), default="v1", help="the benchmark world it learns")
    parser.add_argument("--work", type=Path, help="data, initial model and runs (teacher_work; v2: teacher2_work)")
    parser.add_argument("--out", type=Path, help="assets/demo_teacher (v2: assets/demo_teacher_v2)")
    parser.add_argument("--images", type=int, default=20000, help="synthetic training images")
    parser.add_argument("--vae-steps", type=int, default=None, help="override the VAE recipe's train.max_steps")
    parser.add_argument("--unet-steps", type=int, default=None, help="override the U-Net recipe's train.max_steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-checkpoint", type=Path, default=None,
                        help="assemble the teacher from this U-Net checkpoint (its EMA weights) without training")
    parser.add_argument("--fill-steps", type=int, default=None,
                        help="v2: override the fill curriculum recipe's train.max_steps")
    parser.add_argument("--scenes-steps", type=int, default=None,
                        help="v2: override the multi-object curriculum recipe's train.max_steps")
    parser.add_argument("--flow", action="store_true",
                        help="then fine-tune the teacher by rectified flow into OUT_flow (the flow teacher)")
    parser.add_argument("--flow-from", type=Path, default=None, metavar="TEACHER",
                        help="only the flow stage, fine-tuning this teacher (e.g. the committed one) into OUT "
                             "(default TEACHER_flow)")
    parser.add_argument("--flow-steps", type=int, default=None, help="override the flow recipe's train.max_steps")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for the U-Net recipe")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    world = WORLDS[args.world]
    work, out, began = args.work or world.work, args.out or world.out, time.perf_counter()
    start = work / "with_vae"  # the initial pipeline with the trained VAE: stage 2 starts from it
    if args.from_checkpoint is not None:
        teacher = assemble_checkpoint(start, args.from_checkpoint, out, world.name)
        print(f"demo teacher in {teacher} from {args.from_checkpoint}")
        return 0
    data, every_colour = work / "data" / "shapes", work / "data" / "all_colours"
    write_data(world.name, data, args.images, args.seed, every_colour=False)
    if args.flow_from is not None:  # the flow stage alone, on a teacher built before (its own VAE and tokenizer)
        flow_out = args.out or args.flow_from.with_name(args.flow_from.name + "_flow")
        flow_stage(args.flow_from, args.flow_from, work, data, flow_out, world.name, args, began)
        return 0
    # the VAE is the model's image codec: it must be able to draw the held-out colour, which only the
    # text-to-image stage never sees (a VAE without purple drew it green)
    write_data(world.name, every_colour, args.images // 2, args.seed + 1, every_colour=True)
    initial = work / "initial"
    if not (initial / "model_index.json").is_file():
        build_initial(initial, args.seed, world.name)
    seed = [f"train.seed={args.seed}"]
    vae_steps = shortened(VAE_RECIPE, args.vae_steps)
    vae_final = train_stage(VAE_RECIPE, [f"model.pretrained={initial}", f"output_dir={work / 'runs' / 'vae'}",
                                         f"data.source={every_colour}", *seed, *vae_steps])
    with_component(initial, "vae", vae_final / "vae", start)
    unet_steps = shortened(world.unet_recipe, args.unet_steps)
    unet_final = train_stage(world.unet_recipe, [f"model.pretrained={start}", f"output_dir={work / 'runs' / 'unet'}",
                                           f"data.source={data}", *seed, *unet_steps, *args.overrides])
    trained = unet_final
    for number, stage in enumerate(world.curriculum, start=2):  # each goes on from the last one's teacher
        previous = assemble(start, trained, work / f"stage{number}", world.name)  # float16, EMA weights
        trained = train_stage(stage.recipe, [
            f"model.pretrained={previous}", f"output_dir={work / 'runs' / stage.name}", f"data.source={data}",
            curriculum_sources(stage.mix, work, args.images, args.seed), *seed,
            *shortened(stage.recipe, getattr(args, f"{stage.name}_steps")), *args.overrides])
    teacher = assemble(start, trained, out, world.name)
    print(f"demo teacher in {teacher} after {(time.perf_counter() - began) / 60:.1f} min")
    if args.flow:
        flow_stage(teacher, start, work, data, out.with_name(out.name + "_flow"), world.name, args, began)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
