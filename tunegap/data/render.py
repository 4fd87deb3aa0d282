"""Turn conversations and documents into token ids and loss labels for training.

Loss is put only on what the model should learn to write: assistant contents plus the
end-of-turn token that closes each assistant message (so the model learns to stop). Prompts,
system text and template markup get label -100. Labels are NOT shifted; the trainer shifts.

Assistant spans are found by character offsets: the conversation is rendered once to text,
each assistant content is located in that text (the template's rendering of the prefix with
``add_generation_prompt=True`` tells where the answer starts), and the text is tokenised once
with ``return_offsets_mapping`` so token ids are exactly what the model sees at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence, overload

from ..losses import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "Example",
    "RenderStats",
    "render_conversation",
    "tokenize_sft",
    "tokenize_corpus",
    "tokenize_prompt",
]


@dataclass
class Example:
    """One training sequence; labels[i] is input_ids[i] where loss applies, else -100."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_loss_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass
class RenderStats:
    """Counts that tell a user how much of their data actually reached the model."""

    n_examples: int = 0  # examples returned
    n_truncated: int = 0  # returned, but cut to max_len / block_size
    n_dropped: int = 0  # not returned (too long with overflow="drop", or no loss token left)
    n_tokens: int = 0  # tokens in the returned examples
    n_loss_tokens: int = 0  # tokens with a label in the returned examples
    n_tail_tokens: int = 0  # tokenize_corpus only: remainder tokens that did not fill a block


def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _eos(tokenizer: Any) -> str:
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise ValueError("the tokenizer has no eos_token; it is needed to mark the end of a reply")
    return eos


def _fallback_render(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    """Plain format for tokenizers without a chat template: <|role|>\\ncontent[eos]\\n."""
    eos = _eos(tokenizer)
    parts = []
    for m in messages:
        close = eos if m["role"] == "assistant" else ""
        parts.append(f"<|{m['role']}|>\n{m['content']}{close}\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


def render_conversation(tokenizer: Any, messages: Sequence[dict[str, str]],
                        add_generation_prompt: bool = False) -> str:
    """Render messages to text with the tokenizer's chat template, or the plain fallback."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if _has_template(tokenizer):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    return _fallback_render(tokenizer, msgs, add_generation_prompt)


def _encode(tokenizer: Any, text: str, offsets: bool = False) -> Any:
    # Templates write their own BOS/markers; letting the tokenizer add specials would double them.
    return tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)


def _assistant_char_spans(tokenizer: Any, messages: Sequence[dict[str, str]], full: str) -> list[tuple[int, int, int]]:
    """For each assistant message: (content start, content end, turn end) as char positions in `full`."""
    spans = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render_conversation(tokenizer, messages[:i], add_generation_prompt=True)
        turn = render_conversation(tokenizer, messages[: i + 1])
        turn_end = len(turn) if full.startswith(turn) else len(full)
        at = -1
        for content in dict.fromkeys((m["content"], m["content"].strip())):  # some templates trim
            if full.startswith(prefix):  # the usual case: the reply starts where the generation prompt ends
                at = full.find(content, max(len(prefix), cursor))
            elif full.startswith(turn):  # the reply is the last thing in its own turn
                at = turn.rfind(content, cursor)
            else:  # the template rewrites earlier turns; search after the previous reply
                at = full.find(content, cursor)
            if at >= 0:
                break
        if at < 0:
            raise ValueError(f"the chat template does not reproduce assistant message {i} verbatim; "
                             "cannot locate its tokens")
        end = at + len(content)
        spans.append((at, end, max(turn_end, end)))
        cursor = end
    return spans


def _sft_example(tokenizer: Any, messages: Sequence[dict[str, str]]) -> Example:
    full = render_conversation(tokenizer, messages)
    enc = _encode(tokenizer, full, offsets=True)
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in enc["offset_mapping"]]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is not None:
        special.add(eos_id)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end, turn_end in _assistant_char_spans(tokenizer, messages, full):
        last_content = -1
        for t, (a, b) in enumerate(offsets):
            if a < end and b > start and b > a:  # overlaps the content
                labels[t] = ids[t]
                last_content = t
        if last_content < 0:
            continue
        # The end-of-turn marker: the first special token after the content, inside this turn.
        for t in range(last_content + 1, len(ids)):
            a, _ = offsets[t]
            if a >= turn_end:
                break
            if ids[t] in special:
                labels[t] = ids[t]
                break
    return Example(input_ids=ids, labels=labels)


def check_fit(overflow: str, max_len: int) -> None:
    """The two ways an over-long example is fitted (`truncate` or `drop`) and a positive length: else ValueError."""
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', not {overflow!r}")
    if max_len < 1:
        raise ValueError(f"max_len must be positive, got {max_len}")


def tokenize_sft(tokenizer: Any, records: Iterable[dict[str, Any]], max_len: int,
                 overflow: Literal["truncate", "drop"] = "truncate") -> tuple[list[Example], RenderStats]:
    """Tokenise conversations (``{"messages": [...]}``) into labelled examples.

    ``overflow="truncate"`` keeps the first max_len tokens (prompt context first, as at inference);
    ``"drop"`` leaves over-long examples out. Either way an example with no loss token left is
    dropped and counted, since it would only waste compute.
    """
    check_fit(overflow, max_len)
    examples: list[Example] = []
    stats = RenderStats()
    for record in records:
        ex = _sft_example(tokenizer, record["messages"])
        if len(ex) > max_len:
            if overflow == "drop":
                stats.n_dropped += 1
                continue
            ex = Example(ex.input_ids[:max_len], ex.labels[:max_len])
            truncated = True
        else:
            truncated = False
        n_loss = ex.n_loss_tokens
        if n_loss == 0:
            stats.n_dropped += 1
            continue
        stats.n_truncated += truncated
        stats.n_examples += 1
        stats.n_tokens += len(ex)
        stats.n_loss_tokens += n_loss
        examples.append(ex)
    return examples, stats


@overload
def tokenize_corpus(tokenizer: Any, texts: Iterable[str], block_size: int,
                    return_stats: Literal[False] = ...) -> list[Example]: ...
@overload
def tokenize_corpus(tokenizer: Any, texts: Iterable[str], block_size: int,
                    return_stats: Literal[True]) -> tuple[list[Example], RenderStats]: ...


def tokenize_corpus(tokenizer, texts, block_size, return_stats=False):
    """Pack documents into fixed blocks for continued pre-training (every token carries loss).

    Each document is followed by eos so the model sees where documents end; the stream is cut
    into block_size pieces and the incomplete tail is dropped (its size is
    ``RenderStats.n_tail_tokens`` with ``return_stats=True``).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token; it is needed between documents")
    stream: list[int] = []
    for text in texts:
        stream.extend(_encode(tokenizer, text)["input_ids"])
        stream.append(eos_id)
    n_blocks = len(stream) // block_size
    examples = [Example(stream[i * block_size:(i + 1) * block_size], stream[i * block_size:(i + 1) * block_size])
                for i in range(n_blocks)]
    if not return_stats:
        return examples
    n_tokens = n_blocks * block_size
    stats = RenderStats(n_examples=n_blocks, n_tokens=n_tokens, n_loss_tokens=n_tokens,
                        n_tail_tokens=len(stream) - n_tokens, n_dropped=int(len(stream) > n_tokens))
    return examples, stats


def tokenize_prompt(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids that end where the assistant's reply should begin (for generation).

    A trailing assistant message, if present, is ignored, so a training record can be passed as is.
    """
    msgs = list(messages)
    if msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    return list(_encode(tokenizer, render_conversation(tokenizer, msgs, add_generation_prompt=True))["input_ids"])
