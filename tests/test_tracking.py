"""`--log tensorboard|mlflow`: the metrics of metrics.jsonl in the tracker users already look at."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import tiny_config
from tunegap.callbacks.tracking import check_installed
from tunegap.cli import main
from tunegap.errors import ConfigError
from tunegap.trainer import train

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install 'tunegap[log]')")
def test_tensorboard_event_files_hold_the_metrics_jsonl_values(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny_config(tmp_path, log="tensorboard", max_steps=3, eval_every=2))
    folder = tmp_path / "runs" / "t"
    events = list((folder / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    logged = EventAccumulator(str(folder / "tensorboard")).Reload()
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in logged.Scalars("loss")] == losses
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]  # step 2 and the final one
    assert len(evals) >= 2 and [(e.step, pytest.approx(e.value, rel=1e-6)) for e in logged.Scalars("eval_loss")] == evals


def test_no_tracker_writes_no_tracker_files(tmp_path):
    train(tiny_config(tmp_path, max_steps=1))
    assert not (tmp_path / "runs" / "t" / "tensorboard").exists()


def test_a_missing_tracker_names_the_extra_to_install(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("mlflow", "tensorboard")
                        else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'tunegap\[log\]'"):
        check_installed("tensorboard")
    assert main(["finetune", "--model", "tiny", "--max-steps", "1", "--log", "mlflow",
                 "--runs-dir", str(tmp_path / "runs"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "tunegap: error: --log mlflow: the mlflow package is not installed: " \
                          "pip install 'tunegap[mlflow]'"
    assert not (tmp_path / "runs").exists()  # refused before any run folder was made
