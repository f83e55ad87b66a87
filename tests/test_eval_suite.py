"""The evaluation suite: .bin sets, k-fold accuracy, pair lists and galleries, mfrctl eval, periodic eval.

References are independent of the code under test: the ``.bin`` is written
opcode by opcode as Python 2 pickled it (insightface's files), k-fold
accuracy is recomputed with ``sklearn.model_selection.KFold`` and explicit
loops, TPR@FPR with ``sklearn.metrics.roc_curve`` on scores from explicit
pair loops, and ``mfrctl eval``'s numbers from embeddings computed here from
the checkpoint's tensors.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_curve as sk_roc_curve
from sklearn.model_selection import KFold
from typer.testing import CliRunner

from mfr.ctl.main import app
from mfr.trainer.data.binsets import BinFormatError, parse_bin, read_bin
from mfr.trainer.verification import (
    PROTOCOLS,
    kfold_accuracy,
    pair_scores,
    protocol_result,
    roc_curve,
    squared_distances,
)
from tests.support.configs import SMALL

IDENTITIES, PHOTOS = 6, 4


def py2_bin(images: list[bytes], issame: list[bool]) -> bytes:
    """A .bin exactly as insightface's Python 2 ``pickle.dump((bins, issame_list), f, protocol=2)`` wrote it."""
    out = [b"\x80\x02", b"]", b"("]  # PROTO 2, EMPTY_LIST, MARK
    for data in images:
        out.append(b"U" + bytes([len(data)]) + data if len(data) < 256 else b"T" + struct.pack("<I", len(data)) + data)
    out += [b"e", b"]", b"("]  # APPENDS, EMPTY_LIST, MARK
    out += [b"\x88" if same else b"\x89" for same in issame]  # NEWTRUE / NEWFALSE
    out += [b"e", b"\x86", b"."]  # APPENDS, TUPLE2, STOP
    return b"".join(out)


def jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def faces():
    from mfr.trainer.data.synthetic import SyntheticFaces

    rendered = SyntheticFaces(IDENTITIES, PHOTOS, seed=3)
    return {(i, j): rendered.render(i, j, masked=False) for i in range(IDENTITIES) for j in range(PHOTOS)}


def bin_pairs(faces) -> tuple[list[bytes], list[bool]]:
    """20 pairs: odd ones two photos of one identity, even ones two identities."""
    images, issame = [], []
    for k in range(20):
        i = k % IDENTITIES
        same = k % 2 == 1
        images += [jpeg(faces[i, k % PHOTOS]), jpeg(faces[i if same else (i + 1) % IDENTITIES, (k + 1) % PHOTOS])]
        issame.append(same)
    return images, issame


# -- the .bin reader ------------------------------------------------------------------------------------------------


def test_bin_reader_reads_the_python2_format(faces, tmp_path):
    images, issame = bin_pairs(faces)
    raw = py2_bin(images, issame)
    assert pickle.loads(raw, encoding="bytes") == (images, issame)  # the opcodes are what insightface loads
    path = tmp_path / "lfw.bin"
    path.write_bytes(raw)
    binset = read_bin(str(path))
    assert (binset.name, binset.num_pairs) == ("lfw", 20)
    assert binset.issame.tolist() == issame
    assert binset.first.tolist() == list(range(0, 40, 2)) and binset.second.tolist() == list(range(1, 40, 2))
    for k in (0, 7, 39):
        expected = np.asarray(Image.open(io.BytesIO(images[k])).convert("RGB"))
        assert np.array_equal(binset.image(k), expected)


def test_bin_reader_takes_images_stored_as_uint8_arrays(faces):
    images, issame = bin_pairs(faces)
    raw = pickle.dumps(([np.frombuffer(b, np.uint8) for b in images], np.array(issame)), protocol=2)
    binset = parse_bin(raw, "agedb_30.bin")
    assert binset.images == images and binset.issame.tolist() == issame


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"this is not a pickle", "not a pickle"),
        (pickle.dumps({"images": []}), "holds a dict"),
        (pickle.dumps(([b"x"] * 3, [True, False])), "3 images for 2 issame flags"),
        (pickle.dumps(([b"x", 5], [True])), "image 1 is a int"),
        (pickle.dumps(([b"x", b"y"], ["yes"])), "issame must be a list of booleans"),
        (pickle.dumps(([b"x", b"y"], [_Exploit()])), "refusing to load"),
    ],
)
def test_wrong_format_is_a_bin_format_error(payload, message):
    with pytest.raises(BinFormatError, match=message):
        parse_bin(payload, "bad.bin")


# -- k-fold accuracy and the new TPR@FPR paths against independent references -----------------------------------------


def _insightface_reference(distances, issame, n_folds=10):
    """insightface's calculate_roc accuracy, loop by loop, with sklearn's KFold."""
    thresholds = np.arange(0, 4, 0.01)
    accuracies = []
    for train, test in KFold(n_splits=n_folds, shuffle=False).split(np.arange(len(distances))):
        train_acc = []
        for t in thresholds:
            predicted = np.less(distances[train], t)
            tp = np.sum(predicted & issame[train])
            tn = np.sum(~predicted & ~issame[train])
            train_acc.append((tp + tn) / len(train))
        best = thresholds[int(np.argmax(train_acc))]
        predicted = np.less(distances[test], best)
        accuracies.append((np.sum(predicted & issame[test]) + np.sum(~predicted & ~issame[test])) / len(test))
    return np.mean(accuracies), np.std(accuracies), accuracies


@pytest.mark.parametrize(("seed", "n", "rounding"), [(0, 600, None), (1, 603, None), (2, 257, 2)])
def test_kfold_accuracy_matches_insightface(seed, n, rounding):
    rng = np.random.default_rng(seed)
    issame = rng.random(n) < 0.5
    left = rng.normal(size=(n, 8))
    right = np.where(issame[:, None], left + rng.normal(scale=0.9, size=(n, 8)), rng.normal(size=(n, 8)))
    distances = squared_distances(left, right)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(distances, np.sum((unit(left) - unit(right)) ** 2, axis=1), atol=1e-12)
    if rounding is not None:  # distances on the threshold grid: ties with "<"
        distances = np.round(distances, rounding)
    mean, std, folds = _insightface_reference(distances, issame)
    got = kfold_accuracy(distances, issame)
    assert got.folds == pytest.approx(folds, abs=1e-12)
    assert (got.mean, got.std) == (pytest.approx(mean, abs=1e-12), pytest.approx(std, abs=1e-12))
    assert 0.6 < got.mean < 1.0  # informative scores: neither chance nor perfect


def _sklearn_tpr(scores, is_genuine, target):
    fpr, tpr, _ = sk_roc_curve(is_genuine, scores, drop_intermediate=False)
    return tpr[fpr <= target].max()


def test_roc_curve_is_sklearns():
    rng = np.random.default_rng(4)
    is_genuine = rng.random(5000) < 0.3
    scores = np.round(rng.normal(size=5000) + is_genuine, 2)  # ties included
    fpr, tpr, thresholds = roc_curve(scores, is_genuine)
    sk_fpr, sk_tpr, sk_thresholds = sk_roc_curve(is_genuine, scores, drop_intermediate=False)
    np.testing.assert_array_equal(fpr, sk_fpr)
    np.testing.assert_array_equal(tpr, sk_tpr)
    np.testing.assert_array_equal(thresholds[1:], sk_thresholds[1:])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_pair_list_scores_and_tpr_match_loops_and_sklearn(protocol):
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 30, size=400)
    unmasked = rng.normal(size=(400, 12)) + 2 * np.eye(30, 12, k=0)[labels % 12]
    masked = unmasked + rng.normal(scale=0.8, size=unmasked.shape)
    first, second = rng.integers(0, 400, size=(2, 20_000))
    is_genuine = labels[first] == labels[second]
    left = masked if protocol.startswith("masked") else unmasked
    right = masked if protocol == "masked-masked" else unmasked
    expected = [
        float(left[a] @ right[b] / np.linalg.norm(left[a]) / np.linalg.norm(right[b])) for a, b in zip(first, second)
    ]
    scores = pair_scores(unmasked, masked, first, second, protocol)
    np.testing.assert_allclose(scores, expected, atol=1e-12)
    result = protocol_result(protocol, scores, is_genuine, (1e-1, 1e-2, 1e-3, 1e-4, 1e-5))
    assert (result.n_genuine, result.n_impostor) == (is_genuine.sum(), (~is_genuine).sum())
    for point in result.points:
        assert point.supported == (result.n_impostor * point.target_fpr >= 1)
        if point.supported:
            assert point.tpr == _sklearn_tpr(scores, is_genuine, point.target_fpr)


@pytest.mark.parametrize(("layers", "width"), [((1, 2, 1, 1), 0.3), ((2, 1, 3, 1), 0.0625)])
def test_an_exported_state_dict_rebuilds_its_architecture(layers, width):
    from mfr.trainer.models import build_backbone
    from mfr.trainer.saved_models import backbone_from_state

    torch.manual_seed(0)
    original = build_backbone("custom", layers=list(layers), width=width, embedding_size=24).eval()
    rebuilt = backbone_from_state(original.state_dict(), "x.pt")
    assert rebuilt.layers == layers and rebuilt.channels == original.channels
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), original(x))


# -- mfrctl eval end to end --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, faces):
    """A tiny committed checkpoint (real trainer, one gloo rank), a folder, shards of it, a pair list and a .bin."""
    import torch.distributed as dist

    from mfr.trainer.dist import init_distributed
    from tests.support.training import train_and_save

    root = tmp_path_factory.mktemp("eval")
    init_distributed("cpu")  # one gloo rank in this process: no worker to start
    try:
        rank = train_and_save(0, 1, str(root / "checkpoints"), [], 1)
    finally:
        dist.destroy_process_group()
    for (i, j), image in faces.items():
        (root / "faces" / f"id{i}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "faces" / f"id{i}" / f"{j}.png")
    packed = CliRunner().invoke(app, ["data", "pack", str(root / "faces"), str(root / "shards"), "--shard-size", "10"])
    assert packed.exit_code == 0, packed.stderr
    (root / "pairs.txt").write_text(
        "# shard sample indices\n" + "".join(f"{a} {b}\n" for a in range(12) for b in range(a + 1, 12))
    )
    (root / "t.bin").write_bytes(py2_bin(*bin_pairs(faces)))
    torch.save(rank["backbone"], root / "backbone.pt")  # an exported backbone: exactly backbone.state_dict()
    return root, rank["backbone"]


def _embed(state, images: list[np.ndarray]) -> np.ndarray:
    """Flip-augmented embeddings, computed here: model(x) + model(mirror(x)), x in [-1, 1]."""
    from mfr.trainer.models import build_backbone

    model = build_backbone("tiny", embedding_size=16)
    model.load_state_dict(state)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        return (model.eval()(x) + model(x.flip(3))).numpy().astype(np.float64)


def _masked(images: list[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    from mfr.trainer.data.masks import apply_mask

    return [apply_mask(image, np.random.default_rng([seed, i])) for i, image in enumerate(images)]


def _cosines(left, right, index_pairs):
    return np.array([left[a] @ right[b] / np.linalg.norm(left[a]) / np.linalg.norm(right[b]) for a, b in index_pairs])


def test_mfrctl_eval_end_to_end(workspace, faces):
    root, state = workspace
    report, roc = root / "report.json", root / "roc.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mfr.ctl.main",
            "eval",
            str(root / "checkpoints"),
            "--bin",
            str(root / "t.bin"),
            "--gallery",
            str(root / "faces"),
            "--pairs",
            f"{root / 'shards'}={root / 'pairs.txt'}",
            "--report",
            str(report),
            "--roc",
            str(roc),
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"OMP_NUM_THREADS": "1"},  # tiny model: 1 thread
    )
    assert proc.returncode == 0, proc.stderr
    written = json.loads(report.read_text())
    printed = json.loads(proc.stdout)
    assert written["model"] == {"url": f"{root / 'checkpoints'}/step-00000001", "kind": "checkpoint", "step": 1}
    assert [(s["name"], s["kind"]) for s in written["sets"]] == [
        ("t", "bin"),
        ("pairs.txt", "pairs"),
        ("faces", "gallery"),
    ]
    for entry in written["sets"]:  # stdout is the report without the curves
        for protocol in entry["protocols"]:
            protocol.pop("roc")
    assert printed == written
    written = json.loads(report.read_text())
    bin_set, pair_set, gallery = written["sets"]

    # The gallery, recomputed here: folder order is sorted paths, image i masked with (seed 0, i).
    photos = [faces[i, j] for i in range(IDENTITIES) for j in range(PHOTOS)]
    labels = np.repeat(np.arange(IDENTITIES), PHOTOS)
    unmasked, masked = _embed(state, photos), _embed(state, _masked(photos))
    n = len(photos)
    protocols = {
        "unmasked-unmasked": (unmasked, unmasked, [(a, b) for a in range(n) for b in range(a + 1, n)]),
        "masked-unmasked": (masked, unmasked, [(a, b) for a in range(n) for b in range(n) if a != b]),
        "masked-masked": (masked, masked, [(a, b) for a in range(n) for b in range(a + 1, n)]),
    }
    for entry in gallery["protocols"]:
        left, right, index_pairs = protocols[entry["protocol"]]
        scores = _cosines(left, right, index_pairs)
        is_genuine = np.array([labels[a] == labels[b] for a, b in index_pairs])
        assert (entry["n_genuine"], entry["n_impostor"]) == (is_genuine.sum(), (~is_genuine).sum())
        for point in entry["points"]:
            assert point["supported"] == (entry["n_impostor"] * point["target_fpr"] >= 1)
            if point["supported"]:
                assert point["tpr"] == pytest.approx(_sklearn_tpr(scores, is_genuine, point["target_fpr"]), abs=1e-12)
                # the JSON curve holds the operating point (the PNG draws the same curve)
                curve = entry["roc"]
                assert (point["achieved_fpr"], point["tpr"]) in set(zip(curve["fpr"], curve["tpr"]))

    # The .bin's 10-fold accuracy, recomputed from embeddings made here.
    images, issame = bin_pairs(faces)
    decoded = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]
    embedded = _embed(state, decoded)
    distances = np.sum(
        (
            embedded[0::2] / np.linalg.norm(embedded[0::2], axis=1, keepdims=True)
            - embedded[1::2] / np.linalg.norm(embedded[1::2], axis=1, keepdims=True)
        )
        ** 2,
        axis=1,
    )
    mean, std, _ = _insightface_reference(distances, np.array(issame))
    accuracy = bin_set["protocols"][0]["accuracy"]
    assert bin_set["protocols"][0]["protocol"] == "unmasked-unmasked" and len(accuracy["folds"]) == 10
    assert (accuracy["mean"], accuracy["std"]) == (pytest.approx(mean, abs=1e-9), pytest.approx(std, abs=1e-9))

    # The pair list on shards: genuine pairs are those whose labels (the tar members' .cls) agree.
    index = json.loads((root / "shards" / "index.json").read_text())
    shard_labels = []
    for shard in index["shards"]:
        with tarfile.open(root / "shards" / shard["name"]) as tar:
            shard_labels += [int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")]
    pairs = [(a, b) for a in range(12) for b in range(a + 1, 12)]
    genuine = sum(shard_labels[a] == shard_labels[b] for a, b in pairs)
    assert 0 < genuine < len(pairs)
    for entry in pair_set["protocols"]:
        assert (entry["n_genuine"], entry["n_impostor"]) == (genuine, len(pairs) - genuine)

    with Image.open(roc) as png:
        assert png.format == "PNG" and png.size == (1500, 420)  # one 5 x 4.2 in panel per set at 100 dpi
        assert len(png.convert("RGB").getcolors(1 << 16)) > 10  # curves drawn, not a blank canvas


def eval_cli(*args: str) -> subprocess.CompletedProcess:
    result = CliRunner().invoke(app, ["eval", *args], catch_exceptions=False)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def test_an_exported_backbone_and_s3_give_the_checkpoints_numbers(workspace, s3_env):
    import fsspec

    root, _ = workspace
    fs = fsspec.filesystem("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    prefix = f"mfr-test/{root.name}"
    fs.put(str(root / "checkpoints"), f"{prefix}/checkpoints", recursive=True)
    fs.put(str(root / "backbone.pt"), f"{prefix}/backbone.pt")
    fs.put(str(root / "t.bin"), f"{prefix}/t.bin")
    runs = {
        "local step": eval_cli(
            str(root / "checkpoints" / "step-00000001"), "--bin", str(root / "t.bin"), "--no-masks", "-o", "json"
        ),
        "s3 root": eval_cli(f"s3://{prefix}/checkpoints", "--bin", f"s3://{prefix}/t.bin", "--no-masks", "-o", "json"),
        "s3 file": eval_cli(f"s3://{prefix}/backbone.pt", "--bin", f"s3://{prefix}/t.bin", "--no-masks", "-o", "json"),
    }
    reports = {}
    for what, proc in runs.items():
        assert proc.returncode == 0, (what, proc.stderr)
        reports[what] = json.loads(proc.stdout)
    assert reports["s3 root"]["model"] == {
        "url": f"s3://{prefix}/checkpoints/step-00000001",
        "kind": "checkpoint",
        "step": 1,
    }
    assert reports["s3 file"]["model"]["kind"] == "exported"
    protocols = [r["sets"][0]["protocols"] for r in reports.values()]
    assert [p["protocol"] for p in protocols[0]] == ["unmasked-unmasked"]
    assert protocols[0] == protocols[1] == protocols[2]


def test_embeddings_are_kept_reused_and_never_mixed(workspace, tmp_path):
    root, _ = workspace
    keep = tmp_path / "embeddings"
    args = (str(root / "backbone.pt"), "--gallery", str(root / "faces"), "--embeddings", str(keep), "-o", "json")
    first = eval_cli(*args)
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in (keep / "faces").iterdir()) == ["masked", "unmasked"]
    again = eval_cli(*args)
    assert again.returncode == 0 and "reusing the embeddings" in again.stderr, again.stderr
    without_timing = [
        {k: v for k, v in json.loads(p.stdout)["sets"][0].items() if k != "scoring"} for p in (first, again)
    ]
    assert without_timing[0] == without_timing[1]
    embedded = eval_cli("--embedded", str(keep / "faces"), "-o", "json")  # no model needed
    assert embedded.returncode == 0, embedded.stderr
    assert json.loads(embedded.stdout)["sets"][0]["protocols"] == without_timing[0]["protocols"]
    other = eval_cli(*args, "--no-flip")
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1, other.stderr
    assert "holds other embeddings (flip True there)" in other.stderr


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: b"\x00garbage", "not a pickle"),
        (lambda root: pickle.dumps(([b"x"] * 3, [True, False])), "3 images for 2 issame flags"),
        (lambda root: py2_bin([b"not a jpeg", b"nor this"], [True]), "image 0 does not decode"),
    ],
)
def test_a_bad_bin_is_one_line_and_exit_2(workspace, tmp_path, make, message):
    root, _ = workspace
    bad = tmp_path / "bad.bin"
    bad.write_bytes(make(root))
    proc = eval_cli(str(root / "backbone.pt"), "--bin", str(bad))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(bad) in lines[0], proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("{root}/nowhere", "--bin", "{root}/t.bin"), "no committed checkpoint"),
        (("{root}/t.bin", "--bin", "{root}/t.bin"), "not a torch.save file"),
        (("{root}/backbone.pt",), "nothing to evaluate"),
        (("{root}/backbone.pt", "--pairs", "{root}/faces={root}/missing.txt"), "no such pair list"),
        (("{root}/backbone.pt", "--pairs", "{root}/faces"), "DATA=LIST"),
    ],
)
def test_other_mistakes_are_one_line_and_exit_2(workspace, args, message):
    root, _ = workspace
    proc = eval_cli(*(a.format(root=root) for a in args))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


# -- periodic evaluation during training -------------------------------------------------------------------------------


def test_periodic_eval_emits_events_and_metrics(tmp_path, monkeypatch):
    import torch.distributed as dist
    from prometheus_client import REGISTRY

    from mfr.trainer.config import load_config
    from mfr.trainer.dist import init_distributed
    from mfr.trainer.loop import Trainer
    from mfr.trainer.progress import EVENTS_ENV

    events = tmp_path / "events.jsonl"
    monkeypatch.setenv(EVENTS_ENV, str(events))
    overrides = [*SMALL, "run.steps=5", "run.log_every=5", "eval.every_steps=2", f"run.output_dir={tmp_path}"]
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg, init_distributed("cpu"))
    seen = []
    evaluate = trainer.evaluate
    trainer.evaluate = lambda stage: seen.append((stage, trainer.step)) or evaluate(stage)
    try:
        trainer.fit()
    finally:
        dist.destroy_process_group()
    assert seen == [("step 2", 2), ("step 4", 4), ("trained", 5)]
    evals = [e for e in map(json.loads, events.read_text().splitlines()) if e["event"] == "eval"]
    assert [(e["stage"], e["step"]) for e in evals] == [("step 2", 2), ("step 4", 4), ("trained", 5)]
    supported = [p for p in evals[-1]["results"][0]["points"] if p["supported"]]
    assert supported
    for point in supported:  # the gauge holds the last evaluation
        value = REGISTRY.get_sample_value(
            "mfr_eval_tpr", {"rank": "0", "protocol": "unmasked-unmasked", "fpr": f"{point['target_fpr']:.0e}"}
        )
        assert value == point["tpr"]
