"""Next-token cross-entropy: supervised fine-tuning (loss on the replies) and pretraining (loss on a corpus)."""

from __future__ import annotations

from dataclasses import dataclass

from ..costs.flops import Flops, train_step_flops
from ..data.packing import Batch, make_batch
from ..data.sources import prepare
from ..losses import linear_cross_entropy
from ..precision import FP32_MATH_ATTENTION
from .base import Context, LossOutput, Objective, heldout_sums, register


def sum_loss(ctx: Context, batch: Batch):
    """Summed next-token cross-entropy over loss-bearing tokens, in fp32.

    The vocabulary projection runs only on hidden states whose next token carries loss: prompt tokens
    need no logits, which saves FLOPs and the [tokens x vocab] logits memory. Methods that lengthen the
    sequence (prompt/prefix tuning) go through PEFT's forward instead. The head and the cross-entropy are
    fused and chunked (`losses.linear_cross_entropy`), so no [tokens x vocab] logits tensor is ever built.
    """
    import torch
    import torch.nn.functional as F

    where = batch.loss_positions  # flat indices of the loss-bearing positions (data.packing.make_batch)
    targets = batch.targets.flatten().index_select(0, where)
    at_loss = lambda t: t.flatten(0, 1).index_select(0, where)  # noqa: E731  [rows, width, ...] -> [n_loss, ...]
    with ctx.autocast():
        if ctx.method.changes_sequence:
            logits = ctx.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               use_cache=False).logits[:, -batch.width:]
            logits = at_loss(logits)
        else:
            hidden = ctx.base.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                            attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
            head = ctx.base.get_output_embeddings()
            if isinstance(head, torch.nn.Linear) and head.bias is None:  # fused + chunked: no logits tensor
                return linear_cross_entropy(at_loss(hidden), head.weight, targets)
            logits = head(at_loss(hidden))
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def step_flops(shape, trainable, ctx: Context, batch: Batch, checkpointing: bool) -> Flops:
    """The formula's FLOPs of `sum_loss` forward and backward on `batch` (logits only at loss positions)."""
    logit_tokens = None if ctx.method.changes_sequence else batch.n_loss_tokens
    math_attention = getattr(ctx.base.config, "_attn_implementation", None) == FP32_MATH_ATTENTION
    return train_step_flops(shape, trainable, sequences=batch.rows, seq_len=batch.width,
                            logit_tokens=logit_tokens, checkpointing=checkpointing,
                            attention_rescore=not math_attention)


@register
@dataclass
class NextToken(Objective):
    """Cross-entropy of each next token where the data marks a loss (replies for SFT, every token of a corpus)."""

    name = "next-token"
    unit = "token"

    def prepare_data(self, config, tokenizer):
        return prepare(config, tokenizer)

    def make_batch(self, examples, *, capacity, pad_id, pack):
        return make_batch(examples, capacity=capacity, pad_id=pad_id, pack=pack)

    def loss(self, ctx, batch):
        return LossOutput(sum_loss(ctx, batch))

    def step_flops(self, shape, trainable, ctx, batch, *, checkpointing) -> Flops:
        return step_flops(shape, trainable, ctx, batch, checkpointing)


def heldout_loss(ctx: Context, examples, batch_size: int, seq_len: int) -> float | None:
    """Mean cross-entropy per loss-bearing token on held-out examples (nats/token); None without examples."""
    if not examples:
        return None
    total, count = heldout_sums(NextToken(), ctx, examples, batch_size, seq_len)
    return total / max(count, 1)
