"""How a run talks: lines through one logger, and JSON events for ``mfrctl train``.

Every line a trainer, scorer or launcher process prints goes through the ``mfr``
logger, in one rank-aware format:

- ``[mfr] message``: progress, from rank 0 only (the others log warnings and errors);
- ``[mfr] WARNING: message``: something went wrong and the run goes on; from another
  rank it says which (``[mfr rank 3] WARNING: ...``);
- ``mfr: message`` on stderr: the one line that says why this process ends (the
  operator's exit-code policy does the rest, see ``exitcodes``).

The rank is torchrun's ``RANK``; the launcher, which is no rank, calls
``configure(None)``.  When ``MFR_EVENTS_FILE`` is set (the local launcher sets it),
rank 0 also appends each event to that file as one JSON line, which is how
``mfrctl train`` draws its progress bar and final table without parsing logs.
URLs in both lose their user info (``credentials.redact``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from .credentials import redact

EVENTS_ENV = "MFR_EVENTS_FILE"

log = logging.getLogger("mfr")


class _Lines(logging.Handler):
    """Writes to whatever ``sys.stdout``/``sys.stderr`` are at the time (pytest swaps them), flushed."""

    def __init__(self, rank: int | None):
        super().__init__()
        self.tag = "[mfr]" if not rank else f"[mfr rank {rank}]"

    def format(self, record: logging.LogRecord) -> str:
        message = redact(record.getMessage())
        if record.levelno >= logging.ERROR:
            return f"mfr: {message}"
        return f"{self.tag} WARNING: {message}" if record.levelno == logging.WARNING else f"{self.tag} {message}"

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.ERROR else sys.stdout
        stream.write(self.format(record) + "\n")
        stream.flush()


def configure(rank: int | None) -> None:
    """The ``mfr`` logger's one handler and level for this process (``rank`` None: not a training rank)."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
    log.addHandler(_Lines(rank))
    log.setLevel(logging.INFO if not rank else logging.WARNING)
    log.propagate = False


def _env_rank() -> int | None:
    rank = os.environ.get("RANK", "")
    return int(rank) if rank.isdigit() else None


configure(_env_rank())


class Progress:
    """Rank 0's JSON events (``enabled``), for ``mfrctl train`` to follow."""

    def __init__(self, enabled: bool):
        path = os.environ.get(EVENTS_ENV)
        self._events = open(path, "a", buffering=1) if enabled and path else None  # noqa: SIM115

    def event(self, name: str, **fields: Any) -> None:
        if self._events is not None:
            self._events.write(redact(json.dumps({"event": name, "time": time.time(), **fields})) + "\n")

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
