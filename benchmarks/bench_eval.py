"""Verification at scale: exact TPR@FPR over 1e9 and 1e10 pairs of synthetic embeddings, on this machine.

    python benchmarks/bench_eval.py --work /tmp/bench-eval                  # every measure
    python benchmarks/bench_eval.py --work /tmp/bench-eval --only ranks 1e9  # some of them

Synthetic embeddings stand in for a face model's (no data needed): identity
centres are random unit vectors in D = 512, an image is its centre plus
Gaussian noise of norm ``--noise`` (genuine cosines about 1 / (1 + noise^2),
impostor ones about N(0, 1/D)), written as fp16 shards exactly as
``mfrctl eval --embeddings`` writes them, and scored all-vs-all
(unmasked-unmasked) at FPR 1e-1 .. 1e-6 by ``mfr.trainer.score``.

Measures (each printed as a table row, ratios against a baseline measured in
the same invocation):

* throughput: 1 rank x 1 thread, pairs/s against the single-thread sgemm
  limit ``GFLOP/s / (2 D)``, sgemm measured on the tile's own product
  (2048 x 512 times 512 x 2048) right before and after each run, both by
  wall time and by CPU time (on a machine shared with other jobs the wall
  clock also counts the time they held the core);
* ranks: 2 ranks x 1 thread vs 1 rank x 1 thread (both as processes),
  alternated: identical reports, the pairs/s ratio (medians and best of
  each), and pairs per CPU second of 2 ranks against 1 (parallel
  efficiency, merge included);
* 1e9 and 1e10: 2 ranks, wall time of ``mfrctl eval``'s local ranks
  (process start, embedding load, scoring, merge), scoring time, each
  rank's peak RSS (VmHWM);
* exact: the brute force (every score kept, ``verification.tpr_at_fpr``)
  against the scorer on the largest set whose scores fit in memory here.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.support

from mfr.ctl.scoring import score_with_ranks
from mfr.trainer import pairsets, score
from mfr.trainer.features import FeatureWriter
from mfr.trainer.verification import DEFAULT_FPRS, tpr_at_fpr
from tests.support.references import all_scores

DIM = 512
PER_IDENTITY = 10


def synthetic(root: Path, images: int, noise: float, seed: int = 0) -> str:
    """``images`` embeddings (``PER_IDENTITY`` per identity) as an embedding folder; reused when already there."""
    url = root / f"synthetic-{images}"
    if (url / "unmasked" / "index.json").exists():
        return str(url)
    rng = np.random.default_rng(seed)
    identities = -(-images // PER_IDENTITY)
    centres = rng.standard_normal((identities, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    writer = FeatureWriter(str(url / "unmasked"), None, DIM, 65536)
    for start in range(0, images, 65536):
        labels = np.arange(start, min(start + 65536, images)) // PER_IDENTITY
        noisy = centres[labels] + noise / np.sqrt(DIM) * rng.standard_normal((labels.size, DIM), dtype=np.float32)
        writer.add(noisy, labels)
    writer.close({"eval": {"data": f"synthetic: {identities} identities x {PER_IDENTITY}, noise {noise}"}})
    return str(url)


def sgemm_gflops(repeats: int = 5) -> tuple[float, float]:
    """Single-thread GFLOP/s of the tile's product (the physical limit: 2 D flops a pair): best by wall time, and
    by the CPU time of this process (which leaves out the time other processes' jobs took the core)."""
    tile = pairsets.TILE
    rows = np.random.default_rng(0).standard_normal((2, tile, DIM), dtype=np.float32)
    out = np.empty((tile, tile), np.float32)
    wall, cpu = [], []
    with pairsets.one_blas_thread():
        for _ in range(repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            np.matmul(rows[0], rows[1].T, out=out)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
    flops = 2 * DIM * tile * tile
    return flops / min(wall) / 1e9, flops / min(cpu) / 1e9


def in_process(url: str) -> dict:
    embedded = score.load_embedded(url)
    return score.score_set(embedded, score.Ranks(join=False), fprs=DEFAULT_FPRS)


def with_ranks(url: str, nproc: int) -> tuple[dict, float]:
    """The report of ``nproc`` local ranks (as ``mfrctl eval --nproc`` runs them) and the wall time."""
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        entry = score_with_ranks(
            url, Path(url).name, DEFAULT_FPRS, 0, None, nproc, Path(work), lambda protocol, done, total: None
        )
        return entry, time.perf_counter() - start


def _points(entry: dict) -> list:
    return [(p["protocol"], p["n_genuine"], p["n_impostor"], p["points"], p["roc"]) for p in entry["protocols"]]


def _tprs(entry: dict) -> str:
    return " ".join(f"{p['target_fpr']:g}:{p['tpr']:.4f}" for p in entry["protocols"][0]["points"] if p["supported"])


def measure_throughput(url: str, runs: int) -> None:
    """Pairs/s of one rank against the sgemm limit, by wall time and by CPU time (see ``sgemm_gflops``)."""
    wall_ratios, cpu_ratios, rates = [], [], []
    for _ in range(runs):
        before = sgemm_gflops()
        entry = in_process(url)
        after = sgemm_gflops()
        scoring = entry["scoring"]
        rates.append(scoring["pairs_per_second"])
        wall_ratios.append(rates[-1] / (max(before[0], after[0]) * 1e9 / (2 * DIM)))
        per_cpu = scoring["pairs"] / scoring["cpu_seconds"][0]
        cpu_ratios.append(per_cpu / (max(before[1], after[1]) * 1e9 / (2 * DIM)))
        print(
            f"#   run: {rates[-1]:,.0f} pairs/s ({per_cpu:,.0f} per CPU second), "
            f"sgemm {before[0]:.1f} / {after[0]:.1f} GFLOP/s ({before[1]:.1f} / {after[1]:.1f} per CPU second): "
            f"{wall_ratios[-1]:.2f} of the limit by wall time, {cpu_ratios[-1]:.2f} by CPU time",
            flush=True,
        )
    print(
        f"| throughput per core, 1 rank x 1 thread, {entry['scoring']['pairs']:.3g} pairs | "
        f"{statistics.median(cpu_ratios):.2f} of the sgemm limit by CPU time, "
        f"{statistics.median(wall_ratios):.2f} by wall time (medians of {runs}) | "
        f"{statistics.median(rates):,.0f} pairs/s | TPR {_tprs(entry)} |"
    )


def measure_ranks(url: str, runs: int) -> None:
    """Alternated 1- and 2-rank runs: identical reports; speed-up by wall time (median, best) and CPU efficiency."""
    walls: dict[int, list[float]] = {1: [], 2: []}
    per_cpu: dict[int, list[float]] = {1: [], 2: []}
    identical = True
    for _ in range(runs):
        one, _ = with_ranks(url, 1)
        two, _ = with_ranks(url, 2)
        identical &= _points(one) == _points(two)
        for n, entry in ((1, one), (2, two)):
            walls[n].append(entry["scoring"]["pairs_per_second"])
            per_cpu[n].append(entry["scoring"]["pairs"] / sum(entry["scoring"]["cpu_seconds"]))
        print(
            f"#   run: 1 rank {walls[1][-1]:,.0f} pairs/s, 2 ranks {walls[2][-1]:,.0f} pairs/s; per CPU second "
            f"{per_cpu[1][-1]:,.0f} and {per_cpu[2][-1]:,.0f}",
            flush=True,
        )
    median = statistics.median(walls[2]) / statistics.median(walls[1])
    best = max(walls[2]) / max(walls[1])
    efficiency = statistics.median(per_cpu[2]) / statistics.median(per_cpu[1])
    print(
        f"| 2 ranks x 1 thread vs 1 rank x 1 thread, {one['scoring']['pairs']:.3g} pairs | {median:.2f}x pairs/s "
        f"(medians of {runs}), {best:.2f}x best vs best; pairs per CPU second {efficiency:.2f}x (2 x that is the "
        f"speed-up on 2 free cores) | reports {'identical' if identical else 'DIFFER'} | |"
    )


def measure_scale(url: str) -> None:
    entry, wall = with_ranks(url, 2)
    scoring = entry["scoring"]
    peaks = ", ".join(f"{b / 2**30:.2f}" for b in scoring["peak_rss_bytes"])
    passes = [p["passes"] for p in entry["protocols"]]
    print(
        f"| {scoring['pairs']:.3g} pairs, 2 ranks | {wall:.1f} s wall ({scoring['seconds']:.1f} s scoring, "
        f"{scoring['pairs_per_second']:,.0f} pairs/s) | peak RSS per rank {peaks} GiB, passes {passes} | "
        f"TPR {_tprs(entry)} |"
    )


def measure_exact(url: str) -> None:
    embedded = score.load_embedded(url)
    entry = score.score_set(embedded, score.Ranks(join=False), fprs=DEFAULT_FPRS)
    pairs = score.protocol_pairs(embedded, "unmasked-unmasked", 0, None)
    genuine, impostor = all_scores(pairs)
    scores = np.concatenate([genuine, impostor]).astype(np.float64)
    del impostor
    reference = tpr_at_fpr(scores, np.arange(scores.size) < genuine.size, DEFAULT_FPRS)
    got = entry["protocols"][0]["points"]
    same = [tuple(p.values()) for p in got] == [tuple(vars(p).values()) for p in reference]
    print(
        f"| exact: scorer vs brute force, {scores.size:.3g} pairs | TPR, threshold and FPR at "
        f"{len(reference)} targets {'identical' if same else 'DIFFER'} | passes "
        f"{entry['protocols'][0]['passes']} | TPR {_tprs(entry)} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "mfr-bench-eval",
        help="where the synthetic embeddings are written (reused by later runs)",
    )
    parser.add_argument("--only", nargs="*", default=["throughput", "ranks", "exact", "1e9", "1e10"])
    parser.add_argument("--noise", type=float, default=2.0, help="noise norm per image (genuine cos ~ 1/(1+noise^2))")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--throughput-images", type=int, default=30000)  # 4.5e8 pairs
    parser.add_argument("--exact-images", type=int, default=14143)  # 1.0e8 pairs: ~6 GB for the brute force
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    sizes = {
        "throughput": args.throughput_images,
        "ranks": args.throughput_images,
        "exact": args.exact_images,
        "1e9": 44722,
        "1e10": 141422,
    }  # n (n - 1) / 2 >= 1e9, 1e10
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    print(
        f"# {platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__} (OpenBLAS), D = {DIM} fp32, "
        f"tile {pairsets.TILE}, load average {' '.join(load)}"
    )
    print("| measure | result | detail | |")
    print("|---|---|---|---|")
    for what in args.only:
        url = synthetic(args.work, sizes[what], args.noise)
        if what == "throughput":
            measure_throughput(url, args.runs)
        elif what == "ranks":
            measure_ranks(url, args.runs)
        elif what == "exact":
            measure_exact(url)
        else:
            measure_scale(url)
        sys.stdout.flush()
    with open("/proc/loadavg") as f:
        print(f"# load average at the end {' '.join(f.read().split()[:3])}")


if __name__ == "__main__":
    main()
