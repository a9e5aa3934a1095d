"""Who may press the admin page's buttons (ie_gateway.web.auth), without a browser; the page in
a real browser is tested in test_qa_loop."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.requests import Request

from ie_gateway.web.auth import COOKIE, CREDENTIAL, TOKEN_ENV, Guard, admin_token


def request(headers: dict[str, str] | None = None, cookie: str | None = None) -> Request:
    items = dict(headers or {})
    if cookie is not None:
        items["cookie"] = f"{COOKIE}={cookie}"
    return Request({"type": "http", "method": "POST", "scheme": "http", "server": ("127.0.0.1", 8080),
                    "path": "/jobs/1/retry", "query_string": b"",
                    "headers": [(k.lower().encode(), v.encode()) for k, v in items.items()]})


def test_token_comes_from_the_environment_before_the_systemd_credential(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / CREDENTIAL).write_text("from-credential\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert admin_token() == "from-credential"
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert admin_token() == "from-env"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    monkeypatch.delenv(TOKEN_ENV)
    assert admin_token() is None


def test_without_a_token_every_action_is_refused() -> None:
    allowed, why = Guard(None).allows(request({"Authorization": "Bearer "}), None)
    assert not allowed and TOKEN_ENV in why


def test_a_session_needs_its_own_csrf_value_and_a_new_token_ends_it() -> None:
    guard = Guard("s3cret")
    session = guard.new_session()
    signed_in = request(cookie=session)
    csrf = guard.csrf_for(signed_in)
    assert csrf is not None
    assert guard.allows(signed_in, csrf) == (True, "")
    assert not guard.allows(signed_in, None)[0]
    assert not guard.allows(request(cookie=Guard("s3cret").new_session()), csrf)[0]  # another session's value
    assert not guard.allows(request(cookie=session.split(".")[0] + ".forged"), csrf)[0]
    assert not Guard("rotated").allows(signed_in, csrf)[0]


def test_bearer_token_works_only_from_this_origin() -> None:
    guard = Guard("s3cret")
    assert guard.allows(request({"Authorization": "Bearer s3cret"}), None)[0]
    assert guard.allows(request({"Authorization": "Bearer s3cret", "Origin": "http://127.0.0.1:8080"}), None)[0]
    assert not guard.allows(request({"Authorization": "Bearer s3cret", "Origin": "http://evil.example"}), None)[0]
    assert not guard.allows(request({"Authorization": "Bearer s3cre"}), None)[0]
