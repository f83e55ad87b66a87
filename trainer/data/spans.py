"""The epoch order of a shard set, laid out so that each reader streams whole spans.

A *span* is ``data.shard_chunk`` consecutive samples of the shard set (pack already
shuffled them globally).  Epoch ``e``'s order is built in three seeded steps, all
evaluated pointwise (``FeistelPermutation``: a few words of state at any size):

1. the stream: the spans in a per-epoch permuted order, each span's samples in a
   per-(epoch, span) permuted order -- a shuffle buffer of one span that costs no
   extra reads and no state, since a reader holds the whole span anyway;
2. the layout: the stream is cut into one contiguous part per *reader* (a DataLoader
   worker of a rank), and global step ``k`` gives rank ``r`` the next
   ``batch_size`` samples of reader ``(k mod workers, r)``'s part.  A reader
   therefore walks its part span by span: one large ranged read per span, and the
   next span fetched in the background (``SpanReader``);
3. positions past the last whole global batch map to the rest of the stream.

The order is a bijection of [0, N) for any layout, so the position in it is exact.
It depends on the layout (ranks, batch size, workers), so the layout an epoch was
drawn with is saved with the position: a job resumed on another layout finishes that
epoch in the old order (exactly once still holds; its reads are per batch, not per
span) and draws the next epoch for its own layout.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from .permutation import FeistelPermutation


class Layout(NamedTuple):
    """Who reads an epoch: ranks, samples per rank and step, DataLoader workers per rank (0 counts as 1)."""

    world_size: int
    batch_size: int
    workers: int


class SpanOrder:
    """Epoch ``epoch``'s order of ``size`` samples in spans of ``span``, laid out for ``layout``."""

    def __init__(self, size: int, span: int, seed: int, epoch: int, layout: Layout):
        self.size, self.span, self.layout = size, span, layout
        self.full, self.tail = divmod(size, span)
        self.spans = FeistelPermutation(self.full, seed, epoch, 0) if self.full else None
        self.inside = FeistelPermutation(span, seed, epoch, 1)
        self.inside_tail = FeistelPermutation(self.tail, seed, epoch, 2) if self.tail else None
        world, batch, workers = layout.world_size, layout.batch_size, max(1, layout.workers)
        self.global_batch = world * batch
        steps = size // self.global_batch
        self.steps_of = np.array([(steps - j + workers - 1) // workers for j in range(workers)], dtype=np.int64)
        before = np.concatenate([[0], np.cumsum(self.steps_of)[:-1]])
        # part of reader (worker slot j, rank r) in the stream: [starts[j, r], starts[j, r] + batch * steps_of[j])
        self.starts = batch * (world * before[:, None] + np.arange(world)[None, :] * self.steps_of[:, None])
        self.laid = steps * self.global_batch

    def stream_index(self, positions) -> np.ndarray:
        """Where the samples at epoch ``positions`` sit in the span stream."""
        p = np.asarray(positions, dtype=np.int64)
        batch, workers = self.layout.batch_size, max(1, self.layout.workers)
        step, within = np.divmod(p, self.global_batch)
        rank, offset = np.divmod(within, batch)
        laid = self.starts[step % workers, rank] + (step // workers) * batch + offset
        return np.where(p < self.laid, laid, p)

    def samples(self, stream) -> np.ndarray:
        """Sample ids at stream indices."""
        slot, offset = np.divmod(np.asarray(stream, dtype=np.int64), self.span)
        out = np.empty_like(slot)
        full = slot < self.full
        if full.any():
            sid = self.spans(slot[full])
            out[full] = sid * self.span + self.inside(offset[full], sid)
        if (~full).any():
            out[~full] = self.full * self.span + self.inside_tail(offset[~full])
        return out

    def stream_indices(self, samples) -> np.ndarray:
        """Inverse of ``samples``."""
        sid, offset = np.divmod(np.asarray(samples, dtype=np.int64), self.span)
        out = np.empty_like(sid)
        full = sid < self.full
        if full.any():
            out[full] = self.spans.inverse(sid[full]) * self.span + self.inside.inverse(offset[full], sid[full])
        if (~full).any():
            out[~full] = self.full * self.span + self.inside_tail.inverse(offset[~full])
        return out

    def span_at(self, slot: int) -> int:
        """The span id at stream slot ``slot``."""
        return int(self.spans([slot])[0]) if slot < self.full else self.full

    def part_end(self, stream: int) -> int:
        """End (exclusive) of the reader part that holds stream index ``stream``."""
        if stream >= self.laid:
            return self.size
        flat = self.starts.ravel()  # parts in stream order: worker slot major, then rank
        q = int(np.searchsorted(flat, stream, side="right")) - 1
        return int(flat[q]) + self.layout.batch_size * int(self.steps_of[q // self.layout.world_size])


class SpanReader:
    """A DataLoader worker's spans: whole spans fetched in one go, the next one in the background.

    Holds ``keep`` spans (the current one, the next, and one shared with the neighbouring
    part); ``fetch(first, stop)`` returns ``{sample: (key, members)}`` for the samples it could
    read (a torn run is left out: the caller reads those samples one by one and names them).
    """

    def __init__(self, fetch, keep: int = 3):
        self.fetch, self.keep = fetch, keep
        self._spans: OrderedDict[tuple[int, int], Future] = OrderedDict()
        self._pool, self._pid = None, None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_spans": OrderedDict(), "_pool": None, "_pid": None}

    def _submit(self, first: int, stop: int) -> Future:
        if self._pid != os.getpid():  # threads do not survive fork
            self._pool, self._pid, self._spans = ThreadPoolExecutor(1, "mfr-span-read"), os.getpid(), OrderedDict()
        if (first, stop) not in self._spans:
            self._spans[(first, stop)] = self._pool.submit(self.fetch, first, stop)
            while len(self._spans) > self.keep:
                self._spans.popitem(last=False)
        self._spans.move_to_end((first, stop))
        return self._spans[(first, stop)]

    def get(self, first: int, stop: int) -> dict[int, Any]:
        return self._submit(first, stop).result()

    def prefetch(self, first: int, stop: int) -> None:
        self._submit(first, stop)
