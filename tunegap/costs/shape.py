"""A model reduced to the numbers its costs depend on, and a method reduced to what it trains.

Both the estimator (no weights, any scale) and a real run's ledger build these two objects and pass
them to the same formulas in `flops.py` and `memory.py`: one home for every cost formula.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .parts import PARALLEL, POSITIONS, SCALE_INPUT, SCALE_OUTPUT

ATTN_MATRICES = ("q", "k", "v", "o")
MLP_MATRICES = ("gate", "up", "down")
MATRICES = ATTN_MATRICES + MLP_MATRICES

# Hugging Face module names for each matrix (Llama, Mistral, Qwen2, SmolLM2, Mixtral experts use w1/w3/w2).
HF_MODULE_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                   "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer with gated MLP (Llama family), as its config describes it."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int = 0  # 0 = hidden_size // num_heads
    tied_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on q, k, v
    gated_mlp: bool = True  # False: GPT-2/Pythia style up -> act -> down
    num_experts: int = 0  # 0 = dense; else MoE with `experts_per_token` active experts
    experts_per_token: int = 0
    max_position_embeddings: int = 0
    name: str = ""

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model shape: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model shape: num_heads {self.num_heads} is not a multiple of num_kv_heads "
                             f"{self.num_kv_heads}")

    @classmethod
    def from_hf_config(cls, config) -> "ModelShape":
        """From a `transformers` config object or its dict (config.json)."""
        c = config if isinstance(config, dict) else config.to_dict()
        get = c.get
        hidden = get("hidden_size") or get("n_embd") or get("d_model")
        heads = get("num_attention_heads") or get("n_head")
        arch = (get("architectures") or [""])[0].lower() + get("model_type", "")
        return cls(
            vocab_size=get("vocab_size"),
            hidden_size=hidden,
            num_layers=get("num_hidden_layers") or get("n_layer"),
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads") or heads,
            intermediate_size=get("intermediate_size") or get("moe_intermediate_size") or 4 * hidden,
            head_dim=get("head_dim") or 0,
            tied_embeddings=bool(get("tie_word_embeddings", False)),
            qkv_bias=bool(get("attention_bias", False)) or "qwen2" in arch,
            gated_mlp=not any(k in arch for k in ("gpt_neox", "gpt2", "opt")),
            num_experts=get("num_local_experts") or get("num_experts") or 0,
            experts_per_token=get("num_experts_per_tok") or 0,
            max_position_embeddings=get("max_position_embeddings") or 0,
            name=get("_name_or_path", "") or get("model_type", ""),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelShape":
        return cls.from_hf_config(json.loads(Path(path).read_text()))

    # --- the matrices every formula walks -------------------------------------------------------
    def matrix_dims(self, matrix: str) -> tuple[int, int]:
        """(in_features, out_features) of one projection in one layer (one expert for MoE MLPs)."""
        d, hd = self.hidden_size, self.head_dim
        return {
            "q": (d, self.num_heads * hd), "k": (d, self.num_kv_heads * hd), "v": (d, self.num_kv_heads * hd),
            "o": (self.num_heads * hd, d),
            "gate": (d, self.intermediate_size), "up": (d, self.intermediate_size),
            "down": (self.intermediate_size, d),
        }[matrix]

    def layer_matrices(self) -> tuple[str, ...]:
        return MATRICES if self.gated_mlp else ("q", "k", "v", "o", "up", "down")

    def matrix_copies(self, matrix: str) -> tuple[int, int]:
        """(stored copies, copies each token passes through): MoE stores every expert, runs top-k."""
        if matrix in MLP_MATRICES and self.num_experts:
            return self.num_experts, self.experts_per_token
        return 1, 1

    # --- parameter counts -----------------------------------------------------------------------
    def layer_params(self) -> int:
        d = self.hidden_size
        total = 2 * d  # two RMSNorm weights (RMSNorm has no bias: llm-analysis counts 2d each, wrongly)
        for m in self.layer_matrices():
            fan_in, fan_out = self.matrix_dims(m)
            total += fan_in * fan_out * self.matrix_copies(m)[0]
        if self.qkv_bias:
            total += sum(self.matrix_dims(m)[1] for m in ("q", "k", "v"))
        if self.num_experts:
            total += d * self.num_experts  # router
        return total

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def head_params(self) -> int:
        """The output projection's own parameters: zero when tied to the embeddings."""
        return 0 if self.tied_embeddings else self.vocab_size * self.hidden_size

    def total_params(self) -> int:
        return (self.embedding_params() + self.head_params() + self.num_layers * self.layer_params()
                + self.hidden_size)  # final norm

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Trainable:
    """What a method trains, in the coordinates the formulas use (layer index, site name).

    The base model's own weights: dense (base matrices whose weights get gradients), norms (layers whose two
    norms train), final_norm, embeddings, head. What a method adds to it: parts (`parts.Part`: LoRA paths,
    IA3 vectors, bottleneck adapters, prompt and prefix tables, or any method's own), which the formulas
    walk by kind and site, never by method name.
    """

    dense: frozenset = frozenset()
    norms: frozenset = frozenset()
    final_norm: bool = False
    embeddings: bool = False
    head: bool = False
    parts: tuple = ()

    def parts_at(self, layer: int | None, site: str, *kinds: str) -> tuple:
        """The parts at one site of one layer (a part with layer None sits in every layer), of `kinds` if given."""
        return tuple(p for p in self.parts if p.site == site and (p.layer is None or p.layer == layer)
                     and (not kinds or p.kind in kinds))

    def touches(self, layer: int, matrix: str) -> bool:
        """Some part adapts or rescales this matrix, so its output requires a gradient."""
        return bool(self.parts_at(layer, matrix, PARALLEL, SCALE_INPUT, SCALE_OUTPUT))

    @property
    def extra_queries(self) -> int:
        """Positions prepended to every sequence (prompt tuning): the blocks see seq_len + this many tokens."""
        return sum(p.positions for p in self.parts if p.kind == POSITIONS and p.site == "input")

    def extra_keys(self, layer: int) -> int:
        """Key/value positions the attention of `layer` sees beyond the sequence's own (prefix tuning)."""
        return sum(p.positions for p in self.parts_at(layer, "kv", POSITIONS))

    @property
    def input_trains(self) -> bool:
        """The blocks' input depends on trained parameters, so the residual stream carries a gradient from the start."""
        return self.embeddings or any(p.site == "input" for p in self.parts)

    def params(self, shape: ModelShape) -> int:
        """Trainable parameter count; a test checks it equals the real model's count for every method."""
        d = shape.hidden_size
        total = 0
        for layer, m in self.dense:
            fan_in, fan_out = shape.matrix_dims(m)
            total += fan_in * fan_out * shape.matrix_copies(m)[0]
            if shape.qkv_bias and m in ("q", "k", "v"):
                total += fan_out
        total += sum(p.numel for p in self.parts)
        total += len(self.norms) * 2 * d + (d if self.final_norm else 0)
        if self.embeddings:
            total += shape.embedding_params()
        if self.head:
            total += shape.head_params() if not (shape.tied_embeddings and self.embeddings) else 0
            total += shape.embedding_params() if shape.tied_embeddings and not self.embeddings else 0
        return total

    def trains_head_weight(self, shape: ModelShape) -> bool:
        return self.head or (shape.tied_embeddings and self.embeddings)


def full_trainable(shape: ModelShape) -> Trainable:
    layers = range(shape.num_layers)
    return Trainable(dense=frozenset((i, m) for i in layers for m in shape.layer_matrices()),
                     norms=frozenset(layers), final_norm=True, embeddings=True, head=True)
