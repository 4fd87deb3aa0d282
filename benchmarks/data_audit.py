"""`tunegap data audit` on 100k synthetic SFT rows: the goal is under a minute on 2 CPU cores.

    .venv/bin/python benchmarks/data_audit.py                 # 100,000 rows, the default model's tokenizer
    .venv/bin/python benchmarks/data_audit.py --rows 20000 --model tiny

Generates rows like support tickets (a prompt of 8-20 words, a reply of 30-120), with 2% exact copies and 2%
near copies (one word changed) so both duplicate paths do real work, plus a 1,000-row eval file of which 5% is
copied from training. Prints the wall time of the whole command (measured, including Python's imports and
loading the tokenizer) and the audit's own time. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("ticket refund portal password invoice printer router laptop screen battery cable warranty order parcel "
         "courier account billing upgrade license backup restore update driver monitor keyboard mouse network "
         "wifi email calendar storage folder share permission admin reset login session browser cache cookie "
         "payment card bank transfer delivery address phone number support agent reply status pending closed "
         "open urgent normal low high priority escalate resolve").split()


def synthetic(rows: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    train = [json.dumps({"prompt": words(rng.randint(8, 20)), "response": words(rng.randint(30, 120))})
             for _ in range(rows)]
    for i in range(0, rows, 50):  # 2% exact copies
        train[i + 1] = train[i]
    for i in range(25, rows, 50):  # 2% near copies: one word of the reply changed
        row = json.loads(train[i - 1])
        reply = row["response"].split()
        reply[len(reply) // 2] = "zebra"
        train[i] = json.dumps({**row, "response": " ".join(reply)})
    evals = [train[i] if i % 20 == 0 else json.dumps({"prompt": words(12), "response": words(60)})
             for i in range(1000)]
    return train, evals


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        train, evals = synthetic(args.rows)
        (Path(folder) / "train.jsonl").write_text("\n".join(train) + "\n")
        (Path(folder) / "eval.jsonl").write_text("\n".join(evals) + "\n")
        command = [sys.executable, "-m", "tunegap", "data", "audit", str(Path(folder) / "train.jsonl"),
                   "--eval", str(Path(folder) / "eval.jsonl"), "--model", args.model, "--json",
                   "--chart", str(Path(folder) / "lengths.png")]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - started
    if done.returncode != 0:
        print(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
        return done.returncode
    result = json.loads(done.stdout)
    print(f"{args.rows:,} rows, {result['tokens']['total']:,} tokens ({args.model} tokenizer): command wall time "
          f"{wall:.1f} s (measured), audit itself {result['seconds']['value']:.1f} s (measured); exact duplicates "
          f"{result['exact_duplicates']['rows']:,}, near {result['near_duplicates']['rows']:,}, eval overlap "
          f"{result['contamination']['exact']:,} exact + {result['contamination']['near']:,} near")
    return 0


if __name__ == "__main__":
    sys.exit(main())
