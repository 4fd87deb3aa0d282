"""Training methods as small objects: each prepares a model and says what it trains; the loop is shared.

A method never subclasses or rewrites the model: full and freeze set `requires_grad` from a name set,
the PEFT methods go through Hugging Face PEFT (`get_peft_model`), and only the bottleneck adapter,
which PEFT does not provide, wraps the MLP modules by hand. QLoRA is PEFT's LoRA with the frozen block
weights swapped for torchao's NF4 tensors (the modules stay as they are).
Each method describes what it adds as generic parts (`tunegap.costs.parts`), which is what the cost
formulas read; a test checks that description against the real model's trainable parameter count for
every method. One file per method; each registers itself (`base.register`), and `make_method`, `--method`
and the estimator find them in `METHODS`, so a method defined anywhere (a test file, say) joins them all.
"""

from .base import ALL_LINEAR, METHODS, Method, MethodError, decoder_layers, make_method, register, unregister
from .full import Full
from .freeze import Freeze
from .lora import LoRA, check_low_rank, low_rank_part
from .rslora import RsLoRA
from .dora import DoRA
from .qlora import QLoRA
from .loha import LoHa
from .ia3 import IA3
from .prompt import PromptTuning
from .prefix import PrefixTuning
from .adapter import Adapter, BottleneckAdapter

__all__ = ["ALL_LINEAR", "METHODS", "Method", "MethodError", "decoder_layers", "make_method", "register",
           "unregister", "Full", "Freeze", "LoRA", "check_low_rank", "low_rank_part",
           "RsLoRA", "DoRA", "QLoRA", "LoHa", "IA3", "PromptTuning", "PrefixTuning",
           "Adapter", "BottleneckAdapter"]
