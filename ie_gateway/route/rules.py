"""Compiled rules and the rule set: evaluated in order, first match wins unless a rule says
``continue: true``; every rule is evaluated in full so the explanation is complete."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ie_gateway.route.explain import (
    CheckResult,
    Explanation,
    GroupResult,
    Item,
    Route,
    RouteDecision,
    RuleResult,
    SeriesFacts,
)
from ie_gateway.route.matchers import Kind, Matcher, normalise


@dataclass(frozen=True)
class Check:
    """One key and its matcher."""

    key: str
    kind: Kind
    split: bool
    matcher: Matcher

    def evaluate(self, facts: SeriesFacts) -> CheckResult:
        raw = _lookup(self.key, facts)
        values = normalise(raw, self.kind, self.split)
        return CheckResult(self.key, self.matcher.describe(), raw, self.matcher.test(values))


@dataclass(frozen=True)
class Group:
    """``any``/``all`` over alternative mappings."""

    mode: Literal["any", "all"]
    alternatives: tuple[Match, ...]

    def evaluate(self, facts: SeriesFacts) -> GroupResult:
        results = tuple(alt.evaluate(facts) for alt in self.alternatives)
        verdicts = [all(item.matched for item in result) for result in results]
        matched = any(verdicts) if self.mode == "any" else all(verdicts)
        return GroupResult(self.mode, matched, results)


@dataclass(frozen=True)
class Match:
    """A mapping of checks and groups that must all match (an empty one matches everything)."""

    items: tuple[Check | Group, ...]

    def evaluate(self, facts: SeriesFacts) -> tuple[Item, ...]:
        return tuple(item.evaluate(facts) for item in self.items)


@dataclass(frozen=True)
class Rule:
    """A validated rule."""

    match: Match
    route: Route
    continue_: bool

    @property
    def name(self) -> str:
        return self.route.rule


@dataclass(frozen=True)
class RuleSet:
    """An immutable, validated list of rules; the service swaps whole RuleSets on reload."""

    rules: tuple[Rule, ...]

    def route(self, series: SeriesFacts) -> RouteDecision:
        """Evaluate every rule in order; return the applied routes and the full explanation."""
        results: list[RuleResult] = []
        routes: list[Route] = []
        stopped_by: str | None = None
        for rule in self.rules:
            items = rule.match.evaluate(series)
            matched = all(item.matched for item in items)
            results.append(RuleResult(rule.name, matched, stopped_by, items))
            if matched and stopped_by is None:
                routes.append(rule.route)
                if not rule.continue_:
                    stopped_by = rule.name
        return RouteDecision(tuple(routes), Explanation(tuple(results)))


def _lookup(key: str, facts: SeriesFacts) -> object:
    if key == "calling_ae":
        return facts.calling_ae
    if key == "called_ae":
        return facts.called_ae
    if key == "instances":
        return facts.instances
    return facts.header.get(key)
