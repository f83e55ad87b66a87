"""A pod's exit codes, and which of them the operator retries.

Under ``restartPolicy: ExitCode`` the Kubeflow training operator (v1.9,
``IsRetryableExitCode``) fails the whole job on a code from 1 to 127 and
deletes and recreates the pod on 128 or more; the recreated pods resume from
the newest committed checkpoint.  So a mistake that a restart cannot fix
must exit below 128, and everything a restart can fix at or above it.
Torch-free: ``mfrctl train`` applies the same rule to its emulated pods.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

DONE = 0
ABORTED = 1  # the run failed (non-finite loss, a crash): permanent
CONFIG_ERROR = 2  # bad config, data or credentials: permanent
# 128 + SIGHUP: a peer, the rendezvous or the checkpoint store went away or
# could not be reached.  The pod itself is fine; the job restarts and resumes.
UNAVAILABLE = 128 + signal.SIGHUP
PREEMPTED = 128 + signal.SIGTERM  # 143: SIGTERM, after the state is checkpointed


def retryable(code: int) -> bool:
    """Does the operator restart a pod that exited with ``code``?"""
    return code >= 128


def from_signal(signum: int) -> int:
    """A shell's exit code for a process killed by ``signum`` (137 for SIGKILL)."""
    return 128 + signum


def describe(code: int) -> str:
    """``137 (SIGKILL, retryable)``, ``2 (config error, permanent)``: for one-line reports."""
    names = {ABORTED: "training aborted", CONFIG_ERROR: "config error", UNAVAILABLE: "peer or store unavailable"}
    if code in names:
        what = names[code]
    elif code > 128 and code - 128 in signal.Signals._value2member_map_:
        what = signal.Signals(code - 128).name
    else:
        what = "exit"
    return f"{code} ({what}, {'retryable' if retryable(code) else 'permanent'})"


def guarded(main: Callable[[], int]) -> int:
    """``main()``'s exit code; argparse's usage errors as theirs (else 2), any other exception printed as a
    traceback and reported as 1 (a crash, permanent)."""
    try:
        return main()
    except SystemExit as err:
        return err.code if isinstance(err.code, int) else CONFIG_ERROR
    except BaseException:
        traceback.print_exc()
        return ABORTED


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` once its output is flushed, without interpreter finalization: no thread a
    library left behind (gloo's workers, an exporter's, a DataLoader's) may race it (see ``mfr.trainer.__main__``)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
