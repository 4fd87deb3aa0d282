"""Target matrices by any name a user types: tunegap's short names, PEFT's module names, or `all-linear`.

One home for the translation, used by every method that takes `--targets` and by the estimator, so `q_proj` and
`q` mean the same everywhere. Models that name (or fuse) their projections differently (GPT-2, GPT-NeoX/Pythia)
get the module names PEFT needs for them here too.
"""

from __future__ import annotations

from ..costs.shape import HF_MODULE_NAMES, MATRICES
from .base import MethodError

ALL_LINEAR_NAMES = ("all-linear", "all_linear", "all")  # PEFT's `target_modules="all-linear"`, and a short form
# Module names other families use for the same matrices; a fused q/k/v projection stands for all three.
FAMILY_NAMES = {
    "c_attn": ("q", "k", "v"), "c_fc": ("up",),  # GPT-2 (its c_proj is both o and down: ambiguous, refused)
    "query_key_value": ("q", "k", "v"), "dense": ("o",), "dense_h_to_4h": ("up",), "dense_4h_to_h": ("down",),
    "w1": ("gate",), "w3": ("up",), "w2": ("down",),  # Mixtral experts
}
# Per architecture (config.model_type): the PEFT target suffix for each matrix, when it is not Llama's q_proj...
ARCH_MODULES = {
    "gpt2": {"q": "attn.c_attn", "k": "attn.c_attn", "v": "attn.c_attn", "o": "attn.c_proj",
             "up": "mlp.c_fc", "down": "mlp.c_proj"},
    "gpt_neox": {"q": "attention.query_key_value", "k": "attention.query_key_value",
                 "v": "attention.query_key_value", "o": "attention.dense",
                 "up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h"},
}
FUSED = {"gpt2": ("q", "k", "v"), "gpt_neox": ("q", "k", "v")}


def parse_targets(targets, *, flag: str = "--targets") -> tuple[str, ...]:
    """Short names in canonical order from a comma-separated string or a sequence of any accepted names."""
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if str(t).strip()]
    short_of = {v: k for k, v in HF_MODULE_NAMES.items()}
    chosen: set[str] = set()
    for name in names:
        key = name.lower()
        if key in ALL_LINEAR_NAMES:
            chosen.update(MATRICES)
        elif key in MATRICES:
            chosen.add(key)
        elif key in short_of:
            chosen.add(short_of[key])
        elif key in FAMILY_NAMES:
            chosen.update(FAMILY_NAMES[key])
        else:
            hint = " (GPT-2's c_proj is both o and down: say which)" if key == "c_proj" else ""
            raise MethodError(f"{flag}: unknown target {name!r}{hint}; choose from {', '.join(MATRICES)}, their "
                              f"module names ({', '.join(HF_MODULE_NAMES.values())}) or all-linear")
    return tuple(m for m in MATRICES if m in chosen)


def present(targets: tuple[str, ...], shape) -> tuple[str, ...]:
    """The targets this model has: `all-linear` on a GPT-2-style (non-gated) MLP has no gate matrix."""
    return tuple(m for m in targets if m in shape.layer_matrices())


def module_names(model_type: str, targets: tuple[str, ...], present: tuple[str, ...] = MATRICES) -> list[str]:
    """PEFT `target_modules` for these matrices in a model of `model_type`; matrices the model lacks (a non-gated
    MLP has no gate) are left out, and a fused projection must be chosen whole."""
    mapping = ARCH_MODULES.get(model_type, HF_MODULE_NAMES)
    fused = FUSED.get(model_type, ())
    picked = [m for m in targets if m in present]
    if fused and 0 < len(set(fused) & set(picked)) < len(fused):
        raise MethodError(f"--targets: {model_type} computes {','.join(fused)} in one fused matrix; target all of "
                          "them or none")
    return list(dict.fromkeys(mapping[m] for m in picked if m in mapping))
