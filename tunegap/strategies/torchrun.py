"""The trainer's step on PyTorch's own distributed engine: torchrun, DDP, FSDP2, torch.distributed.checkpoint.

Nothing here is home-made parallelism. The trainer asks its strategy for the few things that differ between
one process and many (`strategies.single.SingleDevice` gives the identity of each); this one is a torchrun rank:

  * launch: `torchrun` (torch.distributed.run) starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT; `start` reads them and calls `init_process_group` (gloo on CPU, NCCL on CUDA).
    `tunegap finetune --nproc N` only re-executes itself under torchrun (`launch.relaunch`).
  * data: `--batch-size B` is the global micro-batch. Every rank draws the same global micro-batch from
    `DataOrder` and takes its own contiguous slice of B/world examples (`shard`), so a run on N processes
    sees exactly the examples, in the same steps, that one process would.
  * loss: each rank sums cross-entropy over its loss tokens and divides by the loss-token count of the whole
    global step (one all-reduce), and the gradient reduction *sums* (a custom DDP comm hook; FSDP2's divide
    factor set to 1). The sum over ranks of (local sum / global count) is the single-process mean, so DDP with
    global batch B equals one process with batch B up to float summation order (a test checks it).
  * model: DDP (`DistributedDataParallel`) replicates; FSDP2 (`fully_shard`, Zhao et al. 2023, "PyTorch
    FSDP") shards every decoder block and then the rest (embeddings, final norm, head) as the root unit. Both
    wrap a small `LossModule` whose forward is the objective's loss, so the hooks DDP/FSDP rely on run around the
    exact computation the single-process loop runs.
  * checkpoints: `torch.distributed.checkpoint` (DCP, `checkpoint.DistributedBackend`) writes model (trained tensors only) and optimizer
    state; replicated state is written once, by rank 0 (DDP), sharded state by its owner (FSDP: each rank
    writes its own shard file into the same folder; multi-node runs need a shared filesystem). Rank 0 alone
    writes progress.json, the scheduler and every rank's RNG state (gathered), then renames the folder into
    place, so a folder named step-* is always complete. DCP reshards on load.
  * outputs: only rank 0 writes config.json, metrics.jsonl, ledger.json, the run index and the exported
    model; FSDP weights are gathered to rank 0 (full state dict on CPU) into a plain copy of the model first,
    so the exported adapter/safetensors are the same files a single-process run writes.
  * ledger: tokens, examples and FLOPs are summed over ranks (each step's counts are all-reduced), the peak
    memory of every rank is recorded (max and per-rank list), and communication time is measured on every
    collective (see `CommClock`).
"""


from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time

from ..checkpoint import DistributedBackend
from ..config import ConfigError
from ..costs.flops import Flops
from ..data.packing import to_device
from ..ledger import peak_rss_bytes, q
from ..methods import decoder_layers
from ..objectives import LossOutput, heldout_sums


class DistributedError(RuntimeError):
    """The distributed machinery disagrees with itself (e.g. gathered FSDP weights do not fit the rebuilt model)."""


# --- measuring communication -----------------------------------------------------------------------------

class CommClock:
    """Wall time during which at least one collective of this rank was in flight (launch to completion).

    Intervals come from the DDP comm hook, FSDP2's all-gather and reduce-scatter (custom comm objects that
    call the default collectives and time them) and the loop's own small all-reduces. Overlapping intervals
    count once (their union), so the figure is time *with communication in flight*; on a GPU much of it
    overlaps computation, on gloo/CPU it mostly does not. It includes waiting for the slowest rank to arrive.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._done: list[tuple[float, float]] = []
        self.seconds = 0.0
        self.calls = 0

    def record(self, start: float, end: float) -> None:
        with self._lock:
            self._done.append((start, end))
            self.calls += 1

    def timed(self, work, start: float):
        """Attach the end time to an async `Work` (or record now if the collective already ran)."""
        if work is None:
            self.record(start, time.perf_counter())
            return work
        work.get_future().then(lambda _: self.record(start, time.perf_counter()))
        return work

    def fold(self) -> float:
        """Add the union of the finished intervals to `seconds`; call when nothing is in flight."""
        with self._lock:
            spans, self._done = sorted(self._done), []
        end = float("-inf")
        for a, b in spans:
            if b <= end:
                continue
            self.seconds += b - max(a, end)
            end = b
        return self.seconds


def _timed_sum_allreduce(clock_and_group, bucket):
    """DDP comm hook: SUM the bucket (the loss is already divided by the global loss-token count) and time it."""
    import torch.distributed as dist

    clock, group = clock_and_group
    start = time.perf_counter()
    fut = dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future()

    def done(f):
        clock.record(start, time.perf_counter())
        return f.value()[0]

    return fut.then(done)


def _fsdp_comms(clock: CommClock):
    """FSDP2 all-gather / reduce-scatter that run the default collectives and time them (set_custom_*)."""
    import torch
    import torch.distributed as dist

    try:
        from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter
    except ImportError:
        return None

    class _Alloc:
        def allocate(self, size, *, dtype, device):
            return torch.empty(*size, dtype=dtype, device=device)

    # torch >= 2.12 names them *_single; older releases only have the *_tensor spellings
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

    class TimedAllGather(_Alloc, AllGather):
        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            start = time.perf_counter()
            return clock.timed(all_gather(output_tensor, input_tensor, group=group, async_op=async_op), start)

    class TimedReduceScatter(_Alloc, ReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            start = time.perf_counter()
            return clock.timed(reduce_scatter(output_tensor, input_tensor, op=op, group=group, async_op=async_op),
                               start)

    return TimedAllGather(), TimedReduceScatter()


# --- the loss as a module, so DDP/FSDP hooks surround it --------------------------------------------------

def _loss_module(model, loss_fn):
    import torch

    class LossModule(torch.nn.Module):
        """The objective's loss as a module: DDP's and FSDP's forward/backward hooks need a module call.
        Returns the summed loss; the batch's metric sums wait in `metrics` (DDP looks only at tensors)."""

        def __init__(self):
            super().__init__()
            self.model = model
            self.metrics = {}

        def forward(self, batch):
            out = loss_fn(batch)
            self.metrics = out.metrics
            return out.total

    return LossModule()


# --- the strategy ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Torchrun:
    """This process as one rank of a torchrun job, DDP or FSDP2 (`mode`)."""

    mode: str = "ddp"  # ddp | fsdp
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str = ""
    device: str = "cpu"
    clock: CommClock = dataclasses.field(default_factory=CommClock)
    module: object = None  # the DDP- or FSDP-wrapped LossModule
    loss_module: object = None  # the LossModule itself (DDP hides it as .module; FSDP2 shards it in place)
    model: object = None  # what the optimizer trains
    rank_peaks: list | None = None  # per-rank figures for the ledger, refreshed every step
    rank_comm: list | None = None
    rank_states: list | None = None
    train_peaks: list | None = None

    enabled = True  # several processes: the trainer sums its counts over them

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    @property
    def cuda(self) -> bool:
        return self.device_type == "cuda"

    def describe(self) -> str:
        nodes = self.world_size // max(self.local_world_size, 1)
        kind = "DDP (replicated)" if self.mode == "ddp" else "FSDP2 fully_shard (sharded)"
        return (f"{kind} over {self.world_size} processes on {nodes} node(s), backend {self.backend}, "
                f"device {self.device_type}; --batch-size is global: {self.world_size} x its share per rank")

    # -- collectives --------------------------------------------------------------------------------

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def total(self, value):
        """Sum of `value` (a number, or a tuple of numbers) over ranks."""
        import torch
        import torch.distributed as dist

        self.clock.fold()  # called at step boundaries, when no other collective is in flight
        many = isinstance(value, (tuple, list))
        values = list(value) if many else [value]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        start = time.perf_counter()
        dist.all_reduce(t)
        self.clock.record(start, time.perf_counter())
        out = [type(v)(x) if isinstance(v, int) else x for v, x in zip(values, t.tolist())]
        return tuple(out) if many else out[0]

    def gather(self, value) -> list:
        """Every rank's `value` (picklable), in rank order."""
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def from_main(self, fn, *args):
        """`fn(*args)` computed on rank 0 only and sent to every rank (e.g. the measured matmul peaks, which
        would be wrong if every rank measured at once on shared cores, and must agree across ranks)."""
        import torch.distributed as dist

        box = [fn(*args) if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # -- setup --------------------------------------------------------------------------------------

    def threads(self, configured: int) -> int:
        """Torch threads per process: the configured count, or this node's cores split between its ranks."""
        return configured or max(1, (os.cpu_count() or 1) // self.local_world_size)

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise ConfigError(f"--batch-size {batch_size}: is the global micro-batch and must divide evenly "
                              f"between the {self.world_size} processes")

    def optimizer_options(self) -> dict:
        """The sharded DTensors of a distributed run take AdamW's foreach path (no fused kernel for them)."""
        return {"foreach": True}

    def wrap(self, model, loss_fn) -> None:
        """Wrap the model for DDP or FSDP2 (in place for FSDP: its parameters become sharded DTensors);
        `loss_fn(batch)` returns the objective's `LossOutput`."""
        self.model = model
        if self.mode == "ddp":
            import inspect

            import torch.distributed as dist
            from torch.nn.parallel import DistributedDataParallel as DDP

            model.to(self.device)
            # buffers (rotary frequencies) are computed identically everywhere: no per-forward broadcast
            quiet = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                     else {"broadcast_buffers": False})
            self.loss_module = _loss_module(model, loss_fn)
            self.module = DDP(self.loss_module, device_ids=[self.local_rank] if self.cuda else None,
                              gradient_as_bucket_view=True, **quiet)
            self.module.register_comm_hook((self.clock, dist.group.WORLD), _timed_sum_allreduce)
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # one FSDP unit per decoder block (gathered just before use, freed after), the rest as the root unit;
        # fully_shard moves each unit to the mesh's device as it shards it
        mesh = init_device_mesh(self.device_type, (self.world_size,))
        units = [fully_shard(layer, mesh=mesh) for layer in decoder_layers(model)]
        self.loss_module = _loss_module(model, loss_fn)
        root = fully_shard(self.loss_module, mesh=mesh)
        comms = _fsdp_comms(self.clock) if hasattr(root, "set_custom_all_gather") else None
        for unit in [*units, root]:
            unit.set_gradient_divide_factor(1.0)  # sum, as the DDP hook does: the loss is already normalised
            unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
            if comms:  # torch releases without custom comms: FSDP's own collectives go untimed
                unit.set_custom_all_gather(comms[0])
                unit.set_custom_reduce_scatter(comms[1])
        self.module = root

    # -- the step -----------------------------------------------------------------------------------

    def shard(self, indices: list[int]) -> list[int]:
        """This rank's contiguous slice of the global micro-batch."""
        share = len(indices) // self.world_size
        return indices[self.rank * share:(self.rank + 1) * share]

    def to_device(self, batch):
        return to_device(batch, self.device, non_blocking=True) if self.cuda else batch

    def loss(self, batch):
        """The objective's `LossOutput` for this rank's batch, through the DDP/FSDP module so its hooks run."""
        total = self.module(self.to_device(batch))
        return LossOutput(total, self.loss_module.metrics)

    def accumulating(self, no_sync: bool):
        """Skip gradient communication on all but the last micro-batch of a step (DDP no_sync; FSDP2
        `set_requires_gradient_sync`)."""
        if self.mode == "ddp":
            return self.module.no_sync() if no_sync else contextlib.nullcontext()
        self.module.set_requires_gradient_sync(not no_sync)
        return contextlib.nullcontext()

    def plain(self, value):
        """A DTensor (FSDP's gradient norm) as an ordinary tensor."""
        return value.full_tensor() if hasattr(value, "full_tensor") else value

    def heldout(self, objective, ctx, examples, batch_size: int, seq_len: int):
        """Mean held-out loss per unit (token, pair), each rank evaluating its share of every global batch."""
        if not examples:
            return None
        total, count = heldout_sums(objective, ctx, examples, batch_size, seq_len, loss=self.loss,
                                    share=lambda chunk: chunk[self.rank::self.world_size])
        total, count = self.total((total, count))
        return total / max(count, 1)

    # -- memory and the ledger ----------------------------------------------------------------------

    def step_sums(self, norm: int, n_loss: int, examples: int, tokens: int, padding: int, flops):
        """The step's counts (the objective's normaliser first) summed over ranks, in the one all-reduce the
        loss normalisation needs anyway.

        The same vector carries every rank's current peak memory and communication time in its own slot
        (zeros elsewhere, so the sum is the list), which lets any rank write a ledger later without another
        collective: a rank that fails alone can still record why without waiting for the others.
        """
        import torch
        import torch.distributed as dist

        self.clock.fold()  # a step boundary: no collective is in flight
        w, r = self.world_size, self.rank
        n = 9  # the counts, then every rank's peak and communication time
        v = torch.zeros(n + 2 * w, dtype=torch.float64)
        v[:n] = torch.tensor([norm, n_loss, examples, tokens, padding, flops.forward, flops.backward_input,
                              flops.backward_weight, flops.recompute], dtype=torch.float64)
        v[n + r] = self._peak_now(peak_rss_bytes())
        v[n + w + r] = self.clock.seconds
        v = v.to(self.device)
        start = time.perf_counter()
        dist.all_reduce(v)
        self.clock.record(start, time.perf_counter())
        v = v.tolist()
        self.rank_peaks = [int(x) for x in v[n:n + w]]
        self.rank_comm = v[n + w:]
        return (*(int(x) for x in v[:5]), Flops(*v[5:9]))

    def reset_peak_memory(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)

    def _peak_now(self, rss: int) -> int:
        if self.cuda:
            import torch

            return int(torch.cuda.max_memory_allocated(self.device))
        return int(rss)

    def _state_bytes(self, optimizer) -> int:
        """Bytes of weights, gradients and optimizer state this rank holds (FSDP: its shards)."""
        local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731 - a DTensor's shard
        params = list(self.model.parameters())
        total = sum(local(p).numel() * p.element_size() for p in params)
        total += sum(local(p).numel() * p.element_size() for p in params if p.requires_grad)
        total += sum(local(v).numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                     if hasattr(v, "numel"))
        return total

    def peak_memory(self, rss: int, optimizer=None) -> int:
        """The training peak of every rank (kept for the ledger); returns the largest. Collective."""
        rows = self.gather((self._peak_now(rss), self._state_bytes(optimizer), self.clock.fold()))
        self.rank_peaks = [r[0] for r in rows]
        self.rank_states = [r[1] for r in rows]
        self.rank_comm = [r[2] for r in rows]
        self.train_peaks = self.rank_peaks
        return max(self.rank_peaks)

    def annotate(self, ledger: dict) -> dict:
        """Add what only a distributed run has to a ledger: per-rank memory, communication, device count.

        Not collective: it reads the per-rank figures of the last step (or of the end of training).
        """
        peaks = self.rank_peaks or [0] * self.world_size
        comm = self.rank_comm or [0.0] * self.world_size
        costs = ledger["costs"]
        train_s = max(costs["train_time_s"]["value"] or 0.0, 1e-9)
        costs["peak_memory_bytes"] = q(max(peaks), "byte", "measured")
        costs["devices"] = q(self.world_size, "process", "measured")
        costs["communication_time_s"] = q(max(comm), "s", "measured")
        costs["communication_share"] = q(max(comm) / train_s, "fraction", "measured")
        gpu_hours = costs["gpu_hours"]["value"]
        costs["gpu_wall_hours"] = q(gpu_hours / self.world_size if gpu_hours is not None else None,
                                    "hour", "estimate")
        ledger["dollar_assumptions"]["devices"] = self.world_size
        ledger["dollar_assumptions"]["note"] = (
            f"{self.world_size} devices share the same GPU-hours (dollars = GPU-hours x price), finishing in "
            "1/N of the wall time if scaling were perfect; communication is not priced in")
        ledger["distributed"] = {
            "mode": self.mode, "world_size": self.world_size, "nodes": self.world_size // self.local_world_size,
            "backend": self.backend, "device": self.device_type,
            "batch_size_per_rank": ledger["config"]["batch_size"] // self.world_size,
            "memory_measured_as": ("torch.cuda.max_memory_allocated" if self.cuda else
                                   "peak resident set size of each process (VmHWM)"),
            "peak_memory_bytes_per_rank": peaks,
            "model_state_bytes_per_rank": self.rank_states,
            "communication_time_s_per_rank": comm,
            "communication_measured_as": "union of intervals with a collective in flight (launch to completion)",
        }
        return ledger

    # -- checkpoints ----------------------------------------------------------------------------------

    def checkpoint_backend(self):
        """torch.distributed.checkpoint: each rank writes its shard, rank 0 the rest (`checkpoint.py`)."""
        trained = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        return DistributedBackend(self.module, trained, rank=self.rank, world_size=self.world_size,
                                  clock=self.clock, mode=self.mode)

    # -- outputs ------------------------------------------------------------------------------------

    def export(self, model, rebuild):
        """The trained model with full weights on rank 0's CPU, for writing outputs and generating; None elsewhere.

        DDP already holds the full model on every rank; FSDP's shards are gathered with a full state dict
        (offloaded to CPU, rank 0 only) and loaded into `rebuild()`, a freshly built copy of the same model
        and method.
        """
        if self.mode == "ddp":
            if not self.is_main:
                return None
            return model.to("cpu")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        model = rebuild()
        missing, unexpected = model.load_state_dict({k[len("model."):]: v for k, v in full.items()}, strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
        if missing or unexpected:
            raise DistributedError(f"gathering the sharded model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        model.eval()
        return model

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (the final ledger, so every rank returns the same one)."""
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def start(config) -> Torchrun:
    """This process's rank of the torchrun job that launched it: DDP or FSDP per --parallel."""
    import torch
    import torch.distributed as dist

    env = os.environ
    rank, world, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    cuda = torch.cuda.is_available()
    device = f"cuda:{local_rank}" if cuda else "cpu"
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, device_id=torch.device(device) if cuda else None)
    par = Torchrun(mode=config.parallel, rank=rank, world_size=world, local_rank=local_rank,
                   local_world_size=local_world, backend=dist.get_backend(), device=device)
    par.check_batch(config.batch_size)
    return par


