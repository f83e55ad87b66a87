"""Object schemas as kube-apiserver applies them: unknown fields, types, required fields and CRD constraints.

Built-in kinds are checked against the Kubernetes 1.29 OpenAPI schemas that the
kubernetes-validate package bundles, the way the API server decodes them into Go
structs: a field the struct lacks is unknown (pruned, or an error under
fieldValidation=Strict), a wrong JSON type cannot be decoded (400), a missing
required scalar or list is a validation error (422).  The Go validation code
(name formats aside, see objects.py) is not reproduced, nor are defaults.

Custom resources are checked against their CRD's openAPIV3Schema as a structural
schema: unknown fields are pruned unless x-kubernetes-preserve-unknown-fields,
nulls of non-nullable fields are dropped, defaults are applied, and every
violation is a 422 cause the way apiextensions-apiserver reports the
kube-openapi validator's errors (validation.go, kubeOpenAPIResultToFieldErrors).
CEL rules (x-kubernetes-validations) are not evaluated.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from typing import Any

K8S_VERSION = "1.29"
PRESERVE = "x-kubernetes-preserve-unknown-fields"
_OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


@cache
def _definitions() -> dict[str, Any]:
    folder = files("kubernetes_validate") / "kubernetes-json-schema" / f"v{K8S_VERSION}.0-local"
    return json.loads((folder / "_definitions.json").read_text())["$defs"]


@cache
def builtin_schema(group: str, version: str, kind: str) -> Schema:
    """The schema of a built-in kind, e.g. ("apps", "v1", "Deployment"), as kubernetes-validate names its files."""
    folder = files("kubernetes_validate") / "kubernetes-json-schema" / f"v{K8S_VERSION}.0-local"
    prefix = f"{group.split('.')[0]}-" if group else ""
    return Schema(json.loads((folder / f"{kind.lower()}-{prefix}{version}.json").read_text()), structural=False)


@cache
def object_meta() -> Schema:
    return Schema({"$ref": f"#/$defs/{_OBJECT_META}"}, structural=False)


@dataclass
class FieldError:
    """One cause of a 422 Invalid, as k8s.io/apimachinery's field.Error renders it."""

    reason: str  # FieldValueRequired, FieldValueInvalid, FieldValueTypeInvalid, FieldValueNotSupported, ...
    field: str
    body: str  # field.Error.ErrorBody(): "Required value", "Invalid value: 0: ...", ...

    def __str__(self) -> str:
        return f"{self.field}: {self.body}"

    def cause(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.body, "field": self.field}


def go_value(value: Any) -> str:
    """A bad value as field.Error prints it: strings quoted, numbers and booleans bare, the rest as JSON."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)) or value is None:
        return "null" if value is None else repr(value)
    return json.dumps(value)


def required(path: str, detail: str = "") -> FieldError:
    return FieldError("FieldValueRequired", path, "Required value" + (f": {detail}" if detail else ""))


def invalid(path: str, value: Any, detail: str) -> FieldError:
    return FieldError("FieldValueInvalid", path, f"Invalid value: {go_value(value)}: {detail}")


@dataclass
class Findings:
    """What checking one object found: unknown (pruned) field paths, type errors, validation errors."""

    unknown: list[str] = field(default_factory=list)
    type_errors: list[tuple[str, str, str]] = field(default_factory=list)  # (path, JSON type found, types wanted)
    errors: list[FieldError] = field(default_factory=list)


def json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}.get(type(value), "null")


def child_path(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


class Schema:
    """One OpenAPI schema (with $refs into the 1.29 definitions); ``structural`` for a CRD's."""

    def __init__(self, root: dict[str, Any], *, structural: bool):
        self.root = root
        self.structural = structural

    # -- navigation (also used by strategic merge patch and server-side apply) ---------------

    @staticmethod
    def resolve(node: dict[str, Any] | None) -> dict[str, Any]:
        while node and "$ref" in node:
            node = {**_definitions()[node["$ref"].rsplit("/", 1)[1]], **{k: v for k, v in node.items() if k != "$ref"}}
        return node or {}

    def child(self, node: dict[str, Any], key: str) -> dict[str, Any]:
        """The schema of property or map value ``key`` of an object node ({} when unknown)."""
        node = self.resolve(node)
        if self.structural and node is self.root and key == "metadata":
            return object_meta().root
        if key in (node.get("properties") or {}):
            return self.resolve(node["properties"][key])
        extra = node.get("additionalProperties")
        return self.resolve(extra) if isinstance(extra, dict) else {}

    def items(self, node: dict[str, Any]) -> dict[str, Any]:
        return self.resolve(self.resolve(node).get("items"))

    def list_keys(self, node: dict[str, Any]) -> list[str]:
        """The keys that identify a list's items (list-type map, or a built-in's patch merge key); [] if atomic."""
        node = self.resolve(node)
        if node.get("x-kubernetes-list-type") == "map":
            return list(node.get("x-kubernetes-list-map-keys") or [])
        if "merge" in (node.get("x-kubernetes-patch-strategy") or "").split(",") and node.get(
            "x-kubernetes-patch-merge-key"
        ):
            return [node["x-kubernetes-patch-merge-key"]]
        return []

    # -- checking ----------------------------------------------------------------------

    def check(self, obj: dict[str, Any]) -> Findings:
        """Prune ``obj`` in place as the API server stores it, and report what it found."""
        found = Findings()
        self._walk(obj, self.root, "", found)
        return found

    def _walk(self, value: Any, node: dict[str, Any], path: str, found: Findings) -> None:
        node = self.resolve(node)
        wanted = _types(node)
        got = json_type(value)
        if wanted and got not in wanted and not (got == "integer" and "number" in wanted):
            found.type_errors.append((path, got, ",".join(sorted(wanted))))
            if self.structural:
                found.errors.append(
                    FieldError(
                        "FieldValueTypeInvalid",
                        path,
                        f"Invalid value: {json.dumps(got)}: {path} in body must be of type {','.join(sorted(wanted))}: "
                        f"{json.dumps(got)}",
                    )
                )
            return
        if isinstance(value, dict):
            self._object(value, node, path, found)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if item is not None:
                    self._walk(item, self.items(node), child_path(path, index), found)
        if self.structural:
            found.errors += _constraints(value, node, path)

    def _object(self, value: dict[str, Any], node: dict[str, Any], path: str, found: Findings) -> None:
        props = node.get("properties") or {}
        extra = node.get("additionalProperties")
        embedded = node.get("x-kubernetes-embedded-resource")
        if self.structural:
            free = bool(node.get(PRESERVE)) or extra is True
        else:  # a Go struct knows its fields; a schema without any is an opaque value (RawExtension, FieldsV1)
            free = extra is True or (not props and extra is None)
        for key in list(value):
            sub = child_path(path, key)
            if value[key] is None and not self.resolve(props.get(key)).get("nullable"):
                del value[key]  # null is "unset" for a Go field, and pruned for a structural schema
            elif (self.structural and node is self.root and key == "metadata") or (embedded and key == "metadata"):
                object_meta()._walk(value[key], object_meta().root, sub, found)
            elif key in props or isinstance(extra, dict):
                self._walk(value[key], props.get(key, extra), sub, found)
            elif embedded and key in ("apiVersion", "kind"):
                continue
            elif not free:
                found.unknown.append(sub)
                del value[key]
        if self.structural:
            for key, sub_node in props.items():
                if key not in value and "default" in sub_node:
                    value[key] = copy.deepcopy(sub_node["default"])
        for key in node.get("required") or []:
            if key in value:
                continue
            # A Go struct field (non-pointer) is never "missing": only scalars and lists are required there.
            if self.structural or _types(self.resolve(props.get(key))) != {"object"}:
                found.errors.append(required(child_path(path, key)))


def _types(node: dict[str, Any]) -> set[str]:
    if node.get("x-kubernetes-int-or-string"):
        return {"integer", "string"}
    declared = node.get("type")
    if declared:
        return set([declared] if isinstance(declared, str) else declared) - {"null"}
    for alternatives in ("oneOf", "anyOf"):  # IntOrString and Quantity in the built-in schemas
        if alternatives in node:
            return set().union(*(_types(Schema.resolve(alt)) for alt in node[alternatives]))
    return set()


def _constraints(value: Any, node: dict[str, Any], path: str) -> list[FieldError]:
    """The kube-openapi checks beyond type, worded as apiextensions-apiserver reports them."""
    errors = []
    where = f"{path} in body"
    if "enum" in node and value not in node["enum"]:
        supported = ", ".join(json.dumps(v) for v in node["enum"])
        errors.append(
            FieldError(
                "FieldValueNotSupported", path, f"Unsupported value: {go_value(value)}: supported values: {supported}"
            )
        )
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high = node.get("minimum"), node.get("maximum")
        if low is not None and (value <= low if node.get("exclusiveMinimum") else value < low):
            word = "greater than" if node.get("exclusiveMinimum") else "greater than or equal to"
            errors.append(invalid(path, value, f"{where} should be {word} {low}"))
        if high is not None and (value >= high if node.get("exclusiveMaximum") else value > high):
            word = "less than" if node.get("exclusiveMaximum") else "less than or equal to"
            errors.append(invalid(path, value, f"{where} should be {word} {high}"))
    if isinstance(value, str):
        if "maxLength" in node and len(value) > node["maxLength"]:
            errors.append(
                FieldError("FieldValueTooLong", path, f"Too long: may not be longer than {node['maxLength']}")
            )
        if "minLength" in node and len(value) < node["minLength"]:
            errors.append(invalid(path, value, f"{where} should be at least {node['minLength']} chars long"))
        if "pattern" in node and not re.search(node["pattern"], value):
            errors.append(invalid(path, value, f"{where} should match '{node['pattern']}'"))
    if isinstance(value, list):
        if "maxItems" in node and len(value) > node["maxItems"]:
            errors.append(
                FieldError(
                    "FieldValueTooMany", path, f"Too many: {len(value)}: must have at most {node['maxItems']} items"
                )
            )
        if "minItems" in node and len(value) < node["minItems"]:
            errors.append(invalid(path, value, f"{where} should have at least {node['minItems']} items"))
    return errors
