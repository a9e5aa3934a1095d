"""The validated settings of a node: `gateway.yaml`, loaded once and passed in explicitly.

Relative paths resolve against the folder of the YAML file, so a config folder can be moved
as a whole. Secrets (Azure credentials, the anonymisation key) never live here: they come from
the environment or systemd credentials.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator

from ie_gateway.errors import ConfigError
from ie_gateway.roinames import load_roi_names
from ie_gateway.vocab import (
    ActivationPolicy,
    DateMode,
    Device,
    NotifyEvent,
    OutputKind,
    PeerAuth,
    PeerProtocol,
    Priority,
)
from ie_gateway.yamlfile import StrictModel, load_model

AE_TITLE = re.compile(r"^[\x21-\x5b\x5d-\x7e]([\x20-\x5b\x5d-\x7e]{0,14}[\x21-\x5b\x5d-\x7e])?$")


def _ae_title(value: str) -> str:
    if not AE_TITLE.match(value):
        raise ValueError(f"{value!r} is not an AE title (1-16 printable characters, no backslash)")
    return value


class Caller(StrictModel):
    """A peer allowed to associate: its calling AE title and, optionally, its address."""

    ae_title: str
    host: str | None = None
    require_tls: bool = Field(False, description="refuse this caller on the plain (unencrypted) port")
    # low: a source whose series may wait (a commissioning run, a retrieve of old studies);
    # each of its jobs is low whatever its rule says
    priority: Priority = Priority.NORMAL

    _check_ae = field_validator("ae_title")(_ae_title)

    @field_validator("priority")
    @classmethod
    def _not_high(cls, value: Priority) -> Priority:
        if value is Priority.HIGH:
            raise ValueError("a caller is normal or low; high is for a routing rule")
        return value

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str | None) -> str | None:
        if value is not None:
            ipaddress.ip_address(value)
        return value


class NodeTLS(StrictModel):
    """The DICOM TLS listener (PS3.15 Annex B). Paths name files, or ``credential:NAME`` for a
    systemd credential; the key never goes inline in YAML."""

    port: int = Field(2762, ge=1, le=65535)
    cert: str
    key: str
    ca: str | None = Field(None, description="verify callers' certificates against this CA bundle")
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _ca_for_clients(self) -> NodeTLS:
        if self.require_client_cert and self.ca is None:
            raise ValueError("require_client_cert needs ca: the CA that signs callers' certificates")
        return self


class Node(StrictModel):
    """The DICOM listener."""

    ae_title: str = "IE_GATEWAY"
    bind: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    allowed_callers: list[Caller] = []
    max_associations: int = Field(8, ge=1, description="concurrent associations before refusal")
    network_timeout_s: float = Field(60, gt=0)
    acse_timeout_s: float = Field(
        5, gt=0, description="a connection that has not asked for an association by then is dropped and holds no slot"
    )
    tls: NodeTLS | None = None
    max_pdu_kb: int = Field(
        256, ge=4, le=16384, description="largest PDU the node receives: what one read of a peer may hold"
    )
    listener_processes: int = Field(
        1,
        ge=1,
        le=64,
        description="processes that accept associations from the same ports (the least busy takes each); "
        "the limits are per process",
    )

    _check_ae = field_validator("ae_title")(_ae_title)


class Reserve(StrictModel):
    """Free space kept under storage.root: the larger of the two is the floor."""

    percent: float = Field(5, ge=0, lt=100)
    gb: float = Field(1, ge=0)


class Storage(StrictModel):
    """Where the spool, the index and the results live.

    ``index``: ``sqlite`` (a file under ``root``; one node) or a ``postgresql://user@host/db``
    URL that several nodes share, with ``root`` a mount they all see. The password is not
    written here: libpq reads ``PGPASSWORD`` or a ``PGPASSFILE``.
    """

    root: Path
    index: str = "sqlite"
    reserve: Reserve = Reserve()

    @field_validator("index")
    @classmethod
    def _index(cls, value: str) -> str:
        if value == "sqlite":
            return value
        url = urlsplit(value)
        if url.scheme not in ("postgresql", "postgres") or not url.hostname or not url.path.strip("/"):
            raise ValueError("must be 'sqlite' or postgresql://user@host[:port]/database")
        if url.password:
            raise ValueError("holds a password: give it in PGPASSWORD or a PGPASSFILE, never in the YAML")
        return value


class WorkerSettings(StrictModel):
    """How a worker holds the jobs it works on (several workers may share one index)."""

    lease_s: float = Field(30, ge=5)  # renewed every third of it; a dead worker's job is free after it
    max_crashes: int = Field(
        2, ge=1, description="a job whose stage killed the node (or its inference process) this often fails"
    )
    retry_base_s: float = Field(10, gt=0, description="first wait after a transient failure (full disk, index)")
    retry_cap_s: float = Field(900, gt=0, description="longest wait between two retries")
    max_retries: int = Field(20, ge=1, description="transient failures of one stage before the job fails")
    # aging: a job waiting longer than this since its series completed is taken before any
    # newer job, whatever the priorities, so low-priority work is never starved
    max_wait_s: float = Field(3600, gt=0)
    # lanes: the inference child, the volume preparation and the writing of results run side by
    # side, each on a different job (False: one stage of one job at a time)
    pipeline: bool = True
    prepare_ahead: int = Field(
        1, ge=1, le=8, description="volumes prepared ahead of the inference lane (each a CT on disk)"
    )


class SeriesSettings(StrictModel):
    """When a series counts as complete."""

    stable_after_s: float = Field(10, gt=0)
    sweep_every_s: float = Field(1.0, gt=0)


class VolumeSettings(StrictModel):
    """Geometry checks a series must pass before it reaches a model."""

    spacing_tolerance_mm: float = Field(0.05, gt=0)
    min_slices: int = Field(20, ge=1)
    max_tilt_deg: float = Field(0.5, ge=0)


class Limits(StrictModel):
    """What a peer's headers may make the node spend: checked on the headers at receive and
    again before a volume is allocated. The defaults fit clinical planning CT."""

    max_rows: int = Field(1024, ge=1)
    max_columns: int = Field(1024, ge=1)
    max_slices: int = Field(2000, ge=1)
    max_instance_mb: int = Field(1024, ge=1)
    max_series_gb: int = Field(8, ge=1)


class InferenceSettings(StrictModel):
    """Where and how long inference may run."""

    device: Device = Device.AUTO
    timeout_s: float = Field(900, gt=0)
    memory_gb: float | None = Field(
        32, gt=0, description="address-space limit (RLIMIT_AS) of the inference child on the CPU; null: none"
    )
    cpu_on_oom: bool = Field(True, description="a job that runs CUDA out of memory is run once on the CPU")
    confine_files: bool = Field(
        True,
        description="Landlock: the inference child opens only the system, Python, the models and its exchange folder",
    )


class DestinationTLS(StrictModel):
    """DICOM TLS towards a destination: the CA that signs its certificate, and ours if it asks."""

    ca: str | None = None  # None: the system's trust store
    cert: str | None = None
    key: str | None = None
    check_hostname: bool = True


class Destination(StrictModel):
    """A peer results are sent to (a TPS, a PACS).

    ``accepts``: the outputs it takes (many planning systems take RT-STRUCT but not SEG); a
    route's other outputs are not sent there. ``connect_timeout_s`` bounds the TCP connect and
    the wait for the association's answer, so a hanging peer fails its attempt instead of
    holding it. ``names``: a file of the department's ROI names (rename, recolour, leave out);
    ``max_roi_name``: the longest ROI name the peer takes, checked against that file on load.
    ``labelmap``: the peer takes Label Map Segmentation Storage (Supplement 243) in RLE Lossless;
    a route's ``seg_encoding: labelmap`` sends it a LABELMAP SEG, every other one a BINARY SEG.

    ``protocol: dicomweb``: the peer is a DICOMweb service (STOW-RS) at ``url`` instead of a
    DICOM AE (``ae_title``, ``host``, ``port``); ``auth`` is ``none``, ``basic`` (``username``,
    and the password in the environment variable or systemd credential ``password``) or
    ``azure`` (a Microsoft Entra token for Azure's DICOM service, from azure-identity).
    """

    protocol: PeerProtocol = PeerProtocol.DIMSE
    ae_title: str = ""
    host: str = ""
    port: int = Field(104, ge=1, le=65535)
    url: str | None = None
    auth: PeerAuth = PeerAuth.NONE
    username: str | None = None
    password: str | None = Field(None, description="env:NAME or credential:NAME, never the password itself")
    accepts: list[OutputKind] = Field([OutputKind.RTSTRUCT, OutputKind.SEG], min_length=1)
    connect_timeout_s: float = Field(10, gt=0)
    names: Path | None = None
    max_roi_name: int = Field(64, ge=1, le=64, description="ROI Name is a LO: at most 64 characters")
    tls: DestinationTLS | None = None
    labelmap: bool = False
    commitment: bool = Field(False, description="delivered only once the peer commits each file (N-ACTION)")
    commitment_wait_s: float = Field(2, ge=0, description="how long a report is awaited on the sending association")
    commitment_timeout_s: float = Field(600, gt=0, description="no report by then: the file is sent again")

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, value: str) -> str:
        return _ae_title(value) if value else value

    @model_validator(mode="after")
    def _protocol_keys(self) -> Destination:
        if self.protocol is PeerProtocol.DIMSE:
            missing = [k for k in ("ae_title", "host", "port") if k not in self.model_fields_set]
            if missing:
                raise ValueError(f"a DICOM destination needs {', '.join(missing)}")
            if self.url is not None:
                raise ValueError("url is for protocol: dicomweb")
            return self
        if self.url is None or urlsplit(self.url).scheme not in ("http", "https"):
            raise ValueError("protocol: dicomweb needs url: the service's http(s) DICOMweb base URL")
        if self.commitment:
            raise ValueError("commitment is a DICOM (DIMSE) service; a DICOMweb destination cannot ask for it")
        if self.auth is PeerAuth.BASIC and (self.username is None or self.password is None):
            raise ValueError("auth: basic needs username and password (env:NAME or credential:NAME)")
        if self.password is not None and not self.password.startswith(("env:", "credential:")):
            raise ValueError("password must name env:VARIABLE or credential:NAME, never hold the password")
        return self


class StowCaller(StrictModel):
    """Who may upload by STOW-RS: a name (the calling AE its series get, for routing) and a
    bearer token read from ``env:NAME`` or ``credential:NAME``, never written here."""

    name: str
    token: str

    _check_name = field_validator("name")(_ae_title)

    @field_validator("token")
    @classmethod
    def _token_ref(cls, value: str) -> str:
        if not value.startswith(("env:", "credential:")):
            raise ValueError("must name env:VARIABLE or credential:NAME, never hold the token")
        return value


class HttpSettings(StrictModel):
    """The health, metrics and admin HTTP endpoint."""

    enabled: bool = True
    bind: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)  # 0: any free port (tests)
    # the admin page's sign-in (ie_gateway.web.auth): with named accounts or a proxy's user
    # header, read-only pages need a sign-in too unless open_pages
    open_pages: bool = False
    session_idle_min: float = Field(30, gt=0)  # a session unused this long ends
    session_max_h: float = Field(12, gt=0)  # and every session ends this long after sign-in
    user_header: str | None = None  # e.g. X-Remote-User, set by an authenticating reverse proxy
    trusted_proxies: list[str] = ["127.0.0.1"]  # the only peers whose user_header counts

    public_url: str | None = Field(
        None, description="the address people open the admin page at (behind a proxy); notifications link to it"
    )

    stow_callers: list[StowCaller] = Field([], description="who may POST /dicomweb/studies (STOW-RS)")
    stow_max_mb: float = Field(2048, gt=0, description="largest STOW-RS request body")

    def page_url(self) -> str:
        """Base address of the admin page, for links sent out of the node."""
        return (self.public_url or f"http://{self.bind}:{self.port}").rstrip("/")


class DeliverySettings(StrictModel):
    """Retry policy of the outbox: exponential backoff with jitter, then dead-letter."""

    base_s: float = Field(5, gt=0)
    cap_s: float = Field(600, gt=0)
    max_attempts: int = Field(20, ge=1)
    max_age_s: float = Field(2 * 24 * 3600, gt=0)
    calling_ae: str = "IE_GATEWAY"
    every_s: float = Field(2.0, gt=0, description="how often the outbox looks for due rows")


class RetentionSettings(StrictModel):
    """How long finished work stays in the spool."""

    unrouted_days: float = Field(7, ge=0)
    finished_days: float = Field(30, ge=0)


class SyncSettings(StrictModel):
    """The Azure loop; credentials come from the environment, never from here."""

    enabled: bool = False
    account_url: str | None = None
    authority_host: str | None = None
    api_version: str | None = None  # Azure Stack Hub storage serves older REST versions only
    container: str = "ie-gateway"
    cases_cron: str = "0 2 * * *"
    models_cron: str = "15 * * * *"
    date_shift: DateMode = DateMode.SHIFT
    activation: dict[str, ActivationPolicy] = {}
    max_model_mb: int = Field(
        4096,
        ge=1,
        description="most a pulled model version's files may hold together: a blob swapped for a huge one is "
        "refused before it fills the spool's disk",
    )

    @field_validator("cases_cron", "models_cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        from apscheduler.triggers.cron import CronTrigger

        CronTrigger.from_crontab(value)  # raises ValueError naming the bad field
        return value


class AgreementSettings(StrictModel):
    """Agreement of the AI's contours with the clinicians' approved ones, and the drift alarm.

    A structure's alarm is raised when the median Dice of its version's last ``window`` cases
    falls more than ``margin`` below the version's baseline: ``baseline_dice`` in model.yaml, else
    the median of its first ``window`` cases (then the alarm needs ``2 * window`` cases).
    """

    tolerance_mm: float = Field(2.0, gt=0, description="surface Dice tolerance")
    window: int = Field(10, ge=1)
    margin: float = Field(0.05, ge=0, le=1)
    max_contours: int = Field(20000, ge=1, description="an approved set with more contours gets no figures")
    max_points: int = Field(5_000_000, ge=1, description="an approved set with more contour points gets no figures")
    timeout_s: float = Field(
        120, gt=0, description="one approved set's comparison is given up after this (checked between structures)"
    )


class ApprovalSettings(StrictModel):
    """Whose APPROVED structure sets count as the clinicians' truth (linked to the CT job, measured,
    uploaded for retraining): the calling AE titles of the planning systems. A set from any other
    caller is stored but not linked, with the reason; none is accepted while the list is empty.
    The caller's address is pinned by its ``node.allowed_callers`` entry."""

    accept_from: list[str] = []

    @field_validator("accept_from")
    @classmethod
    def _titles(cls, values: list[str]) -> list[str]:
        return [_ae_title(v) for v in values]


class TrustedKeySetting(StrictModel):
    """A model publisher the node trusts: a package must be signed by one of these keys.

    ``public_key``: a PEM file (relative to this file) or ``credential:NAME`` (a systemd
    credential). ``allow_code``: this publisher's MONAI bundles may use ``_target_`` and ``$``
    expressions beyond the documented allow-list (see ie_gateway.infer.bundle_policy).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    public_key: str = Field(min_length=1)
    allow_code: bool = False


class Source(StrictModel):
    """A PACS the node may fetch studies from (``ie-gateway fetch``): C-MOVE to the node itself,
    or, with ``protocol: dicomweb``, QIDO-RS and WADO-RS from ``url`` (``auth`` as for a
    DICOMweb destination)."""

    protocol: PeerProtocol = PeerProtocol.DIMSE
    ae_title: str = ""
    host: str = ""
    port: int = Field(104, ge=1, le=65535)
    retrieve: Literal["c-move"] = "c-move"
    connect_timeout_s: float = Field(10, gt=0)
    move_timeout_s: float = Field(600, gt=0, description="the longest wait for the source's next answer")
    url: str | None = None
    auth: PeerAuth = PeerAuth.NONE
    username: str | None = None
    password: str | None = Field(None, description="env:NAME or credential:NAME, never the password itself")

    @field_validator("ae_title")
    @classmethod
    def _check_ae(cls, value: str) -> str:
        return _ae_title(value) if value else value

    @model_validator(mode="after")
    def _protocol_keys(self) -> Source:
        if self.protocol is PeerProtocol.DIMSE:
            missing = [k for k in ("ae_title", "host", "port") if k not in self.model_fields_set]
            if missing:
                raise ValueError(f"a DICOM source needs {', '.join(missing)}")
            return self
        if self.url is None or urlsplit(self.url).scheme not in ("http", "https"):
            raise ValueError("protocol: dicomweb needs url: the service's http(s) DICOMweb base URL")
        if self.password is not None and not self.password.startswith(("env:", "credential:")):
            raise ValueError("password must name env:VARIABLE or credential:NAME, never hold the password")
        return self


class Webhook(StrictModel):
    """Where the node POSTs a JSON event (no patient data) when a job needs review, fails or is
    delivered, or a model version drifts: a department's chat or ticketing system."""

    url: str
    on: list[NotifyEvent] = Field(min_length=1)
    timeout_s: float = Field(10, gt=0, description="connect and answer, per attempt")
    max_attempts: int = Field(8, ge=1, description="then the event is logged as not told and skipped")
    backoff_s: float = Field(2, gt=0, description="first wait between attempts; doubles, capped at 5 min")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        url = urlsplit(value)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("must be an http:// or https:// URL")
        if url.password:
            raise ValueError("holds a password: secrets never go in the YAML")
        return value


class GatewayConfig(StrictModel):
    """The whole of `gateway.yaml`."""

    node: Node = Node()
    storage: Storage
    series: SeriesSettings = SeriesSettings()
    routing_file: Path
    models_dir: Path
    destinations: dict[str, Destination] = {}
    volume: VolumeSettings = VolumeSettings()
    limits: Limits = Limits()
    inference: InferenceSettings = InferenceSettings()
    worker: WorkerSettings = WorkerSettings()
    delivery: DeliverySettings = DeliverySettings()
    retention: RetentionSettings = RetentionSettings()
    sync: SyncSettings = SyncSettings()
    http: HttpSettings = HttpSettings()
    agreement: AgreementSettings = AgreementSettings()
    approvals: ApprovalSettings = ApprovalSettings()
    notify: list[Webhook] = []
    sources: dict[str, Source] = {}
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    trusted_keys: list[TrustedKeySetting] = []
    source: Path = Field(Path("gateway.yaml"), exclude=True)

    @field_validator("storage", "routing_file", "models_dir", "destinations", mode="before")
    @classmethod
    def _relative_to_file(cls, value: object, info: ValidationInfo) -> object:
        base = (info.context or {}).get("base")
        if base is None:
            return value
        if info.field_name == "storage" and isinstance(value, dict) and "root" in value:
            return {**value, "root": str(base / Path(str(value["root"])))}
        if info.field_name == "destinations":
            return _destination_files(value, base)
        if isinstance(value, str):
            return str(base / Path(value))
        return value

    @field_validator("trusted_keys", mode="before")
    @classmethod
    def _key_files_relative(cls, value: object, info: ValidationInfo) -> object:
        if value is None:  # every entry commented out: nobody is trusted
            return []
        base = (info.context or {}).get("base")
        if base is None or not isinstance(value, list):
            return value
        return [
            {**key, "public_key": str(base / Path(key["public_key"]))}
            if isinstance(key, dict)
            and isinstance(key.get("public_key"), str)
            and not key["public_key"].startswith("credential:")
            else key
            for key in value
        ]

    @field_validator("trusted_keys")
    @classmethod
    def _key_names_unique(cls, value: list[TrustedKeySetting]) -> list[TrustedKeySetting]:
        names = [k.name for k in value]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"trusted key names must be unique; repeated: {', '.join(repeated)}")
        return value

    @model_validator(mode="after")
    def _names_unique(self) -> GatewayConfig:
        titles = [c.ae_title for c in self.node.allowed_callers]
        dupes = sorted({t for t in titles if titles.count(t) > 1 and not _distinct_hosts(self, t)})
        if dupes:
            raise ValueError(f"allowed_callers lists {', '.join(dupes)} twice with the same host")
        return self


def _destination_files(value: object, base: Path) -> object:
    """Destinations with their `names` file resolved against the config's folder."""
    if not isinstance(value, dict):
        return value
    return {
        name: {**dest, "names": str(base / Path(str(dest["names"])))}
        if isinstance(dest, dict) and isinstance(dest.get("names"), str)
        else dest
        for name, dest in value.items()
    }


def _distinct_hosts(cfg: GatewayConfig, title: str) -> bool:
    hosts = [c.host for c in cfg.node.allowed_callers if c.ae_title == title]
    return len(set(hosts)) == len(hosts)


def load_config(path: Path) -> GatewayConfig:
    """Load and validate `gateway.yaml`; raise ConfigError with `file:line: key: why` lines."""
    path = path.resolve()
    cfg = load_model(path, GatewayConfig, context={"base": path.parent})
    cfg = cfg.model_copy(update={"source": path})
    missing = [f"{path}: routing_file: {cfg.routing_file} does not exist"] if not cfg.routing_file.is_file() else []
    if not cfg.models_dir.is_dir():
        missing.append(f"{path}: models_dir: {cfg.models_dir} is not a folder")
    for dest in cfg.destinations.values():
        if dest.names is not None:
            try:
                load_roi_names(dest.names, dest.max_roi_name)
            except ConfigError as exc:
                missing.extend(exc.errors)
    if missing:
        raise ConfigError(missing)
    return cfg
