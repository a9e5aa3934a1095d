"""What a MONAI bundle's config may ask the node to run: a documented allow-list.

A bundle's ``inference.json`` is code: MONAI instantiates each ``_target_`` and evaluates each
``"$..."`` string with Python's ``eval``. Unless its package is signed by a key with
``allow_code: true``, a bundle is refused at import (and again in the inference child before
MONAI reads it) when its config (``monai.config`` and ``monai.meta`` of model.yaml) has:

- a ``_target_`` that is not a bare class name (MONAI looks those up in ``monai`` only) or a
  dotted path under ``monai.``, ``torch.`` or ``numpy.``;
- ``_mode_: debug`` (runs the debugger);
- an ``import`` (``"$import x"`` or ``"$from x import y"``) of anything but :data:`IMPORTS`;
- an expression that is not valid Python, or that uses a name outside :data:`NAMES` (the three
  frameworks, ``glob``, ``math``, harmless builtins and the expression's own loop variables),
  a dunder name or attribute (``__import__``, ``__class__``, ``__globals__``...), or an
  attribute in :data:`DENIED_ATTRIBUTES` (loaders, savers and escape hatches of torch and numpy);
- a ``%`` macro that pulls text from another file.

``@id`` references are checked where they are defined, so an expression may use them freely.
The check reads the config as data (``json`` / ``yaml.safe_load``) and never evaluates it.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from ie_gateway.errors import CodeNotAllowed

TARGET_MODULES = ("monai.", "torch.", "numpy.")
IMPORTS = frozenset({"monai", "torch", "numpy", "glob", "math"})
NAMES = frozenset(
    {
        *IMPORTS,
        "np",
        *("abs", "all", "any", "bool", "dict", "enumerate", "filter", "float", "int", "isinstance"),
        *("len", "list", "map", "max", "min", "range", "reversed", "round", "set", "sorted", "str"),
        *("sum", "tuple", "zip", "True", "False", "None"),
    }
)
DENIED_ATTRIBUTES = frozenset(
    {
        *("load", "save", "hub", "load_library", "load_state_dict_from_url", "cpp_extension", "ops"),
        *("fromfile", "tofile", "memmap", "ctypeslib", "savetxt", "loadtxt", "savez", "save_compressed"),
        *("system", "popen", "open", "remove", "unlink", "rmtree", "write_text", "write_bytes", "eval", "exec"),
        *("compile", "import_module", "getattr", "setattr", "globals", "locals", "builtins", "modules"),
    }
)
_REFERENCE = re.compile(r"@[\w#:]+")
_IMPORT = re.compile(r"^\s*(import\s+([\w.]+)(\s+as\s+\w+)?|from\s+([\w.]+)\s+import\s+[\w\s,*]+)\s*$")
_TARGET = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def check_bundle(package_dir: Path, config_files: list[str], spec: str) -> None:
    """Refuse (CodeNotAllowed) a bundle whose config asks for more than the allow-list."""
    for name in config_files:
        path = package_dir / name
        try:
            text = path.read_text(encoding="utf-8")
            content = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise CodeNotAllowed(f"{spec}: {name} cannot be read as a config: {exc}") from exc
        problems = list(_problems(content, ""))
        if problems:
            shown = "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
            raise CodeNotAllowed(
                f"{spec}: {name} runs code beyond the allow-list: {shown}; only a publisher whose key "
                f"has allow_code: true in trusted_keys may ship such a bundle"
            )


def _problems(node: Any, where: str) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            at = f"{where}#{key}" if where else str(key)
            if key == "_target_" and isinstance(value, str):
                yield from _target_problems(value, at)
            elif key == "_mode_" and value == "debug":
                yield f"{at}: debug mode"
            else:
                yield from _problems(value, at)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _problems(value, f"{where}#{index}")
    elif isinstance(node, str):
        if node.startswith("$"):
            yield from (f"{where}: {p}" for p in expression_problems(node[1:]))
        elif node.startswith("%") and not node.startswith("%#"):
            yield f"{where}: macro {node[:60]!r} reads another file"


def _target_problems(target: str, at: str) -> Iterator[str]:
    if target.startswith("$"):
        yield from (f"{at}: {p}" for p in expression_problems(target[1:]))
    elif target.startswith("@"):
        return  # a reference: checked where it is defined
    elif not _TARGET.fullmatch(target) or ("." in target and not target.startswith(TARGET_MODULES)):
        yield f"{at}: _target_ {target!r} is outside {', '.join(m.rstrip('.') for m in TARGET_MODULES)}"
    elif any(part.startswith("__") or part in DENIED_ATTRIBUTES for part in target.split(".")):
        yield f"{at}: _target_ {target!r} names a denied attribute"


def expression_problems(expression: str) -> list[str]:
    """Why one ``$`` expression (without the ``$``) is outside the allow-list; [] if it is not."""
    imported = _IMPORT.match(expression)
    if imported:
        module = (imported.group(2) or imported.group(4)).split(".")[0]
        return [] if module in IMPORTS else [f"imports {module!r}"]
    try:
        tree = ast.parse(_REFERENCE.sub("_ref_", expression.strip()), mode="eval")
    except SyntaxError:
        return [f"{expression[:60]!r} is not a Python expression"]
    bound = {
        n.id
        for c in ast.walk(tree)
        if isinstance(c, ast.comprehension)
        for n in ast.walk(c.target)
        if isinstance(n, ast.Name)
    } | {a.arg for n in ast.walk(tree) if isinstance(n, ast.Lambda) for a in n.args.args}
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in NAMES | bound | {"_ref_"}:
            problems.append(f"uses the name {node.id!r}")
        elif isinstance(node, ast.Attribute) and (node.attr.startswith("__") or node.attr in DENIED_ATTRIBUTES):
            problems.append(f"uses the attribute {node.attr!r}")
        elif isinstance(node, ast.Name) and node.id.startswith("__"):
            problems.append(f"uses the name {node.id!r}")
    return sorted(set(problems))
