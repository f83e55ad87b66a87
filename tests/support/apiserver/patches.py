"""kube-apiserver's PATCH types and server-side apply's field ownership.

* application/merge-patch+json: RFC 7386.
* application/json-patch+json: RFC 6902.
* application/strategic-merge-patch+json (built-in kinds only, as kube-apiserver): lists whose schema
  says ``x-kubernetes-patch-strategy: merge`` are merged by their patch merge key (or as a set, for
  scalars); ``$patch: replace|delete``, ``$retainKeys``, ``$deleteFromPrimitiveList/`` are honoured,
  ``$setElementOrder/`` is accepted and ignored.
* application/apply-patch+yaml, server-side apply: every manager owns the leaf fields it set
  (``metadata.managedFields``, FieldsV1); maps are granular, lists with list-map keys (or a built-in's
  merge key) are merged item by item, other lists are atomic.  Applying a value that differs from one
  another manager owns is a conflict unless ``force``; fields a manager applied before and no longer
  applies are removed when nobody else owns them; an update (create, PUT, other patches) takes over
  the fields it changes.  Ownership is tracked per exact leaf path (no ancestor/descendant overlap).
"""

from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from typing import Any

from tests.support.apiserver.schema import Schema

MISSING = object()
Path = tuple  # of field names, and ("k", json of the item's keys) for an item of a keyed list
# Fields that nobody owns: identity and system-maintained metadata.
_UNMANAGED = {
    ("apiVersion",),
    ("kind",),
    ("metadata", "name"),
    ("metadata", "namespace"),
    ("metadata", "uid"),
    ("metadata", "resourceVersion"),
    ("metadata", "generation"),
    ("metadata", "creationTimestamp"),
    ("metadata", "managedFields"),
    ("metadata", "deletionTimestamp"),
    ("metadata", "selfLink"),
}


class PatchError(ValueError):
    """A patch that cannot be applied; ``code`` is what kube-apiserver answers (400 or 422)."""

    def __init__(self, message: str, code: int = 422):
        super().__init__(message)
        self.code = code


# -- merge patch and JSON patch --------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(doc: Any, operations: Any) -> Any:
    if not isinstance(operations, list):
        raise PatchError("json: cannot unmarshal object into Go value of type jsonpatch.Patch", 400)
    doc = copy.deepcopy(doc)
    for op in operations:
        kind, path = op.get("op"), op.get("path", "")
        if kind == "test":
            if _pointer_get(doc, path) != op.get("value"):
                raise PatchError(f"testing value {path} failed: test failed")
        elif kind == "remove":
            doc = _pointer_set(doc, path, MISSING, replace=True)
        elif kind in ("add", "replace"):
            doc = _pointer_set(doc, path, copy.deepcopy(op.get("value")), replace=kind == "replace")
        elif kind in ("move", "copy"):
            value = copy.deepcopy(_pointer_get(doc, op.get("from", "")))
            if kind == "move":
                doc = _pointer_set(doc, op["from"], MISSING, replace=True)
            doc = _pointer_set(doc, path, value, replace=False)
        else:
            raise PatchError(f"Unexpected kind: {kind}")
    return doc


def _tokens(pointer: str) -> list[str]:
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]] if pointer else []


def _pointer_get(doc: Any, pointer: str) -> Any:
    for token in _tokens(pointer):
        try:
            doc = doc[int(token)] if isinstance(doc, list) else doc[token]
        except (KeyError, IndexError, ValueError, TypeError):
            raise PatchError(f'doc is missing path: "{pointer}": missing value') from None
    return doc


def _pointer_set(doc: Any, pointer: str, value: Any, *, replace: bool) -> Any:
    """Add (or, with replace, replace / remove when value is MISSING) at ``pointer``; returns the new doc."""
    tokens = _tokens(pointer)
    if not tokens:
        return value
    parent = _pointer_get(doc, "/" + "/".join(t.replace("~", "~0").replace("/", "~1") for t in tokens[:-1]))
    last = tokens[-1]
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last) if last.isdigit() else -1
        if not 0 <= index <= len(parent) - (1 if replace else 0):
            raise PatchError(f'doc is missing path: "{pointer}": missing value')
        if value is MISSING:
            del parent[index]
        elif replace:
            parent[index] = value
        else:
            parent.insert(index, value)
    elif isinstance(parent, dict):
        if replace and last not in parent:
            raise PatchError(f'doc is missing key: "{pointer}": missing value')
        if value is MISSING:
            del parent[last]
        else:
            parent[last] = value
    else:
        raise PatchError(f'doc is missing path: "{pointer}": missing value')
    return doc


# -- strategic merge patch ----------------------------------------------------------------


def strategic_merge(target: Any, patch: Any, schema: Schema, node: dict[str, Any]) -> Any:
    """``target`` with ``patch`` applied; None when the patch deletes it ($patch: delete)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "delete":
        return None
    if directive == "replace" or not isinstance(target, dict):
        return _without_directives(patch)
    result = copy.deepcopy(target)
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys") or key.startswith("$setElementOrder/"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            name = key.split("/", 1)[1]
            result[name] = [item for item in result.get(name) or [] if item not in value]
            continue
        sub = schema.child(node, key)
        merged = (
            _merge_list(result.get(key), value, schema, sub)
            if isinstance(value, list)
            else strategic_merge(result.get(key), value, schema, sub)
        )
        if merged is None:
            result.pop(key, None)
        else:
            result[key] = merged
    if "$retainKeys" in patch:
        result = {key: value for key, value in result.items() if key in patch["$retainKeys"]}
    return result


def _merge_list(current: Any, patch: list, schema: Schema, node: dict[str, Any]) -> list:
    node = schema.resolve(node)
    if not isinstance(current, list) or "merge" not in (node.get("x-kubernetes-patch-strategy") or "").split(","):
        return [_without_directives(item) for item in patch if item != {"$patch": "replace"}]
    if {"$patch": "replace"} in patch:
        return [_without_directives(item) for item in patch if item != {"$patch": "replace"}]
    key = node.get("x-kubernetes-patch-merge-key")
    result = copy.deepcopy(current)
    for item in patch:
        if not key:  # a list of scalars merged as a set
            if item not in result:
                result.append(item)
            continue
        index = next(
            (i for i, old in enumerate(result) if isinstance(old, dict) and old.get(key) == item.get(key)), None
        )
        if item.get("$patch") == "delete":
            result = [old for old in result if not (isinstance(old, dict) and old.get(key) == item.get(key))]
        elif index is None:
            result.append(_without_directives(item))
        else:
            result[index] = strategic_merge(result[index], item, schema, schema.items(node))
    return result


def _without_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_without_directives(v) for v in value]
    return value


# -- server-side apply ---------------------------------------------------------------------


class ApplyConflict(Exception):
    def __init__(self, conflicts: list[tuple[str, str]]):  # (manager as printed, field path)
        super().__init__(conflicts)
        self.conflicts = conflicts

    def message(self) -> str:
        """Worded as fieldmanager/internal/conflict.go getConflictMessage."""
        if len(self.conflicts) == 1:
            manager, path = self.conflicts[0]
            return f"Apply failed with 1 conflict: conflict with {manager}: {path}"
        lines = []
        for manager in sorted({m for m, _ in self.conflicts}):
            lines.append(f"conflicts with {manager}:")
            lines += [f"- {path}" for m, path in self.conflicts if m == manager]
        return f"Apply failed with {len(self.conflicts)} conflicts: " + "\n".join(lines)


def leaves(value: Any, schema: Schema, node: dict[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    """Every leaf field of ``value`` (maps granular, keyed lists by item, other lists atomic) -> its value."""
    if isinstance(value, dict) and value and schema.resolve(node).get("x-kubernetes-map-type") != "atomic":
        found: dict[Path, Any] = {}
        for key, sub in value.items():
            if prefix + (key,) not in _UNMANAGED:
                found |= leaves(sub, schema, schema.child(node, key), prefix + (key,))
        return found
    keys = schema.list_keys(node)
    if isinstance(value, list) and keys and all(isinstance(item, dict) for item in value):
        found = {}
        for item in value:
            found |= leaves(item, schema, schema.items(node), prefix + (("k", _item_key(item, keys)),))
        return found
    return {prefix: value}


def _item_key(item: dict[str, Any], keys: list[str]) -> str:
    return json.dumps({k: item.get(k) for k in keys}, sort_keys=True, separators=(",", ":"))


def value_at(obj: Any, path: Path) -> Any:
    for element in path:
        if isinstance(element, tuple):
            wanted = json.loads(element[1])
            obj = (
                next(
                    (
                        item
                        for item in obj
                        if isinstance(item, dict) and all(item.get(k) == v for k, v in wanted.items())
                    ),
                    MISSING,
                )
                if isinstance(obj, list)
                else MISSING
            )
        else:
            obj = obj.get(element, MISSING) if isinstance(obj, dict) else MISSING
        if obj is MISSING:
            return MISSING
    return obj


def _remove_at(obj: Any, path: Path) -> None:
    *parents, last = path
    holder = value_at(obj, tuple(parents))
    if isinstance(last, tuple) and isinstance(holder, list):
        wanted = json.loads(last[1])
        holder[:] = [item for item in holder if not all(item.get(k) == v for k, v in wanted.items())]
    elif isinstance(holder, dict):
        holder.pop(last, None)


def render_path(path: Path) -> str:
    """A field path as structured-merge-diff prints it: .spec.containers[name="x"].image"""
    parts = []
    for element in path:
        if isinstance(element, tuple):
            keys = json.loads(element[1])
            parts.append("[" + ",".join(f"{k}={json.dumps(v)}" for k, v in keys.items()) + "]")
        else:
            parts.append(f".{element}")
    return "".join(parts)


def _apply_merge(live: Any, config: Any, schema: Schema, node: dict[str, Any]) -> Any:
    if isinstance(config, dict) and isinstance(live, dict):
        merged = copy.deepcopy(live)
        for key, value in config.items():
            merged[key] = _apply_merge(live.get(key), value, schema, schema.child(node, key))
        return merged
    keys = schema.list_keys(node)
    if isinstance(config, list) and isinstance(live, list) and keys:
        merged = copy.deepcopy(live)
        for item in config:
            index = next(
                (
                    i
                    for i, old in enumerate(merged)
                    if isinstance(old, dict) and _item_key(old, keys) == _item_key(item, keys)
                ),
                None,
            )
            if index is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[index] = _apply_merge(merged[index], item, schema, schema.items(node))
        return merged
    return copy.deepcopy(config)


def _to_trie(paths: set[Path]) -> dict[str, Any]:
    trie: dict[str, Any] = {}
    for path in sorted(paths, key=repr):
        node = trie
        for element in path:
            name = f"k:{element[1]}" if isinstance(element, tuple) else f"f:{element}"
            node = node.setdefault(name, {})
            if isinstance(element, tuple):
                node.setdefault(".", {})
    return trie


def _from_trie(trie: dict[str, Any], prefix: Path = ()) -> set[Path]:
    paths: set[Path] = set()
    for name, sub in trie.items():
        if name == ".":
            continue
        element = ("k", name[2:]) if name.startswith("k:") else name[2:]
        children = {k: v for k, v in sub.items() if k != "."}
        paths |= _from_trie(children, prefix + (element,)) if children else {prefix + (element,)}
    return paths


def _manager_name(entry: dict[str, Any]) -> str:
    """A manager as conflict messages print it: "name", or "name" using v1 for an Update manager."""
    if entry["operation"] == "Update":
        return f'"{entry["manager"]}" using {entry["apiVersion"]}'
    return f'"{entry["manager"]}"'


def _entry(manager: str, operation: str, api_version: str, paths: set[Path], subresource: str) -> dict[str, Any]:
    entry = {
        "manager": manager,
        "operation": operation,
        "apiVersion": api_version,
        "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "fieldsType": "FieldsV1",
        "fieldsV1": _to_trie(paths),
    }
    return entry | ({"subresource": subresource} if subresource else {})


def _ownership(obj: dict[str, Any]) -> list[tuple[dict[str, Any], set[Path]]]:
    return [
        (entry, _from_trie(entry.get("fieldsV1") or {})) for entry in obj.get("metadata", {}).get("managedFields") or []
    ]


def _store_ownership(obj: dict[str, Any], owned: list[tuple[dict[str, Any], set[Path]]]) -> None:
    entries = [entry | {"fieldsV1": _to_trie(paths)} for entry, paths in owned if paths]
    obj.setdefault("metadata", {})["managedFields"] = entries


def _same_manager(entry: dict[str, Any], manager: str, operation: str, subresource: str) -> bool:
    return (entry["manager"], entry["operation"], entry.get("subresource", "")) == (manager, operation, subresource)


def record_update(
    old: dict[str, Any] | None, new: dict[str, Any], manager: str, schema: Schema, subresource: str = ""
) -> None:
    """Give ``manager`` (operation Update) the fields this create or update changed, taken from everyone else."""
    before = leaves(old, schema, schema.root) if old else {}
    after = leaves(new, schema, schema.root)
    changed = {path for path, value in after.items() if before.get(path, MISSING) != value}
    gone = set(before) - set(after)
    owned = [(entry, paths - changed - gone) for entry, paths in _ownership(old or {})]
    mine = next((paths for entry, paths in owned if _same_manager(entry, manager, "Update", subresource)), None)
    if mine is None:
        owned.append((_entry(manager, "Update", new.get("apiVersion", ""), set(), subresource), changed))
    else:
        mine |= changed
    _store_ownership(new, owned)


def apply(live: dict[str, Any], config: dict[str, Any], manager: str, force: bool, schema: Schema) -> dict[str, Any]:
    """Server-side apply of ``config`` by ``manager`` to ``live`` ({} when creating); raises ApplyConflict."""
    applied = leaves(config, schema, schema.root)
    owned = _ownership(live)
    conflicts = [
        (entry, path)
        for entry, paths in owned
        if not _same_manager(entry, manager, "Apply", "")
        for path in paths & set(applied)
        if value_at(live, path) != applied[path]
    ]
    if conflicts and not force:
        raise ApplyConflict(sorted((_manager_name(entry), render_path(path)) for entry, path in conflicts))
    taken = {path for _, path in conflicts}
    owned = [(entry, paths - taken) for entry, paths in owned]
    previous = next((paths for entry, paths in owned if _same_manager(entry, manager, "Apply", "")), set())
    others = set().union(*(paths for entry, paths in owned if not _same_manager(entry, manager, "Apply", "")))
    result = _apply_merge(live, config, schema, schema.root)
    for path in previous - set(applied) - others:
        _remove_at(result, path)
    owned = [(entry, paths) for entry, paths in owned if not _same_manager(entry, manager, "Apply", "")]
    owned.append((_entry(manager, "Apply", config.get("apiVersion", ""), set(), ""), set(applied)))
    _store_ownership(result, owned)
    return result
