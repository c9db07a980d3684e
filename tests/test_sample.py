"""launch/sample.py: the grid a user looks at, and one-line errors for paths that are not there."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from launch.sample import main
from trainers.images import make_grid

REPO = Path(__file__).resolve().parents[1]


def run_sample(*args: str) -> subprocess.CompletedProcess:
    """Run the script the way a user does."""
    return subprocess.run([sys.executable, "launch/sample.py", *args], cwd=REPO, capture_output=True, text=True)


def default_side(pipeline: Path) -> int:
    """The pipeline's own image side: U-Net sample size times the VAE's downsampling factor."""
    unet = json.loads((pipeline / "unet" / "config.json").read_text())
    vae = json.loads((pipeline / "vae" / "config.json").read_text())
    return unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)


@pytest.fixture(scope="module")
def tiny_lora(tiny_sd15, tmp_path_factory):
    """A LoRA folder for the tiny U-Net with non-zero weights, so loading it visibly changes the samples."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15 / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(0)
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    out = tmp_path_factory.mktemp("tiny_lora")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers)
    return out


def test_make_grid_tiles_row_by_row():
    colours = ["red", "green", "blue", "white", "black", "yellow"]
    grid = make_grid([Image.new("RGB", (4, 3), c) for c in colours], rows=2, cols=3)
    assert grid.size == (12, 6)
    assert [grid.getpixel((4 * (k % 3), 3 * (k // 3))) for k in range(6)] == [
        Image.new("RGB", (1, 1), c).getpixel((0, 0)) for c in colours
    ]
    with pytest.raises(ValueError):
        make_grid([Image.new("RGB", (4, 3))] * 5, rows=2, cols=3)


def test_cli_writes_prompt_by_image_grid(tiny_sd15, tmp_path):
    out = tmp_path / "grid.png"
    args = ["--pipeline", str(tiny_sd15), "--steps", "2", "--prompt", "a", "--prompt", "b"]
    result = run_sample(*args, "--images-per-prompt", "2", "--scheduler", "dpmsolver", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(out)
    side = default_side(tiny_sd15)
    assert Image.open(out).size == (2 * side, 2 * side)


def test_cli_missing_pipeline_exits_2_naming_it(tmp_path):
    missing = tmp_path / "no_such_pipeline"
    result = run_sample("--pipeline", str(missing), "--steps", "2", "--prompt", "a")
    assert result.returncode == 2
    assert str(missing) in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_lora_exits_2_naming_it(tiny_sd15, tmp_path, capsys):
    missing = tmp_path / "no_such_lora"
    assert main(["--pipeline", str(tiny_sd15), "--lora", str(missing), "--steps", "1", "--prompt", "a"]) == 2
    assert str(missing) in capsys.readouterr().err


def test_lora_changes_samples(tiny_sd15, tiny_lora, tmp_path):
    common = ["--pipeline", str(tiny_sd15), "--steps", "1", "--prompt", "a", "--device", "cpu"]
    assert main([*common, "--scheduler", "ddim", "--out", str(tmp_path / "base.png")]) == 0
    assert main([*common, "--scheduler", "ddim", "--out", str(tmp_path / "again.png")]) == 0
    assert main([*common, "--scheduler", "ddim", "--lora", str(tiny_lora), "--out", str(tmp_path / "lora.png")]) == 0
    base, again, lora = (Image.open(tmp_path / f"{n}.png").tobytes() for n in ("base", "again", "lora"))
    assert base == again
    assert base != lora


@pytest.fixture(scope="module")
def tiny_controlnet(tiny_sd15, tmp_path_factory):
    """A ControlNet of the tiny U-Net whose zero convolutions (outputs and the image encoder's last) have weights,
    so the conditioning image matters."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    controlnet = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(tiny_sd15 / "unet"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("controlnet")
    controlnet.save_pretrained(out)
    return out


def test_controlnet_samples_follow_the_conditioning_image(tiny_sd15, tiny_controlnet, tmp_path):
    import numpy as np

    edges = []
    for i, box in enumerate([(8, 8, 24, 24), (40, 40, 56, 56)]):
        image = Image.new("RGB", (64, 64))
        image.paste((255, 255, 255), box)
        edges.append(tmp_path / f"edges{i}.png")
        image.save(edges[-1])
    common = ["--pipeline", str(tiny_sd15), "--controlnet", str(tiny_controlnet), "--prompt", "a", "--prompt", "b",
              "--steps", "2", "--images-per-prompt", "2", "--device", "cpu"]
    assert main([*common, "--image", str(edges[0]), "--image", str(edges[1]), "--out", str(tmp_path / "two.png")]) == 0
    assert main([*common, "--image", str(edges[0]), "--out", str(tmp_path / "one.png")]) == 0
    two, one = (np.asarray(Image.open(tmp_path / n)) for n in ("two.png", "one.png"))
    assert two.shape == (128, 128, 3)
    assert np.array_equal(two[:64], one[:64]) and not np.array_equal(two[64:], one[64:])  # row 2's image differs


@pytest.mark.parametrize("args, message", [
    (["--image", "x.png"], "--controlnet and --image go together"),
    (["--controlnet", "CN"], "--controlnet and --image go together"),
    (["--controlnet", "CN", "--image", "E", "--image", "E", "--image", "E"], "3 --image for 2 --prompt"),
    (["--controlnet", "CN", "--image", "missing.png"], "--image not found: missing.png"),
    (["--controlnet", "nowhere", "--image", "E"], "ControlNet folder not found"),
])
def test_controlnet_arguments_are_named(tiny_sd15, tiny_controlnet, tmp_path, capsys, args, message):
    edge = tmp_path / "e.png"
    Image.new("RGB", (64, 64)).save(edge)
    args = [str(tiny_controlnet) if a == "CN" else str(edge) if a == "E" else a for a in args]
    code = main(["--pipeline", str(tiny_sd15), "--prompt", "a", "--prompt", "b", "--steps", "1", *args])
    assert code == 2 and message in capsys.readouterr().err


def test_the_demo_teacher_samples_and_a_broken_folder_is_one_line(tmp_path, capsys):
    """The demo teacher's U-Net is the project's class: sample.py registers it before loading."""
    teacher = REPO / "assets" / "demo_teacher"
    if (teacher / "model_index.json").is_file():
        assert main(["--pipeline", str(teacher), "--prompt", "a large red circle in the center on a light grey "
                     "background", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "t.png")]) == 0
        assert Image.open(tmp_path / "t.png").size == (32, 32)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["nowhere", "X"]}')
    assert main(["--pipeline", str(broken), "--prompt", "a", "--steps", "1", "--device", "cpu"]) == 2
    assert "cannot load a pipeline from" in capsys.readouterr().err
