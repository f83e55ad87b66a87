"""Memory switches: ZeRO (FSDP2), activation checkpointing, micro-batching, the seed's large backbones.

Each switch must leave training unchanged: same seed, real gloo ranks, the
real Trainer, the loss trajectory and final weights compared with the plain
DDP run.  ZeRO checkpoints are DTensor shards under the DDP names, resumable
on another world size and readable by ``mfrctl export``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.support.configs import SHARDED
from tests.support.distributed import run_distributed

BASE = [*SHARDED, "head.num_classes=12", "run.steps=8", "metrics.enabled=false"]


def _trainer(rank: int, world: int, overrides: list[str], uri: str = "unused"):
    from mfr.trainer.config import load_config
    from mfr.trainer.dist import DistEnv
    from mfr.trainer.loop import Trainer

    cfg = load_config(None, [*BASE, f"checkpoint.uri={json.dumps(uri)}", *overrides])
    return Trainer(cfg, DistEnv(rank, 0, world, world, 0, torch.device("cpu")))


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered if it is a DTensor shard."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _weights(trainer) -> dict:
    return {
        "backbone": {k: _full(v).detach().clone() for k, v in trainer.backbone.state_dict().items()},
        "head": trainer.head.weight.detach().clone(),
        "momentum": {
            n: _full(trainer.optimizer.state[p]["momentum_buffer"]).clone()
            for n, p in trainer.backbone.named_parameters()
        },
    }


def _trajectories(rank, world, configs, steps):
    runs = {}
    for name, overrides in configs.items():
        trainer = _trainer(rank, world, overrides)
        batches = iter(trainer.data)
        losses, norms = [], []
        for _ in range(steps):
            losses.append(trainer.train_step(*next(batches)))
            norms.append(trainer.last_grad_norm)
        runs[name] = {"losses": losses, "norms": norms, **_weights(trainer)}
    return runs


SWITCHES = {
    "zero2": ["optim.zero=2"],
    "zero3": ["optim.zero=3"],
    "ac_stage": ["model.activation_checkpointing=stage"],
    "ac_block2": ["model.activation_checkpointing=block", "model.checkpoint_every=2"],
    "zero3_ac_block": ["optim.zero=3", "model.activation_checkpointing=block"],
}


def test_each_switch_keeps_the_loss_trajectory_and_the_weights():
    runs = run_distributed(_trajectories, 2, {"plain": [], **SWITCHES}, 3)
    for rank_runs in runs:
        plain = rank_runs["plain"]
        assert all(math.isfinite(x) for x in plain["losses"])
        assert plain["losses"][-1] < plain["losses"][0]  # it trains: the comparison means something
        for name in SWITCHES:
            run = rank_runs[name]
            assert run["losses"] == pytest.approx(plain["losses"], rel=1e-5), name
            # the exact global norm: sharded DTensor gradients summed over ranks, not per rank
            assert run["norms"] == pytest.approx(plain["norms"], rel=1e-5), name
            torch.testing.assert_close(run["head"], plain["head"], rtol=1e-4, atol=1e-5, msg=name)
            for key, value in plain["backbone"].items():
                # BN running statistics too: recomputation must not count a batch twice
                torch.testing.assert_close(run["backbone"][key], value, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
            for key, value in plain["momentum"].items():
                torch.testing.assert_close(run["momentum"][key], value, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
    # every rank ends with the same full backbone (BN statistics are rank 0's only from the next forward on)
    for name in runs[0]:
        for key in runs[0][name]["momentum"]:
            assert torch.equal(runs[1][name]["backbone"][key], runs[0][name]["backbone"][key]), (name, key)


def _one_step_frozen_bn(rank, world, configs):
    runs = {}
    for name, overrides in configs.items():
        trainer = _trainer(rank, world, [*overrides, "data.batch_size=8", "head.sample_rate=1.0"])
        trainer.backbone.eval()  # frozen BN statistics: the only way micro-batches can be exact, see the test
        calls = []
        trainer.head.register_forward_hook(
            lambda mod, args, out, calls=calls: calls.append((args[0].shape[0], float(out)))
        )
        images, labels = next(iter(trainer.data))
        loss = trainer.train_step(images, labels)
        runs[name] = {"loss": loss, "norm": trainer.last_grad_norm, "calls": calls, **_weights(trainer)}
    return runs


def test_micro_batches_give_the_update_of_one_batch_k_times_larger():
    """k micro-batches accumulate the gradient of the whole batch, with the sharded head on each.

    Exact only where the loss of the batch is the mean of the micro-batches'
    losses: training-mode BatchNorm normalises each micro-batch with its own
    statistics (a different function of the batch), so BN runs in eval mode
    (fixed statistics) here, and the head keeps every class (sample_rate 1;
    sampling draws fresh negatives per micro-batch).  Dropout is 0.
    """
    configs = {
        "one": [],
        "micro4": ["optim.micro_batches=4"],
        "micro2_zero2": ["optim.micro_batches=2", "optim.zero=2"],
        "micro4_zero3": ["optim.micro_batches=4", "optim.zero=3"],
    }
    runs = run_distributed(_one_step_frozen_bn, 2, configs)
    for rank_runs in runs:
        one = rank_runs["one"]
        assert one["calls"] == [(8, pytest.approx(one["loss"]))]
        for name, micro in (("micro4", 4), ("micro2_zero2", 2), ("micro4_zero3", 4)):
            run = rank_runs[name]
            # the head ran once per micro-batch, on this rank's share of it
            assert [size for size, _ in run["calls"]] == [8 // micro] * micro, name
            assert run["loss"] == pytest.approx(one["loss"], rel=1e-5), name
            assert run["norm"] == pytest.approx(one["norm"], rel=1e-5), name
            torch.testing.assert_close(run["head"], one["head"], rtol=1e-5, atol=1e-6, msg=name)
            for key, value in one["backbone"].items():
                torch.testing.assert_close(run["backbone"][key], value, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
    # each micro-batch's loss is the global one: the head's collectives paired the same micro-batch on every rank
    for name in configs:
        assert [loss for _, loss in runs[0][name]["calls"]] == [loss for _, loss in runs[1][name]["calls"]], name


def _save_zero(rank, world, uri, overrides, steps):
    trainer = _trainer(rank, world, overrides, uri)
    batches = iter(trainer.data)
    for _ in range(steps):
        trainer.train_step(*next(batches))
    trainer.checkpointer.save(trainer.step, blocking=False)
    trainer.checkpointer.close()
    return _full_state(trainer)


def _full_state(trainer) -> dict:
    opt = trainer.optimizer
    return {
        "step": trainer.step,
        "backbone": {k: _full(v).detach().clone() for k, v in trainer.backbone.state_dict().items()},
        "slots": {
            n: {k: _full(v).clone() for k, v in opt.state[p].items()} for n, p in trainer.backbone.named_parameters()
        },
    }


def _resume_zero(rank, world, uri, overrides):
    ddp = _trainer(rank, world, [o for o in overrides if not o.startswith("optim.zero")], uri)
    assert ddp.checkpointer.resume() is not None
    trainer = _trainer(rank, world, overrides, uri)
    assert trainer.checkpointer.resume() is not None
    resumed = {**_full_state(trainer), "ddp": _full_state(ddp)}
    params = dict(trainer.backbone.named_parameters())
    resumed["local"] = {n: p.to_local().clone() for n, p in params.items()}
    resumed["local_slots"] = {
        n: {k: v.to_local().clone() for k, v in trainer.optimizer.state[p].items() if hasattr(v, "to_local")}
        for n, p in params.items()
    }
    batches = iter(trainer.data)
    resumed["next_loss"] = trainer.train_step(*next(batches))  # and training goes on from there
    return resumed


def test_zero_checkpoint_saved_on_two_ranks_resumes_on_three_with_its_rows(tmp_path):
    """ZeRO-2 on 2 ranks -> ZeRO-3 and DDP on 3; and ``mfrctl export`` reads it."""
    from mfr.trainer.checkpoint_reader import load_tensors
    from mfr.trainer.models import build_backbone
    from mfr.trainer.storage import Storage

    uri = str(tmp_path / "ckpt")
    saved = run_distributed(_save_zero, 2, uri, ["optim.zero=2", "optim.name=adamw"], 3)[0]
    loaded = run_distributed(_resume_zero, 3, uri, ["optim.zero=3", "optim.name=adamw"])

    for rank, r in enumerate(loaded):
        assert r["step"] == 3 and math.isfinite(r["next_loss"])
        for layout in (r, r["ddp"]):  # into ZeRO-3 and into DDP (optim.zero=0)
            for name, tensor in saved["backbone"].items():
                assert torch.equal(layout["backbone"][name], tensor), name
            for name, slots in saved["slots"].items():
                assert slots.keys() == {"step", "exp_avg", "exp_avg_sq"}
                for k, v in slots.items():
                    assert torch.equal(layout["slots"][name][k], v), (name, k)
        # rank r holds rows [r*ceil(n/3), ...) of every parameter and of its Adam moments (dim-0 shards)
        for name, local in r["local"].items():
            full = saved["backbone"][name]
            per_rank = -(-full.shape[0] // 3)
            rows = slice(rank * per_rank, min(full.shape[0], (rank + 1) * per_rank))
            assert torch.equal(local, full[rows]), name
            assert torch.equal(r["local_slots"][name]["exp_avg"], saved["slots"][name]["exp_avg"][rows]), name

    # the same names as a DDP checkpoint: export reads it, and a plain iResNet loads it
    info = Storage(uri).latest_committed()
    exported = load_tensors(info.url, ("backbone",))["backbone"]
    plain = build_backbone("tiny", embedding_size=16)
    assert exported.keys() == plain.state_dict().keys()
    plain.load_state_dict(exported)
    for name, tensor in saved["backbone"].items():
        assert torch.equal(exported[name], tensor), name


def test_zero_without_a_distributed_run_is_a_config_error(single_process_group, tmp_path):
    from mfr.trainer.config import ConfigError, load_config
    from mfr.trainer.dist import DistEnv
    from mfr.trainer.loop import Trainer

    cfg = load_config(None, [*BASE, "optim.zero=2", f"run.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"optim\.zero 2 .* world size is 1"):
        Trainer(cfg, DistEnv(0, 0, 1, 1, 0, torch.device("cpu")))


def test_recomputation_counts_each_batch_once_in_batchnorm():
    from mfr.trainer.models import build_backbone

    images = torch.randn(3, 3, 112, 112)
    results = {}
    for mode in ("none", "stage", "block"):
        torch.manual_seed(0)
        model = build_backbone("tiny", embedding_size=8, activation_checkpointing=mode, checkpoint_every=3)
        out = model(images)
        out.square().sum().backward()
        results[mode] = (out, dict(model.named_buffers()), {n: p.grad for n, p in model.named_parameters()})
    plain_out, plain_buffers, plain_grads = results["none"]
    assert int(plain_buffers["stem.1.num_batches_tracked"]) == 1
    for mode in ("stage", "block"):
        out, buffers, grads = results[mode]
        torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
        for name, value in plain_buffers.items():
            torch.testing.assert_close(buffers[name], value, rtol=0, atol=0, msg=f"{mode} {name}")
        for name, value in plain_grads.items():
            torch.testing.assert_close(grads[name], value, rtol=1e-6, atol=1e-7, msg=f"{mode} {name}")


@pytest.mark.parametrize("name", ["r240", "r1200"])
def test_the_seeds_large_backbones_train_and_checkpoint_at_a_small_width(name, tmp_path):
    """The real depths at 1/32 width (2-16 channels): full width is for GPUs.

    Full-width parameter counts are checked on the meta device in
    test_models; r600 differs from these two only in its depths (checked
    below).  The DCP round trip is r240's, the student's (2185 tensors):
    r1200's ~11k would add 15-20 s on 2 CPU cores.
    """
    import torch.distributed.checkpoint as dcp

    from mfr.trainer.config import BACKBONE_DEPTHS
    from mfr.trainer.models import build_backbone

    torch.manual_seed(0)
    model = build_backbone(name, width=1 / 32, embedding_size=8, activation_checkpointing="block", checkpoint_every=8)
    assert [len(stage) for stage in model.stages] == list(BACKBONE_DEPTHS[name])
    out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 8)
    out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    if name != "r240":
        return

    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path), no_dist=True)
    torch.manual_seed(1)
    restored = build_backbone(name, width=1 / 32, embedding_size=8)
    assert not torch.equal(restored.stem[0].weight, model.stem[0].weight)
    loaded = restored.state_dict()
    dcp.load(loaded, checkpoint_id=str(tmp_path), no_dist=True)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_large_backbones_are_the_seeds_depths():
    from mfr.trainer.config import BACKBONE_DEPTHS, load_config
    from mfr.trainer.models import build_backbone, count_parameters

    assert BACKBONE_DEPTHS["r240"] == (3, 25, 88, 3)
    assert BACKBONE_DEPTHS["r600"] == (3, 70, 220, 3)
    assert BACKBONE_DEPTHS["r1200"] == (3, 80, 512, 3)
    for name in ("r240", "r600", "r1200"):
        assert load_config(None, [f"model.backbone={name}"]).model.backbone == name
    with torch.device("meta"):
        sizes = {name: count_parameters(build_backbone(name)) for name in ("r100", "r240", "r1200")}
    assert sizes["r100"] < sizes["r240"] < sizes["r1200"]
