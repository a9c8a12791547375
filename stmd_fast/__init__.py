"""stmd_fast: a fast PyTorch trainer and sampler for Stochastic Transition-Map Distillation."""
__version__ = "0.1.0"

__all__ = ["Model", "load_checkpoint", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so running an exported sampler (python -m stmd_fast.sample
    # --exported) loads no network or training code.
    if name in ("Model", "load_checkpoint"):
        from . import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'stmd_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})  # the lazy names too: a notebook completes stmd_fast.Model
