"""Forgetting, measured: how far a fine-tune moved the model away from what it did before, on things unrelated
to the task (the shipped general prompts and questions, `tunegap.data.support`).

  * drift: KL(p_base || p_tuned) of the next-token distributions, in nats per token, over the base model's own
    greedy replies to 40 general prompts. Scoring the base's replies asks "how much less would the tuned model
    say what the base model said?", the quantity RLHF's KL penalty keeps small (Ouyang et al. 2022, Eq. 2);
    prompt tokens are not scored (the chat template's system text is the same in every prompt).
  * capability: greedy answers to 40 easy questions, right when an accepted answer appears; reported with the
    base model's score and the share of the base's right answers the tuned model keeps.

`measure_forgetting(base, tuned, tokenizer)` is the reusable piece: the trainer's forgetting callback
(`callbacks.forgetting`) and `tunegap analyze forgetting` both call it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path

from .costs.hardware import measure_peaks
from .data.render import tokenize_prompt
from .data.support import answer_matches, general_prompts, general_questions
from .evaluate import generate
from .generation import decode
from .io import atomic_write_json
from .models import ARCH_PRESETS, DEFAULT_MODEL, TINY_PRESETS, cache_dir, default_model_folder, load_model
from .precision import autocast_factory

def _replies(base, tokenizer, prompts: list[str], max_new_tokens: int,
             autocast=contextlib.nullcontext) -> list[tuple[list[int], int]]:
    """Base model's greedy reply to each prompt: (prompt + reply token ids, index of the first reply token)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenize_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    replies = decode(base, encoded, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id, pad_id=pad,
                     autocast=autocast)
    return [(prompt + reply, len(prompt)) for prompt, reply in zip(encoded, replies)]


def _logprobs(model, sequences: list[list[int]], pad: int, autocast=contextlib.nullcontext):
    """Log-softmax of the model's logits for right-padded sequences, in fp32: [batch, time, vocab]."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    with autocast():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -width:]  # prompt tuning prepends
    return torch.log_softmax(logits.float(), dim=-1)


def reply_kl(base, tuned, sequences: list[tuple[list[int], int]], pad: int, batch_size: int = 8,
             autocast=contextlib.nullcontext) -> list[tuple[float, int]]:
    """Per sequence: (sum over reply positions of KL(p_base || p_tuned) in nats, positions scored).

    Position t-1 predicts token t; the positions scored are those predicting the reply's tokens. Under bf16
    autocast both models round the same way, so a model compared with itself still gives exactly 0.
    """
    import torch

    results = []
    with torch.no_grad():
        for i in range(0, len(sequences), batch_size):
            chunk = sequences[i:i + batch_size]
            lp_base = _logprobs(base, [s for s, _ in chunk], pad, autocast)
            lp_tuned = _logprobs(tuned, [s for s, _ in chunk], pad, autocast)
            kl = (lp_base.exp() * (lp_base - lp_tuned)).sum(-1)  # [batch, time]
            for row, (seq, start) in enumerate(chunk):
                positions = slice(max(start - 1, 0), len(seq) - 1)
                values = kl[row, positions]
                results.append((float(values.sum()), int(values.numel())))
    return results


def answers_correct(model, tokenizer, questions: list[dict], max_new_tokens: int = 24,
                    autocast=contextlib.nullcontext) -> list[bool]:

    texts = generate(model, tokenizer, [[{"role": "user", "content": item["question"]}] for item in questions],
                     max_new_tokens=max_new_tokens, autocast=autocast)[0]
    return [answer_matches(item, text) for item, text in zip(questions, texts)]


def measure_forgetting(base, tuned, tokenizer, *, prompts: list[str] | None = None,
                       questions: list[dict] | None = None, reply_tokens: int = 24, answer_tokens: int = 24,
                       reference: dict | None = None, autocast=contextlib.nullcontext) -> dict:
    """Drift (KL, nats/token) and capability (general-question accuracy) of `tuned` relative to `base`.

    `reference` (from `base_reference`) saves regenerating the base model's replies and answers when the same
    base is compared with several tuned models. Both models must share the tokenizer.
    """

    started = time.perf_counter()
    prompts = general_prompts() if prompts is None else prompts
    questions = general_questions() if questions is None else questions
    reference = reference or base_reference(base, tokenizer, prompts=prompts, questions=questions,
                                            reply_tokens=reply_tokens, answer_tokens=answer_tokens, autocast=autocast)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    states = [(m, m.training) for m in (base, tuned)]
    for m, _ in states:
        m.eval()
    try:
        per_prompt = reply_kl(base, tuned, reference["sequences"], pad, autocast=autocast)
        tuned_right = answers_correct(tuned, tokenizer, questions, answer_tokens, autocast) if questions else []
    finally:
        for m, was in states:
            m.train(was)
    total = sum(s for s, _ in per_prompt)
    count = sum(n for _, n in per_prompt)
    base_right = reference["base_right"]
    kept = [t for b, t in zip(base_right, tuned_right) if b]
    return {
        "forgetting_kl": total / max(count, 1),
        "forgetting_kl_max_prompt": max((s / n for s, n in per_prompt if n), default=0.0),
        "forgetting_kl_tokens": count,
        "general_accuracy": sum(tuned_right) / len(tuned_right) if tuned_right else None,
        "general_accuracy_base": sum(base_right) / len(base_right) if base_right else None,
        "general_retained": sum(kept) / len(kept) if kept else None,
        "general_questions": len(questions),
        "forgetting_prompts": len(prompts),
        "forgetting_seconds": time.perf_counter() - started,
    }


def base_reference(base, tokenizer, *, prompts: list[str] | None = None, questions: list[dict] | None = None,
                   reply_tokens: int = 24, answer_tokens: int = 24, autocast=contextlib.nullcontext) -> dict:
    """What the base model says (its greedy replies) and which general questions it gets right."""

    prompts = general_prompts() if prompts is None else prompts
    questions = general_questions() if questions is None else questions
    was = base.training
    base.eval()
    try:
        sequences = _replies(base, tokenizer, prompts, reply_tokens, autocast=autocast)
        right = answers_correct(base, tokenizer, questions, answer_tokens, autocast) if questions else []
    finally:
        base.train(was)
    return {"sequences": sequences, "base_right": right}


def has_real_weights(config) -> bool:
    """Forgetting means something only for pretrained weights: not scratch runs, not the random presets."""
    return config.init == "pretrained" and config.model not in TINY_PRESETS and config.model not in ARCH_PRESETS


def forgetting_after_training(config, model, tokenizer, data_kind: str) -> dict:
    """The trainer's callback: measure forgetting of a finished SFT fine-tune of real weights (else {}).

    Runs after the weights are saved; a failure is recorded as `forgetting_error` in the ledger rather than
    losing the finished run.
    """
    if not forgetting_applies(config, data_kind):
        return {}
    try:
        base, _ = load_model(config.model, init=config.init, seed=config.seed)
        precision = resolve_precision(config.precision)
        autocast = autocast_for(precision)
        reference = cached_base_reference(config.model, base, tokenizer, precision=precision)
        result = measure_forgetting(base, model, tokenizer, autocast=autocast, reference=reference)
    except (RuntimeError, ValueError, OSError) as err:
        return {"forgetting_error": str(err).splitlines()[0] if str(err) else type(err).__name__}
    print(f"tunegap: forgetting: KL(base‖tuned) {result['forgetting_kl']:.4g} nats/token on "
          f"{result['forgetting_prompts']} general prompts; general questions the base model answers right "
          f"still right: {_pct(result['general_retained'])} (accuracy {_pct(result['general_accuracy'])}, "
          f"base {_pct(result['general_accuracy_base'])}) (measured, {result['forgetting_seconds']:.0f} s)",
          flush=True)
    return result


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


REPLY_TOKENS = ANSWER_TOKENS = 24  # greedy tokens per base reply and per answer


def _reference_path(model_name: str, precision: str, reply_tokens: int, answer_tokens: int) -> Path:
    """Where the base model's replies are kept: the key covers the weights files (path, size, mtime), the sets
    and the precision, so a changed model or set is measured afresh."""
    folder = default_model_folder() if model_name == DEFAULT_MODEL else Path(model_name)
    weights = sorted((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors"))
    key = hashlib.sha256(json.dumps([weights, general_prompts(), general_questions(), reply_tokens, answer_tokens,
                                     precision]).encode()).hexdigest()[:16]
    return cache_dir() / "forgetting" / f"{key}.json"


def cached_base_reference(model_name: str, base, tokenizer, *, precision: str = "fp32",
                          reply_tokens: int = REPLY_TOKENS, answer_tokens: int = ANSWER_TOKENS) -> dict:
    """`base_reference` for the shipped prompts and questions, kept on disk per base model: the base model's
    replies and answers do not change between fine-tunes of it, and generating them is two thirds of the
    measurement."""
    prompts, questions = general_prompts(), general_questions()
    path = _reference_path(model_name, precision, reply_tokens, answer_tokens)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            return {"sequences": [(list(s), int(start)) for s, start in data["sequences"]],
                    "base_right": [bool(x) for x in data["base_right"]]}
        except (ValueError, KeyError, TypeError, RecursionError):
            pass  # a damaged cache file is measured afresh
    reference = base_reference(base, tokenizer, prompts=prompts, questions=questions, reply_tokens=reply_tokens,
                               answer_tokens=answer_tokens, autocast=autocast_for(precision))
    atomic_write_json(path, reference)
    return reference


def forgetting_applies(config, data_kind: str) -> bool:
    return getattr(config, "forgetting", "on") not in ("off", False) and data_kind == "sft" and \
        has_real_weights(config)


def forgetting_work(config, tokenizer) -> list[dict]:
    """The generation jobs `forgetting_after_training` will run, for its predicted duration: the tuned model's
    answers, the KL forward passes of both models, and the base model's replies unless they are on disk."""
    questions = [tokenize_prompt(tokenizer, [{"role": "user", "content": q["question"]}]) for q in general_questions()]
    prompts = [tokenize_prompt(tokenizer, [{"role": "user", "content": p}]) for p in general_prompts()]
    mean = lambda rows: sum(map(len, rows)) / max(len(rows), 1)  # noqa: E731
    jobs = [dict(prompts=len(questions), prompt_tokens=mean(questions), max_new_tokens=ANSWER_TOKENS),
            dict(prompts=2 * len(prompts), prompt_tokens=mean(prompts) + REPLY_TOKENS, max_new_tokens=1)]
    path = _reference_path(config.model, resolve_precision(config.precision), REPLY_TOKENS, ANSWER_TOKENS)
    if not path.is_file():
        jobs += [dict(prompts=len(prompts), prompt_tokens=mean(prompts), max_new_tokens=REPLY_TOKENS),
                 dict(prompts=len(questions), prompt_tokens=mean(questions), max_new_tokens=ANSWER_TOKENS)]
    return jobs


def resolve_precision(precision: str) -> str:
    """The training loop's choice: bf16 only where this CPU's measured bf16 matmul is faster."""
    if precision == "auto":
        return measure_peaks().best_precision
    return precision


def autocast_for(precision: str):
    return autocast_factory(resolve_precision(precision))
