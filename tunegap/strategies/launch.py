"""Starting and ending a torchrun job: `tunegap finetune --nproc N` re-executes itself under torchrun.

torchrun (torch.distributed.run) starts the processes and sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT; `strategies.torchrun.start` reads them and joins the process group.
"""

from __future__ import annotations

import os
import subprocess
import sys

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def under_torchrun(environ=os.environ) -> bool:
    return all(k in environ for k in TORCHRUN_ENV)


# --- launching ------------------------------------------------------------------------------------------

def torchrun_command(nproc: int, argv: list[str], *, python: str = sys.executable) -> list[str]:
    """`torchrun --standalone --nproc-per-node N -m tunegap ARGV`: one node, a free port picked by torchrun.

    Several nodes need torchrun's rendezvous flags (--nnodes, --rdzv-backend c10d, --rdzv-endpoint HOST:PORT,
    --rdzv-id), so they are launched with torchrun itself (docs/distributed.md), not through --nproc.
    """
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--max-restarts=0", "-m", "tunegap", *argv]


def without_option(argv: list[str], flag: str) -> list[str]:
    """`argv` less `flag VALUE` / `flag=VALUE`: torchrun's own parser would take `--nproc` for an ambiguous
    abbreviation of its --nproc-per-node even after `-m tunegap`, so the workers never see it (each records
    the number of processes it really runs with instead)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run this same command line under torchrun with `nproc` processes and return torchrun's exit code."""
    command = torchrun_command(nproc, without_option(argv, "--nproc"))
    print(f"tunegap: launching {nproc} processes: {' '.join(command[1:])}", flush=True)
    try:
        code = subprocess.call(command)
    except KeyboardInterrupt:
        code = 130
    if code != 0:
        print(f"tunegap: error: the distributed job failed (torchrun exit code {code}; the failing rank's own "
              "message is above); rerun the same command with --resume to continue from the last checkpoint",
              file=sys.stderr, flush=True)
    return code


def shutdown(finished: bool = False) -> None:
    """Destroy the process group if this process created one (the CLI calls it on exit).

    After a finished run every rank first waits for the others at a barrier: rank 0 still writes the ledger
    and the model after the last collective, and a rank tearing its gloo connections down meanwhile was seen
    to abort rank 0 at exit once (std::terminate, after everything was written). After a failure there is no
    barrier: the other ranks may be stuck in a collective, and torchrun stops them."""
    try:
        import torch.distributed as dist
    except ImportError:
        return
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
