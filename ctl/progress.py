"""Follow a local run: its JSON events, a progress bar, the results table."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class EventTail:
    """Reads the events rank 0 appends to ``events.jsonl``, as they come."""

    def __init__(self, path: Path):
        self.path = path
        self._offset = 0
        self._partial = ""
        self.evals: dict[str, dict[str, Any]] = {}
        self.errors: list[dict[str, Any]] = []
        self.resumes: list[dict[str, Any]] = []
        self.last_step = 0

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path) as f:
            f.seek(self._offset)
            chunk = f.read()
            self._offset = f.tell()
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()
        events = [json.loads(line) for line in lines if line]
        for event in events:
            if event["event"] == "eval":
                self.evals[event["stage"]] = event
            elif event["event"] == "error":
                self.errors.append(event)
            elif event["event"] == "resume":
                self.resumes.append(event)
            elif event["event"] == "step":
                self.last_step = event["step"]
        return events

    def error(self) -> dict[str, Any] | None:
        return self.errors[0] if self.errors else None


class TrainProgress:
    """A rich progress bar: step, samples/s, loss, ETA."""

    def __init__(self, console: Console, steps: int):
        self._bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("step {task.completed}/{task.total}"),
            TextColumn("{task.fields[rate]} samples/s"),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
        )
        self._task = self._bar.add_task("train", total=steps, rate="-", loss="-")
        self._console = console

    def __enter__(self) -> TrainProgress:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def update_all(self, events: Iterable[dict[str, Any]]) -> None:
        for event in events:
            kind = event["event"]
            if kind == "start":
                self._bar.update(self._task, completed=0)
                self._console.print(
                    f"mfr: world size {event['world_size']} on {event['device']}, "
                    f"global batch {event['global_batch']}"
                    + (f", elastic restart {event['restart_count']}" if event["restart_count"] else ""),
                    highlight=False,
                )
            elif kind == "step":
                loss = "non-finite" if event["loss"] is None else f"{event['loss']:.3f}"
                self._bar.update(self._task, completed=event["step"], rate=f"{event['samples_per_s']:.0f}", loss=loss)
            elif kind == "resume":
                self._bar.update(self._task, completed=event["step"])
                self._console.print(
                    f"mfr: resumed at step {event['step']} from {event['url']} "
                    f"(saved by {event['from_world_size']} ranks)",
                    highlight=False,
                )
            elif kind == "checkpoint_failed":
                self._console.print(
                    f"mfr: warning: checkpoint of step {event['step']} failed, training continues: {event['message']}",
                    highlight=False,
                    markup=False,
                )
            elif kind == "eval":
                self._console.print(f"mfr: evaluated the {event['stage']} model at step {event['step']}")


def results_table(evals: dict[str, dict[str, Any]]) -> Table:
    """TPR@FPR per protocol and evaluated model (rows) and FPR (columns).

    An FPR that no protocol's impostor-pair count can resolve gets no column;
    the caption says so instead of showing a number that means nothing.
    """
    from mfr.trainer.verification import format_fpr

    stages = list(evals)
    protocols = evals[stages[0]]["results"]
    fprs = [p["target_fpr"] for p in protocols[0]["points"]]
    shown = [i for i in range(len(fprs)) if any(r["points"][i]["supported"] for r in protocols)]
    hidden = [format_fpr(fprs[i]) for i in range(len(fprs)) if i not in shown]
    pairs = ", ".join(f"{r['protocol']} {r['n_genuine']:,}/{r['n_impostor']:,}" for r in protocols)
    caption = f"genuine/impostor pairs: {pairs}"
    if hidden:
        caption += f"\nnot shown: FPR {', '.join(hidden)} (too few impostor pairs to resolve)"
    table = Table(title="Held-out identities: TPR @ FPR", caption=caption)
    table.add_column("protocol")
    table.add_column("model")
    for i in shown:
        table.add_column(format_fpr(fprs[i]), justify="right")
    for index, protocol in enumerate(protocols):
        for stage in stages:
            points = evals[stage]["results"][index]["points"]
            cells = ["n/a" if points[i]["tpr"] is None else f"{points[i]['tpr']:.4f}" for i in shown]
            table.add_row(protocol["protocol"], stage, *cells)
    return table
