"""Experiments: several arms run through the one training loop, compared in one report."""

from __future__ import annotations

import argparse

from ..analysis.common import parse_floats
from ..report import verdict_label


def _ints(text: str) -> tuple:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise ValueError(f"expected comma-separated non-negative integers, got {text!r}")
    return values


def print_verdicts(verdicts: list[dict]) -> None:
    for v in verdicts:
        label = verdict_label(v["supported"], v.get("unresolved", False)).replace("not supported", "NOT supported")
        print(f"  [{label}] {v['claim']}: {v['measured']}")


def cmd_gap(args) -> int:
    from ..config import ConfigError
    from .gap_experiment import GapConfig, run_gap_experiment

    try:
        ranks = _ints(args.ranks) if args.ranks else None
        k_shots = _ints(args.k_shots) if args.k_shots else None
    except ValueError as err:
        raise ConfigError(f"--ranks/--k-shots: {err}") from None
    if ranks and min(ranks) <= 0:
        raise ConfigError("--ranks: every LoRA rank must be positive")
    lr_factors = tuple(parse_floats(args.lr_factors, "--lr-factors")) if args.lr_factors else None
    if args.budget_tokens is not None and args.budget_tokens <= 0:
        raise ConfigError("--budget-tokens: must be positive")
    overrides = {k: v for k, v in dict(model=args.model, out=args.out, budget_tokens=args.budget_tokens,
                                       ranks=ranks, k_shots=k_shots, gpu=args.gpu, gpu_price=args.gpu_price,
                                       pretrain_tokens=args.pretrain_tokens, progress=args.progress,
                                       seeds=args.seeds, task=args.task, lr_factors=lr_factors).items()
                 if v is not None}
    config = GapConfig.quick_config(**overrides) if args.quick else GapConfig(**overrides)
    results = run_gap_experiment(config.check())
    print(f"\ntunegap: gap experiment finished in {results['wall_seconds'] / 60:.1f} min (measured)")
    print_verdicts(results["verdicts"])
    print(f"\nreport: {config.folder() / 'report.html'} (also report.md, results.json, *.png)")
    return 0


def cmd_stages(args) -> int:
    from .stages import StagesConfig, run_stages_experiment

    overrides = {k: v for k, v in dict(model=args.model, out=args.out, method=args.method, gpu=args.gpu,
                                       gpu_price=args.gpu_price, pretrain_tokens=args.pretrain_tokens,
                                       progress=args.progress).items() if v is not None}
    config = StagesConfig.quick_config(**overrides) if args.quick else StagesConfig(**overrides)
    results = run_stages_experiment(config)
    print(f"\ntunegap: stages experiment finished in {results['wall_seconds'] / 60:.1f} min (measured)")
    for name, row in results["stages"].items():
        print(f"  {name:4} {row['flops']['total']:.3g} FLOP (formula), {row['wall_time_s']:.0f} s (measured)")
    print_verdicts(results["verdicts"])
    print(f"\nreport: {config.folder() / 'report.html'} (also report.md, results.json, stages_flops.png)")
    return 0


def add_parser(subparsers) -> None:
    experiment = subparsers.add_parser("experiment", help="run a multi-arm experiment and write its report")
    sub = experiment.add_subparsers(dest="experiment", required=True)
    gap = sub.add_parser("gap", help="measure the pretraining/fine-tuning gap on a real model (the main job)")
    gap.add_argument("--model", default=None, help="default smollm2-135m (tiny with --quick)")
    gap.add_argument("--out", default=None, help="output folder (default runs/gap-<model>)")
    gap.add_argument("--budget-tokens", type=int, default=None, help="training tokens per trained arm (default 16000)")
    gap.add_argument("--ranks", default="", help="LoRA ranks, comma-separated (default 8; the first is the LoRA arm)")
    gap.add_argument("--k-shots", default="", help="in-context examples per prompt, comma-separated (default 0,2,8)")
    gap.add_argument("--gpu", default=None, help="GPU the dollar figures assume (default H100-SXM)")
    gap.add_argument("--gpu-price", type=float, default=None, help="$/hour override for that GPU")
    gap.add_argument("--pretrain-tokens", type=float, default=None, help="override the published token count")
    gap.add_argument("--task", default=None, choices=("support", "docstrings"),
                     help="shipped task every arm trains and is scored on (default support)")
    gap.add_argument("--seeds", type=int, default=None,
                     help="seeds per training arm (default 3; 2 with --quick): numbers are means with 95%% intervals. "
                          "On smollm2-135m, 3 seeds with --lr-factors 0.3,1,3: 16.6 min (support), 17.4 min "
                          "(docstrings) measured on a 2-core host; without it, three of those five runs per arm")
    gap.add_argument("--lr-factors", default="",
                     help="choose each trained arm's learning rate on the validation split among these multiples "
                          "of its default, e.g. 0.3,1,3 (seed 0 trains at each; adds one run per extra factor "
                          "and arm); default 1: the defaults as they are")
    gap.add_argument("--quick", action="store_true", help="smoke version on a tiny model (2 seeds, about 2 minutes)")
    gap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    gap.set_defaults(func=cmd_gap)

    stages = sub.add_parser("stages", help="SFT, then DPO, then RL, each stage's cost beside pretraining's")
    stages.add_argument("--model", default=None, help="default smollm2-135m (tiny with --quick)")
    stages.add_argument("--out", default=None, help="output folder (default runs/stages-<model>)")
    stages.add_argument("--method", default=None, help="method of every stage (default lora)")
    stages.add_argument("--gpu", default=None, help="GPU the dollar figures assume (default H100-SXM)")
    stages.add_argument("--gpu-price", type=float, default=None, help="$/hour override for that GPU")
    stages.add_argument("--pretrain-tokens", type=float, default=None, help="override the published token count")
    stages.add_argument("--quick", action="store_true", help="smoke version on a tiny model")
    stages.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    stages.set_defaults(func=cmd_stages)
