"""Peak memory per rank with each memory switch on vs off, and `mfrctl plan`'s error on each.

    python benchmarks/bench_memory.py            # 2 gloo ranks on CPU
    python benchmarks/bench_memory.py --device cuda --ranks 1   # on a GPU machine

One base configuration; every run changes one switch (ZeRO 2 and 3,
activation checkpointing per stage and per block, micro-batches, bf16
autocast, class sampling) and is measured in fresh processes, all in this
invocation.  A rank's peak is what torch's allocator holds at the top of a
real ``Trainer.train_step`` (``trainer/memory.py``: profiler allocation events
on CPU, ``max_memory_allocated`` on CUDA), after one warm-up step.  The plan
is ``mfrctl plan``'s peak for rank 0 of the same configuration (it holds the
larger head shard); the error is plan / measured - 1.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.support

from mfr.ctl.memory_model import PlanSpec, format_bytes, plan_memory
from mfr.trainer.config import load_config
from mfr.trainer.dist import DistEnv
from mfr.trainer.memory import measure_train_step
from tests.support.configs import MEMORY_MEASURED

BASES = {  # activation-bound, and parameter-bound (where ZeRO matters)
    "small": [
        "model.backbone=custom",
        "model.layers=[2,2,2,2]",
        "model.width=0.25",
        "model.embedding_size=128",
        "head.num_classes=50001",
        "data.batch_size=16",
    ],
    "wide": [
        "model.backbone=custom",
        "model.layers=[1,1,2,1]",
        "model.width=1.0",
        "model.embedding_size=512",
        "head.num_classes=20001",
        "data.batch_size=2",
    ],
}
SWITCHES = {
    "baseline (DDP, fp32, none)": [],
    "optim.zero=2": ["optim.zero=2"],
    "optim.zero=3": ["optim.zero=3"],
    "activation_checkpointing=stage": ["model.activation_checkpointing=stage"],
    "activation_checkpointing=block": ["model.activation_checkpointing=block"],
    "optim.micro_batches=4": ["optim.micro_batches=4"],
    "run.amp=bf16": ["run.amp=bf16"],
    "head.sample_rate=0.1": ["head.sample_rate=0.1"],
}


def _rank(rank: int, world: int, init_file: str, overrides: list[str], device: str, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dev = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(
        "nccl" if device == "cuda" else "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        env = DistEnv(rank, rank, world, world, 0, dev)
        memory = measure_train_step(load_config(None, overrides), env)
        torch.save(memory.peak, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def measure(overrides: list[str], ranks: int, device: str) -> list[int]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(ranks, os.path.join(tmp, "init"), overrides, device, tmp), nprocs=ranks, join=True)
        return [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(ranks)]


def planned(overrides: list[str], ranks: int) -> int:
    cfg = load_config(None, overrides)
    spec = PlanSpec.from_config(cfg, nodes=1, gpus_per_node=ranks)
    return plan_memory(spec).peak


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--base", choices=list(BASES), default="small")
    parser.add_argument("--only", nargs="*", help="run only these switches (names as printed)")
    args = parser.parse_args()
    print(
        f"machine: {_cpu_name()}, {os.cpu_count()} cpus; torch {torch.__version__}; "
        f"device {args.device}, {args.ranks} ranks"
    )
    print(f"base {args.base}: " + " ".join(BASES[args.base]))
    print("| switch | peak rank 0 | peak rank 1 | vs baseline | plan (rank 0) | plan error |")
    print("|---|---:|---:|---:|---:|---:|")
    baseline = None
    with tempfile.TemporaryDirectory() as run_dir:
        for name, change in SWITCHES.items():
            if args.only and change and name not in args.only:
                continue
            if "zero" in name and args.ranks < 2:
                continue
            overrides = [*MEMORY_MEASURED, *BASES[args.base], *change, f"run.output_dir={run_dir}"]
            if args.device == "cuda":
                overrides.append("run.device=cuda")
            peaks = measure(overrides, args.ranks, args.device)
            plan = planned(overrides, args.ranks)
            baseline = baseline or peaks[0]
            others = format_bytes(peaks[1]) if len(peaks) > 1 else "-"
            print(
                f"| {name} | {format_bytes(peaks[0])} | {others} | {peaks[0] / baseline:.2f}x | "
                f"{format_bytes(plan)} | {plan / peaks[0] - 1:+.1%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
