"""Tar shards in the WebDataset layout (``<key>.jpg`` + ``<key>.cls``), written by ``mfrctl data pack``.

A shard set is a folder (local or s3://) holding::

    index.json            {"format": "mfr-shards/1", "classes": [...], "counts": [...],
                           "images": N, "shards": [{"name": "shard-000000.tar", "count": n}, ...]}
    shard-000000.tar      the samples, in the order pack shuffled them (with its seed)
    shard-000000.offsets  count + 1 little-endian uint64: where each sample's first tar header
                          starts, then where the last sample ends; checked when opened (increasing
                          by at least a sample's two tar headers, within the tar file), so a bad
                          table makes its samples bad samples, not a read of 2**63 bytes

Reading never asks for one image: the epoch order (``spans.SpanOrder``) hands each
DataLoader worker whole spans of ``data.shard_chunk`` consecutive samples, each read
with one ranged GET per shard it touches (``ShardSet.read_range``), the next span in
the background.  The order is a pure function of (seed, epoch, layout), so the
position in it is exact and a resume continues after the last sample consumed.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from ..config import ConfigError
from ..storage import ProcessFS, open_url

FORMAT = "mfr-shards/1"
INDEX = "index.json"
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
MIN_SAMPLE_BYTES = 2 * 512  # two tar headers: the image's and the label's


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def offsets_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".offsets"


def write_shard(samples: Iterable[tuple[str, int, bytes, str]]) -> tuple[bytes, bytes, int]:
    """``(tar bytes, offsets bytes, count)`` for ``(key, label, image bytes, image suffix)`` samples."""
    out = io.BytesIO()
    offsets = []
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, label, data, suffix in samples:
            offsets.append(out.tell())
            for name, payload in ((f"{key}.{suffix}", data), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(payload), 0o644, 0
                tar.addfile(info, io.BytesIO(payload))
        offsets.append(out.tell())
    return out.getvalue(), struct.pack(f"<{len(offsets)}Q", *offsets), len(offsets) - 1


def parse_members(data: bytes) -> Iterator[tuple[str, bytes]]:
    """``(name, payload)`` of the tar members in ``data`` (a run of whole members); ValueError if torn."""
    pos = 0
    while pos + 512 <= len(data):
        header = data[pos : pos + 512]
        if header == b"\0" * 512:
            return
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        if prefix:
            name = f"{prefix}/{name}"
        try:
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        except ValueError:
            raise ValueError(f"bad tar header at byte {pos}") from None
        if pos + 512 + size > len(data):
            raise ValueError(f"tar member {name} truncated: {size} bytes announced, {len(data) - pos - 512} present")
        yield name, data[pos + 512 : pos + 512 + size]
        pos += 512 + size + (-size % 512)
    if pos != len(data):
        raise ValueError(f"tar data truncated at byte {pos}")


def group_samples(members: Iterable[tuple[str, bytes]]) -> list[tuple[str, dict[str, bytes]]]:
    """Members grouped into samples by key (the name up to the first dot of its last part)."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    for name, payload in members:
        folder, _, base = name.rpartition("/")
        stem, _, suffix = base.partition(".")
        key = f"{folder}/{stem}" if folder else stem
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        samples[-1][1][suffix.lower()] = payload
    return samples


class ShardSet:
    """The index of a shard set and ranged reads of runs of its samples (one filesystem per process)."""

    def __init__(self, url: str, options: dict[str, Any] | None = None):
        self.url, self.options = url.rstrip("/"), options or {}
        fs, root = open_url(self.url, self.options, what="data.uri")
        self.root = root.rstrip("/")
        index_url = f"{self.url}/{INDEX}"
        try:
            if not fs.exists(f"{self.root}/{INDEX}"):
                raise ConfigError(f"{index_url}: no such file (shards need the index written by mfrctl data pack)")
            index = json.loads(fs.cat_file(f"{self.root}/{INDEX}"))
        except ConfigError:
            raise
        except Exception as err:
            raise ConfigError(f"{index_url}: cannot read ({type(err).__name__}: {str(err)[:200]})") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT or not index.get("shards"):
            raise ConfigError(f"{index_url}: not an {FORMAT} index with shards")
        self.index = index
        self.classes: list[str] = list(index["classes"])
        self.names = [s["name"] for s in index["shards"]]
        self.counts = np.array([int(s["count"]) for s in index["shards"]], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])  # global id of each shard's first sample
        self.num_images = int(self.starts[-1])
        self._files = ProcessFS(self.url, self.options, "data.uri")
        self._offsets: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_offsets": OrderedDict()}

    @property
    def fs(self):
        return self._files.fs

    def locate(self, sample: int) -> tuple[int, int]:
        """``(shard, position in shard)`` of a global sample id."""
        shard = int(np.searchsorted(self.starts, sample, side="right")) - 1
        return shard, sample - int(self.starts[shard])

    def key(self, sample: int) -> str:
        shard, i = self.locate(sample)
        return f"{self.url}/{self.names[shard]}#{i}"

    def offsets(self, shard: int) -> np.ndarray:
        """The shard's offset table, checked against its tar file; ValueError naming the problem."""
        if shard not in self._offsets:
            name = offsets_name(self.names[shard])
            raw = self.fs.cat_file(f"{self.root}/{name}")
            table = np.frombuffer(raw[: len(raw) // 8 * 8], dtype="<u8")
            if len(raw) % 8 or len(table) != self.counts[shard] + 1:
                raise ValueError(f"{name} holds {len(raw) / 8 - 1:g} samples, index says {self.counts[shard]}")
            size = self.fs.size(f"{self.root}/{self.names[shard]}")
            if table.max() > size or np.any(np.diff(table.astype(np.int64)) < MIN_SAMPLE_BYTES):
                raise ValueError(
                    f"{name}: offsets not increasing by whole samples within the {size}-byte {self.names[shard]}"
                )
            self._offsets[shard] = table
            while len(self._offsets) > 64:
                self._offsets.popitem(last=False)
        return self._offsets[shard]

    def read_run(self, shard: int, first: int, stop: int) -> list[tuple[str, dict[str, bytes]]]:
        """Samples ``first .. stop-1`` of one shard, in one ranged read."""
        table = self.offsets(shard)
        start, end = int(table[first]), int(table[stop])
        data = self.fs.cat_file(f"{self.root}/{self.names[shard]}", start=start, end=end)
        if len(data) != end - start:
            raise ValueError(f"{self.names[shard]} truncated: {len(data)} of {end - start} bytes at {start}")
        return group_samples(parse_members(data))

    def read_runs(self, runs: list[tuple[int, int, int]]) -> list[list[tuple[str, dict[str, bytes]]] | None]:
        """Several ``(shard, first, stop)`` runs, fetched concurrently (one ``cat_ranges`` call: parallel
        ranged GETs on S3); None for a run whose bytes are torn or missing."""
        paths, starts, ends = [], [], []
        for shard, first, stop in runs:
            table = self.offsets(shard)
            paths.append(f"{self.root}/{self.names[shard]}")
            starts.append(int(table[first]))
            ends.append(int(table[stop]))
        blobs = self.fs.cat_ranges(paths, starts, ends, on_error="return")
        out: list[list[tuple[str, dict[str, bytes]]] | None] = []
        for blob, start, end in zip(blobs, starts, ends):
            try:
                if isinstance(blob, BaseException) or len(blob) != end - start:
                    raise ValueError("short read")
                out.append(group_samples(parse_members(blob)))
            except ValueError:
                out.append(None)
        return out

    def read_range(self, first: int, stop: int) -> dict[int, tuple[str, dict[str, bytes]]]:
        """Global samples ``first .. stop-1`` (one ranged read per shard they touch, concurrently), by id;
        the samples of a torn or missing run are left out."""
        wanted = []
        while first < stop:
            shard, i = self.locate(first)
            n = min(stop, int(self.starts[shard + 1])) - first
            wanted.append((first, (shard, i, i + n)))
            first += n
        out = {}
        for (base, (_, i, end)), samples in zip(wanted, self.read_runs([run for _, run in wanted])):
            if samples is not None and len(samples) == end - i:
                out.update(zip(range(base, base + end - i), samples))
        return out
