"""`sweep lora-rank`'s verdict rule on planted per-seed gaps: a rank <= 16 within 2% of full fine-tuning over
its whole interval, every such rank resolved outside it, or neither."""

from tunegap.analysis.sweep import _within, close_to_full
from tunegap.stats import mean_interval


def _rows(gaps_by_rank: dict) -> dict:
    rows = {"full": {"rank": None, "loss_gap": mean_interval([0.0, 0.0, 0.0]).as_dict("fraction")}}
    for rank, gaps in gaps_by_rank.items():
        rows[f"lora-r{rank}"] = {"rank": rank, "loss_gap": mean_interval(gaps).as_dict("fraction"),
                                 "quality_gap": None}
    return rows


def test_a_small_rank_whose_whole_interval_is_within_two_percent_supports_it():
    within = _within(_rows({4: [0.08, 0.09, 0.10], 16: [0.010, 0.012, 0.011], 64: [0.0, 0.001, 0.002]}))
    assert within["loss_2pct"] == 16 and close_to_full(within) is True


def test_every_small_rank_resolved_above_two_percent_refutes_it_even_if_a_large_one_is_close():
    within = _within(_rows({4: [0.08, 0.09, 0.10], 16: [0.05, 0.06, 0.055], 64: [0.0, 0.001, 0.002]}))
    assert within["loss_2pct"] == 64 and close_to_full(within) is False


def test_an_interval_straddling_two_percent_is_not_resolved():
    within = _within(_rows({4: [0.08, 0.09, 0.10], 16: [0.0, 0.02, 0.04]}))
    assert within["loss_2pct"] is None and close_to_full(within) is None


def test_one_seed_resolves_nothing():
    within = _within(_rows({16: [0.001]}))
    assert close_to_full(within) is None
