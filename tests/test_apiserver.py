"""The kube-apiserver stand-in (tests/support/apiserver) as the real kubernetes client sees it.

Every check goes through the kubernetes package's own API classes (CoreV1Api, AppsV1Api,
CustomObjectsApi, watch.Watch) over HTTP, and compares with what kube-apiserver 1.29 answers:
Status reason, code and details as the API conventions define them ("Response Status Kind"),
messages worded as k8s.io/apiserver words them.
"""

from __future__ import annotations

import json
import threading
import uuid
from datetime import datetime

import pytest
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from tests.support.apiserver import ApiServer

GROUP, VERSION, JOBS = "kubeflow.org", "v1", "pytorchjobs"


@pytest.fixture
def api():
    server = ApiServer().start()
    yield server
    server.stop()


def connect(api: ApiServer, tmp_path) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(api.kubeconfig(tmp_path / "kubeconfig")))


@pytest.fixture
def kube(api, tmp_path):
    return connect(api, tmp_path)


def status_of(err: ApiException) -> dict:
    return json.loads(err.body)


def configmap(name: str, **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels}, "data": {"k": "v"}}


def pod(name: str, *containers: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": c, "image": "busybox"} for c in containers or ("main",)]},
    }


def pytorchjob(name: str, workers=2) -> dict:
    def template():
        return {"spec": {"containers": [{"name": "pytorch", "image": "mfr-trainer:1"}]}}

    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PyTorchJob",
        "metadata": {"name": name},
        "spec": {
            "pytorchReplicaSpecs": {
                "Master": {"replicas": 1, "template": template()},
                "Worker": {"replicas": workers, "template": template()},
            }
        },
    }


def call(kube: client.ApiClient, method: str, path: str, body=None, content_type="application/json", **query):
    """A raw request, for what the generated API classes cannot send (apply patches) or hide (headers)."""
    return kube.call_api(
        path,
        method,
        query_params=list(query.items()),
        body=body,
        response_type="object",
        header_params={"Content-Type": content_type, "Accept": "application/json"},
        auth_settings=["BearerToken"],
        _return_http_data_only=False,
    )


# -- namespaces --------------------------------------------------------------------------


def test_namespaces_exist_or_are_not_found(api, kube):
    core = client.CoreV1Api(kube)
    assert [n.metadata.name for n in core.list_namespace().items] == ["default", "ml"]
    core.create_namespace({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "dev"}})
    assert core.read_namespace("dev").status.phase == "Active"
    with pytest.raises(ApiException) as err:
        core.create_namespaced_config_map("nope", configmap("a"))
    # The NamespaceLifecycle admission plugin: NotFound about the namespace, not about the ConfigMap.
    assert err.value.status == 404
    assert status_of(err.value) | {"metadata": {}} == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "code": 404,
        "reason": "NotFound",
        "message": 'namespaces "nope" not found',
        "details": {"name": "nope", "kind": "namespaces"},
    }
    with pytest.raises(ApiException) as err:
        core.read_namespace("nope")
    assert status_of(err.value)["details"] == {"name": "nope", "kind": "namespaces"}
    assert core.list_namespaced_config_map("nope").items == []  # as kube-apiserver: an empty list, no error
    core.delete_namespace("dev")
    assert "dev" not in [n.metadata.name for n in core.list_namespace().items]


def test_the_objects_namespace_must_be_the_requests(kube):
    core = client.CoreV1Api(kube)
    obj = configmap("a") | {"metadata": {"name": "a", "namespace": "default"}}
    with pytest.raises(ApiException) as err:
        core.create_namespaced_config_map("ml", obj)
    assert (err.value.status, status_of(err.value)["reason"], status_of(err.value)["message"]) == (
        400,
        "BadRequest",
        "the namespace of the provided object does not match the namespace sent on the request",
    )
    assert core.create_namespaced_config_map("default", obj).metadata.namespace == "default"


# -- field validation ----------------------------------------------------------------------


def test_field_validation_strict_warn_ignore_on_a_builtin_kind(kube):
    core = client.CoreV1Api(kube)
    bad = pod("p")
    bad["spec"]["foo"] = 1
    bad["spec"]["tolerations"] = [{"key": "gpu", "efect": "NoSchedule"}]
    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod("ml", bad, field_validation="Strict")
    assert err.value.status == 400 and status_of(err.value)["reason"] == "BadRequest"
    assert status_of(err.value)["message"] == (
        'Pod in version "v1" cannot be handled as a Pod: strict decoding error: '
        'unknown field "spec.foo", unknown field "spec.tolerations[0].efect"'
    )
    created, code, headers = core.create_namespaced_pod_with_http_info("ml", bad)  # Warn is the default
    assert code == 201 and created.spec.tolerations[0].effect is None
    assert headers.getlist("Warning") == [
        '299 - "unknown field \\"spec.foo\\""',
        '299 - "unknown field \\"spec.tolerations[0].efect\\""',
    ]
    quiet = bad | {"metadata": {"name": "q"}}
    _, _, headers = core.create_namespaced_pod_with_http_info("ml", quiet, field_validation="Ignore")
    assert headers.getlist("Warning") == []
    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod("ml", pod("r"), field_validation="strict")  # the values are case-sensitive
    assert err.value.status == 422 and "fieldValidation: Unsupported value" in status_of(err.value)["message"]


def test_builtin_types_and_required_fields(kube):
    core = client.CoreV1Api(kube)
    wrong_type = pod("p")
    wrong_type["spec"]["containers"] = "busybox"
    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod("ml", wrong_type)
    assert err.value.status == 400 and "cannot unmarshal string" in status_of(err.value)["message"]
    nameless = pod("p")
    del nameless["spec"]["containers"][0]["name"]
    with pytest.raises(ApiException) as err:
        core.create_namespaced_pod("ml", nameless)
    assert err.value.status == 422
    assert status_of(err.value)["message"] == 'Pod "p" is invalid: spec.containers[0].name: Required value'
    assert status_of(err.value)["details"] == {
        "name": "p",
        "kind": "Pod",
        "causes": [{"reason": "FieldValueRequired", "message": "Required value", "field": "spec.containers[0].name"}],
    }
    with pytest.raises(ApiException) as err:
        core.create_namespaced_config_map("ml", configmap("Bad_Name"))
    assert err.value.status == 422 and "a lowercase RFC 1123 subdomain" in status_of(err.value)["message"]


def test_pytorchjob_bodies_are_validated_against_the_vendored_crd(kube):
    jobs = client.CustomObjectsApi(kube)
    bad = pytorchjob("exp1")
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "two"
    del bad["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(ApiException) as err:
        jobs.create_namespaced_custom_object(GROUP, VERSION, "ml", JOBS, bad)
    status = status_of(err.value)
    assert (err.value.status, status["reason"]) == (422, "Invalid")
    assert status["details"]["name"] == "exp1" and status["details"]["kind"] == "PyTorchJob"
    assert status["details"]["group"] == GROUP
    assert sorted((c["field"], c["reason"]) for c in status["details"]["causes"]) == [
        ("spec.pytorchReplicaSpecs.Master.template.spec.containers[0].name", "FieldValueRequired"),
        ("spec.pytorchReplicaSpecs.Worker.replicas", "FieldValueTypeInvalid"),
    ]
    assert status["message"].startswith('PyTorchJob.kubeflow.org "exp1" is invalid: [')
    assert (
        'spec.pytorchReplicaSpecs.Worker.replicas: Invalid value: "string": spec.pytorchReplicaSpecs.Worker'
        '.replicas in body must be of type integer: "string"'
    ) in status["message"]
    unknown = pytorchjob("exp1")
    unknown["spec"]["foo"] = True
    with pytest.raises(ApiException) as err:
        jobs.create_namespaced_custom_object(GROUP, VERSION, "ml", JOBS, unknown, field_validation="Strict")
    assert status_of(err.value)["message"] == (
        'PyTorchJob in version "v1" cannot be handled as a PyTorchJob: strict decoding error: unknown field "spec.foo"'
    )
    created = jobs.create_namespaced_custom_object(GROUP, VERSION, "ml", JOBS, unknown)
    assert "foo" not in created["spec"]  # pruned, as a structural schema prunes


def test_resource_version_uid_generation_and_optimistic_concurrency(kube):
    core, apps = client.CoreV1Api(kube), client.AppsV1Api(kube)
    first = core.create_namespaced_config_map("ml", configmap("a"))
    assert uuid.UUID(first.metadata.uid).version == 4 and isinstance(first.metadata.creation_timestamp, datetime)
    stale = first.metadata.resource_version
    first.data = {"k": "w"}
    second = core.replace_namespaced_config_map("a", "ml", first)
    assert int(second.metadata.resource_version) > int(stale) and second.metadata.uid == first.metadata.uid
    first.metadata.resource_version = stale
    with pytest.raises(ApiException) as err:
        core.replace_namespaced_config_map("a", "ml", first)
    assert err.value.status == 409 and status_of(err.value)["reason"] == "Conflict"
    assert status_of(err.value)["message"] == (
        'Operation cannot be fulfilled on configmaps "a": the object has been modified; please apply your changes '
        "to the latest version and try again"
    )
    first.metadata.resource_version = None  # no resourceVersion: an unconditional update
    assert core.replace_namespaced_config_map("a", "ml", first).data == {"k": "w"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d"},
        "spec": {
            "selector": {"matchLabels": {"app": "d"}},
            "template": {"metadata": {"labels": {"app": "d"}}, "spec": pod("x")["spec"]},
        },
    }
    created = apps.create_namespaced_deployment("ml", deployment)
    assert created.metadata.generation == 1
    assert apps.patch_namespaced_deployment("d", "ml", {"spec": {"replicas": 3}}).metadata.generation == 2
    assert apps.patch_namespaced_deployment("d", "ml", {"metadata": {"labels": {"x": "y"}}}).metadata.generation == 2


def test_status_subresource_of_a_job(kube):
    jobs = client.CustomObjectsApi(kube)
    body = pytorchjob("exp1") | {"status": {"conditions": [{"type": "Succeeded", "status": "True"}]}}
    created = jobs.create_namespaced_custom_object(GROUP, VERSION, "ml", JOBS, body)
    assert "status" not in created  # a create cannot set the status
    created["status"] = {"conditions": [{"type": "Running", "status": "True"}]}
    replaced = jobs.replace_namespaced_custom_object(GROUP, VERSION, "ml", JOBS, "exp1", created)
    assert "status" not in replaced and replaced["metadata"]["generation"] == 1  # the main resource ignores it
    patched = jobs.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        "ml",
        JOBS,
        "exp1",
        {"spec": {"runPolicy": {"suspend": True}}, "status": {"conditions": [{"type": "Running", "status": "True"}]}},
    )
    assert patched["status"]["conditions"][0]["type"] == "Running"
    assert "runPolicy" not in patched["spec"] and patched["metadata"]["generation"] == 1


# -- patches and server-side apply ----------------------------------------------------------------


def test_merge_strategic_and_json_patches(kube):
    core, jobs = client.CoreV1Api(kube), client.CustomObjectsApi(kube)
    core.create_namespaced_pod("ml", pod("p", "a", "b"))
    patched = core.patch_namespaced_pod("p", "ml", {"spec": {"containers": [{"name": "b", "image": "new"}]}})
    assert [(c.name, c.image) for c in patched.spec.containers] == [("a", "busybox"), ("b", "new")]  # by name
    patched = core.patch_namespaced_pod(
        "p",
        "ml",
        [
            {"op": "add", "path": "/metadata/labels", "value": {"x": "1"}},
            {"op": "remove", "path": "/spec/containers/0"},
        ],
    )
    assert patched.metadata.labels == {"x": "1"} and [c.name for c in patched.spec.containers] == ["b"]
    jobs.create_namespaced_custom_object(GROUP, VERSION, "ml", JOBS, pytorchjob("exp1"))
    merged = jobs.patch_namespaced_custom_object(
        GROUP, VERSION, "ml", JOBS, "exp1", {"metadata": {"labels": {"kueue.x-k8s.io/queue-name": "q"}}}
    )
    assert merged["metadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "q"}
    with pytest.raises(ApiException) as err:  # strategic merge is for built-in kinds only
        call(
            kube,
            "PATCH",
            f"/apis/{GROUP}/{VERSION}/namespaces/ml/{JOBS}/exp1",
            {"metadata": {}},
            "application/strategic-merge-patch+json",
        )
    assert err.value.status == 415 and status_of(err.value)["reason"] == "UnsupportedMediaType"
    with pytest.raises(ApiException) as err:
        core.patch_namespaced_pod("missing", "ml", {"metadata": {}})
    assert err.value.status == 404 and status_of(err.value)["message"] == 'pods "missing" not found'


def test_server_side_apply_owns_fields_and_conflicts(kube):
    path = "/api/v1/namespaces/ml/configmaps/cm"

    def apply(manager, labels, **query):
        return call(
            kube,
            "PATCH",
            path,
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm", "labels": labels}},
            "application/apply-patch+yaml",
            fieldManager=manager,
            **query,
        )

    obj, code, _ = apply("a", {"x": "1", "y": "2"})
    assert code == 201 and obj["metadata"]["managedFields"][0]["manager"] == "a"
    with pytest.raises(ApiException) as err:
        apply("b", {"x": "3"})
    assert err.value.status == 409 and status_of(err.value)["reason"] == "Conflict"
    assert status_of(err.value)["message"] == 'Apply failed with 1 conflict: conflict with "a": .metadata.labels.x'
    assert status_of(err.value)["details"]["causes"] == [
        {"reason": "FieldManagerConflict", "message": 'conflict with "a"', "field": ".metadata.labels.x"}
    ]
    assert apply("b", {"x": "3"}, force=True)[0]["metadata"]["labels"] == {"x": "3", "y": "2"}
    assert apply("a", {"y": "2"})[0]["metadata"]["labels"] == {"x": "3", "y": "2"}  # x is b's now
    assert apply("a", {})[0]["metadata"]["labels"] == {"x": "3"}  # a no longer applies y: it goes
    with pytest.raises(ApiException) as err:
        call(kube, "PATCH", path, {"apiVersion": "v1", "kind": "ConfigMap"}, "application/apply-patch+yaml")
    assert err.value.status == 422 and "fieldManager: Required value" in status_of(err.value)["message"]


# -- dry run, delete and garbage collection ------------------------------------------------------


def test_dry_run_stores_nothing(api, kube):
    core = client.CoreV1Api(kube)
    answer = core.create_namespaced_config_map("ml", configmap("a"), dry_run="All")
    assert answer.metadata.uid and api.objects.get("/api/v1/namespaces/ml/configmaps") is None
    core.create_namespaced_config_map("ml", configmap("a"))
    core.delete_namespaced_config_map("a", "ml", dry_run="All")
    assert core.read_namespaced_config_map("a", "ml").metadata.name == "a"


def test_deleting_an_owner_collects_its_dependents(kube):
    core, jobs = client.CoreV1Api(kube), client.CustomObjectsApi(kube)

    def owned_by(obj, name):
        return configmap(name) | {
            "metadata": {
                "name": name,
                "ownerReferences": [
                    {
                        "apiVersion": obj["apiVersion"],
                        "kind": obj["kind"],
                        "name": obj["metadata"]["name"],
                        "uid": obj["metadata"]["uid"],
                    }
                ],
            }
        }

    def names():
        return sorted(c.metadata.name for c in core.list_namespaced_config_map("ml").items)

    for policy in ("Background", "Foreground", "Orphan"):
        job = jobs.create_namespaced_custom_object(GROUP, VERSION, "ml", JOBS, pytorchjob("exp1"))
        child = core.create_namespaced_config_map("ml", owned_by(job, "child")).to_dict()
        child |= {"apiVersion": "v1", "kind": "ConfigMap"}
        core.create_namespaced_config_map(
            "ml", owned_by({**child, "metadata": {"name": "child", "uid": child["metadata"]["uid"]}}, "grandchild")
        )
        jobs.delete_namespaced_custom_object(GROUP, VERSION, "ml", JOBS, "exp1", propagation_policy=policy)
        if policy == "Orphan":
            assert names() == ["child", "grandchild"]
            assert core.read_namespaced_config_map("child", "ml").metadata.owner_references is None
            core.delete_namespaced_config_map("child", "ml")  # default: Background
        assert names() == []  # recursively
    with pytest.raises(ApiException) as err:  # a stale precondition
        core.create_namespaced_config_map("ml", configmap("c"))
        core.delete_namespaced_config_map("c", "ml", body={"preconditions": {"uid": "not-its-uid"}})
    assert err.value.status == 409 and "Precondition failed: UID in precondition: not-its-uid" in err.value.body


def test_a_dependent_of_a_missing_owner_is_collected(kube):
    core = client.CoreV1Api(kube)
    orphan = configmap("orphan") | {
        "metadata": {
            "name": "orphan",
            "ownerReferences": [
                {"apiVersion": f"{GROUP}/{VERSION}", "kind": "PyTorchJob", "name": "gone", "uid": str(uuid.uuid4())}
            ],
        }
    }
    assert core.create_namespaced_config_map("ml", orphan).metadata.name == "orphan"  # accepted, then collected
    with pytest.raises(ApiException) as err:
        core.read_namespaced_config_map("orphan", "ml")
    assert err.value.status == 404


def test_list_and_delete_collection_by_selectors(kube):
    core = client.CoreV1Api(kube)
    for name, labels in (("a", {"run": "1", "tier": "x"}), ("b", {"run": "1"}), ("c", {"run": "2"})):
        core.create_namespaced_config_map("ml", configmap(name, **labels))

    def listed(**query):
        return [c.metadata.name for c in core.list_namespaced_config_map("ml", **query).items]

    assert listed(label_selector="run=1") == ["a", "b"]
    assert listed(label_selector="run in (1,2),!tier") == ["b", "c"]
    assert listed(field_selector="metadata.name!=a") == ["b", "c"]
    page = core.list_namespaced_config_map("ml", limit=2)
    assert [c.metadata.name for c in page.items] == ["a", "b"] and page.metadata.remaining_item_count == 1
    assert listed(_continue=page.metadata._continue) == ["c"]
    with pytest.raises(ApiException) as err:
        listed(field_selector="data.k=v")
    assert err.value.status == 400 and status_of(err.value)["message"] == "field label not supported: data.k"
    gone = json.loads(
        core.delete_collection_namespaced_config_map("ml", label_selector="run=1", _preload_content=False).data
    )
    assert gone["kind"] == "ConfigMapList" and [c["metadata"]["name"] for c in gone["items"]] == ["a", "b"]
    assert listed() == ["c"]


# -- watch -------------------------------------------------------------------------------------


def test_watch_pods_from_a_resource_version_with_selectors(api, kube):
    core = client.CoreV1Api(kube)
    start = core.list_namespaced_pod("ml").metadata.resource_version
    core.create_namespaced_pod("ml", pod("p") | {"metadata": {"name": "p", "labels": {"app": "x"}}})
    core.patch_namespaced_pod("p", "ml", {"metadata": {"annotations": {"a": "1"}}})
    core.patch_namespaced_pod("p", "ml", {"metadata": {"labels": {"app": "y"}}})  # stops matching app=x
    core.create_namespaced_pod("ml", pod("q"))
    core.delete_namespaced_pod("q", "ml")
    seen = [
        (e["type"], e["object"].metadata.name)
        for e in watch.Watch().stream(core.list_namespaced_pod, "ml", resource_version=start, timeout_seconds=0.3)
    ]
    assert seen == [("ADDED", "p"), ("MODIFIED", "p"), ("MODIFIED", "p"), ("ADDED", "q"), ("DELETED", "q")]
    selected = [
        (e["type"], e["object"].metadata.name)
        for e in watch.Watch().stream(
            core.list_namespaced_pod, "ml", resource_version=start, label_selector="app=x", timeout_seconds=0.3
        )
    ]
    assert selected == [("ADDED", "p"), ("MODIFIED", "p"), ("DELETED", "p")]
    api.compact()
    with pytest.raises(ApiException) as err:
        list(watch.Watch().stream(core.list_namespaced_pod, "ml", resource_version=start, timeout_seconds=1))
    assert err.value.status == 410 and "too old resource version" in err.value.reason


def test_watch_a_pytorchjob_as_it_changes(api, kube):
    jobs = client.CustomObjectsApi(kube)
    jobs.create_namespaced_custom_object(GROUP, VERSION, "ml", JOBS, pytorchjob("exp1"))
    stream, listening = watch.Watch(), threading.Event()
    seen = []

    def follow():
        for event in stream.stream(jobs.list_namespaced_custom_object, GROUP, VERSION, "ml", JOBS, timeout_seconds=10):
            conditions = event["object"].get("status", {}).get("conditions", [])
            seen.append((event["type"], [c["type"] for c in conditions]))
            listening.set()
            if len(seen) == 3:
                stream.stop()

    watcher = threading.Thread(target=follow)
    watcher.start()
    assert listening.wait(10)  # the job as it is when the watch starts, then its changes as they happen
    api.set_job_condition("ml", "exp1", "Running", reason="PyTorchJobRunning")
    api.set_job_condition("ml", "exp1", "Succeeded", reason="PyTorchJobSucceeded")
    watcher.join(10)
    assert seen == [("ADDED", []), ("MODIFIED", ["Running"]), ("MODIFIED", ["Running", "Succeeded"])]
    job = jobs.get_namespaced_custom_object(GROUP, VERSION, "ml", JOBS, "exp1")
    assert [(c["type"], c["status"]) for c in job["status"]["conditions"]] == [
        ("Running", "False"),
        ("Succeeded", "True"),
    ]


# -- pods, logs, events ------------------------------------------------------------------------


def test_pod_logs_as_kubelet_serves_them(api, kube):
    core = client.CoreV1Api(kube)
    core.create_namespaced_pod("ml", pod("p", "a", "b"))
    with pytest.raises(ApiException) as err:
        core.read_namespaced_pod_log("p", "ml")
    assert (err.value.status, status_of(err.value)["message"]) == (
        400,
        "a container name must be specified for pod p, choose one of: [a b]",
    )
    api.set_pod_phase("ml", "p", "Pending", node="n1")
    with pytest.raises(ApiException) as err:
        core.read_namespaced_pod_log("p", "ml", container="a")
    assert status_of(err.value)["message"] == 'container "a" in pod "p" is waiting to start: ContainerCreating'
    api.set_pod_phase("ml", "p", "Running")
    api.write_log("ml", "p", "one\ntwo\nthree\n", container="a")
    assert core.read_namespaced_pod_log("p", "ml", container="a", tail_lines=2) == "two\nthree\n"
    assert core.read_namespaced_pod_log("p", "ml", container="a", since_seconds=60) == "one\ntwo\nthree\n"
    with pytest.raises(ApiException) as err:
        core.read_namespaced_pod_log("p", "ml", container="a", previous=True)
    assert status_of(err.value)["message"] == 'previous terminated container "a" in pod "p" not found'
    api.restart_container("ml", "p", exit_code=137, reason="OOMKilled", container="a")
    api.write_log("ml", "p", "again\n", container="a")
    assert core.read_namespaced_pod_log("p", "ml", container="a", previous=True) == "one\ntwo\nthree\n"
    status = core.read_namespaced_pod("p", "ml").status.container_statuses[0]
    assert (status.restart_count, status.last_state.terminated.exit_code) == (1, 137)
    response = core.read_namespaced_pod_log("p", "ml", container="a", follow=True, _preload_content=False)
    api.write_log("ml", "p", "more\n", container="a")
    api.set_pod_phase("ml", "p", "Succeeded")  # the container ends, and so does the followed log
    assert response.read().decode() == "again\nmore\n"


def test_events_by_involved_object(api, kube):
    core = client.CoreV1Api(kube)
    a = core.create_namespaced_config_map("ml", configmap("a")).to_dict()
    b = core.create_namespaced_config_map("ml", configmap("b")).to_dict()
    for obj in (a, b):
        api.emit_event(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": obj["metadata"]["name"], "namespace": "ml", "uid": obj["metadata"]["uid"]},
            },
            "Seen",
            "hello",
        )
    events = core.list_namespaced_event("ml", field_selector="involvedObject.name=a,involvedObject.kind=ConfigMap")
    assert [(e.involved_object.name, e.involved_object.uid, e.reason) for e in events.items] == [
        ("a", a["metadata"]["uid"], "Seen")
    ]


def test_operator_stand_in_creates_owned_pods_that_go_with_the_job(tmp_path):
    api = ApiServer(operator=True).start()
    try:
        kube = connect(api, tmp_path)
        core, jobs = client.CoreV1Api(kube), client.CustomObjectsApi(kube)
        job = jobs.create_namespaced_custom_object(GROUP, VERSION, "ml", JOBS, pytorchjob("exp1", workers=2))
        pods = core.list_namespaced_pod("ml", label_selector="training.kubeflow.org/job-name=exp1").items
        assert [p.metadata.name for p in pods] == ["exp1-master-0", "exp1-worker-0", "exp1-worker-1"]
        assert pods[0].metadata.labels["training.kubeflow.org/job-role"] == "master"
        assert pods[1].metadata.labels["training.kubeflow.org/replica-type"] == "worker"
        (owner,) = pods[2].metadata.owner_references
        assert (owner.kind, owner.uid, owner.controller) == ("PyTorchJob", job["metadata"]["uid"], True)
        assert [s.spec.cluster_ip for s in core.list_namespaced_service("ml").items] == ["None"] * 3
        events = core.list_namespaced_event("ml", field_selector="involvedObject.name=exp1,reason=SuccessfulCreatePod")
        assert sorted(e.message for e in events.items) == [f"Created pod: {p.metadata.name}" for p in pods]
        conditions = jobs.get_namespaced_custom_object(GROUP, VERSION, "ml", JOBS, "exp1")["status"]["conditions"]
        assert [(c["type"], c["message"]) for c in conditions] == [("Created", "PyTorchJob exp1 is created.")]
        jobs.delete_namespaced_custom_object(GROUP, VERSION, "ml", JOBS, "exp1")
        assert core.list_namespaced_pod("ml").items == [] and core.list_namespaced_service("ml").items == []
    finally:
        api.stop()


# -- discovery and authorization -----------------------------------------------------------------


def test_discovery_lists_exactly_the_installed_apis(tmp_path):
    api = ApiServer(crd_installed=False, monitoring_crds=False, trainer_v2=True, kueue=True).start()
    try:
        kube = connect(api, tmp_path)
        groups = {g.name for g in client.ApisApi(kube).get_api_versions().groups}
        assert {"trainer.kubeflow.org", "kueue.x-k8s.io", "apps"} <= groups
        assert not groups & {"kubeflow.org", "monitoring.coreos.com"}
        with pytest.raises(ApiException) as err:
            call(kube, "GET", f"/apis/{GROUP}/{VERSION}/namespaces/ml/{JOBS}")
        assert (err.value.status, err.value.body) == (404, "404 page not found\n")
        trainer = call(kube, "GET", "/apis/trainer.kubeflow.org/v1alpha1")[0]["resources"]
        assert {(r["name"], r["namespaced"]) for r in trainer} >= {
            ("trainjobs", True),
            ("trainingruntimes", True),
            ("clustertrainingruntimes", False),
        }
        custom = client.CustomObjectsApi(kube)
        runtime = custom.get_cluster_custom_object(
            "trainer.kubeflow.org", "v1alpha1", "clustertrainingruntimes", "torch-distributed"
        )
        assert runtime["spec"]["mlPolicy"]["torch"] == {}
        bad = {
            "apiVersion": "trainer.kubeflow.org/v1alpha1",
            "kind": "TrainJob",
            "metadata": {"name": "t"},
            "spec": {"runtimeRef": {"name": "torch-distributed"}, "trainer": {"numNodes": "two"}},
        }
        with pytest.raises(ApiException) as err:
            custom.create_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", "ml", "trainjobs", bad)
        assert [c["field"] for c in status_of(err.value)["details"]["causes"]] == ["spec.trainer.numNodes"]
        crds = client.ApiextensionsV1Api(kube).list_custom_resource_definition().items
        assert "trainjobs.trainer.kubeflow.org" in {c.metadata.name for c in crds}
        assert "pytorchjobs.kubeflow.org" not in {c.metadata.name for c in crds}
        api.crd_installed = True  # the operator is installed now
        assert GROUP in {g.name for g in client.ApisApi(kube).get_api_versions().groups}
    finally:
        api.stop()


def test_rbac_deny_and_access_review(api, kube):
    core = client.CoreV1Api(kube)
    api.forbid("deletecollection", "serviceaccounts")
    with pytest.raises(ApiException) as err:
        core.delete_collection_namespaced_service_account("ml")
    assert err.value.status == 403 and status_of(err.value) | {"metadata": {}} == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "code": 403,
        "reason": "Forbidden",
        "message": 'serviceaccounts is forbidden: User "tester" cannot deletecollection resource "serviceaccounts" '
        'in API group "" in the namespace "ml"',
        "details": {"kind": "serviceaccounts"},
    }
    assert core.list_namespaced_service_account("ml").items == []  # other verbs are allowed
    review = client.AuthorizationV1Api(kube).create_self_subject_access_review(
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {
                "resourceAttributes": {"namespace": "ml", "verb": "deletecollection", "resource": "serviceaccounts"}
            },
        }
    )
    assert review.status.allowed is False
    unauthorized = client.ApiClient(client.Configuration(host=api.url))
    with pytest.raises(ApiException) as err:
        client.CoreV1Api(unauthorized).list_namespace()
    assert err.value.status == 401
