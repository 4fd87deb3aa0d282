"""Training and inference FLOPs from a model's shape and what the method trains.

Counting rule (the one `torch.utils.flop_counter.FlopCounterMode` applies, so the two can be compared):
a matmul of an (n x k) by a (k x m) matrix costs 2nkm FLOPs; elementwise work is not counted.

Per projection W (k inputs, m outputs) and T tokens (Kaplan et al. 2020, Sec. 2.1; Narayanan et al. 2021, App.):
  forward            2kmT
  input gradient     2kmT  only if some parameter *below* W trains (otherwise nothing needs dL/dx)
  weight gradient    2kmT  only if W itself trains
So a full fine-tune costs 6N per token, while LoRA skips every base weight gradient and costs about 4N,
i.e. roughly two thirds of full fine-tuning per token, not 1% (the saving of LoRA is memory, not FLOPs).
Freezing the bottom blocks also skips their input gradients: backprop stops at the lowest trained layer.

Attention scores and values (QK^T and AV) cost 4·s_q·s_k·h·d_head per sequence and layer forward,
twice that backward (PaLM, Chowdhery et al. 2022, App. B). `causal=True` halves it (Megatron-LM's s/2);
the default counts the full square, which is what the kernels compute and what FlopCounterMode counts.
Flash-style kernels also recompute the scores in the backward pass (Dao et al. 2022, Alg. 4): that is
hardware work, not model work, so it sits in `recompute` and counts towards HFU, never MFU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .parts import PARALLEL, SCALE_INPUT, SCALE_OUTPUT, SERIAL
from .shape import MLP_MATRICES, ModelShape, Trainable, full_trainable


@dataclass(frozen=True)
class Flops:
    forward: float
    backward_input: float  # activation gradients
    backward_weight: float  # parameter gradients
    recompute: float = 0.0  # work redone for memory's sake (attention scores, activation checkpointing)

    @property
    def backward(self) -> float:
        return self.backward_input + self.backward_weight

    @property
    def total(self) -> float:
        """Model FLOPs: what MFU divides by."""
        return self.forward + self.backward

    @property
    def hardware(self) -> float:
        """Hardware FLOPs (HFU): what the kernels execute, and what FlopCounterMode counts."""
        return self.total + self.recompute

    def __add__(self, other: "Flops") -> "Flops":
        return Flops(self.forward + other.forward, self.backward_input + other.backward_input,
                     self.backward_weight + other.backward_weight, self.recompute + other.recompute)

    def scaled(self, factor: float) -> "Flops":
        return Flops(self.forward * factor, self.backward_input * factor, self.backward_weight * factor,
                     self.recompute * factor)

    def to_dict(self) -> dict:
        return {**asdict(self), "backward": self.backward, "total": self.total, "hardware": self.hardware}


ZERO = Flops(0.0, 0.0, 0.0, 0.0)


def _matmul(fan_in: int, fan_out: int, tokens: float, *, input_grad: bool, weight_grad: bool) -> Flops:
    mm = 2.0 * fan_in * fan_out * tokens
    return Flops(mm, mm if input_grad else 0.0, mm if weight_grad else 0.0)


def _extras(extras: dict, part: str, tokens: float, *, input_grad: bool, weight_grad: bool) -> Flops:
    """A layer's matmuls outside the seven sites (`ModelShape.extra_linears`) in one part of the block: an MoE
    router and shared experts, MLA's query down-projection. They read the normed stream: a gradient to their
    input when the stream carries one, to their weight when the method trains the layer's extras."""
    total = ZERO
    for where, fan_in, fan_out, _, active, _ in extras.values():
        if where == part:
            total = total + _matmul(fan_in, fan_out, tokens * active, input_grad=input_grad, weight_grad=weight_grad)
    return total


def _chain(matmuls, tokens: float, *, input_grad: bool) -> list[Flops]:
    """A part's matmuls in order, every weight trained: the first needs its input gradient only where the
    site's input carries one; the later ones read a trained matmul's output, so theirs is always needed
    (LoRA's x -> A -> B, Hu et al. 2021, Eq. 3; a Houlsby adapter's down -> up, Houlsby et al. 2019)."""
    return [_matmul(mm.fan_in, mm.fan_out, tokens, input_grad=input_grad or i > 0, weight_grad=True)
            for i, mm in enumerate(matmuls)]


def _per_call(part, calls: int) -> Flops:
    """A part's once-per-call matmuls (`parts.CallMatmul`), `calls` forward calls: the forward product, one
    matmul per operand with a gradient, and the product again where the backward recomputes it."""
    total = ZERO
    for mm in part.per_call:
        flops = 2.0 * mm.rows * mm.inner * mm.cols * calls
        total = total + Flops(flops, 0.0, mm.grads * flops, flops if mm.recomputed else 0.0)
    return total


def _last_matmul(shape: ModelShape, trainable: Trainable, layer: int, tokens: float) -> float:
    """Forward FLOPs of a block's last matmul, which activation checkpointing does not redo: non-reentrant
    `torch.utils.checkpoint` stops recomputing once every tensor the backward needs is back (its early stop),
    and after that matmul only the residual add runs, which saves nothing. The last one is the last matmul of
    a part after the MLP (an adapter's up projection), else of a part beside the down projection (LoRA's B),
    else the down projection itself; none where a trained vector scales down's output, whose multiply keeps it
    (DoRA's magnitude). (Counted on 2-layer models: the whole-block recompute overstated full SFT's step by 5%,
    LoRA's by 0.3%.)"""
    after = trainable.parts_at(layer, "mlp_out", SERIAL)
    if after:
        last = after[-1].matmuls[-1]
        return _matmul(last.fan_in, last.fan_out, tokens, input_grad=False, weight_grad=False).forward
    if trainable.parts_at(layer, "down", SCALE_OUTPUT):  # the recompute runs through the last matmul
        return 0.0
    fan_in, fan_out = shape.matrix_dims("down", layer)
    copies = shape.matrix_copies("down", layer)[1]
    beside = trainable.parts_at(layer, "down", PARALLEL)
    if beside:
        last = beside[-1].matmuls[-1]
        return _matmul(last.fan_in, last.fan_out, tokens * copies, input_grad=False, weight_grad=False).forward
    return _matmul(fan_in, fan_out, tokens * copies, input_grad=False, weight_grad=False).forward


def train_step_flops(shape: ModelShape, trainable: Trainable, *, sequences: int, seq_len: int,
                     logit_tokens: float | None = None, causal: bool = False,
                     checkpointing: bool = False, attention_rescore: bool = True, calls: int = 1) -> Flops:
    """FLOPs of one forward+backward over `sequences` rows of `seq_len` tokens.

    `logit_tokens`: positions where the vocabulary projection runs (tunegap computes logits only where
    the loss needs them; None = every position, as a plain Hugging Face forward does).
    Gradient flow is tracked through the residual stream layer by layer, so frozen bottoms and every kind
    of added part (`parts.py`: parallel paths, serial adapters, scales, extra positions) each get exactly
    the backward work autograd will do.
    `checkpointing`: full activation checkpointing per block (Chen et al. 2016; Korthikanti et al. 2022,
    Sec. 5): every block whose backward runs repeats its forward once, added to `recompute` (HFU, not MFU).
    The head and blocks below the lowest trained one are not recomputed.
    `attention_rescore`: the attention kernel recomputes the scores in backward (flash kernels, the
    default); False for SDPA's math backend, which keeps the probabilities instead (compiled CPU runs).
    `calls`: forward calls those rows come in (micro-batches): parts' per-call matmuls run once per call.
    """
    s_q = seq_len + trainable.extra_queries
    tokens = float(sequences * s_q)
    logit_tokens = tokens if logit_tokens is None else float(logit_tokens)
    total = ZERO
    stream_grad = trainable.input_trains  # does the residual stream carry a gradient yet?

    def project(layer: int, m: str, input_grad: bool) -> tuple[Flops, bool]:
        fan_in, fan_out = shape.matrix_dims(m, layer)
        routed = tokens * shape.matrix_copies(m, layer)[1]
        input_grad = input_grad or bool(trainable.parts_at(layer, m, SCALE_INPUT))  # a trained vector scales x
        trains = (layer, m) in trainable.dense
        flops = _matmul(fan_in, fan_out, routed, input_grad=input_grad, weight_grad=trains)
        for part in trainable.parts_at(layer, m, PARALLEL):
            flops = flops + sum(_chain(part.matmuls, routed, input_grad=input_grad), ZERO) + _per_call(part, calls)
        out_grad = input_grad or trains or trainable.touches(layer, m)
        return flops, out_grad

    recomputed = 0.0
    for layer in range(shape.num_layers):
        block_start = total.forward
        attn_in = stream_grad or layer in trainable.norms
        extras = shape.extra_linears(layer)
        total = total + _extras(extras, "attn", tokens, input_grad=attn_in, weight_grad=layer in trainable.extras)
        qkv_grad = False
        for m in ("q", "k", "v"):
            flops, out_grad = project(layer, m, attn_in)
            total, qkv_grad = total + flops, qkv_grad or out_grad
        extra_keys = trainable.extra_keys(layer)
        qkv_grad = qkv_grad or extra_keys > 0  # trained keys/values: the attention's backward runs
        s_k = s_q + extra_keys
        attn = 2.0 * sequences * s_q * s_k * shape.num_heads * sum(shape.attention_dims()) * (0.5 if causal else 1.0)
        total = total + Flops(attn, 2 * attn if qkv_grad else 0.0, 0.0,
                              attn / 2 if qkv_grad and attention_rescore else 0.0)
        flops, o_grad = project(layer, "o", qkv_grad)
        total = total + flops
        stream_grad = stream_grad or o_grad

        mlp_in = stream_grad or layer in trainable.norms
        # router, shared experts: beside the routed experts, on every token
        total = total + _extras(extras, "mlp", tokens, input_grad=mlp_in, weight_grad=layer in trainable.extras)
        hidden_grad = False
        for m in MLP_MATRICES[:-1] if shape.gated_mlp else ("up",):
            flops, out_grad = project(layer, m, mlp_in)
            total, hidden_grad = total + flops, hidden_grad or out_grad
        flops, down_grad = project(layer, "down", hidden_grad)
        total = total + flops
        stream_grad = stream_grad or down_grad

        for part in trainable.parts_at(layer, "mlp_out", SERIAL):  # e.g. Houlsby's d -> a -> d after the MLP
            total = sum(_chain(part.matmuls, tokens, input_grad=stream_grad), total) + _per_call(part, calls)
            stream_grad = True
        if checkpointing and stream_grad:  # backward reaches this block, so its forward runs again
            recomputed += total.forward - block_start - _last_matmul(shape, trainable, layer, tokens)

    total = total + Flops(0.0, 0.0, 0.0, recomputed)
    head_in = stream_grad or trainable.final_norm
    total = total + _matmul(shape.hidden_size, shape.vocab_size, logit_tokens, input_grad=head_in,
                            weight_grad=trainable.trains_head_weight(shape))
    return total


def forward_flops(shape: ModelShape, *, sequences: int, seq_len: int, logit_tokens: float | None = None,
                  causal: bool = False, past_len: int = 0) -> float:
    """Inference FLOPs of one forward pass (prefill when past_len=0); the in-context-learning arm's cost."""
    tokens = float(sequences * seq_len)
    per_token = 2.0 * sum(shape.matrix_dims(m, i)[0] * shape.matrix_dims(m, i)[1] * shape.matrix_copies(m, i)[1]
                          for i in range(shape.num_layers) for m in shape.layer_matrices())
    per_token += 2.0 * sum(k * n * active for i in range(shape.num_layers)
                           for _, k, n, _, active, _ in shape.extra_linears(i).values())
    s_k = past_len + seq_len
    attn = 2.0 * sequences * seq_len * s_k * shape.num_heads * sum(shape.attention_dims()) * shape.num_layers
    attn *= 0.5 if causal and past_len == 0 else 1.0
    logits = 2.0 * shape.hidden_size * shape.vocab_size * (tokens if logit_tokens is None else logit_tokens)
    return per_token * tokens + attn + logits


def generation_flops(shape: ModelShape, prompt_len: int, new_tokens: int) -> float:
    """Prefill the prompt (logits only at its last position), then decode token by token with a KV cache."""
    total = forward_flops(shape, sequences=1, seq_len=prompt_len, logit_tokens=1)
    for i in range(new_tokens - 1):
        total += forward_flops(shape, sequences=1, seq_len=1, past_len=prompt_len + i + 1)
    return total


def six_n_d(params: float, tokens: float) -> float:
    """The textbook C = 6ND (Kaplan et al. 2020, Eq. 2.1 and Table 1): every weight trains, no attention term."""
    return 6.0 * params * tokens


def non_embedding_params(shape: ModelShape) -> int:
    """N in 6ND: Kaplan et al. exclude embeddings; the output projection's matmul is counted by us apart."""
    return shape.num_layers * shape.layer_params()


# --- the conventions papers publish FLOP counts in --------------------------------------------------------

# name -> (description with its source). "hardware" is the ledger's: what the kernels execute and
# FlopCounterMode counts (full attention square, logits in); the others count what a paper counted, so a
# published budget or MFU can be read in its own terms.
CONVENTIONS = {
    "hardware": "every matmul the kernels run: full s x s attention square, vocabulary logits in "
                "(torch.utils.flop_counter's rule; the ledger's convention)",
    "causal": "as hardware, attention scores halved for the causal mask (FlashAttention-2, Dao 2023, Sec. 4.1: "
              "'for causal, divide by 2')",
    "causal-no-logits": "causal, without the vocabulary projection (matmuls of the blocks only)",
    "no-logits": "hardware without the vocabulary projection",
    "6nd": "C = 6ND, N = all parameters (active ones for MoE), D = tokens (Kaplan et al. 2020, Sec. 2.1; "
           "Hoffmann et al. 2022 use it with N including embeddings); no attention term",
    "6nd-nonembedding": "C = 6ND with N the non-embedding parameters (Kaplan et al. 2020, Table 1 and Eq. 2.1)",
    "palm": "6N + 12·L·H·Q·T per token (Chowdhery et al. 2022, PaLM, App. B: N parameters, L layers, H heads, "
            "Q head dim, T sequence length); the MFU convention of PaLM and Llama 3",
    "chinchilla": "Hoffmann et al. 2022, App. F: embeddings 2sVd, attention with softmax 3Hs², dense 2s·(params), "
                  "logits 2sdV per sequence forward; backward = 2 x forward",
    "chinchilla-blocks": "App. F without the embeddings and logits terms: how its Table A4 was computed (the "
                         "authors' correspondence reported in nanoGPT's scaling_laws.ipynb; it reproduces Table A4)",
}
FULL_ONLY = ("6nd", "6nd-nonembedding", "palm", "chinchilla", "chinchilla-blocks")


def convention_flops(shape: ModelShape, trainable: Trainable, convention: str, *, sequences: int, seq_len: int,
                     logit_tokens: float | None = None, calls: int = 1, full_training: bool = True) -> Flops:
    """Model FLOPs of `sequences` rows of `seq_len` tokens in a named convention (`CONVENTIONS`).

    The closed forms (6nd, palm, chinchilla) assume every weight trains: for another method they are refused.
    Their forward is a third of the total, as the papers split it."""
    if convention not in CONVENTIONS:
        raise ValueError(f"--flop-convention: expected one of {', '.join(CONVENTIONS)}, got {convention!r}")
    if convention in FULL_ONLY and not full_training:
        raise ValueError(f"--flop-convention {convention}: a closed form for training every weight; use hardware, "
                         "causal or no-logits for a parameter-efficient method")
    tokens = float(sequences) * seq_len
    if convention in ("hardware", "causal", "causal-no-logits", "no-logits"):
        logits = 0.0 if convention.endswith("no-logits") else logit_tokens
        return train_step_flops(shape, trainable, sequences=sequences, seq_len=seq_len, logit_tokens=logits,
                                causal=convention.startswith("causal"), calls=calls, attention_rescore=False)
    n_all = shape.active_params()
    if convention == "6nd":
        total = 6.0 * n_all * tokens
    elif convention == "6nd-nonembedding":
        total = 6.0 * (n_all - shape.embedding_params() - shape.head_params()) * tokens
    elif convention == "palm":
        total = (6.0 * n_all + 12.0 * shape.num_layers * shape.num_heads * shape.head_dim * seq_len) * tokens
    else:
        total = 3.0 * sequences * chinchilla_forward(shape, seq_len, ends=convention == "chinchilla")
    return Flops(total / 3, 2 * total / 3, 0.0)


def chinchilla_forward(shape: ModelShape, seq_len: int, *, ends: bool = True) -> float:
    """Forward FLOPs of one sequence as Hoffmann et al. 2022, App. F counts them (their non-gated MLP's
    2s(d·f + d·f) is read here as 2s x the MLP's active weights, so a gated or MoE MLP is counted as it runs)."""
    s, d, v = float(seq_len), shape.hidden_size, shape.vocab_size
    total = 2 * s * v * d + 2 * s * d * v if ends else 0.0  # embeddings, logits
    qk, vd = shape.attention_dims()
    for layer in range(shape.num_layers):
        projections = sum(shape.matrix_dims(m, layer)[0] * shape.matrix_dims(m, layer)[1]
                          for m in ("q", "k", "v", "o"))
        mlp = sum(shape.matrix_dims(m, layer)[0] * shape.matrix_dims(m, layer)[1] * shape.matrix_copies(m, layer)[1]
                  for m in shape.layer_matrices() if m in MLP_MATRICES)
        mlp += sum(k * n * active for _, k, n, _, active, _ in shape.extra_linears(layer).values())
        attention = 2 * s * projections + 2 * s * s * qk * shape.num_heads + 3 * shape.num_heads * s * s \
            + 2 * s * s * vd * shape.num_heads
        total += attention + 2 * s * mlp
    return total


def recompute_flops(shape: ModelShape, *, sequences: int, seq_len: int, recompute: str, flash: bool = True) -> float:
    """Hardware FLOPs redone for memory's sake in a full-training step, beside the model FLOPs (HFU - MFU):
    "full" repeats each block's forward (Korthikanti et al. 2022, Sec. 5: about 33% more); "selective" repeats
    only QK^T and AV (their Sec. 5: 2.7% of GPT-3's forward); a flash kernel recomputes QK^T in its backward
    whatever the policy (Dao et al. 2022, Alg. 4), so selective adds nothing more under flash."""
    qk, vd = shape.attention_dims()
    scores = 2.0 * sequences * seq_len * seq_len * shape.num_heads * shape.num_layers
    rescore = scores * qk if flash else 0.0
    if recompute == "none":
        return rescore
    if recompute == "selective":
        return rescore if flash else scores * (qk + vd)
    full = train_step_flops(shape, full_trainable(shape), sequences=sequences, seq_len=seq_len, logit_tokens=0,
                            attention_rescore=False).forward
    return rescore + full
