"""Training methods as small objects: each prepares a model and says what it trains; the loop is shared.

A method never subclasses or rewrites the model: full and freeze set `requires_grad` from a name set,
the PEFT methods go through Hugging Face PEFT (`get_peft_model`), and only the bottleneck adapter,
which PEFT does not provide, wraps the MLP modules by hand.
Each method also describes itself as a `Trainable`, which is what the cost formulas read; a test checks
that description against the real model's trainable parameter count for every method.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .costs.shape import HF_MODULE_NAMES, ModelShape, Trainable, full_trainable

ALL_LINEAR = ("q", "k", "v", "o", "gate", "up", "down")


class MethodError(ValueError):
    """Method settings that cannot work (rank <= 0, more layers than the model has, ...)."""


def decoder_layers(model):
    """The transformer blocks of a Hugging Face causal LM, PEFT-wrapped or not (the first `*.layers` list)."""
    from torch import nn

    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList):
            return module
    raise MethodError(f"{type(model).__name__}: cannot find its transformer blocks (a `layers` module list)")


@dataclass
class Method:
    """Base for every method: `prepare` returns the model to train, `trainable` describes it for costs."""

    name = "base"
    # True for methods that lengthen the input (prompt/prefix tuning): the loop then neither packs rows
    # nor projects only loss-bearing hidden states, and takes logits from PEFT's own forward instead.
    changes_sequence = False
    saves_adapter = False

    def prepare(self, model, shape: ModelShape):
        raise NotImplementedError

    def trainable(self, shape: ModelShape) -> Trainable:
        raise NotImplementedError

    def check(self, shape: ModelShape) -> None:
        """Raise MethodError before any work starts when the settings cannot fit this model."""

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


@dataclass
class Full(Method):
    """Every weight trains: supervised fine-tuning, and pretraining when the weights start random."""

    name = "full"

    def prepare(self, model, shape):
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def trainable(self, shape):
        return full_trainable(shape)


@dataclass
class Freeze(Method):
    """Train only the top `layers` blocks, the final norm and an untied head (Yosinski et al. 2014's recipe).

    A tied head is the embedding matrix: training it would send gradients to the bottom of the network,
    so it stays frozen and backprop stops at the lowest trained block.
    """

    name = "freeze"
    layers: int = 2

    def check(self, shape):
        if not 1 <= self.layers <= shape.num_layers:
            raise MethodError(f"freeze: --freeze-layers must be in 1..{shape.num_layers}, got {self.layers}")

    def _top(self, shape):
        return range(shape.num_layers - self.layers, shape.num_layers)

    def prepare(self, model, shape):
        for p in model.parameters():
            p.requires_grad_(False)
        blocks = decoder_layers(model)
        for i in self._top(shape):
            for p in blocks[i].parameters():
                p.requires_grad_(True)
        model.model.norm.weight.requires_grad_(True)
        if not shape.tied_embeddings:
            model.get_output_embeddings().weight.requires_grad_(True)
        return model

    def trainable(self, shape):
        top = list(self._top(shape))
        return Trainable(dense=frozenset((i, m) for i in top for m in shape.layer_matrices()),
                         norms=frozenset(top), final_norm=True, head=not shape.tied_embeddings)


@dataclass
class LoRA(Method):
    """W + (alpha/r)·B·A with W frozen (Hu et al. 2021, Eq. 3), through Hugging Face PEFT."""

    name = "lora"
    saves_adapter = True
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple = ALL_LINEAR

    def check(self, shape):
        if not self.targets:
            raise MethodError(f"lora: --targets is empty; choose some of {','.join(ALL_LINEAR)}")
        unknown = set(self.targets) - set(ALL_LINEAR)
        if unknown:
            raise MethodError(f"lora: unknown target matrices {sorted(unknown)}; choose from {ALL_LINEAR}")
        if self.rank <= 0:
            raise MethodError(f"lora: --rank must be positive, got {self.rank}")
        smallest = min(min(shape.matrix_dims(m)) for m in self.targets)
        if self.rank > smallest:
            raise MethodError(f"lora: --rank {self.rank} exceeds the smallest target matrix dimension {smallest}")

    def prepare(self, model, shape):
        from peft import LoraConfig, TaskType, get_peft_model

        config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=self.rank, lora_alpha=self.alpha,
                            lora_dropout=self.dropout, target_modules=[HF_MODULE_NAMES[t] for t in self.targets])
        return get_peft_model(model, config)

    def trainable(self, shape):
        return Trainable(lora=tuple((i, m, self.rank) for i in range(shape.num_layers) for m in self.targets))


@dataclass
class IA3(Method):
    """Learned rescaling of keys, values and the MLP's inner activations (Liu et al. 2022, Sec. 3.3)."""

    name = "ia3"
    saves_adapter = True

    def prepare(self, model, shape):
        from peft import IA3Config, TaskType, get_peft_model

        config = IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=["k_proj", "v_proj", "down_proj"],
                           feedforward_modules=["down_proj"])
        return get_peft_model(model, config)

    def trainable(self, shape):
        return Trainable(scales=frozenset((i, m) for i in range(shape.num_layers) for m in ("k", "v", "down")))


@dataclass
class PromptTuning(Method):
    """Trainable virtual tokens prepended to every input (Lester et al. 2021)."""

    name = "prompt"
    saves_adapter = True
    changes_sequence = True
    virtual_tokens: int = 16

    def check(self, shape):
        if self.virtual_tokens <= 0:
            raise MethodError(f"prompt: --virtual-tokens must be positive, got {self.virtual_tokens}")

    def prepare(self, model, shape):
        from peft import PromptTuningConfig, TaskType, get_peft_model

        return get_peft_model(model, PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                        num_virtual_tokens=self.virtual_tokens))

    def trainable(self, shape):
        return Trainable(prompt_tokens=self.virtual_tokens)


@dataclass
class PrefixTuning(Method):
    """Trainable key/value prefixes in every layer (Li & Liang 2021), no reparameterisation MLP."""

    name = "prefix"
    saves_adapter = True
    changes_sequence = True
    virtual_tokens: int = 16

    def check(self, shape):
        if self.virtual_tokens <= 0:
            raise MethodError(f"prefix: --virtual-tokens must be positive, got {self.virtual_tokens}")

    def prepare(self, model, shape):
        from peft import PrefixTuningConfig, TaskType, get_peft_model

        return get_peft_model(model, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                        num_virtual_tokens=self.virtual_tokens))

    def trainable(self, shape):
        return Trainable(prefix_tokens=self.virtual_tokens)


@dataclass
class Adapter(Method):
    """Houlsby et al. 2019 bottleneck adapter after each MLP: x + up(act(down(x))), up initialised to 0.

    Written by hand because PEFT has no bottleneck adapter; it wraps each block's MLP module in place.
    """

    name = "adapter"
    saves_adapter = False
    dim: int = 16

    def check(self, shape):
        if self.dim <= 0:
            raise MethodError(f"adapter: --adapter-dim must be positive, got {self.dim}")

    def prepare(self, model, shape):
        for p in model.parameters():
            p.requires_grad_(False)
        for block in decoder_layers(model):
            block.mlp = BottleneckAdapter(block.mlp, shape.hidden_size, self.dim)
        return model

    def trainable(self, shape):
        return Trainable(adapters=frozenset(range(shape.num_layers)), adapter_dim=self.dim)


def BottleneckAdapter(mlp, hidden: int, dim: int):
    """Build the adapter module lazily so that importing tunegap does not import torch."""
    import torch
    from torch import nn

    class _Adapter(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = mlp
            self.adapter_down = nn.Linear(hidden, dim)
            self.adapter_up = nn.Linear(dim, hidden)
            nn.init.zeros_(self.adapter_up.weight)  # start as the identity: the base model's behaviour
            nn.init.zeros_(self.adapter_up.bias)

        def forward(self, x):
            h = self.mlp(x)
            return h + self.adapter_up(torch.nn.functional.gelu(self.adapter_down(h)))

    return _Adapter()


METHODS = {cls.name: cls for cls in (Full, Freeze, LoRA, IA3, PromptTuning, PrefixTuning, Adapter)}


def make_method(name: str, **options) -> Method:
    """Build a method by name, passing only the options it has (so one flat CLI serves all methods)."""
    if name not in METHODS:
        raise MethodError(f"--method: unknown method {name!r}; choose from {', '.join(METHODS)}")
    cls = METHODS[name]
    fields = cls.__dataclass_fields__
    return cls(**{k: v for k, v in options.items() if k in fields and v is not None})
