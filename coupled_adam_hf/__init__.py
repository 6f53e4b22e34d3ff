"""Coupled Adam for the Hugging Face stack.

- :class:`CoupledAdam`: the optimizer (a ``torch.optim.Optimizer``; knows nothing of transformers).
- :func:`partition_parameters`: a model's param groups (coupled embeddings, decayed, not decayed).
- :class:`CoupledAdamFactory`, :func:`coupled_adam_optimizer`: Coupled Adam from any ``Trainer``
  (``optimizer_cls_and_kwargs``).
- :class:`CoupledAdamTrainingArguments`, :class:`CoupledAdamTrainer`: ``--optim coupled_adam`` for ``Trainer``.
- :func:`register_with_transformers`: ``optim="coupled_adam"`` for every ``TrainingArguments`` and plain ``Trainer``
  in this process; ``python -m coupled_adam_hf.run`` runs an unmodified script or module with it.
- :func:`embedding_metrics`, :func:`quick_isotropy`, :func:`evaluate_perplexity`, :func:`word_similarity`,
  :class:`EmbeddingIsotropyCallback`: evaluation (isotropy of embedding matrices, sliding-window perplexity,
  word-similarity benchmarks, logging during training).
"""

from ._kernels import read_policy as kernel_policy
from .optimizer import CoupledAdam, coupled_adam

__version__ = "0.1.0"

# kernel_policy(): the kernel choice the environment makes now (COUPLED_ADAM_COMPILE, COUPLED_ADAM_CPP), as
# Policy(compile="auto" | "always" | "never", cpp=bool)
__all__ = ["CoupledAdam", "coupled_adam", "kernel_policy", "__version__"]

# Hugging Face integration, imported on first use so that `import coupled_adam_hf` stays light (no transformers).
_LAZY_HF_EXPORTS = {
    "CoupledAdamTrainer": ".trainer",
    "CoupledAdamFactory": ".factory",
    "coupled_adam_optimizer": ".factory",
    "register_with_transformers": ".registration",
    "GradientValueClippingCallback": ".callbacks",
    "SaveOnSignalCallback": ".callbacks",
    "add_isotropy_logging": ".callbacks",
    "model_embeddings": ".partition",
    "CoupledAdamTrainingArguments": ".training_args",
    "partition_parameters": ".partition",
    "find_coupled_parameters": ".partition",
    "embedding_metrics": ".metrics",
    "quick_isotropy": ".metrics",
    "evaluate_perplexity": ".perplexity",
    "word_similarity": ".wordsim",
    "EmbeddingIsotropyCallback": ".callbacks",
}
__all__ += list(_LAZY_HF_EXPORTS)


def __getattr__(name):
    if name in _LAZY_HF_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_LAZY_HF_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
