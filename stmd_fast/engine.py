"""The optimisation step the trainer runs (and bench/train_step.py times): loss, backward,
gradient sync, AdamW, lr schedule, EMA."""
from __future__ import annotations

from contextlib import nullcontext

import torch


def make_train_step(loss_fn, net, optimizer, scheduler, ema, compile: bool, precision: str, device: torch.device,
                    sync_grads=None):
    """One optimisation step: loss_fn(x0, noise) -> (loss, error), backward, sync_grads(), AdamW, lr
    schedule, EMA. sync_grads (torchrun, --parallel ddp): averages the gradients over the ranks; the
    loss itself, JVP included, runs on the plain module (stmd_fast/distributed.py says why).

    What --compile compiles: the loss (JVP, target, adaptive loss) with its backward graph, which
    AOTAutograd derives and Inductor compiles too. loss.backward() itself, the optimizer and the
    EMA stay eager: compiling the whole step graph-breaks at Tensor.backward, and AdamW and the
    EMA are a few elementwise passes over the weights, small next to the network's passes.
    bf16: autocast runs the network's matmuls and convolutions, and the JVP's tangents with
    them, in bf16; weights, gradients, optimizer state, norms, softmax, time features and the
    loss stay fp32 (the choice and its measurement: README, "Precision").
    """
    if compile:
        loss_fn = torch.compile(loss_fn)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def train_step(x0, noise):
        with autocast:
            loss, error = loss_fn(x0, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sync_grads is not None:
            sync_grads()
        optimizer.step()
        scheduler.step()
        ema.update_parameters(net)
        return loss.detach(), error

    return train_step
