"""The startup hook of :mod:`coupled_adam_hf.run` (``sitecustomize.py``), shipped as a folder of its own: the
launcher puts this folder first on ``PYTHONPATH``, so only the programs it starts (and their child processes) see
it."""
