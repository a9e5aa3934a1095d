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


def _install(src: Path, root: Path, dev_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SRC_DIR": str(src), "DESTDIR": str(root), "PIP_INSTALL": "0",
           "PYTHON": sys.executable, "DEV_DIR": str(dev_dir or root / "no-dev")}
    return subprocess.run(["bash", str(src / "deploy" / "install.sh")], env=env, text=True,
                          capture_output=True, check=True, timeout=120)


def test_install_lays_out_node_config_key_unit_and_models(source: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    _install(source, root)
    etc = root / "etc" / "ie-gateway"
    config = yaml.safe_load((etc / "gateway.yaml").read_text())
    GatewayConfig.model_validate(config)  # still a valid gateway.yaml after the rewrite
    assert config["storage"]["root"] == "/var/lib/ie-gateway"
    assert config["models_dir"] == "/var/lib/ie-gateway/models"
    assert config["node"]["bind"] == "0.0.0.0"
    assert config["http"]["bind"] == "127.0.0.1"  # health and metrics stay on loopback
    assert config["trusted_keys"] is None  # the demo publisher (its private key is public) is not trusted
    assert (etc / "routing.yaml").read_text() == (source / "config" / "routing.yaml").read_text()
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
    assert (root / "var/lib/ie-gateway/models/toy/1/model.yaml").is_file()
    assert os.readlink(root / "usr/local/bin/ie-gateway") == "/opt/ie-gateway/venv/bin/ie-gateway"


def test_rerun_keeps_admin_edits_key_and_installed_models(source: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    _install(source, root)
    etc = root / "etc" / "ie-gateway"
    edited = (etc / "gateway.yaml").read_text() + "# edited by the admin\n"
    (etc / "gateway.yaml").write_text(edited)
    key = (etc / "credentials" / "anon-key").read_bytes()
    installed_model = root / "var/lib/ie-gateway/models/toy/1/model.yaml"
    installed_model.write_text("name: toy  # installed bytes\n")

    _install(source, root)
    assert (etc / "gateway.yaml").read_text() == edited
    assert (etc / "credentials" / "anon-key").read_bytes() == key
    assert installed_model.read_text() == "name: toy  # installed bytes\n"


def test_nvidia_devices_get_a_drop_in_that_lets_the_unit_reach_them_and_only_them(
        source: Path, tmp_path: Path) -> None:
    root, dev = tmp_path / "root", tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidia0", "nvidiactl", "nvidia-uvm", "sda"):
        (dev / name).touch()
    out = _install(source, root, dev).stdout
    dropin = root / "etc/systemd/system/ie-gateway.service.d/gpu.conf"
    lines = dropin.read_text().splitlines()
    assert "PrivateDevices=no" in lines and "DevicePolicy=closed" in lines
    allowed = sorted(line for line in lines if line.startswith("DeviceAllow="))
    assert allowed == ["DeviceAllow=/dev/nvidia-uvm rw", "DeviceAllow=/dev/nvidia0 rw", "DeviceAllow=/dev/nvidiactl rw"]
    assert "NVIDIA devices found" in out

    for name in ("nvidia0", "nvidiactl", "nvidia-uvm"):
        (dev / name).unlink()
    _install(source, root, dev)  # the GPU is gone: back to PrivateDevices=yes
    assert not dropin.exists()


def test_no_drop_in_without_nvidia_devices(source: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    _install(source, root)
    assert not (root / "etc/systemd/system/ie-gateway.service.d").exists()
