"""Which implementation runs: the Triton kernel or its pure-PyTorch reference.

backend "auto" (default): CUDA tensors use the Triton kernels, everything else the reference.
backend "reference": the reference everywhere (what torch.compile fuses on its own; the
    benchmarks' "compiled" variant and the fallback when a kernel misbehaves).
backend "triton": the kernels everywhere; on a CPU that needs TRITON_INTERPRET=1 set before
    stmd_fast is imported (how the tests run the kernels without a GPU, fp32 only).

The choice is made in Python before a kernel is called, so torch.compile sees either an
opaque custom op (the kernel) or plain PyTorch ops (the reference) that Inductor can fuse.
"""
from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager

import torch
import torch.autograd.forward_ad as fwAD

BACKENDS = ("auto", "triton", "reference")
_backend = "auto"


HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpret_mode() -> bool:
    """True when Triton kernels run on CPU tensors through Triton's interpreter: TRITON_INTERPRET read as
    Triton reads it (1, true, yes, on, y in any case), so that the two never disagree."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on", "y")


INTERPRETED_AT_IMPORT = interpret_mode()
"""Triton takes its mode when our kernels are defined, at import: TRITON_INTERPRET set later changes nothing there
(a CPU tensor then met "0 active drivers")."""


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}: choose one of {BACKENDS}")
    if name == "triton" and not HAS_TRITON:
        raise ValueError("kernel backend 'triton' needs the triton package (pip install triton, Linux only)")
    _backend = name


def get_backend() -> str:
    return _backend


@contextmanager
def backend(name: str):
    """Run a block with another kernel backend (tests, benchmarks)."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def use_triton(x: torch.Tensor) -> bool:
    """Should an op on tensor x run its Triton kernel?"""
    if _backend == "reference" or not HAS_TRITON:
        return False
    if x.is_cuda:
        return True
    if _backend == "triton":
        if x.device.type == "cpu" and interpret_mode() and INTERPRETED_AT_IMPORT:
            return True
        raise RuntimeError(f"kernel backend 'triton' got a {x.device.type} tensor: Triton runs on CUDA, or on the "
                           f"CPU with TRITON_INTERPRET=1 set before importing stmd_fast (tests only)")
    return False


def split_dual(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(primal, tangent) of a tensor inside torch.func.jvp; tangent None outside one.

    Why not autograd.Function.jvp: torch.compile silently drops a custom jvp (measured here,
    and pytorch issue 192985). Unpacking the dual number and calling one opaque custom op that
    returns primal and tangent keeps the tangent computation an explicit node in the graph.
    """
    primal, tangent = fwAD.unpack_dual(x)
    return primal, tangent


def refuse_unsupported_transforms(op: str) -> None:
    """NotImplementedError, naming the fix, under a torch.func transform a kernel cannot take: a reverse-mode one
    (torch.func.grad, vjp, jacrev, hessian), for which its custom op has no rule (torch said "must override the
    setup_context staticmethod", about code the caller never wrote), or more than one forward-mode level (jvp
    inside jvp, jacfwd over a jvp), where a kernel computes one tangent and the outer one would come back as
    zero. Called on the kernels' paths only (the references take any transform). Eager only: under
    torch.compile the interpreter stack is not visible here, and such a transform there is not caught."""
    if torch.compiler.is_compiling():
        return
    from torch._C._functorch import TransformType, get_interpreter_stack

    levels = [level.key() for level in get_interpreter_stack() or ()]
    if TransformType.Grad in levels:  # (vjp and jacrev run at a Grad level too)
        why = "has no torch.func reverse-mode rule (torch.func.grad, vjp, jacrev, hessian)"
    elif levels.count(TransformType.Jvp) > 1:
        why = ("computes one tangent, so under a jvp of a jvp (or jacfwd over a jvp) the outer tangent would come "
               "back as zero")
    else:
        return
    raise NotImplementedError(f"{op}: the Triton kernel {why}; run the PyTorch reference instead: --kernels "
                              f"reference, or stmd_fast.kernels.dispatch.backend('reference') around the call")


def make_dual(primal: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    return fwAD.make_dual(primal, tangent)
