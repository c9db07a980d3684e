"""Memory and speed options on the tiny LoRA recipe: a quantised frozen base (QLoRA-style), channels_last and
torch.compile of the denoiser. Each run is compared with the same plain run (same seed, data and steps)."""
import pytest
import torch
from safetensors.torch import load_file

from trainers import quantize
from trainers.config import load_recipe
from trainers.engine import Trainer
from trainers.errors import UserError

COMMON = ("train.max_steps=2", "train.batch_size=2", "train.log_every=1")
LORA_FILE = "pytorch_lora_weights.safetensors"


def recipe(tiny_sd15, digits_data, out, *overrides, path="recipes/demo/sd15_lora_tiny.yaml"):
    return load_recipe(path, [f"model.pretrained={tiny_sd15}", f"data.source={digits_data}", f"output_dir={out}",
                              "train.report_to=none", "data.num_workers=0", "validation.every_steps=0",
                              "checkpoint.every_steps=0", *COMMON, *overrides])


def first_loss(run_dir):
    import json
    return json.loads((run_dir / "logs" / "metrics.jsonl").read_text().splitlines()[0])["loss"]


@pytest.fixture(scope="module")
def plain(tiny_sd15, digits_data, tmp_path_factory):
    """The reference: 2 steps of the tiny LoRA recipe with no memory option."""
    out = tmp_path_factory.mktemp("plain") / "run"
    Trainer(recipe(tiny_sd15, digits_data, out)).fit()
    return out


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantised_base_trains_the_same_lora(kind, plain, tiny_sd15, digits_data, tmp_path):
    trainer = Trainer(recipe(tiny_sd15, digits_data, tmp_path / "q", f"memory.quantize_base={kind}"))
    trainer.fit()
    unet = trainer.backbone.denoiser
    linears = [m for m in unet.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    # int8: every Linear of the base; nf4: those in whole 64-weight blocks (13 of the tiny U-Net's narrow layers)
    assert len(linears) == {"int8": 116, "nf4": 13}[kind]
    assert quantize.quantized_layers(unet) == len(linears)  # the weights themselves are 8- or 4-bit on the device
    assert not any(p.requires_grad for m in linears for p in m.parameters())

    lora, reference = (load_file(d / "final" / LORA_FILE) for d in (tmp_path / "q", plain))
    assert lora.keys() == reference.keys()  # the same LoRA file, loadable over the unquantised base
    assert all(lora[k].shape == reference[k].shape for k in lora)
    assert max(lora[k].abs().max().item() for k in lora if "lora_B" in k) > 0  # it trained (B starts at zero)
    # the same model up to the quantisation error: the first step's loss (same noise, same batch) is close
    assert first_loss(tmp_path / "q") == pytest.approx(first_loss(plain), rel=1e-2)


def test_quantised_base_resumes_exactly(tiny_sd15, digits_data, tmp_path):
    """The base is quantised again, identically, on resume: a split run ends where an unbroken one does."""
    args = ("memory.quantize_base=nf4", "train.max_steps=4", "checkpoint.every_steps=2")
    Trainer(recipe(tiny_sd15, digits_data, tmp_path / "straight", *args)).fit()
    Trainer(recipe(tiny_sd15, digits_data, tmp_path / "split", *args)).fit(until=2)
    Trainer(recipe(tiny_sd15, digits_data, tmp_path / "split", *args, "resume=auto")).fit()
    a, b = (load_file(tmp_path / d / "final" / LORA_FILE) for d in ("straight", "split"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


def test_quantised_base_refusals(tiny_sd15, digits_data, tmp_path):
    with pytest.raises(UserError, match="memory.quantize_base: nf4 .* adapter.kind is 'full'"):
        Trainer(recipe(tiny_sd15, digits_data, tmp_path / "a", "memory.quantize_base=nf4", "adapter.kind=full"))
    progressive = recipe(tiny_sd15, digits_data, tmp_path / "b", "memory.quantize_base=int8", "adapter.kind=lora",
                         path="recipes/demo/sd15_progressive_tiny.yaml")
    with pytest.raises(UserError, match="progressive objective exports weights merged with the base"):
        Trainer(progressive)
    from trainers.objectives.finetune import FineTune
    with pytest.raises(UserError, match="DeepSpeed ZeRO cannot shard"):
        quantize.check(recipe(tiny_sd15, digits_data, tmp_path / "c", "memory.quantize_base=nf4"), FineTune, True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before anything is written


def test_channels_last_trains_the_same_lora(plain, tiny_sd15, digits_data, tmp_path):
    trainer = Trainer(recipe(tiny_sd15, digits_data, tmp_path / "cl", "memory.channels_last=true"))
    convs = [m.weight for m in trainer.backbone.denoiser.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert sum(not w.is_contiguous() for w in convs) > len(convs) // 2  # 1x1 convs are both layouts at once
    trainer.fit()
    lora, reference = (load_file(d / "final" / LORA_FILE) for d in (tmp_path / "cl", plain))
    # measured 1.8e-6 (NHWC kernels sum in another order); a wrong layout or a lost update moves weights ~1e-4
    assert max((lora[k] - reference[k]).abs().max().item() for k in lora) < 2e-5


def test_compiled_denoiser_trains_the_same_lora(plain, tiny_sd15, digits_data, tmp_path):
    """torch.compile in place: the compiled forward and backward run (AOTAutograd traces both; `aot_eager` skips
    only inductor's code generation, minutes on 2 CPU cores) and names in checkpoints and exports stay plain."""
    trainer = Trainer(recipe(tiny_sd15, digits_data, tmp_path / "c", "memory.compile=true",
                             "memory.compile_backend=aot_eager", "checkpoint.every_steps=2"))
    assert trainer.backbone.denoiser._compiled_call_impl is not None
    torch._dynamo.reset()
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    trainer.fit()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > frames_before  # the forward really was compiled
    lora, reference = (load_file(d / "final" / LORA_FILE) for d in (tmp_path / "c", plain))
    assert lora.keys() == reference.keys()
    assert max((lora[k] - reference[k]).abs().max().item() for k in lora) < 1e-6  # measured 0.0
    saved = load_file(tmp_path / "c" / "checkpoints" / "step-2" / "weights.safetensors")
    assert not any("_orig_mod" in k for k in saved)
