"""Networks: a U-Net from diffusers' UNet2DModel blocks, and a residual MLP for vectors.

Every network has one signature: net(z, cond, times) -> tensor shaped like z, where
  z     (B, *data_shape)   the flow state z_t (STMD, Mean Flow) or x_s (DDPM),
  cond  (B, *data_shape)   x_s for STMD (concatenated on channels), None otherwise,
  times (B, k)             STMD: (t, t - r, s); Mean Flow: (t, t - r); DDPM: (s,).
Times are fed as t and t - r (not r, t): the paper and Mean Flow found that best.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class NetConfig:
    """Architecture of the network. One config serves all three methods."""

    kind: str = "unet"
    """'unet' for images (B, C, H, W), 'mlp' for vectors (B, D)."""
    channels: tuple[int, ...] = (32, 64)
    """U-Net: output channels of each resolution level (each level but the last halves H, W)."""
    layers_per_block: int = 1
    """U-Net: residual blocks per level."""
    attention_levels: tuple[int, ...] = (1,)
    """U-Net: levels (0 = full resolution) whose blocks carry self-attention."""
    mid_attention: bool = True
    """U-Net: self-attention in the middle block (UNet2DModel's default)."""
    norm_groups: int = 32
    """U-Net: GroupNorm groups; must divide every entry of `channels`."""
    head_dim: int = 8
    """U-Net: attention channels per head."""
    width: int = 256
    """MLP: hidden width."""
    depth: int = 4
    """MLP: residual layers."""
    time_freqs: int = 64
    """Sinusoidal features per time input (t, t - r, s)."""
    time_scale: float = 10.0
    """Times in [0, 1] are multiplied by this before the sinusoids (highest frequency in rad per
    unit time). Not DDPM's 1000: du/dt flows through these features, and on digits STMD's
    ||delta||^2 grew (diverged) with 1000 and 100 but fell with 10 and 1."""

    def __post_init__(self):
        self.channels = tuple(self.channels)
        self.attention_levels = tuple(self.attention_levels)
        if self.kind not in ("unet", "mlp"):
            raise ValueError(f"network kind {self.kind!r} is unknown: use 'unet' or 'mlp'")
        if self.kind == "unet":
            bad = [c for c in self.channels if c % self.norm_groups]
            if bad:
                raise ValueError(f"norm_groups={self.norm_groups} must divide every U-Net channel count, not {bad}")
            if any(not 0 <= i < len(self.channels) for i in self.attention_levels):
                raise ValueError(f"attention_levels {self.attention_levels} must be in 0..{len(self.channels) - 1}")
        if self.time_freqs % 2:
            raise ValueError("time_freqs must be even (cos and sin halves)")


def sinusoidal_features(times: torch.Tensor, freqs: int, scale: float) -> torch.Tensor:
    """(B, k) times in [0, 1] -> (B, k * freqs) features [cos | sin] of scale * time per input,
    at frequencies from 1 down to 1e-4. Times are used in fp32 so bf16 autocast cannot quantize them.
    """
    half = freqs // 2
    dtype = torch.promote_types(times.dtype, torch.float32)  # fp32, or fp64 for fp64 times
    omega = torch.exp(-math.log(10000.0) * torch.arange(half, device=times.device, dtype=dtype) / half)
    angles = scale * times.to(dtype)[:, :, None] * omega  # (B, k, half)
    return torch.cat([angles.cos(), angles.sin()], dim=-1).flatten(1)


class TimeEmbedding(nn.Module):
    """Sinusoidal features of all time inputs, concatenated, through a 2-layer MLP."""

    def __init__(self, num_times: int, freqs: int, scale: float, dim: int):
        super().__init__()
        self.freqs, self.scale = freqs, scale
        self.mlp = nn.Sequential(nn.Linear(num_times * freqs, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, times: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_features(times, self.freqs, self.scale)
        return self.mlp(features.to(torch.promote_types(features.dtype, self.mlp[0].weight.dtype)))


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm written with mean/var, computed in fp32, returned in the input's dtype.

    Why: torch.compile of torch.func.jvp through nn.GroupNorm fails (internal assert in
    _make_dual), and under bf16 autocast nn.GroupNorm returned a bf16 primal with an fp32
    tangent. This version compiles into one graph. Same parameters and state dict.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(x.shape[0], self.num_groups, -1)
        mean = groups.mean(-1, keepdim=True)
        var = groups.var(-1, unbiased=False, keepdim=True)
        y = ((groups - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        if self.affine:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            y = y * self.weight.to(y.dtype).reshape(shape) + self.bias.to(y.dtype).reshape(shape)
        return y.to(x.dtype)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain attention softmax(q k^T scale) v on (B, heads, L, d); softmax in fp32.

    Forward-mode AD is not implemented for SDPA's fused backends, so this is written out.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.matmul(scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(-1).to(v.dtype), v)


class JVPAttnProcessor:
    """diffusers attention processor for the U-Net's spatial self-attention that survives
    torch.func.jvp, torch.compile and bf16 autocast (diffusers' AttnProcessor2_0 calls SDPA)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None:
            raise NotImplementedError("JVPAttnProcessor handles unmasked spatial self-attention only")
        residual = hidden_states
        b, c, h, w = hidden_states.shape
        x = hidden_states.reshape(b, c, h * w)
        if attn.group_norm is not None:
            x = attn.group_norm(x)
        x = x.transpose(1, 2)  # (B, L, C)
        q, k, v = (proj(x).unflatten(-1, (attn.heads, -1)).transpose(1, 2) for proj in (attn.to_q, attn.to_k, attn.to_v))
        out = softmax_attention(q, k, v, attn.scale).transpose(1, 2).flatten(2)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        out = out.transpose(1, 2).reshape(b, -1, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class UNet(nn.Module):
    """diffusers UNet2DModel's blocks under our own forward, conditioned on (t, t - r, s).

    UNet2DModel.forward embeds a single timestep; we drop its time embedding and feed the
    blocks our embedding of all time inputs instead (the blocks take any `temb`).
    """

    def __init__(self, cfg: NetConfig, data_shape: tuple[int, ...], conditional: bool, num_times: int):
        super().__init__()
        from diffusers import UNet2DModel
        from diffusers.models.attention_processor import Attention

        channels, height, width = data_shape
        levels = len(cfg.channels)
        if height % 2 ** (levels - 1) or width % 2 ** (levels - 1):
            raise ValueError(
                f"a {levels}-level U-Net halves the image {levels - 1} times, so {height}x{width} must be "
                f"divisible by {2 ** (levels - 1)}: pad the images or use fewer channel levels"
            )
        down = tuple("AttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in range(levels))
        up = tuple("AttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D" for i in reversed(range(levels)))
        self.unet = UNet2DModel(
            sample_size=height,
            in_channels=channels * (2 if conditional else 1),
            out_channels=channels,
            down_block_types=down,
            up_block_types=up,
            block_out_channels=cfg.channels,
            layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_groups,
            attention_head_dim=cfg.head_dim,
            add_attention=cfg.mid_attention,
        )
        self.unet.time_proj = self.unet.time_embedding = None  # replaced by self.time_embed
        self.time_embed = TimeEmbedding(num_times, cfg.time_freqs, cfg.time_scale, 4 * cfg.channels[0])
        for module in self.unet.modules():
            if type(module) is nn.GroupNorm:
                module.__class__ = GroupNorm  # same parameters, jvp/compile-safe forward
            if isinstance(module, Attention):
                module.set_processor(JVPAttnProcessor())

    def forward(self, z: torch.Tensor, cond: torch.Tensor | None, times: torch.Tensor) -> torch.Tensor:
        unet = self.unet
        emb = self.time_embed(times)
        h = unet.conv_in(z if cond is None else torch.cat([z, cond], dim=1))
        skips = (h,)
        for block in unet.down_blocks:
            h, res = block(hidden_states=h, temb=emb)
            skips += res
        if unet.mid_block is not None:
            h = unet.mid_block(h, emb)
        for block in unet.up_blocks:
            n = len(block.resnets)
            h = block(h, skips[-n:], emb)
            skips = skips[:-n]
        return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))


class MLP(nn.Module):
    """Residual MLP for vectors: [z, cond] -> width, plus the time embedding, then
    `depth` residual SiLU-Linear layers. No normalisation layers, so jvp and compile are plain."""

    def __init__(self, cfg: NetConfig, data_shape: tuple[int, ...], conditional: bool, num_times: int):
        super().__init__()
        (dim,) = data_shape
        self.inp = nn.Linear(dim * (2 if conditional else 1), cfg.width)
        self.time_embed = TimeEmbedding(num_times, cfg.time_freqs, cfg.time_scale, cfg.width)
        self.layers = nn.ModuleList(nn.Linear(cfg.width, cfg.width) for _ in range(cfg.depth))
        self.out = nn.Linear(cfg.width, dim)

    def forward(self, z: torch.Tensor, cond: torch.Tensor | None, times: torch.Tensor) -> torch.Tensor:
        h = self.inp(z if cond is None else torch.cat([z, cond], dim=1)) + self.time_embed(times)
        for layer in self.layers:
            h = h + layer(F.silu(h))
        return self.out(F.silu(h))


def build_net(cfg: NetConfig, data_shape: tuple[int, ...], conditional: bool, num_times: int) -> nn.Module:
    """The network for data of `data_shape` (without batch), checked against cfg.kind."""
    want_rank = {"unet": 3, "mlp": 1}[cfg.kind]
    if len(data_shape) != want_rank:
        raise ValueError(f"a {cfg.kind} network takes data of rank {want_rank} per sample, got shape {tuple(data_shape)}")
    cls = UNet if cfg.kind == "unet" else MLP
    return cls(cfg, tuple(data_shape), conditional, num_times)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
