"""Typed `name=value` parameters for small dataclasses (cache policies, model variants).

A policy declares its parameters as dataclass fields with type hints (`int`, `float`,
`bool`, `str`, `Literal[...]`, unions, optionals); this module turns the strings of a spec
into those types and produces errors that list what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ParamError(ValueError):
    """A parameter string that does not fit its declared type."""


def describe_type(hint: Any) -> str:
    """How a type reads in an error message: 'one of 2, 4, 8', 'an integer', ..."""
    origin = get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(hint))
    if origin in (Union, types.UnionType):
        parts = [describe_type(a) for a in get_args(hint) if a is not type(None)]
        return " or ".join(parts)
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", Path: "a path"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def convert(value: str, hint: Any) -> Any:
    """Convert `value` to `hint`, or raise ParamError."""
    origin = get_origin(hint)
    if origin is Literal:
        for option in get_args(hint):
            if str(option).lower() == value.lower():
                return option
        raise ParamError(describe_type(hint))
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        # Literals first: "auto" should not be tried as a float.
        options.sort(key=lambda a: get_origin(a) is not Literal)
        for option in options:
            try:
                return convert(value, option)
            except ParamError:
                continue
        raise ParamError(describe_type(hint))
    if hint is bool:
        low = value.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ParamError(describe_type(hint))
    if hint in (int, float):
        try:
            return hint(value)
        except ValueError:
            raise ParamError(describe_type(hint)) from None
    if hint is Path:
        return Path(value)
    if hint is str:
        return value
    raise ParamError(f"unsupported parameter type {hint!r}")


def render(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def field_hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def build_params(cls: type, items: list[str], where: str) -> dict[str, Any]:
    """Parse `name=value` items (and bare boolean flags) against `cls`'s fields.

    `where` prefixes every error, e.g. "cache=mixed".
    """
    hints = field_hints(cls)
    allowed = ", ".join(hints) if hints else "none"
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = (part.strip() for part in item.partition("="))
        if not name:
            raise ParamError(f"{where}: empty parameter in {item!r}")
        if name not in hints:
            raise ParamError(f"{where}: unknown parameter {name!r}; allowed: {allowed}")
        if name in out:
            raise ParamError(f"{where}: parameter {name!r} given twice")
        hint = hints[name]
        if not sep:
            if hint is bool:
                out[name] = True
                continue
            raise ParamError(f"{where}: {name!r} needs a value ({name}=...), {describe_type(hint)}")
        try:
            out[name] = convert(value, hint)
        except ParamError as err:
            raise ParamError(f"{where}: {name}={value} is not {err}") from None
    return out


def registrar(registry: dict[str, type], kind: str) -> typing.Callable[[str], typing.Callable[[type], type]]:
    """A class decorator factory: `@register(name)` makes the class a frozen dataclass (unless it
    is one already), sets `cls.name` and files it under `name` in `registry`; a second class under
    one name is an error rather than a silent replacement."""

    def register(name: str) -> typing.Callable[[type], type]:
        def wrap(cls: type) -> type:
            if not dataclasses.is_dataclass(cls) or "__dataclass_fields__" not in cls.__dict__:
                cls = dataclasses.dataclass(frozen=True)(cls)
            if name in registry and registry[name] is not cls:
                raise ValueError(f"{kind} {name!r} registered twice")
            cls.name = name
            registry[name] = cls
            return cls

        return wrap

    return register
