"""Strategies: where a training step runs. One device (the CPU or one GPU), or a torchrun rank under DDP or
FSDP2. A strategy wraps the model and provides shard / no_sync / reduce; it never imports the trainer, which
hands it the objective's loss as a function.
"""

from __future__ import annotations

from ..config import ConfigError
from .launch import relaunch, shutdown, torchrun_command, under_torchrun, without_option
from .single import SingleDevice
from .torchrun import CommClock, Torchrun
from .torchrun import start as start_torchrun

__all__ = ["CommClock", "SingleDevice", "Torchrun", "relaunch", "shutdown", "start", "torchrun_command",
           "under_torchrun", "without_option"]


def pick_device(setting: str) -> str:
    """`--device auto|cpu|cuda`: auto takes the GPU when torch sees one."""
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA GPU here (this torch build or machine has none); "
                          "use --device cpu")
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def start(config):
    """The strategy for this process: a torchrun rank when launched by torchrun, else one device."""
    if under_torchrun():
        return start_torchrun(config)
    if config.nproc > 1:
        raise ConfigError(f"--nproc {config.nproc}: needs a launcher; use `tunegap finetune --nproc "
                          f"{config.nproc} ...` or `torchrun --nproc-per-node {config.nproc} -m tunegap ...`")
    return SingleDevice(pick_device(getattr(config, "device", "cpu")))
