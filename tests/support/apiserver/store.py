"""What the stand-in cluster holds: objects, one resourceVersion counter, the change history, the garbage collector.

Like etcd behind kube-apiserver, every write (create, update, delete) takes the next value of one
cluster-wide revision counter, which becomes the object's metadata.resourceVersion (a deleted
object's last resourceVersion is the revision of its deletion).  Watches read the history of
changes; ``compact`` forgets it, so that a watch from an older resourceVersion gets 410 Gone.

The garbage collector runs synchronously, right after the write that gives it work (kube's runs
moments later): deleting an owner with propagationPolicy Background deletes it, then its dependents;
Foreground deletes the dependents first; Orphan strips the ownerReference from the dependents.  A
dependent whose owners are all gone (or never existed) is deleted; references to missing owners
are dropped from a dependent that still has a live one.  An object with finalizers is only marked
(deletionTimestamp) until an update empties them.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

ORPHAN_FINALIZER = "orphan"
FOREGROUND_FINALIZER = "foregroundDeletion"


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Change:
    revision: int
    type: str  # ADDED, MODIFIED, DELETED
    collection: str
    obj: dict[str, Any]
    old: dict[str, Any] | None


@dataclass
class Store:
    objects: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # collection path -> name -> object
    revision: int = 0
    history: list[Change] = field(default_factory=list)
    compacted: int = 0  # watches from a resourceVersion before this get 410 Gone
    lock: threading.Condition = field(default_factory=lambda: threading.Condition(threading.RLock()))

    # -- primitive writes ----------------------------------------------------------------

    def write(self, collection: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Store ``obj`` (create or replace) under the next revision and record the change."""
        with self.lock:
            name = obj["metadata"]["name"]
            old = self.objects.get(collection, {}).get(name)
            self.revision += 1
            obj["metadata"]["resourceVersion"] = str(self.revision)
            self.objects.setdefault(collection, {})[name] = obj
            self._record("MODIFIED" if old else "ADDED", collection, obj, old)
            if old and obj["metadata"].get("deletionTimestamp") and not obj["metadata"].get("finalizers"):
                self._remove(collection, name)  # its last finalizer is gone
                self._collect(obj["metadata"].get("uid"), "Background")
            return obj

    def _remove(self, collection: str, name: str) -> dict[str, Any]:
        obj = self.objects[collection].pop(name)
        self.revision += 1
        obj["metadata"]["resourceVersion"] = str(self.revision)
        self._record("DELETED", collection, obj, obj)
        return obj

    def _record(self, kind: str, collection: str, obj: dict[str, Any], old: dict[str, Any] | None) -> None:
        self.history.append(Change(self.revision, kind, collection, _copy(obj), _copy(old) if old else None))
        self.lock.notify_all()

    def compact(self) -> None:
        """Forget the history, as etcd compaction does."""
        with self.lock:
            self.history.clear()
            self.compacted = self.revision

    # -- queries -------------------------------------------------------------------------

    def get(self, collection: str, name: str) -> dict[str, Any] | None:
        return self.objects.get(collection, {}).get(name)

    def by_uid(self, uid: str) -> tuple[str, dict[str, Any]] | None:
        for collection, objs in self.objects.items():
            for obj in objs.values():
                if obj["metadata"].get("uid") == uid:
                    return collection, obj
        return None

    def dependents(self, uid: str) -> list[tuple[str, dict[str, Any]]]:
        return [
            (collection, obj)
            for collection, objs in self.objects.items()
            for obj in list(objs.values())
            if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])
        ]

    # -- deletion and garbage collection -------------------------------------------------------

    def delete(self, collection: str, name: str, policy: str = "Background") -> tuple[dict[str, Any], bool]:
        """Delete as kube-apiserver and its garbage collector do; returns (the object, whether it is gone)."""
        with self.lock:
            obj = self.objects[collection][name]
            meta = obj["metadata"]
            if meta.get("finalizers"):  # someone else's finalizer: only mark it
                meta.setdefault("deletionTimestamp", now())
                return _copy(self.write(collection, obj)), False
            uid = meta.get("uid")
            answer = _copy(obj)
            if policy in ("Orphan", "Foreground"):
                answer["metadata"] |= {
                    "deletionTimestamp": now(),
                    "finalizers": [ORPHAN_FINALIZER if policy == "Orphan" else FOREGROUND_FINALIZER],
                }
            if policy == "Orphan":
                for dep_collection, dependent in self.dependents(uid):
                    self._drop_owners(dep_collection, dependent, {uid})
            elif policy == "Foreground":
                self._collect(uid, "Foreground")
            if self.get(collection, name) is not None:
                self._remove(collection, name)
            if policy == "Background":
                self._collect(uid, "Background")
            if collection == "/api/v1/namespaces":
                self._empty_namespace(name)
            return answer, policy == "Background"

    def _collect(self, uid: str, policy: str) -> None:
        for collection, dependent in self.dependents(uid):
            if self.get(collection, dependent["metadata"]["name"]) is dependent:
                self.collect_if_orphaned(collection, dependent, gone={uid}, policy=policy)

    def collect_if_orphaned(
        self, collection: str, obj: dict[str, Any], gone: set[str] = frozenset(), policy: str = "Background"
    ) -> bool:
        """The garbage collector's look at one dependent; True when it deleted it."""
        refs = obj["metadata"].get("ownerReferences") or []
        missing = {ref.get("uid") for ref in refs if ref.get("uid") in gone or self.by_uid(ref.get("uid")) is None}
        if not refs or not missing:
            return False
        if missing >= {ref.get("uid") for ref in refs}:
            self.delete(collection, obj["metadata"]["name"], policy)
            return True
        self._drop_owners(collection, obj, missing)
        return False

    def _drop_owners(self, collection: str, obj: dict[str, Any], uids: set[str]) -> None:
        updated = _copy(obj)
        updated["metadata"]["ownerReferences"] = [
            r for r in obj["metadata"]["ownerReferences"] if r.get("uid") not in uids
        ]
        if not updated["metadata"]["ownerReferences"]:
            del updated["metadata"]["ownerReferences"]
        self.write(collection, updated)

    def _empty_namespace(self, namespace: str) -> None:
        for collection in [c for c in self.objects if f"/namespaces/{namespace}/" in c]:
            for name in list(self.objects[collection]):
                if self.get(collection, name) is not None:
                    self._remove(collection, name)


def _copy(obj: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(obj)
