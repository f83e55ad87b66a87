"""Entry point of every training process: ``torchrun -m mfr.trainer --config F``.

Exit codes follow the operator's retry rules (restartPolicy ExitCode):
2 for a config error (permanent, never retried), 1 for an aborted run.
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mfr.trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="TrainConfig YAML (default: the built-in synthetic demo)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one setting, e.g. --set head.sample_rate=0.1 (repeatable)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"mfr: config error: {err}", file=sys.stderr)
        return 2
    # torch is imported only once the config is known to be good.
    from .dist import init_distributed
    from .loop import Trainer, TrainingAborted
    from .progress import Progress

    import torch.distributed as dist

    try:
        env = init_distributed(cfg.run.device)
        try:
            Trainer(cfg, env).fit()
        finally:
            dist.destroy_process_group()
    except ConfigError as err:
        Progress(enabled=True).event("error", kind="config", message=str(err))
        print(f"mfr: config error: {err}", file=sys.stderr)
        return 2
    except TrainingAborted as err:
        Progress(enabled=True).event("error", kind="aborted", message=str(err))
        print(f"mfr: training aborted: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
