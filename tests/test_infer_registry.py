"""Model registry: checksums, immutable versions, activation log, resolution."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ie_gateway.errors import ModelError, SignatureInvalid, VersionImmutable
from ie_gateway.infer.registry import Registry, probe_patch
from ie_gateway.infer.runner import InferenceRunner
from tests.infer_packages import Pointwise, Spin, threshold_model, write_package
from tests.keys import DEMO_TRUSTED, sign
from tests.peers import wait_until

HEALTHY_LIMIT_S = 120.0  # a child's model load and probe on a loaded machine, far above its usual second


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "models", tmp_path / "state" / "models.json", keys=DEMO_TRUSTED)


def source(tmp_path: Path, version: str = "1", level: float = 0.5, name: str = "toy") -> Path:
    return write_package(
        tmp_path / f"src-{name}-{version}-{level}",
        [threshold_model(3, level)],
        name=name,
        version=version,
    )


def corrupt(path: Path) -> None:
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_import_installs_a_verified_copy(tmp_path: Path, registry: Registry) -> None:
    model = registry.import_version(source(tmp_path))
    assert model.path == tmp_path / "models" / "toy" / "1"
    assert sorted(p.name for p in model.path.iterdir()) == ["fold0.pt", "model.sig", "model.yaml"]
    assert not any(p.name.startswith(".") for p in model.path.parent.iterdir())
    [row] = registry.list()
    assert (row.name, row.version, row.verified, row.active) == ("toy", "1", True, False)
    assert row.imported_at is not None


def test_import_of_a_package_changed_after_signing_is_refused(
    tmp_path: Path, registry: Registry
) -> None:
    src = source(tmp_path)
    corrupt(src / "fold0.pt")
    with pytest.raises(SignatureInvalid, match="changed after signing by 'demo': fold0.pt"):
        registry.import_version(src)
    assert registry.versions("toy") == []


def test_altered_installed_fold_fails_verify_and_resolve(
    tmp_path: Path, registry: Registry
) -> None:
    model = registry.import_version(source(tmp_path))
    registry.resolve("toy@1")
    corrupt(model.path / "fold0.pt")
    with pytest.raises(SignatureInvalid):
        registry.verify("toy", "1")
    with pytest.raises(SignatureInvalid):
        registry.resolve("toy@1")
    [row] = registry.list()
    assert not row.verified and "changed after signing" in (row.problem or "")


def test_resolve_rechecks_a_fold_rewritten_after_a_successful_check(
    tmp_path: Path, registry: Registry
) -> None:
    model = registry.import_version(source(tmp_path))
    registry.resolve("toy")
    fold = model.path / "fold0.pt"
    stat = fold.stat()
    corrupt(fold)
    os.utime(fold, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.raises(SignatureInvalid):
        registry.resolve("toy")


def test_reimporting_identical_bytes_is_a_no_op(tmp_path: Path, registry: Registry) -> None:
    src = source(tmp_path)
    first = registry.import_version(src)
    before = (first.path / "fold0.pt").stat().st_mtime_ns
    again = registry.import_version(shutil.copytree(src, tmp_path / "copy"))
    assert again == first
    assert (first.path / "fold0.pt").stat().st_mtime_ns == before


def test_importing_different_bytes_under_an_existing_version_is_refused(
    tmp_path: Path, registry: Registry
) -> None:
    registry.import_version(source(tmp_path, level=0.5))
    with pytest.raises(VersionImmutable, match="toy@1 is already installed with different content"):
        registry.import_version(source(tmp_path, level=0.7))
    registry.import_version(source(tmp_path, version="2", level=0.7))
    assert registry.versions("toy") == ["1", "2"]


def test_activation_records_time_user_and_previous_version(
    tmp_path: Path, registry: Registry
) -> None:
    registry.import_version(source(tmp_path, version="1"))
    registry.import_version(source(tmp_path, version="2", level=0.6))
    first = registry.activate("toy", "1", by="alice")
    second = registry.activate("toy", "2", by="bob")
    assert first.previous is None and second.previous == "1"
    assert registry.history("toy") == [first, second]
    state = json.loads((tmp_path / "state" / "models.json").read_text())
    assert state["active"] == {"toy": "2"}
    assert [(e["version"], e["previous"], e["by"]) for e in state["log"]] == [
        ("1", None, "alice"),
        ("2", "1", "bob"),
    ]
    assert [r.active for r in registry.list()] == [False, True]


def test_active_versions_come_from_the_state_without_loading_a_model(tmp_path: Path) -> None:
    probes: list[str] = []
    registry = Registry(tmp_path / "models", tmp_path / "state.json", lambda m: probes.append(m.spec), DEMO_TRUSTED)
    registry.import_version(source(tmp_path, version="1"))
    registry.import_version(source(tmp_path, version="2", level=0.6))
    registry.activate("toy", "2")
    probes.clear()
    fresh = Registry(tmp_path / "models", tmp_path / "state.json", lambda m: probes.append(m.spec), DEMO_TRUSTED)
    assert fresh.active_versions() == {"toy": "2"}
    assert probes == []  # what a metrics scrape asks never starts the inference child
    shutil.rmtree(tmp_path / "models" / "toy" / "2")
    assert fresh.active_versions() == {}  # activated but no longer installed


def waiting_for_a_check(thread: threading.Thread) -> bool:
    """Whether ``thread`` is waiting for the outcome of another thread's check (Future.result)."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name == "result" and "concurrent" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


@pytest.mark.parametrize("refused", [False, True])
def test_a_caller_of_a_version_being_checked_waits_for_that_check_and_shares_its_outcome(
    tmp_path: Path, refused: bool
) -> None:
    """The route lane and the warm-up of an arriving series may ask for one version at once:
    one probe in the inference child, not two."""
    Registry(tmp_path / "models", tmp_path / "state.json", keys=DEMO_TRUSTED).import_version(source(tmp_path))
    probing, release = threading.Event(), threading.Event()
    probes: list[str] = []

    def probe(model: object) -> None:
        probes.append(str(getattr(model, "spec")))
        probing.set()
        release.wait(60)
        if refused:
            raise ModelError("the probe refused it")

    fresh = Registry(tmp_path / "models", tmp_path / "state.json", probe, DEMO_TRUSTED)
    outcomes: dict[str, str] = {}

    def resolve(caller: str) -> None:
        try:
            outcomes[caller] = fresh.resolve("toy@1").spec
        except ModelError as exc:
            outcomes[caller] = str(exc)

    first = threading.Thread(target=resolve, args=("first",))
    first.start()
    assert probing.wait(60)
    second = threading.Thread(target=resolve, args=("second",))
    second.start()
    wait_until(lambda: waiting_for_a_check(second), 60, every=0.01, what="the second caller to wait for the check")
    release.set()
    first.join(60)
    second.join(60)
    assert probes == ["toy@1"]
    outcome = "the probe refused it" if refused else "toy@1"
    assert outcomes == {"first": outcome, "second": outcome}


def test_activation_of_a_version_that_fails_verification_is_refused(
    tmp_path: Path, registry: Registry
) -> None:
    model = registry.import_version(source(tmp_path))
    corrupt(model.path / "fold0.pt")
    with pytest.raises(SignatureInvalid):
        registry.activate("toy", "1")
    assert registry.active("toy") is None and registry.history() == []


def test_resolve_name_gives_the_active_version_and_name_at_version_pins(
    tmp_path: Path, registry: Registry
) -> None:
    registry.import_version(source(tmp_path, version="1"))
    registry.import_version(source(tmp_path, version="2", level=0.6))
    registry.activate("toy", "2")
    assert registry.resolve("toy").version == "2"
    assert registry.resolve("toy@1").version == "1"
    registry.activate("toy", "1")
    assert registry.resolve("toy").version == "1"


def test_resolve_name_without_activation(tmp_path: Path, registry: Registry) -> None:
    registry.import_version(source(tmp_path, version="1"))
    assert registry.resolve("toy").version == "1"  # the only version is used
    registry.import_version(source(tmp_path, version="2", level=0.6))
    with pytest.raises(ModelError, match="versions 1, 2 and none is active"):
        registry.resolve("toy")


@pytest.mark.parametrize("spec", ["absent", "toy@9", "../toy", "toy@1/../2", ""])
def test_resolve_refuses_unknown_or_unsafe_specs(
    tmp_path: Path, registry: Registry, spec: str
) -> None:
    registry.import_version(source(tmp_path))
    with pytest.raises(ModelError):
        registry.resolve(spec)


@pytest.fixture(scope="module")
def runner() -> Iterator[InferenceRunner]:
    """The inference child, whose ``verify`` is the node's probe."""
    with InferenceRunner(120, device="cpu", log_level=None) as child:
        yield child


@pytest.fixture
def probing(tmp_path: Path, runner: InferenceRunner) -> Registry:
    """A registry that loads and runs packages in the inference child, as the node's does."""
    return Registry(tmp_path / "models", tmp_path / "state" / "models.json", runner.verify, DEMO_TRUSTED)


def test_verify_detects_a_wrong_channel_count(tmp_path: Path, probing: Registry) -> None:
    src = write_package(tmp_path / "src", [Pointwise([1.0, 1.0], [0.0, 0.0])], structures=2)
    with pytest.raises(ModelError, match=r"expected \(1, 3, 8, 8, 8\)"):
        probing.import_version(src)
    assert probing.versions("toy") == []


def test_verify_detects_a_file_that_is_not_torchscript(tmp_path: Path, probing: Registry) -> None:
    src = source(tmp_path)
    fold = src / "fold0.pt"
    fold.write_bytes(b"not a model")
    manifest = yaml.safe_load((src / "model.yaml").read_text())
    manifest["folds"][0]["sha256"] = hashlib.sha256(b"not a model").hexdigest()
    (src / "model.yaml").write_text(yaml.safe_dump(manifest))
    sign(src)
    with pytest.raises(ModelError, match="fold0.pt does not load as TorchScript"):
        probing.import_version(src)


@pytest.mark.slow
def test_a_model_that_hangs_in_verification_times_out_and_the_child_is_replaced(
    tmp_path: Path,
) -> None:
    src = write_package(tmp_path / "src", [Spin(3, iterations=10**9)], name="hang")
    # A healthy probe loads the model within the limit, which can take seconds on a loaded
    # machine: only the hang runs under the short limit it must exceed.
    with InferenceRunner(HEALTHY_LIMIT_S, device="cpu", log_level=None) as runner:
        registry = Registry(tmp_path / "models", tmp_path / "state.json", runner.verify, DEMO_TRUSTED)
        assert registry.import_version(source(tmp_path)).spec == "toy@1"  # starts the child
        first_child = runner.pid
        runner.timeout_s = 3
        with pytest.raises(ModelError, match="verification failed: inference exceeded 3 s"):
            registry.import_version(src)
        assert registry.versions("hang") == [] and runner.pid not in (None, first_child)
        runner.timeout_s = HEALTHY_LIMIT_S
        assert registry.verify("toy", "1").spec == "toy@1"  # the fresh child probes again


def test_resolve_checks_checksums_without_loading_torch_models(
    tmp_path: Path, registry: Registry
) -> None:
    """The service process never runs a model to verify it: without a probe, a fold that is
    not TorchScript but matches its checksum passes resolve (the child's probe refuses it)."""
    src = source(tmp_path)
    (src / "fold0.pt").write_bytes(b"not a model")
    manifest = yaml.safe_load((src / "model.yaml").read_text())
    manifest["folds"][0]["sha256"] = hashlib.sha256(b"not a model").hexdigest()
    (src / "model.yaml").write_text(yaml.safe_dump(manifest))
    sign(src)
    assert registry.import_version(src).spec == "toy@1"
    assert registry.resolve("toy").spec == "toy@1"


def test_package_in_the_wrong_folder_is_refused(tmp_path: Path, registry: Registry) -> None:
    model = registry.import_version(source(tmp_path))
    moved = model.path.parent / "7"
    model.path.rename(moved)
    with pytest.raises(SignatureInvalid, match="signed as toy@1, not toy@7"):
        registry.resolve("toy@7")


@pytest.mark.parametrize(
    ("patch", "probe"),
    [((48, 256, 256), (16, 64, 64)), ((64, 128, 128), (64, 64, 64)), ((8, 8, 5), (8, 8, 1))],
)
def test_probe_patch_keeps_every_pooling_level_divisible(patch: tuple, probe: tuple) -> None:
    assert probe_patch(patch) == probe


def test_versions_are_listed_in_natural_order(tmp_path: Path, registry: Registry) -> None:
    for version in ("10", "2", "1.9", "1.10"):
        registry.import_version(source(tmp_path, version=version))
    assert registry.versions("toy") == ["1.9", "1.10", "2", "10"]
