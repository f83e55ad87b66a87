"""charts/mfr-trainer through the real Helm engine: lint, Kubernetes schemas, the operator's rules.

No cluster runs here: core objects are checked against the Kubernetes
OpenAPI schemas (kubernetes-validate, strict), the PyTorchJob against the
operator's CRD schema (../shared/crds, made strict) and its webhook's rules.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import tomllib
import yaml

from charts.generate import schema_path, values_schema
from mfr.ctl.chart import ChartError, chart_dir, parse_elastic, render
from mfr.trainer.config import demo_config_path, read_yaml
from tests.support.chart import KUBE_VERSION
from tests.support.operator_rules import crd_errors, webhook_errors, with_change

ROOT = Path(__file__).resolve().parents[1]

# Values that switch every branch of the templates on at least once.
MATRIX = {
    "defaults": {},
    "one-node": {"nodes": 1},
    "static-8x8gpu": {"nodes": 8, "gpusPerNode": 8, "resources": {"requests": {"cpu": "32", "memory": "256Gi"}}},
    "elastic": {"nodes": 6, "gpusPerNode": 8, "elastic": {"enabled": True, "minNodes": 4, "maxNodes": 8}},
    "elastic-own-rdzv": {
        "elastic": {"enabled": True, "rdzvHost": "mfr-rdzv.ml.svc", "rdzvPort": 29400, "rdzvConf": {}},
        "nodes": 2,
    },
    "gang-volcano": {
        "gang": {"enabled": True, "queue": "research", "scheduleTimeoutSeconds": 600},
        "priorityClassName": "training-high",
        "schedulerName": "volcano",
    },
    "placement": {
        "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "mfr-trainer"}},
                        },
                    }
                ]
            }
        },
        "podAnnotations": {"team": "faces"},
        "podLabels": {"cost-center": "ml"},
        "imagePullSecrets": [{"name": "regcred"}],
    },
    "s3-envfrom": {"s3": {"existingSecret": "mfr-s3"}, "train": {"checkpoint": {"uri": "s3://bucket/runs/a"}}},
    "s3-keys-and-env": {
        "s3": {"existingSecret": "mfr-s3", "secretKeys": {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "key"}},
        "env": [{"name": "NCCL_DEBUG", "value": "WARN"}],
        "train": {"checkpoint": {"uri": "s3://bucket/runs/b"}},
    },
    "service-account-pvc": {
        "serviceAccount": {"create": True, "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/mfr"}},
        "workspace": {"existingClaim": "mfr-runs"},
        "ttlSecondsAfterFinished": None,
        "activeDeadlineSeconds": 86400,
        "image": {"repository": "registry.example.com/ml/mfr-trainer", "digest": "sha256:" + "a" * 64},
    },
}


def _render(values: dict, name: str = "mfr") -> list[dict]:
    return render(values, name=name, namespace="ml").objects


def _job(objects: list[dict]) -> dict:
    (job,) = [o for o in objects if o["kind"] == "PyTorchJob"]
    return job


@pytest.mark.parametrize("case", MATRIX)
def test_helm_lint_is_clean(case):
    report = helm_python.lint(chart_dir(), MATRIX[case], strict=True, namespace="ml", kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == [] and report["messages"] == [], report


@pytest.mark.parametrize("case", MATRIX)
def test_core_objects_and_pod_templates_pass_kubernetes_strict_schemas(case):
    objects = _render(MATRIX[case])
    core = [o for o in objects if o["apiVersion"] in ("v1", "apps/v1", "networking.k8s.io/v1")]
    assert {o["kind"] for o in core} >= {"ConfigMap"}
    for obj in core:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    for rtype, spec in _job(objects)["spec"]["pytorchReplicaSpecs"].items():
        template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": rtype.lower()},
            "template": spec["template"],
        }
        kubernetes_validate.validate(template, KUBE_VERSION, strict=True)


def test_kubernetes_strict_schema_catches_a_misspelled_field():
    (configmap,) = [o for o in _render({}) if o["kind"] == "ConfigMap"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**configmap, "dta": {}}, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("case", MATRIX)
def test_pytorchjob_passes_the_strict_crd_schema_and_the_webhook(case):
    job = _job(_render(MATRIX[case]))
    assert crd_errors(job) == []
    assert webhook_errors(job) == []


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("spec.runPolicy.backofLimit", 3, "Additional properties are not allowed ('backofLimit'"),
        ("spec.elasticPolicy", {"minReplica": 1}, "Additional properties are not allowed ('minReplica'"),
        ("spec.runPolicy.backoffLimit", "six", "is not of type 'integer'"),
    ],
)
def test_strict_crd_schema_catches_misspelled_and_wrong_fields(path, value, expected):
    job = with_change(_job(_render({})), path, value)
    assert any(expected in e for e in crd_errors(job)), crd_errors(job)


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("spec.pytorchReplicaSpecs.Master.replicas", 2, "Master].replicas: must be 1"),
        ("spec.pytorchReplicaSpecs.Worker.replicas", 0, "Worker].replicas: must be at least 1"),
        ("spec.pytorchReplicaSpecs.Worker.template.spec.containers.0.name", "trainer", "container with name pytorch"),
        ("spec.elasticPolicy", {"minReplicas": 1, "maxReplicas": 2}, None),  # static job made elastic: has Worker, fine
    ],
)
def test_webhook_rules_reject_broken_jobs(path, value, expected):
    errors = webhook_errors(with_change(_job(_render({})), path, value))
    assert (expected is None and errors == []) or any(expected in e for e in errors), errors


def test_elastic_job_without_workers_is_rejected_by_the_webhook():
    job = _job(_render({"nodes": 1}))  # Master only
    assert webhook_errors(with_change(job, "spec.elasticPolicy", {"maxReplicas": 2})) == [
        "spec.pytorchReplicaSpecs[Worker]: must be configured if elastic policy is used"
    ]


def test_static_job_shape():
    job = _job(_render({"nodes": 8, "gpusPerNode": 8}))
    spec = job["spec"]
    assert spec["nprocPerNode"] == "8"
    assert spec["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 7
    assert "elasticPolicy" not in spec
    for rspec in spec["pytorchReplicaSpecs"].values():
        assert rspec["restartPolicy"] == "ExitCode"
        pod = rspec["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch"
        assert container["ports"] == [{"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"}]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["terminationGracePeriodSeconds"] > 30  # torchrun's SIGTERM-to-SIGKILL window for the checkpoint
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_elastic_job_shape():
    job = _job(_render(MATRIX["elastic"]))
    spec = job["spec"]
    assert list(spec["pytorchReplicaSpecs"]) == ["Worker"]
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 6
    policy = spec["elasticPolicy"]
    assert (policy["minReplicas"], policy["maxReplicas"], policy["rdzvBackend"]) == (4, 8, "c10d")
    conf = {c["key"]: c["value"] for c in policy["rdzvConf"]}
    assert conf["last_call_timeout"] == "5" and conf["keep_alive_interval"] == "1"
    assert conf["keep_alive_max_attempt"] == "3"
    assert "rdzvHost" not in policy  # the operator's default: <job>-worker-0


def test_gang_scheduling_policy():
    job = _job(_render(MATRIX["gang-volcano"]))
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {
        "minAvailable": 2,
        "queue": "research",
        "priorityClass": "training-high",
        "scheduleTimeoutSeconds": 600,
    }
    elastic = _job(_render({**MATRIX["elastic"], "gang": {"enabled": True}}))
    assert elastic["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 4}


def test_configmap_holds_the_train_config_the_pods_read():
    objects = _render({"train": {"run": {"steps": 70}}})
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap"]
    config = yaml.safe_load(configmap["data"]["config.yaml"])
    assert config["run"]["steps"] == 70 and config["head"]["num_classes"] == 256
    pod = _job(objects)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    (container,) = pod["containers"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    volume = next(v for v in pod["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert container["args"] == ["--config", f"{mount['mountPath']}/config.yaml"]


def test_every_object_carries_the_run_labels():
    for obj in _render(MATRIX["service-account-pvc"], name="exp-7"):
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "exp-7"
        assert labels["app.kubernetes.io/name"] == "mfr-trainer"


SECRET_WORDS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "PASSWORD", "TOKEN", "SECRET")


@pytest.mark.parametrize("case", ["s3-envfrom", "s3-keys-and-env"])
def test_no_secret_value_in_the_output(case):
    objects = _render(MATRIX[case])
    assert not any(o["kind"] == "Secret" for o in objects)
    for rspec in _job(objects)["spec"]["pytorchReplicaSpecs"].values():
        (container,) = rspec["template"]["spec"]["containers"]
        for var in container.get("env", []):
            if any(word in var["name"] for word in SECRET_WORDS):
                assert "value" not in var and "secretKeyRef" in var["valueFrom"], var
        refs = [e["secretRef"]["name"] for e in container.get("envFrom", [])]
        refs += [v["valueFrom"]["secretKeyRef"]["name"] for v in container.get("env", []) if "valueFrom" in v]
        assert set(refs) == {"mfr-s3"}


def test_credentials_have_no_place_in_values_or_config():
    with pytest.raises(ChartError, match="additional properties 'accessKey' not allowed"):
        _render({"s3": {"accessKey": "AKIA..."}})
    with pytest.raises(ChartError, match="storage_options must not hold credentials"):
        _render({"train": {"checkpoint": {"storage_options": {"secret": "x"}}}})


def test_values_schema_train_part_matches_trainconfig():
    """Fails when TrainConfig changed and `python -m charts.generate` was not run."""
    current = json.loads(schema_path().read_text())
    assert current == values_schema(current)


def test_chart_default_train_config_is_the_builtin_demo():
    with helm_python.Chart.load(chart_dir()) as chart:
        assert chart.values["train"] == read_yaml(demo_config_path())


def test_every_value_is_documented():
    """helm-create convention: a comment above every value in values.yaml, or above its parent block."""
    documented_at: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    undocumented, previous = [], ""
    for line in (chart_dir() / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "- ")):
            indent = len(line) - len(line.lstrip())
            documented_at = [(i, d) for i, d in documented_at if i < indent]
            documented = previous.startswith("#") or any(d for _, d in documented_at)
            if not stripped.endswith(":") and not documented:
                undocumented.append(stripped.split(":")[0])
            documented_at.append((indent, previous.startswith("#") and previous != "#"))
        if stripped:
            previous = stripped
    assert undocumented == []


def test_image_and_pod_command_are_what_the_dockerfile_builds():
    """No container engine runs here: check the pieces the image and the chart must agree on."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    chart = yaml.safe_load((chart_dir() / "Chart.yaml").read_text())
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == version  # the default image tag is the package version
    job = _job(_render({}))
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == f"mfr-trainer:{version}"
    assert 'pip install ".[train]"' in dockerfile
    assert f"USER {pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" in dockerfile
    assert f"WORKDIR {container['workingDir']}" in dockerfile
    assert f"CMD {json.dumps([*container['command'], *container['args']])}" in dockerfile


def test_pod_command_runs_from_the_package_install():
    """The container's command, as the image's PATH would resolve it: python with mfr[train] installed."""
    container = _job(_render({}))["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([*container["command"], "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # torchrun started the trainer module, which printed its own usage
    assert proc.stdout.startswith("usage: python -m mfr.trainer") and "--config" in proc.stdout


def test_render_error_from_the_chart_itself_is_one_line():
    with pytest.raises(ChartError, match=r"^nodes 9 is outside elastic.minNodes..maxNodes 1..4$"):
        _render({"nodes": 9, "elastic": {"enabled": True}})


# Elastic ranges, MIN:MAX and nodes: which rule each breaks, as mfrctl (--elastic, --nodes) and the chart
# (elastic.minNodes/maxNodes, nodes: schema, then the template) word it.
ELASTIC_RULES = {
    "range": (
        r"^--elastic '\d+:\d+': expected MIN:MAX with 1 <= MIN <= MAX",
        r"^(values elastic\.minNodes: minimum: got 0, want 1|elastic\.minNodes\.\.maxNodes \d+\.\.\d+: "
        r"expected 1 <= minNodes <= maxNodes)",
    ),
    "nodes": (r"^--nodes \d+ is outside --elastic \d+:\d+$", r"^nodes \d+ is outside elastic\.minNodes\.\.maxNodes"),
}


@pytest.mark.parametrize(
    "low, high, nodes, rule",
    [
        (3, 1, 2, "range"),
        (0, 2, 1, "range"),
        (2, 4, 5, "nodes"),
        (2, 4, 1, "nodes"),
        (2, 4, 3, None),
        (3, 3, 3, None),
    ],
)
def test_mfrctl_and_the_chart_reject_the_same_elastic_ranges(low, high, nodes, rule):
    values = {"nodes": nodes, "elastic": {"enabled": True, "minNodes": low, "maxNodes": high}}
    if rule is None:
        assert parse_elastic(f"{low}:{high}", nodes) == (low, high)
        policy = _job(_render(values))["spec"]["elasticPolicy"]
        assert (policy["minReplicas"], policy["maxReplicas"]) == (low, high)
        return
    python, chart = ELASTIC_RULES[rule]
    with pytest.raises(ChartError, match=python):
        parse_elastic(f"{low}:{high}", nodes)
    with pytest.raises(ChartError, match=chart):
        _render(values)


def test_notes_say_where_checkpoints_go():
    notes = render({}, name="mfr", namespace="ml").notes
    assert "Checkpoints: s3://mfr/ml/mfr/checkpoints on the trial S3 store mfr-s3" in notes
    assert "not for production data" in notes
    on_s3 = render({"train": {"checkpoint": {"uri": "s3://bucket/runs"}}}, name="mfr", namespace="ml").notes
    assert "Checkpoints: s3://bucket/runs (every pod resumes" in on_s3 and "trial" not in on_s3
    on_claim = render({"workspace": {"existingClaim": "runs"}}, name="mfr", namespace="ml").notes
    assert "Checkpoints: /workspace/checkpoints/mfr" in on_claim
    single = render({"nodes": 1, "trialStore": {"enabled": False}}, name="mfr", namespace="ml").notes
    assert "Warning: checkpoints go to <run.output_dir>/checkpoints in the pod's own emptyDir" in single
