"""Keep frozen matrices in the autocast dtype, so autocast stops re-casting them on every step.

Why: under `torch.autocast(bfloat16)` every matmul casts its fp32 weight to a fresh bf16 copy, every
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


def frozen_linears_to(model, dtype, *, keep=()) -> int:
    """Store every frozen `nn.Linear` weight of `model` in `dtype` (not those in `keep`); returns bytes saved
    (negative when widening).

    A weight shared with a module in `keep` (a head tied to the embedding) is left alone.
    """
    import torch

    kept = {id(m.weight) for m in keep if getattr(m, "weight", None) is not None}
    saved = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        w = module.weight
        if w.requires_grad or id(w) in kept or w.dtype == dtype or not w.is_floating_point():
            continue
        saved += w.numel() * (w.element_size() - torch.empty((), dtype=dtype).element_size())
        w.data = w.data.to(dtype)
        if module.bias is not None and not module.bias.requires_grad:
            module.bias.data = module.bias.data.to(dtype)
    return saved


def can_store_frozen_low(method, precision: str, distributed: bool) -> bool:
    """bf16 autocast, one process (FSDP wants one dtype per sharded group), and a method that saves only
    what it adds (LoRA, IA3, prompt/prefix, bottleneck adapters), never the base it froze."""
    return precision == "bf16" and not distributed and (method.saves_adapter or method.name == "adapter")
