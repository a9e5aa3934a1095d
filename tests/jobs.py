"""Typed index records for tests that build jobs by hand."""

from __future__ import annotations

from ie_gateway.store import JobRoute, OutputKind


def job_route(model: str = "m", version: str = "1", *, rule: str = "test", sync: bool = False) -> JobRoute:
    """A route as the worker stores it when a rule matched: RT-STRUCT to the TPS."""
    return JobRoute(rule=rule, model=model, version=version, outputs=(OutputKind.RTSTRUCT,), send_to=("TPS",), sync=sync)
