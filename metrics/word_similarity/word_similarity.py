"""Word similarity of input embeddings (SimLex-999, MEN, WordSim-353, Rare Words): a local `evaluate` module.

    import evaluate
    word_similarity = evaluate.load("metrics/word_similarity")
    word_similarity.compute(embeddings=model.get_input_embeddings().weight.tolist(), tokenizer=tokenizer)

Wraps ``coupled_adam_hf.word_similarity``: row ``i`` of ``embeddings`` is token id ``i`` of ``tokenizer`` (a
tokenizer object, or a name or folder ``AutoTokenizer`` loads). A pair of a benchmark counts when both words are
single tokens (looked up with a leading space when the tokenizer folds it into the word's token, as byte-level BPE
does). Rows may arrive in several ``add_batch`` calls; their order is kept. For a large matrix, calling
``coupled_adam_hf.word_similarity(weight, tokenizer)`` directly skips the Arrow round trip.
"""

import datasets
import evaluate
import torch

from coupled_adam_hf.wordsim import word_similarity

_DESCRIPTION = __doc__

_KWARGS_DESCRIPTION = """
Args:
    embeddings (`list[list[float]]`): the rows of the input-embedding matrix ``[V, H]``.
    tokenizer: the tokenizer whose ids index the rows (object, Hub name or local folder).
    benchmarks (`list[str]`, optional): among simlex999, men, ws353_sim, ws353_rel, rw (default: all five).
    abtt_components (`int`, optional): D of all-but-the-top (default ceil(H / 100)).
Returns:
    A flat dict: for each benchmark and for ``mean``, ``{name}/pairs``, ``{name}/covered``, ``{name}/coverage``,
    ``{name}/pearson`` and ``{name}/spearman`` (x 100, raw cosine: the paper's number) and
    ``{name}/{cosine|dot}/{raw|centered|abtt}/{pearson|spearman}`` (None where undefined); ``mean/benchmarks``
    (the benchmarks averaged), ``leading_space`` and ``abtt_components``.
Examples:
    >>> word_similarity = evaluate.load("metrics/word_similarity")
    >>> result = word_similarity.compute(embeddings=weight.tolist(), tokenizer=tokenizer, benchmarks=["simlex999"])
    >>> result["simlex999/covered"], result["simlex999/pearson"]
"""

_CITATION = """\
@inproceedings{stollenwerk2025coupled,
  title = {Better Embeddings with Coupled Adam},
  author = {Stollenwerk, Nils and Stollenwerk, Felix},
  booktitle = {Proceedings of ACL},
  year = {2025}
}
@inproceedings{bis2021toomuch,
  title = {Too Much in Common: Shifting of Embeddings in Transformer Language Models and its Implications},
  author = {Bi{\\'s}, Daniel and Podkorytov, Maksim and Liu, Xiuwen},
  booktitle = {Proceedings of NAACL},
  year = {2021}
}
@article{hill2015simlex,
  title = {SimLex-999: Evaluating Semantic Models with (Genuine) Similarity Estimation},
  author = {Hill, Felix and Reichart, Roi and Korhonen, Anna},
  journal = {Computational Linguistics},
  volume = {41}, number = {4}, pages = {665--695},
  year = {2015}
}
@article{bruni2014men,
  title = {Multimodal Distributional Semantics},
  author = {Bruni, Elia and Tran, Nam Khanh and Baroni, Marco},
  journal = {Journal of Artificial Intelligence Research},
  volume = {49}, pages = {1--47},
  year = {2014}
}
@article{finkelstein2002wordsim,
  title = {Placing Search in Context: The Concept Revisited},
  author = {Finkelstein, Lev and Gabrilovich, Evgeniy and Matias, Yossi and Rivlin, Ehud and Solan, Zach and
            Wolfman, Gadi and Ruppin, Eytan},
  journal = {ACM Transactions on Information Systems},
  volume = {20}, number = {1}, pages = {116--131},
  year = {2002}
}
@inproceedings{agirre2009wordsimsplit,
  title = {A Study on Similarity and Relatedness Using Distributional and WordNet-based Approaches},
  author = {Agirre, Eneko and Alfonseca, Enrique and Hall, Keith and Kravalova, Jana and Pa{\\c{s}}ca, Marius and
            Soroa, Aitor},
  booktitle = {Proceedings of NAACL-HLT},
  year = {2009}
}
@inproceedings{luong2013rw,
  title = {Better Word Representations with Recursive Neural Networks for Morphology},
  author = {Luong, Minh-Thang and Socher, Richard and Manning, Christopher D.},
  booktitle = {Proceedings of CoNLL},
  year = {2013}
}
@inproceedings{mu2018allbutthetop,
  title = {All-but-the-Top: Simple and Effective Postprocessing for Word Representations},
  author = {Mu, Jiaqi and Viswanath, Pramod},
  booktitle = {ICLR},
  year = {2018}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class WordSimilarity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"embeddings": datasets.Sequence(datasets.Value("float64"))}),
        )

    def _compute(self, embeddings, tokenizer=None, benchmarks=None, abtt_components=None):
        if tokenizer is None:
            raise ValueError("word_similarity needs the tokenizer whose ids index the embedding rows: "
                             "compute(embeddings=..., tokenizer=...)")
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        result = word_similarity(torch.as_tensor(embeddings, dtype=torch.float64), tokenizer, benchmarks,
                                 abtt_components=abtt_components)
        flat = {f"{name}/{key}": value for name, entry in result["benchmarks"].items() for key, value in entry.items()}
        flat.update({f"mean/{key}": value for key, value in result["mean"].items()})
        flat.update(leading_space=result["leading_space"], abtt_components=result["abtt_components"])
        return flat
