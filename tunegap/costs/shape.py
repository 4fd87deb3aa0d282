"""A model reduced to the numbers its costs depend on, and a method reduced to what it trains.

Both the estimator (no weights, any scale) and a real run's ledger build these two objects and pass
them to the same formulas in `flops.py` and `memory.py`: one home for every cost formula.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .parts import PARALLEL, POSITIONS, SCALE_INPUT, SCALE_OUTPUT

ATTN_MATRICES = ("q", "k", "v", "o")
MLP_MATRICES = ("gate", "up", "down")
MATRICES = ATTN_MATRICES + MLP_MATRICES

# Hugging Face module names for each matrix (Llama, Mistral, Qwen2, SmolLM2, Mixtral experts use w1/w3/w2).
HF_MODULE_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
                   "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


class ShapeError(ValueError):
    """A config the cost formulas cannot read faithfully: one line naming source, field and what was expected."""


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer as its config describes it: the Llama layout by default, and every family
    `FAMILIES` reads (GPT-2/NeoX/Falcon LayerNorm-and-bias blocks, Gemma's extra norms, Qwen3's q/k norms,
    MoE with shared experts and dense layers, DeepSeek's multi-head latent attention) through the fields below.

    The seven sites (q, k, v, o, gate, up, down) are what PEFT methods attach to; matmuls that are not one of
    them (an MoE router, shared experts, MLA's query down-projection) are `extra_linears` of a layer.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int = 0  # 0 = hidden_size // num_heads; under MLA the query/key width, nope + rope
    tied_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on q, k, v
    gated_mlp: bool = True  # False: GPT-2/Pythia/Falcon style up -> act -> down
    num_experts: int = 0  # 0 = dense; else MoE with `experts_per_token` active experts
    experts_per_token: int = 0
    max_position_embeddings: int = 0
    name: str = ""
    family: str = ""  # the config's model_type
    norm: str = "rms"  # "rms": weight only; "layer": LayerNorm, weight and bias
    layer_norms: int = 2  # norm modules per block (Gemma 2/3: 4; Falcon-7B's parallel block: 1)
    qk_norm: bool = False  # per-head RMSNorm of queries and keys (Qwen3, Gemma 3): 2 x head_dim
    o_bias: bool = False
    mlp_bias: bool = False
    learned_positions: int = 0  # GPT-2's position table rows (0 = rotary or none)
    moe_intermediate_size: int = 0  # one routed expert's width (0 = intermediate_size)
    shared_expert_size: int = 0  # total width of the always-active shared experts (Qwen2-MoE, DeepSeek)
    shared_expert_gate: bool = False  # Qwen2-MoE's d -> 1 sigmoid gate on the shared expert
    dense_layers: tuple = ()  # layers of an MoE model with a dense MLP of intermediate_size
    q_lora_rank: int = 0  # MLA (DeepSeek-V2/V3, Liu et al. 2024): query down-projection rank (0 = none)
    kv_lora_rank: int = 0  # MLA: compressed key/value width (0 = standard attention)
    qk_rope_head_dim: int = 0  # MLA: the decoupled rotary part of each query/key head
    v_head_dim: int = 0  # 0 = head_dim
    sliding_window: int = 0  # 0 = full attention (noted, not costed: see flops.py)
    activation: str = ""  # hidden_act / activation_function as the config names it ("" = the family's SiLU/GeLU)

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        object.__setattr__(self, "dense_layers", tuple(self.dense_layers))
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model shape: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model shape: num_heads {self.num_heads} is not a multiple of num_kv_heads "
                             f"{self.num_kv_heads}")
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise ValueError(f"model shape: experts_per_token must be in 1..{self.num_experts} for an MoE model, "
                             f"got {self.experts_per_token}")
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"model shape: norm must be 'rms' or 'layer', got {self.norm!r}")

    @classmethod
    def from_hf_config(cls, config, source: str = "config") -> "ModelShape":
        """From a `transformers` config object or its dict (config.json); see `validate_config`."""
        return validate_config(config if isinstance(config, dict) else config.to_dict(), source)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelShape":
        return cls.from_hf_config(json.loads(Path(path).read_text()), str(path))

    # --- the matrices every formula walks -------------------------------------------------------
    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    def is_moe_layer(self, layer: int | None) -> bool:
        """A layer whose MLP is routed experts (layer None: a representative MoE layer, if any)."""
        return bool(self.num_experts) and (layer is None or layer not in self.dense_layers)

    def matrix_dims(self, matrix: str, layer: int | None = None) -> tuple[int, int]:
        """(in_features, out_features) of one projection in one layer (one expert for MoE MLPs).

        Under MLA the sites hold its projections: q = q_b (or the whole query projection without a query
        rank), k = kv_a_proj_with_mqa (the compressed key/value plus the shared rotary key), v = kv_b_proj (keys'
        non-rotary part and values, per head), o = the output projection; q_a is an extra linear."""
        d, hd = self.hidden_size, self.head_dim
        inter = self.moe_intermediate_size or self.intermediate_size if self.is_moe_layer(layer) \
            else self.intermediate_size
        mlp = {"gate": (d, inter), "up": (d, inter), "down": (inter, d)}
        if self.mla:
            nope = hd - self.qk_rope_head_dim
            return {"q": (self.q_lora_rank or d, self.num_heads * hd),
                    "k": (d, self.kv_lora_rank + self.qk_rope_head_dim),
                    "v": (self.kv_lora_rank, self.num_heads * (nope + self.v_dim)),
                    "o": (self.num_heads * self.v_dim, d), **mlp}[matrix]
        return {"q": (d, self.num_heads * hd), "k": (d, self.num_kv_heads * hd), "v": (d, self.num_kv_heads * hd),
                "o": (self.num_heads * hd, d), **mlp}[matrix]

    @property
    def v_dim(self) -> int:
        return self.v_head_dim or self.head_dim

    def attention_dims(self) -> tuple[int, int]:
        """(query/key width, value width) per head: what QK^T and AV multiply over."""
        return self.head_dim, self.v_dim

    def layer_matrices(self) -> tuple[str, ...]:
        return MATRICES if self.gated_mlp else ("q", "k", "v", "o", "up", "down")

    def matrix_copies(self, matrix: str, layer: int | None = None) -> tuple[int, int]:
        """(stored copies, copies each token passes through): MoE stores every expert, runs top-k."""
        if matrix in MLP_MATRICES and self.is_moe_layer(layer):
            return self.num_experts, self.experts_per_token
        return 1, 1

    def matrix_bias(self, matrix: str, layer: int | None = None) -> int:
        """Bias elements of one copy of a site's matrix."""
        has = {"q": self.qkv_bias, "k": self.qkv_bias, "v": self.qkv_bias, "o": self.o_bias}.get(matrix, self.mlp_bias)
        return self.matrix_dims(matrix, layer)[1] if has else 0

    def extra_linears(self, layer: int | None = None) -> dict[str, tuple]:
        """Matmuls of a layer outside the seven sites: name -> (block part "attn" or "mlp", fan_in, fan_out,
        stored copies, active copies, bias elements per copy)."""
        d, out = self.hidden_size, {}
        if self.mla and self.q_lora_rank:
            out["q_a"] = ("attn", d, self.q_lora_rank, 1, 1, 0)
        if self.is_moe_layer(layer):
            out["router"] = ("mlp", d, self.num_experts, 1, 1, 0)
            if self.shared_expert_size:
                s = self.shared_expert_size
                b = self.mlp_bias
                out["shared_gate"] = ("mlp", d, s, 1, 1, s if b else 0)
                out["shared_up"] = ("mlp", d, s, 1, 1, s if b else 0)
                out["shared_down"] = ("mlp", s, d, 1, 1, d if b else 0)
            if self.shared_expert_gate:
                out["shared_expert_gate"] = ("mlp", d, 1, 1, 1, 0)
        return out

    # --- parameter counts -----------------------------------------------------------------------
    def norm_params(self, width: int | None = None) -> int:
        return (2 if self.norm == "layer" else 1) * (width or self.hidden_size)

    def layer_norm_params(self) -> int:
        """A block's norms: the residual-stream norms, Qwen3/Gemma 3's q/k norms, MLA's latent norms."""
        total = self.layer_norms * self.norm_params()
        if self.qk_norm:
            total += 2 * self.head_dim
        if self.mla:
            total += self.kv_lora_rank + self.q_lora_rank  # kv_a_layernorm, q_a_layernorm (RMSNorm)
        return total

    def extra_params(self, layer: int | None = None) -> int:
        return sum(k * n * stored + b * stored for _, k, n, stored, _, b in self.extra_linears(layer).values())

    def layer_params(self, layer: int | None = None) -> int:
        total = self.layer_norm_params() + self.extra_params(layer)
        for m in self.layer_matrices():
            fan_in, fan_out = self.matrix_dims(m, layer)
            total += (fan_in * fan_out + self.matrix_bias(m, layer)) * self.matrix_copies(m, layer)[0]
        return total

    def embedding_params(self) -> int:
        """The token table (plus GPT-2's learned position table, which sits beside it)."""
        return (self.vocab_size + self.learned_positions) * self.hidden_size

    def head_params(self) -> int:
        """The output projection's own parameters: zero when tied to the embeddings."""
        return 0 if self.tied_embeddings else self.vocab_size * self.hidden_size

    def blocks_params(self) -> int:
        return sum(self.layer_params(i) for i in range(self.num_layers))

    def total_params(self) -> int:
        return self.embedding_params() + self.head_params() + self.blocks_params() + self.norm_params()

    def routed_expert_params(self, layer: int) -> int:
        """Every routed expert's parameters in one layer (what expert parallelism spreads)."""
        if not self.is_moe_layer(layer):
            return 0
        return sum((self.matrix_dims(m, layer)[0] * self.matrix_dims(m, layer)[1] + self.matrix_bias(m, layer))
                   * self.num_experts for m in self.layer_matrices() if m in MLP_MATRICES)

    def inactive_params(self) -> int:
        """Routed-expert parameters a token does not pass through (MoE): total - active."""
        total = 0
        for layer in range(self.num_layers):
            for m in self.layer_matrices():
                stored, active = self.matrix_copies(m, layer)
                fan_in, fan_out = self.matrix_dims(m, layer)
                total += (stored - active) * (fan_in * fan_out + self.matrix_bias(m, layer))
        return total

    def active_params(self) -> int:
        """Parameters each token passes through: every expert's weights count only for the top-k it is routed to."""
        return self.total_params() - self.inactive_params()

    def to_dict(self) -> dict:
        return asdict(self)


# --- reading a config ---------------------------------------------------------------------------------------

_MISSING = object()


class _Reader:
    """One config's values with its family's transformers defaults, each read checked and remembered."""

    def __init__(self, config: dict, source: str, family: str, defaults: dict):
        self.config, self.source, self.family, self.defaults = config, source, family, defaults
        self.read: set[str] = set()

    def fail(self, key: str, expected: str, value=_MISSING) -> ShapeError:
        got = "" if value is _MISSING else f", got {value!r}"
        return ShapeError(f"{self.source}: {key}: expected {expected}{got}")

    def raw(self, key: str, default=_MISSING):
        self.read.add(key)
        value = self.config.get(key)
        if value is None:
            value = self.defaults.get(key, default)
        return value

    def int(self, *keys: str, default=_MISSING, minimum: int = 1) -> int:
        """The first of `keys` present (transformers' attribute aliases), a finite integer >= minimum."""
        self.read.update(keys)
        found = [k for k in keys if self.config.get(k) is not None]
        key = found[0] if found else keys[0]
        value = self.config[key] if found else self.defaults.get(key)
        if value is None:
            if default is _MISSING:
                raise self.fail(keys[0], f"an integer >= {minimum} (missing in this {self.family} config)")
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value != int(value) or value < minimum or value > MAX_DIMENSION:
            raise self.fail(key, f"an integer in {minimum}..{MAX_DIMENSION:.0e}", value)
        return int(value)

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return value

    def text(self, key: str, default: str = "") -> str:
        value = self.raw(key, default)
        if not isinstance(value, str):
            raise self.fail(key, "a string", value)
        return value

    def int_list(self, key: str) -> tuple[int, ...]:
        value = self.raw(key, [])
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise self.fail(key, "a list of layer indices", value)
        return tuple(value)


MAX_DIMENSION = 10**9  # no real config has a dimension near this; 1e400 (inf) and typos stop here

# Activations named by `hidden_act` / `activation_function`: gated MLPs (act(gate) * up) use the first set in
# every family that has gate_proj; the GPT-style families have a single up -> act -> down.
_ACTIVATIONS = {"silu", "swish", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu", "gelu_python",
                "quick_gelu", "tanh"}

# Structure-changing keys, and the families whose reader understands each: in any other family's config a
# truthy value is refused instead of ignored (a DeepSeek key in a "llama" config is not silently dense).
_STRUCTURE_KEYS = {
    "num_local_experts": {"mixtral"}, "num_experts": {"qwen2_moe", "qwen3_moe"},
    "n_routed_experts": {"deepseek_v3"}, "n_shared_experts": {"deepseek_v3"},
    "moe_intermediate_size": {"qwen2_moe", "qwen3_moe", "deepseek_v3"},
    "shared_expert_intermediate_size": {"qwen2_moe"}, "first_k_dense_replace": {"deepseek_v3"},
    "q_lora_rank": {"deepseek_v3"}, "kv_lora_rank": {"deepseek_v3"},
    "new_decoder_architecture": {"falcon"}, "parallel_attn": {"falcon"}, "multi_query": {"falcon"},
    "n_inner": {"gpt2"}, "add_cross_attention": set(), "use_parallel_residual": {"gpt_neox"},
    "text_config": set(), "vision_config": set(), "is_encoder_decoder": set(),
}

# The transformers config-class defaults of the structure keys read below (a test checks each against the
# installed transformers): a key absent from config.json means what transformers would build.
FAMILY_DEFAULTS: dict[str, dict] = {
    "llama": {"tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu"},
    "mistral": {"tie_word_embeddings": False, "hidden_act": "silu"},
    "mixtral": {"tie_word_embeddings": False, "num_local_experts": 8, "num_experts_per_tok": 2, "hidden_act": "silu"},
    "qwen2": {"tie_word_embeddings": False, "hidden_act": "silu"},
    "qwen2_moe": {"tie_word_embeddings": False, "num_experts": 60, "num_experts_per_tok": 4,
                  "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "decoder_sparse_step": 1,
                  "qkv_bias": True, "hidden_act": "silu"},
    "qwen3": {"tie_word_embeddings": False, "attention_bias": False, "head_dim": 128, "hidden_act": "silu"},
    "qwen3_moe": {"tie_word_embeddings": False, "attention_bias": False, "num_experts": 128, "num_experts_per_tok": 8,
                  "moe_intermediate_size": 768, "decoder_sparse_step": 1, "hidden_act": "silu"},
    "gemma": {"tie_word_embeddings": True, "head_dim": 256, "attention_bias": False},
    "gemma2": {"tie_word_embeddings": True, "head_dim": 256, "attention_bias": False},
    "gemma3_text": {"tie_word_embeddings": True, "head_dim": 256, "attention_bias": False},
    "phi3": {"tie_word_embeddings": False, "hidden_act": "silu"},
    "gpt2": {"tie_word_embeddings": True, "n_positions": 1024, "activation_function": "gelu_new"},
    "gpt_neox": {"tie_word_embeddings": False, "attention_bias": True, "hidden_act": "gelu"},
    "falcon": {"tie_word_embeddings": True, "bias": False, "multi_query": True, "new_decoder_architecture": False,
               "parallel_attn": True, "activation": "gelu"},
    "deepseek_v3": {"tie_word_embeddings": False, "n_routed_experts": 256, "n_shared_experts": 1,
                    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "moe_intermediate_size": 2048,
                    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                    "v_head_dim": 128, "attention_bias": False, "hidden_act": "silu"},
}
_LLAMA_LIKE = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
               "gemma3_text", "phi3", "deepseek_v3"}


def _activation(r: _Reader, *keys: str) -> str:
    for key in keys:
        value = r.raw(key, None)
        if value is not None:
            if value not in _ACTIVATIONS:
                raise r.fail(key, f"an activation the formulas know ({', '.join(sorted(_ACTIVATIONS))})", value)
            return value
    return ""


def _read_llama_like(r: _Reader) -> dict:
    """The Llama layout and its relatives: RMSNorm, gated MLP, rotary positions; each family's own keys."""
    fam = r.family
    d = r.int("hidden_size")
    heads = r.int("num_attention_heads")
    out = dict(hidden_size=d, num_heads=heads, num_layers=r.int("num_hidden_layers"),
               vocab_size=r.int("vocab_size"), intermediate_size=r.int("intermediate_size"),
               num_kv_heads=r.int("num_key_value_heads", default=heads),
               head_dim=r.int("head_dim", default=0, minimum=0) or d // heads)
    out["activation"] = _activation(r, "hidden_activation" if fam.startswith("gemma") else "hidden_act",
                                    "hidden_act")
    if fam in ("llama", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text", "phi3", "mistral", "mixtral"):
        bias = r.flag("attention_bias") if fam not in ("mistral", "mixtral", "phi3") else False
        out.update(qkv_bias=bias, o_bias=bias)
    if fam == "llama":
        out["mlp_bias"] = r.flag("mlp_bias")
    if fam == "qwen2":
        out["qkv_bias"] = True  # Qwen2Attention: q, k, v with bias, o without (not a config key)
    if fam == "qwen2_moe":
        out["qkv_bias"] = r.flag("qkv_bias")
    if fam in ("qwen3", "qwen3_moe", "gemma3_text"):
        out["qk_norm"] = True
    if fam in ("gemma2", "gemma3_text"):
        out["layer_norms"] = 4  # input, post-attention, pre- and post-feedforward
    if fam in ("mixtral", "qwen2_moe", "qwen3_moe"):
        experts = r.int("num_local_experts" if fam == "mixtral" else "num_experts", minimum=0)
        if experts:
            out.update(num_experts=experts, experts_per_token=r.int("num_experts_per_tok"))
    if fam in ("qwen2_moe", "qwen3_moe") and out.get("num_experts"):
        step = r.int("decoder_sparse_step")
        only = set(r.int_list("mlp_only_layers"))
        out["dense_layers"] = tuple(i for i in range(out["num_layers"]) if i in only or (i + 1) % step)
        out["moe_intermediate_size"] = r.int("moe_intermediate_size")
        if fam == "qwen2_moe":
            out.update(shared_expert_size=r.int("shared_expert_intermediate_size", minimum=0))
            out["shared_expert_gate"] = out["shared_expert_size"] > 0
    if fam == "deepseek_v3":
        if r.flag("attention_bias"):
            raise r.fail("attention_bias", "false (MLA projections with biases are not modelled)", True)
        experts = r.int("n_routed_experts", minimum=0)
        freq = r.int("moe_layer_freq", default=1)
        if freq != 1:  # transformers' DeepseekV3 ignores it; refuse rather than guess what was meant
            raise r.fail("moe_layer_freq", "1 (transformers builds every layer after first_k_dense_replace as MoE)",
                         freq)
        nope, rope = r.int("qk_nope_head_dim"), r.int("qk_rope_head_dim")
        out.update(head_dim=nope + rope, qk_rope_head_dim=rope, v_head_dim=r.int("v_head_dim"),
                   kv_lora_rank=r.int("kv_lora_rank"), q_lora_rank=r.int("q_lora_rank", default=0, minimum=0),
                   num_kv_heads=heads)
        if experts:
            first = r.int("first_k_dense_replace", minimum=0)
            moe_inter = r.int("moe_intermediate_size")
            out.update(num_experts=experts, experts_per_token=r.int("num_experts_per_tok"),
                       moe_intermediate_size=moe_inter, dense_layers=tuple(range(min(first, out["num_layers"]))),
                       shared_expert_size=moe_inter * r.int("n_shared_experts", minimum=0))
    window = r.raw("sliding_window", None)
    if isinstance(window, int) and not isinstance(window, bool) and window > 0 and r.raw("use_sliding_window", True):
        out["sliding_window"] = window
    return out


def _read_gpt2(r: _Reader) -> dict:
    """GPT-2 (and GPT-3-shaped configs in its form): LayerNorm with bias, biases everywhere, learned positions,
    a non-gated MLP of n_inner (4d when null), tied head by default (GPT2Config)."""
    d = r.int("n_embd", "hidden_size")
    heads = r.int("n_head", "num_attention_heads")
    return dict(activation=_activation(r, "activation_function"), hidden_size=d, num_heads=heads, num_kv_heads=heads,
                num_layers=r.int("n_layer", "num_hidden_layers"),
                vocab_size=r.int("vocab_size"), intermediate_size=r.int("n_inner", default=4 * d),
                norm="layer", gated_mlp=False, qkv_bias=True, o_bias=True, mlp_bias=True,
                learned_positions=r.int("n_positions", "max_position_embeddings"))


def _read_gpt_neox(r: _Reader) -> dict:
    """GPT-NeoX/Pythia: two LayerNorms per block, fused qkv and dense with bias (attention_bias), MLP with bias."""
    d, heads = r.int("hidden_size"), r.int("num_attention_heads")
    bias = r.flag("attention_bias")
    return dict(activation=_activation(r, "hidden_act"), hidden_size=d, num_heads=heads, num_kv_heads=heads,
                num_layers=r.int("num_hidden_layers"),
                vocab_size=r.int("vocab_size"), intermediate_size=r.int("intermediate_size"), norm="layer",
                gated_mlp=False, qkv_bias=bias, o_bias=bias, mlp_bias=True)


def _read_falcon(r: _Reader) -> dict:
    """Falcon: fused qkv (multi-query, or num_kv_heads groups in the new decoder architecture), LayerNorms
    (one in Falcon-7B's parallel block, two in 40B/180B's), `bias` on every linear, ffn 4d by default."""
    d, heads = r.int("hidden_size", "n_embed"), r.int("num_attention_heads", "n_head")
    new = r.flag("new_decoder_architecture")
    parallel = r.flag("parallel_attn")
    if new:
        kv = r.int("num_kv_heads", default=heads)
        norms = r.int("num_ln_in_parallel_attn", default=2)
        if norms not in (1, 2):
            raise r.fail("num_ln_in_parallel_attn", "1 or 2", norms)
    else:
        kv = 1 if r.flag("multi_query") else heads
        norms = 1 if parallel else 2
    if r.flag("alibi", False):
        pass  # ALiBi adds no parameters and no matmul
    bias = r.flag("bias")
    return dict(activation=_activation(r, "activation"), hidden_size=d, num_heads=heads, num_kv_heads=kv,
                num_layers=r.int("num_hidden_layers", "n_layer"),
                vocab_size=r.int("vocab_size"), intermediate_size=r.int("ffn_hidden_size", default=4 * d),
                norm="layer", layer_norms=norms, gated_mlp=False, qkv_bias=bias, o_bias=bias, mlp_bias=bias)


FAMILIES = {**{f: _read_llama_like for f in _LLAMA_LIKE}, "gpt2": _read_gpt2, "gpt_neox": _read_gpt_neox,
            "falcon": _read_falcon}


def validate_config(config, source: str = "config") -> ModelShape:
    """A model config (config.json's dict) read into a ModelShape, or ShapeError in one line naming `source`,
    the field and what was expected. Each family is read from its own keys, with transformers' defaults
    for absent structure keys (`FAMILY_DEFAULTS`); an unknown model_type or a structure key its family does
    not have is refused, never guessed. The training side may call this on a config before loading weights."""
    if not isinstance(config, dict):
        raise ShapeError(f"{source}: expected a JSON object (a Hugging Face config), got {type(config).__name__}")
    family = config.get("model_type")
    if family == "gemma3" and isinstance(config.get("text_config"), dict):
        raise ShapeError(f"{source}: model_type 'gemma3' is the multimodal model (vision tower, text_config); "
                         "pass its text_config as a 'gemma3_text' config")
    if not isinstance(family, str) or family not in FAMILIES:
        raise ShapeError(f"{source}: model_type: expected one of {', '.join(sorted(FAMILIES))}, got {family!r}")
    for key, families in _STRUCTURE_KEYS.items():
        if config.get(key) and family not in families:
            raise ShapeError(f"{source}: {key}: not understood for model_type {family!r} (the formulas would "
                             "silently ignore it)")
    r = _Reader(config, source, family, FAMILY_DEFAULTS.get(family, {}))
    fields = FAMILIES[family](r)
    fields.setdefault("tied_embeddings", r.flag("tie_word_embeddings"))
    positions = r.raw("max_position_embeddings", None) or r.raw("n_positions", None) or 0
    fields["max_position_embeddings"] = positions if isinstance(positions, int) else 0
    name = config.get("_name_or_path") or family
    try:
        return ModelShape(**fields, family=family, name=str(name))
    except ValueError as err:
        raise ShapeError(f"{source}: {err}") from None


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
    extras: frozenset = frozenset()  # layers whose extra linears (router, shared experts, MLA's q_a) train

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
        total = 0
        for layer, m in self.dense:
            fan_in, fan_out = shape.matrix_dims(m, layer)
            total += (fan_in * fan_out + shape.matrix_bias(m, layer)) * shape.matrix_copies(m, layer)[0]
        total += sum(p.numel for p in self.parts)
        total += len(self.norms) * shape.layer_norm_params() + (shape.norm_params() if self.final_norm else 0)
        total += sum(shape.extra_params(layer) for layer in self.extras)
        if self.embeddings:
            total += shape.embedding_params()
        if self.head:
            total += shape.head_params() if not (shape.tied_embeddings and self.embeddings) else 0
            total += shape.vocab_size * shape.hidden_size if shape.tied_embeddings and not self.embeddings else 0
        return total

    def trains_head_weight(self, shape: ModelShape) -> bool:
        return self.head or (shape.tied_embeddings and self.embeddings)


def full_trainable(shape: ModelShape) -> Trainable:
    layers = range(shape.num_layers)
    return Trainable(dense=frozenset((i, m) for i in layers for m in shape.layer_matrices()),
                     norms=frozenset(layers), final_norm=True, embeddings=True, head=True,
                     extras=frozenset(layers))
