"""Process-group set-up from the environment torchrun (and the operator) give.

Under torchrun every worker gets RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR/PORT and TORCHELASTIC_RESTART_COUNT.  Started
without torchrun (``python -m mfr.trainer``) the trainer is a world of one.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    restart_count: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(preference: str, local_rank: int) -> torch.device:
    """``auto`` means this node's GPU ``local_rank`` when CUDA is there, else CPU."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device is cuda but no CUDA device is available; use auto or cpu")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device_preference: str = "auto") -> DistEnv:
    """Join the job's process group: NCCL on CUDA, gloo on CPU."""
    env = os.environ
    local_rank = int(env.get("LOCAL_RANK", 0))
    device = pick_device(device_preference, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in env and "WORLD_SIZE" in env:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistEnv(
        rank=dist.get_rank(),
        local_rank=local_rank,
        world_size=dist.get_world_size(),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
        restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
        device=device,
    )


# What gloo, NCCL and the c10d store say when the other end of a connection went away.
_PEER_GONE = re.compile(
    r"Connection (reset|closed|refused)|Broken pipe|Socket Timeout|Timed out waiting|timed out after|"
    r"NCCL communicator was aborted|ncclRemoteError|remote process exited",
    re.IGNORECASE,
)


def is_peer_loss(err: BaseException) -> bool:
    """Did a collective or the store fail because another rank, its pod or the store is gone?

    Then restarting the job fixes it (every pod resumes from the last commit); any other
    error is the run's own.  gloo reports a dead peer as a plain RuntimeError.
    """
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, (dist.DistNetworkError, dist.DistStoreError)):
            return True
        if isinstance(seen, RuntimeError) and _PEER_GONE.search(str(seen)):
            return True
        seen = seen.__cause__
    return False


@contextlib.contextmanager
def shutdown_distributed() -> Iterator[None]:
    """Destroy every process group when the block (which drops the trainer) ends, on this thread.

    A gloo worker thread retires a collective after its caller has moved on,
    and releasing the collective's tensors takes the GIL.  A worker still alive
    when the interpreter finalizes can meet it there: Python ends the thread
    with pthread_exit inside a noexcept destructor, std::terminate aborts the
    process ("terminate called without an active exception"), and a finished
    run exits non-zero.  Destroying a group joins its workers, with the GIL
    released meanwhile, so here every worker is done before the exit.

    A group lives as long as anything refers to it (DDP, the checkpointer's
    groups, the frames of an exception on its way out), so those frames are
    cleared and the garbage collected here, with automatic collection off: a
    collection on another thread (the metrics exporter's) would destroy the
    groups there and meet the exit the same way.
    """
    automatic = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        try:
            _clear_exception_frames(sys.exc_info()[1])
            gc.collect()
            dist.destroy_process_group()
        finally:
            if automatic:
                gc.enable()


def _clear_exception_frames(error: BaseException | None) -> None:
    """Drop the local variables of the frames an exception (and its causes) keeps."""
    pending, seen = [error], set()
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)  # the frame still running (ours) is skipped
        pending += [error.__cause__, error.__context__]
