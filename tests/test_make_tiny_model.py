"""The tiny model must load and behave like SD-1.5 on disk, since other tests stand it in for SD-1.5."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from launch.make_tiny_model import ARCHS, BUILDERS, make_tiny_model, sd15_configs
from trainers.backbones import FAMILIES, ModelSource, detect_family

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a photo of a red circle"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """One tiny sd15 build (seed 0) shared by the read-only tests."""
    return make_tiny_model("sd15", tmp_path_factory.mktemp("tiny") / "sd15")


@pytest.fixture(scope="module")
def pipe(model_dir):
    """The build loaded back the way training code loads SD-1.5."""
    return StableDiffusionPipeline.from_pretrained(model_dir)


def safetensors_bytes(root: Path) -> dict[str, bytes]:
    """Every weight file under a model dir, keyed by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.safetensors"))}


def test_unet_keeps_sd15_block_layout(pipe):
    """Code written against SD-1.5's block order must find the same blocks."""
    config = pipe.unet.config
    assert tuple(config.down_block_types) == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert config.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert tuple(config.up_block_types) == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert pipe.safety_checker is None and pipe.feature_extractor is None


def test_weight_names_match_sd15(model_dir):
    """LoRA targets and state-dict loaders address weights by SD-1.5's module paths."""
    with safe_open(str(model_dir / UNET_WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight" in keys
    assert "up_blocks.3.attentions.0.transformer_blocks.0.attn2.to_v.weight" in keys


def test_scheduler_has_sd15_config(pipe):
    """Noise schedule and timestep spacing must be SD-1.5's for objectives to be comparable."""
    expected = {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "steps_offset": 1,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "timestep_spacing": "leading",
    }
    assert {k: pipe.scheduler.config[k] for k in expected} == expected


def test_unet_runs_on_encoded_prompt(pipe):
    """Text encoder output must fit the U-Net's cross-attention, as in a training step."""
    tokenizer = pipe.tokenizer
    ids = tokenizer(PROMPT, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0]
        noise = pipe.unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), encoder_hidden_states=states).sample
    assert states.shape == (1, 77, 32)
    assert noise.shape == (1, 4, 8, 8)


def test_vae_downsamples_8x(pipe):
    """Latent geometry must be SD's: 64x64 images become 8x8x4 latents."""
    with torch.no_grad():
        latents = pipe.vae.encode(torch.randn(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)
    assert pipe.vae.config.scaling_factor == 0.18215


def test_tokenizer_round_trips_caption_words(pipe):
    """Captions must encode as BOS, one token per common word, EOS, and decode back."""
    tokenizer = pipe.tokenizer
    ids = tokenizer(PROMPT).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert len(ids) == len(PROMPT.split()) + 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.model_max_length == 77
    assert max(ids) < pipe.text_encoder.config.vocab_size


def test_vocab_and_merges_files_alone_rebuild_tokenizer(model_dir, tmp_path):
    """transformers 4 builds CLIPTokenizer from vocab.json + merges.txt only; those must agree with tokenizer.json."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(model_dir / "tokenizer" / name, tmp_path / name)
    from_files = CLIPTokenizer.from_pretrained(tmp_path)
    saved = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    caption = "a handwritten digit seven in the top left corner"
    assert from_files(caption).input_ids == saved(caption).input_ids


def test_same_seed_writes_identical_weights(model_dir, tmp_path):
    """Reruns must reproduce the model byte for byte, so cached fixtures and results stay valid."""
    again = make_tiny_model("sd15", tmp_path / "again", seed=0)
    assert safetensors_bytes(again) == safetensors_bytes(model_dir)


def test_other_seed_writes_other_weights(model_dir, tmp_path):
    """The seed must actually reach the weights."""
    other = make_tiny_model("sd15", tmp_path / "other", seed=1)
    assert (other / UNET_WEIGHTS).read_bytes() != (model_dir / UNET_WEIGHTS).read_bytes()


def test_full_configs_have_sd15_parameter_counts():
    """Full size must be SD-1.5 exactly; built on the meta device so no weights are allocated."""
    configs = sd15_configs("full")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text_encoder)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]


def test_full_flow_configs_have_the_released_parameter_counts():
    """Flux.1-dev's transformer is 11,901,408,320 parameters, T5-XXL's encoder 4,762,310,656 (as released)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from launch.make_tiny_model import flux_configs, sd3_configs

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    sd3, flux = sd3_configs("full"), flux_configs("full")
    with torch.device("meta"):
        assert count(FluxTransformer2DModel(**flux["transformer"])) == 11_901_408_320
        assert count(T5EncoderModel(T5Config(**sd3["text_encoder_3"]))) == 4_762_310_656
        assert count(CLIPTextModelWithProjection(CLIPTextConfig(**sd3["text_encoder_2"]))) == 694_659_840  # bigG
        assert count(AutoencoderKL(**flux["vae"])) == 83_819_683
        assert count(SD3Transformer2DModel(**sd3["transformer"])) == 2_243_171_520  # SD3.5 Medium's MMDiT-X


def test_unknown_arch_and_size_are_rejected(tmp_path):
    """A typo must fail loudly instead of writing a default model."""
    assert list(ARCHS) == ["sd15", "sdxl", "uvit", "dit", "sd3", "flux"]
    with pytest.raises(ValueError, match="arch"):
        make_tiny_model("sd4", tmp_path / "x")
    with pytest.raises(ValueError, match="size"):
        sd15_configs("medium")


def test_cli_writes_loadable_model(tmp_path):
    """The command line documented in the module docstring must work from the repo root."""
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "launch/make_tiny_model.py", "--arch", "sd15", "--out", str(out), "--seed", "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout and "unet 423,172" in result.stdout
    assert (out / "model_index.json").is_file() and (out / UNET_WEIGHTS).is_file()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_registered_family_has_a_tiny_model_that_auto_detects_as_it(family, tmp_path):
    """The registry is the one list of families: each gets a builder here, and the folder it writes is what
    `model.family: auto` maps back to that family (model_index.json names the family's pipeline_name)."""
    assert set(BUILDERS) == set(FAMILIES), "a family without a tiny builder, or a builder for no family"
    pipe = ARCHS[family]("tiny", 0)
    assert type(pipe).__name__ == FAMILIES[family].pipeline_name
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": type(pipe).__name__}))
    assert detect_family(ModelSource(str(tmp_path), "folder")) == family


def test_family_capabilities_name_real_pipelines_and_known_families():
    """ControlNet pipelines exist in diffusers; kohya naming is only given for registered families."""
    import diffusers

    from trainers import kohya

    for name, cls in FAMILIES.items():
        if cls.controlnet_pipeline:
            assert hasattr(diffusers, cls.controlnet_pipeline), name
    assert set(kohya.FAMILIES) <= set(FAMILIES)
