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

from ie_gateway.demo.phantoms import make_phantom
from ie_gateway.errors import InferenceError
from ie_gateway.infer.formats import describe_package
from ie_gateway.infer.registry import Registry
from ie_gateway.infer.runner import InferenceRunner
from ie_gateway.infer.sandbox import network_isolated
from ie_gateway.infer.signing import TrustedKey
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


CONFINED = """
import json, os, sys
from pathlib import Path
from ie_gateway.infer.sandbox import FileRules, confine_files
tmp = Path(sys.argv[1])
said = confine_files(FileRules(read=(tmp / "models",), hidden=(tmp / "models" / "credentials",)), tmp / "exchange")
seen = {"said": said}
def attempt(name, do):
    try:
        do()
        seen[name] = "ok"
    except PermissionError:
        seen[name] = "refused"
attempt("model", lambda: (tmp / "models" / "weights.pt").read_bytes())
attempt("credentials", lambda: (tmp / "models" / "credentials" / "key").read_bytes())
attempt("other_job", lambda: (tmp / "results" / "job-7" / "ct.mha").read_bytes())
attempt("model_write", lambda: (tmp / "models" / "weights.pt").write_bytes(b"x"))
attempt("ct", lambda: (tmp / "exchange" / "in" / "ct.mha").read_bytes())
attempt("ct_write", lambda: (tmp / "exchange" / "in" / "ct.mha").write_bytes(b"x"))
attempt("labels", lambda: (tmp / "exchange" / "out" / "labels.mha").write_bytes(b"x"))
attempt("library", lambda: __import__("email.mime.text"))
attempt("etc", lambda: Path("/etc/passwd").read_bytes())
attempt("parent_environ", lambda: Path(f"/proc/{os.getppid()}/environ").read_bytes())
attempt("parent_cwd", lambda: os.listdir(f"/proc/{os.getppid()}/cwd"))
print(json.dumps(seen))
"""


def test_a_file_confined_child_reads_the_models_and_its_exchange_folder_and_nothing_else(tmp_path: Path) -> None:
    import subprocess
    import sys

    from ie_gateway.infer.sandbox import landlock_abi

    if landlock_abi() == 0:
        pytest.skip("this kernel has no Landlock")
    for path in ("models/weights.pt", "models/credentials/key", "results/job-7/ct.mha", "exchange/in/ct.mha"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"secret" if "key" in path else b"data")
    (tmp_path / "exchange" / "out").mkdir()
    done = subprocess.run(
        [sys.executable, "-c", CONFINED, str(tmp_path)], capture_output=True, text=True, timeout=120, check=True
    )
    seen = json.loads(done.stdout)
    assert seen.pop("said").startswith("files: Landlock ABI")
    assert seen == {
        "model": "ok",
        "credentials": "refused",
        "other_job": "refused",
        "model_write": "refused",
        "ct": "ok",
        "ct_write": "refused",
        "labels": "ok",
        "library": "ok",
        "etc": "ok",
        "parent_environ": "refused",  # Landlock also denies ptrace-like access to the unconfined parent
        "parent_cwd": "refused",
    }
    # the control: without the confinement, this process reads them all
    assert (tmp_path / "models" / "credentials" / "key").read_bytes() == b"secret"


SNOOP = """
import json
seen = {}
for name, path in PATHS.items():
    try:
        with open(path, "rb") as fh:
            fh.read()
        seen[name] = "read"
    except OSError as exc:
        seen[name] = type(exc).__name__
raise RuntimeError("SEEN " + json.dumps(seen, sort_keys=True))
"""


def snooping_bundle(folder: Path, paths: dict[str, Path], key: Path) -> Path:
    """The test bundle plus ``snoop.py``, which (on real jobs only) tries to read ``paths`` and
    fails the job with what it could read in its message."""
    from tests.monai_bundles import write_bundle

    write_bundle(folder)
    script = SNOOP.replace("PATHS", repr({name: str(path) for name, path in paths.items()}))
    (folder / "snoop.py").write_text(script)
    config_path = folder / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    config["imports"].append("$import runpy")
    config["initialize"].append("$runpy.run_path(@bundle_root + '/snoop.py') if 'probe' not in @dataset_dir else None")
    config_path.write_text(json.dumps(config, indent=2))
    describe_package(folder, "snoops", "1")
    return sign(folder, key)


def test_an_allow_code_bundle_in_a_file_confined_child_cannot_read_credentials_or_other_jobs(
    tmp_path: Path,
) -> None:
    from ie_gateway.infer.sandbox import FileRules, landlock_abi

    if landlock_abi() == 0:
        pytest.skip("this kernel has no Landlock")
    credentials = tmp_path / "etc" / "credentials"
    other_job = tmp_path / "storage" / "results" / "job-7"
    for folder in (credentials, other_job):
        folder.mkdir(parents=True)
    (credentials / "anonymisation.key").write_bytes(b"secret")
    (other_job / "ct.mha").write_bytes(b"another patient")
    private, public = new_key(tmp_path / "keys", "research")
    keys = (*DEMO_TRUSTED, TrustedKey("research", public, allow_code=True))
    paths = {"credentials": credentials / "anonymisation.key", "other_job": other_job / "ct.mha"}
    bundle = snooping_bundle(tmp_path / "incoming" / "bundle", paths, private)
    good = write_package(
        tmp_path / "incoming", [threshold_model(2, 0.25)], name="good", structures=1, patch=(16, 32, 32)
    )
    job = tmp_path / "storage" / "results" / "job-8"
    job.mkdir()
    ct = ct_file(job / "ct.mha")
    rules = FileRules(read=(tmp_path / "models",), hidden=(tmp_path / "etc", tmp_path / "storage"))
    with InferenceRunner(
        300, device="cpu", log_level=None, files=rules, exchange_root=tmp_path / "storage" / "results" / ".x"
    ) as runner:
        registry = Registry(tmp_path / "models", tmp_path / "state.json", runner.verify, keys)
        snooper = registry.import_version(bundle)
        good_model = registry.import_version(good)
        assert runner.sandbox is not None and runner.sandbox[-1].startswith("files: Landlock ABI")
        assert "threads" not in runner.sandbox[-1]  # no thread escaped the confinement
        with pytest.raises(InferenceError, match="SEEN") as failed:
            runner.run(snooper, ct, job / "labels-1.mha")
        result = runner.run(good_model, ct, job / "labels.mha")
    seen = json.loads(str(failed.value).split("SEEN ", 1)[1])
    assert seen == {"credentials": "PermissionError", "other_job": "PermissionError"}
    assert result.volumes_cc["External"] > 0 and (job / "labels.mha").is_file()
    assert not (job / "labels-1.mha").exists() and list((tmp_path / "storage" / "results" / ".x").iterdir()) == []
    # the control: the same code in this process, not confined, reads both
    with pytest.raises(RuntimeError, match="SEEN") as control:
        runpy.run_path(str(tmp_path / "models" / "snoops" / "1" / "snoop.py"))
    assert json.loads(str(control.value).split("SEEN ", 1)[1]) == {"credentials": "read", "other_job": "read"}


def test_exchange_folders_a_killed_node_left_on_this_host_are_removed_and_others_kept(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from ie_gateway.infer.runner import _remove_stale_exchanges

    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    names = {
        "dead": f"ie-gateway-infer-{host}-{int(dead.stdout)}-abc",
        "alive": f"ie-gateway-infer-{host}-{os.getpid()}-abc",
        "other_host": f"ie-gateway-infer-{host}x-{int(dead.stdout)}-abc",
    }
    for name in names.values():
        (tmp_path / name / "in").mkdir(parents=True)
        (tmp_path / name / "in" / "ct.mha").write_bytes(b"ct")
    _remove_stale_exchanges(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["alive"], names["other_host"]])


def test_without_landlock_the_child_says_its_files_are_not_confined(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ie_gateway.infer import sandbox

    monkeypatch.setattr(sandbox, "landlock_abi", lambda: 0)  # a kernel without Landlock
    said = sandbox.confine_files(sandbox.FileRules(), tmp_path)
    assert said == "files: NOT confined (Landlock unavailable)"
    assert (tmp_path / "elsewhere").write_bytes(b"x") == 1  # and indeed nothing was restricted
