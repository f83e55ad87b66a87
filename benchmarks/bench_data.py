"""Data path throughput: per-sample CPU cost, and shard streaming from S3.

    python benchmarks/bench_data.py --images 2000

1. Decode + mask augmentation + flip + normalise, one core (``torch.set_num_threads(1)``),
   on 112x112 JPEGs of synthetic faces (quality 90), as images/s:

   * mfr: ``sources.decode`` (PIL with JPEG draft) then ``sources.Augment`` (MaskAugment at
     p = 0.35, flip, normalise in numpy), exactly what a DataLoader worker runs per sample;
   * baseline: PIL ``open().convert("RGB")``, the same MaskAugment, then the
     torchvision-transforms pipeline written out with torch ops (RandomHorizontalFlip,
     ToTensor, Normalize(0.5, 0.5)) -- torchvision itself has no CPU wheel for torch 2.13
     here, so the transforms are re-implemented as torchvision's functional code does them;
   * the same two without the mask (p = 0): the fixed per-sample overhead.

2. Shards on a SeaweedFS S3 server on 127.0.0.1 (started here, as in the tests): the
   bytes/s of the shard reader (``ShardSet.read_run`` over one epoch's chunk order, batch
   runs as the loader issues them, tar members parsed, no decode) vs raw s3fs reads of
   the same bytes (``cat_file`` of each whole .tar), one process each.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.s3server

from mfr.trainer.data.masks import MaskAugment  # noqa: E402
from mfr.trainer.data.sources import Augment, decode  # noqa: E402
from mfr.trainer.data.synthetic import SyntheticFaces  # noqa: E402
from tests.s3server import SeaweedS3  # noqa: E402


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
        result[f"mask_p={p}"] = {"mfr_img_s": round(ours), "baseline_img_s": round(base), "speedup": round(ours / base, 2)}
    return result


def bench_s3(n: int, shard_size: int, batch: int, chunk: int, repeats: int) -> dict:
    import s3fs

    from mfr.trainer.data import shards

    jpegs = faces(n)
    with tempfile.TemporaryDirectory() as tmp:
        server = SeaweedS3(Path(tmp))
        server.start()
        try:
            os.environ.update(server.env())
            fs = s3fs.S3FileSystem(endpoint_url=server.endpoint)
            names, counts = [], []
            for k in range(0, n, shard_size):
                group = [(f"{i:010d}", i % 100, jpegs[i], "jpg") for i in range(k, min(n, k + shard_size))]
                tar, offsets, count = shards.write_shard(group)
                name = shards.shard_name(k // shard_size)
                fs.pipe_file(f"mfr-test/bench-data/{name}", tar)
                fs.pipe_file(f"mfr-test/bench-data/{shards.offsets_name(name)}", offsets)
                names.append(name)
                counts.append(count)
            index = {"format": shards.FORMAT, "classes": [str(i) for i in range(100)], "counts": [0] * 100,
                     "images": n, "shards": [{"name": m, "count": c} for m, c in zip(names, counts)]}
            fs.pipe_file("mfr-test/bench-data/index.json", json.dumps(index).encode())
            total = sum(fs.size(f"mfr-test/bench-data/{m}") for m in names)

            def raw() -> float:
                raw_fs = s3fs.S3FileSystem(endpoint_url=server.endpoint, skip_instance_cache=True)
                start = time.perf_counter()
                got = sum(len(raw_fs.cat_file(f"mfr-test/bench-data/{m}")) for m in names)
                assert got == total
                return got / (time.perf_counter() - start)

            def reader(epoch: int, in_flight: int) -> tuple[float, int]:
                from concurrent.futures import ThreadPoolExecutor

                shard_set = shards.ShardSet("s3://mfr-test/bench-data")
                first, length = shards.chunk_order(shard_set.counts, chunk, 0, epoch)
                order = np.concatenate([np.arange(f, f + n_) for f, n_ in zip(first, length)]).tolist()

                def one_batch(b: int) -> int:  # one batch's runs, as ShardFaces.__getitems__ reads them
                    wanted, size = [], 0
                    for lo, hi in shards.runs(order[b : b + batch], shard_set.starts):
                        shard, i = shard_set.locate(lo)
                        wanted.append((shard, i, i + hi - lo))
                        table = shard_set.offsets(shard)
                        size += int(table[i + hi - lo]) - int(table[i])
                    assert all(r is not None for r in shard_set.read_runs(wanted))
                    return size

                for shard in range(len(shard_set.names)):
                    shard_set.offsets(shard)  # the offsets tables, read once per worker in a run
                start = time.perf_counter()
                with ThreadPoolExecutor(in_flight) as pool:
                    got = sum(pool.map(one_batch, range(0, len(order) - batch + 1, batch)))
                return got / (time.perf_counter() - start), got

            raw_bps = max(raw() for _ in range(repeats))
            serial = [reader(e, 1) for e in range(repeats)]
            overlapped = [reader(e, 4) for e in range(repeats)]
            payload = serial[0][1]
            reader_bps, overlapped_bps = max(r[0] for r in serial), max(r[0] for r in overlapped)
        finally:
            server.stop()
    return {
        "images": n, "shards": len(names), "tar_bytes": total, "reader_bytes_per_epoch": payload,
        "batch": batch, "shard_chunk": chunk, "raw_s3fs_MBps": round(raw_bps / 1e6, 1),
        "reader_1_batch_in_flight_MBps": round(reader_bps / 1e6, 1),
        "reader_4_batches_in_flight_MBps": round(overlapped_bps / 1e6, 1),
        "reader_vs_raw": [round(reader_bps / raw_bps, 2), round(overlapped_bps / raw_bps, 2)],
    }


def bench_e2e(steps: int, workers: int) -> dict:
    """The demo model trained on local shards of synthetic faces (one process): data wait / step time."""
    import torch.distributed as dist

    from mfr.trainer import metrics
    from mfr.trainer.config import load_config
    from mfr.trainer.data import shards
    from mfr.trainer.dist import init_distributed
    from mfr.trainer.loop import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        data = SyntheticFaces(num_identities=256, images_per_identity=8, seed=0, mask_prob=0)
        group = []
        for i in range(len(data)):
            buf = io.BytesIO()
            Image.fromarray(data.render(i // 8, i % 8, masked=False)).save(buf, "JPEG", quality=90)
            group.append((f"{i:010d}", i // 8, buf.getvalue(), "jpg"))
        rng = np.random.default_rng(0)
        group = [group[i] for i in rng.permutation(len(group))]
        names = []
        for k in range(0, len(group), 512):
            tar, offsets, count = shards.write_shard(group[k : k + 512])
            names.append({"name": shards.shard_name(k // 512), "count": count})
            Path(tmp, names[-1]["name"]).write_bytes(tar)
            Path(tmp, shards.offsets_name(names[-1]["name"])).write_bytes(offsets)
        Path(tmp, "index.json").write_text(json.dumps({
            "format": shards.FORMAT, "classes": [str(i) for i in range(256)], "counts": [8] * 256,
            "images": len(group), "shards": names}))
        cfg = load_config(None, [
            "data.source=shards", f"data.uri={tmp}", f"data.num_workers={workers}", f"run.steps={steps}",
            "metrics.enabled=false", "eval.at_start=false", f"run.output_dir={tmp}/run",
            "checkpoint.every_steps=100000",
        ])
        env = init_distributed("cpu")
        try:
            Trainer(cfg, env).fit()
        finally:
            dist.destroy_process_group()
    wait = metrics.TRAIN_DATA_WAIT_SECONDS.labels(rank="0")
    step = metrics.TRAIN_STEP_SECONDS.labels(rank="0")
    wait_s, step_s = wait._sum.get(), step._sum.get()
    return {"steps": steps, "num_workers": workers, "batch": cfg.data.batch_size, "step_time_s": round(step_s / steps, 3),
            "data_wait_s": round(wait_s / steps, 4), "data_wait_share": round(wait_s / step_s, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--targets", nargs="+", default=["cpu", "s3"], choices=["cpu", "s3", "e2e"])
    parser.add_argument("--steps", type=int, default=60, help="e2e: training steps")
    args = parser.parse_args()
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
              "torch": torch.__version__}
    if "cpu" in args.targets:
        report["decode_augment_normalise_per_core"] = bench_cpu(args.images, args.repeats)
    if "s3" in args.targets:
        report["shard_streaming_s3"] = bench_s3(args.images, args.shard_size, args.batch, args.chunk, args.repeats)
    if "e2e" in args.targets:
        report["e2e_data_wait"] = bench_e2e(args.steps, 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
