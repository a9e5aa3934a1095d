"""Shared fixtures: synthetic series on disk, the node started as users start it, a PostgreSQL."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from ie_gateway import log as logsetup
from ie_gateway.demo.phantoms import make_phantom, write_ct_series
from tests.peers import Node, Orthanc
from tests.postgres import PostgresCluster, PostgresNotFoundError, find_bindir


@pytest.fixture(autouse=True)
def _logging_left_as_found(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Logging is process-wide. A test that sets up the node's logging in the test process (cli.main
    does) would leave its level and handler to the tests after it in this worker, and its loggers
    cached at first use, which structlog's capture_logs() cannot see: which later test missed its log
    lines would depend on the order. Each test finds logging as the one before found it."""
    configure = logsetup.configure

    def configure_uncached(*args: Any, **kwargs: Any) -> None:
        configure(*args, **kwargs)
        structlog.configure(cache_logger_on_first_use=False)

    monkeypatch.setattr(logsetup, "configure", configure_uncached)
    root = logging.getLogger()
    handlers, level, config = root.handlers[:], root.level, structlog.get_config()
    yield
    structlog.configure(**config)
    root.handlers = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def full_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A 200-slice 512² thorax CT (about 100 MiB), written once per session."""
    folder = tmp_path_factory.mktemp("ct200")
    return write_ct_series(make_phantom(11), folder, seed=11)


@pytest.fixture(scope="session")
def small_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A 30-slice 256² thorax CT with a full-size field of view."""
    folder = tmp_path_factory.mktemp("ct30")
    phantom = make_phantom(12, slices=30, size=256, pixel_mm=1.95, slice_mm=5.0)
    return write_ct_series(phantom, folder, seed=12)


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[object]:
    """Make nodes (subprocesses) in this test's folder; all are stopped at teardown."""
    nodes: list[Node] = []

    def make(name: str = "node", **kwargs: object) -> Node:
        node = Node(tmp_path / name, **kwargs)  # type: ignore[arg-type]
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.stop()


@pytest.fixture
def node(node_factory: object) -> Node:
    """A running node with no routing rules (series end `unrouted`)."""
    return node_factory().start()  # type: ignore[operator, no-any-return]


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path / "orthanc").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One throw-away PostgreSQL server for the session (tests/postgres.py); fails if none is installed."""
    try:
        bindir = find_bindir()
    except PostgresNotFoundError as error:
        pytest.fail(str(error))
    cluster = PostgresCluster(bindir)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster: PostgresCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty database for this test: ``postgresql://postgres@127.0.0.1:PORT/NAME``."""
    url = postgres_cluster.create_database(request.node.name)
    yield url
    postgres_cluster.drop_database(url)


def dcm_compress(src: list[Path], dst: Path, tool: list[str]) -> list[Path]:
    """Compress each file with a dcmtk tool (dcmcjpeg, dcmcrle, ...) into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for path in src:
        target = dst / path.name
        subprocess.run([*tool, str(path), str(target)], check=True, capture_output=True)
        out.append(target)
    return out


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def index_url(request: pytest.FixtureRequest) -> str:
    """``storage.index`` for a store test: the embedded SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return "sqlite"
    return str(request.getfixturevalue("postgres_url"))
