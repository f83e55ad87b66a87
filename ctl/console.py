"""What every mfrctl command shares: the consoles, -o formats, one-line errors."""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console

err = Console(stderr=True)
out = Console()


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
    print(json.dumps(data, indent=2) if output == Output.json else yaml.safe_dump(data, sort_keys=False), end="\n")


def print_columns(headers: list[str], rows: list[list[str]]) -> None:
    """kubectl-style plain columns: never wrapped or cut, easy to grep and awk."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows)]
    for row in (headers, *rows):
        print("   ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
