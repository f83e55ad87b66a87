"""Failure answers as kube-apiserver gives them: metav1.Status objects (k8s.io/apimachinery/pkg/api/errors).

The API conventions ("Response Status Kind") make reason, code and details the machine-readable
part a client may branch on, so they match kube-apiserver exactly: details.kind is the resource
(plural) for NotFound/AlreadyExists/Conflict/Forbidden and the Kind for Invalid, whose
details.causes list each field path and reason.
"""

from __future__ import annotations

from typing import Any

from tests.support.apiserver.resources import Resource
from tests.support.apiserver.schema import FieldError


class ApiError(Exception):
    """An answer other than success: a Status body, or kube-apiserver's plain-text 404 for an unknown path."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.body: Any = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }
        if details:
            self.body["details"] = details


class PageNotFound(ApiError):
    """A path no installed API serves (an API group whose CRD is not installed, say)."""

    def __init__(self) -> None:
        super().__init__(404, "NotFound", "404 page not found")
        self.body = "404 page not found\n"


def _details(resource: Resource | None, name: str = "", **extra: Any) -> dict[str, Any]:
    found = {"name": name} if name else {}
    if resource is not None:
        found |= ({"group": resource.group} if resource.group else {}) | {"kind": resource.plural}
    return found | extra


def not_found(resource: Resource, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{resource.qualified} "{name}" not found', _details(resource, name))


def namespace_not_found(namespace: str) -> ApiError:
    """The NamespaceLifecycle admission plugin's answer to a create in a namespace that does not exist."""
    return ApiError(404, "NotFound", f'namespaces "{namespace}" not found', {"name": namespace, "kind": "namespaces"})


def already_exists(resource: Resource, name: str) -> ApiError:
    return ApiError(409, "AlreadyExists", f'{resource.qualified} "{name}" already exists', _details(resource, name))


def conflict(resource: Resource, name: str, why: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {resource.qualified} "{name}": {why}',
        _details(resource, name),
    )


STALE = "the object has been modified; please apply your changes to the latest version and try again"


def invalid(qualified_kind: str, name: str, errors: list[FieldError], group: str = "", kind: str = "") -> ApiError:
    """422 Invalid: 'Kind.group "name" is invalid: <error>' (several errors in brackets, comma-joined)."""
    text = str(errors[0]) if len(errors) == 1 else "[" + ", ".join(map(str, errors)) + "]"
    details = ({"name": name} if name else {}) | ({"group": group} if group else {}) | ({"kind": kind} if kind else {})
    return ApiError(
        422,
        "Invalid",
        f'{qualified_kind} "{name}" is invalid: {text}',
        details | {"causes": [e.cause() for e in errors]},
    )


def resource_invalid(resource: Resource, name: str, errors: list[FieldError]) -> ApiError:
    return invalid(resource.qualified_kind, name, errors, resource.group, resource.kind)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def internal(message: str) -> ApiError:
    """An error kube-apiserver did not turn into a Status of its own: code 500, reason left empty."""
    error = ApiError(500, "", message)
    del error.body["reason"]
    return error


def forbidden(resource: Resource, name: str, user: str, verb: str, subresource: str, namespace: str | None) -> ApiError:
    """RBAC's denial, worded as handlers/responsewriters forbiddenMessage."""
    what = f"{resource.plural}/{subresource}" if subresource else resource.plural
    scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    reason = f'User "{user}" cannot {verb} resource "{what}" in API group "{resource.group}" {scope}'
    subject = f'{resource.qualified} "{name}"' if name else resource.qualified
    return ApiError(403, "Forbidden", f"{subject} is forbidden: {reason}", _details(resource, name))


def method_not_allowed() -> ApiError:
    return ApiError(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")


def unsupported_patch(accepted: list[str]) -> ApiError:
    return ApiError(
        415,
        "UnsupportedMediaType",
        f"the body of the request was in an unknown format - accepted media types include: {', '.join(accepted)}",
    )


def unauthorized() -> ApiError:
    return ApiError(401, "Unauthorized", "Unauthorized")


def expired(requested: int, oldest: int) -> ApiError:
    return ApiError(410, "Expired", f"too old resource version: {requested} ({oldest})")
