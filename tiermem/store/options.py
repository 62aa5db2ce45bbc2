"""The one parser of store-URL query options, shared by every backend.

Each backend declares its options as a table of :class:`Opt`; :func:`parse_options`
turns a URL query plus keyword overrides into typed values. It is strict on
purpose, because a silently misread option is a security bug (``ssl_check_hostname=on``
once turned hostname checking *off*):

- an unknown option, or one given twice in the query, is an error;
- a boolean is exactly one of ``1 true yes on`` / ``0 false no off`` (any case);
- an integer is an integer (``retries=2.5`` is refused), a number is finite and in range;
- a choice is one of its listed words.

Every error is a one-line ConfigurationError naming the option and the store kind.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from tiermem.errors import ConfigurationError

__all__ = ["Opt", "parse_bool", "parse_options"]

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class Opt:
    """One option: its type (``bool``, ``int``, ``float``, ``str`` or ``choice``), default and bounds."""

    kind: str
    default: Any = None
    lo: float = -math.inf
    hi: float = math.inf
    choices: tuple[str, ...] = ()


def parse_bool(value: object, what: str) -> bool:
    """A strict boolean: a bool, or one of 1/true/yes/on and 0/false/no/off (any case)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigurationError(f"{what} must be a boolean (1/true/yes/on or 0/false/no/off), not {value!r}")


def _convert(kind_name: str, key: str, raw: object, opt: Opt) -> Any:
    what = f"{kind_name} store option {key}"
    if opt.kind == "bool":
        return parse_bool(raw, what)
    if opt.kind == "str":
        return str(raw)
    if opt.kind == "choice":
        text = str(raw).strip().lower()
        if text not in opt.choices:
            raise ConfigurationError(f"{what} must be one of {', '.join(opt.choices)}, not {raw!r}")
        return text
    if isinstance(raw, bool):
        raise ConfigurationError(f"{what}={raw!r} is not a number")
    if opt.kind == "int":
        if isinstance(raw, int):
            v: float = raw
        else:
            text = str(raw).strip()
            if not text.lstrip("+-").isdigit():
                raise ConfigurationError(f"{what}={raw!r} is not an integer")
            v = int(text)
    else:
        try:
            v = float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ConfigurationError(f"{what}={raw!r} is not a number") from None
        if not math.isfinite(v):
            raise ConfigurationError(f"{what}={raw!r} is not a finite number")
    if not opt.lo <= v <= opt.hi:
        raise ConfigurationError(f"{what}={raw} is outside {opt.lo:g}..{opt.hi:g}")
    return v


def parse_options(
    kind_name: str, query: str, overrides: Mapping[str, object], schema: Mapping[str, Opt], where: str
) -> dict[str, Any]:
    """Typed options from a URL query and keyword overrides (which win); defaults fill the rest.

    ``kind_name`` names the store kind in errors ("Redis"), ``where`` the redacted URL.
    Options whose default is None and that were not given are absent from the result.
    """
    given: dict[str, object] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key in given:
            raise ConfigurationError(f"{kind_name} store option {key!r} is given twice in {where}")
        given[key] = value
    given.update(overrides)
    unknown = sorted(set(given) - set(schema))
    if unknown:
        raise ConfigurationError(
            f"unknown {kind_name} store option {unknown[0]!r} in {where} (known: {', '.join(sorted(schema))})"
        )
    out: dict[str, Any] = {}
    for key, opt in schema.items():
        if key in given:
            out[key] = _convert(kind_name, key, given[key], opt)
        elif opt.default is not None:
            out[key] = opt.default
    return out
