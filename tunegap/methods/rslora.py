"""rsLoRA through PEFT's `use_rslora`: LoRA scaled by alpha/sqrt(r) instead of alpha/r."""

from __future__ import annotations

from dataclasses import dataclass

from .base import register
from .lora import LoRA


@register
@dataclass
class RsLoRA(LoRA):
    """Rank-stabilised LoRA (Kalajdzievski 2023, Thm. 3.2 and Eq. 4): h = W0·x + (alpha/sqrt(r))·B·A·x, the
    scaling under which learning neither collapses nor explodes as r grows (alpha/r shrinks the update at
    high rank). The same tensors and matmuls as LoRA, so the same parts and costs."""

    name = "rslora"

    def peft_options(self) -> dict:
        return {"use_rslora": True}
