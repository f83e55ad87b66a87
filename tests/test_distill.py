"""Feature distillation: the loss, the frozen teacher, offline features by sample index, bad input."""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest
import torch

from mfr.trainer.config import load_config
from mfr.trainer.distill import FeatureWriter, TeacherFeatures, distillation_loss
from mfr.trainer.models import build_backbone
from tests.support.configs import SMALL
from tests.support.distributed import run_distributed

TEACHER = ["distill.teacher.backbone=r18", "distill.teacher.width=0.0625", "distill.teacher.embedding_size=24"]


def _save_teacher(root, step: int = 5):
    """A committed checkpoint holding an r18/24-d backbone, as the trainer lays it out."""
    import torch.distributed.checkpoint as dcp

    from mfr.trainer.storage import Storage, step_dir

    torch.manual_seed(1)
    model = build_backbone("r18", width=0.0625, embedding_size=24)
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model(torch.randn(4, 3, 112, 112))
    dcp.save({"backbone": model.state_dict()}, checkpoint_id=str(root / step_dir(step)), no_dist=True)
    model_cfg = {"backbone": "r18", "width": 0.0625, "embedding_size": 24}
    Storage(str(root)).commit(step, {"world_size": 1, "bytes": 0, "config": {"model": model_cfg}})
    return model.eval()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher") / "checkpoints"
    return root, _save_teacher(root)


def test_loss_matches_a_hand_computed_reference():
    student = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    teacher = torch.tensor([[0.0, 2.0], [5.0, 5.0]])
    # unit rows: (0.6, 0.8) vs (0, 1): 0.36 + 0.04 = 0.4;  (1, 0) vs (1, 1)/sqrt 2: 2 - sqrt 2
    expected = (0.4 + 2 - math.sqrt(2)) / 2
    assert float(distillation_loss(student, teacher)) == pytest.approx(expected, rel=1e-6)
    assert float(distillation_loss(student.bfloat16() * 7, teacher)) == pytest.approx(expected, rel=1e-2)


def test_online_step_trains_student_and_projection_only(teacher, tmp_path, single_process_group):
    from mfr.trainer.dist import DistEnv
    from mfr.trainer.loop import Trainer

    root, reference = teacher
    cfg = load_config(
        None,
        [
            *SMALL,
            *TEACHER,
            f"run.output_dir={tmp_path}",
            "distill.mode=online",
            f"distill.teacher.checkpoint={root}",
            "distill.alpha=0.25",
            "distill.weight=2",
        ],
    )
    trainer = Trainer(cfg, DistEnv(0, 0, 1, 1, 0, torch.device("cpu")))
    model = trainer.distillation.teacher.model
    teacher_state = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(teacher_state[k], v) for k, v in reference.state_dict().items()), "not the saved teacher"
    projection = trainer.distillation.projection
    assert projection is not None and projection.weight.shape == (24, 16)
    student = [p.detach().clone() for p in (*trainer.model.parameters(), projection.weight)]

    images, labels = next(iter(trainer.data))
    with torch.no_grad():  # the loss, independently: the head's margin loss and the teacher's embeddings
        head_loss = trainer.head(trainer.model(images), labels)
        distill = distillation_loss(projection(trainer.model(images)), reference(images))
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.train_step(images, labels)

    assert loss == pytest.approx(0.25 * float(head_loss) + 0.75 * 2 * float(distill), rel=1e-4)
    assert not model.training and all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(teacher_state[k], v) for k, v in model.state_dict().items()), "the teacher changed"
    after = [*trainer.model.parameters(), projection.weight]
    assert all(not torch.equal(b, a) for b, a in zip(student, after)), "student or projection did not train"

    trainer.checkpointer.save(trainer.step, blocking=True)  # the projection and its momentum are checkpointed ...
    trained = projection.weight.detach().clone()
    resumed = Trainer(cfg, DistEnv(0, 0, 1, 1, 0, torch.device("cpu")))
    assert not torch.equal(resumed.distillation.projection.weight, trained)
    resumed.checkpointer.resume()  # ... and come back on resume
    assert torch.equal(resumed.distillation.projection.weight, trained)
    assert torch.equal(
        resumed.optimizer.state[resumed.distillation.projection.weight]["momentum_buffer"],
        trainer.optimizer.state[projection.weight]["momentum_buffer"],
    )
    trainer.checkpointer.close()
    resumed.checkpointer.close()


def _signature(images: torch.Tensor) -> np.ndarray:
    """A few pixels of each image: what the test's 'teacher' embeds, to check rows against images."""
    return images.flatten(1)[:, ::4001].numpy()


def _read_in_order(rank: int, world: int, sources: list[tuple[list[str], str]]):
    from mfr.trainer.data.loader import EpochStream

    def check(stream, store, n):
        seen = []
        for _, (images, labels, indices) in zip(range(n), stream):
            rows, stored_labels = store.rows(indices.numpy())
            np.testing.assert_allclose(rows.astype(np.float32), _signature(images), atol=2e-3)
            assert np.array_equal(stored_labels, labels.numpy())
            seen.append(indices.tolist())
        return seen

    firsts = []
    for data_overrides, features in sources:
        cfg = load_config(None, [*SMALL, *data_overrides])
        store = TeacherFeatures(features)
        stream = EpochStream(cfg.data, cfg.head.num_classes, rank, world, with_indices=True)
        firsts.append(check(stream, store, 3))  # epoch 0 (2 global steps of 2 x 8 out of 32 samples) and into epoch 1
        state = stream.state_dict()
        later = check(stream, store, 2)
        stream.load_state_dict(state)  # back to the saved position (its workers have read on since)
        assert check(stream, store, 2) == later, "resume reads other rows"
    return firsts


def test_offline_rows_follow_the_samples_over_ranks_workers_and_resume(tmp_path):
    from mfr.trainer.data.loader import EpochStream
    from tests.support.datasets import samples, write_folder

    uri = write_folder(tmp_path / "faces", samples(32, 8))
    sources = [  # synthetic (items are indices) and a real source (items are epoch * size + index, unaugmented
        # here), read by 2 DataLoader workers
        ["data.num_workers=0"],
        ["data.num_workers=2", "data.source=folder", f"data.uri={uri}", "data.mask_prob=0", "data.flip=false"],
    ]
    stores = []
    for n, data in enumerate(sources):
        cfg = load_config(None, [*SMALL, *data, "data.num_workers=0"])
        dataset = EpochStream(cfg.data, cfg.head.num_classes, 0, 1).dataset
        store = str(tmp_path / f"features-{n}")
        size = _signature(torch.zeros(1, 3, 112, 112)).shape[1]
        writer = FeatureWriter(store, None, embedding_size=size, shard_rows=5)
        for i in range(len(dataset)):  # row i from sample i exactly as training sees it
            image, label, *_ = dataset[i]
            writer.add(_signature(image[None]), np.array([label]))
        writer.close({})
        stores.append(store)
    ranks = run_distributed(_read_in_order, 2, list(zip(sources, stores)))
    for source in range(len(sources)):
        epoch0 = [i for r in ranks for batch in r[source][:2] for i in batch]
        assert sorted(epoch0) == list(range(32)), "an epoch's indices are not every sample exactly once"


def _main(argv: list[str], capsys) -> tuple[int, str]:
    from mfr.trainer.__main__ import main

    code = main(argv)
    return code, capsys.readouterr().err.strip()


def test_trainer_rejects_a_teacher_of_another_architecture(teacher, tmp_path, capsys):
    root, _ = teacher
    sets = [
        *SMALL,
        f"run.output_dir={tmp_path}",
        "run.device=cpu",
        "distill.mode=online",
        f"distill.teacher.checkpoint={root}/step-00000005",
        "distill.teacher.backbone=r34",
        "distill.teacher.width=0.0625",
        "distill.teacher.embedding_size=24",
    ]
    code, err = _main([a for s in sets for a in ("--set", s)], capsys)
    assert code == 2
    assert len(err.splitlines()) == 1 and "config error" in err
    assert "backbone.stages.0.2.residual.0.weight is missing there" in err and '"backbone": "r18"' in err


def test_extract_writes_teacher_rows_then_offline_training_checks_them(teacher, tmp_path, capsys):
    from mfr.trainer.data.synthetic import SyntheticFaces, to_tensor

    root, reference = teacher
    out = tmp_path / "features"

    def extract(out, *sets):  # the mfrctl app in this process (torch is imported already)
        from typer.testing import CliRunner

        from mfr.ctl.main import app

        args = [
            "distill",
            "extract",
            "--teacher",
            str(root),
            "--out",
            str(out),
            "--shard-rows",
            "12",
            "-j",
            "0",
            "-o",
            "json",
            *[a for s in (*SMALL, *TEACHER, *sets) for a in ("--set", s)],
        ]
        result = CliRunner().invoke(app, args, catch_exceptions=False)
        return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)

    proc = extract(out)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["count"] == 32 and summary["shards"] == 3 and summary["teacher"]["step"] == 5
    faces = SyntheticFaces(8, 4, seed=0)
    picks = [0, 13, 31]  # identity 3 photo 1, etc.: unmasked, unmirrored
    with torch.no_grad():
        expected = reference(torch.stack([to_tensor(faces.render(i // 4, i % 4, masked=False)) for i in picks]))
    rows, labels = TeacherFeatures(str(out)).rows(np.array(picks))
    np.testing.assert_allclose(rows.astype(np.float32), expected.numpy(), rtol=1e-2, atol=1e-2)
    assert labels.tolist() == [0, 3, 7]

    mismatch = extract(tmp_path / "other", "distill.teacher.embedding_size=32")
    assert mismatch.returncode == 2 and len(mismatch.stderr.strip().splitlines()) == 1
    assert "backbone.head.3.weight is 24 x 1568 there, 32 x 1568 in the configured teacher" in mismatch.stderr

    offline = [
        *SMALL,
        *TEACHER,
        f"run.output_dir={tmp_path / 'run'}",
        "run.device=cpu",
        "run.steps=2",
        "distill.mode=offline",
        f"distill.features={out}",
    ]
    assert _main([a for s in offline for a in ("--set", s)], capsys)[0] == 0
    for wrong, named in (
        (["data.images_per_identity=3"], "images_per_identity 4 there, 3 here"),
        (["data.seed=1"], "seed 0 there, 1 here"),
    ):
        code, err = _main([a for s in [*offline, *wrong] for a in ("--set", s)], capsys)
        assert code == 2 and len(err.splitlines()) == 1 and named in err, err


def test_features_on_s3_read_back_by_index_in_any_order(s3_env):
    rng = np.random.default_rng(0)
    embeddings, labels = rng.standard_normal((23, 6)).astype(np.float16), rng.integers(0, 5, 23)
    writer = FeatureWriter("s3://mfr-test/distill/features", None, embedding_size=6, shard_rows=10)
    for start in range(0, 23, 7):  # added in blocks that straddle the shard boundaries
        writer.add(embeddings[start : start + 7], labels[start : start + 7])
    index = writer.close({"data": {"source": "synthetic"}})
    assert index["count"] == 23 and [s["rows"] for s in index["shards"]] == [10, 10, 3]
    store = TeacherFeatures("s3://mfr-test/distill/features")
    order = rng.permutation(23)
    rows, stored = store.rows(order)
    assert np.array_equal(rows, embeddings[order]) and np.array_equal(stored, labels[order])
