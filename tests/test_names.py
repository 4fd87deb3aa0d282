"""The names users already type: PEFT's module names and `all-linear`, TRL's flags, a --config file under flags,
models that name their matrices otherwise (GPT-2, GPT-NeoX), and eval/generate on what they bring."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import FEW, tiny_config
from tunegap.cli import build_parser, main
from tunegap.config import config_from_args
from tunegap.methods import ALL_LINEAR, MethodError, make_method
from tunegap.methods.targets import module_names, parse_targets
from tunegap.trainer import train


@pytest.mark.parametrize("typed, short", [
    ("q_proj,v_proj", ("q", "v")), ("q,v", ("q", "v")), ("v_proj, q", ("q", "v")), ("all-linear", ALL_LINEAR),
    ("gate_proj,up_proj,down_proj", ("gate", "up", "down")), ("query_key_value", ("q", "k", "v")),
    ("c_attn,c_fc", ("q", "k", "v", "up")),
])
def test_targets_accept_short_and_module_names(typed, short):
    assert parse_targets(typed) == short
    assert make_method("lora", targets=typed).targets == short


@pytest.mark.parametrize("typed, says", [("qproj", "unknown target 'qproj'"), ("c_proj", "both o and down")])
def test_an_unknown_target_is_one_line_naming_the_choices(typed, says):
    with pytest.raises(MethodError, match=says) as caught:
        parse_targets(typed)
    assert "q_proj" in str(caught.value) and "all-linear" in str(caught.value) and "\n" not in str(caught.value)


def test_q_proj_and_q_train_the_same_lora(tmp_path):
    for name, targets in (("module", "q_proj,v_proj"), ("short", "q,v")):
        train(tiny_config(tmp_path, name=name, targets=targets, max_steps=2))
    adapters = [tmp_path / "runs" / n / "adapter" for n in ("module", "short")]
    a, b = (load_file(str(f / "adapter_model.safetensors")) for f in adapters)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert any("q_proj" in k for k in a) and not any("k_proj" in k for k in a)
    configs = [json.loads((f / "adapter_config.json").read_text()) for f in adapters]
    assert sorted(configs[0]["target_modules"]) == sorted(configs[1]["target_modules"]) == ["q_proj", "v_proj"]


def test_estimate_takes_peft_module_names(capsys):
    args = ["estimate", "--model", "llama-3.1-8b", "--method", "lora", "--examples", "100", "--json"]
    assert main(args + ["--targets", "q_proj,v_proj"]) == 0
    by_module = json.loads(capsys.readouterr().out)
    assert main(args + ["--targets", "q,v"]) == 0
    assert json.loads(capsys.readouterr().out) == by_module
    assert main(args + ["--targets", "all-linear"]) == 0
    assert json.loads(capsys.readouterr().out) != by_module


# --------------------------------------------------------------------------- other model families

def save_family(folder, family: str):
    """A tiny GPT-2 or GPT-NeoX, built from its transformers config, with the tiny byte-level tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    from tunegap.models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(tokenizer))) \
        if family == "gpt2" else GPTNeoXForCausalLM(GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            vocab_size=len(tokenizer)))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family, modules", [
    ("gpt2", {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}),
    ("gpt_neox", {"attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"})])
def test_lora_and_freeze_train_gpt2_and_neox(tmp_path, family, modules):
    folder = save_family(tmp_path / family, family)
    ledger = train(tiny_config(tmp_path, model=str(folder), name="lora", max_steps=2))
    config = json.loads((tmp_path / "runs" / "lora" / "adapter" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == modules  # all-linear by default: every projection the family has
    assert ledger["status"] == "completed"
    ledger = train(tiny_config(tmp_path, model=str(folder), method="freeze", freeze_layers=1, name="freeze",
                               max_steps=2))
    assert ledger["status"] == "completed"
    costs = ledger["costs"]
    assert 0 < costs["params_trainable"]["value"] < costs["params_total"]["value"]


def test_a_part_of_a_fused_projection_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(MethodError, match="one fused matrix"):
        module_names("gpt2", ("q", "v"))
    folder = save_family(tmp_path / "gpt2", "gpt2")
    for extra in (["--targets", "q_proj,v_proj"], ["--method", "ia3"]):
        assert main(["finetune", "--model", str(folder), "--max-steps", "1", "--runs-dir", str(tmp_path / "runs"),
                     "--no-progress", *extra]) == 2
        assert "fused matrix" in capsys.readouterr().err


# --------------------------------------------------------------------------- flags and --config

def parse(*argv):
    args = build_parser().parse_args(list(argv))
    return config_from_args(args)


def test_trl_aliases_set_the_same_fields():
    trl = parse("finetune", "--learning-rate", "3e-4", "--num-train-epochs", "2", "--lora-r", "4", "--lora-alpha", "8")
    ours = parse("finetune", "--lr", "3e-4", "--epochs", "2", "--rank", "4", "--alpha", "8")
    assert trl == ours and (trl.lr, trl.epochs, trl.rank, trl.alpha) == (3e-4, 2.0, 4, 8.0)


def test_a_given_flag_wins_over_the_config_file_even_at_its_default(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("rank: 16\nlr: 0.001\npack: false\n")
    assert parse("finetune", "--config", str(path)).rank == 16
    config = parse("finetune", "--config", str(path), "--rank", "8", "--pack")  # both equal the defaults
    assert (config.rank, config.pack, config.lr) == (8, True, 0.001)


def test_pretrain_config_file_sets_lr_and_method(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("lr: 0.0002\nmethod: lora\n")
    config = parse("pretrain", "--config", str(path))
    assert (config.lr, config.method, config.init) == (0.0002, "lora", "scratch")
    assert parse("pretrain").lr == 1e-3  # without the file: pretrain's own default


def test_help_shows_defaults(capsys):
    for command in ("finetune", "eval", "generate", "runs", "export"):
        assert main([command, "--help"]) == 0
        assert "(default:" in capsys.readouterr().out


# --------------------------------------------------------------------------- eval and generate on what users bring

def test_eval_scores_a_users_data_with_held_out_loss(tmp_path, few_jsonl, capsys):
    train(tiny_config(tmp_path, data=str(few_jsonl), name="mine", max_steps=2, seq_len=128))
    capsys.readouterr()
    assert main(["eval", "--run", "mine", "--runs-dir", str(tmp_path / "runs"), "--data", str(few_jsonl),
                 "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["examples"] == len(FEW) and metrics["heldout_loss_tokens"] > 0
    assert 0 < metrics["heldout_loss"] < 10  # nats/token; a 259-token vocabulary starts near ln 259 = 5.6
    assert "style" not in metrics  # no support-task checks on data without their metadata


def test_generate_on_a_bottleneck_adapter_run(tmp_path, capsys):
    train(tiny_config(tmp_path, method="adapter", name="bottleneck", max_steps=1))
    capsys.readouterr()
    assert main(["generate", "--run", "bottleneck", "--runs-dir", str(tmp_path / "runs"), "Hello",
                 "--max-new-tokens", "4"]) == 0
    assert "error" not in capsys.readouterr().err  # the rebuilt adapter generated (a random tiny model may say nothing)
