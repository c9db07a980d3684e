"""trainers/backbones/coord_unet.py: SD's U-Net with coordinate channels, loadable wherever the stock one is."""
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from launch.make_tiny_model import build_sd15
from trainers.backbones.coord_unet import CoordUNet2DConditionModel, with_coordinates

ROOT = Path(__file__).resolve().parents[1]


def test_coordinates_run_left_to_right_and_top_to_bottom():
    out = with_coordinates(torch.zeros(2, 4, 3, 5))
    assert out.shape == (2, 6, 3, 5)
    x, y = out[0, 4], out[0, 5]
    assert torch.equal(x[0], torch.linspace(-1, 1, 5)) and torch.equal(x[:, 0], torch.full((3,), -1.0))
    assert torch.equal(y[:, 0], torch.linspace(-1, 1, 3)) and torch.equal(y[0], torch.full((5,), -1.0))


def tiny_coord_pipeline(folder: Path) -> Path:
    """The tiny SD-1.5 pipeline with its U-Net swapped for a CoordUNet of the same config."""
    pipe = build_sd15("tiny", seed=0)
    torch.manual_seed(0)
    pipe.unet = CoordUNet2DConditionModel(**pipe.unet.config)
    pipe.register_modules(unet=pipe.unet)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def test_coordinates_enter_through_conv_in_and_the_config_stays_stock(tmp_path):
    from diffusers import UNet2DConditionModel

    unet = CoordUNet2DConditionModel.from_pretrained(tiny_coord_pipeline(tmp_path / "pipe") / "unet").eval()
    assert unet.config.in_channels == 4 and unet.conv_in.in_channels == 6
    stock = UNet2DConditionModel(**unet.config).eval()
    state = unet.state_dict()
    stock.load_state_dict(state | {"conv_in.weight": state["conv_in.weight"][:, :4]})
    args = (torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32))
    with torch.no_grad():
        assert not torch.allclose(unet(*args).sample, stock(*args).sample, atol=1e-4)
        unet.conv_in.weight[:, 4:] = 0  # without the coordinate channels' weights it is the stock U-Net
        torch.testing.assert_close(unet(*args).sample, stock(*args).sample)


def test_a_saved_pipeline_loads_in_a_fresh_process_after_importing_the_module(tmp_path):
    folder = tiny_coord_pipeline(tmp_path / "pipe")
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a red circle", num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    torch.save(torch.from_numpy(expected), tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import torch
        import trainers.backbones.coord_unet  # registers the class with diffusers
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(folder)!r})
        assert type(pipe.unet).__name__ == "CoordUNet2DConditionModel"
        pipe.set_progress_bar_config(disable=True)
        got = pipe("a red circle", num_inference_steps=2, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
        diff = (torch.from_numpy(got) - torch.load({str(tmp_path / 'expected.pt')!r})).abs().max().item()
        assert diff < 1e-5, diff
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_sd15_backbone_loads_the_subclass(tmp_path):
    from trainers.backbones import load_backbone
    from trainers.config import ModelConfig

    backbone = load_backbone(ModelConfig(pretrained=str(tiny_coord_pipeline(tmp_path / "pipe"))))
    assert isinstance(backbone.denoiser, CoordUNet2DConditionModel)
