"""Start and drive the real peers the tests use: our node as users start it, dcmtk, Orthanc.

Every listener is on 127.0.0.1. Waiting is always polling with a deadline, never a bare sleep.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from ie_gateway.config import load_config
from ie_gateway.status import status_rows
from ie_gateway.store import Store

REPO = Path(__file__).resolve().parent.parent
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, every: float = 0.05,
               what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)  # poll interval of this deadline loop


# Ports for the listeners tests start. A port found by binding port 0 and closing is free only for
# a moment: until the peer binds it, another xdist worker's bind(0) or any outgoing connection (the
# kernel takes their local ports from the same ephemeral range) may take it, and the peer fails with
# "Address already in use". So each xdist worker hands out ports in turn from its own block below
# the ephemeral range, where no outgoing connection and no other worker ever takes one.
LOWEST_TEST_PORT = 10000
_next_port = itertools.count()


def _port_block() -> tuple[int, int]:
    """(first port, size) of this process's block: the span below the ephemeral range split
    between the xdist workers (one block when not under xdist)."""
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    size = (ephemeral_low - LOWEST_TEST_PORT) // workers
    if size < 100:
        raise RuntimeError(f"the ephemeral port range starts at {ephemeral_low}: too low to give "
                           f"{workers} test workers ports of their own above {LOWEST_TEST_PORT}")
    return LOWEST_TEST_PORT + worker * size, size


def free_port() -> int:
    """A loopback port nobody listens on, never handed out before by this worker: the next one of
    the worker's block that can be bound (a leftover listener or TIME_WAIT is skipped)."""
    first, size = _port_block()
    start = os.getpid() % size  # two test runs that share one network stack begin apart
    for _ in range(size):
        port = first + (start + next(_next_port)) % size
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {first}-{first + size - 1}")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def echoscu(port: int, calling: str = "ECHOSCU", called: str = "IE_GATEWAY") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["echoscu", "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=DCMTK_ENV, timeout=60)


def storescu(port: int, files: Sequence[Path] | Path, calling: str = "STORESCU",
             called: str = "IE_GATEWAY", extra: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """Send files (or a folder, recursively) with dcmtk storescu, proposing only what they need."""
    options = ["-aet", calling, "-aec", called, "-R", *extra]
    if isinstance(files, Path):
        options += ["+sd", "+r"]
        paths = [str(files)]
    else:
        paths = [str(f) for f in files]
    return subprocess.run(["storescu", *options, "127.0.0.1", str(port), *paths],
                          capture_output=True, text=True, env=DCMTK_ENV, timeout=600)


class Node:
    """`ie-gateway serve --config FILE` in a subprocess, as an admin or systemd starts it."""

    def __init__(self, workdir: Path, *, port: int | None = None, settings: dict[str, Any] | None = None,
                 rules: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                 preexec: Callable[[], None] | None = None, role: str = "all") -> None:
        self.workdir = workdir
        self.role = role
        self.port = port or free_port()
        self.config = workdir / "gateway.yaml"
        self.log_path = workdir / "node.log"
        # the node runs this checkout's package, not whichever one the venv installed: a
        # benchmark of an older commit's worktree (sharing the venv) measures that commit
        python_path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        self.env = {**os.environ, "PYTHONPATH": python_path, **(env or {})}
        self.preexec = preexec
        self.proc: subprocess.Popen[bytes] | None = None
        self._started_at = 0
        workdir.mkdir(parents=True, exist_ok=True)
        cfg: dict[str, Any] = {
            "node": {"ae_title": "IE_GATEWAY", "bind": "127.0.0.1", "port": self.port,
                     "allowed_callers": [{"ae_title": t} for t in ("STORESCU", "ECHOSCU", "PACS", "TPS")]},
            "storage": {"root": "var"},
            "series": {"stable_after_s": 1.0, "sweep_every_s": 0.2},
            "routing_file": "routing.yaml",
            "models_dir": str(REPO / "models"),
            "trusted_keys": [{"name": "demo", "public_key": str(REPO / "keys" / "demo-only-publisher.pub")}],
            "http": {"bind": "127.0.0.1", "port": free_port()},
            "log_level": "info",
        }
        for key, value in (settings or {}).items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        self.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
        (workdir / "routing.yaml").write_text(yaml.safe_dump(rules or {"rules": []}, sort_keys=False))
        self.root = workdir / "var"

    def start(self, timeout: float = 60, echo: bool = True) -> Node:
        """Start and wait until the main process logs "ready" and the node answers C-ECHO
        (``echo=False``: only the former, for configurations that refuse echoscu)."""
        log = self.log_path.open("ab")
        self._started_at = log.tell()  # a restarted node appends: its earlier "ready" does not count
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ie_gateway.cli", "serve", "--config", str(self.config), "--role", self.role],
            stdout=log, stderr=log, env=self.env, preexec_fn=self.preexec, cwd=self.workdir)
        wait_until(lambda: self._ready(echo), timeout, what="the node to be ready")
        return self

    def _ready(self, echo: bool) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
        # the main process's "ready" (it names the role; a listener child's does not): with
        # listener processes a child answers C-ECHO while the main process is still starting
        said_ready = any(e["event"] == "ready" and "role" in e for e in self.log_events(self._started_at))
        if not echo:
            return said_ready
        return said_ready and port_open(self.port) and echoscu(self.port).returncode == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self, since: int = 0) -> list[dict[str, Any]]:
        """The JSON log lines, from byte offset ``since`` on."""
        events = []
        text = self.log_path.read_bytes()[since:].decode(errors="replace") if self.log_path.exists() else ""
        for line in text.splitlines():
            if line.startswith("{"):
                events.append(json.loads(line))
        return events

    @property
    def http_port(self) -> int:
        return int(yaml.safe_load(self.config.read_text())["http"]["port"])

    def http_get(self, path: str) -> tuple[int, bytes]:
        """GET on the node's HTTP endpoint: (status, body), error statuses included."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=60) as rsp:
                return int(rsp.status), bytes(rsp.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), bytes(exc.read())

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "ie_gateway.cli", *args, "--config", str(self.config)],
                                capture_output=True, text=True, env=self.env, timeout=300)
        if check and result.returncode != 0:
            raise AssertionError(f"ie-gateway {' '.join(args)} failed: {result.stderr}")
        return result

    def status(self) -> list[dict[str, Any]]:
        """The jobs as the admin's `ie-gateway status --json` prints them."""
        return json.loads(self.cli("status", "--json").stdout)

    def jobs(self) -> list[dict[str, Any]]:
        """The rows `status --json` prints, from the same function, called in this process: waits
        poll it twice a second, and a Python start per poll would cost more CPU than the node."""
        store = Store.for_settings(load_config(self.config).storage)
        try:
            return status_rows(store)
        finally:
            store.index.close()

    def wait_state(self, states: set[str], timeout: float = 120, count: int = 1) -> list[dict[str, Any]]:
        def reached() -> list[dict[str, Any]] | None:
            rows = [r for r in self.jobs() if r["state"] in states]
            return rows if len(rows) >= count else None
        return wait_until(reached, timeout, every=0.5, what=f"a job in {sorted(states)}")  # type: ignore[no-any-return]


class Orthanc:
    """An Orthanc server on loopback standing in for a TPS or PACS."""

    def __init__(self, workdir: Path, ae_title: str = "TPS", dicom_port: int | None = None) -> None:
        self.workdir = workdir
        self.dicom_port = dicom_port or free_port()
        self.http_port = free_port()
        self.ae_title = ae_title
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "test-tps", "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"), "DicomAet": ae_title,
            "DicomPort": self.dicom_port, "HttpPort": self.http_port, "Plugins": [],
            "RemoteAccessAllowed": False, "SaveJobs": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True, "UnknownSopClassAccepted": True,
            "StableAge": 1,
        }))

    def start(self) -> Orthanc:
        log = (self.workdir / "orthanc.log").open("ab")
        self.proc = subprocess.Popen(["Orthanc", str(self.config)], stdout=log, stderr=log,
                                     env={**os.environ, "TCP_NODELAY": "1"})
        wait_until(lambda: self._alive() and port_open(self.dicom_port), 30, what="Orthanc")
        return self

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError("Orthanc exited")
        try:
            self.get("/system")
            return True
        except urllib.error.HTTPError:
            return True  # it answers: with AuthenticationEnabled, a request without the user gets 401
        except OSError:
            return False

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=60) as rsp:
            return json.loads(rsp.read())

    def get_post(self, path: str, body: Any) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}",
                                         data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=60) as rsp:
            return json.loads(rsp.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as rsp:
            return bytes(rsp.read())

    def stop(self) -> None:
        """Kill the server: every test stops it once it has read what it needs, and a clean
        Orthanc shutdown takes 3.5 s of waiting (its storage is a throw-away folder)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


class FailingStoreSCP:
    """dcmtk storescp whose every write fails (file size limit), so each C-STORE is answered
    with a failure status: a TPS whose disk is full."""

    def __init__(self, workdir: Path, port: int, ae_title: str = "TPS") -> None:
        self.workdir = workdir
        self.port = port
        self.ae_title = ae_title
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> FailingStoreSCP:
        import resource

        def limit() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "storescp.log").open("ab")
        self.proc = subprocess.Popen(["storescp", "-aet", self.ae_title, "-od", str(self.workdir), "-v",
                                      str(self.port)], stdout=log, stderr=log, env=DCMTK_ENV,
                                     preexec_fn=limit)
        wait_until(lambda: port_open(self.port), 30, what="storescp")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
        self.proc = None
