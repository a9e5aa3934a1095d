"""Facts about a series, the routing decision, and its explanation for the admin (every rule, every
matcher, with the value seen) and for logs (rule names and failing keys only, no values)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ie_gateway.route.matchers import split_values
from ie_gateway.vocab import OutputKind, Priority, ReviewPolicy, SegEncoding


@dataclass(frozen=True)
class SeriesFacts:
    """What routing may look at: one instance's header values plus the association and count.

    ``header`` maps DICOM keywords to str, int, float, a list of those, or None; a missing key
    or an empty value counts as absent.
    """

    header: Mapping[str, object]
    calling_ae: str
    called_ae: str
    instances: int


@dataclass(frozen=True)
class Route:
    """One matched rule's order: which model contours the series and where results go.

    ``version`` None means the model's active version, resolved when the series is routed (the
    job keeps that version even if another is activated before it runs).
    """

    rule: str
    model: str
    version: str | None
    outputs: tuple[OutputKind, ...]
    send_to: tuple[str, ...]
    sync: bool
    review: ReviewPolicy = ReviewPolicy.HOLD  # a result failing its model's plausibility checks: hold | flag
    priority: Priority = Priority.NORMAL  # the claim order of its job: high | normal | low
    deliver: bool = True  # False: shadow mode, results stay on the node (agreement still gathered)
    seg_encoding: SegEncoding = SegEncoding.BINARY  # binary | labelmap: a LABELMAP SEG where a destination takes it


@dataclass(frozen=True)
class CheckResult:
    """One matcher on one key: what was expected, the value seen, and whether it matched."""

    key: str
    expected: str
    seen: object
    matched: bool


@dataclass(frozen=True)
class GroupResult:
    """An ``any``/``all`` group: the results of each alternative mapping."""

    mode: str
    matched: bool
    alternatives: tuple[tuple[CheckResult | GroupResult, ...], ...]


Item = CheckResult | GroupResult


@dataclass(frozen=True)
class RuleResult:
    """One rule's verdict. ``shadowed_by`` names the earlier rule that stopped evaluation."""

    rule: str
    matched: bool
    shadowed_by: str | None
    items: tuple[Item, ...]

    @property
    def applied(self) -> bool:
        """True when this rule produced a route."""
        return self.matched and self.shadowed_by is None


@dataclass(frozen=True)
class Explanation:
    """Why each rule did or did not match.

    ``render()`` is for the admin's terminal (``ie-gateway explain``) and shows the values seen;
    ``for_log()`` omits them, because header values may identify the patient.
    """

    rules: tuple[RuleResult, ...]

    def render(self) -> str:
        """Human-readable lines, with the values seen."""
        if not self.rules:
            return "no rules configured: nothing is routed"
        lines: list[str] = []
        for number, result in enumerate(self.rules, start=1):
            lines.append(f"rule {number} {result.rule!r}: {_verdict(result)}")
            lines.extend(_render_items(result.items, indent="  "))
        return "\n".join(lines)

    def for_log(self) -> list[dict[str, object]]:
        """Structured per-rule summary for logs: rule names, verdicts and the keys that failed."""
        return [
            {
                "rule": result.rule,
                "matched": result.matched,
                "applied": result.applied,
                "failed": _failed_keys(result.items),
            }
            for result in self.rules
        ]


@dataclass(frozen=True)
class RouteDecision:
    """The routes of a series (empty: unrouted) and the explanation behind them."""

    routes: tuple[Route, ...]
    explanation: Explanation

    @property
    def routed(self) -> bool:
        """True when at least one rule matched."""
        return bool(self.routes)


def _verdict(result: RuleResult) -> str:
    if not result.matched:
        return "no match"
    if result.shadowed_by is not None:
        return f"matches, but not applied: rule {result.shadowed_by!r} matched first"
    return "MATCH"


def _render_items(items: Sequence[Item], indent: str) -> list[str]:
    lines: list[str] = []
    for item in items:
        mark = "ok" if item.matched else "no"
        if isinstance(item, CheckResult):
            lines.append(f"{indent}{mark}  {item.key} {item.expected} (seen: {_show(item.seen)})")
            continue
        wanted = "at least one" if item.mode == "any" else "every one"
        lines.append(f"{indent}{mark}  {item.mode}: {wanted} of {len(item.alternatives)}")
        for number, alternative in enumerate(item.alternatives, start=1):
            lines.append(f"{indent}      alternative {number}:")
            lines.extend(_render_items(alternative, indent + "        "))
    return lines


def _failed_keys(items: Sequence[Item]) -> list[str]:
    failed = []
    for item in items:
        if not item.matched:
            failed.append(item.key if isinstance(item, CheckResult) else item.mode)
    return failed


def _show(value: object) -> str:
    values = split_values(value)
    if not values:
        return "missing"
    if len(values) == 1:
        return repr(values[0])
    return "[" + ", ".join(repr(v) for v in values) + "]"


def folder_facts(folder: Path, calling_ae: str, called_ae: str) -> list[tuple[str, SeriesFacts]]:
    """The facts of each DICOM series in ``folder`` (files that are not DICOM are skipped), as if
    ``calling_ae`` had sent it to ``called_ae``: what `ie-gateway explain FOLDER` routes. Each is
    labelled by its series UID hashed, never the UID itself."""
    import pydicom

    from ie_gateway.log import uid_hash
    from ie_gateway.store import header_values

    found: dict[str, tuple[Mapping[str, object], int]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError):
            continue
        key = f"series {uid_hash(str(ds.get('SeriesInstanceUID', '')))}"
        header, count = found.get(key, (header_values(ds), 0))
        found[key] = (header, count + 1)
    return [(label, SeriesFacts(header, calling_ae, called_ae, count)) for label, (header, count) in found.items()]
