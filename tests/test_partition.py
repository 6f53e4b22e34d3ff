"""partition_parameters / find_coupled_parameters: which tensors are coupled, on tiny models of six families."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from coupled_adam_hf import CoupledAdam
from coupled_adam_hf.partition import (
    DEFAULT_TARGETS,
    find_coupled_parameters,
    parse_targets,
    partition_parameters,
    trainer_decay_parameter_names,
)

transformers.logging.set_verbosity_error()
VOCAB, HIDDEN = 96, 16


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=HIDDEN, n_head=2, vocab_size=VOCAB, n_positions=24, bos_token_id=0, eos_token_id=0))


def llama(tied: bool):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=1, hidden_size=HIDDEN, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=VOCAB, tie_word_embeddings=tied))


def bert():
    return transformers.BertForMaskedLM(transformers.BertConfig(
        num_hidden_layers=1, hidden_size=HIDDEN, intermediate_size=32, num_attention_heads=2, vocab_size=VOCAB,
        max_position_embeddings=24))


def opt():
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        num_hidden_layers=1, hidden_size=HIDDEN, ffn_dim=32, num_attention_heads=2, vocab_size=VOCAB,
        word_embed_proj_dim=HIDDEN, max_position_embeddings=24, bos_token_id=0, eos_token_id=0, pad_token_id=1))


def gpt_neox():
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        num_hidden_layers=1, hidden_size=HIDDEN, intermediate_size=32, num_attention_heads=2, vocab_size=VOCAB))


def t5():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        num_layers=1, num_decoder_layers=1, d_model=HIDDEN, d_ff=32, num_heads=2, d_kv=8, vocab_size=VOCAB))


# model -> {coupled name: roles} for the default targets (token, output, position)
EXPECTED = {
    "gpt2": (gpt2, {"transformer.wte.weight": ("token", "output"), "transformer.wpe.weight": ("position",)}),
    "llama-tied": (lambda: llama(True), {"model.embed_tokens.weight": ("token", "output")}),
    "llama-untied": (lambda: llama(False), {"model.embed_tokens.weight": ("token",), "lm_head.weight": ("output",)}),
    "bert": (bert, {"bert.embeddings.word_embeddings.weight": ("token", "output"),
                    "bert.embeddings.position_embeddings.weight": ("position",)}),
    "opt": (opt, {"model.decoder.embed_tokens.weight": ("token", "output"),
                  "model.decoder.embed_positions.weight": ("position",)}),
    "gpt-neox": (gpt_neox, {"gpt_neox.embed_in.weight": ("token",), "lm_head.weight": ("output",)}),
    "t5": (t5, {"shared.weight": ("token", "output")}),
}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_default_targets_couple_token_output_and_learned_positions(arch):
    make, expected = EXPECTED[arch]
    coupled = find_coupled_parameters(make(), DEFAULT_TARGETS)
    assert {e.name: e.roles for e in coupled} == expected


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_every_trainable_parameter_lands_in_exactly_one_group(arch):
    model = EXPECTED[arch][0]()
    groups = partition_parameters(model, "all", weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    for g in groups:
        assert len(g["param_names"]) == len(g["params"])
        assert all(dict(model.named_parameters())[n] is p for n, p in zip(g["param_names"], g["params"]))


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_groups_are_coupled_then_decayed_matrices_then_biases_and_norms(arch):
    model = EXPECTED[arch][0]()
    coupled, decayed, not_decayed = partition_parameters(model, weight_decay=0.1, coupled_weight_decay=0.01)
    assert (coupled["coupled"], coupled["weight_decay"]) == (True, 0.01)
    assert (decayed["coupled"], decayed["weight_decay"]) == (False, 0.1)
    assert (not_decayed["coupled"], not_decayed["weight_decay"]) == (False, 0.0)
    decay_names = set(trainer_decay_parameter_names(model))
    assert set(decayed["param_names"]) <= decay_names
    assert not set(not_decayed["param_names"]) & decay_names
    modules = dict(model.named_modules())
    owner = {n: type(modules[n.rpartition(".")[0]]).__name__ for n in not_decayed["param_names"]}
    assert all("bias" in n or "Norm" in cls for n, cls in owner.items()), owner  # Trainer's rule


def test_tied_lm_head_is_coupled_once_under_its_first_name():
    model = gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    (token,) = [e for e in find_coupled_parameters(model, "token,output")]
    assert token.parameter is model.transformer.wte.weight
    assert token.aliases == ("lm_head.weight",)
    coupled_group = partition_parameters(model, "token,output")[0]
    assert len(coupled_group["params"]) == 1


def test_t5_shared_embedding_is_coupled_once_and_relative_attention_bias_never():
    model = t5()
    coupled = find_coupled_parameters(model, "all")
    assert [e.name for e in coupled] == ["shared.weight"]
    assert {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"} <= set(coupled[0].aliases)
    assert not any("relative_attention_bias" in n for e in coupled for n in (e.name, *e.aliases))


def test_bert_token_type_embeddings_only_when_asked():
    model = bert()
    assert "bert.embeddings.token_type_embeddings.weight" not in {e.name for e in find_coupled_parameters(model)}
    (token_type,) = find_coupled_parameters(model, "token_type")
    assert token_type.name == "bert.embeddings.token_type_embeddings.weight"


def test_encoder_model_without_lm_head_couples_its_input_embedding():
    model = transformers.BertModel(bert().config)
    assert {e.name for e in find_coupled_parameters(model)} == {
        "embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"}


def test_position_target_on_rotary_model_raises_naming_the_embeddings_that_exist():
    with pytest.raises(ValueError, match=r"gpt_neox\.embed_in.*lm_head"):
        find_coupled_parameters(gpt_neox(), "position")


def test_unmatched_name_pattern_is_an_error_even_when_keywords_match():
    with pytest.raises(ValueError, match=r"\*\.embed_positionz.*transformer\.wte"):
        find_coupled_parameters(gpt2(), "token,*.embed_positionz")


def test_module_name_pattern_couples_that_modules_weight():
    (wpe,) = find_coupled_parameters(gpt2(), "*.wpe")
    assert wpe.name == "transformer.wpe.weight" and wpe.roles == ("*.wpe",)


def test_pattern_matching_a_vector_is_refused():
    with pytest.raises(ValueError, match=">= 2 dims"):
        find_coupled_parameters(gpt2(), "transformer.ln_f.*")


def test_frozen_embedding_is_not_coupled():
    model = gpt2()
    model.transformer.wpe.weight.requires_grad_(False)
    assert [e.name for e in find_coupled_parameters(model)] == ["transformer.wte.weight"]
    names = [n for g in partition_parameters(model) for n in g["param_names"]]
    assert "transformer.wpe.weight" not in names


def test_no_targets_gives_exactly_trainers_two_groups():
    model = gpt2()
    decay_names = set(trainer_decay_parameter_names(model))
    groups = partition_parameters(model, "none", weight_decay=0.1)
    assert [(g["weight_decay"], g["coupled"]) for g in groups] == [(0.1, False), (0.0, False)]
    assert groups[0]["param_names"] == [n for n, _ in model.named_parameters() if n in decay_names]
    assert groups[1]["param_names"] == [n for n, _ in model.named_parameters() if n not in decay_names]


def test_plain_pytorch_module_with_name_patterns_trains_with_coupled_adam():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(VOCAB, HIDDEN), nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, VOCAB))
    groups = partition_parameters(model, "0,2", weight_decay=0.1)
    assert groups[0]["param_names"] == ["0.weight", "2.weight"]
    opt = CoupledAdam(groups, lr=1e-2)
    ids = torch.randint(0, VOCAB, (8, 5))
    nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    opt.step()
    assert opt.state[model[0].weight]["exp_avg_sq"].shape == (1, HIDDEN)  # coupled: one value per column


def test_plain_module_without_embedding_api_gets_a_clear_error():
    with pytest.raises(ValueError, match="no nn.Embedding"):
        find_coupled_parameters(nn.Linear(4, 4))


@pytest.mark.parametrize(
    "spec, parsed",
    [
        ("token,output,position", ("token", "output", "position")),
        (" Token , OUTPUT ", ("token", "output")),
        (["token", "token-type"], ("token", "token_type")),
        ("all", ("token", "output", "position", "token_type")),
        ("none", ()),
        (None, ()),
        ("token,*.Embed", ("token", "*.Embed")),
    ],
)
def test_parse_targets(spec, parsed):
    assert parse_targets(spec) == parsed


def test_none_combined_with_targets_is_refused():
    with pytest.raises(ValueError, match="'none' cannot be combined"):
        parse_targets("none,token")
