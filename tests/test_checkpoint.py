"""Checkpoints: resharding on load, bit-for-bit resume, the commit protocol, S3.

Every test runs the real Trainer on real gloo processes and saves with
torch.distributed.checkpoint to a local directory or to a real S3 server
(SeaweedFS, started by the ``s3_server`` fixture).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.support.configs import CHECKPOINTED
from tests.support.distributed import run_distributed
from tests.support.training import full_matrix, make_trainer, snapshot, train, train_and_save


def _resume(rank, world, uri, overrides):
    trainer = make_trainer(rank, world, uri, overrides)
    info = trainer.checkpointer.resume()
    return {**snapshot(trainer), "resumed": None if info is None else info.step}


@pytest.mark.parametrize(("save_world", "load_world", "optimizer"), [(2, 1, "sgd"), (2, 3, "adamw"), (3, 2, "sgd")])
def test_head_rows_and_optimizer_state_land_on_their_new_owner(tmp_path, save_world, load_world, optimizer):
    uri = str(tmp_path / "ckpt")
    overrides = [f"optim.name={optimizer}"]
    saved = run_distributed(train_and_save, save_world, uri, overrides, 3)
    loaded = run_distributed(_resume, load_world, uri, overrides)

    weight = full_matrix(saved, lambda r: r["weight"])
    assert weight.shape == (11, 16)
    slots = saved[0]["head_state"].keys()
    assert slots == ({"momentum_buffer"} if optimizer == "sgd" else {"step", "exp_avg", "exp_avg_sq"})
    full_state = {k: full_matrix(saved, lambda r, k=k: r["head_state"][k]) for k in slots if k != "step"}
    assert any(bool(v.abs().sum()) for v in full_state.values())  # real state, not zeros

    owners = sorted(r["start"] for r in loaded)
    assert len(set(owners)) == load_world
    for r in loaded:
        rows = slice(r["start"], r["start"] + r["weight"].shape[0])
        assert r["resumed"] == 3 and r["step"] == 3
        assert torch.equal(r["weight"], weight[rows])
        for k, full in full_state.items():
            assert torch.equal(r["head_state"][k], full[rows]), k
        for name, tensor in saved[0]["backbone"].items():
            assert torch.equal(r["backbone"][name], tensor), name
        for name, state in saved[0]["backbone_state"].items():
            for k, v in state.items():
                assert torch.equal(r["backbone_state"][name][k], v), (name, k)
        assert r["data"] == saved[0]["data"]
    assert sum(r["weight"].shape[0] for r in loaded) == 11


def _straight_or_resumed(rank, world, uri, overrides, resume):
    """6 steps with a save after step 4, in one process or resumed from that save in a new one."""
    first = make_trainer(rank, world, uri, overrides)
    train(first, 4)
    first.checkpointer.save(first.step, blocking=True)
    if not resume:
        train(first, 2)
        return snapshot(first)
    del first
    second = make_trainer(rank, world, uri, overrides)
    assert second.checkpointer.resume().step == 4
    train(second, 2)
    return snapshot(second)


def test_resume_on_the_same_world_size_continues_bit_for_bit(tmp_path):
    """The resumed run continues exactly as the run that saved.  (A save brings the head's lazily
    stepped rows up to date, which rounds them once: bit for bit, a run that saved differs from one
    that did not, at rounding level.)"""
    # sample_rate < 1 so the head's class-sampling RNG must be restored too, and the rows step lazily
    overrides = ["head.sample_rate=0.5", "model.dropout=0.2"]
    straight = run_distributed(_straight_or_resumed, 2, str(tmp_path / "a"), overrides, False)
    resumed = run_distributed(_straight_or_resumed, 2, str(tmp_path / "b"), overrides, True)
    for a, b in zip(straight, resumed):
        assert b["step"] == a["step"] == 6 and b["data"] == a["data"]
        assert torch.equal(a["weight"], b["weight"])
        for name in a["backbone"]:
            assert torch.equal(a["backbone"][name], b["backbone"][name]), name
    # and the runs did train: the head moved away from its initialisation
    fresh = run_distributed(_resume, 2, str(tmp_path / "empty"), overrides)
    assert fresh[0]["resumed"] is None
    assert not torch.equal(fresh[0]["weight"], straight[0]["weight"])


class _DenseSGD(torch.optim.SGD):
    """The reference: torch's SGD stepping every head row every step (its sparse gradient made dense)."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    p.grad = p.grad.to_dense()
        return super().step(closure)

    def catch_up(self) -> None:
        """Nothing is ever behind."""


def _trainer_of_kind(rank, world, uri, overrides, kind):
    trainer = make_trainer(rank, world, uri, overrides)
    if kind == "dense":
        head = trainer.head
        trainer.optimizer = _DenseSGD(trainer.optimizer.param_groups)
        head.read_rows = lambda index: head.weight if index is None else head.weight[index]
    return trainer


def _lazy_and_dense(rank, world, uris, overrides, resume_from):
    """Per kind: train 4 steps and save; or resume from ``resume_from``, then train 2 more steps."""
    runs = {}
    for kind, uri in uris.items():
        trainer = _trainer_of_kind(rank, world, resume_from or uri, overrides, kind)
        if resume_from:
            assert trainer.checkpointer.resume().step == 4
            loaded = snapshot(trainer)
            train(trainer, 2)
            runs[kind] = {"loaded": loaded, "continued": snapshot(trainer)}
            continue
        train(trainer, 4)
        stored = trainer.head.weight.detach().clone()
        trainer.checkpointer.save(trainer.step, blocking=True)
        runs[kind] = {**snapshot(trainer), "stored_before_save": stored}
    return runs


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal to fp32 rounding, relative to the tensor's scale."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()), msg=what)


def test_lazily_stepped_rows_are_saved_up_to_date_and_resume_exactly_on_another_world_size(tmp_path):
    """SGD with class sampling steps the head's unsampled rows lazily.  The same run with torch's dense
    SGD is the reference: the checkpoint must hold its rows and momentum, and a resume on another world
    size must continue as it does."""
    # a small learning rate keeps the two fp32 runs within rounding of each other; a strong weight decay
    # makes a row that missed one step's decay differ by 5e-4 of its size
    overrides = [
        "head.num_classes=40",
        "head.sample_rate=0.25",
        "data.images_per_identity=2",
        "optim.lr=0.01",
        "optim.weight_decay=0.05",
    ]
    uris = {"lazy": str(tmp_path / "lazy"), "dense": str(tmp_path / "dense")}
    saved = run_distributed(_lazy_and_dense, 2, uris, overrides, None)
    resumed = run_distributed(_lazy_and_dense, 3, uris, overrides, uris["lazy"])

    def close(runs, expected, what):
        for key in ("weight", "momentum_buffer"):

            def value(r, key=key):
                return r["weight"] if key == "weight" else r["head_state"][key]

            _close(full_matrix(runs, value), full_matrix(expected, value), f"{what}: {key}")
        for name, tensor in expected[0]["backbone"].items():  # as in test_scale: rounding, through BN
            torch.testing.assert_close(runs[0]["backbone"][name], tensor, rtol=1e-4, atol=1e-5, msg=f"{what}: {name}")

    lazy = [r["lazy"] for r in saved]
    stale = full_matrix(lazy, lambda r: r["stored_before_save"])
    assert not torch.allclose(stale, full_matrix(lazy, lambda r: r["weight"]), rtol=1e-3, atol=0), (
        "some of the lazy run's rows were behind before the save (else this test proves nothing)"
    )
    assert sorted(r["lazy"]["loaded"]["start"] for r in resumed) == [0, 14, 27]
    close([r["lazy"]["loaded"] for r in resumed], [r["dense"] for r in saved], "checkpoint of the lazy run")
    close([r["lazy"]["continued"] for r in resumed], [r["dense"]["continued"] for r in resumed], "after the resume")


def _resume_error(rank, world, uri, overrides):
    from mfr.trainer.config import ConfigError

    try:
        _resume(rank, world, uri, overrides)
    except ConfigError as err:
        return str(err)
    return None


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("head.num_classes=12", "head.num_classes 11 -> 12"),
        ("model.embedding_size=32", "model.embedding_size 16 -> 32"),
    ],
)
def test_a_checkpoint_of_another_model_is_refused_with_the_mismatch_named(tmp_path, change, named):
    uri = str(tmp_path / "ckpt")
    run_distributed(train_and_save, 1, uri, [], 2)
    (message,) = run_distributed(_resume_error, 1, uri, [change])
    assert message is not None and named in message and uri in message
    # compatible changes are fine (and noted in the log)
    (ok,) = run_distributed(_resume, 1, uri, ["optim.lr=0.05", "run.steps=9"])
    assert ok["resumed"] == 2


def _save_steps(rank, world, uri, overrides, steps):
    """What Trainer.fit does: resume (per checkpoint.resume), then train and save."""
    trainer = make_trainer(rank, world, uri, overrides)
    trainer.checkpointer.resume()
    batches = iter(trainer.data)
    while trainer.step < steps:
        trainer.train_step(*next(batches))
        trainer.checkpointer.after_step(trainer.step)
    trainer.checkpointer.finish(
        trainer.step
    )  # the last step is saved even when its due save was skipped (one in flight)
    trainer.checkpointer.close()
    return trainer.step


def test_corrupt_and_uncommitted_checkpoints_are_skipped_for_the_previous_committed_one(tmp_path):
    from mfr.trainer.storage import MARKER, Storage

    root = tmp_path / "ckpt"
    run_distributed(
        _save_steps, 1, str(root), ["checkpoint.every_steps=2", "checkpoint.keep=5", "checkpoint.async_save=false"], 6
    )  # every due save is taken
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000002", "step-00000004", "step-00000006"]
    assert (root / "latest").read_text().strip() == "step-00000006"
    # step 6 committed but a shard lost; step 8 written but never committed
    next(iter((root / "step-00000006").glob("*.distcp"))).unlink()
    shutil.copytree(root / "step-00000004", root / "step-00000008")
    (root / "step-00000008" / MARKER).unlink()

    (resumed,) = run_distributed(_resume, 1, str(root), [])
    assert resumed["resumed"] == 4 and resumed["step"] == 4
    assert not (root / "step-00000008").exists()  # the interrupted save is cleaned up
    assert [c.step for c in Storage(str(root)).checkpoints() if c.committed] == [2, 4, 6]


def test_retention_keeps_the_newest_committed_and_never_the_one_in_flight(tmp_path):
    from mfr.trainer.storage import MARKER, Storage, step_dir

    storage = Storage(str(tmp_path))
    for step in (1, 2, 3, 4, 5, 6):
        (tmp_path / step_dir(step)).mkdir()
        (tmp_path / step_dir(step) / "__0_0.distcp").write_bytes(b"x" * step)
    for step in (1, 3, 4, 5):
        storage.commit(step, {"world_size": 2, "bytes": step})
    # 2: an old interrupted save; 6: the save being written now
    removed = storage.retain(keep=2, in_flight=6)
    assert sorted(removed) == ["step-00000001", "step-00000002", "step-00000003"]
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000004", "step-00000005", "step-00000006"]
    assert storage.latest_committed().step == 5
    assert not (tmp_path / step_dir(6) / MARKER).exists()
    assert storage.retain(keep=1) == ["step-00000004"]  # keep=1 still keeps the newest


def test_a_marker_is_what_makes_a_checkpoint_not_the_latest_pointer(tmp_path):
    from mfr.trainer.storage import Storage, step_dir

    storage = Storage(str(tmp_path))
    for step in (10, 20):
        (tmp_path / step_dir(step)).mkdir()
    storage.commit(10, {"world_size": 1})
    storage.write_text(step_dir(20) + "\n", "latest")  # a pointer to a directory without a marker
    assert storage.latest_committed().step == 10


# -- on a real S3 server ----------------------------------------------------


def test_save_on_two_ranks_to_s3_and_load_on_three(s3_env, tmp_path):
    uri = f"s3://mfr-test/{tmp_path.name}/reshard"
    saved = run_distributed(train_and_save, 2, uri, [], 2)
    loaded = run_distributed(_resume, 3, uri, [])
    weight = full_matrix(saved, lambda r: r["weight"])
    momentum = full_matrix(saved, lambda r: r["head_state"]["momentum_buffer"])
    for r in loaded:
        rows = slice(r["start"], r["start"] + r["weight"].shape[0])
        assert r["resumed"] == 2
        assert torch.equal(r["weight"], weight[rows])
        assert torch.equal(r["head_state"]["momentum_buffer"], momentum[rows])

    from mfr.trainer.storage import Storage

    (info,) = Storage(uri).checkpoints()
    assert info.committed and info.world_size == 2 and info.bytes > 0


def _train_through_outage(rank, world, uri, signals):
    """Save at steps 2, 4, 6; the parent stops S3 before 4's save and restarts it after."""
    from prometheus_client import REGISTRY

    os.environ["MFR_EVENTS_FILE"] = str(Path(signals) / "events.jsonl")
    trainer = make_trainer(rank, world, uri, ["checkpoint.every_steps=2", "checkpoint.retries=1"])
    batches = iter(trainer.data)

    def barrier_with_parent(name: str) -> None:
        torch.distributed.barrier()
        if rank == 0:
            (Path(signals) / name).touch()
            while not (Path(signals) / f"{name}.done").exists():
                time.sleep(0.05)
        torch.distributed.barrier()

    for step in range(1, 7):
        if step == 3:
            trainer.checkpointer.wait()  # step 2 is committed
            barrier_with_parent("stop")
        trainer.train_step(*next(batches))
        trainer.checkpointer.after_step(trainer.step)
        if step == 4:
            trainer.checkpointer.wait()  # the save of step 4 has failed by now
            barrier_with_parent("start")
    trainer.checkpointer.close()
    failures = REGISTRY.get_sample_value("mfr_checkpoint_failures_total", {"rank": str(rank)})
    return {"step": trainer.step, "failures": failures}


def test_training_survives_an_s3_outage_during_a_save(s3_env, tmp_path):
    uri = f"s3://mfr-test/{tmp_path.name}/outage"
    signals = tmp_path / "signals"
    signals.mkdir()

    def operate_server():
        for name, action in (("stop", s3_env.stop), ("start", s3_env.start)):
            while not (signals / name).exists():
                time.sleep(0.05)
            action()
            (signals / f"{name}.done").touch()

    operator = threading.Thread(target=operate_server, daemon=True)
    operator.start()
    results = run_distributed(_train_through_outage, 2, uri, str(signals))
    operator.join(timeout=5)

    assert [r["step"] for r in results] == [6, 6]
    assert [r["failures"] for r in results] == [1.0, 1.0]
    events = [json.loads(line) for line in (signals / "events.jsonl").read_text().splitlines()]
    (failed,) = [e for e in events if e["event"] == "checkpoint_failed"]
    assert failed["step"] == 4 and s3_env.endpoint in failed["message"]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [2, 6]

    from mfr.trainer.storage import Storage

    assert [(c.step, c.committed) for c in Storage(uri).checkpoints() if c.committed] == [(2, True), (6, True)]


def _trainer_cli(tmp_path: Path, env: dict[str, str], *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mfr.trainer", *[a for o in (*CHECKPOINTED, *overrides) for a in ("--set", o)]],
        env=os.environ | env | {"OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )


def test_wrong_credentials_are_a_clear_error_without_the_secret(s3_server, tmp_path):
    secret = "not-the-right-secret-4711"
    env = s3_server.env() | {"AWS_SECRET_ACCESS_KEY": secret}
    proc = _trainer_cli(tmp_path, env, "checkpoint.uri=s3://mfr-test/denied", "checkpoint.retries=1")
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("mfr: config error:") and s3_server.endpoint in line and "s3://mfr-test/denied" in line
    assert "Traceback" not in proc.stderr
    assert secret not in proc.stderr + proc.stdout


def test_an_unreachable_endpoint_is_retried_then_named(s3_server, tmp_path):
    from tests.support.s3server import free_ports

    (port,) = free_ports(1)
    env = s3_server.env() | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    started = time.monotonic()
    proc = _trainer_cli(tmp_path, env, "checkpoint.uri=s3://mfr-test/nowhere", "checkpoint.retries=2")
    assert proc.returncode == 129, proc.stderr[-2000:]  # the store may come back: the operator retries the pod
    line = proc.stderr.strip().splitlines()[-1]
    assert f"127.0.0.1:{port}" in line and "s3://mfr-test/nowhere" in line and "Traceback" not in proc.stderr
    assert time.monotonic() - started > 0.5 + 1.0  # two backoffs happened
    assert s3_server.env()["AWS_SECRET_ACCESS_KEY"] not in proc.stderr + proc.stdout


def test_credentials_in_the_config_are_refused(tmp_path):
    proc = _trainer_cli(tmp_path, {}, 'checkpoint.storage_options={"key": "AKIA", "secret": "shh"}')
    assert proc.returncode == 2
    assert "AWS_SECRET_ACCESS_KEY" in proc.stderr and "shh" not in proc.stderr


def test_a_fresh_run_replaces_an_old_checkpoint_of_the_same_step(tmp_path):
    root = tmp_path / "ckpt"
    run_distributed(_save_steps, 1, str(root), ["checkpoint.every_steps=2"], 2)
    (root / "step-00000002" / "__9_0.distcp").write_bytes(b"left over by the old run")
    run_distributed(
        _save_steps, 1, str(root), ["checkpoint.every_steps=2", "checkpoint.resume=never", "optim.lr=0.05"], 2
    )
    marker = json.loads((root / "step-00000002" / "COMMITTED").read_text())
    assert marker["config"]["optim"]["lr"] == 0.05  # committed by the new run, not the old marker
    assert not (root / "step-00000002" / "__9_0.distcp").exists()


def _timed_saves(rank, world, uri):
    trainer = make_trainer(rank, world, uri, ["checkpoint.every_minutes=1"])
    now = [0.0]
    trainer.checkpointer.clock = lambda: now[0]  # steps' wall time must not matter
    trainer.checkpointer.last_save_time = 0.0
    trainer.checkpointer.resume()
    batches = iter(trainer.data)
    # rank 1's clock runs 35 s ahead: when one rank finds a save due, all save
    for seconds in (30, 66, 90, 138):
        now[0] = seconds + 35 * rank
        trainer.train_step(*next(batches))
        trainer.checkpointer.after_step(trainer.step)
    trainer.checkpointer.close()


def test_saves_by_time_interval(tmp_path):
    root = tmp_path / "ckpt"
    run_distributed(_timed_saves, 2, str(root))
    from mfr.trainer.storage import Storage

    # step 1: due on rank 1 (65 s); 2: 36 s after; 3: 60 s after; 4: 48 s after
    assert [c.step for c in Storage(str(root)).checkpoints() if c.committed] == [1, 3]


def test_resume_setting_is_checked():
    from mfr.trainer.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="resume must be auto, never or a .../step-<N>"):
        load_config(None, ["checkpoint.resume=Auto"])
    assert load_config(None, ["checkpoint.resume=s3://b/run/checkpoints/step-00000100"]).checkpoint.resume


def _resume_on_own_disk(rank, world, root):
    # the same checkpoint.uri, but each "node" has its own disk: simulated by a directory per rank
    return _resume_error(rank, world, f"{root}/node-{rank}/ckpt", [])


def test_a_local_path_that_not_every_node_sees_is_refused(tmp_path):
    messages = run_distributed(_resume_on_own_disk, 2, str(tmp_path))
    assert all(m is not None and "is not shared by all nodes" in m for m in messages), messages
    assert not list(tmp_path.glob("node-0/ckpt/.probe-*"))  # the probe is cleaned up
