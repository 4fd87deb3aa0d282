"""`tunegap` command line: this module only wires subcommands to the functions that do the work."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import ConfigError, TrainConfig, add_config_arguments, config_from_args
from .data import audit as data_audit


class UserError(Exception):
    """Anything the user can fix; printed as one line, never a traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one `tunegap: error:` line (exit 2) like every other user error."""

    def error(self, message: str):
        command = self.prog.removeprefix("tunegap").strip()
        print(f"tunegap: error: {command + ': ' if command else ''}{' '.join(message.split())} (see {self.prog} --help)",
              file=sys.stderr)
        raise SystemExit(2)


def _user_errors() -> tuple:
    from .checkpoint import CheckpointError
    from .data.loaders import DataError
    from .methods import MethodError
    from .models import ModelError
    from .outputs import RunLoadError
    from .runs import RunPathError
    from .safety import UnsafeFileError
    from .trainer import TrainingError

    # OSError: a full disk, a permission, a missing path; each is the user's to fix and says which file
    errors = [ConfigError, DataError, MethodError, ModelError, RunPathError, TrainingError, CheckpointError,
              RunLoadError, UserError, UnsafeFileError, OSError]
    try:
        from .estimate import EstimateError

        errors.append(EstimateError)
    except ImportError:
        pass
    return tuple(errors)


def cmd_train(args) -> int:
    from .strategies import relaunch, shutdown, under_torchrun
    from .trainer import print_summary, train

    config = config_from_args(args)
    if config.nproc > 1 and not under_torchrun():  # --nproc N: this same command line, under torchrun
        return relaunch(config.nproc, args.argv)
    finished = False
    try:
        ledger = train(config)
        finished = True
    finally:
        shutdown(finished)
    if int(os.environ.get("RANK", "0")) == 0:
        print_summary(ledger)
    return 0


def cmd_runs(args) -> int:
    from .runs import format_runs_table, list_runs

    rows = list_runs(args.runs_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no runs in {args.runs_dir}")
    else:
        print(format_runs_table(rows))
    return 0


def _load_for_eval(args):
    """A base model by name/path, or a finished run's trained model (its adapter unmerged, or its weights)."""
    from .models import load_model
    from .outputs import load_run

    if args.run:
        run = load_run(args.run, args.runs_dir, merge=False, allow_pickle=args.allow_pickle)
        return run.model, run.tokenizer, run.ledger["config"]
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle)
    return model, tokenizer, {"model": args.model}


def cmd_eval(args) -> int:
    from .data.loaders import load_sft
    from .data.support import generate_support
    from .evaluate import support_metrics

    model, tokenizer, _ = _load_for_eval(args)
    records = load_sft(args.data) if args.data != "support" else generate_support()[1]
    records = records[:args.examples]
    train_records = generate_support()[0]
    metrics = support_metrics(model, tokenizer, records, shots=train_records[:args.k_shot])
    samples = metrics.pop("samples")
    print(json.dumps(metrics, indent=2) if args.json else "\n".join(
        f"{k:>20}: {v:.4g} (measured)" if isinstance(v, float) else f"{k:>20}: {v}" for k, v in metrics.items()))
    if not args.json:
        for s in samples[:2]:
            print(f"\n> {s['prompt']}\n{s['reply']}")
    return 0


def cmd_generate(args) -> int:
    from .evaluate import generate

    model, tokenizer, _ = _load_for_eval(args)
    texts, _, _ = generate(model, tokenizer, [[{"role": "user", "content": args.prompt}]],
                        max_new_tokens=args.max_new_tokens)
    print(texts[0])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tunegap", description=__doc__.split(":")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)

    finetune = sub.add_parser("finetune", help="fine-tune a model (full, lora, freeze, ia3, prompt, prefix, adapter)")
    finetune.add_argument("--config", help="YAML/JSON file of settings (flags override it)")
    add_config_arguments(finetune)
    finetune.set_defaults(func=cmd_train)

    pretrain = sub.add_parser("pretrain", help="train from random weights on a text corpus (full method)")
    pretrain.add_argument("--config", help="YAML/JSON file of settings (flags override it)")
    add_config_arguments(pretrain, method="full", init="scratch", lr=1e-3, generate_examples=0)
    pretrain.set_defaults(func=cmd_train)

    runs = sub.add_parser("runs", help="list runs in the runs folder")
    runs.add_argument("--runs-dir", default="runs")
    runs.add_argument("--json", action="store_true")
    runs.set_defaults(func=cmd_runs)

    for name, func, helptext in (("eval", cmd_eval, "task metrics of a base model or a run"),
                                 ("generate", cmd_generate, "sample from a base model or a run")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", default="smollm2-135m")
        p.add_argument("--run", default="", help="a run name in --runs-dir, or a run folder")
        p.add_argument("--runs-dir", default="runs")
        p.add_argument("--trust-remote-code", action="store_true")
        p.add_argument("--allow-pickle", action="store_true",
                       help="accept pickled *.bin weights (tensors only, torch.load(weights_only=True))")
        if name == "eval":
            p.add_argument("--data", default="support", help="held-out SFT JSONL with meta, or 'support'")
            p.add_argument("--examples", type=int, default=32)
            p.add_argument("--k-shot", type=int, default=0, help="solved examples in the prompt (in-context learning)")
            p.add_argument("--json", action="store_true")
        else:
            p.add_argument("prompt")
            p.add_argument("--max-new-tokens", type=int, default=96)
        p.set_defaults(func=func)

    from . import compare, decide, estimate, experiments, multipliers

    compare.add_parser(sub)
    decide.add_parser(sub)
    estimate.add_parser(sub)
    multipliers.add_parser(sub)
    experiments.add_parser(sub)
    data_audit.add_parser(sub)  # data audit
    __import__("tunegap.analysis", fromlist=["add_parser"]).add_parser(sub)  # analyze, sweep lora-rank, report
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # for `--nproc N` to re-run under torchrun
    except SystemExit as done:  # --help (0) or a bad command line (2, already reported on one line)
        return done.code if isinstance(done.code, int) else 2
    try:
        return args.func(args)
    except _user_errors() as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"tunegap: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tunegap: interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
