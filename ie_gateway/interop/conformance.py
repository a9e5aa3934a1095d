"""`ie-gateway conformance`: the node's DICOM Conformance Statement (PS3.2 layout), built from
the running config and from the objects the code negotiates with, so it cannot drift.

The accepted presentation contexts are read off the listener's own pynetdicom AE (built by
``Receiver`` from ``node:``), the proposed ones from the functions and constants ``send.py``
(deliveries, Storage Commitment) and ``retrieve.py`` (C-FIND, C-MOVE) request them with, the
statuses, rejection reasons and TLS floor from the modules that apply them. A test compares the
statement with what dcmtk's ``storescu`` and ``echoscu`` and a pynetdicom peer actually get.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast
from urllib.parse import urlsplit

import pynetdicom
from pydicom.uid import UID
from pynetdicom.presentation import PresentationContext

from ie_gateway import receive, send
from ie_gateway.config import Destination, GatewayConfig
from ie_gateway.interop import commitment, retrieve, stow
from ie_gateway.ops import checks
from ie_gateway.store.records import output_sop_class
from ie_gateway.vocab import OutputKind, PeerProtocol, SegEncoding

if TYPE_CHECKING:
    from ie_gateway.store import Store

#: The DICOM application context name (PS3.7 A.2.1), the only one pynetdicom speaks
APPLICATION_CONTEXT = UID("1.2.840.10008.3.1.1.1")
#: Role of an accepted context whose requestor may also take the SCP role (role selection)
BOTH_ROLES = "SCP; SCU by role selection"


@dataclass(frozen=True)
class Context:
    """One SOP class in one role, with the transfer syntaxes accepted (SCP) or proposed (SCU)."""

    sop_class: UID
    role: str
    syntaxes: tuple[UID, ...]


@dataclass(frozen=True)
class Section:
    """A titled part of the statement: paragraphs, then a table (header row first) if any."""

    title: str
    paragraphs: tuple[str, ...] = ()
    table: tuple[tuple[str, ...], ...] = ()


def _listener(cfg: GatewayConfig) -> pynetdicom.AE:
    # the AE is built from node settings alone; the store is touched only once it listens
    return receive.Receiver(cfg.node, cast("Store", None)).ae


def accepted_contexts(cfg: GatewayConfig) -> list[Context]:
    """What the listener accepts: the presentation contexts of its own AE."""
    return [
        Context(
            UID(str(cx.abstract_syntax)),
            BOTH_ROLES if cx.scp_role else "SCP",
            tuple(UID(str(ts)) for ts in cx.transfer_syntax),
        )
        for cx in _listener(cfg).supported_contexts
    ]


def dimse_destinations(cfg: GatewayConfig) -> dict[str, Destination]:
    """The destinations reached by DICOM associations (the others are DICOMweb services)."""
    return {name: d for name, d in cfg.destinations.items() if d.protocol is PeerProtocol.DIMSE}


def output_classes(dest: Destination) -> list[str]:
    """The SOP classes of the outputs ``dest`` may be sent: each kind it accepts, and a LABELMAP
    SEG besides the BINARY one where it takes them (``labelmap: true``)."""
    classes = [output_sop_class(kind) for kind in dest.accepts]
    if dest.labelmap and OutputKind.SEG in dest.accepts:
        classes.append(output_sop_class(OutputKind.SEG, SegEncoding.LABELMAP))
    return classes


def _as_contexts(contexts: Iterable[PresentationContext]) -> list[Context]:
    """pynetdicom's requested contexts, one row per SOP class, the syntaxes in proposal order."""
    syntaxes: dict[UID, list[UID]] = {}
    for cx in contexts:
        listed = syntaxes.setdefault(UID(str(cx.abstract_syntax)), [])
        listed += [UID(str(ts)) for ts in cx.transfer_syntax if UID(str(ts)) not in listed]
    return [Context(sop, "SCU", tuple(ts)) for sop, ts in syntaxes.items()]


def proposed_contexts(cfg: GatewayConfig) -> list[Context]:
    """What the node proposes: deliveries to its DICOM destinations (each output they accept,
    Storage Commitment to those that commit), Verification, and C-FIND/C-MOVE where it has a
    DICOM source to fetch from."""
    dests = dimse_destinations(cfg)
    if dests:
        classes = [c for d in dests.values() for c in output_classes(d)]
        commits = any(d.commitment for d in dests.values())
    else:  # nothing configured yet: what any destination could be sent
        classes, commits = [output_sop_class(k) for k in OutputKind], False
    contexts = send.requested_contexts(classes, commits)
    contexts += [pynetdicom.build_context(receive.VERIFICATION, ts) for ts in send.PROPOSED_SYNTAXES]
    if any(s.protocol is PeerProtocol.DIMSE for s in cfg.sources.values()):
        contexts += [retrieve.FIND_CONTEXT, retrieve.MOVE_CONTEXT]
    return _as_contexts(contexts)


def sections(cfg: GatewayConfig, version: str) -> list[Section]:
    """The statement's parts, in the order of PS3.2 Annex A."""
    accepted = accepted_contexts(cfg)
    proposed = proposed_contexts(cfg)
    return [
        _overview(cfg, version, accepted, proposed),
        _implementation(cfg),
        _associations(cfg),
        _accepted(accepted),
        Section("4.1 C-STORE SCP statuses", (), (("Status", "Meaning"), *c_store_statuses(cfg))),
        _commitment_scp(),
        _proposed(cfg, proposed),
        _destinations(cfg),
        _query_retrieve(cfg),
        *_dicomweb(cfg),
        _character_sets(),
        _security(cfg),
    ]


def c_store_statuses(cfg: GatewayConfig) -> list[tuple[str, str]]:
    """What the listener answers a C-STORE (receive.py), in the words the sender's admin needs."""
    limits = ", ".join(f"{name} {value}" for name, value in cfg.limits.model_dump().items())
    return [
        (f"{receive.SUCCESS:04X}", "Success: on disk and indexed (an instance already held is answered Success too)"),
        (f"{receive.OUT_OF_RESOURCES:04X}", "Refused, out of resources: the instance could not be written (retry)"),
        (f"{receive.INDEX_UNAVAILABLE:04X}", "Refused, out of resources: the index is unavailable (retry)"),
        (
            f"{receive.OVER_LIMIT:04X}",
            f"Refused, out of resources: the instance or its series passes a limit ({limits})",
        ),
        (f"{receive.DATASET_MISMATCH:04X}", "Error: the data set's SOP Instance or Class UID is not the request's"),
        (f"{receive.CANNOT_UNDERSTAND:04X}", "Error: cannot understand (cannot be decoded, or a required UID absent)"),
        (f"{receive.INVALID_UID:04X}", "Error: a UID that is not digits and dots of at most 64 characters"),
    ]


def _overview(cfg: GatewayConfig, version: str, accepted: list[Context], proposed: list[Context]) -> Section:
    scu = {c.sop_class for c in proposed}
    does = [
        (
            f"ie-gateway {version} receives CT and MR series (and RT Structure Sets, Segmentations) as a Storage "
            "SCP, contours them with AI models, and sends the results as RT Structure Set and Segmentation "
            "objects to planning systems as a Storage SCU. It answers Verification and, as Storage Commitment "
            "Push Model SCP, commits what it has stored."
        )
    ]
    if commitment.STORAGE_COMMITMENT in scu:
        does.append("It asks the destinations configured with commitment for Storage Commitment (Push Model SCU).")
    if retrieve.MOVE_CONTEXT.abstract_syntax in scu:
        does.append(
            "On `ie-gateway fetch` it queries a configured source (Study Root C-FIND, study level) and "
            "retrieves studies from it (Study Root C-MOVE to its own AE title): Query/Retrieve SCU."
        )
    return Section(
        "1. Overview",
        (
            " ".join(does),
            "It offers no Query/Retrieve SCP, does not use C-GET, and does not print or support media interchange.",
        ),
        (("SOP class", "UID", "User of service (SCU)", "Provider of service (SCP)"), *_sop_rows(accepted, proposed)),
    )


def _implementation(cfg: GatewayConfig) -> Section:
    return Section(
        "2. Implementation model",
        (
            (
                f"One application entity, called {cfg.node.ae_title} when it accepts and calling as "
                f"{cfg.delivery.calling_ae} when it sends (as {cfg.node.ae_title} when it fetches). A series is "
                f"complete after {cfg.series.stable_after_s:g} s without a new instance; it is then routed, "
                "contoured and its results queued for delivery, with retries (exponential backoff) and a "
                "dead-letter queue."
            ),
            (
                f"Implementation Class UID {pynetdicom.PYNETDICOM_IMPLEMENTATION_UID}, Implementation Version "
                f"Name {pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION} (pynetdicom {pynetdicom.__version__})."
            ),
        ),
    )


def _associations(cfg: GatewayConfig) -> Section:
    node, tls = cfg.node, cfg.node.tls
    max_pdu = _listener(cfg).maximum_pdu_size
    callers = [("Calling AE title", "Host", "TLS required")] + [
        (c.ae_title, c.host or _any_host(cfg, c.require_tls), "yes" if c.require_tls else "no")
        for c in node.allowed_callers
    ]
    return Section(
        "3. Association policies",
        (
            f"Application context {APPLICATION_CONTEXT} (DICOM). Maximum PDU size received: "
            + (f"{max_pdu} bytes" if max_pdu else "unlimited")
            + f" (node.max_pdu_kb); an A-ASSOCIATE-RQ longer than {receive.MAX_REQUEST_PDU} bytes, or a PDU "
            "announcing more than the maximum, is refused unread and the connection closed. A C-STORE data set "
            f"that passes limits.max_instance_mb ({cfg.limits.max_instance_mb} MB) while arriving, or any other "
            f"DIMSE command or data set past {receive.MAX_MESSAGE_IN_MEMORY // 2**20} MiB, closes the connection "
            "as it passes. Asynchronous operations are not supported (one operation at a time).",
            f"Listening on {node.bind}:{node.port}"
            + (f" and, over TLS, on port {tls.port}" if tls else "")
            + f". At most {node.max_associations} associations at once; beyond that, or while free space "
            "is below storage.reserve, an association is rejected transient "
            f"(result {receive.REJECT_LOCAL_LIMIT[0]}, source {receive.REJECT_LOCAL_LIMIT[1]}, reason "
            f"{receive.REJECT_LOCAL_LIMIT[2]}: local limit exceeded).",
            f"The called AE title must be {node.ae_title}. The calling AE title (and, where listed, the "
            "address) must be one of the allowed callers below; otherwise the association is rejected "
            f"permanent (result {receive.REJECT_CALLING_AE[0]}, source {receive.REJECT_CALLING_AE[1]}, "
            f"reason {receive.REJECT_CALLING_AE[2]}: calling AE title not recognised). A source the node fetches "
            "from and a destination that reports commitment on a new association must be allowed callers too. "
            + ("Nobody is allowed yet." if not node.allowed_callers else ""),
            (
                f"A connection that sends no association request within {node.acse_timeout_s:g} s is "
                f"closed; an association idle for {node.network_timeout_s:g} s is aborted."
            ),
        ),
        tuple(callers) if node.allowed_callers else (),
    )


def _any_host(cfg: GatewayConfig, require_tls: bool) -> str:
    """Where a caller without a host pin may call from (check-config refuses it beyond loopback
    unless a client certificate stands in for the pin)."""
    if checks.is_loopback(cfg.node.bind):
        return "any (loopback only)"
    by_certificate = require_tls and cfg.node.tls is not None and cfg.node.tls.require_client_cert
    return "any, with a certificate the node's CA signed" if by_certificate else "any address (unpinned)"


def _accepted(accepted: list[Context]) -> Section:
    both = [c.sop_class.name for c in accepted if c.role == BOTH_ROLES]
    return Section(
        "4. Presentation contexts accepted",
        (
            (
                "Each context proposed with at least one of these transfer syntaxes is accepted; the first "
                "of the requestor's syntaxes that is listed is chosen. Any other SOP class or transfer syntax "
                "is rejected. No extended negotiation. "
                + (
                    f"SCP/SCU role selection is accepted for {', '.join(both)} only (a destination reporting "
                    "commitment on a new association takes the SCP role); for the others it is not supported."
                    if both
                    else "The SCP/SCU role selection item is not supported."
                )
            ),
            (
                "Storage SCP conformance level 2 (Full): every attribute, private ones included, is kept as "
                "received; no element is coerced. Digital signatures are not checked. An instance is stored as "
                "received (bytes unchanged) and answered Success only once it is on disk and indexed; the "
                "statuses are in 4.1."
            ),
        ),
        (("Abstract syntax", "Role", "Transfer syntaxes"), *_context_rows(accepted)),
    )


def _commitment_scp() -> Section:
    reasons = commitment.FAILURE_REASONS
    return Section(
        "4.2 Storage Commitment Push Model SCP",
        (
            (
                "An N-ACTION (Request Storage Commitment) is answered at once: "
                f"{commitment.SUCCESS:04X}, or {commitment.INVALID_ARGUMENT:04X} when the request cannot be read "
                f"or lists more than {commitment.MAX_REFERENCES} instances, or {commitment.NO_SUCH_ACTION:04X} for "
                "another action. The node commits an instance only when its file and index row are in the spool "
                "(what a C-STORE Success already promised). Others "
                f"are listed as failed: {commitment.NO_SUCH_INSTANCE:04X} "
                f"({reasons[commitment.NO_SUCH_INSTANCE]}), or {commitment.CLASS_CONFLICT:04X} "
                f"({reasons[commitment.CLASS_CONFLICT]}) when the SOP class differs from the stored one."
            ),
            (
                f"The N-EVENT-REPORT (event type {commitment.ALL_COMMITTED} all committed, "
                f"{commitment.SOME_FAILED} some failed) is sent on the requestor's association once the N-ACTION "
                "response is out. The node never opens an association to report: a requestor that releases at "
                "once gets no report and asks again."
            ),
        ),
    )


def _proposed(cfg: GatewayConfig, proposed: list[Context]) -> Section:
    return Section(
        "5. Presentation contexts proposed",
        (
            (
                "At most one association per destination at a time, each carrying that destination's due "
                "results. One presentation context per transfer syntax, for the SOP classes of the results queued "
                "for that destination. No extended negotiation. A SOP class the destination refuses at "
                "association is not retried (the result is marked failed with the reason); other failures "
                f"are retried up to {cfg.delivery.max_attempts} times or {cfg.delivery.max_age_s:g} s. "
                "A LABELMAP Segmentation is sent only to destinations with labelmap, as written (RLE Lossless). "
                "Verification is proposed by `ie-gateway check-config --echo`."
            ),
            (
                "Storage Commitment Push Model SCU (destinations with commitment): after the C-STOREs the node "
                "asks, on the same association, for commitment of the instances the destination took (N-ACTION). "
                "The N-EVENT-REPORT is taken on that association (waited for commitment_wait_s) or on a new "
                "association the destination opens to the listener (SCP role). A result is delivered only once "
                "committed; one reported failed, or not reported within commitment_timeout_s, is sent again. "
                "A destination that refuses the Storage Commitment context gets its results marked failed."
            ),
        ),
        (("Abstract syntax", "Role", "Transfer syntaxes"), *_context_rows(proposed)),
    )


def _destinations(cfg: GatewayConfig) -> Section:
    dests = dimse_destinations(cfg)
    rows = [
        (
            name,
            d.ae_title,
            f"{d.host}:{d.port}",
            ", ".join(commitment.sop_name(c) for c in output_classes(d)),
            "yes" if d.commitment else "no",
            "yes" if d.tls is not None else "no",
        )
        for name, d in dests.items()
    ]
    head = ("Destination", "Called AE title", "Host:port", "SOP classes proposed", "Storage Commitment", "TLS")
    return Section("6. Destinations (DICOM)", () if dests else ("None configured.",), (head, *rows) if dests else ())


def _query_retrieve(cfg: GatewayConfig) -> Section:
    sources = {name: s for name, s in cfg.sources.items() if s.protocol is PeerProtocol.DIMSE}
    if not sources:
        return Section("7. Query/Retrieve SCU", ("No DICOM source is configured (sources:): the node queries nobody.",))
    head = ("Source", "Called AE title", "Host:port", "Move timeout")
    rows = [(name, s.ae_title, f"{s.host}:{s.port}", f"{s.move_timeout_s:g} s") for name, s in sources.items()]
    return Section(
        "7. Query/Retrieve SCU",
        (
            (
                f"`ie-gateway fetch --patient` sends a {UID(str(retrieve.FIND_CONTEXT.abstract_syntax)).name} query at "
                f"level {retrieve.QUERY_LEVEL} (keys PatientID, StudyInstanceUID, StudyDate, ModalitiesInStudy); "
                f"`ie-gateway fetch --study` a {UID(str(retrieve.MOVE_CONTEXT.abstract_syntax)).name} request at level "
                f"{retrieve.QUERY_LEVEL} with the node's own AE title, {cfg.node.ae_title}, as move destination. "
                "The source stores the instances on a new association to the listener (it must know the node's "
                "address and be an allowed caller). No relational queries, no cancel, no C-GET."
            ),
        ),
        (head, *rows),
    )


def _dicomweb(cfg: GatewayConfig) -> list[Section]:
    """The DICOMweb services: STOW-RS to web destinations, QIDO-RS/WADO-RS from web sources,
    and the node's own STOW-RS endpoint. Only the URL's host and the kind of auth: no secrets."""
    web = [
        (name, "STOW-RS (store)", _host(d.url), d.auth, ", ".join(commitment.sop_name(c) for c in output_classes(d)))
        for name, d in cfg.destinations.items()
        if d.protocol is PeerProtocol.DICOMWEB
    ] + [
        (name, "QIDO-RS, WADO-RS (fetch)", _host(s.url), s.auth, "as stored at the source")
        for name, s in cfg.sources.items()
        if s.protocol is PeerProtocol.DICOMWEB
    ]
    parts = []
    if web:
        head = ("Service", "Used for", "Host", "Authentication", "SOP classes")
        parts.append(
            Section(
                "8. DICOMweb services used (PS3.18)",
                (
                    (
                        "These peers have no AE title: results go to them by STOW-RS with the same retries and "
                        "dead-letter queue as C-STORE; a fetch searches them by QIDO-RS and reads by WADO-RS."
                    ),
                ),
                (head, *web),
            )
        )
    paths = [str(getattr(route, "path", "")) for route in stow.stow_routes(cfg, cast("Store", None))]
    if paths:
        callers = ", ".join(c.name for c in cfg.http.stow_callers)
        parts.append(
            Section(
                "8.1 STOW-RS receive endpoint",
                (
                    (
                        f"POST {', '.join(paths)} on {cfg.http.page_url()} (multipart/related; "
                        f"type=application/dicom, each part a Part 10 file) from the callers {callers}, each with a "
                        f"bearer token of its own; a body over {cfg.http.stow_max_mb:g} MB is refused (413). Each "
                        "part is stored like a C-STORE and answered in the response's ReferencedSOPSequence or "
                        f"FailedSOPSequence: failure reason {stow.CANNOT_UNDERSTAND:04X} cannot understand, "
                        f"{stow.OUT_OF_RESOURCES:04X} out of resources, {stow.PROCESSING_FAILURE:04X} processing "
                        "failure. HTTP 200 when all were stored, 202 when some, 409 when none."
                    ),
                ),
            )
        )
    return parts


def _host(url: str | None) -> str:
    split = urlsplit(url or "")
    return f"{split.hostname}:{split.port}" if split.port else str(split.hostname)


def _character_sets() -> Section:
    return Section(
        "9. Character sets",
        (
            (
                "Received objects are stored with the Specific Character Set they were sent with. RT Structure "
                "Sets carry the Specific Character Set of the CT they contour; Segmentations are written "
                "without one (the default repertoire, ISO_IR 6)."
            ),
        ),
    )


def _security(cfg: GatewayConfig) -> Section:
    tls = cfg.node.tls
    return Section(
        "10. Security",
        (
            (
                f"DICOM TLS (PS3.15 Annex B, BCP 195 profile): TLS 1.2 or later on port {tls.port}; "
                + (
                    "callers must present a certificate signed by the configured CA."
                    if tls.require_client_cert
                    else "callers' certificates are not required."
                )
            )
            if tls
            else "No DICOM TLS listener is configured (node.tls).",
            (
                "Results are sent over TLS to destinations with a tls section (TLS 1.2 or later, the "
                "destination's certificate verified). No user identity negotiation. DICOMweb passwords and "
                "tokens are read from the environment or systemd credentials, never from the configuration."
            ),
        ),
    )


def _sop_rows(accepted: list[Context], proposed: list[Context]) -> list[tuple[str, ...]]:
    classes = list(dict.fromkeys([c.sop_class for c in accepted] + [c.sop_class for c in proposed]))
    scu = {c.sop_class for c in proposed}
    scp = {c.sop_class for c in accepted}
    return [
        (commitment.sop_name(uid), str(uid), "yes" if uid in scu else "no", "yes" if uid in scp else "no")
        for uid in classes
    ]


def _context_rows(contexts: list[Context]) -> list[tuple[str, ...]]:
    return [
        (commitment.sop_name(c.sop_class), c.role, ", ".join(f"{ts.name} ({ts})" for ts in c.syntaxes))
        for c in contexts
    ]


def render_text(parts: list[Section], title: str) -> str:
    """Plain text: headings, paragraphs, tables with | separators (Markdown-compatible)."""
    out = [f"# {title}", ""]
    for part in parts:
        out += [f"## {part.title}", ""]
        for paragraph in part.paragraphs:
            out += [paragraph, ""]
        if part.table:
            out.append("| " + " | ".join(part.table[0]) + " |")
            out.append("|" + "---|" * len(part.table[0]))
            out += ["| " + " | ".join(row) + " |" for row in part.table[1:]]
            out.append("")
    return "\n".join(out)


def render_html(parts: list[Section], title: str) -> str:
    """A self-contained HTML page of the same statement."""
    e = html.escape
    body = [f"<h1>{e(title)}</h1>"]
    for part in parts:
        body.append(f"<h2>{e(part.title)}</h2>")
        body += [f"<p>{e(p)}</p>" for p in part.paragraphs]
        if part.table:
            head = "".join(f"<th>{e(c)}</th>" for c in part.table[0])
            rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in part.table[1:])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    style = "body{font-family:sans-serif;max-width:60em}table{border-collapse:collapse}td,th{border:1px solid #999;padding:.2em .4em;text-align:left}"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def statement(cfg: GatewayConfig, version: str, as_html: bool = False) -> str:
    """The whole statement for the node ``cfg`` describes."""
    title = f"DICOM Conformance Statement: ie-gateway {version} ({cfg.node.ae_title})"
    parts = sections(cfg, version)
    return render_html(parts, title) if as_html else render_text(parts, title)
