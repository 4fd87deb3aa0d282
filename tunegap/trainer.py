"""The one Trainer: pretraining, full SFT, LoRA, freezing, the other PEFT methods and every objective run here.

It composes small objects and knows nothing else about them (torchtitan's trainer, torchtune's recipe and
components):
  * a method (`methods/`) prepares the model and says what trains, for the cost formulas;
  * an objective (`objectives/`) builds batches and returns the summed loss, its normaliser and the step's FLOPs;
  * a strategy (`strategies/`) says where the step runs: one device, or a torchrun rank under DDP or FSDP2;
  * a checkpointer (`checkpoint.py`) writes and restores the run, locally or with torch.distributed.checkpoint;
  * callbacks (`callbacks/`) add held-out loss, task metrics and forgetting to the log and the ledger.
Phases: `setup` (run folder, model, optimizer), `resume`, `train_step` (flat, as in nanoGPT), `finish`
(evaluation, outputs, ledger). Everything lands in runs/<name>/.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from . import compiling
from .callbacks import default_callbacks
from .checkpoint import Checkpointer, clean_staging, recorded_choices
from .config import ConfigError, TrainConfig, changed_settings, run_identity
from .costs.catalog import EstimateError, gpu_peak_flops
from .costs.counted import count_flops, count_on_fake_tensors
from .costs.flops import ZERO, train_step_flops
from .costs.hardware import DEFAULT_MFU, measure_peaks
from .costs.memory import TrainSetup, memory_per_device
from .costs.shape import ModelShape
from .io import DamagedFileError, append_line, atomic_write_json, atomic_write_text, read_json, read_jsonl
from .ledger import (Totals, build_ledger, environment, format_ledger, optimizer_state_bytes, peak_rss_bytes,
                     reset_peak_rss, write_ledger)
from .methods import make_method
from .models import base_model, checkpoint_activations, count_parameters, parameter_bytes, physical_memory
from .objectives import Context, make_objective
from .objectives.pairs import PairObjective
from .outputs import load_start_model, save_outputs
from .predict import WRITE_BYTES_PER_S, Forecast, minutes, probe_forward, training_seconds
from .precision import (FP32_ATTENTION, FP32_MATH_ATTENTION, autocast_factory, can_store_frozen_low,
                        choose_precision, fp32_attention, frozen_linears_to)
from .runs import RunIndexError, default_run_name, index_run, run_folder
from .schedule import DataOrder, lr_lambda, total_steps, warmup_steps
from .strategies import start as start_strategy


class TrainingError(RuntimeError):
    """The run stopped for a reason the user must act on (non-finite loss, changed config on resume...)."""


def train(config: TrainConfig, *, method=None, objective=None, callbacks=None, on_step=None) -> dict:
    """Run (or resume) one training run and return its ledger. `method`, `objective` and `callbacks` default to
    the ones the config names (`--method`, `--objective`) and `callbacks.default_callbacks(config)`."""
    return Trainer(config, method=method, objective=objective, callbacks=callbacks).run(on_step=on_step)


def run_or_reuse(config: TrainConfig, *, name: str | None = None, prefix: str = "run", what: str = "run"
                 ) -> tuple[Path, dict]:
    """Train `config` as run `name` (default `<prefix>-<identity>`), or return the finished run of the same
    settings. A run of the same settings that was killed resumes from its newest checkpoint; a run of that
    name with other settings is replaced (the caller owns the name)."""
    name = name or f"{prefix}-{run_identity(config.to_dict())[:8]}"
    folder = run_folder(config.runs_dir, name)
    ledger = finished_ledger(config, name=name)
    if ledger is not None:
        print(f"tunegap: reusing {what} {name} (same settings, already run: {folder})", flush=True)
        return folder, ledger
    saved = _read_json(folder / "config.json")
    # a run of the same settings that was killed resumes from its newest checkpoint (or from step 0 with its
    # log cleared when it has none); a run of that name with other settings is replaced
    resume = saved is not None and run_identity(saved) == run_identity({**config.to_dict(), "name": name})
    if not resume and folder.exists():
        shutil.rmtree(folder)
    return folder, train(replace(config, name=name, resume=resume))


def finished_ledger(config: TrainConfig, *, name: str | None = None, prefix: str = "run") -> dict | None:
    """The ledger of the completed run of these settings that `run_or_reuse` would reuse, else None (sweeps
    count such runs as free when they predict their duration)."""
    name = name or f"{prefix}-{run_identity(config.to_dict())[:8]}"
    folder = run_folder(config.runs_dir, name)
    saved = _read_json(folder / "config.json")
    if saved is None or run_identity(saved) != run_identity({**config.to_dict(), "name": name}):
        return None
    ledger = _read_json(folder / "ledger.json")
    return ledger if ledger and ledger.get("status") == "completed" else None


def _read_json(path: Path) -> dict | None:
    """A run's own JSON object, or None when it is missing or damaged (the caller then starts afresh)."""
    try:
        return read_json(path)
    except DamagedFileError:
        return None


class Trainer:
    def __init__(self, config: TrainConfig, *, method=None, objective=None, callbacks=None, strategy=None):
        self.config = config
        self.method = method or make_method(config.method, **config.method_options())
        self.objective = objective or make_objective(config.objective, **config.to_dict())
        self.callbacks = default_callbacks(config) if callbacks is None else list(callbacks)
        self.strategy = strategy
        self.totals = Totals()
        self._lock = None
        self.phase_seconds: dict[str, float] = {}  # where the time outside the steps goes (measured)

    @contextlib.contextmanager
    def timed(self, phase: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.perf_counter() - started

    # ------------------------------------------------------------------------------------------ run
    def run(self, *, on_step=None) -> dict:
        self.started = time.perf_counter()
        try:
            self.setup()
            with self.timed("resume"):
                self.resume()
            self.plan()
            self.announce()
            for callback in self.callbacks:
                callback.on_train_start(self)
            with self.timed("steps"):
                self.train_loop(on_step)
            return self.finish()
        finally:
            for callback in self.callbacks:
                callback.close()
            if self._lock is not None:  # a kill releases it too (see _lock_run)
                self._lock.close()

    def setup(self) -> None:
        self.strategy = self.strategy or start_strategy(self.config)
        with self.timed("run folder"):
            self._open_run_folder()
        self._build_model()
        with self.timed("optimizer"):
            self._build_optimizer()

    def train_loop(self, on_step=None) -> None:
        reset_peak_rss()
        self.strategy.reset_peak_memory()
        config = self.config
        while self.totals.steps < self.steps:
            if config.budget_tokens and self.totals.tokens >= config.budget_tokens:
                break
            step = self.totals.steps + 1
            row = self.train_step(step)
            for callback in self.callbacks:
                row.update(callback.on_step_end(self, step, row))
            if self.strategy.is_main:
                with self.writing("metrics.jsonl"):
                    append_line(self.metrics_path, json.dumps(row))
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < self.steps:
                self.save(step)
                with self.writing("ledger.json"):
                    if self.strategy.is_main:
                        write_ledger(self.folder / "ledger.json", self.ledger_now("running",
                                                                                  {"train_loss": row["loss"]}))
            if on_step:
                on_step(step)

    # ---------------------------------------------------------------------------------------- setup
    def _open_run_folder(self) -> None:
        """Name the run, refuse a clash or a changed resume, lock the folder and write config.json."""
        config, strategy = self.config, self.strategy
        name = config.name or default_run_name(config.method, Path(config.model).name, time.strftime("%Y%m%d-%H%M%S"))
        self.name = strategy.broadcast(name)  # every rank uses rank 0's (time-stamped) name
        self.folder = folder = run_folder(config.runs_dir, self.name)
        self.config_dict = {**config.to_dict(), "name": self.name}
        if strategy.enabled:  # the processes per node this run really has, however torchrun was invoked
            self.config_dict["nproc"] = strategy.local_world_size
        self.identity = run_identity(self.config_dict)
        self.metrics_path = folder / "metrics.jsonl"
        if config.resume and (folder / "config.json").exists():
            old = read_json(folder / "config.json", what="run config")  # damaged: one line naming it
            if run_identity(old) != self.identity:
                raise TrainingError(f"{folder / 'config.json'}: --resume with changed settings "
                                    f"{changed_settings(old, self.config_dict)}; use the original ones or a new --name")
        if not config.resume:
            _refuse_existing_run(folder)
        strategy.barrier()  # every rank has checked before rank 0 writes
        if strategy.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            self._lock = _lock_run(folder)
            _remove_temporaries(folder)
            clean_staging(folder / "checkpoints")  # before the newest checkpoint's choices are read
            atomic_write_json(folder / "config.json", self.config_dict)

    def _build_model(self) -> None:
        """Precision from the measured peaks, the model, the objective's and the method's changes, the data."""
        import torch

        config, strategy = self.config, self.strategy
        torch.set_num_threads(strategy.threads(config.threads))
        torch.manual_seed(config.seed)
        with self.timed("peak measurement"):
            self.peaks = strategy.from_main(measure_peaks, strategy.device_type)
        self.resolved = self._resolve_auto()
        self.precision = self.resolved["precision"]
        with self.timed("model load"):
            model, self.tokenizer = load_start_model(config)
        self.shape = ModelShape.from_hf_config(model.config)
        self.method.check(self.shape)
        with self.timed("data"):
            self.data = self.objective.prepare_data(config, self.tokenizer)
        self._report_cut_examples()
        virtual = getattr(self.method, "virtual_tokens", 0) if self.method.changes_sequence else 0
        if config.seq_len + virtual > (self.shape.max_position_embeddings or 1 << 30):
            raise ConfigError(f"--seq-len {config.seq_len} (plus any virtual tokens) exceeds the model's context of "
                              f"{self.shape.max_position_embeddings} tokens")
        model = self.method.prepare(self.objective.prepare_model(model, self.shape), self.shape)
        self._set_precision(base_model(model))
        model.train()
        self.trainable = self.method.trainable(self.shape)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.ctx = Context(model, base_model(model), self.method, pad,
                           autocast_factory(self.precision, strategy.device_type))
        strategy.wrap(model, lambda batch: self.objective.loss(self.ctx, batch))
        self.checkpoints = Checkpointer(self.folder / "checkpoints", strategy.checkpoint_backend(),
                                        keep=config.keep_checkpoints, is_main=strategy.is_main)
        self.objective.setup(self.ctx, self.data)
        self.params_total, self.params_trainable = count_parameters(model)  # after setup: a head it adds trains
        self._check_memory()

    def _resolve_auto(self) -> dict:
        """What `auto` settings choose on this machine, except that a resumed run keeps what its checkpoint
        recorded: its ledger must describe every step, so a machine that now measures bf16 faster may not
        switch a fp32 run halfway. A device that changed cannot be kept: that is refused."""
        config = self.config
        chosen = {"precision": choose_precision(config, self.peaks), "device": self.strategy.device_type}
        found = recorded_choices(self.folder / "checkpoints") if config.resume else None
        if found is None:
            return chosen
        newest, recorded = found
        if "precision" not in recorded:  # written before the choice was recorded: the running ledger has it
            ledger = _read_json(self.folder / "ledger.json") or {}
            if ledger.get("precision") not in ("fp32", "bf16"):
                raise TrainingError(f"{newest / 'progress.json'}: does not record the precision --precision auto "
                                    "chose, nor does ledger.json; start a new --name")
            recorded = {**recorded, "precision": ledger["precision"]}
        if config.precision == "auto":
            chosen["precision"] = recorded["precision"]
        if recorded.get("device", chosen["device"]) != chosen["device"]:
            raise TrainingError(f"{newest / 'progress.json'}: trained on {recorded['device']}, and --device "
                                f"{config.device} means {chosen['device']} here; resume it where it started")
        return chosen

    def _check_memory(self) -> None:
        """Refuse, before step 1, a micro-batch that cannot fit: the estimator's peak (`costs.memory`) for this
        model, method and batch against the device's memory; `--batch-size 1000000000` would otherwise run until
        killed. Refused only above the whole memory, so an estimate that errs by 10-20% never blocks a run."""
        import torch

        config, strategy = self.config, self.strategy
        world = getattr(strategy, "world_size", 1) if strategy.enabled else 1
        per_rank = math.ceil(config.batch_size / world)  # torchrun: --batch-size is global
        pairs = 2 if isinstance(self.objective, PairObjective) else 1  # chosen and rejected, in one batch
        sequences = per_rank * getattr(self.objective, "group_size", 1) * pairs  # GRPO: a group of replies each
        setup = TrainSetup(precision="bf16-autocast" if self.precision == "bf16" else "fp32", micro_batch=sequences,
                           gpus=world, zero=3 if getattr(strategy, "mode", "") == "fsdp" else 0,
                           checkpointing=config.activation_checkpointing, base_format=self.method.base_format)
        peak = memory_per_device(self.shape, self.trainable, setup, seq_len=config.seq_len).peak
        if strategy.device_type == "cuda":
            capacity = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        else:  # the processes of one node share its memory
            capacity = physical_memory() / max(1, getattr(strategy, "local_world_size", 1) if strategy.enabled else 1)
        if capacity and peak > capacity:
            raise ConfigError(f"--batch-size {config.batch_size} x --seq-len {config.seq_len}: a step needs about "
                              f"{peak / 2**30:,.1f} GiB (estimate), more than the {capacity / 2**30:,.1f} GiB this "
                              "device has; lower --batch-size and raise --grad-accum for the same step")

    def _set_precision(self, base) -> None:
        import torch

        self.low_frozen = can_store_frozen_low(self.method, self.precision, self.strategy.enabled)
        if self.low_frozen:  # no per-step autocast casts of frozen weights (tunegap/precision.py)
            frozen_linears_to(base, torch.bfloat16, keep=[base.get_output_embeddings()])
        if self.precision == "bf16" and self.strategy.device_type == "cpu":  # this CPU's kernel is faster in fp32
            fp32_attention(base)
        if self.config.activation_checkpointing:
            checkpoint_activations(base)

    def _report_cut_examples(self) -> None:
        cut = self.data.stats.get("train", {}) if self.data.kind == "sft" else {}
        if self.strategy.is_main and (cut.get("n_dropped") or cut.get("n_truncated")):  # counted, never silent
            config = self.config
            print(f"tunegap: {self.name}: {cut.get('n_dropped', 0)} training examples skipped (no reply token within "
                  f"--seq-len {config.seq_len}{', or longer with --drop-long' if config.drop_long else ''}), "
                  f"{cut.get('n_truncated', 0)} truncated to it (counted)", flush=True)

    def _build_optimizer(self) -> None:
        import torch

        config = self.config
        self.trained = [p for p in self.ctx.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trained, lr=config.lr, weight_decay=config.weight_decay,
                                           betas=(0.9, 0.999), **self.strategy.optimizer_options())
        self.mean_tokens = sum(len(e) for e in self.data.train) / len(self.data.train)
        self.steps = total_steps(config, len(self.data.train), self.mean_tokens)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(config, self.steps, warmup_steps(config, self.steps)))
        self.order = DataOrder(len(self.data.train), config.batch_size, config.seed)

    # ----------------------------------------------------------------------------------------- plan
    def plan(self) -> None:
        """Predict training and each evaluation (`forecast`), then compile when it repays itself."""
        with self.timed("duration probes"):
            training_s = self.forecast_durations()
        self.compiled_layers, self.compile_why = self._maybe_compile(training_s)

    def forecast_durations(self) -> float:
        """Predict training and each evaluation from probes of this model on this machine (`predict.py`); the
        evaluations set to auto decide whether they run. Returns the predicted training seconds."""
        config = self.config
        step = train_step_flops(self.shape, self.trainable, sequences=config.batch_size * config.grad_accum,
                                seq_len=max(1, round(self.mean_tokens)), checkpointing=config.activation_checkpointing)
        remaining = self.steps - self.totals.steps
        self.forecast, self.planned = None, []
        if self.strategy.is_main and not self.strategy.enabled:  # a probe on one rank of DDP/FSDP would hang it
            probe = probe_forward(self.ctx, config.batch_size, round(self.mean_tokens), self.shape)
            self.forecast = Forecast(probe, training_seconds(probe, step.total + step.recompute, remaining),
                                     self.ctx.model, self.ctx.pad_id)
            with self._frozen_in_fp32():  # the evaluations decode in fp32, after training: probe them so
                self.planned = [p for p in (c.plan(self, self.forecast) for c in self.callbacks) if p]
            self.planned.append({"what": "checkpoint and outputs", "seconds": self._written_bytes() / WRITE_BYTES_PER_S,
                                 "runs": True, "why": ""})
            training_s = self.forecast.training_s
        else:
            peak = self.peaks.bf16_flops_per_s if self.precision == "bf16" else self.peaks.fp32_flops_per_s
            training_s = remaining * (step.total + step.recompute) / (peak * DEFAULT_MFU)
        return training_s

    @contextlib.contextmanager
    def _frozen_in_fp32(self):
        """Frozen weights stored in bf16 for training (`low_frozen`) back in fp32 for a while, exactly."""
        import torch

        base = self.ctx.base
        if self.low_frozen:
            frozen_linears_to(base, torch.float32, keep=[base.get_output_embeddings()])
        try:
            yield
        finally:
            if self.low_frozen:
                frozen_linears_to(base, torch.bfloat16, keep=[base.get_output_embeddings()])

    def _written_bytes(self) -> float:
        """What the final checkpoint (trained tensors and AdamW's two moments, fp32) and the outputs (the whole
        model for methods that save it, else the trained tensors) write (formula)."""
        trained = 4.0 * self.params_trainable
        saved = 4.0 * self.params_total if not (self.method.saves_adapter or self.method.saves_trained_tensors) \
            else trained
        return 3 * trained + saved

    def predict(self) -> dict:
        """Predicted seconds of this run's parts, without a run folder or a step (`tunegap experiment gap` prints
        each arm's before it starts): the setup it took to know them is measured and counted as the run's own."""
        started = time.perf_counter()
        self.strategy = self.strategy or start_strategy(self.config)
        self.name = self.config.name or "forecast"
        self.folder = run_folder(self.config.runs_dir, self.name)  # a path only: nothing is written
        self._build_model()
        self._build_optimizer()
        setup_s = time.perf_counter() - started
        self.forecast_durations()
        return {"setup": setup_s, "training": self.forecast.training_s,
                **{p["what"]: p["seconds"] for p in self.planned if p["runs"]}}

    def _maybe_compile(self, training_s: float) -> tuple[list, str]:
        """Compile the decoder layers when --compile asks for it (tunegap/compiling.py); the compiled layers."""
        config, base = self.config, self.ctx.base
        on, why = compiling.decide(config.compile, method=self.method, distributed=self.strategy.enabled,
                                   estimated_seconds=training_s, fp32_peak=self.peaks.fp32_flops_per_s,
                                   decoder=base.get_decoder())
        if on:
            failure = compiling.check_compiler()
            if failure and config.compile == "on":
                raise ConfigError(f"--compile on: torch.compile fails here: {failure}")
            if failure:
                on, why = False, f"off (auto: torch.compile fails here: {failure})"
        if self.strategy.is_main and on:  # an auto "off" is in the ledger's "compiled" field, not worth a line
            print(f"compile: {why}", flush=True)
        if not on:
            return [], why
        if getattr(base.config, "_attn_implementation", None) == FP32_ATTENTION:
            fp32_attention(base, math=True)  # fused by Inductor: faster than the flash kernel once compiled
        return compiling.compile_layers(base.get_decoder()), why

    # --------------------------------------------------------------------------------------- resume
    def resume(self) -> None:
        """Continue from the newest checkpoint (under --resume), dropping log lines of steps it will redo."""
        self.checkpoints.clean()
        self.strategy.barrier()
        existing = self.checkpoints.existing() if self.config.resume else []
        if existing:
            progress = self.checkpoints.load(existing[-1], model=self.ctx.model, optimizer=self.optimizer,
                                             scheduler=self.scheduler, expect_config_hash=self.identity)
            self.totals = Totals.from_dict(progress["totals"])
            self.totals.events.append({"event": "resumed", "from_step": self.totals.steps, "at": time.time()})
        elif self.config.resume and self.strategy.is_main:
            self.metrics_path.unlink(missing_ok=True)
        self.earlier_wall = self.totals.wall_seconds  # a resumed run's ledger counts every segment's wall time
        if existing and self.strategy.is_main:
            kept = [r for r in read_jsonl(self.metrics_path) if r.get("step", 0) <= self.totals.steps
                    and not r.get("final")]
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def announce(self) -> None:
        if not self.strategy.is_main:
            return
        c, p = self.config, self.peaks
        print(f"tunegap: {self.name}: {c.method} on {c.model} ({self.params_total:,} parameters, "
              f"{self.params_trainable:,} trainable = {100 * self.params_trainable / self.params_total:.3g}%, measured); "
              f"{len(self.data.train):,} examples, {self.steps} steps planned; precision {self.precision} "
              f"({p.how} peaks: fp32 {p.fp32_flops_per_s / 1e9:.0f}, bf16 {p.bf16_flops_per_s / 1e9:.0f} GFLOP/s)",
              flush=True)
        if self.strategy.enabled or self.strategy.device_type != "cpu":
            print(f"tunegap: {self.name}: {self.strategy.describe()}", flush=True)
        if self.forecast is not None:
            parts = [f"training {minutes(self.forecast.training_s)} ({self.steps - self.totals.steps} steps)"]
            parts += [f"{p['what']} {minutes(p['seconds'])}" + (f" ({p['why']})" if p["why"] else "")
                      for p in self.planned]
            print(f"tunegap: {self.name}: predicted (estimate, scaled from a timed forward pass and decode step on "
                  f"this machine): {'; '.join(parts)}", flush=True)

    # ----------------------------------------------------------------------------------------- step
    def micro_batches(self, step: int) -> list:
        c, objective = self.config, self.objective
        pack = c.pack and not self.method.changes_sequence
        first = (step - 1) * c.grad_accum
        return [objective.make_batch([self.data.train[i] for i in self.strategy.shard(self.order.micro_batch(first + m))],
                                     capacity=c.seq_len, pad_id=self.ctx.pad_id, pack=pack)
                for m in range(c.grad_accum)]

    def train_step(self, step: int) -> dict:
        """One optimizer step over `grad_accum` micro-batches; the loss is the mean over the whole step's units
        (summed over ranks), torchtune's scaling. Returns the step's log row."""
        strategy, objective, t0 = self.strategy, self.objective, time.perf_counter()
        batches = self.micro_batches(step)
        norm = sum(objective.normaliser(b) for b in batches)
        n_loss = sum(b.n_loss_tokens for b in batches)
        flops = sum((objective.step_flops(self.shape, self.trainable, self.ctx, b,
                                          checkpointing=self.config.activation_checkpointing) for b in batches), ZERO)
        counts = (sum(b.n_examples for b in batches), sum(b.n_tokens for b in batches),
                  sum(b.rows * b.width - b.n_tokens for b in batches))
        # the whole step's counts, summed over ranks (one all-reduce): the loss is normalised by all of them
        norm, n_loss, *counts, flops = strategy.step_sums(norm, n_loss, *counts, flops)
        counted, loss_sum, metrics = self._forward_backward(step, batches, norm)
        step_loss = strategy.total(loss_sum) / max(norm, 1)
        self._stop_if_not_finite("loss", step_loss, step)
        grad_norm = self._clip_gradients()
        self._stop_if_not_finite("gradient", grad_norm, step, loss=step_loss)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        self._add_to_totals(step, seconds, n_loss, counts, flops, counted)
        row = {"step": step, "loss": step_loss, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
               "tokens": self.totals.tokens, "loss_tokens": self.totals.loss_tokens, "flops": self.totals.flops.total,
               "seconds": seconds, "tokens_per_s": counts[1] / seconds}
        if metrics:  # the objective's metric sums, over ranks in one all-reduce
            keys = sorted(metrics)
            row.update({k: v / max(norm, 1) for k, v in zip(keys, strategy.total(tuple(metrics[k] for k in keys)))})
        return row

    def _forward_backward(self, step: int, batches: list, norm: int):
        """Gradients of the step's loss; counted FLOPs on sampled steps (a fake replay when compiled)."""
        import torch

        every = self.config.count_flops_every
        count = step == 1 or step == self.steps or (every and step % every == 0)
        counted = None
        if count and self.compiled_layers:  # compiled kernels are invisible to a dispatch mode: count a fake replay
            counted = count_on_fake_tensors(lambda: [torch.autograd.grad(
                self.objective.loss(self.ctx, b).total / max(norm, 1), self.trained) for b in batches])
        loss_sum, metrics = 0.0, {}
        with (count_flops() if count and not self.compiled_layers else contextlib.nullcontext(None)) as counter:
            for m, batch in enumerate(batches):
                with self.strategy.accumulating(m < len(batches) - 1):  # gradients travel once per step
                    out = self.strategy.loss(batch)
                    (out.total / max(norm, 1)).backward()
                loss_sum += float(out.total.detach())
                for key, value in out.metrics.items():
                    metrics[key] = metrics.get(key, 0.0) + float(value)
        return counter.get_total_flops() if counter is not None else counted, loss_sum, metrics

    def _clip_gradients(self) -> float:
        import torch

        clip = self.config.clip
        norm = (torch.nn.utils.clip_grad_norm_(self.trained, clip) if clip
                else torch.sqrt(sum((p.grad.float() ** 2).sum() for p in self.trained if p.grad is not None)))
        return float(self.strategy.plain(norm))  # FSDP: a DTensor

    def _stop_if_not_finite(self, what: str, value: float, step: int, *, loss: float | None = None) -> None:
        """A non-finite loss stops the run; so does a gradient that overflowed in backward under a finite loss,
        before the update is applied. The ledger records why; the last checkpoint is intact."""
        if math.isfinite(value):
            return
        event = {"event": f"non-finite {what}", "step": step, "at": time.time()}
        event.update({"loss": str(value)} if what == "loss" else {"grad_norm": str(value), "loss": loss})
        self.totals.events.append(event)
        if self.strategy.is_main:
            write_ledger(self.folder / "ledger.json", self.ledger_now(f"failed: non-finite {what}", {}))
        where = self.folder / "checkpoints"
        if what == "loss":
            raise TrainingError(f"{self.name}: loss became {value} at step {step}; stopped. The last good checkpoint "
                                f"in {where} is intact; lower --lr or check the data")
        raise TrainingError(f"{self.name}: gradient norm became {value} at step {step} (loss {loss:.4g}); stopped "
                            f"before the update. The last good checkpoint in {where} is intact; lower --lr or check "
                            "the data")

    def _add_to_totals(self, step, seconds, n_loss, counts, flops, counted) -> None:
        t = self.totals
        t.steps = step
        t.examples += counts[0]
        t.tokens += counts[1]
        t.padding_tokens += counts[2]
        t.loss_tokens += n_loss
        t.train_seconds += seconds
        t.flops = t.flops + flops
        t.step_seconds.append(seconds)
        if counted is not None:
            t.counted_flops += self.strategy.total(counted)
            t.formula_flops_on_counted_steps += flops.hardware
            t.counted_steps.append(step)

    # ------------------------------------------------------------------------- checkpoints and ledger
    @contextlib.contextmanager
    def writing(self, what: str):
        """A failed write (disk full, quota, I/O error) stops the run with one clear line and a ledger event;
        the atomic writes guarantee the previous checkpoint and ledger are still whole."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - OSError, or RuntimeError from torch's zip writer
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            self.totals.events.append({"event": "write failed", "what": what, "error": detail, "at": time.time()})
            with contextlib.suppress(Exception):  # the disk may still be full: best effort, atomic either way
                if self.strategy.is_main:
                    write_ledger(self.folder / "ledger.json", self.ledger_now("failed: write error", {}))
            good = self.checkpoints.existing()
            kept = f"the last good checkpoint {good[-1]} is intact" if good else "no checkpoint had been written yet"
            raise TrainingError(f"{self.name}: could not write {what}: {detail}; stopped, {kept}. Free space and "
                                "rerun with --resume") from err

    def save(self, step: int) -> None:
        self.totals.wall_seconds = self.earlier_wall + time.perf_counter() - self.started
        with self.writing(f"checkpoint step-{step:06d}"):
            self.checkpoints.save(step, model=self.ctx.model, optimizer=self.optimizer, scheduler=self.scheduler,
                                  progress={"step": step, "totals": self.totals.to_dict(),
                                            "config_hash": self.identity, "resolved": self.resolved})

    def ledger_now(self, status: str, metrics: dict) -> dict:
        model, config = self.ctx.model, self.config
        return self.strategy.annotate(build_ledger(
            run_name=self.name, status=status, config=self.config_dict, method=self.method.to_dict(),
            shape=self.shape.to_dict(), peaks=self.peaks.to_dict(), precision=self.precision,
            params_total=self.params_total, params_trainable=self.params_trainable,
            weights_bytes=parameter_bytes(model),
            gradient_bytes=sum(p.numel() * p.element_size() for p in self.trained),
            optimizer_bytes=optimizer_state_bytes(self.optimizer), totals=self.totals,
            data_stats={**self.data.stats, "epochs": self.order.epochs_done(self.totals.steps * config.grad_accum),
                        "train_examples": len(self.data.train), "kind": self.data.kind},
            peak_memory=self.strategy.peak_memory(peak_rss_bytes()) if not self.strategy.enabled else peak_rss_bytes(),
            peak_memory_how="measured", wall_seconds=self.earlier_wall + time.perf_counter() - self.started,
            gpu=config.gpu, gpu_price=config.gpu_price, gpu_flops_per_s=gpu_flops_per_s(config.gpu),
            metrics=metrics, environment_info=environment(), compiled=self.compile_why))

    # --------------------------------------------------------------------------------------- finish
    def finish(self) -> dict:
        """Final checkpoint and evaluation, the trained model written, callbacks' metrics, the ledger."""
        import torch

        strategy, base = self.strategy, self.ctx.base
        train_peak = strategy.peak_memory(peak_rss_bytes(), self.optimizer)  # distributed: every rank's largest
        if self.compiled_layers:  # evaluation and generation run eagerly, with the eager attention kernel
            compiling.decompile(self.compiled_layers)
            if getattr(base.config, "_attn_implementation", None) == FP32_MATH_ATTENTION:
                fp32_attention(base)
        if self.low_frozen:  # back to fp32 (exactly the bf16 values training used) for evaluation and generation
            frozen_linears_to(base, torch.float32, keep=[base.get_output_embeddings()])
        with self.timed("final checkpoint"):
            self.save(self.totals.steps)
        with self.timed("objective's end metrics"):
            metrics = {"train_loss": _last_loss(self.metrics_path) if strategy.is_main else None,
                       **self.objective.end_metrics(self.ctx)}
        for callback in self.callbacks:
            with self.timed(type(callback).__name__):
                metrics.update(callback.on_train_end(self))
        model = strategy.export(self.ctx.model, self._rebuild)  # FSDP shards gathered to rank 0
        if not strategy.is_main:
            return strategy.broadcast(None)  # rank 0 writes the outputs; every rank returns its ledger
        with self.writing("metrics.jsonl"):
            if metrics.get("eval_loss") is not None:
                append_line(self.metrics_path, json.dumps({"step": self.totals.steps, "eval_loss": metrics["eval_loss"],
                                                           "final": True}))
        with self.writing("the trained weights"), self.timed("outputs"):
            if not self.objective.save_outputs(self.folder, model, base_model(model), self.tokenizer, self.method):
                save_outputs(self.folder, model, base_model(model), self.tokenizer, self.method)
        for callback in self.callbacks:
            with self.timed(type(callback).__name__):
                metrics.update(callback.on_outputs(self, model, self.tokenizer))
        ledger = self.ledger_now("completed", metrics)
        ledger["timings"] = {"phase_seconds": dict(self.phase_seconds), **self._predictions()}
        ledger["costs"]["peak_memory_bytes"]["value"] = train_peak  # training peak, not the later evaluation
        with self.writing("ledger.json"):
            write_ledger(self.folder / "ledger.json", ledger)
        try:  # the run is whole now; the index is a cache of ledgers, rebuilt by `tunegap runs --rebuild`
            index_run(self.config.runs_dir, ledger, self.folder / "ledger.json")
        except (RunIndexError, OSError) as err:
            print(f"tunegap: {self.name}: completed, but not indexed: {str(err).splitlines()[0]}", file=sys.stderr,
                  flush=True)
        return strategy.broadcast(ledger)

    def _predictions(self) -> dict:
        """What `plan` predicted, kept in the ledger beside what was then measured (estimates, seconds)."""
        if self.forecast is None:
            return {}
        return {"predicted_seconds": {"training": self.forecast.training_s,
                                      **{p["what"]: p["seconds"] for p in self.planned if p["runs"]}}}

    def _rebuild(self):
        """A fresh copy of the model and method, to load gathered FSDP weights into."""
        c = self.config
        model, _ = load_start_model(c)
        return make_method(c.method, **c.method_options()).prepare(self.objective.prepare_model(model, self.shape),
                                                                    self.shape)


def gpu_flops_per_s(gpu: str) -> float:
    """The named GPU's bf16 peak from the shipped catalogue, which dollar figures assume (an H100's when the
    catalogue does not know the name)."""
    try:
        return gpu_peak_flops(gpu, "bf16")
    except (KeyError, ValueError, EstimateError):
        return gpu_peak_flops("H100-SXM", "bf16")


def print_summary(ledger: dict) -> None:
    print(format_ledger(ledger), flush=True)


def _lock_run(folder: Path):
    """An exclusive lock on the run while it trains: a second `--resume` of the same run (a scheduler
    restarting a job whose first copy still runs) would interleave two sets of checkpoints.
    The kernel drops the lock when the process dies, even by SIGKILL, so a killed run never stays locked."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    # O_NOFOLLOW: a link planted as .lock would otherwise create or open a file wherever it points
    handle = os.fdopen(os.open(folder / ".lock", os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0),
                               0o644), "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise TrainingError(f"{folder}: another process is training this run now; wait for it or stop it") from None
    return handle


def _refuse_existing_run(folder: Path) -> None:
    """Without --resume, a folder that holds a run (a ledger, a checkpoint, or logged steps of a run killed
    before its first checkpoint) is refused: appending to it would log step 1 twice. A folder where setup
    failed before any step (only config.json) is started afresh."""
    steps = len(read_jsonl(folder / "metrics.jsonl"))
    checkpoints = any((folder / "checkpoints").glob("step-*"))
    if (folder / "ledger.json").exists() or checkpoints or steps:
        logged = f" ({steps} logged steps, no checkpoint yet)" if steps and not checkpoints else ""
        raise TrainingError(f"{folder}: run exists{logged}; pass --resume to continue it or choose another --name")


def _remove_temporaries(folder: Path) -> None:
    """Hidden leftovers of writes a kill interrupted (.ledger.json.*.tmp, .adapter.*): safe to delete under
    the run lock, since only this process writes here."""
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name != ".lock":
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def _last_loss(metrics_path: Path):
    rows = [r for r in read_jsonl(metrics_path) if "loss" in r]
    return rows[-1]["loss"] if rows else None
