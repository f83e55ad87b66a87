"""Data from others: small or crafted files that try to leak bytes or force huge allocations.

Each becomes a bad input (one line) or a bad sample (skipped and counted), never a copied
secret, a crash, or gigabytes from a few bytes.  Allocations are measured with tracemalloc
(Python and numpy buffers), which is deterministic, not a timing.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from mfr.trainer.config import ConfigError
from mfr.trainer.data import recordio, shards
from mfr.trainer.data.augment import Augment
from mfr.trainer.data.sources import BadSample, RecordFaces, ShardFaces, decode
from tests.support.datasets import samples, tagged_image, write_folder

MiB = 2**20


def _peak_bytes(fn) -> tuple[int, BaseException | None]:
    """Peak traced allocation while ``fn()`` runs, and what it raised."""
    tracemalloc.start()
    try:
        fn()
        raised = None
    except Exception as err:  # the caller asserts on it
        raised = err
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, raised


def test_pack_decodes_every_image_and_refuses_links_out_of_the_folder(tmp_path):
    from typer.testing import CliRunner

    from mfr.ctl.main import app

    secret = b"aws_secret_access_key = wJalrXUtnFEMI/K7MDENG"
    (tmp_path / "credentials").write_bytes(secret)
    outside = tmp_path / "outside.png"
    outside.write_bytes(tagged_image(99))  # a real image, but not the folder's
    src = write_folder(tmp_path / "faces", samples(6, 2))
    (src / "id000" / "notes.jpg").write_bytes(b"not an image at all\n")
    (src / "id000" / "creds.jpg").symlink_to(tmp_path / "credentials")
    (src / "id001" / "elsewhere.png").symlink_to(outside)
    (src / "id001" / "inside.png").symlink_to(src / "id001" / "00001.png")  # a link within the folder is fine

    def pack(*args: str):
        return CliRunner().invoke(app, ["data", "pack", str(src), *args, "--shard-size", "4", "-j", "2", "-o", "json"])

    verbose = pack(str(tmp_path / "shards"), "-v")
    assert verbose.exit_code == 0, verbose.stderr
    summary = json.loads(verbose.stdout)
    assert (summary["images"], summary["bad_samples_skipped"]) == (7, 3)
    listed = verbose.stderr.strip().splitlines()
    assert len(listed) == 3 and all(line.startswith("skipped bad sample ") for line in listed)
    assert "id000/notes.jpg: cannot decode image" in listed[1]
    assert f"id000/creds.jpg: a link to {tmp_path}/credentials, outside {src}; not read" in listed[0]
    assert f"id001/elsewhere.png: a link to {outside}, outside {src}" in listed[2]
    packed = b"".join(p.read_bytes() for p in (tmp_path / "shards").glob("*.tar"))
    assert secret not in packed and outside.read_bytes() not in packed

    quiet = pack(str(tmp_path / "shards2"))
    assert quiet.exit_code == 0 and quiet.stderr.strip() == "mfr: skipped 3 bad samples (-v lists them)"


def test_an_image_larger_than_a_face_crop_is_refused_before_it_is_decoded():
    out = io.BytesIO()
    Image.new("1", (4096, 4096)).save(out, "PNG")  # 16.8 megapixels in a few kilobytes
    assert len(out.getvalue()) < 64 * 1024
    with pytest.raises(BadSample, match=r"big.png: 4096 x 4096 pixels, more than a face crop needs"):
        decode(out.getvalue(), "big.png")
    small = io.BytesIO()
    Image.new("RGB", (250, 250), (9, 9, 9)).save(small, "PNG")  # a loose crop still decodes, resized
    assert decode(small.getvalue(), "ok.png").shape == (112, 112, 3)


def _bin(images_op: bytes) -> bytes:
    """A protocol-2 pickle of ``(images, [True])`` whose images come from ``images_op`` (memo slot 0)."""
    return b"\x80\x02" + images_op + b"q\x00]q\x01(h\x00h\x00e]q\x02\x88a\x86q\x03."


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (_bin(b"c__builtin__\nbytearray\nJ\x00\x00\x00\x04\x85R"), "bytearray of a int, not of bytes"),
        (
            _bin(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ\x00\x00\x00\x04\x85U\x01B\x87R"),
            "an array of shape (67108864,) not read from the file",
        ),
        (
            b"\x80\x02"
            + pickle.dumps(b"\xff" * 1024, 2)[2:-1]
            + b"q\x000]q\x01("
            + b"h\x00" * 4000
            + b"e]q\x02("
            + b"\x88" * 2000
            + b"e\x86.",
            "its images take more bytes than the",
        ),
    ],
    ids=["bytearray of a size", "array of a shape", "one image referenced 4000 times"],
)
def test_a_small_bin_cannot_make_a_large_allocation(payload, why):
    from mfr.trainer.data.binsets import BinFormatError, parse_bin

    assert len(payload) < 20_000
    peak, raised = _peak_bytes(lambda: parse_bin(payload, "lfw.bin"))
    assert isinstance(raised, BinFormatError) and why in str(raised), raised
    assert peak < 4 * MiB, f"{peak / MiB:.0f} MiB from a {len(payload)}-byte file"


def test_a_recordio_header_naming_more_images_than_the_index_is_refused_before_sizing_anything(tmp_path):
    writer = recordio.Writer()
    writer.write(0, recordio.pack(recordio.IRHeader(0, (2.0**25, 2.0**25 + 1), 0, 0), b""))
    (tmp_path / "train.rec").write_bytes(bytes(writer.rec))
    (tmp_path / "train.idx").write_text(writer.idx_text())
    assert (tmp_path / "train.rec").stat().st_size + (tmp_path / "train.idx").stat().st_size < 80
    peak, raised = _peak_bytes(lambda: RecordFaces(str(tmp_path / "train.rec"), None, 10, Augment(0, False, 0)))
    assert peak < 4 * MiB, f"{peak / MiB:.0f} MiB from an 80-byte pair"
    assert isinstance(raised, ConfigError), raised
    assert "train.idx does not match" in str(raised) and "images 1..33554431, the index holds 1 records" in str(raised)


def test_shard_offsets_outside_the_tar_make_bad_samples_not_a_crash(tmp_path):
    items = samples(8, 2)
    names = []
    for n in range(2):
        chunk = [(f"{n}{i:03d}", label, data, "png") for i, (label, data) in enumerate(items[4 * n : 4 * n + 4])]
        tar, offsets, _ = shards.write_shard(chunk)
        names.append(shards.shard_name(n))
        (tmp_path / names[-1]).write_bytes(tar)
        (tmp_path / shards.offsets_name(names[-1])).write_bytes(offsets)
    index = {
        "format": shards.FORMAT,
        "classes": ["a", "b"],
        "counts": [4, 4],
        "images": 8,
        "shards": [{"name": name, "count": 4} for name in names],
    }
    (tmp_path / shards.INDEX).write_text(json.dumps(index))
    table = list(struct.unpack("<5Q", (tmp_path / "shard-000000.offsets").read_bytes()))
    table[2] = 2**62  # sample 1 would end, and sample 2 start, 4 EiB into a 10 KB file
    (tmp_path / "shard-000000.offsets").write_bytes(struct.pack("<5Q", *table))

    dataset = ShardFaces(str(tmp_path), None, 2, Augment(0.0, False, 0))
    with pytest.raises(BadSample, match=r"shard-000000.offsets: offsets not increasing by whole samples within"):
        dataset.read(1)
    image, label, skipped = dataset[0]  # as training reads it: replaced by the next good sample, counted
    assert skipped == 4 and (label, image.shape) == (items[4][0], (3, 112, 112))
    assert [skipped for _, _, skipped in dataset.__getitems__([5, 2])] == [0, 2]
    assert np.array_equal(dataset.load(5)[0], decode(items[5][1], "x"))
