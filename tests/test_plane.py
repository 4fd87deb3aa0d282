"""The learning-forgetting plane: the curve callback, the verdict rules on planted curves, and --quick end to end."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

from tunegap.callbacks.forgetting_curve import curve_steps
from tunegap.io import read_jsonl
from tunegap.models import load_model
from tunegap.trainer import train


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def pretrained_tiny(tmp_path, monkeypatch):
    """The tiny random model saved as a model folder: real-weights code paths, in milliseconds."""
    monkeypatch.setenv("TUNEGAP_CACHE", str(tmp_path / "cache"))
    model, tokenizer = load_model("tiny", seed=0)
    model.save_pretrained(tmp_path / "pretrained", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "pretrained")
    return str(tmp_path / "pretrained")


def test_curve_steps_are_every_kth_and_the_last():
    assert curve_steps(2, 5) == [2, 4, 5]
    assert curve_steps(3, 6) == [3, 6]
    assert curve_steps(8, 5) == [5]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_curve_rows_at_the_right_steps_and_the_trajectory_is_unchanged(tmp_path, pretrained_tiny, method):
    # LoRA dropout draws random numbers every step: a measurement that drew any would change the steps after it
    common = dict(model=pretrained_tiny, method=method, max_steps=5, forgetting="off", eval_examples=4,
                  dropout=0.1 if method == "lora" else 0.0)
    plain = train(tiny_config(tmp_path, name=f"plain-{method}", **common))
    curve = train(tiny_config(tmp_path, name=f"curve-{method}", forgetting_every=2, **common))
    rows = read_jsonl(tmp_path / "runs" / f"curve-{method}" / "metrics.jsonl")
    plain_rows = read_jsonl(tmp_path / "runs" / f"plain-{method}" / "metrics.jsonl")
    measured = [r for r in rows if "forgetting_kl" in r]
    assert [r["step"] for r in measured] == [2, 4, 5]
    assert all(r["eval_loss"] > 0 and r["forgetting_kl"] > 0 and r["forgetting_prompts"] == 40 for r in measured)
    # the same steps, bit for bit: the measurement drew no random number and left no state behind
    losses = lambda rs: [(r["step"], r["loss"], r["grad_norm"]) for r in rs if "loss" in r]  # noqa: E731
    assert losses(rows) == losses(plain_rows)
    assert curve["metrics"]["eval_loss"] == plain["metrics"]["eval_loss"]
    # the last point measured the final weights: its held-out loss is the run's own
    assert measured[-1]["eval_loss"] == pytest.approx(curve["metrics"]["eval_loss"], rel=1e-6)
