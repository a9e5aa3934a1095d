"""deploy/install.sh laid out in a fake root (DESTDIR): files, node config, keys, idempotence."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ie_gateway.config import GatewayConfig
from ie_gateway.sync.anonymise import load_key

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    """The repository's config and deploy folders, a unit and one shipped model version."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "config", src / "config")
    shutil.copytree(REPO / "deploy", src / "deploy")
    (src / "systemd").mkdir()
    (src / "systemd" / "ie-gateway.service").write_text("[Service]\nExecStart=/bin/true\n")
    (src / "models" / "toy" / "1").mkdir(parents=True)
    (src / "models" / "toy" / "1" / "model.yaml").write_text("name: toy\n")
    return src


def _install(src: Path, root: Path, dev_dir: Path | None = None, *args: str,
             sys_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SRC_DIR": str(src), "DESTDIR": str(root), "PIP_INSTALL": "0",
           "PYTHON": sys.executable, "DEV_DIR": str(dev_dir or root / "no-dev"),
           "SYS_DIR": str(sys_dir or root / "no-sys")}
    return subprocess.run(["bash", str(src / "deploy" / "install.sh"), *args], env=env, text=True,
                          capture_output=True, check=True, timeout=120)


def _check_config(config: Path, root: Path) -> subprocess.CompletedProcess[str]:
    """check-config on an installed gateway.yaml, its /var/lib paths moved under the fake root."""
    local = config.with_name("gateway.local.yaml")
    local.write_text(config.read_text().replace("/var/lib/ie-gateway", str(root / "var/lib/ie-gateway")))
    return subprocess.run([sys.executable, "-m", "ie_gateway.cli", "check-config", "--config", str(local)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_install_lays_out_a_node_that_answers_nobody_routes_nothing_and_has_no_model(
        source: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    out = _install(source, root).stdout
    etc = root / "etc" / "ie-gateway"
    config = yaml.safe_load((etc / "gateway.yaml").read_text())
    GatewayConfig.model_validate(config)
    assert config["node"]["allowed_callers"] == []
    assert config["destinations"] == {}
    assert config["storage"]["root"] == "/var/lib/ie-gateway"
    assert config["models_dir"] == "/var/lib/ie-gateway/models"
    assert config["http"]["bind"] == "127.0.0.1"  # health and metrics stay on loopback
    assert not config.get("trusted_keys")  # no model publisher, not even the demo key (its private key is public)
    assert yaml.safe_load((etc / "routing.yaml").read_text())["rules"] == []
    assert list((root / "var/lib/ie-gateway/models").iterdir()) == []  # the demo models only with --demo
    assert (etc / "site-names.yaml").is_file()
    assert "not opened" not in out  # DESTDIR: no firewall touched at all
    # as installed, it passes check-config: the unit may start, and nobody can associate
    checked = _check_config(etc / "gateway.yaml", root)
    assert checked.returncode == 0, checked.stderr
    assert "(0 rules)" in checked.stdout


def test_an_installed_node_with_a_caller_without_host_pin_fails_check_config(source: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    _install(source, root)
    config = root / "etc/ie-gateway/gateway.yaml"
    config.write_text(config.read_text().replace("allowed_callers: []", "allowed_callers: [{ae_title: PACS}]"))
    checked = _check_config(config, root)
    assert checked.returncode != 0
    assert "node.allowed_callers[0] (PACS): no host, while node.bind 0.0.0.0 is beyond loopback" in checked.stderr

    config.write_text(config.read_text().replace("{ae_title: PACS}", "{ae_title: PACS, host: 10.1.2.3}"))
    assert _check_config(config, root).returncode == 0


def test_demo_flag_installs_the_demo_on_loopback_with_its_models(source: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    _install(source, root, None, "--demo")
    etc = root / "etc" / "ie-gateway"
    config = yaml.safe_load((etc / "gateway.yaml").read_text())
    assert config["node"]["bind"] == "127.0.0.1"  # its callers have no host pins
    assert config["storage"]["root"] == "/var/lib/ie-gateway"
    assert (etc / "routing.yaml").read_text() == (source / "config" / "routing.yaml").read_text()
    assert (root / "var/lib/ie-gateway/models/toy/1/model.yaml").is_file()


def test_install_lays_out_key_credentials_unit_and_docs(source: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (source / "README.md").write_text("# ie-gateway\n")
    (source / "docs").mkdir()
    (source / "docs" / "install.md").write_text("# Install\n")
    _install(source, root)
    etc = root / "etc" / "ie-gateway"
    key_file = etc / "credentials" / "anon-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(load_key({"CREDENTIALS_DIRECTORY": str(key_file.parent)})) >= 32
    assert stat.S_IMODE((etc / "environment").stat().st_mode) == 0o600
    # the unit loads both credentials, so both files exist (an empty connection string = managed identity)
    storage = etc / "credentials" / "storage-connection-string"
    assert storage.read_text() == "" and stat.S_IMODE(storage.stat().st_mode) == 0o600
    unit = (REPO / "systemd" / "ie-gateway.service").read_text()
    assert "LoadCredential=anon-key:/etc/ie-gateway/credentials/anon-key" in unit
    assert f"LoadCredential=storage-connection-string:/etc/ie-gateway/credentials/{storage.name}" in unit
    assert (root / "etc/systemd/system/ie-gateway.service").is_file()
    assert (root / "opt/ie-gateway/venv/bin/python").exists()
    assert os.readlink(root / "usr/local/bin/ie-gateway") == "/opt/ie-gateway/venv/bin/ie-gateway"
    # the unit's Documentation= names the installed README
    doc = next(line for line in unit.splitlines() if line.startswith("Documentation="))
    assert (root / doc.removeprefix("Documentation=file:///")).is_file()
    assert (root / "usr/share/doc/ie-gateway/install.md").is_file()


def test_rerun_keeps_admin_edits_key_and_installed_models(source: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    _install(source, root)
    etc = root / "etc" / "ie-gateway"
    edited = (etc / "gateway.yaml").read_text() + "# edited by the admin\n"
    (etc / "gateway.yaml").write_text(edited)
    key = (etc / "credentials" / "anon-key").read_bytes()
    _install(source, root, None, "--demo")
    installed_model = root / "var/lib/ie-gateway/models/toy/1/model.yaml"
    installed_model.write_text("name: toy  # installed bytes\n")

    _install(source, root, None, "--demo")
    assert (etc / "gateway.yaml").read_text() == edited
    assert (etc / "credentials" / "anon-key").read_bytes() == key
    assert installed_model.read_text() == "name: toy  # installed bytes\n"


GPU_DROPIN = "etc/systemd/system/ie-gateway.service.d/gpu.conf"
MODULES_LOAD = "etc/modules-load.d/ie-gateway-nvidia.conf"
DEVICE_CLASSES = ["DeviceAllow=char-nvidia-caps rw", "DeviceAllow=char-nvidia-frontend rw",
                  "DeviceAllow=char-nvidia-uvm rw"]


def test_nvidia_devices_get_a_drop_in_that_lets_the_unit_reach_the_nvidia_device_classes_only(
        source: Path, tmp_path: Path) -> None:
    root, dev = tmp_path / "root", tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidia0", "nvidiactl", "sda"):
        (dev / name).touch()
    out = _install(source, root, dev).stdout
    lines = (root / GPU_DROPIN).read_text().splitlines()
    assert "PrivateDevices=no" in lines and "DevicePolicy=closed" in lines
    # by class, not by node: nvidia-uvm and nodes a later driver creates are covered too
    assert sorted(line for line in lines if line.startswith("DeviceAllow=")) == DEVICE_CLASSES
    assert "nvidia-uvm" in (root / MODULES_LOAD).read_text().splitlines()
    assert "NVIDIA GPU found" in out

    for name in ("nvidia0", "nvidiactl"):
        (dev / name).unlink()
    _install(source, root, dev)  # the GPU is gone: back to PrivateDevices=yes
    assert not (root / GPU_DROPIN).exists() and not (root / MODULES_LOAD).exists()


def test_a_gpu_on_the_pci_bus_without_a_driver_yet_gets_the_drop_in(source: Path, tmp_path: Path) -> None:
    root, sysfs = tmp_path / "root", tmp_path / "sys"
    for address, vendor, klass in (("0000:00:01.0", "0x8086", "0x060000"), ("0000:3b:00.0", "0x10de", "0x030200")):
        device = sysfs / "bus/pci/devices" / address
        device.mkdir(parents=True)
        (device / "vendor").write_text(vendor + "\n")
        (device / "class").write_text(klass + "\n")
    _install(source, root, sys_dir=sysfs)
    assert (root / GPU_DROPIN).is_file() and (root / MODULES_LOAD).is_file()


def test_the_unit_with_the_gpu_drop_in_passes_systemd_analyze_verify(source: Path, tmp_path: Path) -> None:
    root, dev = tmp_path / "root", tmp_path / "dev"
    dev.mkdir()
    (dev / "nvidia0").touch()
    _install(source, root, dev)
    entry = Path(sys.executable).parent / "ie-gateway"
    unit = tmp_path / "ie-gateway.service"
    merged = (REPO / "systemd" / "ie-gateway.service").read_text() + (root / GPU_DROPIN).read_text()
    unit.write_text(merged.replace("/opt/ie-gateway/venv/bin/ie-gateway", str(entry)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_no_drop_in_without_an_nvidia_gpu(source: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    _install(source, root)
    assert not (root / "etc/systemd/system/ie-gateway.service.d").exists()
    assert not (root / MODULES_LOAD).exists()


def test_install_sh_explains_its_options_and_refuses_unknown_ones(source: Path) -> None:
    script = str(source / "deploy" / "install.sh")
    usage = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, timeout=30, check=True).stdout
    assert "--allow-from ADDR[,ADDR...]" in usage and "--demo" in usage
    wrong = subprocess.run(["bash", script, "--allow-everyone"], capture_output=True, text=True, timeout=30)
    assert wrong.returncode == 2 and "unknown option --allow-everyone" in wrong.stderr
