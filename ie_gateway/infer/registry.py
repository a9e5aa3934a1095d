"""Installed model packages: versions, checksums, activation.

Layout: ``<models_dir>/<name>/<version>/`` holds ``model.yaml`` and the fold files it names
(other files there are ignored). A version is immutable once installed: importing different bytes
under it raises VersionImmutable, importing the same bytes again does nothing.

Activation state lives in one JSON file (``state_file``), rewritten atomically (temp file, fsync,
rename) under an exclusive ``flock`` on ``<state_file>.lock``, because the CLI and the worker are
separate processes::

    {"active":   {"<name>": "<version>"},
     "imported": {"<name>@<version>": "<UTC ISO time>"},
     "log":      [{"name", "version", "previous", "at", "by"}, ...]}   # every activation, in order

``resolve("name")`` returns the active version. When a name was never activated and exactly one
version is installed, that version is used (a fresh install with one shipped model works without a
manual step); with several versions and no activation it refuses, because picking one would be a
guess. ``resolve("name@version")`` pins a version. Nothing is returned that fails verification:
every package file's sha256 must match ``model.yaml``, and then the registry's ``probe`` must
accept it. The node's probe is :meth:`ie_gateway.infer.runner.InferenceRunner.verify`: the
inference child loads every fold with the package's own framework and maps a small patch to
``1 + len(structures)`` channels, under the inference time limit, so a bad or huge model cannot
stall the service process (which never runs torch for verification). Verification results are
cached per process by each file's (size, mtime, inode), so a job does not re-hash unchanged
files, but any rewrite is re-checked.

Every version must be signed by one of the node's trusted keys (:mod:`ie_gateway.infer.signing`),
and the signature is checked before ``model.yaml`` is read as YAML, at import and whenever an
installed version is loaded: what is installed is exactly the files the signed statement lists,
plus ``model.sig``. A version imported with ``allowed_unsigned_by`` (``models import
--allow-unsigned``) is recorded with who allowed it and is exempt while it has no signature.
The state file records who signed or allowed each version::

    {"signed":   {"<name>@<version>": "<trusted key name>"},
     "unsigned": {"<name>@<version>": {"by": "<who allowed it>", "at": "<UTC ISO time>"}},
     "refused":  {"<name>@<version>": {"reason": "<why the pull refused it>", "at": "<UTC ISO time>"}}}
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from ie_gateway.errors import (
    ChecksumMismatch,
    ManifestInvalid,
    ModelError,
    PackageMismatch,
    PackageUnsigned,
    SignatureInvalid,
    VersionImmutable,
)
from ie_gateway.files import fsync_dir, sha256_file
from ie_gateway.infer.bundle_policy import check_bundle
from ie_gateway.infer.manifest import MANIFEST_NAME, Manifest, MonaiSettings, load_manifest
from ie_gateway.infer.modelref import SAFE_NAME, parse_model_ref
from ie_gateway.infer.signing import SIGNATURE_NAME, Statement, TrustedKey, verify_package
from ie_gateway.vocab import ModelFormat

if TYPE_CHECKING:
    from ie_gateway.config import GatewayConfig

log = structlog.get_logger(__name__)

_STAGING_PREFIX = ".staging-"

FileSignature = tuple[tuple[str, int, int, int], ...]
TreeStamp = tuple[tuple[str, int, int, int], ...]


@dataclass(frozen=True)
class ModelVersion:
    """One installed (or offered) package; ``path`` is its folder."""

    name: str
    version: str
    path: Path
    manifest: Manifest
    allow_code: bool = False  # signed by a key with allow_code: true (MONAI configs unrestricted)

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    def fold_paths(self) -> list[Path]:
        return [self.path / fold.file for fold in self.manifest.folds]

    def package_files(self) -> list[Path]:
        """The files that make up the package: ``model.yaml``, the folds and the other files."""
        return [self.path / name for name in self.relative_files()]

    def relative_files(self) -> list[str]:
        """Package file paths relative to the package folder, ``model.yaml`` first."""
        return [MANIFEST_NAME, *(f.file for f in (*self.manifest.folds, *self.manifest.files))]


Probe = Callable[[ModelVersion], None]
"""Loads a package with its framework and runs a small patch; raises ModelError if it cannot."""


@dataclass(frozen=True)
class VersionInfo:
    """A row of ``models list``; ``problem`` says why a version does not verify."""

    name: str
    version: str
    active: bool
    verified: bool
    imported_at: str | None
    problem: str | None


@dataclass(frozen=True)
class ImportRecord:
    """Who vouched for an imported version: the trusted key that signed it, or the admin who
    allowed it unsigned."""

    name: str
    version: str
    at: str
    signed_by: str | None
    allowed_unsigned_by: str | None


@dataclass(frozen=True)
class Activation:
    """One entry of the activation log."""

    name: str
    version: str
    previous: str | None
    at: str
    by: str | None


def check_package(model: ModelVersion, probe: Probe | None = None) -> None:
    """Full check: checksums first (cheap, catches tampering), then ``probe`` (loads and runs)."""
    for entry in (*model.manifest.folds, *model.manifest.files):
        path = model.path / entry.file
        if not path.is_file():
            raise ModelError(f"{model.spec}: file {entry.file} is missing from {model.path}")
        actual = sha256_file(path)
        if actual != entry.sha256:
            raise ChecksumMismatch(
                f"{model.spec}: {entry.file} has sha256 {actual[:16]}…, model.yaml says "
                f"{entry.sha256[:16]}…; the file was altered or damaged: re-import the package"
            )
    if probe is not None:
        probe(model)


def probe_patch(patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """A small patch a fold accepts if it accepts ``patch``: each axis keeps its power-of-two
    factor up to 64, so every pooling level of a U-Net still divides it (48 → 16, 256 → 64)."""
    return math.gcd(patch[0], 64), math.gcd(patch[1], 64), math.gcd(patch[2], 64)


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order: digit runs compare as numbers, so 1.10 sorts after 1.9."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", version))


def _signature(files: list[Path]) -> FileSignature:
    out = []
    for path in files:
        st = path.stat()
        out.append((path.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Registry:
    """Model versions under ``models_dir`` and their activation state in ``state_file``.

    ``probe`` loads and runs a package after its checksums pass (the node passes its inference
    child's ``verify``); without one only checksums are verified. ``keys``: the publishers whose
    signatures are accepted (none: only versions allowed unsigned load).
    """

    def __init__(
        self, models_dir: Path, state_file: Path, probe: Probe | None = None, keys: Sequence[TrustedKey] = ()
    ) -> None:
        self.models_dir = models_dir
        self.state_file = state_file
        self.probe = probe
        self.keys = tuple(keys)
        self._verified: dict[Path, FileSignature] = {}
        #: the checks in progress, by package folder: a second caller waits for the first's
        self._checking: dict[Path, Future[None]] = {}
        self._checking_lock = threading.Lock()
        self._signed: dict[Path, tuple[TreeStamp, Statement]] = {}

    # -- queries ------------------------------------------------------------------------------

    def versions(self, name: str) -> builtins.list[str]:
        """Installed versions of ``name`` (folders with a model.yaml), "2" before "10"."""
        folder = self.models_dir / name
        if not folder.is_dir():
            return []
        return sorted(
            (p.name for p in folder.iterdir() if not p.name.startswith(".") and (p / MANIFEST_NAME).is_file()),
            key=_version_key,
        )

    def list(self) -> builtins.list[VersionInfo]:
        """Every installed version with its state; each is verified (cached) for ``verified``."""
        state = self._read_state()
        rows = []
        names = (
            sorted(p.name for p in self.models_dir.iterdir() if p.is_dir() and SAFE_NAME.fullmatch(p.name))
            if self.models_dir.is_dir()
            else []
        )
        for name in names:
            for version in self.versions(name):
                problem = None
                try:
                    self._verified_version(name, version)
                except ModelError as exc:
                    problem = str(exc)
                rows.append(
                    VersionInfo(
                        name=name,
                        version=version,
                        active=state["active"].get(name) == version,
                        verified=problem is None,
                        imported_at=state["imported"].get(f"{name}@{version}"),
                        problem=problem,
                    )
                )
        return rows

    def history(self, name: str | None = None) -> builtins.list[Activation]:
        """The activation log, oldest first, optionally for one model."""
        entries = [Activation(**e) for e in self._read_state()["log"]]
        return [e for e in entries if name is None or e.name == name]

    def imports(self) -> builtins.list[ImportRecord]:
        """Every imported version with the key that signed it or who allowed it unsigned."""
        state = self._read_state()
        rows = []
        for spec, at in state["imported"].items():
            name, _, version = spec.partition("@")
            allowed = state["unsigned"].get(spec)
            rows.append(ImportRecord(name, version, at, state["signed"].get(spec), allowed["by"] if allowed else None))
        return rows

    def refusals(self) -> dict[str, dict[str, str]]:
        """Published versions the last pulls refused: ``{"name@version": {"reason", "at"}}``."""
        refused: dict[str, dict[str, str]] = self._read_state()["refused"]
        return refused

    def record_refusal(self, name: str, version: str, reason: str) -> None:
        """Keep why a pull refused ``name@version`` for ``status`` and the page (until imported)."""
        with self._state() as state:
            state["refused"][f"{name}@{version}"] = {"reason": reason, "at": _now()}

    def active(self, name: str) -> str | None:
        active: dict[str, str] = self._read_state()["active"]
        return active.get(name)

    def active_versions(self) -> dict[str, str]:
        """Each model's active version that is installed, from the state alone: nothing is
        verified, so a metrics scrape never waits for models to load."""
        active: dict[str, str] = self._read_state()["active"]
        return {
            name: version
            for name, version in sorted(active.items())
            if (self.models_dir / name / version / MANIFEST_NAME).is_file()
        }

    # -- verification and resolution ----------------------------------------------------------

    def verify(self, name: str, version: str) -> ModelVersion:
        """Fully verify an installed version now (no cache); raise ChecksumMismatch / ModelError."""
        model = self._load(name, version)
        self._verified.pop(model.path, None)
        return self._verify_cached(model)

    def resolve(self, spec: str) -> ModelVersion:
        """``name`` → the active version (see module doc for the fallback); ``name@version`` → it.

        Raises ModelError when nothing suitable is installed or the files do not verify.
        """
        name, version = parse_model_ref(spec)
        if version is None:
            version = self._default_version(name)
        return self._verified_version(name, version)

    def _default_version(self, name: str) -> str:
        active = self.active(name)
        if active is not None:
            return active
        installed = self.versions(name)
        if len(installed) == 1:
            return installed[0]
        if not installed:
            raise ModelError(f"model {name!r} is not installed in {self.models_dir}")
        raise ModelError(
            f"model {name!r} has versions {', '.join(installed)} and none is active: "
            f"activate one (ie-gateway models activate) or pin NAME@VERSION in the rule"
        )

    def _verified_version(self, name: str, version: str) -> ModelVersion:
        return self._verify_cached(self._load(name, version))

    def _verify_cached(self, model: ModelVersion) -> ModelVersion:
        """``model`` once its files are verified: from the cache when they are unchanged, else
        checked now. Threads that ask for a version being checked wait for that one check and
        share its outcome (the route lane and the warm-up of an arriving series ask at once)."""
        while True:
            try:
                signature = _signature(model.package_files())
            except FileNotFoundError as exc:
                raise ModelError(f"{model.spec}: file {exc.filename} is missing") from exc
            if self._verified.get(model.path) == signature:
                return model
            with self._checking_lock:
                check = self._checking.get(model.path)
                mine = check is None
                if check is None:
                    check = self._checking[model.path] = Future()
            if not mine:
                check.result()  # its ModelError is this caller's too
                continue  # checked: see whether it was these files
            try:
                self._check(model, signature)
            except BaseException as exc:
                self._end_check(model.path, check, exc)
                raise
            self._end_check(model.path, check, None)
            return model

    def _check(self, model: ModelVersion, signature: FileSignature) -> None:
        started = time.monotonic()
        try:
            check_package(model, self.probe)
        except ModelError as exc:
            self._verified.pop(model.path, None)
            log.warning("model_verification_failed", model=model.spec, reason=str(exc))
            raise
        self._verified[model.path] = signature
        log.info("model_verified", model=model.spec, seconds=round(time.monotonic() - started, 3))

    def _end_check(self, path: Path, check: Future[None], error: BaseException | None) -> None:
        with self._checking_lock:
            self._checking.pop(path, None)
        if error is None:
            check.set_result(None)
        else:
            check.set_exception(error)

    def _load(self, name: str, version: str) -> ModelVersion:
        parse_model_ref(f"{name}@{version}")
        path = self.models_dir / name / version
        if not (path / MANIFEST_NAME).is_file():
            installed = ", ".join(self.versions(name)) or "none"
            raise ModelError(
                f"model {name}@{version} is not installed in {self.models_dir} "
                f"(installed versions of {name}: {installed})"
            )
        statement = self._publisher(path, name, version)
        manifest = load_manifest(path)
        if statement is not None:
            _signed_files_cover(statement, manifest, f"{name}@{version}")
        if (manifest.name, manifest.version) != (name, version):
            raise ModelError(
                f"{path / MANIFEST_NAME} declares {manifest.name}@{manifest.version} but lies in "
                f"the folder for {name}@{version}"
            )
        return ModelVersion(name, version, path, manifest, statement is not None and statement.key.allow_code)

    def _publisher(self, path: Path, name: str, version: str) -> Statement | None:
        """The signed statement of the version in ``path``, checked against the trusted keys
        before anything in it is parsed (cached by the folder's file stats); None for a version
        an admin allowed unsigned that still has no signature."""
        spec = f"{name}@{version}"
        if not (path / SIGNATURE_NAME).exists() and spec in self._read_state()["unsigned"]:
            return None
        stamp = _tree_stamp(path)
        cached = self._signed.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        self._signed.pop(path, None)
        statement = verify_package(path, self.keys, spec)
        if (statement.name, statement.version) != (name, version):
            raise SignatureInvalid(f"{path} holds a package signed as {statement.spec}, not {spec}")
        self._signed[path] = (stamp, statement)
        return statement

    # -- changes ------------------------------------------------------------------------------

    def import_version(self, src_dir: Path, *, allowed_unsigned_by: str | None = None) -> ModelVersion:
        """Verify the package in ``src_dir`` and install it as ``<name>/<version>`` atomically.

        The signature is checked first (PackageUnsigned, UntrustedPublisher, SignatureInvalid),
        before model.yaml is read; ``allowed_unsigned_by`` names the admin who accepts a package
        without one (recorded). Only the signed files and the signature are installed. Identical
        bytes already installed: a no-op returning the installed version. Different bytes under
        an installed version: VersionImmutable.
        """
        try:
            statement: Statement | None = verify_package(src_dir, self.keys)
        except PackageUnsigned:
            if allowed_unsigned_by is None:
                raise
            statement = None
        if statement is None:
            unsigned = load_manifest(src_dir)
            name, version = unsigned.name, unsigned.version
            files = ModelVersion(name, version, src_dir, unsigned).relative_files()
        else:
            name, version, files = statement.name, statement.version, [*statement.files, SIGNATURE_NAME]
        dest = self.models_dir / name / version
        if (dest / MANIFEST_NAME).is_file():
            return self._same_or_refuse(f"{name}@{version}", src_dir, files, dest)
        stage = dest.parent / f"{_STAGING_PREFIX}{version}-{uuid.uuid4().hex}"
        stage.mkdir(parents=True)
        try:
            for file in files:
                _copy_durably(src_dir / file, stage / file)
            staged = self._staged(stage, name, version, statement)
            check_package(staged, self.probe)
            try:
                stage.rename(dest)
            except OSError as exc:  # another import won the race: compare with its bytes
                if not (dest / MANIFEST_NAME).is_file():
                    raise ModelError(f"cannot install {staged.spec} into {dest}: {exc}") from exc
                return self._same_or_refuse(staged.spec, src_dir, files, dest)
        finally:
            if stage.exists():
                shutil.rmtree(stage)
        fsync_dir(dest.parent)
        self._record_import(staged.spec, statement, allowed_unsigned_by)
        log.info(
            "model_imported",
            model=staged.spec,
            folds=len(staged.manifest.folds),
            signed_by=statement.key.name if statement else None,
            allowed_unsigned_by=allowed_unsigned_by if statement is None else None,
        )
        return self._verified_version(name, version)

    def _staged(self, stage: Path, name: str, version: str, statement: Statement | None) -> ModelVersion:
        """The copy in ``stage``, its signature checked again (the source may have changed while
        it was copied), then its model.yaml read and held to the signed name, version and files."""
        if statement is not None:
            statement = verify_package(stage, self.keys, f"{name}@{version}")
        manifest = load_manifest(stage)
        if (manifest.name, manifest.version) != (name, version):
            raise SignatureInvalid(
                f"model.yaml declares {manifest.name}@{manifest.version} but the package is signed as {name}@{version}"
            )
        if statement is not None:
            _signed_files_cover(statement, manifest, f"{name}@{version}")
        model = ModelVersion(name, version, stage, manifest, statement is not None and statement.key.allow_code)
        check_code_policy(model)
        return model

    def _record_import(self, spec: str, statement: Statement | None, allowed_unsigned_by: str | None) -> None:
        with self._state() as state:
            state["imported"][spec] = _now()
            state["refused"].pop(spec, None)
            if statement is not None:
                state["signed"][spec] = statement.key.name
                state["unsigned"].pop(spec, None)
            else:
                state["unsigned"][spec] = {"by": allowed_unsigned_by, "at": _now()}

    def _same_or_refuse(self, spec: str, src_dir: Path, files: builtins.list[str], dest: Path) -> ModelVersion:
        # the files, not the signature: a second signature of the same bytes is the same version
        for name in (f for f in files if f != SIGNATURE_NAME):
            there, src = dest / name, src_dir / name
            if not there.is_file() or sha256_file(there) != sha256_file(src):
                raise VersionImmutable(
                    f"{spec} is already installed with different content ({name} "
                    f"differs); versions are immutable: publish it under a new version"
                )
        log.info("model_import_unchanged", model=spec)
        name, _, version = spec.partition("@")
        return self._verified_version(name, version)

    def activate(self, name: str, version: str, by: str | None = None) -> Activation:
        """Verify ``name@version`` and make it the active version; the change is logged."""
        self.verify(name, version)
        with self._state() as state:
            entry = Activation(name=name, version=version, previous=state["active"].get(name), at=_now(), by=by)
            state["active"][name] = version
            state["log"].append(entry.__dict__)
        log.info("model_activated", model=f"{name}@{version}", previous=entry.previous)
        return entry

    # -- state file ---------------------------------------------------------------------------

    def _read_state(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.state_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError) as exc:
            raise ModelError(f"model state file {self.state_file} is unreadable: {exc}") from exc
        for key, empty in (
            ("active", {}),
            ("imported", {}),
            ("log", []),
            ("signed", {}),
            ("unsigned", {}),
            ("refused", {}),
        ):
            data.setdefault(key, empty)
        return data

    @contextlib.contextmanager
    def _state(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write state under an exclusive lock; written only if the body succeeds."""
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.state_file.with_name(self.state_file.name + ".lock")
        with lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self._read_state()
            yield state
            tmp = self.state_file.with_name(f".{self.state_file.name}.{os.getpid()}.tmp")
            with tmp.open("w", encoding="utf-8") as fh:
                json.dump(state, fh, indent=2)
                fh.flush()
                os.fsync(fh.fileno())
            tmp.replace(self.state_file)
            fsync_dir(self.state_file.parent)


def check_code_policy(model: ModelVersion) -> None:
    """A MONAI bundle's config within the allow-list (:mod:`ie_gateway.infer.bundle_policy`),
    unless its publisher's key has ``allow_code``; CodeNotAllowed otherwise."""
    if model.manifest.format is not ModelFormat.MONAI_BUNDLE or model.allow_code:
        return
    settings = model.manifest.monai or MonaiSettings()
    check_bundle(model.path, [settings.config, settings.meta], model.spec)


def _signed_files_cover(statement: Statement, manifest: Manifest, spec: str) -> None:
    """Every file model.yaml names must be one the publisher signed."""
    unsigned = sorted(f.file for f in (*manifest.folds, *manifest.files) if f.file not in statement.files)
    if unsigned:
        raise SignatureInvalid(f"{spec}: model.yaml names files that are not signed: {', '.join(unsigned)}")


def _tree_stamp(path: Path) -> TreeStamp:
    """(relative path, size, mtime, inode) of every file under ``path``: any rewrite changes it."""
    out = []
    for folder, _, names in os.walk(path):
        for file in names:
            st = os.stat(os.path.join(folder, file), follow_symlinks=False)
            out.append((os.path.relpath(os.path.join(folder, file), path), st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(sorted(out))


def _copy_durably(src: Path, dst: Path) -> None:
    if not dst.parent.is_dir():
        dst.parent.mkdir(parents=True)
        fsync_dir(dst.parent.parent)
    shutil.copyfile(src, dst)
    with dst.open("rb") as fh:
        os.fsync(fh.fileno())
    dst.chmod(0o444)


def import_package(
    registry: Registry,
    package: Path,
    *,
    name: str | None = None,
    version: str | None = None,
    allow_unsigned_by: str | None = None,
) -> tuple[ModelVersion, Path | None]:
    """``models import``: install ``package``, a native one (with model.yaml) or an nnU-Net or
    MONAI folder described on the way as ``name@version``; ``name`` and ``version``, where given,
    must be what the package says. Nothing of an unsigned package is read unless
    ``allow_unsigned_by`` names the admin who accepts it (recorded). Returns the installed
    version and the model.yaml written for it (None when the package brought its own)."""
    from ie_gateway.infer.formats import describe_package
    from ie_gateway.infer.signing import read_statement

    manifest, written = package / MANIFEST_NAME, None
    if not manifest.is_file():
        if not (name and version):
            why = "give --name and --version (or write one first with `ie-gateway models describe`)"
            raise ManifestInvalid([f"{package} has no model.yaml: {why}"])
        if allow_unsigned_by is None:
            raise PackageUnsigned(
                f"{package} is not signed (no model.yaml, no model.sig): describe it with "
                f"`ie-gateway models describe`, sign it with `ie-gateway models sign`, or pass --allow-unsigned"
            )
        written = describe_package(package, name, version)
    elif (package / SIGNATURE_NAME).is_file():
        statement = read_statement(package / SIGNATURE_NAME, registry.keys, str(package))
        _same_name(manifest, (name, version), (statement.name, statement.version))
    elif allow_unsigned_by is not None:
        declared = load_manifest(package)
        _same_name(manifest, (name, version), (declared.name, declared.version))
    try:
        model = registry.import_version(package, allowed_unsigned_by=allow_unsigned_by)
    except PackageUnsigned as exc:
        raise PackageUnsigned(
            f"{exc}: sign it with `ie-gateway models sign PATH --key KEY` (a key in trusted_keys), "
            f"or pass --allow-unsigned to import it anyway (recorded)"
        ) from exc
    return model, written


def _same_name(manifest: Path, given: tuple[str | None, str | None], says: tuple[str, str]) -> None:
    for what, wanted, value in zip(("name", "version"), given, says, strict=True):
        if wanted is not None and wanted != value:
            raise PackageMismatch(f"{manifest} says {what} {value!r}, not {wanted!r}")


def registry_for(cfg: GatewayConfig, probe: Probe | None = None) -> Registry:
    """The model registry of a node: packages in models_dir, activation state beside the index,
    signatures checked against ``trusted_keys``; ``probe`` (an inference runner's ``verify``)
    loads and runs a package after its checksums."""
    from ie_gateway.infer.signing import trusted_keys

    return Registry(cfg.models_dir, cfg.storage.root / "models-state.json", probe, trusted_keys(cfg))
