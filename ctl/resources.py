"""Default CPU and memory requests of a run's pods, sized from its config with mfrctl plan's memory model.

The scheduler places pods, and Kueue admits jobs, by their requests; a pod
that requests nothing counts as free and is the first one evicted or
OOM-killed when the node runs short.  A pod's host memory is, per training
process:

* the process itself: torch and its libraries, the data pipeline, the
  held-out evaluation set; measured on CPU at 0.77-0.90 GiB of RSS beyond
  the tensors of the demo (``CPU_PROCESS``); on a GPU node the CUDA context,
  cuDNN and NCCL add host memory (``GPU_PROCESS``, not measured here);
* on CPU, the training step's own peak (``plan_memory``); on a GPU it lives
  in device memory;
* the host copy of the rank's checkpoint state that async saves stage into
  and keep between saves (parameters, buffers, optimizer state, head shard);
* each DataLoader worker (``LOADER_WORKER``);

and once per pod, what the memory-backed ``/dev/shm`` holds, which counts
against the pod's memory: the batches the DataLoader workers have prefetched
(two each) and, between the GPUs of a pod, NCCL's buffers (an estimate,
``NCCL_SHM``), up to ``shm.sizeLimit``.  CPU: one core per training process
and one per DataLoader worker.  The numbers are requests (what the pod is
sure to get), not limits.
"""

from __future__ import annotations

import math
from dataclasses import replace

from mfr.trainer.config import INPUT_SIZE, TrainConfig

from .memory_model import PlanSpec, parse_memory, plan_memory

GiB, MiB = 2**30, 2**20
CPU_PROCESS = 1 * GiB
GPU_PROCESS = 3 * GiB
LOADER_WORKER = 512 * MiB
NCCL_SHM = 256 * MiB
PREFETCHED = 2  # batches each DataLoader worker keeps ready (torch's prefetch_factor)
_STATE = {"parameters", "buffers", "optimizer state", "shard weights"}


def pod_requests(train: TrainConfig, *, nodes: int, nproc: int, gpus: int, shm: str) -> dict[str, str]:
    """``{"cpu": ..., "memory": ...}`` for one pod of ``nodes`` running ``nproc`` processes."""
    world = max(nodes * nproc, 1)
    spec = replace(
        PlanSpec.from_config(train, nodes=1, gpus_per_node=world),
        classes=max(train.head.num_classes, world),
        zero=train.optim.zero if world > 1 else 0,
    )
    plan = plan_memory(spec)
    state = sum(item.bytes for item in plan.items if item.name in _STATE)
    per_process = (GPU_PROCESS if gpus else CPU_PROCESS + plan.peak) + state + train.data.num_workers * LOADER_WORKER
    batch = train.data.batch_size * 3 * INPUT_SIZE**2 * 4  # float32 images
    in_shm = nproc * train.data.num_workers * PREFETCHED * batch + (nproc * NCCL_SHM if gpus > 1 else 0)
    memory = nproc * per_process + (min(in_shm, _quantity(shm)) if shm else in_shm)
    return {"cpu": str(nproc * (1 + train.data.num_workers)), "memory": f"{math.ceil(memory / MiB)}Mi"}


def _quantity(text: str) -> int:
    """Bytes of a Kubernetes memory quantity (``8Gi``, ``512M``, ``1073741824``)."""
    return int(text) if text.isdigit() else parse_memory(text)
