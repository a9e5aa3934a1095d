"""A throw-away PKI made with openssl for the TLS tests: a CA, certificates it signs, a stranger."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pair:
    key: Path
    cert: Path


def _run(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str = "test-ca") -> Pair:
    folder.mkdir(parents=True, exist_ok=True)
    ca = Pair(folder / f"{name}.key", folder / f"{name}.crt")
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca.key), "-out", str(ca.cert),
         "-days", "365", "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return ca


def issue(ca: Pair, folder: Path, name: str, days: int = 365) -> Pair:
    """A certificate for ``name`` (also valid for 127.0.0.1 and localhost) signed by ``ca``."""
    pair = Pair(folder / f"{name}.key", folder / f"{name}.crt")
    csr = folder / f"{name}.csr"
    ext = folder / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n")
    _run("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(pair.key), "-out", str(csr),
         "-subj", f"/CN={name}")
    _run("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
         "-out", str(pair.cert), "-days", str(days), "-extfile", str(ext))
    return pair


def expired_copy(pair: Pair, folder: Path) -> Path:
    """The same key's certificate, self-signed, that expired yesterday. (openssl 3.0's x509 cannot
    backdate a validity period, so cryptography writes this one.)"""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

    key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    assert isinstance(key, RSAPrivateKey)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "expired")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=10))
            .not_valid_after(now - dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    path = folder / "expired.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path
