"""GRPO: reinforcement learning from a verifiable reward (Shao et al. 2024, DeepSeekMath, Sec. 4.1).

For each prompt the current policy samples a group of G replies (no gradients, temperature sampling); a
reward scores each one; a reply's advantage is its reward relative to its own group (eq. 3 with outcome
supervision, Sec. 4.1.2):

    Â_i = (r_i - mean(r)) / (std(r) + eps)                                   for every token t of reply o_i

and the update maximises (eq. 3, one gradient step per batch of samples: μ = 1 in Algorithm 1, so
π_old = π_θ and the clipped ratio is exactly 1 with gradient ∇log π_θ)

    J = 1/G Σ_i 1/|o_i| Σ_t [ Â_i · π_θ(o_it)/π_old(o_it) − β · D_KL[π_θ || π_ref] ]

with the per-token KL estimated as in eq. 4 (Schulman's k3, unbiased and never negative):

    D_KL = π_ref/π_θ − log(π_ref/π_θ) − 1.

Why a group and no critic: the group's mean is the baseline PPO's value model would provide, at the price of
G samples per prompt. Those samples are the cost: generation, not the update, dominates an RL step, so the
ledger splits generation, scoring, the reference's forward and the update, in time and FLOPs.

The default reward is the support task's own checkers (`data.support.score_reply`), a verifiable reward: the
share of a reply's applicable checks it passes (greeting by name, sign-off, structure, the right product,
refusing exactly when out of scope), 1.0 exactly when `data.preference.passes_support_checks` accepts it.

Sampling needs the model, so `setup` keeps the trainer's `Context` and `make_batch` samples: the trainer's
counted region (forward and backward of `loss`) is then exactly the update, and `step_flops` is the
next-token formula on the sampled sequences. With a PEFT method the reference is the same model with its
adapters disabled (`disable_adapter()`); other methods keep one frozen copy of the starting weights.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

from .. import compiling
from ..costs.flops import forward_flops, generation_flops
from ..costs.shape import ModelShape
from ..data.loaders import DataError, load_sft
from ..data.packing import Batch, first_fit_rows, make_batch
from ..data.render import Example, render_conversation, tokenize_prompt
from ..data.sources import Prepared
from ..data.support import generate_support, score_reply
from ..errors import ConfigError
from ..evaluate import generate
from ..generation import decode
from ..ledger import q
from ..losses import IGNORE_INDEX, linear_token_logprobs
from ..outputs import MODEL_DIR, finished_run
from ..safety import weights_format
from .base import LossOutput, Objective, register
from .next_token import step_flops as next_token_step_flops
from .reward import SCORE

if TYPE_CHECKING:  # for annotations only: torch is imported where a tensor is made
    import torch

REWARDS: dict = {}


def register_reward(name: str):
    """Decorator: make `fn(meta, text) -> float in [0, 1]` available as `--reward NAME`."""
    def add(fn):
        REWARDS[name] = fn
        return fn
    return add


@register_reward("support")
def support_reward(meta: dict, text: str) -> float:
    """Share of the task's checks that apply to this ticket and pass: a graded, verifiable reward (a reply the
    task's own verdict accepts scores 1.0; one that fails every check 0.0)."""
    s = score_reply(meta, text)
    checks = [s["greets_by_name"], s["signed_off"], s["structure_ok"], s["refused"] == (not meta["in_scope"])]
    if s["product_correct"] is not None:
        checks.append(s["product_correct"])
    return sum(map(bool, checks)) / len(checks)


@register_reward("style")
def style_reward(meta: dict, text: str) -> float:
    """The house-style component only (greeting by name, sign-off, line structure), each worth a third."""
    s = score_reply(meta, text)
    return (bool(s["greets_by_name"]) + bool(s["signed_off"]) + bool(s["structure_ok"])) / 3


def group_advantages(rewards, eps: float = 1e-4):
    """Â_i = (r_i − mean(r)) / (std(r) + eps) within each group (eq. 3, Sec. 4.1.2); `rewards` is [prompts, G].

    std is the sample standard deviation (Bessel-corrected, as TRL's GRPOTrainer); a group whose replies all
    score the same gets advantage 0: it carries no signal about which reply is better."""
    return (rewards - rewards.mean(dim=1, keepdim=True)) / (rewards.std(dim=1, keepdim=True) + eps)


def k3(logp, ref_logp):
    """Per-token KL(π_θ || π_ref) estimate of eq. 4 (Schulman 2020's k3): exp(d) − d − 1 with d = log π_ref −
    log π_θ; zero when the policy equals the reference, positive otherwise."""
    import torch

    d = ref_logp - logp
    return torch.exp(d) - d - 1


@dataclass
class Prompt:
    """A ticket rendered up to the assistant's turn, and the facts its reward is checked against."""

    input_ids: list[int]
    meta: dict
    messages: list  # the conversation up to the reply (a reward model reads it with the reply)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Rollouts(Batch):
    """Sampled replies packed after their prompts (`data.packing.Batch`), with per-loss-token weights."""

    coef: "torch.Tensor"  # [n_loss] Â_i / |o_i| of the reply each loss position belongs to
    inv_len: "torch.Tensor"  # [n_loss] 1 / |o_i|
    ref_logp: "torch.Tensor | None"  # [n_loss] log π_ref at each reply token; None when β = 0
    reward_sum: float
    n_replies: int


def token_logp(base, model, changes_sequence: bool, batch: Batch, temperature: float):
    """log π(o_t | context) at every reply token of `batch`, logits only at those positions (as `sum_loss`),
    divided by the sampling temperature so the probabilities are those the replies were drawn from (TRL).
    A frozen head goes through `losses.linear_token_logprobs`: no [tokens x vocab] tensor outlives a chunk."""
    import torch

    where = batch.loss_positions
    targets = batch.targets.flatten().index_select(0, where)
    if changes_sequence:  # prompt/prefix tuning: PEFT's own forward adds the virtual tokens
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       use_cache=False).logits[:, -batch.width:].flatten(0, 1).index_select(0, where)
    else:
        hidden = base.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                    attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
        hidden, head = hidden.flatten(0, 1).index_select(0, where), base.get_output_embeddings()
        if isinstance(head, torch.nn.Linear) and head.bias is None and not head.weight.requires_grad:
            return linear_token_logprobs(hidden, head.weight, targets, temperature=temperature)
        logits = head(hidden)
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(1, targets.unsqueeze(1)).squeeze(1)


def reply_owner(examples: list, capacity: int, pack: bool) -> list[int]:
    """Which example each loss position of `make_batch(examples, ...)` belongs to, in its row-major order
    (the same first-fit rows `data.packing.make_batch` builds)."""
    lengths = [len(e.input_ids) for e in examples]
    groups = first_fit_rows(lengths, capacity) if pack else [[i] for i in range(len(examples))]
    return [i for group in groups for i in group for _ in range(examples[i].n_loss_tokens)]


def asked(messages: list) -> list:
    """The conversation without its trailing assistant turn: what the policy answers."""
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else list(messages)


def load_reward_model(run: str, runs_dir: str):
    """A finished `--objective reward` run's sequence classifier (fp32, frozen) and its tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder, ledger = finished_run(run, runs_dir)
    objective = ledger.get("config", {}).get("objective")
    if objective != "reward":
        raise ConfigError(f"--reward-model {run}: not a reward model run (its objective is {objective!r}); "
                          "train one with --objective reward")
    weights_format(folder / MODEL_DIR)
    model = AutoModelForSequenceClassification.from_pretrained(folder / MODEL_DIR, dtype=torch.float32,
                                                               use_safetensors=True)
    return model.eval().requires_grad_(False), AutoTokenizer.from_pretrained(folder / MODEL_DIR)


def reward_model_scores(model, tokenizer, conversations: list, texts: list[str]) -> tuple[list[float], list[int]]:
    """r(x, y) of each reply and each sequence's length: prompt and reply rendered with the chat template as the
    reward model's pairs were (SFT's rendering), its scalar head read at the last token (`objectives.reward`)."""
    import torch

    ids = [tokenizer(render_conversation(tokenizer, [*conv, {"role": "assistant", "content": text}]),
                     add_special_tokens=False)["input_ids"] for conv, text in zip(conversations, texts)]
    width, pad = max(map(len, ids)), tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = torch.tensor([row + [pad] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    with torch.no_grad():
        hidden = model.base_model(input_ids=batch, attention_mask=mask).last_hidden_state
        last = hidden[torch.arange(len(ids)), torch.tensor([len(row) - 1 for row in ids])]
        return getattr(model, SCORE)(last).squeeze(-1).float().tolist(), [len(row) for row in ids]


def load_tickets(config) -> tuple[list[dict], list[dict]]:
    """Train and held-out conversations whose `meta` the reward checks: the support task, or JSONL with meta."""
    if config.data == "support":
        train, held = generate_support()
    else:
        train, held = load_sft(config.data), []
    if config.eval_data:
        held = load_sft(config.eval_data)
    for source, records in ((config.data, train), (config.eval_data, held)):
        for index, record in enumerate(records):
            if not isinstance(record.get("meta"), dict):
                raise DataError(source, index + 1, "meta", "the reward checks each reply against its ticket's "
                                "meta (name, product, in_scope): missing here")
    return train[:config.train_examples] if config.train_examples else train, held


@register
@dataclass
class GRPO(Objective):
    """Group Relative Policy Optimization from a verifiable reward; one update per batch of samples.

    Options (TrainConfig fields of the same names): G replies per prompt, the KL weight β, the sampling
    temperature, the longest reply, the reward's name, and how many held-out tickets measure the reward."""

    name = "grpo"
    unit = "reply"

    group_size: int = 4
    kl_beta: float = 0.04  # DeepSeekMath's β (Sec. 4.2)
    temperature: float = 1.0
    max_new_tokens: int = 96
    reward: str = "support"
    reward_model: str = ""  # a finished --objective reward run, scoring instead of `reward`
    runs_dir: str = "runs"
    generate_examples: int = 32

    def __post_init__(self):
        if self.group_size < 2:
            raise ConfigError(f"--group-size: GRPO compares replies within a group; need at least 2, got "
                              f"{self.group_size}")
        if self.reward not in REWARDS:
            raise ConfigError(f"--reward: unknown reward {self.reward!r}; choose from {', '.join(sorted(REWARDS))}")
        for flag, bad in (("--temperature: must be > 0", not self.temperature > 0),
                          ("--kl-beta: must be >= 0", self.kl_beta < 0),
                          ("--max-new-tokens: must be at least 1", self.max_new_tokens < 1)):
            if bad:
                raise ConfigError(flag)
        # what the phases outside the update spent, for end_metrics (seconds measured, FLOPs by formula)
        self.spent = dict.fromkeys(("generation_s", "generation_flops", "generated_tokens", "replies", "scoring_s",
                                    "scoring_flops", "reference_s", "reference_flops", "eval_s", "eval_flops"), 0.0)
        self._reference = self.scorer = None

    def prepare_data(self, config, tokenizer):
        """Prompts short enough that prompt + the longest reply fit in --seq-len (the others are counted)."""
        self.tokenizer = tokenizer
        train, held = load_tickets(config)
        room = config.seq_len - self.max_new_tokens
        prompts = [Prompt(tokenize_prompt(tokenizer, r["messages"]), r["meta"], asked(r["messages"])) for r in train]
        kept = [p for p in prompts if len(p) <= room]
        if not kept:
            raise ConfigError(f"--seq-len {config.seq_len} leaves {room} tokens for a prompt after --max-new-tokens "
                              f"{self.max_new_tokens}; the shortest prompt has {min(map(len, prompts))}: raise "
                              "--seq-len")
        stats = {"source": config.data, "prompts": len(kept), "prompts_too_long": len(prompts) - len(kept),
                 "group_size": self.group_size}
        return Prepared("rl", kept, [], held, stats)

    def setup(self, ctx, data) -> None:
        """Keep the context (sampling needs the model), pick the reference, and measure the starting reward."""
        self.ctx, self.shape, self.eval_records = ctx, ModelShape.from_hf_config(ctx.base.config), data.eval_records
        if self.kl_beta and not hasattr(ctx.model, "disable_adapter"):  # full/freeze/adapter: one frozen copy
            self._reference = copy.deepcopy(ctx.base).eval().requires_grad_(False)
        if self.reward_model:
            self.scorer = load_reward_model(self.reward_model, self.runs_dir)
        self.reward_before = self.heldout_reward(ctx)

    def make_batch(self, examples, *, capacity, pad_id, pack):
        """Sample G replies per prompt, score them, and pack prompt + reply with each token's weight."""
        import torch

        replies = self.sample(examples, pad_id)
        started = time.perf_counter()
        prompts = [p for p in examples for _ in range(self.group_size)]
        rewards = torch.tensor(self.score([p.messages for p in prompts], [p.meta for p in prompts],
                                          [self.decode(r) for r in replies]))
        self.spent["scoring_s"] += time.perf_counter() - started
        advantages = group_advantages(rewards.view(len(examples), self.group_size)).flatten()
        seqs = [Example(p.input_ids + r, [IGNORE_INDEX] * len(p) + r) for p, r in zip(prompts, replies)]
        batch = make_batch(seqs, capacity=capacity, pad_id=pad_id, pack=pack)
        owner = torch.tensor(reply_owner(seqs, capacity, pack))
        inv_len = 1.0 / torch.tensor([float(len(r)) for r in replies])
        plain = {f.name: getattr(batch, f.name) for f in fields(Batch)}
        return Rollouts(**plain, coef=(advantages * inv_len)[owner], inv_len=inv_len[owner],
                        ref_logp=self.reference_logp(batch) if self.kl_beta else None,
                        reward_sum=float(rewards.sum()), n_replies=len(replies))

    def normaliser(self, batch) -> int:
        return batch.n_replies  # eq. 3's 1/G (and the mean over the batch's prompts)

    def loss(self, ctx, batch):
        """−J of eq. 3 summed over the batch's replies (the trainer divides by their number)."""
        import torch

        with ctx.autocast():
            logp = token_logp(ctx.base, ctx.model, ctx.method.changes_sequence, batch, self.temperature)
        ratio = torch.exp(logp - logp.detach())  # π_θ/π_old = 1, gradient ∇log π_θ (μ = 1)
        total = -(batch.coef * ratio).sum()
        metrics = {"reward": batch.reward_sum, "reply_tokens": float(batch.n_loss_tokens)}
        if batch.ref_logp is not None:
            kl = (k3(logp, batch.ref_logp) * batch.inv_len).sum()
            total = total + self.kl_beta * kl
            metrics["kl"] = float(kl.detach())
        return LossOutput(total, metrics)

    def step_flops(self, shape, trainable, ctx, batch, *, checkpointing):
        """The update: a next-token-style forward and backward over prompt + reply, logits at reply tokens."""
        return next_token_step_flops(shape, trainable, ctx, batch, checkpointing)

    # ---------------------------------------------------------------------- the phases outside the update
    def sample(self, examples: list, pad_id: int) -> list[list[int]]:
        """G replies per prompt from the current policy (no gradients), prompt-major; generation FLOPs by
        formula for the useful work (each reply's prefill and decode; padded or finished rows of the batched
        decode are not counted, nor are LoRA's added matmuls)."""
        started, ctx = time.perf_counter(), self.ctx
        with compiling.eager():
            replies = decode(ctx.model, [p.input_ids for p in examples], max_new_tokens=self.max_new_tokens,
                             eos_id=self.tokenizer.eos_token_id, pad_id=pad_id, temperature=self.temperature,
                             repeats=self.group_size, autocast=ctx.autocast)
        prompts = [p for p in examples for _ in range(self.group_size)]
        s = self.spent
        s["generation_flops"] += sum(generation_flops(self.shape, len(p), len(r)) for p, r in zip(prompts, replies))
        s["generated_tokens"] += sum(map(len, replies))
        s["replies"] += len(replies)
        s["generation_s"] += time.perf_counter() - started
        return replies

    def decode(self, reply: list[int]) -> str:
        return self.tokenizer.decode(reply, skip_special_tokens=True).strip()

    def reference(self):
        """(base, model) of π_ref: the PEFT model with its adapters disabled, or the frozen starting copy."""
        if self._reference is not None:
            return contextlib.nullcontext((self._reference, self._reference))
        ctx = self.ctx

        @contextlib.contextmanager
        def disabled():
            with ctx.model.disable_adapter():
                yield ctx.base, ctx.model
        return disabled()

    def reference_logp(self, batch: Batch):
        """log π_ref at every reply token, once per batch without gradients (outside the counted update)."""
        import torch

        started, ctx = time.perf_counter(), self.ctx
        was_training = ctx.model.training
        ctx.model.eval()
        with torch.no_grad(), ctx.autocast(), self.reference() as (base, model):
            ref = token_logp(base, model, ctx.method.changes_sequence, batch, self.temperature)
        ctx.model.train(was_training)
        self.spent["reference_flops"] += forward_flops(self.shape, sequences=batch.rows, seq_len=batch.width,
                                                       logit_tokens=batch.n_loss_tokens)
        self.spent["reference_s"] += time.perf_counter() - started
        return ref

    def heldout_reward(self, ctx) -> float | None:
        """Mean reward of greedy replies to the first `generate_examples` held-out tickets (what the policy
        would answer when deployed); None without held-out tickets."""
        records = self.eval_records[:self.generate_examples]
        if not records:
            return None
        started = time.perf_counter()
        with compiling.eager():
            texts, prompt_lens, new_lens = generate(ctx.model, self.tokenizer, [r["messages"] for r in records],
                                                    max_new_tokens=self.max_new_tokens, autocast=ctx.autocast)
        self.spent["eval_s"] += time.perf_counter() - started
        self.spent["eval_flops"] += sum(generation_flops(self.shape, p, n) for p, n in zip(prompt_lens, new_lens))
        return sum(self.score([asked(r["messages"]) for r in records], [r["meta"] for r in records], texts,
                              training=False)) / len(records)

    def score(self, conversations: list, metas: list, texts: list[str], *, training: bool = True) -> list[float]:
        """Each reply's reward: the reward model's r(x, y) when one is given (FLOPs by formula, the head read at
        one position), else the named verifiable reward checked against the ticket's meta."""
        if self.scorer is None:
            return [REWARDS[self.reward](meta, text) for meta, text in zip(metas, texts)]
        model, tokenizer = self.scorer
        scores, lengths = reward_model_scores(model, tokenizer, conversations, texts)
        shape = replace(ModelShape.from_hf_config(model.config), vocab_size=1)
        self.spent["scoring_flops" if training else "eval_flops"] += sum(
            forward_flops(shape, sequences=1, seq_len=n, logit_tokens=1) for n in lengths)
        return scores

    def end_metrics(self, ctx) -> dict:
        """The held-out reward before and after, and the cost of each phase outside the update: the ledger's
        train time includes them (the trainer times `make_batch`), its FLOPs are the update's alone. A resumed
        run counts the phases of its last segment only (they live in this object, not in the checkpoint); its
        reward before is still the starting model's (`setup` runs before the checkpoint is loaded)."""
        after = self.heldout_reward(ctx)
        s = self.spent
        phases = {"generation_time_s": q(s["generation_s"], "s", "measured"),
                  "generation_flops": q(s["generation_flops"], "FLOP", "formula"),
                  "generated_tokens": q(int(s["generated_tokens"]), "token", "measured"),
                  "sampled_replies": q(int(s["replies"]), "reply", "measured"),
                  "scoring_time_s": q(s["scoring_s"], "s", "measured"),
                  "scoring_flops": q(s["scoring_flops"], "FLOP", "formula"),
                  "reference_time_s": q(s["reference_s"], "s", "measured"),
                  "reference_flops": q(s["reference_flops"], "FLOP", "formula"),
                  "eval_generation_time_s": q(s["eval_s"], "s", "measured"),
                  "eval_generation_flops": q(s["eval_flops"], "FLOP", "formula")}
        name = f"reward model {self.reward_model}" if self.scorer is not None else self.reward
        return {"reward_name": name, "eval_reward_before": self.reward_before, "eval_reward": after,
                "rl_phases": phases}
