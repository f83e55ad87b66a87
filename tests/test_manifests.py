"""manifests/ is exactly what `mfrctl render` prints today (regenerate: python -m charts.generate)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from charts.generate import MANIFESTS, manifest_text, manifests_dir

ROOT = Path(__file__).resolve().parents[1]


def test_manifests_dir_is_the_checkouts():
    assert manifests_dir() == ROOT / "manifests"


def test_no_stray_manifests():
    assert {p.name for p in manifests_dir().glob("*.yaml")} == set(MANIFESTS)


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_has_not_drifted_from_the_chart(name):
    assert (manifests_dir() / name).read_text() == manifest_text(MANIFESTS[name]), (
        f"manifests/{name} is stale: run python -m charts.generate"
    )


def test_manifests_are_plain_kubectl_yaml():
    docs = [d for name in MANIFESTS for d in yaml.safe_load_all((manifests_dir() / name).read_text()) if d]
    assert {d["kind"] for d in docs} == {"NetworkPolicy", "ConfigMap", "PyTorchJob", "TrainingRuntime", "TrainJob"}
    assert all("namespace" not in d["metadata"] for d in docs)  # kubectl apply -n <ns> decides
    static = next(
        d
        for d in yaml.safe_load_all((manifests_dir() / "static-8x8gpu.yaml").read_text())
        if d and d["kind"] == "PyTorchJob"
    )
    assert static["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 7 and static["spec"]["nprocPerNode"] == "8"
    elastic_objects = yaml.safe_load_all((manifests_dir() / "elastic-4to8x8gpu.yaml").read_text())
    elastic = next(d for d in elastic_objects if d and d["kind"] == "PyTorchJob")
    assert (elastic["spec"]["elasticPolicy"]["minReplicas"], elastic["spec"]["elasticPolicy"]["maxReplicas"]) == (4, 8)
