"""Which device a command runs on: the --device flag checked against this machine."""
from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N', checked against this
    machine; ValueError naming the fix otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine: use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 (the current device) are the same device; torch.Generator('cuda') reports no index."""
    def index(d):
        return d.index if d.index is not None else (torch.cuda.current_device() if d.type == "cuda" else None)
    return a.type == b.type and index(a) == index(b)


def use_tf32(enabled: bool) -> None:
    """CUDA matmuls and convolutions of fp32 tensors in TF32 (inputs rounded to a 10-bit mantissa on tensor
    cores, fp32 accumulation) or in full fp32 (IEEE). Process-wide; no effect on CPU math."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9; mixing it with allow_tf32 is refused
        precision = "tf32" if enabled else "ieee"
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
