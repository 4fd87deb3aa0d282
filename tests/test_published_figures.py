"""Every row of docs/estimator.md's published-figures table is a test: reproduced rows within their tolerance,
misses outside it and saying why, and the table in the doc is the one the script generates today."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "published_figures.py"


@functools.lru_cache(maxsize=None)
def _module():
    spec = importlib.util.spec_from_file_location("published_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def _rows() -> dict:
    return {r.key: r for r in _module().all_rows()}


ROW_KEYS = sorted(_rows())


@pytest.mark.parametrize("key", ROW_KEYS)
def test_row(key):
    row = _rows()[key]
    assert row.source and row.inputs and row.unit
    if row.expect == "reproduced":
        assert row.within, f"{row.figure}: {row.estimate} vs {row.published} ± {row.tolerance}"
    elif row.expect == "miss":
        assert not row.within and row.why, "a miss outside its tolerance says why (or is no longer a miss)"
    else:
        assert row.expect == "unchecked" and row.why


def test_the_table_covers_every_paper_the_issue_names():
    sources = " ".join(r.source for r in _rows().values())
    for paper in ("Rajbhandari", "Korthikanti", "Narayanan", "Chowdhery", "Brown", "Hoffmann", "Touvron", "Dubey",
                  "Liu et al. 2024", "Hu et al. 2021", "Dettmers"):
        assert paper in sources


def test_chinchilla_appendix_f_by_hand():
    """A Table A4 row's count is App. F's formula, term by term, without embeddings and logits."""
    s, layers, d, f, heads, kq = 2048, 10, 640, 2560, 10, 64
    attention = 2 * 3 * s * d * kq * heads + 2 * s * s * kq * heads + 3 * heads * s * s + 2 * s * s * kq * heads \
        + 2 * s * kq * heads * d
    forward = layers * (attention + 2 * s * (d * f + d * f))
    per_layer = 3 * d * d + 3 * d + d * d + 2 * d + d * d + d + d * f + f + f * d + d + 4 * d
    n = layers * per_layer + 2 * d + d * 32000  # nanoGPT's chinchilla_params: 73,825,280
    assert n == 73_825_280
    assert _rows()["chinchilla-a4-73m"].estimate == pytest.approx(3 * forward / (6 * n * s), rel=1e-12)


def test_docs_table_is_current():
    assert _module().main(["--check"]) == 0, "run benchmarks/published_figures.py to regenerate docs/estimator.md"
