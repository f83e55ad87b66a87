"""Real-data sources: RecordIO written byte for byte, image folders, S3, sharding, bad samples, bad input."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from mfr.trainer.config import ConfigError, DataConfig
from mfr.trainer.data import recordio
from mfr.trainer.data.loader import BadDataError, EpochStream
from mfr.trainer.data.permutation import FeistelPermutation
from mfr.trainer.data.sources import FolderFaces, RecordFaces, decode
from mfr.trainer.data.spans import Layout, SpanOrder
from mfr.trainer.metrics import BAD_SAMPLES
from tests.support.datasets import data_config, samples, tag_of, write_folder, write_recordio

# -- the MXNet record format, byte for byte


def test_record_framing_is_mxnets():
    payload = b"abcdef"  # 6 bytes: padded with 2 zeros
    assert recordio.frame(payload) == struct.pack("<II", 0xCED7230A, 6) + payload + b"\0\0"
    header = recordio.IRHeader(0, 3.0, 17, 0)
    packed = recordio.pack(header, b"JPEG")
    assert packed == struct.pack("<IfQQ", 0, 3.0, 17, 0) + b"JPEG"
    assert recordio.unpack(packed) == (header, b"JPEG")
    array = recordio.pack(recordio.IRHeader(2, (5.0, 9.0), 0, 0), b"")
    assert array == struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<2f", 5.0, 9.0)
    assert recordio.unpack(array)[0].label == (5.0, 9.0)


def test_a_payload_holding_the_magic_is_split_and_joined_as_dmlc_does():
    magic = struct.pack("<I", 0xCED7230A)
    payload = b"1234" + magic + b"5678xy"
    framed = recordio.frame(payload)
    first, second = struct.unpack_from("<II", framed), struct.unpack_from("<II", framed, 12)
    assert first == (0xCED7230A, 1 << 29 | 4) and second == (0xCED7230A, 3 << 29 | 6)
    assert recordio.unframe(framed + b"trailing") == payload
    with pytest.raises(recordio.RecordError, match="truncated"):
        recordio.unframe(framed[:-4])


def test_insightface_layout_and_idx(tmp_path):
    items = samples(6, 3, "JPEG")
    rec = write_recordio(tmp_path, items)
    pairs = recordio.parse_idx((tmp_path / "train.idx").read_text(), "train.idx")
    assert [k for k, _ in pairs] == list(range(1 + 6 + 3))
    data = rec.read_bytes()
    header0, _ = recordio.unpack(recordio.unframe(data[pairs[0][1] :]))
    assert header0.flag == 2 and header0.label == (7.0, 10.0)
    ranges = [recordio.unpack(recordio.unframe(data[off:]))[0].label for key, off in pairs[7:]]
    assert ranges == [(1.0, 3.0), (3.0, 5.0), (5.0, 7.0)]  # labels grouped: images 1-2 are identity 0


# -- round trips, local and S3


def _check_round_trip(dataset, items):
    assert len(dataset) == len(items)
    got = sorted((label, tuple(image[:4, :4].ravel())) for image, label in map(dataset.load, range(len(dataset))))
    want = sorted((label, tuple(decode(data, "x")[:4, :4].ravel())) for label, data in items)
    assert got == want
    image, _label = dataset.load(0)
    assert image.shape == (112, 112, 3) and image.dtype == np.uint8


def test_recordio_round_trip(tmp_path):
    items = samples(10, 4, "JPEG")
    dataset = RecordFaces(str(write_recordio(tmp_path, items)), None, 4, None)
    assert dataset.num_identities == 4
    _check_round_trip(dataset, items)
    # the folder URL finds train.rec too
    assert len(RecordFaces(str(tmp_path), None, 4, None)) == 10


def test_folder_round_trip(tmp_path):
    items = samples(10, 4)
    dataset = FolderFaces(str(write_folder(tmp_path / "faces", items)), None, 4, None)
    assert dataset.classes == ["id000", "id001", "id002", "id003"]
    _check_round_trip(dataset, items)


def test_sources_read_from_s3(s3_env, tmp_path):
    import s3fs

    items = samples(8, 2)
    write_recordio(tmp_path, samples(8, 2, "JPEG"))
    write_folder(tmp_path / "faces", items)
    fs = s3fs.S3FileSystem(endpoint_url=s3_env.endpoint)
    fs.put(str(tmp_path / "train.rec"), "mfr-test/data-test/rec/train.rec")
    fs.put(str(tmp_path / "train.idx"), "mfr-test/data-test/rec/train.idx")
    fs.put(str(tmp_path / "faces"), "mfr-test/data-test/faces", recursive=True)

    local = RecordFaces(str(tmp_path / "train.rec"), None, 2, None)
    remote = RecordFaces("s3://mfr-test/data-test/rec/train.rec", None, 2, None)
    for i in range(len(local)):
        assert remote.read(i) == local.read(i)
    _check_round_trip(FolderFaces("s3://mfr-test/data-test/faces", None, 2, None), items)
    stream = EpochStream(data_config("folder", "s3://mfr-test/data-test/faces", batch_size=4, num_workers=1), 2, 0, 1)
    images, labels = next(iter(stream))
    assert images.shape == (4, 3, 112, 112) and labels.tolist() != []


# -- sharding: every sample exactly once per epoch across 2 ranks x 2 workers, and resume


def _epoch_tags(streams, batches_per_rank):
    seen = []
    for stream in streams:
        it = iter(stream)
        for _ in range(batches_per_rank):
            images, _labels = next(it)
            seen += [tag_of(img) for img in images]
    return seen


def test_exactly_once_across_ranks_and_workers_and_resume(tmp_path):
    items = samples(48, 6)
    uri = str(write_folder(tmp_path / "faces", items))
    cfg = data_config("folder", uri, batch_size=4, num_workers=2, seed=3)
    streams = [EpochStream(cfg, 6, rank, 2) for rank in range(2)]
    first = _epoch_tags(streams, 6)  # 48 samples = 6 global batches of 2 x 4
    assert sorted(first) == list(range(48))
    second = _epoch_tags(streams, 6)  # the iterators went on into epoch 1: reshuffled
    assert sorted(second) == list(range(48)) and second != first

    # resume mid-epoch on another world size: the rest of the epoch, exactly
    two = [EpochStream(cfg, 6, rank, 2) for rank in range(2)]
    iters = [iter(s) for s in two]
    before = [tag_of(img) for _ in range(2) for it in iters for img in next(it)[0]]
    state = two[0].state_dict()
    assert state == {"epoch": 0, "position": 16}
    one = EpochStream(data_config("folder", uri, batch_size=8, num_workers=2, seed=3), 6, 0, 1)
    one.load_state_dict(state)
    it = iter(one)
    after = [tag_of(img) for _ in range(4) for img in next(it)[0]]
    assert sorted(before + after) == list(range(48))


# -- the epoch orders: a seeded permutation evaluated pointwise, and the span layout of shards


@pytest.mark.parametrize("size", [1, 2, 3, 5, 48, 1000, 4097, 65539])
def test_the_permutation_is_a_bijection_with_its_inverse(size):
    for seed in range(3):
        order = FeistelPermutation(size, seed, 7)
        image = order(np.arange(size))
        assert np.array_equal(np.sort(image), np.arange(size))
        assert np.array_equal(order.inverse(image), np.arange(size))
    with pytest.raises(IndexError):
        order([size])


def test_the_permutation_looks_random():
    n = 100_000
    x = np.arange(n)
    image = FeistelPermutation(n, 0, 0)(x)
    assert np.sum(image == x) < 10  # a random permutation has 1 fixed point on average
    rho = np.corrcoef(x, image)[0, 1]  # the ranks are the values: this is Spearman's rho, ~N(0, 1/n)
    assert abs(rho) < 0.02
    gaps = np.abs(np.diff(image)) / n  # consecutive outputs spread: E|U - V| = 1/3 for independent uniforms
    assert 0.32 < gaps.mean() < 0.345 and np.mean(gaps < 0.001) < 0.005
    other_epoch = FeistelPermutation(n, 0, 1)(x)
    assert np.sum(other_epoch == image) < 10
    # the image of one point over many keys is uniform (chi-square, 9 degrees of freedom, p ~ 1e-4)
    counts = np.bincount([int(FeistelPermutation(10, seed, 0)([0])[0]) for seed in range(5000)], minlength=10)
    assert ((counts - 500) ** 2 / 500).sum() < 33
    # a tweak gives each element its own permutation: per tweak a bijection, and different ones
    tweak = np.repeat(np.arange(50), 64)
    inside = FeistelPermutation(64, 3, 0)(np.tile(np.arange(64), 50), tweak).reshape(50, 64)
    assert all(np.array_equal(np.sort(row), np.arange(64)) for row in inside)
    assert len({tuple(row) for row in inside}) == 50


@pytest.mark.parametrize(
    ("size", "span", "layout"),
    [
        (50, 7, Layout(2, 4, 2)),
        (50, 50, Layout(1, 8, 2)),
        (1001, 64, Layout(3, 5, 3)),
        (1000, 100, Layout(2, 7, 1)),
    ],
)
def test_the_span_order_is_a_bijection_where_each_reader_streams_its_spans(size, span, layout):
    order = SpanOrder(size, span, 5, 2, layout)
    stream = order.stream_index(np.arange(size))
    assert np.array_equal(np.sort(stream), np.arange(size))
    samples_ = order.samples(stream)
    assert np.array_equal(np.sort(samples_), np.arange(size))
    assert np.array_equal(order.stream_indices(samples_), stream)
    g, workers = layout.world_size * layout.batch_size, layout.workers
    steps = size // g
    for rank in range(layout.world_size):
        for slot in range(workers):  # the batches one worker gets: consecutive stream indices
            mine = np.concatenate(
                [
                    order.stream_index(
                        np.arange(k * g + rank * layout.batch_size, k * g + (rank + 1) * layout.batch_size)
                    )
                    for k in range(slot, steps, workers)
                ]
            )
            assert np.all(np.diff(mine) == 1)
            assert order.part_end(int(mine[0])) == mine[-1] + 1
    # a span's samples stay in it (read together) but in a shuffled order, and spans are shuffled
    spans_in_stream = samples_[np.argsort(stream)] // span
    assert np.all(spans_in_stream[: order.full * span].reshape(-1, span) == spans_in_stream[::span, None][: order.full])
    if order.full > 2:
        assert not np.array_equal(spans_in_stream[::span][: order.full], np.arange(order.full))
        assert not np.array_equal(samples_[np.argsort(stream)][:span] % span, np.arange(span))
    assert not np.array_equal(SpanOrder(size, span, 5, 3, layout).samples(stream), samples_)  # next epoch


# -- bad samples


def _with_bad_records(folder: Path) -> tuple[Path, int]:
    """A RecordIO set of 16 images where 3 records are bad: corrupt JPEG, truncated record, bad label."""
    items = samples(16, 4, "JPEG")
    writer = recordio.Writer()
    writer.write(0, recordio.pack(recordio.IRHeader(0, (17.0, 21.0), 0, 0), b""))
    for key, (label, jpeg) in enumerate(items, 1):
        if key == 3:
            jpeg = jpeg[:40] + b"\xde\xad" * 200  # corrupt JPEG
        if key == 9:
            label = 99  # outside num_classes
        framed = recordio.frame(recordio.pack(recordio.IRHeader(0, float(label), key, 0), jpeg))
        if key == 6:
            framed = framed[: len(framed) // 2]  # truncated record; the next record starts right after
        writer.idx.append(f"{key}\t{len(writer.rec)}\n")
        writer.rec += framed
    for i in range(4):
        writer.write(17 + i, recordio.pack(recordio.IRHeader(0, (1.0, 2.0), 0, 0), b""))
    (folder / "train.rec").write_bytes(bytes(writer.rec))
    (folder / "train.idx").write_text(writer.idx_text())
    return folder / "train.rec", 3


def test_bad_samples_are_replaced_counted_and_logged(tmp_path, caplog):
    rec, bad = _with_bad_records(tmp_path)
    counter = BAD_SAMPLES.labels(rank="0")
    before = counter._value.get()
    stream = EpochStream(data_config("recordio", str(rec), batch_size=4, max_bad_fraction=0.5), 4, 0, 1)
    it = iter(stream)
    with caplog.at_level("WARNING", logger="mfr.data"):
        batches = [next(it) for _ in range(4)]  # one whole epoch, full batches
    assert all(images.shape[0] == 4 and labels.shape[0] == 4 for images, labels in batches)
    assert all(0 <= label < 4 for _, labels in batches for label in labels.tolist())
    assert counter._value.get() - before == bad
    logged = caplog.text
    assert "train.rec#3: cannot decode image" in logged
    assert "train.rec#6: truncated record" in logged
    assert "train.rec#9: label 99 outside [0, 4)" in logged


def test_too_many_bad_samples_abort_with_a_clear_message(tmp_path):
    rec, _ = _with_bad_records(tmp_path)
    it = iter(EpochStream(data_config("recordio", str(rec), batch_size=4, max_bad_fraction=0.1), 4, 0, 1))
    with pytest.raises(BadDataError, match=r"unreadable samples skipped on rank 0 .* data.max_bad_fraction 0.1"):
        for _ in range(4):
            next(it)


# -- bad input: one clear line naming the file, before training


def test_bad_input_is_a_config_error_naming_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"data.uri .*/nope: no such folder"):
        EpochStream(data_config("folder", str(tmp_path / "nope")), 4, 0, 1)
    (tmp_path / "empty" / "id0").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"empty: no images in identity sub-folders"):
        EpochStream(data_config("folder", str(tmp_path / "empty")), 4, 0, 1)
    write_folder(tmp_path / "faces", samples(6, 3))
    with pytest.raises(ConfigError, match=r"faces: 3 identity folders but head.num_classes is 2"):
        EpochStream(data_config("folder", str(tmp_path / "faces")), 2, 0, 1)

    rec = write_recordio(tmp_path, samples(6, 3, "JPEG"))
    with pytest.raises(ConfigError, match=r"train.rec: 3 identities in the header record but head.num_classes is 2"):
        EpochStream(data_config("recordio", str(rec)), 2, 0, 1)
    idx = tmp_path / "train.idx"
    idx.write_text(idx.read_text() + f"99\t{rec.stat().st_size + 100}\n")
    with pytest.raises(ConfigError, match=r"train.idx does not match .*train.rec"):
        EpochStream(data_config("recordio", str(rec)), 3, 0, 1)
    idx.write_text("0\t0\n1\t5\n")  # offset 5 is inside record 0
    with pytest.raises(ConfigError, match=r"train.idx does not match .*train.rec"):
        EpochStream(data_config("recordio", str(rec)), 3, 0, 1)
    idx.unlink()
    with pytest.raises(ConfigError, match=r"train.idx: no such index"):
        EpochStream(data_config("recordio", str(rec)), 3, 0, 1)
    with pytest.raises(ValueError, match="data.source recordio needs data.uri"):
        DataConfig(source="recordio")


def test_the_trainer_exits_2_on_bad_data_input_before_training(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    (tmp_path / "empty" / "id0").mkdir(parents=True)
    args = [
        "head.num_classes=4",
        "data.source=folder",
        f"data.uri={tmp_path / 'empty'}",
        "metrics.enabled=false",
        f"run.output_dir={tmp_path / 'run'}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "mfr.trainer", *(x for a in args for x in ("--set", a))],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"mfr: config error: data.uri {tmp_path / 'empty'}: no images in identity sub-folders "
        "(.jpg, .jpeg, .png, .bmp, .webp)"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()
