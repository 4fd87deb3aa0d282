"""The one training loop: pretraining, full SFT, LoRA, freezing and the other PEFT methods all run here.

A method only decides what the model looks like and which parameters train (`methods.py`); everything
else (data order, packing, loss, schedule, checkpoints, the cost ledger) is the same code for all.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint as ckpt
from . import compiling
from .config import ConfigError, TrainConfig
from .costs.flops import ZERO, Flops, train_step_flops
from .costs.shape import ModelShape
from .distributed import start as start_parallel
from .data.packing import Batch, make_batch
from .io import append_line, atomic_write_json
from .losses import linear_cross_entropy
from .precision import FP32_ATTENTION, FP32_MATH_ATTENTION, can_store_frozen_low, fp32_attention, frozen_linears_to
from .ledger import (Totals, build_ledger, environment, format_ledger, optimizer_state_bytes, peak_rss_bytes,
                     reset_peak_rss, write_ledger)
from .methods import make_method
from .runs import index_run, run_folder

# Dollar figures assume this GPU unless the catalogue (costs/catalog.py) knows the one asked for.
FALLBACK_GPU_FLOPS = {"H100-SXM": 989e12}


class TrainingError(RuntimeError):
    """The run stopped for a reason the user must act on (non-finite loss, changed config on resume...)."""


@dataclass
class Context:
    """What the loop needs about the model besides the model itself."""

    model: object  # what the optimizer trains (a PeftModel for PEFT methods)
    base: object  # the underlying transformers causal LM
    method: object
    pad_id: int
    autocast: object  # a context-manager factory


def base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def sum_loss(ctx: Context, batch: Batch):
    """Summed next-token cross-entropy over loss-bearing tokens, in fp32.

    The vocabulary projection runs only on hidden states whose next token carries loss: prompt tokens
    need no logits, which saves FLOPs and the [tokens x vocab] logits memory. Methods that lengthen the
    sequence (prompt/prefix tuning) go through PEFT's forward instead. The head and the cross-entropy are
    fused and chunked (`losses.linear_cross_entropy`), so no [tokens x vocab] logits tensor is ever built.
    """
    import torch
    import torch.nn.functional as F

    where = batch.loss_positions  # flat indices of the loss-bearing positions (data.packing.make_batch)
    targets = batch.targets.flatten().index_select(0, where)
    at_loss = lambda t: t.flatten(0, 1).index_select(0, where)  # noqa: E731  [rows, width, ...] -> [n_loss, ...]
    with ctx.autocast():
        if ctx.method.changes_sequence:
            logits = ctx.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               use_cache=False).logits[:, -batch.width:]
            logits = at_loss(logits)
        else:
            hidden = ctx.base.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids,
                                            attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
            head = ctx.base.get_output_embeddings()
            if isinstance(head, torch.nn.Linear) and head.bias is None:  # fused + chunked: no logits tensor
                return linear_cross_entropy(at_loss(hidden), head.weight, targets)
            logits = head(at_loss(hidden))
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def step_flops(shape: ModelShape, trainable, ctx: Context, batch: Batch, checkpointing: bool) -> Flops:
    logit_tokens = None if ctx.method.changes_sequence else batch.n_loss_tokens
    math_attention = getattr(ctx.base.config, "_attn_implementation", None) == FP32_MATH_ATTENTION
    return train_step_flops(shape, trainable, sequences=batch.rows, seq_len=batch.width,
                            logit_tokens=logit_tokens, checkpointing=checkpointing,
                            attention_rescore=not math_attention)


def checkpoint_activations(base) -> None:
    """Hugging Face's activation checkpointing, non-reentrant (torch.utils.checkpoint's recommended mode).

    transformers also hooks the embeddings so that their output requires grad, which only reentrant
    checkpointing needs; with frozen embeddings that hook makes autograd compute the first block's input
    gradient for nothing (2-layer LoRA model: counted FLOPs 1.027x the formula with the hook, 1.0 without).
    """
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.disable_input_require_grads()


def heldout_loss(ctx: Context, examples, batch_size: int, seq_len: int) -> float | None:
    """Mean cross-entropy per loss-bearing token on held-out examples (nats/token)."""
    if not examples:
        return None
    total, count = heldout_sums(ctx, examples, batch_size, seq_len)
    return total / max(count, 1)


def heldout_sums(ctx: Context, examples, batch_size: int, seq_len: int, *, share=None, loss=sum_loss
                 ) -> tuple[float, int]:
    """Summed loss and loss-token count over held-out batches; `share(batch)` picks this process's part of each
    batch under torchrun (`loss` then runs through DDP/FSDP). Under FSDP every rank must run the same number
    of forward passes (each all-gathers weights), so a rank with an empty share evaluates one example and
    discards it."""
    import torch

    was_training = ctx.model.training
    ctx.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            mine = share(chunk) if share else chunk
            batch = make_batch(mine or chunk[:1], capacity=seq_len, pad_id=ctx.pad_id,
                               pack=not ctx.method.changes_sequence)
            value = float(loss(ctx, batch))
            if mine:
                total += value
                count += batch.n_loss_tokens
    ctx.model.train(was_training)
    return total, count


class DataOrder:
    """Which examples micro-batch i holds: a fresh seeded permutation per epoch, reproducible after resume."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed, self._perms = n, batch_size, seed, {}

    def _perm(self, epoch: int):
        import torch

        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def micro_batch(self, index: int) -> list[int]:
        start = index * self.batch_size
        return [self._perm(k // self.n)[k % self.n] for k in range(start, start + self.batch_size)]

    def epochs_done(self, micro_batches: int) -> float:
        return micro_batches * self.batch_size / self.n


def lr_lambda(config: TrainConfig, total_steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "constant" or total_steps <= warmup:
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine to zero (Loshchilov & Hutter 2017)

    return factor


def total_steps(config: TrainConfig, n_examples: int, mean_tokens: float) -> int:
    per_step = config.batch_size * config.grad_accum
    if config.max_steps:
        steps = config.max_steps
    elif config.budget_tokens:
        if config.budget_tokens < mean_tokens * per_step:  # rounding up would silently spend more than asked
            raise ConfigError(f"--budget-tokens {config.budget_tokens:,} is less than one optimizer step (about "
                              f"{mean_tokens * per_step:,.0f} tokens: --batch-size x --grad-accum x "
                              f"{mean_tokens:.0f} mean tokens per example); raise it or lower --batch-size")
        steps = math.ceil(config.budget_tokens / (mean_tokens * per_step))
    else:
        steps = math.ceil(config.epochs * n_examples / per_step)
    if steps <= 0:
        raise ConfigError("the settings give zero optimizer steps; raise --epochs, --max-steps or --budget-tokens")
    return steps


def choose_precision(config: TrainConfig, peaks) -> str:
    return peaks.best_precision if config.precision == "auto" else config.precision


def autocast_factory(precision: str, device: str = "cpu"):
    import torch

    if precision == "bf16":
        return lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext


def gpu_flops_per_s(gpu: str) -> float:
    try:
        from .costs.catalog import gpu_peak_flops  # the shipped GPU catalogue, when present

        return gpu_peak_flops(gpu, "bf16")
    except (ImportError, KeyError, ValueError):
        return FALLBACK_GPU_FLOPS.get(gpu, FALLBACK_GPU_FLOPS["H100-SXM"])


def train(config: TrainConfig, *, on_step=None) -> dict:
    """Run (or resume) one training run and return its ledger; everything lands in runs/<name>/."""
    held: list = []  # the run lock, released however _train ends (a kill releases it too: see _lock_run)
    try:
        return _train(config, on_step=on_step, held=held)
    finally:
        for handle in held:
            if handle is not None:
                handle.close()


def _train(config: TrainConfig, *, on_step, held: list) -> dict:
    import torch
    from tqdm.auto import tqdm

    from .costs.hardware import measure_peaks
    from .data.sources import prepare
    from .models import count_parameters, load_model

    started = time.perf_counter()
    par = start_parallel(config)  # one process, or one rank of a torchrun job (tunegap/distributed.py)
    name = config.name or f"{config.method}-{Path(config.model).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    name = par.broadcast(name)  # every rank uses rank 0's (time-stamped) name
    folder = run_folder(config.runs_dir, name)
    config_dict = {**config.to_dict(), "name": name}
    if par.enabled:  # the processes per node this run really has, however torchrun was invoked
        config_dict["nproc"] = par.local_world_size
    checkpoints = folder / "checkpoints"
    if config.resume:
        saved = folder / "config.json"
        if saved.is_file():
            import json

            old = json.loads(saved.read_text())
            if ckpt.config_hash(old) != ckpt.config_hash(config_dict):
                changed = sorted(k for k in config_dict if k in old and old[k] != config_dict[k]
                                 and k not in ("resume", "progress", "threads", "compile"))
                raise TrainingError(f"{saved}: --resume with changed settings {changed}; use the original ones "
                                    "or a new --name")
    elif (folder / "ledger.json").exists() or par.list_checkpoints(checkpoints):
        raise TrainingError(f"{folder}: run exists; pass --resume to continue it or choose another --name")
    par.barrier()  # every rank has checked before rank 0 writes
    if par.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        held.append(_lock_run(folder))
        _remove_temporaries(folder)
        atomic_write_json(folder / "config.json", config_dict)

    torch.set_num_threads(par.threads(config.threads) if par.enabled else config.threads or os.cpu_count() or 1)
    torch.manual_seed(config.seed)
    peaks = par.from_main(measure_peaks, par.device_type) if par.enabled else measure_peaks()
    precision = choose_precision(config, peaks)

    model, tokenizer = load_model(config.model, init=config.init, seed=config.seed,
                                  trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle)
    shape = ModelShape.from_hf_config(model.config)
    method = make_method(config.method, **config.method_options())
    method.check(shape)
    data = prepare(config, tokenizer)
    cut = data.stats.get("train", {}) if data.kind == "sft" else {}
    if par.is_main and (cut.get("n_dropped") or cut.get("n_truncated")):  # counted, never silent; said once
        print(f"tunegap: {name}: {cut.get('n_dropped', 0)} training examples skipped (no reply token within --seq-len "
              f"{config.seq_len}{', or longer with --drop-long' if config.drop_long else ''}), "
              f"{cut.get('n_truncated', 0)} truncated to it (counted)", flush=True)
    context = shape.max_position_embeddings or 1 << 30
    if config.seq_len + (getattr(method, "virtual_tokens", 0) if method.changes_sequence else 0) > context:
        raise ConfigError(f"--seq-len {config.seq_len} (plus any virtual tokens) exceeds the model's context of "
                          f"{context} tokens")

    model = method.prepare(model, shape)
    base = base_model(model)
    low_frozen = can_store_frozen_low(method, precision, par.enabled)
    if low_frozen:  # no per-step autocast casts of frozen weights (tunegap/precision.py)
        frozen_linears_to(base, torch.bfloat16, keep=[base.get_output_embeddings()])
    if precision == "bf16" and par.device_type == "cpu":  # this CPU's attention kernel is faster in fp32
        fp32_attention(base)
    if config.activation_checkpointing:
        checkpoint_activations(base)
    model.train()
    trainable = method.trainable(shape)
    params_total, params_trainable = count_parameters(model)
    ctx = Context(model, base, method, tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                  else tokenizer.eos_token_id, autocast_factory(precision, par.device_type))
    par.wrap(ctx)  # DDP, or FSDP2 (which turns the parameters into sharded DTensors in place)

    trained = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel per tensor instead of a Python loop of elementwise ops on the CPU (measured on the
    # default model's 134.5M parameters, 1 thread: 0.13 s per step fused vs 0.84 s foreach); the sharded
    # DTensors of a distributed run keep the foreach path
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.999), **({"foreach": True} if par.enabled else {"fused": True}))
    mean_tokens = sum(len(e) for e in data.train) / len(data.train)
    steps = total_steps(config, len(data.train), mean_tokens)
    warmup = config.warmup_steps or max(1, round(0.05 * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, steps, warmup))
    order = DataOrder(len(data.train), config.batch_size, config.seed)
    compiled_layers, compile_why = _maybe_compile(config, method, par.enabled, base, steps, shape, trainable,
                                                      mean_tokens, peaks, precision, is_main=par.is_main)

    totals = Totals()
    if par.is_main:
        ckpt.clean_staging(checkpoints)
    par.barrier()
    existing = par.list_checkpoints(checkpoints) if config.resume else []
    if existing:
        load = par.load_checkpoint if par.enabled else ckpt.load_checkpoint  # DCP when distributed
        progress = load(existing[-1], model=model, optimizer=optimizer, scheduler=scheduler,
                        expect_config_hash=ckpt.config_hash(config_dict))
        totals = Totals.from_dict(progress["totals"])
        totals.events.append({"event": "resumed", "from_step": totals.steps, "at": time.time()})
    elif config.resume and par.is_main:
        (folder / "metrics.jsonl").unlink(missing_ok=True)
    earlier_wall = totals.wall_seconds  # a resumed run's ledger counts every segment's wall time, not the last
    metrics_path = folder / "metrics.jsonl"
    if existing and par.is_main:  # drop log lines of steps after the checkpoint: they will be redone
        from .io import atomic_write_text, read_jsonl

        kept = [r for r in read_jsonl(metrics_path) if r.get("step", 0) <= totals.steps and not r.get("final")]
        import json

        atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    if par.is_main:
        print(f"tunegap: {name}: {config.method} on {config.model} ({params_total:,} parameters, "
              f"{params_trainable:,} trainable = {100 * params_trainable / params_total:.3g}%, measured); "
              f"{len(data.train):,} examples, {steps} steps planned; precision {precision} "
              f"({peaks.how} peaks: fp32 {peaks.fp32_flops_per_s / 1e9:.0f}, bf16 {peaks.bf16_flops_per_s / 1e9:.0f} "
              "GFLOP/s)", flush=True)
    if par.enabled and par.is_main:
        print(f"tunegap: {name}: {par.describe()}", flush=True)

    def ledger_now(status: str, metrics: dict) -> dict:
        return par.annotate(build_ledger(
            run_name=name, status=status, config=config_dict, method=method.to_dict(), shape=shape.to_dict(),
            peaks=peaks.to_dict(), precision=precision, params_total=params_total,
            params_trainable=params_trainable,
            weights_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
            gradient_bytes=sum(p.numel() * p.element_size() for p in trained),
            optimizer_bytes=optimizer_state_bytes(optimizer), totals=totals,
            data_stats={**data.stats, "epochs": order.epochs_done(totals.steps * config.grad_accum),
                        "train_examples": len(data.train), "kind": data.kind},
            peak_memory=peak_rss_bytes(), peak_memory_how="measured",
            wall_seconds=earlier_wall + time.perf_counter() - started,
            gpu=config.gpu, gpu_price=config.gpu_price, gpu_flops_per_s=gpu_flops_per_s(config.gpu),
            metrics=metrics, environment_info=environment(), compiled=compile_why))

    @contextlib.contextmanager
    def writing(what: str):
        """A failed write (disk full, quota, I/O error) stops the run with one clear line and a ledger event;
        the atomic writes guarantee the previous checkpoint and ledger are still whole."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - OSError, or RuntimeError from torch's zip writer
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            totals.events.append({"event": "write failed", "what": what, "error": detail, "at": time.time()})
            with contextlib.suppress(Exception):  # the disk may still be full: best effort, atomic either way
                if par.is_main:
                    write_ledger(folder / "ledger.json", ledger_now("failed: write error", {}))
            good = par.list_checkpoints(checkpoints)
            kept = f"the last good checkpoint {good[-1]} is intact" if good else "no checkpoint had been written yet"
            raise TrainingError(f"{name}: could not write {what}: {detail}; stopped, {kept}. Free space and rerun "
                                "with --resume") from err

    def save(step: int) -> None:
        totals.wall_seconds = earlier_wall + time.perf_counter() - started
        with writing(f"checkpoint step-{step:06d}"):
            (par.save_checkpoint if par.enabled else ckpt.save_checkpoint)(  # DCP when distributed
                checkpoints, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                 progress={"step": step, "totals": totals.to_dict(),
                                           "config_hash": ckpt.config_hash(config_dict)},
                                 keep=config.keep_checkpoints)

    reset_peak_rss()
    par.reset_peak_memory()
    bar = tqdm(total=steps, initial=totals.steps, desc=name, unit="step",
               disable=not config.progress or not par.is_main, dynamic_ncols=True)
    eval_loss = None
    sample_every = config.count_flops_every
    while totals.steps < steps:
        if config.budget_tokens and totals.tokens >= config.budget_tokens:
            break
        step = totals.steps + 1
        t0 = time.perf_counter()
        batches = [make_batch([data.train[i] for i in par.shard(order.micro_batch((step - 1) * config.grad_accum + m))],
                              capacity=config.seq_len, pad_id=ctx.pad_id, pack=config.pack and not method.changes_sequence)
                   for m in range(config.grad_accum)]
        n_loss = sum(b.n_loss_tokens for b in batches)
        flops = sum((step_flops(shape, trainable, ctx, b, config.activation_checkpointing) for b in batches), ZERO)
        step_examples, step_tokens = sum(b.n_examples for b in batches), sum(b.n_tokens for b in batches)
        step_padding = sum(b.rows * b.width - b.n_tokens for b in batches)
        if par.enabled:  # the whole step's counts, summed over ranks: the loss is normalised by all its loss tokens
            n_loss, step_examples, step_tokens, step_padding, flops = par.step_sums(
                n_loss, step_examples, step_tokens, step_padding, flops)
        count = step == 1 or step == steps or (sample_every and step % sample_every == 0)
        counted = None
        if count and compiled_layers:  # compiled kernels are invisible to a dispatch mode: count a fake replay
            from .costs.counted import count_on_fake_tensors

            counted = count_on_fake_tensors(lambda: [torch.autograd.grad(sum_loss(ctx, b) / max(n_loss, 1), trained)
                                                     for b in batches])
        counter_cm = _flop_counter() if count and not compiled_layers else contextlib.nullcontext(None)
        loss_sum = 0.0
        with counter_cm as counter:
            for m, batch in enumerate(batches):
                with par.accumulating(m < len(batches) - 1):  # gradients travel once per step
                    loss = par.loss(ctx, batch)  # sum_loss(ctx, batch), through DDP/FSDP when distributed
                    (loss / max(n_loss, 1)).backward()  # mean over the step's loss tokens (torchtune's scaling)
                loss_sum += float(loss.detach())
        step_loss = par.total(loss_sum) / max(n_loss, 1)
        if not math.isfinite(step_loss):
            totals.events.append({"event": "non-finite loss", "step": step, "loss": str(step_loss), "at": time.time()})
            if par.is_main:
                write_ledger(folder / "ledger.json", ledger_now("failed: non-finite loss", {}))
            bar.close()
            raise TrainingError(f"{name}: loss became {step_loss} at step {step}; stopped. The last good checkpoint "
                                f"in {checkpoints} is intact; lower --lr or check the data")
        grad_norm = (torch.nn.utils.clip_grad_norm_(trained, config.clip) if config.clip
                     else torch.sqrt(sum((p.grad.float() ** 2).sum() for p in trained if p.grad is not None)))
        grad_norm = par.plain(grad_norm)  # FSDP: a DTensor
        if not math.isfinite(float(grad_norm)):  # a finite loss can still overflow in backward: never apply it
            totals.events.append({"event": "non-finite gradient", "step": step, "grad_norm": str(float(grad_norm)),
                                  "loss": step_loss, "at": time.time()})
            if par.is_main:
                write_ledger(folder / "ledger.json", ledger_now("failed: non-finite gradient", {}))
            bar.close()
            raise TrainingError(f"{name}: gradient norm became {float(grad_norm)} at step {step} (loss {step_loss:.4g}); "
                                f"stopped before the update. The last good checkpoint in {checkpoints} is intact; "
                                "lower --lr or check the data")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0

        totals.steps = step
        totals.examples += step_examples
        totals.tokens += step_tokens
        totals.loss_tokens += n_loss
        totals.padding_tokens += step_padding
        totals.train_seconds += seconds
        totals.flops = totals.flops + flops
        totals.step_seconds.append(seconds)
        if counter is not None:
            counted = counter.get_total_flops()
        if counted is not None:
            totals.counted_flops += par.total(counted)
            totals.formula_flops_on_counted_steps += flops.hardware
            totals.counted_steps.append(step)
        row = {"step": step, "loss": step_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
               "tokens": totals.tokens, "loss_tokens": totals.loss_tokens, "flops": totals.flops.total,
               "seconds": seconds, "tokens_per_s": step_tokens / seconds}
        if config.eval_every and step % config.eval_every == 0 and step < steps:
            with compiling.eager():  # no compile for no_grad shapes
                eval_loss = par.heldout_loss(ctx, data.eval, config.batch_size, config.seq_len)
            row["eval_loss"] = eval_loss
        if par.is_main:
            with writing("metrics.jsonl"):
                append_line(metrics_path, _json(row))
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < steps:
            save(step)
            with writing("ledger.json"):
                if par.is_main:
                    write_ledger(folder / "ledger.json", ledger_now("running", {"train_loss": step_loss}))
        if on_step:
            on_step(step)
    bar.close()
    train_peak = par.peak_memory(peak_rss_bytes(), optimizer)  # distributed: every rank's, the largest returned
    if compiled_layers:  # evaluation and generation run eagerly, with the eager attention kernel
        compiling.decompile(compiled_layers)
        if getattr(base.config, "_attn_implementation", None) == FP32_MATH_ATTENTION:
            fp32_attention(base)
    if low_frozen:  # back to fp32 (exactly the bf16 values training used) for evaluation and generation
        frozen_linears_to(base, torch.float32, keep=[base.get_output_embeddings()])

    save(totals.steps)
    metrics = {"train_loss": _last_loss(metrics_path)}
    eval_loss = par.heldout_loss(ctx, data.eval, config.batch_size, config.seq_len)
    metrics["eval_loss"] = eval_loss
    exported = par.export(ctx, config, shape)  # (model, base) with full weights; FSDP shards gathered to rank 0
    if not par.is_main:
        return par.broadcast(None)  # rank 0 writes the outputs; every rank returns its ledger
    model, base = exported
    with writing("metrics.jsonl"):
        _append_final_eval(metrics_path, totals.steps, eval_loss)
    if data.eval_records and config.generate_examples and config.data == "support":
        from .evaluate import support_metrics

        # generated without autocast: decoding one token at a time, casting every weight to bf16 on each
        # step costs more than the bf16 matmul saves
        metrics.update(support_metrics(model, tokenizer, data.eval_records[:config.generate_examples]))
    with writing("the trained weights"):
        save_outputs(folder, model, base, tokenizer, method)
    if config.forgetting:  # drift from the base model on unrelated prompts (tunegap.analysis.forgetting)
        from .analysis.forgetting import forgetting_after_training

        metrics.update(forgetting_after_training(config, model, tokenizer, data.kind))
    ledger = ledger_now("completed", metrics)
    ledger["costs"]["peak_memory_bytes"]["value"] = train_peak  # training peak, not the later evaluation
    with writing("ledger.json"):
        write_ledger(folder / "ledger.json", ledger)
    index_run(config.runs_dir, ledger, folder / "ledger.json")
    return par.broadcast(ledger)


def _lock_run(folder: Path):
    """An exclusive lock on the run while `train` runs: a second `--resume` of the same run (a scheduler
    restarting a job whose first copy still runs) would interleave two sets of checkpoints.
    The kernel drops the lock when the process dies, even by SIGKILL, so a killed run never stays locked."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    handle = open(folder / ".lock", "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise TrainingError(f"{folder}: another process is training this run now; wait for it or stop it") from None
    return handle


def _remove_temporaries(folder: Path) -> None:
    """Hidden leftovers of writes a kill interrupted (.ledger.json.*.tmp, .adapter.*): safe to delete under
    the run lock, since only this process writes here."""
    import shutil

    for p in folder.iterdir():
        if p.name.startswith(".") and p.name != ".lock":
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def _maybe_compile(config, method, distributed: bool, base, steps: int, shape, trainable, mean_tokens: float,
                   peaks, precision: str, *, is_main: bool) -> tuple[list, str]:
    """Compile the decoder layers when --compile asks for it (tunegap/compiling.py); the compiled layers."""
    from .estimate import DEFAULT_MFU

    step = train_step_flops(shape, trainable, sequences=config.batch_size * config.grad_accum,
                            seq_len=max(1, round(mean_tokens)), checkpointing=config.activation_checkpointing)
    peak = peaks.bf16_flops_per_s if precision == "bf16" else peaks.fp32_flops_per_s
    estimated = steps * (step.total + step.recompute) / (peak * DEFAULT_MFU)
    on, why = compiling.decide(config.compile, method=method, distributed=distributed, estimated_seconds=estimated,
                               decoder=base.get_decoder())
    if on:
        failure = compiling.check_compiler()
        if failure and config.compile == "on":
            raise ConfigError(f"--compile on: torch.compile fails here: {failure}")
        if failure:
            on, why = False, f"off (auto: torch.compile fails here: {failure})"
    if is_main and on:  # an auto "off" is in the ledger's "compiled" field, not worth a line
        print(f"compile: {why}", flush=True)
    if not on:
        return [], why
    if getattr(base.config, "_attn_implementation", None) == FP32_ATTENTION:
        fp32_attention(base, math=True)  # fused by Inductor: faster than the flash kernel once compiled
    return compiling.compile_layers(base.get_decoder()), why


def _flop_counter():
    from .costs.counted import count_flops

    return count_flops()


def _json(row: dict) -> str:
    import json

    return json.dumps(row)


def _last_loss(metrics_path: Path):
    from .io import read_jsonl

    rows = [r for r in read_jsonl(metrics_path) if "loss" in r]
    return rows[-1]["loss"] if rows else None


def _append_final_eval(metrics_path: Path, step: int, eval_loss) -> None:
    if eval_loss is not None:
        append_line(metrics_path, _json({"step": step, "eval_loss": eval_loss, "final": True}))


def save_outputs(folder: Path, model, base, tokenizer, method) -> None:
    """A PEFT adapter for PEFT methods (plain `PeftModel.from_pretrained` loads it), else safetensors weights."""
    from safetensors.torch import save

    from .io import atomic_dir, atomic_write_bytes

    # Built in a hidden folder and renamed into place: a kill never leaves a half-written model to load.
    if method.saves_adapter:
        with atomic_dir(folder / "adapter") as staging:
            model.save_pretrained(staging)  # adapter_config.json + adapter_model.safetensors
    elif method.name == "adapter":
        atomic_write_bytes(folder / "bottleneck_adapter.safetensors", save(ckpt.trainable_state(model)))
    else:
        with atomic_dir(folder / "model") as staging:
            base.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)


def print_summary(ledger: dict) -> None:
    print(format_ledger(ledger), flush=True)
