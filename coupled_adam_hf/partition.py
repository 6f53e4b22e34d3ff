"""Which parameters of a model Coupled Adam couples, and the optimizer param groups around them.

A pure function of the model: nothing here knows about ``Trainer``, accelerate or the optimizer, so the same
groups serve a plain PyTorch loop, accelerate, Lightning or :class:`coupled_adam_hf.CoupledAdamTrainer`::

    >>> from coupled_adam_hf import CoupledAdam, partition_parameters
    >>> groups = partition_parameters(model, targets=("token", "output"), weight_decay=0.1)
    >>> opt = CoupledAdam(groups, lr=6e-4, betas=(0.9, 0.95))

Embeddings are found through the model's own API, not through architecture-specific names:

- ``token``: ``model.get_input_embeddings()`` (GPT-2 ``wte``, Llama ``embed_tokens``, BERT ``word_embeddings``,
  T5 ``shared``);
- ``output``: ``model.get_output_embeddings()`` (the LM head, ``[vocab, hidden]``); when it is tied to the input
  embedding it is the same tensor and is coupled once;
- ``position``: learned absolute position embeddings, i.e. ``nn.Embedding`` modules (or subclasses, such as OPT's)
  named like position embeddings (``wpe``, ``embed_positions``, ``position_embeddings``, ...). Rotary and ALiBi
  models have none; relative-position biases (T5 ``relative_attention_bias``) are never picked;
- ``token_type``: segment embeddings (BERT ``token_type_embeddings``);
- anything else is a glob pattern (``fnmatch``) on module or parameter names, e.g. ``"*.embed_positions"`` or
  ``"transformer.wte"``; a module match couples that module's ``weight``.

Every other trainable parameter goes to AdamW's usual two groups, split by ``Trainer``'s own weight-decay rule
(no decay for biases and norms).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import Tensor, nn

__all__ = [
    "DEFAULT_TARGETS",
    "TARGET_KINDS",
    "EmbeddingMatrix",
    "EmbeddingParameter",
    "describe_embedding_modules",
    "find_coupled_parameters",
    "model_embeddings",
    "parse_targets",
    "partition_parameters",
    "trainer_decay_parameter_names",
    "unwrap_model",
]

#: Target keywords, in the order they are resolved (a tied output embedding is reported as "token+output").
TARGET_KINDS: tuple[str, ...] = ("token", "output", "position", "token_type")
#: Token, LM-head and learned position embeddings, as the product's users asked (the paper couples the tied token
#: embedding / LM head only).
DEFAULT_TARGETS: tuple[str, ...] = ("token", "output", "position")
_NO_TARGETS = ("none", "")

# Last component of a module name that marks a learned absolute position embedding. "relative" names are refused
# separately: a relative-position bias (T5) holds one row per distance bucket and one column per head, not vectors.
_POSITION_NAME = re.compile(
    r"^(wpe|embed_positions|pos_embed|pos_embeds|pos_emb|pos_embedding|pos_embeddings"
    r"|position_embedding|position_embeddings|positional_embedding|positional_embeddings)$"
)
_TOKEN_TYPE_NAME = re.compile(r"^(token_type_embedding|token_type_embeddings|segment_embedding|segment_embeddings)$")


@dataclass(frozen=True)
class EmbeddingParameter:
    """One tensor to couple: its name in ``model.named_parameters()`` and why it was picked.

    ``roles`` holds the target kinds (or patterns) that resolved to it, e.g. ``("token", "output")`` for a tied
    LM head. ``aliases`` are the other names of the same tensor (tied weights, T5's ``encoder.embed_tokens``).
    """

    name: str
    parameter: nn.Parameter
    roles: tuple[str, ...]
    aliases: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.parameter.shape)

    @property
    def numel(self) -> int:
        return self.parameter.numel()

    def describe(self) -> str:
        tied = f" (also {', '.join(self.aliases)})" if self.aliases else ""
        return f"{self.name}{tied}: {'+'.join(self.roles)}, shape {list(self.shape)}, {self.numel:,} params"


def parse_targets(targets: str | Sequence[str] | None) -> tuple[str, ...]:
    """Normalise a target spec: ``"token,output"``, ``["token", "output"]``, ``"none"`` or ``None`` (nothing).

    Keywords are lower-cased; anything that is not a keyword is kept verbatim as a name pattern. ``"all"`` means
    every keyword.
    """
    if targets is None:
        return ()
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    parsed: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"coupled targets must be strings, got {item!r}")
        item = item.strip()
        keyword = item.lower()
        if keyword in _NO_TARGETS:
            continue
        if keyword == "all":
            parsed.extend(TARGET_KINDS)
        elif keyword in TARGET_KINDS:
            parsed.append(keyword)
        elif keyword.replace("-", "_") == "token_type":
            parsed.append("token_type")
        else:
            parsed.append(item)
    if any(item.strip().lower() == "none" for item in items) and parsed:
        raise ValueError(f"coupled targets: 'none' cannot be combined with other targets, got {targets!r}")
    return tuple(dict.fromkeys(parsed))  # drop repeats, keep order


def _is_pattern(target: str) -> bool:
    return target not in TARGET_KINDS


def _embedding_module(model: nn.Module, getter: str) -> nn.Module | None:
    get = getattr(model, getter, None)
    if get is None:
        return None
    try:
        module = get()
    except (NotImplementedError, AttributeError):
        return None
    return module if isinstance(getattr(module, "weight", None), Tensor) else None


def _module_names(model: nn.Module) -> dict[int, str]:
    """First name of every module (shared modules keep the name named_modules() reports first)."""
    return {id(module): name for name, module in model.named_modules()}


def _last_component(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _position_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Embedding)
        and _POSITION_NAME.match(_last_component(name))
        and "relative" not in name.lower()
    ]


def _token_type_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Embedding) and _TOKEN_TYPE_NAME.match(_last_component(name))
    ]


def _vocab_rows(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    text_config = getter() if getter is not None else config
    return getattr(text_config, "vocab_size", None)


def _resolve_keyword(model: nn.Module, kind: str, *, strict: bool = True) -> list[tuple[str, Tensor]]:
    """(module or parameter name, tensor) pairs for one target keyword. ``strict``: an output head whose rows are
    not the vocabulary is an error (for coupling); else it is left out (for measuring)."""
    names = _module_names(model)
    if kind in ("token", "output"):
        module = _embedding_module(model, "get_input_embeddings" if kind == "token" else "get_output_embeddings")
        if module is None:
            return []
        weight = module.weight
        vocab = _vocab_rows(model)
        if kind == "output" and weight.dim() >= 2 and vocab is not None and weight.shape[0] < vocab:
            if not strict:
                return []
            # Rows must be vocabulary items for the coupling to mean anything: a head of another layout would
            # be averaged over the wrong axis.
            raise ValueError(
                f"get_output_embeddings() of {type(model).__name__} returns a weight of shape {list(weight.shape)}, "
                f"whose rows are not the {vocab} vocabulary items. Leave 'output' out of the coupled targets, or "
                "name the right tensor with a pattern."
            )
        return [(names.get(id(module), kind), weight)]
    modules = _position_modules(model) if kind == "position" else _token_type_modules(model)
    return [(name, module.weight) for name, module in modules]


def _resolve_pattern(model: nn.Module, pattern: str) -> list[tuple[str, Tensor]]:
    found: list[tuple[str, Tensor]] = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if fnmatch.fnmatchcase(name, pattern):
            found.append((name, param))
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if name and isinstance(weight, Tensor) and fnmatch.fnmatchcase(name, pattern):
            found.append((name, weight))
    return found


class EmbeddingMatrix(NamedTuple):
    """One embedding matrix of a model: its kind (``token``, ``output``, ``position``, ``token_type``), module name,
    weight, and every kind it serves (``("token", "output")`` for an LM head tied to the input embedding)."""

    kind: str
    name: str
    weight: Tensor
    roles: tuple[str, ...]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel-style wrappers (``.module``), for finding its embeddings."""
    while not hasattr(model, "get_input_embeddings") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def model_embeddings(model: nn.Module, kinds: Sequence[str] = TARGET_KINDS) -> list[EmbeddingMatrix]:
    """The embedding matrices of ``model`` of the given kinds, in the order of ``kinds``, each tensor once.

    The one place that knows where a model keeps them: ``get_input_embeddings()`` (token),
    ``get_output_embeddings()`` (output; when it is the token matrix, that entry gets the role ``output`` too),
    learned absolute positions (GPT-2 ``wpe``, OPT ``embed_positions``, BERT ``position_embeddings``; rotary
    models have none) and token types (BERT segments). Matrices of fewer than 2 dims and output heads whose rows
    are not the vocabulary are left out. Used for coupling (:func:`find_coupled_parameters`), for measuring
    (callbacks, ``train.py``, the eval scripts) and for the vocabulary size (perplexity).
    """
    model = unwrap_model(model)
    found: list[EmbeddingMatrix] = []
    for kind in kinds:
        for name, weight in _resolve_keyword(model, kind, strict=False):
            if weight.dim() < 2:
                continue
            same = next((i for i, entry in enumerate(found) if entry.weight is weight), None)
            if same is not None:
                entry = found[same]
                if kind not in entry.roles:
                    found[same] = entry._replace(roles=(*entry.roles, kind))
                continue
            found.append(EmbeddingMatrix(kind, name, weight, (kind,)))
    return found


def describe_embedding_modules(model: nn.Module) -> str:
    """The embedding-like modules a model has, for error messages (``name (Type [rows, cols], role)``)."""
    lines = []
    input_module = _embedding_module(model, "get_input_embeddings")
    output_module = _embedding_module(model, "get_output_embeddings")
    for name, module in model.named_modules():
        roles = []
        if module is input_module:
            roles.append("get_input_embeddings()")
        if module is output_module:
            roles.append("get_output_embeddings()")
        if not roles and not isinstance(module, nn.Embedding):
            continue
        shape = list(module.weight.shape) if isinstance(getattr(module, "weight", None), Tensor) else "?"
        role = f", {' and '.join(roles)}" if roles else ""
        lines.append(f"{name or '<root>'} ({type(module).__name__} {shape}{role})")
    return "; ".join(lines) if lines else "none (the model has no nn.Embedding and no get_input_embeddings())"


def find_coupled_parameters(
    model: nn.Module, targets: str | Sequence[str] | None = DEFAULT_TARGETS
) -> list[EmbeddingParameter]:
    """The trainable tensors to couple, each once (tied tensors are matched by identity), in model order.

    Raises ``ValueError`` when targets were requested but none resolves to a trainable tensor of >= 2 dims, or
    when a name pattern matches nothing: the message lists the embedding modules the model does have. A keyword
    that finds nothing while others do (``position`` on a rotary model) is fine.
    """
    wanted = parse_targets(targets)
    if not wanted:
        return []
    roles: dict[int, list[str]] = {}
    tensors: dict[int, Tensor] = {}
    unmatched_patterns = []
    for target in wanted:
        matches = _resolve_pattern(model, target) if _is_pattern(target) else _resolve_keyword(model, target)
        if _is_pattern(target) and not matches:
            unmatched_patterns.append(target)
        for name, tensor in matches:
            if tensor.dim() < 2:
                raise ValueError(
                    f"coupled target {target!r} matched {name!r} of shape {list(tensor.shape)}; coupled tensors "
                    "need rows that are vocabulary items (>= 2 dims). Use a narrower pattern, e.g. "
                    f"'{name.rsplit('.', 1)[0]}.weight' or the module name."
                )
            tensors.setdefault(id(tensor), tensor)
            if target not in roles.setdefault(id(tensor), []):
                roles[id(tensor)].append(target)
    if unmatched_patterns:
        raise ValueError(
            f"coupled target pattern(s) {unmatched_patterns} match no module or parameter name of "
            f"{type(model).__name__}. Embedding modules in this model: {describe_embedding_modules(model)}. "
            f"Keywords: {', '.join(TARGET_KINDS)}; patterns are fnmatch globs such as '*.embed_positions'."
        )

    all_names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        all_names.setdefault(id(param), []).append(name)
    coupled = []
    for name, param in model.named_parameters():  # canonical names, model order, tied tensors once
        if id(param) in tensors and param.requires_grad:
            aliases = tuple(n for n in all_names[id(param)] if n != name)
            coupled.append(EmbeddingParameter(name, param, tuple(roles[id(param)]), aliases))
    if not coupled:
        raise ValueError(
            f"coupled targets {list(wanted)} resolve to no trainable parameter of {type(model).__name__}. "
            f"Embedding modules in this model: {describe_embedding_modules(model)}. Pick targets that exist "
            f"(keywords: {', '.join(TARGET_KINDS)}, or module-name patterns), or 'none' for plain AdamW."
        )
    return coupled


def trainer_decay_parameter_names(model: nn.Module) -> list[str]:
    """``Trainer``'s own weight-decay rule (everything but biases and norms), without building a ``Trainer``."""
    from transformers import Trainer

    # get_decay_parameter_names reads only the model; calling it unbound keeps the rule in one place.
    return Trainer.get_decay_parameter_names(None, model)  # type: ignore[arg-type]


def partition_parameters(
    model: nn.Module,
    targets: str | Sequence[str] | None = DEFAULT_TARGETS,
    *,
    weight_decay: float = 0.0,
    coupled_weight_decay: float = 0.0,
    decay_parameter_names: Iterable[str] | None = None,
    coupled: bool = True,
) -> list[dict[str, Any]]:
    """Optimizer param groups: ``[coupled embeddings, decayed, not decayed]``, each with ``param_names``.

    Args:
        model: any ``nn.Module``; a ``transformers`` model gets its embeddings found through its own API.
        targets: what to couple (see the module docstring); ``None``/``"none"``/``()`` couples nothing, and the
            result is exactly ``Trainer``'s two groups.
        weight_decay: decay of the decayed group (``TrainingArguments.weight_decay``).
        coupled_weight_decay: decay of the coupled group (the paper: 0).
        decay_parameter_names: names that get ``weight_decay``; default: ``Trainer``'s rule (no biases, no norms).
        coupled: the value of the ``coupled`` key of the embedding group. ``False`` gives the same groups for a
            plain AdamW baseline.

    Only trainable parameters are returned. The embedding group is left out when it is empty; the other two
    always exist (possibly empty), as in ``Trainer.create_optimizer``. Each group has the keys ``params``,
    ``param_names``, ``weight_decay`` and ``coupled``.
    """
    embeddings = find_coupled_parameters(model, targets)
    coupled_ids = {id(e.parameter) for e in embeddings}
    decay_names = set(trainer_decay_parameter_names(model) if decay_parameter_names is None else decay_parameter_names)

    def group(items: list[tuple[str, Tensor]], decay: float, is_coupled: bool) -> dict[str, Any]:
        return {
            "params": [p for _, p in items],
            "param_names": [n for n, _ in items],
            "weight_decay": decay,
            "coupled": is_coupled,
        }

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in coupled_ids]
    groups = []
    if embeddings:
        groups.append(group([(e.name, e.parameter) for e in embeddings], coupled_weight_decay, coupled))
    groups.append(group([(n, p) for n, p in trainable if n in decay_names], weight_decay, False))
    groups.append(group([(n, p) for n, p in trainable if n not in decay_names], 0.0, False))
    return groups
