"""The chart's NetworkPolicies let the job work and keep everyone else out.

The rendered pods (with the labels the operator adds) are checked against
the rendered policies by tests/support/network_policy.py, which implements
Kubernetes' NetworkPolicy semantics independently of the chart.
"""

from __future__ import annotations

import pytest

from mfr.ctl.chart import render
from tests.support.network_policy import Pod, allowed, selects
from tests.support.operator_rules import operator_pod, replicas

NS = "ml"
ON_S3 = {"train": {"checkpoint": {"uri": "s3://bucket/x"}}, "s3": {"existingSecret": "mfr-s3"}}
CASES = {
    "demo-with-trial-store": {},
    "static-2-procs-monitored": {
        "nodes": 3,
        "nprocPerNode": 2,
        "monitoring": {"podMonitor": {"enabled": True}},
        **ON_S3,
    },
    "elastic": {"nodes": 3, "elastic": {"enabled": True, "minNodes": 2, "maxNodes": 4}, **ON_S3},
}
PROMETHEUS = Pod("monitoring", {"app.kubernetes.io/name": "prometheus"})
STRANGERS = [Pod(NS, {"app": "notebook"}), Pod("default", {}), Pod("monitoring-other", {})]


def _objects(values):
    objects = render(values, name="exp", namespace=NS).objects
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    (job,) = [o for o in objects if o["kind"] == "PyTorchJob"]
    trainers = []
    for rtype, index in replicas(job):
        pod = operator_pod(job, rtype, index)
        (container,) = pod["spec"]["containers"]
        trainers.append(Pod(NS, pod["metadata"]["labels"], {p["name"]: p["containerPort"] for p in container["ports"]}))
    stores = [
        Pod(
            NS,
            d["spec"]["template"]["metadata"]["labels"],
            {p["name"]: p["containerPort"] for p in d["spec"]["template"]["spec"]["containers"][0]["ports"]},
        )
        for d in objects
        if d["kind"] == "Deployment"
    ]
    return job, policies, trainers, stores


@pytest.mark.parametrize("case", CASES)
def test_the_jobs_pods_reach_each_other_on_any_port_and_strangers_on_none(case):
    _job, policies, trainers, stores = _objects(CASES[case])
    rendezvous = trainers[0].ports["pytorchjob-port"]
    for source in trainers:
        for destination in trainers:
            for port in (rendezvous, 29500, 41234, 60999):  # the rendezvous, and ports gloo/NCCL pick at run time
                assert allowed(policies, NS, source, destination, port)
    for stranger in [*STRANGERS, *stores]:
        for port in (rendezvous, 41234, 9410):
            assert not allowed(policies, NS, stranger, trainers[0], port), (stranger, port)


@pytest.mark.parametrize("case", CASES)
def test_the_monitoring_namespace_reaches_the_metrics_ports_only(case):
    job, policies, trainers, _ = _objects(CASES[case])
    nproc = int(job["spec"]["nprocPerNode"])
    metrics = [9410 + i for i in range(nproc)]
    for trainer in trainers:
        assert [port for port in range(9400, 9420) if allowed(policies, NS, PROMETHEUS, trainer, port)] == metrics
        assert not allowed(policies, NS, PROMETHEUS, trainer, trainer.ports["pytorchjob-port"])
        named = sorted(v for k, v in trainer.ports.items() if k.startswith("metrics-"))
        assert named in ([], metrics)  # the ports the PodMonitor scrapes are the ones let through


def test_only_the_runs_trainers_reach_the_trial_store_and_only_on_s3():
    _, policies, trainers, (store,) = _objects(CASES["demo-with-trial-store"])
    s3 = store.ports["s3"]
    assert all(allowed(policies, NS, trainer, store, s3) for trainer in trainers)
    assert not any(allowed(policies, NS, trainer, store, port) for trainer in trainers for port in (8888, 9333))
    other_run = Pod(NS, trainers[0].labels | {"app.kubernetes.io/instance": "other"})
    assert not any(allowed(policies, NS, source, store, s3) for source in [*STRANGERS, PROMETHEUS, other_run])


def test_the_policy_selects_every_trainer_pod_and_nothing_else():
    _, policies, trainers, stores = _objects(CASES["demo-with-trial-store"])
    (trainer_policy,) = [p for p in policies if p["metadata"]["name"] == "exp"]
    assert all(selects(trainer_policy["spec"]["podSelector"], t.labels) for t in trainers)
    assert not any(selects(trainer_policy["spec"]["podSelector"], s.labels) for s in stores)


def test_switched_off_and_monitoring_elsewhere():
    objects = render({**ON_S3, "networkPolicy": {"enabled": False}}, name="exp", namespace=NS).objects
    assert not [o for o in objects if o["kind"] == "NetworkPolicy"]
    _, policies, trainers, _ = _objects(
        {
            **ON_S3,
            "networkPolicy": {
                "metricsNamespaces": ["observability"],
                "metricsPodSelector": {"matchLabels": {"app": "prometheus"}},
            },
        }
    )
    scraper = Pod("observability", {"app": "prometheus"})
    assert allowed(policies, NS, scraper, trainers[0], 9410)
    assert not allowed(policies, NS, Pod("observability", {"app": "grafana"}), trainers[0], 9410)
    assert not allowed(policies, NS, PROMETHEUS, trainers[0], 9410)


def test_the_evaluator_follows_kubernetes_semantics():
    """The checker itself: unselected pods are open, an empty from is anyone, namespace and pod selectors AND."""
    policy = {
        "spec": {
            "podSelector": {"matchLabels": {"a": "1"}},
            "ingress": [
                {
                    "from": [
                        {
                            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "x"}},
                            "podSelector": {"matchExpressions": [{"key": "b", "operator": "Exists"}]},
                        }
                    ],
                    "ports": [{"port": 100, "endPort": 110}],
                },
                {"ports": [{"port": "web"}]},
            ],
        }
    }
    target = Pod("ns", {"a": "1"}, {"web": 8080})
    assert allowed([policy], "ns", Pod("zz", {}), Pod("ns", {"a": "2"}), 1)  # not selected: open
    assert allowed([policy], "ns", Pod("x", {"b": ""}), target, 105)
    assert not allowed([policy], "ns", Pod("x", {}), target, 105)  # pod selector not met
    assert not allowed([policy], "ns", Pod("y", {"b": ""}), target, 105)  # namespace not met
    assert not allowed([policy], "ns", Pod("x", {"b": ""}), target, 111)
    assert allowed([policy], "ns", Pod("anywhere", {}), target, 8080)  # no from: anyone, on the named port
