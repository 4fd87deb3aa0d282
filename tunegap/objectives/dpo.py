"""Direct Preference Optimization (Rafailov et al. 2023): fit a policy to preference pairs with no reward model.

Eq. 7 of the paper, per pair (x, y_w, y_l):

    L = -log sigmoid( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

with log pi(y|x) summed over the reply's tokens only. beta * (log pi - log pi_ref) is the implicit reward of a
reply (Sec. 5), so the step also logs reward accuracy, margin and both rewards, as TRL's DPOTrainer does.

The reference pi_ref is the starting model, never a second copy of it in memory:
  * PEFT methods (LoRA, IA3, prompt/prefix): the same model with its adapters switched off
    (`PeftModel.disable_adapter`), one extra forward pass per step without gradients; its FLOPs are part of the
    step's formula (and so of the counted/formula check) and reported apart as `dpo_reference_flops`;
  * every other method (full, freeze, bottleneck adapters) changes the weights themselves, so the reference
    log-probs of every training and held-out pair are computed once in `setup`, before the first update
    (TRL's `precompute_ref_log_probs`); those FLOPs are outside the steps and reported only as a metric.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..costs.flops import Flops, forward_flops
from ..costs.shape import ModelShape
from ..errors import ConfigError
from .base import Context, LossOutput, register
from .next_token import step_flops as token_step_flops
from .pairs import PairBatch, PairObjective, heldout_means, prepare_pairs, sharded


def reply_logps(ctx: Context, batch: PairBatch):
    """log pi(y|x) of every sequence in the batch: its reply tokens' log-probabilities summed, in fp32.

    As in SFT (`next_token.sum_loss`), the vocabulary projection runs only where a reply token is predicted;
    methods that lengthen the sequence (prompt/prefix tuning) take their logits from PEFT's own forward."""
    import torch
    import torch.nn.functional as F

    where = batch.loss_positions
    targets = batch.targets.flatten().index_select(0, where)
    at_loss = lambda t: t.flatten(0, 1).index_select(0, where)  # noqa: E731  [rows, width, ...] -> [n_loss, ...]
    with ctx.autocast():
        if ctx.method.changes_sequence:
            logits = at_loss(ctx.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                       use_cache=False).logits[:, -batch.width:])
        else:
            hidden = ctx.base.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                            attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
            logits = ctx.base.get_output_embeddings()(at_loss(hidden))
    token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")
    sums = torch.zeros(batch.n_sequences, dtype=torch.float32, device=token_logps.device)
    return sums.index_add(0, batch.owners, token_logps)


def reference_logps(ctx: Context, batch: PairBatch):
    """log pi_ref(y|x): precomputed ones when the batch carries them, else the same model with adapters off."""
    import torch

    if batch.reference is not None:
        return batch.reference
    if not hasattr(ctx.model, "disable_adapter"):
        raise ConfigError("dpo: no reference log-probs for this batch; a method without PEFT adapters needs them "
                          "precomputed by DPO.setup")
    with torch.no_grad(), ctx.model.disable_adapter():
        return reply_logps(ctx, batch)


def dpo_terms(policy, reference, beta: float):
    """Per-pair losses (Eq. 7) and the implicit rewards beta * log(pi / pi_ref) of chosen and rejected (Sec. 5).
    Sequences alternate chosen, rejected."""
    import torch.nn.functional as F

    ratio = policy - reference
    chosen, rejected = beta * ratio[0::2], beta * ratio[1::2]
    return -F.logsigmoid(chosen - rejected), chosen, rejected


@register
@dataclass
class DPO(PairObjective):
    """DPO on preference pairs (`--objective dpo --beta B`); the loss is summed per pair, normalised by pairs."""

    name = "dpo"
    beta: float = 0.1
    pack: bool = True

    def __post_init__(self):
        if not self.beta > 0:
            raise ConfigError(f"--beta: must be positive, got {self.beta}")
        self.reference_flops = 0.0
        self.eval_pairs: list = []

    def prepare_data(self, config, tokenizer):
        return prepare_pairs(config, tokenizer, generation_records=True)

    def setup(self, ctx, data):
        self.eval_pairs = data.eval
        if hasattr(ctx.model, "disable_adapter"):  # PEFT: the reference is this model with adapters off
            return
        if sharded(ctx):
            raise ConfigError("dpo: with --parallel fsdp only PEFT methods are supported (the reference log-probs "
                              "of full weights are precomputed outside the sharded loss module); use ddp or "
                              "--method lora")
        self.reference_flops = self.precompute_reference(ctx, [*data.train, *data.eval])

    def precompute_reference(self, ctx, examples: list) -> float:
        """Store log pi_ref of both replies on every pair, with the starting weights; returns the FLOPs spent."""
        import torch

        shape = ModelShape.from_hf_config(ctx.base.config)
        flops, done = 0.0, 0
        was_training = ctx.model.training
        ctx.model.eval()  # a reference is deterministic: no dropout
        with torch.no_grad():
            for batch in self.batches(ctx, examples, pack=self.pack):
                logps = reply_logps(ctx, batch).tolist()
                for i, example in enumerate(examples[done:done + batch.n_examples]):
                    example.reference = (logps[2 * i], logps[2 * i + 1])
                done += batch.n_examples
                flops += forward_flops(shape, sequences=batch.rows, seq_len=batch.width,
                                       logit_tokens=batch.n_loss_tokens)
        ctx.model.train(was_training)
        return flops

    def loss(self, ctx, batch):
        policy = reply_logps(ctx, batch)
        reference = reference_logps(ctx, batch)
        losses, chosen, rejected = dpo_terms(policy, reference, self.beta)
        drift = (policy - reference).detach().view(-1, 2).mean(1)
        metrics = {"reward_accuracy": (chosen > rejected).float().sum(), "reward_margin": (chosen - rejected).sum(),
                   "reward_chosen": chosen.sum(), "reward_rejected": rejected.sum(),
                   # log pi/pi_ref on the data's replies, mean of the pair's two: an implicit KL(pi||pi_ref) that
                   # would be unbiased only for replies sampled from pi; it shows how far the policy drifted
                   "kl_implicit": drift.sum(),
                   "logp_chosen": policy[0::2].sum(), "logp_rejected": policy[1::2].sum()}
        return LossOutput(losses.sum(), {k: v.detach() for k, v in metrics.items()})

    def step_flops(self, shape, trainable, ctx, batch, *, checkpointing) -> Flops:
        """The policy's forward and backward as for SFT, plus the reference's forward when it runs in the step
        (adapters off: the base model's forward, logits where the policy has them)."""
        policy = token_step_flops(shape, trainable, ctx, batch, checkpointing)
        if batch.reference is not None:
            return policy
        logit_tokens = None if ctx.method.changes_sequence else batch.n_loss_tokens
        reference = forward_flops(shape, sequences=batch.rows, seq_len=batch.width, logit_tokens=logit_tokens)
        self.reference_flops += reference  # the steps this process ran (a resumed run counts from its restart)
        return policy + Flops(reference, 0.0, 0.0)

    def end_metrics(self, ctx):
        """How the reference was computed and its FLOPs; held-out reward accuracy, margin and drift per pair."""
        how = ("the same model with adapters disabled, in each step (FLOPs inside flops_forward)"
               if hasattr(ctx.model, "disable_adapter") else
               "precomputed once from the starting weights before step 1 (FLOPs not in flops_total)")
        metrics = {"dpo_beta": self.beta, "dpo_reference": how, "dpo_reference_flops": self.reference_flops}
        if sharded(ctx):  # a forward outside the FSDP loss module would see shards
            return metrics
        return {**metrics, **heldout_means(self, ctx, self.eval_pairs)}
