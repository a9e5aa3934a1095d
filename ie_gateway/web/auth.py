"""Who may press the admin page's buttons: a token, a session cookie, and CSRF protection.

The token comes from the environment (``IE_GATEWAY_ADMIN_TOKEN``) or a systemd credential
(``LoadCredential=admin-token:...`` puts it in ``$CREDENTIALS_DIRECTORY/admin-token``), never
from YAML. Without one, the page is read-only.

An action (a POST) is allowed with ``Authorization: Bearer <token>`` (scripts), or from the
page: signing in with the token sets a session cookie ``<nonce>.<HMAC(token, nonce)>``
(HttpOnly, SameSite=Strict) and every form carries ``csrf = HMAC(token, "csrf:" + nonce)``.
A forged cross-site form has neither the cookie (SameSite) nor the CSRF value, and a request
whose Origin is another site is refused outright. Changing the token ends every session.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from starlette.requests import Request

TOKEN_ENV = "IE_GATEWAY_ADMIN_TOKEN"
CREDENTIAL = "admin-token"
COOKIE = "ie_gateway_session"


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


class Guard:
    """Checks tokens, issues sessions and CSRF values for one token."""

    def __init__(self, token: str | None) -> None:
        self.token = token

    @property
    def enabled(self) -> bool:
        return bool(self.token)

    def _mac(self, message: str) -> str:
        assert self.token is not None
        return hmac.new(self.token.encode(), message.encode(), hashlib.sha256).hexdigest()

    def token_matches(self, offered: str) -> bool:
        return self.enabled and hmac.compare_digest(offered.encode(), (self.token or "").encode())

    def new_session(self) -> str:
        nonce = secrets.token_hex(16)
        return f"{nonce}.{self._mac('session:' + nonce)}"

    def session_nonce(self, request: Request) -> str | None:
        """The nonce of a valid session cookie on ``request``, else None."""
        if not self.enabled:
            return None
        nonce, _, mac = request.cookies.get(COOKIE, "").partition(".")
        if nonce and hmac.compare_digest(mac, self._mac("session:" + nonce)):
            return nonce
        return None

    def csrf_for(self, request: Request) -> str | None:
        """The value every form of this session must send back, None when not signed in."""
        nonce = self.session_nonce(request)
        return self._mac("csrf:" + nonce) if nonce else None

    def same_origin(self, request: Request) -> bool:
        """False when the browser says the request comes from another site."""
        origin = request.headers.get("origin")
        if origin is None:  # not a browser, or one that does not say: the other checks still apply
            return True
        return origin == f"{request.url.scheme}://{request.url.netloc}"

    def allows(self, request: Request, csrf: str | None) -> tuple[bool, str]:
        """Whether an action request may run, and if not, why (for the 403 page)."""
        if not self.enabled:
            return False, f"actions are off: no admin token is set ({TOKEN_ENV} or the {CREDENTIAL} credential)"
        if not self.same_origin(request):
            return False, "the request came from another site"
        bearer = request.headers.get("authorization", "")
        if bearer.startswith("Bearer "):
            return (True, "") if self.token_matches(bearer[7:].strip()) else (False, "wrong token")
        expected = self.csrf_for(request)
        if expected is None:
            return False, "sign in with the admin token first"
        if not csrf or not hmac.compare_digest(csrf, expected):
            return False, "the form's CSRF value is missing or stale; reload the page"
        return True, ""
