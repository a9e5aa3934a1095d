"""Who may use the admin page: named accounts, a proxy's user header, or the admin token;
sessions that expire and end on sign-out; sign-in attempts limited; CSRF protection.

**Named accounts** (``ie-gateway users add NAME``, :mod:`ie_gateway.web.accounts`): a person signs
in with name and password and every action is recorded under that name. **A reverse proxy**
that authenticates people (the hospital's single sign-on) may pass the name in
``http.user_header``; it counts only from ``http.trusted_proxies``. **The admin token** from the
environment (``IE_GATEWAY_ADMIN_TOKEN``) or a systemd credential (``admin-token``), never from
YAML, still works for scripts (``Authorization: Bearer <token>``, recorded as ``token``) and, on
a node without accounts, for signing in at the page.

Once accounts or a user header exist, the read-only pages need a sign-in too, unless
``http.open_pages``. Without any of the three, the page is read-only and open, as before.

A session is a random id in a cookie (HttpOnly, SameSite=Strict) that maps, in this process, to
the person and its expiry: unused for ``session_idle_min`` or older than ``session_max_h`` it
ends; signing out ends it at once; a restart ends every session. Every form carries
``csrf = HMAC(key, "csrf:" + session id)``, the key random per process. A forged cross-site form
has neither the cookie (SameSite) nor the CSRF value, and a request whose Origin is another site
is refused outright. After ``MAX_FAILURES`` failed sign-ins within ``FAILURE_WINDOW_S`` from one
address or for one name, further attempts are refused until the window has passed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request

from ie_gateway.config import HttpSettings
from ie_gateway.web.accounts import NAME, Accounts

TOKEN_ENV = "IE_GATEWAY_ADMIN_TOKEN"
CREDENTIAL = "admin-token"
COOKIE = "ie_gateway_session"
TOKEN_USER = "token"  # who an action done with the admin token is recorded as
MAX_FAILURES = 5
FAILURE_WINDOW_S = 900.0


def admin_token() -> str | None:
    """The admin token from the environment or the systemd credential; None when neither is set."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials:
        path = Path(credentials) / CREDENTIAL
        if path.is_file():
            return path.read_text().strip() or None
    return None


@dataclass
class Session:
    user: str
    started: float
    last_seen: float


class Guard:
    """Checks credentials, keeps this process's sessions and issues CSRF values."""

    def __init__(
        self,
        token: str | None,
        accounts: Accounts | None = None,
        settings: HttpSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.token = token
        self.accounts = accounts
        self.settings = settings or HttpSettings()
        self.clock = clock
        self._key = secrets.token_bytes(32)
        self._sessions: dict[str, Session] = {}
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    @property
    def named(self) -> bool:
        """Whether people sign in by name (accounts exist or a proxy's header is configured)."""
        return bool(self.settings.user_header) or bool(self.accounts)

    @property
    def enabled(self) -> bool:
        """Whether anyone can act at all."""
        return bool(self.token) or self.named

    @property
    def pages_need_sign_in(self) -> bool:
        return self.named and not self.settings.open_pages

    def _mac(self, message: str) -> str:
        return hmac.new(self._key, message.encode(), hashlib.sha256).hexdigest()

    # --- credentials ------------------------------------------------------------------------

    def token_matches(self, offered: str) -> bool:
        return bool(self.token) and hmac.compare_digest(offered.encode(), (self.token or "").encode())

    def password_matches(self, name: str, password: str) -> bool:
        return self.accounts is not None and NAME.fullmatch(name) is not None and self.accounts.verify(name, password)

    def proxy_user(self, request: Request) -> str | None:
        """The name an authenticating reverse proxy passed, when it comes from a trusted one."""
        header = self.settings.user_header
        if not header or request.client is None or request.client.host not in self.settings.trusted_proxies:
            return None
        name = request.headers.get(header, "").strip()
        return name if NAME.fullmatch(name) else None

    def throttled(self, *keys: str) -> bool:
        """Whether sign-in from these keys (address, name) is refused for too many failures."""
        now = self.clock()
        with self._lock:
            for key in keys:
                recent = self._failures.get(key)
                while recent and now - recent[0] > FAILURE_WINDOW_S:
                    recent.popleft()
                if recent is not None and len(recent) >= MAX_FAILURES:
                    return True
        return False

    def failed(self, *keys: str) -> None:
        now = self.clock()
        with self._lock:
            for key in keys:
                self._failures.setdefault(key, deque()).append(now)

    # --- sessions ---------------------------------------------------------------------------

    def new_session(self, user: str = TOKEN_USER) -> str:
        """Start a session for ``user``; the cookie's value."""
        sid = secrets.token_urlsafe(32)
        now = self.clock()
        with self._lock:
            self._sessions[sid] = Session(user, now, now)
        return sid

    def end_session(self, request: Request) -> None:
        with self._lock:
            self._sessions.pop(request.cookies.get(COOKIE, ""), None)

    def _session(self, request: Request) -> tuple[str, Session] | None:
        """The live session of ``request`` (its last use refreshed), None when absent or expired."""
        sid = request.cookies.get(COOKIE, "")
        now = self.clock()
        with self._lock:
            session = self._sessions.get(sid)
            if session is None:
                return None
            idle, age = now - session.last_seen, now - session.started
            if idle > self.settings.session_idle_min * 60 or age > self.settings.session_max_h * 3600:
                del self._sessions[sid]
                return None
            session.last_seen = now
            return sid, session

    def session_nonce(self, request: Request) -> str | None:
        """The id of a live session on ``request``, else None."""
        found = self._session(request)
        return found[0] if found else None

    def user(self, request: Request) -> str | None:
        """Who is signed in on ``request``: the proxy's user or the session's, else None."""
        proxied = self.proxy_user(request)
        if proxied:
            return proxied
        found = self._session(request)
        return found[1].user if found else None

    def csrf_for(self, request: Request) -> str | None:
        """The value every form of this session must send back, None when not signed in."""
        proxied = self.proxy_user(request)
        if proxied:
            return self._mac("csrf:proxy:" + proxied)
        nonce = self.session_nonce(request)
        return self._mac("csrf:" + nonce) if nonce else None

    def same_origin(self, request: Request) -> bool:
        """False when the browser says the request comes from another site."""
        origin = request.headers.get("origin")
        if origin is None:  # not a browser, or one that does not say: the other checks still apply
            return True
        return origin == f"{request.url.scheme}://{request.url.netloc}"

    def allows(self, request: Request, csrf: str | None) -> tuple[bool, str | None, str]:
        """Whether an action request may run: (allowed, who, why not) for the 403 page."""
        if not self.enabled:
            return False, None, f"actions are off: no admin token is set ({TOKEN_ENV} or the {CREDENTIAL} credential)"
        if not self.same_origin(request):
            return False, None, "the request came from another site"
        bearer = request.headers.get("authorization", "")
        if bearer.startswith("Bearer "):
            ok = self.token_matches(bearer[7:].strip())
            return (True, TOKEN_USER, "") if ok else (False, None, "wrong token")
        who = self.user(request)
        if who is None:
            signed_before = bool(request.cookies.get(COOKIE))
            return False, None, "your session has ended: sign in again" if signed_before else "sign in first"
        expected = self.csrf_for(request)
        if not csrf or expected is None or not hmac.compare_digest(csrf, expected):
            return False, None, "the form's CSRF value is missing or stale; reload the page"
        return True, who, ""
