"""Shared fixtures; the tiny pipelines are built once per session because building them takes seconds."""

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models gain nothing from threads; subprocesses inherit this

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # on a loaded 2-core box, intra-op spin-waits made tiny steps 10-60x slower


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide state (precision, device); each test may build its own Trainer."""
    yield
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory):
    """A 64x64-pixel / 8x8-latent StableDiffusionPipeline folder standing in for SD-1.5, which tests cannot download."""
    from launch.make_tiny_model import make_tiny_model

    return make_tiny_model(arch="sd15", out=tmp_path_factory.mktemp("tiny_sd15"), size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A 64x64-pixel StableDiffusionXLPipeline folder: two text encoders and micro-conditioning, tiny."""
    from launch.make_tiny_model import make_tiny_model

    return make_tiny_model(arch="sdxl", out=tmp_path_factory.mktemp("tiny_sdxl"), size="tiny", seed=0)


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory):
    """64 captioned handwritten digits as an imagefolder (metadata.jsonl)."""
    from datasets_prep.digits import write_digits_dataset

    out = tmp_path_factory.mktemp("digits")
    write_digits_dataset(out, n=64, size=64, seed=0)
    return out


@pytest.fixture
def recipe_for(tiny_sd15, digits_data, tmp_path):
    """Build a validated Recipe for the tiny model and data; overrides are dotted `key=value` strings."""
    from trainers.config import load_recipe

    def build(*overrides, out=None):
        base = [f"model.pretrained={tiny_sd15}", f"data.source={digits_data}",
                f"output_dir={out or tmp_path / 'run'}", "train.report_to=none", "data.num_workers=0",
                "validation.every_steps=0", "checkpoint.every_steps=0"]
        return load_recipe("recipes/demo/sd15_lora_tiny.yaml", base + list(overrides))

    return build


@pytest.fixture(scope="session")
def tiny_uvit(tmp_path_factory):
    """A 64x64-pixel UViTPipeline folder: a 5-block U-ViT (width 64, 2x2 patches) on the tiny SD VAE and CLIP."""
    from launch.make_tiny_model import make_tiny_model

    return make_tiny_model(arch="uvit", out=tmp_path_factory.mktemp("tiny_uvit"), size="tiny", seed=0)
