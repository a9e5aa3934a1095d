"""Load a YAML file into a pydantic model, reporting every error as ``file:line: key: why``.

Admins edit these files by hand; an error that names the line and the key is one they can fix
without reading our code. Unknown keys are errors (models forbid extras), never silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from ie_gateway.errors import ConfigError


class StrictModel(pydantic.BaseModel):
    """The base of every model read from an admin's YAML: an unknown key is an error (a typo
    must not be ignored) and the settings are immutable once loaded."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


M = TypeVar("M", bound=pydantic.BaseModel)
Loc = tuple[str | int, ...]


def _construct(node: yaml.Node, loc: Loc, lines: dict[Loc, int]) -> Any:
    """Build plain Python data from a composed node, recording each key's 1-based line."""
    lines[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            child = loc + (key,)
            out[key] = _construct(value_node, child, lines)
            lines[child] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(item, loc + (i,), lines) for i, item in enumerate(node.value)]
    return yaml.SafeLoader("").construct_object(node, deep=True)


def read_yaml(path: Path) -> tuple[Any, dict[Loc, int]]:
    """Parse ``path``; return the data and a map from key path to line number."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}"]) from exc
    lines: dict[Loc, int] = {}
    if node is None:
        return {}, lines
    return _construct(node, (), lines), lines


def line_of(loc: Loc, lines: dict[Loc, int]) -> int:
    """The line of the deepest known prefix of ``loc`` (1 when nothing is known)."""
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return 1


def format_error(path: Path, loc: Loc, lines: dict[Loc, int], message: str) -> str:
    """One admin-readable error line."""
    key = ".".join(str(part) for part in loc) or "(top level)"
    return f"{path}:{line_of(loc, lines)}: {key}: {message}"


def load_model(path: Path, model: type[M], context: dict[str, Any] | None = None) -> M:
    """Validate the YAML at ``path`` against ``model``; raise ConfigError listing every problem."""
    data, lines = read_yaml(path)
    try:
        return model.model_validate(data, context=context)
    except pydantic.ValidationError as exc:
        errors = []
        for err in exc.errors(include_url=False):
            loc = tuple(part for part in err["loc"] if not _is_union_tag(part))
            errors.append(format_error(path, loc, lines, _message(err)))
        raise ConfigError(errors) from exc


def _is_union_tag(part: str | int) -> bool:
    """Pydantic puts union member names (e.g. 'function-after[...]') into locations; drop them."""
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool"})


def _message(err: Any) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key (not allowed here; check spelling)"
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")
