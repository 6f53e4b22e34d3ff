"""Recipes: a run's arguments in a YAML or JSON file, typed against the argument dataclasses, flags on top.

``python scripts/train.py RECIPE.yaml --flag value`` reads ``RECIPE.yaml`` (a flat mapping of argument names to
values), checks every key against the parser's arguments and every value against its dataclass field's type (YAML's
own types: a list where the field takes one, a quoted ``"no"`` where YAML would read a boolean), and makes the values
the parser's defaults, so that explicit flags win. Bad input is a one-line :class:`~coupled_adam_hf.cli.UsageError`
naming the key and what it takes; nothing but the recipe is read.
"""

from __future__ import annotations

import enum
import json
import math
import os
import sys
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from .cli import UsageError, one_line

__all__ = ["RECIPE_SUFFIXES", "check_recipe", "load_recipe", "parse_args_with_recipe"]

RECIPE_SUFFIXES = (".yaml", ".yml", ".json")


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """A flat mapping of argument names to values, from a YAML or JSON file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        recipe = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except FileNotFoundError:
        raise UsageError(f"recipe {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"recipe {path}: cannot read it ({one_line(error)})") from error
    except (ValueError, yaml.YAMLError) as error:  # json.JSONDecodeError is a ValueError
        kind = "JSON" if str(path).endswith(".json") else "YAML"
        raise UsageError(f"recipe {path} is not valid {kind}: {one_line(error)}") from error
    if recipe is None or recipe == {}:
        raise UsageError(f"recipe {path} is empty: give the arguments of a run in it (see recipes/ for examples), "
                         "or leave the recipe out and pass flags")
    if not isinstance(recipe, dict):
        raise UsageError(f"recipe {path} must be a mapping of argument names to values, got {type(recipe).__name__}")
    not_names = [key for key in recipe if not isinstance(key, str)]
    if not_names:
        raise UsageError(f"recipe {path}: keys must be argument names, got {not_names[:3]!r}")
    return recipe


# Fields whose __post_init__ also takes a YAML list (coupled_targets) or mapping (config_overrides).
_ALSO_LIST = {"coupled_targets"}
_ALSO_MAPPING = {"config_overrides"}


def _accepted_kinds(name: str, annotation: Any) -> set[str]:
    """What a recipe value of a field may be: null, bool, int, float, str, list, mapping."""
    kinds = {"list"} if name in _ALSO_LIST else set()
    kinds |= {"mapping"} if name in _ALSO_MAPPING else set()
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(annotation):
            kinds |= _accepted_kinds(name, member)
        return kinds
    base = origin or annotation
    if annotation is type(None):
        kinds.add("null")
    elif base is typing.Literal or (isinstance(base, type) and issubclass(base, (str, enum.Enum))):
        kinds.add("str")
    elif base in (bool, int, float, list, dict):
        kinds.add({bool: "bool", int: "int", float: "float", list: "list", dict: "mapping"}[base])
    return kinds


def _recipe_value(name: str, value: Any, annotation: Any, action) -> Any:
    """``value`` ready to be a parser default, or UsageError saying what the field takes.

    Strings go on as they are: argparse converts a string default with the flag's type (and reports a bad one
    itself), as if it had been typed on the command line.
    """
    kinds = _accepted_kinds(name, annotation)
    takes = " or ".join(sorted(kinds)) or "a value the command line can give"

    def wrong(detail: str = "") -> UsageError:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return UsageError(f"recipe key {name!r} takes {takes}, got {type(value).__name__} {shown}{detail}")

    if value is None:
        if "null" not in kinds:
            raise wrong()
        return None
    if isinstance(value, bool):
        if "bool" in kinds:
            return value
        # YAML 1.1 reads unquoted yes/no/on/off as booleans (save_strategy: no -> False).
        raise wrong(" (YAML reads unquoted yes/no/on/off/true/false as booleans: quote the value)" if "str" in kinds
                    else "")
    if isinstance(value, str):
        if action.choices is not None and value not in {str(getattr(c, "value", c)) for c in action.choices}:
            choices = ", ".join(str(getattr(c, "value", c)) for c in action.choices)
            raise UsageError(f"recipe key {name!r}: {value!r} is not one of {choices}")
        return value
    if isinstance(value, int):
        if kinds & {"int", "float"}:
            return value
        if "str" in kinds:
            return str(value)
        raise wrong()
    if isinstance(value, float):
        if "float" in kinds:
            return value
        if "int" in kinds and value.is_integer():
            return int(value)
        if "str" in kinds and math.isfinite(value):
            return str(value)
        raise wrong()
    if isinstance(value, list):
        scalars = all(isinstance(item, (str, int, float)) and not isinstance(item, bool) for item in value)
        if "list" not in kinds or not scalars:
            raise wrong("" if scalars else " (a list of strings or numbers)")
        return [str(item) for item in value]
    if isinstance(value, dict):
        if "mapping" not in kinds or not all(isinstance(key, str) for key in value):
            raise wrong()
        return value
    raise wrong()  # dates, binary, sets and other YAML types


def check_recipe(recipe: dict[str, Any], path: str, arg_parser: HfArgumentParser, *, script: str = "the script") -> dict[str, Any]:
    """The recipe's values as parser defaults; unknown keys and values of the wrong type raise UsageError."""
    actions = {action.dest: action for action in arg_parser._actions}
    unknown = sorted(set(recipe) - set(actions))
    if unknown:
        raise UsageError(f"unknown argument(s) in the recipe {path}: {unknown}; `{script} --help` lists them")
    annotations: dict[str, Any] = {}
    for dataclass_type in arg_parser.dataclass_types:
        hints = typing.get_type_hints(dataclass_type)
        annotations.update({f.name: hints[f.name] for f in fields(dataclass_type) if f.init})
    return {name: _recipe_value(name, value, annotations.get(name, str), actions[name])
            for name, value in recipe.items()}


def parse_args_with_recipe(arg_parser: HfArgumentParser, argv: list[str] | None = None, *,
                           script: str = "the script") -> tuple[Any, ...]:
    """The parser's dataclasses from ``[recipe.yaml] [--flag value ...]``; flags win over the recipe.

    Bad input raises :class:`UsageError` (argparse's own errors -- unknown flag, a value of the wrong type --
    exit with status 2 as usual); a dataclass's own check (``__post_init__``) that names its flag (``--x ...``)
    is passed on as it is. Nothing is read but the recipe.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0].endswith(RECIPE_SUFFIXES):
        path = argv.pop(0)
        # Recipe values become the parser's defaults, so explicit flags override them (argparse converts string
        # defaults with the flag's type, so YAML strings such as "6e-4" work).
        arg_parser.set_defaults(**check_recipe(load_recipe(path), path, arg_parser, script=script))
    try:
        *arguments, remaining = arg_parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except UsageError:
        raise
    except Exception as error:  # the argument dataclasses' own checks (TrainingArguments.__post_init__ & co.)
        message = one_line(error)
        raise UsageError(message if message.startswith("--") else f"invalid arguments: {message}") from error
    if remaining:
        hint = "" if argv and argv[0] not in remaining else (
            f"; a recipe is a {'/'.join(RECIPE_SUFFIXES)} file given first")
        raise UsageError(f"unknown argument(s) {remaining}{hint}; `{script} --help` lists them")
    return tuple(arguments)
