"""Every conditioning input reaches every block of every preset's network (issue 17).

With diffusers' default time conditioning (a per-channel shift added BEFORE a GroupNorm) a
group of one channel erases the shift exactly: in the `mnist` preset 12 of 17 resnet blocks
never saw t, t - r or s, and nothing failed. These tests take gradients in float64 on a tiny
instance of each preset's architecture (channels and GroupNorm groups divided by one factor,
so every group keeps the preset's size) with all weights random (adaLN-zero's zeros would
hide a path only at initialisation) and require, per block:
  - the block's time projection changes the output (d out / d projection != 0),
  - each time input (t, t - r, s) changes that projection,
  - x_s (STMD's condition) changes the block's output.
A dead path gives an exact zero (or float64 round-off, ~1e-16 of the live ones).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from stmd_fast.config import PRESET_DATA_SHAPES, PRESETS, choose_net
from stmd_fast.models import NetConfig, build_net
from stmd_fast.objectives import METHODS

DATA_DEFINED = {"images": ((3, 32, 32), "image"), "latent": ((4, 32, 32), "latent")}
"""Presets whose network follows the data (net None): an example of it, the network choose_net picks."""
DEAD = 1e-8  # relative to the largest gradient of its kind: round-off is ~1e-16, live paths ~1e-2..1


def tiny_instance(preset: str) -> tuple[NetConfig, tuple[int, ...]]:
    """The preset's network kind and block structure at a test's size. U-Net: channels and
    groups divided by the same factor (group sizes unchanged, so a dead group shows), small
    images. DiT: 2 blocks of width 64 on a small latent. MLP: the preset's own."""
    preset_cfg = PRESETS[preset]()
    if preset_cfg.net is None:
        shape, kind = DATA_DEFINED[preset]
        cfg = choose_net(preset_cfg, shape, kind)
    else:
        cfg, shape = preset_cfg.net, PRESET_DATA_SHAPES[preset]
    if cfg.kind == "unet":
        k = max(1, max(cfg.channels) // 32)
        assert cfg.norm_groups % k == 0 and all(c % k == 0 for c in cfg.channels)
        cfg = dataclasses.replace(cfg, channels=tuple(c // k for c in cfg.channels), norm_groups=cfg.norm_groups // k,
                                  time_freqs=16)
        shape = (shape[0], 8, 8)  # divisible by 2 ** (levels - 1) for every preset
    elif cfg.kind == "dit":
        cfg = dataclasses.replace(cfg, depth=2, width=64, heads=4, time_freqs=16)
        shape = (shape[0], 8, 8)
    return cfg, shape


def time_projections(net: nn.Module) -> dict[str, nn.Module]:
    """The layer through which each block receives the time embedding."""
    if hasattr(net, "unet"):  # every diffusers resnet block has its own time_emb_proj
        return {name: m.time_emb_proj for name, m in net.unet.named_modules() if getattr(m, "time_emb_proj", None)}
    if hasattr(net, "blocks"):  # DiT: adaLN modulation of each block and of the final layer
        mods = {f"blocks.{i}": b.adaLN_modulation for i, b in enumerate(net.blocks)}
        return {**mods, "final_layer": net.final_layer.adaLN_modulation}
    return {"input": net.time_embed}  # MLP: added once to the input, every layer sees it through h


def blocks(net: nn.Module) -> dict[str, nn.Module]:
    """The blocks whose output must depend on x_s."""
    if hasattr(net, "unet"):
        return {name: m for name, m in net.unet.named_modules() if getattr(m, "time_emb_proj", None)}
    if hasattr(net, "blocks"):
        return {f"blocks.{i}": b for i, b in enumerate(net.blocks)}
    return {f"layers.{i}": layer for i, layer in enumerate(net.layers)}


def randomize(net: nn.Module, generator: torch.Generator) -> None:
    """Random weights everywhere (zero-initialised layers too), of the scale of the default init."""
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) / fan_in**0.5)


def _norms(grads) -> torch.Tensor:
    return torch.stack([g.norm() for g in grads])


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_block_sees_every_condition(preset, method):
    m = METHODS[method]
    cfg, shape = tiny_instance(preset)
    g = torch.Generator().manual_seed(0)
    net = build_net(cfg, shape, m.conditional, len(m.times)).double()
    randomize(net, g)

    b = 3
    z = torch.randn(b, *shape, generator=g, dtype=torch.float64)
    cond = torch.randn(b, *shape, generator=g, dtype=torch.float64, requires_grad=True) if m.conditional else None
    times = torch.rand(b, len(m.times), generator=g, dtype=torch.float64).requires_grad_()

    projections, block_out = {}, {}
    hooks = [mod.register_forward_hook(lambda _m, _i, out, n=n: projections.__setitem__(n, out))
             for n, mod in time_projections(net).items()]
    hooks += [mod.register_forward_hook(lambda _m, _i, out, n=n: block_out.__setitem__(n, out))
              for n, mod in blocks(net).items()]
    out = net(z, cond, times)
    for h in hooks:
        h.remove()
    assert projections and block_out, "no time projection or block found: update the test's module lists"
    block_out = {n: (o[0] if isinstance(o, tuple) else o) for n, o in block_out.items()}

    # 1. The output depends on each block's time projection.
    weight = torch.randn(out.shape, generator=g, dtype=torch.float64)
    names = list(projections)
    d_proj = _norms(torch.autograd.grad((out * weight).sum(), [projections[n] for n in names], retain_graph=True))
    dead = [n for n, d in zip(names, d_proj) if d <= DEAD * d_proj.max()]
    assert not dead, f"{preset}/{method}: the time embedding has no effect in {len(dead)} of {len(names)} blocks: {dead}"

    # 2. Each time input changes each block's time projection.
    for n in names:
        p = projections[n]
        (d_times,) = torch.autograd.grad((p * torch.randn(p.shape, generator=g, dtype=p.dtype)).sum(), times,
                                         retain_graph=True)
        per_input = d_times.norm(dim=0)
        for i, name in enumerate(m.times):
            assert per_input[i] > DEAD * per_input.max(), f"{preset}/{method}: time input {name} does not reach {n}"

    # 3. x_s changes every block's output.
    if m.conditional:
        for n, o in block_out.items():
            (d_cond,) = torch.autograd.grad((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum(), cond,
                                            retain_graph=True)
            assert d_cond.norm() > 0, f"{preset}/{method}: x_s has no effect on {n}"
