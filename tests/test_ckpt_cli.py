"""``mfrctl ckpt ls|inspect`` and ``mfrctl export`` on checkpoints written by real gloo ranks."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from tests.support.cli import MFRCTL
from tests.support.distributed import run_distributed
from tests.support.training import full_matrix, train_and_save


def mfrctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MFRCTL, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Step 2 saved by 2 ranks, plus an interrupted (uncommitted) step 3."""
    root = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    ranks = run_distributed(train_and_save, 2, str(root), [], 2)
    shutil.copytree(root / "step-00000002", root / "step-00000003")
    (root / "step-00000003" / "COMMITTED").unlink()
    return root, ranks


def test_ls_shows_committed_and_interrupted_saves(saved):
    root, _ = saved
    proc = mfrctl("ckpt", "ls", str(root), "-o", "json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [(r["step"], r["committed"], r["world_size"]) for r in rows] == [(2, True, 2), (3, False, None)]
    assert rows[0]["bytes"] > 0 and rows[0]["url"] == f"{root}/step-00000002"
    table = mfrctl("ckpt", "ls", str(root))
    assert table.returncode == 0 and "yes (newest)" in table.stdout and "no" in table.stdout


def test_inspect_shows_the_record_config_and_merged_tensor_shapes(saved):
    root, _ = saved
    proc = mfrctl("ckpt", "inspect", str(root), "-o", "json")  # the newest committed one
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["step"] == 2 and info["world_size"] == 2 and info["config"]["head"]["num_classes"] == 11
    assert info["tensors"]["head.weight"] == "11 x 16"  # both ranks' rows, one matrix
    assert info["tensors"]["optim.head.weight.momentum_buffer"] == "11 x 16"


def test_export_torch_backbone_loads_into_a_fresh_model_and_head_rows_are_merged(saved, tmp_path):
    from mfr.trainer.models import build_backbone

    root, ranks = saved
    out = tmp_path / "backbone.pt"  # .pt: the torch format without --format
    proc = mfrctl("export", str(root), "--out", str(out), "-o", "json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["format"] == "torch"
    model = build_backbone("tiny", embedding_size=16)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ranks[0]["backbone"][name]), name

    full = tmp_path / "full.bin"
    assert mfrctl("export", f"{root}/step-00000002", "--out", str(full), "--format", "torch", "--head").returncode == 0
    exported = torch.load(full, weights_only=True)
    assert torch.equal(exported["head"]["weight"], full_matrix(ranks, lambda r: r["weight"]))
    assert exported["backbone"].keys() == model.state_dict().keys()


def _embeddings_agree(onnx_model: bytes, backbone_state: dict) -> float:
    """Max |onnxruntime - torch| on synthetic faces, torch being a fresh tiny backbone holding ``backbone_state``."""
    import onnxruntime

    from mfr.trainer.data.synthetic import SyntheticFaces, to_tensor
    from mfr.trainer.models import build_backbone

    model = build_backbone("tiny", embedding_size=16)
    model.load_state_dict(backbone_state)
    faces = SyntheticFaces(num_identities=3, images_per_identity=1, seed=5, identity_offset=100)
    images = torch.stack([to_tensor(faces.render(i, 0, masked=i == 1)) for i in range(3)])
    with torch.no_grad():
        expected = model.eval()(images)
    got = onnxruntime.InferenceSession(onnx_model, providers=["CPUExecutionProvider"]).run(
        None, {"images": images.numpy()}
    )
    return float((torch.from_numpy(got[0]) - expected).abs().max())


def test_export_onnx_end_to_end(saved, tmp_path):
    import onnx

    root, ranks = saved
    out = tmp_path / "model.onnx"
    proc = mfrctl("export", str(root), "--out", str(out), "-o", "json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["format"] == "onnx" and summary["step"] == 2 and summary["opset"] == 20
    assert set(summary["max_abs_diff"]) == {"random", "synthetic faces"}
    assert all(0 <= d < 1e-4 for d in summary["max_abs_diff"].values())

    model_bytes = out.read_bytes()
    assert summary["bytes"] == len(model_bytes)
    assert _embeddings_agree(model_bytes, ranks[0]["backbone"]) < 1e-4
    meta = {p.key: p.value for p in onnx.load_from_string(model_bytes).metadata_props}
    assert meta["embedding_size"] == "16" and meta["step"] == "2" and meta["opset"] == "20"
    assert meta["input"] == "images: float32 N x 3 x 112 x 112" and "(pixel / 255 - 0.5) / 0.5" in meta["normalisation"]
    assert meta["source"] == f"{root}/step-00000002"


def test_export_onnx_that_disagrees_with_torch_exits_1_and_writes_nothing(saved, tmp_path, monkeypatch):
    """A folding bug (here: one embedding bias off by 1e-3) must stop the export."""
    from typer.testing import CliRunner

    from mfr.ctl.main import app
    from mfr.trainer import export

    fold = export.fold_batchnorm

    def broken_fold(model):
        folded = fold(model)
        with torch.no_grad():
            folded.head[3].bias[0] += 1e-3
        return folded

    monkeypatch.setattr(export, "fold_batchnorm", broken_fold)
    out = tmp_path / "model.onnx"
    result = CliRunner().invoke(app, ["export", str(saved[0]), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "differs from the torch model by 0.001" in result.output and "nothing written" in result.output
    assert not out.exists()


def test_export_from_s3_to_s3(s3_env, tmp_path):
    import fsspec

    from mfr.trainer.storage import fsspec_options

    uri = f"s3://mfr-test/{tmp_path.name}/ckpt"
    ranks = run_distributed(train_and_save, 2, uri, [], 1)
    out = f"s3://mfr-test/{tmp_path.name}/export/full.pt"
    proc = mfrctl("export", uri, "--out", out, "--head")
    assert proc.returncode == 0, proc.stderr
    with fsspec.open(out, "rb", **fsspec_options(out, None)) as f:
        exported = torch.load(f, weights_only=True)
    assert torch.equal(exported["head"]["weight"], full_matrix(ranks, lambda r: r["weight"]))
    listing = json.loads(mfrctl("ckpt", "ls", uri, "-o", "json").stdout)
    assert [(r["step"], r["committed"]) for r in listing] == [(1, True)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("export", "{root}/step-00000003", "--out", "{tmp}/x.onnx"), "is not committed"),
        (("export", "{root}", "--step", "7", "--out", "{tmp}/x.pt"), "no checkpoint of step 7"),
        (("export", "{root}", "--out", "{tmp}/no/such/dir/x.onnx"), "does not exist; create it first"),
        (("export", "{root}", "--out", "{tmp}"), "is a directory"),
        (("export", "{root}", "--out", "{tmp}/x.onnx", "--head"), "--head needs --format torch"),
        (("ckpt", "inspect", "{root}/../nowhere"), "no committed checkpoint under"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(saved, tmp_path, args, message):
    root, _ = saved
    proc = mfrctl(*(a.format(root=root, tmp=tmp_path) for a in args))
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())
