"""Startup hook of ``python -m coupled_adam_hf.run``: registers ``optim="coupled_adam"`` in every Python process
the launched program starts.

The launcher sets ``COUPLED_ADAM_HF_REGISTER=1`` and puts this folder first on ``PYTHONPATH``; child processes
inherit both (``accelerate launch``, ``torchrun`` and TRL's command line start their workers with the same
environment), and Python imports ``sitecustomize`` at startup from the first folder on ``sys.path`` that has one.
So this module runs at the start of each of them, and:

- when ``COUPLED_ADAM_HF_REGISTER`` is ``1``, adds an import hook that registers right after
  ``transformers.training_args`` (the ``OptimizerNames`` member) and ``transformers.trainer_optimizer`` (the
  optimizer handler) are first imported. Nothing is imported now: an interpreter that never imports transformers
  pays one environment lookup and one ``sys.meta_path`` entry;
- runs the ``sitecustomize`` it shadows, if any (a distribution's, a virtual environment's), as Python would have.

``COUPLED_ADAM_HF_REGISTER=0`` (or unset) in a child's environment switches the hook off there.
"""

import importlib.machinery
import importlib.util
import os
import sys

ENV_VAR = "COUPLED_ADAM_HF_REGISTER"
_HERE = os.path.dirname(os.path.abspath(__file__))
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(_HERE))


def _registration():
    if importlib.util.find_spec("coupled_adam_hf") is None:  # a source checkout the child was not told about
        sys.path.append(_PACKAGE_PARENT)
    from coupled_adam_hf import registration

    return registration


def _register_name(module):
    _registration().register_optimizer_name(module)


def _register_handler(module):
    _registration().register_optimizer_handler(module)


class _Loader:
    """Runs the real loader, then the hook; puts the real loader back on the module afterwards."""

    def __init__(self, loader, hook):
        self._loader, self._hook = loader, hook

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._hook(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class AfterImportHooks:
    """A ``sys.meta_path`` finder that runs ``hooks[name](module)`` once, right after module ``name`` executed."""

    def __init__(self, hooks):
        self._hooks = dict(hooks)

    def find_spec(self, fullname, path=None, target=None):
        hook = self._hooks.get(fullname)
        if hook is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        del self._hooks[fullname]
        spec.loader = _Loader(spec.loader, hook)
        return spec

    def invalidate_caches(self):
        pass


def install():
    """Add the registration hooks (once) when ``COUPLED_ADAM_HF_REGISTER=1``."""
    if os.environ.get(ENV_VAR) != "1" or any(isinstance(f, AfterImportHooks) for f in sys.meta_path):
        return
    hooks = {"transformers.training_args": _register_name, "transformers.trainer_optimizer": _register_handler}
    for name in [name for name in hooks if name in sys.modules]:  # (never at startup)
        hooks.pop(name)(sys.modules[name])
    if hooks:
        sys.meta_path.insert(0, AfterImportHooks(hooks))


def _run_shadowed_sitecustomize():
    rest = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


if __name__ == "sitecustomize":
    install()
    _run_shadowed_sitecustomize()
