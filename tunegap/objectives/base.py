"""The objective interface and its registry.

An objective builds its data and batches, computes the loss *summed* over the batch's units (loss tokens for
next-token prediction, pairs for preference losses) with metrics summed the same way, counts how many units a
batch holds (the normaliser the trainer divides the whole step by, torchtune's scaling), and gives the step's
FLOPs by formula. The trainer knows nothing else about it.

A batch is any object with `n_examples`, `n_tokens`, `n_loss_tokens`, `rows`, `width` and tensors the
strategy may move to a device (`data.packing.Batch` is the next-token one).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..config import ConfigError
from ..costs.flops import Flops


@dataclass
class Context:
    """What a loss needs about the model besides the model itself."""

    model: object  # what the optimizer trains (a PeftModel for PEFT methods)
    base: object  # the underlying transformers model
    method: object
    pad_id: int
    autocast: object  # a context-manager factory


@dataclass
class LossOutput:
    """A batch's loss summed over its units, and metrics summed over the same units (the trainer divides both
    by the step's normaliser, so a metric logged per step is a mean per unit)."""

    total: object  # a scalar tensor
    metrics: dict = field(default_factory=dict)  # name -> float sum


class Objective:
    """The interface the trainer calls; every hook but `loss`, `make_batch` and `step_flops` has a default."""

    name = "base"
    unit = "token"  # what `normaliser` counts, for the log

    def prepare_data(self, config, tokenizer):
        """A `data.sources.Prepared`-like object: `kind`, `train`, `eval`, `eval_records`, `stats`."""
        raise NotImplementedError

    def prepare_model(self, model, shape):
        """Change the model before the method wraps it (a reward model's scalar head); identity by default."""
        return model

    def setup(self, ctx: Context, data) -> None:
        """Once before the first step (e.g. precompute a reference model's log-probabilities)."""

    def make_batch(self, examples: list, *, capacity: int, pad_id: int, pack: bool):
        raise NotImplementedError

    def normaliser(self, batch) -> int:
        """The units the batch's summed loss is over; the step's loss is divided by their total."""
        return batch.n_loss_tokens

    def loss(self, ctx: Context, batch) -> LossOutput:
        raise NotImplementedError

    def step_flops(self, shape, trainable, ctx: Context, batch, *, checkpointing: bool) -> Flops:
        raise NotImplementedError

    def end_metrics(self, ctx: Context) -> dict:
        """Metrics for the ledger once training ends, on every rank (e.g. FLOPs spent outside the steps)."""
        return {}

    def save_outputs(self, folder, model, base, tokenizer, method) -> bool:
        """Write the trained model in this objective's own format and return True, or False for the default
        (a PEFT adapter or safetensors weights, `tunegap.outputs.save_outputs`)."""
        return False

    def to_dict(self) -> dict:
        return {"name": self.name, **(dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {})}


OBJECTIVES: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make an objective available by name (`--objective NAME`)."""
    OBJECTIVES[cls.name] = cls
    return cls


def make_objective(name: str, /, **options) -> Objective:
    """An objective by name, given only the options its dataclass fields name (one flat CLI serves all)."""
    if name not in OBJECTIVES:
        raise ConfigError(f"--objective: unknown objective {name!r}; choose from {', '.join(sorted(OBJECTIVES))}")
    cls = OBJECTIVES[name]
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return cls(**{k: v for k, v in options.items() if k in fields and v is not None})


def heldout_sums(objective: Objective, ctx: Context, examples: list, batch_size: int, seq_len: int, *,
                 share=None, loss=None) -> tuple[float, int]:
    """Summed loss and normaliser over held-out batches, without gradients.

    `share(chunk)` picks this process's part of each batch under torchrun (`loss` then runs through DDP/FSDP).
    Under FSDP every rank must run the same number of forward passes (each all-gathers weights), so a rank with
    an empty share evaluates one example and discards it."""
    import torch

    loss = loss or (lambda batch: objective.loss(ctx, batch))
    was_training = ctx.model.training
    ctx.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            mine = share(chunk) if share else chunk
            batch = objective.make_batch(mine or chunk[:1], capacity=seq_len, pad_id=ctx.pad_id,
                                         pack=not ctx.method.changes_sequence)
            value = float(loss(batch).total)
            if mine:
                total += value
                count += objective.normaliser(batch)
    ctx.model.train(was_training)
    return total, count

