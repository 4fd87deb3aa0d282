"""What the preference objectives (DPO, the reward model) share: pair data, pair batches, a run as the start.

A pair is one prompt with a chosen and a rejected reply (`data.preference`). A batch holds both replies of
each pair as two sequences, packed like SFT rows (`data.packing.make_batch`), plus where each sequence's
loss-bearing tokens and last token are, so an objective can sum a log-probability or read a score per
sequence. The normaliser is the number of pairs: each pair's loss is one term of the step's mean.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..data.loaders import DataError
from ..data.packing import make_batch, to_device
from ..data.preference import (PreferencePair, generate_support_preferences, load_preference_pairs,
                               tokenize_preferences)
from ..data.render import Example
from ..data.sources import SUPPORT, Prepared
from .base import Objective

if TYPE_CHECKING:  # for annotations only: torch is imported where a tensor is made
    import torch


@dataclass
class PairExample:
    """One tokenised pair; `reference` holds (log pi_ref(y_w|x), log pi_ref(y_l|x)) once DPO precomputed them."""

    pair: PreferencePair
    reference: tuple[float, float] | None = None

    def sides(self) -> tuple[Example, Example]:
        return self.pair.chosen(), self.pair.rejected()

    def __len__(self) -> int:
        """Tokens a step processes for this pair: both sequences, so the prompt counts twice."""
        return sum(len(side) for side in self.sides())


@dataclass
class PairBatch:
    """Both sides of each pair (chosen at even, rejected at odd sequence index), packed into rows."""

    input_ids: "torch.Tensor"  # [rows, width]
    position_ids: "torch.Tensor"  # [rows, width]
    targets: "torch.Tensor"  # [rows, width], next-token ids or IGNORE
    attention_mask: "torch.Tensor | None"  # only for unpacked (padded) batches
    loss_positions: "torch.Tensor"  # flat indices of the reply tokens' predecessors, as in data.packing.Batch
    owners: "torch.Tensor"  # [len(loss_positions)]: the sequence each loss position belongs to
    ends: "torch.Tensor"  # [2 * pairs]: flat index of each sequence's last non-pad token (a reward model's read-out)
    reference: "torch.Tensor | None"  # [2 * pairs]: precomputed reference log-probs, or None
    n_examples: int  # pairs
    n_tokens: int  # real tokens of both sides, padding excluded
    n_loss_tokens: int  # positions the objective's head reads: reply tokens (DPO) or sequence ends (reward)

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    @property
    def n_sequences(self) -> int:
        return 2 * self.n_examples


def make_pair_batch(examples: list[PairExample], *, capacity: int, pad_id: int, pack: bool) -> PairBatch:
    """Pack the 2n sides like SFT examples and record, per loss position, which side it belongs to."""
    import torch

    sides = [side for e in examples for side in e.sides()]
    packed = make_batch(sides, capacity=capacity, pad_id=pad_id, pack=pack)
    # Packing depends only on the lengths, so packing each side's index instead of its tokens lays out the
    # same rows: the result says which side every position holds (-1 for padding).
    owner = make_batch([Example([i] * len(s), s.labels) for i, s in enumerate(sides)], capacity=capacity,
                       pad_id=-1, pack=pack).input_ids.flatten()
    real = (owner >= 0) & (packed.input_ids.flatten() != pad_id)
    ends = torch.full((len(sides),), -1).scatter_reduce(0, owner[real], torch.arange(owner.numel())[real], "amax")
    known = all(e.reference is not None for e in examples)
    reference = torch.tensor([v for e in examples for v in e.reference]) if known else None
    return PairBatch(packed.input_ids, packed.position_ids, packed.targets, packed.attention_mask,
                     packed.loss_positions, owner.index_select(0, packed.loss_positions), ends, reference,
                     n_examples=len(examples), n_tokens=packed.n_tokens, n_loss_tokens=packed.n_loss_tokens)


def _records(config) -> tuple[list, list]:
    """Normalised train and held-out pair records: the shipped support set, or TRL-format JSONL files."""
    if config.data == SUPPORT:
        train, held = generate_support_preferences()
    else:
        train, held = load_preference_pairs(config.data), []
    if config.eval_data:
        held = load_preference_pairs(config.eval_data)
    return (train[:config.train_examples] if config.train_examples else train), held[:config.eval_examples]


def prepare_pairs(config, tokenizer, *, generation_records: bool) -> Prepared:
    """Tokenised pairs as the run's config says (`--data`, `--eval-data`, `--seq-len`, `--drop-long`); each side
    fits `seq_len` with its prompt. `generation_records`: give the held-out prompts with their chosen replies in
    SFT form, so the support task's generated-reply metrics can score a DPO policy."""
    train_records, held_records = _records(config)
    overflow = "drop" if config.drop_long else "truncate"
    train, train_stats = tokenize_preferences(tokenizer, train_records, config.seq_len, overflow)
    if not train:
        raise DataError(config.data, 0, "file", f"no preference pair left after fitting both sides to --seq-len "
                        f"{config.seq_len} ({train_stats.n_dropped} dropped)")
    held, held_stats = tokenize_preferences(tokenizer, held_records, config.seq_len, overflow)
    records = [{"messages": [*r["prompt"], *r["chosen"]], "meta": r.get("meta", {})} for r in held_records]
    return Prepared("preference", [PairExample(p) for p in train], [PairExample(p) for p in held],
                    records if generation_records and config.data == SUPPORT else [],
                    {"train": asdict(train_stats), "eval": asdict(held_stats), "source": config.data})


@dataclass
class PairObjective(Objective):
    """The data, batching and starting point DPO and the reward model share (their fields are TrainConfig's)."""

    unit = "pair"
    data: str = SUPPORT
    eval_data: str = ""
    seq_len: int = 512
    drop_long: bool = False
    train_examples: int = 0
    eval_examples: int = 64
    batch_size: int = 8

    def make_batch(self, examples, *, capacity, pad_id, pack):
        return make_pair_batch(examples, capacity=capacity, pad_id=pad_id, pack=pack)

    def normaliser(self, batch) -> int:
        return batch.n_examples

    def batches(self, ctx, examples: list, *, pack: bool):
        """`examples` in batches of --batch-size on the model's device, for passes outside the training steps."""
        device = next(ctx.model.parameters()).device
        for i in range(0, len(examples), self.batch_size):
            batch = self.make_batch(examples[i:i + self.batch_size], capacity=self.seq_len, pad_id=ctx.pad_id,
                                    pack=pack)
            yield to_device(batch, device)


def heldout_means(objective: PairObjective, ctx, examples: list) -> dict:
    """The objective's metrics averaged per held-out pair, without gradients, as `eval_<name>`; {} without pairs.

    Runs the model directly (not through a strategy): every rank gets the same numbers from the same pairs."""
    import torch

    if not examples:
        return {}
    sums, pairs = {}, 0
    was_training = ctx.model.training
    ctx.model.eval()
    with torch.no_grad():
        for batch in objective.batches(ctx, examples, pack=not ctx.method.changes_sequence):
            for key, value in objective.loss(ctx, batch).metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            pairs += objective.normaliser(batch)
    ctx.model.train(was_training)
    return {f"eval_{key}": value / pairs for key, value in sums.items()}


def sharded(ctx) -> bool:
    """FSDP has sharded the weights: a forward outside the strategy's loss module would see only shards."""
    return any(type(p).__name__ == "DTensor" for p in ctx.model.parameters())
