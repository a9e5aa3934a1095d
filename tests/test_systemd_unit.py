"""The systemd unit verifies and keeps its hardening; sd_notify is covered in test_receive."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.peers import REPO

UNIT = REPO / "systemd" / "ie-gateway.service"


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    assert shutil.which("systemd-analyze"), "systemd-analyze missing: .ci/run installs systemd"
    entry = Path(sys.executable).parent / "ie-gateway"
    unit = tmp_path / "ie-gateway.service"
    unit.write_text(UNIT.read_text().replace("/opt/ie-gateway/venv/bin/ie-gateway", str(entry)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_unit_is_notify_type_with_watchdog_and_hardening() -> None:
    lines = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in UNIT.read_text().splitlines()
             if "=" in line and not line.startswith("#")}
    assert lines["Type"] == "notify"
    assert lines["Restart"] == "on-failure"
    assert int(lines["WatchdogSec"]) > 0
    assert lines["User"] == "ie-gateway"
    assert lines["StateDirectory"].split() == ["ie-gateway", "ie-gateway/tmp"]
    # received data sets are written to TMPDIR, then renamed into the spool: same file system
    assert lines["Environment"] == "TMPDIR=/var/lib/ie-gateway/tmp"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                       "ReadWritePaths": "/var/lib/ie-gateway"}.items():
        assert lines[key] == value


def _directives() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def test_the_unit_runs_check_config_on_the_served_config_before_starting() -> None:
    lines = _directives()
    [serve] = lines["ExecStart"]
    [check] = lines["ExecStartPre"]
    config = serve.split("--config", 1)[1].strip()
    assert check == serve.replace(" serve ", " check-config ")
    assert check.endswith(f"check-config --config {config}")


def test_the_unit_waits_for_the_data_disk() -> None:
    lines = _directives()
    assert lines["RequiresMountsFor"] == ["/var/lib/ie-gateway"]  # the storage root of the production config


def test_systemd_analyze_security_rates_the_unit_at_most_1_5() -> None:
    # 1.9 before RemoveIPC, PrivateMounts and ProtectProc (issue 25); the figure must not creep back up
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
                            capture_output=True, text=True)
    [overall] = [line for line in result.stdout.splitlines() if "Overall exposure level" in line]
    assert float(overall.split(":")[1].split()[0]) <= 1.5, overall


def test_unit_bounds_memory_and_restarts() -> None:
    lines = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in UNIT.read_text().splitlines()
             if "=" in line and not line.startswith("#")}
    assert lines["MemoryMax"].endswith("%") and 50 <= int(lines["MemoryMax"][:-1]) < 100
    # a bad job costs at most worker.max_crashes (2) restarts: the burst allows several before giving up
    assert int(lines["StartLimitBurst"]) >= 2 * 2 and int(lines["StartLimitIntervalSec"]) > 0
