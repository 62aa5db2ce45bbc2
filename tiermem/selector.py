"""Label selectors: ``k=v,k2=v2``, every term must match."""

from __future__ import annotations

import re
from collections.abc import Mapping

from tiermem.errors import InvalidArgument

__all__ = ["matches", "normalize_selector", "parse_selector", "validate_labels"]

_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}", re.ASCII)
_VALUE = re.compile(r"[A-Za-z0-9._-]{0,63}", re.ASCII)
MAX_LABELS = 64


def _check_pair(key: str, value: str, what: str) -> None:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise InvalidArgument(
            f"invalid {what} key {key!r}: 1-63 characters of [A-Za-z0-9._/-], alphanumeric first"
        )
    if not isinstance(value, str) or not _VALUE.fullmatch(value):
        raise InvalidArgument(
            f"invalid {what} value {value!r} for {key!r}: up to 63 characters of [A-Za-z0-9._-]"
        )


def parse_selector(text: str) -> dict[str, str]:
    """Parse ``k=v,k2=v2`` into a dict; raise InvalidArgument on any malformed term.

    An empty selector is rejected: it would match every VM, which is what the
    fleet default is for.
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgument("empty label selector: use k=v[,k2=v2] (the fleet default matches every VM)")
    terms: dict[str, str] = {}
    for raw in text.split(","):
        term = raw.strip()
        if "=" not in term:
            raise InvalidArgument(f"invalid selector term {term!r} in {text!r}: use k=v")
        key, _, value = term.partition("=")
        key, value = key.strip(), value.strip()
        _check_pair(key, value, "selector")
        if key in terms and terms[key] != value:
            raise InvalidArgument(f"selector {text!r} gives {key!r} two values")
        terms[key] = value
    if len(terms) > MAX_LABELS:
        raise InvalidArgument(f"selector {text!r} has more than {MAX_LABELS} terms")
    return terms


def normalize_selector(text: str) -> str:
    """The canonical form of a selector: terms sorted by key, no spaces."""
    return ",".join(f"{k}={v}" for k, v in sorted(parse_selector(text).items()))


def matches(terms: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """True if every term of the selector is among ``labels``."""
    return all(labels.get(k) == v for k, v in terms.items())


def validate_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """Return ``labels`` as a dict if every key and value is valid, else raise InvalidArgument."""
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"too many labels ({len(labels)} > {MAX_LABELS})")
    for k, v in labels.items():
        _check_pair(k, v, "label")
    return dict(labels)
