"""U-ViT (Bao et al., "All are Worth Words: A ViT Backbone for Diffusion Models", CVPR 2023) as a diffusers model.

Everything is a token: one time token, the projected text tokens and the latent's p x p patches share one
sequence with learned position embeddings. Pre-LN transformer blocks are arranged as in_blocks, a mid_block and
out_blocks; each out block first joins its mirrored in block's output through a long skip,
x <- skip_linear([x, skip]). A final LayerNorm and Linear map each patch token back to p*p*C values, which are
unpatchified and optionally smoothed by a 3x3 conv.

Module names are LoRA targets: attention `to_q`, `to_k`, `to_v`, `to_out`; MLP `fc1`, `fc2`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.embeddings import TimestepEmbedding, get_timestep_embedding
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C), patches in raster order, values ordered (p1, p2, C) as in U-ViT."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p1, p2, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x: torch.Tensor, C: int, h: int, w: int) -> torch.Tensor:
    """(B, h*w, p*p*C) -> (B, C, h*p, w*p); the inverse of `patchify`."""
    B, _, D = x.shape
    p = math.isqrt(D // C)
    x = x.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p1, w, p2)
    return x.reshape(B, C, h * p, w * p)


class Attention(nn.Module):
    """Multi-head self-attention over the whole token sequence, through SDPA (flash / memory-efficient on GPU)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = (f(x).view(B, L, self.heads, D // self.heads).transpose(1, 2)  # (B, heads, L, D/heads)
                   for f in (self.to_q, self.to_k, self.to_v))
        x = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(x.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block; an out block (skip=True) first fuses the long skip: x <- W [x, skip]."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool, skip: bool = False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, qkv_bias)
        self.norm2, self.mlp = nn.LayerNorm(dim), MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """The U-ViT noise predictor on latents, conditioned on text encoder hidden states.

    Args:
        sample_size: latent side the position embeddings are learnt at (other sizes interpolate them).
        patch_size: p; the sequence holds (sample_size / p)**2 patch tokens.
        in_channels: latent channels (4 for SD's VAE); the output has the same.
        hidden_size: token width.
        num_layers: all blocks, odd: num_layers // 2 in blocks, one mid block, num_layers // 2 out blocks.
        num_attention_heads: heads per attention layer.
        mlp_ratio: MLP hidden width / hidden_size.
        qkv_bias: biases on to_q/to_k/to_v (U-ViT has none).
        cross_attention_dim: width of the text encoder's hidden states (768 for CLIP ViT-L).
        num_text_tokens: text tokens per prompt (77 for CLIP).
        use_conv_out: a 3x3 conv after unpatchify (the paper's "conv"), smoothing patch seams.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]

    @register_to_config
    def __init__(self, sample_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 1152,
                 num_layers: int = 29, num_attention_heads: int = 16, mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, cross_attention_dim: int = 768, num_text_tokens: int = 77,
                 use_conv_out: bool = True):
        super().__init__()
        if num_layers % 2 != 1:
            raise ValueError(f"num_layers counts in + mid + out blocks and must be odd, got {num_layers}")
        if sample_size % patch_size:
            raise ValueError(f"sample_size {sample_size} is not a multiple of patch_size {patch_size}")
        if hidden_size % 4:
            raise ValueError(f"hidden_size {hidden_size} must be a multiple of 4 (2-D sin-cos position embeddings)")
        dim, depth = hidden_size, num_layers // 2
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.time_embed = TimestepEmbedding(dim, 4 * dim, out_dim=dim)
        self.context_embed = nn.Linear(cross_attention_dim, dim)
        self.extras = 1 + num_text_tokens  # tokens before the patches: time, then text
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + (sample_size // patch_size) ** 2, dim))
        args = (dim, num_attention_heads, mlp_ratio, qkv_bias)
        self.in_blocks = nn.ModuleList([Block(*args) for _ in range(depth)])
        self.mid_block = Block(*args)
        self.out_blocks = nn.ModuleList([Block(*args, skip=True) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * in_channels)
        self.conv_out = nn.Conv2d(in_channels, in_channels, 3, padding=1) if use_conv_out else None
        self.gradient_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        """As U-ViT: truncated normal (std 0.02) for Linear weights and the time/text position embeddings, zero
        biases; but the patch grid's learned position embeddings start as 2-D sin-cos (as MAE's and DiT's fixed
        ones). From U-ViT's near-zero start the patch embeddings soon outgrow them, and a small U-ViT trained from
        scratch still placed shapes poorly after 2250 steps (position adherence 0.50, bench/README.md, #5)."""
        from diffusers.models.embeddings import get_2d_sincos_pos_embed

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        n = self.config.sample_size // self.config.patch_size
        with torch.no_grad():
            self.pos_embed[0, self.extras:] = get_2d_sincos_pos_embed(self.config.hidden_size, n, output_type="pt")
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def position_embeddings(self, h: int, w: int) -> torch.Tensor:
        """(1, extras + h*w, D); the patch grid's embeddings are bilinearly resized for other latent sizes."""
        n = self.config.sample_size // self.config.patch_size
        if (h, w) == (n, n):
            return self.pos_embed
        extra, grid = self.pos_embed[:, :self.extras], self.pos_embed[:, self.extras:]
        grid = grid.reshape(1, n, n, -1).permute(0, 3, 1, 2)  # (1, D, n, n)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bilinear", align_corners=False).to(extra.dtype)
        return torch.cat([extra, grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                encoder_hidden_states: torch.Tensor, return_dict: bool = True):
        """The prediction (eps or v) for latents (B, C, H, W) at `timestep` (scalar or (B,)), text (B, 77, D_text)."""
        B, C, H, W = sample.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f"latents of {H}x{W} do not split into {p}x{p} patches")
        if encoder_hidden_states.shape[1] != self.config.num_text_tokens:
            raise ValueError(f"U-ViT expects {self.config.num_text_tokens} text tokens, "
                             f"got {encoder_hidden_states.shape[1]}")
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(B)
        t_emb = get_timestep_embedding(t, self.config.hidden_size, flip_sin_to_cos=True, downscale_freq_shift=0)
        time_token = self.time_embed(t_emb.to(self.pos_embed.dtype))[:, None]  # (B, 1, D)
        context = self.context_embed(encoder_hidden_states)                     # (B, 77, D)
        patches = self.patch_embed(sample).flatten(2).transpose(1, 2)          # (B, H/p * W/p, D)
        x = torch.cat([time_token, context, patches], dim=1) + self.position_embeddings(H // p, W // p)
        skips = []
        for block in self.in_blocks:
            x = self._run(block, x)
            skips.append(x)
        x = self._run(self.mid_block, x)
        for block in self.out_blocks:
            x = self._run(block, x, skips.pop())  # out block i meets in block depth-1-i
        x = self.proj_out(self.norm_out(x))[:, self.extras:]  # (B, h*w, p*p*C)
        out = unpatchify(x, C, H // p, W // p)
        if self.conv_out is not None:
            out = self.conv_out(out)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def _run(self, block: Block, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, x, skip)  # recompute the block in backward
        return block(x, skip)
