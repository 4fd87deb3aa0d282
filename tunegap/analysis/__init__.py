"""Evidence for the essay's mechanisms: one analysis per reason or caveat, each a command, a results.json,
PNG charts and a report section (`tunegap report` gathers them).

    tunegap analyze rank RUN          is a full fine-tune's update low-rank?            (reason 2)
    tunegap analyze rank --steps-list 12,24 --lrs 5e-5,2e-4 --seeds 3   ...over steps, lrs and seeds
    tunegap sweep lora-rank           quality and cost against LoRA rank                (reason 2)
    tunegap sweep lr                  LoRA vs full, each at its best learning rate      (reason 2)
    tunegap sweep freeze              freeze the bottom k blocks: quality, forgetting, cost vs k  (reason 1)
    tunegap sweep noise               what mismatched training replies cost, in compute (caveat 3)
    tunegap analyze convergence       pretrained vs random start, same architecture     (reason 3)
    tunegap analyze probe             what the frozen layers already encode             (reason 1)
    tunegap analyze forgetting        does LoRA forget less, at equal task quality?     (caveat 2)
    tunegap analyze plane             LoRA vs full on the learning-forgetting plane     (caveat 2)
    tunegap analyze knowledge         new facts: fine-tuning (1-10 paraphrases) vs retrieval (caveat 1)

Defaults run on the default model within about ten minutes each on a free 2-core CPU (the two that train every
arm over 3 seeds take longer: knowledge about 30 min, sweep noise about 50); `--quick` runs the same
code on a tiny random model in seconds (that is what the tests do; its numbers say nothing about LLMs).
"""

from __future__ import annotations

import argparse

from ..report import verdict_label


def _common(p, name: str, *, trains: bool = True) -> None:
    p.add_argument("--out", default=f"results/{name}", help="folder for results.json, charts and section.json")
    if trains:
        p.add_argument("--quick", action="store_true", help="a tiny random model and a few steps (seconds; for tests)")
        p.add_argument("--model", default="smollm2-135m")
        p.add_argument("--runs-dir", default="runs", help="where the training runs go (reused when settings match)")
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def _done(results: dict, out) -> int:
    for v in results.get("verdicts", []):
        label = verdict_label(v["supported"], v.get("unresolved", False)).replace("not supported", "NOT supported")
        print(f"  [{label}] {v['claim']} Measured: {v['measured']}")
    print(f"tunegap: wrote {out}/results.json, section.json and charts ({results['wall_seconds']['value']:.0f} s, "
          "measured); `tunegap report` gathers them")
    return 0


def cmd_rank(args) -> int:
    from .common import AnalysisError, parse_floats, parse_ints, quick_threads
    from .rank import analyze_rank, quick_seed_runs

    out, run, null_run = args.out, args.run, args.null_run or None
    lora_ranks = tuple(parse_ints(args.lora_ranks, "--lora-ranks"))
    if args.steps_list or args.lrs:  # the grid: full fine-tunes trained here over steps, learning rates and seeds
        from .rank import analyze_rank_grid

        if run:
            raise AnalysisError("analyze rank: --steps-list/--lrs train their own runs; give no RUN folder")
        out = "results/rank-grid" if out == "results/rank" else out
        return _done(analyze_rank_grid(
            out=out, model=args.model, steps_list=tuple(parse_ints(args.steps_list or "12,24", "--steps-list")),
            lrs=tuple(parse_floats(args.lrs or "5e-5,2e-4", "--lrs")), seeds=args.seeds or (2 if args.quick else 3),
            lora_ranks=(2, 4) if args.quick else lora_ranks, runs_dir=args.runs_dir, quick=args.quick,
            progress=args.progress), out)
    with quick_threads(args.quick):
        if args.quick:
            run, null_run = quick_seed_runs(args.runs_dir)
            lora_ranks = (2, 4)  # the tiny model is 64 wide: 10x rank 4 still sits below a 64x64 null
        elif not run:
            raise AnalysisError("analyze rank: give a finished full fine-tune's run folder (or --quick)")
        return _done(analyze_rank(run, out=out, max_rank=args.max_rank, include_embeddings=args.embeddings,
                                  lora_ranks=lora_ranks, null_run=null_run), out)


def cmd_sweep(args) -> int:
    from .common import parse_ints
    from .sweep import sweep_lora_rank

    ranks = parse_ints(args.ranks, "--ranks")
    return _done(sweep_lora_rank(out=args.out, ranks=ranks, model=args.model, steps=args.steps, lr=args.lr,
                                 full_lr=args.full_lr, runs_dir=args.runs_dir, quick=args.quick,
                                 generate_examples=args.generate_examples, progress=args.progress,
                                 seeds=args.seeds, task=args.task), args.out)


def cmd_sweep_noise(args) -> int:
    from .common import AnalysisError
    from .noise_sweep import sweep_noise

    try:
        noise = [int(x) for x in args.noise.split(",") if x.strip()]
    except ValueError:
        raise AnalysisError(f"--noise: expected comma-separated percentages, got {args.noise!r}") from None
    return _done(sweep_noise(out=args.out, task=args.task, noise=noise, seeds=args.seeds, model=args.model,
                             steps=args.steps, lr=args.lr, rank=args.rank, generate_examples=args.generate_examples,
                             runs_dir=args.runs_dir, quick=args.quick, progress=args.progress), args.out)


def cmd_sweep_lr(args) -> int:
    from .common import parse_floats
    from .lr_sweep import sweep_lr

    lora_lrs = parse_floats(args.lora_lrs, "--lora-lrs") if args.lora_lrs else None
    full_lrs = parse_floats(args.full_lrs, "--full-lrs") if args.full_lrs else None
    return _done(sweep_lr(out=args.out, task=args.task, seeds=args.seeds, lora_lrs=lora_lrs, full_lrs=full_lrs,
                          rank=args.rank, model=args.model, steps=args.steps, runs_dir=args.runs_dir,
                          quick=args.quick, generate_examples=args.generate_examples, progress=args.progress),
                 args.out)


def cmd_sweep_freeze(args) -> int:
    from .common import parse_ints
    from .freeze_sweep import sweep_freeze

    ks = parse_ints(args.ks, "--ks", allow_zero=True) if args.ks else None
    return _done(sweep_freeze(out=args.out, task=args.task, seeds=args.seeds, ks=ks, lr=args.lr,
                              lora_lr=args.lora_lr, rank=args.rank, model=args.model, steps=args.steps,
                              runs_dir=args.runs_dir, quick=args.quick, generate_examples=args.generate_examples,
                              progress=args.progress), args.out)


def cmd_forgetting(args) -> int:
    from .common import parse_ints
    from .forgetting import analyze_forgetting

    return _done(analyze_forgetting(out=args.out, model=args.model, steps=args.steps,
                                    ranks=parse_ints(args.ranks, "--ranks"), full_lr=args.full_lr,
                                    freeze_lr=args.freeze_lr, seeds=args.seeds, runs_dir=args.runs_dir,
                                    quick=args.quick,
                                    progress=args.progress), args.out)


def cmd_plane(args) -> int:
    from .common import AnalysisError, parse_ints
    from .plane import analyze_plane

    def floats(text: str, what: str) -> tuple:
        try:
            values = tuple(float(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise AnalysisError(f"{what}: expected comma-separated numbers, got {text!r}") from None
        if not values or min(values) <= 0:
            raise AnalysisError(f"{what}: expected positive numbers, got {text!r}")
        return values

    return _done(analyze_plane(out=args.out, model=args.model, task=args.task, steps=args.steps, every=args.every,
                               ranks=parse_ints(args.ranks, "--ranks"), lora_lrs=floats(args.lora_lrs, "--lora-lrs"),
                               full_lrs=floats(args.full_lrs, "--full-lrs"), seeds=args.seeds,
                               runs_dir=args.runs_dir, quick=args.quick, progress=args.progress), args.out)


def cmd_convergence(args) -> int:
    from .convergence import analyze_convergence

    return _done(analyze_convergence(out=args.out, model=args.model, steps=args.steps, lr_pretrained=args.lr,
                                     lr_scratch=args.scratch_lr, target_loss=args.target_loss,
                                     runs_dir=args.runs_dir, seeds=args.seeds or (2 if args.quick else 3),
                                     quick=args.quick, progress=args.progress), args.out)


def cmd_knowledge(args) -> int:
    from .common import AnalysisError
    from .knowledge import analyze_knowledge

    try:
        paraphrases = [int(x) for x in args.paraphrases.split(",") if x.strip()]
    except ValueError:
        raise AnalysisError(f"--paraphrases: expected comma-separated counts, got {args.paraphrases!r}") from None
    return _done(analyze_knowledge(out=args.out, model=args.model, method=args.method, rank=args.rank,
                                   epochs=args.epochs, lr=args.lr, k=args.k, paraphrases=paraphrases,
                                   seeds=args.seeds, runs_dir=args.runs_dir, quick=args.quick,
                                   progress=args.progress), args.out)


def cmd_probe(args) -> int:
    from .probe import analyze_probe

    return _done(analyze_probe(out=args.out, model=args.model, n=args.examples, control=args.control,
                               quick=args.quick, seeds=args.seeds), args.out)


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _tasks_and_seeds(p) -> None:
    p.add_argument("--task", default="both", choices=("support", "docstrings", "both"),
                   help="shipped task(s) to train on; with both, the report says where they disagree")
    p.add_argument("--seeds", type=_positive(int), default=None,
                   help="seeds per setting: means with 95%% intervals over them (default 3; --quick: 2)")


def add_parser(subparsers) -> None:
    """Register `analyze ...`, `sweep lora-rank` and `report` (tunegap.cli calls this)."""
    from .. import report

    analyze = subparsers.add_parser("analyze", help="measure one of the essay's mechanisms (rank, convergence, plane, "
                                                    "forgetting, knowledge, probe)")
    sub = analyze.add_subparsers(dest="analysis", required=True)

    p = sub.add_parser("rank", help="singular-value spectrum of a full fine-tune's update, per matrix")
    p.add_argument("run", nargs="?", default="", help="a finished full (or freeze) fine-tune's run folder")
    p.add_argument("--null-run", default="",
                   help="the same full fine-tune with another seed: the difference of the two updates is the null")
    p.add_argument("--lora-ranks", default="8,16", help="LoRA ranks in use: r90 is reported as a multiple of each")
    p.add_argument("--quick", action="store_true", help="train two tiny full fine-tunes (seeds 0, 1) and analyse them")
    p.add_argument("--runs-dir", default="runs", help="where --quick's runs go")
    p.add_argument("--max-rank", type=_positive(int), default=64, help="energy kept by rank 1..R approximations")
    p.add_argument("--embeddings", action=argparse.BooleanOptionalAction, default=True,
                   help="include the embedding matrix (49152 x 576 on the default model)")
    p.add_argument("--steps-list", default="", help="grid mode: train full fine-tunes for these step counts "
                   "(comma-separated; default 12,24 when --lrs is given) and report r90 per (steps, lr) over seeds. "
                   "Defaults on smollm2-135m, 2-core CPU, 3 seeds: about 22 min (estimate)")
    p.add_argument("--lrs", default="", help="grid mode: learning rates, comma-separated (default 5e-5,2e-4)")
    p.add_argument("--seeds", type=_positive(int), default=None, help="grid mode: seeds per cell (default 3, 2 with "
                   "--quick; at least 2)")
    p.add_argument("--model", default="smollm2-135m", help="grid mode: the model fine-tuned")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    _common(p, "rank", trains=False)
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser("convergence", help="loss vs steps and FLOPs from random vs pretrained weights")
    _common(p, "convergence")
    p.add_argument("--steps", type=_positive(int), default=30, help="optimizer steps per arm")
    p.add_argument("--lr", type=_positive(float), default=5e-5, help="learning rate from pretrained weights")
    p.add_argument("--scratch-lr", type=_positive(float), default=1e-3, help="learning rate from random weights")
    p.add_argument("--target-loss", type=float, default=0.0,
                   help="training loss to reach (0 = where the pretrained arm stands a tenth of the way in)")
    p.add_argument("--seeds", type=_positive(int), default=None,
                   help="seeds per arm (default 3, 2 with --quick): the step ratio gets a 95%% interval. Defaults on "
                        "smollm2-135m, 2-core CPU: about 12 min (estimate)")
    p.set_defaults(func=cmd_convergence)

    p = sub.add_parser("forgetting", help="KL drift and general accuracy of full, LoRA and freeze at equal quality")
    _common(p, "forgetting")
    p.add_argument("--steps", type=_positive(int), default=16, help="optimizer steps per run")
    p.add_argument("--ranks", default="4,64", help="LoRA ranks, comma-separated (the sweep's runs are reused)")
    p.add_argument("--full-lr", type=_positive(float), default=5e-5)
    p.add_argument("--freeze-lr", type=_positive(float), default=1e-4)
    p.add_argument("--seeds", type=_positive(int), default=3,
                   help="seeds per arm: verdicts pair the arms seed by seed, with 95%% intervals (each seed's runs "
                        "add about 10 min on the default model)")
    p.set_defaults(func=cmd_forgetting)

    plane_help = ("LoRA (ranks x learning rates) vs full fine-tuning: test loss against forgetting at checkpoints "
                  "along each run, over seeds. Defaults (36 runs of 16 steps, 4 curve points each): about 2 h on the "
                  "default model on a quiet 2-core CPU, about 1 h with one --task (estimate; the command prints its "
                  "own prediction before the first run, and reuses finished runs)")
    p = sub.add_parser("plane", help=plane_help, description=plane_help)
    _common(p, "plane")
    p.add_argument("--task", default="both", choices=("support", "docstrings", "both"))
    p.add_argument("--seeds", type=_positive(int), default=3, help="seeds per arm (--quick: use 2)")
    p.add_argument("--steps", type=_positive(int), default=16, help="optimizer steps per run")
    p.add_argument("--every", type=_positive(int), default=4,
                   help="a curve point (test loss, forgetting) every N steps and at the last")
    p.add_argument("--ranks", default="4,64", help="LoRA ranks, comma-separated (alpha = 2r)")
    p.add_argument("--lora-lrs", default="2e-4,1e-3", help="LoRA learning rates, comma-separated")
    p.add_argument("--full-lrs", default="2e-5,1e-4", help="full fine-tuning learning rates, comma-separated")
    p.set_defaults(func=cmd_plane)

    p = sub.add_parser("knowledge", help="fictional facts: fine-tuning on 1-10 paraphrases vs BM25 retrieval vs both "
                                         "(defaults: about 30 min on the default model, 2 free cores)")
    _common(p, "knowledge")
    p.add_argument("--method", default="lora", choices=("lora", "full"))
    p.add_argument("--rank", type=_positive(int), default=16)
    p.add_argument("--epochs", type=_positive(float), default=10.0,
                   help="training compute, in passes over one wording per fact (the same steps for every count)")
    p.add_argument("--paraphrases", default="0,1,5,10",
                   help="templated wordings of each fact to fine-tune on, comma-separated (0 = closed book, max 10)")
    p.add_argument("--seeds", type=_positive(int), default=3, help="seeds per fine-tune")
    p.add_argument("--lr", type=_positive(float), default=1e-3)
    p.add_argument("--k", type=_positive(int), default=3, help="retrieved statements per question")
    p.set_defaults(func=cmd_knowledge)

    p = sub.add_parser("probe", help="linear probes on every layer of the frozen model")
    _common(p, "probe")
    p.add_argument("--examples", type=_positive(int), default=100, help="test examples per class-balanced property")
    p.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                   help="also probe the same architecture with random weights")
    p.add_argument("--seeds", type=_positive(int), default=3,
                   help="draws of the probe data and of the random-weight control: 95%% intervals over them")
    p.set_defaults(func=cmd_probe)

    sweep = subparsers.add_parser("sweep", help="sweep a setting through the training loop")
    ssub = sweep.add_subparsers(dest="sweep", required=True)
    p = ssub.add_parser("lora-rank", help="task quality, held-out loss and cost vs LoRA rank, full FT as reference")
    _common(p, "sweep-lora-rank")
    p.add_argument("--ranks", default="1,4,16,64",
                   help="LoRA ranks, comma-separated (each run ~2 min on the default model: 4 ranks + full ~10 min)")
    p.add_argument("--steps", type=_positive(int), default=16, help="optimizer steps per run")
    p.add_argument("--lr", type=_positive(float), default=2e-4, help="LoRA learning rate")
    p.add_argument("--full-lr", type=_positive(float), default=5e-5, help="full fine-tuning learning rate")
    p.add_argument("--generate-examples", type=int, default=16, help="held-out tickets generated per run (0 = none)")
    p.add_argument("--seeds", type=_positive(int), default=3, help="seeds per arm: means with 95%% intervals")
    p.add_argument("--task", default="support", choices=("support", "docstrings", "both"),
                   help="shipped task(s) to sweep on (both: each verdict per task, and where they disagree)")
    p.set_defaults(func=cmd_sweep)

    p = ssub.add_parser("lr", help="LoRA and full fine-tuning over a learning-rate grid, each at its best rate "
                                   "(chosen on validation, reported on test)",
                        description="Defaults (default model, 16 steps, 4 rates per method, --seeds 3, both "
                                    "tasks: 48 runs) take about 85 min on a free 2-core CPU (estimate); the "
                                    "command prints its own prediction before training.")
    _common(p, "sweep-lr")
    _tasks_and_seeds(p)
    p.add_argument("--lora-lrs", default="", help="LoRA learning rates, comma-separated (default 1e-4,3e-4,1e-3,3e-3; "
                                                  "--quick: 1e-3,1e-2)")
    p.add_argument("--full-lrs", default="", help="full fine-tuning learning rates (default 1e-5,3e-5,1e-4,3e-4; "
                                                  "--quick: 1e-4,1e-3)")
    p.add_argument("--rank", type=_positive(int), default=16, help="LoRA rank (alpha = 2r)")
    p.add_argument("--steps", type=_positive(int), default=16, help="optimizer steps per run")
    p.add_argument("--generate-examples", type=int, default=16, help="test examples generated per run (0 = none)")
    p.set_defaults(func=cmd_sweep_lr)

    p = ssub.add_parser("freeze", help="freeze the bottom k blocks, train the rest: quality, forgetting and cost "
                                       "vs k, LoRA and full as reference lines",
                        description="Defaults (default model, 16 steps, k = 0,7,15,22,29 of 30 blocks plus LoRA, "
                                    "--seeds 3, both tasks: 36 runs with the forgetting evaluation) take about 1.5 "
                                    "hours on a free 2-core CPU (estimate); the command prints its own "
                                    "prediction before training.")
    _common(p, "sweep-freeze")
    _tasks_and_seeds(p)
    p.add_argument("--ks", default="", help="frozen bottom blocks, comma-separated (default 0, L/4, L/2, 3L/4, L-1 "
                                            "of the model's L blocks; 0 = full fine-tuning)")
    p.add_argument("--lr", type=_positive(float), default=5e-5,
                   help="learning rate of every k (k = 0 is full fine-tuning at this rate; the default is sweep "
                        "lora-rank's, whose full runs are then reused)")
    p.add_argument("--lora-lr", type=_positive(float), default=2e-4,
                   help="the LoRA reference line's learning rate (default: sweep lora-rank's)")
    p.add_argument("--rank", type=_positive(int), default=16, help="the LoRA reference line's rank (alpha = 2r)")
    p.add_argument("--steps", type=_positive(int), default=16, help="optimizer steps per run")
    p.add_argument("--generate-examples", type=int, default=16, help="test examples generated per run (0 = none)")
    p.set_defaults(func=cmd_sweep_freeze)

    p = ssub.add_parser("noise", help="test quality vs the share of mismatched training replies, beside clean data "
                                      "at 2x and 4x the steps (defaults: about 50 min on the default model, 2 free "
                                      "cores; --task support about 22 min)")
    _common(p, "sweep-noise")
    p.add_argument("--task", choices=("support", "docstrings", "both"), default="both")
    p.add_argument("--noise", default="0,10,25,50",
                   help="percent of the training replies replaced by another example's reply, comma-separated")
    p.add_argument("--seeds", type=_positive(int), default=3, help="seeds per arm (the corruption follows the seed)")
    p.add_argument("--steps", type=_positive(int), default=12, help="optimizer steps at 1x (batch 8: one epoch)")
    p.add_argument("--lr", type=_positive(float), default=1e-3, help="LoRA learning rate")
    p.add_argument("--rank", type=_positive(int), default=16, help="LoRA rank (alpha = 2r)")
    p.add_argument("--generate-examples", type=_positive(int), default=16, help="test replies generated per run")
    p.set_defaults(func=cmd_sweep_noise)

    report.add_parser(subparsers)
