"""The training loop on torch.distributed: 2 CPU processes with gloo, launched by the real torchrun.

Each 2-process test pays for one or two torchrun launches (a few seconds of imports per process on this
2-core machine), so each launch trains several tiny configurations at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import asdict, fields

import pytest
from safetensors.torch import load_file

from conftest import tiny_config
from tunegap.config import ConfigError, TrainConfig
from tunegap.strategies import CommClock, SingleDevice, Torchrun, start, torchrun_command, without_option
from tunegap.trainer import TrainingError, train

# one script, run by every rank: train each config in turn; in the run named `kill`, rank 1 kills itself
WORKER = textwrap.dedent("""
    import json, os, signal, sys
    from tunegap.config import TrainConfig
    from tunegap.trainer import train

    job = json.loads(open(sys.argv[1]).read())
    for values in job["configs"]:
        def kill(step, name=values["name"]):
            if name == job["kill"] and step == job["kill_at"] and os.environ["RANK"] == "1":
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no message: a lost machine
        train(TrainConfig(**values), on_step=kill)
""")


def _env():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    # the loop measures matmul peaks for MFU (about 2 s per start); supplied peaks are labelled "given"
    env.setdefault("TUNEGAP_PEAKS_FP32", "3e10")
    env.setdefault("TUNEGAP_PEAKS_BF16", "3e10")
    return env


def _torchrun(tmp_path, configs, *, kill=None, kill_at=None, timeout=120):
    job = tmp_path / f"job-{len(list(tmp_path.glob('job-*')))}.json"
    job.write_text(json.dumps({"configs": [asdict(c) for c in configs], "kill": kill, "kill_at": kill_at}))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "--max-restarts=0", str(script), str(job)]
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def _cli_flags(config: TrainConfig) -> list[str]:
    """The `tunegap finetune` flags that reproduce `config` (fields that differ from the defaults)."""
    flags = []
    for f in fields(TrainConfig):
        value = getattr(config, f.name)
        if value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + f.name.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


def _losses(folder):
    return [r["loss"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _weights(folder):
    """The exported trained tensors: PEFT adapter, bottleneck adapter or full model safetensors."""
    for rel in ("adapter/adapter_model.safetensors", "bottleneck_adapter.safetensors", "model/model.safetensors"):
        if (folder / rel).is_file():
            return load_file(str(folder / rel))
    raise AssertionError(f"{folder}: no exported weights")


def _assert_same_training(single, multi, *, atol=1e-5):
    a, b = _losses(single), _losses(multi)
    assert len(a) == len(b) and a == pytest.approx(b, rel=1e-5), (a, b)
    wa, wb = _weights(single), _weights(multi)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < atol, worst


# --- no processes launched --------------------------------------------------------------------------------

def test_nproc_is_stripped_for_torchrun_which_would_read_it_as_its_own_flag():
    argv = ["finetune", "--nproc", "2", "--lr", "1e-3", "--nproc=4", "--nproc-x", "1"]
    assert without_option(argv, "--nproc") == ["finetune", "--lr", "1e-3", "--nproc-x", "1"]
    command = torchrun_command(2, ["finetune", "--lr", "1e-3"], python="py")
    assert command[:3] == ["py", "-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in command and command[-4:] == ["tunegap", "finetune", "--lr", "1e-3"]


def test_communication_clock_counts_overlapping_collectives_once():
    clock = CommClock()
    for span in [(0.0, 1.0), (0.5, 1.5), (3.0, 4.0), (3.2, 3.4)]:
        clock.record(*span)
    assert clock.fold() == pytest.approx(2.5)  # [0, 1.5] and [3, 4]
    clock.record(5.0, 5.25)
    assert clock.fold() == pytest.approx(2.75)
    assert clock.calls == 5


def test_single_process_parallel_changes_nothing():
    par = SingleDevice()
    assert not par.enabled and par.is_main
    assert par.shard([3, 1, 2]) == [3, 1, 2] and par.total((4, 2.5)) == (4, 2.5) and par.gather(7) == [7]
    ledger = {"costs": {}}
    assert par.annotate(ledger) is ledger and ledger == {"costs": {}}


def test_global_batch_is_split_between_ranks_or_refused():
    par = Torchrun(mode="ddp", rank=1, world_size=2)
    assert par.shard([10, 11, 12, 13]) == [12, 13]
    with pytest.raises(ConfigError, match="--batch-size 5: is the global micro-batch"):
        par.check_batch(5)


def test_nproc_without_a_launcher_is_one_clear_error(tmp_path, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match="--nproc 2: needs a launcher"):
        start(tiny_config(tmp_path, nproc=2))


# --- two processes ------------------------------------------------------------------------------------------

COMMON = dict(max_steps=2, batch_size=4, seq_len=256, train_examples=16, eval_examples=4, freeze_layers=1,
              virtual_tokens=4)
KILLED = dict(method="full", parallel="fsdp", max_steps=4, checkpoint_every=2, seq_len=256, train_examples=16,
              eval_examples=4)
FAST_CASES = [("full", "ddp", dict(grad_accum=2)), ("lora", "fsdp", dict(grad_accum=2))]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One torchrun launch for the fast tests: DDP and FSDP runs to compare with one process, then a run
    whose rank 1 is SIGKILLed at step 3 (so the job fails, as a lost machine makes it fail)."""
    tmp = tmp_path_factory.mktemp("two-process")
    configs = [tiny_config(tmp, name=f"{m}-{p}-2", method=m, parallel=p, **COMMON, **kw) for m, p, kw in FAST_CASES]
    configs.append(tiny_config(tmp, name="killed", **KILLED))
    return tmp, configs, _torchrun(tmp, configs, kill="killed", kill_at=3, timeout=150)


def _check_matches_one_process(tmp, cases, configs):
    runs = tmp / "runs"
    for (method, parallel, kw), config in zip(cases, configs):
        train(tiny_config(tmp, name=f"{method}-{parallel}-1", method=method, **COMMON, **kw))
        single, two = runs / f"{method}-{parallel}-1", runs / config.name
        _assert_same_training(single, two)
        one = json.loads((single / "ledger.json").read_text())
        ledger = json.loads((two / "ledger.json").read_text())
        assert ledger["status"] == "completed" and ledger["config"]["nproc"] == 2
        costs = ledger["costs"]
        # tokens and examples summed over ranks: exactly one process's count
        for key in ("tokens", "loss_tokens", "examples", "optimizer_steps"):
            assert costs[key]["value"] == one["costs"][key]["value"], key
        # FLOPs summed over ranks: the formula still matches FlopCounterMode's count on both ranks
        assert costs["flops_counted_over_formula"]["value"] == pytest.approx(
            one["costs"]["flops_counted_over_formula"]["value"], rel=0.01)
        dist = ledger["distributed"]
        assert dist["mode"] == parallel and dist["world_size"] == 2 and dist["batch_size_per_rank"] == 2
        assert len(dist["peak_memory_bytes_per_rank"]) == 2 and min(dist["peak_memory_bytes_per_rank"]) > 0
        assert costs["peak_memory_bytes"]["value"] == max(dist["peak_memory_bytes_per_rank"])
        assert costs["communication_time_s"]["value"] > 0 and costs["devices"]["value"] == 2
        # only rank 0 wrote: one metrics line per step (plus the final evaluation)
        assert len((two / "metrics.jsonl").read_text().splitlines()) == COMMON["max_steps"] + 1
        if parallel == "fsdp":  # each rank holds half the model states (up to uneven shards)
            states = dist["model_state_bytes_per_rank"]
            assert states[0] == pytest.approx(states[1], rel=0.1)
        newest = sorted((two / "checkpoints").glob("step-*"))[-1]
        assert (newest / ".metadata").is_file() and (newest / "progress.json").is_file()


def test_ddp_and_fsdp_with_global_batch_b_match_one_process_with_batch_b(job):
    tmp, configs, done = job
    assert "SIGKILL" in done.stderr, done.stderr[-3000:]  # the job's last run is killed on purpose
    _check_matches_one_process(tmp, FAST_CASES, configs)


@pytest.mark.slow
def test_every_method_under_ddp_and_fsdp_matches_one_process(tmp_path):
    cases = [("full", "fsdp", dict(model="tiny-untied", clip=0.0)), ("freeze", "ddp", {}), ("ia3", "fsdp", {}),
             ("prompt", "ddp", {}), ("prefix", "fsdp", {}), ("adapter", "ddp", {}), ("lora", "ddp", {}),
             ("adapter", "fsdp", dict(activation_checkpointing=True))]
    configs = [tiny_config(tmp_path, name=f"{m}-{p}-2", method=m, parallel=p, **COMMON, **kw) for m, p, kw in cases]
    done = _torchrun(tmp_path, configs, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_matches_one_process(tmp_path, cases, configs)


def test_fsdp_killed_rank_fails_cleanly_and_resume_completes(job):
    tmp, _, done = job
    assert done.returncode != 0
    assert "SIGKILL" in done.stderr  # torchrun names the lost rank and stops the other
    folder = tmp / "runs" / "killed"
    assert json.loads((folder / "ledger.json").read_text())["status"] == "running"
    assert [p.name for p in (folder / "checkpoints").iterdir()] == ["step-000002"]  # complete ones only
    assert not (folder / "model").exists()

    # a different number of processes is a different run: refused before any work
    with pytest.raises(TrainingError, match="changed settings \\['nproc'\\]"):
        train(tiny_config(tmp, name="killed", resume=True, **KILLED))

    # resume through the command line: `tunegap finetune --nproc 2` re-runs itself under torchrun
    flags = _cli_flags(tiny_config(tmp, name="killed", resume=True, **KILLED))
    resumed = subprocess.run([sys.executable, "-m", "tunegap", "finetune", *flags, "--nproc", "2"], env=_env(),
                             capture_output=True, text=True, timeout=120, cwd=tmp)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "communication_time_s" in resumed.stdout  # rank 0 printed the ledger, once
    assert resumed.stdout.count("[completed]") == 1
    ledger = json.loads((folder / "ledger.json").read_text())
    assert ledger["status"] == "completed" and ledger["costs"]["optimizer_steps"]["value"] == 4
    assert [e["event"] for e in ledger["events"]] == ["resumed"]
    assert [r["step"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())] == \
        [1, 2, 3, 4, 4]

    train(tiny_config(tmp, name="straight", **KILLED))  # one process, never interrupted
    _assert_same_training(tmp / "runs" / "straight", folder)
