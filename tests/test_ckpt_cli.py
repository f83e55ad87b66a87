"""``mfrctl ckpt ls|inspect|export`` on checkpoints written by real gloo ranks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.distributed import run_distributed
from tests.test_checkpoint import _full, _train_and_save

MFRCTL = [sys.executable, "-m", "mfr.ctl.main", "ckpt"]


def ckpt(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([*MFRCTL, *args], capture_output=True, text=True, timeout=120, env=os.environ | (env or {}))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Step 2 saved by 2 ranks, plus an interrupted (uncommitted) step 3."""
    root = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    ranks = run_distributed(_train_and_save, 2, str(root), [], 2)
    shutil.copytree(root / "step-00000002", root / "step-00000003")
    (root / "step-00000003" / "COMMITTED").unlink()
    return root, ranks


def test_ls_shows_committed_and_interrupted_saves(saved):
    root, _ = saved
    proc = ckpt("ls", str(root), "-o", "json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [(r["step"], r["committed"], r["world_size"]) for r in rows] == [(2, True, 2), (3, False, None)]
    assert rows[0]["bytes"] > 0 and rows[0]["url"] == f"{root}/step-00000002"
    table = ckpt("ls", str(root))
    assert table.returncode == 0 and "yes (newest)" in table.stdout and "no" in table.stdout


def test_inspect_shows_the_record_config_and_merged_tensor_shapes(saved):
    root, _ = saved
    proc = ckpt("inspect", str(root), "-o", "json")  # the newest committed one
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["step"] == 2 and info["world_size"] == 2 and info["config"]["head"]["num_classes"] == 11
    assert info["tensors"]["head.weight"] == "11 x 16"  # both ranks' rows, one matrix
    assert info["tensors"]["optim.head.weight.momentum_buffer"] == "11 x 16"


def test_export_backbone_loads_into_a_fresh_model_and_head_rows_are_merged(saved, tmp_path):
    from mfr.trainer.models import build_backbone

    root, ranks = saved
    out = tmp_path / "backbone.pt"
    proc = ckpt("export", str(root), "--out", str(out), "-o", "json")
    assert proc.returncode == 0, proc.stderr
    model = build_backbone("tiny", embedding_size=16)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ranks[0]["backbone"][name]), name

    full = tmp_path / "full.pt"
    assert ckpt("export", f"{root}/step-00000002", "--out", str(full), "--head").returncode == 0
    exported = torch.load(full, weights_only=True)
    assert torch.equal(exported["head"]["weight"], _full(ranks, lambda r: r["weight"]))
    assert exported["backbone"].keys() == model.state_dict().keys()


def test_export_from_s3(s3_env, tmp_path):
    uri = f"s3://mfr-test/{tmp_path.name}/ckpt"
    ranks = run_distributed(_train_and_save, 2, uri, [], 1)
    out = tmp_path / "full.pt"
    proc = ckpt("export", uri, "--out", str(out), "--head")
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(torch.load(out, weights_only=True)["head"]["weight"], _full(ranks, lambda r: r["weight"]))
    listing = json.loads(ckpt("ls", uri, "-o", "json").stdout)
    assert [(r["step"], r["committed"]) for r in listing] == [(1, True)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("export", "{root}/step-00000003", "--out", "x.pt"), "is not committed"),
        (("export", "{root}", "--step", "7", "--out", "x.pt"), "no checkpoint of step 7"),
        (("inspect", "{root}/../nowhere"), "no committed checkpoint under"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(saved, tmp_path, args, message):
    root, _ = saved
    proc = ckpt(*(a.format(root=root) for a in args))
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
