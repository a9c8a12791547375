"""How the trainer runs on one process or K: a strategy chosen once (choose), so the loop never asks
which mode it is in. The collectives themselves, and why gradients are reduced by hand, are in
stmd_fast/distributed.py.

    Single    one process (or torchrun with one process and --parallel ddp): the whole batch
    Replicas  --parallel ddp, K > 1: a full replica per rank, gradients averaged after backward
    Sharded   --parallel fsdp: FSDP2 shards of the network and its EMA; full state dicts gathered
              for checkpoints and sample grids
"""
from __future__ import annotations

import copy
from functools import partial

import torch

from . import distributed
from .objectives import Noise, draw_noise


class Single:
    """One process. Also the base of the others: how a batch and its noise are drawn and a rank's
    generator seeded, which depends only on the number of processes and on the data."""

    ema_buffers = True  # AveragedModel(use_buffers=...): the EMA copies buffers as well
    sampling_net = None  # Sharded: rank 0's plain copy of the EMA net for sample grids

    def __init__(self, ctx: distributed.Dist, batch_size: int, per_rank_data: bool):
        self.ctx, self.world, self.rank = ctx, ctx.world_size, ctx.rank
        self.batch_size, self.local_batch = batch_size, batch_size // ctx.world_size
        # latent shards: each rank reads its own shards with its own generator
        self.per_rank_data = per_rank_data

    def seed(self, seed: int) -> int:
        """The seed of this rank's generator: the same on all ranks unless each rank streams its own data."""
        return distributed.rank_seed(seed, self.rank) if self.per_rank_data else seed

    def draw(self, data, generator: torch.Generator, objective) -> tuple[torch.Tensor, Noise]:
        """This rank's x0 and noise of one step. Shared data: every rank draws the global batch and its
        noise, exactly as one process does, and keeps its slice; per-rank data: its own local batch."""
        if self.per_rank_data:
            x0 = data.batch(self.local_batch, generator)
            return x0, draw_noise(x0, objective, generator)
        x0 = data.batch(self.batch_size, generator)
        noise = draw_noise(x0, objective, generator)
        if self.world == 1:
            return x0, noise
        mine = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
        return x0[mine], Noise(*(t[mine] for t in noise))

    def prepare(self, net: torch.nn.Module, ema, device: torch.device) -> None:
        """Called once the weights are loaded, before the optimizer is built."""

    def sync_grads(self, net: torch.nn.Module):
        """What make_train_step calls after backward, or None."""
        return None

    def full_states(self, net, ema, optimizer, step: int):
        """(net weights, {decay: EMA weights}, optimizer state) as a checkpoint stores them. Collective."""
        return net, ema.modules(), optimizer.state_dict()

    def load_optimizer(self, net, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def for_sampling(self, ema_net):
        """The EMA net (ema.module, or any of ema.modules()) that rank 0 samples from (None on the other
        ranks). Collective."""
        return ema_net if self.ctx.is_main else None

    def streams(self, generator: torch.Generator, data) -> list | None:
        """Every rank's generator and data position when each rank has its own. Collective."""
        if not self.per_rank_data:
            return None
        return distributed.gather_objects({"generator": generator.get_state(), "data": data.state_dict()})


class Replicas(Single):
    """--parallel ddp with K > 1 processes: the same weights everywhere, gradients all-reduced."""

    def sync_grads(self, net):
        return partial(distributed.all_reduce_grads, list(net.parameters()), self.world)

    def full_states(self, net, ema, optimizer, step):
        if not distributed.replicas_agree(net, ema.module):
            problem = f"the {self.world} processes hold different weights or EMA at step {step}: the gradient sync failed"
            if not distributed.skip_grad_sync_for_tests():
                raise distributed.GradientSyncFailed(problem)
            if self.ctx.is_main:
                print(f"warning: {problem} (STMD_FAST_SKIP_GRAD_SYNC=1, a test-only switch)", flush=True)
        return super().full_states(net, ema, optimizer, step)


class Sharded(Single):
    """--parallel fsdp: FSDP2 shards the network and, alike, its EMA, so the EMA update is shard-local."""

    # the EMA averages the (DTensor) parameters and copies the buffers (constants in our nets): one
    # foreach lerp over DTensor parameters and plain buffers together is refused
    ema_buffers = False

    def prepare(self, net, ema, device):
        self.sampling_net = copy.deepcopy(ema.module) if self.ctx.is_main else None
        distributed.shard(net, *ema.modules().values(), device=device)

    def full_states(self, net, ema, optimizer, step):
        emas = {decay: distributed.full_model_state(module) for decay, module in ema.modules().items()}
        return distributed.full_model_state(net), emas, distributed.full_optimizer_state(net, optimizer)

    def load_optimizer(self, net, optimizer, state):
        distributed.load_full_optimizer_state(net, optimizer, state)

    def for_sampling(self, ema_net):
        full = distributed.full_model_state(ema_net)  # gather the shards into rank 0's plain copy
        if self.ctx.is_main:
            self.sampling_net.load_state_dict(full)
        return self.sampling_net


def choose(ctx: distributed.Dist, parallel: str, batch_size: int, data) -> Single:
    """The strategy of this run: fsdp under torchrun shards; more than one process replicates."""
    per_rank_data = ctx.world_size > 1 and hasattr(data, "state_dict")
    kind = Sharded if ctx.launched and parallel == "fsdp" else Replicas if ctx.world_size > 1 else Single
    return kind(ctx, batch_size, per_rank_data)
