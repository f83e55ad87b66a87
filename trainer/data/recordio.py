"""MXNet RecordIO (``.rec`` + ``.idx``) in the insightface layout, without mxnet.

Record framing (dmlc-core ``recordio.h``): a little-endian uint32 magic
``0xced7230a``, a uint32 whose upper 3 bits are the continuation flag
(0 whole record; 1 first, 2 middle, 3 last part of a split one) and whose
lower 29 bits are the payload length, then the payload padded with zeros
to a multiple of 4 bytes.  A split record's parts join with the magic
bytes between them (the writer split the payload where the magic occurred).

Payload (``mxnet.recordio.pack``): an ``IRHeader`` ``<IfQQ`` (flag, label,
id, id2); when ``flag > 0`` the label is instead ``flag`` float32 values
following the header; then the image bytes (JPEG).

insightface datasets (MS1MV3, Glint360K, WebFace42M): record 0 holds
``label = (first identity record, end of identity records)``; records
``1 .. first-1`` are images, records ``first .. end-1`` hold each identity's
``(start, end)`` image range.  The ``.idx`` file is text, ``key\\toffset``
per line; ``RecordIndex`` turns it into where each record lies and which
records are images.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ..config import ConfigError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1
_IRHEADER = struct.Struct("<IfQQ")


class RecordError(ValueError):
    """A record that cannot be parsed (bad magic, truncated, bad header)."""


class IRHeader(NamedTuple):
    flag: int
    label: float | tuple[float, ...]
    id: int
    id2: int


def pack(header: IRHeader, payload: bytes) -> bytes:
    """``mxnet.recordio.pack``: IRHeader (with the label array if a tuple) then the payload."""
    label = header.label
    if isinstance(label, (tuple, list)):
        return _IRHEADER.pack(len(label), 0.0, header.id, header.id2) + struct.pack(f"<{len(label)}f", *label) + payload
    return _IRHEADER.pack(0, float(label), header.id, header.id2) + payload


def unpack(record: bytes) -> tuple[IRHeader, bytes]:
    """``mxnet.recordio.unpack``: (header, payload); an array label comes back as a tuple."""
    if len(record) < _IRHEADER.size:
        raise RecordError(f"record of {len(record)} bytes is shorter than its {_IRHEADER.size}-byte header")
    flag, label, id_, id2 = _IRHEADER.unpack_from(record)
    body = record[_IRHEADER.size :]
    if flag > 0:
        if len(body) < 4 * flag:
            raise RecordError(f"record header announces {flag} labels but holds {len(body) // 4}")
        labels = struct.unpack_from(f"<{flag}f", body)
        return IRHeader(flag, labels, id_, id2), body[4 * flag :]
    return IRHeader(flag, label, id_, id2), body


def frame(payload: bytes) -> bytes:
    """One record as MXNet writes it: magic, cflag/length word, payload, zero padding to 4 bytes.

    Split at each occurrence of the magic (aligned to 4 bytes, as dmlc does), the parts flagged 1/2/3.
    """
    parts, start = [], 0
    while True:
        hit = payload.find(_MAGIC_BYTES, start)
        while hit != -1 and hit % 4:
            hit = payload.find(_MAGIC_BYTES, hit + 1)
        if hit == -1:
            parts.append(payload[start:])
            break
        parts.append(payload[start:hit])
        start = hit + 4
    out = bytearray()
    for i, part in enumerate(parts):
        cflag = 0 if len(parts) == 1 else 1 if i == 0 else 3 if i == len(parts) - 1 else 2
        out += _MAGIC_BYTES + struct.pack("<I", cflag << 29 | len(part)) + part + b"\0" * (-len(part) % 4)
    return bytes(out)


def unframe(data: bytes) -> bytes:
    """The payload of the record at the start of ``data`` (which may hold more bytes after it)."""
    pos, out = 0, bytearray()
    while True:
        if len(data) < pos + 8:
            raise RecordError(f"truncated record: {len(data) - pos} bytes where an 8-byte record header was due")
        magic, word = struct.unpack_from("<II", data, pos)
        if magic != MAGIC:
            raise RecordError(f"bad record magic {magic:#010x} (expected {MAGIC:#010x})")
        cflag, length = word >> 29, word & _LENGTH_MASK
        if len(data) < pos + 8 + length:
            raise RecordError(f"truncated record: {length} payload bytes announced, {len(data) - pos - 8} present")
        out += data[pos + 8 : pos + 8 + length]
        pos += 8 + length + (-length % 4)
        if cflag in (0, 3):
            return bytes(out)
        if cflag not in (1, 2):
            raise RecordError(f"bad continuation flag {cflag}")
        out += _MAGIC_BYTES


class Writer:
    """Writes ``.rec`` bytes and the matching ``.idx`` lines, byte for byte as MXNet does."""

    def __init__(self) -> None:
        self.rec, self.idx = bytearray(), []

    def write(self, key: int, payload: bytes) -> None:
        self.idx.append(f"{key}\t{len(self.rec)}\n")
        self.rec += frame(payload)

    def idx_text(self) -> str:
        return "".join(self.idx)


def insightface_records(images: Sequence[tuple[int, bytes]]) -> Writer:
    """The insightface layout for ``(label, jpeg)`` pairs: header record 0, images, identity ranges."""
    by_label: dict[int, list[bytes]] = {}
    for label, jpeg in images:
        by_label.setdefault(label, []).append(jpeg)
    labels = sorted(by_label)
    first_identity = 1 + len(images)
    writer = Writer()
    writer.write(0, pack(IRHeader(0, (float(first_identity), float(first_identity + len(labels))), 0, 0), b""))
    key, ranges = 1, []
    for label in labels:
        start = key
        for jpeg in by_label[label]:
            writer.write(key, pack(IRHeader(0, float(label), key, 0), jpeg))
            key += 1
        ranges.append((start, key))
    for i, (start, end) in enumerate(ranges):
        writer.write(first_identity + i, pack(IRHeader(0, (float(start), float(end)), 0, 0), b""))
    return writer


def parse_idx_arrays(text: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, offsets)`` int64 arrays of an ``.idx`` file, fast; ValueError naming the line if malformed."""
    try:
        table = np.array(text.split(), dtype=np.int64).reshape(-1, 2)
        if len(table) != sum(1 for line in text.splitlines() if line.strip()):
            raise ValueError
    except ValueError:
        pairs = parse_idx(text, name)  # names the bad line
        table = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return table[:, 0].copy(), table[:, 1].copy()


def parse_idx(text: str, name: str) -> list[tuple[int, int]]:
    """``(key, offset)`` pairs of an ``.idx`` file; ValueError naming the line if malformed."""
    pairs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            key, offset = int(fields[0]), int(fields[1])
        except (ValueError, IndexError):
            raise ValueError(f"{name}: line {n} is not 'key<TAB>offset': {line[:60]!r}") from None
        pairs.append((key, offset))
    return pairs


class RecordIndex:
    """Where each record of a ``.rec`` lies, from its ``.idx``: a record ends where the next one starts.

    Arrays, not dicts: an index of 5M records stays ~100 MB per process.  Offsets past the end of the
    ``.rec`` or repeated, and repeated keys, are a ConfigError naming both files.
    """

    def __init__(self, idx_text: str, rec_size: int, idx_name: str, rec_name: str):
        self.idx_name, self.rec_name = idx_name, rec_name
        keys, offsets = parse_idx_arrays(idx_text, idx_name)
        if not len(keys):
            raise ConfigError(f"{idx_name}: empty index")
        by_offset = np.argsort(offsets, kind="stable")
        ordered = offsets[by_offset]
        if ordered[-1] + 8 > rec_size or np.any(np.diff(ordered) <= 0) or ordered[0] < 0:
            raise ConfigError(f"{idx_name} does not match {rec_name}: offsets past the end of the file or repeated")
        ends = np.empty_like(offsets)
        ends[by_offset] = np.append(ordered[1:], rec_size)
        by_key = np.argsort(keys, kind="stable")
        self.keys = keys[by_key]  # sorted
        if np.any(np.diff(self.keys) == 0):
            raise ConfigError(f"{idx_name}: repeated keys")
        self.starts, self.ends = offsets[by_key], ends[by_key]
        self.first = (int(ordered[0]), int(ends[by_offset[0]]))  # (start, end) of the first record in the file
        self.last = (int(ordered[-1]), rec_size)  # ... and of the last

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, end) of each key's record; -1 where the index lacks the key."""
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        found = self.keys[pos] == keys
        return np.where(found, self.starts[pos], -1), np.where(found, self.ends[pos], -1)

    def header_span(self) -> tuple[int, int]:
        """(start, end) of record 0, insightface's header, or of the first record in the file without one."""
        (start,), (end,) = self.lookup(np.array([0]))
        return (int(start), int(end)) if start >= 0 else self.first

    def images(self, header: IRHeader) -> tuple[np.ndarray, int]:
        """The keys of the image records, and the number of identities (-1: unknown without reading every record).

        ``header`` is that of the ``header_span`` record.  insightface's record 0 names images
        ``1 .. first-1`` and identities ``first .. end-1``; without it every record is an image with its
        own label.
        """
        if not (self.keys[0] == 0 and header.flag > 0):
            return self.keys, -1
        first, end = int(header.label[0]), int(header.label[1])
        # checked before anything is sized by them: a 76-byte pair could otherwise ask for gigabytes
        if not 1 < first <= len(self.keys) or np.any(self.lookup(np.array([1, first - 1]))[0] < 0):
            raise ConfigError(
                f"{self.idx_name} does not match {self.rec_name}: header record names images "
                f"1..{first - 1}, the index holds {len(self.keys)} records"
            )
        return np.arange(1, first, dtype=np.int64), end - first
