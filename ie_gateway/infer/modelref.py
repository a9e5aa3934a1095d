"""Model references, ``name`` or ``name@version``: one parser for routing rules, the registry,
the command line and the model pull, so all of them accept and refuse the same text.

A name or version names a folder under models_dir, so it is letters, digits, '.', '_' and '-',
starting with a letter or digit, at most 64 characters: never a path.
"""

from __future__ import annotations

import re

from ie_gateway.errors import BadModelRef

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ACTIVE = "active"


def parse_model_ref(ref: str) -> tuple[str, str | None]:
    """Split ``name`` or ``name@version``; ``name@active`` (or no version) means the active one."""
    name, _, version = ref.partition("@")
    if not SAFE_NAME.fullmatch(name) or (version and not SAFE_NAME.fullmatch(version)) or ref.endswith("@"):
        raise BadModelRef(
            f"{ref!r} is not a model reference: write name or name@version (letters, digits, '.', '_', '-')"
        )
    return name, None if version in ("", ACTIVE) else version
