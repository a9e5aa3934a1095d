"""The typed records the index stores and hands out: jobs with their routes and details, the
outbox's states and rows, the clinicians' approvals and the agreement figures.

Each stage reads and writes these, never the columns behind them, so a key cannot be misspelt
in one module and read under another name in the next. Job routes and details are kept as JSON
in their job's row; ``from_json`` takes what an older version of the node wrote (unknown keys
are ignored, missing ones take their defaults).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pydicom.uid import RTStructureSetStorage, SegmentationStorage, generate_uid

from ie_gateway.vocab import ApprovalStatus, JobState, OutboxState, OutputKind, Priority, ReviewPolicy, SegEncoding

#: SOP class of a LABELMAP SEG (Supplement 243), which pydicom 3.0 does not name yet.
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"


def output_sop_class(kind: OutputKind, encoding: SegEncoding = SegEncoding.BINARY) -> str:
    """The SOP class of an output file: what the outbox proposes and the statement lists."""
    if kind is OutputKind.RTSTRUCT:
        return str(RTStructureSetStorage)
    return LABEL_MAP_SEGMENTATION_STORAGE if encoding is SegEncoding.LABELMAP else str(SegmentationStorage)


@dataclass(frozen=True, eq=False)  # compared as a mapping
class SeriesHeader(Mapping[str, Any]):
    """The routing facts of a series: its first instance's top-level header values by DICOM
    keyword (str, int, float, a list of those, or None), as the receiver indexed them.

    A mapping, so routing rules may match any keyword; the values the node itself reads have
    typed accessors.
    """

    by_keyword: Mapping[str, Any] = field(default_factory=dict)

    def __getitem__(self, keyword: str) -> Any:
        return self.by_keyword[keyword]

    def __iter__(self) -> Iterator[str]:
        return iter(self.by_keyword)

    def __len__(self) -> int:
        return len(self.by_keyword)

    @property
    def modality(self) -> str:
        return str(self.by_keyword.get("Modality") or "")

    @property
    def images_in_acquisition(self) -> int | None:
        """How many instances the series says it has (completion need not wait), if it says."""
        value = self.by_keyword.get("ImagesInAcquisition")
        return value if isinstance(value, int) and value > 0 else None


@dataclass(frozen=True)
class JobRoute:
    """One matched rule's order, with the model version resolved when the series was routed."""

    rule: str
    model: str
    version: str
    outputs: tuple[OutputKind, ...]
    send_to: tuple[str, ...]
    sync: bool = False
    review: ReviewPolicy = ReviewPolicy.HOLD
    priority: Priority = Priority.NORMAL
    deliver: bool = True  # False: a shadow route, its results are written but never sent
    seg_encoding: SegEncoding = SegEncoding.BINARY

    @property
    def spec(self) -> str:
        """``name@version``: how the registry is asked for this exact model."""
        return f"{self.model}@{self.version}"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> JobRoute:
        return cls(
            rule=str(raw["rule"]),
            model=str(raw["model"]),
            version=str(raw["version"]),
            outputs=tuple(OutputKind(o) for o in raw.get("outputs", ())),
            send_to=tuple(str(d) for d in raw.get("send_to", ())),
            sync=bool(raw.get("sync", False)),
            review=ReviewPolicy(raw.get("review") or ReviewPolicy.HOLD),
            priority=Priority(raw.get("priority") or Priority.NORMAL),
            deliver=bool(raw.get("deliver", True)),
            seg_encoding=SegEncoding(raw.get("seg_encoding") or SegEncoding.BINARY),
        )


@dataclass(frozen=True)
class OutputUIDs:
    """Series and SOP Instance UIDs of one output object.

    Made once, when the job is routed, and stored, so every write and every delivery retry
    (on whichever worker) sends the same instance.
    """

    series_uid: str
    sop_uid: str

    @classmethod
    def new(cls) -> OutputUIDs:
        return cls(series_uid=generate_uid(), sop_uid=generate_uid())


def output_file_name(
    kind: OutputKind, route: int, names_destination: str | None, encoding: SegEncoding = SegEncoding.BINARY
) -> str:
    """The one rule for a result file's name in the job's folder: ``rtstruct-0.dcm``,
    ``rtstruct-0-TPS.dcm`` for the copy under a destination's names file, ``seg-0-labelmap.dcm``
    for a LABELMAP SEG."""
    names = f"-{names_destination}" if names_destination else ""
    labelmap = "-labelmap" if encoding is SegEncoding.LABELMAP else ""
    return f"{kind}-{route}{names}{labelmap}.dcm"


@dataclass(frozen=True)
class PlannedOutput:
    """One file the write stage makes for a routed job, and the destinations it goes to.

    Destinations that take the same names share a file; a destination with a names file gets
    its own (its ROIs differ, so it is another instance with its own UIDs).
    """

    kind: OutputKind
    route: int  # the index of the route (in ``Job.routes``) whose model's result it encodes
    destinations: tuple[str, ...]
    names_file: str | None  # the destinations' names file; None: the model's own names
    file: str  # its name in the job's results folder
    uids: OutputUIDs
    encoding: SegEncoding = SegEncoding.BINARY  # a SEG's: LABELMAP where the route asks and the destinations take it

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PlannedOutput:
        return cls(
            kind=OutputKind(raw["kind"]),
            route=int(raw["route"]),
            destinations=tuple(str(d) for d in raw.get("destinations", ())),
            names_file=raw.get("names_file"),
            file=str(raw["file"]),
            uids=OutputUIDs(**raw["uids"]),
            encoding=SegEncoding(raw.get("encoding") or SegEncoding.BINARY),
        )


@dataclass(frozen=True)
class OutputPlan:
    """Every file a job's results become: recorded when the job is routed, written by the
    write stage (which leaves out a file with no structure left), sent by the outbox, read by
    agreement and sync. The only place a result file's name comes from."""

    outputs: tuple[PlannedOutput, ...] = ()

    def of_route(self, route: int) -> list[PlannedOutput]:
        return [o for o in self.outputs if o.route == route]

    def delivered_rtstruct(self, route: int) -> PlannedOutput | None:
        """The route's RT-STRUCT as a clinician edits it: the one under the model's own
        names if the route has one, else the first destination's."""
        found = [o for o in self.of_route(route) if o.kind is OutputKind.RTSTRUCT]
        found.sort(key=lambda o: o.names_file is not None)
        return found[0] if found else None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> OutputPlan:
        return cls(tuple(PlannedOutput.from_dict(o) for o in raw.get("outputs", ())))

    @classmethod
    def from_uid_keys(cls, keyed: dict[str, dict[str, str]]) -> OutputPlan:
        """The plan of a job routed by a node before plans were recorded: its UIDs were kept
        under ``<route>-<kind>[-<names destination>]``. What such a node did not record (the
        other destinations, the names file's path) stays empty."""
        outputs = []
        for key, uids in keyed.items():
            route, kind, *dest = key.split("-", 2)
            names_dest = dest[0] if dest else None
            outputs.append(
                PlannedOutput(
                    kind=OutputKind(kind),
                    route=int(route),
                    destinations=(names_dest,) if names_dest else (),
                    names_file=None,
                    file=output_file_name(OutputKind(kind), int(route), names_dest),
                    uids=OutputUIDs(**uids),
                )
            )
        return cls(tuple(outputs))


@dataclass(frozen=True)
class Review:
    """Why a result needs a person's look, and who released it."""

    reasons: tuple[str, ...]
    policy: ReviewPolicy
    released_by: str | None = None
    released_at: float | None = None


@dataclass(frozen=True)
class ApprovedSet:
    """A clinician's structure set linked to the CT job it was drawn on."""

    job: int  # the structure set's own job
    approval: ApprovalStatus
    instances: int


@dataclass(frozen=True)
class SyncRecord:
    """The last upload of a case to the training workspace."""

    case: str  # the pseudonymous series UID the case is filed under
    at: str  # ISO 8601, UTC
    ct: int = 0
    ai: int = 0
    approved: int = 0
    approved_jobs: tuple[int, ...] = ()
    blobs_uploaded: int = 0
    bytes_uploaded: int = 0


@dataclass(frozen=True)
class JobDetail:
    """What the stages learnt about a job beyond its state: files, figures, outcomes."""

    slice_files: tuple[str, ...] = ()  # the CT's instance files in the volume's slice order
    volumes_cc: dict[str, float] = field(default_factory=dict)  # per structure, as contoured
    timings_s: dict[str, float] = field(default_factory=dict)
    empty_structures: tuple[str, ...] = ()  # left out of every output
    review: Review | None = None
    plan: OutputPlan = field(default_factory=OutputPlan)  # the result files, fixed when routed
    outputs: tuple[OutputKind, ...] = ()  # the kinds written
    qa_png: str | None = None
    not_sent: dict[str, tuple[OutputKind, ...]] = field(default_factory=dict)  # destination → refused kinds
    deliveries: int | None = None  # files delivered, once the job is delivered
    purged: bool = False  # retention deleted its files
    missing_instances: bool = False  # some instance files were gone at start-up
    replaced_instances: int = 0  # instances sent again with other bytes: the later copy is used
    synced: SyncRecord | None = None
    sync_error: str | None = None
    approved: tuple[ApprovedSet, ...] = ()  # on a CT job: the clinicians' sets linked to it
    linked_to: int | None = None  # on a clinician's structure set: the CT job it belongs to
    approval: ApprovalStatus | None = None  # on a clinician's structure set

    def approved_jobs(self) -> list[int]:
        """Jobs of the linked structure sets a clinician approved, sorted."""
        return sorted(a.job for a in self.approved if a.approval is ApprovalStatus.APPROVED)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def shown(self) -> dict[str, Any]:
        """The fields that say something (not at their defaults), as JSON values for `status`."""
        empty = JobDetail()
        values: dict[str, Any] = json.loads(self.to_json())
        return {f.name: values[f.name] for f in fields(self) if getattr(self, f.name) != getattr(empty, f.name)}

    @classmethod
    def from_json(cls, text: str | None) -> JobDetail:
        raw: dict[str, Any] = json.loads(text) if text else {}
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known and v is not None}
        for key in ("slice_files", "empty_structures"):
            if key in values:
                values[key] = tuple(values[key])
        legacy_uids = raw.get("output_uids")
        if "plan" in values:
            values["plan"] = OutputPlan.from_dict(values["plan"])
        elif legacy_uids:
            values["plan"] = OutputPlan.from_uid_keys(legacy_uids)
        if "outputs" in values:
            values["outputs"] = tuple(OutputKind(o) for o in values["outputs"])
        if "not_sent" in values:
            values["not_sent"] = {d: tuple(OutputKind(k) for k in kinds) for d, kinds in values["not_sent"].items()}
        if "review" in values:
            r = values["review"]
            values["review"] = Review(
                reasons=tuple(r.get("reasons", ())),
                policy=ReviewPolicy(r.get("policy") or ReviewPolicy.HOLD),
                released_by=r.get("released_by"),
                released_at=r.get("released_at"),
            )
        if "synced" in values:
            s = dict(values["synced"])
            s["approved_jobs"] = tuple(s.get("approved_jobs", ()))
            values["synced"] = SyncRecord(**{k: v for k, v in s.items() if k in {f.name for f in fields(SyncRecord)}})
        if "approval" in values:
            values["approval"] = ApprovalStatus.of(values["approval"])
        if "approved" in values:
            values["approved"] = tuple(
                ApprovedSet(
                    job=int(a["job"]), approval=ApprovalStatus.of(a["approval"]), instances=int(a.get("instances", 0))
                )
                for a in values["approved"]
            )
        return cls(**values)


@dataclass(frozen=True)
class Job:
    """One job (a series' instances, routed, contoured, delivered) joined with its series."""

    id: int
    series_id: int
    state: JobState
    reason: str | None
    instances: int
    late_instances: int
    created_at: float
    updated_at: float
    last_instance_at: float
    completed_at: float | None
    routes: tuple[JobRoute, ...]
    detail: JobDetail
    study_uid: str
    series_uid: str
    header: SeriesHeader
    calling_ae: str
    called_ae: str
    claimed_by: str | None = None  # the node working on it now (host:pid), while its lease runs
    lease_until: float | None = None
    priority: Priority = Priority.NORMAL  # set when routed: its rules' and its caller's

    @property
    def model(self) -> str | None:
        """The first route's model: what `status` shows."""
        return self.routes[0].model if self.routes else None

    @property
    def model_version(self) -> str | None:
        return self.routes[0].version if self.routes else None


@dataclass(frozen=True)
class StageAttempts:
    """How often a stage of a job was started, and how often the process died inside it."""

    attempts: int
    crashes: int


@dataclass(frozen=True)
class Transition:
    """One move of a job, as its history shows it."""

    job_id: int
    at: float
    from_state: str | None
    to_state: str
    reason: str | None
    who: str | None  # the admin whose action it was; None: the node itself


@dataclass(frozen=True)
class OutboxRow:
    """One delivery the outbox holds."""

    id: int
    job_id: int
    destination: str
    path: str  # relative to the results folder
    sop_uid: str
    sop_class: str
    attempts: int
    created_at: float
    state: OutboxState = OutboxState.PENDING
    last_status: int | None = None
    last_error: str | None = None


@dataclass(frozen=True)
class DeliveredBatch:
    """The files of one job a destination has, for the audit."""

    job_id: int
    destination: str
    files: int
    at: float


@dataclass(frozen=True)
class AgreementRow:
    """One structure of one model version against a clinician's approved contour."""

    ct_job: int  # the contoured CT's job
    approval_job: int  # the approved structure set's job
    model: str
    model_version: str
    structure: str
    at: float
    tolerance_mm: float
    dice: float
    hd95_mm: float | None
    msd_mm: float | None
    surface_dice: float
    volume_ai_cc: float
    volume_approved_cc: float
    volume_diff_pct: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


AGREEMENT_COLUMNS = tuple(f.name for f in fields(AgreementRow))
