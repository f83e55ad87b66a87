"""Scoring embedded sets on this machine: ``python -m mfr.trainer.score`` in this process or as N local ranks.

N ranks are N processes with the environment torchrun gives its workers
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), one BLAS thread each; rank
0 reports progress through its JSON events (``MFR_EVENTS_FILE``).  A rank
that fails stops the others (they would wait in a collective), and no rank
outlives mfrctl.  Torch-free until the scorer runs in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mfr.trainer.progress import EVENTS_ENV

from .launcher import _die_with_parent, free_port
from .progress import EventTail

SCORER = [sys.executable, "-m", "mfr.trainer.score"]
ProgressFn = Callable[[str, int, int], None]  # (protocol, pairs done, pairs in all)


class ScoringFailed(RuntimeError):
    """The scorer stopped: ``code`` 2 for bad input (its one line is the message), 1 otherwise."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def score_in_process(
    embeddings: str, name: str, fprs: tuple[float, ...], split: int, max_kept: int | None, progress: ProgressFn
) -> dict[str, Any]:
    """One rank, here (needs numpy only): the set's report entry."""
    from mfr.trainer.config import ConfigError
    from mfr.trainer.score import MAX_KEPT, Ranks, open_set, score_set

    try:
        embedded, pairs = open_set(embeddings, split)
        return score_set(embedded, Ranks(join=False), None, fprs, split, pairs, max_kept or MAX_KEPT, name, progress)
    except ConfigError as e:
        raise ScoringFailed(str(e), 2) from None


def score_with_ranks(
    embeddings: str,
    name: str,
    fprs: tuple[float, ...],
    split: int,
    max_kept: int | None,
    nproc: int,
    workdir: Path,
    progress: ProgressFn,
) -> dict[str, Any]:
    """``nproc`` local ranks of the scorer; the set's report entry (written by rank 0 into ``workdir``)."""
    report, events = workdir / "report.json", workdir / "events.jsonl"
    args = [embeddings, "--report", str(report), "--name", name, "--split", str(split)]
    args += [a for f in fprs for a in ("--fpr", repr(f))] + (["--max-kept", str(max_kept)] if max_kept else [])
    port = free_port()
    base = os.environ | {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        EVENTS_ENV: str(events),
    }
    ranks: list[subprocess.Popen] = []
    logs = [workdir / f"rank-{rank}.log" for rank in range(nproc)]
    tail = EventTail(events)
    try:
        for rank in range(nproc):
            with open(logs[rank], "w") as log:
                ranks.append(
                    subprocess.Popen(
                        SCORER + args,
                        env=base | {"RANK": str(rank), "LOCAL_RANK": str(rank)},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                        preexec_fn=_die_with_parent,
                    )
                )
        while any(p.poll() is None for p in ranks) and not any(p.poll() for p in ranks):
            _follow(tail, progress)
            time.sleep(0.2)
    finally:
        for p in ranks:
            if p.poll() is None:
                p.terminate()
        for p in ranks:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    _follow(tail, progress)
    failed = [(rank, p.returncode) for rank, p in enumerate(ranks) if p.returncode]
    if failed:
        error = tail.error()
        if error is not None:
            raise ScoringFailed(error["message"], 2)
        rank, code = failed[0]
        lines = logs[rank].read_text(errors="replace").strip().splitlines()
        raise ScoringFailed(f"scoring rank {rank} exited {code}: {lines[-1][:300] if lines else 'no output'}", 1)
    return json.loads(report.read_text())


def _follow(tail: EventTail, progress: ProgressFn) -> None:
    for event in tail.read():
        if event["event"] == "score":
            progress(event["protocol"], event["done"], event["total"])
