"""Batched decoding with a KV cache: the one place tunegap turns prompts into replies.

Evaluation, the in-context-learning arms, the forgetting measurement, `tunegap generate` and the RL loop's
sampling all come here. A short loop of our own instead of `model.generate`, because decoding a small model on
a CPU is bound by the weights read on every step, not by arithmetic, so what pays is doing fewer and fuller
steps (measured side by side in `benchmarks/generation.py`):

  * a prefix shared by every prompt (the chat template's system text, or the k solved examples of a few-shot
    prompt) is encoded once and its KV cache copied to every row, as a serving stack's prompt cache does;
  * each prompt of a sampled group (`repeats`) is encoded once and its cache repeated, not re-encoded;
  * rows that have produced EOS leave the batch (once a quarter of it has), so it shrinks instead of decoding
    padding;
  * prompts are batched by length, and the prefill keeps logits at its last position only.

Greedy replies are the same tokens as decoding each prompt alone (tested): positions follow each row's own
tokens, padding is masked, and the cached prefix gives the same logits as encoding it with every prompt.
Models whose adapters change the sequence (prompt or prefix tuning, which prepend to the input or the cache)
go through `model.generate`, which PEFT extends for them.
"""

from __future__ import annotations

import contextlib
import copy
import inspect

import torch
from transformers.cache_utils import DynamicLayer

# rows decoded together, at most: a step costs little more for 64 rows than for 32 on a CPU (default model,
# 2-core Zen 4, measured: 152 / 110 / 88 ms per 24-token reply at 16 / 32 / 64 rows), fewer when their KV
# caches would pass KV_BUDGET_BYTES (the default model's is ~46 KB per token in fp32)
DEFAULT_BATCH = 64
KV_BUDGET_BYTES = 2 << 30
# a shared prefix shorter than this is not worth a separate forward pass
MIN_SHARED_PREFIX = 8


def common_prefix_length(prompts: list[list[int]]) -> int:
    """Length of the longest token prefix every prompt starts with."""
    first, n = prompts[0], min(len(p) for p in prompts)
    for other in prompts[1:]:
        i = 0
        while i < n and other[i] == first[i]:
            i += 1
        n = i
    return n


def cut_at_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    """A reply up to and including its first EOS (the whole of it if none)."""
    if eos_id is not None and eos_id in tokens:
        return tokens[:tokens.index(eos_id) + 1]
    return tokens


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def rows_that_fit(model, tokens_per_row: int, requested: int) -> int:
    """At most `requested` rows whose KV caches of `tokens_per_row` tokens fit in KV_BUDGET_BYTES."""
    config = _transformers_model(model).config
    try:
        config = config.get_text_config()
        layers = config.num_hidden_layers
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        element = next(_transformers_model(model).parameters()).element_size()
    except (AttributeError, StopIteration, TypeError, ZeroDivisionError):
        return requested
    per_row = 2 * layers * heads * head_dim * element * max(1, tokens_per_row)
    return max(1, min(requested, KV_BUDGET_BYTES // per_row))


def _transformers_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _changes_sequence(model) -> bool:
    """PEFT prompt learning (prompt tuning, prefix tuning) prepends virtual tokens; only its generate knows how."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


class _ReplyBuffer(DynamicLayer):
    """A layer's keys and values in a buffer with room for the whole reply: each decoding step writes its column
    in place. `DynamicLayer` concatenates instead, copying the whole cache on every step, which on a long
    few-shot prompt moves more bytes than the step's weights and attention read together."""

    def __init__(self, layer: DynamicLayer, room: int):
        super().__init__()
        batch, heads, length, _ = layer.keys.shape
        self.key_buffer = layer.keys.new_empty(batch, heads, length + room, layer.keys.shape[-1])
        self.value_buffer = layer.values.new_empty(batch, heads, length + room, layer.values.shape[-1])
        self.key_buffer[:, :, :length] = layer.keys
        self.value_buffer[:, :, :length] = layer.values
        self.device, self.is_initialized, self.length = layer.keys.device, True, length
        self._views()

    def _views(self) -> None:
        self.keys = self.key_buffer[:, :, :self.length]
        self.values = self.value_buffer[:, :, :self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        new = key_states.shape[-2]
        self.key_buffer[:, :, self.length:self.length + new] = key_states
        self.value_buffer[:, :, self.length:self.length + new] = value_states
        self.length += new
        self._views()
        return self.keys, self.values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.key_buffer = self.key_buffer.index_select(0, beam_idx)
        self.value_buffer = self.value_buffer.index_select(0, beam_idx)
        self._views()


def _make_room(cache, room: int) -> None:
    """Move a prefilled `DynamicCache` into reply buffers (other cache kinds, e.g. sliding windows, stay as is)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized:
            layers[i] = _ReplyBuffer(layer, room)


class _Rows:
    """The live rows of one decoding batch: their cache, attention mask, next positions and replies."""

    def __init__(self, model, cache, mask, positions, indices, keep_last_logits: bool):
        self.model, self.cache, self.mask, self.positions = model, cache, mask, positions
        self.indices = indices  # which output each live row belongs to
        self.keep_last = {"logits_to_keep": 1} if keep_last_logits else {}

    def forward(self, ids, positions):
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, past_key_values=self.cache,
                         use_cache=True, **self.keep_last)
        self.cache = out.past_key_values
        return out.logits[:, -1].float()

    def keep(self, alive: torch.Tensor) -> None:
        """Drop finished rows from the batch (the cache included)."""
        where = alive.nonzero().squeeze(1)
        self.cache.reorder_cache(where)
        self.mask, self.positions = self.mask[where], self.positions[where]
        self.indices = [self.indices[i] for i in where.tolist()]


def _pick(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1).squeeze(1)


def _prefill(model, prompts, prefix_cache, prefix_len, pad_id, keep_last):
    """Encode each prompt after the shared prefix, left-padded; returns the live rows and their last logits."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    suffix_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    # each row's positions count its own tokens only, as if it were decoded alone; padding gets position 0
    positions = (prefix_len + suffix_mask.cumsum(-1) - 1).clamp(min=0) * suffix_mask
    mask = torch.cat([torch.ones(len(prompts), prefix_len, dtype=suffix_mask.dtype), suffix_mask], dim=1)
    cache = None
    if prefix_cache is not None:
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(prompts))
    rows = _Rows(model, cache, mask, positions[:, -1:], list(range(len(prompts))), keep_last)
    return rows, rows.forward(ids, positions)


def _decode_batch(model, prompts, *, prefix_cache, prefix_len, repeats, max_new_tokens, eos_id, pad_id,
                  temperature, keep_last, on_token) -> list[list[int]]:
    rows, logits = _prefill(model, prompts, prefix_cache, prefix_len, pad_id, keep_last)
    if repeats > 1:  # a sampled group: one prefill per prompt, its cache repeated for each reply
        rows.cache.batch_repeat_interleave(repeats)
        rows.mask = rows.mask.repeat_interleave(repeats, 0)
        rows.positions = rows.positions.repeat_interleave(repeats, 0)
        rows.indices = list(range(len(prompts) * repeats))
        logits = logits.repeat_interleave(repeats, 0)
    _make_room(rows.cache, max_new_tokens)
    replies: list[list[int]] = [[] for _ in rows.indices]
    finished = torch.zeros(len(rows.indices), dtype=torch.bool)
    for step in range(max_new_tokens):
        tokens = _pick(logits, temperature)
        if on_token is not None:
            on_token()
        for row, token, done in zip(rows.indices, tokens.tolist(), finished.tolist()):
            if not done:
                replies[row].append(token)
        if eos_id is not None:
            finished |= tokens == eos_id
        if step == max_new_tokens - 1 or finished.all():
            break
        # a finished row leaves the batch once a quarter of the batch has finished: each removal copies the cache
        if finished.sum() * 4 >= len(finished):
            rows.keep(~finished)
            tokens, finished = tokens[~finished], finished[~finished]
        rows.mask = torch.cat([rows.mask, rows.mask.new_ones(len(rows.indices), 1)], dim=1)
        rows.positions = rows.positions + 1
        logits = rows.forward(tokens[:, None], rows.positions)
    return replies


def _generate_with_hf(model, prompts, *, repeats, max_new_tokens, eos_id, pad_id, temperature, batch_size):
    """`model.generate`, left-padded batches: for PEFT prompt learning, whose virtual tokens only it handles."""
    replies: list[list[int]] = []
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False)
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             num_return_sequences=repeats, pad_token_id=pad_id, eos_token_id=eos_id, **sampling)
        replies += [cut_at_eos(row, eos_id) for row in out[:, width:].tolist()]
    return replies


def decode(model, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int | None, pad_id: int,
           temperature: float = 0.0, repeats: int = 1, batch_size: int = DEFAULT_BATCH,
           autocast=contextlib.nullcontext, share_prefix: bool = True, on_token=None) -> list[list[int]]:
    """Replies (token ids, ending at the first EOS if one came) to each prompt, `repeats` per prompt in order.

    Greedy when `temperature` is 0, else sampled from softmax(logits / temperature) with torch's global RNG
    (so a resumed run that restores the RNG samples the same replies). `on_token()` is called as each
    step's tokens are chosen (the duration probes time the steps with it).
    """
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast():
            if _changes_sequence(model):
                return _generate_with_hf(model, prompts, repeats=repeats, max_new_tokens=max_new_tokens,
                                         eos_id=eos_id, pad_id=pad_id, temperature=temperature,
                                         batch_size=batch_size)
            return _decode_all(model, prompts, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                               temperature=temperature, repeats=repeats, batch_size=batch_size,
                               share_prefix=share_prefix, on_token=on_token)
    finally:
        model.train(was_training)


def _decode_all(model, prompts, *, max_new_tokens, eos_id, pad_id, temperature, repeats, batch_size, share_prefix,
                on_token):
    keep_last = _accepts(_transformers_model(model), "logits_to_keep")
    # keep one token of every prompt out of the prefix: each row's own last position gives its first logits
    prefix_len = min(common_prefix_length(prompts), min(len(p) for p in prompts) - 1) if share_prefix else 0
    prefix_cache = None
    if prefix_len >= MIN_SHARED_PREFIX:
        out = model(input_ids=torch.tensor([prompts[0][:prefix_len]]), use_cache=True,
                    **({"logits_to_keep": 1} if keep_last else {}))
        prefix_cache = out.past_key_values
    else:
        prefix_len = 0
    # longest first, so each batch holds prompts of similar length (little padding)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    longest = max(map(len, prompts)) + max_new_tokens
    per_batch = max(1, rows_that_fit(model, longest, batch_size) // repeats)
    replies: list[list[int] | None] = [None] * (len(prompts) * repeats)
    for start in range(0, len(order), per_batch):
        chunk = order[start:start + per_batch]
        out = _decode_batch(model, [prompts[i][prefix_len:] for i in chunk], prefix_cache=prefix_cache,
                            prefix_len=prefix_len, repeats=repeats, max_new_tokens=max_new_tokens, eos_id=eos_id,
                            pad_id=pad_id, temperature=temperature, keep_last=keep_last, on_token=on_token)
        for j, i in enumerate(chunk):
            replies[i * repeats:(i + 1) * repeats] = out[j * repeats:(j + 1) * repeats]
    return replies
