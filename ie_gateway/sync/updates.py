"""Model updates from Azure Blob: find new versions, download, verify, import, maybe activate.

Published layout, in the same container as the cases::

    models/<name>/<version>/model.yaml
    models/<name>/<version>/<every file model.yaml names: folds and files, in their folders>
    models/<name>/<version>/model.sig             # the publisher's signature, uploaded LAST

Any format model.yaml describes travels this way: a native package, an nnU-Net v2 trained-model
folder (``fold_K/checkpoint_final.pth``, ``dataset.json``, ``plans.json``) or a MONAI bundle
(``configs/...``, ``models/model.pt``). The training workspace publishes with
:func:`publish_version`, which signs the package with the publisher's key (and describes an
nnU-Net folder first when it has no model.yaml).

Anyone who can write the container (a node's own credential can, since nodes upload cases there)
can write ``models/``, so nothing published is trusted for being there: a version is taken only
when ``model.sig`` verifies with one of the node's ``trusted_keys``
(:mod:`ie_gateway.infer.signing`). The pull downloads ``model.sig`` first and checks it before
any other file is fetched: an unsigned version, one signed by an unknown key, or one whose
signature does not verify is refused with that reason and nothing else is downloaded. Then
exactly the files the signed statement lists are fetched, each checked against its signed
sha256 as it arrives, and the registry checks the whole package again before it reads
``model.yaml``. A refused version's staged files are removed; installed versions are never
touched. The publisher uploads ``model.sig`` last, so a pull that runs while a version is being
uploaded refuses it as not signed yet and takes it on the next run.

Downloads go to ``<staging_dir>/<name>/<version>.partial/``; a file already there whose sha256
matches is not downloaded again, so an interrupted pull resumes. The signed statement holds each
file's sha256 but not its size, so a blob swapped for a huge one would be fetched whole before
its hash could refuse it; the staging folder is on the spool's disk, so that would stop the node
receiving. A version's files together may hold at most ``max_bytes`` (``sync.max_model_mb``):
no more of a blob than would fit is asked for, and one whose size passes it is refused.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import structlog
from azure.core.exceptions import AzureError
from azure.storage.blob import ContainerClient

from ie_gateway.errors import ModelError, PackageUnsigned, SyncError
from ie_gateway.files import sha256_file
from ie_gateway.infer.formats import describe_package
from ie_gateway.infer.manifest import MANIFEST_NAME, load_manifest
from ie_gateway.infer.modelref import SAFE_NAME
from ie_gateway.infer.signing import MAX_SIGNATURE_BYTES, SIGNATURE_NAME, TrustedKey, read_statement, sign_model
from ie_gateway.vocab import ActivationPolicy, PullStatus

log = structlog.get_logger(__name__)

MODELS_PREFIX = "models/"
PARTIAL_SUFFIX = ".partial"
MB = 2**20
#: sync.max_model_mb's default, in bytes: a 5-fold nnU-Net 3d_fullres package is ~1-2 GB
DEFAULT_MAX_MODEL_BYTES = 4096 * MB


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

    keys: tuple[TrustedKey, ...]

    def import_version(self, src_dir: Path) -> Any: ...

    def activate(self, name: str, version: str, by: str | None = None) -> Any: ...

    def record_refusal(self, name: str, version: str, reason: str) -> None: ...


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
    max_bytes: int = DEFAULT_MAX_MODEL_BYTES,
) -> list[PullResult]:
    """Download, verify and import every completely published version not in ``known``.

    ``policy`` maps a model name to ``manual`` (default) or ``auto``; ``max_bytes`` bounds the
    files of one version together. Refused versions are
    reported in the result (and logged) rather than raised; a storage error raises SyncError
    and keeps the staged files so the next run resumes.
    """
    policies = {name: _policy(name, value) for name, value in policy.items()}
    results = []
    for (name, version), files in sorted(published_versions(container).items()):
        if (name, version) in known:
            continue
        result = _pull_one(
            container,
            staging_dir,
            registry,
            name,
            version,
            files,
            policies.get(name, ActivationPolicy.MANUAL),
            max_bytes,
        )
        results.append(result)
    return results


def publish_version(
    container: ContainerClient,
    package_dir: Path,
    name: str | None = None,
    version: str | None = None,
    *,
    key: Path | None = None,
) -> int:
    """Sign a model package with the publisher's private ``key`` and upload it (its files,
    model.yaml, then model.sig); return the files sent.

    Without ``key`` the package must be signed already (``ie-gateway models sign``). A folder
    without model.yaml (an nnU-Net v2 trained-model folder, a MONAI bundle) is described first
    as ``name@version``. For the people who publish models (and the tests); the node only pulls.
    """
    if not (package_dir / MANIFEST_NAME).is_file():
        if name is None or version is None:
            raise ModelError(f"{package_dir} has no {MANIFEST_NAME}: give a name and a version")
        describe_package(package_dir, name, version)
    if key is not None:
        sign_model(package_dir, key)
    elif not (package_dir / SIGNATURE_NAME).is_file():
        raise PackageUnsigned(f"{package_dir} is not signed: give the publisher's key")
    manifest = load_manifest(package_dir)
    prefix = f"{MODELS_PREFIX}{manifest.name}/{manifest.version}/"
    names = [entry.file for entry in (*manifest.folds, *manifest.files)] + [MANIFEST_NAME, SIGNATURE_NAME]
    try:
        for file in names:
            with (package_dir / file).open("rb") as fh:
                container.upload_blob(prefix + file, fh, overwrite=True)
    except AzureError as exc:
        raise SyncError(f"cannot publish {manifest.name}@{manifest.version}: {exc}") from exc
    return len(names)


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
    max_bytes: int,
) -> PullResult:
    spec = f"{name}@{version}"
    partial = staging_dir / name / f"{version}{PARTIAL_SUFFIX}"
    downloaded = 0
    try:
        if not (SAFE_NAME.fullmatch(name) and SAFE_NAME.fullmatch(version)):
            raise _Refused("name or version has characters that cannot name a folder")
        partial.mkdir(parents=True, exist_ok=True)
        downloaded = _download_verified(container, registry.keys, name, version, files, partial, max_bytes)
        registry.import_version(partial)
    except (_Refused, ModelError) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        log.warning("model_refused", model=spec, reason=str(exc))
        registry.record_refusal(name, version, str(exc))
        return PullResult(name, version, PullStatus.REFUSED, str(exc), downloaded)
    shutil.rmtree(partial, ignore_errors=True)
    if policy is ActivationPolicy.AUTO:
        registry.activate(name, version, by="sync:auto")
        log.info("model_pulled", model=spec, status="active", bytes=downloaded)
        return PullResult(name, version, PullStatus.ACTIVE, None, downloaded)
    log.info("model_pulled", model=spec, status="available, not active", bytes=downloaded)
    return PullResult(name, version, PullStatus.AVAILABLE, None, downloaded)


def _download_verified(
    container: ContainerClient,
    keys: tuple[TrustedKey, ...],
    name: str,
    version: str,
    files: set[str],
    partial: Path,
    max_bytes: int,
) -> int:
    """Fetch and check the signature, then every file it lists, all of them within
    ``max_bytes``; return the bytes downloaded."""
    spec = f"{name}@{version}"
    if SIGNATURE_NAME not in files:
        raise _Refused(f"{spec} is not signed (no {SIGNATURE_NAME} published): nothing downloaded")
    prefix = f"{MODELS_PREFIX}{name}/{version}/"
    signature = _download_bytes(container, prefix + SIGNATURE_NAME, MAX_SIGNATURE_BYTES + 1)
    if len(signature) > MAX_SIGNATURE_BYTES:
        raise _Refused(f"{SIGNATURE_NAME} is larger than a signature can be")
    (partial / SIGNATURE_NAME).write_bytes(signature)
    statement = read_statement(partial / SIGNATURE_NAME, keys, spec)
    if (statement.name, statement.version) != (name, version):
        raise _Refused(f"signed as {statement.spec} but published under {spec}: replayed or moved")
    downloaded = held = len(signature)
    for file, sha256 in statement.files.items():
        downloaded += _fetch(container, prefix, file, files, partial, sha256, max_bytes - held)
        held += (partial / file).stat().st_size
    return downloaded


def _fetch(
    container: ContainerClient, prefix: str, file: str, files: set[str], partial: Path, sha256: str, room: int
) -> int:
    """Make ``partial/file`` hold the blob with ``sha256``, in at most ``room`` bytes; skip a
    complete earlier download. Return the bytes downloaded."""
    dest = partial / file
    if dest.is_file() and sha256_file(dest) == sha256:
        return 0
    if file not in files:
        raise _Refused(f"{file} is signed but not published")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial / f"{file}.part"
    try:
        size = _download_within(container, prefix + file, tmp, room)
    except AzureError as exc:
        raise SyncError(f"download of {prefix}{file} failed: {exc}") from exc
    except _Refused:
        tmp.unlink(missing_ok=True)
        raise
    actual = sha256_file(tmp)
    if actual != sha256:
        tmp.unlink()
        raise _Refused(
            f"{file} has sha256 {actual[:16]}…, the signed statement says {sha256[:16]}…: changed after signing"
        )
    tmp.replace(dest)
    return size


def _download_within(container: ContainerClient, blob: str, dest: Path, room: int) -> int:
    """Write ``blob`` to ``dest`` chunk by chunk; _Refused when it is longer than ``room`` bytes.

    A blob whose size is already too large is not downloaded at all; of any other, only the
    first ``room + 1`` bytes are asked for, so nothing past the bound arrives whatever it holds.
    """
    total = container.get_blob_client(blob).get_blob_properties().size
    if total > room:
        raise _Refused(f"{blob} is {total / MB:.1f} MB, more than sync.max_model_mb leaves for it ({room / MB:.1f} MB)")
    written = 0
    with dest.open("wb") as fh:
        if total == 0:
            return 0  # a range of an empty blob is refused by the service (416)
        for chunk in container.download_blob(blob, offset=0, length=room + 1).chunks():
            written += len(chunk)
            if written > room:  # replaced by a larger blob since its size was read
                raise _Refused(f"{blob} is more than sync.max_model_mb leaves for it ({room / MB:.1f} MB)")
            fh.write(chunk)
    return written


def _download_bytes(container: ContainerClient, blob: str, limit: int) -> bytes:
    """At most ``limit`` bytes of ``blob`` (a hostile publisher may upload a huge one)."""
    try:
        return bytes(container.download_blob(blob, offset=0, length=limit).readall())
    except AzureError as exc:
        raise SyncError(f"download of {blob} failed: {exc}") from exc
