"""Precision choices that make CPU bf16 autocast faster, neither losing any precision.

Frozen matrices are kept in the autocast dtype, so autocast stops re-casting them on every step; and the
attention kernel runs in fp32, where this CPU's kernel is faster (`fp32_attention`).

Frozen weights: under `torch.autocast(bfloat16)` every matmul casts its fp32 weight to a fresh bf16 copy, every
micro-batch. For a trained weight that copy is the price of fp32 master weights (Micikevicius et al. 2018,
"Mixed Precision Training", Sec. 3.1). A frozen weight never changes, so its bf16 value is the same every
step: storing it in bf16 once gives bit-identical matmuls (autocast's cast of a bf16 tensor is a no-op),
saves the cast's time (6 bytes of memory traffic per parameter per use) and halves its resident memory.
This is what QLoRA-style recipes do with a frozen base (Dettmers et al. 2023), minus the 4-bit quantisation.

Only frozen `nn.Linear` weights change: norms, embeddings and the (often tied) head stay fp32, so the
residual stream and the log-softmax keep their precision. It is only safe when the frozen base is never
written out again (adapter methods save the adapter alone), because the fp32 originals are dropped; after
the last step the loop widens them back to fp32 (exactly the bf16 values training used) for evaluation and
generation, which may run without autocast.
"""

from __future__ import annotations

import contextlib


def frozen_linears_to(model, dtype, *, keep=()) -> int:
    """Store every frozen `nn.Linear` weight of `model` in `dtype` (not those in `keep`); returns bytes saved
    (negative when widening).

    A weight shared with a module in `keep` (a head tied to the embedding) is left alone.
    """
    import torch

    kept = {id(m.weight) for m in keep if getattr(m, "weight", None) is not None}
    saved, converted = 0, set()
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        w = module.weight
        if w.requires_grad or id(w) in kept or w.dtype == dtype or not w.is_floating_point() \
                or hasattr(w, "__tensor_flatten__"):  # already quantised (QLoRA's NF4): a cast would expand it
            continue
        saved += w.numel() * (w.element_size() - torch.empty((), dtype=dtype).element_size())
        w.data = w.data.to(dtype)
        if module.bias is not None and not module.bias.requires_grad:
            module.bias.data = module.bias.data.to(dtype)
        converted.add(id(w))
    # Weights loaded from safetensors are views of the file's memory map: while any of them (the embedding,
    # the norms) still points into it, every page training has read stays resident, and the bf16 copies
    # would add 2 bytes per parameter instead of saving 2. Copying the rest out releases the mapping.
    # Measured on the default model: 998 MB resident after the cast alone, 702 MB with the copy.
    if converted:
        for p in model.parameters():
            if id(p) not in converted:
                p.data = p.data.clone()
    return saved


FP32_ATTENTION = "tunegap_sdpa_fp32"
FP32_MATH_ATTENTION = "tunegap_sdpa_fp32_math"


def _sdpa_fp32(module, query, key, value, attention_mask, **kwargs):
    """transformers' own SDPA attention with autocast off and fp32 inputs (the projections around it stay bf16)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with torch.autocast(query.device.type, enabled=False):
        return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)


def _sdpa_fp32_math(module, query, key, value, attention_mask, **kwargs):
    """`_sdpa_fp32` through SDPA's math backend: inside a compiled layer Inductor fuses its scale, mask and
    softmax (forward and backward) into its own loops around two batched matmuls, where the flash kernel
    stays one opaque call. Default model, LoRA, compiled, alternating runs: 1.74-1.84 s/step vs
    1.90-1.99 s/step with the flash kernel, the same peak memory (measured). Eagerly it would save the
    probabilities and gain nothing, so only compiled runs use it (`compiling`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return _sdpa_fp32(module, query, key, value, attention_mask, **kwargs)


def fp32_attention(model, *, math: bool = False) -> bool:
    """Run the attention scores and values in fp32 under CPU bf16 autocast; False if the model cannot switch.
    `math`: through the math backend (`_sdpa_fp32_math`, for compiled layers).

    Why: on this CPU PyTorch's flash-attention kernel is slower in bf16 than in fp32, backward most of all
    (8 x 9 heads x 111 x 64, 1 thread, measured: bf16 22 ms forward + 82 ms backward, fp32 14 + 47 ms),
    and autocast puts SDPA in bf16. Attention is a small share of the FLOPs at these lengths (about 3%), so
    fp32 costs nothing in matmul time and keeps the softmax in full precision. On the 6-layer proxy of the
    default model a LoRA step measured 3.61 s with fp32 attention vs 3.83 s (1 thread, medians of 6).
    Done through transformers' documented `AttentionInterface` / `AttentionMaskInterface` registries (the
    same masks as "sdpa", so packed rows stay block-diagonal), never by patching the model.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    current = getattr(model.config, "_attn_implementation", None)
    if current not in ("sdpa", FP32_ATTENTION, FP32_MATH_ATTENTION) or not hasattr(model, "set_attn_implementation"):
        return False
    name = FP32_MATH_ATTENTION if math else FP32_ATTENTION
    AttentionInterface.register(name, _sdpa_fp32_math if math else _sdpa_fp32)
    AttentionMaskInterface.register(name, sdpa_mask)
    model.set_attn_implementation(name)
    return model.config._attn_implementation == name


def can_store_frozen_low(method, precision: str, distributed: bool) -> bool:
    """bf16 autocast, one process (FSDP wants one dtype per sharded group), and a method that saves only
    what it adds (LoRA, IA3, prompt/prefix, bottleneck adapters), never the base it froze."""
    return precision == "bf16" and not distributed and (method.saves_adapter or method.saves_trained_tensors)


def choose_precision(config, peaks) -> str:
    """`--precision auto` takes whichever of fp32 and bf16 this machine measured faster (Zen 3 emulates bf16)."""
    return peaks.best_precision if config.precision == "auto" else config.precision


def autocast_factory(precision: str, device: str = "cpu"):
    """A context-manager factory: bf16 autocast on `device`, or nothing for fp32."""
    import torch

    if precision == "bf16":
        return lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext
