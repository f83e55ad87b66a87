"""Sharded, asynchronous checkpoints of the whole training state, resumable on any world size.

One torch.distributed.checkpoint (DCP) directory per saved step, committed
by the protocol of ``storage``.  It holds:

- the backbone and its optimizer state (replicated: DCP writes them once;
  under ZeRO, DTensor shards under the same names, so a checkpoint moves
  between ``optim.zero`` settings and world sizes like any other);
- the head's class rows and their optimizer state, up to date (``row_optim``
  catches up lazily stepped rows first), each rank its own block
  with the block's global row offset, so that on load DCP hands every rank
  exactly the rows it owns in the *new* world (2 -> 3 ranks, 3 -> 1, ...);
- the step, the data position (world-size independent, see data.loader),
  the GradScaler, and per-rank RNG states.  RNG states are restored only on
  the same world size, where the run then continues bit for bit.

The head blocks are ShardedTensors, not DTensors: DTensor's ``Shard(0)``
can only describe torch.chunk's ceil-sized split, while the head uses the
balanced split of ``head.class_shard``; ShardedTensor carries explicit
offsets, and DCP still reshards it.

Saves run on their own gloo group (sharing the training group deadlocks),
at most one at a time; the loop waits only while the state is copied to host
memory.  A per-step agreement on a third small group makes every rank take
the same decision (save now, skip, stop for preemption) at the same step.
"""

from __future__ import annotations

import signal
import time
import uuid
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint.staging import AsyncStager

from . import metrics
from .config import ConfigError, TrainConfig
from .parallel import reshard
from .storage import CheckpointInfo, Storage, StorageError, step_dir

if TYPE_CHECKING:
    from .loop import Trainer

warnings.filterwarnings("ignore", message="Please use DTensor instead and we are deprecating ShardedTensor")

# DCP reports failures of any rank as CheckpointException, a BaseException.
_SAVE_ERRORS = (Exception, CheckpointException)
# Settings a checkpoint's tensors depend on: resuming with others is refused.
STRUCTURAL = ("model", "head.num_classes", "optim.name")
# ...except these: they change how the backbone runs, not its tensors.
NOT_STRUCTURAL = ("model.activation_checkpointing", "model.checkpoint_every")


class Preempted(RuntimeError):
    """SIGTERM: the state is checkpointed; exit 143 so the operator retries."""


def _rows(local: torch.Tensor, start: int, num_rows: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """This rank's rows ``[start, start + len(local))`` of a ``num_rows``-row matrix."""
    rank = dist.get_rank(group)
    meta = ShardMetadata(
        shard_offsets=[start] + [0] * (local.dim() - 1),
        shard_sizes=list(local.shape),
        placement=f"rank:{rank}/{local.device}",
    )
    return init_from_local_shards([Shard(local, meta)], num_rows, *local.shape[1:], process_group=group)


def _optimizer_slots(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """The optimizer's state tensors of ``param``; zero-filled ones before its first step
    (so a fresh optimizer has something for DCP to load into)."""
    state = optimizer.state[param]
    if state:
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if isinstance(optimizer, torch.optim.SGD):
        momentum = optimizer.param_groups[0]["momentum"]
        return {"momentum_buffer": torch.zeros_like(param)} if momentum else {}
    if isinstance(optimizer, torch.optim.AdamW):
        return {
            "step": torch.zeros((), dtype=torch.float32),
            "exp_avg": torch.zeros_like(param),
            "exp_avg_sq": torch.zeros_like(param),
        }
    raise TypeError(f"no checkpoint layout for {type(optimizer).__name__}")


def training_state(trainer: Trainer, with_rng: bool) -> dict[str, Any]:
    """The DCP state dict of ``trainer``: views of the live tensors (load writes in place)."""
    model, head, opt = trainer.backbone, trainer.head, trainer.optimizer
    reshard(model)  # ZeRO: parameters as the DTensor shards the optimizer state is keyed by
    opt.catch_up()  # head rows that SGD stepped lazily: every row and its momentum up to date (row_optim)
    names = {p: n for n, p in model.named_parameters()}
    head_slots = {
        k: _rows(v, head.start, head.num_classes, head.group) if v.shape == head.weight.shape else v
        for k, v in _optimizer_slots(opt, head.weight).items()
    }
    state: dict[str, Any] = {
        "backbone": model.state_dict(),
        "head": {"weight": _rows(head.weight.detach(), head.start, head.num_classes, head.group)},
        "optim": {
            "backbone": {names[p]: _optimizer_slots(opt, p) for p in model.parameters()},
            "head": {"weight": head_slots},
        },
        "progress": {"step": trainer.step, "nonfinite_in_a_row": trainer.nonfinite_in_a_row, **trainer.data.state_dict()},
    }
    if trainer.scaler.is_enabled():
        state["scaler"] = trainer.scaler.state_dict()
    projection = trainer.distillation.projection if trainer.distillation is not None else None
    if projection is not None:  # distillation's student->teacher projection, trained like the backbone
        state["distill"] = {"projection": projection.state_dict()}
        state["optim"]["distill"] = {n: _optimizer_slots(opt, p) for n, p in projection.named_parameters()}
    if with_rng:
        rng = {"torch": torch.get_rng_state(), "head_sampler": head.sampler.get_state()}
        if trainer.env.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(trainer.env.device)
        state["rng"] = {f"rank{trainer.env.rank}": rng}
    return state


def restore(trainer: Trainer, state: dict[str, Any]) -> None:
    """Finish a load: the tensors are already in place; set the rest."""
    model, head, opt = trainer.backbone, trainer.head, trainer.optimizer
    for name, p in model.named_parameters():
        if state["optim"]["backbone"][name]:
            opt.state[p] = dict(state["optim"]["backbone"][name])
    head_slots = {
        k: v.local_shards()[0].tensor if hasattr(v, "local_shards") else v
        for k, v in state["optim"]["head"]["weight"].items()
    }
    if head_slots:
        opt.state[head.weight] = head_slots
    for name, p in trainer.distillation.projection.named_parameters() if "distill" in state else ():
        if state["optim"]["distill"][name]:
            opt.state[p] = dict(state["optim"]["distill"][name])
    progress = state["progress"]
    trainer.step = int(progress["step"])
    trainer.nonfinite_in_a_row = int(progress["nonfinite_in_a_row"])
    trainer.data.load_state_dict(progress)
    if "scaler" in state:
        trainer.scaler.load_state_dict(state["scaler"])
    rng = state.get("rng", {}).get(f"rank{trainer.env.rank}")
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        head.sampler.set_state(rng["head_sampler"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], trainer.env.device)
    else:  # a new world: fresh, but reproducible, streams for this rank
        seed = trainer.cfg.run.seed
        torch.manual_seed(seed * 1_000_003 + trainer.step)
        head.sampler.manual_seed(seed * 1_000_003 + head.rank + 7919 + 104_729 * trainer.step)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_mismatch(saved: dict[str, Any], current: TrainConfig) -> tuple[list[str], list[str]]:
    """(structural differences that forbid a resume, other differences worth a note)."""
    old, new = _flatten(saved), _flatten(current.model_dump(mode="json"))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    describe = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed]
    structural = [
        d
        for k, d in zip(changed, describe)
        if any(k == s or k.startswith(s + ".") for s in STRUCTURAL) and k not in NOT_STRUCTURAL
    ]
    return structural, [d for d in describe if d not in structural]


def _root_cause(err: BaseException) -> BaseException:
    """The first real error inside DCP's CheckpointException (one per failed rank)."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        err = next(iter(failures.values()))
        if isinstance(err, tuple):  # (exception, traceback) on some versions
            err = err[0]
    while err.__cause__ is not None and not isinstance(err, OSError):
        err = err.__cause__
    return err


class HostStager(AsyncStager):
    """Copies the state to host buffers that are kept between saves.

    Staging is then a memcpy into warm pages instead of a fresh allocation
    page-faulted in every time (3-15x shorter stalls here).  torch's own
    caching stager insists on pinned memory, which needs a GPU.
    """

    _synchronize_after_execute = False

    def __init__(self, pin_memory: bool):
        self.pin_memory = pin_memory
        self.buffers: dict[str, Any] | None = None

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        if self.buffers is not None:
            try:
                return _copy_state_dict(state_dict, self.buffers)
            except (AssertionError, ValueError, RuntimeError):  # the state's layout changed: new buffers
                self.buffers = None
        self.buffers = _create_cpu_state_dict(state_dict, pin_memory=self.pin_memory)
        return _copy_state_dict(state_dict, self.buffers)

    def synchronize_staging(self) -> None:
        """Staging is a blocking copy: nothing to wait for."""

    def close(self) -> None:
        self.buffers = None


@dataclass
class _Save:
    step: int
    started: float
    future: Future | None  # None once done (a blocking save)


@dataclass(frozen=True)
class StepDecision:
    """What every rank agreed to do after a step."""

    stop: bool  # SIGTERM seen by some rank
    save: bool
    busy: bool  # a save is still in flight on some rank


class Checkpointer:
    """Saves, commits, retains and resumes checkpoints of one run."""

    def __init__(self, cfg: TrainConfig, trainer: Trainer):
        self.cfg, self.train_cfg, self.trainer = cfg.checkpoint, cfg, trainer
        self.env, self.progress = trainer.env, trainer.progress
        self.storage = Storage(cfg.checkpoint.resolved_uri(cfg.run.output_dir), cfg.checkpoint.storage_options,
                               cfg.checkpoint.retries)
        self.io_group = dist.new_group(backend="gloo")  # DCP's collectives, possibly on a background thread
        self.control_group = dist.new_group(backend="gloo")  # the per-step agreement, main thread only
        self.stager = HostStager(pin_memory=self.env.device.type == "cuda")
        self.pending: _Save | None = None
        self.last_saved_step: int | None = None  # written on every rank (the outcome is collective)
        self.clock = time.monotonic  # what save intervals are measured with (a test can step it)
        self.last_save_time = self.clock()
        self.last_duration: float | None = None
        self.stop_requested_at: float | None = None
        self.existing_steps: set[int] = set()  # step directories already in storage (known to every rank)
        self._label = {"rank": str(self.env.rank)}

    # -- signals and agreement ---------------------------------------------
    def install_sigterm_handler(self) -> None:
        def on_sigterm(signum, frame):
            if self.stop_requested_at is None:
                self.stop_requested_at = time.monotonic()

        signal.signal(signal.SIGTERM, on_sigterm)

    def _any(self, *flags: bool) -> list[bool]:
        """Element-wise OR over all ranks (a tiny CPU all-reduce)."""
        t = torch.tensor([float(f) for f in flags])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control_group)
        return [bool(v) for v in t]

    def decide(self, step: int) -> StepDecision:
        by_steps = self.cfg.every_steps is not None and step % self.cfg.every_steps == 0
        by_time = (
            self.cfg.every_minutes is not None and self.clock() - self.last_save_time >= 60 * self.cfg.every_minutes
        )
        busy = self.pending is not None and self.pending.future is not None and not self.pending.future.done()
        stop, due, busy = self._any(self.stop_requested_at is not None, by_steps or by_time, busy)
        return StepDecision(stop=stop, save=due, busy=busy)

    # -- saving -------------------------------------------------------------
    def after_step(self) -> None:
        """Called by the loop after every step: commit finished saves, start due ones, honour SIGTERM."""
        self.poll()
        step = self.trainer.step
        decision = self.decide(step)
        if decision.stop:
            self.save_for_preemption()
            raise Preempted(f"stopped by SIGTERM at step {step}")
        if not decision.save or step == self.last_saved_step:
            return
        if decision.busy:
            self.progress.log(f"checkpoint at step {step} skipped: the previous save is still being written")
            return
        self.save(blocking=not self.cfg.async_save)

    def save(self, blocking: bool) -> None:
        """Checkpoint the trainer's current step (every rank calls this at the same step)."""
        self.poll(wait=True)
        step, started = self.trainer.step, time.monotonic()
        self.last_save_time = self.clock()
        self._sync_buffers()
        if step in self.existing_steps and not self._clear_old(step):
            return
        try:
            writer = FsspecWriter(
                self.storage.join(step_dir(step)), sync_files=self.storage.is_local, **self.storage.options
            )
            state = training_state(self.trainer, with_rng=True)
            if blocking:
                dcp.save(state, storage_writer=writer, process_group=self.io_group)
                future = None
            else:
                future = dcp.async_save(
                    state, storage_writer=writer, process_group=self.io_group, async_stager=self.stager
                )
        except _SAVE_ERRORS as err:  # storage or staging failed: report, keep training
            self._failed(step, err)
            return
        metrics.CHECKPOINT_STALL_SECONDS.labels(**self._label).observe(time.monotonic() - started)
        self.pending = _Save(step, started, future)
        if future is None:
            self.poll(wait=True)

    def _clear_old(self, step: int) -> bool:
        """Remove a directory of the same step left by an earlier run (``resume: never``):
        its marker must never bless the new shards.  True when every rank may write."""
        error = None
        if self.env.is_main:
            try:
                self.storage.remove(step_dir(step))
            except StorageError as err:
                error = err
        (failed,) = self._any(error is not None)  # doubles as the barrier before anyone writes
        if failed:
            self._failed(step, error or StorageError("rank 0 could not clear the old directory"))
            return False
        self.existing_steps.discard(step)
        return True

    def poll(self, wait: bool = False, timeout: float | None = None) -> None:
        """Commit the save in flight once it is written (rank 0 writes the marker)."""
        pending = self.pending
        if pending is None:
            return
        if pending.future is not None:
            if not wait and not pending.future.done():
                return
            try:
                pending.future.result(timeout=timeout)
            except TimeoutError:
                return
            except _SAVE_ERRORS as err:
                self.pending = None
                self._failed(pending.step, err)
                return
        self.pending = None
        self.last_saved_step = pending.step
        if self.env.is_main:
            try:
                self._commit(pending)
            except StorageError as err:
                self._failed(pending.step, err)
                return
        self.last_duration = time.monotonic() - pending.started
        metrics.CHECKPOINT_SAVE_SECONDS.labels(**self._label).observe(self.last_duration)
        metrics.CHECKPOINT_LAST_SUCCESS.labels(**self._label).set(time.time())

    def _commit(self, pending: _Save) -> None:
        name = step_dir(pending.step)
        size = self.storage.retry(f"sizing {name}", lambda: self.storage.fs.du(self.storage.path(name)))
        self.storage.commit(
            pending.step,
            {"world_size": self.env.world_size, "bytes": int(size), "config": self.train_cfg.model_dump(mode="json")},
        )
        removed = self.storage.retain(self.cfg.keep, in_flight=None)
        metrics.CHECKPOINT_BYTES.labels(**self._label).set(size)
        took = time.monotonic() - pending.started
        self.progress.event("checkpoint", step=pending.step, url=self.storage.join(name), bytes=int(size), seconds=took)
        self.progress.log(
            f"checkpoint step {pending.step} committed to {self.storage.join(name)} "
            f"({size / 2**20:.1f} MiB, {took:.2f} s)" + (f"; removed {', '.join(removed)}" if removed else "")
        )

    def _failed(self, step: int, err: BaseException) -> None:
        cause = err if isinstance(err, StorageError) else _root_cause(err)
        message = str(cause) if isinstance(cause, StorageError) else self.storage.describe(cause)
        metrics.CHECKPOINT_FAILURES.labels(**self._label).inc()
        if self.env.is_main:
            self.progress.event("checkpoint_failed", step=step, message=message)
            print(f"[mfr] WARNING: checkpoint of step {step} failed, training continues: {message}", flush=True)

    def _sync_buffers(self) -> None:
        """Rank 0's BatchNorm statistics: what DDP broadcasts before the next forward anyway."""
        for buffer in self.trainer.backbone.buffers():
            dist.broadcast(buffer, src=0)

    def save_for_preemption(self) -> None:
        """Within ``preempt_budget_s`` of SIGTERM: finish the save in flight, then save this step."""
        deadline = (self.stop_requested_at or time.monotonic()) + self.cfg.preempt_budget_s
        self.poll(wait=True, timeout=max(0.0, deadline - time.monotonic()))
        step = self.trainer.step
        expected = self.last_duration or 0.0
        in_time = self.pending is None and time.monotonic() + expected < deadline
        (skip,) = self._any(not in_time)
        if step == self.last_saved_step:
            self.progress.log(f"SIGTERM: step {step} is already checkpointed; exiting 143")
        elif skip:
            self.progress.log(f"SIGTERM: no time left to checkpoint step {step} within the budget; exiting 143")
        else:
            self.save(blocking=True)
            self.progress.log(f"SIGTERM: checkpointed step {step}; exiting 143")

    def finish(self) -> None:
        """At the end of training: the final state is committed before the process exits."""
        self.poll(wait=True)
        if self.trainer.step != self.last_saved_step:
            self.save(blocking=True)

    # -- resuming -----------------------------------------------------------
    def _look(self) -> tuple[list[CheckpointInfo], set[int]]:
        """(committed checkpoints to try, newest first; steps that have a directory)."""
        found = self.storage.checkpoints()
        committed = [c for c in found if c.committed]
        newest = committed[-1].step if committed else -1
        for stale in (c for c in found if not c.committed and c.step > newest):
            self.progress.log(f"WARNING: skipping uncommitted checkpoint {stale.url} (an interrupted save); removing it")
            self.storage.remove(stale.name)
        existing = {c.step for c in found if c.committed or c.step <= newest}
        spec = self.cfg.resume
        if spec == "never":
            return [], existing
        if spec == "auto":
            return committed[::-1], existing
        root, _, name = spec.rstrip("/").rpartition("/")
        chosen = [c for c in Storage(root, self.cfg.storage_options, self.cfg.retries).checkpoints() if c.name == name]
        if not chosen or not chosen[0].committed:
            raise ConfigError(f"checkpoint.resume {spec} is not a committed checkpoint (see mfrctl ckpt ls {root})")
        return chosen, existing

    def _check_shared(self, probe: str) -> None:
        """A local checkpoint path must be one file system for every node: each rank
        writes only its own shards, so a pod-local disk would split (and lose) them."""
        (missing,) = self._any(self.storage.read_text(probe) is None)
        if self.env.is_main:
            self.storage.remove(probe)
        if missing:
            raise ConfigError(
                f"checkpoint.uri {self.storage.url} is not shared by all nodes (some cannot see a file rank 0 "
                "wrote there); use s3://... or a volume every pod mounts (ReadWriteMany)"
            )

    def resume(self) -> CheckpointInfo | None:
        """Load the newest usable committed checkpoint into the trainer, if there is one.

        Rank 0 looks at the storage and every rank gets its answer, so all
        take the same path (an error included).
        """
        answer: list[Any] = [None]
        probe = f".probe-{uuid.uuid4().hex}"
        if self.env.is_main:
            try:
                self.storage.make_root()
                if self.storage.is_local:
                    self.storage.write_text("written by rank 0 to check every node sees this path\n", probe)
                answer[0] = ("ok", (probe, self._look()))
            except (ConfigError, StorageError) as err:
                answer[0] = ("error", err)
        dist.broadcast_object_list(answer, src=0, group=self.control_group)
        kind, value = answer[0]
        if kind == "error":
            raise value
        probe, (candidates, self.existing_steps) = value  # rank 0's probe name: each rank drew its own
        if self.storage.is_local:
            self._check_shared(probe)
        for info in candidates:
            structural, notes = config_mismatch(info.config or {}, self.train_cfg)
            if structural:
                raise ConfigError(
                    f"checkpoint {info.url} was written for another model ({'; '.join(structural)}); "
                    "set checkpoint.uri to a new location or checkpoint.resume=never"
                )
            try:
                self._load(info)
            except _SAVE_ERRORS as err:  # a corrupt checkpoint: every rank sees DCP's collective error
                if self.env.is_main:
                    message = self.storage.describe(_root_cause(err))
                    self.progress.log(f"WARNING: cannot load {info.url} ({message}); trying an older checkpoint")
                continue
            self.last_saved_step = info.step
            self.progress.event("resume", step=info.step, url=info.url, from_world_size=info.world_size)
            self.progress.log(
                f"resumed from {info.url} at step {info.step} (saved by {info.world_size} ranks, now {self.env.world_size})"
                + (f"; changed settings: {', '.join(notes)}" if notes else "")
            )
            return info
        return None

    def _load(self, info: CheckpointInfo) -> None:
        same_world = info.world_size == self.env.world_size
        state = training_state(self.trainer, with_rng=same_world)
        reader = FsspecReader(info.url, **self.storage.options)
        dcp.load(state, storage_reader=reader, process_group=self.io_group)
        restore(self.trainer, state)

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed or has failed."""
        self.poll(wait=True)

    def close(self) -> None:
        self.wait()
        self.stager.close()
