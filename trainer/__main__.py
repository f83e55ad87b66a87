"""Entry point of every training process: ``torchrun -m mfr.trainer --config F``.

Exit codes follow the operator's retry rules (restartPolicy ExitCode, see
exitcodes): 2 for a config error and 1 for an aborted run (permanent, never
retried); 129 when a peer, the rendezvous or the checkpoint store went away
and 143 after SIGTERM once the state is checkpointed (retried, and resumed).

No native thread may meet interpreter finalization: a gloo worker that
retires the last collective after the main thread moved on needs the GIL to
drop a Python tensor, and during finalization CPython ends such a thread with
``pthread_exit`` inside a C++ destructor, which aborts the whole process
("terminate called without an active exception", SIGABRT) after a run that
had finished, or turns a lost peer's 129 into 134.  So ``train`` destroys the
process groups on this thread before it returns (``dist.shutdown_distributed``
joins their workers), and the process then ends with ``os._exit`` once its
output is flushed, so that no thread another library left behind (the
metrics exporter's, a DataLoader's) can race the exit either.
"""

from __future__ import annotations

import argparse
import os

from . import exitcodes
from .config import ConfigError, TrainConfig, load_config
from .progress import Progress, log


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mfr.trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="TrainConfig YAML (default: the built-in synthetic demo)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set head.sample_rate=0.1 (repeatable)",
    )
    return parser.parse_args(argv)


def train(cfg: TrainConfig) -> None:
    from .dist import init_distributed, shutdown_distributed
    from .loop import Trainer

    env = init_distributed(cfg.run.device)
    trainer = None
    try:
        trainer = Trainer(cfg, env)
        trainer.fit()
    finally:
        with shutdown_distributed():  # the process groups die here, not while the interpreter exits
            del trainer


def _fail(kind: str, message: str, code: int) -> int:
    """One line on stderr; rank 0 also tells ``mfrctl train`` through its events."""
    Progress(enabled=os.environ.get("RANK", "0") == "0").event("error", kind=kind, message=message)
    log.error(f"{'config error' if kind == 'config' else 'training aborted'}: {message}")
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        return _fail("config", str(err), exitcodes.CONFIG_ERROR)
    from .checkpoint import Preempted  # torch is imported only for a good config
    from .dist import is_peer_loss
    from .loop import TrainingAborted
    from .storage import StorageError

    try:
        train(cfg)
    except ConfigError as err:  # found at start-up, e.g. fp16 on a CPU-only node
        return _fail("config", str(err), exitcodes.CONFIG_ERROR)
    except StorageError as err:  # checkpoint storage unusable at start-up
        if err.permanent:
            return _fail("config", str(err), exitcodes.CONFIG_ERROR)
        return _unavailable(f"checkpoint storage: {err}")
    except TrainingAborted as err:
        return _fail("aborted", str(err), exitcodes.ABORTED)
    except Preempted as err:
        log.error(str(err))
        return exitcodes.PREEMPTED
    except Exception as err:
        if not is_peer_loss(err):
            raise  # the run's own failure: a traceback, exit 1
        return _unavailable(f"lost a peer ({str(err).splitlines()[0][:300]})")
    return exitcodes.DONE


def _unavailable(why: str) -> int:
    """Something outside this process is gone; a restart of the job resumes from the last commit."""
    log.error(f"{why}; exiting {exitcodes.UNAVAILABLE} so the job is restarted from its last checkpoint")
    return exitcodes.UNAVAILABLE


def run(argv: list[str] | None = None) -> int:
    """``main``, with any other exception printed as a traceback and reported as exit code 1."""
    return exitcodes.guarded(lambda: main(argv))


if __name__ == "__main__":
    exitcodes.exit_now(run())
