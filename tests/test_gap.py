"""`tunegap gap`: pretraining vs fine-tuning, the multipliers multiply out exactly, and a chart is drawn."""

from __future__ import annotations

import json
import math

import pytest

from tunegap.costs.catalog import EstimateError, resolve_device, resolve_model
from tunegap.costs.memory import TrainSetup
from tunegap.cli import main
from tunegap.multipliers import decompose, gap, plot_gap

H100 = resolve_device("H100-SXM")


@pytest.fixture(scope="module")
def llama2_gap():
    shape, preset = resolve_model("llama-2-7b")
    return gap(shape, preset.pretrain_tokens, finetune_tokens=10_000 * 512 * 3, seq_len=512, hardware=H100,
               setup=TrainSetup(precision="bf16-mixed", zero=3, micro_batch=8), pretrain_seq_len=4096,
               pretrain_batch_tokens=preset.pretrain_batch_tokens, finetune_examples=30_000)


def test_cost_multipliers_multiply_out_exactly(llama2_gap):
    for arm, r in llama2_gap["ratios"].items():
        m = r["cost_multipliers"]
        assert m["tokens"] * m["flops_per_token"] == pytest.approx(r["flops"], rel=1e-12), arm
        assert r["flops"] * m["seconds_per_flop"] == pytest.approx(r["gpu_hours"], rel=1e-12), arm
        assert r["gpu_hours"] * m["price_per_hour"] == pytest.approx(r["dollars"], rel=1e-12), arm
        product = math.prod(m.values())
        assert product == pytest.approx(r["dollars"], rel=1e-12), arm
        # and they are the ratios of the arms' own costs
        pre, ft = llama2_gap["arms"]["pretrain"]["costs"], llama2_gap["arms"][arm]["costs"]
        assert r["flops"] == pytest.approx(pre["flops_total"]["value"] / ft["flops_total"]["value"], rel=1e-12)
        assert r["dollars"] == pytest.approx(pre["dollars"]["value"] / ft["dollars"]["value"], rel=1e-12)


def test_tokens_dominate_and_lora_saves_flops_only_by_about_a_third(llama2_gap):
    ratios = llama2_gap["ratios"]
    for arm in ("full", "lora", "qlora"):
        assert ratios[arm]["dominant"] == "tokens"
        assert ratios[arm]["cost_multipliers"]["tokens"] == pytest.approx(2e12 / 15.36e6)
    # full fine-tuning runs the same per-token work as pretraining, apart from attention over 4096 vs 512
    assert 1.0 < ratios["full"]["cost_multipliers"]["flops_per_token"] < 1.25
    lora_vs_full = ratios["lora"]["flops"] / ratios["full"]["flops"]
    assert 1.3 < lora_vs_full < 1.6  # LoRA ~2/3 the FLOPs of full per token: a 1.5x gain, not 100x
    # the separate axes: LoRA trains ~337x fewer parameters and keeps ~337x less optimizer state
    assert ratios["lora"]["other_axes"]["params_trainable"] > 300
    assert ratios["lora"]["other_axes"]["optimizer_state_bytes"] > 300
    assert ratios["full"]["other_axes"]["params_trainable"] == 1.0
    assert ratios["full"]["other_axes"]["optimizer_steps"] == pytest.approx(500_000 / 3750)
    # QLoRA pays for dequantising its 4-bit base: a little slower per FLOP than LoRA
    assert ratios["qlora"]["cost_multipliers"]["seconds_per_flop"] < 1.0


def test_gpus_needed_is_a_memory_floor_not_a_cost(llama2_gap):
    arms = llama2_gap["arms"]
    assert arms["pretrain"]["memory"]["devices_needed"] >= arms["full"]["memory"]["devices_needed"] >= 1
    assert arms["qlora"]["memory"]["devices_needed"] == 1
    assert "gpus_needed" not in llama2_gap["ratios"]["full"]["cost_multipliers"]


def test_llama2_pretraining_gpu_hours_match_the_paper_at_40_percent_mfu():
    """Touvron et al. 2023, Table 2: 184,320 (7B) and 1,720,320 (70B) A100-80GB GPU-hours for 2T tokens."""
    a100 = resolve_device("A100-80GB")
    for name, published in (("llama-2-7b", 184_320), ("llama-2-70b", 1_720_320)):
        shape, preset = resolve_model(name)
        result = gap(shape, preset.pretrain_tokens, finetune_tokens=1e6, seq_len=512, hardware=a100,
                     setup=TrainSetup(precision="bf16-mixed", zero=3, micro_batch=8), pretrain_seq_len=4096)
        hours = result["arms"]["pretrain"]["costs"]["gpu_hours"]["value"]
        assert hours == pytest.approx(published, rel=0.2), name


def test_decompose_handles_a_missing_price():
    shape, preset = resolve_model("smollm2-135m")
    free = resolve_device("H100-SXM", price=0.0)
    result = gap(shape, preset.pretrain_tokens, finetune_tokens=1e6, seq_len=128, hardware=free)
    r = result["ratios"]["lora"]
    assert r["dollars"] is None and r["cost_multipliers"]["price_per_hour"] is None
    assert r["gpu_hours"] > 1e5
    assert decompose(result["arms"]["pretrain"], result["arms"]["pretrain"])["gpu_hours"] == 1.0


def test_bad_input_is_one_clear_error():
    shape, _ = resolve_model("llama-2-7b")
    with pytest.raises(EstimateError, match="pretraining tokens"):
        gap(shape, 0, finetune_tokens=1e6, seq_len=512, hardware=H100)
    with pytest.raises(EstimateError, match="zero fine-tuning tokens"):
        gap(shape, 2e12, finetune_tokens=0, seq_len=512, hardware=H100)


def test_plot_gap_writes_a_png(llama2_gap, tmp_path):
    path = tmp_path / "gap.png"
    plot_gap(llama2_gap, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_gap_cli(capsys, tmp_path):
    png = tmp_path / "g.png"
    assert main(["gap", "--model", "pythia-1b", "--examples", "5000", "--example-tokens", "256",
                 "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "tokens" in out and "x FLOPs per token" in out and "dominant: tokens" in out and png.is_file()
    assert main(["gap", "--model", "mistral-7b", "--pretrain-tokens", "8T", "--tokens", "20M", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["arms"]) == {"pretrain", "full", "lora", "qlora"}
    assert result["pretrain"]["tokens"] == 8e12
