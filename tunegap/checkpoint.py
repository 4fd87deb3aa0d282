"""Checkpoints a killed run resumes from, bit for bit, and that nobody's pickle can hijack.

Layout (torchtune's split of weights from recipe state, nanochat's step-numbered folders):
  checkpoints/step-000040/trainable.safetensors   trained tensors only (adapter for LoRA, all for full)
  checkpoints/step-000040/state.pt                optimizer, scheduler, RNG (loaded with weights_only=True)
  checkpoints/step-000040/progress.json           step, ledger totals, config hash
A checkpoint is built in a hidden temporary folder and renamed into place, so a folder named step-* is
always complete; resume takes the newest one. A torchrun job writes the same folders with
torch.distributed.checkpoint instead (`DistributedBackend`); the trainer sees one `Checkpointer` either way.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .io import fsync_dir
from .ledger import Totals
from .config import run_identity
from .safety import unpickler_reason

PREFIX = "step-"
FILES = ("trainable.safetensors", "state.pt", "progress.json")  # a step-* folder holds all three or is ignored
DCP_FILES = (".metadata", "state.pt", "progress.json")  # a distributed step-* folder holds these (and shards)
ASIDE = ".old"


class CheckpointError(RuntimeError):
    pass


def config_hash(config: dict) -> str:
    """Settings that change the result; a resume under different ones is refused (`config.run_identity`)."""
    return run_identity(config)


def trainable_state(model) -> dict:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, step: int, *, model, optimizer, scheduler, progress: dict, keep: int) -> Path:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:06d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=folder))
    try:
        save_file(trainable_state(model), str(staging / "trainable.safetensors"))
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": torch.get_rng_state()}
        torch.save(state, staging / "state.pt")
        (staging / "progress.json").write_text(json.dumps(progress, indent=2))
        publish(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    prune(list_checkpoints(folder), keep)
    return final


def publish(staging: Path, final: Path) -> None:
    """Make a fully written staging folder the checkpoint `final` (one process's or a distributed one's).

    Everything is on disk before the rename, and a step saved again (a resumed run that had finished) has
    its old copy moved aside first, atomically, so a kill at any point leaves one whole copy in place."""
    for f in staging.iterdir():
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(staging)
    folder = final.parent
    aside = folder / f".{final.name}{ASIDE}"
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(staging, final)
    fsync_dir(folder)
    shutil.rmtree(aside, ignore_errors=True)


def prune(checkpoints: list[Path], keep: int) -> None:
    """Delete all but the newest `keep` of `checkpoints` (oldest first)."""
    for old in checkpoints[:-keep]:
        _remove(old)


def _remove(path: Path) -> None:
    """Rename to a hidden name first: a kill mid-delete leaves a folder `clean_staging` removes, not a
    half-deleted step-* that looks like a checkpoint."""
    hidden = path.parent / f".{path.name}.deleting"
    try:
        os.replace(path, hidden)
    except OSError:
        return
    shutil.rmtree(hidden, ignore_errors=True)


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and p.name.startswith(PREFIX)
             and all((p / f).is_file() for f in FILES)]
    return sorted(found, key=lambda p: p.name)


def clean_staging(folder: Path) -> None:
    """Remove temporary folders left by a checkpoint write or delete that a kill interrupted.

    One exception: a step moved aside to be re-saved (`.step-N.old`) whose new copy never landed is
    complete, so it is put back rather than lost.
    """
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if not p.name.startswith(f".{PREFIX}"):
            continue
        final = folder / p.name[1:-len(ASIDE)] if p.name.endswith(ASIDE) else None
        if final is not None and not final.exists() and all((p / f).is_file() for f in FILES):
            os.replace(p, final)
            fsync_dir(folder)
        else:
            shutil.rmtree(p, ignore_errors=True)


def read_progress(path: Path) -> dict:
    """A checkpoint's progress.json, checked field by field: every way it can be wrong (truncated, tampered
    with, `totals: {}`) is a one-line `CheckpointError` naming the file, never a KeyError later."""
    file = path / "progress.json"
    try:
        progress = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(progress, dict):
            raise ValueError(f"expected an object, got {type(progress).__name__}")
        Totals.from_dict(progress.get("totals"))
        step = progress.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step != progress["totals"]["steps"]:
            raise ValueError(f"step {step!r} does not match totals.steps {progress['totals']['steps']!r}"[:160])
        if not isinstance(progress.get("config_hash"), str):
            raise ValueError("no 'config_hash' string")
        resolved = progress.get("resolved", {})
        if not isinstance(resolved, dict) or not all(isinstance(v, str) for v in resolved.values()):
            raise ValueError("'resolved' must map settings to strings")
    except (OSError, ValueError, RecursionError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{file}: unreadable ({detail}); delete {path} to resume from the checkpoint "
                              "before it") from None
    return progress


def check_tensors(file: Path, tensors: dict, params: dict) -> None:
    """Saved tensors must be the model's trained tensors by name, shape and dtype: `copy_` would broadcast a
    [8] into an [8, 64] without a word, and the run would go on with corrupted weights."""
    if set(tensors) != set(params):
        missing, extra = sorted(set(params) - set(tensors))[:3], sorted(set(tensors) - set(params))[:3]
        raise CheckpointError(f"{file}: does not match this model/method (missing {missing}, extra {extra})")
    for name, value in tensors.items():
        want = params[name]
        if tuple(value.shape) != tuple(want.shape) or value.dtype != want.dtype:
            raise CheckpointError(f"{file}: tensor {name} is {value.dtype} {list(value.shape)}, this model's is "
                                  f"{want.dtype} {list(want.shape)}; refusing to load it")


def load_tensors(file: Path) -> dict:
    """A safetensors file's tensors; a damaged one (short header, offsets past the end...) is one line."""
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as err:  # noqa: BLE001 - SafetensorError (a plain Exception), OSError: a damaged file
        raise CheckpointError(f"{file}: unreadable: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
                              ) from None


def load_checkpoint(path: Path, *, model, optimizer, scheduler, expect_config_hash: str | None = None) -> dict:
    """Restore trained tensors, optimizer, scheduler and RNG; return progress.json.

    Every way a checkpoint folder can be wrong (truncated, tampered with, from another run, a tensor of
    another shape or dtype) is a one-line `CheckpointError` naming the file, never a traceback from deep
    inside safetensors or torch, and nothing is restored unless everything checks out.
    """
    import torch

    progress = read_progress(path)
    if expect_config_hash is not None and progress.get("config_hash") != expect_config_hash:
        raise CheckpointError(f"{path}: written under different settings (config hash {progress.get('config_hash')}, "
                              f"this run {expect_config_hash}); refusing to mix runs")
    tensors = load_tensors(path / "trainable.safetensors")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    check_tensors(path / "trainable.safetensors", tensors, params)
    try:
        state = torch.load(path / "state.pt", weights_only=True)  # never unpickle arbitrary objects
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError and friends
        raise CheckpointError(f"{path / 'state.pt'}: refused to load (only tensors and plain data are allowed): "
                              f"{unpickler_reason(err)}") from None
    if not isinstance(state, dict) or not all(k in state for k in ("optimizer", "scheduler", "rng")):
        raise CheckpointError(f"{path / 'state.pt'}: not a tunegap optimizer state (no optimizer, scheduler, rng)")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as err:
        raise CheckpointError(f"{path / 'state.pt'}: not a tunegap optimizer state: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    _check_optimizer_state(path / "state.pt", optimizer)
    return progress


def _check_optimizer_state(file: Path, optimizer) -> None:
    """AdamW's moments must match their parameters: load_state_dict casts dtypes but keeps any shape, and a
    wrong-shaped moment would broadcast in the next step."""
    import torch

    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape != p.shape:
                    raise CheckpointError(f"{file}: optimizer state {key} is {list(value.shape)} for a parameter of "
                                          f"{list(p.shape)}; refusing to load it")


def complete_checkpoints(folder: Path) -> list[Path]:
    """Every complete step-* folder, one-process or distributed, oldest first."""
    if not folder.is_dir():
        return []
    dcp = [p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and p.name.startswith(PREFIX)
           and all((p / f).is_file() for f in DCP_FILES)]
    return sorted(set(list_checkpoints(folder)) | set(dcp), key=lambda p: p.name)


def recorded_choices(folder: Path) -> tuple[Path, dict] | None:
    """(newest checkpoint, what its run's `auto` settings resolved to), or None without a checkpoint.
    Older checkpoints recorded nothing: {}."""
    found = complete_checkpoints(folder)
    if not found:
        return None
    return found[-1], read_progress(found[-1]).get("resolved", {})


class LocalBackend:
    """One process's checkpoints: safetensors for the trained tensors, torch.save for the rest."""

    def list(self, folder: Path) -> list[Path]:
        return list_checkpoints(folder)

    def save(self, folder: Path, step: int, **state) -> Path:
        return save_checkpoint(folder, step, **state)

    def load(self, path: Path, **state) -> dict:
        return load_checkpoint(path, **state)


class DistributedBackend:
    """torch.distributed.checkpoint (DCP) for a torchrun job: the trained tensors and the optimizer state,
    written by their owners (replicated state once, by rank 0; FSDP shards by each rank into the same folder).
    Rank 0 adds state.pt (scheduler, every rank's RNG) and progress.json, then renames the staging folder into
    place, so a crash mid-save leaves no step-* folder behind. DCP reshards on load, to any world size."""

    def __init__(self, module, trained_names: set, *, rank: int, world_size: int, clock, mode: str):
        self.module, self.trained, self.rank, self.world_size = module, trained_names, rank, world_size
        self.clock, self.mode = clock, mode  # the strategy's communication clock, saved and restored

    def list(self, folder: Path) -> list[Path]:
        """Complete DCP checkpoints, and single-process ones (which `load` then refuses with a clear message)."""
        return complete_checkpoints(folder)

    def _state(self, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, optimizer)  # allocates optimizer state to load into
        return {"model": {k: v for k, v in model_sd.items() if k in self.trained}, "optim": optim_sd}

    def _gather(self, value) -> list:
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def save(self, folder: Path, step: int, *, model, optimizer, scheduler, progress: dict, keep: int):
        import torch
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

        final = folder / f"{PREFIX}{step:06d}"
        box = [None]
        if self.rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            box = [tempfile.mkdtemp(prefix=f".{final.name}.", dir=folder)]
        dist.broadcast_object_list(box, src=0)
        staging = Path(box[0])
        planner = DefaultSavePlanner(dedup_save_to_lowest_rank=True)  # replicated state: rank 0 writes it
        dcp.save(self._state(optimizer), checkpoint_id=str(staging), planner=planner)
        rngs, comm = self._gather(torch.get_rng_state()), self._gather(self.clock.fold())
        if self.rank == 0:
            try:
                torch.save({"scheduler": scheduler.state_dict(), "rng": rngs, "communication_s": comm},
                           staging / "state.pt")
                (staging / "progress.json").write_text(json.dumps(
                    {**progress, "format": "torch.distributed.checkpoint", "world_size": self.world_size,
                     "mode": self.mode}, indent=2))
                publish(staging, final)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            prune(self.list(folder), keep)
        dist.barrier()
        return final if self.rank == 0 else None

    def load(self, path: Path, *, model, optimizer, scheduler, expect_config_hash: str | None = None) -> dict:
        """Restore a DCP checkpoint (any world size: DCP reshards), the scheduler and this rank's RNG."""
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        progress = self._progress(path, expect_config_hash)
        state = self._state(optimizer)
        try:
            dcp.load(state, checkpoint_id=str(path))
        except Exception as err:  # noqa: BLE001 - DCP raises CheckpointException with per-rank tracebacks
            raise CheckpointError(f"{path}: cannot load into this model/method: "
                                  f"{str(err).splitlines()[0]}") from None
        set_state_dict(self.module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=False))
        try:
            extra = torch.load(path / "state.pt", weights_only=True)  # never unpickle arbitrary objects
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"{path / 'state.pt'}: refused to load: {unpickler_reason(err)}") from None
        try:
            scheduler.load_state_dict(extra["scheduler"])
            if len(extra["rng"]) == self.world_size:
                torch.set_rng_state(extra["rng"][self.rank])
            comm = extra.get("communication_s") or []
            if len(comm) == self.world_size:
                self.clock.seconds = float(comm[self.rank])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as err:
            raise CheckpointError(f"{path / 'state.pt'}: not a tunegap scheduler and RNG state: "
                                  f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        return progress

    @staticmethod
    def _progress(path: Path, expect_config_hash: str | None) -> dict:
        if not (path / ".metadata").is_file():
            if (path / "trainable.safetensors").is_file():
                raise CheckpointError(f"{path}: written by a single-process run; resume it without torchrun "
                                      "(or start a new --name)")
            raise CheckpointError(f"{path}: not a torch.distributed.checkpoint folder (no .metadata)")
        progress = read_progress(path)
        if expect_config_hash is not None and progress.get("config_hash") != expect_config_hash:
            raise CheckpointError(f"{path}: written under different settings (config hash "
                                  f"{progress.get('config_hash')}, this run {expect_config_hash}); refusing to mix runs")
        return progress


class Checkpointer:
    """The trainer's one interface to a run's checkpoints, whichever backend writes them."""

    def __init__(self, folder: Path, backend, *, keep: int, is_main: bool = True):
        self.folder, self.backend, self.keep, self.is_main = folder, backend, keep, is_main

    def clean(self) -> None:
        """Put back or remove what a kill left mid-write (the main process only: it alone renames)."""
        if self.is_main:
            clean_staging(self.folder)

    def existing(self) -> list[Path]:
        return self.backend.list(self.folder)

    def save(self, step: int, *, model, optimizer, scheduler, progress: dict):
        return self.backend.save(self.folder, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                 progress=progress, keep=self.keep)

    def load(self, path: Path, *, model, optimizer, scheduler, expect_config_hash: str) -> dict:
        return self.backend.load(path, model=model, optimizer=optimizer, scheduler=scheduler,
                                 expect_config_hash=expect_config_hash)
