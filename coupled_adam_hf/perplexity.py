"""Token-weighted perplexity of a causal language model over one long text, with a sliding window.

The text (documents joined by ``"\\n\\n"``) is tokenized once. Windows of ``context_length`` tokens start every
``stride`` tokens; in each window only the tokens no earlier window has scored are scored, so every token is
scored at most once and with at least ``context_length - stride`` tokens of context (except in the first window):

- ``stride == context_length`` (the default): disjoint blocks, the first token of each block has no context and is
  not scored -- exactly what ``Trainer``'s eval loss computes on ``group_texts`` blocks, and each window's NLL is
  the model's own loss on that block;
- ``stride < context_length``: overlapping windows; every token but the very first is scored exactly once.

``perplexity = exp(sum NLL / tokens scored)`` (token-weighted over the whole text, not a mean of per-document
perplexities as the Hub ``perplexity`` metric computes). Logits are cast to float32 before the log-softmax. Bits per
byte use the UTF-8 bytes of the scored tokens (from the tokenizer's offsets), so models with different tokenizers
can be compared: ``bits_per_byte = sum NLL / (bytes scored * ln 2)``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .partition import model_embeddings

__all__ = ["Window", "config_context_length", "evaluate_perplexity", "model_context_length", "sliding_windows",
           "tokenize_text"]

DEFAULT_TEXT_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` go into the model; targets ``[first_target, end)`` are scored."""

    begin: int
    end: int
    first_target: int

    @property
    def length(self) -> int:
        return self.end - self.begin

    @property
    def num_targets(self) -> int:
        return self.end - self.first_target


def sliding_windows(num_tokens: int, context_length: int, stride: int) -> list[Window]:
    """The windows over ``num_tokens`` tokens (see the module docstring); their targets never overlap."""
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 (one token of context, one to predict), got {context_length}")
    if not 1 <= stride <= context_length:
        raise ValueError(f"stride must be in [1, context_length={context_length}], got {stride}")
    if num_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {num_tokens}")
    windows = []
    scored_until = 1  # token 0 never has context
    for begin in range(0, num_tokens, stride):
        end = min(begin + context_length, num_tokens)
        first_target = max(scored_until, begin + 1)
        if first_target < end:
            windows.append(Window(begin, end, first_target))
        scored_until = end
        if end == num_tokens:
            break
    return windows


def model_context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows (``n_positions``, ``max_position_embeddings``, ...)."""
    config = getattr(model, "config", None)
    return None if config is None else config_context_length(config)


def config_context_length(config: Any) -> int | None:
    """The longest sequence a ``PretrainedConfig`` allows, from the keys architectures use for it."""
    get_text_config = getattr(config, "get_text_config", None)
    config = get_text_config() if get_text_config is not None else config
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _utf8_byte_prefix(text: str) -> np.ndarray:
    """``prefix[c]`` = number of UTF-8 bytes in ``text[:c]``, for every character position ``c``."""
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    lengths = 1 + (codepoints >= 0x80) + (codepoints >= 0x800) + (codepoints >= 0x10000)
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


def tokenize_text(tokenizer: Any, texts: str | Sequence[str], *, separator: str = DEFAULT_TEXT_SEPARATOR
                  ) -> tuple[Tensor, Tensor | None]:
    """Token ids of the joined text and the UTF-8 bytes each token covers (None without offsets).

    Bytes between tokens (whitespace a tokenizer trims from its offsets) count towards the next token, so the
    bytes of all tokens sum to the bytes of the text up to the end of the last token.
    """
    text = texts if isinstance(texts, str) else separator.join(texts)
    if not text:
        raise ValueError("the evaluation text is empty")
    with_offsets = bool(getattr(tokenizer, "is_fast", False))
    encoding = tokenizer(text, add_special_tokens=True, return_offsets_mapping=with_offsets, verbose=False)
    ids = torch.as_tensor(encoding["input_ids"], dtype=torch.long)
    if not with_offsets:
        return ids, None
    offsets = np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    byte_ends = _utf8_byte_prefix(text)[offsets[:, 1]]
    covered = np.maximum.accumulate(byte_ends)
    token_bytes = np.diff(covered, prepend=0)
    return ids, torch.from_numpy(token_bytes)


def _is_token_sequence(value: Any) -> bool:
    if isinstance(value, (Tensor, np.ndarray)):
        return True
    return isinstance(value, Sequence) and not isinstance(value, str) and all(isinstance(v, int) for v in value[:8])


def _input_vocab_size(model: nn.Module) -> int | None:
    token = model_embeddings(model, ("token",))
    return int(token[0].weight.shape[0]) if token else None


def _forward_keywords(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _logits(output: Any) -> Tensor:
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise TypeError("the model must return logits of shape [batch, sequence, vocab] (an output with .logits)")
    return logits


def evaluate_perplexity(
    model: nn.Module,
    tokenizer_or_input_ids: Any,
    texts: str | Sequence[str] | None = None,
    *,
    context_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    token_bytes: Sequence[int] | Tensor | None = None,
    separator: str = DEFAULT_TEXT_SEPARATOR,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Sliding-window, token-weighted perplexity of ``model`` on a text (or on given token ids).

    Args:
        model: a causal LM returning logits (any ``AutoModelForCausalLM``); evaluated on its own device and dtype.
        tokenizer_or_input_ids: a tokenizer (then ``texts`` is required) or a 1-D sequence of token ids.
        texts: a string or documents (joined with ``separator``), tokenized in one piece.
        context_length: tokens per window; default the model's maximum (``n_positions``/``max_position_embeddings``).
        stride: tokens between window starts, ``1 <= stride <= context_length``; default ``context_length``.
        batch_size: windows per forward pass.
        token_bytes: with token ids, the UTF-8 bytes of each token (for bits per byte); computed from the
            tokenizer's offsets otherwise.
        show_progress: a tqdm bar over windows.

    Returns:
        ``nll`` (mean nats per scored token), ``nll_sum``, ``perplexity``, ``bits_per_token``, ``bits_per_byte``
        (None without byte counts), ``tokens_scored``, ``bytes_scored``, ``tokens_total``, ``windows``,
        ``context_length``, ``stride``, ``batch_size``, ``dtype`` (of the model's weights), ``logits_dtype``.

    Example::

        >>> result = evaluate_perplexity(model, tokenizer, open("valid.txt").read(), context_length=1024, stride=512)
        >>> result["perplexity"], result["bits_per_byte"]
    """
    if _is_token_sequence(tokenizer_or_input_ids):
        if texts is not None:
            raise ValueError("pass either token ids, or a tokenizer and texts, not token ids and texts")
        input_ids = torch.as_tensor(tokenizer_or_input_ids, dtype=torch.long).flatten()
        byte_counts = None if token_bytes is None else torch.as_tensor(token_bytes, dtype=torch.long).flatten()
    else:
        if texts is None:
            raise ValueError("evaluate_perplexity(model, tokenizer, texts): texts are required with a tokenizer")
        if token_bytes is not None:
            raise ValueError("token_bytes is only for token ids; with a tokenizer they come from its offsets")
        input_ids, byte_counts = tokenize_text(tokenizer_or_input_ids, texts, separator=separator)
    if byte_counts is not None and byte_counts.shape != input_ids.shape:
        raise ValueError(f"token_bytes has {byte_counts.numel()} entries for {input_ids.numel()} tokens")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    max_length = model_context_length(model)
    if context_length is None:
        if max_length is None:
            raise ValueError("the model's config names no maximum sequence length: pass context_length")
        context_length = max_length
    if max_length is not None and context_length > max_length:
        raise ValueError(f"context_length {context_length} exceeds the model's maximum of {max_length} positions")
    stride = context_length if stride is None else stride
    windows = sliding_windows(input_ids.numel(), context_length, stride)
    rows = _input_vocab_size(model)
    if rows is not None and int(input_ids.max()) >= rows:
        raise ValueError(f"token id {int(input_ids.max())} is outside the model's vocabulary of {rows}: was the "
                         "text tokenized with this model's tokenizer?")

    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    keywords = _forward_keywords(model)
    extra: dict[str, Any] = {"use_cache": False} if "use_cache" in keywords else {}
    vocab_size: int | None = None

    nll_sum = 0.0
    tokens_scored = 0
    was_training = model.training
    model.eval()
    progress = tqdm(total=len(windows), desc="perplexity", unit="window", disable=not show_progress)
    try:
        with torch.inference_mode():
            for batch in _batches_of_equal_length(windows, batch_size):
                length = batch[0].length
                ids = torch.stack([input_ids[w.begin:w.end] for w in batch]).to(device)
                # First logit position any window in the batch needs (logit at p predicts token p + 1).
                first_position = min(w.first_target - w.begin - 1 for w in batch)
                kwargs = dict(extra)
                if "logits_to_keep" in keywords and first_position > 0:
                    kwargs["logits_to_keep"] = length - first_position
                logits = _logits(model(input_ids=ids, **kwargs))
                kept = logits.shape[1]
                if kept < length - first_position:
                    raise ValueError(f"the model returned logits for {kept} of {length} positions")
                vocab_size = logits.shape[-1]
                positions = torch.arange(length - kept, length - 1, device=device)
                for row, window in enumerate(batch):
                    scored = positions + 1 >= window.first_target - window.begin
                    row_logits = logits[row, :-1][scored].float()
                    targets = ids[row, positions[scored] + 1]
                    if int(targets.max()) >= vocab_size:
                        raise ValueError(f"token id {int(targets.max())} is outside the model's vocabulary of "
                                         f"{vocab_size}: was the text tokenized with this model's tokenizer?")
                    nll_sum += float(F.cross_entropy(row_logits, targets, reduction="sum").double())
                    tokens_scored += int(scored.sum())
                progress.update(len(batch))
    finally:
        progress.close()
        model.train(was_training)

    expected = sum(w.num_targets for w in windows)
    if tokens_scored != expected:  # bookkeeping guard: each target exactly once
        raise RuntimeError(f"scored {tokens_scored} tokens, expected {expected}")
    bytes_scored = None
    if byte_counts is not None:
        bytes_scored = int(sum(int(byte_counts[w.first_target:w.end].sum()) for w in windows))
    mean_nll = nll_sum / tokens_scored
    return {
        "nll": mean_nll,
        "nll_sum": nll_sum,
        "perplexity": math.exp(mean_nll) if mean_nll < 700 else float("inf"),
        "bits_per_token": mean_nll / math.log(2),
        "bits_per_byte": nll_sum / (bytes_scored * math.log(2)) if bytes_scored else None,
        "tokens_scored": tokens_scored,
        "bytes_scored": bytes_scored,
        "tokens_total": int(input_ids.numel()),
        "windows": len(windows),
        "context_length": context_length,
        "stride": stride,
        "batch_size": batch_size,
        "dtype": str(parameter.dtype).removeprefix("torch.") if parameter is not None else None,
        "logits_dtype": "float32",
    }


def _batches_of_equal_length(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows of the same length, at most ``batch_size`` at a time (no padding needed)."""
    batches: list[list[Window]] = []
    for window in windows:
        if batches and len(batches[-1]) < batch_size and batches[-1][0].length == window.length:
            batches[-1].append(window)
        else:
            batches.append([window])
    return batches
