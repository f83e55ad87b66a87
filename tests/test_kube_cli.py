"""mfrctl submit | status | logs | delete | list against a stand-in Kubernetes API server.

There is no Kubernetes API server on these machines (no container runtime,
no etcd), so tests/apiserver.py serves the REST calls over real HTTP on
127.0.0.1; mfrctl runs with the real kubernetes client and kubeflow-training
SDK, through a kubeconfig.  The tests check the exact requests sent, and that
bad input sends none.  mfrctl runs in this process (typer's CliRunner: the
client libraries take seconds to import), except where a real process is
the point.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from mfr.ctl.main import app
from tests.apiserver import TOKEN, ApiServer

MFRCTL = [sys.executable, "-m", "mfr.ctl.main"]
JOBS = "/apis/kubeflow.org/v1/namespaces/ml/pytorchjobs"
CONFIGMAPS = "/api/v1/namespaces/ml/configmaps"
NETPOLS = "/apis/networking.k8s.io/v1/namespaces/ml/networkpolicies"
PODMONITORS = "/apis/monitoring.coreos.com/v1/namespaces/ml/podmonitors"
PROMETHEUSRULES = "/apis/monitoring.coreos.com/v1/namespaces/ml/prometheusrules"
RUN_SELECTOR = "app.kubernetes.io/name=mfr-trainer,app.kubernetes.io/instance=exp1"
# Checkpoints on the user's own S3 (no trial store): the run is a NetworkPolicy, a ConfigMap and a PyTorchJob.
OWN_S3 = ["--checkpoint", "s3://bucket/runs/exp1", "--set", "s3.existingSecret=mfr-s3"]


@pytest.fixture
def api():
    server = ApiServer().start()
    yield server
    server.stop()


@pytest.fixture
def kubeconfig(api, tmp_path):
    return api.kubeconfig(tmp_path / "kubeconfig")


def mfrctl(*args: str, kubeconfig=None) -> subprocess.CompletedProcess:
    argv = [*args, *(["--kubeconfig", str(kubeconfig)] if kubeconfig else [])]
    result = CliRunner().invoke(app, argv, catch_exceptions=False)
    return subprocess.CompletedProcess(argv, result.exit_code, result.stdout, result.stderr)


def rendered(*args: str) -> list[dict]:
    proc = mfrctl("render", "-o", "json", "--namespace", "ml", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["items"]


def one_line_error(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _job(name: str, **spec_extra) -> dict:
    return {
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": "ml", "creationTimestamp": "2026-01-01T00:00:00Z",
                     "labels": {"app.kubernetes.io/name": "mfr-trainer", "app.kubernetes.io/instance": name}},
        "spec": {"nprocPerNode": "8", "pytorchReplicaSpecs": {"Master": {"replicas": 1}, "Worker": {"replicas": 3}},
                 **spec_extra},
        "status": {"conditions": [
            {"type": "Created", "status": "True", "message": "created"},
            {"type": "Running", "status": "True", "message": "PyTorchJob exp1 is running."},
        ]},
    }


# -- submit -------------------------------------------------------------------------------


def test_submit_creates_the_rendered_objects_with_exact_requests(api, kubeconfig):
    args = ["--name", "exp1", "--nodes", "4", "--gpus-per-node", "8", "--image", "reg.example.com/mfr-trainer:1.2",
            *OWN_S3]
    proc = mfrctl("submit", *args, kubeconfig=kubeconfig)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "networkpolicy/exp1 created", "configmap/exp1-config created", "pytorchjob/exp1 created",
    ]
    assert "mfrctl logs exp1 -n ml -f" in proc.stderr  # the chart's NOTES say how to follow the run
    assert api.sent() == [("GET", f"{JOBS}/exp1"), ("POST", NETPOLS), ("POST", CONFIGMAPS), ("POST", JOBS)]
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in api.requests)
    posts = [r for r in api.requests if r.method == "POST"]
    assert [r.body for r in posts] == rendered(*args)  # exactly what render prints, in install order
    assert all(r.query == {"fieldManager": "mfrctl"} for r in posts)
    assert api.objects[JOBS]["exp1"]["metadata"]["labels"]["app.kubernetes.io/instance"] == "exp1"
    config = yaml.safe_load(api.objects[CONFIGMAPS]["exp1-config"]["data"]["config.yaml"])
    assert config["checkpoint"]["uri"] == "s3://bucket/runs/exp1"


def test_submit_of_the_demo_brings_its_trial_store_first(api, kubeconfig):
    proc = mfrctl("submit", "--name", "exp1", "--nodes", "2", kubeconfig=kubeconfig)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "networkpolicy/exp1 created", "networkpolicy/exp1-s3 created", "secret/exp1-s3 created",
        "configmap/exp1-config created", "service/exp1-s3 created", "deployment/exp1-s3 created",
        "pytorchjob/exp1 created",
    ]
    assert [path for method, path in api.sent() if method == "POST"] == [
        NETPOLS, NETPOLS, "/api/v1/namespaces/ml/secrets", CONFIGMAPS, "/api/v1/namespaces/ml/services",
        "/apis/apps/v1/namespaces/ml/deployments", JOBS,
    ]
    secret = api.objects["/api/v1/namespaces/ml/secrets"]["exp1-s3"]
    assert secret["data"]["AWS_SECRET_ACCESS_KEY"] not in proc.stdout + proc.stderr  # never printed
    assert "trial S3 store exp1-s3" in proc.stderr and "not for production data" in proc.stderr
    deleted = mfrctl("delete", "exp1", kubeconfig=kubeconfig).stdout.splitlines()
    assert {"secret/exp1-s3 deleted", "service/exp1-s3 deleted", "deployment/exp1-s3 deleted"} <= set(deleted)


def test_submit_of_a_multi_pod_job_without_shared_checkpoints_exits_2_and_sends_nothing(api, kubeconfig):
    real_data = ["--set", "train.data.source=folder", "--set", "train.data.uri=s3://faces/train"]
    proc = mfrctl("submit", "--name", "exp1", "--nodes", "8", *real_data, kubeconfig=kubeconfig)
    one_line_error(proc, 2, "a job of 8 pods has no checkpoint storage that every pod can reach",
                   "--checkpoint s3://BUCKET/PREFIX", "--workspace-claim NAME")
    assert api.requests == []
    claim = mfrctl("submit", "--name", "exp1", "--nodes", "8", *real_data, "--workspace-claim", "runs",
                   kubeconfig=kubeconfig)
    assert claim.returncode == 0, claim.stderr
    config = yaml.safe_load(api.objects[CONFIGMAPS]["exp1-config"]["data"]["config.yaml"])
    assert config["checkpoint"]["uri"] == "/workspace/checkpoints/exp1"
    pod = api.objects[JOBS]["exp1"]["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert {"name": "workspace", "persistentVolumeClaim": {"claimName": "runs"}} in pod["volumes"]


MONITORING = ["--set", "monitoring.podMonitor.enabled=true", "--set", "monitoring.prometheusRule.enabled=true"]


def test_submit_and_delete_the_monitoring_objects_too(api, kubeconfig):
    proc = mfrctl("submit", "--name", "exp1", *MONITORING, *OWN_S3, kubeconfig=kubeconfig)
    assert proc.returncode == 0, proc.stderr
    assert "podmonitor/exp1 created" in proc.stdout and "prometheusrule/exp1 created" in proc.stdout
    assert ("POST", PODMONITORS) in api.sent() and ("POST", PROMETHEUSRULES) in api.sent()
    assert [r.body for r in api.requests if r.method == "POST"] == rendered("--name", "exp1", *MONITORING, *OWN_S3)
    deleted = mfrctl("delete", "exp1", kubeconfig=kubeconfig).stdout.splitlines()
    assert "podmonitor/exp1 deleted" in deleted and "prometheusrule/exp1 deleted" in deleted
    assert not api.objects[PODMONITORS] and not api.objects[PROMETHEUSRULES]


def test_monitoring_objects_without_prometheus_operator_are_a_clear_error_and_roll_back(api, kubeconfig):
    api.monitoring_crds = False
    proc = mfrctl("submit", "--name", "exp1", *MONITORING, kubeconfig=kubeconfig)
    one_line_error(proc, 1, "serves no monitoring.coreos.com/v1", "install the prometheus-operator", "removed what was created")
    assert not api.objects.get(CONFIGMAPS) and not api.objects.get(JOBS)
    assert mfrctl("submit", "--name", "exp1", kubeconfig=kubeconfig).returncode == 0  # without them: fine
    assert mfrctl("delete", "exp1", kubeconfig=kubeconfig).returncode == 0  # delete skips the absent API


def test_submit_dry_run_server_sends_dry_run_requests_and_stores_nothing(api, kubeconfig):
    proc = mfrctl("submit", "--name", "exp1", "--dry-run", "server", *OWN_S3, kubeconfig=kubeconfig)
    assert proc.returncode == 0, proc.stderr
    assert "pytorchjob/exp1 created (server dry run)" in proc.stdout
    assert [r.query.get("dryRun") for r in api.requests if r.method == "POST"] == ["All", "All", "All"]
    assert list(api.objects) == ["/api/v1/namespaces"]  # only the namespaces the cluster started with


def test_submit_dry_run_client_sends_nothing(api, kubeconfig):
    proc = mfrctl("submit", "--name", "exp1", "--dry-run", "client", *OWN_S3, kubeconfig=kubeconfig)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "networkpolicy/exp1 created (dry run)", "configmap/exp1-config created (dry run)",
        "pytorchjob/exp1 created (dry run)",
    ]
    assert api.requests == []


def test_submit_refuses_a_name_that_exists(api, kubeconfig):
    api.put(JOBS, _job("exp1"))
    proc = mfrctl("submit", "--name", "exp1", kubeconfig=kubeconfig)
    one_line_error(proc, 1, "PyTorchJob exp1 already exists in namespace ml", "another --name", "mfrctl delete exp1 -n ml")
    assert api.sent() == [("GET", f"{JOBS}/exp1")]


def test_submit_names_a_leftover_object_of_the_same_run(api, kubeconfig):
    api.put(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "exp1-config"}})
    proc = mfrctl("submit", "--name", "exp1", *OWN_S3, kubeconfig=kubeconfig)
    one_line_error(proc, 1, "cannot create ConfigMap exp1-config: it already exists in namespace ml", "mfrctl delete exp1 -n ml")
    assert api.sent() == [("GET", f"{JOBS}/exp1"), ("POST", NETPOLS), ("POST", CONFIGMAPS), ("DELETE", f"{NETPOLS}/exp1")]
    assert JOBS not in api.objects


def test_submit_rolls_back_when_the_webhook_denies_the_job(api, kubeconfig):
    api.denied["pytorchjobs"] = 'admission webhook "validator.pytorchjob.training-operator.kubeflow.org" denied the request'
    proc = mfrctl("submit", "--name", "exp1", *OWN_S3, kubeconfig=kubeconfig)
    one_line_error(proc, 1, "cannot create PyTorchJob exp1 (HTTP 403): admission webhook",
                   "removed what was created: networkpolicy/exp1, configmap/exp1-config")
    assert api.sent() == [
        ("GET", f"{JOBS}/exp1"), ("POST", NETPOLS), ("POST", CONFIGMAPS), ("POST", JOBS),
        ("DELETE", f"{CONFIGMAPS}/exp1-config"), ("DELETE", f"{NETPOLS}/exp1"),
    ]
    assert not api.objects[CONFIGMAPS]


def test_submit_without_the_operator_says_how_to_install_it(api, kubeconfig):
    api.crd_installed = False
    proc = mfrctl("submit", "--name", "exp1", kubeconfig=kubeconfig)
    one_line_error(proc, 1, f"the cluster at {api.url} serves no kubeflow.org/v1 PyTorchJob API", "training operator v1.9")
    assert api.sent("POST") == []


def test_submit_wait_reports_the_final_state(api, kubeconfig):
    def operator(obj):
        if obj["kind"] == "PyTorchJob":
            obj["status"] = {"conditions": [{"type": "Succeeded", "status": "True", "message": "done"}]}

    api.on_create = operator
    proc = mfrctl("submit", "--name", "exp1", "--wait", kubeconfig=kubeconfig)
    assert proc.returncode == 0, proc.stderr
    assert "mfr: exp1 Succeeded: done" in proc.stderr
    assert api.sent()[-1] == ("GET", f"{JOBS}/exp1")


def test_submit_follow_streams_rank0_log_and_fails_with_the_job(api, kubeconfig):
    def operator(obj):
        if obj["kind"] == "PyTorchJob":
            obj["status"] = {"conditions": [{"type": "Failed", "status": "True", "message": "master exited 1"}]}
            api.add_pod("ml", "exp1", "master", 0, phase="Failed", log="step 1 loss 5.5\nstep 2 loss 5.1\n")

    api.on_create = operator
    proc = mfrctl("submit", "--name", "exp1", "--follow", kubeconfig=kubeconfig)
    assert proc.returncode == 1
    assert "step 2 loss 5.1" in proc.stdout
    assert "mfr: exp1 Failed: master exited 1" in proc.stderr
    log = next(r for r in api.requests if r.path.endswith("/log"))
    assert log.path == "/api/v1/namespaces/ml/pods/exp1-master-0/log"
    assert log.query["container"] == "pytorch" and log.query["follow"].lower() == "true"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nodes", "0"], "--nodes 0: a job needs at least 1 node"),
        (["--gpus-per-node", "-1"], "--gpus-per-node -1: must be >= 0"),
        (["--elastic", "5:2"], "--elastic '5:2': expected MIN:MAX"),
        (["--elastic", "2:4", "--nodes", "5"], "--nodes 5 is outside --elastic 2:4"),
        (["--set", "nodez=3"], "values: additional properties 'nodez' not allowed"),
        (["--set", "run.steps=3"], "training settings go under train."),
        (["--set", "train.head.margins=[1.0, -0.1, 0]"], "config: head: margins m2 must be in [0, pi/2)"),
        (["--set", "train.optim.lr"], "--set 'train.optim.lr': expected section.key=value"),
        (["--image", ""], "--image '': expected an image reference"),
        (["--set", 'image.repository=""'], "values image.repository: minLength"),
        (["--name", "Exp_1"], "--name 'Exp_1': must be a DNS-1035 label"),
        (["--namespace", "ML!"], "--namespace 'ML!': must be a DNS-1123 label"),
        (["--config", "/nonexistent.yaml"], "config: cannot read config /nonexistent.yaml"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_sends_nothing(api, kubeconfig, args, message):
    proc = mfrctl("submit", *args, kubeconfig=kubeconfig)
    one_line_error(proc, 2, message)
    assert api.requests == []


def test_in_a_real_process_bad_input_and_a_missing_kubeconfig_exit_2_with_one_line(api, kubeconfig, tmp_path):
    def run(*args):
        return subprocess.run([*MFRCTL, "submit", *args], capture_output=True, text=True, timeout=60)

    one_line_error(run("--nodes", "0", "--kubeconfig", str(kubeconfig)), 2, "--nodes 0: a job needs at least 1 node")
    assert api.requests == []
    missing = tmp_path / "none"
    one_line_error(run("--kubeconfig", str(missing)), 2, f"no Kubernetes config: {missing} does not exist")


def test_unreachable_cluster_names_the_server_and_the_config(api, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, never listening: connection refused
        config = api.kubeconfig(tmp_path / "kc", server=dead)
        proc = mfrctl("list", kubeconfig=config)
    one_line_error(proc, 1, f"cannot reach the Kubernetes API server {dead} (context stand-in in {config})", "refused")


def test_context_chooses_cluster_namespace(api, kubeconfig):
    proc = mfrctl("list", "--context", "other", kubeconfig=kubeconfig)
    assert proc.returncode == 0, proc.stderr
    assert api.sent() == [("GET", "/apis/kubeflow.org/v1/namespaces/default/pytorchjobs")]
    proc = mfrctl("list", "--context", "nope", kubeconfig=kubeconfig)
    one_line_error(proc, 2, f"no context 'nope' in {kubeconfig} (it has: stand-in, other)")


# -- status, logs, delete, list ------------------------------------------------------------


def test_status_reads_jobs_the_sdk_models_cannot_parse(api, kubeconfig):
    """elasticPolicy.metrics breaks kubeflow-training 1.9.4's models: status reads raw dicts."""
    metrics = [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}]
    job = _job("exp1", elasticPolicy={"minReplicas": 2, "maxReplicas": 4, "metrics": metrics})
    job["spec"]["pytorchReplicaSpecs"] = {"Worker": {"replicas": 3}}
    api.put(JOBS, job)
    for i in range(3):
        api.add_pod("ml", "exp1", "worker", i)
    proc = mfrctl("status", "exp1", "-o", "json", kubeconfig=kubeconfig)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["job"]["state"] == "Running" and shown["job"]["mode"] == "elastic 2:4"
    assert [p["name"] for p in shown["pods"]] == ["exp1-worker-0", "exp1-worker-1", "exp1-worker-2"]
    assert shown["pods"][0] | {"restarts": 1} == {
        "name": "exp1-worker-0", "replica": "worker-0", "phase": "Running", "restarts": 1, "node": "gpu-node-0",
    }
    assert api.sent() == [("GET", f"{JOBS}/exp1"), ("GET", "/api/v1/namespaces/ml/pods")]
    assert api.requests[1].query["labelSelector"] == "training.kubeflow.org/job-name=exp1"
    table = mfrctl("status", "exp1", kubeconfig=kubeconfig).stdout
    assert table.splitlines()[0] == "exp1: Running (elastic 2:4; Worker x3; 8 process(es) per pod)"
    assert "exp1-worker-2   worker-2   Running" in table


def test_status_of_an_unknown_run(api, kubeconfig):
    proc = mfrctl("status", "nope", kubeconfig=kubeconfig)
    one_line_error(proc, 1, "no PyTorchJob nope in namespace ml (mfrctl list -n ml shows the runs)")


def test_logs_default_to_rank0_and_pick_replicas(api, kubeconfig):
    api.put(JOBS, _job("exp1"))
    api.add_pod("ml", "exp1", "master", 0, log="master says hi\n")
    for i in range(3):
        api.add_pod("ml", "exp1", "worker", i, log=f"worker {i} says hi\n")
    proc = mfrctl("logs", "exp1", kubeconfig=kubeconfig)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "master says hi\n"
    pods = next(r for r in api.requests if r.path == "/api/v1/namespaces/ml/pods")
    assert pods.query["labelSelector"] == "training.kubeflow.org/job-name=exp1,training.kubeflow.org/replica-type=master,training.kubeflow.org/replica-index=0"
    api.requests.clear()
    proc = mfrctl("logs", "exp1", "--replica", "worker", "--index", "1", kubeconfig=kubeconfig)
    assert proc.stdout == "worker 1 says hi\n"
    assert [r.path for r in api.requests] == ["/api/v1/namespaces/ml/pods", "/api/v1/namespaces/ml/pods/exp1-worker-1/log"]
    assert api.requests[1].query == {"container": "pytorch"}
    every = mfrctl("logs", "exp1", "--replica", "worker", kubeconfig=kubeconfig).stdout
    assert "==> exp1-worker-2 <==\nworker 2 says hi\n" in every
    one_line_error(mfrctl("logs", "exp1", "--index", "1", kubeconfig=kubeconfig), 2, "--index needs --replica")


def test_delete_removes_the_job_and_every_labelled_object(api, kubeconfig):
    assert mfrctl("submit", "--name", "exp1", *OWN_S3, kubeconfig=kubeconfig).returncode == 0
    api.put(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "other", "labels": {}}})
    api.requests.clear()
    proc = mfrctl("delete", "exp1", kubeconfig=kubeconfig)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "pytorchjob/exp1 deleted", "configmap/exp1-config deleted", "networkpolicy/exp1 deleted",
    ]
    assert api.sent() == [
        ("DELETE", f"{JOBS}/exp1"), ("DELETE", CONFIGMAPS), ("DELETE", "/api/v1/namespaces/ml/serviceaccounts"),
        ("DELETE", "/api/v1/namespaces/ml/secrets"), ("DELETE", "/api/v1/namespaces/ml/services"),
        ("DELETE", "/apis/apps/v1/namespaces/ml/deployments"), ("DELETE", NETPOLS),
        ("DELETE", PODMONITORS), ("DELETE", PROMETHEUSRULES),
    ]
    assert [r.query.get("labelSelector") for r in api.requests[1:]] == [RUN_SELECTOR] * 8
    assert list(api.objects[CONFIGMAPS]) == ["other"] and not api.objects[JOBS]
    one_line_error(mfrctl("delete", "exp1", kubeconfig=kubeconfig), 1, "no run exp1 in namespace ml")


def test_list_shows_only_this_charts_runs(api, kubeconfig):
    api.put(JOBS, _job("exp1"))
    stranger = _job("someone-elses")
    stranger["metadata"]["labels"] = {}
    api.put(JOBS, stranger)
    elsewhere = _job("exp2") | {"status": {}}
    elsewhere["metadata"]["namespace"] = "dev"
    api.put("/apis/kubeflow.org/v1/namespaces/dev/pytorchjobs", elsewhere)
    proc = mfrctl("list", "-o", "yaml", kubeconfig=kubeconfig)
    assert proc.returncode == 0, proc.stderr
    assert [(r["name"], r["state"]) for r in yaml.safe_load(proc.stdout)] == [("exp1", "Running")]
    assert api.requests[0].query == {"labelSelector": "app.kubernetes.io/name=mfr-trainer"}
    everywhere = mfrctl("list", "-A", kubeconfig=kubeconfig)
    assert api.requests[-1].path == "/apis/kubeflow.org/v1/pytorchjobs"
    rows = everywhere.stdout.splitlines()
    assert rows[0].split() == ["NAMESPACE", "NAME", "STATE", "MODE", "PODS", "AGE"]
    # in the API server's order: by namespace, then name
    assert [r.split()[:5] for r in rows[1:]] == [["dev", "exp2", "Pending", "static", "4"], ["ml", "exp1", "Running", "static", "4"]]
