"""Matchers on header values: equals, one_of, regex, min/max, present/absent, not. Values are
normalised once by the kind of their key (code string, number, text)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol


class Kind(Enum):
    """How a key's values compare: as code strings, as numbers, or as exact text."""

    CODE = "code"
    NUMBER = "number"
    TEXT = "text"


CODE_VRS = {"CS", "AE"}
NUMBER_VRS = {"DS", "IS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV", "US or SS"}
UNMATCHABLE_VRS = {"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "OB or OW", "US or OW"}
# DICOM joins multiple values with a backslash in every string VR except these free-text ones.
SINGLE_TEXT_VRS = {"LT", "ST", "UT", "UR"}
SPECIAL_KEYS = {"calling_ae": Kind.CODE, "called_ae": Kind.CODE, "instances": Kind.NUMBER}
GROUPS = ("any", "all")

Norm = str | float


@dataclass(frozen=True)
class Value:
    text: str
    norm: Norm | None  # None: a numeric key whose text is not a number


class Matcher(Protocol):
    """A test on the values of one key."""

    def test(self, values: tuple[Value, ...]) -> bool:
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

    def test(self, values: tuple[Value, ...]) -> bool:
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

    def test(self, values: tuple[Value, ...]) -> bool:
        return any(_same(v.norm, option) for v in values for option in self.options)

    def describe(self) -> str:
        return f"one of {self.shown}"


@dataclass(frozen=True)
class Regex:
    """``re.search`` succeeds on any value's text."""

    pattern: re.Pattern[str]

    def test(self, values: tuple[Value, ...]) -> bool:
        return any(self.pattern.search(v.text) for v in values)

    def describe(self) -> str:
        return f"matches regex {self.pattern.pattern!r}"


@dataclass(frozen=True)
class Range:
    """Any value is a number within [low, high]; a missing bound is open."""

    low: float | None
    high: float | None

    def test(self, values: tuple[Value, ...]) -> bool:
        return any(isinstance(v.norm, float) and self._within(v.norm) for v in values)

    def _within(self, number: float) -> bool:
        return (self.low is None or number >= self.low) and (self.high is None or number <= self.high)

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"between {format_number(self.low)} and {format_number(self.high)}"
        if self.low is not None:
            return f">= {format_number(self.low)}"
        return f"<= {format_number(self.high)}"


@dataclass(frozen=True)
class Present:
    """The attribute has (``want`` True) or lacks (False) a non-empty value."""

    want: bool

    def test(self, values: tuple[Value, ...]) -> bool:
        return bool(values) == self.want

    def describe(self) -> str:
        return "is present" if self.want else "is absent"


@dataclass(frozen=True)
class Not:
    """The inner matcher does not match."""

    inner: Matcher

    def test(self, values: tuple[Value, ...]) -> bool:
        return not self.inner.test(values)

    def describe(self) -> str:
        return f"not ({self.inner.describe()})"


def format_number(number: float | None) -> str:
    return f"{number:g}"


def split_values(raw: object, split: bool = True) -> list[object]:
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


def normalise(raw: object, kind: Kind, split: bool) -> tuple[Value, ...]:
    return tuple(parse_value(str(part).strip(), kind) for part in split_values(raw, split))


def parse_value(text: str, kind: Kind) -> Value:
    if kind is Kind.CODE:
        return Value(text, text.upper())
    if kind is Kind.NUMBER:
        return Value(text, to_float(text))
    return Value(text, text)


def to_float(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None
