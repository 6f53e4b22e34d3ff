"""EmbeddingIsotropyCallback: values reach Trainer's log stream (log_history, report_to integrations) on schedule."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import CallbackHandler, TrainerControl, TrainerState

from coupled_adam_hf.callbacks import EmbeddingIsotropyCallback
from coupled_adam_hf.metrics import quick_isotropy
from coupled_adam_hf.plotting import load_log_history, plot_training_curves

KEYS = ("embeddings/iso", "embeddings/mean_norm_ratio", "embeddings/avg_cosine")


def tiny_gpt2(tied: bool = True) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                      tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0))


def random_blocks(count: int = 64, length: int = 16) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 128, (count, length), generator=generator)
    return [{"input_ids": row, "labels": row} for row in blocks]


class RecordLogs(TrainerCallback):
    """What an integration sees: every dict passed to on_log."""

    def __init__(self):
        self.seen: list[tuple[int, dict]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append((state.global_step, dict(logs)))


def train(tmp_path, model, callbacks, *, max_steps=7, logging_steps=3, report_to="none") -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=logging_steps, save_strategy="no", report_to=report_to, use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=random_blocks(), callbacks=callbacks)
    for callback in callbacks:
        if isinstance(callback, EmbeddingIsotropyCallback):
            callback.bind(trainer)  # a plain Trainer does not hand itself to its callbacks
    trainer.train()
    return trainer


def entries_with(log_history: list[dict], key: str) -> list[dict]:
    return [entry for entry in log_history if key in entry]


@pytest.mark.slow
def test_values_reach_log_history_and_integrations_at_the_right_steps(tmp_path):
    recorder = RecordLogs()
    trainer = train(tmp_path, tiny_gpt2(), [recorder, EmbeddingIsotropyCallback(every_n_steps=3)])
    history = trainer.state.log_history
    for key in KEYS:
        # before the first step, every 3 steps, and after the last step (7)
        assert [e["step"] for e in entries_with(history, key)] == [0, 3, 6, 7]
    assert not entries_with(history, "output_embeddings/iso")  # tied head: measured once
    # Trainer's own loss logging at the same steps is untouched
    assert [e["step"] for e in entries_with(history, "loss")] == [3, 6]
    # the integrations' view (on_log) holds the same values
    seen = [(step, logs["embeddings/iso"]) for step, logs in recorder.seen if "embeddings/iso" in logs]
    assert seen == [(e["step"], e["embeddings/iso"]) for e in entries_with(history, "embeddings/iso")]
    # the last entry is the model's final embedding
    final = quick_isotropy(trainer.model.get_input_embeddings().weight)
    assert entries_with(history, "embeddings/iso")[-1]["embeddings/iso"] == pytest.approx(final["iso"])


@pytest.mark.slow
def test_untied_output_embedding_is_measured_separately(tmp_path):
    trainer = train(tmp_path, tiny_gpt2(tied=False), [EmbeddingIsotropyCallback(every_n_steps=5)], max_steps=5)
    history = trainer.state.log_history
    assert [e["step"] for e in entries_with(history, "output_embeddings/iso")] == [0, 5]
    last = entries_with(history, "output_embeddings/mean_norm_ratio")[-1]
    expected = quick_isotropy(trainer.model.get_output_embeddings().weight)["mean_norm_ratio"]
    assert last["output_embeddings/mean_norm_ratio"] == pytest.approx(expected)


def test_training_curves_are_plotted_from_trainer_state(tmp_path):
    trainer = train(tmp_path / "run", tiny_gpt2(), [EmbeddingIsotropyCallback(every_n_steps=2)], max_steps=4,
                    logging_steps=2)
    trainer.save_state()  # writes run/trainer_state.json, as Trainer does at every checkpoint
    assert load_log_history(tmp_path / "run") == trainer.state.log_history
    other = [dict(entry, **{"embeddings/iso": 0.5}) if "embeddings/iso" in entry else entry
             for entry in trainer.state.log_history]
    path = plot_training_curves({"AdamW": tmp_path / "run" / "trainer_state.json", "Coupled Adam": other},
                                tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        load_log_history(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="none of"):
        plot_training_curves({"run": [{"step": 1, "foo": 1.0}]}, tmp_path / "empty.png")


@pytest.mark.slow
def test_values_are_written_to_tensorboard(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tmp_path, tiny_gpt2(), [EmbeddingIsotropyCallback(every_n_steps=2)], max_steps=4, report_to="tensorboard")
    accumulator = EventAccumulator(str(tmp_path / "tb"))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert "train/embeddings/iso" in tags and "train/loss" in tags
    assert [event.step for event in accumulator.Scalars("train/embeddings/iso")] == [0, 2, 4]


def test_outside_a_trainer_values_still_reach_log_history(caplog):
    model = tiny_gpt2()
    callback = EmbeddingIsotropyCallback(every_n_steps=1)
    state, control = TrainerState(), TrainerControl()
    state.max_steps = 10
    handler = CallbackHandler([callback], model, None, None, None)
    with caplog.at_level(logging.WARNING, logger="coupled_adam_hf.callbacks"):
        handler.on_train_begin(None, state, control)
        state.global_step = 1
        handler.on_step_end(None, state, control)
    assert [e["step"] for e in state.log_history] == [0, 1]
    assert set(KEYS) <= set(state.log_history[0])
    assert "not called from a transformers.Trainer" in caplog.text


def test_invalid_interval_is_refused():
    with pytest.raises(ValueError, match="every_n_steps"):
        EmbeddingIsotropyCallback(every_n_steps=0)
