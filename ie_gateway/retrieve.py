"""Query/retrieve: fetch a study the node missed from a configured source (``sources:``).

`ie-gateway fetch --source PACS --study UID` asks the source for a C-MOVE of the study to the
node's own AE title. The source then sends the instances to the node's listener like any
sender, so they land in the spool through the same C-STORE path (durable, deduplicated) and the
rules route the series once it is complete. The source must know the node as a move
destination (its AE title, host and port), and its AE title must be in ``allowed_callers``.
``--patient ID`` first finds the patient's studies (C-FIND at study level, optionally from a
date on and holding a modality), then moves each.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from ie_gateway.config import GatewayConfig, Source
from ie_gateway.errors import FetchError, UnsafeUIDError
from ie_gateway.store import check_uid

log = structlog.get_logger(__name__)

PENDING = frozenset({0xFF00, 0xFF01})
#: C-MOVE failure statuses an admin can act on (PS3.4 C.4.2.1.5).
MOVE_FAILURES = {
    0xA701: "out of resources: unable to calculate the number of matches",
    0xA702: "out of resources: unable to perform sub-operations",
    0xA801: "move destination unknown: add the node (AE title, host, port) to the source's modalities",
    0xA900: "identifier does not match SOP class",
    0xFE00: "cancelled",
}


@dataclass(frozen=True)
class FetchResult:
    """What the source reported when the move ended."""

    completed: int
    failed: int
    warnings: int


def _count(status: Dataset, keyword: str) -> int:
    value = status.get(keyword)
    return int(value) if value is not None else 0


def _source(cfg: GatewayConfig, source_name: str) -> Source:
    source = cfg.sources.get(source_name)
    if source is None:
        known = ", ".join(sorted(cfg.sources)) or "none"
        raise FetchError(f"no source {source_name!r} in the config (sources: {known})")
    return source


def find_studies(
    cfg: GatewayConfig, source_name: str, patient_id: str, since: str | None = None, modality: str | None = None
) -> list[str]:
    """StudyInstanceUIDs of the patient's studies at the source (C-FIND, study level), from
    ``since`` (YYYYMMDD) on and with ``modality`` in the study, when given."""
    source = _source(cfg, source_name)
    ae = AE(ae_title=cfg.node.ae_title)
    ae.connection_timeout = ae.acse_timeout = source.connect_timeout_s
    ae.dimse_timeout = ae.network_timeout = source.move_timeout_s
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(source.host, source.port, ae_title=source.ae_title)
    if not assoc.is_established:
        raise FetchError(f"{source_name}: association {'rejected' if assoc.is_rejected else 'not possible'}")
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = patient_id
    query.StudyInstanceUID = ""
    query.StudyDate = f"{since}-" if since else ""
    query.ModalitiesInStudy = modality or ""
    found: list[str] = []
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            code = int(status.Status) if "Status" in status else None
            if code in PENDING and identifier is not None:
                try:
                    found.append(check_uid(str(identifier.get("StudyInstanceUID", "")), "StudyInstanceUID"))
                except UnsafeUIDError:
                    log.warning("study with an unusable UID skipped", source=source_name)
            elif code != 0x0000:
                answer = f"0x{code:04X}" if code is not None else "no answer"
                raise FetchError(f"{source_name} answered the query {answer}")
    finally:
        if assoc.is_established:
            assoc.release()
    return sorted(set(found))


def fetch_study(cfg: GatewayConfig, source_name: str, study_uid: str) -> FetchResult:
    """Have ``source_name`` send study ``study_uid`` to this node (C-MOVE); FetchError when it
    cannot be reached or refuses."""
    source = _source(cfg, source_name)
    try:
        check_uid(study_uid, "StudyInstanceUID")
    except UnsafeUIDError as exc:
        raise FetchError(str(exc)) from exc
    ae = AE(ae_title=cfg.node.ae_title)
    ae.connection_timeout = ae.acse_timeout = source.connect_timeout_s
    ae.dimse_timeout = ae.network_timeout = source.move_timeout_s
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate(source.host, source.port, ae_title=source.ae_title)
    if not assoc.is_established:
        raise FetchError(f"{source_name}: association {'rejected' if assoc.is_rejected else 'not possible'}")
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    last: Dataset | None = None
    try:
        for status, _identifier in assoc.send_c_move(
            query, cfg.node.ae_title, StudyRootQueryRetrieveInformationModelMove
        ):
            if "Status" not in status:
                raise FetchError(f"{source_name}: no answer to the move within {source.move_timeout_s:g} s")
            last = status
    finally:
        if assoc.is_established:
            assoc.release()
    assert last is not None  # send_c_move yields at least one response or an empty status
    code = int(last.Status)
    result = FetchResult(
        completed=_count(last, "NumberOfCompletedSuboperations"),
        failed=_count(last, "NumberOfFailedSuboperations"),
        warnings=_count(last, "NumberOfWarningSuboperations"),
    )
    log.info("fetched", source=source_name, status=f"0x{code:04X}", completed=result.completed, failed=result.failed)
    if code in (0x0000, 0xB000):
        return result
    reason = MOVE_FAILURES.get(code, "failed")
    raise FetchError(f"{source_name} answered 0x{code:04X}: {reason} ({result.completed} instances sent)")
