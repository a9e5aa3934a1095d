"""Upload anonymised cases to Azure Blob Storage: streamed, resumable, manifest last.

A case is ``cases/<case_id>/<kind>/<name>.dcm`` for each file (kind ``ct``, ``ai`` or
``approved``) and ``cases/<case_id>/manifest.json``, uploaded after every file, so a reader
that sees a manifest sees a complete case. Each blob carries its Content-MD5; a blob already
present with the same size and MD5 is skipped, so a re-run uploads nothing twice and an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from azure.core.exceptions import AzureError, ServiceRequestError
from azure.identity import DefaultAzureCredential
from azure.storage.blob import ContainerClient, ContentSettings

from ie_gateway.errors import SyncError

log = structlog.get_logger(__name__)

CONNECTION_STRING_ENV = "AZURE_STORAGE_CONNECTION_STRING"
CONNECTION_STRING_CREDENTIAL = "storage-connection-string"  # systemd LoadCredential= name
CASE_KINDS = ("ct", "ai", "approved")
MANIFEST_NAME = "manifest.json"
DICOM_CONTENT_TYPE = "application/dicom"
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

ProgressCallback = Callable[[int, int], None]
"""Called after each blob with (bytes done, bytes in the case); skipped blobs count as done."""


@dataclass(frozen=True)
class UploadReport:
    """What one ``upload_case`` call did; ``bytes`` counts uploaded bytes only."""

    uploaded: int
    skipped: int
    bytes: int


@dataclass(frozen=True)
class _Item:
    name: str
    path: Path
    size: int
    md5: bytes


def load_connection_string(environ: Mapping[str, str] | None = None) -> str | None:
    """``$AZURE_STORAGE_CONNECTION_STRING``, else the systemd credential
    ``$CREDENTIALS_DIRECTORY/storage-connection-string``, else None (use an Azure identity)."""
    env = os.environ if environ is None else environ
    if env.get(CONNECTION_STRING_ENV):
        return env[CONNECTION_STRING_ENV]
    creds = env.get("CREDENTIALS_DIRECTORY")
    path = Path(creds) / CONNECTION_STRING_CREDENTIAL if creds else None
    if path is not None and path.is_file():
        return path.read_text(encoding="utf-8").strip() or None
    return None


def container_client(
    connection_string: str | None,
    account_url: str | None,
    container: str,
    authority_host: str | None = None,
    api_version: str | None = None,
) -> ContainerClient:
    """A client for ``container``.

    With a connection string (argument, else ``load_connection_string()``) it uses that:
    Azurite, an account key or a SAS (what Azure Stack Hub storage accepts). Otherwise it signs in
    with ``DefaultAzureCredential`` (managed identity, service principal environment variables)
    against ``authority_host`` and uses ``account_url``. ``api_version`` pins the storage REST
    version for services older than this SDK (Azure Stack Hub).
    """
    options: dict[str, Any] = {"api_version": api_version} if api_version else {}
    connection = connection_string or load_connection_string()
    if connection:
        return ContainerClient.from_connection_string(connection, container, **options)
    if not account_url:
        raise SyncError(
            f"no blob storage configured: set {CONNECTION_STRING_ENV} (systemd credential or "
            "environment file) or the storage account URL for a managed identity"
        )
    credential = DefaultAzureCredential(authority=authority_host) if authority_host else DefaultAzureCredential()
    return ContainerClient(account_url, container, credential=credential, **options)


def upload_case(
    container: ContainerClient,
    case_id: str,
    files: Mapping[str, Sequence[Path]],
    manifest: Mapping[str, Any],
    *,
    progress: ProgressCallback | None = None,
    max_concurrency: int = 4,
) -> UploadReport:
    """Upload a case's files, then its manifest; skip blobs already there with the same MD5.

    ``files`` maps a kind (``ct``, ``ai``, ``approved``) to anonymised files; each becomes
    ``<kind>/<file stem>.dcm``. ``manifest`` is the caller's description (model, structures,
    pseudonymous ids); a ``files`` entry listing every blob with size and MD5 is added to it.
    ``max_concurrency`` files are in flight at once. Raises SyncError naming the blob that failed.
    """
    prefix = _case_prefix(case_id)
    items = _items(prefix, files)
    document = _manifest_bytes(manifest, items, prefix)
    manifest_item = _Item(prefix + MANIFEST_NAME, Path(MANIFEST_NAME), len(document), hashlib.md5(document).digest())
    present = _present(container, prefix)
    todo = [item for item in items if present.get(item.name) != (item.size, item.md5)]
    total = sum(item.size for item in items) + len(document)
    done = total - sum(item.size for item in todo) - len(document)
    if todo and manifest_item.name in present:
        _delete(container, manifest_item.name)  # the case is incomplete until we finish
        del present[manifest_item.name]
    if progress:
        progress(done, total)
    pool = ThreadPoolExecutor(max_workers=max(1, max_concurrency))
    try:
        for future in as_completed([pool.submit(_upload_file, container, i) for i in todo]):
            done += future.result()
            if progress:
                progress(done, total)
    finally:
        # on an error or interrupt, blobs in flight finish; queued ones are not started
        pool.shutdown(wait=True, cancel_futures=True)
    uploaded_bytes = sum(item.size for item in todo)
    uploaded = len(todo)
    if present.get(manifest_item.name) != (manifest_item.size, manifest_item.md5):
        _upload(container, manifest_item, document, "application/json")
        uploaded, uploaded_bytes = uploaded + 1, uploaded_bytes + len(document)
    if progress:
        progress(total, total)
    report = UploadReport(uploaded=uploaded, skipped=len(items) + 1 - uploaded, bytes=uploaded_bytes)
    log.info("case_uploaded", uploaded=report.uploaded, skipped=report.skipped, bytes=report.bytes)
    return report


def _case_prefix(case_id: str) -> str:
    if not _SAFE_ID.fullmatch(case_id):
        raise SyncError(f"case id {case_id!r} cannot name a blob folder: use letters, digits, '.', '_', '-'")
    return f"cases/{case_id}/"


def _items(prefix: str, files: Mapping[str, Sequence[Path]]) -> list[_Item]:
    items: dict[str, _Item] = {}
    for kind, paths in files.items():
        if kind not in CASE_KINDS:
            raise SyncError(f"unknown file kind {kind!r}; expected one of {', '.join(CASE_KINDS)}")
        for path in paths:
            name = f"{prefix}{kind}/{path.stem}.dcm"
            if name in items:
                raise SyncError(f"two files would both upload as {name}")
            items[name] = _Item(name, path, path.stat().st_size, _md5_of(path))
    return list(items.values())


def _md5_of(path: Path) -> bytes:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "md5").digest()


def _manifest_bytes(manifest: Mapping[str, Any], items: list[_Item], prefix: str) -> bytes:
    if "files" in manifest:
        raise SyncError("the case manifest must not set 'files'; upload_case lists them")
    listing: dict[str, list[dict[str, object]]] = {}
    for item in items:
        kind, name = item.name[len(prefix) :].split("/", 1)
        listing.setdefault(kind, []).append({"name": name, "size": item.size, "md5": item.md5.hex()})
    return json.dumps({**manifest, "files": listing}, indent=2, sort_keys=True).encode()


def _present(container: ContainerClient, prefix: str) -> dict[str, tuple[int, bytes | None]]:
    """Name -> (size, Content-MD5) of the blobs already under ``prefix``."""
    try:
        return {
            blob.name: (blob.size, _md5_bytes(blob.content_settings.content_md5))
            for blob in container.list_blobs(name_starts_with=prefix)
        }
    except AzureError as exc:
        raise SyncError(
            f"cannot list {prefix} in container {container.container_name}: "
            f"{remote_error(exc, container.container_name)}"
        ) from exc


def _md5_bytes(value: bytes | bytearray | None) -> bytes | None:
    return bytes(value) if value else None


def _upload_file(container: ContainerClient, item: _Item) -> int:
    with item.path.open("rb") as fh:
        _upload(container, item, fh, DICOM_CONTENT_TYPE)
    return item.size


def _upload(container: ContainerClient, item: _Item, data: Any, content_type: str) -> None:
    try:
        container.upload_blob(
            item.name,
            data,
            length=item.size,
            overwrite=True,
            content_settings=ContentSettings(content_type=content_type, content_md5=bytearray(item.md5)),
        )
    except AzureError as exc:
        raise SyncError(f"upload of {item.name} failed: {remote_error(exc, container.container_name)}") from exc


def _delete(container: ContainerClient, name: str) -> None:
    try:
        container.delete_blob(name)
    except AzureError as exc:
        raise SyncError(
            f"cannot withdraw {name} before re-upload: {remote_error(exc, container.container_name)}"
        ) from exc


# What an admin does about the storage service's error codes (the x-ms-error-code header).
WHAT_TO_DO = {
    "ContainerNotFound": "container {container} does not exist in the storage account: create it, "
    "or check sync.container",
    "ContainerBeingDeleted": "container {container} is being deleted: wait, or check sync.container",
    "AuthenticationFailed": "the storage account refused the credentials: check the connection "
    "string or SAS (credential storage-connection-string) and the VM's clock",
    "AuthorizationFailure": "the identity may not do this: it needs 'Storage Blob Data Contributor' "
    "on container {container}",
    "AuthorizationPermissionMismatch": "the identity may not do this: it needs 'Storage Blob Data "
    "Contributor' on container {container}",
    "InvalidHeaderValue": "the storage service does not speak this REST version: set "
    "sync.api_version (Azure Stack Hub: 2019-02-02)",
    "AccountIsDisabled": "the storage account is disabled: ask its owner to enable it",
}


def remote_error(exc: AzureError, container: str) -> str:
    """One line for the log and `status`: the service's error code and what to do, never the
    XML body the SDK puts in its message."""
    if isinstance(exc, ServiceRequestError):
        return "no answer from the storage account: check sync.account_url, DNS and the network"
    code = getattr(exc, "error_code", None)
    status = getattr(exc, "status_code", None)
    hint = WHAT_TO_DO.get(str(code))
    if hint is None and status == 403:
        hint = WHAT_TO_DO["AuthorizationFailure"]
    if hint is None:
        hint = (str(getattr(exc, "reason", "") or exc.message or type(exc).__name__).splitlines() or [""])[0]
    label = code or (f"HTTP {status}" if status else type(exc).__name__)
    return f"{label}: {hint.format(container=container)}"
