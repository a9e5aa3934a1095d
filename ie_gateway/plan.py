"""The output plan: which result files a routed job will make, and where each goes.

Made once, when the job is routed, and kept in its detail (``JobDetail.plan``): one
``PlannedOutput`` per file, with its kind, its route, its destinations, the names file it
applies and its UIDs. The write stage writes exactly these files, the outbox sends them, and
agreement and the case sync read them from the plan, so no other module decides a result
file's name or which destination takes which file.

A destination takes only the kinds its ``accepts`` lists; destinations that take the same
names share one file; a destination with a names file gets a file of its own, and so does a
LABELMAP SEG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ie_gateway.config import Destination
from ie_gateway.store.records import JobRoute, OutputPlan, OutputUIDs, PlannedOutput, output_file_name
from ie_gateway.vocab import OutputKind, SegEncoding

#: The CT as the volume stage checked it, in the job's folder.
CT_FILE = "ct.mha"


def labels_file(route: int) -> str:
    """Route ``route``'s label map in the job's folder (inference writes it, write reads it)."""
    return f"labels-{route}.mha"


def plan_outputs(
    routes: Sequence[JobRoute], destinations: Mapping[str, Destination], previous: OutputPlan | None = None
) -> OutputPlan:
    """The files the routes' outputs become, route by route, RT-STRUCT first (it is what the
    planner waits for). A file ``previous`` already planned keeps its UIDs."""
    kept = {o.file: o.uids for o in previous.outputs} if previous is not None else {}
    outputs = []
    for index, route in enumerate(routes):
        for kind in sorted(route.outputs, key=lambda k: k is not OutputKind.RTSTRUCT):
            for (names, encoding), dests in _groups(route, kind, destinations).items():
                file = output_file_name(kind, index, dests[0] if names else None, encoding)
                uids = kept.get(file) or OutputUIDs.new()
                outputs.append(PlannedOutput(kind, index, tuple(dests), names or None, file, uids, encoding))
    return OutputPlan(tuple(outputs))


def not_sent(routes: Sequence[JobRoute], destinations: Mapping[str, Destination]) -> dict[str, tuple[OutputKind, ...]]:
    """Destination → the kinds a route asks for that it does not accept (held back there)."""
    refused: dict[str, list[OutputKind]] = {}
    for route in routes:
        for kind in route.outputs:
            for dest in route.send_to:
                if dest in destinations and kind not in destinations[dest].accepts:
                    refused.setdefault(dest, []).append(kind)
    return {dest: tuple(kinds) for dest, kinds in refused.items()}


def _groups(
    route: JobRoute, kind: OutputKind, destinations: Mapping[str, Destination]
) -> dict[tuple[str, SegEncoding], list[str]]:
    """The route's destinations that take ``kind``, grouped by the names file they apply
    ("" for none) and the SEG encoding they get: each group gets one file. A SEG is a LABELMAP
    SEG for a destination with ``labelmap: true`` when the route asks for ``seg_encoding:
    labelmap``; the route's other destinations get the BINARY SEG."""
    groups: dict[tuple[str, SegEncoding], list[str]] = {}
    for dest in route.send_to:
        cfg = destinations.get(dest)
        if cfg is not None and kind not in cfg.accepts:
            continue
        labelmap = (
            kind is OutputKind.SEG and route.seg_encoding is SegEncoding.LABELMAP and cfg is not None and cfg.labelmap
        )
        encoding = SegEncoding.LABELMAP if labelmap else SegEncoding.BINARY
        groups.setdefault((str(cfg.names) if cfg is not None and cfg.names else "", encoding), []).append(dest)
    return groups
