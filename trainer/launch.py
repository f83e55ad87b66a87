"""The pod command: torchrun running the trainer, with retryable exit codes.

``python -m mfr.trainer.launch [--config F] [--set K=V ...]`` is
``torchrun -m mfr.trainer ...`` (every torchrun flag still comes from the
operator's PET_* environment), except for one thing: a bare torchrun that is
stopped by a signal (a preempted pod gets SIGTERM) exits 1, which a
``restartPolicy: ExitCode`` job treats as permanent.  Here it exits
128 + signal (143 for SIGTERM), which the operator retries, after the
workers have checkpointed.
"""

from __future__ import annotations

import sys

TRAINER_MODULE = "mfr.trainer"


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    args = sys.argv[1:] if argv is None else argv
    try:
        torchrun(["-m", TRAINER_MODULE, *args])
    except SignalException as err:
        print(f"mfr: stopped by signal {err.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
