"""Reliability, second pass: each class of defect a red-team pass found, with the test that would have caught it.

* Damaged or mismatched state never loads silently: checkpoint tensors are checked by shape and dtype, a resume
  keeps what `auto` chose, a logged run is never appended to without --resume, and every damaged run file is
  one line naming it (or a rebuildable cache that is rebuilt).
* No input gives a traceback or a hang: model configs, safetensors headers, nested JSON, FIFOs, signals during
  start-up, a batch that cannot fit, folder names that are not run names.
* Nothing outside the run is read or written: report images, the pickle that would really be loaded, links in
  place of any file tunegap writes, a full disk at the index write.
Every check runs the real command line (`tunegap.cli.main`) on a tiny real model and asserts: exit code, one
line naming the file or tensor, no traceback, and that the last good checkpoint still resumes.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tunegap import checkpoint as ckpt
from tunegap.cli import Interrupted, _quiet_when_swallowed, main
from tunegap.costs.hardware import measure_peaks
from tunegap.io import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
BASE = ["--model", "tiny", "--method", "lora", "--data", "support", "--seq-len", "256", "--batch-size", "4",
        "--max-steps", "4", "--checkpoint-every", "2", "--train-examples", "32", "--eval-examples", "8",
        "--generate-examples", "0", "--lr", "1e-3", "--precision", "fp32", "--threads", "1", "--no-progress"]


def finetune(runs: Path, *extra: str, name: str = "t") -> int:
    return main(["finetune", *BASE, "--runs-dir", str(runs), "--name", name, *extra])


def one_line(capsys, code: int, *needles: str, expect: int = 2) -> str:
    """The command failed with `expect` and said so on exactly one stderr line holding every needle."""
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == expect, err
    assert len(err) == 1 and "Traceback" not in err[0] and all(n in err[0] for n in needles), err
    return err[0]


def outside(tmp_path: Path, runs: Path) -> dict:
    """Every file under tmp_path outside the runs folder, with its bytes: nothing there may change."""
    return {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and runs not in p.parents}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished 4-step tiny LoRA run with checkpoints at steps 2 and 4 (copied by each test)."""
    runs = tmp_path_factory.mktemp("finished") / "runs"
    assert finetune(runs) == 0
    return runs


@pytest.fixture
def runs(tmp_path, finished, capsys):
    copy = tmp_path / "runs"
    shutil.copytree(finished, copy)
    capsys.readouterr()
    return copy


def steps_of(folder: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(folder / "metrics.jsonl") if "loss" in r]


# --------------------------------------------------------------------------- damaged or mismatched state

def _replace_tensor(file: Path, make) -> str:
    tensors = load_file(str(file))
    name = sorted(tensors)[0]
    tensors[name] = make(tensors[name])
    save_file(tensors, str(file))
    return name


@pytest.mark.parametrize("damage", [
    lambda t: t[0].clone(),                      # [8, 64] -> [64]: broadcasts silently into copy_
    lambda t: t[:, :1].clone(),                  # [8, 1]: broadcasts too
    lambda t: t.t().contiguous(),                # swapped shape
    lambda t: t.to(torch.float16),               # another dtype
], ids=["row-broadcasts", "column-broadcasts", "swapped", "dtype"])
def test_checkpoint_tensor_of_another_shape_or_dtype_is_refused_naming_it(runs, capsys, damage):
    newest = ckpt.list_checkpoints(runs / "t" / "checkpoints")[-1]
    name = _replace_tensor(newest / "trainable.safetensors", damage)
    before = outside(runs.parent, runs)
    one_line(capsys, finetune(runs, "--resume"), "trainable.safetensors", name)
    shutil.rmtree(newest)  # the last good checkpoint is still usable
    assert finetune(runs, "--resume") == 0 and steps_of(runs / "t") == [1, 2, 3, 4]
    assert outside(runs.parent, runs) == before


def test_optimizer_moment_of_another_shape_is_refused(runs, capsys):
    newest = ckpt.list_checkpoints(runs / "t" / "checkpoints")[-1]
    state = torch.load(newest / "state.pt", weights_only=True)
    moments = state["optimizer"]["state"][0]
    moments["exp_avg"] = moments["exp_avg"].flatten()[:3].clone()
    torch.save(state, newest / "state.pt")
    one_line(capsys, finetune(runs, "--resume"), "state.pt", "exp_avg")


def _stop_at(step: int):
    def on_step(current):
        if current == step:
            raise KeyboardInterrupt

    return on_step


def _peaks(monkeypatch, fp32: float, bf16: float) -> None:
    monkeypatch.setenv("TUNEGAP_PEAKS_FP32", str(fp32))
    monkeypatch.setenv("TUNEGAP_PEAKS_BF16", str(bf16))
    measure_peaks.cache_clear()


def test_resume_keeps_the_precision_auto_chose(tmp_path, monkeypatch):
    """auto chose fp32 on the first machine; the resumed segment runs where bf16 measures 10x faster, and
    must still train in fp32, as its ledger says."""
    from conftest import tiny_config
    from tunegap.trainer import train

    config = tiny_config(tmp_path, precision="auto", max_steps=4, checkpoint_every=2, seq_len=256)
    _peaks(monkeypatch, 1e11, 1e11)
    with pytest.raises(KeyboardInterrupt):
        from tunegap.trainer import Trainer

        Trainer(config).run(on_step=_stop_at(3))
    folder = tmp_path / "runs" / "t"
    progress = json.loads((folder / "checkpoints" / "step-000002" / "progress.json").read_text())
    assert progress["resolved"] == {"precision": "fp32", "device": "cpu"}
    _peaks(monkeypatch, 1e11, 1e12)  # this machine would now choose bf16
    from dataclasses import replace

    ledger = train(replace(config, resume=True))
    assert ledger["precision"] == "fp32" and ledger["costs"]["optimizer_steps"]["value"] == 4
    fresh = train(replace(config, name="fresh"))  # the other side: a new run does take bf16 here
    assert fresh["precision"] == "bf16"
    measure_peaks.cache_clear()


def test_resume_on_another_device_is_refused_with_one_line(runs, capsys):
    newest = ckpt.list_checkpoints(runs / "t" / "checkpoints")[-1]
    progress = json.loads((newest / "progress.json").read_text())
    progress["resolved"]["device"] = "cuda"
    (newest / "progress.json").write_text(json.dumps(progress))
    one_line(capsys, finetune(runs, "--resume"), "progress.json", "trained on cuda")


def test_rerun_after_a_kill_before_the_first_checkpoint_never_logs_a_step_twice(tmp_path, capsys):
    from conftest import tiny_config
    from tunegap.trainer import Trainer

    runs = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt):  # killed after step 2, before any checkpoint (none until the end)
        Trainer(tiny_config(tmp_path, max_steps=4, seq_len=256)).run(on_step=_stop_at(2))
    assert steps_of(runs / "t") == [1, 2] and not (runs / "t" / "checkpoints").exists()
    capsys.readouterr()
    code = main(["finetune", "--model", "tiny", "--data", "support", "--seq-len", "256", "--max-steps", "4",
                 "--batch-size", "4", "--train-examples", "32", "--eval-examples", "8", "--generate-examples", "0",
                 "--lr", "1e-3", "--precision", "fp32", "--threads", "1", "--no-progress", "--runs-dir", str(runs),
                 "--name", "t"])
    one_line(capsys, code, "run exists (2 logged steps, no checkpoint yet)", "--resume")
    assert steps_of(runs / "t") == [1, 2]
    from dataclasses import replace

    Trainer(replace(tiny_config(tmp_path, max_steps=4, seq_len=256), resume=True)).run()
    assert steps_of(runs / "t") == [1, 2, 3, 4]  # started again from step 0, each step once


def test_a_folder_where_setup_failed_is_started_afresh(tmp_path, capsys):
    """The other side of the rule: config.json alone (a setting refused before step 1) is not a run."""
    runs = tmp_path / "runs"
    one_line(capsys, finetune(runs, "--batch-size", "1000000000"), "--batch-size 1000000000", "GiB (estimate)")
    assert (runs / "t" / "config.json").is_file() and not (runs / "t" / "metrics.jsonl").exists()
    assert finetune(runs) == 0 and steps_of(runs / "t") == [1, 2, 3, 4]


@pytest.mark.parametrize("file, content, needle", [
    ("checkpoints/step-000004/progress.json", {"step": 4, "totals": {}, "config_hash": "x"}, "totals"),
    ("checkpoints/step-000004/progress.json", [], "expected an object"),
    ("checkpoints/step-000004/progress.json", '{"step": 4, "tot', "unreadable"),
    ("config.json", '{"model": "ti', "not a valid run config"),
    ("config.json", [], "expected a JSON object"),
    ("config.json", "[" * 100_000, "nested too deeply"),
])
def test_damaged_run_file_on_resume_is_one_line_naming_it(runs, capsys, file, content, needle):
    before = outside(runs.parent, runs)
    path = runs / "t" / file
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    one_line(capsys, finetune(runs, "--resume"), str(path.name), needle)
    assert outside(runs.parent, runs) == before


def test_metrics_rows_that_are_not_objects_are_dropped_as_damage(runs, capsys):
    with open(runs / "t" / "metrics.jsonl", "a") as f:
        f.write("5\nnull\n[1]\n\"x\"\n" + "[" * 5000 + "\n")
    assert finetune(runs, "--resume") == 0
    assert steps_of(runs / "t") == [1, 2, 3, 4]
    assert main(["report", str(runs)]) == 0


def test_truncated_ledger_read_by_generate_is_one_line(runs, capsys):
    ledger = runs / "t" / "ledger.json"
    ledger.write_text(ledger.read_text()[:100])
    one_line(capsys, main(["generate", "hi", "--run", "t", "--runs-dir", str(runs)]), "ledger.json",
             "not a valid run ledger")


def test_garbage_index_is_set_aside_and_rebuilt_and_the_run_indexed(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "index.sqlite").write_bytes(b"this is not a database" * 100)
    assert finetune(runs) == 0
    err = capsys.readouterr().err
    assert "damaged" in err and "rebuilt from the run folders" in err and "Traceback" not in err
    assert main(["runs", "--runs-dir", str(runs), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["status"]) for r in rows] == [("t", "completed")]
    assert list(runs.glob(".index.sqlite.damaged-*"))  # kept, not deleted


def test_runs_lists_interrupted_and_running_runs_and_rebuilds_its_index(runs, tmp_path, capsys):
    import fcntl

    from conftest import tiny_config
    from tunegap.trainer import Trainer

    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_config(tmp_path, name="killed", max_steps=4, seq_len=256)).run(on_step=_stop_at(1))
    shutil.copytree(runs / "killed", runs / "busy")
    lock = open(runs / "busy" / ".lock", "a")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a trainer holds it
    try:
        (runs / "index.sqlite").unlink()
        capsys.readouterr()
        assert main(["runs", "--runs-dir", str(runs)]) == 0
        table = capsys.readouterr().out.splitlines()
        status = {line.split()[0]: line.split()[1] for line in table[1:]}
        assert status == {"t": "completed", "killed": "interrupted", "busy": "running"}, table
        assert main(["runs", "--runs-dir", str(runs), "--rebuild"]) == 0
        assert "1 run(s)" in capsys.readouterr().out  # finished runs only: the others are read live
        con = sqlite3.connect(runs / "index.sqlite")
        assert [r[0] for r in con.execute("SELECT name FROM runs")] == ["t"]
        con.close()
    finally:
        lock.close()


def test_runs_into_a_closed_pipe_says_nothing(tmp_path):
    from tunegap.runs import index_run

    runs = tmp_path / "runs"
    for i in range(1500):  # more than a pipe buffer holds: the write must meet the closed pipe
        index_run(runs, {"run": f"r{i}", "status": "completed", "method": {"name": "lora"}, "config": {"model": "m"},
                         "metrics": {}, "costs": {k: {"value": i} for k in (
                             "tokens", "optimizer_steps", "params_trainable", "params_total", "flops_total",
                             "wall_time_s")}}, runs / f"r{i}" / "ledger.json")
    script = (f"{sys.executable} -m tunegap runs --runs-dir {runs} 2>{tmp_path / 'err'} | head -1; "
              "exit ${PIPESTATUS[0]}")
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.stdout.startswith("run ") and done.stdout.count("\n") == 1
    assert (tmp_path / "err").read_text() == "" and done.returncode in (0, 141)


# --------------------------------------------------------------------------- links and full disks

def test_a_link_in_place_of_the_index_or_its_journal_is_refused(runs, tmp_path, capsys):
    target = tmp_path / "elsewhere.db"
    for name in ("index.sqlite", "index.sqlite-wal"):
        for p in runs.glob("index.sqlite*"):
            p.unlink()
        (runs / name).symlink_to(target)
        one_line(capsys, main(["runs", "--runs-dir", str(runs), "--rebuild"]), name, "symbolic link")
        assert not target.exists()
        (runs / name).unlink()


def test_every_writer_refuses_a_link(tmp_path):
    from tunegap.io import SymlinkError, append_line, atomic_dir, atomic_write_text, write_figure

    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    for i, write in enumerate([lambda p: atomic_write_text(p, "x"), lambda p: append_line(p, "x"),
                               lambda p: atomic_dir(p).__enter__(), lambda p: write_figure(_figure(), p)]):
        link = tmp_path / f"link{i}"
        link.symlink_to(victim)
        with pytest.raises(SymlinkError, match="symbolic link"):
            write(link)
        assert victim.read_text() == "keep" and link.is_symlink()


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure()
    FigureCanvasAgg(fig)
    return fig


def test_full_disk_at_the_index_write_leaves_a_completed_listed_run(tmp_path, capsys, monkeypatch):
    from tunegap import runs as runs_module

    def full(con, row):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(runs_module, "_insert", full)
    runs = tmp_path / "runs"
    assert finetune(runs) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"tunegap: t: completed, but not indexed: {runs / 'index.sqlite'}: database or disk is full; the "
                   "run folders are whole, `tunegap runs --rebuild` restores the index"], err
    assert json.loads((runs / "t" / "ledger.json").read_text())["status"] == "completed"
    monkeypatch.undo()  # space freed
    assert main(["runs", "--runs-dir", str(runs), "--rebuild"]) == 0
    assert "1 run(s)" in capsys.readouterr().out


def _ledger_row(name: str, path_text: str = "") -> tuple[dict, str]:
    ledger = {"run": name, "status": "completed", "method": {"name": "lora"}, "config": {"model": "m"}, "metrics": {},
              "costs": {k: {"value": 1} for k in ("tokens", "optimizer_steps", "params_trainable", "params_total",
                                                   "flops_total", "wall_time_s")}}
    return ledger, path_text or f"{name}/ledger.json"


def test_a_real_write_failure_in_the_index_is_one_error_and_the_index_stays_whole(tmp_path):
    """Not a patched call: a forked writer whose file-size limit (RLIMIT_FSIZE) stops the index's WAL from
    growing gets real EFBIG errors inside SQLite, the way a full disk fails it."""
    import resource

    from tunegap.runs import RunIndexError, index_run, list_runs

    runs = tmp_path / "runs"
    index_run(runs, *_ledger_row("before"))
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            with open(tmp_path / "child.log", "w") as log:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(2) instead of a signal
                resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.RLIM_INFINITY))
                try:
                    index_run(runs, *_ledger_row("big", "x" * 200_000))  # 50 pages: past the limit
                    code = 0
                except RunIndexError as err:
                    log.write(str(err))
                    code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    message = (tmp_path / "child.log").read_text()
    assert os.WEXITSTATUS(status) == 3, message
    assert "index.sqlite" in message and "--rebuild" in message and "\n" not in message
    assert [r["name"] for r in list_runs(runs)] == ["before"]  # the transaction rolled back; the index is whole
    con = sqlite3.connect(runs / "index.sqlite")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()


# --------------------------------------------------------------------------- input that must not crash or hang

def _model_folder(folder: Path, **config_changes) -> Path:
    from tunegap.models import load_model

    model, tokenizer = load_model("tiny", seed=3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if config_changes:
        config = json.loads((folder / "config.json").read_text())
        config.update(config_changes)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("key, value, needle", [
    ("hidden_size", "64", "hidden_size: must be a positive integer"), ("num_hidden_layers", 1.5, "num_hidden_layers"),
    ("num_attention_heads", 0, "num_attention_heads"), ("vocab_size", -5, "vocab_size"),
    ("rms_norm_eps", "nan", "rms_norm_eps"), ("num_hidden_layers", True, "num_hidden_layers"),
    ("vocab_size", 10**15, "GiB of fp32 weights (formula)")])
def test_model_config_of_wrong_types_is_one_line_naming_file_and_key(tmp_path, capsys, key, value, needle):
    folder = _model_folder(tmp_path / "model", **{key: value})
    capsys.readouterr()  # save_pretrained's progress bar
    code = main(["finetune", "--model", str(folder), "--runs-dir", str(tmp_path / "runs"), "--no-progress",
                 "--max-steps", "1", "--threads", "1"])
    one_line(capsys, code, "config.json", needle)


def test_model_config_nested_too_deeply_is_one_line(tmp_path, capsys):
    folder = _model_folder(tmp_path / "model")
    capsys.readouterr()  # save_pretrained's progress bar
    (folder / "config.json").write_text("[" * 100_000)
    one_line(capsys, main(["generate", "hi", "--model", str(folder)]), "config.json", "nested too deeply")


def _damage_safetensors(file: Path, how: str) -> None:
    data = file.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    if how == "length-past-end":
        data = struct.pack("<Q", len(data) * 10) + data[8:]
    elif how == "huge-header":
        data = struct.pack("<Q", 2**62) + data[8:]
    elif how == "truncated-body":
        data = data[:-7]
    elif how == "offsets-past-end":
        name = next(k for k in header if k != "__metadata__")
        start, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [start, end + 4096]
        raw = json.dumps(header).encode()
        data = struct.pack("<Q", len(raw)) + raw + data[8 + size:]
    file.write_bytes(data)


DAMAGES = ["length-past-end", "huge-header", "truncated-body", "offsets-past-end"]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_safetensors_anywhere_is_one_line_naming_the_file(runs, tmp_path, capsys, how):
    folder = _model_folder(tmp_path / "model")
    capsys.readouterr()  # save_pretrained's progress bar
    _damage_safetensors(folder / "model.safetensors", how)
    one_line(capsys, main(["generate", "hi", "--model", str(folder)]), "model.safetensors")

    newest = ckpt.list_checkpoints(runs / "t" / "checkpoints")[-1]
    _damage_safetensors(newest / "trainable.safetensors", how)
    one_line(capsys, finetune(runs, "--resume"), "trainable.safetensors")

    _damage_safetensors(runs / "t" / "adapter" / "adapter_model.safetensors", how)
    before = outside(tmp_path, runs)
    one_line(capsys, main(["generate", "hi", "--run", "t", "--runs-dir", str(runs)]), "adapter_model.safetensors")
    assert outside(tmp_path, runs) == before
    shutil.rmtree(newest)  # the checkpoint before the damaged one still resumes
    assert finetune(runs, "--resume") == 0


def test_deeply_nested_json_on_a_data_line_is_one_line(tmp_path, capsys):
    data = tmp_path / "nested.jsonl"
    data.write_text("[" * 100_000 + "\n")
    code = main(["finetune", "--model", "tiny", "--data", str(data), "--runs-dir", str(tmp_path / "runs"),
                 "--no-progress", "--threads", "1"])
    one_line(capsys, code, "nested.jsonl", "nested too deeply")


def test_a_fifo_as_data_is_refused_not_waited_on(tmp_path, capsys):
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)

    def hung(signum, frame):
        raise AssertionError("blocked on the FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        for flag in ("--data", "--eval-data"):
            code = main(["finetune", "--model", "tiny", flag, str(fifo), "--runs-dir", str(tmp_path / "runs"),
                         "--no-progress", "--threads", "1", "--name", flag.strip("-")])
            one_line(capsys, code, "data.jsonl", "not a regular file")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _start(tmp_path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TUNEGAP_PEAKS_FP32": "1e11", "TUNEGAP_PEAKS_BF16": "1e11"}
    return subprocess.Popen([sys.executable, "-m", "tunegap", "finetune", *BASE, "--runs-dir", str(tmp_path / "runs"),
                             "--max-steps", "400", *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_until_torch_loads(proc: subprocess.Popen) -> None:
    """Until libtorch is in the process's memory map: tunegap's main() is running and importing torch, whatever
    the machine's load (a fixed delay could land in Python's own start-up, before any handler exists)."""
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if "libtorch" in maps.read_text():
                return
        except OSError:
            pass
        time.sleep(0.01)
    raise AssertionError("torch never loaded")


def test_a_stop_swallowed_by_a_finalizer_prints_nothing_but_other_errors_still_show():
    """Ctrl-C landing in a `__del__` is swallowed by CPython (the signal is sent again a second later): it must not
    print "Exception ignored in ..." over the one line, while a real error in a finalizer is still reported."""
    class RaisesOnDelete:
        def __init__(self, error):
            self.error = error

        def __del__(self):
            raise self.error

    reported, previous = [], sys.unraisablehook
    sys.unraisablehook = _quiet_when_swallowed(lambda unraisable: reported.append(type(unraisable.exc_value)))
    try:
        obj = RaisesOnDelete(Interrupted())
        del obj
        obj = RaisesOnDelete(ValueError("a bug"))
        del obj
    finally:
        sys.unraisablehook = previous
    assert reported == [ValueError]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see torch load")
def test_signals_during_start_up_and_training_exit_with_one_line(tmp_path):
    """Ctrl-C during start-up (imports, parser, model) is exit 130 with one line; SIGTERM mid-training is 143
    with "rerun with --resume", and the run then resumes."""
    seen = []
    for delay in (0.0, 1.5, 4.0):  # counted from torch's library being mapped: its import, the model, the data
        proc = _start(tmp_path, "--name", f"int{delay}")
        _wait_until_torch_loads(proc)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line
                 and not line.startswith(("  ", "W1", "Failed to load"))]  # torchao's import-time noise
        seen.append((delay, proc.returncode, lines))
        assert proc.returncode == 130 and len(lines) == 1 and "interrupted" in lines[0], (delay, err[-3000:])
    proc = _start(tmp_path, "--name", "term")
    for line in proc.stdout:  # the announce line: training has started
        if "steps planned" in line:
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    assert "tunegap: stopped (SIGTERM); rerun with --resume" in err


def test_a_batch_that_cannot_fit_is_refused_before_step_one(tmp_path, capsys):
    code = finetune(tmp_path / "runs", "--batch-size", "1000000000")
    one_line(capsys, code, "--batch-size 1000000000", "GiB (estimate)", "--grad-accum")
    assert not (tmp_path / "runs" / "t" / "metrics.jsonl").exists()


@pytest.mark.parametrize("folder_name", ["<img src=x onerror=alert(1)>", "two\nlines", "-rf", "..."])
def test_default_run_names_follow_the_name_rule(tmp_path, capsys, folder_name):
    from tunegap.runs import valid_run_name

    model = _model_folder(tmp_path / "models" / folder_name)
    capsys.readouterr()  # save_pretrained's progress bar
    runs = tmp_path / "runs"
    assert main(["finetune", "--model", str(model), "--runs-dir", str(runs), "--max-steps", "1", "--seq-len", "128",
                 "--train-examples", "8", "--eval-examples", "4", "--generate-examples", "0", "--threads", "1",
                 "--precision", "fp32", "--no-progress"]) == 0
    (folder,) = [p for p in runs.iterdir() if p.is_dir()]
    assert valid_run_name(folder.name) and "\n" not in folder.name
    capsys.readouterr()
    assert main(["runs", "--runs-dir", str(runs)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2  # header + one row, whatever the name


# --------------------------------------------------------------------------- nothing outside the run

def _section(folder: Path, images: list) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "section.json").write_text(json.dumps({"title": "s", "verdicts": [], "body_markdown": "", "images": images}))


@pytest.mark.parametrize("image", ["../../secret.txt", "/etc/hostname", "sub/x.png", "link.png", "", 5, None])
def test_report_never_inlines_a_file_outside_the_section(tmp_path, capsys, image):
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET")
    section = tmp_path / "results" / "a"
    _section(section, [image])
    (section / "sub").mkdir()
    (section / "sub" / "x.png").write_bytes(b"png")
    (section / "link.png").symlink_to(secret)
    one_line(capsys, main(["report", str(tmp_path / "results")]), "section.json")
    assert not (tmp_path / "results" / "report.html").exists()


def test_report_on_plain_runs_draws_each_loss_curve(runs, tmp_path, capsys):
    assert main(["report", str(runs)]) == 0
    page = (runs / "report.html").read_text()
    assert "Run t" in page and page.count("data:image/png;base64,") == 1
    (tmp_path / "empty").mkdir()
    one_line(capsys, main(["report", str(tmp_path / "empty")]), "empty", "nothing to report")


class Boom:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_decoy_safetensors_never_lets_the_real_pickle_through(runs, tmp_path, capsys):
    adapter = runs / "t" / "adapter"
    (adapter / "adapter_model.safetensors").rename(adapter / "decoy.safetensors")
    marker = tmp_path / "pwned"
    with open(adapter / "adapter_model.bin", "wb") as f:
        pickle.dump({"w": Boom(marker)}, f)
    one_line(capsys, main(["generate", "hi", "--run", "t", "--runs-dir", str(runs)]), "adapter_model.bin",
             "--allow-pickle")
    line = one_line(capsys, main(["generate", "hi", "--run", "t", "--runs-dir", str(runs), "--allow-pickle"]),
                    "adapter_model.bin", "refused")
    assert "weights_only=False" not in line and not marker.exists()


def test_allow_pickle_refusal_of_a_model_pickle_is_one_safe_line(tmp_path, capsys):
    folder = _model_folder(tmp_path / "model")
    capsys.readouterr()  # save_pretrained's progress bar
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": Boom(marker)}, f)
    line = one_line(capsys, main(["generate", "hi", "--model", str(folder), "--allow-pickle"]),
                    "pytorch_model.bin", "refused")
    assert "weights_only=False" not in line and not marker.exists()
