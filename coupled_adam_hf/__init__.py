"""Coupled Adam for the Hugging Face stack.

- :class:`CoupledAdam`: the optimizer (a ``torch.optim.Optimizer``; knows nothing of transformers).
"""

from .optimizer import CoupledAdam, coupled_adam

__version__ = "0.1.0"

__all__ = ["CoupledAdam", "coupled_adam", "__version__"]
