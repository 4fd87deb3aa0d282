"""Memory per device of a training step: model states, activations and what the runtime itself takes.

Model states (Rajbhandari et al. 2020, "ZeRO", Sec. 3.1): weights, gradients and optimizer state, each a
number of bytes per parameter set by the precision and the optimizer (`PRECISIONS`, `OPTIMIZERS`), never one
hard-coded figure. `bytes_per_param` combines them; `NAMED_PRESETS` lists the published totals (16, 18, ...)
with their sources, and a test checks that the combinations reproduce them.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
Sec. 4.1, Eq. 1: 34·sbh + 5·a·s²·b bytes per layer): count every tensor autograd saves for the backward pass.
Their count assumes 16-bit GPT-3 blocks with dropout and eager attention; tunegap counts what a Hugging Face
Llama-style block saves today, and a test checks the count against `saved_tensors_hooks` on a real model:
  * SDPA/flash attention keeps Q, K, V, the output and a logsumexp row, never the s×s score matrix
    (Dao et al. 2022, Alg. 2), so there is no 5·a·s²·b term;
  * grouped-query attention keeps K and V at num_kv_heads width (no `repeat_kv` copy when batches carry no
    padding mask, which tunegap's packing guarantees);
  * the gated MLP keeps gate output, SiLU output and up output (3·i) plus down's input (i);
  * Hugging Face's RMSNorm upcasts to fp32 and keeps that copy; no dropout (Llama trains without it);
  * a frozen matrix keeps no input (its weight gradient is not needed), a LoRA matrix keeps it for A.
Full activation checkpointing keeps one input per block and recomputes the block in backward (Chen et al.
2016; Korthikanti et al. 2022, Sec. 5, "full recomputation": 2·sbh·L bytes at 16 bits).

The loss: tunegap (like Hugging Face) computes cross-entropy in fp32 over [positions × vocab] logits: log-softmax
keeps its output (4 bytes each), and the backward pass briefly holds two more fp32 tensors of that size (the
gradient of the log-probabilities and of the logits). For small models at short sequence lengths this is the
largest activation of all.

Peak, not sum: activations shrink during backward while gradients grow, so the peak is taken over the step's
timeline (the start of backward, each block's backward, the optimizer step); `Memory.sum_of_parts` is the
simpler upper bound most calculators report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import NamedTuple

from .catalog import EstimateError
from .parts import PARALLEL, SCALE_INPUT, SCALE_OUTPUT, SERIAL, Part
from .shape import ModelShape, Trainable


# --- bytes per parameter ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Precision:
    """How one training precision stores each kind of number (bytes per element)."""

    name: str
    weight: float  # every parameter the forward pass reads
    grad: float  # gradient per trainable parameter
    master: float  # fp32 master copy per trainable parameter (0 = the weights are the master)
    state_scale: float  # optimizer moments relative to fp32 (0.5: moments kept in bf16)
    activation: int  # saved activations (matmul inputs and outputs)
    cast_copy: float  # autocast's low-precision copy of each weight a matmul uses (bytes per parameter)
    separate_casts: bool  # autocast casts a shared input once per consuming matmul
    peak: str  # which datasheet peak the matmuls run at
    source: str


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", 4, 4, 0, 1.0, 4, 0, False, "fp32",
              "PyTorch default: fp32 weights, gradients and optimizer moments"),
    Precision("bf16-mixed", 2, 2, 4, 1.0, 2, 0, False, "bf16",
              "ZeRO (Rajbhandari et al. 2020, Sec. 3.1): bf16/fp16 weights and gradients (2Ψ + 2Ψ) and an fp32 "
              "master copy kept with the fp32 Adam moments (KΨ, K = 12): 16 B/param"),
    Precision("bf16-mixed-fp32grads", 2, 4, 4, 1.0, 2, 0, False, "bf16",
              "Megatron-LM (training/theoretical_memory_usage.py): bf16 weights, fp32 main gradients, fp32 master "
              "and Adam moments: 18 B/param (6 + 12/DP with the distributed optimizer)"),
    Precision("bf16-autocast", 4, 4, 0, 1.0, 2, 2, True, "bf16",
              "torch.autocast / Hugging Face Trainer bf16=True: fp32 weights, gradients and moments, matmuls in bf16 "
              "on cast copies (a trained weight's cast is cached, a frozen one is kept for its backward)"),
    Precision("bf16", 2, 2, 0, 0.5, 2, 0, False, "bf16",
              "pure bf16: weights, gradients and optimizer state in bf16 (PyTorch optimizers keep state in the "
              "parameter dtype)"),
    Precision("fp16-mixed", 2, 2, 4, 1.0, 2, 0, False, "fp16",
              "as bf16-mixed with fp16 and loss scaling (Micikevicius et al. 2018): 16 B/param"),
    Precision("bf16-fp32-moments", 2, 2, 0, 1.0, 2, 0, False, "bf16",
              "bf16 weights and gradients, fp32 Adam moments, no fp32 master copy (2 + 2 + 8 = 12 B/param; e.g. "
              "torchtitan/FSDP2 with bf16 parameters and fp32 optimizer state)"),
    Precision("fp8-mixed", 2, 2, 4, 1.0, 2, 0, False, "fp8",
              "FP8 matmuls (NVIDIA Transformer Engine; DeepSeek-V3, Liu et al. 2024, Sec. 3.3): bf16 weights and "
              "gradients, fp32 master and moments (16 B/param), matmuls at the FP8 peak; activations kept at 16 bits "
              "(a conservative bound: TE caches some matmul inputs in FP8)"),
)}


@dataclass(frozen=True)
class Optimizer:
    name: str
    state: float  # bytes per trainable parameter at fp32 (ignored when factored)
    follows_precision: bool  # state dtype follows Precision.state_scale
    factored: bool  # Adafactor: per-matrix row and column statistics instead of per-element
    step_temporary: float  # bytes per trainable parameter of temporaries in a foreach step (fp32)
    source: str


OPTIMIZERS: dict[str, Optimizer] = {o.name: o for o in (
    Optimizer("adamw", 8, True, False, 4,
              "AdamW: first and second moment per parameter (Kingma & Ba 2015, Alg. 1; Loshchilov & Hutter 2019, "
              "Alg. 2); a foreach step (PyTorch's default on GPU, tunegap's on CPU) makes one fp32 temporary "
              "per parameter for sqrt(v)"),
    Optimizer("adamw8bit", 2 + 2 * 4 / 2048, False, False, 0,
              "8-bit AdamW (Dettmers et al. 2022, 'Block-wise Quantization', Sec. 2): both moments in 8 bits plus "
              "one fp32 absmax per block of 2048 values"),
    Optimizer("sgd", 4, True, False, 0, "SGD with momentum: one buffer per parameter (torch.optim.SGD)"),
    Optimizer("adafactor", 0, True, True, 0,
              "Adafactor (Shazeer & Stern 2018, Alg. 4 with beta1 = 0): row and column sums of the second moment "
              "for each matrix (n + m values), a full second moment for vectors, no first moment"),
)}

# QLoRA (Dettmers et al. 2023, Sec. 3): 4-bit NormalFloat weights in blocks of 64 with one absmax each; "double
# quantization" stores those absmax values in 8 bits with one fp32 constant per 256 of them:
# 8/64 + 32/(64·256) = 0.127 bits per parameter instead of 32/64 = 0.5.
NF4_BLOCK, NF4_BLOCK2 = 64, 256


def nf4_bytes_per_param(double_quant: bool = True) -> float:
    constants = 8 / NF4_BLOCK + 32 / (NF4_BLOCK * NF4_BLOCK2) if double_quant else 32 / NF4_BLOCK
    return (4 + constants) / 8


def precision(name: str) -> Precision:
    if name not in PRECISIONS:
        raise EstimateError(f"--precision: unknown {name!r}; choose from {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def optimizer(name: str) -> Optimizer:
    if name not in OPTIMIZERS:
        raise EstimateError(f"--optimizer: unknown {name!r}; choose from {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def bytes_per_param(precision_name: str, optimizer_name: str) -> dict:
    """Model-state bytes per *trainable* parameter (Adafactor's factored state is per matrix, so not here)."""
    p, o = precision(precision_name), optimizer(optimizer_name)
    if o.factored:
        raise EstimateError("adafactor's state depends on matrix shapes, not on a per-parameter figure")
    state = p.master + o.state * (p.state_scale if o.follows_precision else 1.0)
    return {"weights": p.weight, "gradients": p.grad, "optimizer_state": state,
            "total": p.weight + p.grad + state}


# Published totals, each reproduced by a (precision, optimizer) pair above.
NAMED_PRESETS: dict[str, tuple[str, str, float, str]] = {
    "zero-mixed-adam": ("bf16-mixed", "adamw", 16, "ZeRO, Rajbhandari et al. 2020, Sec. 3.1 (2 + 2 + 12)"),
    "megatron-mixed-adam": ("bf16-mixed-fp32grads", "adamw", 18,
                            "Megatron-LM theoretical_memory_usage.py; DeepSpeed after PR #5099"),
    "fp32-adam": ("fp32", "adamw", 16, "4 weights + 4 gradients + 8 Adam moments"),
    "autocast-adam": ("bf16-autocast", "adamw", 16, "fp32 master = weights under torch.autocast"),
    "bf16-adam": ("bf16", "adamw", 8, "everything in bf16 (2 + 2 + 4)"),
    "fp32-sgd-momentum": ("fp32", "sgd", 12, "4 + 4 + 4"),
    "bf16-no-master-adam": ("bf16-fp32-moments", "adamw", 12,
                            "bf16 weights and gradients, fp32 Adam moments, no master copy (2 + 2 + 8)"),
    "fp8-mixed-adam": ("fp8-mixed", "adamw", 16, "FP8 compute, the ZeRO mixed-precision states (2 + 2 + 12)"),
    "adam-8bit-mixed": ("bf16-mixed", "adamw8bit", 10 + 2 * 4 / 2048,
                        "bf16 weights and gradients, fp32 master, 8-bit Adam moments (Dettmers et al. 2022): "
                        "2 + 2 + 4 + 2"),
}


# --- what trains, tensor by tensor ------------------------------------------------------------------------

class TensorShape(NamedTuple):
    """One trainable tensor: layer (None outside the blocks), rows x cols, stored copies (MoE experts)."""

    layer: int | None
    rows: int
    cols: int
    copies: int = 1
    added: bool = False  # a new parameter the method adds (a `Part`'s tensor), not a base weight

    @property
    def numel(self) -> int:
        return self.rows * self.cols * self.copies


def trainable_tensors(shape: ModelShape, tr: Trainable) -> list[TensorShape]:
    """Every trainable tensor; a test checks the numels sum to `Trainable.params` (itself checked on real models)."""
    d, out = shape.hidden_size, []
    for layer, m in sorted(tr.dense):
        k, n = shape.matrix_dims(m, layer)
        copies = shape.matrix_copies(m, layer)[0]
        out.append(TensorShape(layer, k, n, copies))
        if shape.matrix_bias(m, layer):
            out.append(TensorShape(layer, shape.matrix_bias(m, layer), 1, copies))
    for layer in sorted(tr.extras):
        for _, k, n, stored, _, bias in shape.extra_linears(layer).values():
            out.append(TensorShape(layer, k, n, stored))
            if bias:
                out.append(TensorShape(layer, bias, 1, stored))
    out += [TensorShape(part.layer, t.rows, t.cols, t.copies, True)
            for part in sorted((p for p in tr.parts if p.layer is not None), key=Part.sort_key) for t in part.tensors]
    per_norm = shape.norm_params()
    for layer in sorted(tr.norms):
        out += [TensorShape(layer, per_norm, 1)] * shape.layer_norms
        if shape.layer_norm_params() > shape.layer_norms * per_norm:  # q/k norms, MLA's latent norms
            out.append(TensorShape(layer, shape.layer_norm_params() - shape.layer_norms * per_norm, 1))
    if tr.final_norm:
        out.append(TensorShape(None, per_norm, 1))
    if tr.embeddings:
        out.append(TensorShape(None, shape.vocab_size, d))
        if shape.learned_positions:
            out.append(TensorShape(None, shape.learned_positions, d))
    if tr.head and not (shape.tied_embeddings and tr.embeddings):
        out.append(TensorShape(None, shape.vocab_size, d))  # untied head, or the tied matrix trained as head
    out += [TensorShape(None, t.rows, t.cols, t.copies, True)
            for part in sorted((p for p in tr.parts if p.layer is None), key=Part.sort_key) for t in part.tensors]
    return out


def added_params(shape: ModelShape, tr: Trainable) -> int:
    """Parameters a method adds to the base model (so params_total = base + added)."""
    return sum(t.numel for t in trainable_tensors(shape, tr) if t.added)


# --- the training setup -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainSetup:
    """How a run trains, apart from the model, the method and the amount of data."""

    optimizer: str = "adamw"
    precision: str = "fp32"
    micro_batch: int = 8  # sequences per forward pass on each device
    grad_accum: int = 1  # micro-batches per optimizer step
    gpus: int = 1  # data-parallel devices
    zero: int = 0  # ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also weights (= FSDP)
    checkpointing: bool = False  # full activation checkpointing, one checkpoint per block
    base_format: str = "same"  # "nf4": QLoRA's 4-bit NormalFloat frozen base (Dettmers et al. 2023)
    double_quant: bool = True  # QLoRA double quantization of the NF4 constants
    mfu: float = 0.40  # assumed model-FLOPs utilisation (time = model FLOPs / (peak x MFU))

    def __post_init__(self):
        precision(self.precision)
        optimizer(self.optimizer)
        for name in ("micro_batch", "grad_accum", "gpus"):
            if getattr(self, name) < 1:
                raise EstimateError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(self, name)}")
        if self.zero not in (0, 1, 2, 3):
            raise EstimateError(f"--zero: stage must be 0, 1, 2 or 3, got {self.zero}")
        if self.base_format not in ("same", "nf4"):
            raise EstimateError(f"base format must be 'same' or 'nf4', got {self.base_format!r}")
        if not 0 < self.mfu <= 1:
            raise EstimateError(f"--mfu: must be in (0, 1], got {self.mfu}")

    def to_dict(self) -> dict:
        return asdict(self)


# --- activations ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Activations:
    """Saved-activation bytes of one micro-batch: per block, the loss head, and the backward transient."""

    blocks: tuple  # bytes each block keeps for its backward (0 where no gradient passes)
    checkpoints: tuple  # bytes each block keeps under full checkpointing (its input)
    head: float  # final norm, head input, log-probabilities
    transient: float  # gradients of log-probabilities and logits at the start of backward

    @property
    def peak(self) -> float:
        """Activation bytes at the start of backward, every block's tensors still held."""
        return sum(self.blocks) + self.head + self.transient

    @property
    def peak_checkpointed(self) -> float:
        """Checkpointed: all block inputs at the start of backward, or inputs below + one recomputed block."""
        top = sum(self.checkpoints) + self.head + self.transient
        below = 0.0
        worst = 0.0
        for kept, full in zip(self.checkpoints, self.blocks):
            # the recomputed block's own input is the stored checkpoint, not a copy, so it is in `full`
            worst = max(worst, below + full if full else 0.0)
            below += kept
        return max(top, worst)


def activation_bytes(shape: ModelShape, tr: Trainable, p: Precision, *, sequences: int, seq_len: int,
                     loss_positions: float, math_attention: bool = False, quantized_base: bool = False) -> Activations:
    """What autograd keeps for one micro-batch of `sequences` rows of `seq_len` tokens.

    Walks the blocks as `flops.train_step_flops` does, tracking whether the residual stream requires a
    gradient yet: a tensor is kept only where some parameter at or below it trains.

    `math_attention`: SDPA falls back to its math kernel (on CUDA for fp32, which the flash kernel does not
    take): it keeps the softmax output, Korthikanti's a·s²·b term, and K, V repeated to every query head.

    Dtypes follow Hugging Face + PEFT: autocast casts a matmul's fp32 input to a bf16 copy per matmul;
    PEFT keeps LoRA adapters in fp32 (autocast_adapter_dtype) and casts a bf16 input to an fp32 copy per
    adapted matrix (`LoraLayer._cast_input_dtype`); IA3 likewise upcasts down's input to its fp32 vector.
    Added parts are costed by kind (`parts.py`): a parallel path as LoRA, a scaled input as IA3's l_ff, a
    scaled output as IA3's l_k and l_v, a serial chain as a Houlsby adapter. Checked against autograd for
    those methods; a part at a site no shipped method uses follows the same rule, unchecked. A scaled output
    beside a parallel path keeps both outputs (DoRA); a weight a part builds per call is kept once per call
    where its matmul's input needs a gradient (LoHa's ΔW). Both checked in fp32 (tests/test_peft_family.py).

    `quantized_base`: the block matrices are 4-bit (QLoRA): each matmul dequantises its weight afresh, in
    backward too, so autocast keeps no low-precision copy of it (torchao's `LinearNF4`, bitsandbytes'
    `MatMul4Bit`).
    """
    e, f32 = p.activation, 4
    autocast = p.cast_copy > 0
    lora_in = 2 if autocast else f32  # bytes of the input copy a LoRA A keeps (fp32 adapters)
    lora_copies = autocast or p.weight < 4  # does each adapted matrix keep its own copy?
    h, hq = shape.hidden_size, shape.num_heads * shape.head_dim
    hkv = shape.num_kv_heads * shape.head_dim
    s_q = seq_len + tr.extra_queries
    n = sequences * s_q  # token positions in the blocks
    stream = tr.input_trains  # does the residual stream require a gradient yet?
    blocks, checkpoints = [], []
    for layer in range(shape.num_layers):
        inter, k_exp = shape.matrix_dims("down", layer)[0], shape.matrix_copies("down", layer)[1]
        matrix_params = {m: shape.matrix_dims(m, layer)[0] * shape.matrix_dims(m, layer)[1]
                         * shape.matrix_copies(m, layer)[0] for m in shape.layer_matrices()}

        def trains(m):
            return (layer, m) in tr.dense

        def adapted(m):  # a parallel path (LoRA) beside this matrix
            return bool(tr.parts_at(layer, m, PARALLEL))

        def grad_out(m, grad_in):
            return grad_in or trains(m) or tr.touches(layer, m)

        def lora_b(ms):  # each later matmul of a parallel path keeps its input (LoRA's B: A's output, rank r)
            return lora_in * sum(part.inner_width for m in ms for part in tr.parts_at(layer, m, PARALLEL))

        def scaled(ms, width):
            """A trained vector's multiply keeps the other operand: a scaled output (IA3's l_k, l_v), in the
            activation dtype; a scaled input (IA3's l_ff) of a matrix that keeps none, upcast to the fp32 vector."""
            # beside a parallel path the scale multiplies the base output and the path's apart, keeping both
            # (PEFT's DoRA: (s - 1)·W0·x + s·B·A·x, Liu et al. 2024, Eq. 5)
            outputs = e * sum(shape.matrix_dims(m)[1] * (2 if adapted(m) else 1) for m in ms
                              if tr.parts_at(layer, m, SCALE_OUTPUT))
            inputs = f32 * width * sum(bool(tr.parts_at(layer, m, SCALE_INPUT)) and not (trains(m) or adapted(m))
                                       for m in ms)
            return outputs + inputs

        def norm_output(ms, width):
            """A norm's output read by the matmuls `ms`, kept for the weight gradients of trained ones and for
            LoRA's A: once (fp32; bf16 model, trained weights), or once per matmul (autocast's bf16 casts,
            PEFT's fp32 casts)."""
            dense = [m for m in ms if trains(m)]
            adapters = [m for m in ms if adapted(m)]
            if autocast:
                return e * width * len(dense + adapters) + lora_b(adapters)
            kept = e * width if dense or (adapters and not lora_copies) else 0
            return kept + (lora_in * width * len(adapters) if lora_copies else 0) + lora_b(adapters)

        def matmul_input(m, width, shared):
            """A single matmul's input (o: SDPA's output; down: the gated product). `shared`: that tensor is
            already kept by someone else (SDPA keeps its output)."""
            kept = 0
            if trains(m) or (adapted(m) and not lora_copies):
                kept += 0 if shared else e * width
            if adapted(m) and lora_copies:
                kept += lora_in * width
            return kept + lora_b((m,))

        def rebuilt(ms, grad_in):
            """Weights parts build once per call (LoHa's ΔW), kept by their matmul where its input needs a gradient."""
            return lora_in * sum(part.matmuls[0].fan_in * part.matmuls[0].fan_out for m in ms
                                 for part in tr.parts_at(layer, m, PARALLEL) if part.weight_per_call) if grad_in else 0

        norm_trains = layer in tr.norms

        def norm(grad_in):  # HF RMSNorm keeps an fp32 copy of its input, and the normalised x if its weight trains
            return (f32 * h if grad_in else 0) + (p.weight * h if norm_trains else 0)

        kept = n * norm(stream)
        y_grad = stream or norm_trains
        kept += n * norm_output(("q", "k", "v"), h)
        kept += n * scaled(("q", "k", "v"), h) + rebuilt(("q", "k", "v"), y_grad)
        extra_keys = tr.extra_keys(layer)  # trained keys/values (prefix tuning): the attention's backward runs
        n_kv = sequences * (s_q + extra_keys)
        attn_grad = any(grad_out(m, y_grad) for m in ("q", "k", "v")) or extra_keys > 0
        if attn_grad:  # SDPA keeps Q, K, V, its output (o's input too: same storage) and an fp32 logsumexp
            kv_width = hq if math_attention else hkv
            kept += e * (2 * n * hq + 2 * n_kv * kv_width) + f32 * n * shape.num_heads
            if math_attention:  # softmax probabilities, heads x s_q x s_k per sequence
                kept += f32 * sequences * shape.num_heads * s_q * (s_q + extra_keys)
        if attn_grad:
            kept += n * family_attention_extras(shape, e, p.weight if norm_trains else 0)
        kept += n * matmul_input("o", hq, shared=attn_grad) + n * scaled(("o",), hq) + rebuilt(("o",), attn_grad)
        stream = stream or grad_out("o", attn_grad)

        # the residual-stream norms past the first: one more in a Llama block, three in Gemma 2/3's, none in
        # Falcon-7B's parallel block (its one norm feeds attention and MLP)
        kept += (shape.layer_norms - 1) * n * norm(stream)
        y2_grad = stream or norm_trains
        mlp = ("gate", "up") if shape.gated_mlp else ("up",)
        kept += n * k_exp * norm_output(mlp, h)
        kept += n * k_exp * scaled(mlp, h) + rebuilt(mlp, y2_grad)
        hidden_grad = any(grad_out(m, y2_grad) for m in mlp)
        if hidden_grad:  # gated: gate output (SiLU input), SiLU output, up output; plain: the GELU input
            kept += n * k_exp * e * inter * (3 if shape.gated_mlp else 1)
            if shape.is_moe_layer(layer):
                # router logits and probabilities (fp32); each routed expert's output, kept for its routing
                # weight's multiply, with the int64 token indices; shared experts as a gated MLP (and Qwen2-MoE's
                # sigmoid gate keeps the shared output beside it)
                kept += n * (2 * f32 * shape.num_experts + k_exp * (e * h + 16) + e * 4 * shape.shared_expert_size)
                kept += n * (e * h + f32) if shape.shared_expert_gate else 0
            # a GeLU written as Python arithmetic (GPT-2's gelu_new) keeps three more tensors of the hidden width
            kept += n * k_exp * e * inter * COMPOSED_ACTIVATIONS.get(shape.activation, 0)
        kept += n * k_exp * matmul_input("down", inter, shared=False)
        kept += n * k_exp * scaled(("down",), inter) + rebuilt(("down",), hidden_grad)
        stream = stream or grad_out("down", hidden_grad)
        for part in tr.parts_at(layer, "mlp_out", SERIAL):
            # a serial chain keeps its input and each inner width twice, before and after the nonlinearity
            # (Houlsby adapter: the MLP output, the bottleneck before and after GELU)
            kept += n * e * (part.matmuls[0].fan_in + 2 * part.inner_width)
            stream = True
        if not stream:  # nothing at or below this block trains: backward never reaches it, nothing is kept
            blocks.append(0.0)
            checkpoints.append(0.0)
            continue
        # autocast's bf16 copy of a weight is kept wherever that matmul's input needs a gradient (not a 4-bit one's)
        if autocast and not quantized_base:
            needs = {"q": y_grad, "k": y_grad, "v": y_grad, "o": attn_grad, "gate": y2_grad, "up": y2_grad,
                     "down": hidden_grad}
            kept += p.cast_copy * sum(matrix_params[m] for m in shape.layer_matrices()
                                      if needs[m] or tr.parts_at(layer, m, SCALE_INPUT))
        blocks.append(kept)
        checkpoints.append(n * p.weight * h)  # the block's input, in the residual stream's dtype

    head_in = stream or tr.final_norm
    head = n * ((f32 * h if stream else 0) + (p.weight * h if tr.final_norm else 0))
    if tr.trains_head_weight(shape):
        head += e * loss_positions * h  # the gathered hidden states the head's weight gradient needs
    if head_in and autocast:
        head += p.cast_copy * shape.vocab_size * h
    head += f32 * loss_positions * shape.vocab_size  # log-softmax output, fp32
    transient = 2 * f32 * loss_positions * shape.vocab_size  # d(log-probs) and d(logits), fp32
    return Activations(tuple(blocks), tuple(checkpoints), head, transient)


# transformers' NewGELUActivation: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), written as Python arithmetic:
# read off its autograd graph, it keeps tanh's output and both operands of the last multiply (0.5·x and
# 1 + tanh) beyond the input the walk already counts
COMPOSED_ACTIVATIONS = {"gelu_new": 3}


def family_attention_extras(shape: ModelShape, e: float, norm_weight: float) -> float:
    """Bytes per position the attention of a non-Llama block keeps beyond Q, K, V and the output: Qwen3/Gemma 3's
    per-head q/k RMSNorms (an fp32 copy of q and k, and the normalised ones when the norm trains), MLA's latent
    query and key/value (their RMSNorms' fp32 copies and the up-projections' inputs)."""
    f32 = 4
    total = 0.0
    if shape.qk_norm:
        q_width, kv_width = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
        total += (f32 + norm_weight) * (q_width + kv_width)
    if shape.mla:
        latent = shape.q_lora_rank + shape.kv_lora_rank
        total += (f32 + norm_weight + e) * latent + e * (shape.kv_lora_rank + shape.qk_rope_head_dim)
    return total


# --- model states and the peak ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Memory:
    """Bytes per device. `peak` is the busiest moment of a steady-state step (optimizer state already built)."""

    weights: float
    gradients: float
    optimizer_state: float
    activations: float  # peak activation bytes with the setup's checkpointing choice
    activations_no_checkpointing: float
    activations_checkpointing: float
    step_temporaries: float
    runtime: float  # CUDA context, or the Python + torch process itself on the CPU
    allocator: float  # freed memory the CPU allocator keeps (glibc), on top of live tensors
    peak: float
    phase: str  # which moment sets the peak: "backward" or "optimizer step"
    detail: dict = field(default_factory=dict)

    @property
    def sum_of_parts(self) -> float:
        """Every component at once: the upper bound most calculators report."""
        return (self.weights + self.gradients + self.optimizer_state + self.activations + self.step_temporaries
                + self.runtime + self.allocator)

    def to_dict(self) -> dict:
        return {**asdict(self), "sum_of_parts": self.sum_of_parts}


def _adapter_precision(p: Precision) -> Precision:
    """PEFT keeps the parameters a method adds in fp32 whatever the base's dtype (autocast_adapter_dtype)."""
    return p if p.weight >= 4 else PRECISIONS["fp32"]


def _optimizer_state(t: TensorShape, p: Precision, o: Optimizer) -> float:
    scale = p.state_scale if o.follows_precision else 1.0
    if o.factored:  # Adafactor: rows + cols for a matrix, every element for a vector
        state = 4 * scale * ((t.rows + t.cols) * t.copies if t.cols > 1 and t.rows > 1 else t.numel)
    else:
        state = o.state * scale * t.numel
    return state + p.master * t.numel


def memory_per_device(shape: ModelShape, tr: Trainable, setup: TrainSetup, *, seq_len: int,
                      loss_positions: float | None = None, runtime_bytes: float = 0.0,
                      gpus: int | None = None, math_attention: bool = False,
                      allocator_retention: float = 0.0) -> Memory:
    """Memory of one device for one micro-batch of `setup.micro_batch` sequences of `seq_len` tokens.

    `loss_positions`: positions per micro-batch where logits are computed (default every position).
    `gpus`: the data-parallel degree (default `setup.gpus`); ZeRO divides by it (Rajbhandari et al. 2020, Fig. 1).
    `math_attention`: SDPA runs its math kernel (see `activation_bytes`).
    `allocator_retention`: freed bytes the allocator keeps, as a fraction of the activation peak. On Linux
    CPUs glibc malloc raises its mmap threshold (up to 32 MiB) as blocks are freed, so activation-sized
    blocks come from heaps that rarely shrink: forward temporaries interleaved with kept tensors leave holes.
    `tunegap.costs.catalog` states the measured figure for the CPU; GPUs keep theirs in the runtime overhead.
    """
    p, o = precision(setup.precision), optimizer(setup.optimizer)
    g = setup.gpus if gpus is None else gpus
    if g < 1:
        raise EstimateError(f"--gpus: must be at least 1, got {g}")
    positions = setup.micro_batch * (seq_len + tr.extra_queries)
    loss_positions = positions if loss_positions is None else loss_positions
    tensors = trainable_tensors(shape, tr)

    # weights: base model + what the method adds; QLoRA stores the blocks' matrices in NF4
    base, added = shape.total_params(), sum(t.numel for t in tensors if t.added)
    quantized = 0
    if setup.base_format == "nf4":
        quantized = sum(shape.matrix_dims(m, i)[0] * shape.matrix_dims(m, i)[1] * shape.matrix_copies(m, i)[0]
                        for i in range(shape.num_layers) for m in shape.layer_matrices())
    adapter = _adapter_precision(p)
    weights = (quantized * nf4_bytes_per_param(setup.double_quant) + (base - quantized) * p.weight
               + added * adapter.weight)

    grads_by_layer = [0.0] * shape.num_layers
    grads_top = 0.0
    opt_state = 0.0
    step_temp = 0.0
    for t in tensors:
        tp = adapter if t.added else p
        if t.layer is None:
            grads_top += t.numel * tp.grad
        else:
            grads_by_layer[t.layer] += t.numel * tp.grad
        opt_state += _optimizer_state(t, tp, o)
        step_temp += o.step_temporary * (tp.state_scale if o.follows_precision else 1.0) * t.numel
    trainable = sum(t.numel for t in tensors)

    # ZeRO: stage 1 shards optimizer state (and the step that updates it), 2 also gradients, 3 also weights
    if setup.zero >= 1:
        opt_state, step_temp = opt_state / g, step_temp / g
    if setup.zero >= 2:
        grads_by_layer, grads_top = [x / g for x in grads_by_layer], grads_top / g
    gathered = 0.0
    if setup.zero >= 3:
        # FSDP (Zhao et al. 2023): a unit's full weights are gathered just before use; the root unit
        # (embeddings, head) stays gathered through forward and backward; backward prefetches the next block
        root = shape.embedding_params() + shape.head_params()
        gathered = (root + 2 * shape.layer_params()) * p.weight
        weights = weights / g + gathered
    grads = sum(grads_by_layer) + grads_top

    acts = activation_bytes(shape, tr, p, sequences=setup.micro_batch, seq_len=seq_len,
                            loss_positions=loss_positions, math_attention=math_attention,
                            quantized_base=setup.base_format == "nf4")
    held = acts.checkpoints if setup.checkpointing else acts.blocks
    activation = acts.peak_checkpointed if setup.checkpointing else acts.peak
    if setup.grad_accum > 1:  # gradients persist across micro-batches: all of them are there at every moment
        backward = activation + grads
    else:  # walk down the blocks: activations below still held, gradients above already written
        below, above = sum(held), grads_top
        backward = below + acts.head + acts.transient + above  # the loss head's backward
        for layer in reversed(range(shape.num_layers)):
            below -= held[layer]
            above += grads_by_layer[layer]
            backward = max(backward, below + acts.blocks[layer] + above)
    allocator = allocator_retention * activation
    backward += allocator
    step = grads + step_temp
    phase = "backward" if backward >= step else "optimizer step"
    peak = runtime_bytes + weights + opt_state + max(backward, step)
    detail = {
        "loss_head_bytes": acts.head + acts.transient,
        "blocks_bytes": sum(acts.blocks),
        "zero3_gathered_bytes": gathered,
        "nf4_params": quantized,
        "trainable_params": trainable,
        "added_params": added,
    }
    return Memory(weights=weights, gradients=grads, optimizer_state=opt_state, activations=activation,
                  activations_no_checkpointing=acts.peak, activations_checkpointing=acts.peak_checkpointed,
                  step_temporaries=step_temp, runtime=runtime_bytes, allocator=allocator, peak=peak, phase=phase,
                  detail=detail)


MAX_DEVICES = 1 << 20


def devices_needed(shape: ModelShape, tr: Trainable, setup: TrainSetup, *, seq_len: int, capacity_bytes: float,
                   loss_positions: float | None = None, runtime_bytes: float = 0.0,
                   math_attention: bool = False, allocator_retention: float = 0.0) -> tuple[int | None, str]:
    """Smallest data-parallel degree at which the peak fits `capacity_bytes`, or (None, why not).

    Memory per device never grows with the degree (ZeRO only divides), so a binary search is exact.
    """
    def peak(g):
        return memory_per_device(shape, tr, setup, seq_len=seq_len, loss_positions=loss_positions,
                                 runtime_bytes=runtime_bytes, gpus=g, math_attention=math_attention,
                                 allocator_retention=allocator_retention).peak

    if peak(1) <= capacity_bytes:
        return 1, "fits on one device"
    if setup.zero == 0:
        return None, ("ZeRO-0 replicates everything on each device; "
                      "try --zero 3 (FSDP), --checkpointing, a smaller --micro-batch or a larger device")
    floor = peak(MAX_DEVICES)
    if floor > capacity_bytes:
        return None, (f"does not fit even on {MAX_DEVICES:,} devices with ZeRO-{setup.zero}: what cannot be "
                      f"sharded (activations of one micro-batch, gathered weights, runtime) is "
                      "above the capacity; try "
                      + ("--zero 3, " if setup.zero < 3 else "")
                      + "--checkpointing, a smaller --micro-batch, or model parallelism (--tp/--pp/--cp, full "
                        "training)")
    lo, hi = 1, 2
    while peak(hi) > capacity_bytes:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if peak(mid) > capacity_bytes else (lo, mid)
    return hi, f"fits on {hi} devices with ZeRO-{setup.zero}"
