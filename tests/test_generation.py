"""The batched decoder (`tunegap.generation`) against decoding each prompt alone with `model.generate`."""

from __future__ import annotations

import copy

import pytest
import torch

from tunegap.generation import _prefill, common_prefix_length, decode
from tunegap.models import load_model

SHARED = list(range(5, 25))  # a 20-token prefix every prompt starts with, as a system prompt or k shots are


@pytest.fixture(scope="module")
def tiny():
    model, _ = load_model("tiny", init="scratch", seed=3)
    return model.eval()


def prompts():
    g = torch.Generator().manual_seed(0)
    return [SHARED + torch.randint(30, 200, (n,), generator=g).tolist() for n in (3, 11, 1, 7, 19, 5)]


def alone(model, prompt, max_new_tokens, eos):
    """The reference: `model.generate` on one unpadded prompt, cut after its first EOS."""
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
    row = out[0, len(prompt):].tolist()
    return row[:row.index(eos) + 1] if eos in row else row


def test_batched_greedy_equals_one_prompt_at_a_time(tiny):
    # an EOS that some greedy replies reach early and others never: rows leave the batch at different steps
    free = [alone(tiny, p, 12, eos=None) for p in prompts()]
    eos = free[0][4]
    expected = [alone(tiny, p, 12, eos) for p in prompts()]
    assert len({len(r) for r in expected}) > 1, "the planted EOS should end some replies early"
    for batch_size in (1, 4, 32):
        got = decode(tiny, prompts(), max_new_tokens=12, eos_id=eos, pad_id=0, batch_size=batch_size)
        assert got == expected, f"batch_size={batch_size}"
    assert decode(tiny, prompts(), max_new_tokens=12, eos_id=eos, pad_id=0, share_prefix=False) == expected


def test_cached_prefix_gives_the_logits_of_encoding_it_with_every_prompt(tiny):
    batch = prompts()
    n = common_prefix_length(batch)
    assert n == len(SHARED)
    with torch.no_grad():
        prefix = tiny(input_ids=torch.tensor([SHARED]), use_cache=True).past_key_values
        _, cached = _prefill(tiny, [p[n:] for p in batch], prefix, n, pad_id=0, keep_last=True)
        _, uncached = _prefill(tiny, batch, None, 0, pad_id=0, keep_last=True)
        single = torch.stack([tiny(input_ids=torch.tensor([p])).logits[0, -1] for p in batch])
    torch.testing.assert_close(cached, single, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(uncached, single, atol=1e-5, rtol=1e-5)
    # the prefix cache itself is not consumed: a second batch starts from the same 20 positions
    assert prefix.get_seq_length() == len(SHARED)


def test_a_group_of_repeats_decodes_each_prompt_once_and_copies_it(tiny):
    batch = prompts()[:3]
    greedy = decode(tiny, batch, max_new_tokens=6, eos_id=None, pad_id=0)
    grouped = decode(tiny, batch, max_new_tokens=6, eos_id=None, pad_id=0, repeats=3)
    assert grouped == [r for r in greedy for _ in range(3)]
    torch.manual_seed(7)
    sampled = decode(tiny, batch, max_new_tokens=6, eos_id=None, pad_id=0, repeats=3, temperature=1.0)
    torch.manual_seed(7)
    assert decode(tiny, batch, max_new_tokens=6, eos_id=None, pad_id=0, repeats=3, temperature=1.0) == sampled
    assert sampled != grouped  # temperature 1 over a random model's flat distribution: not the argmax path


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_length([[9, 2], [1, 2]]) == 0
    assert common_prefix_length([[1, 2, 3]]) == 3


def test_training_mode_is_restored(tiny):
    model = copy.deepcopy(tiny).train()
    decode(model, prompts()[:2], max_new_tokens=2, eos_id=None, pad_id=0)
    assert model.training


def test_the_auto_rule_runs_an_evaluation_only_when_training_is_longer():
    from tunegap.callbacks.base import decide

    assert decide("auto", "--forgetting", training_s=61.0, evaluation_s=60.0)[0]
    runs, why = decide("auto", "--forgetting", training_s=59.0, evaluation_s=60.0)
    assert not runs and "--forgetting on runs it" in why
    assert decide("on", "--forgetting", training_s=1.0, evaluation_s=60.0)[0]
    assert not decide("off", "--forgetting", training_s=1e9, evaluation_s=1.0)[0]


def test_durations_are_predicted_before_step_1_and_kept_beside_the_measured_ones(tmp_path, capsys):
    from conftest import tiny_config
    from tunegap.trainer import train

    seen = {}

    def on_step(step):
        if step == 1:
            seen["before step 1"] = capsys.readouterr().out

    ledger = train(tiny_config(tmp_path, max_steps=3, generate_examples=2, task_metrics="auto"), on_step=on_step)
    line = next(x for x in seen["before step 1"].splitlines() if "predicted (estimate" in x)
    assert "training" in line and "held-out loss" in line and "task metrics (2 replies)" in line
    predicted = ledger["timings"]["predicted_seconds"]
    assert predicted["training"] > 0
    # auto: task metrics ran exactly when their prediction was below the training's
    ran = "style_adherence" in ledger["metrics"]
    assert ran == ("task metrics (2 replies)" in predicted)
