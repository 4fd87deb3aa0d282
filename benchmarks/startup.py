"""Where a short run's time goes outside its steps: a 1-step fine-tune of the default model, phase by phase.

    .venv/bin/python benchmarks/startup.py                  # LoRA, 1 step, the defaults' evaluations
    .venv/bin/python benchmarks/startup.py --method full --steps 2

Prints the trainer's own phase timings (`phase_seconds` in the ledger, measured wall clock) and the process's
wall time from start to exit, which includes Python's imports. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="lora")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--extra", default="", help="more finetune flags, e.g. '--forgetting on'")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as runs:
        command = [sys.executable, "-m", "tunegap", "finetune", "--model", args.model, "--method", args.method,
                   "--max-steps", str(args.steps), "--runs-dir", runs, "--name", "startup", "--no-progress",
                   *args.extra.split()]
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        ledger = json.loads((Path(runs) / "startup" / "ledger.json").read_text())
    phases = ledger["timings"]["phase_seconds"]
    steps = phases.pop("steps", 0.0)
    print(f"{args.method}, {args.steps} step(s) on {args.model}: process wall {wall:.1f} s (measured), of which "
          f"steps {steps:.1f} s and outside the steps {wall - steps:.1f} s")
    for phase, seconds in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"  {phase:<28} {seconds:6.2f} s (measured)")
    accounted = steps + sum(phases.values())
    print(f"  {'imports, CLI, ledger, index':<28} {wall - accounted:6.2f} s (measured: the rest of the wall time)")
    step_times = ledger.get("costs", {}).get("train_time_s", {}).get("value")
    print(f"  training steps: {step_times:.2f} s (measured), predicted "
          f"{ledger['timings'].get('predicted_seconds', {}).get('training', float('nan')):.2f} s (estimate)")


if __name__ == "__main__":
    main()
