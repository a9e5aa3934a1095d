"""One sync run, wired to the node's configuration: upload anonymised cases (``upload``), pull
published model versions (``updates``).

The scheduler calls ``scheduled_cases`` / ``scheduled_models``; ``ie-gateway sync now`` calls
``sync_now``. Two runs of the same kind never overlap (a lock file under the storage root).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import structlog
from azure.storage.blob import ContainerClient

from ie_gateway.config import GatewayConfig
from ie_gateway.errors import SyncError
from ie_gateway.infer.registry import Registry
from ie_gateway.store import Store
from ie_gateway.sync import anonymise, blob
from ie_gateway.sync.anonymise import AnonymiseOptions, Anonymiser
from ie_gateway.sync.lock import exclusive
from ie_gateway.sync.updates import DEFAULT_MAX_MODEL_BYTES, MB, PullResult, pull_updates
from ie_gateway.sync.upload import CaseProgress, CasesReport, scrubbed, sync_cases

log = structlog.get_logger(__name__)

PSEUDONYM_MAP = "pseudonyms.sqlite3"
MODEL_STAGING_DIR = "model-staging"


@dataclass(frozen=True)
class SyncReport:
    """Both halves of ``sync_now``."""

    cases: CasesReport
    models: list[PullResult]

    def summary(self) -> str:
        """Lines for the admin who ran ``ie-gateway sync now``."""
        c = self.cases
        mib = c.bytes / 2**20
        lines = [f"cases: {len(c.synced)} uploaded ({c.blobs} blobs, {mib:.1f} MiB), " + f"{len(c.failed)} failed"]
        lines += [f"  job {job}: {reason}" for job, reason in sorted(c.failed.items())]
        lines.append(f"models: {len(self.models)} new version(s)")
        lines += [
            f"  {r.name}@{r.version}: {r.status.value}" + (f" ({r.reason})" if r.reason else "") for r in self.models
        ]
        return "\n".join(lines)


def sync_models(
    container: ContainerClient,
    staging_dir: Path,
    registry: Registry,
    policy: dict[str, str],
    max_bytes: int = DEFAULT_MAX_MODEL_BYTES,
) -> list[PullResult]:
    """Pull every published model version the registry does not have (see ``updates``)."""
    with exclusive(staging_dir.parent / "sync-models.lock", "model pull"):
        return pull_updates(container, staging_dir, registry, installed_versions(registry), policy, max_bytes)


def installed_versions(registry: Registry) -> set[tuple[str, str]]:
    """(name, version) of every package folder, verified or not: a broken installed version
    must be repaired by an admin, not overwritten by a pull."""
    folder = registry.models_dir
    names = [p.name for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    return {(name, version) for name in names for version in registry.versions(name)}


def open_container(cfg: GatewayConfig) -> ContainerClient:
    """The configured container: a connection string from the environment or systemd
    credential, else ``account_url`` with an Azure identity. SyncError says what is missing."""
    if not cfg.sync.enabled:
        raise SyncError("sync is disabled: set sync.enabled: true in gateway.yaml")
    try:
        return blob.container_client(
            None, cfg.sync.account_url, cfg.sync.container, cfg.sync.authority_host, cfg.sync.api_version
        )
    except SyncError as exc:
        raise SyncError(f"sync is not configured: {exc}") from exc


def make_anonymiser(cfg: GatewayConfig) -> Anonymiser:
    """The node's anonymiser: key from the environment or systemd credential, the pseudonym
    map beside the index, dates per ``sync.date_shift``."""
    try:
        key = anonymise.load_key()
    except SyncError as exc:
        raise SyncError(f"sync is not configured: {exc}") from exc
    return Anonymiser(key, cfg.storage.root / PSEUDONYM_MAP, AnonymiseOptions(dates=cfg.sync.date_shift))


def sync_cases_now(cfg: GatewayConfig, store: Store, *, progress: CaseProgress | None = None) -> CasesReport:
    """Case sync with the node's configuration."""
    container = open_container(cfg)  # first: it says when sync is disabled
    return sync_cases(store, container, make_anonymiser(cfg), progress=progress)


def sync_models_now(cfg: GatewayConfig, registry: Registry) -> list[PullResult]:
    """Model pull with the node's configuration."""
    return sync_models(
        open_container(cfg),
        cfg.storage.root / MODEL_STAGING_DIR,
        registry,
        dict(cfg.sync.activation),
        cfg.sync.max_model_mb * MB,
    )


def sync_now(
    cfg: GatewayConfig, store: Store, registry: Registry, *, progress: CaseProgress | None = None
) -> SyncReport:
    """Upload due cases, then pull new model versions. SyncError (one line) when sync is not
    configured or storage cannot be reached; a single case's failure is in the report."""
    cases = sync_cases_now(cfg, store, progress=progress)
    return SyncReport(cases, sync_models_now(cfg, registry))


def scheduled_cases(cfg: GatewayConfig, store: Store) -> None:
    """The scheduler's case sync: a run that cannot start is logged, and the next one tries."""
    try:
        sync_cases_now(cfg, store)
    except SyncError as exc:
        log.error("case sync not run", reason=scrubbed(str(exc)))


def scheduled_models(cfg: GatewayConfig, registry: Registry) -> None:
    """The scheduler's model pull; refused versions are logged by ``updates``."""
    try:
        sync_models_now(cfg, registry)
    except SyncError as exc:
        log.error("model pull not run", reason=scrubbed(str(exc)))
