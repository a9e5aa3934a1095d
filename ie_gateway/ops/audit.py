"""The audit trail: what the node received, routed, delivered and synced, and what admins did.

Read from the index rows retention keeps (jobs, series, transitions, outbox, attempts) and
from the model registry's activation log, so the trail outlives the purged instance files.
Lines carry internal job ids, AE titles, rule and model names, never patient data or UIDs.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass

from ie_gateway.errors import BadDate
from ie_gateway.infer.registry import Registry
from ie_gateway.store import Store
from ie_gateway.store.outbox import Outbox
from ie_gateway.vocab import JobState

# An admin's transition says who in its reason: "replayed by alice", "rerouted by bob: ...".
ADMIN_REASON = re.compile(r"^(?P<action>\w+) by (?P<who>[^\s:;,]+)")
RELATIVE = re.compile(r"^(?P<n>\d+(?:\.\d+)?)(?P<unit>[dhm])$")
UNIT_S = {"d": 86400, "h": 3600, "m": 60}
FIELDS = ("at", "job", "event", "who", "detail")


@dataclass(frozen=True)
class AuditEvent:
    """One line of the trail; ``at`` is Unix time (UTC)."""

    at: float
    job: int | None
    event: str
    detail: str
    who: str = ""

    def row(self) -> dict[str, str]:
        return {
            "at": iso(self.at),
            "job": "" if self.job is None else str(self.job),
            "event": self.event,
            "who": self.who,
            "detail": self.detail,
        }


def iso(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_since(text: str, now: float) -> float:
    """``7d``, ``12h``, ``30m`` back from now, or an ISO 8601 date or time (UTC unless it says)."""
    relative = RELATIVE.match(text)
    if relative:
        return now - float(relative["n"]) * UNIT_S[relative["unit"]]
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise BadDate(f"--since {text!r}: expected e.g. 7d, 12h, 2026-12-01 or 2026-12-01T08:00") from exc
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


def audit_events(
    store: Store, registry: Registry, since: float | None = None, job: int | None = None
) -> list[AuditEvent]:
    """Every event, oldest first, from ``since`` on and for ``job`` when given."""
    events = [*_received(store), *_transitions(store), *_delivered(store), *_synced(store)]
    if job is None:
        events += [*_activations(registry), *_imports(registry)]
    return sorted(
        (e for e in events if (since is None or e.at >= since) and (job is None or e.job == job)),
        key=lambda e: (e.at, e.job or 0),
    )


def _received(store: Store) -> Iterable[AuditEvent]:
    for j in store.index.jobs():
        yield AuditEvent(
            j.last_instance_at,
            j.id,
            "received",
            f"{j.instances} instances from {j.calling_ae} to {j.called_ae} (first at {iso(j.created_at)})",
        )


def _transitions(store: Store) -> Iterable[AuditEvent]:
    jobs = {j.id: j for j in store.index.jobs()}
    for t in store.index.transitions():
        job_id, at, old, new, reason = t.job_id, t.at, t.from_state, t.to_state, t.reason
        admin = ADMIN_REASON.match(reason or "")
        if t.who or admin:  # the transition's own record of who, else what its reason says
            who = t.who or (admin["who"] if admin else "")
            yield AuditEvent(at, job_id, "admin", f"{old} -> {new}: {reason}", who=who)
        elif new == JobState.ROUTED and job_id in jobs:
            j = jobs[job_id]
            rules = ", ".join(r.rule for r in j.routes) or "?"
            yield AuditEvent(at, job_id, "routed", f"rule {rules} -> {j.model}@{j.model_version}")
        elif new in (JobState.UNROUTED, JobState.REFUSED, JobState.FAILED, JobState.DELIVERED, JobState.EXCLUDED):
            yield AuditEvent(at, job_id, new, reason or "")


def _delivered(store: Store) -> Iterable[AuditEvent]:
    for b in Outbox(store.index).delivered_batches():
        yield AuditEvent(b.at, b.job_id, "sent", f"{b.files} files to {b.destination}")


def _synced(store: Store) -> Iterable[AuditEvent]:
    for j in store.index.jobs():
        record = j.detail.synced
        if record is not None and record.at:
            at = dt.datetime.fromisoformat(record.at).timestamp()
            yield AuditEvent(at, j.id, "synced", f"{record.ct} CT and {record.ai} result files, anonymised")


def _activations(registry: Registry) -> Iterable[AuditEvent]:
    for a in registry.history():
        at = dt.datetime.fromisoformat(a.at).timestamp()
        yield AuditEvent(
            at, None, "admin", f"activated {a.name}@{a.version} (was {a.previous or 'none'})", who=a.by or ""
        )


def _imports(registry: Registry) -> Iterable[AuditEvent]:
    """Who vouched for each imported model version: the key that signed it, or the admin who
    let it in unsigned."""
    for r in registry.imports():
        at = dt.datetime.fromisoformat(r.at).timestamp()
        if r.allowed_unsigned_by is not None:
            detail = f"imported {r.name}@{r.version} UNSIGNED (--allow-unsigned)"
            yield AuditEvent(at, None, "admin", detail, who=r.allowed_unsigned_by)
        else:
            yield AuditEvent(at, None, "imported", f"imported {r.name}@{r.version} signed by {r.signed_by or '?'}")


def render(events: list[AuditEvent], as_csv: bool) -> str:
    """Aligned text lines, or CSV with a header row."""
    if as_csv:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(e.row() for e in events)
        return out.getvalue()
    lines = []
    for e in events:
        r = e.row()
        job = f"job {r['job']}" if r["job"] else "-"
        who = f" [{r['who']}]" if r["who"] else ""
        lines.append(f"{r['at']}  {job:<9} {r['event']:<9} {r['detail']}{who}")
    return "\n".join(lines) + ("\n" if lines else "")
