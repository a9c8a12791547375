"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") under the project's
network signature net(z, cond, times) -> tensor shaped like z (see models.py).

Differences from facebookresearch/DiT, and why:
  - no class label: c is the SUM of one embedding per time input (STMD: t, t - r, s; Mean
    Flow: t, t - r; DDPM: s), as Mean Flow's DiT sums its t and h = t - r embeddings;
  - x_s (STMD) is concatenated with z on channels before the patch embedding;
  - the sinusoids of all times come from ONE time_features call (one fused launch on CUDA) and
    use time_scale 10, not 1000 (models.NetConfig.time_scale says why: du/dt flows through them);
  - attention is kernels/attention.py (flash attention with a tangent on CUDA): SDPA's fused
    backends have no forward-mode AD;
  - LayerNorm is written with mean/var in fp32 (no affine, eps 1e-6), like models.GroupNorm:
    torch.compile of torch.func.jvp through AFFINE nn.LayerNorm fails with an internal assert
    (non-affine F.layer_norm did compile in a check here; mean/var keeps one convention and
    fp32 statistics under bf16 autocast, with primal and tangent in one dtype).
"""
from __future__ import annotations

import torch
from timm.layers import Mlp, PatchEmbed
from torch import nn

from .kernels.attention import attention
from .kernels.time_embedding import time_features
from .models import DIT_PATCHES, DIT_SIZES  # the registry's names and sizes: models.py reads them without timm


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dim without affine, computed in fp32, returned in x's dtype."""
    y = x.to(torch.promote_types(x.dtype, torch.float32))
    y = (y - y.mean(-1, keepdim=True)) * torch.rsqrt(y.var(-1, unbiased=False, keepdim=True) + eps)
    return y.to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """(grid_h * grid_w, dim) fixed 2-D embedding of DiT/MAE, row-major patches: for the patch in
    row i, column j, [sin(j w), cos(j w), sin(i w), cos(i w)] with w_k = 10000^(-k / (dim/4))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")
    ang_w, ang_h = cols.reshape(-1, 1) * omega, rows.reshape(-1, 1) * omega  # MAE encodes w first
    return torch.cat([ang_w.sin(), ang_w.cos(), ang_h.sin(), ang_h.cos()], dim=1).float()


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-zero: c -> shift/scale/gate of attention and MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"),
                       drop=dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def attn(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        head_dim = d // self.num_heads
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v, head_dim ** -0.5)  # (B, heads, L, head_dim); flash + tangent on CUDA
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        x = x + gate_a * self.attn(modulate(layer_norm(x), shift_a, scale_a))
        return x + gate_m * self.mlp(modulate(layer_norm(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(layer_norm(x), shift, scale))


class DiT(nn.Module):
    """net(z, cond, times): z (B, C, H, W), cond (B, C, H, W) or None, times (B, num_times)."""

    def __init__(self, data_shape: tuple[int, int, int], conditional: bool, num_times: int, *,
                 patch_size: int, hidden_size: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, time_freqs: int = 256, time_scale: float = 10.0, dropout: float = 0.0):
        super().__init__()
        if len(data_shape) != 3:
            raise ValueError(f"a DiT takes (C, H, W) data, got shape {tuple(data_shape)}")
        channels, height, width = data_shape
        if height % patch_size or width % patch_size:
            raise ValueError(f"DiT patch_size={patch_size} must divide the latent height and width, "
                             f"got {height}x{width}: pad the latents or pick another patch size")
        if hidden_size % num_heads or hidden_size % 4:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads} "
                             f"and by 4 (the 2-D sin-cos position embedding)")
        if time_freqs % 2:
            raise ValueError("time_freqs must be even (cos and sin halves)")
        self.data_shape, self.conditional, self.num_times = tuple(data_shape), conditional, num_times
        self.patch_size, self.time_freqs, self.time_scale = patch_size, time_freqs, time_scale
        self.grid = (height // patch_size, width // patch_size)

        self.x_embedder = PatchEmbed((height, width), patch_size, channels * (2 if conditional else 1), hidden_size)
        # fixed, not trained; non-persistent: recomputed on construction, not stored in checkpoints
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, *self.grid)[None], persistent=False)
        self.t_embedders = nn.ModuleList(
            nn.Sequential(nn.Linear(time_freqs, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
            for _ in range(num_times))
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """All of the init, as in DiT: xavier linears, patch embed like a linear, normal(0.02)
        time MLPs, and adaLN-zero (modulations and output layer zero: the net starts at u = 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for mlp in self.t_embedders:
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                       self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, H, W)."""
        (gh, gw), p, c = self.grid, self.patch_size, self.data_shape[0]
        x = x.reshape(x.shape[0], gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, gh * p, gw * p)

    def embed_times(self, times: torch.Tensor) -> torch.Tensor:
        """c = sum_i MLP_i(sinusoids(times[:, i])): one fused feature launch for all k times."""
        if times.ndim != 2 or times.shape[1] != self.num_times:
            raise ValueError(f"this DiT takes times shaped (B, {self.num_times}), got {tuple(times.shape)}")
        features = time_features(times, self.time_freqs, self.time_scale)  # (B, k * freqs), per-time blocks
        features = features.to(torch.promote_types(features.dtype, self.t_embedders[0][0].weight.dtype))
        return sum(mlp(f) for mlp, f in zip(self.t_embedders, features.split(self.time_freqs, dim=1)))

    def forward(self, z: torch.Tensor, cond: torch.Tensor | None, times: torch.Tensor) -> torch.Tensor:
        if (cond is not None) != self.conditional:
            raise ValueError(f"this DiT was built with conditional={self.conditional}; cond must be "
                             f"{'x_s' if self.conditional else 'None'}")
        x = self.x_embedder(z if cond is None else torch.cat([z, cond], dim=1)) + self.pos_embed  # (B, L, D)
        c = self.embed_times(times)  # (B, D)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))


def _factory(size: str, patch_size: int):
    depth, hidden_size, num_heads = DIT_SIZES[size]

    def make(data_shape, conditional: bool, num_times: int, **kwargs) -> DiT:
        return DiT(data_shape, conditional, num_times, patch_size=patch_size, hidden_size=hidden_size,
                   depth=depth, num_heads=num_heads, **kwargs)

    make.__name__ = make.__qualname__ = f"DiT_{size}_{patch_size}"
    make.__doc__ = f"DiT-{size}/{patch_size}: depth {depth}, hidden {hidden_size}, {num_heads} heads."
    return make


DIT_MODELS = {f"DiT-{size}/{p}": _factory(size, p) for size in DIT_SIZES for p in DIT_PATCHES}


def dit_patch(name: str) -> int:
    return int(name.rsplit("/", 1)[1])


def choose_dit(name: str | None, latent_shape: tuple[int, ...]) -> str:
    """The registry name to train on latents of `latent_shape` (C, H, W): `name` once checked, or by
    default DiT-S/2 for latents up to 8 x 8, DiT-B/2 up to 16 x 16 and DiT-M/2 (the paper's) above.
    ValueError, listing the names that fit, for a name not in the registry or a patch that does not
    divide H and W."""
    _, height, width = latent_shape
    fits = [n for n in DIT_MODELS if height % dit_patch(n) == 0 and width % dit_patch(n) == 0]
    if not fits:
        raise ValueError(f"latents {height}x{width}: no DiT patch size (2, 4, 8) divides them; encode at a "
                         f"resolution that gives an even latent size")
    if name is None:
        side = max(height, width)
        return f"DiT-{'S' if side <= 8 else 'B' if side <= 16 else 'M'}/2"
    if name not in fits:
        why = ("is not in the registry" if name not in DIT_MODELS else
               f"has patch {dit_patch(name)}, which does not divide the latents {height}x{width}")
        raise ValueError(f"--dit {name} {why}; choose one of {', '.join(fits)}")
    return name


def dit_param_count(name: str, data_shape=(4, 32, 32), conditional: bool = True, num_times: int = 3, **kwargs) -> int:
    """Parameters of DIT_MODELS[name], built on the meta device (no memory, instant even for XL)."""
    with torch.device("meta"):
        net = DIT_MODELS[name](data_shape, conditional, num_times, **kwargs)
    return sum(p.numel() for p in net.parameters())
