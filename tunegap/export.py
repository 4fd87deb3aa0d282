"""Take a finished run out of tunegap: a merged Hugging Face folder, or one GGUF file for llama.cpp and Ollama.

`tunegap export runs/NAME` merges the run's adapter (LoRA, DoRA, rsLoRA, LoHa, IA3: PEFT's `merge_and_unload`)
into its starting weights, or takes a full/freeze run's weights as they are, and writes what plain
`AutoModelForCausalLM.from_pretrained` loads: config, safetensors, tokenizer, generation config.
`--gguf` writes the same weights as a GGUF file with the `gguf` package (the one llama.cpp maintains), in the
layout llama.cpp's own converter writes for the Llama architecture (`convert_hf_to_gguf.py`, LlamaModel).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from .io import atomic_dir, fsync_dir
from .outputs import TRAINABLE_FILE, finished_run, load_run

QUANTS = ("f16", "q8_0")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # --dtype of the merged folder
GGUF_ARCHITECTURES = ("llama",)  # the tensor layout written here (q/k permuted for GGML's RoPE) is Llama's


class ExportError(ValueError):
    """A run that cannot be exported as asked; one line naming the run and why."""


def merged_model(run: str | Path, runs_dir: str | Path = "runs", *, allow_pickle: bool = False):
    """`(model, tokenizer, folder, ledger)`: the run's trained model as plain transformers weights."""
    folder, ledger = finished_run(run, runs_dir)
    config = ledger["config"]
    if config.get("objective") == "reward":
        raise ExportError(f"{folder}: a reward model (scalar head) is not a causal LM to export")
    if (folder / TRAINABLE_FILE).is_file():
        raise ExportError(f"{folder}: the bottleneck adapter has a nonlinearity between its matrices, so it has no "
                          "merged form; export a LoRA, DoRA, IA3, full or freeze run")
    loaded = load_run(folder, runs_dir, merge=False, allow_pickle=allow_pickle)
    model = loaded.model
    if hasattr(model, "peft_config"):
        peft_config = model.peft_config["default"]
        if peft_config.is_prompt_learning:
            raise ExportError(f"{folder}: {peft_config.peft_type.value.lower()} learns virtual tokens, not weight "
                              "changes, so it has no merged form; export a LoRA, DoRA, IA3, full or freeze run")
        model = model.merge_and_unload()
    return model.eval(), loaded.tokenizer, folder, ledger


def _generation_config(model, tokenizer):
    from transformers import GenerationConfig

    generation = GenerationConfig.from_model_config(model.config)
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    return generation


def export_merged(run: str | Path, out: str | Path | None = None, runs_dir: str | Path = "runs", *,
                  dtype: str = "fp32", allow_pickle: bool = False) -> Path:
    """Write the run's merged model as a Hugging Face folder (built hidden, renamed into place); fp32 keeps the
    merged weights exactly, bf16/fp16 halve the folder."""
    import torch

    if dtype not in DTYPES:
        raise ExportError(f"--dtype: choose from {', '.join(DTYPES)}, got {dtype!r}")
    model, tokenizer, folder, _ = merged_model(run, runs_dir, allow_pickle=allow_pickle)
    model = model.to(getattr(torch, DTYPES[dtype]))
    out = Path(out) if out else folder / "merged"
    model.generation_config = _generation_config(model, tokenizer)
    with atomic_dir(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return out


# --------------------------------------------------------------------------- GGUF

def _permute(weights, n_head: int):
    """Interleave each head's rotary halves the way GGML's RoPE reads them (llama.cpp `LlamaModel.permute`;
    transformers' GGUF reader undoes it in `LlamaTensorProcessor`)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _vocabulary(tokenizer, n_vocab: int):
    """Tokens by id and their GGUF types, as llama.cpp's converter lists a BPE vocabulary (`get_vocab_base`)."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken, whose `special` flag llama.cpp's converter reads
    tokens, types = [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _add_metadata(writer, config, name: str, quant: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if quant == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer, tokenizer, n_vocab: int, pre: str) -> None:
    import gguf

    tokens, types = _vocabulary(tokenizer, n_vocab)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as saved:  # SpecialVocab reads merges, special ids, chat template from files
        tokenizer.save_pretrained(saved)
        special = gguf.SpecialVocab(saved, load_merges=True, n_vocab=n_vocab)
    if "bos" not in special.add_special_token:  # say it: llama.cpp's own default differs between vocab types
        writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if not special.merges:  # byte-level with no merges (the tiny presets): GGUF cannot store an empty list, and
        writer.add_token_scores([0.0] * n_vocab)  # transformers' reader then rebuilds merges from scores (none here)
    special.add_to_gguf(writer, quiet=True)


def _add_tensors(writer, model, quant: str) -> None:
    import gguf
    import numpy as np

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads a tied head from token_embd
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"{hf_name}: no GGUF name for this tensor in the Llama layout")
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, config.num_key_value_heads)
        if data.ndim == 1:  # norms stay fp32, as llama.cpp's converter keeps them
            writer.add_tensor(name, data.astype(np.float32))
        elif quant == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(data, q8), raw_dtype=q8)
        else:  # f16, or a row length Q8_0's 32-value blocks do not divide
            writer.add_tensor(name, data.astype(np.float16))


def export_gguf(run: str | Path, out: str | Path | None = None, runs_dir: str | Path = "runs", *,
                quant: str = "f16", allow_pickle: bool = False) -> Path:
    """Write the run's merged model as one GGUF file (Llama architecture), written aside and renamed into place."""
    import gguf

    if quant not in QUANTS:
        raise ExportError(f"--quant: choose from {', '.join(QUANTS)}, got {quant!r}")
    model, tokenizer, folder, ledger = merged_model(run, runs_dir, allow_pickle=allow_pickle)
    arch = model.config.model_type
    if arch not in GGUF_ARCHITECTURES:
        raise ExportError(f"{folder}: --gguf writes the Llama architecture only, this model is {arch!r}; export the "
                          "merged folder and convert it with llama.cpp's convert_hf_to_gguf.py")
    out = Path(out) if out else folder / f"{folder.name}-{quant}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    pre = "smollm" if ledger["config"]["model"] == "smollm2-135m" else "default"  # llama.cpp's pre-tokenizer name
    handle, staging = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(handle)
    try:
        writer = gguf.GGUFWriter(staging, "llama")
        _add_metadata(writer, model.config, folder.name, quant)
        _add_tokenizer(writer, tokenizer, model.config.vocab_size, pre)
        _add_tensors(writer, model, quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(staging, "rb") as f:
            os.fsync(f.fileno())
        os.replace(staging, out)
        fsync_dir(out.parent)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    return out


def cmd_export(args) -> int:
    if args.gguf:
        path = export_gguf(args.run, args.out, args.runs_dir, quant=args.quant, allow_pickle=args.allow_pickle)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, measured, GGUF {args.quant}); "
              f"run it: llama-cli -m {path} -cnv")
    else:
        path = export_merged(args.run, args.out, args.runs_dir, dtype=args.dtype, allow_pickle=args.allow_pickle)
        size = sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")
        print(f"wrote {path}/ ({size / 1e6:.1f} MB of safetensors, measured); load it with "
              f"AutoModelForCausalLM.from_pretrained({json.dumps(str(path))})")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a run as a merged Hugging Face folder, or a GGUF file (--gguf)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="a run name in --runs-dir, or a run folder")
    p.add_argument("--out", default="", help="folder (merged) or .gguf file to write; default: inside the run folder")
    p.add_argument("--gguf", action="store_true", help="write one GGUF file (Llama architecture) instead")
    p.add_argument("--quant", default="f16", choices=QUANTS, help="GGUF tensor type of the weight matrices")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="weights of the merged folder")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickled *.bin weights (tensors only, torch.load(weights_only=True))")
    p.set_defaults(func=cmd_export)


__all__ = ["ExportError", "export_gguf", "export_merged", "merged_model", "add_parser"]
