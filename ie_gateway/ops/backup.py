"""`ie-gateway backup DIR` / `restore DIR`: the node's records, to rebuild it after a lost disk
or to roll back an upgrade.

A backup holds what cannot be made again: the index (a consistent copy through SQLite's backup
API, taken while the node runs; a PostgreSQL index is backed up with ``pg_dump`` by its DBA and
only named here), the model activation state, the pseudonym map, the anonymisation key, the
configuration files and the public keys of the trusted model publishers (``trusted_keys:``:
without them no installed model verifies; each goes back where the restored config names it).
It leaves out what can: the spool (received instances and results, purged
by retention anyway) and the model packages (immutable versions, re-imported or pulled by sync;
``manifest.json`` lists them with their checksums).

A backup restores only onto the version of ie-gateway that made it: an index migrated by a newer
version is refused by an older one, and a newer one migrates on start. Roll back by installing
the old version first, then restoring its backup.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from ie_gateway.config import GatewayConfig
from ie_gateway.errors import BackupError

MANIFEST = "manifest.json"
INDEX = "index.sqlite3"
PSEUDONYMS = "pseudonyms.sqlite3"
MODELS_STATE = "models-state.json"
KEY = "anon-key"
CONFIG = "config"
KEYS = "keys"


@dataclass(frozen=True)
class BackupInfo:
    """What manifest.json says about a backup."""

    version: str
    schema_version: int | None
    index: str
    files: list[str]
    models: list[str]


def backup(cfg: GatewayConfig, dest: Path, version: str, credentials: Path | None) -> BackupInfo:
    """Write a backup of the node ``cfg`` describes into the new or empty folder ``dest``."""
    if dest.exists() and any(dest.iterdir()):
        raise BackupError(f"{dest} is not empty: give a new folder for each backup")
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(dest, 0o700)  # it holds the key and the pseudonym map
    root = cfg.storage.root
    files: list[str] = []
    schema = None
    if cfg.storage.index == "sqlite" and (root / INDEX).is_file():
        _copy_sqlite(root / INDEX, dest / INDEX)
        schema = _schema_version(dest / INDEX)
        files.append(INDEX)
    if (root / PSEUDONYMS).is_file():
        _copy_sqlite(root / PSEUDONYMS, dest / PSEUDONYMS)
        files.append(PSEUDONYMS)
    if (root / MODELS_STATE).is_file():
        shutil.copy2(root / MODELS_STATE, dest / MODELS_STATE)
        files.append(MODELS_STATE)
    key = credentials / KEY if credentials is not None else None
    if key is not None and key.is_file():
        _write_private(dest / KEY, key.read_bytes())
        files.append(KEY)
    for path in _config_files(cfg):
        (dest / CONFIG).mkdir(exist_ok=True)
        shutil.copy2(path, dest / CONFIG / path.name)
        files.append(f"{CONFIG}/{path.name}")
    for name, path in _trusted_key_files(cfg, credentials).items():
        if path.is_file():
            (dest / KEYS).mkdir(exist_ok=True)
            shutil.copy2(path, dest / name)
            files.append(name)
    info = BackupInfo(
        version=version,
        schema_version=schema,
        index="sqlite" if cfg.storage.index == "sqlite" else "postgresql (not included: back it up with pg_dump)",
        files=files,
        models=_model_versions(cfg.models_dir),
    )
    manifest = {**info.__dict__, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return info


def read_backup(folder: Path) -> BackupInfo:
    """The manifest of a backup folder; BackupError when it is not one."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
        return BackupInfo(**{k: data[k] for k in ("version", "schema_version", "index", "files", "models")})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"{folder} is not an ie-gateway backup ({MANIFEST}: {exc})") from exc


def restore(folder: Path, config: Path, version: str, credentials: Path, force: bool = False) -> BackupInfo:
    """Put a backup back: config files beside ``config``, then the records under the storage
    root that config names, the key into ``credentials``. Refuses a backup of another version,
    and (without ``force``) to overwrite a node's existing records."""
    info = read_backup(folder)
    if info.version != version:
        raise BackupError(
            f"{folder} was made by ie-gateway {info.version}; this is {version}. Install {info.version} "
            f"(pip install -c constraints.txt ie-gateway=={info.version}), restore, then upgrade"
        )
    config_dir = config.parent
    config_dir.mkdir(parents=True, exist_ok=True)
    targets = [(folder / name, config_dir / Path(name).name) for name in info.files if name.startswith(f"{CONFIG}/")]
    _refuse_overwrite([t for _, t in targets], force)
    for source, target in targets:
        shutil.copy2(source, target)
    from ie_gateway.config import load_config

    cfg = load_config(config)
    root = cfg.storage.root
    records = [name for name in (INDEX, PSEUDONYMS, MODELS_STATE) if name in info.files]
    _refuse_overwrite([root / name for name in records], force)
    root.mkdir(parents=True, exist_ok=True)
    for name in records:
        for stale in (root / f"{name}-wal", root / f"{name}-shm"):
            stale.unlink(missing_ok=True)  # a WAL of the old file must not be replayed into the new
        shutil.copy2(folder / name, root / name)
    if KEY in info.files:
        credentials.mkdir(mode=0o700, parents=True, exist_ok=True)
        _refuse_overwrite([credentials / KEY], force, same=folder / KEY)
        _write_private(credentials / KEY, (folder / KEY).read_bytes())
    for name, target in _trusted_key_files(cfg, credentials).items():
        if name in info.files:
            _refuse_overwrite([target], force, same=folder / name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / name, target)
    return info


def _refuse_overwrite(paths: list[Path], force: bool, same: Path | None = None) -> None:
    if force:
        return
    clashes = [p for p in paths if p.exists() and not (same is not None and p.read_bytes() == same.read_bytes())]
    if clashes:
        raise BackupError(
            f"{', '.join(map(str, clashes))} exist: stop the node and give --force to replace them with the backup"
        )


def _copy_sqlite(source: Path, dest: Path) -> None:
    """A consistent copy of a live SQLite database (WAL included) through its backup API."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    try:
        out = sqlite3.connect(dest)
        try:
            src.backup(out)
        finally:
            out.close()
    except sqlite3.Error as exc:
        raise BackupError(f"{source} could not be copied: {exc}") from exc
    finally:
        src.close()
    os.chmod(dest, 0o600)


def _schema_version(path: Path) -> int | None:
    with sqlite3.connect(path) as conn:
        try:
            row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        except sqlite3.Error:
            return None
    return int(row[0]) if row and row[0] is not None else None


def _config_files(cfg: GatewayConfig) -> list[Path]:
    """gateway.yaml, its routing file and the destinations' names files."""
    files = [cfg.source, cfg.routing_file, *(d.names for d in cfg.destinations.values() if d.names is not None)]
    return list(dict.fromkeys(p for p in files if p.is_file()))


def _trusted_key_files(cfg: GatewayConfig, credentials: Path | None) -> dict[str, Path]:
    """Each trusted publisher's public key by its name in a backup (``keys/NAME``): the file the
    config names (resolved beside it), or for ``credential:FILE`` that file in ``credentials``."""
    found = {}
    for key in cfg.trusted_keys:
        if not key.public_key.startswith("credential:"):
            found[f"{KEYS}/{key.name}"] = Path(key.public_key)
        elif credentials is not None:
            found[f"{KEYS}/{key.name}"] = credentials / key.public_key.removeprefix("credential:")
    return found


def _model_versions(models_dir: Path) -> list[str]:
    """name@version sha256-of-model.yaml, for each installed version (to re-install the same)."""
    found = []
    for manifest in sorted(models_dir.glob("*/*/model.yaml")):
        digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
        found.append(f"{manifest.parent.parent.name}@{manifest.parent.name} model.yaml sha256 {digest}")
    return found


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, 0o600)
