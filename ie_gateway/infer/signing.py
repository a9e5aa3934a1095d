"""Who published a model package: OpenSSF Model Signing in key-pair mode, checked before parsing.

A package version is signed by its publisher with an elliptic-curve key (P-256): the signature
file ``model.sig`` beside ``model.yaml`` is a sigstore bundle whose DSSE envelope holds an in-toto
statement. The statement's subject is ``<name>@<version>`` and its predicate lists every package
file (``model.yaml`` and each file it names) with its sha256, so no file can be swapped, added,
renamed or replayed under another name or version. Signing and checking need no network: the
public keys a node trusts are pinned in gateway.yaml (``trusted_keys``).

The node checks a package in this order, and reads nothing of it as YAML, JSON, pickle or
tensor before the last step succeeds:

1. ``model.sig`` is at most :data:`MAX_SIGNATURE_BYTES`; its key hint (the sha256 of the
   signer's PEM public key) names a trusted key, else :class:`UntrustedPublisher`;
2. the envelope's signature verifies with that key, else :class:`SignatureInvalid`;
3. every file the statement lists has the signed sha256, and none is missing, else
   :class:`SignatureInvalid` naming the file (files the statement does not list are never read
   and never installed).

``model-signing`` (the OpenSSF library) builds and checks the bundle; its key-pair signer and
verifier are internal modules of the pinned release (1.1.1), used here because its public API
names the subject after the folder, not ``name@version``.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ie_gateway.errors import KeyExists, ModelError, PackageUnsigned, SignatureInvalid, UntrustedPublisher

if TYPE_CHECKING:  # model_signing (sigstore and its dependencies) is imported only to sign or verify
    from model_signing import hashing

    from ie_gateway.config import GatewayConfig

SIGNATURE_NAME = "model.sig"
MAX_SIGNATURE_BYTES = 4 * 2**20  # a statement lists file names and digests: kilobytes, not megabytes
# a signed file name: the package-path rule of model.yaml (no "..", no absolute path)
_SAFE_PATH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}(/[A-Za-z0-9][A-Za-z0-9._-]{0,63}){0,3}")
_BAD_BUNDLE = (ValueError, KeyError, TypeError, AttributeError, IndexError, InvalidSignature, UnicodeError)


@dataclass(frozen=True)
class TrustedKey:
    """A publisher the node trusts: its ``name`` (for logs and audit), its public key file and
    whether its MONAI bundles may run code beyond the documented allow-list."""

    name: str
    public_key: Path
    allow_code: bool = False
    key_id: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_id", key_id(self.public_key))


@dataclass(frozen=True)
class Statement:
    """What a trusted publisher signed: ``files`` maps each package path to its sha256."""

    name: str
    version: str
    files: dict[str, str]
    key: TrustedKey

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"


def trusted_keys(cfg: GatewayConfig) -> list[TrustedKey]:
    """The node's ``trusted_keys``, each key file read (``credential:NAME`` from the service's
    credentials folder); ModelError names a key that cannot be read."""
    from ie_gateway.ops.tls import resolve

    return [TrustedKey(k.name, resolve(k.public_key), k.allow_code) for k in cfg.trusted_keys]


def key_id(public_key: Path) -> str:
    """The sha256 of the key's PEM SubjectPublicKeyInfo: the hint model-signing puts in a bundle."""
    try:
        key = serialization.load_pem_public_key(public_key.read_bytes())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{public_key}: not a readable PEM public key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ModelError(f"{public_key}: not an elliptic-curve public key (model signing uses P-256)")
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def generate_key(private_path: Path, public_path: Path) -> str:
    """Write a new P-256 key pair (private key mode 0600, unencrypted PEM); return its key id.
    Raises KeyExists rather than overwrite a private key."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyExists(f"{private_path} exists: a key is never overwritten") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return key_id(public_path)


def sign_package(package_dir: Path, private_key: Path, name: str, version: str, files: Sequence[str]) -> Path:
    """Sign ``files`` (paths in ``package_dir``, ``model.yaml`` among them) as ``name@version``;
    write and return ``package_dir/model.sig``. For publishers: it reads the package's own files."""
    from model_signing import manifest as ms_manifest
    from model_signing._signing import sign_ec_key
    from model_signing._signing import signing as ms_signing

    hashed = _hashing().hash(package_dir, files_to_hash=[package_dir / f for f in files])
    named = ms_manifest.Manifest(
        f"{name}@{version}",
        (
            ms_manifest.FileManifestItem(path=pathlib.PurePosixPath(rd.identifier), digest=rd.digest)
            for rd in hashed.resource_descriptors()
        ),
        hashed._serialization_type,
    )
    try:
        signer = sign_ec_key.Signer(private_key)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"{private_key}: not an elliptic-curve private key in PEM: {exc}") from exc
    signature = signer.sign(ms_signing.Payload(named))
    path = package_dir / SIGNATURE_NAME
    signature.write(path)
    return path


def sign_model(package_dir: Path, private_key: Path) -> Path:
    """Sign a package as its own ``model.yaml`` describes it (name, version, the files it names);
    the publisher's side of :func:`verify_package`. Returns the signature's path."""
    from ie_gateway.infer.manifest import MANIFEST_NAME, load_manifest

    manifest = load_manifest(package_dir)
    files = [MANIFEST_NAME, *(f.file for f in (*manifest.folds, *manifest.files))]
    return sign_package(package_dir, private_key, manifest.name, manifest.version, files)


def read_statement(signature_path: Path, keys: Sequence[TrustedKey], where: str) -> Statement:
    """Steps 1-2 of the module doc: the signed statement, checked against the trusted ``keys``;
    no package file is read. ``where`` names the package in errors."""
    from model_signing._signing import sign_ec_key, sign_sigstore_pb

    try:
        size = signature_path.stat().st_size
    except FileNotFoundError:
        raise PackageUnsigned(f"{where} is not signed (no {SIGNATURE_NAME})") from None
    if size > MAX_SIGNATURE_BYTES:
        raise SignatureInvalid(f"{where}: {SIGNATURE_NAME} is {size} bytes, more than a signature can be")
    try:
        signature = sign_sigstore_pb.Signature.read(signature_path)
        public_key = signature.bundle.verification_material.public_key
        hint = public_key.hint if public_key is not None else None
    except _BAD_BUNDLE as exc:
        raise SignatureInvalid(f"{where}: {SIGNATURE_NAME} is not a model-signing bundle: {exc}") from exc
    key = next((k for k in keys if k.key_id == hint), None)
    if key is None:
        raise UntrustedPublisher(
            f"{where} is signed by a key this node does not trust (key id {str(hint)[:16]}…): "
            f"add its public key to trusted_keys only if you trust its publisher"
        )
    try:
        signed = sign_ec_key.Verifier(key.public_key).verify(signature)
    except _BAD_BUNDLE as exc:
        raise SignatureInvalid(
            f"{where}: the signature does not verify with trusted key {key.name!r}: the statement was "
            f"changed after signing"
        ) from exc
    name, _, version = signed.model_name.partition("@")
    files = {rd.identifier: rd.digest.digest_hex for rd in signed.resource_descriptors()}
    if not (name and version) or "model.yaml" not in files:
        raise SignatureInvalid(f"{where}: the signed statement names no name@version or no model.yaml")
    unsafe = sorted(f for f in files if not _SAFE_PATH.fullmatch(f))
    if unsafe:
        raise SignatureInvalid(f"{where}: the signed statement names unsafe paths: {unsafe[:3]}")
    return Statement(name, version, files, key)


def verify_package(package_dir: Path, keys: Sequence[TrustedKey], where: str | None = None) -> Statement:
    """All three steps of the module doc for the package in ``package_dir``; the statement."""
    where = where or str(package_dir)
    statement = read_statement(package_dir / SIGNATURE_NAME, keys, where)
    missing = sorted(f for f in statement.files if not (package_dir / f).is_file())
    if missing:
        raise SignatureInvalid(f"{where}: signed file(s) missing: {', '.join(missing)}")
    try:
        actual = _hashing().hash(package_dir, files_to_hash=[package_dir / f for f in statement.files])
    except (OSError, ValueError) as exc:  # a symbolic link, a folder where a file was signed
        raise SignatureInvalid(f"{where}: cannot hash the signed files: {exc}") from exc
    digests = {rd.identifier: rd.digest.digest_hex for rd in actual.resource_descriptors()}
    changed = sorted(f for f, sha in statement.files.items() if digests.get(f) != sha)
    if changed:
        raise SignatureInvalid(
            f"{where}: changed after signing by {statement.key.name!r}: {', '.join(changed)} "
            f"(sha256 differs from the signed statement)"
        )
    return statement


def _hashing() -> hashing.Config:
    from model_signing import hashing

    # every file named, nothing skipped silently (git files included), symbolic links refused
    return hashing.Config().set_ignored_paths(paths=[], ignore_git_paths=False)  # type: ignore[no-untyped-call]
