"""stmd_fast: a fast PyTorch trainer and sampler for Stochastic Transition-Map Distillation."""
__version__ = "0.1.0"

from .checkpoint import Model, load_checkpoint

__all__ = ["Model", "load_checkpoint", "__version__"]
