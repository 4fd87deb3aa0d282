"""The base every method shares, and the registry that finds a method by name.

A method is a small dataclass: `prepare(model, shape)` returns the model to train, `parts(shape)` says what
it adds in the cost formulas' vocabulary (`tunegap.costs.parts`), and `register` makes it reachable by name
from `make_method`, `--method` and the estimator. Nothing else in tunegap lists the methods.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..costs.shape import ModelShape, Trainable

ALL_LINEAR = ("q", "k", "v", "o", "gate", "up", "down")


class MethodError(ValueError):
    """Method settings that cannot work (rank <= 0, more layers than the model has, ...)."""


BLOCK_LISTS = ("layers", "h")  # Llama/Mistral/Qwen/GPT-NeoX name the list of blocks `layers`, GPT-2 `h`
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm")  # the norm after the last block: Llama, GPT-2, GPT-NeoX


def decoder_layers(model):
    """The transformer blocks of a Hugging Face causal LM, PEFT-wrapped or not (the first `*.layers` or `*.h` list)."""
    from torch import nn

    for name, module in model.named_modules():
        if name.rpartition(".")[2] in BLOCK_LISTS and isinstance(module, nn.ModuleList):
            return module
    raise MethodError(f"{type(model).__name__}: cannot find its transformer blocks (a `layers` or `h` module list)")


def final_norm(model):
    """The norm after the last block, under whatever name the model's family gives it."""
    decoder = model.base_model if not hasattr(model, "get_base_model") else model.get_base_model().base_model
    for name in FINAL_NORMS:
        if hasattr(decoder, name):
            return getattr(decoder, name)
    raise MethodError(f"{type(model).__name__}: cannot find its final norm (one of {', '.join(FINAL_NORMS)})")


@dataclass
class Method:
    """Base for every method: `prepare` returns the model to train, `parts` describes what it adds for costs.

    A method that adds parameters to a frozen base only writes `parts`; one that trains base weights
    (full, freeze) overrides `trainable` instead.
    """

    name = "base"
    # True for methods that lengthen the input (prompt/prefix tuning): the loop then neither packs rows
    # nor projects only loss-bearing hidden states, and takes logits from PEFT's own forward instead.
    changes_sequence = False
    saves_adapter = False  # a PEFT adapter: plain `PeftModel.from_pretrained` loads what it saves
    # Parameters written by hand (no PEFT method for them): the run saves only its trained tensors, and loading
    # rebuilds the method on the starting model (`outputs.save_outputs` / `load_run`)
    saves_trained_tensors = False
    # How the frozen base stores its block matrices: "same" (the run's precision) or "nf4" (QLoRA's 4-bit
    # NormalFloat); the estimator costs the weights by it (`costs.memory.TrainSetup.base_format`).
    base_format = "same"

    def prepare(self, model, shape: ModelShape):
        raise NotImplementedError

    def parts(self, shape: ModelShape) -> tuple:
        """What the method adds to the frozen base, as `tunegap.costs.parts.Part`s."""
        return ()

    def trainable(self, shape: ModelShape) -> Trainable:
        return Trainable(parts=tuple(self.parts(shape)))

    def check(self, shape: ModelShape) -> None:
        """Raise MethodError before any work starts when the settings cannot fit this model."""

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method reachable by its `name` (make_method, --method, the estimator)."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise MethodError(f"method {cls.name!r} is already registered by {METHODS[cls.name].__qualname__}")
    METHODS[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Forget a registered method (a test's throwaway method, for one)."""
    METHODS.pop(name, None)


def make_method(name: str, **options) -> Method:
    """Build a method by name, passing only the options it has (so one flat CLI serves all methods)."""
    if name not in METHODS:
        raise MethodError(f"--method: unknown method {name!r}; choose from {', '.join(METHODS)}")
    cls = METHODS[name]
    fields = cls.__dataclass_fields__
    return cls(**{k: v for k, v in options.items() if k in fields and v is not None})
