"""Who may press the admin page's buttons (ie_gateway.web.auth, ie_gateway.web.accounts), without a
browser; the page in a real browser is tested in test_qa_loop and test_review_viewer."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.requests import Request

from ie_gateway.config import HttpSettings
from ie_gateway.errors import AuthError
from ie_gateway.web.accounts import Accounts
from ie_gateway.web.auth import COOKIE, CREDENTIAL, MAX_FAILURES, TOKEN_ENV, Guard, admin_token


def request(headers: dict[str, str] | None = None, cookie: str | None = None, client: str = "127.0.0.1") -> Request:
    items = dict(headers or {})
    if cookie is not None:
        items["cookie"] = f"{COOKIE}={cookie}"
    return Request(
        {
            "type": "http",
            "method": "POST",
            "scheme": "http",
            "server": ("127.0.0.1", 8080),
            "path": "/jobs/1/retry",
            "query_string": b"",
            "client": (client, 50000),
            "headers": [(k.lower().encode(), v.encode()) for k, v in items.items()],
        }
    )


def test_token_comes_from_the_environment_before_the_systemd_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
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
    allowed, who, why = Guard(None).allows(request({"Authorization": "Bearer "}), None)
    assert not allowed and who is None and TOKEN_ENV in why


def test_a_session_needs_its_own_csrf_value_and_a_new_token_ends_it() -> None:
    guard = Guard("s3cret")
    session = guard.new_session()
    signed_in = request(cookie=session)
    csrf = guard.csrf_for(signed_in)
    assert csrf is not None
    assert guard.allows(signed_in, csrf) == (True, "token", "")
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


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def accounts(tmp_path: Path) -> Accounts:
    accounts = Accounts(tmp_path / "users.json")
    accounts.add("alice", "correct horse battery")
    return accounts


def test_passwords_are_kept_as_scrypt_hashes_in_a_private_file(accounts: Accounts) -> None:
    assert accounts.verify("alice", "correct horse battery")
    assert not accounts.verify("alice", "correct horse batter")
    assert not accounts.verify("mallory", "correct horse battery")
    text = accounts.path.read_text()
    assert "correct horse" not in text and '"kdf": "scrypt"' in text
    assert accounts.path.stat().st_mode & 0o077 == 0
    with pytest.raises(AuthError, match="at least 12"):
        accounts.add("bob", "short")
    with pytest.raises(AuthError, match="not an account name"):
        accounts.add("bob smith", "long enough password")
    with pytest.raises(AuthError, match="exists"):
        accounts.add("alice", "another long password")


def test_a_session_expires_when_idle_or_too_old_and_ends_on_sign_out(accounts: Accounts) -> None:
    clock = Clock()
    guard = Guard(None, accounts, HttpSettings(session_idle_min=30, session_max_h=1), clock=clock)
    session = guard.new_session("alice")
    signed_in = request(cookie=session)
    csrf = guard.csrf_for(signed_in)
    assert guard.allows(signed_in, csrf) == (True, "alice", "")
    clock.now += 29 * 60  # used within the idle time: still alive, and refreshed
    assert guard.allows(signed_in, csrf) == (True, "alice", "")
    clock.now += 31 * 60
    assert guard.allows(signed_in, csrf) == (False, None, "your session has ended: sign in again")
    assert guard.user(signed_in) is None

    busy = request(cookie=guard.new_session("alice"))
    for _ in range(3):  # used every 25 minutes, but past the hour since sign-in it ends anyway
        assert guard.user(busy) == "alice"
        clock.now += 25 * 60
    assert guard.user(busy) is None

    leaving = request(cookie=guard.new_session("alice"))
    guard.end_session(leaving)
    assert guard.user(leaving) is None


def test_sign_in_is_refused_after_too_many_failures_for_a_quarter_of_an_hour() -> None:
    clock = Clock()
    guard = Guard("s3cret", clock=clock)
    for _ in range(MAX_FAILURES):
        assert not guard.throttled("address:10.0.0.9", "name:alice")
        guard.failed("address:10.0.0.9", "name:alice")
    assert guard.throttled("address:10.0.0.9")
    assert guard.throttled("address:10.0.0.7", "name:alice")  # the name is throttled from anywhere
    assert not guard.throttled("address:10.0.0.7", "name:bob")
    clock.now += 901
    assert not guard.throttled("address:10.0.0.9", "name:alice")


def test_a_proxys_user_header_counts_only_from_a_trusted_proxy(accounts: Accounts) -> None:
    guard = Guard(None, accounts, HttpSettings(user_header="X-Remote-User", trusted_proxies=["10.0.0.1"]))
    proxied = request({"X-Remote-User": "carol"}, client="10.0.0.1")
    assert guard.user(proxied) == "carol"
    assert guard.allows(proxied, guard.csrf_for(proxied)) == (True, "carol", "")
    assert guard.user(request({"X-Remote-User": "carol"}, client="10.0.0.2")) is None
    assert guard.user(request({"X-Remote-User": "carol; drop"}, client="10.0.0.1")) is None
    assert guard.pages_need_sign_in
    assert not Guard(None, accounts, HttpSettings(open_pages=True)).pages_need_sign_in
    assert not Guard("s3cret").pages_need_sign_in  # a token alone keeps the pages open, as before
