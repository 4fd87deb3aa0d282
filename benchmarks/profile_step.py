"""Where a training step's time goes: torch.profiler over a few steady steps of a real tunegap run, grouped.

    .venv/bin/python benchmarks/profile_step.py                  # LoRA on the default model, steps 3-6
    .venv/bin/python benchmarks/profile_step.py --method full --model tiny
    .venv/bin/python benchmarks/profile_step.py --compile on      # the compiled step (tunegap/compiling.py)

Self time per step of each group of ops, measured; the groups are those of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import tempfile

ELEMENTWISE = {"aten::mul", "aten::add", "aten::add_", "aten::silu", "aten::silu_backward", "aten::pow", "aten::mean",
               "aten::rsqrt", "aten::neg", "aten::cat", "aten::sum", "aten::div", "aten::sub", "aten::exp",
               "aten::exp_", "aten::where", "aten::mul_", "aten::div_", "aten::sqrt", "aten::fill_", "aten::zero_",
               "aten::_log_softmax", "aten::logsumexp", "aten::gather", "aten::scatter_add_", "aten::clamp_min"}
CASTS = {"aten::copy_", "aten::_to_copy", "aten::to"}


def group(event, rank: int, vocab: int) -> str:
    shapes = [s for s in event.input_shapes if s]
    if event.key == "aten::mm":
        if any(len(s) == 2 and rank in s for s in shapes):
            return f"matmul, LoRA rank-{rank} (A and B)"
        if any(vocab in s for s in shapes):
            return "matmul, vocabulary head"
        return "matmul, projections"
    if "scaled_dot_product" in event.key or "flash_attention" in event.key:
        return "attention kernel (forward + backward)"
    if event.key in ("aten::bmm", "aten::baddbmm"):
        return "attention, math backend's batched matmuls"
    if "CompiledFxGraph" in event.key or "Compiled" in event.key:
        return "compiled fused kernels (norms, rotary, SiLU, casts, residuals)"
    if event.key in CASTS:
        return "dtype casts / copies"
    if event.key in ELEMENTWISE:
        return "elementwise (norms, rotary, SiLU, residuals, loss)"
    return "other (optimizer, framework overhead)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--first", type=int, default=3, help="first profiled step (earlier ones warm up)")
    parser.add_argument("--steps", type=int, default=4, help="profiled steps")
    parser.add_argument("--compile", default="off", choices=("auto", "on", "off"))
    args = parser.parse_args(argv)

    from torch.profiler import profile

    from tunegap.config import TrainConfig
    from tunegap.trainer import train

    prof = profile(record_shapes=True)

    def on_step(step: int) -> None:
        if step == args.first - 1:
            prof.start()
        if step == args.first - 1 + args.steps:
            prof.stop()

    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(model=args.model, method=args.method, data="support", seq_len=128, batch_size=8,
                             max_steps=args.first + args.steps, lr=2e-4, eval_examples=8, generate_examples=0,
                             forgetting=False, runs_dir=tmp, name="profile", progress=False, compile=args.compile)
        ledger = train(config, on_step=on_step)
    vocab = ledger["shape"]["vocab_size"]
    totals: collections.Counter = collections.Counter()
    for event in prof.key_averages(group_by_input_shape=True):
        totals[group(event, config.rank, vocab)] += event.self_cpu_time_total / args.steps / 1e6
    total = sum(totals.values())
    print(f"{args.method} on {args.model} ({ledger['compiled']}): {total:.2f} s/step of profiled self time "
          f"(measured, steps {args.first}-{args.first + args.steps - 1})")
    for name, seconds in totals.most_common():
        print(f"  {name:52} {seconds:6.3f} s  {100 * seconds / total:5.1f}%")


if __name__ == "__main__":
    main()
