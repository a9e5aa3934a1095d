"""Named admin accounts for the admin page: who may sign in, with passwords stored as scrypt
hashes (``hashlib.scrypt``, the standard library's memory-hard KDF; no password is ever kept).

The accounts live in ``<storage.root>/users.json`` (mode 0600, beside the index, so the nodes
sharing a storage root share them), managed with ``ie-gateway users add|remove|list``. Every
action on the page is then recorded under the person's name.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

from ie_gateway.errors import AuthError

USERS_FILE = "users.json"
#: Account names go into audit reasons ("released by NAME: ..."): no blanks, colons or commas.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD = 12
# scrypt cost: 2**15 x 8 x 128 bytes = 32 MiB and ~0.1 s per check (OWASP's recommended floor
# is N=2**17 with r=8 at 128 MiB; this keeps a login responsive on a node busy contouring)
_N, _R, _P = 2**15, 8, 1
_MAXMEM = 64 * 2**20


def _hash(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM, dklen=32)


class Accounts:
    """The accounts file of a node."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._dummy: dict[str, Any] = {"salt": secrets.token_hex(16), "n": _N, "r": _R, "p": _P, "hash": "00" * 32}

    def _read(self) -> dict[str, dict[str, Any]]:
        if not self.path.is_file():
            return {}
        try:
            users = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise AuthError(f"{self.path} cannot be read ({exc})") from exc
        if not isinstance(users, dict):
            raise AuthError(f"{self.path} is not an accounts file")
        return users

    def names(self) -> list[str]:
        return sorted(self._read())

    def __bool__(self) -> bool:
        return bool(self._read())

    def add(self, name: str, password: str, *, replace: bool = False) -> None:
        """Create ``name`` (or give it a new password with ``replace``)."""
        if not NAME.fullmatch(name):
            raise AuthError(f"{name!r} is not an account name: letters, digits, '.', '_', '@', '-' (at most 64)")
        if len(password) < MIN_PASSWORD:
            raise AuthError(f"a password needs at least {MIN_PASSWORD} characters")
        users = self._read()
        if name in users and not replace:
            raise AuthError(f"account {name!r} exists (--replace gives it a new password)")
        salt = secrets.token_bytes(16)
        users[name] = {
            "kdf": "scrypt",
            "salt": salt.hex(),
            "n": _N,
            "r": _R,
            "p": _P,
            "hash": _hash(password, salt, _N, _R, _P).hex(),
            "created": time.time(),
        }
        self._write(users)

    def remove(self, name: str) -> None:
        users = self._read()
        if users.pop(name, None) is None:
            raise AuthError(f"no account {name!r}")
        self._write(users)

    def verify(self, name: str, password: str) -> bool:
        """Whether ``password`` is ``name``'s; as slow for an unknown name as for a known one."""
        entry = self._read().get(name)
        record: dict[str, Any] = entry if isinstance(entry, dict) else self._dummy
        try:
            expected = bytes.fromhex(str(record["hash"]))
            got = _hash(
                password, bytes.fromhex(str(record["salt"])), int(record["n"]), int(record["r"]), int(record["p"])
            )
        except (KeyError, ValueError) as exc:
            raise AuthError(f"{self.path}: the entry of {name!r} is damaged") from exc
        return entry is not None and hmac.compare_digest(got, expected)

    def _write(self, users: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(users, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.path)
