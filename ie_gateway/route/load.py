"""Loading ``routing.yaml``: validation of every rule with `file:line: key: why` errors, all at once."""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pydantic
from pydantic import AfterValidator, Field, StrictBool, StrictStr
from pydicom.datadict import dictionary_VR, keyword_dict, tag_for_keyword

from ie_gateway.errors import ConfigError
from ie_gateway.infer.modelref import parse_model_ref
from ie_gateway.route.explain import Route
from ie_gateway.route.matchers import (
    CODE_VRS,
    GROUPS,
    NUMBER_VRS,
    SINGLE_TEXT_VRS,
    SPECIAL_KEYS,
    UNMATCHABLE_VRS,
    Equals,
    Kind,
    Matcher,
    Norm,
    Not,
    OneOf,
    Present,
    Range,
    Regex,
    format_number,
    parse_value,
)
from ie_gateway.route.rules import Check, Group, Match, Rule, RuleSet
from ie_gateway.vocab import OutputKind, Priority, ReviewPolicy, SegEncoding
from ie_gateway.yamlfile import Loc, StrictModel, format_error, line_of, read_yaml

if TYPE_CHECKING:
    from ie_gateway.config import GatewayConfig
    from ie_gateway.infer.registry import Registry

ModelExists = Callable[[str, str | None], bool]


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


class _RuleSpec(StrictModel):
    name: StrictStr = Field(min_length=1)
    match: dict[str, Any]
    model: Annotated[StrictStr, AfterValidator(_known_model)]
    outputs: list[OutputKind] = Field(min_length=1)
    send_to: list[Annotated[StrictStr, AfterValidator(_known_destination)]] = Field(min_length=1)
    continue_: StrictBool = Field(default=False, alias="continue")
    sync: StrictBool = False
    review: ReviewPolicy = ReviewPolicy.HOLD
    priority: Priority = Priority.NORMAL
    deliver: StrictBool = True
    seg_encoding: SegEncoding = SegEncoding.BINARY


class _RoutingSpec(StrictModel):
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
        spec = _RoutingSpec.model_validate(data, context={"destinations": destinations, "model_exists": model_exists})
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
        review=spec.review,
        priority=spec.priority,
        deliver=spec.deliver,
        seg_encoding=spec.seg_encoding,
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
        if key in GROUPS:
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


def _compile_group(mode: Literal["any", "all"], value: object, loc: Loc, problems: Problems) -> Group:
    if not isinstance(value, list) or not value:
        problems.append((loc, f"{mode} needs a non-empty list of mappings (keyword: matcher)"))
        return Group(mode, ())
    alternatives = tuple(_compile_match(item, loc + (i,), problems, nested=True) for i, item in enumerate(value))
    return Group(mode, alternatives)


def _key_kind(key: object, loc: Loc, problems: Problems) -> tuple[Kind, bool] | None:
    """How a key compares and whether its text splits on backslashes; None if it is invalid."""
    if isinstance(key, str) and key in SPECIAL_KEYS:
        return SPECIAL_KEYS[key], False
    tag = tag_for_keyword(key) if isinstance(key, str) else None
    if tag is None:
        guess = difflib.get_close_matches(str(key), keyword_dict.keys(), n=1, cutoff=0.8)
        hint = f" (did you mean {guess[0]!r}?)" if guess else ""
        problems.append(
            (loc, f"unknown DICOM keyword {key!r}{hint}; special keys: calling_ae, called_ae, instances, any, all")
        )
        return None
    vr = dictionary_VR(tag)
    if vr in UNMATCHABLE_VRS:
        problems.append((loc, f"{key} has VR {vr}: only single values can be matched"))
        return None
    if vr in CODE_VRS:
        return Kind.CODE, True
    if vr in NUMBER_VRS:
        return Kind.NUMBER, True
    return Kind.TEXT, vr not in SINGLE_TEXT_VRS


_OPERATORS = ("one_of", "regex", "min", "max", "present", "absent", "not")


def _compile_matcher(value: object, kind: Kind, key: str, loc: Loc, problems: Problems) -> Matcher | None:
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


def _compile_operator(value: dict[Any, Any], kind: Kind, key: str, loc: Loc, problems: Problems) -> Matcher | None:
    unknown = [op for op in value if op not in _OPERATORS]
    for op in unknown:
        problems.append((loc + (op,), f"unknown matcher {op!r}; expected one of {', '.join(_OPERATORS)}"))
    if unknown:
        return None
    ops = set(value)
    if ops and ops <= {"min", "max"}:
        return _compile_range(value, kind, key, loc, problems)
    if len(ops) != 1:
        problems.append(
            (loc, f"one matcher per key (found {', '.join(sorted(ops)) or 'none'}); combine several with all: [...]")
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


def _compile_one_of(arg: object, kind: Kind, key: str, loc: Loc, problems: Problems) -> Matcher | None:
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


def _compile_range(value: dict[str, Any], kind: Kind, key: str, loc: Loc, problems: Problems) -> Matcher | None:
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
        problems.append((loc, f"min {format_number(low)} is greater than max {format_number(high)}"))
        return None
    return Range(low, high)


def _literal(value: object, kind: Kind, key: str, loc: Loc, problems: Problems) -> Norm | None:
    if isinstance(value, bool):
        problems.append((loc, f"{value!r} is a boolean: YAML reads yes/no/on/off as true/false; quote it"))
        return None
    if value is None or isinstance(value, dict | list):
        problems.append((loc, "expected a plain value (text or number); use {absent: true} for a missing attribute"))
        return None
    text = str(value).strip()
    normalised = parse_value(text, kind).norm
    if normalised is None:
        problems.append((loc, f"{key} is numeric; {value!r} is not a number"))
    return normalised


def _shown(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def model_exists(registry: Registry, name: str, version: str | None) -> bool:
    """Whether routing may name this model (any installed version when none is pinned)."""
    versions = registry.versions(name)
    return version in versions if version is not None else bool(versions)


def rules_loader(cfg: GatewayConfig, registry: Registry) -> functools.partial[RuleSet]:
    """``load_rules`` bound to a node's destinations and installed models (for the watcher)."""
    return functools.partial(
        load_rules, destinations=set(cfg.destinations), model_exists=functools.partial(model_exists, registry)
    )
