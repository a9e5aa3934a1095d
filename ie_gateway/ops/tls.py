"""DICOM TLS (PS3.15 Annex B): SSL contexts for the listener and for sending, and their checks.

Certificates and keys are files, or systemd credentials named ``credential:NAME`` (read from
``$CREDENTIALS_DIRECTORY``, which systemd fills from ``LoadCredential=``), so a private key never
sits in YAML. The standard library's ssl module does the TLS; `cryptography` only reads
certificates for `check-config` (expiry, key matches certificate).
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ie_gateway.config import Destination, DestinationTLS, GatewayConfig, NodeTLS
from ie_gateway.errors import TLSConfigError

CREDENTIAL = "credential:"
EXPIRY_WARNING_DAYS = 30


def resolve(ref: str) -> Path:
    """The file a ``cert``/``key``/``ca`` setting names; ``credential:NAME`` is a systemd credential."""
    if ref.startswith(CREDENTIAL):
        folder = os.environ.get("CREDENTIALS_DIRECTORY")
        if not folder:
            raise TLSConfigError(f"{ref}: no $CREDENTIALS_DIRECTORY (set LoadCredential= in the unit)")
        return Path(folder) / ref[len(CREDENTIAL) :]
    return Path(ref)


def server_context(cfg: NodeTLS) -> ssl.SSLContext:
    """The listener's context: our certificate, and callers' certificates verified against
    ``ca`` (required when ``require_client_cert``)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # PS3.15 B.9 (BCP 195)
    _load_chain(ctx, cfg.cert, cfg.key)
    if cfg.ca is not None:
        _load_ca(ctx, cfg.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if cfg.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(cfg: DestinationTLS) -> ssl.SSLContext:
    """A context for C-STORE to a destination: its certificate verified (against ``ca`` or the
    system's trust store), ours presented when ``cert``/``key`` are set."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = cfg.check_hostname
    if cfg.ca is not None:
        _load_ca(ctx, cfg.ca)
    if cfg.cert is not None and cfg.key is not None:
        _load_chain(ctx, cfg.cert, cfg.key)
    return ctx


def associate_args(dest: Destination) -> tuple[ssl.SSLContext, str | None] | None:
    """pynetdicom's ``tls_args`` for a destination: None for plain DICOM."""
    if dest.tls is None:
        return None
    return client_context(dest.tls), dest.host if dest.tls.check_hostname else None


def config_problems(cfg: GatewayConfig) -> list[str]:
    """What `check-config` reports of every TLS setting in ``cfg`` (see :func:`check`)."""
    problems: list[str] = []
    if cfg.node.tls is not None:
        problems += [f"node.tls: {p}" for p in check(cfg.node.tls.cert, cfg.node.tls.key, cfg.node.tls.ca)]
    for name, dest in cfg.destinations.items():
        if dest.tls is None:
            continue
        if (dest.tls.cert is None) != (dest.tls.key is None):
            problems.append(f"destinations.{name}.tls: cert and key go together")
        elif dest.tls.cert is not None:
            problems += [f"destinations.{name}.tls: {p}" for p in check(dest.tls.cert, dest.tls.key, dest.tls.ca)]
        elif dest.tls.ca is not None:
            problems += [f"destinations.{name}.tls: {p}" for p in _check_ca(dest.tls.ca)]
    return problems


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    try:
        ctx.load_cert_chain(resolve(cert), resolve(key))
    except FileNotFoundError as exc:
        raise TLSConfigError(f"{exc.filename}: no such file") from exc
    except ssl.SSLError as exc:
        raise TLSConfigError(f"{cert} / {key}: {exc.reason or exc} (does the key match the certificate?)") from exc


def _load_ca(ctx: ssl.SSLContext, ca: str) -> None:
    try:
        ctx.load_verify_locations(cafile=resolve(ca))
    except FileNotFoundError as exc:
        raise TLSConfigError(f"{ca}: no such file") from exc
    except ssl.SSLError as exc:
        raise TLSConfigError(f"{ca}: not a PEM CA bundle ({exc.reason or exc})") from exc


def check(cert: str, key: str | None, ca: str | None, now: dt.datetime | None = None) -> list[str]:
    """Problems an admin must fix (unreadable, expired, not yet valid, key not the certificate's)
    and warnings (expiring within 30 days), one line each; empty when all is well."""
    now = now or dt.datetime.now(dt.UTC)
    problems: list[str] = []
    try:
        certificate = x509.load_pem_x509_certificate(resolve(cert).read_bytes())
    except (OSError, ValueError, TLSConfigError) as exc:
        return [f"{cert}: cannot read the certificate: {exc}"]
    if certificate.not_valid_after_utc <= now:
        problems.append(f"{cert}: expired on {certificate.not_valid_after_utc:%Y-%m-%d}")
    elif certificate.not_valid_after_utc - now < dt.timedelta(days=EXPIRY_WARNING_DAYS):
        problems.append(f"{cert}: warning: expires on {certificate.not_valid_after_utc:%Y-%m-%d}")
    if certificate.not_valid_before_utc > now:
        problems.append(f"{cert}: not valid before {certificate.not_valid_before_utc:%Y-%m-%d}")
    if key is not None:
        try:
            private = serialization.load_pem_private_key(resolve(key).read_bytes(), password=None)
        except (OSError, ValueError, TypeError, TLSConfigError) as exc:
            problems.append(f"{key}: cannot read the private key (PEM, unencrypted): {exc}")
        else:
            ours = private.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            theirs = certificate.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            if ours != theirs:
                problems.append(f"{key}: does not match the certificate {cert}")
    if ca is not None:
        problems += _check_ca(ca)
    return problems


def _check_ca(ca: str) -> list[str]:
    try:
        x509.load_pem_x509_certificates(resolve(ca).read_bytes())
    except (OSError, ValueError, TLSConfigError) as exc:
        return [f"{ca}: cannot read the CA bundle: {exc}"]
    return []
