"""Progress of a run: log lines on stdout, and JSON events for ``mfrctl train``.

Rank 0 reports.  When ``MFR_EVENTS_FILE`` is set (the local launcher sets
it), each event is also appended to that file as one JSON line, which is how
``mfrctl train`` draws its progress bar and final table without parsing logs.
URLs in both lose their user info (``credentials.redact``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from .credentials import redact

EVENTS_ENV = "MFR_EVENTS_FILE"


class Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        path = os.environ.get(EVENTS_ENV)
        self._events = open(path, "a", buffering=1) if enabled and path else None  # noqa: SIM115

    def event(self, name: str, **fields: Any) -> None:
        if self._events is not None:
            self._events.write(redact(json.dumps({"event": name, "time": time.time(), **fields})) + "\n")

    def log(self, message: str) -> None:
        if self.enabled:
            print(f"[mfr] {redact(message)}", file=sys.stdout, flush=True)

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
