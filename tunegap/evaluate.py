"""Generation and task metrics: what a base model or a finished run can actually do on the task.

Also the in-context-learning arm: frozen weights with k solved examples in the prompt, whose cost is a
longer prompt on every query instead of a one-time training run.
"""

from __future__ import annotations

import contextlib
import time

from .data.render import tokenize_prompt, tokenize_sft
from .generation import DEFAULT_BATCH, common_prefix_length, decode
from .losses import IGNORE_INDEX


def generate(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int = 96,
             batch_size: int = DEFAULT_BATCH, autocast=contextlib.nullcontext) -> tuple[list[str], list[int], list[int]]:
    """Greedy replies to each conversation (its trailing assistant turn, if any, is ignored).

    Returns the texts, each prompt's length and each reply's length in tokens (for inference FLOPs).
    """
    prompts = [tokenize_prompt(tokenizer, conv) for conv in conversations]
    texts, new_lens = generate_from_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size, autocast=autocast)
    return texts, [len(p) for p in prompts], new_lens


def generate_from_ids(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int,
                      batch_size: int = DEFAULT_BATCH, autocast=contextlib.nullcontext) -> tuple[list[str], list[int]]:
    """Greedy replies to prompts already tokenised: their texts and lengths in tokens."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies = decode(model, prompts, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id, pad_id=pad,
                     batch_size=batch_size, autocast=autocast)
    return [tokenizer.decode(reply, skip_special_tokens=True).strip() for reply in replies], list(map(len, replies))


def few_shot(conversation: list[dict], shots: list[dict]) -> list[dict]:
    """Prepend k solved tickets as earlier turns of the same chat: the in-context-learning prompt."""
    turns: list[dict] = []
    for shot in shots:
        turns += [m for m in shot["messages"] if m["role"] != "system"]
    return turns + [m for m in conversation if m["role"] != "assistant"]


def support_metrics(model, tokenizer, records: list[dict], *, shots: list[dict] = (), max_new_tokens: int = 96,
                    autocast=contextlib.nullcontext) -> dict:
    """Style adherence, product-name accuracy and refusal precision/recall on generated replies (measured)."""
    from .data.support import aggregate_scores

    return task_metrics(model, tokenizer, records, aggregate_scores, shots=shots, max_new_tokens=max_new_tokens,
                        autocast=autocast)


def task_metrics(model, tokenizer, records: list[dict], score, *, shots: list[dict] = (), max_new_tokens: int = 96,
                 autocast=contextlib.nullcontext) -> dict:
    """Generate a reply to each held-out record and score them with `score(metas, texts)` (a shipped task's
    scorer), plus what generation took and what a prompt cache would share (all measured)."""
    started = time.perf_counter()
    prompts = [tokenize_prompt(tokenizer, few_shot(r["messages"], list(shots))) for r in records]
    texts, new_lens = generate_from_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, autocast=autocast)
    scores = score([r["meta"] for r in records], texts)
    scores["generation_seconds"] = time.perf_counter() - started
    scores["mean_prompt_tokens"] = sum(map(len, prompts)) / max(len(prompts), 1)
    scores["mean_new_tokens"] = sum(new_lens) / max(len(new_lens), 1)
    # what a prompt cache (ours, or a serving stack's) encodes once for every query: the system text and the shots
    scores["shared_prefix_tokens"] = common_prefix_length(prompts) if prompts else 0
    scores["samples"] = [{"prompt": r["messages"][-2]["content"] if len(r["messages"]) > 1 else "", "reply": t}
                         for r, t in list(zip(records, texts))[:3]]
    return scores


def reply_loss(model, tokenizer, records: list[dict], seq_len: int, *, autocast=contextlib.nullcontext
               ) -> tuple[float, int]:
    """Mean next-token loss (nats/token) over the reply tokens of `records`, as training labels them, and how
    many tokens that is: the held-out loss of any SFT data set, with or without the support task's metadata."""
    import torch
    import torch.nn.functional as F

    examples, _ = tokenize_sft(tokenizer, records, seq_len)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast():
        for example in examples:  # one at a time: no padding to mask, and held-out sets are small
            ids = torch.tensor([example.input_ids])
            logits = model(input_ids=ids).logits[0, :-1].float()
            targets = torch.tensor(example.labels[1:])
            total += float(F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((targets != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1), count
