"""A reward model: the base model with a scalar head, trained on preference pairs (`--objective reward`).

Loss per pair, the Bradley-Terry model of a preference (Bradley & Terry 1952; as in Ouyang et al. 2022, Eq. 1):

    L = -log sigmoid( r(x, y_w) - r(x, y_l) )

where r reads the head at the sequence's last non-pad token, exactly where transformers'
`*ForSequenceClassification` reads it, so the saved model scores as it was trained.

While training, the head is a 1-output `nn.Linear` named `score` attached to the causal LM rather than a
`*ForSequenceClassification` model: every method then prepares the model as it does for SFT (PEFT's LoRA and
IA3 wrap a causal LM, TaskType.CAUSAL_LM, and fail on a classifier). Methods freeze it as a base weight;
`setup` makes it train again, since a reward model's head always trains. `save_outputs` writes plain
`AutoModelForSequenceClassification` weights (num_labels=1), adapters merged, with the tokenizer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

from ..costs.flops import Flops, train_step_flops
from ..costs.shape import ModelShape
from ..errors import ConfigError
from ..io import atomic_dir
from ..outputs import MODEL_DIR
from ..precision import FP32_MATH_ATTENTION
from .base import Context, LossOutput, register
from .pairs import PairBatch, PairObjective, heldout_means, make_pair_batch, prepare_pairs, sharded

SCORE = "score"  # transformers' name for a sequence classifier's head on Llama, Qwen, Mistral, GPT-2...


def attach_score_head(model, shape: ModelShape):
    """Add the scalar head, initialised as transformers initialises a classifier's: N(0, initializer_range)."""
    import torch

    head = torch.nn.Linear(shape.hidden_size, 1, bias=False)
    torch.nn.init.normal_(head.weight, std=getattr(model.config, "initializer_range", 0.02))
    model.add_module(SCORE, head)
    return model


def rewards(ctx: Context, batch: PairBatch):
    """r(x, y) of every sequence in the batch (fp32): the head applied to the last non-pad token's hidden state."""
    with ctx.autocast():
        hidden = ctx.base.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                        attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
        return getattr(ctx.base, SCORE)(hidden.flatten(0, 1).index_select(0, batch.ends)).squeeze(-1).float()


def to_sequence_classifier(lm, tokenizer):
    """The causal LM's decoder and its `score` head as a transformers sequence classifier with one label."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(lm.config)
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    classifier = AutoModelForSequenceClassification.from_config(config)
    state = {k: v for k, v in lm.state_dict().items() if not k.startswith(SCORE + ".")}
    missing, _ = classifier.load_state_dict(state, strict=False)  # the LM head is left out: unexpected, ignored
    head = classifier.get_submodule(missing[0].rsplit(".", 1)[0]) if len(missing) == 1 else None
    if head is None or tuple(head.weight.shape) != tuple(getattr(lm, SCORE).weight.shape):
        raise RuntimeError(f"{type(classifier).__name__}: expected one missing scalar head, got {missing}")
    head.weight.data.copy_(getattr(lm, SCORE).weight.data)
    return classifier


@register
@dataclass
class RewardModel(PairObjective):
    """Bradley-Terry reward model on preference pairs; the loss is summed per pair, normalised by pairs."""

    name = "reward"

    def __post_init__(self):
        self.eval_pairs: list = []

    def prepare_data(self, config, tokenizer):
        return prepare_pairs(config, tokenizer, generation_records=False)  # a scorer generates nothing

    def prepare_model(self, model, shape):
        return attach_score_head(super().prepare_model(model, shape), shape)

    def setup(self, ctx, data):
        method, shape = ctx.method, ModelShape.from_hf_config(ctx.base.config)
        if method.changes_sequence or (method.parts(shape) and not method.saves_adapter):
            raise ConfigError(f"reward: --method {method.name} cannot be written as a plain sequence classifier "
                              "(virtual tokens, or added modules PEFT cannot merge); use full, freeze, lora or ia3")
        head = getattr(ctx.base, SCORE)
        head.weight.data = head.weight.data.float()  # frozen linears may have been stored in bf16 (precision.py)
        head.requires_grad_(True)  # methods freeze it as a base weight; the head always trains
        self.eval_pairs = data.eval

    def make_batch(self, examples, *, capacity, pad_id, pack):
        batch = make_pair_batch(examples, capacity=capacity, pad_id=pad_id, pack=pack)
        return replace(batch, n_loss_tokens=batch.n_sequences)  # the head reads one position per sequence

    def loss(self, ctx, batch):
        import torch.nn.functional as F

        r = rewards(ctx, batch)
        chosen, rejected = r[0::2], r[1::2]
        losses = -F.logsigmoid(chosen - rejected)  # Bradley-Terry (Ouyang et al. 2022, Eq. 1)
        metrics = {"pairwise_accuracy": (chosen > rejected).float().sum(), "reward_margin": (chosen - rejected).sum(),
                   "reward_chosen": chosen.sum(), "reward_rejected": rejected.sum()}
        return LossOutput(losses.sum(), {k: v.detach() for k, v in metrics.items()})

    def step_flops(self, shape, trainable, ctx, batch, *, checkpointing) -> Flops:
        """`train_step_flops` with the head as the output projection: one output instead of the vocabulary, read at
        one position per sequence, its weight always trained."""
        math_attention = getattr(ctx.base.config, "_attn_implementation", None) == FP32_MATH_ATTENTION
        return train_step_flops(replace(shape, vocab_size=1), replace(trainable, head=True), sequences=batch.rows,
                                seq_len=batch.width, logit_tokens=batch.n_sequences, checkpointing=checkpointing,
                                attention_rescore=not math_attention)

    def end_metrics(self, ctx):
        """Held-out pairwise accuracy, margin and mean rewards per pair."""
        return {} if sharded(ctx) else heldout_means(self, ctx, self.eval_pairs)

    def save_outputs(self, folder, model, base, tokenizer, method) -> bool:
        """model/ as a plain sequence classifier that `AutoModelForSequenceClassification.from_pretrained` loads;
        adapters are merged on a copy, so the trainer's model stays as it trained."""
        lm = copy.deepcopy(model).merge_and_unload() if hasattr(model, "merge_and_unload") else base
        with atomic_dir(folder / MODEL_DIR) as staging:
            to_sequence_classifier(lm, tokenizer).save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
        return True
