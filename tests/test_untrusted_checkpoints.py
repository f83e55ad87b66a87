"""Checkpoints from a bucket others can write: no reader runs code from them (checkpoint_reader).

Two crafted checkpoints, each a committed ``step-N`` directory a reader would pick:
one whose ``.metadata`` unpickles to ``os.system``, one saved normally by ``dcp.save``
but holding a pickled ``os.system`` call under ``backbone.*`` and ``progress.step``.
Each payload would create a marker file; every reader (training's resume, ``mfrctl ckpt
inspect``, ``export``, ``eval``, the distillation teacher) must refuse both with one line
naming the file, and the marker must not exist.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

SMALL = [
    "head.num_classes=4",
    "data.images_per_identity=2",
    "data.batch_size=4",
    "data.num_workers=0",
    "eval.num_identities=2",
    "eval.images_per_identity=2",
    "eval.at_start=false",
    "metrics.enabled=false",
    "checkpoint.every_steps=null",
    "model.embedding_size=8",
    "run.steps=1",
    "optim.warmup_steps=0",
    "run.device=cpu",
]


class _RunsCode:
    """Unpickles to ``os.system("touch <marker>")``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _main(argv: list[str], capsys) -> tuple[int, str]:
    from mfr.trainer.__main__ import main

    code = main([a for s in argv for a in ("--set", s)])
    return code, capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``{"metadata": root, "entry": root}``: checkpoint roots whose newest committed step carries code."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    from mfr.trainer.__main__ import main

    base = tmp_path_factory.mktemp("crafted")
    good = base / "good"
    assert main([a for s in [*SMALL, f"run.output_dir={good}"] for a in ("--set", s)]) == 0
    step = good / "checkpoints" / "step-00000001"
    marker = base / "marker"

    in_metadata = base / "metadata" / "checkpoints"
    shutil.copytree(good / "checkpoints", in_metadata)
    (in_metadata / step.name / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))

    in_entry = base / "entry" / "checkpoints"
    state = _load_state_dict_from_keys(checkpoint_id=str(step))  # our own, just saved: tensors only
    state["backbone"]["extra"] = _RunsCode(marker)
    state["progress"]["step"] = _RunsCode(marker)
    dcp.save(state, checkpoint_id=str(in_entry / step.name), no_dist=True)
    shutil.copy(step / "COMMITTED", in_entry / step.name / "COMMITTED")
    assert not marker.exists()
    return {"metadata": in_metadata, "entry": in_entry, "marker": marker, "base": base}


@pytest.fixture
def crafted(checkpoints):
    """The crafted checkpoints, with no marker left by an earlier test."""
    checkpoints["marker"].unlink(missing_ok=True)
    return checkpoints


def _refused(code: int, err: str, crafted, kind: str) -> None:
    assert not crafted["marker"].exists(), f"the {kind} payload ran"
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"{crafted[kind]}/step-00000001/.metadata" in err and "refused" in err, err


@pytest.mark.parametrize("kind", ["metadata", "entry"])
def test_training_does_not_resume_from_a_checkpoint_that_carries_code(crafted, kind, tmp_path, capsys):
    root = crafted[kind]
    code, err = _main([*SMALL, f"run.output_dir={tmp_path}", f"checkpoint.uri={root}"], capsys)
    _refused(code, err, crafted, kind)
    assert [p.name for p in root.glob("step-*")] == ["step-00000001"]  # nothing trained, nothing saved


def _mfrctl(*args: str) -> tuple[int, str, str]:
    from typer.testing import CliRunner

    from mfr.ctl.main import app

    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr.strip()


@pytest.fixture(scope="module")
def gallery(checkpoints):
    """A folder of two identities, two photos each, for mfrctl eval."""
    from PIL import Image

    from mfr.trainer.data.synthetic import SyntheticFaces

    root = checkpoints["base"] / "gallery"
    faces = SyntheticFaces(num_identities=2, images_per_identity=2, seed=0)
    for i in range(2):
        (root / f"id{i}").mkdir(parents=True)
        for s in range(2):
            Image.fromarray(faces.render(i, s, masked=False)).save(root / f"id{i}" / f"{s}.png")
    return root


@pytest.mark.parametrize("kind", ["metadata", "entry"])
@pytest.mark.parametrize("command", ["inspect", "export", "eval"])
def test_mfrctl_refuses_a_checkpoint_that_carries_code(crafted, gallery, kind, command, tmp_path):
    root = str(crafted[kind])
    args = {
        "inspect": ["ckpt", "inspect", root],
        "export": ["export", root, "--out", str(tmp_path / "backbone.pt")],
        "eval": ["eval", root, "--gallery", str(gallery), "--no-flip", "--no-masks"],
    }[command]
    code, out, err = _mfrctl(*args)
    if command == "inspect" and kind == "entry":  # inspect reads no entry: it lists the pickled ones, unread
        assert code == 0 and not crafted["marker"].exists(), err
        tensors = json.loads(_mfrctl("ckpt", "inspect", root, "-o", "json")[1])["tensors"]
        assert tensors["progress.step"] == "pickled object (never loaded)" and tensors["head.weight"] == "4 x 8"
        return
    _refused(code, err, crafted, kind)
    assert not out and not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["metadata", "entry"])
def test_a_distillation_teacher_that_carries_code_is_refused(crafted, kind):
    from mfr.trainer.config import ConfigError, TeacherConfig
    from mfr.trainer.distill import load_teacher

    teacher = TeacherConfig(backbone="tiny", embedding_size=8, checkpoint=str(crafted[kind]))
    with pytest.raises(ConfigError) as refused:
        load_teacher(teacher)
    _refused(2, str(refused.value), crafted, kind)


def _metadata_of(calls: str) -> bytes:
    """A pickle that calls ``calls`` (``module.name``) with no arguments."""
    module, name = calls.rsplit(".", 1)
    return b"\x80\x04" + b"c" + f"{module}\n{name}\n".encode() + b")R."


@pytest.mark.parametrize(
    "calls",
    [
        "builtins.eval",
        "os.system",
        "torch.load",
        "collections.OrderedDict",
        "torch.distributed.checkpoint.filesystem.FileSystemReader",
    ],
)
def test_metadata_naming_any_other_class_is_refused_before_it_is_imported(calls):
    from mfr.trainer.checkpoint_reader import CheckpointRefused, parse_metadata

    with pytest.raises(CheckpointRefused, match=f"x/.metadata: refused, nothing loaded: it names {calls}"):
        parse_metadata(_metadata_of(calls), "x/.metadata")


def test_dense_sharded_and_dtensor_entries_written_by_dcp_save_are_read(single_process_group, tmp_path):
    """What torch 2.13 writes for the trainer's state: plain tensors, the head's ShardedTensor, the ZeRO
    backbone's DTensors, 0-dim counters; read back equal, and impossible metadata refused."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard as DShard
    from torch.distributed.tensor import distribute_tensor

    from mfr.trainer.checkpoint_reader import CheckpointRefused, load_tensors, parse_metadata, tensor_shapes

    rows = torch.arange(15.0).reshape(5, 3)
    sharded = init_from_local_shards([Shard(rows, ShardMetadata([0, 0], [5, 3], "rank:0/cpu"))], 5, 3)
    dtensor = distribute_tensor(
        torch.arange(8, dtype=torch.bfloat16).reshape(4, 2), init_device_mesh("cpu", (1,)), [DShard(0)]
    )
    state = {
        "backbone": {"w": dtensor, "n": torch.tensor(7)},
        "head": {"weight": sharded},
        "progress": {"step": torch.tensor(3)},
    }
    dcp.save(state, checkpoint_id=str(tmp_path / "ck"))
    assert tensor_shapes(str(tmp_path / "ck")) == {
        "backbone.n": "scalar",
        "backbone.w": "4 x 2",
        "head.weight": "5 x 3",
        "progress.step": "scalar",
    }
    loaded = load_tensors(str(tmp_path / "ck"), ("backbone", "head"))
    assert torch.equal(loaded["head"]["weight"], rows) and torch.equal(loaded["backbone"]["n"], torch.tensor(7))
    assert torch.equal(loaded["backbone"]["w"], dtensor.full_tensor()) and "progress" not in loaded

    metadata = (tmp_path / "ck" / ".metadata").read_bytes()
    md = parse_metadata(metadata, "ck")
    md.state_dict_metadata["head.weight"].size = torch.Size([5, 2**40])  # a 1.6 TB tensor from a 2 KB file
    with pytest.raises(CheckpointRefused, match=r"entry head.weight's chunks do not cover its \(5, 1099511627776\)"):
        parse_metadata(pickle.dumps(md), "ck")
    md = parse_metadata(metadata, "ck")
    md.state_dict_metadata["head.weight"].chunks[0].sizes = torch.Size([5, 2**40])
    with pytest.raises(CheckpointRefused, match=r"entry head.weight has a chunk outside its \(5, 3\) tensor"):
        parse_metadata(pickle.dumps(md), "ck")
    md = parse_metadata(metadata, "ck")
    next(iter(md.storage_data.values())).relative_path = "../../.aws/credentials"
    with pytest.raises(CheckpointRefused, match="points at '../../.aws/credentials', not a file of the checkpoint"):
        parse_metadata(pickle.dumps(md), "ck")
    subprocess.run(["truncate", "-s", "100", *map(str, (tmp_path / "ck").glob("*.distcp"))], check=True)
    with pytest.raises(CheckpointRefused, match="lies past the end of"):
        load_tensors(str(tmp_path / "ck"), ("backbone",))


def test_the_trainer_saves_tensors_only_and_the_grad_scaler_survivesas_tensors(checkpoints, tmp_path):
    """What mfr writes loads without unpickling anything: no pickled entry in a trainer's checkpoint, and the
    GradScaler state (fp16 on CUDA only, so not in that run) goes through DCP as 0-dim tensors, exactly."""
    import torch.distributed.checkpoint as dcp

    from mfr.trainer.checkpoint import as_numbers, as_tensors
    from mfr.trainer.checkpoint_reader import SafeLoadPlanner, SafeReader, tensor_shapes

    shapes = tensor_shapes(str(checkpoints["base"] / "good" / "checkpoints" / "step-00000001"))
    assert "pickled object (never loaded)" not in shapes.values()
    assert shapes["progress.step"] == shapes["progress.position"] == "scalar" and "rng.rank0.torch" in shapes

    saved = torch.amp.GradScaler("cpu", init_scale=2.0**13, growth_interval=7)
    saved.scale(torch.tensor(1.0))
    saved.update(4096.0)
    dcp.save({"scaler": as_tensors(saved.state_dict())}, checkpoint_id=str(tmp_path / "ck"), no_dist=True)
    state = {"scaler": as_tensors(torch.amp.GradScaler("cpu").state_dict())}
    dcp.load(state, storage_reader=SafeReader(str(tmp_path / "ck")), planner=SafeLoadPlanner(), no_dist=True)
    loaded = torch.amp.GradScaler("cpu")
    loaded.load_state_dict(as_numbers(state["scaler"]))
    assert (
        loaded.state_dict()
        == saved.state_dict()
        == {"scale": 4096.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 7, "_growth_tracker": 0}
    )
