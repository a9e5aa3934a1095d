"""The admin's operations: --version, backup and restore, the CLI reading the service's
credentials and naming the real person, and `models verify` beside a missing framework."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml

from ie_gateway import cli
from ie_gateway.infer import formats
from tests.infer_packages import threshold_model, write_package
from tests.keys import DEMO_PUB
from tests.peers import REPO, Node, storescu


def test_version_is_the_installed_package_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ie_gateway.cli", "--version"], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == f"ie-gateway {version('ie-gateway')}"


def _status(node: Node) -> list[dict[str, Any]]:
    """`status --json` without the fields that change with the clock."""
    return [{k: v for k, v in row.items() if k not in ("age_s", "quiet_s")} for row in node.status()]


@pytest.mark.peer
@pytest.mark.slow
def test_backup_of_a_running_node_then_wipe_then_restore_gives_the_same_status(
    node_factory: Any, small_series: list[Path], tmp_path: Path
) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "anon-key").write_text("k" * 44 + "\n")
    node: Node = node_factory()
    node.start()
    assert storescu(node.port, small_series).returncode == 0
    node.wait_state({"unrouted"})
    node.cli("models", "activate", "demo-thorax", "3")
    before = _status(node)
    backup = tmp_path / "backup"
    made = node.cli("backup", str(backup), "--credentials-dir", str(creds))  # while it runs
    assert "index.sqlite3" in made.stdout and "anon-key" in made.stdout
    assert stat.S_IMODE(backup.stat().st_mode) == 0o700
    assert stat.S_IMODE((backup / "anon-key").stat().st_mode) == 0o600
    node.stop()

    shutil.rmtree(node.root)  # the data disk is lost, and the config and key with the OS disk
    (node.workdir / "routing.yaml").unlink()
    node.config.unlink()
    shutil.rmtree(creds)
    restored = subprocess.run(
        [
            sys.executable,
            "-m",
            "ie_gateway.cli",
            "restore",
            str(backup),
            "--config",
            str(node.config),
            "--credentials-dir",
            str(creds),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=node.env,
    )
    assert restored.returncode == 0, restored.stderr
    assert "demo-thorax@3 model.yaml sha256" in restored.stdout  # what to install again
    assert (creds / "anon-key").read_text() == "k" * 44 + "\n"
    assert _status(node) == before
    assert "demo-thorax@3  active" in node.cli("models", "list").stdout


def test_backup_keeps_the_trusted_publishers_keys_and_restore_puts_them_where_the_config_names_them(
    tmp_path: Path,
) -> None:
    site, creds = tmp_path / "site", tmp_path / "credentials"
    keys = {"physics": "keys/physics.pub", "vendor": "credential:vendor.pub"}
    node = Node(site, settings={"trusted_keys": [{"name": n, "public_key": k} for n, k in keys.items()]})
    (site / "keys").mkdir()
    shutil.copy(DEMO_PUB, site / "keys" / "physics.pub")
    creds.mkdir()
    (creds / "vendor.pub").write_bytes(b"the vendor's PEM")
    made = node.cli("backup", str(tmp_path / "backup"), "--credentials-dir", str(creds))
    assert "keys/physics" in made.stdout and "keys/vendor" in made.stdout

    elsewhere = tmp_path / "etc" / "gateway.yaml"  # a new machine: config, keys and credentials gone
    cli_restore = [sys.executable, "-m", "ie_gateway.cli", "restore", str(tmp_path / "backup"), "--config"]
    restore_here = [*cli_restore, str(elsewhere), "--credentials-dir", str(tmp_path / "new-credentials")]
    restored = subprocess.run(restore_here, capture_output=True, text=True, timeout=120)
    assert restored.returncode == 0, restored.stderr
    assert (elsewhere.parent / "keys" / "physics.pub").read_bytes() == DEMO_PUB.read_bytes()  # beside the config
    assert (tmp_path / "new-credentials" / "vendor.pub").read_bytes() == b"the vendor's PEM"
    (elsewhere.parent / "keys" / "physics.pub").write_text("another key")
    for name in ("gateway.yaml", "routing.yaml"):
        (elsewhere.parent / name).unlink()
    again = subprocess.run(restore_here, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "physics.pub" in again.stderr  # a changed key is not overwritten silently


def test_restore_refuses_a_backup_of_another_version_and_existing_records(tmp_path: Path) -> None:
    backup = tmp_path / "backup"
    backup.mkdir()
    manifest = {"version": "0.0.1", "schema_version": 1, "index": "sqlite", "files": [], "models": []}
    (backup / "manifest.json").write_text(json.dumps(manifest))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ie_gateway.cli",
            "restore",
            str(backup),
            "--config",
            str(tmp_path / "etc" / "gateway.yaml"),
            "--credentials-dir",
            str(tmp_path / "c"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"was made by ie-gateway 0.0.1; this is {version('ie-gateway')}. Install 0.0.1" in result.stderr
    assert not (tmp_path / "etc").exists()  # nothing written


def test_cli_reads_the_credentials_folder_and_records_the_sudo_user(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    environ: dict[str, str] = {}
    cli.use_credentials(tmp_path, environ)
    assert environ == {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    systemd = {"CREDENTIALS_DIRECTORY": "/run/credentials/ie-gateway.service"}
    cli.use_credentials(None, systemd)  # under the unit, systemd's folder stays
    assert systemd["CREDENTIALS_DIRECTORY"] == "/run/credentials/ie-gateway.service"
    monkeypatch.setenv("SUDO_USER", "alice")
    assert cli._who() == "alice"


def test_models_verify_reports_a_missing_framework_and_verifies_the_others(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    write_package(models, [threshold_model(2)], name="toy", structures=1)
    shutil.copytree(REPO / "models" / "demo-thorax-nnunet" / "1", models / "demo-thorax-nnunet" / "1")
    (tmp_path / "routing.yaml").write_text("rules: []\n")
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {"root": "var"},
                "routing_file": "routing.yaml",
                "models_dir": "models",
                "trusted_keys": [{"name": "demo", "public_key": str(DEMO_PUB)}],  # signed the toy and the demo
            }
        )
    )
    # as on a node installed without the [nnunet] extra
    monkeypatch.setitem(formats.FRAMEWORKS, "nnunetv2", ("nnunet", "nnunetv2_not_installed"))
    assert cli.main(["models", "verify", "--config", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "toy@1: verified" in out
    assert (
        "demo-thorax-nnunet@1: not checked: its framework is not installed here (nnunetv2_not_installed): "
        "pip install 'ie-gateway[nnunet]'"
    ) in out


@pytest.mark.slow
def test_rollback_after_an_upgrade_migrated_the_index_restores_the_backup_made_before(
    node_factory: Any, tmp_path: Path
) -> None:
    import sqlite3

    from ie_gateway.store.schema import LATEST

    node: Node = node_factory()
    node.cli("models", "activate", "demo-thorax", "3")
    before = _status(node)
    state = (node.root / "models-state.json").read_text()
    backup = tmp_path / "before-upgrade"
    node.cli("backup", str(backup), "--credentials-dir", str(tmp_path / "none"))
    # the upgrade: a newer version migrates the index at its first start
    with sqlite3.connect(node.root / "index.sqlite3") as db:
        db.execute("INSERT INTO schema_version (version, applied_at, what) VALUES (?, 0, 'newer')", (LATEST + 1,))
    refused = node.cli("status", check=False)  # the old version back in place refuses that index
    assert refused.returncode != 0 and "newer than this node's" in refused.stderr

    not_forced = node.cli("restore", str(backup), check=False)
    assert not_forced.returncode == 1 and "give --force" in not_forced.stderr
    node.cli("restore", str(backup), "--force")
    assert _status(node) == before
    assert (node.root / "models-state.json").read_text() == state  # demo-thorax@3 still the active one
