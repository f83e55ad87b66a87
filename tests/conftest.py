"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture
def single_process_group():
    """A real world-size-1 gloo process group for code that needs one."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server on 127.0.0.1 for the whole session."""
    from tests.support.s3server import SeaweedS3

    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This process (and the processes it starts) talks to the test S3 server."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def kubeconfig(api, tmp_path):
    """A kubeconfig for the module's ``api`` fixture, the API stand-in as that module configures it."""
    return api.kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture(scope="module")
def prometheus_factory(tmp_path_factory):
    """Start real Prometheus servers (Debian's package) on 127.0.0.1: ``start(targets)``; all stop afterwards."""
    from tests.support.prometheus import Prometheus

    servers = []

    def start(targets, interval: str = "1s"):
        server = Prometheus(tmp_path_factory.mktemp("prometheus"), targets, interval=interval)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()
