"""Checkpoints a killed run resumes from, bit for bit, and that nobody's pickle can hijack.

Layout (torchtune's split of weights from recipe state, nanochat's step-numbered folders):
  checkpoints/step-000040/trainable.safetensors   trained tensors only (adapter for LoRA, all for full)
  checkpoints/step-000040/state.pt                optimizer, scheduler, RNG (loaded with weights_only=True)
  checkpoints/step-000040/progress.json           step, ledger totals, config hash
A checkpoint is built in a hidden temporary folder and renamed into place, so a folder named step-* is
always complete; resume takes the newest one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .io import fsync_dir

PREFIX = "step-"


class CheckpointError(RuntimeError):
    pass


def config_hash(config: dict, ignore=("resume", "progress", "name", "runs_dir", "threads")) -> str:
    """Settings that change the result; a resume under different ones is refused."""
    stable = {k: v for k, v in sorted(config.items()) if k not in ignore}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:16]


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
        for f in staging.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        fsync_dir(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and (p / "progress.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def clean_staging(folder: Path) -> None:
    """Remove temporary folders left by a checkpoint write that a kill interrupted."""
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(f".{PREFIX}"):
                shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, *, model, optimizer, scheduler) -> dict:
    """Restore trained tensors, optimizer, scheduler and RNG; return progress.json."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(path / "trainable.safetensors"))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
        raise CheckpointError(f"{path}: checkpoint does not match this model/method (missing {missing}, extra {extra})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    try:
        state = torch.load(path / "state.pt", weights_only=True)  # never unpickle arbitrary objects
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError and friends
        raise CheckpointError(f"{path / 'state.pt'}: refused to load (only tensors and plain data are allowed): "
                              f"{str(err).splitlines()[0]}") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return json.loads((path / "progress.json").read_text())

