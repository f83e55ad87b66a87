"""The REST verbs, checked in kube-apiserver's order: decode (400), namespace (404), validation (422),
admission webhooks (403), storage (409).

Written from the API conventions and the API concepts pages (kubernetes.io/docs/reference/using-api/
api-concepts), with the wording of k8s.io/apiserver where clients read it:

* create: the body's apiVersion/kind must be the endpoint's; metadata.namespace, when set, must be
  the request's (400); the namespace must exist (the NamespaceLifecycle plugin's 404); a body with
  a resourceVersion is refused (500, as etcd3's store does); generateName is honoured; the server
  sets uid, creationTimestamp, resourceVersion, generation (kinds with a spec), managedFields, and
  resets the status of kinds with a status subresource (a pod starts Pending);
* fieldValidation: Strict (400 strict decoding error; 422 for patches, as handlers/patch.go),
  Warn (the default: dropped, with a ``Warning: 299`` header each), Ignore (dropped silently);
* update (PUT): optimistic concurrency on metadata.resourceVersion (409 Conflict when stale, an
  unconditional update without it); the main resource ignores status, /status changes only status;
  generation grows when anything but metadata and status changes;
* patch: json-patch, merge-patch, strategic-merge-patch (built-in kinds; 415 for custom resources)
  and apply-patch+yaml (fieldManager required, force; unknown fields fail it whatever fieldValidation
  says, as the typed conversion of structured-merge-diff does);
* delete: propagationPolicy Background (default), Foreground, Orphan; preconditions; a Status
  (details.kind the resource) when the object is gone, the object itself while it is not;
* list, deletecollection and watch with labelSelector and fieldSelector; list with limit/continue;
* dryRun=All on every write: everything is checked, nothing is stored;
* pods/log with container, follow, tailLines, sinceSeconds, sinceTime, timestamps and previous, and
  kubelet's 400s for a container that does not exist or has not started;
* authorization: a per-verb and resource deny answers 403 as RBAC does; SelfSubjectAccessReview
  reports the same decision.

What the stand-in leaves out is listed in the package docstring.
"""

from __future__ import annotations

import base64
import copy
import json
import random
import re
import string
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import yaml

from tests.support.apiserver import errors
from tests.support.apiserver.errors import ApiError, PageNotFound
from tests.support.apiserver.patches import (
    ApplyConflict,
    PatchError,
    apply,
    json_patch,
    merge_patch,
    record_update,
    strategic_merge,
)
from tests.support.apiserver.resources import (
    ACCESS_REVIEW,
    CRD_RESOURCE,
    Resource,
    api_group,
    api_group_list,
    api_resource_list,
    api_versions,
)
from tests.support.apiserver.schema import FieldError, invalid, required
from tests.support.apiserver.selectors import SelectorError, field_matcher, label_matcher
from tests.support.apiserver.store import Store, now

TOKEN = "stand-in-token"
USER = "tester"  # who the token authenticates as
NAMESPACES = "/api/v1/namespaces"
APPLY = "application/apply-patch+yaml"
PATCH_TYPES = [
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    APPLY,
]
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# Name rules and messages of k8s.io/apimachinery/pkg/util/validation.
_NAME_RULES = {
    "subdomain": (
        _SUBDOMAIN,
        253,
        (
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must "
            "start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is "
            "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
        ),
    ),
    "label": (
        _LABEL,
        63,
        (
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and "
            "end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is "
            "'[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
        ),
    ),
    "dns1035": (
        _DNS1035,
        63,
        (
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic "
            "character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for "
            "validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"
        ),
    ),
}
_NAME_RULE = {"namespaces": "label", "services": "dns1035"}  # every other kind: a DNS subdomain


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names in lower case
    body: Any


@dataclass
class Reply:
    code: int
    body: Any  # a JSON document, or text
    headers: list[tuple[str, str]] = field(default_factory=list)
    stream: Iterator[bytes] | None = None  # the chunks of a watch or a followed log


def _success(resource: Resource, name: str = "", uid: str = "") -> dict[str, Any]:
    details = {"name": name} if name else {}
    details |= ({"group": resource.group} if resource.group else {}) | {"kind": resource.plural}
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": details | ({"uid": uid} if uid else {}),
    }


def _warnings(messages: list[str]) -> list[tuple[str, str]]:
    return [("Warning", "299 - " + json.dumps(message)) for message in messages]


class RestApi:
    """kube-apiserver's REST semantics over a Store; ApiServer (server.py) provides the configuration."""

    store: Store
    denied: dict[str, str]
    rbac_denied: set[tuple[str, str, str | None]]
    on_create: Callable[[dict[str, Any]], None] | None
    stopping: threading.Event
    logs: dict[tuple[str, str, str], list[tuple[float, str]]]  # (namespace, pod, container) -> (time, line)
    previous_logs: dict[tuple[str, str, str], list[tuple[float, str]]]  # the log of the container's last run

    def resources(self) -> list[Resource]:
        raise NotImplementedError

    def after_create(self, resource: Resource, obj: dict[str, Any]) -> None:
        """What the cluster's controllers do when an object is created (see ApiServer)."""

    def answer(self, req: Request) -> Reply:
        try:
            if req.headers.get("authorization") != f"Bearer {TOKEN}":
                raise errors.unauthorized()
            return self._route(req)
        except ApiError as err:
            return Reply(err.code, err.body)

    # -- routing ---------------------------------------------------------------------------

    def _route(self, req: Request) -> Reply:
        parts = [p for p in req.path.split("/") if p]
        installed = self.resources()
        if parts == ["version"]:
            return Reply(200, {"major": "1", "minor": "29", "gitVersion": "v1.29.0", "platform": "linux/amd64"})
        if parts == ["api"]:
            return Reply(200, api_versions(req.headers.get("host", "")))
        if parts == ["apis"]:
            return Reply(200, api_group_list(installed))
        if parts[:2] == ["api", "v1"]:
            group_version, rest = "v1", parts[2:]
        elif len(parts) >= 2 and parts[0] == "apis" and any(r.group == parts[1] for r in installed):
            if len(parts) == 2:
                return Reply(200, api_group(parts[1], installed))
            group_version, rest = "/".join(parts[1:3]), parts[3:]
        else:
            raise PageNotFound()
        served = [r for r in installed if r.group_version == group_version]
        if not served:
            raise PageNotFound()
        if not rest:
            return Reply(200, api_resource_list(group_version, installed))
        by_plural = {r.plural: r for r in served}
        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3 and getattr(by_plural.get(rest[2]), "namespaced", False):
            namespace, rest = rest[1], rest[2:]
        resource = by_plural.get(rest[0])
        if resource is None or len(rest) > 3 or (resource.namespaced and namespace is None and len(rest) > 1):
            raise PageNotFound()
        name = rest[1] if len(rest) > 1 else ""
        sub = rest[2] if len(rest) > 2 else ""
        if sub and not ((sub == "status" and resource.status) or (sub == "log" and resource.plural == "pods")):
            raise PageNotFound()
        verb = self._verb(req, name)
        self._authorize(verb, resource, sub, namespace, name)
        if resource is CRD_RESOURCE:
            return self._crds(verb, name)
        if resource is ACCESS_REVIEW:
            if verb != "create":
                raise errors.method_not_allowed()
            return self._access_review(req.body)
        handler = {
            "get": self._get,
            "list": self._list,
            "watch": self._watch,
            "create": self._create,
            "update": self._update,
            "patch": self._patch,
            "delete": self._delete,
            "deletecollection": self._delete_collection,
        }[verb]
        if verb in ("create", "deletecollection") and resource.namespaced and namespace is None:
            raise errors.method_not_allowed()
        return handler(resource, namespace, name, sub, req)

    @staticmethod
    def _verb(req: Request, name: str) -> str:
        if req.method == "GET":
            return "get" if name else "watch" if _flag(req.query, "watch") else "list"
        verbs = {
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete" if name else "deletecollection",
        }
        if req.method not in verbs or (req.method == "POST" and name) or (req.method in ("PUT", "PATCH") and not name):
            raise errors.method_not_allowed()
        return verbs[req.method]

    def _authorize(self, verb: str, resource: Resource, sub: str, namespace: str | None, name: str) -> None:
        if self._denies(verb, f"{resource.plural}/{sub}" if sub else resource.plural, namespace):
            raise errors.forbidden(resource, name, USER, verb, sub, namespace)

    def _denies(self, verb: str, resource: str, namespace: str | None) -> bool:
        return any(v in (verb, "*") and res == resource and ns in (None, namespace) for v, res, ns in self.rbac_denied)

    # -- reading --------------------------------------------------------------------------

    def _existing(self, resource: Resource, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self.store.get(resource.collection(namespace), name)
        if obj is None:
            raise errors.not_found(resource, name)
        return obj

    def _get(self, resource: Resource, namespace: str | None, name: str, sub: str, req: Request) -> Reply:
        obj = self._existing(resource, namespace, name)
        if sub == "log":
            return self._log(obj, req.query)
        return Reply(200, copy.deepcopy(obj))

    def _selected(self, resource: Resource, namespace: str | None, query: dict[str, str]) -> list[dict[str, Any]]:
        matches = self._matcher(resource, query)
        with self.store.lock:
            found = [
                obj
                for collection in self._collections(resource, namespace)
                for obj in self.store.objects.get(collection, {}).values()
                if matches(obj)
            ]
        return sorted(found, key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))

    def _collections(self, resource: Resource, namespace: str | None) -> list[str]:
        if namespace or not resource.namespaced:
            return [resource.collection(namespace)]
        pattern = re.compile(rf"^{re.escape(resource.prefix)}/namespaces/[^/]+/{resource.plural}$")
        return [c for c in list(self.store.objects) if pattern.match(c)]

    @staticmethod
    def _matcher(resource: Resource, query: dict[str, str]) -> Callable[[dict[str, Any]], bool]:
        try:
            labels = label_matcher(query.get("labelSelector", ""))
            fields = field_matcher(query.get("fieldSelector", ""), resource.plural, resource.crd is not None)
        except SelectorError as err:
            raise errors.bad_request(str(err)) from None
        return lambda obj: labels(obj) and fields(obj)

    def _list_body(self, resource: Resource, items: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
        # A built-in kind's list items carry no apiVersion/kind (they are typed); custom resources' do.
        items = [
            copy.deepcopy(o)
            if resource.crd
            else {k: v for k, v in copy.deepcopy(o).items() if k not in ("apiVersion", "kind")}
            for o in items
        ]
        return {
            "kind": f"{resource.kind}List",
            "apiVersion": resource.group_version,
            "metadata": {"resourceVersion": str(self.store.revision)} | meta,
            "items": items,
        }

    def _list(self, resource: Resource, namespace: str | None, name: str, sub: str, req: Request) -> Reply:
        items = self._selected(resource, namespace, req.query)
        meta: dict[str, Any] = {}
        if req.query.get("continue"):
            after = json.loads(base64.urlsafe_b64decode(req.query["continue"]))
            items = [o for o in items if [o["metadata"].get("namespace", ""), o["metadata"]["name"]] > after]
        limit = int(req.query.get("limit") or 0)
        if 0 < limit < len(items):
            last = items[limit - 1]["metadata"]
            token = json.dumps([last.get("namespace", ""), last["name"]]).encode()
            meta = {"continue": base64.urlsafe_b64encode(token).decode(), "remainingItemCount": len(items) - limit}
            items = items[:limit]
        return Reply(200, self._list_body(resource, items, meta))

    def _crds(self, verb: str, name: str) -> Reply:
        crds = {
            r.crd["metadata"]["name"]: r.crd
            | {
                "status": {
                    "acceptedNames": r.crd["spec"]["names"],
                    "storedVersions": [r.version],
                    "conditions": [{"type": "Established", "status": "True"}],
                }
            }
            for r in self.resources()
            if r.crd
        }
        if verb == "get":
            if name not in crds:
                raise errors.not_found(CRD_RESOURCE, name)
            return Reply(200, crds[name])
        if verb == "list":
            return Reply(200, self._list_body(CRD_RESOURCE, [crds[n] for n in sorted(crds)], {}))
        raise errors.method_not_allowed()

    def _access_review(self, body: Any) -> Reply:
        attributes = (body or {}).get("spec", {}).get("resourceAttributes") or {}
        resource = attributes.get("resource", "") + (
            f"/{attributes['subresource']}" if attributes.get("subresource") else ""
        )
        allowed = not self._denies(attributes.get("verb", ""), resource, attributes.get("namespace") or None)
        return Reply(201, copy.deepcopy(body) | {"status": {"allowed": allowed}})

    # -- writing ---------------------------------------------------------------------------

    @staticmethod
    def _write_options(query: dict[str, str]) -> tuple[bool, str]:
        """(dry run, field validation directive), refused as ValidateCreateOptions/ValidateUpdateOptions do."""
        directive = query.get("fieldValidation") or "Warn"
        problems = []
        if directive not in ("Ignore", "Strict", "Warn"):
            problems.append(
                FieldError(
                    "FieldValueNotSupported",
                    "fieldValidation",
                    f'Unsupported value: "{directive}": supported values: "Ignore", "Strict", "Warn"',
                )
            )
        if query.get("dryRun") not in (None, "All"):
            problems.append(
                FieldError(
                    "FieldValueNotSupported",
                    "dryRun",
                    f'Unsupported value: "{query["dryRun"]}": supported values: "All"',
                )
            )
        if problems:
            raise errors.invalid("CreateOptions.meta.k8s.io", "", problems)
        return query.get("dryRun") == "All", directive

    @staticmethod
    def _manager(req: Request) -> str:
        """fieldManager, else the User-Agent up to its first '/', as kube-apiserver defaults it."""
        return req.query.get("fieldManager") or req.headers.get("user-agent", "unknown").split("/")[0]

    def _decode(
        self, resource: Resource, body: Any, op: str, directive: str, where: tuple[str | None, str] = (None, "")
    ) -> tuple[dict[str, Any], list[str], list[FieldError]]:
        """The body as the API server decodes it: (pruned object, warnings, validation errors for later)."""
        if not isinstance(body, dict):
            raise errors.bad_request(f"Object 'Kind' is missing in '{json.dumps(body)}'")
        obj = copy.deepcopy(body)
        cannot = f'{resource.kind} in version "{resource.version}" cannot be handled as a {resource.kind}'
        if not obj.get("kind"):
            raise errors.bad_request(f"Object 'Kind' is missing in '{json.dumps(body)}'")
        if obj.get("apiVersion") != resource.group_version:
            raise errors.bad_request(
                f"the API version in the data ({obj.get('apiVersion')}) does not match the "
                f"expected API version ({resource.group_version})"
            )
        if obj["kind"] != resource.kind:
            raise errors.bad_request(
                f"{cannot}: the kind in the data ({obj['kind']}) does not match the expected kind ({resource.kind})"
            )
        if not isinstance(obj.get("metadata"), dict):
            obj["metadata"] = {}
        found = resource.schema.check(obj)
        problems = [f'unknown field "{path}"' for path in found.unknown]
        if resource.crd is None:
            problems = [
                f"json: cannot unmarshal {got} into Go struct field {resource.kind}.{path} of type {want}"
                for path, got, want in found.type_errors
            ] or problems
        if op == "apply" and (found.unknown or found.type_errors):
            namespace, name = where
            paths = [f".{p}: field not declared in schema" for p in found.unknown] + [
                f".{p}: expected {want}, got {got}" for p, got, want in found.type_errors
            ]
            raise errors.internal(
                f"failed to create typed patch object ({namespace or ''}/{name}; "
                f"{resource.group_version}, Kind={resource.kind}): " + "\n".join(paths)
            )
        decode_failed = bool(found.type_errors) and resource.crd is None
        if decode_failed or (problems and directive == "Strict"):
            message = problems[0] if decode_failed else "strict decoding error: " + ", ".join(problems)
            if op == "patch":  # handlers/patch.go: an Invalid about the field "patch"
                raise errors.invalid("", "", [invalid("patch", json.dumps(body), message)])
            raise errors.bad_request(f"{cannot}: {message}")
        return obj, problems if directive == "Warn" else [], found.errors

    @staticmethod
    def _match_namespace(resource: Resource, namespace: str | None, meta: dict[str, Any]) -> None:
        """rest.EnsureObjectNamespaceMatchesRequestNamespace."""
        if not resource.namespaced:
            meta.pop("namespace", None)
        elif meta.get("namespace") in (None, "", namespace):
            meta["namespace"] = namespace
        else:
            raise errors.bad_request(
                "the namespace of the provided object does not match the namespace sent on the request"
            )

    def _validate(self, resource: Resource, obj: dict[str, Any], found: list[FieldError]) -> None:
        meta = obj["metadata"]
        problems = list(found)
        name = meta.get("name", "")
        pattern, longest, rule = _NAME_RULES[_NAME_RULE.get(resource.plural, "subdomain")]
        if not name:
            problems.insert(0, required("metadata.name", "name or generateName is required"))
        elif len(name) > longest:
            problems.insert(0, invalid("metadata.name", name, f"must be no more than {longest} characters"))
        elif not pattern.match(name):
            problems.insert(0, invalid("metadata.name", name, rule))
        for key, value in (meta.get("labels") or {}).items():
            prefix, _, label = key.rpartition("/")
            if not _LABEL_VALUE.match(label) or len(label) > 63 or (prefix and not _SUBDOMAIN.match(prefix)):
                problems.append(
                    invalid(
                        "metadata.labels",
                        key,
                        "name part must consist of alphanumeric characters, "
                        "'-', '_' or '.', and must start and end with an alphanumeric character",
                    )
                )
            if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
                problems.append(
                    invalid(
                        "metadata.labels",
                        value,
                        "a valid label must be an empty string or "
                        "consist of alphanumeric characters, '-', '_' or '.', and must start and "
                        "end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or "
                        "'12345', regex used for validation is "
                        "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')",
                    )
                )
        if problems:
            raise errors.resource_invalid(resource, name, problems)

    def _create(self, resource: Resource, namespace: str | None, name: str, sub: str, req: Request) -> Reply:
        dry_run, directive = self._write_options(req.query)
        obj, warnings, found = self._decode(resource, req.body, "create", directive)
        obj = self.create_object(resource, namespace, obj, found, self._manager(req), dry_run)
        return Reply(201, obj, _warnings(warnings))

    def create_object(
        self,
        resource: Resource,
        namespace: str | None,
        obj: dict[str, Any],
        found: list[FieldError],
        manager: str | None,
        dry_run: bool,
    ) -> dict[str, Any]:
        """Admit and store a decoded object; ``manager`` None when its managedFields are already set."""
        meta = obj["metadata"]
        self._match_namespace(resource, namespace, meta)
        if resource.namespaced and self.store.get(NAMESPACES, namespace) is None:
            raise errors.namespace_not_found(namespace)
        if meta.get("resourceVersion"):
            raise errors.internal("resourceVersion should not be set on objects to be created")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        self._validate(resource, obj, found)
        if resource.plural in self.denied:  # a validating admission webhook's answer
            raise ApiError(403, "Forbidden", self.denied[resource.plural])
        collection = resource.collection(namespace)
        if self.store.get(collection, meta["name"]) is not None:
            raise errors.already_exists(resource, meta["name"])
        for key in (
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "selfLink",
        ):
            meta.pop(key, None)
        meta |= {"uid": str(uuid.uuid4()), "creationTimestamp": now()} | (
            {"generation": 1} if resource.generation else {}
        )
        if resource.status:
            obj.pop("status", None)
            obj |= {"Pod": {"status": {"phase": "Pending"}}, "Namespace": {"status": {"phase": "Active"}}}.get(
                resource.kind, {}
            )
        if manager is not None:
            meta.pop("managedFields", None)
            record_update(None, obj, manager, resource.schema)
        if dry_run:
            return obj
        with self.store.lock:
            self.store.write(collection, obj)
            answer = copy.deepcopy(obj)
            if not self.store.collect_if_orphaned(collection, obj):
                if self.on_create:
                    self.on_create(obj)
                    answer = copy.deepcopy(obj)
                self.after_create(resource, obj)
        return answer

    def _update(self, resource: Resource, namespace: str | None, name: str, sub: str, req: Request) -> Reply:
        current = self._existing(resource, namespace, name)
        dry_run, directive = self._write_options(req.query)
        obj, warnings, found = self._decode(resource, req.body, "update", directive)
        new = self._replace(resource, namespace, name, sub, current, obj, found, self._manager(req), dry_run)
        return Reply(200, new, _warnings(warnings))

    def _replace(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        sub: str,
        current: dict[str, Any],
        obj: dict[str, Any],
        found: list[FieldError],
        manager: str | None,
        dry_run: bool,
    ) -> dict[str, Any]:
        meta = obj["metadata"]
        self._match_namespace(resource, namespace, meta)
        if meta.setdefault("name", name) != name:
            raise errors.bad_request(
                f"the name of the object ({meta['name']}) does not match the name on the URL ({name})"
            )
        if meta.get("resourceVersion") not in (None, "", current["metadata"]["resourceVersion"]):
            raise errors.conflict(resource, name, errors.STALE)
        if sub == "status":
            new = copy.deepcopy(current)
            new.pop("status", None)
            new |= {"status": obj["status"]} if "status" in obj else {}
        else:
            new, status = obj, obj.pop("status", None)
            if resource.status and "status" in current:
                new["status"] = copy.deepcopy(current["status"])
            elif not resource.status and status is not None:
                new["status"] = status
        kept = ("uid", "creationTimestamp", "deletionTimestamp", "generation")
        new["metadata"] = {k: v for k, v in new["metadata"].items() if k not in kept} | {
            k: current["metadata"][k] for k in kept if k in current["metadata"]
        }
        if "managedFields" not in meta and "managedFields" in current["metadata"]:
            new["metadata"]["managedFields"] = current["metadata"]["managedFields"]
        if resource.generation and _spec(new) != _spec(current):
            new["metadata"]["generation"] = current["metadata"].get("generation", 0) + 1
        self._validate(resource, new, found)
        if manager is not None:
            record_update(current, new, manager, resource.schema, sub)
        if dry_run:
            return new
        collection = resource.collection(namespace)
        with self.store.lock:
            self.store.write(collection, new)
            answer = copy.deepcopy(new)
            if self.store.get(collection, name) is new:
                self.store.collect_if_orphaned(collection, new)
        return answer

    def _patch(self, resource: Resource, namespace: str | None, name: str, sub: str, req: Request) -> Reply:
        accepted = [t for t in PATCH_TYPES if not (resource.crd and "strategic" in t)]
        patch_type = req.headers.get("content-type", "").split(";")[0].strip()
        if patch_type not in accepted:
            raise errors.unsupported_patch(accepted)
        dry_run, directive = self._write_options(req.query)
        current = self.store.get(resource.collection(namespace), name)
        if patch_type == APPLY:
            return self._apply(resource, namespace, name, sub, current, req, dry_run, directive)
        if current is None:
            raise errors.not_found(resource, name)
        try:
            if patch_type == "application/json-patch+json":
                patched = json_patch(current, req.body)
            elif patch_type == "application/merge-patch+json":
                patched = merge_patch(current, req.body)
            else:
                patched = strategic_merge(current, req.body, resource.schema, resource.schema.root)
        except PatchError as err:
            if err.code == 400:
                raise errors.bad_request(str(err)) from None
            raise ApiError(
                422,
                "Invalid",
                "the server rejected our request due to an error in our request",
                {"causes": [{"reason": "UnexpectedServerResponse", "message": str(err)}]},
            ) from None
        obj, warnings, found = self._decode(resource, patched, "patch", directive)
        new = self._replace(resource, namespace, name, sub, current, obj, found, self._manager(req), dry_run)
        return Reply(200, new, _warnings(warnings))

    def _apply(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        sub: str,
        current: dict[str, Any] | None,
        req: Request,
        dry_run: bool,
        directive: str,
    ) -> Reply:
        manager = req.query.get("fieldManager")
        if not manager:
            raise errors.invalid(
                "PatchOptions.meta.k8s.io", "", [required("fieldManager", "is required for apply patch")]
            )
        config, warnings, found = self._decode(resource, req.body, "apply", directive, (namespace, name))
        if "managedFields" in config["metadata"]:
            raise errors.bad_request("metadata.managedFields must be nil")
        config["metadata"].setdefault("name", name)
        try:
            obj = apply(current or {}, config, manager, _flag(req.query, "force"), resource.schema)
        except ApplyConflict as err:
            causes = [
                {"reason": "FieldManagerConflict", "message": f"conflict with {m}", "field": p}
                for m, p in err.conflicts
            ]
            raise ApiError(409, "Conflict", err.message(), {"causes": causes}) from None
        if current is None:
            if sub:
                raise errors.not_found(resource, name)
            return Reply(201, self.create_object(resource, namespace, obj, found, None, dry_run), _warnings(warnings))
        new = self._replace(resource, namespace, name, sub, current, obj, found, None, dry_run)
        return Reply(200, new, _warnings(warnings))

    # -- deleting ---------------------------------------------------------------------------

    @staticmethod
    def _delete_options(req: Request) -> dict[str, Any]:
        options = req.body if isinstance(req.body, dict) else {}
        for key in ("propagationPolicy", "gracePeriodSeconds", "orphanDependents"):
            if key in req.query:
                options[key] = req.query[key]
        if req.query.get("dryRun") == "All":
            options["dryRun"] = ["All"]
        return options

    def _delete(self, resource: Resource, namespace: str | None, name: str, sub: str, req: Request) -> Reply:
        current = self._existing(resource, namespace, name)
        options = self._delete_options(req)
        pre = options.get("preconditions") or {}
        for key, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
            if pre.get(key) and pre[key] != current["metadata"].get(key):
                raise errors.conflict(
                    resource,
                    name,
                    f"Precondition failed: {label} in precondition: {pre[key]}, "
                    f"{label} in object meta: {current['metadata'].get(key)}",
                )
        if "All" in (options.get("dryRun") or []):
            return Reply(200, _success(resource, name, current["metadata"].get("uid", "")))
        obj, gone = self.store.delete(resource.collection(namespace), name, _policy(options))
        return Reply(200, _success(resource, name, obj["metadata"].get("uid", "")) if gone else obj)

    def _delete_collection(self, resource: Resource, namespace: str | None, name: str, sub: str, req: Request) -> Reply:
        options = self._delete_options(req)
        items = self._selected(resource, namespace, req.query)
        if "All" not in (options.get("dryRun") or []):
            with self.store.lock:
                for obj in items:
                    collection = resource.collection(obj["metadata"].get("namespace"))
                    if self.store.get(collection, obj["metadata"]["name"]) is not None:
                        self.store.delete(collection, obj["metadata"]["name"], _policy(options))
        return Reply(200, self._list_body(resource, items, {}))

    # -- streams ----------------------------------------------------------------------------

    def _watch(self, resource: Resource, namespace: str | None, name: str, sub: str, req: Request) -> Reply:
        matches = self._matcher(resource, req.query)
        since = req.query.get("resourceVersion", "")
        timeout = float(req.query.get("timeoutSeconds") or 0) or None
        if since not in ("", "0") and int(since) < self.store.compacted:
            error = errors.expired(int(since), self.store.compacted).body
            return Reply(
                200, None, stream=(line for line in [json.dumps({"type": "ERROR", "object": error}).encode() + b"\n"])
            )
        return Reply(200, None, stream=self._events(resource, namespace, matches, since, timeout))

    def _events(
        self,
        resource: Resource,
        namespace: str | None,
        matches: Callable[[dict[str, Any]], bool],
        since: str,
        timeout: float | None,
    ) -> Iterator[bytes]:
        deadline = time.monotonic() + timeout if timeout else None
        with self.store.lock:
            if since in ("", "0"):  # "get state and start at most recent": the present objects come as ADDED
                pending = [("ADDED", obj) for obj in self._selected(resource, namespace, {}) if matches(obj)]
                last = self.store.revision
            else:
                pending, last = [], int(since)
        while True:
            for kind, obj in pending:
                yield json.dumps({"type": kind, "object": obj}).encode() + b"\n"
            with self.store.lock:
                while not self.stopping.is_set() and self.store.revision <= last:
                    left = deadline - time.monotonic() if deadline else 0.5
                    if left <= 0:
                        return
                    self.store.lock.wait(min(left, 0.5))
                if self.stopping.is_set():
                    return
                collections = set(self._collections(resource, namespace))
                changes = [c for c in self.store.history if c.revision > last and c.collection in collections]
                last = self.store.revision
            pending = [event for change in changes if (event := _event(change, matches))]

    def _log(self, pod: dict[str, Any], query: dict[str, str]) -> Reply:
        name, namespace = pod["metadata"]["name"], pod["metadata"]["namespace"]
        names = [c["name"] for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]]
        container = query.get("container") or ""
        if not container:
            if len(pod["spec"]["containers"]) != 1:
                raise errors.bad_request(
                    f"a container name must be specified for pod {name}, choose one of: "
                    f"[{' '.join(c['name'] for c in pod['spec']['containers'])}]"
                )
            container = names[-1]
        if container not in names:
            raise errors.bad_request(f"container {container} is not valid for pod {name}")
        if not pod["spec"].get("nodeName"):
            return Reply(200, "")  # not scheduled: kube-apiserver has no kubelet to ask, and answers nothing
        status = _container_status(pod, container)
        key = (namespace, name, container)
        previous = _flag(query, "previous")
        if previous and key not in self.previous_logs:
            raise errors.bad_request(f'previous terminated container "{container}" in pod "{name}" not found')
        waiting = (status.get("state") or {"waiting": {"reason": "ContainerCreating"}}).get("waiting")
        if not previous and waiting is not None:
            raise errors.bad_request(
                f'container "{container}" in pod "{name}" is waiting to start: '
                f"{waiting.get('reason', 'ContainerCreating')}"
            )
        lines = _log_lines(self.previous_logs.get(key, []) if previous else self.logs.get(key, []), query)
        timestamps = _flag(query, "timestamps")
        if previous or not _flag(query, "follow") or "terminated" in (status.get("state") or {}):
            return Reply(200, b"".join(_log_line(t, line, timestamps) for t, line in lines).decode())
        return Reply(200, None, stream=self._follow(pod, key, lines, timestamps))

    def _follow(
        self, pod: dict[str, Any], key: tuple[str, str, str], lines: list[tuple[float, str]], timestamps: bool
    ) -> Iterator[bytes]:
        """The log as it grows, until the container terminates or the pod is deleted (as kubelet's follow)."""
        namespace, name, container = key
        sent = len(self.logs.get(key, []))
        yield from (_log_line(t, line, timestamps) for t, line in lines)
        while True:
            with self.store.lock:
                while True:
                    current = self.store.get(f"/api/v1/namespaces/{namespace}/pods", name)
                    new = self.logs.get(key, [])[sent:]
                    ended = (
                        self.stopping.is_set()
                        or current is None
                        or current["metadata"]["uid"] != pod["metadata"]["uid"]
                        or "terminated" in (_container_status(current, container).get("state") or {})
                    )
                    if new or ended:
                        break
                    self.store.lock.wait(0.5)
                sent += len(new)
            yield from (_log_line(t, line, timestamps) for t, line in new)
            if ended:
                return


def _flag(query: dict[str, Any], key: str) -> bool:
    """A boolean parameter as Go's strconv.ParseBool reads it (the Python client sends True as "True")."""
    return str(query.get(key, "")).lower() in ("1", "t", "true")


def _policy(options: dict[str, Any]) -> str:
    if options.get("propagationPolicy"):
        return options["propagationPolicy"]
    return "Orphan" if _flag(options, "orphanDependents") else "Background"


def _spec(obj: dict[str, Any]) -> dict[str, Any]:
    """What generation counts: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _event(change: Any, matches: Callable[[dict[str, Any]], bool]) -> tuple[str, dict[str, Any]] | None:
    """A change as a watch with selectors sees it: an object that starts (stops) matching is ADDED (DELETED)."""
    now_matches = matches(change.obj) and change.type != "DELETED"
    before = change.old is not None and matches(change.old)
    if now_matches:
        return ("MODIFIED" if before else "ADDED"), change.obj
    return ("DELETED", change.obj) if before else None


def _container_status(pod: dict[str, Any], container: str) -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses", []) + (pod.get("status") or {}).get(
        "initContainerStatuses", []
    )
    return next((s for s in statuses if s.get("name") == container), {})


def _log_lines(lines: list[tuple[float, str]], query: dict[str, str]) -> list[tuple[float, str]]:
    if query.get("sinceSeconds"):
        lines = [(t, line) for t, line in lines if t >= time.time() - int(query["sinceSeconds"])]
    elif query.get("sinceTime"):
        since = datetime.fromisoformat(query["sinceTime"].replace("Z", "+00:00")).timestamp()
        lines = [(t, line) for t, line in lines if t >= since]
    if query.get("tailLines"):
        lines = lines[-int(query["tailLines"]) :] if int(query["tailLines"]) else []
    return lines


def _log_line(stamp: float, line: str, timestamps: bool) -> bytes:
    prefix = datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ ") if timestamps else ""
    return (prefix + line).encode()


def decode_body(raw: bytes, content_type: str) -> Any:
    """A request body: YAML for apply patches, JSON otherwise (None when empty or unparsable)."""
    if not raw:
        return None
    try:
        return yaml.safe_load(raw) if content_type.startswith(APPLY) else json.loads(raw)
    except (ValueError, yaml.YAMLError):
        return None
