"""Cluster operations through the API stand-in: objects that clean up, the shared dashboard, monitoring,
mfrctl doctor, and the RBAC a user of mfrctl needs.

The stand-in (tests/support/apiserver/) garbage-collects by ownerReference and plays
the training operator, so "the job is deleted, by hand or by its TTL" is a
real DELETE whose consequences the test observes.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import yaml

from tests.support.apiserver import ApiServer
from tests.support.cli import OWN_S3, mfrctl, one_line_error
from tests.support.kube_paths import CONFIGMAPS, JOBS, NETPOLS, PODMONITORS, PODS, PROMETHEUSRULES

ROOT = Path(__file__).resolve().parents[1]
SECRETS = "/api/v1/namespaces/ml/secrets"
DEPLOYMENTS = "/apis/apps/v1/namespaces/ml/deployments"
DASHBOARDS = "/api/v1/namespaces/monitoring/configmaps"
BOARD = "mfr-training-dashboard"


@pytest.fixture
def api():
    server = ApiServer(operator=True, namespaces=("default", "ml", "monitoring")).start()
    yield server
    server.stop()


def _names(api: ApiServer, collection: str) -> list[str]:
    return sorted(api.objects.get(collection, {}))


def _delete(api: ApiServer, path: str) -> None:
    """What kubectl delete (or ttlSecondsAfterFinished) does: a DELETE of the job, Background propagation."""
    from kubernetes import client

    config = client.Configuration()
    config.host = api.url
    config.api_key = {"authorization": "Bearer stand-in-token"}
    client.ApiClient(config).call_api(
        path,
        "DELETE",
        auth_settings=[],
        header_params={"Authorization": "Bearer stand-in-token"},
        _return_http_data_only=True,
    )


def test_deleting_the_job_lets_the_garbage_collector_remove_the_run_and_the_name_is_free_again(api, kubeconfig):
    assert mfrctl("submit", "--name", "exp1", "--nodes", "2", "--no-monitoring", kubeconfig=kubeconfig).returncode == 0
    assert _names(api, PODS) == ["exp1-master-0", "exp1-worker-0"]
    assert _names(api, SECRETS) == ["exp1-s3"] and _names(api, DEPLOYMENTS) == ["exp1-s3"]
    _delete(api, f"{JOBS}/exp1")  # kubectl delete pytorchjob exp1, or its TTL running out
    for collection in (JOBS, CONFIGMAPS, NETPOLS, SECRETS, DEPLOYMENTS, PODS, "/api/v1/namespaces/ml/services"):
        assert _names(api, collection) == [], collection  # nothing of the run outlives its job
    again = mfrctl("submit", "--name", "exp1", "--nodes", "2", "--no-monitoring", kubeconfig=kubeconfig)
    assert again.returncode == 0, again.stderr


def test_delete_removes_exactly_the_runs_objects_and_skips_kinds_it_may_not_list(api, kubeconfig):
    api.monitoring_crds = True
    assert mfrctl("submit", "--name", "exp1", *OWN_S3, kubeconfig=kubeconfig).returncode == 0  # monitoring: detected
    assert (
        mfrctl(
            "submit",
            "--name",
            "exp2",
            "--checkpoint",
            "s3://b/exp2",
            "--set",
            "s3.existingSecret=mfr-s3",
            kubeconfig=kubeconfig,
        ).returncode
        == 0
    )
    assert _names(api, PODMONITORS) == ["exp1", "exp2"]
    api.forbid("list", "serviceaccounts", "ml")  # the chart never made one; the user may not even look
    api.requests.clear()
    proc = mfrctl("delete", "exp1", kubeconfig=kubeconfig)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == sorted(
        [
            "pytorchjob/exp1 deleted",
            "configmap/exp1-config deleted",
            "networkpolicy/exp1 deleted",
            "podmonitor/exp1 deleted",
            "prometheusrule/exp1 deleted",
        ]
    )
    assert "not allowed to list serviceaccounts in namespace ml: skipped" in proc.stderr
    assert not [r for r in api.requests if r.method == "DELETE" and not re.search(r"/[^/]+s/[^/]+$", r.path)]
    for collection, left in (
        (JOBS, ["exp2"]),
        (CONFIGMAPS, ["exp2-config"]),
        (PODMONITORS, ["exp2"]),
        (PROMETHEUSRULES, ["exp2"]),
        (NETPOLS, ["exp2"]),
    ):
        assert _names(api, collection) == left  # the other run is untouched
    one_line_error(mfrctl("delete", "exp1", kubeconfig=kubeconfig), 1, "no run exp1 in namespace ml")


def test_the_dashboard_is_installed_once_shared_and_never_deleted_with_a_run(api, kubeconfig):
    proc = mfrctl(
        "dashboard", "install", "-n", "monitoring", "--annotation", "grafana_folder=ML", kubeconfig=kubeconfig
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"configmap/{BOARD} configured in namespace monitoring"
    again = mfrctl("dashboard", "install", "-n", "monitoring", kubeconfig=kubeconfig)  # idempotent: apply
    assert again.returncode == 0 and _names(api, DASHBOARDS) == [BOARD]
    board = api.objects[DASHBOARDS][BOARD]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(board["data"]["mfr-training.json"])["uid"] == "mfr-training"
    # two runs that both ask for the dashboard in the monitoring namespace: it is created once, owned by neither
    values = ["--set", "monitoring.dashboard.enabled=true", "--set", "monitoring.dashboard.namespace=monitoring"]
    for run in ("exp1", "exp2"):
        proc = mfrctl(
            "submit",
            "--name",
            run,
            "--checkpoint",
            f"s3://b/{run}",
            "--set",
            "s3.existingSecret=s",
            *values,
            kubeconfig=kubeconfig,
        )
        assert proc.returncode == 0, proc.stderr
        assert f"configmap/{BOARD}" not in proc.stdout  # already there
    assert "ownerReferences" not in api.objects[DASHBOARDS][BOARD]["metadata"]
    assert mfrctl("delete", "exp1", kubeconfig=kubeconfig).returncode == 0
    _delete(api, f"{JOBS}/exp2")
    assert _names(api, DASHBOARDS) == [BOARD]
    assert mfrctl("dashboard", "uninstall", "-n", "monitoring", kubeconfig=kubeconfig).returncode == 0
    assert _names(api, DASHBOARDS) == []


def test_a_dashboard_namespace_of_its_own_is_where_it_is_created(api, kubeconfig):
    values = ["--set", "monitoring.dashboard.enabled=true", "--set", "monitoring.dashboard.namespace=monitoring"]
    proc = mfrctl("submit", "--name", "exp1", *OWN_S3, *values, kubeconfig=kubeconfig)
    assert proc.returncode == 0, proc.stderr
    assert f"configmap/{BOARD} created" in proc.stdout and _names(api, DASHBOARDS) == [BOARD]


def test_monitoring_follows_the_clusters_prometheus_operator(api, kubeconfig):
    api.monitoring_crds = False
    assert mfrctl("submit", "--name", "plain", *OWN_S3, kubeconfig=kubeconfig).returncode == 0
    assert not api.objects.get(PODMONITORS)
    proc = mfrctl("submit", "--name", "insist", *OWN_S3, "--monitoring", kubeconfig=kubeconfig)
    one_line_error(proc, 1, "serves no monitoring.coreos.com/v1 PodMonitor API", "install the prometheus-operator")
    api.monitoring_crds = True
    proc = mfrctl("submit", "--name", "exp1", *OWN_S3, kubeconfig=kubeconfig)
    assert proc.returncode == 0 and "the run gets a PodMonitor and a PrometheusRule" in proc.stderr
    assert _names(api, PODMONITORS) == ["exp1"] and _names(api, PROMETHEUSRULES) == ["exp1"]
    assert mfrctl("submit", "--name", "exp2", *OWN_S3, "--no-monitoring", kubeconfig=kubeconfig).returncode == 0
    assert _names(api, PODMONITORS) == ["exp1"]


def test_rendered_alerts_need_the_namespace_they_will_select():
    proc = mfrctl("render", "--set", "monitoring.prometheusRule.enabled=true")
    one_line_error(proc, 2, "--namespace", "job <namespace>/mfr", "pass -n")
    rules = mfrctl("render", "-n", "ml", "--set", "monitoring.prometheusRule.enabled=true")
    assert rules.returncode == 0 and 'job="ml/mfr"' in rules.stdout


# -- doctor ------------------------------------------------------------------------------------


def _node(name: str, gpus: int, unschedulable: bool = False) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "spec": {"unschedulable": unschedulable},
        "status": {"allocatable": {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": str(gpus)}},
    }


def _doctor(kubeconfig, *args) -> tuple[int, dict[str, dict]]:
    proc = mfrctl("doctor", *args, "-o", "json", kubeconfig=kubeconfig)
    return proc.returncode, {row["name"]: row for row in json.loads(proc.stdout)}


def test_doctor_reports_apis_gpus_and_pod_security_with_fixes(api, kubeconfig):
    for i, (gpus, cordoned) in enumerate([(8, False), (8, False), (8, True), (4, False)]):
        api.put("/api/v1/nodes", _node(f"gpu-{i}", gpus, cordoned))
    code, rows = _doctor(kubeconfig, "--nodes", "2", "--gpus-per-node", "8")
    assert code == 0
    assert rows["PyTorchJob API"]["status"] == "ok" and rows["TrainJob API"]["status"] == "warn"
    assert rows["GPU nodes"]["detail"].startswith("2 of 4 nodes have 8 allocatable GPUs (28 GPUs in all)")
    code, rows = _doctor(kubeconfig, "--nodes", "3", "--gpus-per-node", "8")
    assert code == 1 and rows["GPU nodes"]["status"] == "fail" and "fewer --nodes" in rows["GPU nodes"]["fix"]
    namespace = api.objects["/api/v1/namespaces"]["ml"]
    namespace["metadata"].setdefault("labels", {})["pod-security.kubernetes.io/enforce"] = "restricted"
    code, rows = _doctor(kubeconfig, "--nodes", "2")
    assert rows["pod security"]["status"] == "warn" and "manifests/operator" in rows["pod security"]["fix"]
    api.crd_installed = False
    code, rows = _doctor(kubeconfig)
    assert code == 1 and rows["PyTorchJob API"]["status"] == "fail"
    assert "install the Kubeflow training operator" in rows["PyTorchJob API"]["fix"]


def test_doctor_probes_the_checkpoint_storage_with_the_runs_secret(api, kubeconfig, s3_server):
    env = s3_server.env()
    data = {k: base64.b64encode(v.encode()).decode() for k, v in env.items()}
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "mfr-s3"}, "data": data}
    api.put("/api/v1/namespaces/ml/secrets", secret)
    code, rows = _doctor(kubeconfig, "--checkpoint", "s3://mfr-test/doctor", "--secret", "mfr-s3")
    assert code == 0 and rows["checkpoint storage"]["status"] == "ok", rows["checkpoint storage"]
    import s3fs

    fs = s3fs.S3FileSystem(
        key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"], endpoint_url=env["AWS_ENDPOINT_URL"]
    )
    assert not [p for p in fs.find("mfr-test/doctor") if ".mfr-doctor-" in p]  # the probe was removed
    wrong = env | {"AWS_SECRET_ACCESS_KEY": "not-the-key-0123456789"}
    data = {k: base64.b64encode(v.encode()).decode() for k, v in wrong.items()}
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "stale"}, "data": data}
    api.put("/api/v1/namespaces/ml/secrets", secret)
    code, rows = _doctor(kubeconfig, "--checkpoint", "s3://mfr-test/doctor", "--secret", "stale")
    assert code == 1 and rows["checkpoint storage"]["status"] == "fail", rows["checkpoint storage"]
    assert wrong["AWS_SECRET_ACCESS_KEY"] not in json.dumps(rows)
    code, rows = _doctor(kubeconfig, "--checkpoint", "s3://mfr-test/x", "--secret", "missing")
    assert code == 1 and 'secret "missing" not found' in rows["checkpoint storage"]["detail"]


def test_doctor_on_a_namespace_that_does_not_exist(api, kubeconfig):
    proc = mfrctl("doctor", "-n", "nowhere", kubeconfig=kubeconfig)
    assert proc.returncode == 1 and 'namespace "nowhere" not found' in proc.stdout


# -- RBAC ----------------------------------------------------------------------------------------


def _allowed(rules: list[dict], verb: str, group: str, resource: str) -> bool:
    return any(verb in r["verbs"] and group in r["apiGroups"] and resource in r["resources"] for r in rules)


def _authorization(method: str, path: str, query: dict) -> tuple[str, str, str, bool] | None:
    """(verb, API group, resource, cluster-scoped) of a request, as the RBAC authorizer sees it; None: discovery."""
    match = re.match(
        r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)(?:/namespaces/(?P<ns>[^/]+))?"
        r"(?:/(?P<resource>[a-z]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[a-z]+))?)?)?$",
        path,
    )
    assert match, path
    if match["resource"] is None:
        if match["ns"] is None:
            return None  # discovery: /api/v1, /apis/<group>/<version>
        return {"GET": "get", "DELETE": "delete"}[method], "", "namespaces", True  # the namespace object itself
    named = match["name"] is not None
    verb = {
        "GET": "get" if named else ("watch" if query.get("watch") else "list"),
        "POST": "create",
        "PATCH": "patch",
        "PUT": "update",
        "DELETE": "delete" if named else "deletecollection",
    }[method]
    resource = match["resource"] + (f"/{match['sub']}" if match["sub"] else "")
    return verb, match["group"] or "", resource, match["ns"] is None


def test_the_shipped_role_allows_every_request_mfrctl_makes_and_nothing_wider(api, kubeconfig, tmp_path):
    role, cluster_role = [d for d in yaml.safe_load_all((ROOT / "manifests/rbac/mfrctl.yaml").read_text()) if d]
    api.monitoring_crds = True
    api.put("/api/v1/nodes", _node("gpu-0", 8))
    steps = [
        ["submit", "--name", "exp1", "--nodes", "2"],
        ["status", "exp1"],
        ["describe", "exp1"],
        ["list"],
        ["logs", "exp1", "--all-pods"],
        ["dashboard", "install"],
        ["doctor", "--nodes", "1", "--gpus-per-node", "8", "--secret", "exp1-s3", "--checkpoint", "/workspace/x"],
        ["delete", "exp1"],
        ["submit", "--name", "tj1", "--api", "trainjob", "--nodes", "2"],
        ["status", "tj1"],
        ["delete", "tj1"],
    ]
    for step in steps:
        if step[:4] == ["submit", "--name", "tj1", "--api"]:
            api.trainer_v2 = True
        if step[0] == "logs":
            api.set_pod_phase("ml", "exp1-master-0", "Running")
        proc = mfrctl(*step, kubeconfig=kubeconfig)
        assert proc.returncode in (0, 1), (step, proc.stderr)
    seen = set()
    for request in api.requests:
        authorization = _authorization(request.method, request.path, request.query)
        if authorization is None:
            continue  # discovery: every authenticated user may read it (system:discovery)
        verb, group, resource, cluster_scoped = authorization
        seen.add((verb, resource))
        rules = cluster_role["rules"] if cluster_scoped else role["rules"]
        assert _allowed(rules, verb, group, resource), (request.method, request.path)
    assert ("deletecollection", "configmaps") not in seen  # deleted by name: the Role needs no deletecollection
    assert all("deletecollection" not in r["verbs"] and "*" not in r["verbs"] for r in role["rules"])
