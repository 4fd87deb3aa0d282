"""`tunegap` command line: this module only wires subcommands to the functions that do the work."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from .config import ConfigError, add_config_arguments, config_from_args


class UserError(Exception):
    """Anything the user can fix; printed as one line, never a traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one `tunegap: error:` line (exit 2) like every other user error."""

    def error(self, message: str):
        command = self.prog.removeprefix("tunegap").strip()
        print(f"tunegap: error: {command + ': ' if command else ''}{' '.join(message.split())} (see {self.prog} --help)",
              file=sys.stderr)
        raise SystemExit(2)


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default."""


def _user_errors() -> tuple:
    from .checkpoint import CheckpointError
    from .costs.shape import ShapeError
    from .data.loaders import DataError
    from .io import DamagedFileError
    from .methods import MethodError
    from .models import ModelError
    from .outputs import RunLoadError
    from .runs import RunIndexError, RunPathError
    from .safety import UnsafeFileError
    from .trainer import TrainingError

    # OSError: a full disk, a permission, a missing path; each is the user's to fix and says which file
    errors = [ConfigError, DataError, MethodError, ModelError, RunPathError, TrainingError, CheckpointError,
              RunLoadError, UserError, UnsafeFileError, DamagedFileError, RunIndexError, ShapeError, OSError]
    from .export import ExportError

    errors.append(ExportError)
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
    from .runs import format_runs_table, list_runs, rebuild_index

    if args.rebuild:
        print(f"tunegap runs: index rebuilt from the run folders: {rebuild_index(args.runs_dir)} run(s)", flush=True)
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
    from .evaluate import reply_loss, support_metrics

    model, tokenizer, config = _load_for_eval(args)
    records = load_sft(args.data, format=args.format) if args.data != "support" else generate_support()[1]
    records = records[:args.examples]
    seq_len = args.seq_len or config.get("seq_len", 512)
    loss, n_tokens = reply_loss(model, tokenizer, records, seq_len)
    if all("meta" in r for r in records):  # the support task's tickets: its task metrics too
        metrics = support_metrics(model, tokenizer, records, shots=generate_support()[0][:args.k_shot])
    else:  # a user's data: no task checks to run, the held-out loss and a look at replies
        from .evaluate import generate

        texts = generate(model, tokenizer, [r["messages"] for r in records[:2]])[0]
        metrics = {"samples": [{"prompt": r["messages"][-2]["content"], "reply": t} for r, t in zip(records, texts)]}
    metrics = {"heldout_loss": loss, "heldout_loss_tokens": n_tokens, "examples": len(records), **metrics}
    samples = metrics.pop("samples")
    print(json.dumps(metrics, indent=2) if args.json else "\n".join(
        f"{k:>20}: {v:.4g} (measured{', nats/token' if k == 'heldout_loss' else ''})" if isinstance(v, float)
        else f"{k:>20}: {v}" for k, v in metrics.items()))
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
    from .data.loaders import SFT_FORMATS

    parser = _Parser(prog="tunegap", description=__doc__.split(":")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)

    finetune = sub.add_parser("finetune", help="fine-tune a model (full, lora, freeze, ia3, prompt, prefix, adapter)",
                              formatter_class=_Defaults)
    finetune.add_argument("--config", help="YAML/JSON file of settings (flags override it)")
    add_config_arguments(finetune)
    finetune.set_defaults(func=cmd_train)

    pretrain = sub.add_parser("pretrain", help="train from random weights on a text corpus (full method)",
                              formatter_class=_Defaults)
    pretrain.add_argument("--config", help="YAML/JSON file of settings (flags override it)")
    add_config_arguments(pretrain, method="full", init="scratch", lr=1e-3, generate_examples=0)
    pretrain.set_defaults(func=cmd_train)

    runs = sub.add_parser("runs", help="list runs in the runs folder", formatter_class=_Defaults)
    runs.add_argument("--runs-dir", default="runs", help="folder holding every run")
    runs.add_argument("--json", action="store_true", help="print the rows as JSON")
    runs.add_argument("--rebuild", action="store_true",
                      help="re-create runs/index.sqlite from the run folders' ledgers (it is a cache of them)")
    runs.set_defaults(func=cmd_runs)

    for name, func, helptext in (("eval", cmd_eval, "held-out loss of a base model or a run on any SFT data, and "
                                                    "the task metrics on the support task"),
                                 ("generate", cmd_generate, "sample from a base model or a run")):
        p = sub.add_parser(name, help=helptext, formatter_class=_Defaults)
        p.add_argument("--model", default="smollm2-135m", help="a base model (name or folder), when no --run")
        p.add_argument("--run", default="", help="a run name in --runs-dir, or a run folder")
        p.add_argument("--runs-dir", default="runs", help="folder holding every run")
        p.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own Python code")
        p.add_argument("--allow-pickle", action="store_true",
                       help="accept pickled *.bin weights (tensors only, torch.load(weights_only=True))")
        if name == "eval":
            p.add_argument("--data", default="support", help="held-out SFT data (any layout finetune takes), or "
                                                             "'support' (the shipped eval set, with task metrics)")
            p.add_argument("--format", default="auto", choices=SFT_FORMATS, help="the data's layout (see finetune --format)")
            p.add_argument("--examples", type=int, default=32, help="how many held-out examples")
            p.add_argument("--seq-len", type=int, default=0, help="tokens per example (0: the run's, else 512)")
            p.add_argument("--k-shot", type=int, default=0, help="solved examples in the prompt (in-context learning)")
            p.add_argument("--json", action="store_true", help="print the metrics as JSON")
        else:
            p.add_argument("prompt", help="the user message")
            p.add_argument("--max-new-tokens", type=int, default=96, help="longest reply, in tokens")
        p.set_defaults(func=func)

    from . import compare, decide, estimate, experiments, export, multipliers
    from .data import audit as data_audit, show

    compare.add_parser(sub)
    decide.add_parser(sub)
    export.add_parser(sub)
    data = sub.add_parser("data", help="look at training data before training on it: show a record, audit a file")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    show.add_parser(data_sub)
    data_audit.add_parser(data_sub)
    estimate.add_parser(sub)
    multipliers.add_parser(sub)
    experiments.add_parser(sub)
    __import__("tunegap.analysis", fromlist=["add_parser"]).add_parser(sub)  # analyze, sweep lora-rank, report
    return parser


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, raised by tunegap's own handler. A subclass on purpose: CPython kills itself with SIGINT at exit
    whenever a plain KeyboardInterrupt escaped code run through PyRun_String (pybind11 modules do so while
    torch imports), even if it was caught later; it checks the exact type, so a subclass exits with 130."""


class Stopped(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill`, torchrun stopping its workers): stop as Ctrl-C does, with the same
    atomic writes unwinding and the same one line, rather than dying silently mid-write."""


_HANDLED = threading.Event()  # main() has reported the stop: no signal needs sending again


def _raise_for(signum, frame):
    """Raise Interrupted/Stopped, and send the signal again in a second unless main() has reported it by then:
    an exception raised at the wrong bytecode can be swallowed by C code (PyObject_HasAttr clears every
    exception in 3.11), and a Ctrl-C during imports was seen lost that way, the run going on to its end."""
    again = threading.Timer(1.0, lambda: None if _HANDLED.is_set() else os.kill(os.getpid(), signum))
    again.daemon = True
    again.start()
    raise Stopped() if signum == signal.SIGTERM else Interrupted()


def _quiet_when_swallowed(report):
    """A stop raised while a finalizer (`__del__`) runs is swallowed and printed as "Exception ignored in ...";
    _raise_for sends the signal again a second later, so that traceback would only break the one line."""
    def hook(unraisable):
        if not isinstance(unraisable.exc_value, (Interrupted, Stopped)):
            report(unraisable)
    return hook


def _install_handlers() -> dict:
    """Our handlers for SIGINT and SIGTERM where Python's defaults are in place; the previous ones, to restore."""
    previous = {}
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    for signum, default in defaults.items():
        try:
            if signal.getsignal(signum) is default:
                previous[signum] = signal.signal(signum, _raise_for)
        except ValueError:  # not the main thread (main() called from a thread): leave signals alone
            pass
    return previous


def main(argv: list[str] | None = None) -> int:
    """Every outcome is an exit code and at most one line on stderr: user errors 2, Ctrl-C 130, SIGTERM 143,
    a closed pipe (`tunegap runs | head`) quietly; only a bug in tunegap shows a traceback."""
    previous = _install_handlers()
    previous_unraisable_hook, sys.unraisablehook = sys.unraisablehook, _quiet_when_swallowed(sys.unraisablehook)
    _HANDLED.clear()
    try:
        return _main(argv)
    except KeyboardInterrupt as stop:  # also while imports and the parser are still being set up
        how, code = ("stopped (SIGTERM)", 143) if isinstance(stop, Stopped) else ("interrupted", 130)
        print(f"tunegap: {how}; rerun with --resume to continue a training run from its last checkpoint",
              file=sys.stderr, flush=True)
        return code
    except BrokenPipeError:  # the reader went away: no more output is wanted, and none is an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's final flush of stdout would raise again
        return 141
    finally:
        _HANDLED.set()
        sys.unraisablehook = previous_unraisable_hook
        for signum, handler in previous.items():  # main() called in-process (tests, notebooks): give them back
            signal.signal(signum, handler)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # for `--nproc N` to re-run under torchrun
    except SystemExit as done:  # --help (0) or a bad command line (2, already reported on one line)
        return done.code if isinstance(done.code, int) else 2
    try:
        return args.func(args)
    except (KeyboardInterrupt, BrokenPipeError):  # `main` reports these; matching them against _user_errors()
        raise  # would import torch again mid-way through a Ctrl-C that interrupted its import
    except _user_errors() as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"tunegap: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
