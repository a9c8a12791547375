"""Networks: a U-Net from diffusers' UNet2DModel blocks, and a residual MLP for vectors.

Every network has one signature: net(z, cond, times) -> tensor shaped like z, where
  z     (B, *data_shape)   the flow state z_t (STMD, Mean Flow) or x_s (DDPM),
  cond  (B, *data_shape)   x_s for STMD (concatenated on channels), None otherwise,
  times (B, k)             STMD: (t, t - r, s); Mean Flow: (t, t - r); DDPM: (s,).
Times are fed as t and t - r (not r, t): the paper and Mean Flow found that best.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .kernels.attention import attention
from .kernels.dispatch import make_dual, split_dual
from .kernels.time_embedding import time_features

# diffusers' Upsample2D asks its lru_cached is_torch_version("<", "2.1") in bf16; Dynamo traces through the cache
# and warns twice per compiled bf16 U-Net. A version test gives the same answer cached or not: noise, not a risk.
warnings.filterwarnings("ignore", message=r"Dynamo detected a call to a `functools\.lru_cache`-wrapped function at "
                        r"'upsampling\.py", category=UserWarning)


@dataclass
class NetConfig:
    """Architecture of the network. One config serves all three methods."""

    kind: str = "unet"
    """'unet' for images (B, C, H, W), 'mlp' for vectors (B, D), 'dit' for latents (B, C, H, W)."""
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
    """MLP: hidden width. DiT: hidden size."""
    depth: int = 4
    """MLP: residual layers. DiT: transformer blocks."""
    heads: int = 16
    """DiT: attention heads."""
    patch_size: int = 2
    """DiT: patch size (the token grid is H / patch_size x W / patch_size)."""
    time_freqs: int = 64
    """Sinusoidal features per time input (t, t - r, s)."""
    time_scale: float = 10.0
    """Times in [0, 1] are multiplied by this before the sinusoids (highest frequency in rad per
    unit time). Not DDPM's 1000: du/dt flows through these features, and on digits STMD's
    ||delta||^2 grew (diverged) with 1000 and 100 but fell with 10 and 1."""

    def __post_init__(self):
        self.channels = tuple(self.channels)
        self.attention_levels = tuple(self.attention_levels)
        if self.kind not in ("unet", "mlp", "dit"):
            raise ValueError(f"network kind {self.kind!r} is unknown: use 'unet', 'mlp' or 'dit'")
        if self.kind == "unet":
            bad = [c for c in self.channels if c % self.norm_groups]
            if bad:
                raise ValueError(f"norm_groups={self.norm_groups} must divide every U-Net channel count, not {bad}")
            if any(not 0 <= i < len(self.channels) for i in self.attention_levels):
                raise ValueError(f"attention_levels {self.attention_levels} must be in 0..{len(self.channels) - 1}")
        if self.time_freqs % 2:
            raise ValueError("time_freqs must be even (cos and sin halves)")


class TimeEmbedding(nn.Module):
    """Sinusoidal features of all time inputs, concatenated, through a 2-layer MLP."""

    def __init__(self, num_times: int, freqs: int, scale: float, dim: int):
        super().__init__()
        self.freqs, self.scale = freqs, scale
        self.mlp = nn.Sequential(nn.Linear(num_times * freqs, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, times: torch.Tensor) -> torch.Tensor:
        features = time_features(times, self.freqs, self.scale)  # Triton kernel on CUDA
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


class TangentLinear(nn.Linear):
    """nn.Linear whose forward-mode AD skips the weight's zero tangent.

    Why: inside torch.func.jvp the weights carry no tangent, yet PyTorch's forward-AD formulas
    for linear and convolution materialise a zero one and multiply by it: x @ 0 costs a full
    matmul, even compiled (measured: 3 matmuls per layer in the JVP instead of 2). Here the
    dual input is split and the tangent is W x_t. Same parameters and state dict; outside a
    JVP (or when the weight itself has a tangent) it is nn.Linear.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        primal, tangent = split_dual(x)
        if tangent is None or split_dual(self.weight)[1] is not None:
            return super().forward(x)
        # (B, L, C) as (B * L, C): under the JVP a 3-D input is not folded into one matmul, and the backward
        # then writes a weight gradient per sample, (B, C_in, C_out), only to sum it (GiBs for a DiT block)
        lead = primal.shape[:-1]
        out = F.linear(primal.reshape(-1, primal.shape[-1]), self.weight, self.bias)
        out_tangent = F.linear(tangent.reshape(-1, tangent.shape[-1]), self.weight)
        return make_dual(out.reshape(*lead, -1), out_tangent.reshape(*lead, -1))


class TangentConv2d(nn.Conv2d):
    """nn.Conv2d with the same JVP shortcut as TangentLinear: the tangent is conv(x_t, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        primal, tangent = split_dual(x)
        if tangent is None or split_dual(self.weight)[1] is not None:
            return super().forward(x)
        return make_dual(self._conv_forward(primal, self.weight, self.bias), self._conv_forward(tangent, self.weight, None))


def use_tangent_layers(net: nn.Module) -> nn.Module:
    """Swap every nn.Linear / nn.Conv2d of `net` for its JVP-lean subclass, in place."""
    for module in net.modules():
        if type(module) is nn.Linear:
            module.__class__ = TangentLinear
        elif type(module) is nn.Conv2d:
            module.__class__ = TangentConv2d
    return net


class JVPAttnProcessor:
    """diffusers attention processor for the U-Net's spatial self-attention that survives
    torch.func.jvp, torch.compile and bf16 autocast. diffusers' AttnProcessor2_0 calls SDPA,
    whose fused backends have no forward-mode AD; ours is a Triton flash attention that
    computes the tangent in the same pass (kernels/attention.py), plain softmax attention on CPU."""

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
        out = attention(q, k, v, attn.scale).transpose(1, 2).flatten(2)  # flash kernel with tangent on CUDA
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        out = out.transpose(1, 2).reshape(b, -1, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class UNet(nn.Module):
    """diffusers UNet2DModel's blocks under our own forward, conditioned on (t, t - r, s).

    UNet2DModel.forward embeds a single timestep; we drop its time embedding and feed the
    blocks our embedding of all time inputs instead (the blocks take any `temb`). Each resnet
    block applies it as h = GroupNorm(h) * (1 + scale) + shift, so no group size can cancel it.
    """

    def __init__(self, cfg: NetConfig, data_shape: tuple[int, ...], conditional: bool, num_times: int,
                 dropout: float = 0.0):
        super().__init__()
        from diffusers import UNet2DModel
        from diffusers.models.attention_processor import Attention

        channels, height, width = data_shape
        levels = len(cfg.channels)
        step = 2 ** (levels - 1)
        if height % step or width % step:
            # unet_config lays a U-Net out for any size (it halves only while a halving is exact)
            fits = f"{-(-height // step) * step}x{-(-width // step) * step}"
            raise ValueError(
                f"a {levels}-level U-Net halves the image {levels - 1} times, so {height}x{width} must be "
                f"divisible by {step}: pad or resize the images to {fits}, or pass --unet S, B or L "
                f"(a U-Net laid out for {height}x{width})"
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
            attn_norm_num_groups=cfg.norm_groups,  # scale_shift would otherwise drop the mid attention's norm
            # Time enters each resnet as a scale and shift AFTER its GroupNorm (ADM's scale-shift norm).
            # diffusers' default adds a per-channel shift BEFORE the norm, which a group of one channel
            # erases: in the mnist preset (32 groups, 32-channel blocks) 12 of 17 blocks never saw the time.
            resnet_time_scale_shift="scale_shift",
            attention_head_dim=cfg.head_dim,
            add_attention=cfg.mid_attention,
            dropout=dropout,
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


UNET_WIDTHS = {"S": 32, "B": 64, "L": 128}
"""--unet sizes: the channels of the first level; every deeper level has twice as many."""


def unet_config(size: str, image_shape: tuple[int, ...]) -> NetConfig:
    """A U-Net of size S, B or L laid out for (C, H, W) images: halve H and W while both are even and the
    shorter is over 4 pixels (at most 6 levels), attention at the first level of at most 16 pixels, 2 residual
    blocks per level.
    For 32 pixels, L is the cifar10 preset's U-Net (128, 256, 256, 256)."""
    if size not in UNET_WIDTHS:
        raise ValueError(f"--unet {size}: unknown size; choose one of {', '.join(UNET_WIDTHS)}")
    _, height, width = image_shape
    sides = [min(height, width)]
    while height % 2 == 0 and width % 2 == 0 and sides[-1] > 4 and len(sides) < 6:  # a halving must be exact
        height, width = height // 2, width // 2
        sides.append(min(height, width))
    base = UNET_WIDTHS[size]
    attention = next(level for level, side in enumerate(sides) if side <= 16 or level == len(sides) - 1)
    return NetConfig(channels=(base,) + (2 * base,) * (len(sides) - 1), layers_per_block=2,
                     attention_levels=(attention,), norm_groups=min(32, base // 4), head_dim=base // 2,
                     time_freqs=base)


# The DiT registry's sizes, (depth, hidden_size, num_heads), and patch sizes; stmd_fast.dit builds a factory
# per name from them. Here so that naming a DiT (a preset, --dit) does not import timm, which takes seconds.
# S, B, L, XL as in DiT (facebookresearch/DiT models.py). M as in the official Mean Flow JAX code,
# Gsunshine/meanflow models/models_dit.py (`DiT_M_2 = partial(DiT, depth=16, hidden_size=1024, patch_size=2,
# num_heads=16)`; read from the mirror rese1f/meanflow @ 905912f8, whose README is the official one); the
# paper's MF-M/2 ~308M.
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "M": (16, 1024, 16), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_PATCHES = (2, 4, 8)


def dit_names() -> list[str]:
    """The registry's names, DiT-{S,B,M,L,XL}/{2,4,8}, in stmd_fast.dit.DIT_MODELS's order."""
    return [f"DiT-{size}/{p}" for size in DIT_SIZES for p in DIT_PATCHES]


def dit_config(name: str, **overrides) -> NetConfig:
    """NetConfig of a DiT of the registry (stmd_fast.dit.DIT_MODELS), e.g. 'DiT-M/2'."""
    if name not in dit_names():
        raise ValueError(f"unknown DiT {name!r}: choose one of {', '.join(dit_names())}")
    size, patch = name.removeprefix("DiT-").split("/")
    depth, width, heads = DIT_SIZES[size]
    return NetConfig(**{"kind": "dit", "depth": depth, "width": width, "heads": heads, "patch_size": int(patch),
                        "time_freqs": 256, **overrides})


def build_net(cfg: NetConfig, data_shape: tuple[int, ...], conditional: bool, num_times: int,
              dropout: float = 0.0) -> nn.Module:
    """The network for data of `data_shape` (without batch), checked against cfg.kind.

    dropout: a training option, not part of the architecture (no parameters; a checkpoint loads the same
    without it): in the U-Net's residual blocks, in the DiT's MLPs; eval mode turns it off."""
    want_rank = {"unet": 3, "mlp": 1, "dit": 3}[cfg.kind]
    if len(data_shape) != want_rank:
        raise ValueError(f"a {cfg.kind} network takes data of rank {want_rank} per sample, got shape {tuple(data_shape)}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout {dropout}: must be in [0, 1)")
    if dropout and cfg.kind == "mlp":
        raise ValueError(f"dropout {dropout}: the MLP has none; dropout is for the U-Net and the DiT")
    if cfg.kind == "dit":
        from .dit import DiT

        net = DiT(tuple(data_shape), conditional, num_times, patch_size=cfg.patch_size, hidden_size=cfg.width,
                  depth=cfg.depth, num_heads=cfg.heads, time_freqs=cfg.time_freqs, time_scale=cfg.time_scale,
                  dropout=dropout)
    elif cfg.kind == "unet":
        net = UNet(cfg, tuple(data_shape), conditional, num_times, dropout)
    else:
        net = MLP(cfg, tuple(data_shape), conditional, num_times)
    return use_tangent_layers(net)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
