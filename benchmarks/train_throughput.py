"""Training throughput of tunegap's own loop: tokens/s, s/step, peak memory and MFU, full and LoRA.

    .venv/bin/python benchmarks/train_throughput.py                       # default model, 8 x 128, full + LoRA
    .venv/bin/python benchmarks/train_throughput.py --methods lora --steps 12 --variants default,ckpt,compile
    python3 benchmarks/train_throughput.py --device cuda --model <folder> --init scratch   # on a GPU

Each run is a fresh subprocess (so one run's retained memory cannot inflate the next) that calls
`tunegap.trainer.train` itself, on the CPU or one GPU (`--device cuda`, no torchrun), exactly as
`tunegap finetune` does, and reads back the step timestamps, the ledger's training peak memory and the
held-out loss. There is no second training loop.

What is reported, per run (medians over steps 2..N; step 1 is warm-up):
  s/step          measured wall time from the end of one optimizer step to the end of the next
  loss tok/s      loss-bearing tokens of a step / its seconds, median over steps 2..N (measured; the
                  total-time rate is kept in the JSON as *_overall)
  peak RSS        resident-set high-water mark during the training steps (measured, Linux VmHWM, reset
                  before step 1 as the ledger does); on CUDA the allocator's peak instead
  MFU             model FLOPs / time / measured matmul peak (fp32 and bf16 peaks measured in the same
                  process). Model FLOPs = `costs.flops.train_step_flops` per example over its real tokens,
                  vocabulary projection at loss-bearing positions only: the loss-bearing work, no padding,
                  no recomputation. The same numerator for any trainer fed the same examples.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
LR = {"lora": 2e-4, "full": 2e-5}  # LoRA's usual rate; full SFT at TRL's default


# --- shared by vs_trl.py ----------------------------------------------------------------------------------

def base_config(args, method: str, name: str, runs_dir: str, checkpointing: bool = False, compile: str = "off"):
    """The one TrainConfig every trainer in these benchmarks is measured on (tunegap's own compile and
    checkpointing settings are the worker's; other trainers ignore them)."""
    from tunegap.config import TrainConfig

    return TrainConfig(model=args.model, init=args.init, method=method, objective=args.objective, data="support",
                       seq_len=args.seq_len,
                       batch_size=args.batch, max_steps=args.steps, lr=LR[method], precision=args.precision,
                       eval_examples=args.eval_examples, generate_examples=0, runs_dir=runs_dir, name=name,
                       progress=False, threads=args.threads, activation_checkpointing=checkpointing, compile=compile,
                       train_examples=args.steps * args.batch, device=args.device,
                       forgetting=False)  # an after-training analysis: minutes, and nothing to do with speed


def step_examples(config, data) -> list[list]:
    """The examples of each optimizer step, in tunegap's data order (what every trainer is fed)."""
    from tunegap.schedule import DataOrder

    order = DataOrder(len(data.train), config.batch_size, config.seed)
    return [[data.train[i] for i in order.micro_batch(s)] for s in range(config.max_steps)]


def sequences(example) -> tuple:
    """The labelled sequences a training example is: itself, or both replies of a preference pair (DPO)."""
    return example.sides() if hasattr(example, "sides") else (example,)


def useful_flops(config, shape, method, steps: list[list]) -> list[float]:
    """Model FLOPs of each step: every sequence alone over its real tokens, logits only where loss is taken
    (for DPO the policy's two replies per pair; a reference model's forward is not useful work)."""
    from tunegap.costs.flops import train_step_flops

    trainable = method.trainable(shape)
    cache: dict = {}
    out = []
    for examples in steps:
        total = 0.0
        for e in (seq for example in examples for seq in sequences(example)):
            key = (len(e.input_ids), sum(1 for t in e.labels[1:] if t != -100))
            if key not in cache:
                cache[key] = train_step_flops(shape, trainable, sequences=1, seq_len=key[0],
                                              logit_tokens=key[1]).total
            total += cache[key]
        out.append(total)
    return out


def loss_tokens(steps: list[list]) -> list[int]:
    return [sum(sum(1 for t in e.labels[1:] if t != -100) for example in examples for e in sequences(example))
            for examples in steps]


def summarise(stamps: list[float], flops: list[float], tokens: list[int]) -> dict:
    """Steps 2..N from the end-of-step timestamps (stamps[0] = end of step 1).

    The 1-minute load average at the end is kept: on a shared machine it says how much the run was crowded."""
    secs = [b - a for a, b in zip(stamps, stamps[1:])]
    timed = range(1, len(stamps))
    total_s = sum(secs)
    # medians of per-step rates: a load spike from another process on a shared machine moves one step, not all
    return {"s_per_step": statistics.median(secs), "step_seconds": secs, "load_average": os.getloadavg()[0],
            "loss_tokens_per_s": statistics.median(tokens[i] / s for i, s in zip(timed, secs)),
            "model_flops_per_s": statistics.median(flops[i] / s for i, s in zip(timed, secs)),
            "loss_tokens_per_s_overall": sum(tokens[i] for i in timed) / total_s,
            "model_flops_per_s_overall": sum(flops[i] for i in timed) / total_s}


def peaks_dict(device: str) -> dict:
    """Measured matmul peaks; on a GPU with 8192^3 products (a 1536^3 one is too short to fill an H100)."""
    import torch

    from tunegap.costs.hardware import cpu_name, measure_matmul_flops

    size = 8192 if device == "cuda" else 1536
    return {"device": torch.cuda.get_device_name() if device == "cuda" else cpu_name(),
            "fp32": measure_matmul_flops("fp32", size=size, device=device),
            "bf16": measure_matmul_flops("bf16", size=size, device=device), "threads": torch.get_num_threads()}


def run_worker(argv: list[str], timeout: float) -> dict:
    """Run this file (or vs_trl.py) as `_worker ...` in a fresh process; its last stdout line is the JSON result."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv[:4])}: worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - started
    return result


def mfu(result: dict, peaks: dict) -> tuple[float, float]:
    return result["model_flops_per_s"] / peaks["fp32"], result["model_flops_per_s"] / peaks["bf16"]


def seconds(s: float | None) -> str:
    """A step-1 time (None where a worker has none)."""
    return "-" if s is None else f"{s:.1f} s"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


# --- the tunegap worker -----------------------------------------------------------------------------------

def tunegap_worker(args) -> dict:
    """`tunegap.trainer.train` itself, exactly as `tunegap finetune` runs it, on the CPU or one GPU
    (`--device cuda`, no torchrun); the step times come from its `on_step` hook."""
    import torch

    from tunegap.costs.shape import ModelShape
    from tunegap.methods import make_method
    from tunegap.models import load_model
    from tunegap.objectives import make_objective
    from tunegap.trainer import train

    if args.threads:
        torch.set_num_threads(args.threads)
    peaks = peaks_dict(args.device)
    with tempfile.TemporaryDirectory(prefix="tunegap-bench-") as tmp:
        config = base_config(args, args.method, "bench", tmp, args.checkpointing == "on", args.compile)
        stamps: list[float] = []
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        ledger = train(config, on_step=lambda step: (sync(), stamps.append(time.perf_counter())))
        with open(Path(tmp) / "bench" / "metrics.jsonl") as rows:  # step 1's time includes any compile
            first_step_s = next(r["seconds"] for r in map(json.loads, rows) if r.get("step") == 1)
        tokenizer = load_model(config.model, init=config.init, seed=config.seed)[1]
        data = make_objective(config.objective, **config.to_dict()).prepare_data(config, tokenizer)
    method = make_method(config.method, **config.method_options())
    steps = step_examples(config, data)
    result = summarise(stamps, useful_flops(config, ModelShape(**ledger["shape"]), method, steps), loss_tokens(steps))
    return {**result, "trainer": "tunegap", "loop": f"tunegap.trainer.train (one process, {args.device})",
            "method": args.method, "precision": ledger["precision"], "checkpointing": args.checkpointing == "on",
            "compiled": ledger["compiled"].startswith("on"), "first_step_s": first_step_s,
            "peak_bytes": ledger["costs"]["peak_memory_bytes"]["value"], "eval_loss": ledger["metrics"]["eval_loss"],
            "peaks": peaks, "device": args.device, "threads": torch.get_num_threads(), "objective": config.objective}


# --- the driver -------------------------------------------------------------------------------------------

def add_common(parser):
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--init", default="pretrained", choices=("pretrained", "scratch"))
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run (step 1 is warm-up)")
    parser.add_argument("--batch", type=int, default=8, help="examples per optimizer step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores, as tunegap does)")
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--objective", default="next-token", choices=("next-token", "dpo"),
                        help="what every trainer minimises: SFT's next-token loss, or DPO on the support task's pairs")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one run may take")


def bench_parser(description: str):
    """A benchmark's parser and its `_worker` subcommand (one run, in a fresh process), both with the common
    flags; returns (parser, worker)."""
    parser = argparse.ArgumentParser(description=description)
    worker = parser.add_subparsers(dest="cmd").add_parser("_worker")
    add_common(worker)
    worker.add_argument("--method", required=True)
    worker.add_argument("--checkpointing", default="off", choices=("on", "off"))
    worker.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    add_common(parser)
    return parser, worker


# tunegap's settings a benchmark can set side by side: "default" is what `tunegap finetune` does unasked
# (--compile auto, which leaves a run this short eager)
VARIANTS = {"default": [], "ckpt": ["--checkpointing=on"], "compile": ["--compile=on"],
            "compile+ckpt": ["--compile=on", "--checkpointing=on"]}


def variants(spec: str) -> list[str]:
    names = [v.strip() for v in spec.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise SystemExit(f"--variants: unknown {unknown or spec!r}; choose from {','.join(VARIANTS)}")
    return names


def variant(result: dict) -> str:
    """The VARIANTS name of a tunegap run's result."""
    parts = (["compile"] if result.get("compiled") else []) + (["ckpt"] if result["checkpointing"] else [])
    return "+".join(parts) or "default"


def worker_argv(args) -> list[str]:
    """The common flags of `args`, passed on to each worker."""
    return [f"--model={args.model}", f"--init={args.init}", f"--steps={args.steps}", f"--batch={args.batch}",
            f"--seq-len={args.seq_len}", f"--precision={args.precision}", f"--threads={args.threads}",
            f"--eval-examples={args.eval_examples}", f"--device={args.device}", f"--objective={args.objective}"]


def main(argv=None):
    parser, worker = bench_parser(__doc__.split("\n")[0])
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--variants", default="default",
                        help=f"tunegap settings to run side by side, comma-separated: {','.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration (medians reported)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.cmd == "_worker":
        print(json.dumps(tunegap_worker(args)), flush=True)
        return

    names = variants(args.variants)
    common = worker_argv(args)
    print(f"train_throughput: {args.model} ({args.init}), {args.batch} examples x <= {args.seq_len} tokens per step, "
          f"{args.steps} steps per run, {args.repeats} run(s) each, device {args.device}", flush=True)
    results = []
    for _ in range(args.repeats):
        for method in args.methods.split(","):
            for name in names:
                r = run_worker([__file__, "_worker", *common, f"--method={method}", *VARIANTS[name]], args.timeout)
                results.append(r)
                print(f"  ran {method} {name}: {r['s_per_step']:.2f} s/step (step 1: {seconds(r['first_step_s'])})",
                      flush=True)
    peaks = {"fp32": max(r["peaks"]["fp32"] for r in results), "bf16": max(r["peaks"]["bf16"] for r in results),
             "device": results[0]["peaks"]["device"]}
    print(f"\nmeasured matmul peaks (best of each run's measurement): fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s on {peaks['device']} ({results[0]['threads']} threads)")
    print(f"{'method':6} {'variant':12} {'prec':5} {'step 1 s':>8} {'s/step':>7} {'loss tok/s':>10} {'peak mem':>10} "
          f"{'MFU fp32':>8} {'MFU bf16':>8} {'held-out loss':>13}   (all measured; MFU = formula FLOPs / "
          "measured time / measured peak; step 1 includes any compile)")
    for method in args.methods.split(","):
        for name in names:
            rs = [r for r in results if r["method"] == method and variant(r) == name]
            med = {k: statistics.median(r[k] for r in rs)
                   for k in ("s_per_step", "loss_tokens_per_s", "peak_bytes", "model_flops_per_s", "eval_loss")}
            first = [r["first_step_s"] for r in rs if r["first_step_s"] is not None]
            m32, m16 = mfu(med, peaks)
            print(f"{method:6} {name:12} {rs[0]['precision']:5} "
                  f"{seconds(statistics.median(first) if first else None):>8} {med['s_per_step']:7.2f} "
                  f"{med['loss_tokens_per_s']:10.1f} {gib(med['peak_bytes']):>10} {100 * m32:7.1f}% {100 * m16:7.1f}% "
                  f"{med['eval_loss']:13.4f}")
    print(f"loop: {results[0]['loop']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"peaks": peaks, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
