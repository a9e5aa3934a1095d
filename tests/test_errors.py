"""The error tree: every exception class the package raises is defined in errors.py and drawn in
its docstring, so a reader finds them all in one place."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import ie_gateway
from ie_gateway import errors


def _modules() -> list[str]:
    return [
        m.name
        for m in pkgutil.walk_packages(ie_gateway.__path__, "ie_gateway.")
        if not m.name.startswith(("ie_gateway.infer.nnunet", "ie_gateway.infer.monai_bundle"))
    ]


def test_every_public_exception_class_is_defined_in_errors_py() -> None:
    outside = []
    for name in _modules():
        module = importlib.import_module(name)
        for cls_name, cls in vars(module).items():
            if (
                inspect.isclass(cls)
                and issubclass(cls, BaseException)
                and cls.__module__ == name
                and not cls_name.startswith("_")
                and name != errors.__name__
            ):
                outside.append(f"{name}.{cls_name}")
    assert outside == []


def test_every_class_in_errors_py_is_drawn_in_its_docstring_tree() -> None:
    classes = [
        n
        for n, c in vars(errors).items()
        if inspect.isclass(c) and issubclass(c, BaseException) and c.__module__ == errors.__name__
    ]
    tree = errors.__doc__ or ""
    assert classes and [n for n in classes if not re.search(rf"(── |^){n}\b", tree, re.MULTILINE)] == []
    for name in classes:  # drawn under its parent: the parent's line comes before it
        parent = vars(errors)[name].__mro__[1].__name__
        if parent != "Exception":
            assert tree.index(parent) < tree.index(f"── {name} "), name
