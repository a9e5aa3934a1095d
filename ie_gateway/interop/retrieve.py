"""Query/retrieve: fetch a study the node missed from a configured source (``sources:``).

`ie-gateway fetch --source PACS --study UID` asks the source for a C-MOVE of the study to the
node's own AE title. The source then sends the instances to the node's listener like any
sender, so they land in the spool through the same C-STORE path (durable, deduplicated) and the
rules route the series once it is complete. The source must know the node as a move
destination (its AE title, host and port), and its AE title must be in ``allowed_callers``.
A ``protocol: dicomweb`` source is searched by QIDO-RS and read by WADO-RS instead; this
process then writes each instance into the spool through ``Store.accept``, as the listener would.
``--patient ID`` first finds the patient's studies (C-FIND at study level, optionally from a
date on and holding a modality), then moves each.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from functools import partial
from io import BytesIO

import pydicom
import requests
import structlog
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from ie_gateway import reactor
from ie_gateway.config import GatewayConfig, Source
from ie_gateway.errors import BadDate, FetchError, UnsafeUIDError
from ie_gateway.interop.dicomweb import web_client
from ie_gateway.store import Arrival, Store, check_uid, header_values
from ie_gateway.vocab import PeerProtocol

log = structlog.get_logger(__name__)

#: What `ie-gateway fetch` proposes to a DICOM source: Study Root C-FIND (study level) and C-MOVE
#: to the node's own AE title. The conformance statement reads them from here.
FIND_CONTEXT = build_context(StudyRootQueryRetrieveInformationModelFind)
MOVE_CONTEXT = build_context(StudyRootQueryRetrieveInformationModelMove)
QUERY_LEVEL = "STUDY"
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


def _associate(cfg: GatewayConfig, source_name: str, source: Source, context: PresentationContext) -> Association:
    """An association with the source for one query/retrieve context; FetchError when refused."""
    ae = AE(ae_title=cfg.node.ae_title)
    ae.connection_timeout = ae.acse_timeout = source.connect_timeout_s
    ae.dimse_timeout = ae.network_timeout = source.move_timeout_s
    ae.requested_contexts = [context]
    assoc = reactor.associate(ae, source.host, source.port, ae_title=source.ae_title)
    if not assoc.is_established:
        raise FetchError(f"{source_name}: association {'rejected' if assoc.is_rejected else 'not possible'}")
    return assoc


def study_date(text: str) -> str:
    """YYYY-MM-DD as a DICOM date (YYYYMMDD), for a query's ``since``."""
    try:
        return dt.date.fromisoformat(text).strftime("%Y%m%d")
    except ValueError as exc:
        raise BadDate(f"--since {text!r} is not a date (YYYY-MM-DD)") from exc


def find_studies(
    cfg: GatewayConfig, source_name: str, patient_id: str, since: str | None = None, modality: str | None = None
) -> list[str]:
    """StudyInstanceUIDs of the patient's studies at the source (C-FIND, study level), from
    ``since`` (YYYYMMDD) on and with ``modality`` in the study, when given."""
    source = _source(cfg, source_name)
    if source.protocol is PeerProtocol.DICOMWEB:
        return _find_web(source_name, source, patient_id, since, modality)
    assoc = _associate(cfg, source_name, source, FIND_CONTEXT)
    query = Dataset()
    query.QueryRetrieveLevel = QUERY_LEVEL
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
    if source.protocol is PeerProtocol.DICOMWEB:
        return _fetch_web(cfg, source_name, source, study_uid)
    assoc = _associate(cfg, source_name, source, MOVE_CONTEXT)
    query = Dataset()
    query.QueryRetrieveLevel = QUERY_LEVEL
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


def _find_web(source_name: str, source: Source, patient_id: str, since: str | None, modality: str | None) -> list[str]:
    """QIDO-RS for the patient's studies."""
    filters = {"PatientID": patient_id}
    if since:
        filters["StudyDate"] = f"{since}-"
    if modality:
        filters["ModalitiesInStudy"] = modality
    client, session = web_client(source, source.connect_timeout_s + source.move_timeout_s)
    try:
        studies = client.search_for_studies(search_filters=filters)
    except requests.RequestException as exc:
        raise FetchError(f"{source_name}: query failed ({type(exc).__name__}: {exc})") from exc
    finally:
        session.close()
    found = []
    for study in studies:
        try:
            found.append(check_uid(str(study["0020000D"]["Value"][0]), "StudyInstanceUID"))
        except (KeyError, IndexError, TypeError, UnsafeUIDError):
            log.warning("study with an unusable UID skipped", source=source_name)
    return sorted(set(found))


def _fetch_web(cfg: GatewayConfig, source_name: str, source: Source, study_uid: str) -> FetchResult:
    """WADO-RS of the study, each instance into the spool through ``Store.accept`` (as a
    C-STORE would store it), with the source's name as the calling AE."""
    store = Store.for_settings(cfg.storage)
    client, session = web_client(source, source.connect_timeout_s + source.move_timeout_s)
    completed = failed = 0
    try:
        for ds in client.iter_study(study_uid):
            buffer = BytesIO()
            try:
                arrival = Arrival.of(ds, source_name[:16], cfg.node.ae_title)
                pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
            except (UnsafeUIDError, AttributeError, ValueError) as exc:
                log.warning("fetched instance refused", source=source_name, reason=str(exc)[:200])
                failed += 1
                continue
            store.accept(arrival, (buffer.getvalue(),), partial(header_values, ds))
            completed += 1
    except requests.RequestException as exc:
        raise FetchError(f"{source_name}: retrieve failed after {completed} instances ({type(exc).__name__})") from exc
    finally:
        session.close()
        store.index.close()
    log.info("fetched", source=source_name, protocol="wado-rs", completed=completed, failed=failed)
    return FetchResult(completed=completed, failed=failed, warnings=0)
