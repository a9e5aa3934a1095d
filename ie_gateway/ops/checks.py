"""What `check-config` finds beyond the schema: the settings that break a site or expose it.

The schema (config.py) says whether gateway.yaml is well formed; these checks say whether it
is safe and workable on this machine: who can reach the node, whether the storage root and
the index can be written, whether the ports are free, whether each route can deliver what it
makes. Each returns :class:`Finding` lines; an error stops `check-config` (and so the unit,
which runs it before starting), a warning is printed and the node may run.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sqlite3
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from ie_gateway.config import Destination, GatewayConfig
from ie_gateway.errors import DeliveryError, GatewayError, StoreError
from ie_gateway.roinames import load_roi_names
from ie_gateway.route import RuleSet
from ie_gateway.store.space import disk_space

if TYPE_CHECKING:
    from ie_gateway.infer.registry import Registry


class Level(StrEnum):
    """How bad a finding is: an error stops the node from starting."""

    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class Finding:
    """One problem, as a line an admin can act on (it names the key and what to do)."""

    level: Level
    text: str


def _error(text: str) -> Finding:
    return Finding(Level.ERROR, text)


def _warning(text: str) -> Finding:
    return Finding(Level.WARNING, text)


def is_loopback(address: str) -> bool:
    """True for an address (or ``localhost``) only this machine can reach."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # a host name: it may resolve beyond loopback


def exposure(cfg: GatewayConfig) -> list[Finding]:
    """Who beyond this machine can reach the node.

    Bound beyond loopback, an AE title alone lets in anyone who types it (dcmtk's defaults are
    well known), so every caller needs a host pin, unless it must present a certificate the
    node's CA signed. The HTTP endpoint has no TLS of its own and carries the admin page.
    """
    found: list[Finding] = []
    node = cfg.node
    if not is_loopback(node.bind):
        by_certificate = node.tls is not None and node.tls.require_client_cert
        for index, caller in enumerate(node.allowed_callers):
            if caller.host is None and not (caller.require_tls and by_certificate):
                found.append(
                    _error(
                        f"node.allowed_callers[{index}] ({caller.ae_title}): no host, while node.bind "
                        f"{node.bind} is beyond loopback: anyone on the network could send as "
                        f"{caller.ae_title}; give its address (host: 10.x.y.z)"
                    )
                )
    if cfg.http.enabled and not is_loopback(cfg.http.bind):
        found.append(
            _error(
                f"http.bind {cfg.http.bind} is beyond loopback: the admin page and metrics would be "
                "served without TLS; keep 127.0.0.1 and publish them through a TLS reverse proxy"
            )
        )
    return found


def routes(cfg: GatewayConfig, rules: RuleSet) -> list[Finding]:
    """Routes that cannot deliver what they make, or ask for a sync that is off."""
    found: list[Finding] = []
    for rule in rules.rules:
        route = rule.route
        where = f"{cfg.routing_file}: rules.{rule.name}"
        for dest_name in route.send_to:
            accepts = set(cfg.destinations[dest_name].accepts)
            if not accepts & set(route.outputs):
                found.append(
                    _error(
                        f"{where}: sends {', '.join(route.outputs)} to {dest_name}, which accepts only "
                        f"{', '.join(sorted(accepts))}: nothing would reach it"
                    )
                )
        taken = {o for d in route.send_to for o in cfg.destinations[d].accepts}
        for output in route.outputs:
            if output not in taken:
                found.append(_warning(f"{where}: makes {output} but none of {', '.join(route.send_to)} accepts it"))
        if route.sync and not cfg.sync.enabled:
            found.append(_warning(f"{where}: sync: true, but sync.enabled is false: its cases are never uploaded"))
    return found


def storage(cfg: GatewayConfig) -> list[Finding]:
    """The storage root exists, can be written, and has room above the reserve."""
    root = cfg.storage.root
    if not root.exists():
        parent = next(p for p in root.parents if p.exists())
        if os.access(parent, os.W_OK | os.X_OK):
            return [_warning(f"storage.root {root} does not exist yet: the node creates it")]
        return [
            _error(f"storage.root {root} does not exist and {parent} cannot be written (is the data disk mounted?)")
        ]
    if not root.is_dir():
        return [_error(f"storage.root {root} is not a folder")]
    try:
        with tempfile.NamedTemporaryFile(dir=root, prefix=".check-config-"):
            pass
    except OSError as exc:
        return [_error(f"storage.root {root} cannot be written by user {_user()}: {exc.strerror}")]
    space = disk_space(root, cfg.storage.reserve)
    if space.below_reserve:
        return [
            _error(
                f"storage.root {root}: {space.free_bytes // 2**20} MiB free, below the reserve of "
                f"{space.reserve_bytes // 2**20} MiB: the node would refuse every association"
            )
        ]
    return []


def index(cfg: GatewayConfig) -> list[Finding]:
    """The index answers (PostgreSQL) or, for SQLite, an existing file can be read.

    Nothing is created here: check-config may run as root, and a file it made would then be
    root's, not the service's.
    """
    if cfg.storage.index == "sqlite":
        path = cfg.storage.root / "index.sqlite3"
        if not path.exists():
            return []
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as conn:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            return [_error(f"storage.index: {path} cannot be read: {exc}")]
        return []
    from ie_gateway.store.db import open_database

    db = open_database(cfg.storage.index, cfg.storage.root)
    try:
        db.query("SELECT 1")
    except StoreError as exc:
        return [_error(f"storage.index: {db.where}: {exc}")]
    finally:
        db.close()
    return []


def ports(cfg: GatewayConfig) -> list[Finding]:
    """Two listeners of this config on one port (an error), or a port another process holds
    (a warning: it may be this node, already running)."""
    wanted = [("node.port", cfg.node.bind, cfg.node.port)]
    if cfg.node.tls is not None:
        wanted.append(("node.tls.port", cfg.node.bind, cfg.node.tls.port))
    if cfg.http.enabled and cfg.http.port:
        wanted.append(("http.port", cfg.http.bind, cfg.http.port))
    found: list[Finding] = []
    seen: dict[int, str] = {}
    for key, bind, port in wanted:
        if port in seen:
            found.append(_error(f"{key} {port} is also {seen[port]}: give each listener its own port"))
            continue
        seen[port] = key
        if _in_use(bind, port):
            found.append(_warning(f"{key} {port} is in use on {bind} (by this node, already running?)"))
    return found


def _in_use(bind: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((bind, port))
        except OSError:
            return True
    return False


@dataclass(frozen=True)
class EchoResult:
    """One destination's answer to a C-ECHO."""

    destination: str
    ok: bool
    detail: str


def echo(cfg: GatewayConfig) -> list[EchoResult]:
    """Ask every destination as the node would call it: a C-ECHO to a DICOM AE (its calling AE
    title, TLS, timeouts), a QIDO-RS search to a DICOMweb service (its URL, credentials and
    timeout), which a service answers only when it is reachable and takes the credentials."""
    return [
        _ask_dicomweb(name, dest) if dest.protocol == "dicomweb" else _c_echo(name, dest, cfg.delivery.calling_ae)
        for name, dest in cfg.destinations.items()
    ]


def _c_echo(name: str, dest: Destination, calling_ae: str) -> EchoResult:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from ie_gateway import reactor
    from ie_gateway.ops import tls
    from ie_gateway.send import PROPOSED_SYNTAXES

    ae = AE(ae_title=calling_ae)
    for syntax in PROPOSED_SYNTAXES:  # as deliveries propose them (the conformance statement says so)
        ae.add_requested_context(Verification, syntax)
    ae.connection_timeout = ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = dest.connect_timeout_s
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    assoc = reactor.associate(ae, dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls.associate_args(dest))
    if not assoc.is_established:
        why = "association rejected (is our AE title known to it?)" if assoc.is_rejected else "not reachable"
        return EchoResult(name, False, f"{where}: {why}")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = int(status.Status) if "Status" in status else None
    ok = code == 0
    return EchoResult(name, ok, f"{where}: " + ("echo ok" if ok else f"echo answered {code}"))


def _ask_dicomweb(name: str, dest: Destination) -> EchoResult:
    """GET {url}/studies?limit=1 (QIDO-RS) with the destination's session: 2xx is ok."""
    import requests
    from azure.core.exceptions import ClientAuthenticationError

    from ie_gateway.interop.dicomweb import session_for

    url = f"{str(dest.url).rstrip('/')}/studies"
    try:
        with session_for(dest, dest.connect_timeout_s) as session:
            answer = session.get(url, params={"limit": "1"}, headers={"Accept": "application/dicom+json"})
    except (DeliveryError, ClientAuthenticationError) as exc:
        return EchoResult(name, False, f"{dest.url}: no credentials: {exc}")
    except requests.RequestException as exc:
        return EchoResult(name, False, f"{dest.url}: not reachable ({type(exc).__name__})")
    ok = 200 <= answer.status_code < 300
    detail = "QIDO-RS ok" if ok else f"QIDO-RS answered HTTP {answer.status_code} {answer.reason}".rstrip()
    return EchoResult(name, ok, f"{dest.url}: {detail}")


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def site_findings(cfg: GatewayConfig, rules: RuleSet) -> list[Finding]:
    """Every check of this module, in the order an admin would fix them."""
    return [*exposure(cfg), *storage(cfg), *index(cfg), *ports(cfg), *routes(cfg, rules)]


def split(findings: Iterable[Finding]) -> tuple[list[str], list[str]]:
    """(errors, warnings) as lines."""
    found = list(findings)
    return (
        [f.text for f in found if f.level is Level.ERROR],
        [f.text for f in found if f.level is Level.WARNING],
    )


def rule_roi_name_problems(cfg: GatewayConfig, rules: RuleSet, registry: Registry) -> list[str]:
    """ROI names a rule would send that are longer than the destination takes.

    Names a destination's names file sets are checked when the config loads; this covers the
    model's own names that reach a destination unmapped (`check-config` reports them).
    """
    problems = []
    for rule in rules.rules:
        route = rule.route
        try:
            model = registry.resolve(f"{route.model}@{route.version}" if route.version else route.model)
        except GatewayError:
            continue  # routing reports an unusable model itself, when a series is routed
        names = [s.name for s in model.manifest.structures]
        for dest_name in route.send_to:
            dest = cfg.destinations[dest_name]
            mapped = load_roi_names(dest.names, dest.max_roi_name) if dest.names is not None else None
            for name in (mapped.local_name(n) if mapped else n for n in names):
                if name is None:
                    continue
                if len(name) > dest.max_roi_name:
                    problems.append(
                        f"{cfg.routing_file}: rules.{rule.name}: {model.spec} sends ROI {name!r} "
                        f"({len(name)} characters) to {dest_name}, whose max_roi_name is "
                        f"{dest.max_roi_name}: map it in {dest_name}'s names file"
                    )
    return problems
