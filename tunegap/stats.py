"""Seeds, intervals and verdicts that say when they are not resolved.

Every number a reader will quote is a mean over seeds with a 95% interval (Student's t: a handful of seeds is
far too few for a normal approximation or a bootstrap). A verdict compares its interval with the rule's
threshold: supported when the whole interval is on the claimed side, not supported when it is all on the other
side, and otherwise "not resolved at this budget", with the number of seeds that would resolve it if the
mean and spread held (the half-width shrinks as 1/sqrt(n)).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# Two-sided 95% quantiles of Student's t by degrees of freedom (any table, e.g. NIST/SEMATECH e-Handbook
# 1.3.6.7.2). Written out because scipy would be a large dependency for one column of numbers.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}
NOT_RESOLVED = "not resolved at this budget"


def t95(df: int) -> float:
    """Two-sided 95% Student-t quantile; between table rows the next smaller df (wider, so conservative)."""
    if df < 1:
        return math.inf
    if df > 120:
        return 1.960
    return _T95[max(k for k in _T95 if k <= df)]


@dataclass(frozen=True)
class Interval:
    """Mean over seeds with a two-sided 95% t interval; one seed has an infinitely wide interval."""
    mean: float
    low: float
    high: float
    n: int
    values: tuple = ()

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def as_dict(self, unit: str, how: str = "measured") -> dict:
        """As results.json writes a number: value (the mean), unit, how, plus the interval and its seeds."""
        finite = math.isfinite(self.half_width)
        return {"value": self.mean, "unit": unit, "how": how, "low": self.low if finite else None,
                "high": self.high if finite else None, "seeds": self.n, "per_seed": list(self.values),
                "interval": "95% Student t over seeds"}

    @classmethod
    def from_dict(cls, d: dict) -> "Interval":
        """An Interval back from its results.json form (`as_dict`), for verdicts and tables written from results."""
        low = d["low"] if d.get("low") is not None else -math.inf
        high = d["high"] if d.get("high") is not None else math.inf
        return cls(d["value"], low, high, d["seeds"], tuple(d["per_seed"]))

    def text(self, digits: int = 3, unit: str = "") -> str:
        unit = f" {unit}" if unit else ""
        if self.n < 2:
            return f"{self.mean:.{digits}g}{unit} (1 seed, no interval)"
        return (f"{self.mean:.{digits}g}{unit} [95% CI {self.low:.{digits}g}, {self.high:.{digits}g}; "
                f"{self.n} seeds]")


def mean_interval(values) -> Interval:
    """Mean and 95% t interval of per-seed values (None and non-finite values are dropped)."""
    xs = tuple(float(v) for v in values if v is not None and math.isfinite(float(v)))
    if not xs:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return Interval(mean, -math.inf, math.inf, 1, xs)
    half = t95(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return Interval(mean, mean - half, mean + half, len(xs), xs)


def paired_differences(a, b) -> Interval:
    """Interval of a - b seed by seed (the same seed's data order and initial weights on both sides)."""
    return mean_interval([x - y for x, y in zip(a, b) if x is not None and y is not None])


@dataclass(frozen=True)
class Judgement:
    """Where an interval sits against a threshold: True (claimed side), False (other side), None (straddles)."""
    supported: bool | None
    note: str  # for None: the budget that would resolve it; otherwise empty

    @property
    def resolved(self) -> bool:
        return self.supported is not None


def judge(interval: Interval, threshold: float, *, claim_below: bool) -> Judgement:
    """Is the claim "mean < threshold" (claim_below) or "mean > threshold" resolved by the interval?"""
    if interval.n == 0 or math.isnan(interval.mean):
        return Judgement(None, f"{NOT_RESOLVED}: nothing was measured")
    if interval.high < threshold:
        return Judgement(claim_below, "")
    if interval.low > threshold:
        return Judgement(not claim_below, "")
    return Judgement(None, f"{NOT_RESOLVED}: the interval [{interval.low:.3g}, {interval.high:.3g}] over "
                           f"{interval.n} seed(s) contains the threshold {threshold:.3g}; "
                           f"{seeds_to_resolve(interval, threshold)}")


def seeds_to_resolve(interval: Interval, threshold: float, limit: int = 1000) -> str:
    """How many seeds would put the threshold outside the interval, if the mean and the spread held."""
    gap = abs(interval.mean - threshold)
    if interval.n < 2:
        return "at least 3 seeds would give an interval"
    spread = interval.half_width * math.sqrt(interval.n) / t95(interval.n - 1)  # the standard deviation
    if gap == 0 or spread == 0:
        return "the mean sits on the threshold: more seeds alone would not resolve it"
    for n in range(interval.n + 1, limit + 1):
        if t95(n - 1) * spread / math.sqrt(n) < gap:
            return f"about {n} seeds would resolve it if the mean and spread held"
    return f"more than {limit} seeds: the difference is too small to resolve at this scale"
