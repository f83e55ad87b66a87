"""Where checkpoints live: any fsspec URL, and the commit protocol on top of it.

Layout under a checkpoint URI::

    <uri>/step-00000100/      one torch.distributed.checkpoint directory
    <uri>/step-00000100/COMMITTED   written only once every shard and the
                                    metadata are durable (JSON: step, time,
                                    world size, bytes, config)
    <uri>/latest              names the newest committed step directory

A directory without ``COMMITTED`` is never loaded, whatever ``latest`` says.
Torch-free, so ``mfrctl ckpt`` can read the same layout.

S3 settings come from the config's ``storage_options`` and the standard AWS
environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION).  Transient errors are retried with exponential backoff;
errors are reported naming the URL and endpoint, never a credential (the
user info of a URL is redacted, see ``credentials``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from fsspec.core import url_to_fs

from .config import STEP_DIR, ConfigError
from .credentials import redact

MARKER = "COMMITTED"
LATEST = "latest"
T = TypeVar("T")


class StorageError(RuntimeError):
    """Checkpoint storage cannot be used (unreachable, denied, missing bucket)."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(redact(message))
        self.permanent = permanent  # a config or credential problem, not worth retrying the job


def step_dir(step: int) -> str:
    return f"step-{step:08d}"


@dataclass(frozen=True)
class CheckpointInfo:
    """One ``step-<N>`` directory as found in storage."""

    name: str
    url: str
    step: int
    committed: bool
    time: float | None = None  # commit time (epoch seconds), or newest file time if uncommitted
    world_size: int | None = None
    bytes: int | None = None
    config: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fsspec_options(url: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """The config's options, plus AWS_ENDPOINT_URL for s3:// when none is given."""
    opts = dict(options or {})
    if url.startswith(("s3://", "s3a://")) and "endpoint_url" not in opts:
        client = opts.get("client_kwargs", {})
        if "endpoint_url" not in client and os.environ.get("AWS_ENDPOINT_URL"):
            opts["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
        # Fail fast on a dead endpoint (botocore waits 60 s x 5 by default); Storage retries.
        opts.setdefault("config_kwargs", {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2}})
    return opts


def _is_permanent(err: BaseException) -> bool:
    if isinstance(err, (PermissionError, FileNotFoundError, NotADirectoryError, IsADirectoryError, ValueError)):
        return True
    text = f"{type(err).__name__} {err}"
    return any(
        word in text
        for word in ("NoCredentials", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "NoSuchBucket")
    )


class Storage:
    """A checkpoint root URL with retried, well-reported file operations."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, retries: int = 4, backoff: float = 0.5):
        self.url = url.rstrip("/")
        self.options = fsspec_options(self.url, storage_options)
        self.retries, self.backoff = retries, backoff
        try:
            self.fs, self.root = url_to_fs(self.url, **self.options)
        except (ImportError, ValueError, TypeError) as err:
            raise StorageError(f"cannot open checkpoint storage {self.url}: {err}", permanent=True) from None
        self.is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    @property
    def endpoint(self) -> str | None:
        if self.is_local:
            return None
        return self.options.get("endpoint_url") or self.options.get("client_kwargs", {}).get("endpoint_url")

    def join(self, *parts: str) -> str:
        """A full URL (with protocol) below the root, for DCP's fsspec reader/writer."""
        return "/".join([self.url, *parts])

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def describe(self, err: BaseException) -> str:
        where = self.url + (f" (endpoint {self.endpoint})" if self.endpoint else "")
        cause = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(err, PermissionError) or "AccessDenied" in cause or "InvalidAccessKeyId" in cause:
            cause += " -- check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and the bucket policy"
        elif "NoCredentials" in f"{type(err).__name__} {cause}":
            cause = "no credentials found -- set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        return redact(f"{where}: {cause}")

    def retry(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``; retry transient errors with backoff; raise StorageError naming the cause."""
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as err:  # fsspec backends raise many types; classify below
                if _is_permanent(err) or attempt == self.retries:
                    raise StorageError(f"{what} failed at {self.describe(err)}", permanent=_is_permanent(err)) from err
                time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    # -- small files --------------------------------------------------------
    def read_bytes(self, *parts: str) -> bytes | None:
        """The file's bytes, or None if it does not exist."""
        path = self.path(*parts)

        def read() -> bytes | None:
            try:
                return self.fs.cat_file(path)
            except FileNotFoundError:
                return None

        return self.retry(f"reading {'/'.join(parts)}", read)

    def read_text(self, *parts: str) -> str | None:
        """The file's text, or None if it does not exist."""
        data = self.read_bytes(*parts)
        return None if data is None else data.decode(errors="replace")

    def write_text(self, text: str, *parts: str) -> None:
        """Write a small file atomically: readers see the old or the new content."""
        path = self.path(*parts)

        def write() -> None:
            if self.is_local:  # a rename is atomic on a POSIX file system; an object PUT already is
                tmp = f"{path}.tmp-{os.getpid()}"
                with self.fs.open(tmp, "w") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            else:
                self.fs.pipe_file(path, text.encode())

        self.retry(f"writing {'/'.join(parts)}", write)

    def remove(self, name: str) -> None:
        """Delete ``name`` and everything below it, leaving no empty directory entry behind (object stores
        with real folders, such as SeaweedFS, keep one after its objects are gone unless ``name/`` is
        deleted too; on AWS S3 that delete is a no-op)."""
        path = self.path(name)

        def rm() -> None:
            try:
                self.fs.rm(path, recursive=True)
            except FileNotFoundError:
                pass
            if not self.is_local:
                try:
                    self.fs.rm_file(path + "/")
                except FileNotFoundError:
                    pass
            self.fs.invalidate_cache()

        self.retry(f"removing {name}", rm)

    def exists(self) -> bool:
        """Whether the root is there (a folder; on an object store, a prefix holding objects)."""
        return self.retry("looking up the checkpoint folder", lambda: self.fs.exists(self.root))

    def make_root(self) -> None:
        if self.is_local:
            self.retry("creating the checkpoint directory", lambda: self.fs.makedirs(self.root, exist_ok=True))

    # -- the commit protocol -------------------------------------------------
    def commit(self, step: int, record: dict[str, Any]) -> None:
        """Mark ``step-<N>`` complete, then point ``latest`` at it (in that order)."""
        name = step_dir(step)
        self.write_text(json.dumps({"step": step, "time": time.time(), **record}, indent=1), name, MARKER)
        self.write_text(name + "\n", LATEST)

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every ``step-<N>`` directory that holds files, oldest first, committed or not (an object store
        may list an empty prefix as a directory: that is no checkpoint)."""

        def listing() -> list[dict[str, Any]]:
            self.fs.invalidate_cache()
            try:
                return self.fs.ls(self.root, detail=True)
            except FileNotFoundError:
                return []

        found = []
        for entry in self.retry("listing checkpoints", listing):
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            match = STEP_DIR.match(name)
            if match is None or entry.get("type") != "directory":
                continue
            info = self._info(name, int(match.group(1)))
            if info is not None:
                found.append(info)
        return sorted(found, key=lambda c: c.step)

    def _info(self, name: str, step: int) -> CheckpointInfo | None:
        url = self.join(name)
        try:
            record = json.loads(self.read_text(name, MARKER) or "null")
        except json.JSONDecodeError:
            record = None  # a torn marker is no marker
        if not isinstance(record, dict) or record.get("step") != step:
            listed = self.retry(f"listing {name}", lambda: self.fs.ls(self.path(name), detail=True))
            files = [f for f in listed if f["name"].rstrip("/") != self.path(name)]  # not the folder's own marker
            if not any(f.get("type") == "file" for f in files):
                return None
            times = [_mtime(f) for f in files]
            times = [t for t in times if t is not None]
            size = sum(int(f.get("size") or 0) for f in files)
            return CheckpointInfo(name, url, step, False, max(times) if times else None, None, size)
        return CheckpointInfo(
            name,
            url,
            step,
            True,
            record.get("time"),
            record.get("world_size"),
            record.get("bytes"),
            record.get("config"),
        )

    def latest_committed(self) -> CheckpointInfo | None:
        """The newest committed checkpoint.

        Found by scanning the markers, not by trusting ``latest``: a save that
        died between its marker and the pointer still counts, and a directory
        that ``latest`` names but that has no marker never does.
        """
        committed = [c for c in self.checkpoints() if c.committed]
        return committed[-1] if committed else None

    def retain(self, keep: int, in_flight: int | None = None) -> list[str]:
        """Delete all but the newest ``keep`` committed checkpoints, and stale uncommitted
        directories older than the newest committed one; never the one being written."""
        found = self.checkpoints()
        committed = [c for c in found if c.committed]
        if not committed:
            return []
        newest = committed[-1].step
        doomed = committed[: -max(keep, 1)]
        doomed += [c for c in found if not c.committed and c.step < newest and c.step != in_flight]
        for c in doomed:
            self.remove(c.name)
        return [c.name for c in doomed]


def find_checkpoint(
    url: str, step: int | None = None, storage_options: dict[str, Any] | None = None, committed: bool = True
) -> CheckpointInfo:
    """The checkpoint a user names: a ``.../step-<N>`` URL, a root plus ``step``, or the root's newest
    committed one.  An interrupted save is refused unless ``committed=False`` (to inspect it);
    a name that finds nothing is a ``ConfigError`` pointing at ``mfrctl ckpt ls``."""
    root, _, name = url.rstrip("/").rpartition("/")
    match = STEP_DIR.match(name)
    if step is None and root and match:
        step = int(match.group(1))
    else:
        root = url.rstrip("/")
    found = Storage(root, storage_options).checkpoints()
    if step is None:
        newest = [c for c in found if c.committed]
        if not newest:
            raise ConfigError(f"no committed checkpoint under {root} (mfrctl ckpt ls {root})")
        return newest[-1]
    info = next((c for c in found if c.step == step), None)
    if info is None:
        raise ConfigError(f"no checkpoint of step {step} under {root} (mfrctl ckpt ls {root})")
    if committed and not info.committed:
        raise ConfigError(
            f"{info.url} is not committed (an interrupted save); pass a committed step (mfrctl ckpt ls {root})"
        )
    return info


def _mtime(entry: dict[str, Any]) -> float | None:
    value = entry.get("mtime") or entry.get("LastModified") or entry.get("created")
    if value is None:
        return None
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


def open_url(
    url: str, storage_options: dict[str, Any] | None = None, *, what: str, fresh: bool = False
) -> tuple[Any, str]:
    """``(filesystem, path)`` of any fsspec URL (a local path, s3://...) with the S3 defaults of ``Storage``.

    The one way mfr opens a URL.  ``what`` names what it is (data.uri, the model, a .bin set) in the
    one-line error when the URL cannot be opened; ``fresh``: a filesystem of this process's own.
    """
    try:
        fresh_options = {"skip_instance_cache": True} if fresh else {}
        return url_to_fs(url, **fresh_options, **fsspec_options(url, storage_options))
    except (ImportError, ValueError, TypeError) as err:
        raise ConfigError(f"{what} {redact(url)}: cannot open it ({redact(str(err))})") from None


def open_file(url: str, mode: str, storage_options: dict[str, Any] | None = None, *, what: str = "output"):
    """One file of any fsspec URL, as ``open`` (written whole on close), through ``open_url``."""
    fs, path = open_url(url, storage_options, what=what)
    return fs.open(path, mode)


class ProcessFS:
    """A URL's filesystem, opened anew in each process that uses it: s3fs sessions do not survive a fork into
    DataLoader workers.  Pickles without it."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None, what: str):
        self.url, self.options, self.what = url, storage_options or {}, what
        self._fs, self._pid = None, None

    @property
    def fs(self):
        if self._pid != os.getpid():
            self._fs, _ = open_url(self.url, self.options, what=self.what, fresh=True)
            self._pid = os.getpid()
        return self._fs

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None, "_pid": None}
