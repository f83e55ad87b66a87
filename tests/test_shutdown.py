"""The trainer's exit: no gloo thread of the run is left when ``train`` returns.

A gloo worker thread retires a collective after its caller has moved on, and
releasing the collective's tensors takes the GIL.  While process groups were
still alive when the interpreter finalized, a late worker could meet the
finalization: Python ends such a thread inside a noexcept destructor, and a
finished run aborted ("terminate called without an active exception",
SIGABRT, exit 1).  That needs a thread descheduled at the wrong moment
(benchmarks/stress_shutdown.py forces it with a timing hook); what rules it
out is checked here directly: every group, and so every gloo thread, is gone
before ``train`` returns, after a finished run and after an aborted one.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from mfr.trainer.__main__ import train
from mfr.trainer.config import load_config
from mfr.trainer.loop import Trainer, TrainingAborted
from tests.support.configs import ASYNC_SAVES

TINY = [*ASYNC_SAVES, "run.steps=4", "metrics.enabled=false"]


def _gloo_threads() -> set[int]:
    """Ids of this process's gloo threads (pt_gloo_runloop workers, gloo_tcp_loop transports)."""
    found = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            if (task / "comm").read_text().startswith(("pt_gloo", "gloo")):
                found.add(int(task.name))
        except OSError:  # the thread ended meanwhile
            pass
    return found


@pytest.fixture
def sigterm_handler_restored():
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_a_finished_and_an_aborted_run_leave_no_gloo_thread_behind(tmp_path, monkeypatch, sigterm_handler_restored):
    before = _gloo_threads()  # other tests' groups may still be alive
    during = []
    train_step = Trainer.train_step

    def recording(self, *batch):
        during.append(_gloo_threads() - before)
        return train_step(self, *batch)

    monkeypatch.setattr(Trainer, "train_step", recording)

    train(load_config(None, [*TINY, f"run.output_dir={tmp_path / 'finished'}"]))
    assert len(during) == 4 and all(during), "the run had no gloo threads to check"
    assert _gloo_threads() - before == set()

    during.clear()
    with pytest.raises(TrainingAborted):
        train(
            load_config(
                None, [*TINY, f"run.output_dir={tmp_path / 'aborted'}", "optim.lr=1e30", "run.max_nonfinite_steps=1"]
            )
        )
    assert during and all(during)
    assert _gloo_threads() - before == set()
