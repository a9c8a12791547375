"""Which device a command runs on: the --device flag checked against this machine."""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch


def resolve_device(name: str, what: str = "--device") -> torch.device:
    """'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N', checked against this
    machine; ValueError naming the fix otherwise (`what`: how the caller's user named the device)."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{what} {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{what} {name}: only cpu and cuda are supported")
    if device.type == "cpu" and device.index not in (None, 0):  # torch takes cpu:1 and runs on the one CPU device
        raise ValueError(f"{what} {name}: the CPU is one device (torch numbers no others): use {what} cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what} {name}: CUDA is not available on this machine: use {what} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{what} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 (the current device) are the same device; torch.Generator('cuda') reports no index."""
    def index(d):
        return d.index if d.index is not None else (torch.cuda.current_device() if d.type == "cuda" else None)
    return a.type == b.type and index(a) == index(b)


def use_tf32(enabled: bool) -> None:
    """CUDA matmuls and convolutions of fp32 tensors in TF32 (inputs rounded to a 10-bit mantissa on tensor
    cores, fp32 accumulation) or in full fp32 (IEEE). Process-wide; no effect on CPU math."""
    # Through the process-wide settings, which set torch's per-backend fp32_precision (torch >= 2.9) too,
    # consistently: setting a per-backend one alone (cuDNN conv but not RNN, CUDA matmuls alone) makes
    # torch refuse every later read of the process-wide ones (torch.get_float32_matmul_precision,
    # torch.backends.cudnn.allow_tf32), which Inductor, torch.export and our attention's launcher make.
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled


@contextmanager
def tf32_kept():
    """use_tf32's process-wide settings as they were on the way in, back on the way out (a training call from a
    notebook would otherwise leave the host's later fp32 matmuls in TF32, or take a TF32 it had chosen away)."""
    try:
        matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    except RuntimeError:  # the host set torch's per-backend fp32_precision one by one: not readable this way
        yield
        return
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn


def out_of_memory(err: RuntimeError) -> bool:
    """torch.OutOfMemoryError (CUDA), or the CPU allocator's plain RuntimeError saying the same."""
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err) \
        or "out of memory" in str(err).lower()


class OutOfMemory(Exception):
    """Work that does not fit in memory: one line naming what to lower (sample, export)."""


@contextmanager
def fits_in_memory(device, fix: str):
    """Turns running out of memory on `device` into OutOfMemory saying `fix` (e.g. "lower --batch-size 512"),
    where torch's allocator gives a traceback."""
    try:
        yield
    except RuntimeError as err:
        if not out_of_memory(err):
            raise
        raise OutOfMemory(f"out of memory on {device} ({str(err).strip().splitlines()[0][:160]}): {fix}") from None


def physical_memory() -> int | None:
    """This machine's memory in bytes (None where sysconf cannot tell, e.g. Windows): what a check that data
    fits in memory compares with, before the kernel's out-of-memory killer ends the process without a word."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
