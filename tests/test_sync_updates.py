"""Model updates pulled from a real blob service (Azurite): verified, imported, listed;
tampered, unsigned or half-published versions are refused."""

from __future__ import annotations

import hashlib
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from azure.storage.blob import ContainerClient

from ie_gateway.infer.registry import Registry
from ie_gateway.infer.runner import InferenceRunner
from ie_gateway.infer.signing import SIGNATURE_NAME
from ie_gateway.sync.blob import container_client
from ie_gateway.sync.updates import _download_within, pull_updates
from ie_gateway.sync.updates import publish_version as publish
from ie_gateway.vocab import PullStatus
from tests.azurite import azurite_blob  # noqa: F401  (fixture)
from tests.keys import DEMO_KEY, DEMO_TRUSTED

pytestmark = pytest.mark.peer

NAME = "tiny-thorax"


class _Logits(torch.nn.Module):
    """Three output channels (background + two structures) from a 1x1x1 convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 3, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def publish_version(container: ContainerClient, package: Path, *args: str) -> int:
    """Publish as the training side does: signed with the key the test registries trust."""
    return publish(container, package, *args, key=DEMO_KEY)


def _package(root: Path, version: str) -> Path:
    folder = root / NAME / version
    folder.mkdir(parents=True)
    torch.manual_seed(int(version))
    torch.jit.script(_Logits().eval()).save(str(folder / "fold0.pt"))
    manifest = {
        "name": NAME,
        "version": version,
        "structures": [
            {"label": 1, "name": "External", "color": [0, 200, 0], "interpreted_type": "EXTERNAL"},
            {"label": 2, "name": "Heart", "color": [200, 0, 0]},
        ],
        "input": {"spacing_mm": [2.0, 2.0, 2.5], "intensity": {"window": [-1000, 1000]},
                  "patch_size": [8, 8, 8]},
        "folds": [{"file": "fold0.pt",
                   "sha256": hashlib.sha256((folder / "fold0.pt").read_bytes()).hexdigest()}],
    }
    (folder / "model.yaml").write_text(yaml.safe_dump(manifest), encoding="utf-8")
    return folder


@pytest.fixture()
def container(azurite_blob: str) -> Iterator[ContainerClient]:  # noqa: F811
    client = container_client(azurite_blob, None, f"m{uuid.uuid4().hex[:12]}")
    client.create_container()
    yield client
    client.delete_container()


@pytest.fixture()
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "models", tmp_path / "state.json", keys=DEMO_TRUSTED)


def _known(registry: Registry) -> set[tuple[str, str]]:
    return {(row.name, row.version) for row in registry.list()}


def test_published_version_is_pulled_verified_and_listed_inactive(
    container: ContainerClient, registry: Registry, tmp_path: Path
) -> None:
    publish_version(container, _package(tmp_path / "publish", "1"))
    staging = tmp_path / "staging"
    results = pull_updates(container, staging, registry, _known(registry))
    assert [(r.name, r.version, r.status) for r in results] == [(NAME, "1", PullStatus.AVAILABLE)]
    assert results[0].bytes > 0
    (row,) = registry.list()
    assert (row.name, row.version, row.verified, row.active) == (NAME, "1", True, False)
    assert not any(staging.rglob("*.pt"))
    assert pull_updates(container, staging, registry, _known(registry)) == []


def test_auto_policy_activates_after_import(
    container: ContainerClient, registry: Registry, tmp_path: Path
) -> None:
    publish_version(container, _package(tmp_path / "publish", "2"))
    (result,) = pull_updates(container, tmp_path / "staging", registry, set(), {NAME: "auto"})
    assert result.status is PullStatus.ACTIVE
    assert registry.active(NAME) == "2"


def test_tampered_fold_is_refused_reported_and_unstaged(
    container: ContainerClient, registry: Registry, tmp_path: Path
) -> None:
    publish_version(container, _package(tmp_path / "publish", "3"))
    container.upload_blob(f"models/{NAME}/3/fold0.pt", b"not the published model", overwrite=True)
    staging = tmp_path / "staging"
    (result,) = pull_updates(container, staging, registry, set())
    assert result.status is PullStatus.REFUSED
    assert "fold0.pt" in (result.reason or "") and "sha256" in (result.reason or "")
    assert registry.list() == []
    assert not (staging / NAME / "3.partial").exists()


def test_manifest_changed_after_signing_is_refused(
    container: ContainerClient, registry: Registry, tmp_path: Path
) -> None:
    package = _package(tmp_path / "publish", "4")
    publish_version(container, package)
    edited = (package / "model.yaml").read_text().replace("Heart", "Hearts")
    container.upload_blob(f"models/{NAME}/4/model.yaml", edited.encode(), overwrite=True)
    (result,) = pull_updates(container, tmp_path / "staging", registry, set())
    assert result.status is PullStatus.REFUSED
    assert "model.yaml" in (result.reason or "")
    assert registry.list() == []


def test_version_without_signature_is_refused_and_nothing_downloaded(
    container: ContainerClient, registry: Registry, tmp_path: Path
) -> None:
    publish_version(container, _package(tmp_path / "publish", "5"))
    container.delete_blob(f"models/{NAME}/5/{SIGNATURE_NAME}")
    (result,) = pull_updates(container, tmp_path / "staging", registry, set())
    assert result.status is PullStatus.REFUSED and "is not signed" in (result.reason or "")
    assert result.bytes == 0 and registry.list() == []
    assert not any((tmp_path / "staging").rglob("*.*"))


def test_interrupted_pull_resumes_without_downloading_complete_files(
    container: ContainerClient, registry: Registry, tmp_path: Path
) -> None:
    package = _package(tmp_path / "publish", "6")
    publish_version(container, package)
    partial = tmp_path / "staging" / NAME / "6.partial"
    partial.mkdir(parents=True)
    (partial / "fold0.pt").write_bytes((package / "fold0.pt").read_bytes())
    # the fold is no longer downloadable: the pull can only succeed by keeping the staged copy
    container.delete_blob(f"models/{NAME}/6/fold0.pt")
    (result,) = pull_updates(container, tmp_path / "staging", registry, set())
    assert result.status is PullStatus.AVAILABLE
    assert result.bytes == (package / "model.yaml").stat().st_size + (package / SIGNATURE_NAME).stat().st_size
    assert [(r.name, r.version, r.verified) for r in registry.list()] == [(NAME, "6", True)]


def test_known_versions_are_not_downloaded(
    container: ContainerClient, registry: Registry, tmp_path: Path
) -> None:
    publish_version(container, _package(tmp_path / "publish", "7"))
    assert pull_updates(container, tmp_path / "staging", registry, {(NAME, "7")}) == []
    assert not (tmp_path / "staging").exists()


NNUNET_DEMO = Path(__file__).resolve().parent.parent / "models" / "demo-thorax-nnunet" / "1"


@pytest.mark.slow
def test_an_nnunet_folder_is_published_pulled_and_verified_in_the_inference_child(
    container: ContainerClient, tmp_path: Path
) -> None:
    pytest.importorskip("nnunetv2", reason="the [nnunet] extra is not installed")
    package = tmp_path / "nnUNetTrainer_1epoch__nnUNetPlans__3d_fullres"
    shutil.copytree(NNUNET_DEMO, package, ignore=shutil.ignore_patterns("model.yaml"))
    sent = publish_version(container, package, "thorax-nnunet", "7")
    assert sent == len(list(NNUNET_DEMO.glob("fold_*"))) + 2 + 2  # folds, jsons, yaml, signature
    tampered = tmp_path / "tampered" / package.name
    shutil.copytree(package, tampered, ignore=shutil.ignore_patterns("model.yaml"))
    publish_version(container, tampered, "thorax-nnunet", "8")
    container.upload_blob("models/thorax-nnunet/8/fold_0/checkpoint_final.pth", b"not nnU-Net",
                          overwrite=True)
    with InferenceRunner(300, device="cpu", log_level=None) as runner:
        registry = Registry(tmp_path / "models", tmp_path / "state.json", runner.verify, DEMO_TRUSTED)
        results = {r.version: r for r in pull_updates(container, tmp_path / "staging", registry, set())}
    assert results["7"].status is PullStatus.AVAILABLE, results["7"].reason
    assert (tmp_path / "models" / "thorax-nnunet" / "7" / "fold_0" / "checkpoint_final.pth").is_file()
    assert results["8"].status is PullStatus.REFUSED
    assert "fold_0/checkpoint_final.pth has sha256" in (results["8"].reason or "")
    assert registry.versions("thorax-nnunet") == ["7"]


def test_a_signed_file_swapped_for_one_past_max_model_mb_is_refused_before_it_is_downloaded(
    container: ContainerClient, registry: Registry, tmp_path: Path
) -> None:
    publish_version(container, _package(tmp_path / "publish", "8"))
    container.upload_blob(f"models/{NAME}/8/fold0.pt", bytes(3 * 2**20), overwrite=True)
    staging = tmp_path / "staging"
    (result,) = pull_updates(container, staging, registry, set(), max_bytes=2 * 2**20)
    assert result.status is PullStatus.REFUSED
    assert "fold0.pt is 3.0 MB, more than sync.max_model_mb leaves" in (result.reason or "")
    assert registry.list() == []
    assert not (staging / NAME / "8.partial").exists()


def test_a_version_within_max_model_mb_is_pulled(
    container: ContainerClient, registry: Registry, tmp_path: Path
) -> None:
    package = _package(tmp_path / "publish", "9")
    publish_version(container, package)
    total = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
    (result,) = pull_updates(container, tmp_path / "staging", registry, set(), max_bytes=total)
    assert result.status is PullStatus.AVAILABLE, result.reason


def test_an_empty_blob_and_one_exactly_at_the_bound_are_downloaded_whole(
    container: ContainerClient, tmp_path: Path
) -> None:
    container.upload_blob("empty", b"")
    container.upload_blob("three", b"abc")
    assert _download_within(container, "empty", tmp_path / "empty", 10) == 0  # no range of nothing asked for
    assert (tmp_path / "empty").read_bytes() == b""
    assert _download_within(container, "three", tmp_path / "three", 3) == 3
    assert (tmp_path / "three").read_bytes() == b"abc"
