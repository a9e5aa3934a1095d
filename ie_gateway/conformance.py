"""`ie-gateway conformance`: the node's DICOM Conformance Statement (PS3.2 layout), built from
the running config and from the objects the code negotiates with, so it cannot drift.

The accepted presentation contexts are read off the listener's own pynetdicom AE (built by
``Receiver`` from ``node:``), the proposed ones from the constants ``send.py`` requests them
with, the rejection reasons and TLS floor from the modules that apply them. A test compares the
statement with what dcmtk's ``storescu`` and ``echoscu`` actually get.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import pynetdicom
from pydicom.uid import UID, RTStructureSetStorage, SegmentationStorage

from ie_gateway import receive, send
from ie_gateway.config import GatewayConfig

if TYPE_CHECKING:
    from ie_gateway.store import Store

#: The SOP class of each output kind the node writes (write/rtstruct.py, write/seg.py)
OUTPUT_SOP_CLASSES = {"rtstruct": RTStructureSetStorage, "seg": SegmentationStorage}
#: The DICOM application context name (PS3.7 A.2.1), the only one pynetdicom speaks
APPLICATION_CONTEXT = UID("1.2.840.10008.3.1.1.1")


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


def accepted_contexts(cfg: GatewayConfig) -> list[Context]:
    """What the listener accepts: the presentation contexts of its own AE."""
    # the AE is built from node settings alone; the store is touched only once it listens
    ae = receive.Receiver(cfg.node, cast("Store", None)).ae
    return [
        Context(UID(str(cx.abstract_syntax)), "SCP", tuple(UID(str(ts)) for ts in cx.transfer_syntax))
        for cx in ae.supported_contexts
    ]


def proposed_contexts(cfg: GatewayConfig) -> list[Context]:
    """What the node proposes when it delivers: each output a destination accepts."""
    kinds = sorted({kind for dest in cfg.destinations.values() for kind in dest.accepts} or OUTPUT_SOP_CLASSES)
    storage = [Context(OUTPUT_SOP_CLASSES[k], "SCU", tuple(send.PROPOSED_SYNTAXES)) for k in kinds]
    return [*storage, Context(receive.VERIFICATION, "SCU", tuple(send.PROPOSED_SYNTAXES))]


def sections(cfg: GatewayConfig, version: str) -> list[Section]:
    """The statement's parts, in the order of PS3.2 Annex A."""
    node = cfg.node
    accepted = accepted_contexts(cfg)
    proposed = proposed_contexts(cfg)
    scp_ae = receive.Receiver(cfg.node, cast("Store", None)).ae
    max_pdu = scp_ae.maximum_pdu_size
    callers = [("Calling AE title", "Host", "TLS required")] + [
        (c.ae_title, c.host or "any (loopback only)", "yes" if c.require_tls else "no") for c in node.allowed_callers
    ]
    destinations = [("Destination", "Called AE title", "Host:port", "SOP classes proposed", "TLS")] + [
        (
            name,
            d.ae_title,
            f"{d.host}:{d.port}",
            ", ".join(OUTPUT_SOP_CLASSES[k].name for k in d.accepts),
            "yes" if d.tls is not None else "no",
        )
        for name, d in cfg.destinations.items()
    ]
    tls = node.tls
    return [
        Section(
            "1. Overview",
            (
                (
                    f"ie-gateway {version} receives CT and MR series (and RT Structure Sets, Segmentations) as a "
                    "Storage SCP, contours them with AI models, and sends the results as RT Structure Set and "
                    "Segmentation objects to planning systems as a Storage SCU. It answers Verification."
                ),
                "It does not query or retrieve (no C-FIND, C-MOVE, C-GET), print, or support media interchange.",
            ),
            (
                ("SOP class", "UID", "User of service (SCU)", "Provider of service (SCP)"),
                *_sop_rows(accepted, proposed),
            ),
        ),
        Section(
            "2. Implementation model",
            (
                (
                    f"One application entity, called {node.ae_title} when it accepts and calling as "
                    f"{cfg.delivery.calling_ae} when it sends. A series is complete after "
                    f"{cfg.series.stable_after_s:g} s without a new instance; it is then routed, contoured and its "
                    "results queued for delivery, with retries (exponential backoff) and a dead-letter queue."
                ),
                (
                    f"Implementation Class UID {pynetdicom.PYNETDICOM_IMPLEMENTATION_UID}, Implementation Version "
                    f"Name {pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION} (pynetdicom {pynetdicom.__version__})."
                ),
            ),
        ),
        Section(
            "3. Association policies",
            (
                f"Application context {APPLICATION_CONTEXT} (DICOM). Maximum PDU size received: "
                + (f"{max_pdu} bytes." if max_pdu else "unlimited.")
                + " Asynchronous operations are not supported (one operation at a time).",
                f"Listening on {node.bind}:{node.port}"
                + (f" and, over TLS, on port {tls.port}" if tls else "")
                + f". At most {node.max_associations} associations at once; beyond that, or while free space "
                "is below storage.reserve, an association is rejected transient "
                f"(result {receive.REJECT_LOCAL_LIMIT[0]}, source {receive.REJECT_LOCAL_LIMIT[1]}, reason "
                f"{receive.REJECT_LOCAL_LIMIT[2]}: local limit exceeded).",
                f"The called AE title must be {node.ae_title}. The calling AE title (and, where listed, the "
                "address) must be one of the allowed callers below; otherwise the association is rejected "
                f"permanent (result {receive.REJECT_CALLING_AE[0]}, source {receive.REJECT_CALLING_AE[1]}, "
                f"reason {receive.REJECT_CALLING_AE[2]}: calling AE title not recognised). "
                + ("Nobody is allowed yet." if not node.allowed_callers else ""),
                (
                    f"A connection that sends no association request within {node.acse_timeout_s:g} s is "
                    f"closed; an association idle for {node.network_timeout_s:g} s is aborted."
                ),
            ),
            tuple(callers) if node.allowed_callers else (),
        ),
        Section(
            "4. Presentation contexts accepted (Storage and Verification SCP)",
            (
                (
                    "Each context proposed with at least one of these transfer syntaxes is accepted; the first "
                    "of the requestor's syntaxes that is listed is chosen. Any other SOP class or transfer syntax "
                    "is rejected. No extended negotiation; the SCP/SCU role selection item is not supported."
                ),
                (
                    "Storage SCP conformance level 2 (Full): every attribute, private ones included, is kept as received; "
                    "no element is coerced. Digital signatures are not checked. "
                    "An instance is stored as received (bytes unchanged) and answered Success (0000) once it is "
                    f"on disk and indexed. Failure statuses: {receive.OUT_OF_RESOURCES:04X} out of resources (retry), "
                    f"{receive.INDEX_UNAVAILABLE:04X} index unavailable (retry), {receive.DATASET_MISMATCH:04X} data "
                    f"set does not match the SOP class, {receive.CANNOT_UNDERSTAND:04X} cannot understand, "
                    f"{receive.INVALID_UID:04X} invalid UID."
                ),
            ),
            (("Abstract syntax", "Role", "Transfer syntaxes"), *_context_rows(accepted)),
        ),
        Section(
            "5. Presentation contexts proposed (Storage SCU)",
            (
                (
                    "At most one association per destination at a time, each carrying that destination's due "
                    "results. One presentation context per transfer syntax, for the SOP classes of the results queued "
                    "for that destination. No extended negotiation. A SOP class the destination refuses at "
                    "association is not retried (the result is marked failed with the reason); other failures "
                    f"are retried up to {cfg.delivery.max_attempts} times or {cfg.delivery.max_age_s:g} s. "
                    "Verification is proposed by `ie-gateway check-config --echo`."
                ),
            ),
            (("Abstract syntax", "Role", "Transfer syntaxes"), *_context_rows(proposed)),
        ),
        Section("6. Destinations", (), tuple(destinations) if cfg.destinations else ()),
        Section(
            "7. Character sets",
            (
                (
                    "Received objects are stored with the Specific Character Set they were sent with. RT Structure "
                    "Sets carry the Specific Character Set of the CT they contour; Segmentations are written "
                    "without one (the default repertoire, ISO_IR 6)."
                ),
            ),
        ),
        Section(
            "8. Security",
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
                    "destination's certificate verified). No user identity negotiation."
                ),
            ),
        ),
    ]


def _sop_rows(accepted: list[Context], proposed: list[Context]) -> list[tuple[str, ...]]:
    classes = list(dict.fromkeys([c.sop_class for c in accepted] + [c.sop_class for c in proposed]))
    scu = {c.sop_class for c in proposed}
    scp = {c.sop_class for c in accepted}
    return [(uid.name, str(uid), "yes" if uid in scu else "no", "yes" if uid in scp else "no") for uid in classes]


def _context_rows(contexts: list[Context]) -> list[tuple[str, ...]]:
    return [(c.sop_class.name, c.role, ", ".join(f"{ts.name} ({ts})" for ts in c.syntaxes)) for c in contexts]


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
