"""Generation queries/s: the batched KV-cache decoder (`tunegap.generation.decode`) against the path it replaced
(`model.generate`, left-padded batches of 16) and against `model.generate` one prompt at a time (the first 8
prompts of each workload), side by side in one process, on the default model.

    .venv/bin/python benchmarks/generation.py                 # support tickets at 0, 2 and 8 shots
    .venv/bin/python benchmarks/generation.py --queries 16 --rounds 1

Prints, per workload, the median seconds per query of each path (measured, wall clock), their ratio, and how
many replies are the same tokens (greedy, fp32, so they should all be). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tunegap.data.render import tokenize_prompt
from tunegap.data.support import generate_support, general_prompts
from tunegap.evaluate import few_shot
from tunegap.generation import decode
from tunegap.models import load_model


def before(model, prompts, *, max_new_tokens, eos, pad, batch_size=16):
    """The replaced path: `model.generate` over left-padded batches of 16 (tunegap.evaluate before 2026-12-02)."""
    replies = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=eos)
            for row in out[:, width:].tolist():
                replies.append(row[:row.index(eos) + 1] if eos in row else row)
    return replies


def workloads(tokenizer, queries: int):
    train, held = generate_support()
    tickets = held[:queries]
    out = {f"support, {k}-shot": [tokenize_prompt(tokenizer, few_shot(r["messages"], train[:k])) for r in tickets]
           for k in (0, 2, 8)}
    out["forgetting prompts"] = [tokenize_prompt(tokenizer, [{"role": "user", "content": p}])
                                 for p in general_prompts()[:queries]]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model)
    model.eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    results = {}
    print(f"{args.model}, {args.queries} queries per workload, max_new_tokens {args.max_new_tokens}, fp32, "
          f"{torch.get_num_threads()} threads; seconds per query are measured wall clock, medians of {args.rounds}")
    for name, prompts in workloads(tokenizer, args.queries).items():
        times = {"alone": [], "before": [], "after": []}
        outputs = {}
        for _ in range(args.rounds):
            for path in ("alone", "before", "after"):
                started = time.perf_counter()
                if path == "alone":
                    outputs[path] = before(model, prompts[:8], max_new_tokens=args.max_new_tokens, eos=eos, pad=pad,
                                           batch_size=1)
                elif path == "before":
                    outputs[path] = before(model, prompts, max_new_tokens=args.max_new_tokens, eos=eos, pad=pad)
                else:
                    outputs[path] = decode(model, prompts, max_new_tokens=args.max_new_tokens, eos_id=eos, pad_id=pad)
                times[path].append((time.perf_counter() - started) / len(outputs[path]))
        b, a = statistics.median(times["before"]), statistics.median(times["after"])
        alone = statistics.median(times["alone"])
        same = sum(x == y for x, y in zip(outputs["before"], outputs["after"]))
        same_alone = sum(x == y for x, y in zip(outputs["alone"], outputs["after"]))
        prompt_tokens = statistics.mean(map(len, prompts))
        results[name] = {"one_at_a_time_s_per_query": alone, "same_tokens_as_one_at_a_time": same_alone,
                         "before_s_per_query": b, "after_s_per_query": a, "speedup": b / a,
                         "same_tokens": same, "queries": len(prompts), "mean_prompt_tokens": prompt_tokens,
                         "mean_new_tokens": statistics.mean(map(len, outputs["after"]))}
        print(f"{name:>20}: one at a time {alone:6.3f}, before {b:6.3f}, after {a:6.3f} s/query (measured); after is "
              f"{b / a:5.2f}x before's and {alone / a:5.2f}x one at a time's queries/s; {same}/{len(prompts)} replies "
              f"the same tokens as before, {same_alone}/8 as one at a time; prompt {prompt_tokens:.0f} tokens")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
