"""mfrctl as the tests run it: in a real process, or in this one, and its one-line errors."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from mfr.ctl.main import app

# mfrctl in a real process of this interpreter (the ``mfrctl`` script is this module's entry point).
MFRCTL = [sys.executable, "-m", "mfr.ctl.main"]
# Checkpoints on the user's own S3 (no trial store): the run is a NetworkPolicy, a ConfigMap and a PyTorchJob.
OWN_S3 = ["--checkpoint", "s3://bucket/runs/exp1", "--set", "s3.existingSecret=mfr-s3"]


def mfrctl(*args: str, kubeconfig=None) -> subprocess.CompletedProcess:
    """mfrctl in this process (typer's CliRunner: the client libraries take seconds to import), as a process result."""
    argv = [*args, *(["--kubeconfig", str(kubeconfig)] if kubeconfig else [])]
    result = CliRunner().invoke(app, argv, catch_exceptions=False)
    return subprocess.CompletedProcess(argv, result.exit_code, result.stdout, result.stderr)


def one_line_error(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    """Assert that ``proc`` exited ``code`` with one line on stderr, no traceback, naming every fragment."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
