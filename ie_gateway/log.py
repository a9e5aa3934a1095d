"""Structured JSON logs without patient data.

Every line is one JSON object (journald keeps it as is). A last-line-of-defence processor,
``redact``, drops values of patient-identifying keys, replaces anything shaped like a DICOM UID
with a short hash and blanks secrets (a SAS ``sig=``, ``AccountKey=``,
``SharedAccessSignature=``, a password in a URL, a bearer token), so a careless
`log.info(..., uid=ds.SOPInstanceUID)` or an Azure error quoting its URL cannot leak either. It
runs after tracebacks are formatted into text, so an exception's message is redacted too.
``scrub`` applies the same to one text (a job's reason, which `status` and the page show).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# Four or more dots: a UID, not an IPv4 address. Standard UIDs (transfer syntaxes, SOP classes)
# identify nobody and stay readable.
UID_IN_TEXT = re.compile(r"\b\d+(?:\.\d+){4,}\b")
STANDARD_UID_ROOT = "1.2.840.10008."
IDENTIFYING_KEYS = frozenset(
    {
        "patientname",
        "patient_name",
        "patientid",
        "patient_id",
        "patientbirthdate",
        "patient_birth_date",
        "birthdate",
        "accessionnumber",
        "accession_number",
        "institutionname",
        "referringphysicianname",
        "otherpatientids",
    }
)


REDACTED = "[redacted]"
SECRETS: tuple[tuple[re.Pattern[str], str], ...] = (
    # a whole SAS token in a connection string runs to the next ';'
    (re.compile(r"(?i)\b(SharedAccessSignature|AccountKey|SharedAccessKey)=[^;\s\"']+"), rf"\1={REDACTED}"),
    (re.compile(r"(?i)([?&;\s]sig)=[^&;\s\"']+"), rf"\1={REDACTED}"),
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+"), rf"\1 {REDACTED}"),
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]+):[^@\s/]+@"), rf"\1:{REDACTED}@"),
    (re.compile(r"(?i)\b(password|passwd|pwd)=[^;&\s\"']+"), rf"\1={REDACTED}"),
)


def uid_hash(uid: str) -> str:
    """A short, stable, non-reversible tag for a UID, fit for logs."""
    return "uid:" + hashlib.sha256(uid.encode()).hexdigest()[:12]


def _hash_match(match: re.Match[str]) -> str:
    uid = match.group(0)
    return uid if uid.startswith(STANDARD_UID_ROOT) else uid_hash(uid)


def scrub(text: str) -> str:
    """``text`` fit for a log line or a job's reason: secrets blanked, UID-shaped text hashed."""
    for pattern, replacement in SECRETS:
        text = pattern.sub(replacement, text)
    return UID_IN_TEXT.sub(_hash_match, text)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    if isinstance(value, dict):
        return {k: ("[removed]" if k.lower() in IDENTIFYING_KEYS else _scrub(v)) for k, v in value.items()}
    return value


def redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: remove identifying keys, hash UID-shaped values, blank secrets."""
    for key in list(event):
        if key.lower() in IDENTIFYING_KEYS:
            event[key] = "[removed]"
        else:
            event[key] = _scrub(event[key])
    return event


def _named(process: str) -> Any:
    """structlog processor: the line's ``process`` (its name and pid)."""
    pid = os.getpid()

    def add(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault("process", process)
        event.setdefault("pid", pid)
        return event

    return add


def configure(level: str = "info", stream: Any = None, process: str | None = None) -> None:
    """Set up JSON logging for the process (call once, at start); stdlib loggers go through it too.
    ``process``: a name put on every line as ``process``, where one node runs several
    (``node.listener_processes``)."""
    numeric = logging.getLevelName(level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if process is not None:
        shared.append(_named(process))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact,  # after the traceback became text: its messages are redacted too
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(numeric)
    # pynetdicom logs dataset summaries (patient names among them) below warning level.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)  # a line per job run is noise
    # The Azure SDK logs every HTTP request and response (headers included) at INFO; its
    # failures reach the log once, as SyncError lines with the error code and what to do.
    logging.getLogger("azure").setLevel(logging.WARNING)
