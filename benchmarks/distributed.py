"""The same fine-tune on 1 process and on 2 (DDP, FSDP2) under torchrun with gloo on this CPU, beside the
estimator's prediction for N GPUs and its per-device memory for the same sharding stage.

Each configuration runs through the real command line (`tunegap finetune --nproc N --parallel ...`), so the
figures come from the runs' own ledgers: tokens/s of the fastest steady step (step 1 and the steps
FlopCounterMode counted are left out, being slower for reasons that are not communication; the fastest,
because on a shared machine other processes only ever slow a step down), the time with a collective in flight
(measured on every collective, `tunegap.distributed.CommClock`), and every rank's peak memory.

The estimator's memory per device (`tunegap.costs.memory`, the CPU device with the measured Python + torch
baseline as its runtime overhead) is predicted for each run's own setting: ZeRO-0 for one process and for DDP
(every rank holds everything), ZeRO-3 for FSDP (weights, gradients and optimizer state sharded), at the
run's micro-batch per rank. The error is (predicted - measured) / measured of the largest rank's peak.

    .venv/bin/python benchmarks/distributed.py                      # smollm2-135m, full: ~15 min on 2 cores
    .venv/bin/python benchmarks/distributed.py --model tiny --steps 6 --json out.json
    .venv/bin/python benchmarks/distributed.py --malloc-mmap-threshold 131072   # glibc heap retention off

On this machine's CPU, glibc's adaptive mmap threshold makes freed blocks stay in the heap: FSDP gathers and
frees every block's weights twice a step, so its resident set grows by hundreds of MiB per step and most of
the sharding saving disappears from RSS (not from what the tensors need). Pinning the threshold shows it, at a
price in time: every large allocation becomes a fresh mmap whose pages are faulted in and zeroed (the pinned
default benchmark did not finish within 40 minutes on the loaded 2-core machine; use --model tiny there).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [(1, "single"), (2, "ddp"), (2, "fsdp")]
ESTIMATOR_PRECISION = {"fp32": "fp32", "bf16": "bf16-autocast"}  # the trainer's names -> costs.memory's


def run(tmp: Path, nproc: int, parallel: str, args) -> dict:
    name = f"{parallel}-{nproc}"
    command = [sys.executable, "-m", "tunegap", "finetune", "--model", args.model, "--method", args.method,
               "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
               "--train-examples", str(args.batch_size * args.steps), "--eval-examples", "8",
               "--generate-examples", "0", "--precision", args.precision, "--runs-dir", str(tmp), "--name", name,
               "--no-progress", "--parallel", "ddp" if parallel == "single" else parallel, "--nproc", str(nproc),
               "--threads", str(args.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.malloc_mmap_threshold:  # glibc: serve blocks above this from mmap, returned to the OS when freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"benchmark: {name} failed:\n{done.stderr[-4000:]}")
    folder = tmp / name
    ledger = json.loads((folder / "ledger.json").read_text())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    skip = set(ledger.get("counted_steps", [])) | {1}
    steady = [r for r in rows if "loss" in r and r["step"] not in skip] or [r for r in rows if "loss" in r]
    # the fastest steady step: the machine is shared, and other processes only ever slow a step down
    return {"name": name, "nproc": nproc, "parallel": parallel, "ledger": ledger,
            "steady_steps": {r["step"]: r["tokens_per_s"] for r in steady},
            "tokens_per_s": max(r["tokens_per_s"] for r in steady)}


def predicted_memory(result: dict) -> float:
    """The estimator's peak bytes per device for this run's setting, on this CPU (runtime = process baseline)."""
    from tunegap.costs.catalog import cpu_device
    from tunegap.costs.memory import TrainSetup
    from tunegap.costs.shape import ModelShape
    from tunegap.estimate import estimate_run
    from tunegap.methods import make_method

    ledger = result["ledger"]
    costs, config = {k: v["value"] for k, v in ledger["costs"].items()}, ledger["config"]
    shape = ModelShape(**ledger["shape"])
    options = {k: v for k, v in ledger["method"].items() if k != "name"}
    if "targets" in options:
        options["targets"] = tuple(options["targets"])
    method = make_method(ledger["method"]["name"], **options)
    n = result["nproc"]
    positions = costs["tokens"] + costs["padding_tokens"]
    micro_batches = costs["optimizer_steps"] * config["grad_accum"]
    rows = max(1, math.ceil(positions / micro_batches / n / config["seq_len"]))  # packed rows per rank
    setup = TrainSetup(precision=ESTIMATOR_PRECISION[ledger["precision"]], micro_batch=rows,
                       grad_accum=config["grad_accum"], gpus=n, zero=3 if result["parallel"] == "fsdp" else 0)
    estimate = estimate_run(shape, method, tokens=costs["tokens"], sequences=max(1, math.ceil(positions / config["seq_len"])),
                            seq_len=config["seq_len"], steps=costs["optimizer_steps"], setup=setup,
                            hardware=cpu_device(ledger["peaks"]), loss_tokens=costs["loss_tokens"])
    return estimate["memory"]["peak"]


def gpu_prediction(result: dict, gpu: str, gpus: int, zero: int) -> dict:
    """The estimator's wall time and memory per GPU for the same work on `gpus` catalogue GPUs."""
    from tunegap.costs.catalog import resolve_device
    from tunegap.costs.memory import TrainSetup
    from tunegap.costs.shape import ModelShape
    from tunegap.estimate import estimate_run
    from tunegap.methods import make_method

    ledger = result["ledger"]
    costs, config = {k: v["value"] for k, v in ledger["costs"].items()}, ledger["config"]
    options = {k: v for k, v in ledger["method"].items() if k != "name"}
    if "targets" in options:
        options["targets"] = tuple(options["targets"])
    positions = costs["tokens"] + costs["padding_tokens"]
    sequences = max(1, math.ceil(positions / config["seq_len"]))
    per_device = max(1, math.ceil(sequences / costs["optimizer_steps"] / gpus))
    setup = TrainSetup(precision="bf16-mixed", micro_batch=per_device, gpus=gpus, zero=zero)
    estimate = estimate_run(ModelShape(**ledger["shape"]), make_method(ledger["method"]["name"], **options),
                            tokens=costs["tokens"], sequences=sequences, seq_len=config["seq_len"],
                            steps=costs["optimizer_steps"], setup=setup, hardware=resolve_device(gpu),
                            loss_tokens=costs["loss_tokens"])
    return {"gpus": gpus, "zero": zero, "tokens_per_s": estimate["costs"]["tokens_per_s"]["value"],
            "memory_per_gpu": estimate["memory"]["peak"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="full")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4, help="global micro-batch (examples)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--gpu", default="H100-SXM", help="catalogue GPU for the N-GPU prediction")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per process (0: the cores split between a node's processes). With 1, "
                             "each process gets one core and the rows compare 1 device with 2; tiny models on a "
                             "loaded machine run slower on 2 OpenMP threads than on 1 (spin-waiting)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=0,
                        help="set glibc's MALLOC_MMAP_THRESHOLD_ (bytes) for every run, e.g. 131072; 0 = glibc's "
                             "adaptive default, under which FSDP's per-layer gather/free churn fragments the heap")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    cores = os.cpu_count() or 1
    print(f"tunegap distributed benchmark: {args.model}, {args.method}, global batch {args.batch_size} examples "
          f"(seq_len {args.seq_len}), {args.steps} steps, {args.precision}, CPU processes with gloo"
          + (f", MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}" if args.malloc_mmap_threshold else ""))
    if cores <= 2:
        print(f"NOTE: this machine has {cores} CPU cores. One process uses all of them; two processes get one each. "
              "No speed-up can show here: the 2-process rows measure what communication and a second Python "
              "process cost, not what a second device would give. The estimator's N-GPU figures are below.")
    with tempfile.TemporaryDirectory(prefix="tunegap-bench-") as tmp:
        results = [run(Path(tmp), n, p, args) for n, p in CONFIGS]
    base = results[0]["tokens_per_s"]
    gib = 2**30
    print(f"\n{'processes':>9}  {'mode':<6} {'tokens/s':>10}  {'vs 1':>5}  {'comm time':>10}  {'comm share':>10}  "
          f"{'peak/rank (max)':>15}  {'estimator/rank':>14}  {'error':>7}")
    for r in results:
        c = r["ledger"]["costs"]
        comm = c.get("communication_time_s", {}).get("value") or 0.0
        share = c.get("communication_share", {}).get("value") or 0.0
        measured = c["peak_memory_bytes"]["value"]
        predicted = predicted_memory(r)
        r.update(communication_s=comm, communication_share=share, peak_measured=measured, peak_predicted=predicted,
                 peak_error=(predicted - measured) / measured,
                 peaks_per_rank=r["ledger"].get("distributed", {}).get("peak_memory_bytes_per_rank", [measured]))
        print(f"{r['nproc']:>9}  {r['parallel']:<6} {r['tokens_per_s']:>10,.0f}  {r['tokens_per_s'] / base:>5.2f}  "
              f"{comm:>8.2f} s  {100 * share:>9.1f}%  {measured / gib:>11.2f} GiB  {predicted / gib:>10.2f} GiB  "
              f"{100 * r['peak_error']:>+6.1f}%")
    print("  tokens/s: measured, fastest steady step (step 1 and FlopCounterMode-counted steps left out); comm time: "
          "measured, whole run, busiest rank (time with a collective in flight); peak/rank: measured peak RSS of "
          "the largest rank; estimator/rank: costs.memory for ZeRO-0 (1 process, DDP) or ZeRO-3 (FSDP), "
          "estimate; error = (estimate - measured) / measured")
    for r in results[1:]:
        print(f"  {r['name']}: peak RSS per rank (measured) "
              + ", ".join(f"{p / gib:.2f} GiB" for p in r["peaks_per_rank"]))

    print(f"\nEstimator for the same work on {args.gpu} GPUs (bf16 mixed precision, MFU 40% assumed; communication "
          "inside that MFU), estimate:")
    print(f"  {'GPUs':>4}  {'tokens/s ZeRO-0 (DDP)':>22}  {'memory/GPU ZeRO-0':>18}  {'memory/GPU ZeRO-3 (FSDP)':>25}")
    predictions = []
    for g in (1, 2, 8):
        ddp, fsdp = gpu_prediction(results[0], args.gpu, g, 0), gpu_prediction(results[0], args.gpu, g, 3)
        predictions += [ddp, fsdp]
        print(f"  {g:>4}  {ddp['tokens_per_s']:>22,.0f}  {ddp['memory_per_gpu'] / gib:>14.2f} GiB  "
              f"{fsdp['memory_per_gpu'] / gib:>21.2f} GiB")
    if args.json:
        for r in results:
            r["ledger"] = {"run": r["ledger"]["run"], "costs": r["ledger"]["costs"],
                           "distributed": r["ledger"].get("distributed")}
        Path(args.json).write_text(json.dumps({"args": vars(args), "cpu_cores": cores, "results": results,
                                               "gpu_predictions": predictions}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
