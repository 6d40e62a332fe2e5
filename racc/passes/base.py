"""The pass contract: a pass is a small dataclass whose fields are its typed options.

    class FoldBatchNormIntoConv(Pass):
        name: ClassVar[str] = "fold-bn"
        exactness: ClassVar[Exactness] = "exact"
        skip: tuple[str, ...] = ()          # an option
        def call(self, gm, ctx) -> PassResult: ...

Subclasses are registered by `name` for pipeline strings. Options are checked against their type
annotations when a pass is built, from Python or from a string, so a wrong type or value is a
`PassConfigError` naming the pass and option instead of a failure deep inside the pass.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx

from racc.errors import PassConfigError

Exactness = Literal["exact", "approximate", "needs_finetune"]
_UNIONS = (typing.Union, types.UnionType)
REGISTRY: dict[str, type[Pass]] = {}


def label(node: fx.Node) -> str:
    """How a report names a node: the module's qualified name (what skip=, protect= and where=
    patterns match) when the node calls one, else the node's name."""
    return node.target if node.op == "call_module" else node.name


@dataclass(frozen=True)
class Skip:
    """A node a pass looked at and left alone, and why (`compile(..., explain=True)` lists them)."""

    node: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node}: {self.reason}"


@dataclass
class PassResult:
    gm: fx.GraphModule
    modified: bool
    matched: list[str] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    exactness: Exactness | None = None  # what this run achieved, when sharper than the class's
    table: list[dict[str, Any]] = field(default_factory=list)  # one row per rewrite, for the report
    notes: list[str] = field(
        default_factory=list
    )  # what the pass chose and measured, one line each
    kept: dict[str, list[int]] = field(default_factory=dict)  # layer: output channels kept


@dataclass
class PassContext:
    """What a pass may read besides the graph: the example inputs, the calibration batches given
    to compile, and the passes run before it."""

    example_inputs: tuple[torch.Tensor, ...]
    explain: bool = False
    previous: list[str] = field(default_factory=list)
    calibration: Any = None


@dataclass(frozen=True)
class Pass:
    name: ClassVar[str] = ""
    exactness: ClassVar[Exactness] = "exact"
    # Whether `call` may edit the GraphModule it is given. compile keeps a copy of the graph
    # before such a pass to check it against; a pass that leaves its input as it was and returns
    # a new module (PassResult.gm) says False and saves that copy.
    in_place: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclass(frozen=True)(cls)  # every pass is a frozen dataclass of its options
        if cls.name:
            REGISTRY[cls.name] = cls

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _as_tuple(getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)  # frozen: the one place options are set
            _check_type(self.name, f.name, value, hints[f.name])
        self.validate()

    def validate(self) -> None:
        """Check option values (ranges, combinations); raise `PassConfigError` with the fix."""

    def prerequisites(self) -> list[Pass]:
        """Passes compile runs (verified, with their own report row when they change anything)
        just before this one; a pass never runs another pass inside itself."""
        return []

    def check_source(self, kind: Literal["torch", "onnx"]) -> None:
        """Raise `PassConfigError` if this pass, as configured, cannot run on a model of `kind`
        (compile asks before any pass runs)."""

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __str__(self) -> str:
        changed = [
            f"{f.name}={format_value(getattr(self, f.name))}"
            for f in dataclasses.fields(self)
            if f.repr and getattr(self, f.name) != f.default
        ]
        return self.name + (f"{{{','.join(changed)}}}" if changed else "")


@dataclass(frozen=True)
class Option:
    """One option of a pass, as `racc passes` lists it."""

    name: str
    type: str
    default: Any
    help: str


def options_of(cls: type[Pass]) -> list[Option]:
    """The options of a pass class: from its fields (name, type, default) and the `Options:`
    section of its docstring (help)."""
    hints = typing.get_type_hints(cls)
    helps = _option_helps(inspect.getdoc(cls) or "")
    options = []
    for f in dataclasses.fields(cls):
        if not f.repr:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        options.append(Option(f.name, _type_name(hints[f.name]), default, helps.get(f.name, "")))
    return options


def _option_helps(doc: str) -> dict[str, str]:
    """`name: text` entries of a docstring's `Options:` section, continuation lines joined."""
    helps: dict[str, str] = {}
    inside, current = False, None
    for line in doc.splitlines():
        if line.strip() == "Options:":
            inside = True
            continue
        if not inside:
            continue
        if line and not line.startswith(" "):  # the next section
            break
        text = line.strip()
        name, colon, rest = text.partition(":")
        if (
            colon
            and line.startswith("    ")
            and not line.startswith("     ")
            and name.isidentifier()
        ):
            current = name
            helps[name] = rest.strip()
        elif current and text:
            helps[current] += " " + text
    return helps


def module_names(gm: fx.GraphModule) -> list[str]:
    """The qualified names of `gm`'s modules, what skip=, protect= and where= patterns match."""
    return [name for name, _ in gm.named_modules() if name]


def check_patterns(
    pass_name: str, option: str, patterns: Iterable[str], names: Iterable[str]
) -> None:
    """Raise `PassConfigError` for the first of `patterns` (fnmatch) that matches none of `names`
    (the names a report uses: modules by qualified name), with the names nearest to it: a
    misspelled pattern would otherwise do nothing, silently."""
    names = sorted(set(names))
    for pattern in patterns:
        if any(fnmatchcase(n, pattern) for n in names):
            continue
        near = near_names(pattern, names)
        hint = (
            f"did you mean {', '.join(near)}?"
            if near
            else f"no name is close; names look like {', '.join(names[:4])}"
        )
        raise PassConfigError(
            f"pass '{pass_name}': {option} pattern '{pattern}' matches nothing in this model; "
            f"{hint} (racc inspect --explain lists every name)"
        )


def near_names(pattern: str, names: list[str], n: int = 3) -> list[str]:
    """The names closest to `pattern` (its wildcards dropped), by the whole name or its last
    dotted part; only names close enough to be the one meant."""
    literal = pattern.replace("*", "").replace("?", "").strip(".")
    if not literal:
        return []
    close = difflib.get_close_matches(literal, names, n=n, cutoff=0.7)
    by_tail = {name.rsplit(".", 1)[-1]: name for name in names}
    tail = literal.rsplit(".", 1)[-1]
    for hit in difflib.get_close_matches(tail, list(by_tail), n=n, cutoff=0.75):
        if by_tail[hit] not in close:
            close.append(by_tail[hit])
    return close[:n]


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "|".join(format_value(v) for v in value)
    return str(value)


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is tuple:
        return f"a list of {_type_name(args[0])} (a|b)"
    if origin in _UNIONS:
        return " | ".join(_type_name(a) for a in args)
    if hint is type(None):
        return "none"
    return getattr(hint, "__name__", str(hint))


def _check_type(pass_name: str, option: str, value: Any, hint: Any) -> None:
    if _matches(value, hint):
        return
    raise PassConfigError(
        f"pass '{pass_name}': option '{option}' must be {_type_name(hint)}, got {value!r}"
    )


def _as_tuple(value: Any, hint: Any) -> Any:
    """A list for a tuple option becomes a tuple, and one string for a tuple of strings a tuple
    of one (skip=["a", "b"] and skip="a" read as they are meant); other values are left as
    they are, for the type check."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    tuples = [hint] if origin is tuple else [a for a in args if typing.get_origin(a) is tuple]
    if not tuples or _matches(value, hint):
        return value
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, str) and typing.get_args(tuples[0])[0] is str:
        return (value,)
    return value


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return value in args
    if origin in _UNIONS:
        return any(_matches(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, tuple) and all(_matches(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:  # NaN compares false with everything: no threshold or goal means NaN
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def parse_value(pass_name: str, option: str, text: str, hint: Any) -> Any:
    """Turn the text of `option=text` in a pipeline string into a value of the option's type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    candidates = args if origin in _UNIONS else (hint,)
    if "|" in text:  # "a|b" is how a tuple prints: read it back as one where the option allows
        candidates = sorted(candidates, key=lambda c: typing.get_origin(c) is not tuple)
    for candidate in candidates:
        try:
            value = _parse_as(text, candidate)
        except ValueError:
            continue
        if _matches(value, candidate):
            return value
    raise PassConfigError(
        f"pass '{pass_name}': option '{option}' must be {_type_name(hint)}, got '{text}'"
    )


def _parse_as(text: str, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(text)
        return text.lower() in ("true", "1")
    if hint in (int, float):
        return hint(text)
    if hint is type(None):
        if text.lower() != "none":
            raise ValueError(text)
        return None
    if origin is tuple:
        return tuple(_parse_as(t, args[0]) for t in text.split("|") if t)
    if origin is Literal:
        for a in args:
            if str(a) == text:
                return a
        raise ValueError(text)
    return text
