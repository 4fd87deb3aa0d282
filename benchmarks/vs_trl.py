"""tunegap's training loop against Hugging Face TRL's SFTTrainer (or DPOTrainer) + PEFT, same model, data and settings.

    .venv/bin/pip install -e '.[bench]'                  # TRL is a benchmark-only dependency
    .venv/bin/python benchmarks/vs_trl.py                # LoRA then full SFT, 3 alternating rounds each:
                                                         # TRL, tunegap's defaults, tunegap --compile on
    .venv/bin/python benchmarks/vs_trl.py --variants default,ckpt     # tunegap eager, without and with
                                                                      # activation checkpointing
    .venv/bin/python benchmarks/vs_trl.py --methods lora --pairs 5 --steps 12 --json vs_trl.json
    python3 benchmarks/vs_trl.py --device cuda --model <folder> --init scratch     # on a GPU
    .venv/bin/python benchmarks/vs_trl.py --objective dpo --seq-len 256   # DPO on the support task's pairs against
                                                                          # TRL's DPOTrainer (see trl_dpo)

The two trainers get exactly the same work:
  * the same model object from `tunegap.models.load_model` (same weights, seed set the same way before PEFT
    draws LoRA's A, so both start from the same adapter), LoRA r=8, alpha=16, dropout 0 on all seven linear
    projections (`LoraConfig` with the same target modules); full SFT trains every weight;
  * the same tokenised examples (`tunegap.data.sources.prepare`), in the same order (tunegap's `DataOrder`;
    TRL reads them through a `SequentialSampler`), 8 per optimizer step, at most 128 tokens,
    with the loss on the reply tokens only (pre-built `labels`, which TRL keeps as they are);
  * the same optimizer settings (AdamW, lr 2e-4 LoRA / 2e-5 full, no weight decay, clip 1.0) and the same
    schedule (tunegap's warm-up + cosine `lr_lambda`, installed in TRL through `create_scheduler`), the same
    number of optimizer steps, the same precision (TRL's `bf16` set to what tunegap's "auto" picks from the
    measured peaks, printed), the same torch thread count;
  * TRL otherwise keeps its own defaults, as a user gets them: gradient checkpointing on, padding to the
    longest example of each batch, logits and its entropy/accuracy metrics at every position
    (`--trl-checkpointing off` measures it without checkpointing too).

Runs alternate TRL, tunegap, TRL, tunegap, ... in fresh processes (machine load drifts; alternating pairs
share it), and the table reports medians over the pairs and the median of the per-pair ratios tunegap/TRL.
The held-out loss of both comes from the same function, the one-device strategy's `heldout`, on the same held-out
examples. Tokens/s counts loss-bearing tokens; MFU uses the same model-FLOP count for both (see
train_throughput.py) against the best matmul peak measured in any of the runs.

`--objective dpo` gives both trainers the same tokenised preference pairs (`--batch` pairs per step, each side at
most `--seq-len` tokens) and the same beta; loss-bearing tokens are both replies' tokens, model FLOPs the policy's
training work on both replies (a reference forward is not counted as useful work), the held-out loss is the DPO
loss per pair from tunegap's objective. Issue 7's speed targets are for SFT and are not applied to DPO.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import (LR, VARIANTS, base_config, bench_parser, gib, loss_tokens, mfu,  # noqa: E402
                              peaks_dict, run_worker, step_examples, summarise, useful_flops, variant, variants,
                              worker_argv)

TARGETS = {"lora": 2.0, "full": 1.5}  # issue 7: tunegap/TRL loss-bearing tokens/s
# issue 19, LoRA on one GPU at 64 x 512: tunegap/TRL loss-bearing tokens/s against TRL's defaults and against
# TRL without gradient checkpointing, and MFU against the GPU's measured bf16 peak
GPU_TARGETS = {"trl": 5.0, "trl-no-ckpt": 3.0}
GPU_MFU = 0.15


def same_schedule(trainer_cls, config, warmup: int):
    """TRL's trainer with tunegap's schedule and data order; nothing else overridden."""
    import torch

    from tunegap.schedule import lr_lambda

    class SameSchedule(trainer_cls):
        def _get_train_sampler(self, *a, **k):  # = train_sampling_strategy="sequential" (transformers >= 5.x)
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer, lr_lambda(config, config.max_steps, warmup))
            return self.lr_scheduler

    return SameSchedule


def clock(device: str, stamps: list, peak: dict):
    """A TRL callback that stamps the end of every optimizer step and keeps the training peak memory."""
    import torch
    from transformers import TrainerCallback

    from tunegap.ledger import peak_rss_bytes, reset_peak_rss

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            reset_peak_rss()

        def on_step_end(self, *a, **k):
            if device == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        def on_train_end(self, *a, **k):
            peak["bytes"] = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()

    return Clock()


def trl_common(args, config, precision: str) -> dict:
    """The TRL settings both workers share: batch, steps, optimizer, schedule's warm-up, precision, seeds."""
    checkpointing = {"default": {}, "on": {"gradient_checkpointing": True},
                     "off": {"gradient_checkpointing": False}}[args.trl_checkpointing]
    return dict(per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=1,
                max_steps=config.max_steps, learning_rate=config.lr, weight_decay=config.weight_decay,
                max_grad_norm=config.clip, warmup_steps=config.warmup_steps or max(1, round(0.05 * config.max_steps)),
                bf16=precision == "bf16", fp16=False, max_length=config.seq_len, save_strategy="no",
                report_to="none", disable_tqdm=True, seed=config.seed, data_seed=config.seed,
                dataloader_num_workers=0, use_cpu=args.device == "cpu", **checkpointing)


def trl_lora(config):
    from peft import LoraConfig, TaskType

    from tunegap.costs.shape import HF_MODULE_NAMES

    if config.method != "lora":
        return None
    return LoraConfig(task_type=TaskType.CAUSAL_LM, r=config.rank, lora_alpha=config.alpha,
                      lora_dropout=config.dropout, target_modules=[HF_MODULE_NAMES[t] for t in config.target_list])


def trl_worker(args) -> dict:
    """One TRL run (SFTTrainer, or DPOTrainer under --objective dpo) on tunegap's model, data, order and settings;
    the held-out loss from tunegap's objective through the one-device strategy, as for tunegap's own runs."""
    import torch
    from trl import __version__ as trl_version

    from tunegap.costs.hardware import measure_peaks
    from tunegap.costs.shape import ModelShape
    from tunegap.methods import make_method
    from tunegap.models import base_model, load_model
    from tunegap.objectives import Context, make_objective
    from tunegap.precision import autocast_factory, choose_precision
    from tunegap.strategies import SingleDevice

    threads = args.threads or __import__("os").cpu_count() or 1
    torch.set_num_threads(threads)
    peaks = peaks_dict(args.device)
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as tmp:
        config = base_config(args, args.method, "bench", tmp)
        precision = choose_precision(config, measure_peaks(args.device))
        if args.device == "cuda" and config.precision == "auto":
            precision = "bf16"
        torch.manual_seed(config.seed)
        model, tokenizer = load_model(config.model, init=config.init, seed=config.seed)
        shape = ModelShape.from_hf_config(model.config)
        method, objective = make_method(config.method, **config.method_options()), make_objective(
            config.objective, **config.to_dict())
        data = objective.prepare_data(config, tokenizer)
        steps = step_examples(config, data)
        autocast = autocast_factory(precision, args.device)
        run = trl_dpo if config.objective == "dpo" else trl_sft
        trained, stamps, peak, gc_on = run(args, config, precision, model, tokenizer, objective, data, steps, tmp)
        ctx = Context(trained, base_model(trained), method, tokenizer.pad_token_id, autocast)
        one_device = SingleDevice(args.device)
        one_device.wrap(trained, lambda batch: objective.loss(ctx, batch))
        eval_loss = one_device.heldout(objective, ctx, data.eval, config.batch_size, config.seq_len)
    result = summarise(stamps, useful_flops(config, shape, method, steps), loss_tokens(steps))
    return {**result, "trainer": "trl", "trl_version": trl_version, "method": args.method, "precision": precision,
            "checkpointing": gc_on, "peak_bytes": peak["bytes"], "eval_loss": eval_loss, "peaks": peaks, "device": args.device,
            "threads": torch.get_num_threads(), "objective": config.objective}


def trl_sft(args, config, precision, model, tokenizer, objective, data, steps, tmp):
    """SFTTrainer on tunegap's tokenised examples (pre-built labels, which TRL keeps as they are)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    ordered = [e for examples in steps for e in examples]
    dataset = Dataset.from_dict({"input_ids": [e.input_ids for e in ordered], "labels": [e.labels for e in ordered]})
    sft = SFTConfig(output_dir=tmp, **trl_common(args, config, precision))
    stamps, peak = [], {}
    trainer = same_schedule(SFTTrainer, config, sft.warmup_steps)(
        model=model, args=sft, train_dataset=dataset, processing_class=tokenizer, peft_config=trl_lora(config),
        callbacks=[clock(args.device, stamps, peak)])
    gc_on = bool(trainer.args.gradient_checkpointing)
    trainer.train()
    return trainer.model, stamps, peak, gc_on


def trl_dpo(args, config, precision, model, tokenizer, objective, data, steps, tmp):
    """DPOTrainer on tunegap's tokenised pairs (prompt, chosen and rejected ids as tunegap split them; TRL's
    completion mask also covers the template's newline after each reply's end-of-turn token, one token per reply
    that tunegap's labels leave out). LoRA: TRL's reference is the adapter-disabled model, as tunegap's; full: TRL's
    default frozen reference copy, where tunegap precomputes the reference log-probs before step 1. The held-out
    pairs' reference log-probs are precomputed from the starting weights, before TRL trains."""
    import copy

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from tunegap.methods import make_method
    from tunegap.models import base_model
    from tunegap.objectives import Context
    from tunegap.precision import autocast_factory

    start = Context(model, base_model(model), make_method("full"), tokenizer.pad_token_id,
                    autocast_factory(precision, args.device))
    objective.precompute_reference(start, data.eval)
    pairs = [e.pair for examples in steps for e in examples]
    dataset = Dataset.from_dict({"prompt_ids": [p.prompt_ids for p in pairs],
                                 "chosen_ids": [p.chosen_ids for p in pairs],
                                 "rejected_ids": [p.rejected_ids for p in pairs]})
    dpo = DPOConfig(output_dir=tmp, beta=config.beta, **trl_common(args, config, precision))

    class Pretokenised(same_schedule(DPOTrainer, config, dpo.warmup_steps)):
        def _prepare_dataset(self, dataset, *a, **k):  # already tokenised by tunegap
            return dataset

    stamps, peak = [], {}
    reference = None if config.method == "lora" else copy.deepcopy(model).eval()
    trainer = Pretokenised(model=model, ref_model=reference, args=dpo, train_dataset=dataset,
                           processing_class=tokenizer, peft_config=trl_lora(config),
                           callbacks=[clock(args.device, stamps, peak)])
    gc_on = bool(trainer.args.gradient_checkpointing)
    trainer.train()
    return trainer.model, stamps, peak, gc_on


def label(r: dict) -> str:
    if r["trainer"] == "trl":
        return "trl" if r["checkpointing"] else "trl-no-ckpt"
    return "tunegap" + ("" if variant(r) == "default" else "+" + variant(r))


def main(argv=None):
    parser, worker = bench_parser(__doc__.split("\n")[0])
    worker.add_argument("--trl-checkpointing", default="default", choices=("default", "on", "off"))
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--pairs", type=int, default=3, help="alternating TRL/tunegap rounds per method")
    parser.add_argument("--trl-checkpointing", default="default", choices=("default", "on", "off", "both"),
                        help="TRL's gradient checkpointing (its default is on); both: TRL twice per round, with "
                             "its default and without checkpointing")
    parser.add_argument("--gpu-suite", action="store_true",
                        help="issue 19's GPU check in one go (about 5 minutes on an H200): --device cuda, the default "
                             "architecture with random weights, 64 examples x 512 tokens per step, LoRA, TRL with its "
                             "defaults and without checkpointing, tunegap's defaults; goals printed with the table")
    parser.add_argument("--variants", default="default,compile",
                        help=f"tunegap settings run in every round, comma-separated: {','.join(VARIANTS)} "
                             "(default: what `tunegap finetune` does unasked, which leaves a run this short eager, "
                             "and --compile on)")
    parser.add_argument("--json", help="also write every run's numbers here (after each run)")
    parser.add_argument("--report", help="only print the table of an earlier --json file")
    args = parser.parse_args(argv)
    if args.gpu_suite:
        args.device, args.model, args.init, args.batch, args.seq_len = "cuda", "smollm2-135m-arch", "scratch", 64, 512
        args.methods, args.pairs, args.trl_checkpointing, args.variants = "lora", 2, "both", "default"
        args.steps, args.eval_examples = 12, 64
    if args.cmd == "_worker":
        print(json.dumps(trl_worker(args)), flush=True)
        return
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        runs = saved["runs"]
        report(runs, [m for m in saved["args"]["methods"].split(",") if any(r["method"] == m for r in runs)])
        return

    here = Path(__file__).resolve().parent
    common = worker_argv(args)
    methods = args.methods.split(",")
    ours = variants(args.variants)
    unit = "pairs" if args.objective == "dpo" else "examples"
    print(f"vs_trl: {args.model} ({args.init}), {args.objective}, {args.batch} {unit} x <= {args.seq_len} tokens per "
          f"step, {args.steps} optimizer steps per run, {args.pairs} alternating rounds per method, "
          f"device {args.device}; "
          f"lr {', '.join(f'{m} {LR[m]:g}' for m in methods)}", flush=True)
    runs = []
    for method in methods:
        for pair in range(args.pairs):
            trl_settings = ("default", "off") if args.trl_checkpointing == "both" else (args.trl_checkpointing,)
            jobs = [[str(here / "vs_trl.py"), "_worker", *common, f"--method={method}", f"--trl-checkpointing={c}"]
                    for c in trl_settings]
            jobs += [[str(here / "train_throughput.py"), "_worker", *common, f"--method={method}", *VARIANTS[v]]
                     for v in ours]
            for argv_ in jobs:
                r = run_worker(argv_, args.timeout)
                r["pair"] = pair
                runs.append(r)
                print(f"  {method} round {pair + 1}: {label(r):15} {r['s_per_step']:7.2f} s/step "
                      f"{r['loss_tokens_per_s']:7.1f} loss tok/s  peak {gib(r['peak_bytes'])}  "
                      f"held-out {r['eval_loss']:.4f}", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    report(runs, methods)


def report(runs: list[dict], methods: list[str]) -> None:
    peaks = {"fp32": max(r["peaks"]["fp32"] for r in runs), "bf16": max(r["peaks"]["bf16"] for r in runs)}
    trl_version = next((r.get("trl_version") for r in runs if r["trainer"] == "trl"), "?")
    print(f"\nmeasured matmul peaks (best over all runs): fp32 {peaks['fp32'] / 1e9:.0f}, bf16 "
          f"{peaks['bf16'] / 1e9:.0f} GFLOP/s on {runs[0]['peaks']['device']}, {runs[0]['threads']} torch threads; "
          f"TRL {trl_version}")
    print("medians over rounds; all values measured; MFU = formula model FLOPs (loss-bearing work) / measured time "
          "/ measured peak")
    print(f"{'method':6} {'trainer':15} {'prec':5} {'ckpt':5} {'s/step':>7} {'loss tok/s':>10} {'peak mem':>10} "
          f"{'MFU fp32':>8} {'MFU bf16':>8} {'held-out':>9}")
    keys = ("s_per_step", "loss_tokens_per_s", "peak_bytes", "model_flops_per_s", "eval_loss")
    verdict = lambda ok: "met" if ok else "MISSED"
    sft = all(r.get("objective", "next-token") == "next-token" for r in runs)  # issue 7's targets are for SFT
    target = (lambda text, ok: f" (target {text}: {verdict(ok)})") if sft else (lambda text, ok: "")
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        labels = sorted({label(r) for r in mine}, key=lambda t: (not t.startswith("trl"), t))
        references = [t for t in labels if t.startswith("trl")]
        by = {t: [r for r in mine if label(r) == t] for t in labels}
        med = {}
        for t, rs in by.items():
            med[t] = {k: statistics.median(r[k] for r in rs) for k in keys}
            m32, m16 = mfu(med[t], peaks)
            print(f"{method:6} {t:15} {rs[0]['precision']:5} {'on' if rs[0]['checkpointing'] else 'off':5} "
                  f"{med[t]['s_per_step']:7.2f} {med[t]['loss_tokens_per_s']:10.1f} {gib(med[t]['peak_bytes']):>10} "
                  f"{100 * m32:7.1f}% {100 * m16:7.1f}% {med[t]['eval_loss']:9.4f}")
        on_gpu = any(r.get("device", "cpu") == "cuda" for r in mine)
        for t in [t for t in labels if not t.startswith("trl")]:
            for ref in references:
                rounds = sorted({r["pair"] for r in by[t]} & {r["pair"] for r in by[ref]})
                if not rounds:
                    continue
                ratio = lambda k: statistics.median(
                    next(r[k] for r in by[t] if r["pair"] == p) / next(r[k] for r in by[ref] if r["pair"] == p)
                    for p in rounds)
                speed, mem, loss = ratio("loss_tokens_per_s"), ratio("peak_bytes"), ratio("eval_loss")
                goal = GPU_TARGETS.get(ref) if on_gpu and method == "lora" else TARGETS[method]
                print(f"{method:6} {t}/{ref} (median of {len(rounds)} same-round ratios): loss tok/s x{speed:.2f}"
                      f"{target(f'>= {goal}', speed >= goal) if goal else ''}, peak memory x{mem:.2f}"
                      f"{target('<= 1', mem <= 1.0) if not on_gpu else ''}, held-out loss x{loss:.4f}"
                      f"{target('within 2%', abs(loss - 1) <= 0.02)}")
        if method == "lora" and sft:
            floor = GPU_MFU if on_gpu else 0.5
            for t in [t for t in labels if not t.startswith("trl")]:
                m16 = mfu(med[t], peaks)[1]
                print(f"lora   {t} MFU vs the measured bf16 peak {100 * m16:.1f}% (target >= {100 * floor:.0f}%: "
                      f"{verdict(m16 >= floor)})")
        for t in [t for t in labels if not t.startswith("trl")]:
            first = [r["first_step_s"] for r in by[t] if r.get("first_step_s")]
            if first and any(r.get("compiled") for r in by[t]):
                eager_first = [r["first_step_s"] for r in by.get("tunegap", []) if r.get("first_step_s")]
                extra = statistics.median(first) - (statistics.median(eager_first) if eager_first
                                                    else med[t]["s_per_step"])
                saved = med.get("tunegap", {}).get("s_per_step", 0) - med[t]["s_per_step"]
                repay = f", repaid after {extra / saved:.0f} steps" if saved > 0 else ""
                print(f"{method:6} {t}: step 1 took {statistics.median(first):.1f} s (median), about {extra:.0f} s "
                      f"of one-time compile{repay} (measured)")


if __name__ == "__main__":
    main()
