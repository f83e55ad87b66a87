"""Verification at scale: exact TPR@FPR of embedded image sets, on one rank or many.

``python -m mfr.trainer.score EMBEDDINGS --report URL`` scores embeddings
stored as shards (``features``; ``mfrctl eval --embeddings`` writes them,
``EMBEDDINGS/unmasked`` and ``EMBEDDINGS/masked``, or a single folder of one
condition) under each masked/unmasked protocol: all-vs-all, a gallery/probe
split (``--split G``: each identity's first G images are the gallery, its
others the probes) or a pair list (``--pairs``).  Under torchrun or the
operator's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) every rank
scores every W-th tile of the pair matrix (``pairsets``) into an
``ImpostorTail`` (``tail``); rank 0 gathers the tails over gloo, merges them
exactly and writes the JSON report (and ``--roc``, a PNG).  Started alone it
is a world of one.  Memory per rank: the embeddings (4 bytes x images x D per
side), the genuine scores, at most ``--max-kept`` impostor scores plus the
brackets of larger targets, and one tile.

Exit codes as the trainer's: 0 done, 2 bad input (one line), 1 a crash,
129 a peer went away.  The process ends with ``os._exit`` (see
``mfr.trainer.__main__``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import exitcodes
from .config import ConfigError
from .features import INDEX, Features, open_features
from .pairsets import TILE, ListedPairs, MatrixPairs, one_blas_thread, unit_rows
from .progress import Progress, log
from .tail import Bracket, ImpostorTail, TailState, allowed_false_accepts, brackets_from_sample, finish, merge
from .verification import DEFAULT_FPRS, PROTOCOLS, ProtocolResult, is_supported

MAX_KEPT = 1 << 24  # impostor scores kept per protocol (64 MB); larger targets are bracketed
SAMPLE = 1 << 20  # at most this many impostor pairs sampled to bracket the targets beyond MAX_KEPT
Z = 7.0  # bracket half-width in standard deviations: a miss (one more pass) about once in 1e12
PAIRS_FILE = "pairs.npy"

ProgressFn = Callable[[str, int, int], None]  # (protocol, pairs done, pairs in all)


# -- ranks ---------------------------------------------------------------------------------------------------------


class Ranks:
    """A world of one, or a gloo group from the torchrun/operator environment; gathers numpy arrays to rank 0."""

    def __init__(self, join: bool = True) -> None:
        """``join``: join the group the environment describes, if any; else be a world of one."""
        self.rank, self.world = 0, 1
        if join and "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            import torch.distributed as dist

            dist.init_process_group("gloo")  # scores are numpy on the CPU, whatever the node's devices
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def gather(self, arrays: list[np.ndarray]) -> list[list[np.ndarray]] | None:
        """Every rank's ``arrays`` (1-D, same dtypes on every rank) on rank 0, in rank order; None elsewhere."""
        if self.world == 1:
            return [arrays]
        import torch
        import torch.distributed as dist

        gathered: list[list[np.ndarray]] = [[] for _ in range(self.world)]
        for array in arrays:
            local = torch.from_numpy(np.ascontiguousarray(array))
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
            dist.all_gather(sizes, torch.tensor([local.numel()]))
            longest = max(int(s) for s in sizes)
            padded = torch.zeros(longest, dtype=local.dtype)
            padded[: local.numel()] = local
            parts = [torch.empty_like(padded) for _ in range(self.world)] if self.rank == 0 else None
            dist.gather(padded, parts, dst=0)
            if parts is not None:
                for r, (part, size) in enumerate(zip(parts, sizes)):
                    gathered[r].append(part[: int(size)].numpy())
        return gathered if self.rank == 0 else None

    def broadcast(self, array: np.ndarray) -> np.ndarray:
        """Rank 0's ``array`` on every rank (each passes one of the same shape and dtype)."""
        if self.world == 1:
            return array
        import torch
        import torch.distributed as dist

        tensor = torch.from_numpy(np.ascontiguousarray(array).copy())
        dist.broadcast(tensor, src=0)
        return tensor.numpy()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


# -- embeddings and pairs ---------------------------------------------------------------------------------------------


@dataclass
class Embedded:
    """An embedded image set: unit float32 rows without (and with) masks and their identities, rows sorted by
    identity (stable: each identity's images keep their order); ``row_of[i]`` is where stored row ``i`` went."""

    url: str
    unmasked: np.ndarray
    masked: np.ndarray | None
    labels: np.ndarray
    row_of: np.ndarray
    meta: dict[str, Any]


def _read_rows(features: Features, order: np.ndarray) -> np.ndarray:
    """Unit rows of every shard, row ``order[k]`` of the folder landing in row ``k``."""
    rows = np.empty((features.count, features.embedding_size), np.float32)
    destination = np.argsort(order)
    start = 0
    for embeddings, _ in features.shards():
        end = start + len(embeddings)
        try:
            rows[destination[start:end]] = unit_rows(embeddings)
        except ValueError as err:
            raise ConfigError(f"embeddings {features.uri}: {err}") from None
        start = end
    return rows


def embedding_folders(url: str, storage_options: dict[str, Any] | None = None) -> tuple[str, str | None]:
    """The unmasked and masked (or None) embedding folders of a set: ``url/unmasked`` and ``url/masked`` as
    ``mfrctl eval`` writes them, or ``url`` itself when it holds one folder of embeddings."""
    fs, root = open_features(url, storage_options)
    if fs.exists(f"{root}/{INDEX}"):
        return url, None
    base = url.rstrip("/")
    return f"{base}/unmasked", f"{base}/masked" if fs.exists(f"{root}/masked/{INDEX}") else None


def load_embedded(url: str, storage_options: dict[str, Any] | None = None) -> Embedded:
    """The embeddings of a set (``embedding_folders``), rows sorted by identity."""
    unmasked_url, masked_url = embedding_folders(url, storage_options)
    unmasked = Features(unmasked_url, storage_options)
    stored_labels = unmasked.labels().astype(np.int64)
    if stored_labels.size != unmasked.count:
        raise ConfigError(
            f"embeddings {unmasked.uri}: its shards hold {stored_labels.size} rows, {INDEX} says {unmasked.count}"
        )
    order = np.argsort(stored_labels, kind="stable")  # rows by identity put genuine pairs near the diagonal
    labels = stored_labels[order]
    masked_rows = None
    if masked_url is not None:
        masked = Features(masked_url, storage_options)
        if masked.count != unmasked.count or not np.array_equal(masked.labels(), stored_labels):
            raise ConfigError(f"embeddings {url}: masked/ and unmasked/ hold different images")
        masked_rows = _read_rows(masked, order)
    row_of = np.empty_like(order)
    row_of[order] = np.arange(order.size)
    return Embedded(url, _read_rows(unmasked, order), masked_rows, labels, row_of, unmasked.index.get("eval", {}))


def read_pair_list(url: str, images: int, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """An ``(n, 2)`` or ``(n, 3)`` integer ``.npy``: rows ``first, second[, is_genuine]`` (row indices)."""
    fs, path = open_features(url, storage_options)
    try:
        pairs = np.load(io.BytesIO(fs.cat_file(path)), allow_pickle=False)
    except FileNotFoundError:
        raise ConfigError(f"pair list {url}: no such file") from None
    except ValueError as err:
        raise ConfigError(f"pair list {url}: not a .npy array ({str(err)[:120]})") from None
    if pairs.ndim != 2 or pairs.shape[1] not in (2, 3) or not np.issubdtype(pairs.dtype, np.integer) or not len(pairs):
        raise ConfigError(
            f"pair list {url}: expected an (n, 2) or (n, 3) integer array, got {pairs.dtype} {pairs.shape}"
        )
    if pairs[:, :2].min() < 0 or pairs[:, :2].max() >= images:
        raise ConfigError(f"pair list {url}: row indices must be in [0, {images})")
    if pairs.shape[1] == 3 and not np.all(np.isin(pairs[:, 2], (0, 1))):
        raise ConfigError(f"pair list {url}: the third column must be 0 or 1")
    return pairs


def open_set(url: str, split: int = 0, pairs_url: str | None = None) -> tuple[Embedded, np.ndarray | None]:
    """The embedded set at ``url`` and the pairs to score: ``pairs_url``, else ``url/pairs.npy`` when it is there
    and no ``split`` is asked for, else None (every pair)."""
    embedded = load_embedded(url)
    if pairs_url is None and not split:
        fs, root = open_features(url, None)
        pairs_url = f"{url.rstrip('/')}/{PAIRS_FILE}" if fs.exists(f"{root}/{PAIRS_FILE}") else None
    return embedded, read_pair_list(pairs_url, len(embedded.labels)) if pairs_url else None


def split_gallery(labels: np.ndarray, gallery_per_identity: int) -> np.ndarray:
    """True for the gallery images: each identity's first ``gallery_per_identity`` images in row order."""
    order = np.argsort(labels, kind="stable")
    grouped = labels[order]
    starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    lengths = np.diff(np.r_[starts, labels.size])
    occurrence = np.empty(labels.size, np.int64)
    occurrence[order] = np.arange(labels.size) - np.repeat(starts, lengths)
    return occurrence < gallery_per_identity


def protocol_pairs(embedded: Embedded, protocol: str, split: int, pairs: np.ndarray | None):
    """The pairs ``protocol`` compares: the left side is masked in masked-*, the right side unmasked in *-unmasked."""
    left_name, right_name = protocol.split("-")
    if "masked" in (left_name, right_name) and embedded.masked is None:
        raise ConfigError(f"embeddings {embedded.url}: protocol {protocol} needs masked/ embeddings")
    left = embedded.masked if left_name == "masked" else embedded.unmasked
    right = embedded.masked if right_name == "masked" else embedded.unmasked
    labels = embedded.labels
    if pairs is not None:
        first, second = embedded.row_of[pairs[:, 0]], embedded.row_of[pairs[:, 1]]
        genuine = pairs[:, 2].astype(bool) if pairs.shape[1] == 3 else labels[first] == labels[second]
        return ListedPairs(left, right, first, second, genuine)
    if split:
        gallery = split_gallery(labels, split)
        probes = ~gallery
        return MatrixPairs(left[probes], labels[probes], right[gallery], labels[gallery], False, False)
    return MatrixPairs(left, labels, right, labels, same_images=True, symmetric=left_name == right_name)


# -- scoring -----------------------------------------------------------------------------------------------------------


def _state_arrays(genuine: np.ndarray, state: TailState) -> list[np.ndarray]:
    counts = np.array([b.above for b in state.brackets], np.int64)
    insides = [np.concatenate(b.inside) if b.inside else np.empty(0, np.float32) for b in state.brackets]
    return [genuine, state.top, counts, *insides]


def _from_arrays(arrays: list[np.ndarray], brackets: list[tuple[float, float]]) -> tuple[np.ndarray, TailState]:
    genuine, top, counts, *insides = arrays
    parts = [
        Bracket(np.float32(lo), np.float32(hi), int(c), [inside])
        for (lo, hi), c, inside in zip(brackets, counts, insides)
    ]
    return genuine, TailState(top, parts)


def _pass(pairs, keep: int, brackets: list[tuple[float, float]], ranks: Ranks, progress: Callable[[int], None]):
    """This rank's share of the units into a tail; rank 0 gets every rank's merged: ``(genuine, state)``."""
    tail = ImpostorTail(keep, brackets)
    buffer = np.empty(TILE * TILE, np.float32)
    genuine = []
    for unit in list(pairs.units())[ranks.rank :: ranks.world]:
        unit_genuine, impostor = pairs.score(unit, buffer)
        genuine.append(unit_genuine)
        tail.add(impostor)
        progress(pairs.unit_pairs(unit))
    local = _state_arrays(np.concatenate(genuine) if genuine else np.empty(0, np.float32), tail.state())
    gathered = ranks.gather(local)
    if gathered is None:
        return None
    per_rank = [_from_arrays(arrays, brackets) for arrays in gathered]
    return np.concatenate([g for g, _ in per_rank]), merge([s for _, s in per_rank], keep)


def score_protocol(
    pairs,
    protocol: str,
    fprs: tuple[float, ...],
    ranks: Ranks,
    max_kept: int = MAX_KEPT,
    progress: ProgressFn = lambda protocol, done, total: None,
    sample: int = SAMPLE,
    z: float = Z,
) -> dict[str, Any] | None:
    """One protocol's report entry (rank 0; None elsewhere): counts, operating points, exact ROC points, passes."""
    n_genuine, n_impostor = pairs.n_genuine, pairs.n_impostor
    if not n_genuine or not n_impostor:
        raise ConfigError(f"{protocol}: {n_genuine} genuine and {n_impostor} impostor pairs; both are needed")
    if any(not 0 < f < 1 for f in fprs):
        raise ConfigError(f"target FPRs must be in (0, 1), got {fprs}")
    ks = [allowed_false_accepts(f, n_impostor) if is_supported(f, n_impostor) else -1 for f in fprs]
    bracketed = [i for i, k in enumerate(ks) if k + 1 > max_kept]
    # Every impostor score when they fit (the whole curve), else as many as the other targets need.
    keep = n_impostor if n_impostor <= max_kept else max([1] + [k + 1 for k in ks if k + 1 <= max_kept])
    brackets: list[tuple[float, float]] = []
    mine = sum(pairs.unit_pairs(u) for u in list(pairs.units())[ranks.rank :: ranks.world])
    with one_blas_thread():
        if bracketed:
            if not pairs.can_sample:
                raise ConfigError(
                    f"{protocol}: FPR {fprs[bracketed[0]]:g} of {n_impostor:,} listed impostor pairs needs their "
                    f"{ks[bracketed[0]] + 1:,} highest scores, over --max-kept {max_kept:,}; raise it or drop that FPR"
                )
            brackets = _brackets(pairs, [ks[i] for i in bracketed], ranks, max_kept, sample, z)
        passes, done = 1, 0

        def advance(n: int) -> None:  # rank 0's share stands for everyone's: tiles are dealt round-robin
            nonlocal done
            done += n
            progress(protocol, round(pairs.n_pairs * done / max(mine, 1)), pairs.n_pairs * passes)

        progress(protocol, 0, pairs.n_pairs)
        merged = _pass(pairs, keep, brackets, ranks, advance)
        result = finish(*merged, n_genuine, n_impostor, fprs, bracketed) if merged else None
        missed = _broadcast_missed(ranks, result.missed if result else [])
        if missed:  # a sampled bracket missed: score again keeping each missed target's K+1 highest scores
            rescue = max(ks[i] for i in missed) + 1
            passes += 1
            again = _pass(pairs, rescue, [], ranks, advance)
            if again:
                redone = finish(*again, n_genuine, n_impostor, tuple(fprs[i] for i in missed), [])
                result.points.update({i: redone.points[j] for j, i in enumerate(missed)})
    if result is None:
        return None
    points = tuple(result.points[i] for i in range(len(fprs)))
    entry = ProtocolResult(protocol, n_genuine, n_impostor, points).to_dict()
    curve = sorted(
        {
            *zip(result.curve[0].tolist(), result.curve[1].tolist()),
            *((p.achieved_fpr, p.tpr) for p in points if p.supported),
        }
    )
    entry["roc"] = {"fpr": [f for f, _ in curve], "tpr": [t for _, t in curve]}
    entry["passes"] = passes
    return entry


def _brackets(pairs, ks: list[int], ranks: Ranks, max_kept: int, sample: int, z: float) -> list[tuple[float, float]]:
    """Brackets for targets ``ks`` from one sample of impostor pairs, its scores split over the ranks."""
    # Enough sampled pairs that a bracket holds about max_kept / 4 scores, within [2^16, sample].
    size = int(min(sample, max(1 << 16, (z * pairs.n_impostor / max(max_kept // 4, 1)) ** 2)))
    rows, columns = pairs.sample_impostor_pairs(size, seed=0)
    share = slice(ranks.rank, None, ranks.world)
    gathered = ranks.gather([pairs.pair_scores(rows[share], columns[share])])
    bounds = np.empty((len(ks), 2), np.float32)
    if gathered is not None:
        bounds[:] = brackets_from_sample(np.concatenate([g[0] for g in gathered]), ks, pairs.n_impostor, z)
    return [(lo, hi) for lo, hi in ranks.broadcast(bounds)]


def _broadcast_missed(ranks: Ranks, missed: list[int]) -> list[int]:
    """Rank 0's missed targets on every rank, so all of them run the rescue pass."""
    flags = np.zeros(64, np.int64)
    flags[missed] = 1
    return np.flatnonzero(ranks.broadcast(flags)).tolist()


def score_set(
    embedded: Embedded,
    ranks: Ranks,
    protocols: tuple[str, ...] | None = None,
    fprs: tuple[float, ...] = DEFAULT_FPRS,
    split: int = 0,
    pairs: np.ndarray | None = None,
    max_kept: int = MAX_KEPT,
    name: str | None = None,
    progress: ProgressFn = lambda protocol, done, total: None,
) -> dict[str, Any] | None:
    """The report entry of one embedded set (rank 0; None elsewhere), as ``mfrctl eval`` prints it."""
    if len(fprs) > 64:
        raise ConfigError("at most 64 target FPRs")
    chosen = protocols or (PROTOCOLS if embedded.masked is not None else PROTOCOLS[:1])
    start, cpu_start = time.perf_counter(), time.process_time()
    entries = [
        score_protocol(protocol_pairs(embedded, protocol, split, pairs), protocol, fprs, ranks, max_kept, progress)
        for protocol in chosen
    ]
    seconds = time.perf_counter() - start
    cpu_microseconds = round((time.process_time() - cpu_start) * 1e6)
    usage = ranks.gather([np.array([_peak_rss_bytes(), cpu_microseconds], np.int64)])
    if usage is None:
        return None
    total = sum(e["n_genuine"] + e["n_impostor"] for e in entries)
    kind = "pairs" if pairs is not None else "split" if split else "gallery"
    return {
        "name": name or embedded.url.rstrip("/").rsplit("/", 1)[-1],
        "kind": kind,
        "url": embedded.meta.get("data", embedded.url),
        "images": len(embedded.labels),
        "protocols": entries,
        "scoring": {
            "embeddings": embedded.url,
            "world_size": ranks.world,
            "pairs": total,
            "seconds": seconds,
            "pairs_per_second": total / seconds if seconds else None,
            "split": split,
            "peak_rss_bytes": [int(rank[0][0]) for rank in usage],
            "cpu_seconds": [int(rank[0][1]) / 1e6 for rank in usage],
        },
    }


def _peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


# -- the command -------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mfr.trainer.score", description=__doc__.splitlines()[0])
    parser.add_argument("embeddings", metavar="EMBEDDINGS", help="folder or s3:// prefix written by mfrctl eval")
    parser.add_argument("--report", required=True, help="write the JSON report here (local or s3://)")
    parser.add_argument("--roc", help="also write the ROC plot (PNG) here")
    parser.add_argument("--protocol", action="append", choices=PROTOCOLS, help="repeatable; default: all available")
    parser.add_argument("--fpr", action="append", type=float, help="target FPR, repeatable; default 1e-1 .. 1e-6")
    parser.add_argument(
        "--split",
        type=int,
        default=0,
        metavar="G",
        help="each identity's first G images are the gallery, the others probes (0: all-vs-all)",
    )
    parser.add_argument(
        "--pairs",
        help=f"score the pairs of this .npy instead ((n, 2|3) row indices; "
        f"default EMBEDDINGS/{PAIRS_FILE} when it exists and no --split)",
    )
    parser.add_argument("--max-kept", type=int, default=MAX_KEPT, help="impostor scores kept per protocol")
    parser.add_argument("--name", help="the set's name in the report (default: the folder's)")
    return parser.parse_args(argv)


class _Reporter:
    """Rank 0's progress: a JSON event for mfrctl's bar every second at most, a log line every 30 s."""

    def __init__(self, progress: Progress, event_every: float = 1.0, log_every: float = 30.0):
        self.progress, self.event_every, self.log_every = progress, event_every, log_every
        self.started: dict[str, float] = {}
        self.last_event = self.last_log = 0.0

    def __call__(self, protocol: str, done: int, total: int) -> None:
        now = time.monotonic()
        started = self.started.setdefault(protocol, now)
        rate = done / (now - started) if now > started else 0.0
        eta = (total - done) / rate if rate else None
        if now - self.last_event >= self.event_every or done >= total:
            self.last_event = now
            self.progress.event("score", protocol=protocol, done=done, total=total, pairs_per_second=rate, eta_s=eta)
        if now - self.last_log >= self.log_every or done >= total:
            self.last_log = now
            log.info(
                f"scoring {protocol}: {done:,} of {total:,} pairs, {rate:,.0f} pairs/s"
                + (f", ETA {eta:,.0f} s" if eta is not None else "")
            )


def _write(url: str, payload: bytes) -> None:
    from .storage import open_file

    with open_file(url, "wb") as f:
        f.write(payload)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fprs = tuple(args.fpr or DEFAULT_FPRS)
    problems = [f"--fpr must be in (0, 1), got {f}" for f in fprs if not 0 < f < 1]
    problems += ["--split must be >= 0"] * (args.split < 0) + ["--max-kept must be >= 1"] * (args.max_kept < 1)
    problems += ["--pairs and --split exclude each other"] * bool(args.pairs and args.split)
    is_main = os.environ.get("RANK", "0") == "0"
    progress = Progress(enabled=is_main)
    if problems:
        return _fail(progress, problems[0])
    from .dist import is_peer_loss
    from .storage import StorageError

    ranks = None
    try:
        ranks = Ranks()
        embedded, pairs = open_set(args.embeddings, args.split, args.pairs)
        entry = score_set(
            embedded,
            ranks,
            tuple(args.protocol or ()) or None,
            fprs,
            args.split,
            pairs,
            args.max_kept,
            args.name,
            _Reporter(progress),
        )
        if entry is not None:
            _write(args.report, json.dumps(entry, indent=1).encode())
            if args.roc:
                from .rocplot import plot_roc

                plot_roc([entry], lambda png: _write(args.roc, png))
            progress.event("scored", report=args.report)
            log.info(f"report written to {args.report}")
    except ConfigError as err:
        return _fail(progress, str(err))
    except StorageError as err:
        return _fail(progress, str(err)) if err.permanent else _unavailable(str(err))
    except Exception as err:
        if not is_peer_loss(err):
            raise
        return _unavailable(f"lost a peer ({str(err).splitlines()[0][:300]})")
    finally:
        if ranks is not None:
            ranks.close()
        progress.close()
    return exitcodes.DONE


def _fail(progress: Progress, message: str) -> int:
    progress.event("error", kind="config", message=message)
    log.error(f"score: {message}")
    return exitcodes.CONFIG_ERROR


def _unavailable(why: str) -> int:
    log.error(f"score: {why}; exiting {exitcodes.UNAVAILABLE} so the job is retried")
    return exitcodes.UNAVAILABLE


def run(argv: list[str] | None = None) -> int:
    """``main``, with any other exception printed as a traceback and reported as exit code 1."""
    return exitcodes.guarded(lambda: main(argv))


if __name__ == "__main__":
    exitcodes.exit_now(run())
