"""Credentials never travel in a config, and never reach a printed line.

S3 credentials come only from the standard AWS environment (in a cluster, a
Secret).  A TrainConfig is rendered into the run's ConfigMap, written to its
config.yaml and to every checkpoint's COMMITTED record, and shown by
``mfrctl ckpt inspect``: so no ``storage_options`` may hold a credential at
any depth, and no setting may hold a URL with user info
(``http://user:password@host``).  URLs that reach an error or a log line
anyway (an endpoint from the environment, a URL on the command line, a
storage library's own message) have their user info replaced by ``***``.
Torch-free: the CLI uses it too.
"""

from __future__ import annotations

import re
from typing import Any

# Option names of fsspec back ends (s3fs, gcsfs, adlfs) and botocore that carry a secret.
CREDENTIAL_KEYS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "passwd",
        "session_token",
        "access_key",
        "secret_key",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "account_key",
        "sas_token",
        "connection_string",
        "client_secret",
        "credential",
        "credentials",
        "private_key",
        "api_key",
    }
)
_USER_INFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@\"'<>]+@")


def redact(text: str) -> str:
    """``text`` with the user info of every URL in it replaced: ``http://***@host``."""
    return _USER_INFO.sub(r"\g<scheme>***@", text)


def has_user_info(value: str) -> bool:
    return _USER_INFO.search(value) is not None


def credential_paths(value: Any, path: str = "", keys: bool = True) -> list[str]:
    """Where ``value`` holds a credential: dotted paths of credential-named keys (``keys``) at any
    depth, and of strings holding a URL with user info.  The values themselves are never returned."""
    found: list[str] = []
    if isinstance(value, dict):
        for name, item in value.items():
            where = f"{path}.{name}" if path else str(name)
            if keys and str(name).lower().replace("-", "_") in CREDENTIAL_KEYS:
                found.append(where)
            else:
                found += credential_paths(item, where, keys)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found += credential_paths(item, f"{path}[{i}]", keys)
    elif isinstance(value, str) and has_user_info(value):
        found.append(path or "value")
    return found


def check_storage_options(options: dict[str, Any]) -> dict[str, Any]:
    """The rule for every ``storage_options`` field (a pydantic after-validator)."""
    found = credential_paths(options)
    if found:
        raise ValueError(
            f"storage_options must not hold credentials ({', '.join(found)}): set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY in the environment (from a Secret) instead"
        )
    return options
