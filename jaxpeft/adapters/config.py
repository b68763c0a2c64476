"""`AdapterConfig`: the fields every adapter method shares (targeting, layer selection, saved modules).

Imports jaxpeft.errors only. Method configs (LoraConfig, ...) subclass it as frozen dataclasses; every init field
is checked against its annotation here (AdapterError naming the field), before the method's own range checks.
"""
from __future__ import annotations

import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any

from jaxpeft.errors import AdapterError

PATTERN_FIELDS = ("rank_pattern", "alpha_pattern")


@dataclass(frozen=True)
class AdapterConfig:
    r"""Targeting shared by every method.

    target_modules: PEFT-style list of module-name suffixes (a name matches when it equals the entry or
        ends with '.' + entry), or one regex string matched in full against the canonical per-layer HF
        module path (e.g. r'model\\.layers\\.\\d+\\.self_attn\\.(q|v)_proj'). None = the method's default
        targets for the architecture.
    exclude_modules: same forms; matching modules are not adapted.
    layers_to_transform: only these layer indices (others keep the base behaviour).
    rank_pattern / alpha_pattern: {pattern: value} overriding r / alpha per module; the first pattern
        with re.match(rf"(.*\.)?({pattern})$", hf_module_path) wins, as in PEFT.
    modules_to_save: top-level modules trained in full alongside the adapter (e.g. ('classifier',)).
    """

    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | None = None
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    modules_to_save: tuple[str, ...] = ()

    method: str = field(default="", init=False)
    """Registry name of the method (set by each subclass)."""

    def __post_init__(self) -> None:
        # normalise lists and dicts (from YAML/JSON) to hashable tuples: configs are static jit arguments
        hints = _hints(type(self))
        for f in fields(self):
            if f.init and f.name not in PATTERN_FIELDS:
                object.__setattr__(self, f.name, _tuples(getattr(self, f.name), hints[f.name]))
        v = self.layers_to_transform
        if isinstance(v, int) and not isinstance(v, bool):  # PEFT accepts one layer index
            object.__setattr__(self, "layers_to_transform", (v,))
        for key in PATTERN_FIELDS:
            object.__setattr__(self, key, _patterns(key, getattr(self, key)))
        for f in fields(self):  # every field of the method's class, so each message names the offending field
            if f.init and f.name not in PATTERN_FIELDS:
                v = getattr(self, f.name)
                if not _is(v, hints[f.name]):
                    raise AdapterError(f"{f.name}={v!r}: expected {_describe(hints[f.name])}")
                _check_int32(f.name, v)
        for key in ("target_modules", "exclude_modules"):
            v = getattr(self, key)
            if isinstance(v, str):
                _check_regex(key, v, v)
        if self.layers_to_transform == ():
            raise AdapterError("layers_to_transform=[]: selects no layer; give at least one layer index, or null for "
                               "every layer")

    def options_for(self, hf_module: str) -> dict[str, Any]:
        """Per-module overrides (e.g. {'r': 16}) from rank_pattern / alpha_pattern for one HF module path."""
        out: dict[str, Any] = {}
        for key, patterns in (("r", self.rank_pattern), ("alpha", self.alpha_pattern)):
            for pat, value in patterns:
                if re.match(rf"(.*\.)?({pat})$", hf_module):
                    out[key] = value
                    break
        return out


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _tuples(value: Any, hint: Any) -> Any:
    """A list (from YAML/JSON) or a set (sorted) as a tuple where the annotation takes a tuple, recursively; other
    values as given."""
    if isinstance(value, (set, frozenset)):
        try:
            value = sorted(value)
        except TypeError:  # mixed types: left as a set, refused by the type check
            return value
    if not isinstance(value, list):
        return value
    for h in _options(hint):
        if typing.get_origin(h) is tuple:
            args = typing.get_args(h)
            inner = args[0] if len(args) == 2 and args[1] is Ellipsis else Any
            return tuple(_tuples(v, inner) for v in value)
    return value


def _options(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _is(value: Any, hint: Any) -> bool:
    """Whether value fits the annotation: bool is not an int, an int is a float, floats are finite."""
    if hint is Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is(value, h) for h in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_is(v, args[0]) for v in value)
        return len(value) == len(args) and all(_is(v, h) for v, h in zip(value, args))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _check_int32(key: str, value: Any) -> None:
    """Integers become array sizes, layer indices and step counts compared with int32 arrays: they must fit JAX's
    default 32-bit integer."""
    for v in value if isinstance(value, tuple) else (value,):
        if isinstance(v, tuple):
            _check_int32(key, v)
        elif isinstance(v, int) and not -2 ** 31 <= v < 2 ** 31:
            raise AdapterError(f"{key}={value!r}: {v} does not fit a 32-bit integer (JAX's default for sizes, layer "
                               "indices and step counts); use a realistic value")


def _describe(hint: Any) -> str:
    """The annotation in YAML words: 'an integer', 'a list of strings or a string or null', ..."""
    if hint is type(None) or hint is None:
        return "null"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        return f"a list ({', '.join(_describe(h) for h in args)})"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _plural(hint: Any) -> str:
    return {bool: "booleans", int: "integers", float: "finite numbers", str: "strings"}.get(
        hint, f"({_describe(hint)})")


def _patterns(key: str, value: Any) -> tuple[tuple[str, Any], ...]:
    """rank_pattern / alpha_pattern as ((pattern, value), ...) from a mapping or a list of pairs, each pattern a
    valid regex, each rank an integer >= 1 and each alpha a finite number."""
    kind = "rank" if key == "rank_pattern" else "alpha"
    shape = f"a mapping {{module pattern: {kind}}} (e.g. {{'q_proj': {16 if kind == 'rank' else 32}}})"
    expected = f"{key}={value!r}: expected {shape}"
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        items = [tuple(p) for p in value]
    else:
        raise AdapterError(expected)
    seen = set()
    for pat, v in items:
        if not isinstance(pat, str):
            raise AdapterError(f"{key}: pattern {pat!r} is not a string; expected {shape}")
        _check_regex(key, pat, rf"(.*\.)?({pat})$")
        if pat in seen:
            raise AdapterError(f"{key}: pattern {pat!r} is given twice; give each pattern once")
        seen.add(pat)
        if kind == "rank" and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise AdapterError(f"{key}[{pat!r}]={v!r}: a rank must be an integer >= 1")
        _check_int32(f"{key}[{pat!r}]", v)
        if kind == "alpha" and not _is(v, float):
            raise AdapterError(f"{key}[{pat!r}]={v!r}: an alpha must be a finite number")
    return tuple(items)


def _check_regex(key: str, pattern: str, compiled: str) -> None:
    try:
        re.compile(compiled)
    except re.error as e:
        raise AdapterError(f"{key}={pattern!r} is not a valid regex ({e}): give a list of module-name suffixes, "
                           "or escape the regex's special characters") from None
