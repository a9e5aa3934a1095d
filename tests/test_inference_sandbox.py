"""The inference child is confined: a model that tries to reach out fails its job, the node goes on.

A MONAI bundle signed by a key with ``allow_code: true`` (so its config may run any code) ships
a script that, on a real job, tries to open a TCP connection to a listener of this test and
looks for the node's secrets in its environment, writes what happened to a report, and fails.
The connection fails inside the child, the listener never sees it, the secrets are not there,
the job fails with the reason and the next job (another model, same child) completes. The same
script run in the test's own process does connect: the confinement is what stopped it.
"""

from __future__ import annotations

import json
import runpy
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import SimpleITK as sitk

from ie_gateway.errors import InferenceError
from ie_gateway.infer.formats import describe_package
from ie_gateway.infer.registry import Registry
from ie_gateway.infer.runner import InferenceRunner
from ie_gateway.infer.sandbox import network_isolated
from ie_gateway.infer.signing import TrustedKey
from ie_gateway.synthetic import make_phantom
from tests.infer_packages import threshold_model, write_package
from tests.keys import DEMO_TRUSTED, new_key, sign

pytestmark = [pytest.mark.peer, pytest.mark.slow]

SECRETS = {
    "AZURE_STORAGE_CONNECTION_STRING": "AccountKey=secret",
    "PGPASSWORD": "secret",
    "IE_GATEWAY_ADMIN_TOKEN": "x",
}
HOSTILE = """
import json, os, socket, sys
attempt = {"connected": False, "error": None}
try:
    socket.create_connection(("127.0.0.1", PORT), timeout=2).close()
    attempt["connected"] = True
except OSError as exc:
    attempt["error"] = f"{type(exc).__name__}: {exc}"
attempt["secrets_seen"] = sorted(n for n in os.environ if n in SECRETS or n == "CREDENTIALS_DIRECTORY")
with open(REPORT, "w") as fh:
    json.dump(attempt, fh)
"""


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server


def connections(server: socket.socket) -> int:
    """Connections waiting to be accepted (the hostile code never waits for us to accept)."""
    seen = 0
    while select.select([server], [], [], 0)[0]:
        server.accept()[0].close()
        seen += 1
    return seen


def hostile_bundle(folder: Path, port: int, report: Path, key: Path) -> Path:
    """The test bundle plus ``hostile.py``, run from an ``initialize`` expression on real jobs
    only (the import's probe runs on a CT in a folder named ...probe...)."""
    from tests.monai_bundles import write_bundle

    write_bundle(folder)
    script = HOSTILE.replace("REPORT", repr(str(report))).replace("PORT", str(port))
    script = script.replace("SECRETS", repr(sorted(SECRETS)))
    (folder / "hostile.py").write_text(script)
    config_path = folder / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    config["imports"].append("$import runpy")
    config["initialize"].append(
        "$runpy.run_path(@bundle_root + '/hostile.py') if 'probe' not in @dataset_dir else None"
    )
    config["initialize"].append("$1 / 0 if 'probe' not in @dataset_dir else None")  # the job then fails
    config_path.write_text(json.dumps(config, indent=2))
    describe_package(folder, "reaches-out", "1")
    assert "hostile.py" in (folder / "model.yaml").read_text()  # describe lists every file
    return sign(folder, key)


def ct_file(path: Path) -> Path:
    phantom = make_phantom(5, slices=16, size=64, pixel_mm=6.0, slice_mm=5.0)
    image = sitk.GetImageFromArray(phantom.hu)
    image.SetSpacing((phantom.pixel_mm, phantom.pixel_mm, phantom.slice_mm))
    sitk.WriteImage(image, str(path))
    return path


def test_an_allow_code_bundle_cannot_reach_the_network_or_the_secrets_and_the_next_job_completes(
    tmp_path: Path, listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    private, public = new_key(tmp_path / "keys", "research")
    keys = (*DEMO_TRUSTED, TrustedKey("research", public, allow_code=True))
    report = tmp_path / "report.json"
    port = listener.getsockname()[1]
    bundle = hostile_bundle(tmp_path / "incoming" / "bundle", port, report, private)
    good = write_package(
        tmp_path / "incoming", [threshold_model(2, 0.25)], name="good", structures=1, patch=(16, 32, 32)
    )
    ct = ct_file(tmp_path / "ct.mha")
    with InferenceRunner(300, device="cpu", log_level=None, memory_gb=8) as runner:
        registry = Registry(tmp_path / "models", tmp_path / "state.json", runner.verify, keys)
        hostile_model = registry.import_version(bundle)
        good_model = registry.import_version(good)
        assert runner.sandbox is not None and "network namespace" in runner.sandbox[0]
        assert "RLIMIT_AS 8 GB" in runner.sandbox[1]
        with pytest.raises(InferenceError, match="ZeroDivisionError"):
            runner.run(hostile_model, ct, tmp_path / "job1-labels.mha")
        result = runner.run(good_model, ct, tmp_path / "job2-labels.mha")
    attempt = json.loads(report.read_text())
    assert attempt["connected"] is False and "unreachable" in attempt["error"]
    assert attempt["secrets_seen"] == []
    assert connections(listener) == 0
    assert result.volumes_cc["External"] > 0 and not (tmp_path / "job1-labels.mha").exists()
    # the control: outside the child, the same code connects
    runpy.run_path(str(tmp_path / "models" / "reaches-out" / "1" / "hostile.py"))
    assert json.loads(report.read_text())["connected"] is True and connections(listener) == 1


def test_the_seccomp_fallback_refuses_internet_sockets_and_keeps_unix_ones() -> None:
    import subprocess
    import sys

    code = (
        "import socket; from ie_gateway.infer.sandbox import install_socket_filter, network_isolated\n"
        "install_socket_filter(); socket.socketpair(); print(network_isolated())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "True" and not network_isolated()
