"""Hostile model packages published to a real blob service (Azurite) never run on the node.

A MONAI bundle whose ``$`` expression writes a marker file, and an nnU-Net folder whose
checkpoint is a pickle that writes one when unpickled, are published unsigned, signed by a key
the node does not trust, and (a good bundle) signed by the trusted key and then changed. The
node pulls with its real inference child as the probe, so anything that got past the signature
check would be loaded, and its marker would appear. None is imported and no marker appears; a
good package signed by the trusted key is pulled, verified in the child and installed.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from azure.storage.blob import ContainerClient

from ie_gateway.infer.formats import describe_package
from ie_gateway.infer.registry import Registry
from ie_gateway.infer.runner import InferenceRunner
from ie_gateway.sync.blob import container_client
from ie_gateway.sync.updates import MODELS_PREFIX, PullResult, publish_version, pull_updates
from ie_gateway.vocab import PullStatus
from tests.azurite import azurite_blob  # noqa: F401  (fixture)
from tests.infer_packages import threshold_model, write_package
from tests.keys import DEMO_KEY, DEMO_TRUSTED, REPO, new_key

pytestmark = [pytest.mark.peer, pytest.mark.slow]

NNUNET_DEMO = REPO / "models" / "demo-thorax-nnunet" / "1"
TRAINED = "nnUNetTrainer_1epoch__nnUNetPlans__3d_fullres"  # nnU-Net's folder name says how to run it


class Hostile:
    """Unpickling this runs ``touch marker``: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def hostile_bundle(folder: Path, marker: Path, version: str) -> Path:
    """The test MONAI bundle with one more ``initialize`` expression that writes ``marker``."""
    from tests.monai_bundles import write_bundle

    write_bundle(folder)
    config_path = folder / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    config["initialize"].append(f"$__import__('pathlib').Path({str(marker)!r}).write_text('ran')")
    config_path.write_text(json.dumps(config, indent=2))
    describe_package(folder, "hostile-monai", version)
    return folder


def hostile_nnunet(folder: Path, marker: Path, version: str) -> Path:
    """The nnU-Net demo folder whose checkpoint also pickles a :class:`Hostile`."""
    shutil.copytree(NNUNET_DEMO, folder, ignore=shutil.ignore_patterns("model.yaml", "model.sig"))
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    content = torch.load(checkpoint, map_location="cpu", weights_only=False)
    content["hostile"] = Hostile(marker)
    torch.save(content, checkpoint)
    describe_package(folder, "hostile-nnunet", version)
    return folder


def upload_unsigned(container: ContainerClient, folder: Path, name: str, version: str) -> None:
    """Publish every file as it is, with no signature (what a stolen node credential allows)."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = f"{MODELS_PREFIX}{name}/{version}/{path.relative_to(folder).as_posix()}"
        container.upload_blob(blob, path.read_bytes(), overwrite=True)


@pytest.fixture()
def container(azurite_blob: str) -> Iterator[ContainerClient]:  # noqa: F811
    client = container_client(azurite_blob, None, f"t{uuid.uuid4().hex[:12]}")
    client.create_container()
    yield client
    client.delete_container()


@pytest.fixture(scope="module")
def runner() -> Iterator[InferenceRunner]:
    with InferenceRunner(300, device="cpu", log_level=None) as child:
        yield child


def pull(container: ContainerClient, tmp_path: Path, runner: InferenceRunner) -> tuple[Registry, dict[str, PullResult]]:
    registry = Registry(tmp_path / "models", tmp_path / "state.json", runner.verify, DEMO_TRUSTED)
    results = pull_updates(container, tmp_path / "staging", registry, set())
    return registry, {f"{r.name}@{r.version}": r for r in results}


def test_unsigned_untrusted_and_changed_packages_are_refused_and_never_run(
    container: ContainerClient, tmp_path: Path, runner: InferenceRunner
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    stranger, _ = new_key(tmp_path / "stranger-keys", "stranger")
    for version, how in (("1", "unsigned"), ("2", "untrusted")):
        bundle = hostile_bundle(tmp_path / f"monai-{version}", markers / f"monai-{version}", version)
        nnunet = hostile_nnunet(tmp_path / f"nnunet-{version}" / TRAINED, markers / f"nnunet-{version}", version)
        for folder, name in ((bundle, "hostile-monai"), (nnunet, "hostile-nnunet")):
            if how == "unsigned":
                upload_unsigned(container, folder, name, version)
            else:
                publish_version(container, folder, key=stranger)
    # a good bundle signed by the trusted key, whose config is then replaced by a hostile one
    from tests.monai_bundles import write_bundle

    good_bundle = write_bundle(tmp_path / "good-bundle")
    describe_package(good_bundle, "hostile-monai", "3")
    publish_version(container, good_bundle, key=DEMO_KEY)
    swapped = hostile_bundle(tmp_path / "swapped", markers / "monai-3", "3")
    container.upload_blob(
        f"{MODELS_PREFIX}hostile-monai/3/configs/inference.json",
        (swapped / "configs" / "inference.json").read_bytes(),
        overwrite=True,
    )
    good = write_package(tmp_path / "good", [threshold_model(3)], name="good", version="1")
    publish_version(container, good, key=DEMO_KEY)

    registry, results = pull(container, tmp_path, runner)

    reasons = {spec: (r.status, r.reason or "") for spec, r in results.items()}
    for name in ("hostile-monai", "hostile-nnunet"):
        assert reasons[f"{name}@1"][0] is PullStatus.REFUSED and "is not signed" in reasons[f"{name}@1"][1]
        assert reasons[f"{name}@2"][0] is PullStatus.REFUSED
        assert "does not trust" in reasons[f"{name}@2"][1]
        assert registry.versions(name) == []
    status, reason = reasons["hostile-monai@3"]
    assert status is PullStatus.REFUSED and "configs/inference.json" in reason and "changed after signing" in reason
    assert set(registry.refusals()) == {f"{n}@{v}" for n in ("hostile-monai", "hostile-nnunet") for v in "12"} | {
        "hostile-monai@3"
    }  # kept for `status` and the models page
    assert reasons["good@1"][0] is PullStatus.AVAILABLE, reasons["good@1"][1]
    assert registry.versions("good") == ["1"]
    assert registry.imports()[0].signed_by == "demo"
    assert sorted(p.name for p in (tmp_path / "models" / "good" / "1").iterdir()) == [
        "fold0.pt",
        "model.sig",
        "model.yaml",
    ]
    assert list(markers.iterdir()) == []
    assert not [p for p in (tmp_path / "staging").rglob("*") if p.is_file()]


def test_the_hostile_payloads_do_run_when_loaded_unchecked(tmp_path: Path) -> None:
    """The control: these packages are hostile indeed, so the refusals above are what kept
    the markers away (this loads them as a node without the checks would)."""
    from monai.bundle import ConfigParser

    bundle = hostile_bundle(tmp_path / "monai", tmp_path / "monai-ran", "1")
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.get_parsed_content("initialize")
    nnunet = hostile_nnunet(tmp_path / "nnunet" / TRAINED, tmp_path / "nnunet-ran", "1")
    torch.load(nnunet / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert (tmp_path / "monai-ran").is_file() and (tmp_path / "nnunet-ran").is_file()


def test_hostile_packages_signed_by_a_trusted_key_are_refused_as_code(
    container: ContainerClient, tmp_path: Path, runner: InferenceRunner
) -> None:
    """A trusted publisher's key is no licence to run code: the bundle's config is outside the
    allow-list (its key has no allow_code), and the checkpoint is loaded as weights only."""
    markers = tmp_path / "markers"
    markers.mkdir()
    publish_version(container, hostile_bundle(tmp_path / "monai", markers / "monai", "4"), key=DEMO_KEY)
    publish_version(container, hostile_nnunet(tmp_path / "nnunet" / TRAINED, markers / "nnunet", "4"), key=DEMO_KEY)

    registry, results = pull(container, tmp_path, runner)

    monai_result, nnunet_result = results["hostile-monai@4"], results["hostile-nnunet@4"]
    assert monai_result.status is PullStatus.REFUSED
    assert "runs code beyond the allow-list" in (monai_result.reason or "")
    assert "__import__" in (monai_result.reason or "")
    assert nnunet_result.status is PullStatus.REFUSED
    assert "holds more than weights" in (nnunet_result.reason or "")
    assert registry.versions("hostile-monai") == [] and registry.versions("hostile-nnunet") == []
    assert list(markers.iterdir()) == []
