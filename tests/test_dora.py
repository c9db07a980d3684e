"""adapter.kind: dora: trains, exports files that stock loaders read to the same weights, resumes exactly."""
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

from trainers import adapters, kohya
from trainers.config import load_recipe
from trainers.engine import Trainer
from trainers.errors import ConfigError

DORA = ("adapter.kind=dora", "adapter.text_encoder=true", "export.dtype=float32", "optimizer.lr=1e-2")


def recipe(tiny_sd15, digits_data, out, *overrides):
    return load_recipe("recipes/demo/sd15_lora_tiny.yaml", [
        f"model.pretrained={tiny_sd15}", f"data.source={digits_data}", f"output_dir={out}", "train.report_to=none",
        "data.num_workers=0", "validation.every_steps=0", "checkpoint.every_steps=0", *DORA, *overrides])


@pytest.fixture(scope="module")
def dora_run(tiny_sd15, digits_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("dora") / "run"
    trainer = Trainer(recipe(tiny_sd15, digits_data, out, "train.max_steps=4", "checkpoint.every_steps=2"))
    trainer.fit()
    return trainer, out


def unet_input(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    return (torch.randn(2, unet.config.in_channels, size, size, generator=g), torch.tensor([10, 700]),
            torch.randn(2, 77, unet.config.cross_attention_dim, generator=g))


def test_the_magnitudes_train_and_the_export_carries_them(dora_run):
    trainer, out = dora_run
    magnitudes = {k: p for k, p in trainer.params.items() if "lora_magnitude_vector" in k}
    assert magnitudes and any(k.startswith("text_encoder.") for k in magnitudes)
    with safe_open(out / "final" / adapters.LORA_WEIGHTS, "pt") as f:
        keys = list(f.keys())
    assert sum("lora_magnitude_vector" in k for k in keys) == len(magnitudes)


def test_a_stock_pipeline_loads_the_dora_and_computes_what_training_did(dora_run, tiny_sd15):
    trainer, out = dora_run
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None, requires_safety_checker=False)
    sample, t, text = unet_input(pipe.unet)
    with torch.no_grad():
        base = pipe.unet(sample, t, text).sample
        pipe.load_lora_weights(out / "final")
        loaded = pipe.unet(sample, t, text).sample
        trained = trainer.backbone.denoiser.float()(sample, t, text).sample
    assert pipe.unet.peft_config["default_0"].use_dora  # read back as DoRA, not as a plain LoRA
    assert (loaded - base).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-5)


def test_the_kohya_file_holds_dora_scale_that_lycoris_reads_to_the_trained_weights(dora_run, tiny_sd15):
    """LyCORIS (the reference reader of dora_scale) rebuilds each layer as m (W0 + s B A) / ||W0 + s B A||."""
    from lycoris import create_lycoris_from_weights

    trainer, out = dora_run
    state = load_file(out / "final" / kohya.KOHYA_WEIGHTS)
    scales = {k: v for k, v in state.items() if k.endswith(".dora_scale") and k.startswith("lora_unet_")}
    assert scales and all(v.dim() == 2 and v.shape[1] == 1 for v in scales.values())  # (out, 1): on the output axis
    with safe_open(out / "final" / kohya.KOHYA_WEIGHTS, "pt") as f:
        assert "dora_wd" in f.metadata()["ss_network_args"]
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    lycoris_keys = {k.replace("lora_unet_", "lycoris_", 1): v for k, v in state.items() if k.startswith("lora_unet_")}
    network, _ = create_lycoris_from_weights(1.0, None, unet, lycoris_keys)
    assert len(network.loras) == len(scales)
    merged = adapters.merged_copy(trainer.backbone.denoiser).state_dict()
    for module in network.loras:
        path = next(n for n, m in unet.named_modules() if f"lycoris_{n}".replace(".", "_") == module.lora_name)
        weight = module.get_merged_weight()[0]
        torch.testing.assert_close(weight, merged[f"{path}.weight"], rtol=0, atol=1e-5)


def test_a_dora_kohya_file_starts_a_dora_run_and_refuses_a_lora_one(dora_run, tiny_sd15, digits_data, tmp_path):
    trainer, out = dora_run
    start = out / "final" / kohya.KOHYA_WEIGHTS
    again = Trainer(recipe(tiny_sd15, digits_data, tmp_path / "again", f"adapter.init_from={start}"))
    sample, t, text = unet_input(trainer.backbone.denoiser)
    with torch.no_grad():
        torch.testing.assert_close(again.backbone.denoiser(sample, t, text).sample,
                                   trainer.backbone.denoiser(sample, t, text).sample, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="'adapter.kind' is lora but adapter.init_from .* holds a dora"):
        Trainer(recipe(tiny_sd15, digits_data, tmp_path / "lora", "adapter.kind=lora", f"adapter.init_from={start}"))


def test_dora_resumes_exactly(dora_run, tiny_sd15, digits_data, tmp_path):
    _, straight = dora_run
    split = tmp_path / "split"
    args = ("train.max_steps=4", "checkpoint.every_steps=2")
    Trainer(recipe(tiny_sd15, digits_data, split, *args)).fit(until=2)
    Trainer(recipe(tiny_sd15, digits_data, split, *args, "resume=auto")).fit()
    a, b = (load_file(run / "final" / adapters.LORA_WEIGHTS) for run in (straight, split))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-7
