"""Prometheus metrics of the node, served as text on the HTTP endpoint's `/metrics`.

Events (associations, instances, C-STORE statuses, stage durations) are counted where they
happen, in this module's registry. Levels that live in the index or on disk (jobs by state,
outbox depth, dead letters, delivery attempts, free space, active model versions) are read at
scrape time by :class:`NodeCollector`, so they are right after a restart and cost nothing between
scrapes.

With ``node.listener_processes`` above 1 the listener children count their associations and
instances in prometheus_client's multiprocess files (a private folder the main process names
in their environment, :class:`ListenerCounts`); the main process adds them to its own series
when it is scraped, so `/metrics` counts what every process received. A child that ended
keeps its counts (its files stay); its share of the open-associations gauge goes with it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from ie_gateway.store import Store
from ie_gateway.store.outbox import Outbox
from ie_gateway.store.space import DiskSpace
from ie_gateway.store.states import JobState
from ie_gateway.vocab import OutboxState

# The *_created series only double what a scraper already knows.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated
REGISTRY = CollectorRegistry()
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: the environment variable that puts a process's metrics in prometheus_client's multiprocess
#: files; it must be set before prometheus_client is imported, so only children get it
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# livesum: across listener processes, the sum of those running (a child's files say its value)
ASSOCIATIONS_OPEN = Gauge(
    "ie_gateway_associations_open", "DICOM associations open now", registry=REGISTRY, multiprocess_mode="livesum"
)
ASSOCIATIONS_ACCEPTED = Counter(
    "ie_gateway_associations_accepted_total", "DICOM associations accepted", ["tls"], registry=REGISTRY
)
CONNECTIONS_REFUSED = Counter(
    "ie_gateway_connections_refused_total",
    "Connections or association requests refused, by reason (probe: closed without a word; "
    "silent: said nothing within node.acse_timeout_s; busy: max_associations reached; "
    "disk_reserve: free space below storage.reserve; ...)",
    ["reason"],
    registry=REGISTRY,
)
INSTANCES_RECEIVED = Counter(
    "ie_gateway_instances_received_total", "Instances stored (duplicates not counted)", registry=REGISTRY
)
BYTES_RECEIVED = Counter("ie_gateway_received_bytes_total", "Bytes of instances stored", registry=REGISTRY)
CSTORE_RESPONSES = Counter(
    "ie_gateway_cstore_responses_total", "C-STORE responses sent, by status", ["status"], registry=REGISTRY
)
STAGE_SECONDS = Histogram(
    "ie_gateway_stage_seconds",
    "Time a worker stage took",
    ["stage"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900, 1800),
    registry=REGISTRY,
)
INFERENCE_DEVICE = Gauge(
    "ie_gateway_inference_device_info", "The device inference runs on (value 1)", ["device"], registry=REGISTRY
)


@dataclass(frozen=True)
class ModelVersionLevel:
    """One active model version, for the `ie_gateway_model_active_info` series."""

    name: str
    version: str


class NodeCollector(Collector):
    """Levels read from the index and the disk when Prometheus scrapes."""

    def __init__(
        self,
        store: Store,
        space: Callable[[], DiskSpace],
        active_models: Callable[[], list[ModelVersionLevel]],
        drift: Callable[[], dict[tuple[str, str, str], int]] = dict,
    ) -> None:
        self.store = store
        self.space = space
        self.active_models = active_models
        self.drift = drift

    def collect(self) -> Iterable[Metric]:
        jobs = GaugeMetricFamily("ie_gateway_jobs", "Jobs (series) by state", labels=["state"])
        counts = self.store.index.job_counts()
        for state in JobState:
            jobs.add_metric([state.value], counts.get(state, 0))
        yield jobs
        outbox = Outbox(self.store.index)
        by_state = outbox.counts()
        yield GaugeMetricFamily(
            "ie_gateway_outbox_pending", "Results waiting to be delivered", value=by_state.get(OutboxState.PENDING, 0)
        )
        yield GaugeMetricFamily(
            "ie_gateway_dead_letters",
            "Results given up on after the retry limit (state failed)",
            value=by_state.get(OutboxState.FAILED, 0),
        )
        yield CounterMetricFamily(
            "ie_gateway_delivery_attempts", "C-STORE attempts to destinations", value=outbox.attempt_count()
        )
        space = self.space()
        yield GaugeMetricFamily("ie_gateway_disk_free_bytes", "Free space under storage.root", value=space.free_bytes)
        yield GaugeMetricFamily(
            "ie_gateway_disk_reserve_bytes",
            "Free space below which new associations are refused",
            value=space.reserve_bytes,
        )
        models = GaugeMetricFamily(
            "ie_gateway_model_active_info", "Active model versions (value 1)", labels=["model", "version"]
        )
        for level in self.active_models():
            models.add_metric([level.name, level.version], 1)
        yield models
        alarms = GaugeMetricFamily(
            "ie_gateway_agreement_drift",
            "1 while a structure's recent Dice with approved contours is below its baseline",
            labels=["model", "version", "structure"],
        )
        for (model, version, structure), alarm in sorted(self.drift().items()):
            alarms.add_metric([model, version, structure], alarm)
        yield alarms


class ListenerCounts:
    """The listener children's metrics: a private folder of prometheus_client's multiprocess
    files, made empty when the node starts and removed when it stops."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="ie-gateway-listener-metrics-"))

    def environment(self) -> dict[str, str]:
        """What a child's environment needs for its metrics to be counted here."""
        return {MULTIPROCESS_ENV: str(self.folder)}

    def ended(self, pid: int) -> None:
        """A child ended: its live gauges stop counting (its counters stay)."""
        multiprocess.mark_process_dead(pid, str(self.folder))  # type: ignore[no-untyped-call]  # unannotated

    def families(self) -> dict[str, Metric]:
        """The children's metrics, summed over the children, by family name."""
        files = [str(f) for f in self.folder.glob("*.db")]
        merged = multiprocess.MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
        return {m.name: m for m in merged}

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class _WithChildren:
    """The registry's families with the listener children's samples added to them."""

    def __init__(self, registry: CollectorRegistry, children: ListenerCounts) -> None:
        self.registry = registry
        self.children = children

    def collect(self) -> Iterator[Metric]:
        theirs = self.children.families()
        for family in self.registry.collect():
            extra = theirs.get(family.name)
            if extra is not None:
                family.samples = _summed(family.samples, extra.samples)
            yield family


def _summed(ours: list[Sample], theirs: list[Sample]) -> list[Sample]:
    """``ours`` with the values of ``theirs`` added, sample by sample (name and labels)."""
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for sample in (*ours, *theirs):
        key = (sample.name, tuple(sorted(sample.labels.items())))
        values[key] = values.get(key, 0.0) + sample.value
    return [Sample(name, dict(labels), value) for (name, labels), value in values.items()]


_listener_counts: ListenerCounts | None = None


def count_listeners(counts: ListenerCounts | None) -> None:
    """Add the listener children's counts to what `/metrics` shows (None: no longer)."""
    global _listener_counts
    _listener_counts = counts


def exposition() -> bytes:
    """The registry in Prometheus text format, the listener children's counts included."""
    children = _listener_counts
    return generate_latest(REGISTRY if children is None else _WithChildren(REGISTRY, children))
