"""Azurite (the Azure Storage emulator) as a real peer for the sync tests.

``azurite_blob`` starts ``azurite-blob`` on a free loopback port with its data in a temp folder,
waits until the port answers, yields the devstoreaccount1 connection string and kills it at
teardown. Tests that use it fail, rather than skip, when ``azurite-blob`` is missing
(``npm install -g azurite@3.35.0``). Import the fixture into a test module to use it.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import free_port

# The emulator's published development account and key (not a secret).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
START_TIMEOUT_S = 30.0


def _wait_for_port(port: int, process: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"azurite-blob exited with {process.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)  # polling interval while waiting on a deadline, not synchronisation
    raise RuntimeError(f"azurite-blob did not listen on 127.0.0.1:{port} in {START_TIMEOUT_S} s")


def connection_string(port: int) -> str:
    """The development connection string for Azurite's blob endpoint on ``port``."""
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};"
    )


@contextlib.contextmanager
def running_azurite(location: Path) -> Iterator[str]:
    """Start azurite-blob with its data in ``location``; yield its connection string; stop it."""
    executable = shutil.which("azurite-blob")
    if executable is None:
        raise RuntimeError("azurite-blob not installed: npm install -g azurite@3.35.0")
    port = free_port()
    process = subprocess.Popen(
        [executable, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location",
         str(location), "--disableTelemetry", "--silent", "--skipApiVersionCheck"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, process, time.monotonic() + START_TIMEOUT_S)
        yield connection_string(port)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def azurite_blob(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A running Azurite blob service for the session; yields its connection string."""
    if shutil.which("azurite-blob") is None:
        pytest.fail("azurite-blob not installed: npm install -g azurite@3.35.0")
    with running_azurite(tmp_path_factory.mktemp("azurite")) as connection:
        yield connection
