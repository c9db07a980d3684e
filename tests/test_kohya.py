"""trainers/kohya.py: kohya-format LoRA files that diffusers, ComfyUI, A1111 and kohya load, and reading them back."""
import dataclasses
import datetime
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainers import adapters, kohya
from trainers.errors import UserError

RANK, ALPHA = 4, 8.0  # alpha != rank on purpose: a file carrying alpha = rank loads at half strength
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]

# Loads each LoRA into a fresh pipeline in a fresh process, the way a user's script would.
LOADER = """
import sys
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file
from test_kohya import probe
base, out, sources = sys.argv[1], sys.argv[2], sys.argv[3:]
results = {}
for i, source in enumerate(sources):
    pipe = StableDiffusionPipeline.from_pretrained(base)
    if source.startswith("sgm:"):  # LDM block names: remapped only given the U-Net config, as SDXL's pipeline does
        pipe.load_lora_weights(source[4:], unet_config=pipe.unet.config)
    elif source != "base":
        pipe.load_lora_weights(source)
    results |= {f"{i}.{k}": v.contiguous() for k, v in probe(pipe).items()}
save_file(results, out)
"""


def probe(pipe) -> dict[str, torch.Tensor]:
    """U-Net and text-encoder outputs on fixed inputs: what a LoRA changes, comparable across processes."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 8, 8, generator=g)
    h = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    ids = pipe.tokenizer(["a red circle", "a handwritten digit seven"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return {"unet": pipe.unet(z, torch.tensor([10, 700]), encoder_hidden_states=h).sample,
                "text_encoder": pipe.text_encoder(ids)[0]}


def load_in_fresh_process(base: Path, sources: list, tmp_path: Path) -> list[dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    out = tmp_path / "probes.safetensors"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", LOADER, str(base), str(out), *map(str, sources)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = load_file(out)
    return [{k: found[f"{i}.{k}"] for k in ("unet", "text_encoder")} for i in range(len(sources))]


def add_lora(tiny_sd15, unet_targets):
    """The tiny pipeline with a non-zero LoRA (r=4, alpha=8) on U-Net and text encoder, its outputs, peft state."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15)
    for module, targets in ((pipe.unet, unet_targets), (pipe.text_encoder, TE_TARGETS)):
        module.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False, target_modules=targets))
    state, alphas = kohya.peft_lora({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    return pipe, probe(pipe), state, alphas


@pytest.fixture(scope="module")
def trained(tiny_sd15):
    """LoRA on SD's default U-Net targets (attention projections)."""
    from trainers.backbones.sd import SDBackbone

    return add_lora(tiny_sd15, list(SDBackbone.lora_targets))


@pytest.fixture(scope="module")
def trained_wide(tiny_sd15):
    """LoRA on every layer kohya's sd-scripts adapts in a transformer block, 1x1-conv proj_in/proj_out included."""
    return add_lora(tiny_sd15, UNET_TARGETS)


def test_diffusers_and_kohya_files_load_to_the_same_model(trained, trained_wide, tiny_sd15, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe, expected, state, alphas = trained
    adapters.save_lora(tmp_path / "diffusers", StableDiffusionPipeline, "unet", pipe.unet,
                       {"text_encoder": pipe.text_encoder}, torch.float32)
    meta = kohya.kohya_metadata(RANK, ALPHA, "test")
    kohya_file = kohya.save_kohya(tmp_path / kohya.KOHYA_WEIGHTS, state, alphas, meta)
    # LDM block names (lora_unet_input_blocks_1_1_...), as the SDXL seam writes them
    ldm = dataclasses.replace(kohya.family_for("sd15", pipe.unet), unet_names="ldm")
    ldm_file = kohya.save_kohya(tmp_path / "ldm.safetensors", state, alphas, meta, family=ldm)
    rank_file = kohya.save_kohya(tmp_path / "alpha_is_rank.safetensors", state, float(RANK), meta)
    _, expected_wide, state_wide, alphas_wide = trained_wide
    wide_file = kohya.save_kohya(tmp_path / "wide.safetensors", state_wide, alphas_wide, meta)

    base, from_diffusers, from_kohya, from_ldm, alpha_is_rank, wide = load_in_fresh_process(
        tiny_sd15, ["base", tmp_path / "diffusers", kohya_file, f"sgm:{ldm_file}", rank_file, wide_file], tmp_path)
    for part in ("unet", "text_encoder"):
        for loaded in (from_diffusers, from_kohya, from_ldm):
            torch.testing.assert_close(loaded[part], expected[part], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(wide[part], expected_wide[part], rtol=1e-5, atol=1e-5)
        assert (expected[part] - base[part]).abs().max() > 1e-2  # the LoRA does change the model
        assert (alpha_is_rank[part] - expected[part]).abs().max() > 1e-2  # and its alpha matters


def test_key_spelling_is_kohyas(trained_wide):
    pipe, _, state, alphas = trained_wide
    out = kohya.to_kohya(state, alphas)
    modules = {key.split(".")[0] for key in out}
    assert all(re.fullmatch(r"lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)", k) for k in out)
    assert len(out) == 3 * len(modules)
    # sd-scripts networks/lora.py create_modules: "lora_unet" + "." + module path, dots turned into underscores
    lora_paths = {path for path, m in pipe.unet.named_modules() if hasattr(m, "lora_A")}
    kohya_rule = {"lora_unet_" + p.replace(".", "_") for p in lora_paths}
    assert {m for m in modules if m.startswith("lora_unet_")} == kohya_rule
    # ComfyUI comfy/lora.py model_lora_keys_clip: "lora_te_text_model_encoder_layers_{}_{}" over LORA_CLIP_MAP
    clip_map = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]
    layers = pipe.text_encoder.config.num_hidden_layers
    assert {m for m in modules if m.startswith("lora_te")} == {
        f"lora_te_text_model_encoder_layers_{i}_{c}" for i in range(layers) for c in clip_map}
    for key in ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
                "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight",
                "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.alpha",
                "lora_unet_up_blocks_3_attentions_1_transformer_blocks_0_attn1_to_out_0.lora_up.weight",
                "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_down.weight",
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                "lora_te_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight",
                "lora_te_text_model_encoder_layers_1_mlp_fc2.alpha"]:
        assert key in out
    for module in modules:
        down, up, alpha = (out[f"{module}.{part}"] for part in ("lora_down.weight", "lora_up.weight", "alpha"))
        assert alpha.shape == () and alpha.dtype == torch.float32 and alpha.item() == ALPHA != RANK
        assert down.shape[0] == RANK and up.shape[1] == RANK


# (diffusers path, LDM path) on SD-1.5's real U-Net: A1111's convert_diffusers_name_to_compvis gives input block
# 1 + 3 x + i, output block 3 x + i, middle_block_1; ComfyUI's unet_to_diffusers gives the same.
SD15_LDM = [("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.transformer_blocks.0.attn1.to_q"),
            ("down_blocks.2.attentions.1.proj_in", "input_blocks.8.1.proj_in"),
            ("mid_block.attentions.0.transformer_blocks.0.attn2.to_v", "middle_block.1.transformer_blocks.0.attn2.to_v"),
            ("up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2", "output_blocks.3.1.transformer_blocks.0.ff.net.2"),
            ("up_blocks.3.attentions.2.proj_out", "output_blocks.11.1.proj_out")]


@pytest.mark.parametrize("diffusers_name, ldm_name", SD15_LDM)
def test_ldm_names_of_sd15(diffusers_name, ldm_name):
    assert kohya.ldm_path(diffusers_name, 2) == ldm_name
    assert kohya.diffusers_path(ldm_name, 2) == diffusers_name


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("size", ["tiny", "full"])
def test_ldm_names_agree_with_diffusers_single_file_conversion(arch, size):
    """Every U-Net layer with weights, named the LDM way, lands on itself through convert_ldm_unet_checkpoint
    (diffusers' reader of original SD/SDXL checkpoints): attentions, ResNets, down/upsamplers, time and SDXL's
    micro-conditioning embeddings, conv_in/out. LCM-LoRA targets ResNets and samplers too."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from launch import make_tiny_model

    with torch.device("meta"):
        unet = UNet2DConditionModel(**getattr(make_tiny_model, f"{arch}_unet_config")(size))
    family = kohya.family_for(arch, unet)
    paths = [p for p, m in unet.named_modules() if getattr(m, "weight", None) is not None]
    params = [(p, kind) for p, m in unet.named_modules() for kind in ("weight", "bias")
              if getattr(m, kind, None) is not None]
    ldm = {p: kohya.ldm_path(p, family.layers_per_block, family.up_attention) for p in paths}
    ckpt = {f"model.diffusion_model.{ldm[p]}.{kind}": torch.tensor(float(i)) for i, (p, kind) in enumerate(params)}
    converted = convert_ldm_unet_checkpoint(ckpt, dict(unet.config))
    assert {k: v.item() for k, v in converted.items()} == {f"{p}.{kind}": float(i) for i, (p, kind) in enumerate(params)}
    for p in paths:  # and back
        assert kohya.diffusers_path(kohya.ldm_path(p, family.layers_per_block, family.up_attention),
                                    family.layers_per_block) == p


def test_every_layer_name_survives_the_round_trip(tiny_sd15):
    """Names are rebuilt from underscores: try every Linear and Conv2d of the U-Net and the text encoder."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    state = {}
    for component, model in (("unet", UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")),
                              ("text_encoder", CLIPTextModel.from_pretrained(tiny_sd15, subfolder="text_encoder"))):
        for path, m in model.named_modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                state[f"{component}.{path}.lora_A.weight"] = torch.randn(2, 3)
                state[f"{component}.{path}.lora_B.weight"] = torch.randn(3, 2)
    alphas = {key.rsplit(".", 2)[0]: float(i) for i, key in enumerate(state) if key.endswith("lora_A.weight")}
    back = kohya.from_kohya(kohya.to_kohya(state, alphas))
    assert_same_lora(back, state, alphas)


def test_from_kohya_inverts_to_kohya(trained_wide):
    pipe, _, state, alphas = trained_wide
    for family in ("sd15", dataclasses.replace(kohya.family_for("sd15", pipe.unet), unet_names="ldm")):
        assert_same_lora(kohya.from_kohya(kohya.to_kohya(state, alphas, family), family), state, alphas)


def assert_same_lora(back: kohya.KohyaLora, state: dict, alphas: dict) -> None:
    """`back` holds `state` and `alphas`, text-encoder paths in kohya's `text_model.` spelling."""
    def spelt(key):
        component, _, path = key.partition(".")
        return key if component == "unet" else f"{component}.{kohya.clip_path(path)}"

    merged = {f"unet.{k}": v for k, v in back.unet.items()}
    merged |= {f"{c}.{k}": v for c, sd in back.text_encoders.items() for k, v in sd.items()}
    assert merged.keys() == {spelt(k) for k in state}
    assert all(torch.equal(merged[spelt(k)], v) for k, v in state.items())
    assert back.alphas == {spelt(k): v for k, v in alphas.items()}


def test_a_kohya_file_starts_a_run_where_it_left_off(trained_wide, tiny_sd15, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    _, expected, state, alphas = trained_wide
    path = kohya.save_kohya(tmp_path / "in.safetensors", state, alphas, kohya.kohya_metadata(RANK, ALPHA, "t"))
    lora = kohya.from_kohya(load_file(path))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15)
    kohya.load_lora(pipe.unet, lora.unet, lora.alphas, "unet")
    kohya.load_lora(pipe.text_encoder, lora.text_encoders["text_encoder"], lora.alphas, "text_encoder")
    got = probe(pipe)
    for part in ("unet", "text_encoder"):
        torch.testing.assert_close(got[part], expected[part], rtol=1e-5, atol=1e-5)
    trainable = [n for n, p in pipe.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert pipe.unet.peft_config["default"].r == RANK and pipe.unet.peft_config["default"].lora_alpha == ALPHA


def test_per_layer_rank_and_alpha_become_patterns(trained, tiny_sd15):
    from diffusers import UNet2DConditionModel

    _, _, state, alphas = trained
    odd = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    state = dict(state, **{f"unet.{odd}.lora_A.weight": state[f"unet.{odd}.lora_A.weight"][:2],
                           f"unet.{odd}.lora_B.weight": state[f"unet.{odd}.lora_B.weight"][:, :2]})
    lora = kohya.from_kohya(kohya.to_kohya(state, dict(alphas, **{f"unet.{odd}": 1.0})))
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    kohya.load_lora(unet, lora.unet, lora.alphas, "unet")
    layer = unet.get_submodule(odd)
    assert layer.r["default"] == 2 and layer.scaling["default"] == 0.5
    other = unet.get_submodule(odd.replace("to_q", "to_k"))
    assert other.r["default"] == RANK and other.scaling["default"] == ALPHA / RANK


def test_metadata_and_atomic_save(trained, tmp_path):
    from safetensors import safe_open

    _, _, state, alphas = trained
    meta = kohya.kohya_metadata(RANK, ALPHA, "my lora", resolution=768, date=datetime.datetime(2026, 1, 2, 3, 4, 5))
    assert meta == {
        "ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "8.0",
        "ss_base_model_version": "sd_v1", "ss_resolution": "(768, 768)", "ss_training_comment": "difftune",
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers", "modelspec.title": "my lora", "modelspec.resolution": "768x768",
        "modelspec.date": "2026-01-02T03:04:05"}
    path = tmp_path / kohya.KOHYA_WEIGHTS
    path.write_text("an older file")
    kohya.save_kohya(path, state, alphas, meta)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == meta and len(list(f.keys())) == len(kohya.to_kohya(state, alphas))
    assert [p.name for p in tmp_path.iterdir()] == [kohya.KOHYA_WEIGHTS]  # no temp file left behind


def test_clear_errors_for_what_cannot_convert(trained):
    _, _, state, alphas = trained
    with pytest.raises(UserError, match="no alpha for unet"):
        kohya.to_kohya(state, {"text_encoder": ALPHA})
    with pytest.raises(UserError, match="not a LoRA, DoRA, LoHa or LoKr weight"):  # LoCon's Tucker core, say
        kohya.from_kohya({"lora_unet_mid_block_attentions_0_proj_in.lora_mid.weight": torch.zeros(2, 2)})
    with pytest.raises(UserError, match="starts with none of lora_unet, lora_te"):
        kohya.from_kohya({"lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)})
    with pytest.raises(UserError, match="no kohya naming"):
        kohya.to_kohya(state, alphas, family="dit")
    with pytest.raises(UserError, match="'class_embedding.linear_1' has no LDM name"):
        kohya.to_kohya({"unet.class_embedding.linear_1.lora_A.weight": torch.zeros(2, 3),
                        "unet.class_embedding.linear_1.lora_B.weight": torch.zeros(3, 2)}, 1.0, "sdxl")
    with pytest.raises(UserError, match="has no diffusers name"):
        kohya.from_kohya({"lora_unet_output_blocks_2_2_proj_in.lora_down.weight": torch.zeros(2, 3),
                          "lora_unet_output_blocks_2_2_proj_in.lora_up.weight": torch.zeros(3, 2)}, "sdxl")


# recipes/sdxl_lcm_lora.yaml's targets: ResNets, samplers and time projections besides the attention layers
LCM_TARGETS = UNET_TARGETS + ["conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv",
                              "time_emb_proj"]


@pytest.mark.parametrize("unet_targets", [UNET_TARGETS, LCM_TARGETS], ids=["attention", "lcm"])
def test_sdxl_seam_writes_ldm_names_and_two_text_encoders(tiny_sdxl, unet_targets):
    """SDXL as kohya writes it: LDM U-Net names, lora_te1_/lora_te2_; diffusers' SDXL pipeline reads it back."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig

    def outputs(pipe):
        g = torch.Generator().manual_seed(0)
        z, h = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
        added = {"text_embeds": torch.randn(1, pipe.text_encoder_2.config.projection_dim, generator=g),
                 "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            return [pipe.unet(z, torch.tensor([500]), encoder_hidden_states=h, added_cond_kwargs=added).sample,
                    pipe.text_encoder(ids)[0], pipe.text_encoder_2(ids)[0]]

    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    encoders = {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    for module, targets in ((pipe.unet, unet_targets), *((m, TE_TARGETS) for m in encoders.values())):
        module.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False, target_modules=targets))
    expected = outputs(pipe)
    family = kohya.family_for("sdxl", pipe.unet)
    out = kohya.to_kohya(*kohya.peft_lora({"unet": pipe.unet, **encoders}), family)
    modules = {key.split(".")[0] for key in out}
    assert all(m.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                             "lora_te1_text_model_", "lora_te2_text_model_")) for m in modules), modules
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj" in modules
    if unet_targets is LCM_TARGETS:  # ResNet layers and samplers under their LDM names, as sd-scripts writes them
        assert {"lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_1_0_emb_layers_1",
                "lora_unet_input_blocks_2_0_op", "lora_unet_middle_block_2_out_layers_3"} <= modules
        assert any(m.endswith("_skip_connection") for m in modules) and any(m.endswith("_conv") for m in modules)
    assert all(out[f"{m}.alpha"].item() == ALPHA for m in modules)

    loaded = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    loaded.load_lora_weights(dict(out))  # diffusers remaps LDM blocks given the U-Net config, as sd-scripts' files need
    started = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    lora = kohya.from_kohya(out, family)
    kohya.load_lora(started.unet, lora.unet, lora.alphas, "unet")
    for name, state in lora.text_encoders.items():
        kohya.load_lora(getattr(started, name), state, lora.alphas, name)
    for got in (outputs(loaded), outputs(started)):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_a_kohya_file_starts_a_run_from_the_same_model(recipe_for, tmp_path):
    """`adapter.init_from` with an exported kohya LoRA: the new run's model equals the trained one before step 1."""
    from trainers.engine import Trainer

    first = Trainer(recipe_for("train.max_steps=5", "optimizer.lr=5e-3", "adapter.rank=8", "adapter.alpha=4",
                               "adapter.text_encoder=true", out=tmp_path / "first"))
    final = first.fit().final_dir
    second = Trainer(recipe_for(f"adapter.init_from={final / 'lora_kohya.safetensors'}", "adapter.rank=2",
                                out=tmp_path / "second"))
    g = torch.Generator().manual_seed(0)
    z, t, h = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 600]), torch.randn(2, 77, 32, generator=g)
    ids = first.backbone.tokenize(["a red seven", "two"])
    with torch.no_grad():
        for a, b in [(first, second)]:
            torch.testing.assert_close(a.backbone.denoiser.eval()(z, t, encoder_hidden_states=h).sample,
                                       b.backbone.denoiser.eval()(z, t, encoder_hidden_states=h).sample,
                                       rtol=0, atol=1e-6)
            torch.testing.assert_close(a.backbone.text_encoder.eval()(ids)[0], b.backbone.text_encoder.eval()(ids)[0],
                                       rtol=0, atol=1e-6)
    assert set(second.objective.trained_modules()) == {"unet", "text_encoder"}
    assert second.parameter_counts()[0] == first.parameter_counts()[0]  # the file's rank 8, not the recipe's 2


def test_init_from_an_unreadable_file_is_a_clear_error(recipe_for, tmp_path):
    from trainers.engine import Trainer
    from trainers.errors import ConfigError

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="adapter.init_from"):
        Trainer(recipe_for(f"adapter.init_from={bad}"))
