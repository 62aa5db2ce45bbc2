"""Human units: valid forms, boundaries, and one-line errors for invalid ones."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tiermem.errors import InvalidArgument
from tiermem.model import EvictionCap
from tiermem.units import (
    format_bytes,
    format_duration_ms,
    format_rate_per_min,
    parse_duration_ms,
    parse_eviction_cap,
    parse_memory,
    parse_percent,
    parse_rate_per_min,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("0", 0),
        ("512MiB", 512 << 20),
        ("1GiB", 1 << 30),
        ("1gib", 1 << 30),
        ("2GB", 2 * 10**9),
        ("1.5KiB", 1536),
        ("  8 KiB ", 8192),
        ("1TiB", 1 << 40),
        ("10k", 10_000),
    ],
)
def test_parse_size_valid(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-1MiB", "1XB", "1.2.3", "MiB", "1 MiB B", "nan", "1e3"])
def test_parse_size_invalid(text: str) -> None:
    with pytest.raises(InvalidArgument) as ei:
        parse_size(text)
    assert "\n" not in str(ei.value)
    assert repr(text) in str(ei.value)


def test_parse_size_too_large() -> None:
    assert parse_size("4096TiB") == 4096 << 40
    with pytest.raises(InvalidArgument, match="too large"):
        parse_size("99999999999TiB")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("256M", 256 << 20),
        ("1G", 1 << 30),
        ("1GiB", 1 << 30),
        ("1gb", 1 << 30),
        ("4096", 4096),
        ("2k", 2048),
        ("1.5G", 3 << 29),
    ],
)
def test_parse_memory_is_binary(text: str, expected: int) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["1X", "G", "1iB", "-1G", "1 G B"])
def test_parse_memory_invalid(text: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid memory size"):
        parse_memory(text)


def test_parse_memory_too_large() -> None:
    with pytest.raises(InvalidArgument, match="too large"):
        parse_memory("99999999999T")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500ms", 500),
        ("30s", 30_000),
        ("2m", 120_000),
        ("2min", 120_000),
        ("1h", 3_600_000),
        ("30", 30_000),
        ("1.5s", 1500),
        ("0s", 0),
        (" 10 s", 10_000),
    ],
)
def test_parse_duration(text: str, expected: int) -> None:
    assert parse_duration_ms(text) == expected


@pytest.mark.parametrize("text", ["abc", "-1s", "1d", "s", "1 hour", ""])
def test_parse_duration_invalid(text: str) -> None:
    with pytest.raises(InvalidArgument) as ei:
        parse_duration_ms(text)
    assert str(ei.value) == f"invalid duration {text!r}: use e.g. 500ms, 30s, 2m, 1h"


@pytest.mark.parametrize(
    ("text", "expected"), [("20%", 0.2), ("0%", 0.0), ("100%", 1.0), ("0.25", 0.25), ("1", 1.0)]
)
def test_parse_percent(text: str, expected: float) -> None:
    assert parse_percent(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["101%", "1.01", "2", "x%", "%", "-5%"])
def test_parse_percent_invalid(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_percent(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.2%/min", 0.002),
        ("0.2%/m", 0.002),
        ("0.002", 0.002),
        ("0.01%/s", 0.006),
        ("6%/h", 0.001),
        ("0", 0.0),
        ("100%/min", 1.0),
    ],
)
def test_parse_rate(text: str, expected: float) -> None:
    assert parse_rate_per_min(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["5%/s", "101%/min", "0.2%/day", "fast", "%/min"])
def test_parse_rate_invalid(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_rate_per_min(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20%", EvictionCap(fraction=0.2)),
        ("100%", EvictionCap(fraction=1.0)),
        ("512MiB", EvictionCap(bytes=512 << 20)),
        ("1000pages", EvictionCap(pages=1000)),
        ("1 page", EvictionCap(pages=1)),
        ("64p", EvictionCap(pages=64)),
        ("0pages", EvictionCap(pages=0)),
        ("none", EvictionCap()),
        ("Unlimited", EvictionCap()),
    ],
)
def test_parse_eviction_cap(text: str, expected: EvictionCap) -> None:
    cap = parse_eviction_cap(text)
    assert cap == expected
    cap.validate()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("20", "needs a unit"),
        ("0.2", "needs a unit"),
        ("120%", "between 0% and 100%"),
        ("lots", "invalid eviction cap"),
        ("-5pages", "invalid eviction cap"),
        ("1.5pages", "invalid eviction cap"),
    ],
)
def test_parse_eviction_cap_invalid(text: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        parse_eviction_cap(text)


@given(st.integers(min_value=0, max_value=2**40))
def test_size_roundtrip_bytes(n: int) -> None:
    assert parse_size(str(n)) == n


@given(st.integers(min_value=1, max_value=10**7))
def test_duration_ms_roundtrip(ms: int) -> None:
    assert parse_duration_ms(f"{ms}ms") == ms


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (500, "500ms"),
        (30_000, "30s"),
        (1500, "1.5s"),
        (120_000, "2m"),
        (90_000, "1m30s"),
        (3_600_000, "1h"),
        (5_400_000, "1h30m"),
    ],
)
def test_format_duration(ms: int, text: str) -> None:
    assert format_duration_ms(ms) == text
    assert parse_duration_ms(text.replace("1m30s", "90s").replace("1h30m", "90m")) == ms


def test_format_bytes_and_rate() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(1 << 30) == "1.0 GiB"
    assert format_bytes(5 << 50) == "5120.0 TiB"
    assert format_rate_per_min(0.002) == "0.2%/min"
    assert parse_rate_per_min(format_rate_per_min(0.002)) == pytest.approx(0.002)
