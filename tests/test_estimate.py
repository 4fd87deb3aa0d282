"""`tunegap estimate`: the shared cost vocabulary, presets, hand-computed cases, errors, speed, --against."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunegap.costs.catalog import (EstimateError, gpu_catalog, gpu_peak_flops, model_presets, resolve_device,
                                   resolve_model)
from tunegap.costs.flops import train_step_flops
from tunegap.costs.memory import TrainSetup
from tunegap.costs.shape import ModelShape, Trainable
from tunegap.estimate import (COST_UNITS, against_run, count_data_tokens, estimate_run, parse_count)
from tunegap.cli import main
from tunegap.estimate import add_parser as estimate_parser
from tunegap.multipliers import add_parser as gap_parser
from tunegap.methods import LoRA, MethodError, low_rank_part, make_method

SHARED_KEYS = {"tokens", "loss_tokens", "examples", "optimizer_steps", "params_total", "params_trainable",
               "trainable_share", "weights_bytes", "gradient_bytes", "optimizer_state_bytes", "activation_bytes",
               "peak_memory_bytes", "flops_forward", "flops_backward", "flops_total", "flops_hardware",
               "wall_time_s", "tokens_per_s", "gpu_hours", "dollars"}
H100 = resolve_device("H100-SXM")


def run(model="llama-2-7b", method="lora", tokens=10_000_000, seq_len=2048, **setup):
    shape, _ = resolve_model(model)
    rows = math.ceil(tokens / seq_len)
    setup = TrainSetup(**{"precision": "bf16-mixed", "micro_batch": 4, **setup})
    return estimate_run(shape, make_method(method), tokens=tokens, sequences=rows, seq_len=seq_len,
                        steps=math.ceil(rows / setup.micro_batch), setup=setup, hardware=H100)


def test_costs_use_the_ledger_vocabulary():
    result = run()
    assert set(result["costs"]) == SHARED_KEYS == set(COST_UNITS)
    for key, entry in result["costs"].items():
        assert set(entry) == {"value", "unit", "how"} and entry["how"] == "estimate", key
        assert entry["unit"], key
    assert {"model", "method", "setup", "costs"} <= set(result)
    json.dumps(result)  # plain JSON all the way down


def test_lora_rank8_on_a_4096_square_matrix_is_65536_params_256x_fewer():
    shape, _ = resolve_model("llama-2-7b")
    one = Trainable(parts=(low_rank_part(shape, 0, "q", 8),)).params(shape)
    assert one == 4096 * 8 + 8 * 4096 == 65_536
    assert 4096 * 4096 / one == 256


def test_lora_costs_about_two_thirds_of_full_finetuning_per_token():
    lora, full = run(method="lora"), run(method="full")
    ratio = lora["costs"]["flops_total"]["value"] / full["costs"]["flops_total"]["value"]
    assert 0.6 < ratio < 0.75
    assert any("2/3" in note for note in lora["notes"])
    assert lora["costs"]["params_trainable"]["value"] < 0.01 * full["costs"]["params_trainable"]["value"]


def test_flops_are_the_shared_formula():
    shape, _ = resolve_model("smollm2-135m")
    result = estimate_run(shape, make_method("full"), sequences=10, seq_len=128, steps=2, setup=TrainSetup(),
                          hardware=H100)
    expect = train_step_flops(shape, make_method("full").trainable(shape), sequences=10, seq_len=128)
    assert result["costs"]["flops_total"]["value"] == expect.total
    assert result["costs"]["flops_hardware"]["value"] == expect.hardware


def test_checkpointing_adds_one_forward_of_the_blocks_to_hardware_flops_only():
    plain, ckpt = run(method="full"), run(method="full", checkpointing=True)
    assert ckpt["costs"]["flops_total"]["value"] == plain["costs"]["flops_total"]["value"]
    extra = ckpt["costs"]["flops_hardware"]["value"] - plain["costs"]["flops_hardware"]["value"]
    tokens = 10_000_000
    head = 2 * 4096 * 32000 * tokens  # the head is not inside a checkpointed block
    last = 32 * 2 * 11008 * 4096 * tokens  # nor is each block's down projection (checkpoint's early stop)
    assert extra == pytest.approx(plain["costs"]["flops_forward"]["value"] - head - last, rel=1e-3)
    assert ckpt["costs"]["activation_bytes"]["value"] < plain["costs"]["activation_bytes"]["value"]
    # MFU divides model FLOPs: the same MFU is the same time; the recompute shows as a higher HFU
    assert ckpt["costs"]["wall_time_s"]["value"] == plain["costs"]["wall_time_s"]["value"]
    assert ckpt["time"]["hfu"] > plain["time"]["hfu"] * 1.2
    # at the same HFU (the hardware equally busy), recompute takes longer
    shape, _ = resolve_model("llama-2-7b")
    at_hfu = [estimate_run(shape, make_method("full"), tokens=10_000_000, sequences=4883, seq_len=2048, steps=1221,
                           setup=TrainSetup(precision="bf16-mixed", micro_batch=4, checkpointing=c), hardware=H100,
                           throughput={"hfu": 0.5}) for c in (False, True)]
    assert at_hfu[1]["costs"]["wall_time_s"]["value"] > 1.2 * at_hfu[0]["costs"]["wall_time_s"]["value"]


def test_time_and_dollars_follow_mfu_and_price():
    result = run(method="full", gpus=8, zero=3)
    c = result["costs"]
    flops = c["flops_total"]["value"]
    assert c["wall_time_s"]["value"] == pytest.approx(flops / (8 * 989.4e12 * 0.40))
    assert c["gpu_hours"]["value"] == pytest.approx(8 * c["wall_time_s"]["value"] / 3600)
    assert c["dollars"]["value"] == pytest.approx(c["gpu_hours"]["value"] * 2.99)


def test_qlora_stores_a_4bit_base_and_pays_for_dequantisation():
    lora = run(method="lora")
    shape, _ = resolve_model("llama-2-7b")
    setup = TrainSetup(precision="bf16-mixed", micro_batch=4, base_format="nf4")
    qlora = estimate_run(shape, LoRA(), tokens=1e7, sequences=4883, seq_len=2048, steps=1221, setup=setup,
                         hardware=H100)
    assert qlora["method"]["label"] == "qlora"
    assert qlora["costs"]["weights_bytes"]["value"] < 0.35 * lora["costs"]["weights_bytes"]["value"]
    assert qlora["time"]["dequantisation_s"] > 0
    with pytest.raises(EstimateError, match="lora"):
        estimate_run(shape, make_method("full"), sequences=1, seq_len=8, steps=1, setup=setup, hardware=H100)


@pytest.mark.parametrize("name", sorted(model_presets()))
def test_every_preset_resolves_and_matches_its_published_size(name):
    preset = model_presets()[name]
    shape, found = resolve_model(name)
    assert found is preset and preset.source
    if preset.published_params % 1e9:  # an exact published count (the config's own model): equal
        assert shape.total_params() == preset.published_params
    else:  # a rounded headline figure ("175B")
        assert shape.total_params() == pytest.approx(preset.published_params, rel=0.005)


def test_preset_names_are_forgiving_and_config_paths_work(tmp_path):
    assert resolve_model("Llama-2-7B")[1].name == "llama-2-7b"
    assert resolve_model("LLAMA 3.1 8B")[1].name == "llama-3.1-8b"
    config = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for where in (tmp_path, tmp_path / "config.json"):
        shape, preset = resolve_model(str(where))
        assert preset is None and shape.hidden_size == 64


def test_catalogue_peaks_are_dense_datasheet_values():
    assert gpu_peak_flops("H100-SXM", "bf16") == 989.4e12  # tunegap.train prices its dollars with this
    assert gpu_peak_flops("h100", "bf16") == 989.4e12
    assert gpu_peak_flops("A100-80GB", "bf16") == 312e12
    t4 = resolve_device("T4")
    assert t4.peak("bf16")[0] == 65e12 and "fp16" in t4.peak("bf16")[1]
    names = {d.name for d in gpu_catalog().values()}
    assert {"A100-40GB", "A100-80GB", "H100-SXM", "H100-PCIe", "H200", "L4", "A10G", "T4", "RTX-4090"} <= names
    assert {"H800", "TPU-v4", "TPU-v5e", "TPU-v5p"} <= names
    assert gpu_peak_flops("tpu v4", "bf16") == 275e12 and gpu_peak_flops("H800", "fp8") == 1978.9e12
    for device in gpu_catalog().values():  # a device without a public price says so
        assert device.source and device.memory_bytes > 0
        assert device.price_per_hour > 0 if device.price_per_hour is not None else device.notes


def test_catalog_file_adds_a_gpu_and_price_overrides(tmp_path):
    extra = {"gpus": [{"name": "MI300X", "memory_bytes": 192 * 2**30,
                       "peak_flops_per_s": {"fp32": 163.4e12, "bf16": 1307.4e12, "fp16": 1307.4e12},
                       "price_per_hour_usd": 4.0, "source": "AMD MI300X datasheet"}]}
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps(extra))
    device = resolve_device("mi300x", catalog=path, price=1.5)
    assert device.price_per_hour == 1.5 and device.peak("bf16")[0] == 1307.4e12


# --- errors: one clear line ----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["estimate", "--model", "gpt-5", "--tokens", "1M"], "neither a preset"),
    (["estimate", "--gpu", "B300", "--tokens", "1M"], "unknown 'B300'"),
    (["estimate", "--model", "llama-2-7b", "--rank", "5000", "--tokens", "1M"], "exceeds"),
    (["estimate", "--tokens", "0"], "--tokens: expected a finite number above 0"),
    (["estimate"], "exactly one of"),
    (["estimate", "--tokens", "1M", "--zero", "2", "--micro-batch", "0"], "--micro-batch"),
    (["gap", "--model", "mistral-7b"], "--pretrain-tokens"),
])
def test_impossible_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tunegap: error: ") and message in err and "\n" not in err


def test_errors_are_valueerror_subclasses():
    assert issubclass(EstimateError, ValueError) and issubclass(MethodError, ValueError)
    shape, _ = resolve_model("smollm2-135m")
    with pytest.raises(EstimateError):
        estimate_run(shape, make_method("lora"), sequences=0, seq_len=128, steps=1, setup=TrainSetup(),
                     hardware=H100)
    with pytest.raises(MethodError):
        estimate_run(shape, make_method("lora", rank=10_000), sequences=1, seq_len=128, steps=1,
                     setup=TrainSetup(), hardware=H100)


# --- the command line -----------------------------------------------------------------------------------------

def test_add_parser_registers_estimate_and_gap():
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers(dest="command")
    estimate_parser(subparsers)
    gap_parser(subparsers)
    args = parser.parse_args(["estimate", "--model", "llama-3.1-8b", "--tokens", "5M"])
    assert callable(args.func) and args.tokens == 5e6
    assert callable(parser.parse_args(["gap"]).func)


def test_cli_table_and_json(capsys):
    assert main(["estimate", "--model", "llama-3.1-8b", "--method", "qlora", "--examples", "2000",
                 "--example-tokens", "300", "--seq-len", "1024", "--gpu", "L4", "--micro-batch", "1",
                 "--checkpointing"]) == 0
    table = capsys.readouterr().out
    assert "method qlora" in table and "(estimate)" in table and "peak" in table and "-> fits" in table
    assert main(["estimate", "--model", "llama-2-70b", "--method", "full", "--tokens", "1M", "--gpus", "8",
                 "--zero", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["memory"]["fits"] is False and result["memory"]["devices_needed"] > 8


def test_parse_count():
    assert parse_count("15T") == 15e12 and parse_count("2e12") == 2e12 and parse_count("10k") == 1e4
    with pytest.raises(argparse.ArgumentTypeError):
        parse_count("lots")


def test_data_file_counts_tokens(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a" * 40},
                                             {"role": "assistant", "content": "b" * 400}]}) + "\n"
                    + json.dumps({"text": "c" * 80}) + "\n")
    counted = count_data_tokens(path, seq_len=64)
    # chars/4: (4 + 40 + 9 + 400 + 1 separators) / 4 -> 64 after truncation, and 20
    assert counted["examples"] == 2 and counted["tokens"] == 64 + 20 and "approximate" in counted["how"]
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(EstimateError, match="bad.jsonl:1"):
        count_data_tokens(tmp_path / "bad.jsonl", seq_len=64)


def test_import_and_estimate_take_under_a_second_without_torch():
    code = ("import sys, time; t = time.perf_counter(); import tunegap.estimate as e; "
            "from tunegap.multipliers import gap; "
            "e.main(['estimate', '--model', 'llama-3.1-405b', '--method', 'full', '--tokens', '1B', "
            "'--zero', '3', '--gpus', '256', '--json']); "
            "print(time.perf_counter() - t, 'torch' in sys.modules, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, torch_loaded = out.stderr.split()[-2:]
    assert float(seconds) < 1.0 and torch_loaded == "False"


# --- properties ----------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(tokens=st.floats(1e3, 1e12), more=st.floats(1.0, 1e3),
       model=st.sampled_from(["smollm2-135m", "llama-2-7b", "mixtral-8x7b", "pythia-1b"]),
       method=st.sampled_from(["full", "lora", "freeze", "ia3", "prompt"]))
def test_more_tokens_never_cost_less(tokens, more, model, method):
    a, b = run(model, method, tokens=tokens, seq_len=512), run(model, method, tokens=tokens * more, seq_len=512)
    for key in ("flops_total", "flops_hardware", "wall_time_s", "gpu_hours", "dollars"):
        assert b["costs"][key]["value"] >= a["costs"][key]["value"], key


# --- --against: a run's ledger beside the prediction -----------------------------------------------------------

def test_against_reads_a_run_ledger(tmp_path):
    shape = ModelShape(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       intermediate_size=128, tied_embeddings=True, name="tiny")
    method = make_method("lora", rank=8)
    flops = train_step_flops(shape, method.trainable(shape), sequences=40, seq_len=128, logit_tokens=4000)
    value = {"examples": 64, "tokens": 5000, "loss_tokens": 4000, "padding_tokens": 120, "optimizer_steps": 10,
             "params_total": 120_000, "params_trainable": 9_000, "peak_memory_bytes": 600e6,
             "flops_total": flops.total, "flops_hardware": flops.hardware, "wall_time_s": 12.0,
             "train_time_s": 10.0, "tokens_per_s": 500.0}
    ledger = {"run": "t", "config": {"model": "tiny", "method": "lora", "seq_len": 128, "grad_accum": 1,
                                     "batch_size": 8, "activation_checkpointing": False},
              "method": method.to_dict(), "shape": shape.to_dict(), "precision": "fp32",
              "peaks": {"device": "test cpu", "fp32_flops_per_s": 5e10, "bf16_flops_per_s": 1e11, "threads": 2},
              "costs": {k: {"value": v, "unit": "x", "how": "measured"} for k, v in value.items()}}
    folder = tmp_path / "runs" / "t"
    folder.mkdir(parents=True)
    (folder / "ledger.json").write_text(json.dumps(ledger))
    report = against_run("t", str(tmp_path / "runs"))
    rows = {r["key"]: r for r in report["comparison"]}
    assert rows["flops_total"]["ratio"] == pytest.approx(1.0, rel=0.05)
    assert rows["wall_time_s"]["ratio"] == pytest.approx(1.0, rel=0.05)  # the run's own MFU
    assert {"peak_memory_bytes", "optimizer_steps", "tokens"} <= set(rows)
    with pytest.raises(EstimateError, match="no ledger.json"):
        against_run("missing", str(tmp_path / "runs"))
