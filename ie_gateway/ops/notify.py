"""Webhooks: a JSON event POSTed when a job needs review, fails or is delivered, or a model
version drifts, so a department's chat or ticketing system hears of it.

Events come from the index, not from the stages: each webhook has a thread that reads the job
transitions into the states it listens for, newer than the last one it told (its cursor, a
small file under ``storage.root/notify/``), and looks at the drift alarms whenever the index
moved on. So no stage ever waits on a chat server; an event is told at least once, across
restarts; and a slow or dead webhook delays no other. An attempt that fails is retried with
exponential backoff; after ``max_attempts`` the event is logged as not told and the next one
goes. With several nodes on one index, a pass holds the index's lock for that webhook.

An event carries no patient data: the job id, its state and reason (UID-shaped text hashed as
in the logs), the model and version, the node and a link to the job's page. A new webhook
starts from now: it is not told the past.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import threading
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

import ie_gateway
from ie_gateway.config import GatewayConfig, Webhook
from ie_gateway.errors import NotifyError
from ie_gateway.files import fsync_dir
from ie_gateway.log import redact
from ie_gateway.qa import drift
from ie_gateway.store import Index, JobState
from ie_gateway.store.records import Transition
from ie_gateway.vocab import NotifyEvent

log = structlog.get_logger(__name__)

#: The job states a webhook may listen for, by the name it uses in ``on:``.
JOB_EVENTS = {
    NotifyEvent.NEEDS_REVIEW: JobState.NEEDS_REVIEW,
    NotifyEvent.FAILED: JobState.FAILED,
    NotifyEvent.DELIVERED: JobState.DELIVERED,
}
BACKOFF_CAP_S = 300.0
#: Events told per pass, so a backlog does not hold the webhook's lock for long.
PASS_EVENTS = 50


@dataclass
class Cursor:
    """What a webhook has been told: the newest transition, and the drift alarms in force."""

    last_transition: int
    drift_checked: int  # the newest transition when the drift alarms were last compared
    drift: list[str] = field(default_factory=list)  # "model@version/structure" of alarms told

    @classmethod
    def load(cls, path: Path, start: int) -> Cursor:
        """The cursor on disk, or one starting at ``start`` for a new webhook."""
        try:
            raw = json.loads(path.read_text())
            return cls(int(raw["last_transition"]), int(raw["drift_checked"]), [str(k) for k in raw["drift"]])
        except FileNotFoundError:
            return cls(start, start)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("notify cursor unreadable; starting from now", cursor=path.name, error=str(exc))
            return cls(start, start)

    def save(self, path: Path) -> None:
        """Write atomically: a crash leaves the old cursor or the new one (an event told twice,
        never one skipped)."""
        tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
        with tmp.open("w") as fh:
            json.dump(asdict(self), fh)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
        fsync_dir(path.parent)


def hook_id(hook: Webhook) -> str:
    """A short stable name for a webhook (its cursor file, its lock), not its URL, which may
    carry a token."""
    return hashlib.sha256(hook.url.encode()).hexdigest()[:12]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _clean(event: dict[str, Any]) -> dict[str, Any]:
    """The event as the logs would keep it: identifying keys dropped, UID-shaped text hashed."""
    return dict(redact(None, "", event))


def job_event(index: Index, transition: Transition, node: str, base_url: str) -> dict[str, Any]:
    """The JSON event of a job's transition."""
    job = index.job(transition.job_id)
    return _clean(
        {
            "event": transition.to_state,
            "job": job.id,
            "state": transition.to_state,
            "reason": transition.reason,
            "model": job.model,
            "model_version": job.model_version,
            "rules": [r.rule for r in job.routes],
            "at": dt.datetime.fromtimestamp(transition.at, dt.UTC).isoformat(timespec="seconds"),
            "node": node,
            "link": f"{base_url}/jobs/{job.id}",
        }
    )


def drift_event(state: drift.DriftState, node: str, base_url: str) -> dict[str, Any]:
    """The JSON event of a structure whose agreement has drifted."""
    return _clean(
        {
            "event": NotifyEvent.DRIFT.value,
            "model": state.model,
            "model_version": state.version,
            "structure": state.structure,
            "reason": state.message(),
            "recent_dice": state.recent,
            "baseline_dice": state.baseline,
            "cases": state.cases,
            "at": _now(),
            "node": node,
            "link": f"{base_url}/agreement",
        }
    )


def post_json(url: str, event: dict[str, Any], timeout_s: float) -> None:
    """POST ``event`` as JSON; NotifyError unless the receiver answers 2xx."""
    request = urllib.request.Request(
        url,
        data=json.dumps(event).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": f"ie_gateway/{ie_gateway.__version__}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as rsp:  # http(s) only, checked in config
            status = int(rsp.status)
    except urllib.error.HTTPError as exc:
        raise NotifyError(f"answered HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise NotifyError(f"not reachable: {getattr(exc, 'reason', exc)}") from exc
    if not 200 <= status < 300:
        raise NotifyError(f"answered HTTP {status}")


class _Stopping(Exception):
    """The node stops while an event waits for its next attempt: it stays untold (cursor kept)."""


class Notifier:
    """One thread per webhook, each telling its events in order, on its own."""

    def __init__(self, cfg: GatewayConfig, index: Index, every_s: float = 1.0) -> None:
        self.cfg = cfg
        self.index = index
        self.every_s = every_s
        self.folder = cfg.storage.root / "notify"
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start a thread per webhook; a new webhook's cursor is made now, so it hears of
        everything from the node's start on, and of nothing before."""
        self.folder.mkdir(parents=True, exist_ok=True)
        newest = self.index.last_transition_id()
        for hook in self.cfg.notify:
            path = self.folder / f"{hook_id(hook)}.json"
            if not path.exists():
                Cursor(newest, newest).save(path)
            thread = threading.Thread(target=self._run, args=(hook,), name=f"notify-{hook_id(hook)}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop the threads; an event mid-backoff stays untold and goes after the restart."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self, hook: Webhook) -> None:
        while not self._stop.is_set():
            try:
                with self.index.singleton(f"notify-{hook_id(hook)}") as mine:
                    if mine:
                        self.tell_pending(hook)
            except _Stopping:
                return
            except Exception:  # the top of a notifier thread: log, wait, go on
                log.exception("notify pass failed", webhook=hook_id(hook))
            self._stop.wait(self.every_s)

    def tell_pending(self, hook: Webhook) -> int:
        """Tell ``hook`` every event it has not been told yet (at most a pass's worth); return
        how many were told."""
        path = self.folder / f"{hook_id(hook)}.json"
        cursor = Cursor.load(path, self.index.last_transition_id())
        node, base = self.cfg.node.ae_title, self.cfg.http.page_url()
        told = 0
        states = [JOB_EVENTS[name] for name in hook.on if name in JOB_EVENTS]
        for transition_id, transition in self.index.transitions_after(cursor.last_transition, states, PASS_EVENTS):
            told += self._tell(hook, job_event(self.index, transition, node, base))
            cursor.last_transition = transition_id
            cursor.save(path)
        newest = self.index.last_transition_id()
        if NotifyEvent.DRIFT in hook.on and newest > cursor.drift_checked:
            alarms = drift.alarms(self.index, self.cfg.agreement, self.cfg.models_dir)
            keys = {f"{s.model}@{s.version}/{s.structure}": s for s in alarms}
            for key in sorted(set(keys) - set(cursor.drift)):
                told += self._tell(hook, drift_event(keys[key], node, base))
            cursor.drift, cursor.drift_checked = sorted(keys), newest
            cursor.save(path)
        return told

    def _tell(self, hook: Webhook, event: dict[str, Any]) -> int:
        """POST one event, retrying with backoff; 1 when told, 0 when it was given up."""
        delay = hook.backoff_s
        for attempt in range(1, hook.max_attempts + 1):
            try:
                post_json(hook.url, event, hook.timeout_s)
            except NotifyError as exc:
                if attempt == hook.max_attempts:
                    log.error(
                        "notification not told",
                        webhook=hook_id(hook),
                        kind=event["event"],
                        job=event.get("job"),
                        attempts=attempt,
                        error=str(exc),
                    )
                    return 0
                log.warning("notification failed; retrying", webhook=hook_id(hook), attempt=attempt, error=str(exc))
                if self._stop.wait(delay):
                    raise _Stopping from exc
                delay = min(delay * 2, BACKOFF_CAP_S)
                continue
            log.info("notified", webhook=hook_id(hook), kind=event["event"], job=event.get("job"), attempt=attempt)
            return 1
        return 0
