"""Sharded margin head vs a naive single-process full softmax: step time and memory.

    python benchmarks/bench_head.py --classes 100000 1000000

For each class count C this runs, in fresh processes under identical
settings (1 thread per process, same MALLOC_* environment):
  * naive: one process holds all C centres and the whole global batch's
    logits (F.cross_entropy over C classes, same ArcFace margin);
  * PartialFC at world 1 and 2 (gloo ranks on this machine), sample_rate 1.0
    and 0.1.
A step is forward + backward + SGD(momentum, weight decay) on the head.
"Head memory" is a rank's peak RSS minus its RSS just before the head was
built (torch's own footprint excluded).  Ratios are against the naive run
of the same C, measured in this invocation.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mfr.trainer.head import PartialFC, combined_margin

EMBEDDING = 512
BATCH_PER_RANK = 64
MARGINS = (1.0, 0.5, 0.0)
SCALE = 64.0


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _peak_mb() -> float:
    """Peak RSS of this process image (VmHWM; ru_maxrss would survive exec)."""
    return _status_mb("VmHWM")


def _time_steps(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _naive_step(classes: int, global_batch: int):
    weight = torch.nn.Parameter(torch.normal(0, 0.01, (classes, EMBEDDING)))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
    embeddings = torch.randn(global_batch, EMBEDDING, requires_grad=True)
    labels = torch.randint(0, classes, (global_batch,))

    def step():
        cos = F.linear(F.normalize(embeddings), F.normalize(weight)).clamp(-1, 1)
        rows = torch.arange(global_batch)
        logits = cos.index_put((rows, labels), combined_margin(cos[rows, labels], *MARGINS)) * SCALE
        F.cross_entropy(logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _sharded_step(classes: int, sample_rate: float, rank: int):
    head = PartialFC(EMBEDDING, classes, margins=MARGINS, scale=SCALE, sample_rate=sample_rate)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(rank)
    embeddings = torch.randn(BATCH_PER_RANK, EMBEDDING, generator=gen, requires_grad=True)
    labels = torch.randint(0, classes, (BATCH_PER_RANK,), generator=gen)

    def step():
        head(embeddings, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _measure(make_step, classes: int, warmup: int, steps: int) -> dict:
    """Median step time and head memory; a tiny run first pages in torch's code."""
    tiny = make_step(64)
    for _ in range(2):
        tiny()
    del tiny
    baseline = _rss_mb()
    seconds = _time_steps(make_step(classes), warmup, steps)
    return {"seconds": seconds, "memory_mb": _peak_mb() - baseline}


def _naive(classes: int, global_batch: int, warmup: int, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    torch.save(_measure(lambda c: _naive_step(c, global_batch), classes, warmup, steps), out)


def _sharded_rank(rank, world, init_file, classes, sample_rate, warmup, steps, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result = _measure(lambda c: _sharded_step(c, sample_rate, rank), classes, warmup, steps)
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def _run_sharded(world, classes, sample_rate, warmup, steps) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(
            _sharded_rank,
            args=(world, os.path.join(tmp, "init"), classes, sample_rate, warmup, steps, tmp),
            nprocs=world,
        )
        ranks = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(world)]
    return {"seconds": max(r["seconds"] for r in ranks), "memory_mb": max(r["memory_mb"] for r in ranks)}


def _run_naive(classes, global_batch, warmup, steps) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "naive.pt")
        proc = mp.get_context("spawn").Process(target=_naive, args=(classes, global_batch, warmup, steps, out))
        proc.start()
        proc.join()
        return torch.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sample-rates", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"1 thread per process, D={EMBEDDING}, {BATCH_PER_RANK} samples per rank, MALLOC_*={malloc or 'unset'}")
    print("| C | implementation | world | sample_rate | step s/rank | head MB/rank | time vs naive "
          "| memory vs naive | time vs sample_rate 1.0 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for classes in args.classes:
        global_batch = BATCH_PER_RANK * max(args.worlds)
        naive = _run_naive(classes, global_batch, args.warmup, args.steps)
        print(f"| {classes:,} | naive full softmax (batch {global_batch}) | 1 | 1.0 | "
              f"{naive['seconds']:.3f} | {naive['memory_mb']:.0f} | 1.00 | 1.00 | |", flush=True)
        for world in args.worlds:
            full = None
            for rate in sorted(args.sample_rates, reverse=True):
                r = _run_sharded(world, classes, rate, args.warmup, args.steps)
                full = full or (r if rate == 1.0 else None)
                vs_full = f"{r['seconds'] / full['seconds']:.2f}" if full else ""
                print(f"| {classes:,} | PartialFC | {world} | {rate} | {r['seconds']:.3f} | {r['memory_mb']:.0f} | "
                      f"{r['seconds'] / naive['seconds']:.2f} | {r['memory_mb'] / naive['memory_mb']:.2f} "
                      f"| {vs_full} |", flush=True)


if __name__ == "__main__":
    main()
