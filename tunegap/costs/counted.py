"""FLOPs counted from the operations a step really executes (`torch.utils.flop_counter.FlopCounterMode`).

PyTorch's counter knows the CUDA attention kernels but not the CPU one
(`_scaled_dot_product_flash_attention_for_cpu`), so it would silently count attention as zero here.
We register that kernel with PyTorch's own SDPA formulas, which include the score recomputation of the
backward pass (hardware FLOPs), so counted totals compare with `Flops.hardware`.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_CPU_SDPA_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

if _CPU_SDPA not in flop_counter.flop_registry:

    @flop_counter.register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)

    @flop_counter.register_flop_formula(_CPU_SDPA_BACKWARD)
    def _cpu_sdpa_backward_flop(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


@contextlib.contextmanager
def count_flops():
    """`with count_flops() as counter: ...; counter.get_total_flops()`, attention on CPU included."""
    with FlopCounterMode(display=False) as counter:
        yield counter
