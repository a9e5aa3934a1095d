"""Signed model packages: who published a package is checked before any byte of it is parsed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ie_gateway.errors import (
    KeyExists,
    ManifestInvalid,
    PackageMismatch,
    PackageUnsigned,
    SignatureInvalid,
    UntrustedPublisher,
)
from ie_gateway.infer.registry import Registry, import_package
from ie_gateway.infer.signing import SIGNATURE_NAME, TrustedKey, generate_key, read_statement, verify_package
from tests.infer_packages import threshold_model, write_package
from tests.keys import DEMO_PUB, DEMO_TRUSTED, REPO, new_key, sign


def registry_of(tmp_path: Path, keys: tuple[TrustedKey, ...] = DEMO_TRUSTED) -> Registry:
    return Registry(tmp_path / "models", tmp_path / "state.json", keys=keys)


def toy(tmp_path: Path, version: str = "1", **kwargs: object) -> Path:
    return write_package(tmp_path / f"src-{version}", [threshold_model(3)], version=version, **kwargs)  # type: ignore[arg-type]


def poison_yaml(package: Path, marker: Path) -> None:
    """Make model.yaml something that must never be parsed: a YAML tag PyYAML's full loader
    would turn into a call, and a line that the safe loader refuses."""
    package.joinpath("model.yaml").write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")


def test_the_statement_names_the_package_and_every_file_with_its_digest(tmp_path: Path) -> None:
    package = toy(tmp_path)
    statement = verify_package(package, DEMO_TRUSTED)
    assert (statement.name, statement.version, statement.key.name) == ("toy", "1", "demo")
    assert sorted(statement.files) == ["fold0.pt", "model.yaml"]
    payload = json.loads(package.joinpath(SIGNATURE_NAME).read_text())
    assert payload["mediaType"].startswith("application/vnd.dev.sigstore.bundle")


def test_an_unsigned_package_is_refused_before_model_yaml_is_read(tmp_path: Path) -> None:
    package = toy(tmp_path, key=None)
    poison_yaml(package, tmp_path / "ran")
    registry = registry_of(tmp_path)
    with pytest.raises(PackageUnsigned, match="is not signed"):
        registry.import_version(package)
    assert registry.versions("toy") == [] and not (tmp_path / "ran").exists()


def test_a_package_signed_by_an_untrusted_key_is_refused(tmp_path: Path) -> None:
    private, _ = new_key(tmp_path / "keys", "stranger")
    package = toy(tmp_path, key=private)
    registry = registry_of(tmp_path)
    with pytest.raises(UntrustedPublisher, match="signed by a key this node does not trust"):
        registry.import_version(package)
    assert registry.versions("toy") == []


@pytest.mark.parametrize("change", ["model.yaml", "fold0.pt", "added", "removed"])
def test_a_package_changed_after_signing_is_refused(tmp_path: Path, change: str) -> None:
    package = toy(tmp_path)
    if change == "model.yaml":
        text = package.joinpath("model.yaml").read_text().replace("External", "Externa1")
        package.joinpath("model.yaml").write_text(text)
    elif change == "fold0.pt":
        package.joinpath("fold0.pt").write_bytes(b"evil" + package.joinpath("fold0.pt").read_bytes())
    elif change == "added":  # a file model.yaml names that the publisher never signed
        data = yaml.safe_load(package.joinpath("model.yaml").read_text())
        extra = package / "fold1.pt"
        shutil.copyfile(package / "fold0.pt", extra)
        data["folds"].append({"file": "fold1.pt", "sha256": data["folds"][0]["sha256"]})
        package.joinpath("model.yaml").write_text(yaml.safe_dump(data))
    else:
        package.joinpath("fold0.pt").unlink()
    registry = registry_of(tmp_path)
    with pytest.raises(SignatureInvalid):
        registry.import_version(package)
    assert registry.versions("toy") == []


def test_a_statement_edited_after_signing_does_not_verify(tmp_path: Path) -> None:
    package = toy(tmp_path)
    bundle = json.loads(package.joinpath(SIGNATURE_NAME).read_text())
    bundle["dsseEnvelope"]["payload"] = bundle["dsseEnvelope"]["payload"][:-8] + "AAAAAAA="
    package.joinpath(SIGNATURE_NAME).write_text(json.dumps(bundle))
    with pytest.raises(SignatureInvalid, match="does not verify with trusted key 'demo'"):
        read_statement(package / SIGNATURE_NAME, DEMO_TRUSTED, "toy@1")


def test_files_the_publisher_did_not_sign_are_never_installed(tmp_path: Path) -> None:
    package = toy(tmp_path)
    package.joinpath("notes.py").write_text("raise SystemExit('must not be copied')\n")
    model = registry_of(tmp_path).import_version(package)
    assert sorted(p.name for p in model.path.iterdir()) == ["fold0.pt", "model.sig", "model.yaml"]


def test_a_signed_version_replayed_under_another_version_is_refused(tmp_path: Path) -> None:
    registry = registry_of(tmp_path)
    model = registry.import_version(toy(tmp_path))
    replayed = model.path.parent / "2"
    shutil.copytree(model.path, replayed)
    with pytest.raises(SignatureInvalid, match="signed as toy@1, not toy@2"):
        registry.resolve("toy@2")


def test_an_installed_file_changed_after_import_is_refused_at_load(tmp_path: Path) -> None:
    registry = registry_of(tmp_path)
    model = registry.import_version(toy(tmp_path))
    assert registry.resolve("toy").spec == "toy@1"
    (model.path / "model.yaml").chmod(0o644)
    poison_yaml(model.path, tmp_path / "ran")
    with pytest.raises(SignatureInvalid, match="changed after signing by 'demo': model.yaml"):
        registry.resolve("toy")
    assert not (tmp_path / "ran").exists()


def test_import_records_which_key_signed_or_who_allowed_it_unsigned(tmp_path: Path) -> None:
    registry = registry_of(tmp_path)
    registry.import_version(toy(tmp_path, version="1"))
    registry.import_version(toy(tmp_path, version="2", key=None), allowed_unsigned_by="alice")
    records = {r.version: (r.signed_by, r.allowed_unsigned_by) for r in registry.imports()}
    assert records == {"1": ("demo", None), "2": (None, "alice")}
    assert registry.resolve("toy@2").spec == "toy@2"  # allowed unsigned: it loads


def test_a_registry_without_trusted_keys_loads_no_signed_package(tmp_path: Path) -> None:
    with pytest.raises(UntrustedPublisher):
        registry_of(tmp_path, keys=()).import_version(toy(tmp_path))


def test_the_shipped_demo_models_are_signed_by_the_demo_key_the_example_config_trusts() -> None:
    config = yaml.safe_load((REPO / "config" / "gateway.yaml").read_text())
    [demo] = [k for k in config["trusted_keys"] if k["name"] == "demo"]
    assert (REPO / "config" / demo["public_key"]).resolve() == DEMO_PUB and demo["allow_code"] is False
    for package in (REPO / "models" / "demo-thorax" / "3", REPO / "models" / "demo-thorax-nnunet" / "1"):
        assert verify_package(package, DEMO_TRUSTED).key.name == "demo"


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ie_gateway.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.slow  # four CLI runs, each a fresh Python
def test_cli_keygen_sign_and_import_with_and_without_allow_unsigned(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    made = cli("models", "keygen", "--out", keys / "physics")
    assert made.returncode == 0, made.stderr
    assert (keys / "physics").stat().st_mode & 0o077 == 0
    config = tmp_path / "gateway.yaml"
    (tmp_path / "routing.yaml").write_text("rules: []\n")
    (tmp_path / "models").mkdir()
    config.write_text(
        yaml.safe_dump(
            {
                "storage": {"root": "var"},
                "routing_file": "routing.yaml",
                "models_dir": "models",
                "trusted_keys": [{"name": "physics", "public_key": "keys/physics.pub"}],
            }
        )
    )
    unsigned = toy(tmp_path, version="1", key=None)
    refused = cli("models", "import", unsigned, "--config", config)
    assert refused.returncode == 1 and "is not signed" in refused.stderr
    assert not (tmp_path / "models" / "toy").exists()

    signed = toy(tmp_path, version="2", key=None)
    assert cli("models", "sign", signed, "--key", keys / "physics").returncode == 0
    imported = cli("models", "import", signed, "--config", config)
    assert imported.returncode == 0, imported.stderr

    allowed = cli("models", "import", unsigned, "--allow-unsigned", "--config", config)
    assert allowed.returncode == 0, allowed.stderr
    audit = cli("audit", "--config", config)
    assert "imported toy@2 signed by physics" in audit.stdout
    assert "imported toy@1 UNSIGNED" in audit.stdout


@pytest.mark.slow  # a CLI run
def test_status_names_a_version_the_pull_refused_and_why(tmp_path: Path) -> None:
    (tmp_path / "routing.yaml").write_text("rules: []\n")
    (tmp_path / "models").mkdir()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump({"storage": {"root": "var"}, "routing_file": "routing.yaml", "models_dir": "models"})
    )
    registry = Registry(tmp_path / "models", tmp_path / "var" / "models-state.json")
    registry.record_refusal("thorax", "9", "thorax@9 is signed by a key this node does not trust")
    shown = cli("status", "--config", config)
    assert shown.returncode == 0, shown.stderr
    assert "model thorax@9 refused by the pull" in shown.stderr and "does not trust" in shown.stderr


def test_the_same_files_signed_again_import_as_the_installed_version(tmp_path: Path) -> None:
    registry = registry_of(tmp_path)
    package = toy(tmp_path)
    first = registry.import_version(package)
    resigned = shutil.copytree(package, tmp_path / "resigned")
    sign(resigned)
    assert resigned.joinpath(SIGNATURE_NAME).read_bytes() != package.joinpath(SIGNATURE_NAME).read_bytes()
    assert registry.import_version(resigned) == first


def test_import_refuses_a_package_whose_signed_name_is_not_the_one_given(tmp_path: Path) -> None:
    registry = registry_of(tmp_path)
    package = toy(tmp_path, version="3")
    with pytest.raises(PackageMismatch, match="says version '3', not '4'"):
        import_package(registry, package, name="toy", version="4")
    model, written = import_package(registry, package, name="toy", version="3")
    assert (model.name, model.version, written) == ("toy", "3", None)


def test_import_of_a_folder_without_model_yaml_needs_its_name_and_version(tmp_path: Path) -> None:
    folder = tmp_path / "bare"
    folder.mkdir()
    with pytest.raises(ManifestInvalid, match="give --name and --version"):
        import_package(registry_of(tmp_path), folder)


def test_keygen_never_overwrites_a_private_key(tmp_path: Path) -> None:
    private = tmp_path / "physics"
    generate_key(private, tmp_path / "physics.pub")
    before = private.read_bytes()
    with pytest.raises(KeyExists, match="never overwritten"):
        generate_key(private, tmp_path / "other.pub")
    assert private.read_bytes() == before
