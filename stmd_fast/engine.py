"""The optimisation step the trainer runs (and bench/train_step.py times): loss, backward,
gradient sync, fused AdamW, lr schedule, foreach EMA; CUDA graphs for the compiled loss on CUDA."""
from __future__ import annotations

import os
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel


def inductor_cache_dir() -> str:
    """Where Inductor keeps compiled graphs between runs ($TORCHINDUCTOR_CACHE_DIR, else its default)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
        return cache_dir()
    except ImportError:  # an older torch: the variable, if set
        return os.environ.get("TORCHINDUCTOR_CACHE_DIR", "Inductor's cache")


def remove_interrupted_compiles(say: bool = True, min_age_s: float = 60.0) -> list[Path]:
    """Remove the empty compiled libraries (*.so) in Inductor's cache (with a note on stderr, if say), and
    return them. Call it before a first torch.compile call. A compile killed
    while the C++ compiler wrote one (Ctrl-C or SIGTERM during a first --compile) leaves the file empty;
    Inductor loads any library it finds there without rebuilding, so every later --compile failed with
    "file too short". Only files older than min_age_s: a compile running now may be writing one."""
    root, removed = Path(inductor_cache_dir()), []
    try:  # Inductor's C++ libraries lie one folder down (its Triton cache, deeper, changes as others compile)
        libraries = list(root.glob("*/*.so"))
    except OSError:  # a folder removed by another process meanwhile: nothing checked this time
        return removed
    now = time.time()
    for library in libraries:
        try:
            info = library.stat()
            if info.st_size == 0 and now - info.st_mtime > min_age_s:
                library.unlink()
                removed.append(library)
        except OSError:  # removed by another process meanwhile, or not ours to remove
            continue
    if removed and say:
        print(f"removed {len(removed)} empty compiled librar{'y' if len(removed) == 1 else 'ies'} from {root}, left "
              f"by a compile that was stopped; Inductor builds them again", file=sys.stderr)
    return removed


BROKEN_LIBRARY = re.compile(r"(/[^:\n]+\.so): (file too short|invalid ELF header|ELF load command|cannot read file data)")


def broken_compiled_library(err: BaseException) -> str | None:
    """The library named by an error (or its causes) that the dynamic loader found broken, if one is in
    Inductor's cache: a compile was stopped while writing it (a partly written one, which
    remove_interrupted_compiles does not catch)."""
    root, seen = os.path.realpath(inductor_cache_dir()), set()
    while err is not None and id(err) not in seen:  # an exception can be its own cause's context
        seen.add(id(err))
        match = BROKEN_LIBRARY.search(str(err))
        if match and os.path.realpath(match.group(1)).startswith(root + os.sep):
            return match.group(1)
        err = err.__cause__ or err.__context__
    return None


def make_optimizer(net, lr: float, weight_decay: float, sharded: bool = False,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all parameters per step, on CUDA and on CPU) unless the net is
    FSDP-sharded, where the DTensor parameters take the default multi-tensor path. Measured on the
    mnist U-Net on 2 CPU cores: the fused step took 41 ms against 165 ms for the default one."""
    return torch.optim.AdamW(net.parameters(), lr=lr, betas=betas, weight_decay=weight_decay,
                             fused=None if sharded else True)


def make_ema_update(ema: AveragedModel, net, decay: float):
    """ema.update_parameters(net) for an AveragedModel made with get_ema_multi_avg_fn(decay), as one
    foreach lerp over tensor lists built once: the same arithmetic (a copy at the first update, then
    ema += (1 - decay) (net - ema); floating buffers averaged with use_buffers, else copied), without
    AveragedModel's per-step Python loop and regrouping (tested equal; 21 ms against 57 ms per update
    on the mnist U-Net on 2 CPU cores). Build it after any sharding: it holds the tensors it updates."""
    def detached(tensors):
        return [x.detach() for x in tensors]

    averaged, current = detached(ema.module.parameters()), detached(net.parameters())
    copied, sources = [], []  # tensors copied at every update rather than averaged
    for mine, theirs in zip(ema.module.buffers(), net.buffers(), strict=True):
        if ema.use_buffers and mine.is_floating_point():
            averaged.append(mine.detach()), current.append(theirs.detach())
        else:
            copied.append(mine.detach()), sources.append(theirs.detach())
    started = []  # filled at the first call, from n_averaged (a resumed run has averaged already)

    @torch.no_grad()
    def update():
        if not started:
            started.append(int(ema.n_averaged) > 0)  # n_averaged lives on the CPU: no device sync
        if started[0]:
            torch._foreach_lerp_(averaged, current, 1 - decay)
        else:
            for a, c in zip(averaged, current):  # once; per tensor, as FSDP's DTensors need
                a.copy_(c)
            started[0] = True
        if copied:
            torch._foreach_copy_(copied, sources)
        ema.n_averaged += 1

    return update


def make_train_step(loss_fn, net, optimizer, scheduler, ema, ema_decay: float, compile: bool, precision: str,
                    device: torch.device, sync_grads=None, cuda_graphs: bool | None = None):
    """One optimisation step: loss_fn(x0, noise) -> (loss, error), backward, sync_grads(), AdamW, lr
    schedule, EMA. sync_grads (torchrun, --parallel ddp): averages the gradients over the ranks; the
    loss itself, JVP included, runs on the plain module (stmd_fast/distributed.py says why).

    What --compile compiles: the loss (JVP, target, adaptive loss) with its backward graph, which
    AOTAutograd derives and Inductor compiles too. loss.backward() itself, the optimizer and the
    EMA stay eager: compiling the whole step graph-breaks at Tensor.backward, and AdamW (fused,
    make_optimizer) and the EMA (one foreach lerp, make_ema_update) are each a few kernels.
    cuda_graphs (default: compiled on CUDA; pass False for an FSDP net, whose all-gathers run inside
    the forward): the compiled loss and its backward replay as CUDA graphs
    (mode="reduce-overhead"), so a small network's step is not bound by kernel launches. The noise
    is drawn eagerly before the call, and the optimizer and EMA update the parameters in place at
    fixed addresses, which is what replaying a graph needs.
    bf16: autocast runs the network's matmuls and convolutions, and the JVP's tangents with
    them, in bf16; weights, gradients, optimizer state, norms, softmax, time features and the
    loss stay fp32 (the choice and its measurement: README, "Precision").
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision {precision!r}: use 'fp32' or 'bf16' (fp16 would need loss scaling)")
    if cuda_graphs is None:
        cuda_graphs = compile and device.type == "cuda"
    if compile:
        loss_fn = torch.compile(loss_fn, mode="reduce-overhead" if cuda_graphs else None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    # several EMA decays (training_state.EMAs): one foreach update per AveragedModel, each at its own decay
    # (ema_decay is for a bare AveragedModel: an EMAs carries its decays)
    averages = ema.by_decay.items() if hasattr(ema, "by_decay") else [(ema_decay, ema)]
    ema_updates = [make_ema_update(average, net, decay) for decay, average in averages]

    def update_ema():
        for update in ema_updates:
            update()

    def train_step(x0, noise):
        # before the forward: with CUDA graphs last step's gradients live in the graphs' memory pool
        optimizer.zero_grad(set_to_none=True)
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # last step's graph outputs are dead
        with autocast:
            loss, error = loss_fn(x0, noise)
        loss.backward()
        if sync_grads is not None:
            sync_grads()
        optimizer.step()
        scheduler.step()
        update_ema()
        if cuda_graphs:  # the next replay overwrites the graph's outputs: hand out copies
            return loss.detach().clone(), error.clone()
        return loss.detach(), error

    return train_step
