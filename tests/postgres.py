"""A throw-away PostgreSQL cluster for the tests of the index's PostgreSQL backend.

``PostgresCluster`` runs ``initdb`` into a temp folder (trust authentication, UTF8, no fsync) and
``pg_ctl -w start`` on a free port of 127.0.0.1 with its unix socket in that folder; ``pg_ctl -w``
waits until the server accepts connections, so nothing here polls or sleeps. initdb and postgres
refuse to run as root, and the tests run as root here and in CI: then both run as ``nobody`` via
``setpriv`` on a folder owned by ``nobody``. The fixtures in tests/conftest.py start one cluster
per session and give each test a fresh database in it. Tests that use it fail, rather than skip,
when no PostgreSQL server binaries are installed (Debian: ``apt-get install postgresql``).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from tests.peers import free_port

SUPERUSER = "postgres"
# Speed over durability: the cluster is deleted after the run. 200 connections: the node's pools
# of several processes at once.
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}
START_TIMEOUT_S = 60
COMMAND_TIMEOUT_S = 120
UNPRIVILEGED_USER = "nobody"


class PostgresNotFoundError(RuntimeError):
    """No PostgreSQL server binaries (initdb, pg_ctl, postgres) on this machine."""


class PostgresCommandError(RuntimeError):
    """initdb or pg_ctl failed; the message carries their output and the end of the server log."""


def _has_server(bindir: Path) -> bool:
    return all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres"))


def _version_key(bindir: Path) -> tuple[int, ...]:
    """``/usr/lib/postgresql/15/bin`` -> (15,), so that 15 sorts after 9.6."""
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name))


def find_bindir() -> Path:
    """Where initdb, pg_ctl and postgres are: ``pg_config --bindir``, Debian's folders, PATH.

    Debian installs the server under /usr/lib/postgresql/NN/bin, not on PATH; its pg_config may
    come from libpq-dev without a server, so every candidate is checked for the binaries.
    """
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if result.returncode == 0 and result.stdout.strip():
            candidates.append(Path(result.stdout.strip()))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    initdb = shutil.which("initdb")
    if initdb is not None:
        candidates.append(Path(initdb).resolve().parent)
    for bindir in candidates:
        if _has_server(bindir):
            return bindir
    raise PostgresNotFoundError(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) in `pg_config --bindir`, "
        "/usr/lib/postgresql/*/bin or PATH: install them (Debian: apt-get install postgresql; "
        "bash .ci/run does)"
    )


def _clean_environment() -> dict[str, str]:
    """This process's environment without PG* variables (PGDATA, PGPORT would redirect pg_ctl)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


class PostgresCluster:
    """One initdb'd, running PostgreSQL server in a temp folder; ``stop`` removes everything."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="ie-gateway-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam(UNPRIVILEGED_USER)
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]

    def _run(self, tool: str, *args: str) -> None:
        command = [*self._as_user, str(self.bindir / tool), *args]
        result = subprocess.run(
            command,
            cwd=self.root,
            env=_clean_environment(),
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""
            raise PostgresCommandError(
                f"{tool} exited with {result.returncode}\n{result.stdout}{result.stderr}\nserver log:\n{log}"
            )

    def start(self) -> PostgresCluster:
        """initdb, write the settings, start the server and return when it accepts connections."""
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")  # fmt: skip
        settings = {**SETTINGS, "port": str(self.port), "unix_socket_directories": f"'{self.root}'"}
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# tests/postgres.py\n")
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(START_TIMEOUT_S), "start")
        return self

    def stop(self) -> None:
        """Stop the server at once (nothing in it is kept) and delete its folder."""
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, dbname: str = "postgres") -> str:
        """The libpq URL of ``dbname`` over TCP, as gateway.yaml's ``storage.index`` takes it."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, hint: str = "") -> str:
        """A new empty database (a unique name, ``hint`` in it for the log); return its URL."""
        slug = re.sub(r"[^a-z0-9]+", "_", hint.lower()).strip("_")[:40]
        name = f"t_{uuid.uuid4().hex[:12]}_{slug}".rstrip("_")
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a database made by ``create_database``, closing any connection still open to it."""
        name = str(conninfo_to_dict(url)["dbname"])
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
