"""Delivery over DICOMweb: STOW-RS of result files to a destination with ``protocol: dicomweb``.

Cloud archives (Azure Health Data Services' DICOM service among them) take instances only over
DICOMweb. The outbox is the same as for C-STORE: rows, retries with backoff, dead-letter,
one thread per destination; only the transport differs. dicomweb-client makes the multipart
request; its own retries are off, since the outbox retries, durably.

One request per file, so each row's outcome is its own. A 2xx answer whose FailedSOPSequence
names the instance, a 409 (the service stored none: its failure reason may pass) and a 5xx,
408, 429 or a connection error are failed attempts, retried; another 4xx (401, 403, 415 ...)
will not pass on a retry and is dead-lettered at once, named: "AZURE_DICOM refused the upload:
HTTP 403 Forbidden".
"""

from __future__ import annotations

import os
from typing import Any

import pydicom
import requests
import structlog
from dicomweb_client.api import DICOMwebClient

from ie_gateway.config import Destination, Source
from ie_gateway.errors import DeliveryError, StowRefused
from ie_gateway.ops.tls import resolve
from ie_gateway.vocab import PeerAuth

log = structlog.get_logger(__name__)

#: The scope of a token for Azure Health Data Services' DICOM service.
AZURE_DICOM_SCOPE = "https://dicom.healthcareapis.azure.com/.default"
#: Answers a retry may cure: timeout, too many requests.
RETRIABLE_4XX = frozenset({408, 409, 429})


class _TimedSession(requests.Session):
    """A session whose every request is bounded: dicomweb-client sets no timeout of its own."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self.timeout_s = timeout_s

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout_s)
        return super().request(*args, **kwargs)


def secret(ref: str) -> str:
    """The password a setting names: ``env:NAME`` or ``credential:NAME`` (systemd)."""
    if ref.startswith("env:"):
        value = os.environ.get(ref[4:])
        if value is None:
            raise DeliveryError(f"{ref}: the environment variable is not set")
        return value
    try:
        return resolve(ref).read_text().strip()
    except OSError as exc:
        raise DeliveryError(f"{ref}: cannot be read ({exc.strerror})") from exc


def session_for(dest: Destination | Source, timeout_s: float) -> requests.Session:
    """An HTTP session carrying the destination's (or source's) credentials."""
    session = _TimedSession(timeout_s)
    if dest.auth is PeerAuth.BASIC and dest.username is not None and dest.password is not None:
        session.auth = (dest.username, secret(dest.password))
    elif dest.auth is PeerAuth.AZURE:
        from azure.identity import DefaultAzureCredential  # imported where it is used: a slow import

        token = DefaultAzureCredential().get_token(AZURE_DICOM_SCOPE)
        session.headers["Authorization"] = f"Bearer {token.token}"
    return session


class StowClient:
    """STOW-RS to one destination, one file per request, over one HTTP session."""

    def __init__(self, name: str, dest: Destination, timeout_s: float) -> None:
        assert dest.url is not None  # the config requires it for protocol: dicomweb
        self.name = name
        self.session = session_for(dest, timeout_s)
        self.client = DICOMwebClient(dest.url, session=self.session)
        self.client.set_http_retry_params(retry=False)

    def store(self, path: os.PathLike[str] | str) -> None:
        """Upload one file; StowRefused when a retry cannot help, DeliveryError when it may."""
        ds = pydicom.dcmread(path)
        try:
            answer = self.client.store_instances([ds])
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            reason = exc.response.reason if exc.response is not None else ""
            text = f"{self.name} refused the upload: HTTP {status} {reason}".rstrip()
            if status is not None and 400 <= status < 500 and status not in RETRIABLE_4XX:
                raise StowRefused(text, status) from exc
            raise DeliveryError(text, status) from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise DeliveryError(f"{self.name}: not reachable ({type(exc).__name__})") from exc
        failed = {
            str(item.get("ReferencedSOPInstanceUID")): item.get("FailureReason")
            for item in (answer.get("FailedSOPSequence") or [])
        }
        if ds.SOPInstanceUID in failed:
            reason = failed[ds.SOPInstanceUID]
            code = f"0x{int(reason):04X}" if reason is not None else "no reason given"
            raise DeliveryError(f"{self.name} did not store the instance: failure reason {code}")

    def close(self) -> None:
        self.session.close()


def web_client(source: Source, timeout_s: float) -> tuple[DICOMwebClient, requests.Session]:
    """A DICOMweb client of a source (QIDO-RS, WADO-RS), its own retries off."""
    assert source.url is not None  # the config requires it for protocol: dicomweb
    session = session_for(source, timeout_s)
    client = DICOMwebClient(source.url, session=session)
    client.set_http_retry_params(retry=False)
    return client, session
