"""What every mfrctl command shares: the consoles, -o formats, one-line errors.

Nothing printed carries the user info of a URL (``http://user:password@host``): it is redacted here,
where every line leaves.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console

from mfr.trainer.credentials import redact


class _Console(Console):
    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(redact(o) if isinstance(o, str) else o for o in objects), **kwargs)


err = _Console(stderr=True)
out = _Console()


class Output(str, Enum):
    table = "table"
    json = "json"
    yaml = "yaml"


OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="Output format.")]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one line, no traceback; exit 2 marks a usage/config error."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)
    return typer.Exit(code)


def print_data(data: Any, output: Output) -> None:
    """Machine-readable output for -o json|yaml (plain print: no rich wrapping or markup)."""
    text = json.dumps(data, indent=2) if output == Output.json else yaml.safe_dump(data, sort_keys=False)
    print(redact(text), end="\n")


def print_columns(headers: list[str], rows: list[list[str]]) -> None:
    """kubectl-style plain columns: never wrapped or cut, easy to grep and awk."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    for row in (headers, *rows):
        print(redact("   ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()))
