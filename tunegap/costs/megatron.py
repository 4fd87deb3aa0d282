"""Memory of a model-parallel training layout: tensor (TP), pipeline (PP), sequence (SP), context (CP), expert (EP)
and data parallelism with ZeRO 1-3, in the closed forms of the papers that introduced them.

Activations per layer follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", Sec. 4, Eq. 1-6 and Table 2), 16-bit activations, micro-batch b, sequence s, hidden h, heads a:
  no parallelism            sbh (34 + 5as/h)
  tensor parallel t         sbh (10 + 24/t + 5as/(ht))
  + sequence parallel       sbh/t (34 + 5as/h)
  selective recompute       drops the 5as/h term (softmax, its dropout, QK^T and AV are recomputed)
  full recompute            2sbh per layer (only the block input is kept)
The constant 34 and the 5as/h term are derived for GPT-3 blocks (4h GeLU MLP, multi-head attention, dropout);
`layer_activation_terms` rebuilds them tensor by tensor so the same derivation covers a gated MLP, grouped
keys/values and dropout-free blocks, and a test checks it returns exactly 34 and 5as/h for the GPT-3 block.
A fused (flash) attention kernel keeps no s x s tensor (Dao et al. 2022, Alg. 2): the 5as/h term is then
absent without any recompute of ours (the kernel recomputes the scores itself, counted as hardware FLOPs).

Pipeline parallelism with the 1F1B schedule (Narayanan et al. 2021, Sec. 2.2.1): the first stage holds the
activations of min(p, m) in-flight micro-batches of L/p layers each (Korthikanti et al. 2022, Sec. 4.2.3), and
the bubble is (p - 1)/m of the ideal step time. Context parallelism splits s over c devices. Expert parallelism
puts E/e experts on each device. ZeRO (Rajbhandari et al. 2020, Sec. 5) shards optimizer state (stage 1),
gradients (2) and weights (3) over the data-parallel group; with stage 3 each device also holds the gathered
working layers (the layer in use and the prefetched next), reported as a separate line.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .catalog import EstimateError
from .shape import ModelShape


@dataclass(frozen=True)
class Layout:
    """Device counts per kind of parallelism; data parallelism takes what is left of `gpus`."""

    gpus: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    sp: bool = False  # Megatron sequence parallelism in the TP region (Korthikanti et al. 2022, Sec. 4.2.2)

    def __post_init__(self):
        for name in ("gpus", "tp", "pp", "cp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise EstimateError(f"--{name}: expected a positive integer, got {value!r}")
        if self.gpus % (self.tp * self.pp * self.cp):
            raise EstimateError(f"--gpus {self.gpus} is not a multiple of tp x pp x cp = "
                                f"{self.tp} x {self.pp} x {self.cp}")
        if self.dp % self.ep:
            raise EstimateError(f"--ep {self.ep} must divide the data-parallel degree {self.dp} "
                                "(experts are spread over data-parallel ranks)")
        if self.sp and self.tp == 1:
            raise EstimateError("--sp (sequence parallelism) needs --tp > 1: it splits the TP region's sequence")

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp * self.cp)

    @property
    def model_parallel(self) -> int:
        return self.tp * self.pp * self.cp

    def describe(self) -> str:
        return (f"TP {self.tp}{' + SP' if self.sp else ''} x PP {self.pp} x CP {self.cp} x DP {self.dp}"
                + (f" (EP {self.ep} within DP)" if self.ep > 1 else ""))

    def to_dict(self) -> dict:
        return {**asdict(self), "dp": self.dp}


RECOMPUTE = ("none", "selective", "full")


def layer_activation_terms(shape: ModelShape, layer: int | None = None, *, dropout: bool = True) -> dict:
    """Bytes per token position of one block's saved activations at 16 bits, split as Korthikanti's Eq. 1-2
    splits them: `replicated` (LayerNorm inputs and dropout masks, outside the TP region: 10 for GPT-3 with
    the two matmul inputs that TP replicates), `parallel` (inside the TP region: 24 for GPT-3), both in units
    of h; and `scores` per unit of a·s (the s x s tensors: 5 for GPT-3: softmax output 2, dropout mask 1,
    dropout output 2)."""
    h = shape.hidden_size
    qk, v = shape.attention_dims()
    heads = shape.num_heads
    q_width, kv_width = heads * qk, shape.num_kv_heads * qk if not shape.mla else heads * qk
    v_width = (shape.num_kv_heads if not shape.mla else heads) * v
    inter = shape.matrix_dims("down", layer)[0] * shape.matrix_copies("down", layer)[1]
    if shape.is_moe_layer(layer):
        inter += shape.shared_expert_size  # the always-active shared experts' hidden width
    mask = 1 if dropout else 0
    # attention: Q, K (2 bytes each), V, the output projection's input; MLP: hidden activations
    attention = 2 * q_width + 2 * kv_width + 2 * v_width + 2 * heads * v
    mlp_hidden = (3 if shape.gated_mlp else 2) * 2 * inter  # gated: gate out, up out, act(gate)·up; else in, out
    parallel = (attention + mlp_hidden) / h
    # LayerNorm inputs (2 x 2 bytes), attention and MLP dropout masks (1 byte each), and the two matmul inputs
    # (LN outputs, 2 x 2 bytes) that tensor parallelism replicates on every rank
    replicated = 4 + 2 * mask + 4
    scores = 2 + 3 * mask  # softmax output (2 bytes), and with dropout its mask (1) and output (2)
    return {"replicated": replicated, "parallel": parallel, "scores": scores}


def activation_bytes_per_layer(shape: ModelShape, *, micro_batch: int, seq_len: int, layout: Layout,
                               recompute: str = "none", flash: bool = False, dropout: bool = True,
                               layer: int | None = None) -> float:
    """Korthikanti et al. 2022, Table 2, generalised by `layer_activation_terms`; `seq_len` is split by CP."""
    if recompute not in RECOMPUTE:
        raise EstimateError(f"--recompute: expected one of {', '.join(RECOMPUTE)}, got {recompute!r}")
    s, b, h, a, t = seq_len / layout.cp, micro_batch, shape.hidden_size, shape.num_heads, layout.tp
    if recompute == "full":
        return 2 * s * b * h / (t if layout.sp else 1)
    terms = layer_activation_terms(shape, layer, dropout=dropout)
    scores = 0.0 if recompute == "selective" or flash else terms["scores"] * a * s * b * s / t
    if flash:  # the kernel keeps an fp32 logsumexp per head and position instead of the s x s tensors
        scores = 4 * a * s * b / t
    linear = s * b * h * (terms["replicated"] / (t if layout.sp else 1) + terms["parallel"] / t)
    return linear + scores


def head_activation_bytes(shape: ModelShape, *, micro_batch: int, seq_len: int, layout: Layout) -> float:
    """The last stage's output layer: final LayerNorm input and the head's input (2 bytes each, Korthikanti et al.
    Sec. 4.3) and fp32 logits for the cross-entropy, vocabulary-parallel over TP."""
    s, b, t = seq_len / layout.cp, micro_batch, layout.tp
    return 4 * s * b * shape.hidden_size / (t if layout.sp else 1) + 4 * s * b * shape.vocab_size / t


@dataclass(frozen=True)
class StageMemory:
    """Bytes on the busiest device of a layout, each line apart so it can be read against its closed form."""

    weights: float  # sharded (ZeRO-3) or replicated weights of this device's stage
    gradients: float
    optimizer_state: float
    gathered_layers: float  # ZeRO-3 only: the working layers gathered in full
    activations: float
    runtime: float
    layers_per_stage: int
    in_flight: int  # micro-batches whose activations the first stage holds (1F1B)
    bubble: float  # (p - 1) / m

    @property
    def model_states(self) -> float:
        return self.weights + self.gradients + self.optimizer_state

    @property
    def peak(self) -> float:
        return self.model_states + self.gathered_layers + self.activations + self.runtime

    def to_dict(self) -> dict:
        return {**asdict(self), "model_states": self.model_states, "peak": self.peak}


def stage_params(shape: ModelShape, layout: Layout) -> tuple[float, float, float]:
    """(dense, expert, largest layer) parameters on one device of the busiest pipeline stage: layers split
    evenly (the first stage also holds the embeddings, the last the head), matrices split by TP, routed experts
    by EP x TP (Megatron-Core's default expert TP = TP)."""
    per_stage = math.ceil(shape.num_layers / layout.pp)
    layers = [shape.layer_params(i) for i in range(shape.num_layers)]
    experts = [shape.routed_expert_params(i) for i in range(shape.num_layers)]
    stages = [range(k * per_stage, min((k + 1) * per_stage, shape.num_layers)) for k in range(layout.pp)]
    best = (0.0, 0.0)
    for k, stage in enumerate(stages):
        dense = sum(layers[i] - experts[i] for i in stage)
        dense += shape.embedding_params() if k == 0 else 0
        dense += (shape.head_params() + shape.norm_params()) if k == layout.pp - 1 else 0
        expert = sum(experts[i] for i in stage)
        total = dense / layout.tp + expert / (layout.tp * layout.ep)
        if total > best[0] + best[1]:
            best = (dense / layout.tp, expert / (layout.tp * layout.ep))
    largest = max(layers) / layout.tp
    return best[0], best[1], largest


def sharded(params: float, per_param: float, *, dp: int, zero: int, stage: int) -> float:
    """Bytes of one kind of model state (`stage`: 1 optimizer state, 2 gradients, 3 weights) on one device:
    ZeRO stage `zero` shards it over the `dp` data-parallel ranks from its own stage on."""
    return params * per_param / (dp if zero >= stage else 1)


def model_state_bytes(params: float, *, dp: int, zero: int, bytes_weights: float, bytes_grads: float,
                      bytes_states: float) -> float:
    """ZeRO's closed form (Rajbhandari et al. 2020, Fig. 1): (2 + 2 + K)Ψ, 2Ψ + 2Ψ + KΨ/N_d, 2Ψ + (2 + K)Ψ/N_d,
    (2 + 2 + K)Ψ/N_d for stages 0-3; `stage_memory` shards with the same `sharded`."""
    return (sharded(params, bytes_weights, dp=dp, zero=zero, stage=3)
            + sharded(params, bytes_grads, dp=dp, zero=zero, stage=2)
            + sharded(params, bytes_states, dp=dp, zero=zero, stage=1))


def stage_memory(shape: ModelShape, layout: Layout, *, bytes_weights: float, bytes_grads: float,
                 bytes_states: float, zero: int, micro_batch: int, seq_len: int, micro_batches: int,
                 recompute: str = "none", flash: bool = False, dropout: bool = True,
                 runtime_bytes: float = 0.0) -> StageMemory:
    """Memory of the busiest device; ZeRO divides over the data-parallel group (x CP, as Megatron's distributed
    optimizer does), routed experts' states over their own data-parallel group (DP x CP / EP)."""
    if zero not in (0, 1, 2, 3):
        raise EstimateError(f"--zero: stage must be 0, 1, 2 or 3, got {zero}")
    dense, expert, largest = stage_params(shape, layout)
    group = layout.dp * layout.cp
    expert_group = max(1, group // layout.ep)

    def shard(stage_min: int, per_param: float) -> float:
        return (sharded(dense, per_param, dp=group, zero=zero, stage=stage_min)
                + sharded(expert, per_param, dp=expert_group, zero=zero, stage=stage_min))

    weights = shard(3, bytes_weights)
    gathered = 2 * largest * bytes_weights if zero >= 3 else 0.0
    per_stage = math.ceil(shape.num_layers / layout.pp)
    in_flight = min(layout.pp, micro_batches)
    per_layer = max(activation_bytes_per_layer(shape, micro_batch=micro_batch, seq_len=seq_len, layout=layout,
                                               recompute=recompute, flash=flash, dropout=dropout, layer=i)
                    for i in range(min(per_stage, shape.num_layers)))
    activations = per_layer * per_stage * in_flight
    if layout.pp == 1:
        activations += head_activation_bytes(shape, micro_batch=micro_batch, seq_len=seq_len, layout=layout)
    return StageMemory(weights=weights, gradients=shard(2, bytes_grads), optimizer_state=shard(1, bytes_states),
                       gathered_layers=gathered, activations=activations, runtime=runtime_bytes,
                       layers_per_stage=per_stage, in_flight=in_flight,
                       bubble=(layout.pp - 1) / micro_batches)


def candidate_layouts(shape: ModelShape, gpus: int, *, sp: bool = True, max_tp: int = 8):
    """Every layout of `gpus` devices, smallest model-parallel group first (less communication), then TP
    before PP (TP stays inside a node's NVLink), then the smaller EP."""
    out = []
    experts = shape.num_experts or 1
    for tp in (t for t in (1, 2, 4, 8, 16) if t <= max_tp and shape.num_heads % t == 0):
        for cp in (1, 2, 4, 8, 16):
            for pp in range(1, shape.num_layers + 1):
                if gpus % (tp * cp * pp):
                    continue
                dp = gpus // (tp * cp * pp)
                for ep in (e for e in range(1, experts + 1) if experts % e == 0 and dp % e == 0):
                    out.append(Layout(gpus=gpus, tp=tp, pp=pp, cp=cp, ep=ep, sp=sp and tp > 1))
    return sorted(out, key=lambda l: (l.model_parallel * l.ep, l.pp, l.cp, l.tp))


def smallest_fitting_layout(shape: ModelShape, gpus: int, capacity_bytes: float, memory_of) -> tuple:
    """(layout, memory, fits): the first layout (in `candidate_layouts` order) whose busiest device fits, or,
    when none does, the one with the lowest peak."""
    lowest = None
    for layout in candidate_layouts(shape, gpus):
        mem = memory_of(layout)
        if mem.peak <= capacity_bytes:
            return layout, mem, True
        if lowest is None or mem.peak < lowest[1].peak:
            lowest = (layout, mem)
    return (*lowest, False)
