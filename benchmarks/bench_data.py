"""Data path throughput: per-sample CPU cost, and shard streaming from S3.

    python benchmarks/bench_data.py --images 2000

1. Decode + mask augmentation + flip + normalise, one core (``torch.set_num_threads(1)``),
   on 112x112 JPEGs of synthetic faces (quality 90), as images/s:

   * mfr: ``sources.decode`` (PIL with JPEG draft) then ``augment.Augment`` (MaskAugment at
     p = 0.35, flip, normalise in numpy), exactly what a DataLoader worker runs per sample;
   * baseline: PIL ``open().convert("RGB")``, the same MaskAugment, then the
     torchvision-transforms pipeline written out with torch ops (RandomHorizontalFlip,
     ToTensor, Normalize(0.5, 0.5)) -- torchvision itself has no CPU wheel for torch 2.13
     here, so the transforms are re-implemented as torchvision's functional code does them;
   * the same two without the mask (p = 0): the fixed per-sample overhead.

2. Shards on a SeaweedFS S3 server on 127.0.0.1 (started here, as in the tests): the
   bytes/s of one DataLoader worker's reads (``ShardFaces._fetch`` over the batches the
   sampler gives it: whole spans, the next one fetched in the background, tar members
   parsed, no decode) vs raw s3fs reads of the same bytes (``cat_file`` of each whole
   .tar), alternated in one run; also the per-batch reads that a job resumed on another
   layout makes for the rest of that epoch.

3. ``order``: the epoch order at WebFace260M scale (``--order-size``): the samplers'
   memory and indices/s (``GlobalOrderSampler``'s Feistel permutation,
   ``SpanOrderSampler``) against the ``torch.randperm`` of the whole epoch that the
   sampler used to build.

4. ``e2e`` / ``e2e-s3``: data wait as a share of step time, training the demo model on
   shards read from local disk / from the S3 server.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.support.s3server

from mfr.trainer.data.augment import Augment
from mfr.trainer.data.masks import MaskAugment
from mfr.trainer.data.sources import decode
from mfr.trainer.data.synthetic import SyntheticFaces
from tests.support.s3server import SeaweedS3


def faces(n: int) -> list[bytes]:
    """``n`` JPEGs of synthetic faces, some masked (rendered once, then reused round-robin)."""
    data = SyntheticFaces(num_identities=64, images_per_identity=4, seed=0)
    out = []
    for i in range(min(n, 256)):
        img = data.render(i // 4, i % 4, masked=i % 3 == 0)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return [out[i % len(out)] for i in range(n)]


def mfr_pipeline(jpegs: list[bytes], p: float) -> float:
    augment = Augment(p, True, 0)
    augment.bank()  # built once per worker process (about 0.6 s), not per sample
    start = time.perf_counter()
    for i, jpeg in enumerate(jpegs):
        augment(decode(jpeg, "bench"), 0, i)
    return len(jpegs) / (time.perf_counter() - start)


def baseline_pipeline(jpegs: list[bytes], p: float) -> float:
    mask = MaskAugment(p)
    mean = torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1)
    std = torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1)
    start = time.perf_counter()
    for i, jpeg in enumerate(jpegs):
        rng = np.random.default_rng([0, 0, i])
        img = Image.open(io.BytesIO(jpeg)).convert("RGB")
        if img.size != (112, 112):
            img = img.resize((112, 112), Image.BILINEAR)
        arr, _ = mask(np.asarray(img), rng)
        img = Image.fromarray(arr)
        if torch.rand(1).item() < 0.5:  # RandomHorizontalFlip
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        t = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).contiguous().float().div(255)  # ToTensor
        t.sub_(mean).div_(std)  # Normalize
    return len(jpegs) / (time.perf_counter() - start)


def bench_cpu(n: int, repeats: int) -> dict:
    torch.set_num_threads(1)
    jpegs = faces(n)
    result = {"images": n, "jpeg_bytes_mean": int(np.mean([len(j) for j in jpegs]))}
    for p in (0.35, 0.0):
        ours = max(mfr_pipeline(jpegs, p) for _ in range(repeats))
        base = max(baseline_pipeline(jpegs, p) for _ in range(repeats))
        result[f"mask_p={p}"] = {
            "mfr_img_s": round(ours),
            "baseline_img_s": round(base),
            "speedup": round(ours / base, 2),
        }
    return result


def write_shards(put, samples: list[tuple[str, int, bytes, str]], shard_size: int, labels: int) -> int:
    """Samples as shards + offsets + index.json through ``put(name, bytes)``; the tar bytes written."""
    from mfr.trainer.data import shards

    entries, total = [], 0
    for k in range(0, len(samples), shard_size):
        tar, offsets, count = shards.write_shard(samples[k : k + shard_size])
        name = shards.shard_name(k // shard_size)
        put(name, tar)
        put(shards.offsets_name(name), offsets)
        entries.append({"name": name, "count": count})
        total += len(tar)
    index = {
        "format": shards.FORMAT,
        "classes": [str(i) for i in range(labels)],
        "counts": [0] * labels,
        "images": len(samples),
        "shards": entries,
    }
    put(shards.INDEX, json.dumps(index).encode())
    return total


def worker_batches(dataset, batch: int, epoch: int, layout, drawn_for) -> list[np.ndarray]:
    """The sample ids of the batches that worker 0 of rank 0 gets in ``epoch`` (drawn for ``drawn_for``)."""
    from mfr.trainer.data.loader import SpanOrderSampler

    sampler = SpanOrderSampler(len(dataset), dataset.span, 0, layout.world_size, batch, layout.workers, 0)
    sampler.epoch, sampler.resumed = epoch, (epoch, drawn_for)
    items = np.fromiter(iter(sampler), dtype=np.int64) % len(dataset)
    return [items[k : k + batch] for k in range(0, len(items), batch * layout.workers)]


def bench_s3(n: int, shard_size: int, batch: int, span: int, repeats: int) -> dict:
    import s3fs

    from mfr.trainer.data.sources import ShardFaces
    from mfr.trainer.data.spans import Layout

    jpegs = faces(n)
    samples = [(f"{i:010d}", i % 100, jpegs[i], "jpg") for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        server = SeaweedS3(Path(tmp))
        server.start()
        try:
            os.environ.update(server.env())
            fs = s3fs.S3FileSystem(endpoint_url=server.endpoint)
            total = write_shards(
                lambda name, data: fs.pipe_file(f"mfr-test/bench-data/{name}", data), samples, shard_size, 100
            )
            names = sorted(f for f in fs.ls("mfr-test/bench-data") if f.endswith(".tar"))

            def raw() -> float:
                raw_fs = s3fs.S3FileSystem(endpoint_url=server.endpoint, skip_instance_cache=True)
                start = time.perf_counter()
                got = sum(len(raw_fs.cat_file(name)) for name in names)
                assert got == total
                return got / (time.perf_counter() - start)

            def reader(epoch: int, drawn_for: Layout) -> float:
                """One worker (of one rank with one worker: it reads the whole epoch) fetching its batches."""
                layout = Layout(1, batch, 1)
                dataset = ShardFaces("s3://mfr-test/bench-data", None, 100, None, span, 0)
                dataset.layout, dataset.resumed = layout, (epoch, drawn_for)
                batches = worker_batches(dataset, batch, epoch, layout, drawn_for)
                tables = [dataset.set.offsets(k) for k in range(len(dataset.set.names))]  # read once per worker
                start = time.perf_counter()
                for ids in batches:
                    assert len(dataset._fetch(epoch, ids)) >= len(ids)
                seconds = time.perf_counter() - start
                used = np.concatenate(batches)
                shard = np.searchsorted(dataset.set.starts, used, side="right") - 1
                at = used - dataset.set.starts[shard]
                size = sum(int(tables[k][i + 1] - tables[k][i]) for k, i in zip(shard.tolist(), at.tolist()))
                return size / seconds

            rounds = []
            for r in range(repeats):  # alternated, so that all three see the same load
                rounds.append(
                    {
                        "raw": raw(),
                        "spans": reader(r, Layout(1, batch, 1)),
                        "per_batch": reader(r, Layout(2, batch // 2, 1)),
                    }
                )
        finally:
            server.stop()
    med = {k: float(np.median([x[k] for x in rounds])) for k in rounds[0]}
    return {
        "images": n,
        "shards": len(names),
        "tar_bytes": total,
        "batch": batch,
        "span": span,
        "repeats": repeats,
        "raw_s3fs_MBps": round(med["raw"] / 1e6, 1),
        "spans_with_read_ahead_MBps": round(med["spans"] / 1e6, 1),
        "per_batch_after_a_layout_change_MBps": round(med["per_batch"] / 1e6, 1),
        "spans_vs_raw_per_round": [round(x["spans"] / x["raw"], 2) for x in rounds],
        "spans_vs_raw_median": round(float(np.median([x["spans"] / x["raw"] for x in rounds])), 2),
        "per_batch_vs_raw_median": round(float(np.median([x["per_batch"] / x["raw"] for x in rounds])), 2),
    }


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_order(size: int, world: int, count: int) -> dict:
    """Rank 0's first ``count`` indices of an epoch of ``size`` samples on ``world`` ranks: memory and rate."""
    from mfr.trainer.data.loader import GlobalOrderSampler, SpanOrderSampler

    def draw(sampler) -> float:
        start = time.perf_counter()
        for i, _ in enumerate(sampler):
            if i + 1 == count:
                break
        return count / (time.perf_counter() - start)

    out = {"epoch_size": size, "world_size": world, "indices_drawn": count}
    base = peak_rss_mb()
    out["feistel_indices_per_s"] = round(draw(GlobalOrderSampler(size, 0, world, 128, 0)))
    out["spans_indices_per_s"] = round(draw(SpanOrderSampler(size, 1024, 0, world, 128, 8, 0)))
    out["feistel_and_spans_peak_rss_growth_MB"] = round(peak_rss_mb() - base, 1)
    base = peak_rss_mb()
    start = time.perf_counter()  # what GlobalOrderSampler did before: the whole epoch's randperm, then its slice
    order = torch.randperm(size, generator=torch.Generator().manual_seed(0))
    first = order[0 : count * world : world].tolist()
    out["randperm_seconds_to_first_index"] = round(time.perf_counter() - start, 2)
    out["randperm_peak_rss_growth_MB"] = round(peak_rss_mb() - base, 1)
    del order, first
    return out


def bench_e2e(steps: int, workers: int, on_s3: bool) -> dict:
    """The demo model trained on shards of synthetic faces (one process), local or on the S3 server:
    data wait / step time once the workers run (their start-up, the first batch, is reported apart)."""
    import torch.distributed as dist

    from mfr.trainer import metrics
    from mfr.trainer.config import load_config
    from mfr.trainer.dist import init_distributed
    from mfr.trainer.loop import Trainer

    data = SyntheticFaces(num_identities=256, images_per_identity=8, seed=0, mask_prob=0)
    samples = []
    for i in range(len(data)):
        buf = io.BytesIO()
        Image.fromarray(data.render(i // 8, i % 8, masked=False)).save(buf, "JPEG", quality=90)
        samples.append((f"{i:010d}", i // 8, buf.getvalue(), "jpg"))
    samples = [samples[i] for i in np.random.default_rng(0).permutation(len(samples))]  # as pack shuffles
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "s3").mkdir()
        server = SeaweedS3(Path(tmp, "s3")) if on_s3 else None
        try:
            if server is not None:
                import s3fs

                server.start()
                os.environ.update(server.env())
                fs = s3fs.S3FileSystem(endpoint_url=server.endpoint)
                uri = "s3://mfr-test/bench-e2e"
                write_shards(lambda name, blob: fs.pipe_file(f"mfr-test/bench-e2e/{name}", blob), samples, 512, 256)
            else:
                uri = tmp
                write_shards(lambda name, blob: Path(tmp, name).write_bytes(blob), samples, 512, 256)
            cfg = load_config(
                None,
                [
                    "data.source=shards",
                    f"data.uri={uri}",
                    f"data.num_workers={workers}",
                    f"run.steps={steps}",
                    "metrics.enabled=false",
                    "eval.at_start=false",
                    f"run.output_dir={tmp}/run",
                    "checkpoint.every_steps=100000",
                ],
            )
            wait = metrics.TRAIN_DATA_WAIT_SECONDS.labels(rank="0")
            step = metrics.TRAIN_STEP_SECONDS.labels(rank="0")
            wait_before, step_before = wait._sum.get(), step._sum.get()
            env = init_distributed("cpu")
            try:
                trainer = Trainer(cfg, env)
                start = time.perf_counter()  # the workers start (mask banks, first spans): once per run
                next(iter(trainer.data))
                first_batch_s = time.perf_counter() - start
                wait_before, step_before = wait._sum.get(), step._sum.get()
                trainer.fit()
            finally:
                dist.destroy_process_group()
        finally:
            if server is not None:
                server.stop()
    wait_s, step_s = wait._sum.get() - wait_before, step._sum.get() - step_before
    return {
        "source": "s3" if on_s3 else "local",
        "steps": steps,
        "num_workers": workers,
        "batch": cfg.data.batch_size,
        "span": cfg.data.shard_chunk,
        "first_batch_s": round(first_batch_s, 2),
        "step_time_s": round(step_s / steps, 3),
        "data_wait_s": round(wait_s / steps, 4),
        "data_wait_share": round(wait_s / step_s, 3),
    }


def main() -> None:
    from mfr.trainer.config import DataConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--shard-size", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--span", type=int, default=DataConfig().shard_chunk, help="data.shard_chunk")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--order-size", type=int, default=260_000_000, help="order: samples in the epoch")
    parser.add_argument("--order-world", type=int, default=8, help="order: ranks sharing the epoch")
    parser.add_argument("--order-count", type=int, default=5_000_000, help="order: indices drawn by rank 0")
    parser.add_argument(
        "--targets", nargs="+", default=["cpu", "s3", "order"], choices=["cpu", "s3", "order", "e2e", "e2e-s3"]
    )
    parser.add_argument("--steps", type=int, default=60, help="e2e: training steps")
    args = parser.parse_args()
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg(),
    }
    if "cpu" in args.targets:
        report["decode_augment_normalise_per_core"] = bench_cpu(args.images, args.repeats)
    if "s3" in args.targets:
        report["shard_streaming_s3"] = bench_s3(args.images, args.shard_size, args.batch, args.span, args.repeats)
    if "order" in args.targets:
        report["epoch_order"] = bench_order(args.order_size, args.order_world, args.order_count)
        print(json.dumps(report), file=sys.stderr)  # the parts so far, should a later one fail
    for target in ("e2e", "e2e-s3"):
        if target in args.targets:
            report[f"{target}_data_wait"] = bench_e2e(args.steps, 2, target == "e2e-s3")
    report["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
