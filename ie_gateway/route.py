"""Routing: the admin's rules (data, never code) decide which model contours a complete series.

``routing.yaml`` holds an ordered list of rules::

    rules:
      - name: thorax-ct
        match:                      # every entry must match (AND)
          Modality: CT
          BodyPartExamined: {one_of: [CHEST, THORAX, LUNG]}
          SeriesDescription: {regex: "(?i)thorax|chest"}
          instances: {min: 20}
          calling_ae: PACS
          any:                      # at least one alternative matches; `all:` needs every one
            - {SliceThickness: {max: 3}}
            - {ConvolutionKernel: {present: true}}
        model: demo-thorax          # the active version; demo-thorax@1 pins version 1
        outputs: [rtstruct, seg]
        send_to: [TPS]
        continue: false             # true lets later rules match as well (default: first wins)
        sync: false                 # true allows uploading the anonymised case for training

Keys of ``match`` are DICOM keywords (pydicom's dictionary), ``calling_ae``, ``called_ae``,
``instances`` (the series' instance count), or the groups ``any`` / ``all`` (lists of such
mappings). Matchers and their semantics:

- a plain value: equals. Code strings (VR CS, AE and the two AE keys) compare case-insensitively;
  numeric VRs (DS, IS, US, SS, UL, SL, FL, FD, UV, SV and ``instances``) compare as numbers, so
  SliceThickness "2.50" equals 2.5 (within 1e-9); other VRs compare as exact text. Surrounding
  spaces (DICOM's padding) are ignored.
- multi-valued attributes (ImageType ``ORIGINAL\\PRIMARY\\AXIAL``, given as a list or as a
  backslash-joined string): a plain scalar matches when *any* value equals it
  (``ImageType: AXIAL``); a list matches when the values equal the list in order
  (``ImageType: [ORIGINAL, PRIMARY, AXIAL]``).
- ``{one_of: [...]}``: any value equals any listed item.
- ``{regex: "..."}``: ``re.search`` on any value's text (write ``(?i)`` for case-insensitivity).
- ``{min: x, max: y}``: any value within the inclusive range; either bound may be left out;
  only on numeric attributes.
- ``{present: true}`` / ``{absent: true}`` (or ``present: false``): a value is present when the
  attribute exists with a non-empty value (an empty type-2 attribute counts as absent).
- ``{not: <matcher>}``: the inverse, so ``{not: {regex: x}}`` matches a missing value.

A missing value never matches equals, one_of, regex or min/max. Rules are evaluated in order;
the first matching rule wins unless it says ``continue: true``. Every rule is evaluated in full
so that the explanation can say why each one did or did not match.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import pydantic
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictStr
from pydicom.datadict import dictionary_VR, keyword_dict, tag_for_keyword

from ie_gateway.errors import ConfigError
from ie_gateway.yamlfile import Loc, format_error, line_of, read_yaml

ModelExists = Callable[[str, str | None], bool]


class Output(StrEnum):
    """Objects a route asks the writer to produce."""

    RTSTRUCT = "rtstruct"
    SEG = "seg"


# ---------------------------------------------------------------------------------------------
# Facts about a series and the decision
# ---------------------------------------------------------------------------------------------


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

    ``version`` None means the model's active version at the time the job runs.
    """

    rule: str
    model: str
    version: str | None
    outputs: tuple[Output, ...]
    send_to: tuple[str, ...]
    sync: bool


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
    values = _split(value)
    if not values:
        return "missing"
    if len(values) == 1:
        return repr(values[0])
    return "[" + ", ".join(repr(v) for v in values) + "]"


# ---------------------------------------------------------------------------------------------
# Matchers
# ---------------------------------------------------------------------------------------------


class Kind(Enum):
    """How a key's values compare: as code strings, as numbers, or as exact text."""

    CODE = "code"
    NUMBER = "number"
    TEXT = "text"


_CODE_VRS = {"CS", "AE"}
_NUMBER_VRS = {"DS", "IS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV", "US or SS"}
_UNMATCHABLE_VRS = {"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "OB or OW", "US or OW"}
# DICOM joins multiple values with a backslash in every string VR except these free-text ones.
_SINGLE_TEXT_VRS = {"LT", "ST", "UT", "UR"}
_SPECIAL_KEYS = {"calling_ae": Kind.CODE, "called_ae": Kind.CODE, "instances": Kind.NUMBER}
_GROUPS = ("any", "all")

Norm = str | float


@dataclass(frozen=True)
class _Value:
    text: str
    norm: Norm | None  # None: a numeric key whose text is not a number


class Matcher(Protocol):
    """A test on the values of one key."""

    def test(self, values: tuple[_Value, ...]) -> bool:
        """True when the values satisfy the matcher."""
        ...

    def describe(self) -> str:
        """What the matcher expects, in words."""
        ...


def _same(a: Norm | None, b: Norm) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return a == b


@dataclass(frozen=True)
class Equals:
    """A plain value (any value equals it) or a list (the values equal it, in order)."""

    expected: tuple[Norm, ...]
    as_list: bool
    shown: str

    def test(self, values: tuple[_Value, ...]) -> bool:
        if self.as_list:
            return len(values) == len(self.expected) and all(
                _same(v.norm, e) for v, e in zip(values, self.expected, strict=True)
            )
        return any(_same(v.norm, self.expected[0]) for v in values)

    def describe(self) -> str:
        return f"equals {self.shown}"


@dataclass(frozen=True)
class OneOf:
    """Any value equals any of the options."""

    options: tuple[Norm, ...]
    shown: str

    def test(self, values: tuple[_Value, ...]) -> bool:
        return any(_same(v.norm, option) for v in values for option in self.options)

    def describe(self) -> str:
        return f"one of {self.shown}"


@dataclass(frozen=True)
class Regex:
    """``re.search`` succeeds on any value's text."""

    pattern: re.Pattern[str]

    def test(self, values: tuple[_Value, ...]) -> bool:
        return any(self.pattern.search(v.text) for v in values)

    def describe(self) -> str:
        return f"matches regex {self.pattern.pattern!r}"


@dataclass(frozen=True)
class Range:
    """Any value is a number within [low, high]; a missing bound is open."""

    low: float | None
    high: float | None

    def test(self, values: tuple[_Value, ...]) -> bool:
        return any(isinstance(v.norm, float) and self._within(v.norm) for v in values)

    def _within(self, number: float) -> bool:
        return (self.low is None or number >= self.low) and (
            self.high is None or number <= self.high
        )

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"between {_num(self.low)} and {_num(self.high)}"
        if self.low is not None:
            return f">= {_num(self.low)}"
        return f"<= {_num(self.high)}"


@dataclass(frozen=True)
class Present:
    """The attribute has (``want`` True) or lacks (False) a non-empty value."""

    want: bool

    def test(self, values: tuple[_Value, ...]) -> bool:
        return bool(values) == self.want

    def describe(self) -> str:
        return "is present" if self.want else "is absent"


@dataclass(frozen=True)
class Not:
    """The inner matcher does not match."""

    inner: Matcher

    def test(self, values: tuple[_Value, ...]) -> bool:
        return not self.inner.test(values)

    def describe(self) -> str:
        return f"not ({self.inner.describe()})"


def _num(number: float | None) -> str:
    return f"{number:g}"


# ---------------------------------------------------------------------------------------------
# Compiled rules
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One key and its matcher."""

    key: str
    kind: Kind
    split: bool
    matcher: Matcher

    def evaluate(self, facts: SeriesFacts) -> CheckResult:
        raw = _lookup(self.key, facts)
        values = _normalise(raw, self.kind, self.split)
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


def _split(raw: object, split: bool = True) -> list[object]:
    """The non-empty values of a header value (list, backslash-joined string, scalar, None)."""
    if raw is None:
        return []
    if isinstance(raw, str):
        parts: Sequence[object] = raw.split("\\") if split else [raw]
    elif isinstance(raw, Sequence):
        parts = raw
    else:
        parts = [raw]
    return [part for part in parts if part is not None and str(part).strip() != ""]


def _normalise(raw: object, kind: Kind, split: bool) -> tuple[_Value, ...]:
    return tuple(_value(str(part).strip(), kind) for part in _split(raw, split))


def _value(text: str, kind: Kind) -> _Value:
    if kind is Kind.CODE:
        return _Value(text, text.upper())
    if kind is Kind.NUMBER:
        return _Value(text, _to_float(text))
    return _Value(text, text)


def _to_float(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


# ---------------------------------------------------------------------------------------------
# Loading and validation
# ---------------------------------------------------------------------------------------------

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_MODEL_REF = re.compile(rf"(?P<name>{_NAME})(?:@(?P<version>{_NAME}))?")


def parse_model_ref(ref: str) -> tuple[str, str | None]:
    """Split ``name`` or ``name@version`` (``name@active`` = active); ValueError when malformed."""
    found = _MODEL_REF.fullmatch(ref)
    if found is None:
        raise ValueError(
            f"{ref!r} is not a model reference: write name or name@version "
            "(letters, digits, '.', '_', '-')"
        )
    version = found["version"]
    return found["name"], None if version in (None, "active") else version


def _known_destination(name: str, info: pydantic.ValidationInfo) -> str:
    destinations: set[str] = (info.context or {})["destinations"]
    if name not in destinations:
        known = ", ".join(sorted(destinations)) or "none configured"
        raise ValueError(f"unknown destination {name!r} (known: {known})")
    return name


def _known_model(ref: str, info: pydantic.ValidationInfo) -> str:
    name, version = parse_model_ref(ref)
    model_exists: ModelExists = (info.context or {})["model_exists"]
    if not model_exists(name, version):
        if version is None:
            raise ValueError(f"model {name!r} is not installed or has no active version")
        raise ValueError(f"model {name!r} has no version {version!r} installed")
    return ref


class _RuleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrictStr = Field(min_length=1)
    match: dict[str, Any]
    model: Annotated[StrictStr, AfterValidator(_known_model)]
    outputs: list[Output] = Field(min_length=1)
    send_to: list[Annotated[StrictStr, AfterValidator(_known_destination)]] = Field(min_length=1)
    continue_: StrictBool = Field(default=False, alias="continue")
    sync: StrictBool = False


class _RoutingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: list[_RuleSpec]


Problems = list[tuple[Loc, str]]


def load_rules(path: Path, destinations: set[str], model_exists: ModelExists) -> RuleSet:
    """Validate ``routing.yaml``; raise ConfigError listing every problem (file:line: key: why).

    ``destinations`` are the names configured in gateway.yaml; ``model_exists(name, version)``
    answers whether that model version (None: an active version) is installed.
    """
    data, lines = read_yaml(path)
    problems: Problems = []
    spec: _RoutingSpec | None = None
    try:
        spec = _RoutingSpec.model_validate(
            data, context={"destinations": destinations, "model_exists": model_exists}
        )
    except pydantic.ValidationError as exc:
        problems.extend(_pydantic_problems(exc))
    raw_rules = data.get("rules") if isinstance(data, dict) else None
    raw_rules = raw_rules if isinstance(raw_rules, list) else []
    matches = [_compile_rule_match(raw, index, problems) for index, raw in enumerate(raw_rules)]
    problems.extend(_duplicate_names(raw_rules))
    if problems or spec is None:
        ordered = sorted(problems, key=lambda problem: line_of(problem[0], lines))
        raise ConfigError([format_error(path, loc, lines, why) for loc, why in ordered])
    return RuleSet(tuple(_rule(s, m) for s, m in zip(spec.rules, matches, strict=True)))


def _rule(spec: _RuleSpec, match: Match) -> Rule:
    name, version = parse_model_ref(spec.model)
    route = Route(
        rule=spec.name,
        model=name,
        version=version,
        outputs=tuple(dict.fromkeys(spec.outputs)),
        send_to=tuple(dict.fromkeys(spec.send_to)),
        sync=spec.sync,
    )
    return Rule(match=match, route=route, continue_=spec.continue_)


def _pydantic_problems(exc: pydantic.ValidationError) -> Problems:
    problems: Problems = []
    for err in exc.errors(include_url=False):
        # pydantic inserts type tags such as "[key]" or "function-after[...]" into locations
        loc = tuple(part for part in err["loc"] if not (isinstance(part, str) and "[" in part))
        if err["type"] == "extra_forbidden":
            why = "unknown key (not allowed here; check spelling)"
        else:
            why = str(err["msg"]).removeprefix("Value error, ")
        problems.append((loc, why))
    return problems


def _duplicate_names(raw_rules: list[Any]) -> Problems:
    seen: dict[str, int] = {}
    problems: Problems = []
    for index, raw in enumerate(raw_rules):
        name = raw.get("name") if isinstance(raw, dict) else None
        if not isinstance(name, str):
            continue
        if name in seen:
            why = f"duplicate rule name {name!r} (already used by rules.{seen[name]})"
            problems.append((("rules", index, "name"), why))
        else:
            seen[name] = index
    return problems


def _compile_rule_match(raw: object, index: int, problems: Problems) -> Match:
    if not isinstance(raw, dict) or not isinstance(raw.get("match"), dict):
        return Match(())  # pydantic already reports the missing or malformed mapping
    return _compile_match(raw["match"], ("rules", index, "match"), problems, nested=False)


def _compile_match(raw: object, loc: Loc, problems: Problems, *, nested: bool) -> Match:
    if not isinstance(raw, dict) or (nested and not raw):
        problems.append((loc, "expected a non-empty mapping of keyword: matcher"))
        return Match(())
    items: list[Check | Group] = []
    for key, value in raw.items():
        key_loc = loc + (key,)
        if key in _GROUPS:
            items.append(_compile_group(key, value, key_loc, problems))
            continue
        resolved = _key_kind(key, key_loc, problems)
        if resolved is None:
            continue
        kind, split = resolved
        matcher = _compile_matcher(value, kind, key, key_loc, problems)
        if matcher is not None:
            items.append(Check(key, kind, split, matcher))
    return Match(tuple(items))


def _compile_group(
    mode: Literal["any", "all"], value: object, loc: Loc, problems: Problems
) -> Group:
    if not isinstance(value, list) or not value:
        problems.append((loc, f"{mode} needs a non-empty list of mappings (keyword: matcher)"))
        return Group(mode, ())
    alternatives = tuple(
        _compile_match(item, loc + (i,), problems, nested=True) for i, item in enumerate(value)
    )
    return Group(mode, alternatives)


def _key_kind(key: object, loc: Loc, problems: Problems) -> tuple[Kind, bool] | None:
    """How a key compares and whether its text splits on backslashes; None if it is invalid."""
    if isinstance(key, str) and key in _SPECIAL_KEYS:
        return _SPECIAL_KEYS[key], False
    tag = tag_for_keyword(key) if isinstance(key, str) else None
    if tag is None:
        guess = difflib.get_close_matches(str(key), keyword_dict.keys(), n=1, cutoff=0.8)
        hint = f" (did you mean {guess[0]!r}?)" if guess else ""
        problems.append(
            (loc, f"unknown DICOM keyword {key!r}{hint}; special keys: "
                  "calling_ae, called_ae, instances, any, all")
        )
        return None
    vr = dictionary_VR(tag)
    if vr in _UNMATCHABLE_VRS:
        problems.append((loc, f"{key} has VR {vr}: only single values can be matched"))
        return None
    if vr in _CODE_VRS:
        return Kind.CODE, True
    if vr in _NUMBER_VRS:
        return Kind.NUMBER, True
    return Kind.TEXT, vr not in _SINGLE_TEXT_VRS


_OPERATORS = ("one_of", "regex", "min", "max", "present", "absent", "not")


def _compile_matcher(
    value: object, kind: Kind, key: str, loc: Loc, problems: Problems
) -> Matcher | None:
    if isinstance(value, dict):
        return _compile_operator(value, kind, key, loc, problems)
    if isinstance(value, list):
        if not value:
            problems.append((loc, "an empty list matches nothing; give values or a matcher"))
            return None
        literals = [_literal(item, kind, key, loc + (i,), problems) for i, item in enumerate(value)]
        if any(literal is None for literal in literals):
            return None
        return Equals(tuple(n for n in literals if n is not None), True, _shown(value))
    literal = _literal(value, kind, key, loc, problems)
    return None if literal is None else Equals((literal,), False, _shown(value))


def _compile_operator(
    value: dict[Any, Any], kind: Kind, key: str, loc: Loc, problems: Problems
) -> Matcher | None:
    unknown = [op for op in value if op not in _OPERATORS]
    for op in unknown:
        problems.append(
            (loc + (op,), f"unknown matcher {op!r}; expected one of {', '.join(_OPERATORS)}")
        )
    if unknown:
        return None
    ops = set(value)
    if ops and ops <= {"min", "max"}:
        return _compile_range(value, kind, key, loc, problems)
    if len(ops) != 1:
        problems.append(
            (loc, f"one matcher per key (found {', '.join(sorted(ops)) or 'none'}); "
                  "combine several with all: [...]")
        )
        return None
    op, arg = next(iter(value.items()))
    op_loc = loc + (op,)
    if op == "one_of":
        return _compile_one_of(arg, kind, key, op_loc, problems)
    if op == "regex":
        return _compile_regex(arg, op_loc, problems)
    if op in ("present", "absent"):
        if not isinstance(arg, bool):
            problems.append((op_loc, f"{op} takes true or false"))
            return None
        return Present(arg if op == "present" else not arg)
    inner = _compile_matcher(arg, kind, key, op_loc, problems)
    return None if inner is None else Not(inner)


def _compile_one_of(
    arg: object, kind: Kind, key: str, loc: Loc, problems: Problems
) -> Matcher | None:
    if not isinstance(arg, list) or not arg:
        problems.append((loc, "one_of takes a non-empty list of values"))
        return None
    literals = [_literal(item, kind, key, loc + (i,), problems) for i, item in enumerate(arg)]
    if any(literal is None for literal in literals):
        return None
    return OneOf(tuple(n for n in literals if n is not None), _shown(arg))


def _compile_regex(arg: object, loc: Loc, problems: Problems) -> Matcher | None:
    if not isinstance(arg, str):
        problems.append((loc, "regex takes a string (quote it)"))
        return None
    try:
        return Regex(re.compile(arg))
    except re.error as exc:
        why = f"invalid regular expression {arg!r}: {exc.msg} at position {exc.pos}"
        problems.append((loc, why))
        return None


def _compile_range(
    value: dict[str, Any], kind: Kind, key: str, loc: Loc, problems: Problems
) -> Matcher | None:
    if kind is not Kind.NUMBER:
        problems.append((loc, f"min/max need a numeric attribute; {key} is not numeric"))
        return None
    bounds: dict[str, float] = {}
    for op in ("min", "max"):
        if op not in value:
            continue
        bound = value[op]
        if isinstance(bound, bool) or not isinstance(bound, int | float):
            problems.append((loc + (op,), f"{op} takes a number, not {bound!r}"))
            return None
        bounds[op] = float(bound)
    low, high = bounds.get("min"), bounds.get("max")
    if low is not None and high is not None and low > high:
        problems.append((loc, f"min {_num(low)} is greater than max {_num(high)}"))
        return None
    return Range(low, high)


def _literal(value: object, kind: Kind, key: str, loc: Loc, problems: Problems) -> Norm | None:
    if isinstance(value, bool):
        problems.append(
            (loc, f"{value!r} is a boolean: YAML reads yes/no/on/off as true/false; quote it")
        )
        return None
    if value is None or isinstance(value, dict | list):
        problems.append((loc, "expected a plain value (text or number); use {absent: true} "
                              "for a missing attribute"))
        return None
    text = str(value).strip()
    normalised = _value(text, kind).norm
    if normalised is None:
        problems.append((loc, f"{key} is numeric; {value!r} is not a number"))
    return normalised


def _shown(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


# ---------------------------------------------------------------------------------------------
# Hot reload
# ---------------------------------------------------------------------------------------------


class RulesWatcher:
    """Reload the rules when their file changes; keep the running rules when the file is bad.

    ``poll()`` stats the file; only when mtime or size changed does it hash the bytes, and only
    when the content changed does it call ``loader`` (e.g. ``functools.partial(load_rules,
    destinations=..., model_exists=...)``). It returns the new RuleSet, or None when nothing
    changed or the new file is invalid; then ``last_error`` holds the ConfigError (the same
    object until the content changes again, so the caller logs each refusal once) and the
    caller keeps its current rules. ``poll(force=True)`` reloads even unchanged content (SIGHUP,
    or after models were installed). Safe to call from several threads.
    """

    def __init__(self, path: Path, loader: Callable[[Path], RuleSet]) -> None:
        self._path = path
        self._loader = loader
        self._lock = threading.Lock()
        self._signature: tuple[int, int] | None = None
        self._digest: str | None = None
        self._current: RuleSet | None = None
        self._last_error: ConfigError | None = None
        self._digest_error: ConfigError | None = None  # the verdict on the content of _digest

    @property
    def current(self) -> RuleSet | None:
        """The last RuleSet that validated (None before the first successful poll)."""
        return self._current

    @property
    def last_error(self) -> ConfigError | None:
        """Why the latest content was refused; None once a valid file loaded."""
        return self._last_error

    def poll(self, force: bool = False) -> RuleSet | None:
        """Return a newly validated RuleSet if the file changed and validates, else None."""
        with self._lock:
            try:
                stat = self._path.stat()
                signature = (stat.st_mtime_ns, stat.st_size)
                if not force and signature == self._signature:
                    return None
                digest = hashlib.sha256(self._path.read_bytes()).hexdigest()
            except OSError as exc:
                self._unreadable(f"{self._path}: cannot read: {exc.strerror}")
                return None
            self._signature = signature
            if not force and digest == self._digest:
                self._last_error = self._digest_error  # e.g. a file put back after a deletion
                return None
            self._digest = digest
            try:
                rules = self._loader(self._path)
            except ConfigError as exc:
                self._last_error = self._digest_error = exc
                return None
            self._current, self._last_error, self._digest_error = rules, None, None
            return rules

    def _unreadable(self, message: str) -> None:
        """Record a read failure, keeping the same error object while it persists."""
        self._signature = None
        if self._last_error is None or self._last_error.errors != [message]:
            self._last_error = ConfigError([message])
