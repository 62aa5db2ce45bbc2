"""Hypothesis strategies for any protobuf request message, built from its descriptor.

Every field is either unset or drawn from its type's full range (strings of any
text, integers across the whole wire type, NaN and infinities, unknown enum
values, empty and nested messages, repeated and map fields). Fields named like
ids, addresses, stores, workloads, selectors and sizes also draw from a few
meaningful values (existing VM ids, the real store name, page-aligned sizes...)
so that a fuzzed request often gets past the first check and exercises the
deeper validation of the server.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

__all__ = ["Hints", "message_strategy"]

Hints = Mapping[str, st.SearchStrategy[Any]]
"""Extra values per field name (unioned with the type's full range)."""

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}

_TEXT = st.text(max_size=80)


def _fits_int(lo: int, hi: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


_FITS: dict[int, Callable[[Any], bool]] = {t: _fits_int(lo, hi) for t, (lo, hi) in _INT_RANGES.items()}
_FITS[FieldDescriptor.TYPE_STRING] = lambda v: isinstance(v, str)
_FITS[FieldDescriptor.TYPE_DOUBLE] = lambda v: isinstance(v, float)
_FITS[FieldDescriptor.TYPE_FLOAT] = lambda v: isinstance(v, float)


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = sorted(
        {v for v in (lo, hi, 0, 1, -1, 2, 4095, 4096, 4097, 2**31 - 1, 2**32, 2**63 - 1) if lo <= v <= hi}
    )
    return st.one_of(
        st.sampled_from(edges),
        st.integers(0, min(hi, 100_000)) if lo <= 0 else st.nothing(),
        st.integers(lo, hi),
    )


def _scalar(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = f.type
    if t in _INT_RANGES:
        return _ints(*_INT_RANGES[t])
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return _TEXT
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_DOUBLE:
        return st.floats(allow_nan=True, allow_infinity=True)
    if t == FieldDescriptor.TYPE_FLOAT:
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if t == FieldDescriptor.TYPE_ENUM:
        assert f.enum_type is not None
        known = [v.number for v in f.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-5, 50))  # open enums: unknown values too
    raise AssertionError(f"unhandled field type {t} of {f.full_name}")


def _value(f: FieldDescriptor, hints: Hints, depth: int) -> st.SearchStrategy[Any]:
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        assert f.message_type is not None
        base: st.SearchStrategy[Any] = (
            message_strategy(f.message_type, hints, depth + 1) if depth < 4 else st.just(None)
        )
    else:
        base = _scalar(f)
    hint = hints.get(f.name)
    if hint is None or f.type == FieldDescriptor.TYPE_MESSAGE:
        return base
    # a hint only applies where its values fit the field's type (``store`` is also a message elsewhere)
    fits = _FITS.get(f.type, lambda v: False)
    return st.one_of(hint.filter(fits), base)


def _is_map(f: FieldDescriptor) -> bool:
    mt = f.message_type
    return f.type == FieldDescriptor.TYPE_MESSAGE and mt is not None and bool(mt.GetOptions().map_entry)


def _is_repeated(f: FieldDescriptor) -> bool:
    # protobuf >= 5 has is_repeated; older versions only the label
    rep = getattr(f, "is_repeated", None)
    return bool(rep) if rep is not None else bool(getattr(f, "label", 0) == FieldDescriptor.LABEL_REPEATED)


def _field(f: FieldDescriptor, hints: Hints, depth: int) -> st.SearchStrategy[Any]:
    if _is_map(f):
        assert f.message_type is not None
        kf, vf = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
        return st.dictionaries(_value(kf, hints, depth), _value(vf, hints, depth), max_size=4)
    if _is_repeated(f):
        return st.lists(_value(f, hints, depth), max_size=4)
    return _value(f, hints, depth)


def _builder(desc: Descriptor) -> Callable[[dict[str, Any]], Message]:
    cls = GetMessageClass(desc)

    def build(values: dict[str, Any]) -> Message:
        m = cls()
        for name, v in values.items():
            if v is None:
                continue
            f = desc.fields_by_name[name]
            target: Any = getattr(m, name) if _is_map(f) or _is_repeated(f) else None
            if _is_map(f):
                assert f.message_type is not None
                vf = f.message_type.fields_by_name["value"]
                for k, val in v.items():
                    if val is None:
                        continue
                    if vf.type == FieldDescriptor.TYPE_MESSAGE:
                        target[k].CopyFrom(val)
                    else:
                        target[k] = val
            elif _is_repeated(f):
                for item in v:
                    if item is None:
                        continue
                    if f.type == FieldDescriptor.TYPE_MESSAGE:
                        target.add().CopyFrom(item)
                    else:
                        target.append(item)
            elif f.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(m, name).CopyFrom(v)
            else:
                setattr(m, name, v)
        return m

    return build


def message_strategy(
    desc: Descriptor, hints: Hints | None = None, depth: int = 0
) -> st.SearchStrategy[Message]:
    """Messages of type ``desc``: every field unset or drawn from its full range (plus ``hints``)."""
    hints = hints or {}
    fields = {f.name: st.one_of(st.none(), _field(f, hints, depth)) for f in desc.fields}
    return st.fixed_dictionaries(fields).map(_builder(desc))
