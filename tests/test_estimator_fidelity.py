"""`tunegap estimate` at scale: bad input, MFU vs HFU, FLOP conventions, Korthikanti activations, layouts, knobs."""

from __future__ import annotations

import json
import math

import pytest

from tunegap.cli import main
from tunegap.costs.catalog import EstimateError, resolve_device, resolve_model
from tunegap.costs.flops import CONVENTIONS, convention_flops, recompute_flops, train_step_flops
from tunegap.costs.megatron import (Layout, activation_bytes_per_layer, candidate_layouts, layer_activation_terms,
                                    stage_memory)
from tunegap.costs.memory import NAMED_PRESETS, TrainSetup, bytes_per_param, nf4_bytes_per_param
from tunegap.costs.shape import full_trainable
from tunegap.estimate import estimate_run, resolve_throughput
from tunegap.methods import make_method

H100 = resolve_device("H100-SXM")


def pretrain(model="llama-2-7b", tokens=2e9, seq_len=2048, gpus=8, **kw):
    shape, _ = resolve_model(model)
    rows = math.ceil(tokens / seq_len)
    setup = TrainSetup(precision=kw.pop("precision", "bf16-mixed"), micro_batch=kw.pop("micro_batch", 1),
                       grad_accum=kw.pop("grad_accum", 8), gpus=gpus, zero=kw.pop("zero", 3),
                       checkpointing=kw.pop("checkpointing", False))
    return estimate_run(shape, make_method("full"), tokens=tokens, sequences=rows, seq_len=seq_len,
                        steps=max(1, rows // 64), setup=setup, hardware=kw.pop("hardware", H100), label="pretrain",
                        **kw)


# --- bad input: one line, exit 2, the field named ----------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    ("[1, 2, 3]", "expected a JSON object"),
    ('{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, '
     '"vocab_size": 100}', "intermediate_size: expected an integer"),
    ('{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, '
     '"vocab_size": 100, "intermediate_size": 1e400}', "intermediate_size: expected an integer"),
    ('{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, '
     '"vocab_size": 100, "intermediate_size": NaN}', "intermediate_size: expected an integer"),
    ('{"model_type": "mamba"}', "model_type: expected one of"),
])
def test_bad_config_files_are_one_line_naming_the_field(tmp_path, capsys, content, message):
    (tmp_path / "config.json").write_text(content)
    assert main(["estimate", "--model", str(tmp_path / "config.json"), "--tokens", "1M"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tunegap: error: ") and message in err and "\n" not in err
    assert str(tmp_path / "config.json") in err


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "-5"], "--tokens: expected a finite number above 0, got -5"),
    (["--tokens", "inf"], "--tokens: expected a finite number"),
    (["--tokens", "nan"], "--tokens: expected a finite number"),
    (["--tokens", "1M", "--price", "inf"], "--price: expected a finite number"),
    (["--tokens", "1M", "--mfu", "nan"], "--mfu"),
    (["--tokens", "1M", "--mfu", "1.5"], "--mfu"),
    (["--tokens", "1M", "--goodput", "0"], "--goodput"),
    (["--tokens", "1M", "--mfu", "0.3", "--hfu", "0.4"], "at most one of"),
    (["--tokens", "1M", "--tflops-per-gpu", "5000"], "faster than the hardware"),
    (["--tokens", "1M", "--method", "pretrain", "--gpus", "8", "--tp", "3"], "not a multiple"),
])
def test_bad_numbers_are_one_line_and_exit_2(capsys, argv, message):
    assert main(["estimate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tunegap: error: ") and message in err and "\n" not in err


def test_json_output_never_holds_nan_or_infinity(capsys):
    assert main(["estimate", "--model", "llama-2-7b", "--tokens", "1M", "--optimizer", "adafactor", "--json"]) == 0
    text = capsys.readouterr().out
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text)


# --- MFU and HFU --------------------------------------------------------------------------------------------

def test_each_throughput_input_derives_the_same_others():
    args = dict(model_flops=6e18, hardware_flops=8e18, tokens=1e6, devices=8, peak=1e15)
    by_mfu = resolve_throughput({"mfu": 0.45}, **args)
    assert by_mfu["seconds"] == pytest.approx(6e18 / (8 * 1e15 * 0.45))
    assert by_mfu["hfu"] == pytest.approx(0.6)  # the recompute's 8/6
    for key in ("hfu", "tokens_per_s_per_gpu", "hardware_tflops_per_gpu"):
        given = {"hardware_tflops_per_gpu": "tflops_per_gpu"}.get(key, key)
        again = resolve_throughput({given: by_mfu[key]}, **args)
        assert again["mfu"] == pytest.approx(0.45) and again["seconds"] == pytest.approx(by_mfu["seconds"])


def test_goodput_stretches_wall_clock_not_mfu():
    at_full, at_90 = pretrain(), pretrain(goodput=0.9)
    assert at_90["costs"]["wall_time_s"]["value"] == pytest.approx(at_full["costs"]["wall_time_s"]["value"] / 0.9)
    assert at_90["time"]["mfu"] == at_full["time"]["mfu"]


def test_does_not_fit_prints_no_time_or_dollars(capsys):
    assert main(["estimate", "--model", "llama-2-70b", "--method", "full", "--tokens", "1M", "--gpus", "1"]) == 0
    out = capsys.readouterr().out
    money = out.split("time and money")[1].split("assumptions")[0]
    assert "DOES NOT FIT" in out and "wall-clock" not in money and "$" not in money and "not estimated" in money
    assert main(["estimate", "--model", "llama-2-70b", "--method", "full", "--tokens", "1M", "--gpus", "1",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["costs"]["dollars"]["value"] is None and result["costs"]["wall_time_s"]["value"] is None


@pytest.mark.parametrize("units, other", [("GiB", "GB"), ("GB", "GiB")])
@pytest.mark.parametrize("argv", [["--model", "llama-2-7b"], ["--model", "llama-2-70b", "--method", "full"],
                                  ["--model", "llama-2-70b", "--method", "full", "--zero", "3", "--gpus", "4"],
                                  ["--model", "llama-3.1-405b", "--method", "pretrain", "--gpus", "64", "--tp", "8",
                                   "--pp", "8"]])
def test_one_memory_unit_per_output(capsys, units, other, argv):
    assert main(["estimate", *argv, "--tokens", "1M", "--units", units]) == 0
    out = capsys.readouterr().out
    words = out.replace("(", " ").replace(")", " ").replace(";", " ").replace(",", " ").split()
    assert units in words and other not in words and f"memory in {units}" in out


def test_every_output_states_its_convention_and_bytes_layout(capsys):
    assert main(["estimate", "--model", "llama-2-7b", "--tokens", "1M", "--bytes-preset", "bf16-no-master-adam",
                 "--method", "full", "--flop-convention", "6nd"]) == 0
    head = capsys.readouterr().out.splitlines()[1]
    assert "FLOP convention: 6nd" in head and "bytes/param layout: bf16-no-master-adam" in head


# --- conventions --------------------------------------------------------------------------------------------

def test_conventions_order_and_closed_forms():
    shape, _ = resolve_model("llama-2-7b")
    tr = full_trainable(shape)
    got = {c: convention_flops(shape, tr, c, sequences=2, seq_len=4096).total for c in CONVENTIONS}
    tokens = 2 * 4096
    assert got["6nd"] == 6 * shape.total_params() * tokens
    assert got["palm"] == got["6nd"] + 12 * 32 * 32 * 128 * 4096 * tokens
    assert got["causal"] < got["hardware"] and got["no-logits"] < got["hardware"]
    assert got["causal-no-logits"] < got["causal"]
    # the ledger's convention is train_step_flops itself (full square, logits in)
    assert got["hardware"] == train_step_flops(shape, tr, sequences=2, seq_len=4096).total
    with pytest.raises(ValueError, match="closed form"):
        convention_flops(shape, tr, "6nd", sequences=1, seq_len=8, full_training=False)


def test_moe_6nd_uses_active_parameters():
    shape, _ = resolve_model("mixtral-8x7b")
    assert convention_flops(shape, full_trainable(shape), "6nd", sequences=1, seq_len=10).total == \
        6 * shape.active_params() * 10 < 6 * shape.total_params() * 10


# --- Korthikanti activations ----------------------------------------------------------------------------------

def test_gpt3_block_gives_exactly_34_and_5as_over_h():
    shape, _ = resolve_model("gpt-3-175b")
    assert layer_activation_terms(shape) == {"replicated": 10, "parallel": 24, "scores": 5}
    s, b, h, a = 2048, 1, 12288, 96
    one = Layout()
    assert activation_bytes_per_layer(shape, micro_batch=b, seq_len=s, layout=one, flash=False) == \
        s * b * h * (34 + 5 * a * s / h)
    tp = Layout(gpus=8, tp=8)
    assert activation_bytes_per_layer(shape, micro_batch=b, seq_len=s, layout=tp, flash=False) == \
        pytest.approx(s * b * h * (10 + 24 / 8 + 5 * a * s / (h * 8)))
    sp = Layout(gpus=8, tp=8, sp=True)
    assert activation_bytes_per_layer(shape, micro_batch=b, seq_len=s, layout=sp, flash=False) == \
        pytest.approx(s * b * h / 8 * (34 + 5 * a * s / h))
    assert activation_bytes_per_layer(shape, micro_batch=b, seq_len=s, layout=sp, recompute="selective") == \
        pytest.approx(s * b * h * 34 / 8)
    assert activation_bytes_per_layer(shape, micro_batch=b, seq_len=s, layout=one, recompute="full") == 2 * s * b * h


def test_selective_recompute_costs_2_7_percent_of_gpt3_forward():
    """Korthikanti et al. 2022, Sec. 5: selective recompute adds 2.7% (GPT-3) and 1.6% (MT-NLG) to the forward."""
    for name, expected in (("gpt-3-175b", 0.027), ("mt-nlg-530b", 0.016)):
        shape = _gpt_shape(name)
        forward = train_step_flops(shape, full_trainable(shape), sequences=1, seq_len=2048, logit_tokens=0,
                                   attention_rescore=False).forward
        extra = recompute_flops(shape, sequences=1, seq_len=2048, recompute="selective", flash=False)
        assert extra / forward == pytest.approx(expected, abs=0.0005)


def _gpt_shape(name):
    from tunegap.costs.shape import validate_config

    dims = {"gpt-3-175b": (12288, 96, 96), "mt-nlg-530b": (20480, 105, 128)}[name]
    return validate_config({"model_type": "gpt2", "n_embd": dims[0], "n_layer": dims[1], "n_head": dims[2],
                            "vocab_size": 51200, "n_positions": 2048})


# --- layouts ----------------------------------------------------------------------------------------------------

def test_405b_is_sizeable_and_the_smallest_fitting_layout_is_picked():
    result = pretrain("llama-3.1-405b", tokens=1e12, seq_len=8192, gpus=2048, zero=1, grad_accum=16,
                      auto_layout=True)
    assert result["memory"]["fits"]
    lay = result["layout"]
    assert lay["tp"] * lay["pp"] * lay["cp"] > 1 and result["memory"]["activation_model"] == "korthikanti"
    shape, _ = resolve_model("llama-3.1-405b")
    smaller = [c for c in candidate_layouts(shape, 2048)
               if c.model_parallel * c.ep < lay["tp"] * lay["pp"] * lay["cp"] * lay["ep"]]
    per = bytes_per_param("bf16-mixed", "adamw")
    for layout in smaller:  # every smaller layout really does not fit
        mem = stage_memory(shape, layout, bytes_weights=per["weights"], bytes_grads=per["gradients"],
                           bytes_states=per["optimizer_state"], zero=1, micro_batch=1, seq_len=8192,
                           micro_batches=16, runtime_bytes=H100.runtime_bytes)
        assert mem.peak > H100.memory_bytes


def test_pipeline_holds_in_flight_microbatches_and_reports_the_bubble():
    shape, _ = resolve_model("gpt-3-175b")
    base = dict(bytes_weights=2, bytes_grads=2, bytes_states=12, zero=1, micro_batch=1, seq_len=2048)
    few = stage_memory(shape, Layout(gpus=64, tp=8, pp=8), micro_batches=4, **base)
    many = stage_memory(shape, Layout(gpus=64, tp=8, pp=8), micro_batches=64, **base)
    assert few.in_flight == 4 and many.in_flight == 8 and many.activations == 2 * few.activations
    assert few.bubble == 7 / 4 and many.bubble == 7 / 64


def test_zero3_reports_sharded_states_and_gathered_layers_apart():
    result = pretrain("llama-2-7b", gpus=64, zero=3)
    mem = result["memory"]
    shape, _ = resolve_model("llama-2-7b")
    assert mem["zero3_sharded_bytes"] == pytest.approx(16 * shape.total_params() / 64, rel=0.01)
    assert mem["zero3_gathered_bytes"] > 0


def test_expert_parallelism_spreads_experts():
    shape, _ = resolve_model("mixtral-8x7b")
    base = dict(bytes_weights=2, bytes_grads=2, bytes_states=12, zero=0, micro_batch=1, seq_len=4096,
                micro_batches=8)
    one = stage_memory(shape, Layout(gpus=8, tp=1), **base)
    spread = stage_memory(shape, Layout(gpus=8, tp=1, ep=8), **base)
    experts = sum(shape.routed_expert_params(i) for i in range(shape.num_layers))
    assert one.weights - spread.weights == pytest.approx(2 * experts * 7 / 8)


# --- knobs --------------------------------------------------------------------------------------------------------

def test_every_named_preset_is_selectable_from_the_cli(capsys):
    for name, (_prec, _opt, total, _src) in NAMED_PRESETS.items():
        assert main(["estimate", "--model", "smollm2-135m", "--method", "full", "--tokens", "1M", "--gpu", "H100",
                     "--bytes-preset", name, "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["bytes_per_param"]["name"] == name and result["bytes_per_param"]["total"] == total


def test_fp8_runs_at_the_fp8_peak_and_a100_has_none(capsys):
    assert main(["estimate", "--model", "llama-2-7b", "--method", "full", "--tokens", "1M", "--gpus", "8",
                 "--zero", "3", "--precision", "fp8-mixed", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["time"]["peak_flops_per_s"] == 1978.9e12
    assert main(["estimate", "--model", "llama-2-7b", "--tokens", "1M", "--precision", "fp8-mixed",
                 "--gpu", "A100-80GB"]) == 2
    assert "no fp8 peak" in capsys.readouterr().err


def test_qlora_double_quant_switch(capsys):
    sizes = {}
    for flag in ("--double-quant", "--no-double-quant"):
        assert main(["estimate", "--model", "llama-2-7b", "--method", "qlora", "--tokens", "1M", flag, "--json"]) == 0
        sizes[flag] = json.loads(capsys.readouterr().out)["costs"]["weights_bytes"]["value"]
    assert nf4_bytes_per_param(True) < nf4_bytes_per_param(False)
    assert sizes["--double-quant"] < sizes["--no-double-quant"]


def test_estimates_on_tpus_and_h800():
    for device in ("TPU-v4", "TPU-v5e", "TPU-v5p", "H800"):
        result = pretrain("llama-2-7b", gpus=256, zero=3, hardware=resolve_device(device))
        assert result["time"]["peak_flops_per_s"] > 0 and result["memory"]["fits"]


def test_a_layout_needs_full_training():
    shape, _ = resolve_model("llama-2-7b")
    with pytest.raises(EstimateError, match="full training"):
        estimate_run(shape, make_method("lora"), tokens=1e6, sequences=500, seq_len=2048, steps=10,
                     setup=TrainSetup(precision="bf16-mixed", gpus=8), hardware=H100, layout=Layout(gpus=8, tp=8))


@pytest.mark.parametrize("entry, message", [
    ({"memory_bytes": "Infinity"}, "memory_bytes: expected a positive finite"),
    ({"peak_flops_per_s": {"bf16": -1}}, "peak_flops_per_s.bf16"),
    ({"price_per_hour_usd": float("inf")}, "price_per_hour_usd"),
])
def test_bad_catalogue_entries_are_one_line(tmp_path, capsys, entry, message):
    gpu = {"name": "X1", "memory_bytes": 8e10, "peak_flops_per_s": {"bf16": 1e15}, **entry}
    (tmp_path / "gpus.json").write_text(json.dumps({"gpus": [gpu]}).replace('"Infinity"', "Infinity"))
    assert main(["estimate", "--tokens", "1M", "--gpu", "X1", "--catalog", str(tmp_path / "gpus.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tunegap: error: ") and message in err and "\n" not in err


def test_a_negative_price_is_refused_and_zero_is_free(capsys):
    assert main(["estimate", "--tokens", "1M", "--price", "-1"]) == 2
    assert "--price: expected a finite number at least 0" in capsys.readouterr().err
    assert main(["estimate", "--tokens", "1M", "--price", "0"]) == 0


def test_when_no_layout_fits_the_lowest_peak_layout_is_shown():
    result = pretrain("llama-3.1-405b", tokens=1e9, seq_len=8192, gpus=8, zero=0, auto_layout=True)
    mem, lay = result["memory"], result["layout"]
    assert not mem["fits"] and "no layout of 8 devices fits" in mem["fit_message"]
    assert lay["tp"] * lay["pp"] == 8 and mem["stage"]["peak"] == mem["peak"]  # the layout shown is the one costed
