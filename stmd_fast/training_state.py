"""The training state: everything a checkpoint holds, built fresh or restored from one, and saved.

Weights (model.safetensors, ema.safetensors, ema-DECAY.safetensors for each further EMA decay) and
train_state.pt: step, optimizer, lr schedule, the generator that draws every batch and noise, the
EMA's count, the data stream's position (latent shards), per rank where each rank streams its own,
and the open log interval's loss sums. Restoring all of it makes a resumed run bit-identical to an
uninterrupted one (tests/test_train.py), its logged losses included (tests/test_robustness.py).
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from . import distributed
from .checkpoint import CheckpointError, NonFiniteState, ema_file, load_train_state, load_weights, save_checkpoint
from .engine import make_optimizer
from .parallel import Sharded, Single


class EMAs:
    """One AveragedModel per EMA decay, all updated after every step. The first decay (the run's
    ema_decay) is the main EMA: ema.safetensors and the sample grids. The trainer updates them through
    by_decay (engine.make_ema_update, one foreach update each); module and n_averaged are the main one's."""

    def __init__(self, net: torch.nn.Module, decays: tuple[float, ...], use_buffers: bool):
        self.by_decay = {d: AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(d), use_buffers=use_buffers)
                         for d in decays}
        self.main = next(iter(self.by_decay.values()))
        for average in self.by_decay.values():
            average.module.eval()  # sampled only: no dropout in the EMA nets

    @property
    def module(self) -> torch.nn.Module:
        return self.main.module

    @property
    def n_averaged(self) -> torch.Tensor:
        return self.main.n_averaged  # updated together: every EMA has the same count

    def modules(self) -> dict[float, torch.nn.Module]:
        return {decay: average.module for decay, average in self.by_decay.items()}


def dropout_rng_state(device: torch.device) -> dict:
    """torch's global generator (and the CUDA one on a GPU): where dropout's masks come from."""
    state = {"device": device.type, "cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


@contextmanager
def fitting(ckpt: Path):
    """Restoring from ckpt: what does not fit this code (weights of another layout, a generator state or a
    key of another torch or stmd_fast version) becomes a CheckpointError naming the checkpoint."""
    try:
        yield
    except (CheckpointError, torch.cuda.OutOfMemoryError, torch.distributed.DistBackendError):
        raise  # a damaged file (said as such), the machine or a peer: not the checkpoint's layout
    except (RuntimeError, KeyError, ValueError, TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"{ckpt} does not fit this stmd_fast and torch ({type(err).__name__}: {reason}): "
                              f"resume it with the versions that wrote it, or start a new --out") from None


@dataclass
class TrainingState:
    net: torch.nn.Module
    ema: EMAs
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # data order and every noise draw
    data: object
    step: int = 0
    # the loss sums of the log interval a checkpoint falls inside (run_log.IntervalSums.open_window): a resumed
    # run goes on averaging over the same steps, so its records at the --log-every steps are the uninterrupted run's
    log_window: dict | None = None
    # the record of a step whose FD is measured after its checkpoint (train.loop): a resume after a kill during
    # the measurement writes it, without the FD, so that metrics.jsonl still holds every record step once
    pending_record: dict | None = None

    @classmethod
    def build(cls, cfg, net, data, device: torch.device, strategy: Single, ckpt: Path | None = None):
        """Fresh (ckpt None) or restored from the checkpoint directory ckpt. Collective under torchrun."""
        if ckpt is not None:
            with fitting(ckpt):
                net.load_state_dict(load_weights(ckpt, "model.safetensors", device))
        distributed.broadcast_module(net)  # replicas start equal (the same seed gives that already; this makes sure)
        ema = EMAs(net, (cfg.ema_decay, *cfg.ema_decays), use_buffers=strategy.ema_buffers)
        if ckpt is not None:
            with fitting(ckpt):
                for decay, module in ema.modules().items():
                    module.load_state_dict(load_weights(ckpt, ema_file(decay, cfg.ema_decay), device))
        strategy.prepare(net, ema, device)
        optimizer = make_optimizer(net, cfg.lr, cfg.weight_decay, sharded=isinstance(strategy, Sharded),
                                   betas=tuple(cfg.adam_betas))
        warmup = cfg.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / warmup) if warmup else 1.0)
        generator = torch.Generator(device).manual_seed(strategy.seed(cfg.seed))
        state = cls(net, ema, optimizer, scheduler, generator, data)
        if ckpt is None and strategy.world > 1 and cfg.dropout:  # distinct dropout masks on every rank
            torch.manual_seed(distributed.rank_seed(cfg.seed, strategy.rank))
        if ckpt is not None:
            saved = load_train_state(ckpt, device)
            with fitting(ckpt):
                state._restore(saved, cfg.seed, device, strategy)
        return state

    def _restore(self, saved: dict, seed: int, device: torch.device, strategy: Single) -> None:
        strategy.load_optimizer(self.net, self.optimizer, saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        for average in self.ema.by_decay.values():
            average.n_averaged.copy_(saved["ema_n_averaged"])
        self.step = saved["step"]
        self.log_window = saved.get("log_window")  # absent in checkpoints of older versions: a fresh interval
        self.pending_record = saved.get("pending_record")
        self._restore_stream(saved, seed, device, strategy)
        self._restore_dropout_rng(saved, seed, device, strategy)

    @staticmethod
    def _restore_dropout_rng(saved: dict, seed: int, device: torch.device, strategy: Single) -> None:
        """Dropout draws its masks from torch's global generator (nn.Dropout takes no generator), one per rank:
        each rank restores its own saved state when the process count is the checkpoint's (exact resume; one
        process: rank 0's); K processes resumed from another count reseed each rank from (seed, step, rank),
        distinct masks per rank, continuing correctly but not bit-identically."""
        state = saved.get("dropout_rng")  # rank 0's
        per_rank = saved.get("dropout_rngs")  # every rank's (K processes; absent in older checkpoints)
        if strategy.world > 1:
            state = per_rank[strategy.rank] if per_rank is not None and len(per_rank) == strategy.world else None
            if state is None or state["device"] != device.type:  # (another device: distinct masks all the same)
                torch.manual_seed(distributed.rank_seed(seed + saved["step"], strategy.rank))
                return
        if state is not None and state["device"] == device.type:
            torch.set_rng_state(state["cpu"].cpu())
            if device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda"].cpu(), device)

    def _restore_stream(self, saved: dict, seed: int, device: torch.device, strategy: Single) -> None:
        """Put the generator and the data position back where the checkpoint left them: exactly when the
        stream is shared by all ranks (in-memory data, any number of processes) or each rank has its own
        saved state (latent shards, same number of processes); otherwise reseeded from (seed, step, rank)
        and the latent epoch replayed from its start, which continues correctly but not bit-identically."""
        ctx, step = strategy.ctx, saved["step"]
        if strategy.per_rank_data:
            ranks = saved.get("ranks")
            mine = ranks[ctx.rank] if ranks is not None and len(ranks) == ctx.world_size else None
        else:
            mine = {"generator": saved["generator"], "data": saved.get("data")} if "ranks" not in saved else None
        if mine is not None and saved["generator_device"] == device.type:
            self.generator.set_state(mine["generator"].cpu())
        else:
            self.generator.manual_seed(strategy.seed(seed + step))
            if ctx.is_main:
                was, now = saved.get("world_size", 1), ctx.world_size if strategy.per_rank_data else 1
                why = (f"the run moved from {saved['generator_device']} to {device.type}" if mine is not None else
                       (f"the run's one data stream became {now} (one per process)" if was == 1 else
                        f"the run's {was} data streams (one per process) became {now}") + "; the shards' epoch restarts")
                print(f"note: {why}: noise reseeded from (seed, step), so it continues correctly but not "
                      f"bit-identically", file=sys.stderr)
        if hasattr(self.data, "load_state_dict"):
            if mine is not None and mine.get("data") is not None:
                self.data.load_state_dict(mine["data"])
            elif saved.get("data") is not None:  # another split of the shards: replay the saved epoch from its start
                self.data.load_state_dict({**saved["data"], "consumed": 0})

    def weights_finite(self) -> bool:
        """Whether the weights and EMA hold no NaN or inf on every rank (one collective; each rank checks
        its own copy or shards)."""
        tensors = [*self.net.parameters(), *(p for m in self.ema.modules().values() for p in m.parameters())]
        local = torch.stack([torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all() for t in tensors]).all()
        return bool(distributed.gather(local.double()[None]).min() > 0)

    def save(self, out: Path, meta: dict, keep: int, strategy: Single) -> Path:
        """Write checkpoints/step_N on rank 0; every rank takes part in the gathers first and waits at
        the end, so nobody runs ahead while rank 0 writes. Returns the checkpoint directory.
        NonFiniteState on every rank (nothing written) if the weights or any EMA hold NaN or inf."""
        if not self.weights_finite():
            raise NonFiniteState(f"the weights became non-finite by step {self.step} (while the loss was still "
                                 f"finite): not saved")
        weights, emas, optimizer_state = strategy.full_states(self.net, self.ema, self.optimizer, self.step)
        main, *extra = emas.items()  # (decay, module or full state dict), the main EMA first
        streams = strategy.streams(self.generator, self.data)
        dropout_rngs = distributed.gather_objects(dropout_rng_state(self.generator.device))  # each rank's masks
        final = out / "checkpoints" / f"step_{self.step:08d}"
        if strategy.ctx.is_main:
            train_state = {"step": self.step, "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                           "generator": self.generator.get_state(), "generator_device": self.generator.device.type,
                           "ema_n_averaged": self.ema.n_averaged, "world_size": strategy.world,
                           "dropout_rng": dropout_rngs[0], "log_window": self.log_window,
                           "pending_record": self.pending_record}
            if strategy.world > 1:
                train_state["dropout_rngs"] = dropout_rngs
            if hasattr(self.data, "state_dict"):  # a stream's position (latent shards)
                train_state["data"] = self.data.state_dict()
            if streams is not None:  # every rank's generator and position
                train_state["ranks"] = streams
            final = save_checkpoint(out, self.step, weights, main[1], train_state, meta, keep,
                                    extra_weights={ema_file(decay, main[0]): state for decay, state in extra})
        distributed.barrier()
        return final
