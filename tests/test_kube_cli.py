"""mfrctl submit | status | describe | logs | delete | list against a stand-in Kubernetes API server.

There is no Kubernetes API server on these machines (no container runtime,
no etcd), so tests/support/apiserver/ serves the REST calls over real HTTP on
127.0.0.1, written from the Kubernetes API conventions (namespaces, strict
field validation against the OpenAPI and CRD schemas, 404/409/422 Status
objects, resourceVersions, garbage collection by ownerReference, watch); mfrctl
runs with the real kubernetes client, through a kubeconfig.  The tests check
the exact requests sent, and that bad input sends none.  mfrctl runs in this
process (typer's CliRunner: the client libraries take seconds to import),
except where a real process is the point.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import pytest
import yaml

from tests.support.apiserver import TOKEN, ApiServer
from tests.support.cli import MFRCTL, OWN_S3, mfrctl, one_line_error
from tests.support.kube_paths import CONFIGMAPS, JOBS, NETPOLS, PODS

NAMESPACE = "/api/v1/namespaces/ml"
DISCOVER_JOBS = "/apis/kubeflow.org/v1"
DISCOVER_MONITORING = "/apis/monitoring.coreos.com/v1"
RUN_SELECTOR = "app.kubernetes.io/name=mfr-trainer,app.kubernetes.io/instance=exp1"
DISCOVER_TRAINER = "/apis/trainer.kubeflow.org/v1alpha1"
# What submit reads before it creates anything: whether Trainer v2 is there (--api auto), the namespace, the
# operator's API, the prometheus-operator's, and whether the name is taken.
PREFLIGHT = [
    ("GET", DISCOVER_TRAINER),
    ("GET", NAMESPACE),
    ("GET", DISCOVER_JOBS),
    ("GET", DISCOVER_MONITORING),
    ("GET", f"{JOBS}/exp1"),
]


def without_discovery(api: ApiServer) -> list[tuple[str, str]]:
    """The requests that read or write objects (discovery, /apis/<group>/<version>, is asked once per command)."""
    return [(m, path) for m, path in api.sent() if path.count("/") > 3]


@pytest.fixture
def api():
    server = ApiServer(monitoring_crds=False).start()
    yield server
    server.stop()


def rendered(*args: str) -> list[dict]:
    proc = mfrctl("render", "-o", "json", "--namespace", "ml", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["items"]


def _job(name: str, **spec_extra) -> dict:
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {
            "name": name,
            "namespace": "ml",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {"app.kubernetes.io/name": "mfr-trainer", "app.kubernetes.io/instance": name},
        },
        "spec": {
            "nprocPerNode": "8",
            "pytorchReplicaSpecs": {"Master": {"replicas": 1}, "Worker": {"replicas": 3}},
            **spec_extra,
        },
        "status": {
            "conditions": [
                {"type": "Created", "status": "True", "message": "created"},
                {"type": "Running", "status": "True", "message": "PyTorchJob exp1 is running."},
            ]
        },
    }


def _stored(api: ApiServer, collection: str, name: str) -> dict:
    return api.objects[collection][name]


# -- submit -------------------------------------------------------------------------------


def test_submit_creates_the_rendered_objects_with_exact_requests(api, kubeconfig):
    args = [
        "--name",
        "exp1",
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--image",
        "reg.example.com/mfr-trainer:1.2",
        *OWN_S3,
    ]
    proc = mfrctl("submit", *args, kubeconfig=kubeconfig)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "networkpolicy/exp1 created",
        "configmap/exp1-config created",
        "pytorchjob/exp1 created",
    ]
    assert "mfrctl logs exp1 -n ml -f" in proc.stderr  # the chart's NOTES say how to follow the run
    assert api.sent() == [
        *PREFLIGHT,
        ("POST", NETPOLS),
        ("POST", CONFIGMAPS),
        ("POST", JOBS),
        ("PATCH", f"{NETPOLS}/exp1"),
        ("PATCH", f"{CONFIGMAPS}/exp1-config"),  # owned by the job, now its uid is known
    ]
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in api.requests)
    posts = [r for r in api.requests if r.method == "POST"]
    assert [r.body for r in posts] == rendered(*args)  # exactly what render prints, in install order
    assert all(r.query == {"fieldManager": "mfrctl", "fieldValidation": "Strict"} for r in posts)
    job = _stored(api, JOBS, "exp1")
    assert job["metadata"]["labels"]["app.kubernetes.io/instance"] == "exp1"
    for collection, name in ((NETPOLS, "exp1"), (CONFIGMAPS, "exp1-config")):
        (owner,) = _stored(api, collection, name)["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("PyTorchJob", "exp1", job["metadata"]["uid"])
    config = yaml.safe_load(_stored(api, CONFIGMAPS, "exp1-config")["data"]["config.yaml"])
    assert config["checkpoint"]["uri"] == "s3://bucket/runs/exp1"


def test_submit_of_the_demo_brings_its_trial_store_first(api, kubeconfig):
    proc = mfrctl("submit", "--name", "exp1", "--nodes", "2", kubeconfig=kubeconfig)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "networkpolicy/exp1 created",
        "networkpolicy/exp1-s3 created",
        "secret/exp1-s3 created",
        "configmap/exp1-config created",
        "service/exp1-s3 created",
        "deployment/exp1-s3 created",
        "pytorchjob/exp1 created",
    ]
    assert [path for method, path in api.sent() if method == "POST"] == [
        NETPOLS,
        NETPOLS,
        "/api/v1/namespaces/ml/secrets",
        CONFIGMAPS,
        "/api/v1/namespaces/ml/services",
        "/apis/apps/v1/namespaces/ml/deployments",
        JOBS,
    ]
    secret = _stored(api, "/api/v1/namespaces/ml/secrets", "exp1-s3")
    assert secret["data"]["AWS_SECRET_ACCESS_KEY"] not in proc.stdout + proc.stderr  # never printed
    assert "trial S3 store exp1-s3" in proc.stderr and "not for production data" in proc.stderr


def test_submit_of_a_multi_pod_job_without_shared_checkpoints_exits_2_and_sends_nothing(api, kubeconfig):
    real_data = ["--set", "train.data.source=folder", "--set", "train.data.uri=s3://faces/train"]
    proc = mfrctl("submit", "--name", "exp1", "--nodes", "8", *real_data, kubeconfig=kubeconfig)
    one_line_error(
        proc,
        2,
        "a job of 8 pods has no checkpoint storage that every pod can reach",
        "--checkpoint s3://BUCKET/PREFIX",
        "--workspace-claim NAME",
    )
    assert api.requests == []
    claim = mfrctl(
        "submit", "--name", "exp1", "--nodes", "8", *real_data, "--workspace-claim", "runs", kubeconfig=kubeconfig
    )
    assert claim.returncode == 0, claim.stderr
    config = yaml.safe_load(_stored(api, CONFIGMAPS, "exp1-config")["data"]["config.yaml"])
    assert config["checkpoint"]["uri"] == "/workspace/checkpoints/exp1"
    pod = _stored(api, JOBS, "exp1")["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert {"name": "workspace", "persistentVolumeClaim": {"claimName": "runs"}} in pod["volumes"]


def test_submit_dry_run_server_sends_dry_run_requests_and_stores_nothing(api, kubeconfig):
    proc = mfrctl("submit", "--name", "exp1", "--dry-run", "server", *OWN_S3, kubeconfig=kubeconfig)
    assert proc.returncode == 0, proc.stderr
    assert "pytorchjob/exp1 created (server dry run)" in proc.stdout
    assert [r.query.get("dryRun") for r in api.requests if r.method == "POST"] == ["All", "All", "All"]
    assert not [r for r in api.requests if r.method == "PATCH"]
    assert list(api.objects) == ["/api/v1/namespaces"]  # nothing but the namespaces that were there


def test_submit_dry_run_client_sends_nothing_but_its_reads(api, kubeconfig):
    proc = mfrctl("submit", "--name", "exp1", "--dry-run", "client", *OWN_S3, kubeconfig=kubeconfig)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "networkpolicy/exp1 created (dry run)",
        "configmap/exp1-config created (dry run)",
        "pytorchjob/exp1 created (dry run)",
    ]
    assert api.sent("POST") == [] and api.sent("PATCH") == []


def test_submit_refuses_a_name_that_exists(api, kubeconfig):
    api.put(JOBS, _job("exp1"))
    proc = mfrctl("submit", "--name", "exp1", *OWN_S3, kubeconfig=kubeconfig)
    one_line_error(
        proc, 1, "PyTorchJob exp1 already exists in namespace ml", "another --name", "mfrctl delete exp1 -n ml"
    )
    assert api.sent("POST") == []


def test_submit_names_a_leftover_object_of_the_same_run(api, kubeconfig):
    api.put(CONFIGMAPS, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "exp1-config"}})
    proc = mfrctl("submit", "--name", "exp1", *OWN_S3, kubeconfig=kubeconfig)
    one_line_error(
        proc, 1, "cannot create ConfigMap exp1-config: it already exists in namespace ml", "mfrctl delete exp1 -n ml"
    )
    assert api.sent()[len(PREFLIGHT) :] == [("POST", NETPOLS), ("POST", CONFIGMAPS), ("DELETE", f"{NETPOLS}/exp1")]
    assert JOBS not in api.objects


def test_submit_rolls_back_when_the_webhook_denies_the_job(api, kubeconfig):
    api.denied["pytorchjobs"] = (
        'admission webhook "validator.pytorchjob.training-operator.kubeflow.org" denied the request'
    )
    proc = mfrctl("submit", "--name", "exp1", *OWN_S3, kubeconfig=kubeconfig)
    one_line_error(
        proc,
        1,
        "cannot create PyTorchJob exp1 (HTTP 403): admission webhook",
        "removed what was created: networkpolicy/exp1, configmap/exp1-config",
    )
    assert api.sent()[len(PREFLIGHT) :] == [
        ("POST", NETPOLS),
        ("POST", CONFIGMAPS),
        ("POST", JOBS),
        ("DELETE", f"{CONFIGMAPS}/exp1-config"),
        ("DELETE", f"{NETPOLS}/exp1"),
    ]
    assert not api.objects[CONFIGMAPS] and not api.objects[NETPOLS]


def test_submit_without_the_operator_says_how_to_install_it_and_sends_no_write(api, kubeconfig):
    api.crd_installed = False
    proc = mfrctl("submit", "--name", "exp1", *OWN_S3, kubeconfig=kubeconfig)
    one_line_error(proc, 1, "kubeflow.org/v1 not served", "install the Kubeflow training operator v1.9")
    assert api.sent("POST") == []


def test_a_missing_namespace_is_named_and_nothing_is_written(api, kubeconfig):
    proc = mfrctl("submit", "--name", "exp1", "-n", "nowhere", *OWN_S3, kubeconfig=kubeconfig)
    one_line_error(proc, 1, 'namespace "nowhere" not found', "kubectl create namespace nowhere")
    assert api.sent("POST") == []


def test_the_api_server_refuses_what_the_schema_does_not_know(api, kubeconfig):
    """fieldValidation=Strict: a field the API server does not know is an error, not silently dropped."""
    objects = rendered("--name", "exp1", *OWN_S3)
    job = next(o for o in objects if o["kind"] == "PyTorchJob")
    job["spec"]["runPolicy"]["backofLimit"] = 3  # what a hand-edited or stale render could hold
    from mfr.ctl.kube import ClusterError, connect

    cluster = connect(str(kubeconfig))
    with pytest.raises(ClusterError, match=r"(?s)cannot create PyTorchJob exp1 \(HTTP (400|422)\).*backofLimit"):
        cluster.create_run(objects)
    assert JOBS not in api.objects or not api.objects[JOBS]


def test_submit_wait_reports_the_final_state(api, kubeconfig):
    def operator(obj):
        if obj["kind"] == "PyTorchJob":
            threading.Timer(0.2, api.set_job_condition, ("ml", "exp1", "Succeeded"), {"message": "done"}).start()

    api.on_create = operator
    proc = mfrctl("submit", "--name", "exp1", "--wait", *OWN_S3, kubeconfig=kubeconfig)
    assert proc.returncode == 0, proc.stderr
    assert "mfr: exp1 Succeeded: done" in proc.stderr


def test_submit_wait_gives_up_at_its_timeout_with_the_jobs_state(api, kubeconfig, monkeypatch):
    monkeypatch.setattr("mfr.ctl.kube.POLL_SECONDS", 0.1)
    api.on_create = lambda obj: (
        obj["kind"] == "PyTorchJob" and threading.Timer(0.1, api.set_job_condition, ("ml", "exp1", "Running")).start()
    )
    started = time.monotonic()
    proc = mfrctl("submit", "--name", "exp1", "--wait", "--timeout", "2s", *OWN_S3, kubeconfig=kubeconfig)
    assert time.monotonic() - started < 30
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: timed out after 2s: exp1 is Running (mfrctl status exp1 -n ml)"
    )


def test_submit_follow_streams_rank0_log_and_fails_with_the_job(api, kubeconfig, monkeypatch):
    monkeypatch.setattr("mfr.ctl.kube.POLL_SECONDS", 0.1)

    def operator(obj):
        if obj["kind"] == "PyTorchJob":
            api.add_pod("ml", "exp1", "master", 0, phase="Running", log="step 1 loss 5.5\nstep 2 loss 5.1\n")

            def fail():
                api.set_pod_phase("ml", "exp1-master-0", "Failed", exit_code=1)
                api.set_job_condition("ml", "exp1", "Failed", message="master exited 1")

            threading.Timer(0.5, fail).start()

    api.on_create = operator
    proc = mfrctl("submit", "--name", "exp1", "--follow", *OWN_S3, kubeconfig=kubeconfig)
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
        (["--set", "nodes=3", "--set", "nodes.x=1"], "nodes.x: nodes is a value, not a section"),
        (["--image", ""], "--image '': expected an image reference"),
        (["--set", 'image.repository=""'], "values image.repository: minLength"),
        (["--name", "Exp_1"], "--name 'Exp_1': must be a DNS-1035 label"),
        (["--namespace", "ML!"], "--namespace 'ML!': must be a DNS-1123 label"),
        (["--config", "/nonexistent.yaml"], "config: cannot read config /nonexistent.yaml"),
        (["--queue", "Team A"], "--queue 'Team A': not a Kueue LocalQueue name"),
        (["--timeout", "soon", "--wait"], "--timeout 'soon': expected a duration like 90s, 30m or 2h30m"),
        (["--set", "tolerations=[{key: gpu, efect: NoSchedule}]"], "additional properties 'efect' not allowed"),
        (["--set", "env=[{name: AWS_SECRET_ACCESS_KEY, value: hunter2}]"], "holds a literal value"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_sends_nothing(api, kubeconfig, args, message):
    proc = mfrctl("submit", *args, kubeconfig=kubeconfig)
    line = one_line_error(proc, 2, message)
    assert api.requests == [] and "hunter2" not in line


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
    assert without_discovery(api) == [("GET", "/apis/kubeflow.org/v1/namespaces/default/pytorchjobs")]
    proc = mfrctl("list", "--context", "nope", kubeconfig=kubeconfig)
    one_line_error(proc, 2, f"no context 'nope' in {kubeconfig} (it has: stand-in, other)")


# -- status, describe, logs, list -----------------------------------------------------------


def test_status_reads_jobs_any_client_model_would_choke_on(api, kubeconfig):
    """elasticPolicy.metrics broke kubeflow-training 1.9.4's models: mfrctl reads raw objects."""
    target = {"type": "Utilization", "averageUtilization": 80}
    metrics = [{"type": "Resource", "resource": {"name": "cpu", "target": target}}]
    job = _job("exp1", elasticPolicy={"minReplicas": 2, "maxReplicas": 4, "metrics": metrics})
    job["spec"]["pytorchReplicaSpecs"] = {"Worker": {"replicas": 3}}
    api.put(JOBS, job)
    for i in range(3):
        api.add_pod("ml", "exp1", "worker", i)
    table = mfrctl("status", "exp1", kubeconfig=kubeconfig)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0] == "exp1: Running (elastic 2:4; Worker x3; 8 process(es) per pod)"
    assert "exp1-worker-2   worker-2   Running" in table.stdout
    assert without_discovery(api) == [("GET", f"{JOBS}/exp1"), ("GET", PODS)]
    assert api.requests[-1].query["labelSelector"] == "training.kubeflow.org/job-name=exp1"


def test_status_and_list_print_the_objects_themselves_with_o(api, kubeconfig):
    api.put(JOBS, _job("exp1"))
    shown = yaml.safe_load(mfrctl("status", "exp1", "-o", "yaml", kubeconfig=kubeconfig).stdout)
    assert shown["kind"] == "PyTorchJob" and shown["metadata"]["name"] == "exp1"
    assert shown["status"]["conditions"][-1]["type"] == "Running" and shown["spec"]["nprocPerNode"] == "8"
    listed = json.loads(mfrctl("list", "-o", "json", kubeconfig=kubeconfig).stdout)
    assert listed["kind"] == "List" and [i["metadata"]["name"] for i in listed["items"]] == ["exp1"]


def test_status_of_an_unknown_run(api, kubeconfig):
    proc = mfrctl("status", "nope", kubeconfig=kubeconfig)
    one_line_error(proc, 1, "no PyTorchJob nope in namespace ml (mfrctl list -n ml shows the runs)")


def test_describe_shows_conditions_restarts_pods_exit_codes_and_events(api, kubeconfig):
    api.operator = True
    assert mfrctl("submit", "--name", "exp1", "--nodes", "3", *OWN_S3, kubeconfig=kubeconfig).returncode == 0
    api.set_job_condition("ml", "exp1", "Running")
    for pod, node in (("exp1-master-0", "gpu-a"), ("exp1-worker-0", "gpu-b"), ("exp1-worker-1", "gpu-c")):
        api.set_pod_phase("ml", pod, "Running", node=node)
    api.set_pod_phase("ml", "exp1-worker-1", "Failed", exit_code=137, reason="OOMKilled")
    job = _stored(api, JOBS, "exp1")
    api.set_job_condition(
        "ml",
        "exp1",
        "Restarting",
        reason="PyTorchJobRestarting",
        message="PyTorchJob exp1 is restarting because 1 Worker replica(s) failed.",
    )
    api.emit_event(job, "ExitedWithCode", "Pod: ml.exp1-worker-1 exited with code 137", type_="Normal")
    api.emit_event(_stored(api, PODS, "exp1-worker-1"), "OOMKilling", "Memory cgroup out of memory", type_="Warning")
    report = json.loads(mfrctl("describe", "exp1", "-o", "json", kubeconfig=kubeconfig).stdout)
    assert [c["type"] for c in report["conditions"]][-1] == "Restarting"
    (failed,) = [p for p in report["pods"] if p["name"] == "exp1-worker-1"]
    assert (failed["node"], failed["phase"], failed["exit_code"], failed["reason"]) == (
        "gpu-c",
        "Failed",
        137,
        "OOMKilled",
    )
    assert report["restarts"] >= 1
    assert any(e["reason"] == "ExitedWithCode" and "137" in e["message"] for e in report["events"])
    assert any(e["object"] == "pod/exp1-worker-1" and e["reason"] == "OOMKilling" for e in report["events"])
    text = mfrctl("describe", "exp1", kubeconfig=kubeconfig).stdout
    assert "Restarting" in text and "OOMKilled" in text and "137" in text and "ExitedWithCode" in text


def test_logs_default_to_rank0_and_pick_replicas(api, kubeconfig):
    api.put(JOBS, _job("exp1"))
    api.add_pod("ml", "exp1", "master", 0, log="master says hi\n")
    for i in range(3):
        api.add_pod("ml", "exp1", "worker", i, log=f"worker {i} says hi\n")
    proc = mfrctl("logs", "exp1", kubeconfig=kubeconfig)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "master says hi\n"
    assert api.requests[-1].path == f"{PODS}/exp1-master-0/log" and api.requests[-1].query == {"container": "pytorch"}
    one = mfrctl("logs", "exp1", "--replica", "worker", "--index", "1", kubeconfig=kubeconfig)
    assert one.stdout == "worker 1 says hi\n"
    every = mfrctl("logs", "exp1", "--all-pods", kubeconfig=kubeconfig).stdout.splitlines()
    assert every == [
        "[master-0] master says hi",
        "[worker-0] worker 0 says hi",
        "[worker-1] worker 1 says hi",
        "[worker-2] worker 2 says hi",
    ]
    one_line_error(mfrctl("logs", "exp1", "--index", "1", kubeconfig=kubeconfig), 2, "--index needs --replica")


def test_logs_tail_since_and_previous_are_the_api_servers_own(api, kubeconfig):
    api.put(JOBS, _job("exp1"))
    api.add_pod("ml", "exp1", "master", 0, log="".join(f"line {i}\n" for i in range(10)))
    api.restart_container("ml", "exp1-master-0", exit_code=137, reason="OOMKilled")
    api.write_log("ml", "exp1-master-0", "after the restart\n")
    assert mfrctl("logs", "exp1", "--previous", "--tail", "2", kubeconfig=kubeconfig).stdout == "line 8\nline 9\n"
    assert mfrctl("logs", "exp1", kubeconfig=kubeconfig).stdout == "after the restart\n"
    mfrctl("logs", "exp1", "--since", "10m", "--tail", "5", kubeconfig=kubeconfig)
    assert api.requests[-1].query == {"container": "pytorch", "tailLines": "5", "sinceSeconds": "600"}


def test_logs_of_what_does_not_exist_say_so(api, kubeconfig):
    one_line_error(mfrctl("logs", "gone", kubeconfig=kubeconfig), 1, "no PyTorchJob gone in namespace ml")
    api.put(JOBS, _job("exp1"))
    one_line_error(
        mfrctl("logs", "exp1", "--replica", "worker", "--index", "99", kubeconfig=kubeconfig),
        1,
        "PyTorchJob exp1 has no worker 99: its workers are 0..2",
    )
    one_line_error(mfrctl("logs", "exp1", kubeconfig=kubeconfig), 1, "no logs of exp1 yet: its pods have not started")


def test_logs_follow_waits_for_pending_pods_then_streams_every_rank(api, kubeconfig):
    api.put(JOBS, _job("exp1"))
    for i in range(2):
        api.add_pod("ml", "exp1", "worker", i, phase="Pending")

    def start():
        for i in range(2):
            api.set_pod_phase("ml", f"exp1-worker-{i}", "Running")
            api.write_log("ml", f"exp1-worker-{i}", f"rank {i + 1} step 1\n")
        time.sleep(0.3)
        for i in range(2):
            api.set_pod_phase("ml", f"exp1-worker-{i}", "Succeeded", exit_code=0)

    threading.Timer(1.0, start).start()
    proc = mfrctl("logs", "exp1", "--replica", "worker", "-f", kubeconfig=kubeconfig)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.splitlines()) == ["[worker-0] rank 1 step 1", "[worker-1] rank 2 step 1"]


def test_logs_follow_of_pods_that_never_start_times_out_with_one_line(api, kubeconfig):
    api.put(JOBS, _job("exp1"))
    api.add_pod("ml", "exp1", "master", 0, phase="Pending")
    proc = mfrctl("logs", "exp1", "-f", "--pod-running-timeout", "1s", kubeconfig=kubeconfig)
    one_line_error(proc, 1, "no logs of exp1 yet: 1 pod(s) still Pending", "mfrctl describe exp1")


def test_list_shows_only_this_charts_runs(api, kubeconfig):
    api.put(JOBS, _job("exp1"))
    stranger = _job("someone-elses")
    stranger["metadata"]["labels"] = {}
    api.put(JOBS, stranger)
    elsewhere = _job("exp2") | {"status": {}}
    elsewhere["metadata"]["namespace"] = "dev"
    api.put("/apis/kubeflow.org/v1/namespaces/dev/pytorchjobs", elsewhere)
    proc = mfrctl("list", kubeconfig=kubeconfig)
    assert proc.returncode == 0, proc.stderr
    assert [row.split()[1] for row in proc.stdout.splitlines()[1:]] == ["exp1"]
    listed = next(r for r in api.requests if r.path == JOBS)
    assert listed.query == {"labelSelector": "app.kubernetes.io/name=mfr-trainer"}
    everywhere = mfrctl("list", "-A", kubeconfig=kubeconfig)
    assert api.requests[-1].path == "/apis/kubeflow.org/v1/pytorchjobs"
    rows = everywhere.stdout.splitlines()
    assert rows[0].split() == ["NAMESPACE", "NAME", "STATE", "MODE", "PODS", "AGE"]
    assert [r.split()[:5] for r in rows[1:]] == [
        ["dev", "exp2", "Pending", "static", "4"],
        ["ml", "exp1", "Running", "static", "4"],
    ]


# -- Kubeflow Trainer v2: TrainJobs ---------------------------------------------------------------

TRAINJOBS = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/ml/trainjobs"
RUNTIMES = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/ml/trainingruntimes"


def _trainjob_pod(api: ApiServer, job: str, index: int, log: str, phase: str = "Running") -> None:
    """A pod as Trainer v2's JobSet creates it for node ``index``."""
    api.put(
        PODS,
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{job}-node-0-{index}-x7k2q",
                "namespace": "ml",
                "labels": {
                    "jobset.sigs.k8s.io/jobset-name": job,
                    "jobset.sigs.k8s.io/replicatedjob-name": "node",
                    "batch.kubernetes.io/job-completion-index": str(index),
                },
            },
            "spec": {"nodeName": f"gpu-{index}", "containers": [{"name": "node", "image": "mfr-trainer:0.1.0"}]},
            "status": {
                "phase": phase,
                "containerStatuses": [
                    {
                        "name": "node",
                        "restartCount": 0,
                        "ready": True,
                        "image": "mfr-trainer:0.1.0",
                        "imageID": "",
                        "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
                    }
                ],
            },
        },
    )
    api.write_log("ml", f"{job}-node-0-{index}-x7k2q", log, container="node")


def test_submit_auto_picks_the_trainjob_for_a_static_run_where_trainer_v2_is_served(api, kubeconfig):
    proc = mfrctl("submit", "--name", "exp1", *OWN_S3, kubeconfig=kubeconfig)  # v1 only: a PyTorchJob
    assert proc.returncode == 0 and "pytorchjob/exp1 created" in proc.stdout
    api.trainer_v2 = True
    proc = mfrctl(
        "submit", "--name", "exp2", "--checkpoint", "s3://b/exp2", "--set", "s3.existingSecret=s", kubeconfig=kubeconfig
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-2:] == ["trainingruntime/exp2 created", "trainjob/exp2 created"]
    assert _stored(api, RUNTIMES, "exp2")["metadata"]["ownerReferences"][0]["kind"] == "TrainJob"
    elastic = mfrctl(
        "submit",
        "--name",
        "exp3",
        "--elastic",
        "2:4",
        "--checkpoint",
        "s3://b/exp3",
        "--set",
        "s3.existingSecret=s",
        kubeconfig=kubeconfig,
    )
    assert elastic.returncode == 0 and "pytorchjob/exp3 created" in elastic.stdout  # elastic: always a PyTorchJob
    forced = mfrctl(
        "submit",
        "--name",
        "exp4",
        "--api",
        "pytorchjob",
        "--checkpoint",
        "s3://b/exp4",
        "--set",
        "s3.existingSecret=s",
        kubeconfig=kubeconfig,
    )
    assert "pytorchjob/exp4 created" in forced.stdout
    one_line_error(
        mfrctl("submit", "--name", "exp5", "--api", "trainjob", "--elastic", "1:2", kubeconfig=kubeconfig),
        2,
        "elastic training runs as a PyTorchJob",
    )


def test_submit_of_a_trainjob_where_trainer_v2_is_not_served_says_so(api, kubeconfig):
    proc = mfrctl("submit", "--name", "exp1", "--api", "trainjob", *OWN_S3, kubeconfig=kubeconfig)
    one_line_error(proc, 1, "trainer.kubeflow.org/v1alpha1 not served", "install Kubeflow Trainer v2.3")
    assert api.sent("POST") == []


def test_status_logs_describe_list_and_delete_work_for_trainjobs(api, kubeconfig):
    api.trainer_v2 = True
    assert (
        mfrctl("submit", "--name", "tj", "--api", "trainjob", "--nodes", "2", *OWN_S3, kubeconfig=kubeconfig).returncode
        == 0
    )
    api.set_job_condition("ml", "tj", "Created", plural="trainjobs", message="TrainJob is created")
    for index in range(2):
        _trainjob_pod(api, "tj", index, f"rank {index} step 4/4\n")
    status = mfrctl("status", "tj", kubeconfig=kubeconfig).stdout.splitlines()
    assert status[0] == "tj: Created (static; Node x2; 1 process(es) per pod)"
    assert "tj-node-0-1-x7k2q   node-1" in "\n".join(status)
    assert mfrctl("logs", "tj", kubeconfig=kubeconfig).stdout == "rank 0 step 4/4\n"
    assert api.requests[-1].query == {"container": "node"}
    assert mfrctl("logs", "tj", "--all-pods", kubeconfig=kubeconfig).stdout.splitlines() == [
        "[node-0] rank 0 step 4/4",
        "[node-1] rank 1 step 4/4",
    ]
    one_pod = mfrctl("logs", "tj", "--replica", "node", "--index", "1", kubeconfig=kubeconfig)
    assert one_pod.stdout == "rank 1 step 4/4\n"
    api.set_job_condition("ml", "tj", "Complete", plural="trainjobs", message="TrainJob is completed")
    described = json.loads(mfrctl("describe", "tj", "-o", "json", kubeconfig=kubeconfig).stdout)
    assert described["job"]["kind"] == "TrainJob" and described["job"]["state"] == "Complete"
    assert [p["replica"] for p in described["pods"]] == ["node-0", "node-1"]
    rows = mfrctl("list", kubeconfig=kubeconfig).stdout.splitlines()
    assert [r.split()[1:3] for r in rows[1:]] == [["tj", "Complete"]]
    deleted = mfrctl("delete", "tj", kubeconfig=kubeconfig).stdout.splitlines()
    assert deleted[0] == "trainjob/tj deleted" and "trainingruntime/tj deleted" in deleted
    assert not api.objects[TRAINJOBS] and not api.objects[RUNTIMES]
