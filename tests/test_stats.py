"""Seed intervals and the verdict rule that says "not resolved at this budget"."""

import math

import pytest

from tunegap.report import Verdict, verdict_label
from tunegap.stats import NOT_RESOLVED, judge, mean_interval, paired_differences, seeds_to_resolve


def test_interval_matches_the_t_formula_and_one_seed_has_none():
    iv = mean_interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, t(2) = 4.303: half-width 4.303 / sqrt(3)
    assert iv.mean == pytest.approx(2.0)
    assert iv.half_width == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)
    one = mean_interval([5.0, None])
    assert one.n == 1 and math.isinf(one.half_width) and "no interval" in one.text()
    assert one.as_dict("s")["low"] is None


def test_judge_on_each_side_of_the_threshold_and_in_between():
    tight_below = mean_interval([0.10, 0.11, 0.12])
    tight_above = mean_interval([0.30, 0.31, 0.32])
    straddling = mean_interval([0.05, 0.20, 0.35])
    assert judge(tight_below, 0.2, claim_below=True).supported is True
    assert judge(tight_above, 0.2, claim_below=True).supported is False
    assert judge(tight_above, 0.2, claim_below=False).supported is True
    j = judge(straddling, 0.2, claim_below=True)
    assert j.supported is None and j.note.startswith(NOT_RESOLVED) and "seeds" in j.note


def test_seeds_to_resolve_grows_as_the_mean_nears_the_threshold():
    iv = mean_interval([0.9, 1.0, 1.1])  # sd 0.1
    far = seeds_to_resolve(iv, 1.12)
    near = seeds_to_resolve(iv, 1.02)
    n_far, n_near = (int(s.split()[1]) for s in (far, near))
    assert 3 < n_far < n_near
    assert "would not resolve" in seeds_to_resolve(iv, 1.0)
    assert "at least 3" in seeds_to_resolve(mean_interval([1.0]), 2.0)


def test_paired_differences_remove_what_seeds_share():
    a, b = [1.0, 2.0, 3.0], [0.9, 1.9, 2.9]  # seeds differ a lot, the arms by a steady 0.1
    assert paired_differences(a, b).half_width < 1e-9
    assert mean_interval(a).low < mean_interval(b).high  # unpaired, the intervals overlap


def test_unresolved_verdict_label():
    assert verdict_label(None, unresolved=True) == NOT_RESOLVED
    assert verdict_label(None) == "it depends"
    assert Verdict("c", "m", None, unresolved=True).label == NOT_RESOLVED
