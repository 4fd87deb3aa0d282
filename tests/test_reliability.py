"""Reliability and safety, proved on real processes and tiny real models.

* Faults: SIGKILL at random points (mid-step, mid-checkpoint, mid-ledger, mid-index) then `--resume` gives
  bit-identical weights, optimizer state, ledger totals and metrics; non-finite loss/gradients and full disks
  stop the run cleanly with the last good checkpoint intact; the SQLite index survives parallel writers.
* Untrusted files: a planted malicious pickle never executes; remote code never runs; run names and
  symlinks cannot take a run outside its runs folder.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from tunegap import checkpoint as ckpt
from tunegap.runs import RunPathError, index_run, list_runs, run_folder
from tunegap.trainer import TrainingError, train

ROOT = Path(__file__).resolve().parent.parent


def _cfg(tmp_path, **overrides):
    """tiny_config on one thread: on a shared 2-core machine two OpenMP threads spin-wait for each other
    (measured: a 6-step tiny LoRA run took 15.4 s of CPU with 2 threads at load 10, 0.74 s with 1)."""
    return tiny_config(tmp_path, **{"threads": 1, **overrides})

# A tiny LoRA run with dropout (so the RNG must be restored too) and a checkpoint every 2 steps.
KILL_RUN = ["finetune", "--model", "tiny", "--method", "lora", "--dropout", "0.1", "--data", "support",
            "--train-examples", "32", "--eval-examples", "8", "--generate-examples", "0", "--seq-len", "128",
            "--batch-size", "4", "--max-steps", "36", "--checkpoint-every", "2", "--keep-checkpoints", "2",
            "--lr", "1e-2", "--precision", "fp32", "--threads", "1", "--no-progress", "--count-flops-every", "10"]
SAME_TOTALS = ("examples", "tokens", "loss_tokens", "padding_tokens", "optimizer_steps", "epochs", "params_total",
               "params_trainable", "optimizer_state_bytes", "flops_forward", "flops_backward", "flops_total",
               "flops_hardware", "flops_counted_sampled", "flops_formula_on_sampled_steps")


# --------------------------------------------------------------------------- process harness

def _fd_path(fd) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{int(fd)}")
    except (OSError, TypeError, ValueError):
        return "?"


def _arm_crash(target: str, at: int, after: bool, trace: Path) -> None:
    """In a child: SIGKILL this process at its `at`-th file-system write call (fsync, rename, delete,
    SQLite connect) on a path containing `target` ("" = any), just before or just after the call.
    No handler, `finally` or atexit runs after it: the state on disk is what a power cut would leave."""
    calls = [0]

    def hook(kind, real, describe):
        def wrapped(*args, **kwargs):
            path = describe(args)
            hit = False
            if target in path:
                calls[0] += 1
                hit = calls[0] == at
            if hit and not after:
                _die(trace, f"before {kind} {path}")
            result = real(*args, **kwargs)
            if hit and after:
                _die(trace, f"after {kind} {path}")
            return result
        return wrapped

    os.fsync = hook("fsync", os.fsync, lambda a: _fd_path(a[0]))
    os.replace = hook("rename", os.replace, lambda a: str(a[1]))
    shutil.rmtree = hook("delete", shutil.rmtree, lambda a: str(a[0]))
    sqlite3.connect = hook("sqlite", sqlite3.connect, lambda a: str(a[0]))


def _die(trace: Path, what: str) -> None:
    with open(trace, "a") as f:
        f.write(what + "\n")
    os.kill(os.getpid(), signal.SIGKILL)


def _fork_cli(argv: list[str], log: Path, crash: tuple | None = None) -> int:
    """Run `tunegap <argv>` in a forked child (the parent's imports are shared, so a start costs no import
    time); returns its pid. The child is a real process: SIGKILL ends it with nothing cleaned up."""
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)
        if crash:
            _arm_crash(*crash)
        from tunegap.cli import main

        code = main(argv)
    except BaseException:  # noqa: BLE001 - report anything, then leave without running pytest's cleanup
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code if isinstance(code, int) else 70)


# A start of the tiny run takes seconds. One still running after this long is stuck, not slow: a child forked
# from pytest's multithreaded process once sat on a futex forever (a lock some other thread held at fork).
HANG_S = 150.0
HUNG = "hung"


def _wait(pid: int, kill_after: float | None, *, hang_after: float | None = None) -> int | str | None:
    """Wait for the child; SIGKILL it after `kill_after` s (a test's timeout, or the fault being injected).
    Returns its exit code, None if killed at `kill_after`, or HUNG if it was still running after `hang_after` s
    (then SIGKILLed too)."""
    now = time.monotonic()
    deadline = None if kill_after is None else now + kill_after
    hang_deadline = None if hang_after is None else now + hang_after
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        now = time.monotonic()
        if (deadline is not None and now >= deadline) or (hang_deadline is not None and now >= hang_deadline):
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            if deadline is None or now < deadline:
                return HUNG
            break
        time.sleep(0.005)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return None
    return os.WEXITSTATUS(status)


def _run_to_the_end(argv: list[str], log: Path, folder: Path, *, fresh: bool) -> None:
    """One start that must complete; a stuck start (see HANG_S) is killed and run again, from scratch when
    `fresh` (the uninterrupted reference run) or resumed."""
    for _ in range(3):
        code = _wait(_fork_cli(argv, log), None, hang_after=HANG_S)
        if code != HUNG:
            assert code == 0, log.read_text()[-3000:]
            return
        if fresh:
            shutil.rmtree(folder, ignore_errors=True)
    raise AssertionError(f"{folder.name}: three starts in a row stuck for {HANG_S:.0f} s")


# --------------------------------------------------------------------------- invariants

def _same(a, b) -> bool:
    """Bit-identical: tensors by dtype, shape and every element; containers recursively."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _debris(folder: Path) -> list[str]:
    """Hidden temporaries a killed write left behind (the next start removes them)."""
    return [p.name for p in [*folder.glob(".*"), *(folder / "checkpoints").glob(".*")] if p.name != ".lock"]


def assert_whole(folder: Path) -> None:
    """Whatever a kill interrupted, every file a reader or a resume would use is complete."""
    from safetensors.torch import load_file

    for name in ("config.json", "ledger.json"):
        if (folder / name).exists():
            json.loads((folder / name).read_text())  # never half-written
    for step in ckpt.list_checkpoints(folder / "checkpoints"):
        load_file(str(step / "trainable.safetensors"))
        state = torch.load(step / "state.pt", weights_only=True)
        assert {"optimizer", "scheduler", "rng"} <= set(state)
        assert json.loads((step / "progress.json").read_text())["step"] == int(step.name[5:])
    if (folder / "adapter").exists():
        load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    lines = (folder / "metrics.jsonl").read_bytes().split(b"\n") if (folder / "metrics.jsonl").exists() else []
    for line in lines[:-1]:  # every complete line parses; only an unterminated last one may be torn
        json.loads(line)
    index = folder.parent / "index.sqlite"
    if index.exists():
        con = sqlite3.connect(index)
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.close()


def assert_same_run(a: Path, b: Path) -> dict:
    """Two finished runs are bit-identical in everything but timings: weights, optimizer, RNG, totals, log."""
    from safetensors.torch import load_file

    last = lambda run: ckpt.list_checkpoints(run / "checkpoints")[-1]  # noqa: E731
    assert last(a).name == last(b).name
    assert _same(load_file(str(last(a) / "trainable.safetensors")), load_file(str(last(b) / "trainable.safetensors")))
    sa, sb = (torch.load(last(r) / "state.pt", weights_only=True) for r in (a, b))
    assert _same(sa["optimizer"], sb["optimizer"]), "optimizer state differs"
    assert _same(sa["scheduler"], sb["scheduler"]) and _same(sa["rng"], sb["rng"])
    assert _same(load_file(str(a / "adapter" / "adapter_model.safetensors")),
                 load_file(str(b / "adapter" / "adapter_model.safetensors")))
    la, lb = (json.loads((r / "ledger.json").read_text()) for r in (a, b))
    assert la["status"] == lb["status"] == "completed"
    for key in SAME_TOTALS:
        assert la["costs"][key]["value"] == lb["costs"][key]["value"], key
    assert la["metrics"] == lb["metrics"]
    keys = ("step", "loss", "lr", "grad_norm", "tokens", "loss_tokens", "flops", "eval_loss", "final")
    rows = lambda r: [{k: row.get(k) for k in keys}  # noqa: E731
                      for row in map(json.loads, (r / "metrics.jsonl").read_text().splitlines())]
    assert rows(a) == rows(b), "metrics.jsonl differs"
    return lb


# --------------------------------------------------------------------------- SIGKILL fault injection

def test_sigkill_at_random_points_resumes_bit_identical(tmp_path):
    """>= 20 SIGKILLs, seeded: half at a random file-system write (inside a checkpoint, the ledger, the
    metrics log, the index), half at a random moment (mostly mid-step); each time the next start resumes.
    The finished run equals an uninterrupted one bit for bit."""
    from tunegap.costs.hardware import measure_peaks
    from tunegap.models import load_model

    measure_peaks()  # measured once here; every forked child inherits it (and the imports)
    load_model("tiny")
    runs = tmp_path / "runs"
    base = [*KILL_RUN, "--runs-dir", str(runs)]
    _run_to_the_end([*base, "--name", "straight"], tmp_path / "straight.log", runs / "straight", fresh=True)

    rng = random.Random(8)
    # What each start's SIGKILL aims at: a write call on a path containing that text ("" = any write), or a
    # random moment ("timer", mostly mid-step). Mid-training files first; the run's ending (final weights,
    # index) last, after which the remaining starts re-run an ending that is already done.
    schedule = ["metrics.jsonl", "timer", "checkpoints", "ledger.json", "timer", "config.json", "checkpoints",
                "timer", "metrics.jsonl", "ledger.json", "timer", "checkpoints", "", "timer", "ledger.json",
                "timer", "checkpoints", "timer", "adapter", "timer", "index.sqlite", "timer"]
    kills, starts, debris_seen, from_checkpoint, hung = [], 0, 0, 0, 0
    completed_in = None  # once a start outran its kill, the next ones only redo the ending: aim inside it
    trace = tmp_path / "kills.txt"
    while len(kills) < len(schedule):
        aim = schedule[len(kills)]
        starts += 1
        argv = [*base, "--name", "killed", *(["--resume"] if starts > 1 else [])]
        log = tmp_path / f"start-{starts:02d}.log"
        from_checkpoint += bool(ckpt.list_checkpoints(runs / "killed" / "checkpoints"))
        started = time.monotonic()
        if aim == "timer":
            window = 0.8 if completed_in is None else min(0.8, 0.9 * completed_in)
            code = _wait(_fork_cli(argv, log), rng.uniform(min(0.1, window / 2), window))
        else:  # the n-th matching call: a checkpoint makes ~8 (3 files, renames, deletes), a step 1 log line
            n = {"checkpoints": 10, "ledger.json": 4, "metrics.jsonl": 4}.get(aim, 2)
            crash = (aim, rng.randint(1, n), rng.random() < 0.5, trace)
            code = _wait(_fork_cli(argv, log, crash), None, hang_after=HANG_S)
        if code == HUNG:  # stuck (see HANG_S): killed at a random moment after all; the same aim is tried again
            hung += 1
            assert_whole(runs / "killed")
            assert hung <= 3, f"{hung} starts stuck for {HANG_S:.0f} s each"
            continue
        if code is None:
            kills.append(aim)
            debris_seen += bool(_debris(runs / "killed"))
            assert_whole(runs / "killed")
        else:  # the run outran its kill: it completed; the next start re-runs its ending and is killed there
            assert code == 0, log.read_text()[-3000:]
            completed_in = time.monotonic() - started
        assert starts < 3 * len(schedule), f"no progress across resumes: {len(kills)} kills ({kills})"
    starts += 1
    _run_to_the_end([*base, "--name", "killed", "--resume"], tmp_path / "last.log", runs / "killed", fresh=False)

    ledger = assert_same_run(runs / "straight", runs / "killed")
    assert not _debris(runs / "killed")
    assert any(e["event"] == "resumed" for e in ledger["events"])
    rows = {r["name"]: r for r in list_runs(runs)}
    assert rows["killed"]["status"] == "completed" and rows["killed"]["steps"] == 36
    at = trace.read_text().splitlines()
    where = {k: sum(k in line for line in at) for k in ("checkpoints", "ledger.json", "metrics.jsonl",
                                                        "config.json", "adapter", "index.sqlite")}
    print(f"\nreliability: {len(kills)} SIGKILLs survived ({len(at)} at a write call: {where}; "
          f"{kills.count('timer')} at a random moment), {debris_seen} left half-written temporaries behind, "
          f"{starts} starts, {from_checkpoint} of them resumed from a checkpoint, {hung} stuck and killed; "
          "final state bit-identical")
    assert len(kills) >= 20 and len(at) == len(schedule) - kills.count("timer") and from_checkpoint >= 15
    assert all(where[k] >= 1 for k in where), where


@pytest.mark.slow
def test_sigkill_cli_subprocesses_resume_bit_identical(tmp_path):
    """The same guarantee through `python -m tunegap` itself: 20 fresh interpreters SIGKILLed at random
    moments after start-up (peaks given by environment so 2 s of matmuls do not dominate each start)."""
    runs = tmp_path / "runs"
    env = {**os.environ, "TUNEGAP_PEAKS_FP32": "3e10", "TUNEGAP_PEAKS_BF16": "6e10", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, "-m", "tunegap", *KILL_RUN, "--runs-dir", str(runs)]
    subprocess.run([*base, "--name", "straight"], env=env, check=True, capture_output=True, cwd=ROOT)
    rng, kills, starts = random.Random(20), 0, 0
    while kills < 20:
        starts += 1
        proc = subprocess.Popen([*base, "--name", "killed", *(["--resume"] if starts > 1 else [])], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        proc.stdout.readline()  # the start-up line: imports are done, the run has begun
        time.sleep(rng.uniform(0.0, 2.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        proc.stdout.close()
        assert_whole(runs / "killed")
        assert starts < 80
    subprocess.run([*base, "--name", "killed", "--resume"], env=env, check=True, capture_output=True, cwd=ROOT)
    ledger = assert_same_run(runs / "straight", runs / "killed")
    assert ledger["peaks"]["how"] == "given" and ledger["costs"]["mfu"]["how"] == "estimate"
    print(f"\nreliability (subprocesses): {kills} SIGKILLs over {starts} starts; final state bit-identical")


def test_resaving_a_step_is_atomic_and_an_interrupted_resave_is_restored(tmp_path):
    """A finished run resumed again re-saves its last step; a kill between moving the old copy aside and
    renaming the new one in must not lose that step."""
    train(_cfg(tmp_path, max_steps=2, checkpoint_every=1, keep_checkpoints=1))
    checkpoints = tmp_path / "runs" / "t" / "checkpoints"
    step = ckpt.list_checkpoints(checkpoints)[-1]
    os.replace(step, checkpoints / f".{step.name}{ckpt.ASIDE}")  # the state such a kill leaves
    (checkpoints / ".step-000002.x1y2z3").mkdir()  # and a half-built staging folder
    assert ckpt.list_checkpoints(checkpoints) == []
    ckpt.clean_staging(checkpoints)
    assert ckpt.list_checkpoints(checkpoints) == [step] and not _debris(checkpoints.parent)
    ledger = train(_cfg(tmp_path, max_steps=2, checkpoint_every=1, keep_checkpoints=1, resume=True))
    assert ledger["status"] == "completed" and ledger["costs"]["optimizer_steps"]["value"] == 2


def test_metrics_log_after_a_kill_keeps_each_step_once(tmp_path):
    """Lines logged after the newest checkpoint (and a final-eval line) are dropped on resume, then redone."""
    common = dict(max_steps=6, checkpoint_every=2)
    train(_cfg(tmp_path, **common))
    metrics = tmp_path / "runs" / "t" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 7, "loss": 1.0}\n{"step": 3, "lo')  # a later step and a line torn by the kill
    train(_cfg(tmp_path, resume=True, **common))
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert sum(bool(r.get("final")) for r in rows) == 1


# --------------------------------------------------------------------------- NaN, inf, full disk

class _InfGrad(torch.autograd.Function):
    """Identity forward, infinite backward: a finite loss whose gradient overflows."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def _fault_at_step(monkeypatch, step: int, fault) -> None:
    """Apply `fault` to the summed loss of optimizer step `step` (one micro-batch per step here); the
    model, data and loop are the real ones."""
    import tunegap.objectives.next_token as train_module

    real, calls = train_module.sum_loss, [0]

    def sum_loss(ctx, batch):
        loss = real(ctx, batch)
        calls[0] += 1
        return fault(loss) if calls[0] == step else loss

    monkeypatch.setattr(train_module, "sum_loss", sum_loss)


def test_nan_loss_stops_with_last_good_checkpoint_and_ledger_event(tmp_path, monkeypatch):
    _fault_at_step(monkeypatch, 4, lambda loss: loss * float("nan"))
    with pytest.raises(TrainingError, match=r"loss became nan at step 4.*last good checkpoint"):
        train(_cfg(tmp_path, max_steps=8, checkpoint_every=2))
    folder = tmp_path / "runs" / "t"
    assert [p.name for p in ckpt.list_checkpoints(folder / "checkpoints")] == ["step-000002"]
    assert_whole(folder)
    ledger = json.loads((folder / "ledger.json").read_text())
    assert ledger["status"] == "failed: non-finite loss"
    assert any(e["event"] == "non-finite loss" and e["step"] == 4 for e in ledger["events"])
    monkeypatch.undo()  # the fault was a one-off: resuming from the good checkpoint finishes the run
    assert train(_cfg(tmp_path, max_steps=8, checkpoint_every=2, resume=True))["status"] == "completed"


def test_infinite_gradient_with_finite_loss_is_never_applied(tmp_path, monkeypatch):
    """Overflow in backward under a finite loss would put NaN weights into the next checkpoint; the run
    must stop before the update instead."""
    _fault_at_step(monkeypatch, 3, _InfGrad.apply)
    with pytest.raises(TrainingError, match=r"gradient norm became (inf|nan) at step 3.*before the update"):
        train(_cfg(tmp_path, max_steps=8, checkpoint_every=2))
    folder = tmp_path / "runs" / "t"
    ledger = json.loads((folder / "ledger.json").read_text())
    assert ledger["status"] == "failed: non-finite gradient"
    assert [p.name for p in ckpt.list_checkpoints(folder / "checkpoints")] == ["step-000002"]
    from safetensors.torch import load_file

    weights = load_file(str(folder / "checkpoints" / "step-000002" / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_disk_full_during_a_checkpoint_fails_cleanly_and_resume_matches(tmp_path, monkeypatch, capsys):
    """ENOSPC while writing step 4's optimizer state: the run stops with one clear line and a ledger event,
    step 2 stays whole, no temporary is left; after space is freed, --resume ends where a clean run ends."""
    common = dict(max_steps=6, checkpoint_every=2, method="lora", dropout=0.1)
    train(_cfg(tmp_path, name="clean", **common))
    real_save, calls = torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:  # the first checkpoint fits, the second does not
            Path(f).write_bytes(b"PK\x03\x04 partial")  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(TrainingError) as err:
        train(_cfg(tmp_path, name="full", **common))
    message = str(err.value)
    assert "\n" not in message
    assert "could not write checkpoint step-000004: [Errno 28] No space left on device" in message
    assert "step-000002 is intact" in message and "--resume" in message
    folder = tmp_path / "runs" / "full"
    assert [p.name for p in ckpt.list_checkpoints(folder / "checkpoints")] == ["step-000002"]
    assert not _debris(folder)
    assert_whole(folder)
    ledger = json.loads((folder / "ledger.json").read_text())
    assert ledger["status"] == "failed: write error"
    assert ledger["events"][-1]["event"] == "write failed" and "No space" in ledger["events"][-1]["error"]
    monkeypatch.setattr(torch, "save", real_save)  # space freed
    train(_cfg(tmp_path, name="full", resume=True, **common))
    assert_same_run(tmp_path / "runs" / "clean", folder)


def test_real_write_failure_from_the_kernel_keeps_the_last_checkpoint(tmp_path):
    """Not a patched write: a forked run whose file-size limit (RLIMIT_FSIZE) drops after step 2 gets real
    EFBIG errors from write(2) in the middle of its next checkpoint, the way a full disk fails a write."""
    import resource

    # threads=1: a forked child must not use an OpenMP pool the parent had started (libgomp is not fork-safe)
    config = _cfg(tmp_path, max_steps=6, checkpoint_every=2, method="full", threads=1)
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            log = open(tmp_path / "child.log", "w")
            sys.stdout = sys.stderr = log
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write(2) instead of a signal

            def shrink(step):
                if step == 3:  # files above 4 KiB can no longer grow: state.pt (~800 KiB) cannot be written
                    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))

            try:
                train(config, on_step=shrink)
                code = 0
            except TrainingError as err:
                print(f"TrainingError: {err}")
                code = 3
        finally:
            sys.stdout.flush()
            os._exit(code)
    code = _wait(pid, 300)
    out = (tmp_path / "child.log").read_text()
    assert code == 3, out
    assert "could not write checkpoint step-000004" in out and "step-000002 is intact" in out, out
    folder = tmp_path / "runs" / "t"
    assert [p.name for p in ckpt.list_checkpoints(folder / "checkpoints")] == ["step-000002"]
    assert not _debris(folder)
    assert_whole(folder)


# --------------------------------------------------------------------------- run index under concurrency

def _index_writer(runs: str, worker: int, n: int, barrier) -> None:
    barrier.wait()
    for i in range(n):
        ledger = {"run": f"w{worker}-r{i}", "status": "completed", "method": {"name": "lora"},
                  "config": {"model": "tiny"}, "metrics": {"eval_loss": float(i)},
                  "costs": {k: {"value": worker * 1000 + i} for k in ("tokens", "optimizer_steps", "params_trainable",
                                                                      "params_total", "flops_total", "wall_time_s")}}
        index_run(runs, ledger, Path(runs) / ledger["run"] / "ledger.json")
        if i % 5 == 0:
            list_runs(runs)  # readers interleave with writers


def test_run_index_survives_parallel_writer_processes(tmp_path):
    """6 processes x 25 rows into one new index at once (creating it races too): no error, no lost row."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    runs = tmp_path / "runs"
    barrier = ctx.Barrier(6)
    procs = [ctx.Process(target=_index_writer, args=(str(runs), w, 25, barrier)) for w in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 6
    rows = list_runs(runs)
    assert len(rows) == 150 and {r["name"] for r in rows} == {f"w{w}-r{i}" for w in range(6) for i in range(25)}
    con = sqlite3.connect(runs / "index.sqlite")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()


def test_run_index_queries_are_parameterised(tmp_path):
    hostile = "x'); DROP TABLE runs; --"
    ledger = {"run": hostile, "status": "completed", "method": {"name": "lora"}, "config": {"model": "m"},
              "metrics": {}, "costs": {k: {"value": 1} for k in ("tokens", "optimizer_steps", "params_trainable",
                                                                  "params_total", "flops_total", "wall_time_s")}}
    index_run(tmp_path, ledger, tmp_path / "l.json")
    index_run(tmp_path, {**ledger, "run": "plain"}, tmp_path / "l.json")
    assert {r["name"] for r in list_runs(tmp_path)} == {hostile, "plain"}


# --------------------------------------------------------------------------- untrusted files

class Boom:
    """A pickle payload: unpickling it calls os.system, which would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_pickle(path: Path, marker: Path) -> None:
    import pickle

    with open(path, "wb") as f:
        pickle.dump({"optimizer": Boom(marker)}, f)


def test_planted_pickle_checkpoint_is_refused_and_never_executed(tmp_path, capsys):
    from tunegap.cli import main

    marker = tmp_path / "pwned"
    train(_cfg(tmp_path, max_steps=2, checkpoint_every=1))
    step = ckpt.list_checkpoints(tmp_path / "runs" / "t" / "checkpoints")[-1]
    _plant_pickle(step / "state.pt", marker)
    # the planted pickle sanity-checks itself: a plain unpickler *would* run it
    import pickle

    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Boom(probe)))
    assert probe.exists()

    argv = ["finetune", "--model", "tiny", "--data", "support", "--train-examples", "32", "--eval-examples", "8",
            "--generate-examples", "0", "--seq-len", "512", "--batch-size", "4", "--max-steps", "2",
            "--checkpoint-every", "1", "--lr", "1e-3", "--precision", "fp32", "--no-progress", "--threads", "1",
            "--runs-dir", str(tmp_path / "runs"), "--name", "t", "--resume"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tunegap: error: ") and "state.pt: refused to load" in err[0], err
    assert not marker.exists()


def _save_tiny_folder(folder: Path, safe: bool) -> None:
    """A tiny model folder with safetensors weights, or with the same weights as a pickled
    pytorch_model.bin (what older checkpoints and many shared folders hold)."""
    from tunegap.models import load_model

    model, tokenizer = load_model("tiny", seed=3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if not safe:
        for f in folder.glob("*.safetensors"):
            f.unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")


def test_pickled_model_weights_refused_unless_allowed_and_then_tensors_only(tmp_path):
    from tunegap.models import load_model
    from tunegap.safety import UnsafeFileError

    folder = tmp_path / "bin-model"
    _save_tiny_folder(folder, safe=False)
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))
    with pytest.raises(UnsafeFileError, match="pickled.*arbitrary code.*--allow-pickle"):
        load_model(str(folder))
    model, _ = load_model(str(folder), allow_pickle=True)  # explicit opt-in: tensors load
    reference, _ = load_model("tiny", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))

    marker = tmp_path / "pwned"
    _plant_pickle(folder / "pytorch_model.bin", marker)
    with pytest.raises(Exception):  # even with the flag, only tensors: the restricted unpickler refuses it
        load_model(str(folder), allow_pickle=True)
    assert not marker.exists()


def test_malicious_bin_beside_safetensors_is_never_read(tmp_path):
    from tunegap.models import load_model

    folder = tmp_path / "model"
    _save_tiny_folder(folder, safe=True)
    marker = tmp_path / "pwned"
    _plant_pickle(folder / "pytorch_model.bin", marker)
    load_model(str(folder))
    assert not marker.exists()


def test_remote_code_in_a_model_folder_never_runs_without_the_flag(tmp_path):
    """config.json's auto_map names Python code shipped in the folder; it must not be imported unless
    --trust-remote-code, whether the weights are loaded or only the architecture (init=scratch)."""
    from tunegap.models import ModelError, load_model

    folder = tmp_path / "model"
    _save_tiny_folder(folder, safe=True)
    marker = tmp_path / "pwned"
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                    "from transformers import LlamaConfig as EvilConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    for init in ("pretrained", "scratch"):
        try:
            load_model(str(folder), init=init)
        except ModelError as err:  # refusing is fine too, as one line
            assert "\n" not in str(err)
        assert not marker.exists()


def test_eval_refuses_a_pickled_adapter(tmp_path, capsys):
    from tunegap.cli import main

    train(_cfg(tmp_path, max_steps=1))
    adapter = tmp_path / "runs" / "t" / "adapter"
    (adapter / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    _plant_pickle(adapter / "adapter_model.bin", marker)
    capsys.readouterr()
    assert main(["generate", "hi", "--run", "t", "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "adapter weights are pickled" in err[0], err
    assert not marker.exists()


ESCAPES = ["..", "../escape", "/tmp/abs", "a/b", ".hidden", "a\\b"]


@pytest.mark.parametrize("name", [*ESCAPES, "x" * 200, "-rf", "a b"])
def test_run_names_cannot_escape_the_runs_folder(tmp_path, capsys, name):
    from tunegap.cli import main

    capsys.readouterr()
    code = main(["finetune", "--model", "tiny", "--runs-dir", str(tmp_path / "runs"), f"--name={name}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("tunegap: error: "), err
    assert not (tmp_path / "escape").exists() and not (tmp_path / "runs").exists()
    if name in ESCAPES:  # the index and `eval --run` go through run_folder, which refuses them too
        with pytest.raises(RunPathError):
            run_folder(tmp_path / "runs", name)


def test_symlinks_cannot_redirect_a_run(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "linked").symlink_to(outside)
    with pytest.raises(RunPathError, match="symbolic link"):
        train(_cfg(tmp_path, name="linked", max_steps=1))
    real = runs / "planted"
    real.mkdir()
    (real / "metrics.jsonl").symlink_to(outside / "victim.txt")  # an append would write outside
    with pytest.raises(RunPathError, match="symbolic link"):
        train(_cfg(tmp_path, name="planted", max_steps=1, resume=True))
    (real / "metrics.jsonl").unlink()
    (real / "checkpoints").mkdir()
    (real / "checkpoints" / "step-000001").symlink_to(outside)
    with pytest.raises(RunPathError, match="symbolic link"):
        train(_cfg(tmp_path, name="planted", max_steps=1, resume=True))
    assert list(outside.iterdir()) == []


# --------------------------------------------------------------------------- numeric guards

@pytest.mark.parametrize("flags, message", [
    (["--rank", "0"], "--rank: must be positive"),
    (["--rank", "65"], "--rank 65 exceeds the smallest target matrix dimension"),
    (["--targets", ","], "--targets is empty"),
    (["--lr", "0"], "--lr: must be positive"),
    (["--lr", "-0.001"], "--lr: must be positive"),
    (["--lr", "inf"], "--lr: must be a finite number"),
    (["--epochs", "0", "--max-steps", "0"], "--epochs: must be positive"),
    (["--max-steps", "-1"], "--max-steps: must be >= 0"),
    (["--budget-tokens", "10"], "--budget-tokens 10 is less than one optimizer step"),
    (["--batch-size", "0"], "--batch-size: must be positive"),
    (["--seq-len", "4096"], "exceeds the model's context of 2048"),
    (["--freeze-layers", "3", "--method", "freeze"], "--freeze-layers must be in 1..2"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints: must be at least 1"),
])
def test_numeric_guards_fail_before_any_training(tmp_path, capsys, flags, message):
    from tunegap.cli import main

    capsys.readouterr()
    code = main(["finetune", "--model", "tiny", "--data", "support", "--train-examples", "16", "--no-progress",
                 "--generate-examples", "0", "--precision", "fp32", "--runs-dir", str(tmp_path / "runs"),
                 "--threads", "1", "--name", "g", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("tunegap: error: ") and message in err[0], err
    folder = tmp_path / "runs" / "g"
    assert not (folder / "metrics.jsonl").exists() and not (folder / "checkpoints").exists()


def test_a_run_cannot_be_trained_by_two_processes_at_once(tmp_path):
    """flock: a second start of a run that is still training is refused; a killed holder frees it at once."""
    import fcntl

    train(_cfg(tmp_path, max_steps=2))
    lock = open(tmp_path / "runs" / "t" / ".lock", "a")  # another open file description = another holder
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(TrainingError, match="another process is training this run"):
        train(_cfg(tmp_path, max_steps=2, resume=True))
    lock.close()
    assert train(_cfg(tmp_path, max_steps=2, resume=True))["costs"]["optimizer_steps"]["value"] == 2
