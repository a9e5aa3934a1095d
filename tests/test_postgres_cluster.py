"""The throw-away PostgreSQL of tests/postgres.py: what the index's PostgreSQL tests rely on."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest

pytestmark = pytest.mark.postgres

# URLs handed out so far in this run: a database handed to two tests would show up here twice.
_seen_urls: set[str] = set()


@pytest.mark.parametrize("turn", ["first", "second"])
def test_each_test_gets_its_own_empty_database(postgres_url: str, turn: str) -> None:
    """Each run leaves a table behind; the other would see it if the database were shared."""
    assert postgres_url not in _seen_urls
    with psycopg.connect(postgres_url) as conn:
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables"
            " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
        assert tables == []
        conn.execute("CREATE TABLE left_behind (turn text)")
        conn.execute("INSERT INTO left_behind VALUES (%s)", (turn,))
    _seen_urls.add(postgres_url)


def test_server_listens_on_loopback_only_and_not_as_root(postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as conn:
        listen = conn.execute("SHOW listen_addresses").fetchone()
        server_address = conn.execute("SELECT host(inet_server_addr())").fetchone()
        data_directory = conn.execute("SELECT current_setting('data_directory')").fetchone()
        backend_pid = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert backend_pid is not None
        # while the connection is open: its backend process ends with it
        process_owner = Path(f"/proc/{backend_pid[0]}").stat().st_uid
    assert listen == ("127.0.0.1",)
    assert server_address == ("127.0.0.1",)
    assert data_directory is not None
    owner = Path(data_directory[0]).stat().st_uid
    assert owner != 0
    assert process_owner == owner
    assert os.geteuid() == 0 or owner == os.geteuid()
