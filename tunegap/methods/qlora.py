"""QLoRA: LoRA on a frozen base whose block matrices are stored in 4-bit NormalFloat (torchao's NF4 tensor)."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

from ..costs.memory import NF4_BLOCK, NF4_BLOCK2
from .base import MethodError, decoder_layers, register
from .lora import LoRA

# NF4 needs none of torchao's C++/CUDA kernels, which fail to load, with a warning line each, on a CPU-only torch;
# PEFT imports torchao whenever it is installed (for any LoRA run), so this is set before anything imports it:
# torchao's documented switch (a value the user set wins). Its notice that it skipped them, and torch's
# deprecation notes on torchao 0.18's enum registrations, would then open every PEFT run's log: dropped.
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
logging.getLogger("torchao").addFilter(lambda record: "import of cpp extensions" not in record.getMessage())
logging.getLogger("torch.utils._pytree").addFilter(lambda record: "is an Enum subclass" not in record.getMessage())


def to_nf4(weight):
    """torchao's NF4 tensor (what torchtune's QLoRA uses): pure PyTorch, so it runs on the CPU."""
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4 as convert
    except ImportError:
        try:
            from torchao.dtypes.nf4tensor import to_nf4 as convert  # older torchao
        except ImportError:
            raise MethodError("qlora: needs torchao for its NF4 tensor (pip install torchao)") from None
    return convert(weight, block_size=NF4_BLOCK, scaler_block_size=scaler_block(weight.numel()))


def scaler_block(numel: int) -> int:
    """Absmax values per second-level block: QLoRA's 256, or the largest power of two below it that divides the
    matrix's block count (torchao needs whole blocks; SmolLM2's 576 x 576 has 5,184 blocks of 64, so 64)."""
    return math.gcd(numel // NF4_BLOCK, NF4_BLOCK2)


def quantize_blocks(model) -> int:
    """Store every frozen linear weight inside the transformer blocks in NF4, as QLoRA does for all of them
    (Dettmers et al. 2023, Sec. 3); embeddings, head and norms stay as they are. Returns how many."""
    import torch

    count = 0
    for block in decoder_layers(model):
        for module in block.modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad:
                module.weight = torch.nn.Parameter(to_nf4(module.weight.detach()), requires_grad=False)
                count += 1
    return count


@register
@dataclass
class QLoRA(LoRA):
    """QLoRA (Dettmers et al. 2023): the frozen base's block matrices in 4-bit NormalFloat with double-quantised
    constants (Sec. 3: blocks of 64 weights with one absmax each, those absmax in 8 bits per block of 256),
    dequantised to the input's dtype for each matmul (forward and the input-gradient pass), LoRA on top in
    full precision. Dequantisation is elementwise, so the FLOPs are LoRA's; the weights take ~0.52 bytes
    per quantised parameter (`costs.memory.nf4_bytes_per_param`) instead of 4 (fp32)."""

    name = "qlora"
    base_format = "nf4"

    def check(self, shape):
        super().check(shape)
        for m in shape.layer_matrices():
            fan_in, fan_out = shape.matrix_dims(m)
            if (fan_in * fan_out) % NF4_BLOCK:
                raise MethodError(f"qlora: the {m} matrix ({fan_in} x {fan_out}) is not a whole number of NF4 "
                                  f"blocks of {NF4_BLOCK} weights")

    def prepare(self, model, shape):
        model = super().prepare(model, shape)
        quantize_blocks(model)
        release_full_precision(model)
        return model


def release_full_precision(model) -> None:
    """Give back what quantising took: weights loaded from safetensors are views of the file's memory map, and
    while the embedding and norms still point into it every page the quantiser read stays resident; glibc keeps
    the quantiser's freed temporaries. Default model, measured RSS: 416 MB loaded, 1,373 MB quantised, 883 MB
    after malloc_trim, 584 MB with the other frozen weights copied out of the map."""
    import ctypes
    import gc

    for p in model.parameters():
        if not p.requires_grad and not hasattr(p, "__tensor_flatten__"):
            p.data = p.data.clone()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
