"""The pod command: torchrun running the trainer, with retryable exit codes.

``python -m mfr.trainer.launch [--config F] [--set K=V ...]`` is
``torchrun -m mfr.trainer ...`` (every torchrun flag still comes from the
operator's PET_* environment), except for one thing: a bare torchrun that is
stopped by a signal (a preempted pod gets SIGTERM) exits 1, which a
``restartPolicy: ExitCode`` job treats as permanent.  Here it exits
128 + signal (143 for SIGTERM), which the operator retries, after the
workers have checkpointed.

It also turns off torchrun's sharing of the rendezvous TCPStore with the
workers: with sharing on (torch 2.13), a node that joins a running elastic
job waits forever for a MASTER_ADDR that the unchanged rank-0 agent never
publishes again (the whole job then dies 60 s later).
"""

from __future__ import annotations

import os
import sys

TRAINER_MODULE = "mfr.trainer"


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    args = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    try:
        torchrun(["-m", TRAINER_MODULE, *args])
    except SignalException as err:
        print(f"mfr: stopped by signal {err.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
