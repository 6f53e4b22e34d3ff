"""``optim="coupled_adam"`` for every ``TrainingArguments`` and plain ``Trainer``: :func:`register_with_transformers`.

transformers validates ``optim`` against a closed enum and builds optimizers from a private handler table:

- ``TrainingArguments.__post_init__`` converts ``optim`` with ``OptimizerNames(self.optim)`` (every subclass, TRL's
  ``SFTConfig`` included, runs it), and ``HfArgumentParser`` turns the enum into argparse ``choices`` (so
  ``--help`` lists them and a typo fails at parse time);
- ``Trainer.get_optimizer_cls_and_kwargs`` looks ``args.optim`` up in ``transformers.trainer_optimizer.
  _OPTIMIZER_HANDLERS`` and calls the handler with an ``OptimizerContext`` (transformers 5.2 and later).

Registering adds the member ``OptimizerNames.COUPLED_ADAM`` to the enum (so parsers built afterwards list it),
a handler that returns ``(CoupledAdamFactory, kwargs)`` (the optimizer-factory protocol of
:mod:`coupled_adam_hf.factory`; coupling options from ``--optim_args``), and a check of ``--optim_args`` at the end
of ``TrainingArguments.__post_init__`` (so a bad key fails when the arguments are made, before anything runs).
It is idempotent and holds for this process. Where the installed transformers' internals are not what this
expects, it raises :class:`RegistrationError` naming the versions it supports; it never falls back to another
optimizer.

Two steps, so that each can run when its module has been imported and no earlier (the launcher's import hook,
:mod:`coupled_adam_hf.run`): :func:`register_optimizer_name` needs ``transformers.training_args`` only,
:func:`register_optimizer_handler` needs ``transformers.trainer_optimizer``.
"""

from __future__ import annotations

import enum
import functools
import sys
from types import ModuleType
from typing import Any

__all__ = ["COUPLED_ADAM", "RegistrationError", "SUPPORTED_TRANSFORMERS", "is_registered",
           "register_optimizer_handler", "register_optimizer_name", "register_with_transformers"]

COUPLED_ADAM = "coupled_adam"
_MEMBER_NAME = "COUPLED_ADAM"
#: The transformers releases whose internals the registration is written for (checked, not assumed: see
#: :func:`_check`): the enum ``OptimizerNames`` and, from 5.2 on, the handler table of ``trainer_optimizer``.
SUPPORTED_TRANSFORMERS = "transformers >= 5.2, < 6 (tested with 5.24)"


class RegistrationError(RuntimeError):
    """The installed transformers does not have the internals the registration extends."""


def register_with_transformers() -> None:
    """Make ``optim="coupled_adam"`` known to transformers in this process (idempotent).

    After it, ``TrainingArguments(optim="coupled_adam")``, ``HfArgumentParser`` (``--optim coupled_adam``, listed by
    ``--help``) and every ``TrainingArguments`` subclass accept the name, and a plain ``Trainer`` builds a
    :class:`~coupled_adam_hf.CoupledAdam` with the automatic partition. Coupling options travel in
    ``--optim_args``, e.g. ``coupled_targets=token+output,avg_scale=2`` (see
    :data:`coupled_adam_hf.factory.OPTIM_ARGS`).

    Raises:
        RegistrationError: when the installed transformers' internals differ from what this extends.
    """
    import transformers.trainer_optimizer
    import transformers.training_args

    register_optimizer_name(transformers.training_args)
    register_optimizer_handler(transformers.trainer_optimizer)
    trainer = sys.modules.get("transformers.trainer")
    if trainer is not None:  # Trainer reads the table through its own module's global
        _check(getattr(trainer, "_OPTIMIZER_HANDLERS", None) is transformers.trainer_optimizer._OPTIMIZER_HANDLERS,
               "transformers.trainer looks optimizers up in a table other than trainer_optimizer._OPTIMIZER_HANDLERS")


def is_registered() -> bool:
    """Whether ``coupled_adam`` is an ``OptimizerNames`` member in this process (without importing transformers)."""
    module = sys.modules.get("transformers.training_args")
    names = getattr(module, "OptimizerNames", None)
    return names is not None and COUPLED_ADAM in getattr(names, "_value2member_map_", {})


# ---------------------------------------------------------------------------------------------- the name
def register_optimizer_name(training_args: ModuleType | None = None) -> enum.Enum:
    """Add ``OptimizerNames.COUPLED_ADAM`` and the ``--optim_args`` check; return the member (idempotent)."""
    if training_args is None:
        import transformers.training_args as training_args
    names = getattr(training_args, "OptimizerNames", None)
    arguments = getattr(training_args, "TrainingArguments", None)
    _check(isinstance(names, enum.EnumMeta) and issubclass(names, str),
           "transformers.training_args.OptimizerNames is not a str enum")
    _check(all(hasattr(names, attr) for attr in ("_member_map_", "_value2member_map_", "_member_names_")),
           "transformers.training_args.OptimizerNames lacks the enum tables it is extended through")
    _check(isinstance(arguments, type) and callable(getattr(arguments, "__post_init__", None)),
           "transformers.training_args.TrainingArguments has no __post_init__")
    member = names._value2member_map_.get(COUPLED_ADAM)
    if member is None:
        member = _add_enum_member(names, _MEMBER_NAME, COUPLED_ADAM)
    _check(names(COUPLED_ADAM) is member and names[_MEMBER_NAME] is member and member in list(names),
           "OptimizerNames did not take the new member")
    if not getattr(arguments.__post_init__, "_coupled_adam_checks", False):
        arguments.__post_init__ = _with_optim_args_check(arguments.__post_init__)
    return member


def _add_enum_member(names: type[enum.Enum], name: str, value: str) -> enum.Enum:
    """Add a member to an existing (closed) enum the way ``EnumType`` builds its own members."""
    member = names._member_type_.__new__(names, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = names
    member._sort_order_ = len(names._member_names_)
    member.__init__(value)
    # Pickled as this module's function rather than by value, so a training_args.bin written with coupled_adam
    # loads in a process that has not registered (it registers on load).
    member.__reduce_ex__ = _reduce_member
    add_member = getattr(names, "_add_member_", None)  # Python >= 3.13
    if add_member is not None:
        add_member(name, member)
    else:
        names._member_map_[name] = member
        type.__setattr__(names, name, member)  # (EnumType.__setattr__ refuses names that are members already)
    names._member_names_.append(name)
    names._value2member_map_[value] = member
    return member


def _reduce_member(protocol: int) -> tuple[Any, tuple]:
    return register_optimizer_name, ()


def _with_optim_args_check(post_init: Any) -> Any:
    @functools.wraps(post_init)
    def __post_init__(self: Any) -> None:
        post_init(self)
        # (CoupledAdamTrainingArguments checks its own flags and --optim_args after this)
        if getattr(self.optim, "value", self.optim) == COUPLED_ADAM and not hasattr(self, "coupled_adam_options"):
            from .factory import parse_optim_args

            parse_optim_args(self.optim_args)  # for its errors, before anything runs

    __post_init__._coupled_adam_checks = True
    return __post_init__


# ---------------------------------------------------------------------------------------------- the handler
def register_optimizer_handler(trainer_optimizer: ModuleType | None = None) -> None:
    """Add the ``coupled_adam`` entry to Trainer's optimizer handler table (idempotent)."""
    if trainer_optimizer is None:
        import transformers.trainer_optimizer as trainer_optimizer
    table = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    context = getattr(trainer_optimizer, "OptimizerContext", None)
    _check(isinstance(table, dict), "transformers.trainer_optimizer has no _OPTIMIZER_HANDLERS table")
    _check(callable(getattr(trainer_optimizer, "is_optimizer_factory", None)),
           "transformers.trainer_optimizer has no is_optimizer_factory (the optimizer-factory protocol)")
    fields = getattr(context, "__dataclass_fields__", {})
    _check("args" in fields and "model" in fields, "transformers.trainer_optimizer.OptimizerContext has no args/model")
    member = register_optimizer_name()
    table[member] = _coupled_adam_handler


def _coupled_adam_handler(context: Any) -> tuple[Any, dict[str, Any]]:
    """Trainer's handler for ``optim="coupled_adam"``: the factory and its keywords from ``context.args``."""
    from .factory import coupled_adam_optimizer, coupling_options

    return coupled_adam_optimizer(context.args, **coupling_options(context.args))


# ---------------------------------------------------------------------------------------------- checks
def _check(condition: bool, what: str) -> None:
    if not condition:
        try:
            from importlib.metadata import version

            installed = version("transformers")
        except Exception:  # noqa: BLE001 - only for the message
            installed = "unknown"
        raise RegistrationError(
            f"coupled_adam_hf cannot register optim='coupled_adam' with transformers {installed}: {what}. It "
            f"supports {SUPPORTED_TRANSFORMERS}. Use coupled_adam_hf.coupled_adam_optimizer(args) with "
            "Trainer(optimizer_cls_and_kwargs=...), or CoupledAdamTrainer, which need no registration."
        )
