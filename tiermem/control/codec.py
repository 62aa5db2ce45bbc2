"""JSON encoding of domain dataclasses for the state stores.

Generic over dataclasses, enums, optionals, tuples, lists and dicts, driven by
the type hints, so a new field in ``tiermem.model`` needs no change here. A
decoder is compiled once per type (the scheduler decodes thousands of records
per resync). Fields missing from stored JSON (an older record) take their
defaults; unknown keys (a newer record) are ignored, so replicas of different
versions can share one Redis.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["decode", "dumps", "encode", "loads"]

T = TypeVar("T")
_Decoder = Callable[[Any], Any]


def encode(obj: Any) -> Any:
    """A JSON-able structure for ``obj``."""
    cls: Any = type(obj)
    return _encoder(cls)(obj)


def _encode_any(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): encode(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [encode(v) for v in obj]
    return obj


@functools.cache
def _encoder(cls: Any) -> _Decoder:  # keyed by class: one compiled encoder per type
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        plan = [(f.name, _field_encoder(hints[f.name])) for f in dataclasses.fields(cls)]
        return lambda o: {n: enc(getattr(o, n)) for n, enc in plan}
    if issubclass(cls, enum.Enum):
        return lambda o: o.value
    if cls in (int, float, str, bool, type(None)):
        return _identity
    return _encode_any


@functools.cache
def _field_encoder(tp: Any) -> _Decoder:
    """An encoder for values of a declared field type: primitives are taken as they are."""
    if tp in (int, float, str, bool):
        return _identity
    origin = typing.get_origin(tp)
    if origin is dict and typing.get_args(tp)[1] in (int, float, str, bool):
        return dict
    if isinstance(tp, type) and (dataclasses.is_dataclass(tp) or issubclass(tp, enum.Enum)):
        return _encoder(tp)
    return encode


def _identity(v: Any) -> Any:
    return v


@functools.cache
def _decoder(tp: Any) -> _Decoder:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            return _identity
        inner = _decoder(args[0])
        return lambda v: None if v is None else inner(v)
    if origin is tuple:
        item = _decoder(typing.get_args(tp)[0])
        return lambda v: tuple(item(x) for x in v)
    if origin is list:
        item = _decoder(typing.get_args(tp)[0])
        return lambda v: [item(x) for x in v]
    if origin is dict:
        val = _decoder(typing.get_args(tp)[1])
        if val is _identity:
            return dict
        return lambda v: {k: val(x) for k, x in v.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass_decoder(tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp
    if tp is float:
        return float
    return _identity


def _dataclass_decoder(tp: type) -> _Decoder:
    hints = typing.get_type_hints(tp)
    plan = [(f.name, _decoder(hints[f.name])) for f in dataclasses.fields(tp)]

    def dec(v: Any) -> Any:
        return tp(**{name: d(v[name]) for name, d in plan if name in v})

    return dec


def decode(tp: Any, data: Any) -> Any:
    """Rebuild a value of type ``tp`` from :func:`encode` output."""
    return None if data is None else _decoder(tp)(data)


def dumps(obj: Any, omit: frozenset[str] = frozenset()) -> str:
    """Compact JSON text for ``obj``, without its top-level fields named in ``omit``."""
    doc = encode(obj)
    for name in omit:
        doc.pop(name, None)
    return json.dumps(doc, separators=(",", ":"))


def loads(tp: type[T], text: str | bytes) -> T:
    """Decode JSON text into a ``tp``."""
    return typing.cast(T, decode(tp, json.loads(text)))
