"""Tar shards: mfrctl data pack (folder and RecordIO, local and S3) then read; sharding, resume, bad samples;
mfrctl data inspect."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mfr.trainer.data import shards
from mfr.trainer.data.augment import Augment
from mfr.trainer.data.loader import EpochStream
from mfr.trainer.data.sources import ShardFaces, decode
from mfr.trainer.metrics import BAD_SAMPLES
from tests.support.cli import MFRCTL
from tests.support.datasets import data_config, samples, tag_of, write_folder, write_recordio
from tests.support.distributed import run_distributed


def data_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MFRCTL, "data", *args], capture_output=True, text=True, timeout=120, env=dict(os.environ))


def multiset(dataset) -> Counter:
    """(label, exact pixels digest) of every sample: what pack must preserve."""
    return Counter((label, image.tobytes()) for image, label in map(dataset.load, range(len(dataset))))


def source_multiset(items) -> Counter:
    return Counter((label, decode(data, "x").tobytes()) for label, data in items)


def test_pack_a_folder_then_read_the_same_multiset(tmp_path):
    items = samples(23, 5)
    src = write_folder(tmp_path / "faces", items)
    proc = data_cli("pack", str(src), str(tmp_path / "shards"), "--shard-size", "6", "-j", "2", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary | {"source": None, "destination": None} == {
        "source": None,
        "destination": None,
        "images": 23,
        "classes": 5,
        "shards": 4,
        "bad_samples_skipped": 0,
    }
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["classes"] == [f"id{i:03d}" for i in range(5)] and index["counts"] == [5, 5, 5, 4, 4]
    assert [s["count"] for s in index["shards"]] == [6, 6, 6, 5]
    dataset = ShardFaces(str(tmp_path / "shards"), None, 5, Augment(0.0, False, 0))
    assert multiset(dataset) == source_multiset(items)
    batch = dataset.__getitems__([22, 3, 9])  # as a DataLoader outside training reads it (no layout)
    assert [label for _, label, _ in batch] == [dataset.load(i)[1] for i in (22, 3, 9)]
    # pack refuses to overwrite, and names the file
    again = data_cli("pack", str(src), str(tmp_path / "shards"))
    assert again.returncode == 2 and "index.json exists" in again.stderr


def test_pack_recordio_to_s3_then_read_the_same_multiset(s3_env, tmp_path):
    items = samples(12, 3, "JPEG")
    rec = write_recordio(tmp_path, items)
    proc = data_cli("pack", str(rec), "s3://mfr-test/data-pack/shards", "--shard-size", "5")
    assert proc.returncode == 0, proc.stderr
    dataset = ShardFaces("s3://mfr-test/data-pack/shards", None, 3, None)
    assert dataset.classes == ["0", "1", "2"] and len(dataset.set.names) == 3
    assert multiset(dataset) == source_multiset(items)
    shards_on_s3 = data_config("shards", "s3://mfr-test/data-pack/shards", batch_size=4)
    images, _labels = next(iter(EpochStream(shards_on_s3, 3, 0, 1)))
    assert images.shape == (4, 3, 112, 112)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """50 tagged PNG samples in shards of 7 (uneven: the last holds 1)."""
    tmp = tmp_path_factory.mktemp("packed")
    write_folder(tmp / "faces", samples(50, 5))
    proc = data_cli("pack", str(tmp / "faces"), str(tmp / "shards"), "--shard-size", "7")
    assert proc.returncode == 0, proc.stderr
    return tmp / "shards"


def test_shards_exactly_once_across_2_ranks_x_2_workers_and_resume(packed):
    cfg = data_config("shards", str(packed), batch_size=4, num_workers=2, shard_chunk=3, seed=1)
    streams = [EpochStream(cfg, 5, rank, 2) for rank in range(2)]
    iters = [iter(s) for s in streams]
    epochs = []
    for _ in range(2):
        tags = [tag_of(img) for _ in range(6) for it in iters for img in next(it)[0]]  # 6 x 8 = 48 of 50 used
        assert len(set(tags)) == 48 and set(tags) <= set(range(50))
        epochs.append(tags)
    assert epochs[0] != epochs[1]  # reshuffled

    # resume after 2 global steps on 1 rank: the rest of that epoch, exactly, then a whole epoch of its own
    fresh_streams = [EpochStream(cfg, 5, rank, 2) for rank in range(2)]
    fresh = [iter(s) for s in fresh_streams]
    before = [tag_of(img) for _ in range(2) for it in fresh for img in next(it)[0]]
    state = fresh_streams[0].state_dict()
    assert state == {"epoch": 0, "position": 16, "layout_world_size": 2, "layout_batch_size": 4, "layout_workers": 2}
    one = EpochStream(data_config("shards", str(packed), batch_size=8, num_workers=2, shard_chunk=3, seed=1), 5, 0, 1)
    one.load_state_dict(state)
    it = iter(one)
    after = [tag_of(img) for _ in range(4) for img in next(it)[0]]
    assert sorted(before + after) == sorted(epochs[0])
    following = [tag_of(img) for _ in range(6) for img in next(it)[0]]
    assert len(set(following)) == 48
    assert one.state_dict() | {"position": 0} == {  # epoch 1 was drawn for the resumed job's layout
        "epoch": 1,
        "position": 0,
        "layout_world_size": 1,
        "layout_batch_size": 8,
        "layout_workers": 2,
    }


def test_bad_shard_samples_are_replaced_and_counted(tmp_path, caplog):
    items = samples(12, 3, "JPEG")
    good = [(f"{i:04d}", label, data, "jpg") for i, (label, data) in enumerate(items)]
    good[2] = (good[2][0], good[2][1], good[2][2][:50] + b"\0" * 300, "jpg")  # corrupt JPEG
    good[5] = (good[5][0], "x7", good[5][2], "jpg")  # malformed label
    good[8] = (good[8][0], 9, good[8][2], "jpg")  # label outside num_classes
    tar, offsets, count = shards.write_shard(good)
    (tmp_path / "shard-000000.tar").write_bytes(tar)
    (tmp_path / "shard-000000.offsets").write_bytes(offsets)
    index = {
        "format": shards.FORMAT,
        "classes": ["a", "b", "c"],
        "counts": [4, 4, 4],
        "images": 12,
        "shards": [{"name": "shard-000000.tar", "count": count}],
    }
    (tmp_path / "index.json").write_text(json.dumps(index))
    counter = BAD_SAMPLES.labels(rank="0")
    before = counter._value.get()
    stream = EpochStream(data_config("shards", str(tmp_path), batch_size=4, max_bad_fraction=0.5), 3, 0, 1)
    it = iter(stream)
    with caplog.at_level("WARNING", logger="mfr.data"):
        batches = [next(it) for _ in range(3)]
    assert all(images.shape[0] == 4 and all(0 <= x < 3 for x in labels.tolist()) for images, labels in batches)
    assert counter._value.get() - before == 3
    assert "shard-000000.tar#2: cannot decode image" in caplog.text
    assert "shard-000000.tar#5: missing or malformed .cls label" in caplog.text
    assert "shard-000000.tar#8: label 9 outside [0, 3)" in caplog.text


def test_inspect_shards_and_folder_with_a_grid(packed, tmp_path):
    proc = data_cli("inspect", str(packed), "-o", "json", "--grid", str(tmp_path / "grid.png"), "--samples", "4")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert (info["format"], info["classes"], info["images"], info["shards"]) == ("shards", 5, 50, 8)
    assert info["histogram"] == [{"images": "8-15", "classes": 5}]
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (224, 448, 3)
    assert not np.array_equal(grid[:112], grid[112:])  # the second row wears masks
    assert np.array_equal(grid[:56], grid[112:168])  # above the mask line, the same faces
    table = data_cli("inspect", str(packed.parent / "faces"))
    assert table.returncode == 0 and "folder" in table.stdout and "IMAGES/CLASS" in table.stdout


def test_bad_input_exits_2_with_one_line(tmp_path):
    proc = data_cli("inspect", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "missing: no such file or folder" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    proc = data_cli("pack", str(tmp_path / "empty"), str(tmp_path / "out"))
    assert proc.returncode == 2 and "empty: no images in identity sub-folders" in proc.stderr


def _two_epochs_and_a_resume(rank: int, world: int, uris: list[str]) -> list[dict]:
    """On one real gloo rank, per URI: two epochs, the position after 2 steps (agreed by all ranks), and a
    stream resumed from it (new workers)."""
    import torch.distributed as dist

    out = []
    for uri in uris:
        cfg = data_config("shards", uri, batch_size=4, num_workers=2, shard_chunk=8, seed=2)
        stream = EpochStream(cfg, 5, rank, world)
        it = iter(stream)
        before = [tag_of(img) for _ in range(2) for img in next(it)[0]]
        states = [None] * world
        dist.all_gather_object(states, stream.state_dict())
        rest = [tag_of(img) for _ in range(4) for img in next(it)[0]]
        following = [tag_of(img) for _ in range(6) for img in next(it)[0]]
        resumed = EpochStream(cfg, 5, rank, world)
        resumed.load_state_dict(states[0])
        it = iter(resumed)
        after = [tag_of(img) for _ in range(4) for img in next(it)[0]]
        out.append({"epochs": [before + rest, following], "after": after, "states": states})
    return out


def test_exactly_once_on_two_gloo_processes_with_two_workers_each(packed, s3_env):
    """Real processes (2 gloo ranks x 2 DataLoader workers), reading local shards and the same shards on S3."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_env.endpoint)
    fs.put(str(packed), "mfr-test/data-2proc/shards", recursive=True)
    results = run_distributed(_two_epochs_and_a_resume, 2, [str(packed), "s3://mfr-test/data-2proc/shards"])
    for source in range(2):
        ranks = [r[source] for r in results]
        epoch0 = ranks[0]["epochs"][0] + ranks[1]["epochs"][0]  # 6 steps x 2 ranks x 4 = 48 of 50, no repeats
        assert len(epoch0) == 48 and len(set(epoch0)) == 48 and set(epoch0) <= set(range(50))
        epoch1 = ranks[0]["epochs"][1] + ranks[1]["epochs"][1]
        assert len(set(epoch1)) == 48 and epoch1 != epoch0  # reshuffled
        assert ranks[0]["states"][0] == ranks[0]["states"][1]  # the position is the same on every rank
        for rank in ranks:  # the resumed stream continues exactly where the position says
            assert rank["after"] == rank["epochs"][0][8:]
    assert [r[0]["epochs"] for r in results] == [r[1]["epochs"] for r in results]  # S3 reads the same order
