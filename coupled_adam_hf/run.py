"""Run a program you did not write with ``--optim coupled_adam`` known to transformers.

    python -m coupled_adam_hf.run SCRIPT.py ARGS...
    python -m coupled_adam_hf.run -m MODULE ARGS...
    accelerate launch [...] -m coupled_adam_hf.run SCRIPT.py ARGS...
    torchrun [...] -m coupled_adam_hf.run SCRIPT.py ARGS...

The launcher registers ``coupled_adam`` in its own process (:func:`coupled_adam_hf.register_with_transformers`: an
installed transformers it cannot extend fails here, before the program starts), then runs the script or module as
``python SCRIPT.py ARGS...`` / ``python -m MODULE ARGS...`` would (``runpy``; ``sys.argv`` and ``sys.path[0]`` as
the program expects).

Programs that start Python processes of their own (TRL's ``trl sft`` re-launches its script through ``accelerate
launch``) need the registration there too. The launcher sets ``COUPLED_ADAM_HF_REGISTER=1`` and puts the folder
``coupled_adam_hf/_bootstrap`` first on ``PYTHONPATH``; every child inherits both, and Python runs that folder's
``sitecustomize.py`` at startup, which registers as soon as the child imports ``transformers.training_args`` (see
:mod:`coupled_adam_hf._bootstrap.sitecustomize`; it also runs any ``sitecustomize`` it shadows). Without the
launcher nothing changes; ``COUPLED_ADAM_HF_REGISTER=0`` in a child's environment switches the hook off there.
(A ``.pth`` startup file would not work for every install: setuptools' editable installs do not ship one, and a
source checkout on ``PYTHONPATH`` has none.)
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import MutableMapping, Sequence

__all__ = ["BOOTSTRAP_DIR", "ENV_VAR", "enable_in_children", "main"]

ENV_VAR = "COUPLED_ADAM_HF_REGISTER"
#: The folder whose ``sitecustomize.py`` registers in child processes.
BOOTSTRAP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_bootstrap")

USAGE = ("usage: python -m coupled_adam_hf.run SCRIPT.py [ARGS...]\n"
         "       python -m coupled_adam_hf.run -m MODULE [ARGS...]\n"
         "Runs SCRIPT.py or MODULE with optim='coupled_adam' registered with transformers, in this process and in "
         "every Python process it starts\n(coupling options in --optim_args, e.g. "
         "--optim_args coupled_targets=token+output,avg_scale=2).")


def enable_in_children(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set ``COUPLED_ADAM_HF_REGISTER=1`` and put :data:`BOOTSTRAP_DIR` first on ``PYTHONPATH`` in ``environ``."""
    environ[ENV_VAR] = "1"
    entries = [entry for entry in environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    environ["PYTHONPATH"] = os.pathsep.join([BOOTSTRAP_DIR, *(e for e in entries if e != BOOTSTRAP_DIR)])


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    module = script = None
    if argv[0] == "-m":
        if len(argv) < 2:
            raise SystemExit(f"coupled_adam_hf.run: -m needs a module name\n{USAGE}")
        module, args = argv[1], argv[2:]
    else:
        script, args = argv[0], argv[1:]
        if not os.path.isfile(script):
            raise SystemExit(f"coupled_adam_hf.run: no such script {script!r} (to run a module: -m MODULE)")

    from .registration import register_with_transformers

    register_with_transformers()
    enable_in_children()
    if module is not None:
        sys.argv = [module, *args]  # run_module puts the module's file into sys.argv[0], as python -m does
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [script, *args]
        sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python SCRIPT.py` (not the launcher's folder)
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
