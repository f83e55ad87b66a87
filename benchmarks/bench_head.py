"""Sharded margin head: step time and memory against a naive full softmax, or against arcface_torch.

    python benchmarks/bench_head.py --classes 100000 1000000
    python benchmarks/bench_head.py --arcface-torch /tmp/insightface/recognition/arcface_torch \\
        --classes 100000 --rounds 4

Every run is a fresh set of processes under identical settings (1 thread per
process, the same MALLOC_* environment).  A step is forward + backward + the
optimizer step of the head alone: SGD (momentum 0.9, weight decay 5e-4).
Memory is a rank's peak RSS (VmHWM), and "head memory" that peak minus the
RSS just before the head was built, after a tiny run has paged in torch's code.

Without ``--arcface-torch``: a naive single process over all C classes
(F.cross_entropy, the whole global batch) against PartialFC at world 1 and 2,
sample_rate 1.0 and 0.1, ArcFace margin; ratios against the naive run.

With ``--arcface-torch PATH`` (the recognition/arcface_torch folder of
deepinsight/insightface, imported from there at run time, never copied):
its PartialFC_V2 + CombinedMarginLoss against ours, CosFace margin, per
(C, world, sample_rate) ``--rounds`` rounds, each running both
implementations in alternating order.  Both get the same initial rows and the
same batches.  Our step is the training loop's: the project's optimizer for
the head and the exact global gradient norm (``clip_global_grad_norm``
without a limit, so that both trajectories stay the same).  Reported: the
medians over the rounds and their ratios (ours / arcface_torch); the losses
of the first and the last step of each, which must agree at sample_rate 1.0
(sampling draws other negatives in each).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from mfr.trainer.config import OptimConfig
from mfr.trainer.head import PartialFC, combined_margin
from mfr.trainer.optim import build_optimizer, clip_global_grad_norm

EMBEDDING = 512
BATCH_PER_RANK = 64
ARCFACE = (1.0, 0.5, 0.0)
COSFACE = (1.0, 0.0, 0.4)
SCALE = 64.0
SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _time_steps(step, warmup: int, steps: int) -> tuple[float, list[float]]:
    """(median seconds per step, loss of every step)."""
    losses = [step() for _ in range(warmup)]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
    return statistics.median(times), losses


def _naive_step(classes: int, global_batch: int):
    weight = nn.Parameter(torch.normal(0, 0.01, (classes, EMBEDDING)))
    optimizer = torch.optim.SGD([weight], **SGD)
    embeddings = torch.randn(global_batch, EMBEDDING, requires_grad=True)
    labels = torch.randint(0, classes, (global_batch,))

    def step():
        cos = F.linear(F.normalize(embeddings), F.normalize(weight)).clamp(-1, 1)
        rows = torch.arange(global_batch)
        logits = cos.index_put((rows, labels), combined_margin(cos[rows, labels], *ARCFACE)) * SCALE
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _batches(classes: int, rank: int):
    """This rank's embeddings and labels, a new batch every step (cycling through 16): the same for every
    implementation."""
    gen = torch.Generator().manual_seed(rank)
    batches = [
        (
            torch.randn(BATCH_PER_RANK, EMBEDDING, generator=gen, requires_grad=True),
            torch.randint(0, classes, (BATCH_PER_RANK,), generator=gen),
        )
        for _ in range(16)
    ]
    return itertools.cycle(batches)


def _initial_rows(num_local: int, start: int) -> torch.Tensor:
    """The same initial rows for every implementation."""
    return torch.normal(0, 0.01, (num_local, EMBEDDING), generator=torch.Generator().manual_seed(1000 + start))


def _mfr_step(classes: int, sample_rate: float, margins, rank: int):
    head = PartialFC(EMBEDDING, classes, margins=margins, scale=SCALE, sample_rate=sample_rate)
    with torch.no_grad():
        head.weight.copy_(_initial_rows(head.num_local, head.start))
    optimizer = build_optimizer(OptimConfig(name="sgd", **SGD), nn.Module(), head)
    params = list(head.parameters())
    batches = _batches(classes, rank)

    def step():
        embeddings, labels = next(batches)
        loss = head(embeddings, labels)
        loss.backward()
        clip_global_grad_norm([], params, None, embeddings.device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _arcface_step(path: str, classes: int, sample_rate: float, margins, rank: int):
    if path not in sys.path:
        sys.path.insert(0, path)
    partial_fc_v2, losses = importlib.import_module("partial_fc_v2"), importlib.import_module("losses")
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # its .cuda() calls: a no-op on this CPU machine
    margin = losses.CombinedMarginLoss(SCALE, *margins)
    head = partial_fc_v2.PartialFC_V2(margin, EMBEDDING, classes, sample_rate=sample_rate)
    with torch.no_grad():
        head.weight.copy_(_initial_rows(head.num_local, head.class_start))
    optimizer = torch.optim.SGD(head.parameters(), **SGD)
    batches = _batches(classes, rank)

    def step():
        embeddings, labels = next(batches)
        loss = head(embeddings, labels.clone())  # it rewrites its labels in place
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _measure(make_step, classes: int, warmup: int, steps: int) -> dict:
    """Median step time and memory; a tiny run first pages in torch's code."""
    tiny = make_step(64)
    for _ in range(2):
        tiny()
    del tiny
    baseline = _status_mb("VmRSS")
    seconds, losses = _time_steps(make_step(classes), warmup, steps)
    peak = _status_mb("VmHWM")
    return {"seconds": seconds, "peak_mb": peak, "memory_mb": peak - baseline, "losses": losses}


def _naive(classes: int, global_batch: int, warmup: int, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    torch.save(_measure(lambda c: _naive_step(c, global_batch), classes, warmup, steps), out)


def _rank(rank, world, init_file, impl, classes, sample_rate, margins, warmup, steps, out_dir):
    torch.set_num_threads(1)
    torch.manual_seed(rank)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    if impl == "mfr":

        def make(c):
            return _mfr_step(c, sample_rate, margins, rank)
    else:

        def make(c):
            return _arcface_step(impl, c, sample_rate, margins, rank)

    result = _measure(make, classes, warmup, steps)
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def _run_sharded(impl, world, classes, sample_rate, margins, warmup, steps) -> dict:
    """``impl``: "mfr", or the path of arcface_torch.  The slowest and largest rank's numbers."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(
            _rank,
            args=(world, os.path.join(tmp, "init"), impl, classes, sample_rate, margins, warmup, steps, tmp),
            nprocs=world,
        )
        ranks = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(world)]
    return {
        "seconds": max(r["seconds"] for r in ranks),
        "peak_mb": max(r["peak_mb"] for r in ranks),
        "memory_mb": max(r["memory_mb"] for r in ranks),
        "losses": ranks[0]["losses"],
    }


def _run_naive(classes, global_batch, warmup, steps) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "naive.pt")
        proc = mp.get_context("spawn").Process(target=_naive, args=(classes, global_batch, warmup, steps, out))
        proc.start()
        proc.join()
        return torch.load(out)


def _against_naive(args) -> None:
    print(
        "| C | implementation | world | sample_rate | step s/rank | head MB/rank | time vs naive "
        "| memory vs naive | time vs sample_rate 1.0 |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for classes in args.classes:
        global_batch = BATCH_PER_RANK * max(args.worlds)
        naive = _run_naive(classes, global_batch, args.warmup, args.steps)
        print(
            f"| {classes:,} | naive full softmax (batch {global_batch}) | 1 | 1.0 | "
            f"{naive['seconds']:.3f} | {naive['memory_mb']:.0f} | 1.00 | 1.00 | |",
            flush=True,
        )
        for world in args.worlds:
            full = None
            for rate in sorted(args.sample_rates, reverse=True):
                r = _run_sharded("mfr", world, classes, rate, ARCFACE, args.warmup, args.steps)
                full = full or (r if rate == 1.0 else None)
                vs_full = f"{r['seconds'] / full['seconds']:.2f}" if full else ""
                print(
                    f"| {classes:,} | PartialFC | {world} | {rate} | {r['seconds']:.3f} | {r['memory_mb']:.0f} | "
                    f"{r['seconds'] / naive['seconds']:.2f} | {r['memory_mb'] / naive['memory_mb']:.2f} "
                    f"| {vs_full} |",
                    flush=True,
                )


def _against_arcface_torch(args) -> None:
    print(
        "| C | world | sample_rate | step s: ours / arcface_torch (median) | time ratio | per-round time ratios "
        "| peak RSS MB/rank: ours / theirs | RSS ratio | head MB/rank: ours / theirs | head ratio "
        "| loss, first and last step: ours / theirs |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for classes in args.classes:
        for world in args.worlds:
            for rate in sorted(args.sample_rates, reverse=True):
                runs = {"mfr": [], "arcface_torch": []}
                for i in range(args.rounds):
                    order = ["arcface_torch", "mfr"] if i % 2 == 0 else ["mfr", "arcface_torch"]
                    for name in order:
                        impl = "mfr" if name == "mfr" else args.arcface_torch
                        runs[name].append(_run_sharded(impl, world, classes, rate, COSFACE, args.warmup, args.steps))
                ours, theirs = runs["mfr"], runs["arcface_torch"]

                def med(rs, key):
                    return statistics.median(r[key] for r in rs)

                per_round = " ".join(f"{a['seconds'] / b['seconds']:.2f}" for a, b in zip(ours, theirs))
                print(
                    f"| {classes:,} | {world} | {rate} | {med(ours, 'seconds'):.3f} / {med(theirs, 'seconds'):.3f} "
                    f"| **{med(ours, 'seconds') / med(theirs, 'seconds'):.2f}** | {per_round} "
                    f"| {med(ours, 'peak_mb'):.0f} / {med(theirs, 'peak_mb'):.0f} "
                    f"| **{med(ours, 'peak_mb') / med(theirs, 'peak_mb'):.2f}** "
                    f"| {med(ours, 'memory_mb'):.0f} / {med(theirs, 'memory_mb'):.0f} "
                    f"| {med(ours, 'memory_mb') / med(theirs, 'memory_mb'):.2f} "
                    f"| {ours[0]['losses'][0]:.4f}, {ours[0]['losses'][-1]:.4f} / "
                    f"{theirs[0]['losses'][0]:.4f}, {theirs[0]['losses'][-1]:.4f} |",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--worlds", type=int, nargs="+", default=None, help="default: 1 2 (naive), 2 (arcface_torch)")
    parser.add_argument("--sample-rates", type=float, nargs="+", default=[1.0, 0.1])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--arcface-torch", metavar="PATH", help="recognition/arcface_torch of deepinsight/insightface")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per configuration (arcface_torch)")
    args = parser.parse_args()
    if args.arcface_torch and not os.path.isfile(os.path.join(args.arcface_torch, "partial_fc_v2.py")):
        parser.error(
            f"--arcface-torch {args.arcface_torch}: no partial_fc_v2.py there "
            "(give the recognition/arcface_torch folder)"
        )
    args.worlds = args.worlds or ([2] if args.arcface_torch else [1, 2])
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    print(
        f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"1 thread per process, D={EMBEDDING}, {BATCH_PER_RANK} samples per rank, MALLOC_*={malloc or 'unset'}, "
        f"{args.warmup} warm-up + {args.steps} timed steps per run"
    )
    if args.arcface_torch:
        _against_arcface_torch(args)
    else:
        _against_naive(args)


if __name__ == "__main__":
    main()
