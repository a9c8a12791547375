"""FD / FID of the EMA weights, measured during training every --fd-every steps (rank 0).

The metric is evaluate's: FD on the FD classifier's features for the digits and mnist presets,
Inception FID for any other images (latent samples decoded through the run's VAE first). The
reference is --fd-num training images (all of them, and a note says so, when they are fewer;
latents: decoded training latents, i.e. VAE reconstructions, drawn from a reader of their own so
that the training stream is untouched), drawn once with a seed of its own; every measurement
samples --fd-num images from the same noise, with the sample grids' N and M. So values at
different steps compare the weights alone.
"""
from __future__ import annotations

import math
import sys
from argparse import Namespace

import torch

from .devices import physical_memory
from .sampling import sample

SEED_OFFSET = 2_000_003  # reference draw and sampling noise: apart from the training generator's seed


class TrainingFD:
    """fd = TrainingFD(cfg, meta, data, device, steps, flow_steps, decode); fd.measure(ema_net) -> float.

    Built before training (it loads the classifier or the Inception weights and computes the reference
    statistics): a missing classifier or unreachable Inception weights is a ValueError naming the fix.
    `name` is "FD" or "FID"; `reference_count` the number of reference images.
    """

    def __init__(self, cfg, meta: dict, data, device: torch.device, steps: int, flow_steps: int, decode=None,
                 batch_size: int = 256):
        from .evaluate import EvalError, build_metric, image_shape

        if data.kind == "vector":
            raise ValueError(vector_data_message(cfg))
        self.cfg, self.device, self.decode = cfg, device, decode
        self.steps, self.flow_steps, self.batch_size = steps, flow_steps, batch_size
        self.shape = tuple(meta["data_shape"])
        options = Namespace(metric="auto", inception_weights=cfg.inception_weights, classifier=cfg.fd_classifier,
                            batch_size=batch_size)
        try:
            self.metric = build_metric(meta, options, device)
        except EvalError as err:
            raise ValueError(f"--fd-every: {err}") from None
        self.name = self.metric.name
        check_fd_memory(cfg.fd_num, image_shape(meta))
        reference = self._reference(data)
        self.reference_count = len(reference)
        self.metric.set_reference(reference)

    def _reference(self, data) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.cfg.seed + SEED_OFFSET)
        if data.kind == "latent":
            from .data.latents import LatentShards

            # a reader of its own (one process, no workers): the training stream's position stays as it is
            shards = LatentShards(self.cfg.data, seed=self.cfg.seed + SEED_OFFSET, num_workers=0)
            if self.cfg.fd_num > shards.count:
                print(f"note: --fd-num {self.cfg.fd_num}: the shards hold {shards.count} samples; the FD reference "
                      f"decodes some twice (each with fresh noise): --fd-num {shards.count} uses each once",
                      file=sys.stderr)
            return self._decoded(shards.batch(self.cfg.fd_num, generator).to(self.device))
        values = data.to("cpu")
        if self.cfg.fd_num > len(values):
            # the FDs still compare across steps (one fixed reference), but the reference is not the "as many
            # training images" that --fd-num promises: said before training, not found out from the numbers
            print(f"note: --fd-num {self.cfg.fd_num}: the training set holds {len(values)} images; the FD reference "
                  f"uses all {len(values)}, against {self.cfg.fd_num} samples (--fd-num {len(values)} to match)",
                  file=sys.stderr)
        picked = torch.randperm(len(values), generator=generator)[:self.cfg.fd_num]  # without replacement
        return values.all()[picked]

    def _decoded(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(x).float() if self.decode is not None else x.float()

    @torch.no_grad()
    def measure(self, ema_net) -> float:
        """FD of `ema_net`'s samples (eval mode) against the reference; the same noise every time."""
        generator = torch.Generator(self.device).manual_seed(self.cfg.seed + SEED_OFFSET)
        was_training = ema_net.training
        ema_net.eval()
        chunks = []
        try:
            for start in range(0, self.cfg.fd_num, self.batch_size):
                n = min(self.batch_size, self.cfg.fd_num - start)
                x = sample(ema_net, self.cfg.method, n, self.shape, self.steps, self.flow_steps, generator,
                           self.cfg.sample_grid)
                chunks.append(self._decoded(x).cpu())
        finally:  # a caller that goes on after an error (a notebook) gets the module back as it was
            ema_net.train(was_training)
        from .metrics import NonFiniteImages

        try:
            return self.metric.score(torch.cat(chunks))
        except NonFiniteImages as err:  # the EMA weights diverged: logged as NaN, training goes on
            print(f"note: {self.name} not measured: {err}", file=sys.stderr)
            return math.nan


def check_fd_memory(fd_num: int, shape: tuple[int, ...]) -> None:
    """ValueError before the reference is drawn if --fd-num's reference and samples (float32 images, kept whole
    for the metric) would take more than half of this machine's memory."""
    total = physical_memory()
    need = 2 * fd_num * math.prod(shape) * 4
    if total is not None and need > total / 2:
        raise ValueError(f"--fd-num {fd_num}: the FD keeps {fd_num} reference images and as many samples of shape "
                         f"{tuple(shape)} in memory, {need / 1e9:.3g} GB, more than half of this machine's "
                         f"{total / 1e9:.3g} GB: lower --fd-num (FID's usual is 50000; python -m stmd_fast.evaluate "
                         f"sweep measures a checkpoint with more)")


def vector_data_message(cfg) -> str:
    """Why --fd-every cannot run on vector data, and what measures such a run instead."""
    if cfg.data is None and cfg.preset == "gmm":
        return ("--fd-every measures images, and the gmm preset makes vectors: drop --fd-every, and measure the run "
                "against the exact kernel with python -m stmd_fast.evaluate kernel RUN")
    # evaluate kernel knows the exact kernel of the built-in mixture alone (gmm.check_gmm_model)
    return (f"--fd-every measures images, and --data {cfg.data} holds vectors: drop --fd-every; no metric of "
            "stmd_fast scores vectors of your own (python -m stmd_fast.sample RUN --out samples.npy draws samples "
            "to compare with your data)")
