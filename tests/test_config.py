"""gateway.yaml and routing.yaml: what check-config accepts, and errors as file:line: key: why."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from ie_gateway.config import GatewayConfig, load_config
from ie_gateway.errors import ConfigError
from tests.infer_packages import threshold_model, write_package
from tests.peers import REPO


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ie_gateway.cli", "check-config", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    write_package(tmp_path / "models", [threshold_model(2)], name="toy", structures=1)
    (tmp_path / "routing.yaml").write_text(
        "rules:\n  - name: ct\n    match: {Modality: CT}\n    model: toy\n    outputs: [rtstruct]\n    send_to: [TPS]\n")
    return tmp_path


def write_config(folder: Path, text: str) -> Path:
    path = folder / "gateway.yaml"
    path.write_text(text)
    return path


GOOD = """node:
  ae_title: IE_GATEWAY
  port: 11112
  allowed_callers:
    - ae_title: PACS
      host: 10.1.2.3
storage:
  root: var
routing_file: routing.yaml
models_dir: models
destinations:
  TPS: {ae_title: TPS, host: 10.1.2.9, port: 104}
"""


def test_shipped_config_is_valid() -> None:
    result = check(REPO / "config" / "gateway.yaml")
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_relative_paths_resolve_against_the_config_folder(folder: Path) -> None:
    cfg = load_config(write_config(folder, GOOD))
    assert cfg.storage.root == folder / "var"
    assert cfg.routing_file == folder / "routing.yaml"
    assert cfg.models_dir == folder / "models"
    assert cfg.series.stable_after_s == 10


def test_valid_config_and_rules_pass_check_config(folder: Path) -> None:
    result = check(write_config(folder, GOOD))
    assert result.returncode == 0, result.stderr
    assert "(1 rules)" in result.stdout


@pytest.mark.parametrize(("edit", "expected"), [
    (("  port: 11112\n", "  port: 11112\n  colour: blue\n"), "gateway.yaml:4: node.colour: unknown key"),
    (("  port: 11112\n", "  port: 70000\n"), "gateway.yaml:3: node.port: Input should be less than or equal to 65535"),
    (("      host: 10.1.2.3\n", "      host: not-an-address\n"), "gateway.yaml:6: node.allowed_callers.0.host:"),
    (("  ae_title: IE_GATEWAY\n", "  ae_title: A_TITLE_FAR_TOO_LONG_FOR_DICOM\n"), "gateway.yaml:2: node.ae_title:"),
    (("storage:\n  root: var\n", "storage:\n  rooot: var\n"), "gateway.yaml:8: storage.rooot: unknown key"),
], ids=["unknown-key", "port-range", "bad-host", "ae-title", "misspelt-required"])
def test_each_mistake_is_reported_with_file_line_and_key(folder: Path, edit: tuple[str, str], expected: str) -> None:
    result = check(write_config(folder, GOOD.replace(*edit)))
    assert result.returncode == 2
    assert expected in result.stderr


def test_every_error_is_reported_not_only_the_first(folder: Path) -> None:
    bad = GOOD.replace("  port: 11112\n", "  port: x\n  extra: 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(folder, bad))
    assert len(caught.value.errors) == 2


def test_rule_naming_an_unknown_destination_is_reported_in_the_rules_file(folder: Path) -> None:
    (folder / "routing.yaml").write_text(
        "rules:\n  - name: ct\n    match: {Modality: CT}\n    model: toy\n    outputs: [rtstruct]\n    send_to: [NOWHERE]\n")
    result = check(write_config(folder, GOOD))
    assert result.returncode == 2
    assert "routing.yaml:6:" in result.stderr and "NOWHERE" in result.stderr


def test_missing_routing_file_is_named(folder: Path) -> None:
    (folder / "routing.yaml").unlink()
    result = check(write_config(folder, GOOD))
    assert result.returncode == 2
    assert "routing_file" in result.stderr and "does not exist" in result.stderr


def test_yaml_syntax_error_names_the_line(folder: Path) -> None:
    result = check(write_config(folder, GOOD.replace("  port: 11112\n", "  port: [11112\n")))
    assert result.returncode == 2
    assert "gateway.yaml:" in result.stderr and "not valid YAML" in result.stderr


def test_example_config_documents_every_section() -> None:
    """Every setting of gateway.yaml appears in the shipped file, set or as a commented line."""
    text = (REPO / "config" / "gateway.yaml").read_text()
    data = yaml.safe_load(text)
    sections = {name: field for name, field in GatewayConfig.model_fields.items() if not field.exclude}
    assert set(sections) <= set(data), set(sections) - set(data)
    undocumented = [
        f"{name}.{key}"
        for name, field in sections.items()
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        for key in field.annotation.model_fields
        if not re.search(rf"^\s+(# )?{key}:", text, re.MULTILINE)
    ]
    assert not undocumented


def test_beyond_loopback_a_caller_without_host_pin_is_a_check_config_error(folder: Path) -> None:
    result = check(write_config(folder, GOOD.replace("      host: 10.1.2.3\n", "") + "  # bind: default 0.0.0.0\n"))
    assert result.returncode != 0
    assert "node.allowed_callers[0] (PACS): no host, while node.bind 0.0.0.0 is beyond loopback" in result.stderr
    on_loopback = GOOD.replace("      host: 10.1.2.3\n", "").replace("  port: 11112\n", "  port: 11112\n  bind: 127.0.0.1\n")
    assert check(write_config(folder, on_loopback)).returncode == 0


def test_http_beyond_loopback_is_a_check_config_error(folder: Path) -> None:
    result = check(write_config(folder, GOOD + "http: {bind: 0.0.0.0, port: 8080}\n"))
    assert result.returncode != 0
    assert "http.bind 0.0.0.0 is beyond loopback" in result.stderr and "TLS reverse proxy" in result.stderr
