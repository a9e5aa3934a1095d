"""Hot reload of the rules file: a valid change applies, an invalid one is refused and the
running rules stay."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from ie_gateway.errors import ConfigError
from ie_gateway.files import sha256_file
from ie_gateway.route.rules import RuleSet


class RulesWatcher:
    """Reload the rules when their file changes; keep the running rules when the file is bad.

    ``poll()`` stats the file; only when mtime or size changed does it hash the bytes, and only
    when the content changed does it call ``loader`` (e.g. ``functools.partial(load_rules,
    destinations=..., model_exists=...)``). It returns the new RuleSet, or None when nothing
    changed or the new file is invalid; then ``last_error`` holds the ConfigError (the same
    object until the content changes again, so the caller logs each refusal once) and the
    caller keeps its current rules. ``poll(force=True)`` reloads even unchanged content (SIGHUP,
    or after models were installed). Safe to call from several threads.
    """

    def __init__(self, path: Path, loader: Callable[[Path], RuleSet]) -> None:
        self._path = path
        self._loader = loader
        self._lock = threading.Lock()
        self._signature: tuple[int, int] | None = None
        self._digest: str | None = None
        self._current: RuleSet | None = None
        self._last_error: ConfigError | None = None
        self._digest_error: ConfigError | None = None  # the verdict on the content of _digest

    @property
    def current(self) -> RuleSet | None:
        """The last RuleSet that validated (None before the first successful poll)."""
        return self._current

    @property
    def last_error(self) -> ConfigError | None:
        """Why the latest content was refused; None once a valid file loaded."""
        return self._last_error

    def poll(self, force: bool = False) -> RuleSet | None:
        """Return a newly validated RuleSet if the file changed and validates, else None."""
        with self._lock:
            try:
                stat = self._path.stat()
                signature = (stat.st_mtime_ns, stat.st_size)
                if not force and signature == self._signature:
                    return None
                digest = sha256_file(self._path)
            except OSError as exc:
                self._unreadable(f"{self._path}: cannot read: {exc.strerror}")
                return None
            self._signature = signature
            if not force and digest == self._digest:
                self._last_error = self._digest_error  # e.g. a file put back after a deletion
                return None
            self._digest = digest
            try:
                rules = self._loader(self._path)
            except ConfigError as exc:
                self._last_error = self._digest_error = exc
                return None
            self._current, self._last_error, self._digest_error = rules, None, None
            return rules

    def _unreadable(self, message: str) -> None:
        """Record a read failure, keeping the same error object while it persists."""
        self._signature = None
        if self._last_error is None or self._last_error.errors != [message]:
            self._last_error = ConfigError([message])
