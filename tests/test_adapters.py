"""LoRA helpers: weights swapped in for one pass, and a LoRA folded into a plain model."""
import pytest
import torch
from diffusers import UNet2DConditionModel

from trainers.adapters import add_lora, merged_copy, swapped_in
from trainers.config import AdapterConfig


def small_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                                cross_attention_dim=8, attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def test_swapped_in_uses_the_tensors_and_always_restores_the_live_ones():
    layer = torch.nn.Linear(3, 2)
    params = dict(layer.named_parameters())
    live = {k: p.data for k, p in params.items()}
    other = {k: torch.full_like(p, 2.0) for k, p in params.items()}
    x = torch.ones(1, 3)
    with swapped_in(params, other):
        assert torch.equal(layer(x), torch.full((1, 2), 8.0))  # 3 inputs x 2 + bias 2
    assert all(params[k].data_ptr() == live[k].data_ptr() for k in params)
    with pytest.raises(RuntimeError), swapped_in(params, other):
        raise RuntimeError("a failing pass")
    assert all(params[k].data_ptr() == live[k].data_ptr() for k in params)


def test_merged_copy_is_a_plain_model_with_the_loras_output():
    unet = small_unet()
    add_lora(unet, AdapterConfig(rank=4, alpha=8), ("to_q", "to_k", "conv1", "proj_in"))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_()
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 8)
    merged = merged_copy(unet)
    assert not any("lora" in name for name in merged.state_dict())
    assert set(merged.state_dict()) == set(small_unet().state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, text).sample, unet(x, t, text).sample, atol=1e-5, rtol=1e-5)
        assert (merged(x, t, text).sample - small_unet()(x, t, text).sample).abs().max() > 1e-3  # the LoRA is in it
