"""labelSelector and fieldSelector, with the grammar and the per-kind field labels of kube-apiserver.

Label selectors: equality (=, ==, !=), sets (in, notin) and existence (key, !key), comma-joined
(k8s.io/apimachinery/pkg/labels).  Field selectors: =, == and != on the fields each kind's
registry supports (metadata.name and metadata.namespace everywhere; pods, events, secrets,
namespaces and nodes add their own), any other label being a 400.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

# Extra field labels by resource, from each registry's GetAttrs / field label conversion functions (1.29).
FIELD_LABELS = {
    "pods": {
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "spec.hostNetwork",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
    },
    "events": {
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    },
    "secrets": {"type"},
    "namespaces": {"status.phase"},
    "nodes": {"spec.unschedulable"},
    "replicasets": {"status.replicas"},
    "jobs": {"status.successful"},
}
_TERM = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9_./-]+)\s*"
    r"(?:(?P<op>==|!=|=|\s+in\s+|\s+notin\s+)\s*(?P<value>\([^)]*\)|[A-Za-z0-9_.-]*))?\s*$"
)


class SelectorError(ValueError):
    """A selector the API server cannot parse or does not support (it answers 400 BadRequest)."""


def _split(selector: str) -> list[str]:
    """Comma-separated terms, commas inside "in (a,b)" kept."""
    terms, depth, start = [], 0, 0
    for i, char in enumerate(selector):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(selector[start:i])
            start = i + 1
    terms.append(selector[start:])
    return [t for t in terms if t.strip()]


def label_matcher(selector: str) -> Callable[[dict[str, Any]], bool]:
    """A predicate on an object's labels; raises SelectorError for a malformed selector."""
    tests = []
    for term in _split(selector or ""):
        match = _TERM.match(term)
        if not match or (match["neg"] and match["op"]):
            raise SelectorError(
                f"unable to parse requirement: found '{term.strip()}', expected: key, !key, "
                "key=value, key!=value, key in (values) or key notin (values)"
            )
        key, op, value = match["key"], (match["op"] or "").strip(), match["value"]
        if op in ("in", "notin"):
            if not (value.startswith("(") and value.endswith(")")):
                raise SelectorError(f"unable to parse requirement: found '{value}', expected: '('")
            values = {v.strip() for v in value[1:-1].split(",")}
            tests.append(lambda labels, k=key, vs=values, neg=op == "notin": (labels.get(k) in vs) != neg)
        elif op:
            tests.append(lambda labels, k=key, v=value, neg=op == "!=": (labels.get(k) == v) != neg)
        else:
            tests.append(lambda labels, k=key, neg=bool(match["neg"]): (k in labels) != neg)
    return lambda obj: all(test(obj.get("metadata", {}).get("labels") or {}) for test in tests)


def field_matcher(selector: str, plural: str, custom: bool) -> Callable[[dict[str, Any]], bool]:
    """A predicate on the fields ``plural`` supports; raises SelectorError for another field label."""
    supported = {"metadata.name", "metadata.namespace"} | (set() if custom else FIELD_LABELS.get(plural, set()))
    tests = []
    for term in _split(selector or ""):
        match = re.match(r"^\s*([^=!\s]+)\s*(==|!=|=)\s*(.*?)\s*$", term)
        if not match:
            raise SelectorError(f"invalid selector: '{selector}'; can't understand '{term.strip()}'")
        label, op, value = match.groups()
        if label not in supported:
            if custom:
                raise SelectorError(
                    f'"{label}" is not a known field selector: only "metadata.name", "metadata.namespace"'
                )
            raise SelectorError(f"field label not supported: {label}")
        tests.append(lambda obj, f=label, v=value, neg=op == "!=": (_field(obj, f) == v) != neg)
    return lambda obj: all(test(obj) for test in tests)


def _field(obj: dict[str, Any], label: str) -> str:
    if label == "source":  # events: the reporting component
        return (obj.get("source") or {}).get("component", "")
    value: Any = obj
    for part in label.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)
