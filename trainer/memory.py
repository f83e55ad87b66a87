"""Peak memory of a training step, measured from torch's own allocator.

``mfrctl plan`` predicts the per-rank peak; this measures it, so the two can be
compared (tests/test_plan.py, benchmarks/bench_memory.py).  On CUDA the
caching allocator keeps the exact counter (``max_memory_allocated``).  On CPU
there is none, and RSS mixes in the interpreter, numpy and malloc's caching,
so the peak is rebuilt from the profiler's allocation events
(``profile_memory=True``): every allocation and free of torch's CPU allocator,
in order, summed.  Tracing starts before the ``Trainer`` is built, so the
parameters, DDP's gradient buckets and every other allocation that lives
through the step are counted; numpy arrays (data decoding) are not torch
allocations and stay out, as they would stay off a GPU.

A measuring tool beside the loop it measures, not part of a run: nothing on
the training path imports it.  It builds the real ``Trainer``, so it lives
(and breaks, if the loop changes) with it; the test and the benchmark, and
whoever calibrates ``mfrctl plan`` on another accelerator, import it from here.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from .config import TrainConfig
from .dist import DistEnv

_MEASURED = "mfr.memory.measured_step"


@dataclass(frozen=True)
class StepMemory:
    """Bytes held by this rank's allocator: before the measured step, and at its peak."""

    before_step: int
    peak: int


def _cpu_peak(prof: profile) -> tuple[int, int]:
    """(live bytes when the measured step began, the most live during it)."""
    events = prof.profiler.kineto_results.events()
    window = next(e for e in events if e.name() == _MEASURED)
    start, end = window.start_ns(), window.end_ns()
    allocations = sorted(
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = before = peak = 0
    for at, nbytes in allocations:
        if at > end:
            break
        if at >= start and not peak:
            before = peak = live
        live += nbytes
        if at >= start:
            peak = max(peak, live)
    return before, max(peak, before)


def measure_train_step(cfg: TrainConfig, env: DistEnv, warmup_steps: int = 1) -> StepMemory:
    """Build the ``Trainer`` for ``cfg`` and measure the peak of one ``train_step``.

    ``warmup_steps`` steps run first so that the optimizer state exists, as it
    does in every step but the first.  One batch is drawn and reused, so the
    input is counted once.
    """
    from .loop import Trainer  # the loop imports the data pipeline: only when measuring

    on_cuda = env.device.type == "cuda"
    tracing = contextlib.nullcontext() if on_cuda else profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    gc.collect()  # an earlier run's leftovers must not be freed (and counted) in this trace
    with tracing as prof:
        trainer = Trainer(cfg, env)
        images, labels = next(iter(trainer.data))
        images, labels = images.to(env.device), labels.to(env.device)
        for _ in range(warmup_steps):
            trainer.train_step(images, labels)
        if on_cuda:
            torch.cuda.synchronize(env.device)
            before = torch.cuda.memory_allocated(env.device)
            torch.cuda.reset_peak_memory_stats(env.device)
        with record_function(_MEASURED):
            trainer.train_step(images, labels)
        trainer.checkpointer.close()
        del trainer, images, labels
        gc.collect()  # freed while traced, so a later trace in this process starts clean
    if on_cuda:
        torch.cuda.synchronize(env.device)
        return StepMemory(before_step=before, peak=torch.cuda.max_memory_allocated(env.device))
    before, peak = _cpu_peak(prof)
    return StepMemory(before_step=before, peak=peak)
