"""Sharded, asynchronous checkpoints of the whole training state, resumable on any world size.

One torch.distributed.checkpoint (DCP) directory per saved step, committed
by the protocol of ``storage``.  The checkpointer knows nothing of training:
it saves what a ``Stateful`` gives it and hands it back on resume.  The
trainer's state (``Trainer.state_dict``, top-level keys in ``checkpoint_reader``) holds:

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

Everything is a tensor: DCP pickles anything else, and a checkpoint is read
back through ``checkpoint_reader``, which never unpickles an entry.

The head blocks are ShardedTensors (``PartialFC.sharded``), not DTensors:
DTensor's ``Shard(0)`` can only describe torch.chunk's ceil-sized split, while
the head uses the balanced split of ``class_shard``; ShardedTensor carries
explicit offsets, and DCP still reshards it.

Saves run on their own gloo group (sharing the training group deadlocks),
at most one at a time; the loop waits only while the state is copied to host
memory.  A per-step agreement on a third small group makes every rank take
the same decision (save now, skip, stop for preemption) at the same step.
"""

from __future__ import annotations

import signal
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import AsyncStager

from . import metrics
from .checkpoint_reader import METADATA, CheckpointRefused, SafeLoadPlanner, SafeReader, flat_keys, refuse_pickled
from .config import ConfigError, TrainConfig
from .dist import DistEnv
from .progress import Progress, log
from .storage import CheckpointInfo, Storage, StorageError, step_dir

# DCP reports failures of any rank as CheckpointException, a BaseException.
_SAVE_ERRORS = (Exception, CheckpointException)
# Settings a checkpoint's tensors depend on: resuming with others is refused.
STRUCTURAL = ("model", "head.num_classes", "optim.name")
# ...except these: they change how the backbone runs, not its tensors.
NOT_STRUCTURAL = ("model.activation_checkpointing", "model.checkpoint_every")


class Preempted(RuntimeError):
    """SIGTERM: the state is checkpointed; exit 143 so the operator retries."""


class StopRequest:
    """The SIGTERM handler: notes when the signal came, and holds nothing else.

    A handler stays installed until the interpreter exits, and keeps alive
    whatever it refers to: were it a method of the checkpointer, the whole
    trainer (its process groups and their gloo threads) would outlive ``train``.
    """

    def __init__(self) -> None:
        self.at: float | None = None  # time.monotonic() of the first SIGTERM

    def __call__(self, signum, frame) -> None:
        if self.at is None:
            self.at = time.monotonic()


class Stateful(Protocol):
    """What the checkpointer saves and restores (torchtitan's convention): ``state_dict`` returns views of the
    live tensors, which DCP loads into in place; ``load_state_dict`` then sets whatever is not a tensor."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def as_tensors(values: dict[str, int | float]) -> dict[str, torch.Tensor]:
    """Numbers as 0-dim tensors (int64 or float64, exact): DCP would pickle them as they are."""
    for key, value in values.items():
        if not isinstance(value, (int, float)):
            raise TypeError(f"checkpoint value {key} is a {type(value).__name__}, not a number")
    return {k: torch.tensor(v, dtype=torch.float64 if isinstance(v, float) else torch.int64) for k, v in values.items()}


def as_numbers(values: dict[str, torch.Tensor]) -> dict[str, int | float]:
    return {k: v.item() for k, v in values.items()}


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

    def __init__(
        self, cfg: TrainConfig, env: DistEnv, state: Stateful, events: Progress, world_bound: tuple[str, ...] = ()
    ):
        """``state``: what is saved and resumed; its entries named in ``world_bound`` (per-rank RNG streams)
        are restored only on the world size that saved them.  ``events``: where commits and resumes are told."""
        self.cfg, self.train_cfg, self.env = cfg.checkpoint, cfg, env
        self.state, self.world_bound, self.progress = state, world_bound, events
        self.storage = Storage(
            cfg.checkpoint.resolved_uri(cfg.run.output_dir), cfg.checkpoint.storage_options, cfg.checkpoint.retries
        )
        self.io_group = dist.new_group(backend="gloo")  # DCP's collectives, possibly on a background thread
        self.control_group = dist.new_group(backend="gloo")  # the per-step agreement, main thread only
        self.stager = HostStager(pin_memory=self.env.device.type == "cuda")
        self.pending: _Save | None = None
        self.last_saved_step: int | None = None  # written on every rank (the outcome is collective)
        self.clock = time.monotonic  # what save intervals are measured with (a test can step it)
        self.last_save_time = self.clock()
        self.last_duration: float | None = None
        self.stop = StopRequest()
        self.existing_steps: set[int] = set()  # step directories already in storage (known to every rank)
        self._label = {"rank": str(self.env.rank)}

    # -- signals and agreement ---------------------------------------------
    def install_sigterm_handler(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)

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
        stop, due, busy = self._any(self.stop.at is not None, by_steps or by_time, busy)
        return StepDecision(stop=stop, save=due, busy=busy)

    # -- saving -------------------------------------------------------------
    def after_step(self, step: int) -> None:
        """Called by the loop after every step: commit finished saves, start due ones, honour SIGTERM."""
        self.poll()
        decision = self.decide(step)
        if decision.stop:
            self.save_for_preemption(step)
            raise Preempted(f"stopped by SIGTERM at step {step}")
        if not decision.save or step == self.last_saved_step:
            return
        if decision.busy:
            log.info(f"checkpoint at step {step} skipped: the previous save is still being written")
            return
        self.save(step, blocking=not self.cfg.async_save)

    def save(self, step: int, blocking: bool) -> None:
        """Checkpoint the state as of ``step`` (every rank calls this at the same step)."""
        self.poll(wait=True)
        started = time.monotonic()
        self.last_save_time = self.clock()
        if step in self.existing_steps and not self._clear_old(step):
            return
        try:
            writer = FsspecWriter(
                self.storage.join(step_dir(step)), sync_files=self.storage.is_local, **self.storage.options
            )
            state = self.state.state_dict()
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
        log.info(
            f"checkpoint step {pending.step} committed to {self.storage.join(name)} "
            f"({size / 2**20:.1f} MiB, {took:.2f} s)" + (f"; removed {', '.join(removed)}" if removed else "")
        )

    def _failed(self, step: int, err: BaseException) -> None:
        cause = err if isinstance(err, StorageError) else _root_cause(err)
        message = str(cause) if isinstance(cause, StorageError) else self.storage.describe(cause)
        metrics.CHECKPOINT_FAILURES.labels(**self._label).inc()
        if self.env.is_main:
            self.progress.event("checkpoint_failed", step=step, message=message)
            log.warning(f"checkpoint of step {step} failed, training continues: {message}")

    def save_for_preemption(self, step: int) -> None:
        """Within ``preempt_budget_s`` of SIGTERM: finish the save in flight, then save this step."""
        deadline = (self.stop.at or time.monotonic()) + self.cfg.preempt_budget_s
        self.poll(wait=True, timeout=max(0.0, deadline - time.monotonic()))
        expected = self.last_duration or 0.0
        in_time = self.pending is None and time.monotonic() + expected < deadline
        (skip,) = self._any(not in_time)
        if step == self.last_saved_step:
            log.info(f"SIGTERM: step {step} is already checkpointed; exiting 143")
        elif skip:
            log.info(f"SIGTERM: no time left to checkpoint step {step} within the budget; exiting 143")
        else:
            self.save(step, blocking=True)
            log.info(f"SIGTERM: checkpointed step {step}; exiting 143")

    def finish(self, step: int) -> None:
        """At the end of training: the state of the last ``step`` is committed before the process exits."""
        self.poll(wait=True)
        if step != self.last_saved_step:
            self.save(step, blocking=True)

    # -- resuming -----------------------------------------------------------
    def _look(self) -> tuple[list[CheckpointInfo], set[int]]:
        """(committed checkpoints to try, newest first; steps that have a directory)."""
        found = self.storage.checkpoints()
        committed = [c for c in found if c.committed]
        newest = committed[-1].step if committed else -1
        for stale in (c for c in found if not c.committed and c.step > newest):
            log.warning(f"skipping uncommitted checkpoint {stale.url} (an interrupted save); removing it")
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
        """Load the newest usable committed checkpoint into the state, if there is one.

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
            except CheckpointRefused:  # not a corrupt checkpoint: one that must not be read (see checkpoint_reader)
                raise
            except _SAVE_ERRORS as err:  # a corrupt checkpoint: every rank sees DCP's collective error
                if self.env.is_main:
                    cause = err if isinstance(err, StorageError) else _root_cause(err)
                    message = str(cause) if isinstance(cause, StorageError) else self.storage.describe(cause)
                    log.warning(f"cannot load {info.url} ({message}); trying an older checkpoint")
                continue
            self.last_saved_step = info.step
            self.progress.event("resume", step=info.step, url=info.url, from_world_size=info.world_size)
            log.info(
                f"resumed from {info.url} at step {info.step} "
                f"(saved by {info.world_size} ranks, now {self.env.world_size})"
                + (f"; changed settings: {', '.join(notes)}" if notes else "")
            )
            return info
        return None

    def _load(self, info: CheckpointInfo) -> None:
        """Every rank checks the metadata itself (``checkpoint_reader``), and all agree before DCP's collectives:
        a refusal anywhere stops every rank; an unreadable file anywhere makes every rank try an older one."""
        same_world = info.world_size == self.env.world_size
        state = self.state.state_dict()
        if not same_world:
            state = {k: v for k, v in state.items() if k not in self.world_bound}
        reader, error = None, None
        try:
            reader = SafeReader(info.url, self.cfg.storage_options)
            refuse_pickled(
                reader.metadata,
                flat_keys(state).__contains__,
                f"{info.url}/{METADATA}",
                "; a checkpoint of an older mfr cannot be resumed: set checkpoint.resume=never or a new checkpoint.uri",
            )
        except (CheckpointRefused, StorageError) as err:
            error = err
        refused, unreadable = self._any(isinstance(error, CheckpointRefused), error is not None)
        if refused:
            raise (
                error
                if isinstance(error, CheckpointRefused)
                else CheckpointRefused(f"{info.url}: refused by another rank")
            )
        if unreadable:
            raise error or StorageError(f"{info.url}/{METADATA}: unreadable on another rank")
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), process_group=self.io_group)
        self.state.load_state_dict(state)

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed or has failed."""
        self.poll(wait=True)

    def close(self) -> None:
        self.wait()
        self.stager.close()
