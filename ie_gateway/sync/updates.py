"""Model updates from Azure Blob: find new versions, download, verify, import, maybe activate.

Published layout, in the same container as the cases::

    models/<name>/<version>/model.yaml
    models/<name>/<version>/<every file model.yaml names: folds and files, in their folders>
    models/<name>/<version>/model.yaml.sha256     # uploaded LAST

Any format model.yaml describes travels this way: a native package, an nnU-Net v2 trained-model
folder (``fold_K/checkpoint_final.pth``, ``dataset.json``, ``plans.json``) or a MONAI bundle
(``configs/...``, ``models/model.pt``). The training workspace publishes an nnU-Net folder as it
is with :func:`publish_version` (which describes it first when it has no model.yaml).

``model.yaml.sha256`` is the manifest's own checksum, in ``sha256sum`` format
(``<64 hex>  model.yaml``); the publisher writes it after every other file (``publish_version``
does), so a version without it is still being published and is left alone. Each fold's sha256
(and every other file's) is in ``model.yaml``. A pulled version is refused, with a reason, when the manifest does not
match its sidecar, a fold does not match the manifest, or the registry refuses it; its staged
files are then removed. The checksums catch corruption and partial or mixed uploads; they do
not prove who published (anyone who can write the container can write both a fold and its
manifest), so write access to ``models/`` must be limited to the model publishers.

Downloads go to ``<staging_dir>/<name>/<version>.partial/``; a file already there whose sha256
matches is not downloaded again, so an interrupted pull resumes.
"""

from __future__ import annotations

import enum
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import structlog
from azure.core.exceptions import AzureError
from azure.storage.blob import ContainerClient, ContentSettings

from ie_gateway.errors import ModelError, SyncError
from ie_gateway.files import sha256_file
from ie_gateway.infer.formats import describe_package
from ie_gateway.infer.manifest import MANIFEST_NAME, load_manifest
from ie_gateway.infer.modelref import SAFE_NAME

log = structlog.get_logger(__name__)

MODELS_PREFIX = "models/"
SIDECAR_NAME = MANIFEST_NAME + ".sha256"
PARTIAL_SUFFIX = ".partial"
_HEX64 = re.compile(r"[0-9a-f]{64}")


class ActivationPolicy(enum.StrEnum):
    """What happens after a version is imported: ``manual`` leaves it inactive (default)."""

    MANUAL = "manual"
    AUTO = "auto"


class PullStatus(enum.StrEnum):
    ACTIVE = "active"  # imported and activated (policy auto)
    AVAILABLE = "available"  # imported, not active (policy manual): `ie-gateway models activate`
    REFUSED = "refused"  # not imported; ``reason`` says why


@dataclass(frozen=True)
class PullResult:
    """The outcome for one published version; ``bytes`` counts what was downloaded this time."""

    name: str
    version: str
    status: PullStatus
    reason: str | None = None
    bytes: int = 0


class ModelRegistry(Protocol):
    """The part of ``ie_gateway.infer.registry.Registry`` that updates need."""

    def import_version(self, src_dir: Path) -> Any: ...

    def activate(self, name: str, version: str, by: str | None = None) -> Any: ...


class _Refused(Exception):
    """A published version failed a check; carries the reason for the PullResult."""


def published_versions(container: ContainerClient) -> dict[tuple[str, str], set[str]]:
    """(name, version) -> file names under ``models/<name>/<version>/`` in the container."""
    versions: dict[tuple[str, str], set[str]] = {}
    try:
        for blob in container.list_blobs(name_starts_with=MODELS_PREFIX):
            parts = blob.name[len(MODELS_PREFIX) :].split("/")
            if len(parts) >= 3 and all(parts):
                versions.setdefault((parts[0], parts[1]), set()).add("/".join(parts[2:]))
    except AzureError as exc:
        raise SyncError(f"cannot list {MODELS_PREFIX} in {container.container_name}: {exc}") from exc
    return versions


def pull_updates(
    container: ContainerClient,
    staging_dir: Path,
    registry: ModelRegistry,
    known: set[tuple[str, str]],
    policy: Mapping[str, str] = MappingProxyType({}),
) -> list[PullResult]:
    """Download, verify and import every completely published version not in ``known``.

    ``policy`` maps a model name to ``manual`` (default) or ``auto``. Refused versions are
    reported in the result (and logged) rather than raised; a storage error raises SyncError
    and keeps the staged files so the next run resumes.
    """
    policies = {name: _policy(name, value) for name, value in policy.items()}
    results = []
    for (name, version), files in sorted(published_versions(container).items()):
        if (name, version) in known:
            continue
        if SIDECAR_NAME not in files:
            log.info("model_publication_incomplete", model=f"{name}@{version}")
            continue
        result = _pull_one(
            container, staging_dir, registry, name, version, files, policies.get(name, ActivationPolicy.MANUAL)
        )
        results.append(result)
    return results


def publish_version(
    container: ContainerClient, package_dir: Path, name: str | None = None, version: str | None = None
) -> int:
    """Upload a model package (its files, model.yaml, then the sidecar); return the files sent.

    A folder without model.yaml (an nnU-Net v2 trained-model folder, a MONAI bundle) is
    described first as ``name@version``. For the people who publish models (and the tests);
    the node itself only pulls.
    """
    if not (package_dir / MANIFEST_NAME).is_file():
        if name is None or version is None:
            raise ModelError(f"{package_dir} has no {MANIFEST_NAME}: give a name and a version")
        describe_package(package_dir, name, version)
    manifest = load_manifest(package_dir)
    prefix = f"{MODELS_PREFIX}{manifest.name}/{manifest.version}/"
    names = [entry.file for entry in (*manifest.folds, *manifest.files)] + [MANIFEST_NAME]
    try:
        for file in names:
            with (package_dir / file).open("rb") as fh:
                container.upload_blob(prefix + file, fh, overwrite=True)
        digest = sha256_file(package_dir / MANIFEST_NAME)
        container.upload_blob(
            prefix + SIDECAR_NAME,
            f"{digest}  {MANIFEST_NAME}\n".encode(),
            overwrite=True,
            content_settings=ContentSettings(content_type="text/plain"),
        )
    except AzureError as exc:
        raise SyncError(f"cannot publish {manifest.name}@{manifest.version}: {exc}") from exc
    return len(names) + 1


def _policy(name: str, value: str) -> ActivationPolicy:
    try:
        return ActivationPolicy(value)
    except ValueError:
        raise SyncError(f"activation policy for {name!r} is {value!r}; expected 'manual' or 'auto'") from None


def _pull_one(
    container: ContainerClient,
    staging_dir: Path,
    registry: ModelRegistry,
    name: str,
    version: str,
    files: set[str],
    policy: ActivationPolicy,
) -> PullResult:
    spec = f"{name}@{version}"
    partial = staging_dir / name / f"{version}{PARTIAL_SUFFIX}"
    downloaded = 0
    try:
        if not (SAFE_NAME.fullmatch(name) and SAFE_NAME.fullmatch(version)):
            raise _Refused("name or version has characters that cannot name a folder")
        partial.mkdir(parents=True, exist_ok=True)
        downloaded = _download_verified(container, name, version, files, partial)
        registry.import_version(partial)
    except (_Refused, ModelError) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        log.warning("model_refused", model=spec, reason=str(exc))
        return PullResult(name, version, PullStatus.REFUSED, str(exc), downloaded)
    shutil.rmtree(partial, ignore_errors=True)
    if policy is ActivationPolicy.AUTO:
        registry.activate(name, version, by="sync:auto")
        log.info("model_pulled", model=spec, status="active", bytes=downloaded)
        return PullResult(name, version, PullStatus.ACTIVE, None, downloaded)
    log.info("model_pulled", model=spec, status="available, not active", bytes=downloaded)
    return PullResult(name, version, PullStatus.AVAILABLE, None, downloaded)


def _download_verified(container: ContainerClient, name: str, version: str, files: set[str], partial: Path) -> int:
    """Fetch and check the manifest, then every fold it names; return the bytes downloaded."""
    prefix = f"{MODELS_PREFIX}{name}/{version}/"
    expected = _sidecar_digest(_download_bytes(container, prefix + SIDECAR_NAME))
    downloaded = _fetch(container, prefix, MANIFEST_NAME, files, partial, expected)
    manifest = load_manifest(partial)
    if (manifest.name, manifest.version) != (name, version):
        raise _Refused(f"model.yaml says {manifest.name}@{manifest.version} but is published under {name}@{version}")
    for entry in (*manifest.folds, *manifest.files):
        downloaded += _fetch(container, prefix, entry.file, files, partial, entry.sha256)
    return downloaded


def _fetch(container: ContainerClient, prefix: str, file: str, files: set[str], partial: Path, sha256: str) -> int:
    """Make ``partial/file`` hold the blob with ``sha256``; skip a complete earlier download."""
    dest = partial / file
    if dest.is_file() and sha256_file(dest) == sha256:
        return 0
    if file not in files:
        raise _Refused(f"{file} is named in model.yaml but not published")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial / f"{file}.part"
    try:
        with tmp.open("wb") as fh:
            size = container.download_blob(prefix + file).readinto(fh)
    except AzureError as exc:
        raise SyncError(f"download of {prefix}{file} failed: {exc}") from exc
    actual = sha256_file(tmp)
    if actual != sha256:
        raise _Refused(f"{file} has sha256 {actual}, expected {sha256}: corrupt or tampered")
    tmp.replace(dest)
    return int(size)


def _download_bytes(container: ContainerClient, blob: str) -> bytes:
    try:
        return bytes(container.download_blob(blob).readall())
    except AzureError as exc:
        raise SyncError(f"download of {blob} failed: {exc}") from exc


def _sidecar_digest(content: bytes) -> str:
    fields = content.decode("ascii", errors="replace").split()
    if not fields or not _HEX64.fullmatch(fields[0].lower()):
        raise _Refused(f"{SIDECAR_NAME} is not '<sha256 hex>  {MANIFEST_NAME}'")
    return fields[0].lower()
