"""GRPO (tunegap/objectives/grpo.py): the paper's advantages and KL estimator by hand, the task's reward, and
the whole loop through the one Trainer on a tiny model: the reward rises, the KL starts at zero, counted FLOPs
equal the formula for the update, and the ledger splits generation, scoring and the update."""

from __future__ import annotations

import json
import math

import pytest

from conftest import tiny_config
from tunegap.config import ConfigError
from tunegap.objectives.grpo import GRPO, REWARDS, group_advantages, k3, register_reward, support_reward


@pytest.fixture
def lowercase_reward():
    """A reward a random 2-layer model can learn in a few steps: the share of lowercase letters in the reply
    (about 10% of its 259 byte tokens at the start, so every group holds replies that differ)."""
    @register_reward("lowercase")
    def lowercase(meta, text):
        return sum(c.islower() for c in text) / max(len(text), 1)

    yield "lowercase"
    REWARDS.pop("lowercase")


def test_group_advantages_follow_the_paper_on_a_hand_example():
    """Â_i = (r_i - mean(r)) / std(r) within each group (DeepSeekMath Sec. 4.1.2), std Bessel-corrected."""
    import torch

    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.2, 0.2, 0.2, 0.2], [0.0, 0.0, 0.0, 0.6]])
    got = group_advantages(rewards, eps=1e-4)
    a = 0.5 / (math.sqrt((4 * 0.5 ** 2) / 3) + 1e-4)  # mean 0.5, sample std of [1, 0, 0, 1]
    assert got[0].tolist() == pytest.approx([a, -a, -a, a], rel=1e-6)
    assert got[1].tolist() == [0.0] * 4  # equal rewards: no signal, no update
    std3 = math.sqrt((3 * 0.15 ** 2 + 0.45 ** 2) / 3)  # mean 0.15
    assert got[2].tolist() == pytest.approx([-0.15 / (std3 + 1e-4)] * 3 + [0.45 / (std3 + 1e-4)], rel=1e-6)
    assert got.sum(dim=1).abs().max() < 1e-6  # each group's advantages sum to zero


def test_k3_is_zero_at_the_reference_and_unbiased_for_the_kl():
    """Eq. 4: exp(d) - d - 1 with d = log π_ref - log π_θ; its mean under π_θ is exactly KL(π_θ || π_ref)."""
    import torch

    logp = torch.log_softmax(torch.tensor([0.3, -1.2, 2.0, 0.1]), dim=0)
    ref = torch.log_softmax(torch.tensor([1.0, 0.5, -0.5, 0.0]), dim=0)
    assert k3(logp, logp).abs().max() == 0.0
    assert (k3(logp, ref) > 0).all()
    expected_kl = (logp.exp() * (logp - ref)).sum()
    assert float((logp.exp() * k3(logp, ref)).sum()) == pytest.approx(float(expected_kl), rel=1e-5)


def test_support_reward_is_the_tasks_own_verdict():
    from tunegap.data.preference import passes_support_checks
    from tunegap.data.support import generate_support, reference_reply

    records = generate_support(40, 0)[0]
    for record in records:
        meta = record["meta"]
        assert support_reward(meta, reference_reply(meta)) == 1.0 == passes_support_checks(meta, reference_reply(meta))
    inside = next(r["meta"] for r in records if r["meta"]["in_scope"])
    assert support_reward(inside, "no idea") == pytest.approx(1 / 5)  # only "did not refuse" holds
    unsigned = reference_reply(inside).rsplit("\n", 1)[0]
    assert 0.2 < support_reward(inside, unsigned) < 1.0


def test_bad_options_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="--group-size"):
        GRPO(group_size=1)
    with pytest.raises(ConfigError, match="--reward: unknown reward 'nope'"):
        GRPO(reward="nope")


def _rows(tmp_path):
    return [json.loads(line) for line in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]


def test_grpo_raises_the_reward_on_a_tiny_model(tmp_path, lowercase_reward):
    """Full fine-tuning of a random 2-layer Llama: the sampled reward climbs from about 0.1 and the held-out
    greedy reward does not fall; the KL starts at exactly zero (the frozen copy is the starting policy), the
    counted FLOPs of every update equal the formula, and the ledger keeps each phase apart."""
    from tunegap.trainer import train

    config = tiny_config(tmp_path, objective="grpo", method="full", reward=lowercase_reward, group_size=8,
                         max_new_tokens=16, max_steps=12, lr=1e-2, schedule="constant", generate_examples=4,
                         count_flops_every=1, forgetting=False)
    ledger = train(config)
    rows = _rows(tmp_path)
    rewards = [r["reward"] for r in rows]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.2, rewards
    assert rows[0]["kl"] == 0.0 and rows[-1]["kl"] > 0
    assert ledger["metrics"]["eval_reward"] >= ledger["metrics"]["eval_reward_before"]
    assert ledger["costs"]["flops_counted_over_formula"]["value"] == pytest.approx(1.0, rel=1e-9)
    assert ledger["counted_steps"] == list(range(1, 13))
    phases = ledger["metrics"]["rl_phases"]
    assert phases["sampled_replies"]["value"] == 12 * 4 * 8
    assert phases["generation_flops"]["how"] == "formula" and phases["generation_flops"]["value"] > 0
    assert phases["generation_time_s"]["how"] == "measured" and phases["scoring_time_s"]["value"] > 0
    assert 0 < phases["generation_time_s"]["value"] < ledger["costs"]["train_time_s"]["value"]


def test_lora_reference_is_the_same_model_with_adapters_off(tmp_path, lowercase_reward):
    """No second copy under PEFT: π_ref is the model with `disable_adapter()`, so at step 1 (B = 0) the KL is
    exactly zero, and counted FLOPs equal the formula for LoRA's update."""
    from tunegap.trainer import Trainer

    config = tiny_config(tmp_path, objective="grpo", method="lora", reward=lowercase_reward, group_size=4,
                         max_new_tokens=8, max_steps=2, lr=1e-2, generate_examples=0, count_flops_every=1,
                         forgetting=False)
    objective = GRPO(group_size=4, max_new_tokens=8, reward=lowercase_reward, generate_examples=0)
    ledger = Trainer(config, objective=objective).run()
    assert objective._reference is None and hasattr(objective.ctx.model, "disable_adapter")
    rows = _rows(tmp_path)
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0
    assert ledger["costs"]["flops_counted_over_formula"]["value"] == pytest.approx(1.0, rel=1e-9)
    assert ledger["metrics"]["eval_reward"] is None  # no held-out tickets asked for


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_token_logprobs_equal_the_plain_path(temperature):
    """`losses.linear_token_logprobs` (chunked, gradient built in the forward pass) gives the plain path's
    log-probs and input gradient under any per-token weighting, and the same counted FLOPs."""
    import torch

    from tunegap.costs.counted import count_flops
    from tunegap.losses import linear_token_logprobs

    torch.manual_seed(0)
    h = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    w, y, weights = torch.randn(50, 8, dtype=torch.float64), torch.randint(0, 50, (10,)), torch.randn(10)
    plain = torch.log_softmax(h @ w.t() / temperature, dim=-1).gather(1, y[:, None]).squeeze(1)
    (grad_plain,) = torch.autograd.grad((plain * weights).sum(), h)
    with count_flops() as counter:
        fused = linear_token_logprobs(h, w, y, temperature=temperature, chunk_rows=3)
        (grad_fused,) = torch.autograd.grad((fused * weights).sum(), h)
    assert torch.allclose(fused.double(), plain, atol=1e-6) and torch.allclose(grad_fused, grad_plain, atol=1e-6)
    assert counter.get_total_flops() == 2 * (2 * 10 * 8 * 50)  # forward + input gradient, as unfused


def test_a_reward_model_run_scores_the_replies(tmp_path):
    """--reward-model RUN: a finished `--objective reward` run's scalar head scores each sampled reply (read at
    its last token, as it was trained); its forward FLOPs are in the ledger's scoring phase."""
    from tunegap.objectives.grpo import load_reward_model, reward_model_scores
    from tunegap.trainer import train

    train(tiny_config(tmp_path, name="rm", objective="reward", method="full", max_steps=2, forgetting=False))
    model, tokenizer = load_reward_model("rm", str(tmp_path / "runs"))
    conversation = [{"role": "user", "content": "My Lumora Sync stopped syncing. Maya"}]
    scores, lengths = reward_model_scores(model, tokenizer, [conversation] * 2, ["Hi Maya,", "Hi Maya, sorry."])
    alone, _ = reward_model_scores(model, tokenizer, [conversation], ["Hi Maya,"])
    assert scores[0] == pytest.approx(alone[0], abs=1e-5) and scores[0] != scores[1]  # padding changes nothing
    assert lengths[0] < lengths[1] and all(math.isfinite(s) for s in scores)

    ledger = train(tiny_config(tmp_path, name="t", objective="grpo", reward_model="rm", group_size=2,
                               max_new_tokens=8, max_steps=1, generate_examples=2, forgetting=False))
    assert ledger["metrics"]["reward_name"] == "reward model rm"
    assert ledger["metrics"]["rl_phases"]["scoring_flops"]["value"] > 0
    assert isinstance(ledger["metrics"]["eval_reward"], float)
    with pytest.raises(ConfigError, match="not a reward model run"):
        load_reward_model("t", str(tmp_path / "runs"))
