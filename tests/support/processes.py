"""The processes of a local job seen from outside, through /proc: who hosts the rendezvous store, which pod
(agent) a process belongs to, and losing a whole pod at once."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from mfr.ctl.launcher import _descendants


def store_host(port: int) -> int:
    """The process that listens on the rendezvous port (hosts the c10d store)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":  # LISTEN
                inodes.add(fields[9])
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                if os.readlink(fd).removeprefix("socket:[").removesuffix("]") in inodes:
                    return int(fd_dir.parent.name)
        except OSError:
            continue
    raise AssertionError(f"nobody listens on {port}")


def agent_of(pid: int, agents: list[int]) -> int:
    """The agent (pod) among ``agents`` that is ``pid`` or started it."""
    return next(a for a in agents if a == pid or pid in _descendants(a))


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it, as when its node is lost."""
    for p in [pid, *_descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
