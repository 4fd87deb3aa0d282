"""Generation and task metrics: what a base model or a finished run can actually do on the task.

Also the in-context-learning arm: frozen weights with k solved examples in the prompt, whose cost is a
longer prompt on every query instead of a one-time training run.
"""

from __future__ import annotations

import contextlib

from .data.render import tokenize_prompt
from .generation import DEFAULT_BATCH, common_prefix_length, decode


def generate(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int = 96,
             batch_size: int = DEFAULT_BATCH, autocast=contextlib.nullcontext) -> tuple[list[str], list[int], list[int]]:
    """Greedy replies to each conversation (its trailing assistant turn, if any, is ignored).

    Returns the texts, each prompt's length and each reply's length in tokens (for inference FLOPs).
    """
    prompts = [tokenize_prompt(tokenizer, conv) for conv in conversations]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    replies = decode(model, prompts, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id, pad_id=pad,
                     batch_size=batch_size, autocast=autocast)
    texts = [tokenizer.decode(reply, skip_special_tokens=True).strip() for reply in replies]
    return texts, [len(p) for p in prompts], [len(reply) for reply in replies]


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

    import time

    conversations = [few_shot(r["messages"], list(shots)) for r in records]
    started = time.perf_counter()
    texts, prompt_lens, new_lens = generate(model, tokenizer, conversations, max_new_tokens=max_new_tokens,
                                            autocast=autocast)
    scores = aggregate_scores([r["meta"] for r in records], texts)
    scores["generation_seconds"] = time.perf_counter() - started
    scores["mean_prompt_tokens"] = sum(prompt_lens) / max(len(prompt_lens), 1)
    scores["mean_new_tokens"] = sum(new_lens) / max(len(new_lens), 1)
    # what a prompt cache (ours, or a serving stack's) encodes once for every query: the system text and the shots
    prompts = [tokenize_prompt(tokenizer, conv) for conv in conversations]
    scores["shared_prefix_tokens"] = common_prefix_length(prompts) if prompts else 0
    scores["samples"] = [{"prompt": r["messages"][-2]["content"] if len(r["messages"]) > 1 else "", "reply": t}
                         for r, t in list(zip(records, texts))[:3]]
    return scores
