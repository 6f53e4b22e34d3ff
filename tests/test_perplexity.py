"""Sliding-window, token-weighted perplexity."""

from __future__ import annotations

import gzip
import math
from importlib import resources

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from coupled_adam_hf.perplexity import evaluate_perplexity, sliding_windows, tokenize_text


def shakespeare(chars: int) -> str:
    path = resources.files("coupled_adam_hf") / "data" / "shakespeare" / "validation.txt.gz"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return handle.read(chars)


def byte_level_tokenizer(text: str, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


def tiny_gpt2(vocab_size: int = 400, positions: int = 64) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_positions=positions, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


class BigramModel(nn.Module):
    """Logits depend on the current token only, so the NLL of a token does not depend on the window."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, vocab_size)

    def forward(self, input_ids):
        return (self.table(input_ids),)


def bigram_nll(model: BigramModel, ids: torch.Tensor, targets: list[int]) -> float:
    log_probs = torch.log_softmax(model.table.weight.detach().double(), dim=-1)
    return sum(-float(log_probs[ids[t - 1], ids[t]]) for t in targets)


# ------------------------------------------------------------------------------------------------ windows
@settings(max_examples=200, deadline=None)
@given(num_tokens=st.integers(2, 300), context=st.integers(2, 64), data=st.data())
def test_windows_score_every_token_once_with_enough_context(num_tokens, context, data):
    stride = data.draw(st.integers(1, context))
    windows = sliding_windows(num_tokens, context, stride)
    targets = [t for w in windows for t in range(w.first_target, w.end)]
    assert len(targets) == len(set(targets))
    if stride < context:
        assert sorted(targets) == list(range(1, num_tokens))
    else:  # disjoint blocks: the first token of each block has no context
        assert sorted(targets) == [t for t in range(1, num_tokens) if t % context != 0]
    for w in windows:
        assert w.length <= context and w.begin < w.first_target
        if w.begin > 0:
            assert w.first_target - w.begin >= context - stride


def test_bad_window_settings_are_refused():
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(100, 10, 11)
    with pytest.raises(ValueError, match="context_length"):
        sliding_windows(100, 1, 1)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        sliding_windows(1, 10, 5)


# ------------------------------------------------------------------------------------------- bookkeeping
@pytest.mark.parametrize("stride", [1, 5, 16])
def test_every_token_is_scored_once_whatever_the_stride(stride):
    torch.manual_seed(1)
    model = BigramModel(50)
    ids = torch.randint(0, 50, (203,))
    result = evaluate_perplexity(model, ids, context_length=16, stride=stride, batch_size=3, show_progress=False)
    targets = [t for w in sliding_windows(203, 16, stride) for t in range(w.first_target, w.end)]
    assert result["tokens_scored"] == len(targets) == (202 if stride < 16 else 202 - 203 // 16)
    assert result["nll_sum"] == pytest.approx(bigram_nll(model, ids, targets), rel=1e-6)  # float32 logits
    assert result["perplexity"] == pytest.approx(math.exp(result["nll_sum"] / result["tokens_scored"]))


def test_stride_equal_to_context_is_the_models_own_loss_per_block():
    model = tiny_gpt2()
    ids = torch.randint(0, 400, (3 * 64,), generator=torch.Generator().manual_seed(2))
    result = evaluate_perplexity(model, ids, context_length=64, batch_size=2, show_progress=False)
    with torch.no_grad():
        block_losses = [float(model(ids[k:k + 64][None], labels=ids[k:k + 64][None]).loss) for k in (0, 64, 128)]
    assert result["tokens_scored"] == 3 * 63
    assert result["nll_sum"] == pytest.approx(63 * sum(block_losses), rel=1e-5)
    one_window = evaluate_perplexity(model, ids[:50], context_length=64, show_progress=False)
    with torch.no_grad():
        assert one_window["nll"] == pytest.approx(float(model(ids[:50][None], labels=ids[:50][None]).loss),
                                                  rel=1e-5)


class WithoutLogitsToKeep(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, input_ids):
        return self.model(input_ids=input_ids)


def test_batching_and_logits_to_keep_do_not_change_the_result():
    model = tiny_gpt2()
    ids = torch.randint(0, 400, (300,), generator=torch.Generator().manual_seed(3))
    reference = evaluate_perplexity(WithoutLogitsToKeep(model), ids, context_length=64, stride=24, batch_size=1,
                                    show_progress=False)
    batched = evaluate_perplexity(model, ids, context_length=64, stride=24, batch_size=4, show_progress=False)
    assert batched["tokens_scored"] == reference["tokens_scored"] == 299
    assert batched["nll_sum"] == pytest.approx(reference["nll_sum"], rel=1e-5)
    assert batched["windows"] == reference["windows"]


def test_low_precision_model_is_scored_in_float32_logits():
    model = tiny_gpt2().to(torch.bfloat16)
    ids = torch.randint(0, 400, (100,), generator=torch.Generator().manual_seed(4))
    result = evaluate_perplexity(model, ids, context_length=64, stride=32, show_progress=False)
    assert result["dtype"] == "bfloat16" and result["logits_dtype"] == "float32"
    assert math.isfinite(result["nll"])


# ---------------------------------------------------------------------------------------- text and bytes
def test_token_bytes_add_up_to_the_text_bytes():
    text = shakespeare(20_000) + "\n\nCafé — naïve façade 🎭 end."
    tokenizer = byte_level_tokenizer(text)
    ids, token_bytes = tokenize_text(tokenizer, text)
    assert ids.shape == token_bytes.shape
    assert int(token_bytes.sum()) == len(text.encode("utf-8"))


def test_bits_per_byte_use_the_bytes_of_the_scored_tokens():
    text = shakespeare(20_000)
    tokenizer = byte_level_tokenizer(text)
    model = tiny_gpt2(vocab_size=len(tokenizer))
    ids, token_bytes = tokenize_text(tokenizer, text[:3000])
    result = evaluate_perplexity(model, tokenizer, text[:3000], context_length=64, stride=32, show_progress=False)
    assert result["tokens_total"] == ids.numel() and result["tokens_scored"] == ids.numel() - 1
    assert result["bytes_scored"] == len(text[:3000].encode()) - int(token_bytes[0])
    assert result["bits_per_byte"] == pytest.approx(result["nll_sum"] / (result["bytes_scored"] * math.log(2)))
    documents = evaluate_perplexity(model, tokenizer, [text[:1000], text[1000:3000]], context_length=64,
                                    show_progress=False)
    joined = evaluate_perplexity(model, tokenizer, text[:1000] + "\n\n" + text[1000:3000], context_length=64,
                                 show_progress=False)
    assert documents == joined


def test_bad_inputs_get_a_reason():
    model = tiny_gpt2(vocab_size=100)
    ids = torch.randint(0, 100, (80,))
    with pytest.raises(ValueError, match="exceeds the model's maximum"):
        evaluate_perplexity(model, ids, context_length=128, show_progress=False)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        evaluate_perplexity(model, torch.full((10,), 150), context_length=8, show_progress=False)
    with pytest.raises(ValueError, match="texts are required"):
        evaluate_perplexity(model, byte_level_tokenizer("some text to train on"), show_progress=False)
    with pytest.raises(ValueError, match="empty"):
        evaluate_perplexity(model, byte_level_tokenizer("some text to train on"), "", show_progress=False)


# ------------------------------------------------------------------------------------ the evaluate module
def test_local_evaluate_module_aggregates_token_weighted():
    evaluate = pytest.importorskip("evaluate")
    from pathlib import Path

    module = Path(__file__).resolve().parents[1] / "metrics" / "corpus_perplexity"
    corpus_perplexity = evaluate.load(str(module), experiment_id="test_perplexity")
    # two documents: token-weighted, not the mean of their perplexities (exp(1) and exp(3))
    result = corpus_perplexity.compute(nll_sum=[10.0, 90.0], num_tokens=[10, 30], num_bytes=[40, 100])
    assert result["perplexity"] == pytest.approx(math.exp(100 / 40))
    assert result["bits_per_byte"] == pytest.approx(100 / (140 * math.log(2)))
    corpus_perplexity.add_batch(nll_sum=[10.0], num_tokens=[10])
    corpus_perplexity.add_batch(nll_sum=[90.0], num_tokens=[30])
    result = corpus_perplexity.compute()
    assert result["nll"] == pytest.approx(2.5) and result["bits_per_byte"] is None

    text = shakespeare(5000)
    tokenizer = byte_level_tokenizer(text)
    model = tiny_gpt2(vocab_size=len(tokenizer))
    direct = evaluate_perplexity(model, tokenizer, text, context_length=64, show_progress=False)
    wrapped = corpus_perplexity.compute(nll_sum=[direct["nll_sum"]], num_tokens=[direct["tokens_scored"]],
                                        num_bytes=[direct["bytes_scored"]])
    assert wrapped["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-12)
    assert wrapped["bits_per_byte"] == pytest.approx(direct["bits_per_byte"], rel=1e-12)
