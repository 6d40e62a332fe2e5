"""Pipeline strings: `"prune-bn{ratio=0.5},fuse-5x5{policy=cost},int8"` <-> a list of passes.

Grammar: passes separated by commas; each is a registered name, optionally followed by
`{option=value,...}`. Tuple-valued options separate their items with `|`. `format_pipeline`
prints every option that differs from its default, so a pipeline written that way prints back to
the same string, and parsing what was printed gives equal passes.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Sequence

from racc.errors import PassConfigError
from racc.passes.base import REGISTRY, Pass, parse_value

_NAME = re.compile(r"\s*[A-Za-z0-9_\-]+\s*")
_PASS = re.compile(r"\s*([A-Za-z0-9_\-]+)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")


def parse_pipeline(text: str) -> list[Pass]:
    """Parse a pipeline string into pass objects; unknown names or options list the valid ones."""
    if not isinstance(text, str):
        raise PassConfigError(
            f"a pipeline is a string or a list of passes, got {type(text).__name__}"
        )
    passes, position = [], 0
    text = text.strip()
    while position < len(text):
        match = _PASS.match(text, position)
        if not match or match.end() == position:
            name = _NAME.match(text, position)
            column = name.end() if name else position
            raise PassConfigError(
                f"cannot parse pipeline '{text}' at column {column}: expected "
                "name or name{option=value,...}, passes separated by commas"
            )
        passes.append(_build(match.group(1), match.group(2)))
        position = match.end()
    return passes


def _build(name: str, body: str | None) -> Pass:
    if name not in REGISTRY:
        raise PassConfigError(f"unknown pass '{name}'; valid passes: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    options = {}
    for item in filter(None, (s.strip() for s in (body or "").split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in fields:
            valid = ", ".join(fields) or "none"
            raise PassConfigError(f"pass '{name}' has no option '{key}'; valid options: {valid}")
        if not sep:
            raise PassConfigError(
                f"pass '{name}': option '{key}' has no value; write {name}{{{key}=...}}"
            )
        if key in options:
            raise PassConfigError(f"pass '{name}': option '{key}' is given twice; give it once")
        options[key] = parse_value(name, key, value.strip(), hints[key])
    return cls(**options)


def format_pipeline(passes: Sequence[Pass]) -> str:
    return ",".join(str(p) for p in passes)


def as_passes(passes: str | Sequence[Pass] | Pass) -> list[Pass]:
    """Accept a pipeline string, one pass, or a list of passes; check every item is a Pass."""
    if isinstance(passes, str):
        return parse_pipeline(passes)
    if isinstance(passes, Pass):
        return [passes]
    if not isinstance(passes, Sequence):
        raise PassConfigError(
            f"passes must be a pipeline string or a list of passes, got {type(passes).__name__}"
        )
    for p in passes:
        if not isinstance(p, Pass):
            raise PassConfigError(
                f"{p!r} is not a pass: use e.g. racc.passes.FoldBatchNormIntoConv() or a "
                f"pipeline string; valid passes: {', '.join(sorted(REGISTRY))}"
            )
    return list(passes)
