"""The admin's pages: jobs, one job, failures and held jobs, model versions, agreement trends.

Server-side rendered from the index and the registry with Jinja2 templates; nothing on them
identifies a patient (no names, IDs, birth dates or clear UIDs: series are shown hashed).
The buttons need a signed-in person (or the admin token); with named accounts the read-only
views do too, unless configured open (see :mod:`.auth`). A held job's page has the slice viewer
(:mod:`.viewer`) and takes the reviewer's comment with release and reject.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import structlog
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.templating import Jinja2Templates

from ie_gateway.config import GatewayConfig
from ie_gateway.errors import GatewayError
from ie_gateway.infer.registry import Registry
from ie_gateway.ops import admin
from ie_gateway.qa import agreement, drift
from ie_gateway.status import job_status
from ie_gateway.store import Job, JobState, Store
from ie_gateway.store.outbox import Outbox
from ie_gateway.store.states import QUEUED
from ie_gateway.web.accounts import USERS_FILE, Accounts
from ie_gateway.web.auth import COOKIE, MAX_FAILURES, TOKEN_USER, Guard, admin_token
from ie_gateway.web.plots import dice_plot
from ie_gateway.web.viewer import WINDOWS, SliceViewer

log = structlog.get_logger(__name__)

#: An admin action: (store, job id, who[, comment]) → what it did; raises GatewayError when it
#: cannot. Those in COMMENTED also take the person's comment.
Action = Callable[..., object]

#: A page's request handler.
Handler = Callable[[Request], Awaitable[Response]]

#: Which action applies to a job in which state (a button is shown only where it applies).
ACTION_STATES: dict[str, frozenset[JobState]] = {
    "retry": frozenset({JobState.FAILED}),
    "reroute": frozenset({JobState.FAILED, JobState.UNROUTED, JobState.REFUSED, JobState.NEEDS_REVIEW}),
    "release": frozenset({JobState.NEEDS_REVIEW}),
    "reject": frozenset({JobState.NEEDS_REVIEW}),
}
#: Actions that take the person's comment (a reviewer says why they release or reject).
COMMENTED = frozenset({"release", "reject"})
#: States the failures page lists: given up on, or held for a person.
ATTENTION = (JobState.FAILED, JobState.NEEDS_REVIEW)


def default_actions() -> dict[str, Action]:
    """The actions ``ie_gateway.ops.admin`` offers (retry, and reroute/release where present)."""
    return {name: getattr(admin, name) for name in ACTION_STATES if callable(getattr(admin, name, None))}


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _job_row(store: Store, job: Job) -> dict[str, Any]:
    """What the pages show of a job: `status`'s view, formatted for a page."""
    return {
        **job_status(store, job, time.time()),
        "reason": job.reason or "",
        "replaced": job.detail.replaced_instances,
        "modality": job.header.get("Modality", ""),
        "model": f"{job.model}@{job.model_version}" if job.model else "",
        "received": _when(job.created_at),
        "updated": _when(job.updated_at),
        "timings": job.detail.timings_s,
        "linked_to": job.detail.linked_to,
        "held_by": job.claimed_by or "",
    }


def _queue_row(job: Job) -> dict[str, Any]:
    """A job waiting for the worker, as the queue table shows it."""
    return {
        "id": job.id,
        "state": job.state.value,
        "priority": job.priority.value,
        "model": f"{job.model}@{job.model_version}" if job.model else "",
        "calling_ae": job.calling_ae,
        "completed": _when(job.completed_at),
    }


class AdminPages:
    """The request handlers, bound to one node's store, registry and settings."""

    def __init__(
        self, cfg: GatewayConfig, store: Store, registry: Registry, guard: Guard, actions: Mapping[str, Action]
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.registry = registry
        self.guard = guard
        self.actions = dict(actions)
        self.templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
        self._commissioned = cfg.storage.root / drift.COMMISSIONED_FILE
        self.viewer = SliceViewer(cfg, store, registry)

    def _render(self, request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
        alarms = drift.alarms(self.store.index, self.cfg.agreement, self.cfg.models_dir, self._commissioned)
        return self.templates.TemplateResponse(
            request,
            name,
            {
                "alarms": alarms,
                "signed_in": self.guard.user(request),
                "actions_enabled": self.guard.enabled,
                "accounts": bool(self.guard.accounts),
                "csrf": self.guard.csrf_for(request),
                "node": self.cfg.node.ae_title,
                **context,
            },
            status_code=status_code,
        )

    def _buttons(self, job: Job) -> list[str]:
        return [name for name in self.actions if job.state in ACTION_STATES[name]]

    async def jobs(self, request: Request) -> Response:
        wanted = request.query_params.get("state") or None
        all_jobs = self.store.index.jobs()
        counts: dict[str, int] = {}
        for job in all_jobs:
            counts[job.state.value] = counts.get(job.state.value, 0) + 1
        shown = [j for j in all_jobs if wanted is None or j.state.value == wanted]
        rows = [{**_job_row(self.store, j), "buttons": self._buttons(j)} for j in reversed(shown)]
        queue = self.store.index.queue_order(QUEUED, max_wait_s=self.cfg.worker.max_wait_s)
        return self._render(
            request,
            "jobs.html",
            title="Jobs",
            jobs=rows,
            queue=[_queue_row(j) for j in queue],
            max_wait=f"{self.cfg.worker.max_wait_s:g} s",
            counts=counts,
            wanted=wanted,
            states=[s.value for s in JobState],
        )

    async def failures(self, request: Request) -> Response:
        states = list(ATTENTION)
        rows = [
            {**_job_row(self.store, j), "buttons": self._buttons(j)} for j in reversed(self.store.index.jobs(states))
        ]
        return self._render(request, "failures.html", title="Failures and held jobs", jobs=rows)

    async def job(self, request: Request) -> Response:
        job = self._job_or_none(request)
        if job is None:
            return self._render(
                request,
                "message.html",
                404,
                title="No such job",
                message=f"There is no job {request.path_params['job_id']}.",
            )
        deliveries = [
            {
                "destination": r.destination,
                "state": r.state.value,
                "attempts": r.attempts,
                "last_status": r.last_status,
                "last_error": r.last_error,
            }
            for r in Outbox(self.store.index).job_rows(job.id)
        ]
        transitions = [
            {"at": _when(t.at), "from": t.from_state or "", "to": t.to_state, "reason": t.reason or ""}
            for t in self.store.index.transitions(job.id)
        ]
        findings = list(job.detail.review.reasons) if job.detail.review is not None else []
        viewer = self._viewer_context(job)
        return self._render(
            request,
            "job.html",
            title=f"Job {job.id}",
            job=_job_row(self.store, job),
            job_buttons=self._buttons(job),
            qa=bool(job.detail.qa_png),
            volumes=job.detail.volumes_cc,
            findings=findings,
            needs_review=job.state is JobState.NEEDS_REVIEW,
            deliveries=deliveries,
            transitions=transitions,
            figures=agreement.rows(self.store.index, ct_job=job.id),
            approvals=[asdict(a) for a in job.detail.approved],
            viewer=viewer,
            commented=COMMENTED,
        )

    def _viewer_context(self, job: Job) -> dict[str, Any] | None:
        """What the slice viewer needs: slice counts per plane, structures, approved or not."""
        if not self.viewer.available(job):
            return None
        try:
            volumes = self.viewer.volumes(job)
        except (GatewayError, OSError, RuntimeError) as exc:  # RuntimeError: SimpleITK's unreadable file
            log.warning("slice viewer unavailable", job=job.id, error=str(exc))
            return None
        return {
            "sizes": volumes.sizes(),
            "structures": [
                {"name": s.name, "color": "#" + "".join(f"{c:02x}" for c in s.color)} for s in volumes.structures
            ],
            "approved": bool(volumes.approved),
            "windows": list(WINDOWS),
        }

    async def slice_png(self, request: Request) -> Response:
        job = self._job_or_none(request)
        if job is None or not self.viewer.available(job):
            return Response("no slices for this job", status_code=404, media_type="text/plain")
        query = request.query_params
        hidden = {name for name in query.get("hide", "").split(",") if name}
        try:
            png = self.viewer.volumes(job).render(
                str(request.path_params["plane"]),
                int(request.path_params["index"]),
                query.get("window", "soft"),
                hidden,
                query.get("approved", "1") == "1",
            )
        except ValueError as exc:
            return Response(str(exc), status_code=404, media_type="text/plain")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})

    async def qa_png(self, request: Request) -> Response:
        job = self._job_or_none(request)
        path = self.store.qa_png(job) if job is not None else None
        # only ever a file inside the node's results folder
        if path is None or not path.is_file() or not path.resolve().is_relative_to(self.store.results.resolve()):
            return Response("no QA picture", status_code=404, media_type="text/plain")
        return FileResponse(path, media_type="image/png")

    async def models(self, request: Request) -> Response:
        versions = self.registry.list()
        history = [
            {"name": a.name, "version": a.version, "previous": a.previous or "", "at": a.at, "by": a.by or ""}
            for a in reversed(self.registry.history())
        ]
        refused = [{"spec": spec, **r} for spec, r in sorted(self.registry.refusals().items())]
        return self._render(
            request, "models.html", title="Model versions", versions=versions, history=history, refused=refused
        )

    async def trends(self, request: Request) -> Response:
        settings = self.cfg.agreement
        rows = agreement.rows(self.store.index)
        states = {
            (s.model, s.version, s.structure): s
            for s in drift.current(self.store.index, settings, self.cfg.models_dir, self._commissioned)
        }
        series: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for row in rows:
            series.setdefault((row["model"], row["model_version"], row["structure"]), []).append(row)
        shadow = self._shadow_versions(rows)
        plots = []
        for key, items in sorted(series.items()):
            state = states.get(key)
            threshold = state.baseline - settings.margin if state is not None and state.baseline is not None else None
            plots.append(
                {
                    "model": key[0],
                    "version": key[1],
                    "structure": key[2],
                    "shadow": key[:2] in shadow,
                    "state": state,
                    "plot": dice_plot(
                        [r["dice"] for r in items],
                        [f"job {r['ct_job']}, {_when(r['at'])}" for r in items],
                        settings.window,
                        threshold,
                    ),
                }
            )
        return self._render(
            request,
            "agreement.html",
            title="Agreement with approved contours",
            plots=plots,
            summary=[{**r, "shadow": (r["model"], r["version"]) in shadow} for r in agreement.summary(rows)],
            figures=agreement.FIGURES,
            settings=settings,
        )

    def _shadow_versions(self, rows: list[dict[str, Any]]) -> set[tuple[str, str]]:
        """(model, version) pairs whose figures come from shadow routes (``deliver: false``)."""
        shadow = set()
        for ct_job in {r["ct_job"] for r in rows}:
            job = self._job_by_id(ct_job)
            shadow |= {(r.model, r.version) for r in (job.routes if job else ()) if not r.deliver}
        return shadow

    async def login(self, request: Request) -> Response:
        wanted = _local(request.query_params.get("next", "/failures"))
        if request.method == "GET":
            return self._render(request, "login.html", title="Sign in", next=wanted)
        form = await request.form()
        name, address = _field(form, "name").strip(), request.client.host if request.client else "?"
        keys = (f"address:{address}", f"name:{name}") if name else (f"address:{address}",)
        if self.guard.throttled(*keys):
            log.warning("admin sign-in throttled", failures=MAX_FAILURES)
            why = "Too many failed sign-ins: wait a quarter of an hour and try again."
            return self._render(request, "login.html", 429, title="Sign in", error=why, next=wanted)
        if self.guard.accounts:
            user = name if self.guard.password_matches(name, _field(form, "password")) else None
        else:
            user = TOKEN_USER if self.guard.token_matches(_field(form, "token")) else None
        if not self.guard.same_origin(request) or user is None:
            self.guard.failed(*keys)
            log.warning("admin sign-in refused")
            why = "Wrong name or password." if self.guard.accounts else "That is not the admin token."
            return self._render(request, "login.html", 403, title="Sign in", error=why, next=wanted)
        response = RedirectResponse(_local(_field(form, "next")), status_code=303)
        response.set_cookie(
            COOKIE, self.guard.new_session(user), httponly=True, samesite="strict", secure=request.url.scheme == "https"
        )
        log.info("admin signed in", user=user)
        return response

    async def logout(self, request: Request) -> Response:
        self.guard.end_session(request)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    def signed_in_only(self, handler: Handler) -> Handler:
        """``handler`` for people signed in (when the page needs it): others go to sign in."""

        async def guarded(request: Request) -> Response:
            if self.guard.pages_need_sign_in and self.guard.user(request) is None:
                return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
            return await handler(request)

        return guarded

    async def act(self, request: Request) -> Response:
        form = await request.form()
        name = str(request.path_params["action"])
        allowed, who, why = self.guard.allows(request, _field(form, "csrf") or None)
        if not allowed or who is None:
            log.warning("admin action refused", action=name, why=why)
            return self._render(request, "message.html", 403, title="Not allowed", message=why)
        action = self.actions.get(name)
        job = self._job_or_none(request)
        if action is None or job is None:
            return self._render(
                request,
                "message.html",
                404,
                title="Not found",
                message=f"No action {name!r} for job {request.path_params['job_id']}.",
            )
        comment = _field(form, "comment")
        try:
            result = action(self.store, job.id, who, comment) if name in COMMENTED else action(self.store, job.id, who)
        except GatewayError as exc:
            return self._render(request, "message.html", 409, title=f"Job {job.id}: {name} not done", message=str(exc))
        log.info("admin action", action=name, job=job.id, who=who)
        done = f"{name} done" + (f" ({result} deliveries queued)" if isinstance(result, int) else "")
        return self._render(
            request,
            "message.html",
            title=f"Job {job.id}: {done}",
            message=f"{done}; the node picks the job up within seconds.",
            job_id=job.id,
        )

    def _job_or_none(self, request: Request) -> Job | None:
        return self._job_by_id(int(request.path_params["job_id"]))

    def _job_by_id(self, job_id: int) -> Job | None:
        try:
            return self.store.index.job(job_id)
        except GatewayError:
            return None


def _field(form: FormData, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def _local(target: str) -> str:
    """A redirect target on this site only."""
    return target if target.startswith("/") and not target.startswith("//") else "/jobs"


def web_routes(
    cfg: GatewayConfig,
    store: Store,
    registry: Registry,
    *,
    token: str | None = None,
    actions: Mapping[str, Action] | None = None,
) -> list[BaseRoute]:
    """The admin page's routes, to mount in the node's HTTP app (beside /metrics).

    ``token`` defaults to :func:`~ie_gateway.web.auth.admin_token` (environment or systemd
    credential); ``actions`` to what :mod:`ie_gateway.ops.admin` offers.
    """
    pages = AdminPages(
        cfg,
        store,
        registry,
        Guard(token if token is not None else admin_token(), Accounts(cfg.storage.root / USERS_FILE), cfg.http),
        default_actions() if actions is None else actions,
    )
    guarded = pages.signed_in_only
    return [
        Route("/", lambda request: RedirectResponse("/jobs", status_code=307)),
        Route("/jobs", guarded(pages.jobs)),
        Route("/jobs/{job_id:int}", guarded(pages.job)),
        Route("/jobs/{job_id:int}/qa.png", guarded(pages.qa_png)),
        Route("/jobs/{job_id:int}/slice/{plane:str}/{index:int}.png", guarded(pages.slice_png)),
        Route("/jobs/{job_id:int}/{action:str}", pages.act, methods=["POST"]),
        Route("/failures", guarded(pages.failures)),
        Route("/models", guarded(pages.models)),
        Route("/agreement", guarded(pages.trends)),
        Route("/login", pages.login, methods=["GET", "POST"]),
        Route("/logout", pages.logout, methods=["POST"]),
    ]


__all__ = ["Action", "AdminPages", "default_actions", "web_routes"]
