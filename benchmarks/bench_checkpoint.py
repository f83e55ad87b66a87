"""Checkpoint save/restore throughput, and how long an async save blocks training.

    python benchmarks/bench_checkpoint.py --classes 200000 --embedding 512

Two gloo ranks run the real Trainer (tiny backbone) with a head of
``classes x embedding`` fp32 centres plus their SGD momentum (800+ MB of
state for 200k x 512), take one step so the optimizer state exists, then,
for a local directory and for an S3 server (SeaweedFS on 127.0.0.1, started
here):

* sync: ``Checkpointer.save(blocking=True)``, start to commit;
* async: the time ``save(blocking=False)`` blocks the caller (the staging
  copy to host memory), and start to commit;
* restore: ``Checkpointer.resume()`` into a live trainer.

The ratio "async stall / sync save" is measured in this run, on this state.
Times are rank 0's; throughput = committed bytes / time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.support.s3server

from tests.support.distributed import run_distributed
from tests.support.s3server import SeaweedS3


def _bench(rank: int, world: int, uri: str, classes: int, embedding: int, repeats: int) -> dict:
    from mfr.trainer.config import load_config
    from mfr.trainer.dist import DistEnv
    from mfr.trainer.loop import Trainer

    cfg = load_config(
        None,
        [
            f"head.num_classes={classes}",
            f"model.embedding_size={embedding}",
            "data.images_per_identity=1",
            "data.batch_size=16",
            "data.num_workers=0",
            "eval.num_identities=2",
            "eval.images_per_identity=2",
            "head.sample_rate=0.1",
            "run.device=cpu",
            "checkpoint.every_steps=null",
            "checkpoint.keep=1",
            f"checkpoint.uri={json.dumps(uri)}",
        ],
    )
    trainer = Trainer(cfg, DistEnv(rank, 0, world, world, 0, torch.device("cpu")))
    logging.getLogger("mfr").setLevel(logging.WARNING)  # no progress lines in the timings
    batches = iter(trainer.data)
    cp = trainer.checkpointer
    result: dict[str, list[float]] = {"sync": [], "stall": [], "async": [], "restore": []}
    for _ in range(repeats):
        trainer.train_step(*next(batches))
        torch.distributed.barrier()
        t0 = time.perf_counter()
        cp.save(trainer.step, blocking=True)
        result["sync"].append(time.perf_counter() - t0)

        trainer.train_step(*next(batches))
        torch.distributed.barrier()
        t0 = time.perf_counter()
        cp.save(trainer.step, blocking=False)
        result["stall"].append(time.perf_counter() - t0)
        cp.poll(wait=True)
        result["async"].append(time.perf_counter() - t0)

        torch.distributed.barrier()
        t0 = time.perf_counter()
        info = cp.resume()
        result["restore"].append(time.perf_counter() - t0)
    result["bytes"] = info.bytes
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=200_000)
    parser.add_argument("--embedding", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--targets", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"# head {args.classes} x {args.embedding} fp32 + SGD momentum, 2 gloo ranks; median of {args.repeats}")
    print(
        "| target | state MB | sync save s (MB/s) | async: loop blocked s | async save s | restore s (MB/s) "
        "| stall / sync |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        for target in args.targets:
            if target == "s3":
                server = SeaweedS3(Path(tmp))
                server.start()
                os.environ.update(server.env())
                uri = "s3://mfr-test/bench"
            else:
                uri = str(Path(tmp) / "local")
            (r0, *_) = run_distributed(_bench, 2, uri, args.classes, args.embedding, args.repeats)
            med = {k: sorted(v)[len(v) // 2] for k, v in r0.items() if k != "bytes"}
            mb = r0["bytes"] / 2**20
            print(
                f"| {target} | {mb:.0f} | {med['sync']:.2f} ({mb / med['sync']:.0f}) | {med['stall']:.3f} | "
                f"{med['async']:.2f} | {med['restore']:.2f} ({mb / med['restore']:.0f}) | "
                f"{med['stall'] / med['sync']:.3f} |",
                flush=True,
            )
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
