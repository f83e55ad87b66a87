"""Which connections a set of NetworkPolicies lets through, as Kubernetes defines it (networking.k8s.io/v1).

Written from the API reference and the concepts page, independently of the
chart: a pod is isolated for ingress when a policy of its namespace selects it
with policyType Ingress; then a connection is allowed only if some such policy
has a rule whose ``from`` (empty = anyone) matches the source and whose
``ports`` (empty = any) match the destination port (a number, or a named port
of the destination's containers; protocol TCP by default; ``endPort`` for
ranges).  A peer's podSelector alone means pods of the policy's namespace,
namespaceSelector alone every pod of the selected namespaces, both together
the selected pods of the selected namespaces.  Namespaces carry the label
``kubernetes.io/metadata.name``.  ipBlock peers are not modelled (the chart
renders none).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: dict[str, str]
    ports: dict[str, int] = field(default_factory=dict)  # container port name -> number


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A LabelSelector: matchLabels and matchExpressions; an empty selector selects everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], set(expr.get("values") or [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _peer_matches(peer: dict[str, Any], policy_namespace: str, source: Pod) -> bool:
    if "ipBlock" in peer:
        raise NotImplementedError("ipBlock peers are not modelled")
    namespace_labels = {"kubernetes.io/metadata.name": source.namespace}
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], namespace_labels):
            return False
    elif source.namespace != policy_namespace:
        return False
    return "podSelector" not in peer or selects(peer["podSelector"], source.labels)


def _port_matches(rule_port: dict[str, Any], destination: Pod, port: int) -> bool:
    if rule_port.get("protocol", "TCP") != "TCP":
        return False
    wanted = rule_port.get("port")
    if wanted is None:
        return True
    if isinstance(wanted, str):
        return destination.ports.get(wanted) == port
    return wanted <= port <= rule_port.get("endPort", wanted)


def allowed(policies: list[dict[str, Any]], namespace: str, source: Pod, destination: Pod, port: int) -> bool:
    """Does a TCP connection from ``source`` reach ``destination``:``port`` (policies of ``namespace``)?"""
    selecting = [
        p
        for p in policies
        if destination.namespace == namespace
        and selects(p["spec"]["podSelector"], destination.labels)
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            peers, ports = rule.get("from") or [], rule.get("ports") or []
            if peers and not any(_peer_matches(peer, namespace, source) for peer in peers):
                continue
            if ports and not any(_port_matches(p, destination, port) for p in ports):
                continue
            return True
    return False
