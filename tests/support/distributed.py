"""Run a function on W real gloo processes (torch.multiprocessing) and collect results."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, init_file: str, out_dir: str, fn: Callable, args: tuple) -> None:
    """One rank, which ends as the trainer's processes do (``mfr.trainer.__main__``): every group destroyed, and
    its gloo workers joined, on this thread, then ``os._exit`` (a worker left to interpreter finalization aborts
    the process: SIGABRT, 'terminate called without an active exception', seen here under load)."""
    from mfr.trainer.dist import shutdown_distributed
    from mfr.trainer.exitcodes import exit_now

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    with shutdown_distributed():  # on an exception too: torch.multiprocessing then reports it to the parent
        torch.save(fn(rank, world_size, *args), os.path.join(out_dir, f"{rank}.pt"))
    exit_now(0)


def run_distributed(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """``fn(rank, world_size, *args)`` on every rank; returns the per-rank results."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(world_size, init_file, tmp, fn, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(tmp, f"{r}.pt"), weights_only=False) for r in range(world_size)]
