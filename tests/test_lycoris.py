"""adapter.kind: loha and lokr (peft's LoHa/LoKr): the LyCORIS file loads through lycoris-lora to the trained
weights, peft's own layout loads into a stock pipeline, and resume is exact."""
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

from trainers import adapters, kohya
from trainers.config import load_recipe
from trainers.engine import Trainer
from trainers.errors import ConfigError

KINDS = {"loha": ("adapter.kind=loha",),
         "lokr": ("adapter.kind=lokr", "adapter.lokr_factor=4"),  # to_q 16x16: kron(4x4, 4x4), both whole
         "lokr_lowrank": ("adapter.kind=lokr", "adapter.rank=2", "adapter.lokr_factor=2")}  # w2 8x8 as rank 2


def recipe(tiny_sd15, digits_data, out, *overrides):
    return load_recipe("recipes/demo/sd15_lora_tiny.yaml", [
        f"model.pretrained={tiny_sd15}", f"data.source={digits_data}", f"output_dir={out}", "train.report_to=none",
        "data.num_workers=0", "validation.every_steps=0", "checkpoint.every_steps=0", "export.dtype=float32",
        "optimizer.lr=1e-2", "adapter.text_encoder=true", *overrides])


@pytest.fixture(scope="module", params=list(KINDS))
def kind_run(request, tiny_sd15, digits_data, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "run"
    trainer = Trainer(recipe(tiny_sd15, digits_data, out, *KINDS[request.param], "train.max_steps=4",
                             "checkpoint.every_steps=2"))
    trainer.fit()
    return request.param, trainer, out


def unet_input(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    return (torch.randn(2, unet.config.in_channels, size, size, generator=g), torch.tensor([10, 700]),
            torch.randn(2, 77, unet.config.cross_attention_dim, generator=g))


def test_lycoris_reads_the_file_back_to_the_trained_weights(kind_run, tiny_sd15):
    from lycoris import create_lycoris_from_weights

    name, trainer, out = kind_run
    with safe_open(out / "final" / kohya.KOHYA_WEIGHTS, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    prefix = "hada_" if name == "loha" else "lokr_"
    assert any(f".{prefix}" in k for k in keys) and not any("lora_down" in k for k in keys)
    assert f'"algo": "{name[:4]}"' in meta["ss_network_args"]
    assert any(k.startswith("lora_te_") for k in keys)  # the text encoder's adapter too
    state = load_file(out / "final" / kohya.KOHYA_WEIGHTS)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    network, _ = create_lycoris_from_weights(
        1.0, None, unet, {k.replace("lora_unet_", "lycoris_", 1): v for k, v in state.items()
                          if k.startswith("lora_unet_")})
    assert len(network.loras) == len({k.split(".")[0] for k in state if k.startswith("lora_unet_")})
    merged = adapters.merged_copy(trainer.backbone.denoiser).state_dict()
    base = unet.state_dict()
    moved = 0.0
    for module in network.loras:
        path = next(n for n, m in unet.named_modules() if f"lycoris_{n}".replace(".", "_") == module.lora_name)
        if getattr(module, "use_w2", True):
            weight = module.get_merged_weight()[0]
        else:  # lycoris-lora 4.1.3's get_diff_weight scales a low-rank LoKr twice (get_weight already did once)
            weight = module.org_weight + module.get_weight(module.shape)
        torch.testing.assert_close(weight, merged[f"{path}.weight"], rtol=0, atol=1e-6)
        moved = max(moved, (weight - base[f"{path}.weight"]).abs().max().item())
    assert moved > 1e-4  # training changed them: the comparison is not of two base weights


def comfyui_delta(state: dict, name: str) -> torch.Tensor:
    """dW of one layer as ComfyUI's weight adapters compute it (comfy/weight_adapter/loha.py, lokr.py): the factor
    products times alpha / rank, where a LoKr of two whole matrices has no rank and is not scaled."""
    get = lambda part: state.get(f"{name}.{part}")  # noqa: E731
    alpha = get("alpha").item()
    if get("hada_w1_a") is not None:
        rank = get("hada_w1_b").shape[0]
        return (get("hada_w1_a") @ get("hada_w1_b")) * (get("hada_w2_a") @ get("hada_w2_b")) * (alpha / rank)
    w1 = get("lokr_w1") if get("lokr_w1") is not None else get("lokr_w1_a") @ get("lokr_w1_b")
    w2 = get("lokr_w2") if get("lokr_w2") is not None else get("lokr_w2_a") @ get("lokr_w2_b")
    rank = get("lokr_w2_b").shape[0] if get("lokr_w2_b") is not None else (
        get("lokr_w1_b").shape[0] if get("lokr_w1_b") is not None else None)
    return torch.kron(w1, w2) * (alpha / rank if rank else 1.0)


def test_comfyui_arithmetic_on_the_file_gives_the_trained_weights(kind_run, tiny_sd15):
    _, trainer, out = kind_run
    state = load_file(out / "final" / kohya.KOHYA_WEIGHTS)
    merged = adapters.merged_copy(trainer.backbone.denoiser).state_dict()
    base = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet").state_dict()
    names = {k.split(".")[0] for k in state if k.startswith("lora_unet_")}
    assert names
    for name in names:
        path = next(p for p in base if p.endswith(".weight") and "lora_unet_" + p[:-7].replace(".", "_") == name)
        torch.testing.assert_close(base[path] + comfyui_delta(state, name), merged[path], rtol=0, atol=1e-6)


def test_the_peft_layout_loads_into_a_stock_pipeline(kind_run, tiny_sd15):
    from peft import PeftConfig, inject_adapter_in_model, set_peft_model_state_dict

    name, trainer, out = kind_run
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None, requires_safety_checker=False)
    sample, t, text = unet_input(pipe.unet)
    with torch.no_grad():
        base = pipe.unet(sample, t, text).sample
    for component in ("unet", "text_encoder"):
        folder = out / "final" / component
        module = getattr(pipe, component)
        inject_adapter_in_model(PeftConfig.from_pretrained(folder), module)
        result = set_peft_model_state_dict(module, load_file(folder / "adapter_model.safetensors"))
        assert not result.unexpected_keys
    with torch.no_grad():
        loaded = pipe.unet(sample, t, text).sample
        trained = trainer.backbone.denoiser.float()(sample, t, text).sample
    assert (loaded - base).abs().max() > 1e-4
    torch.testing.assert_close(loaded, trained, rtol=0, atol=1e-5)
    assert "inject_adapter_in_model" in (out / "final" / "README.md").read_text()


def test_resume_is_exact(kind_run, tiny_sd15, digits_data, tmp_path):
    name, _, straight = kind_run
    split = tmp_path / "split"
    args = (*KINDS[name], "train.max_steps=4", "checkpoint.every_steps=2")
    Trainer(recipe(tiny_sd15, digits_data, split, *args)).fit(until=2)
    Trainer(recipe(tiny_sd15, digits_data, split, *args, "resume=auto")).fit()
    a, b = (load_file(run / "final" / "unet" / "adapter_model.safetensors") for run in (straight, split))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-7


def test_options_of_another_kind_are_refused(tiny_sd15, digits_data, tmp_path):
    with pytest.raises(ConfigError, match="'adapter.lokr_factor' and 'adapter.lokr_decompose_both' are LoKr options"):
        Trainer(recipe(tiny_sd15, digits_data, tmp_path / "a", "adapter.lokr_factor=4"))
    with pytest.raises(ConfigError, match="'adapter.dropout': loha has no input dropout"):
        Trainer(recipe(tiny_sd15, digits_data, tmp_path / "b", "adapter.kind=loha", "adapter.dropout=0.1"))


def test_init_from_the_kohya_file_of_the_same_kind_starts_at_the_trained_model(kind_run, tiny_sd15, digits_data,
                                                                                tmp_path):
    """adapter.init_from with the LyCORIS file a run exported: the new run's U-Net and text encoder (before step 1)
    compute what the trained ones do, its adapter trains, and a file of another kind is refused by name."""
    name, trainer, out = kind_run
    start = out / "final" / kohya.KOHYA_WEIGHTS
    again = Trainer(recipe(tiny_sd15, digits_data, tmp_path / "again", *KINDS[name], f"adapter.init_from={start}"))
    sample, t, text = unet_input(trainer.backbone.denoiser)
    with torch.no_grad():
        ours = again.backbone.denoiser.float()(sample, t, text).sample
        trained = trainer.backbone.denoiser.float()(sample, t, text).sample
        ids = torch.arange(8)[None]
        te = again.backbone.text_encoder.float()(ids)[0], trainer.backbone.text_encoder.float()(ids)[0]
    torch.testing.assert_close(ours, trained, rtol=0, atol=1e-5)
    torch.testing.assert_close(*te, rtol=0, atol=1e-5)
    assert again.params and all(p.requires_grad for p in again.params.values())
    other = "lokr" if name == "loha" else "loha"
    with pytest.raises(ConfigError, match=f"'adapter.kind' is {other} but adapter.init_from .* holds a {name[:4]}"):
        Trainer(recipe(tiny_sd15, digits_data, tmp_path / "other", f"adapter.kind={other}",
                       f"adapter.init_from={start}"))
