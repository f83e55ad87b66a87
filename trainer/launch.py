"""The pod command: torchrun running the trainer, with exit codes the operator can act on.

``python -m mfr.trainer.launch [--config F] [--set K=V ...]`` is
``torchrun -m mfr.trainer ...`` (every torchrun flag still comes from the
operator's PET_* environment), except for its exit code.  ``--module
mfr.trainer.score EMBEDDINGS --report URL ...`` runs the distributed scorer
of verification sets instead, under the same contract.  A bare torchrun
exits 1 for any failure, which a ``restartPolicy: ExitCode`` job treats as
permanent.  Here the pod's code says what happened (see exitcodes):

* stopped by a signal (a preempted pod gets SIGTERM): 128 + signal, after
  the workers have checkpointed;
* a worker failed: the earliest permanent code among the workers (2 for a
  bad config, 1 for an aborted run) if there is one, else the earliest
  retryable one (129 for a lost peer, 137 for a worker killed by the OOM
  killer, ...);
* the rendezvous or its store could not be reached or went away: 129.

Before torchrun starts, it waits for the endpoints named in ``MFR_WAIT_FOR``
(``host:port,...``; the chart names its trial S3 store there), so pods that
start before the store is up do not spend the job's restarts.

It also turns off torchrun's sharing of the rendezvous TCPStore with the
workers: with sharing on (torch 2.13), a node that joins a running elastic
job waits forever for a MASTER_ADDR that the unchanged rank-0 agent never
publishes again (the whole job then dies 60 s later).
"""

from __future__ import annotations

import os
import socket
import sys
import time

from . import exitcodes
from .progress import configure, log

TRAINER_MODULE = "mfr.trainer"
MODULES = (TRAINER_MODULE, "mfr.trainer.score")  # what a pod may run: training, or scoring embedded sets
WAIT_FOR_ENV = "MFR_WAIT_FOR"
WAIT_TIMEOUT_S = 600.0


def worker_exit_code(failures: list[tuple[float, int]]) -> int:
    """The pod's exit code from its failed workers' ``(time, exitcode)``; a negative code is a signal.

    A permanent failure anywhere is the pod's, or the job would retry a mistake.  Among
    retryable ones the earliest, but a lost peer (129) only after the others: it is the
    consequence of another's end (torchrun stamps failures to the second).
    """
    shell = [(when, exitcodes.from_signal(-code) if code < 0 else code) for when, code in failures]
    codes = [code for _, code in sorted(shell, key=lambda f: (f[0], f[1] == exitcodes.UNAVAILABLE, f[1]))]
    permanent = [code for code in codes if not exitcodes.retryable(code)]
    return (permanent or codes)[0]


def wait_for(endpoints: list[str], timeout: float = WAIT_TIMEOUT_S, pause: float = 1.0) -> bool:
    """Wait until a TCP connection to every ``host:port`` succeeds; False after ``timeout``."""
    deadline, said = time.monotonic() + timeout, 0.0
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        while True:
            try:
                socket.create_connection((host, int(port)), timeout=5).close()
                break
            except OSError as err:
                if time.monotonic() >= deadline:
                    return False
                if time.monotonic() - said >= 30:
                    log.warning(f"waiting for {endpoint} ({err})")
                    said = time.monotonic()
                time.sleep(pause)
    return True


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import main as torchrun

    configure(None)  # this process is the pod's agent, not a training rank (RANK is the node's here)

    args = sys.argv[1:] if argv is None else argv
    module = TRAINER_MODULE
    if args[:1] == ["--module"]:
        module, args = (args[1] if len(args) > 1 else ""), args[2:]
        if module not in MODULES:
            log.error(f"--module {module!r}: one of {', '.join(MODULES)}")
            return exitcodes.CONFIG_ERROR
    endpoints = [e.strip() for e in os.environ.get(WAIT_FOR_ENV, "").split(",") if e.strip()]
    if endpoints and not wait_for(endpoints):
        log.error(
            f"{', '.join(endpoints)} not reachable after {WAIT_TIMEOUT_S:.0f} s; "
            f"exiting {exitcodes.UNAVAILABLE} so the pod is retried"
        )
        return exitcodes.UNAVAILABLE
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        torchrun(["-m", module, *args])
    except SignalException as err:
        log.error(f"stopped by signal {err.sigval.name}")
        return exitcodes.from_signal(int(err.sigval))
    except ChildFailedError as err:
        code = worker_exit_code([(f.timestamp, f.exitcode) for f in err.failures.values()])
        ranks = ", ".join(
            f"rank {rank} {f.exitcode if f.exitcode >= 0 else f.signal_name()}"
            for rank, f in sorted(err.failures.items())
        )
        log.error(f"worker(s) failed ({ranks}); pod exit code {exitcodes.describe(code)}")
        return code
    except (RendezvousError, DistError) as err:
        log.error(
            f"rendezvous failed ({type(err).__name__}: {str(err).splitlines()[0][:300]}); "
            f"exiting {exitcodes.UNAVAILABLE} so the pod is retried"
        )
        return exitcodes.UNAVAILABLE
    return exitcodes.DONE


if __name__ == "__main__":
    sys.exit(main())
