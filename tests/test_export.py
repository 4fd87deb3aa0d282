"""`tunegap export`: a run leaves as a merged Hugging Face folder or a GGUF file that other tools load as it is."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import needs_smollm2, tiny_config
from tunegap.cli import main
from tunegap.export import ExportError, export_gguf, export_merged
from tunegap.outputs import load_run
from tunegap.trainer import train

PROMPT = [{"role": "user", "content": "My Lumora Sync stopped syncing"}]
NEW_TOKENS = 12


def greedy(model, tokenizer) -> list[int]:
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def last_logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return model(**ids).logits[0, -1].float()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One LoRA, one IA3, one full and one prompt-tuning run of the tiny Llama (trained hard, so merging matters)."""
    tmp = tmp_path_factory.mktemp("export")
    for method in ("lora", "ia3", "full", "prompt"):
        train(tiny_config(tmp, method=method, name=method, max_steps=3, lr=1e-2))
    return tmp / "runs"


@pytest.mark.parametrize("method", ["lora", "ia3", "full"])
def test_merged_folder_loads_in_plain_transformers_and_generates_the_runs_tokens(runs, tmp_path, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    own = load_run(runs / method, merge=False)
    out = export_merged(runs / method, tmp_path / "merged")
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()}
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert not hasattr(plain, "peft_config")
    assert greedy(plain, tokenizer) == greedy(own.model.eval(), own.tokenizer)
    if method != "full":  # the adapter changed the model: the merge carried it (not just the base's tokens)
        with own.model.disable_adapter():
            base_logits = last_logits(own.model, own.tokenizer)
        assert not torch.allclose(base_logits, last_logits(plain, tokenizer))


def test_prompt_tuning_has_no_merged_form(runs, tmp_path):
    with pytest.raises(ExportError, match="virtual tokens"):
        export_merged(runs / "prompt", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_saved_adapter_names_a_base_model_a_user_can_name(runs):
    config = json.loads((runs / "lora" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny"  # the preset's name, not a cache path


def test_gguf_f16_reads_back_through_transformers_and_generates_the_merged_tokens(runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(export_merged(runs / "lora", tmp_path / "merged")).eval()
    path = export_gguf(runs / "lora", tmp_path / "lora-f16.gguf", quant="f16")
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    own = load_run(runs / "lora")
    assert tokenizer.apply_chat_template(PROMPT, tokenize=False) == own.tokenizer.apply_chat_template(
        PROMPT, tokenize=False)
    assert greedy(back, tokenizer) == greedy(merged, own.tokenizer)
    # f16 rounds each weight to 11 significant bits: the logits move by well under 1% of their spread
    a, b = last_logits(back, tokenizer), last_logits(merged, own.tokenizer)
    assert (a - b).abs().max() < 0.01 * (b.max() - b.min())


def test_gguf_q8_0_stays_within_its_stated_logit_tolerance(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    own = load_run(runs / "lora")
    path = export_gguf(runs / "lora", tmp_path / "lora-q8.gguf", quant="q8_0")
    f16 = export_gguf(runs / "lora", tmp_path / "lora-f16.gguf", quant="f16")
    assert path.stat().st_size < f16.stat().st_size  # the matrices really are 8-bit
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    a, b = last_logits(back, own.tokenizer), last_logits(own.model.eval(), own.tokenizer)
    # Q8_0: 8-bit values with one scale per 32, rounding error <= 1/254 of each block's largest weight
    # (README "Export" states this tolerance): within 5% of the logits' spread, and not bit-identical
    assert 0 < (a - b).abs().max() < 0.05 * (b.max() - b.min())


def test_gguf_refuses_other_architectures_in_one_line(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tunegap.models import tiny_tokenizer

    folder = tmp_path / "gpt2"
    tokenizer = tiny_tokenizer()
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    train(tiny_config(tmp_path, method="full", model=str(folder), name="g", max_steps=1))
    assert main(["export", "g", "--runs-dir", str(tmp_path / "runs"), "--gguf"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tunegap:")]
    assert len(errors) == 1 and "Llama architecture only" in errors[0] and "'gpt2'" in errors[0]
    assert main(["export", "g", "--runs-dir", str(tmp_path / "runs")]) == 0  # the merged folder works for any model


@pytest.mark.slow
@needs_smollm2
def test_default_model_lora_run_exports_to_gguf_that_transformers_reads_back(tmp_path):
    """The real tokenizer (49,152 tokens, 48,900 merges) and the real shape (30 layers, 9 heads, 3 KV heads)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train(tiny_config(tmp_path, model="smollm2-135m", name="real", max_steps=1, batch_size=2, train_examples=4,
                      seq_len=256, eval_examples=2, forgetting=False))
    own = load_run(tmp_path / "runs" / "real")
    config = json.loads((tmp_path / "runs" / "real" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    path = export_gguf(tmp_path / "runs" / "real", tmp_path / "real-f16.gguf")
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "Hello, Lumora! Ünïcode and   spaces."
    assert tokenizer(text)["input_ids"] == own.tokenizer(text)["input_ids"]
    assert greedy(back, tokenizer) == greedy(own.model.eval(), own.tokenizer)


def test_merged_folder_in_bf16_is_half_the_bytes_and_loads(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    fp32 = export_merged(runs / "full", tmp_path / "fp32")
    bf16 = export_merged(runs / "full", tmp_path / "bf16", dtype="bf16")
    size = lambda folder: (folder / "model.safetensors").stat().st_size  # noqa: E731
    assert size(bf16) < 0.55 * size(fp32)
    assert AutoModelForCausalLM.from_pretrained(bf16).dtype == torch.bfloat16


def test_gguf_marks_special_tokens_as_control_like_llama_cpps_converter(runs, tmp_path):
    import gguf

    from tunegap.models import tiny_tokenizer

    path = export_gguf(runs / "lora", tmp_path / "t.gguf")
    field = gguf.GGUFReader(path).fields["tokenizer.ggml.token_type"]
    types = [int(field.parts[i][0]) for i in field.data]
    tokenizer = tiny_tokenizer()
    special = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")}
    assert {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL} == special
    assert types.count(gguf.TokenType.NORMAL) == len(types) - len(special)
