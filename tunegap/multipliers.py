"""The gap's multipliers (`tunegap gap`): pretraining and fine-tuning of the same model, estimated side by side,
the ratio taken apart. (The measured version, arms really trained, is `experiments/gap_experiment.py`.)

Four arms go through the same `estimate_run`: pretraining (every weight, random start, the published token
count), full fine-tuning, LoRA and QLoRA on the fine-tuning data. For each fine-tuning arm the ratio
pretraining / arm is decomposed into multipliers.

Multipliers of cost (their product is the cost ratio, exactly, by construction):
    FLOPs ratio    = tokens ratio x FLOPs-per-token ratio
    GPU-hours ratio = FLOPs ratio x seconds-per-FLOP ratio   (QLoRA's dequantisation, checkpointing)
    dollars ratio  = GPU-hours ratio x price ratio           (1 on the same GPU)
Other axes, which do not multiply into cost (each is reported on its own):
    optimizer steps   - fewer steps is fewer updates, but cost follows tokens, not steps: a step's cost is
                        its batch's tokens
    trainable params  - LoRA trains <1% of the weights, yet still runs the full forward and the input-gradient
                        backward through every frozen matrix: FLOPs per token drop to ~2/3, not to 1%
    optimizer state   - memory, not compute: it sets how many GPUs must hold the run, not how long it takes
    GPUs needed       - the memory floor; GPU-hours do not depend on it under ideal scaling
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace

from .costs.catalog import Device, EstimateError, resolve_device, resolve_model
from .costs.memory import TrainSetup
from .costs.shape import ModelShape
from .estimate import add_common_arguments, data_counts, estimate_run, parse_count, resolve_work, setup_from_args
from .io import write_figure
from .ledger import format_quantity
from .methods import ALL_LINEAR, Full, LoRA

DEFAULT_PRETRAIN_BATCH_TOKENS = 4e6  # Llama 2's 4M tokens per step (Touvron et al. 2023, Table 1), when unpublished
COST_MULTIPLIERS = ("tokens", "flops_per_token", "seconds_per_flop", "price_per_hour")
OTHER_AXES = ("optimizer_steps", "params_trainable", "optimizer_state_bytes", "peak_memory_bytes", "gpus_needed")


def _ratio(a, b) -> float | None:
    return None if a is None or b in (None, 0) else a / b


def gap(shape: ModelShape, pretrain_tokens: float, *, finetune_tokens: float, seq_len: int, hardware: Device,
        setup: TrainSetup | None = None, pretrain_seq_len: int | None = None,
        pretrain_batch_tokens: float = DEFAULT_PRETRAIN_BATCH_TOKENS, finetune_examples: float | None = None,
        rank: int = 8, targets: tuple = ALL_LINEAR) -> dict:
    """Pretraining vs full fine-tuning vs LoRA vs QLoRA, with the multipliers of each gap.

    `setup` is the fine-tuning setup (micro-batch in rows of `seq_len`, GPUs, ZeRO, MFU, precision);
    pretraining uses the same with bf16-mixed precision and `pretrain_batch_tokens` per optimizer step.
    """
    setup = setup or TrainSetup(precision="bf16-mixed", zero=3)
    if not pretrain_tokens or pretrain_tokens <= 0:
        raise EstimateError("pretraining tokens must be positive (this preset publishes none: pass --pretrain-tokens)")
    if not finetune_tokens or finetune_tokens <= 0:
        raise EstimateError("no work: zero fine-tuning tokens")
    if pretrain_batch_tokens <= 0:
        raise EstimateError("--pretrain-batch-tokens must be positive")
    pre_len = pretrain_seq_len or seq_len
    ft_rows = max(1, math.ceil(finetune_tokens / seq_len))
    ft_steps = max(1, math.ceil(ft_rows / (setup.micro_batch * setup.grad_accum * setup.gpus)))
    pre_rows = max(1, math.ceil(pretrain_tokens / pre_len))
    pre_steps = max(1, math.ceil(pretrain_tokens / pretrain_batch_tokens))
    mixed = "bf16-mixed" if setup.precision in ("fp32", "bf16-autocast") else setup.precision
    pre_setup = replace(setup, precision=mixed, base_format="same", micro_batch=max(1, setup.micro_batch * seq_len
                                                                                     // pre_len))
    ft = dict(tokens=finetune_tokens, sequences=ft_rows, seq_len=seq_len, steps=ft_steps, hardware=hardware,
              examples=finetune_examples)
    arms = {
        "pretrain": estimate_run(shape, Full(), tokens=pretrain_tokens, sequences=pre_rows, seq_len=pre_len,
                                 steps=pre_steps, setup=pre_setup, hardware=hardware, label="pretrain"),
        "full": estimate_run(shape, Full(), setup=setup, label="full", **ft),
        "lora": estimate_run(shape, LoRA(rank=rank, targets=tuple(targets)), setup=setup, label="lora", **ft),
        "qlora": estimate_run(shape, LoRA(rank=rank, targets=tuple(targets)),
                              setup=replace(setup, precision=mixed, base_format="nf4"), label="qlora", **ft),
    }
    pre = arms["pretrain"]
    ratios = {name: decompose(pre, arm) for name, arm in arms.items() if name != "pretrain"}
    return {"model": {"name": shape.name, "shape": shape.to_dict()}, "hardware": hardware.to_dict(),
            "pretrain": {"tokens": pretrain_tokens, "seq_len": pre_len, "batch_tokens": pretrain_batch_tokens},
            "finetune": {"tokens": finetune_tokens, "seq_len": seq_len, "examples": finetune_examples},
            "arms": arms, "ratios": ratios, "explanation": __doc__.split("\n\n", 2)[2].strip()}


def decompose(pre: dict, arm: dict) -> dict:
    """Ratios pretraining / arm. Cost multipliers multiply to the cost ratios; the other axes stand alone."""
    c, a = pre["costs"], arm["costs"]

    def v(costs, key):
        return costs[key]["value"]

    tokens = v(c, "tokens") / v(a, "tokens")
    flops = v(c, "flops_total") / v(a, "flops_total")
    flops_per_token = (v(c, "flops_total") / v(c, "tokens")) / (v(a, "flops_total") / v(a, "tokens"))
    gpu_hours = v(c, "gpu_hours") / v(a, "gpu_hours")
    seconds_per_flop = (v(c, "gpu_hours") / v(c, "flops_total")) / (v(a, "gpu_hours") / v(a, "flops_total"))
    dollars = _ratio(v(c, "dollars"), v(a, "dollars"))
    price = _ratio(pre["hardware"]["price_per_hour"], arm["hardware"]["price_per_hour"])
    cost = {"tokens": tokens, "flops_per_token": flops_per_token, "seconds_per_flop": seconds_per_flop,
            "price_per_hour": price}
    logs = {k: math.log(x) for k, x in cost.items() if x}
    total_log = math.log(dollars) if dollars else math.log(gpu_hours)
    shares = {k: (x / total_log if total_log else 0.0) for k, x in logs.items()}
    dominant = max(shares, key=lambda k: abs(shares[k])) if shares else None
    other = {
        "optimizer_steps": v(c, "optimizer_steps") / v(a, "optimizer_steps"),
        "params_trainable": v(c, "params_trainable") / v(a, "params_trainable"),
        "optimizer_state_bytes": _ratio(v(c, "optimizer_state_bytes"), v(a, "optimizer_state_bytes")),
        "peak_memory_bytes": v(c, "peak_memory_bytes") / v(a, "peak_memory_bytes"),
        "gpus_needed": _ratio(pre["memory"]["devices_needed"], arm["memory"]["devices_needed"]),
    }
    return {"cost_multipliers": cost, "flops": flops, "gpu_hours": gpu_hours, "dollars": dollars,
            "log_share": shares, "dominant": dominant, "other_axes": other,
            "identity": "flops = tokens x flops_per_token; gpu_hours = flops x seconds_per_flop; "
                        "dollars = gpu_hours x price_per_hour"}


def gap_from_args(args) -> dict:
    """`tunegap gap` arguments -> `gap(...)`."""
    shape, preset = resolve_model(args.model)
    device = resolve_device(args.gpu, catalog=args.catalog, price=args.price)
    pretrain_tokens = args.pretrain_tokens or (preset.pretrain_tokens if preset else None)
    if not pretrain_tokens:
        raise EstimateError(f"{args.model}: no published pretraining token count; pass --pretrain-tokens")
    setup = setup_from_args(args, device, "full")  # the arms set their own method and base format
    examples = args.examples
    if args.tokens is None and examples is None and not args.data:
        examples = args.examples_default
    work = resolve_work(seq_len=args.seq_len, rows_per_step=setup.micro_batch * setup.grad_accum * setup.gpus,
                        tokens=args.tokens, examples=examples, epochs=args.epochs,
                        example_tokens=args.example_tokens, data=data_counts(args))
    batch = args.pretrain_batch_tokens or (preset.pretrain_batch_tokens if preset else None) \
        or DEFAULT_PRETRAIN_BATCH_TOKENS
    result = gap(shape, pretrain_tokens, finetune_tokens=work["tokens"], seq_len=args.seq_len, hardware=device,
                 setup=setup, pretrain_seq_len=args.pretrain_seq_len or (preset.pretrain_seq_len if preset else None),
                 pretrain_batch_tokens=batch, finetune_examples=work["examples"], rank=args.rank,
                 targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()))
    result["model"].update(preset.to_dict() if preset else {})
    result["finetune"]["how"] = work["how"]
    return result


def _x(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.3g}x" if value < 1e4 else f"{value:.2e}x"


def format_gap(result: dict) -> str:
    arms, ratios = result["arms"], result["ratios"]
    name = result["model"].get("display") or result["model"]["name"]
    lines = [f"tunegap gap: {name} on {result['hardware']['name']} (every number is an estimate)",
             f"  pretraining: {result['pretrain']['tokens']:.3g} tokens, fine-tuning: {result['finetune']['tokens']:.3g} "
             f"tokens ({result['finetune'].get('how', '')})", ""]
    keys = [("tokens", "tokens"), ("optimizer steps", "optimizer_steps"), ("trainable params", "params_trainable"),
            ("optimizer state / GPU", "optimizer_state_bytes"), ("peak memory / GPU", "peak_memory_bytes"),
            ("FLOPs", "flops_total"), ("GPU-hours", "gpu_hours"), ("dollars", "dollars")]
    lines.append(f"  {'':<22}" + "".join(f"{arm:>24}" for arm in arms))
    for label, key in keys:
        cells = []
        for arm in arms.values():
            text = format_quantity(arm["costs"][key]).replace(" (estimate)", "")
            cells.append(f"{text:>24}")
        lines.append(f"  {label:<22}" + "".join(cells))
    lines.append(f"  {'GPUs needed (memory)':<22}" + "".join(
        f"{str(arm['memory']['devices_needed'] or 'no fit'):>24}" for arm in arms.values()))
    lines.append("")
    lines.append("  pretraining / fine-tuning, as multipliers")
    lines.append(f"  {'':<22}" + "".join(f"{arm:>24}" for arm in ratios))
    rows = [("tokens", lambda r: r["cost_multipliers"]["tokens"]),
            ("x FLOPs per token", lambda r: r["cost_multipliers"]["flops_per_token"]),
            ("= FLOPs", lambda r: r["flops"]),
            ("x seconds per FLOP", lambda r: r["cost_multipliers"]["seconds_per_flop"]),
            ("= GPU-hours", lambda r: r["gpu_hours"]),
            ("x price per hour", lambda r: r["cost_multipliers"]["price_per_hour"]),
            ("= dollars", lambda r: r["dollars"])]
    for label, get in rows:
        lines.append(f"  {label:<22}" + "".join(f"{_x(get(r)):>24}" for r in ratios.values()))
    lines.append("  separate axes (do not multiply into cost)")
    for label, key in (("optimizer steps", "optimizer_steps"), ("trainable params", "params_trainable"),
                       ("optimizer state", "optimizer_state_bytes"), ("peak memory / GPU", "peak_memory_bytes"),
                       ("GPUs needed", "gpus_needed")):
        lines.append(f"  {label:<22}" + "".join(f"{_x(r['other_axes'][key]):>24}" for r in ratios.values()))
    lines.append("")
    for arm, r in ratios.items():
        share = r["log_share"]
        parts = ", ".join(f"{k} {100 * s:.0f}%" for k, s in share.items() if abs(s) >= 0.005)
        lines.append(f"  {arm}: the gap is {_x(r['dollars'] or r['gpu_hours'])} in cost; share of its orders of "
                     f"magnitude: {parts}; dominant: {r['dominant']}")
    lines.append("")
    lines += ["  " + line for line in result["explanation"].splitlines()]
    return "\n".join(lines)


def plot_gap(result: dict, path) -> None:
    """Log-scale bars of every multiplier, one group per fine-tuning arm (matplotlib, Agg, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ratios = result["ratios"]
    labels = ["tokens", "FLOPs/token", "s/FLOP", "= GPU-hours", "steps*", "trainable params*", "optimizer state*",
              "GPUs needed*"]
    fig = Figure(figsize=(10, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(ratios), 1)
    colours = ("#4c72b0", "#dd8452", "#55a868", "#c44e52")
    for i, (arm, r) in enumerate(ratios.items()):
        values = [r["cost_multipliers"]["tokens"], r["cost_multipliers"]["flops_per_token"],
                  r["cost_multipliers"]["seconds_per_flop"], r["gpu_hours"], r["other_axes"]["optimizer_steps"],
                  r["other_axes"]["params_trainable"], r["other_axes"]["optimizer_state_bytes"],
                  r["other_axes"]["gpus_needed"]]
        ys = [j + i * width for j in range(len(labels))]
        ax.barh(ys, [v if v else float("nan") for v in values], height=width, color=colours[i % len(colours)],
                label=f"pretraining / {arm}")
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([j + width * (len(ratios) - 1) / 2 for j in range(len(labels))])
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.set_xlabel("ratio pretraining / fine-tuning (log scale; estimate)")
    name = result["model"].get("display") or result["model"]["name"]
    ax.set_title(f"{name}: why fine-tuning is cheaper (tokens x FLOPs/token x s/FLOP = GPU-hours)\n"
                 "* separate axes: they do not multiply into cost", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    write_figure(fig, path)  # atomic, and never through a planted symbolic link


def cmd_gap(args) -> int:
    result = gap_from_args(args)
    if args.png:
        plot_gap(result, args.png)
    print(json.dumps(result, indent=2, default=str) if args.json else format_gap(result))
    if args.png and not args.json:
        print(f"chart: {args.png}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `gap` on an argparse subparsers object (tunegap.cli calls this)."""
    gp = subparsers.add_parser("gap", help="pretraining vs fine-tuning the same model, decomposed into multipliers")
    add_common_arguments(gp, seq_len=512)
    gp.add_argument("--pretrain-tokens", type=parse_count, help="default: the preset's published count")
    gp.add_argument("--pretrain-seq-len", type=int, help="default: the preset's pretraining context")
    gp.add_argument("--pretrain-batch-tokens", type=parse_count,
                    help="tokens per pretraining optimizer step (default: the preset's, else 4M)")
    gp.add_argument("--png", help="write the decomposition chart here")
    gp.set_defaults(func=cmd_gap, examples_default=10000, zero=3)  # ZeRO-3: the memory floor of each arm
