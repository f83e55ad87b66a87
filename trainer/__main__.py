"""Entry point of every training process: ``torchrun -m mfr.trainer --config F``.

Exit codes follow the operator's retry rules (restartPolicy ExitCode):
2 for a config error (permanent, never retried), 1 for an aborted run,
143 after SIGTERM once the state is checkpointed (retried, and resumed).
"""

from __future__ import annotations

import argparse
import os
import sys

from .config import ConfigError, TrainConfig, load_config
from .progress import Progress


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mfr.trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="TrainConfig YAML (default: the built-in synthetic demo)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
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
    print(f"mfr: {'config error' if kind == 'config' else 'training aborted'}: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        return _fail("config", str(err), 2)
    from .checkpoint import Preempted  # torch is imported only for a good config
    from .loop import TrainingAborted
    from .storage import StorageError

    try:
        train(cfg)
    except ConfigError as err:  # found at start-up, e.g. fp16 on a CPU-only node
        return _fail("config", str(err), 2)
    except StorageError as err:  # checkpoint storage unusable at start-up
        return _fail("config" if err.permanent else "aborted", str(err), 2 if err.permanent else 1)
    except TrainingAborted as err:
        return _fail("aborted", str(err), 1)
    except Preempted as err:
        print(f"mfr: {err}", file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
