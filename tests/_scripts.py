"""What the test files share: the repository root, the offline environment, and loading a script as a module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def load_script(name: str, module_name: str | None = None) -> ModuleType:
    """Execute ``scripts/<name>.py`` as a fresh module registered as ``module_name`` (default ``name``)."""
    module_name = module_name or name
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and HfArgumentParser resolve annotations through it
    spec.loader.exec_module(module)
    return module
