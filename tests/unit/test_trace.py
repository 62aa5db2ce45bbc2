"""Trace files: parsing (plain, gzip, CRLF), malformed lines with line numbers, the writer."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiermem.errors import InvalidArgument
from tiermem.sim.trace import load_trace, parse_trace, write_trace

GOOD = b"tick,page,op\n0,3,r\n0,0,w\n2,7,w\n2,3,r\n5,1,r\n"


def test_hand_written_trace() -> None:
    t = parse_trace(GOOD, "t.csv")
    assert t.ticks.tolist() == [0, 0, 2, 2, 5]
    assert t.pages.tolist() == [3, 0, 7, 3, 1]
    assert t.writes.tolist() == [False, True, True, False, False]
    assert (t.n_pages, t.n_ticks, len(t)) == (8, 6, 5)
    ticks = [(tick, p.tolist(), w.tolist()) for tick, p, w in t.by_tick()]
    assert ticks == [
        (0, [3, 0], [False, True]),
        (1, [], []),
        (2, [7, 3], [True, False]),
        (3, [], []),
        (4, [], []),
        (5, [1], [False]),
    ]


def test_crlf_no_final_newline_bom_and_given_size() -> None:
    raw = b"\xef\xbb\xbftick,page,op\r\n1,2,w\r\n1,12345678901234,r"
    t = parse_trace(raw, n_pages=12345678901235)
    assert t.pages.tolist() == [2, 12345678901234] and t.writes.tolist() == [True, False]
    assert t.n_pages == 12345678901235 and t.n_ticks == 2


def test_gzip_detected_by_magic_not_name(tmp_path: Path) -> None:
    p = tmp_path / "plain-name.csv"
    p.write_bytes(gzip.compress(GOOD))
    assert load_trace(p).pages.tolist() == [3, 0, 7, 3, 1]
    multi = gzip.compress(GOOD[:20]) + gzip.compress(GOOD[20:])  # concatenated members
    assert parse_trace(multi).pages.tolist() == [3, 0, 7, 3, 1]
    for bad in (b"\x1f\x8b" + b"junk", gzip.compress(GOOD)[:-12]):
        q = tmp_path / "bad.csv.gz"
        q.write_bytes(bad)
        with pytest.raises(InvalidArgument, match="bad gzip"):
            load_trace(q)


def test_header_only_needs_a_size() -> None:
    with pytest.raises(InvalidArgument, match="no accesses"):
        parse_trace(b"tick,page,op\n")
    t = parse_trace(b"tick,page,op\n", n_pages=4)
    assert (t.n_pages, t.n_ticks, len(t)) == (4, 0, 0)
    assert list(t.by_tick()) == []


@pytest.mark.parametrize(
    ("raw", "line", "what"),
    [
        (b"tick,page\n0,1\n", 1, "expected the header"),
        (b"", 1, "expected the header"),
        (b"tick,page,op\n0,1,r\n0,1\n", 3, "expected 3 comma-separated fields, got 2"),
        (b"tick,page,op\n0,1,r,x\n", 2, "got 4"),
        (b"tick,page,op\n0,1,r\n\n1,1,r\n", 3, "empty line"),
        (b"tick,page,op\n0,1,r\n1,a,r\n", 3, "page must be a non-negative integer"),
        (b"tick,page,op\n0,-1,r\n", 2, "page must be"),
        (b"tick,page,op\n0, 1,r\n", 2, "page must be"),
        (b"tick,page,op\n0,,r\n", 2, "page must be"),
        (b"tick,page,op\n0,1234567890123456789,r\n", 2, "at most 18 digits"),
        (b"tick,page,op\n+1,1,r\n", 2, "tick must be"),
        (b"tick,page,op\n1.5,1,r\n", 2, "tick must be"),
        (b"tick,page,op\n0,1,x\n", 2, "op must be 'r' or 'w'"),
        (b"tick,page,op\n0,1,rw\n", 2, "op must be"),
        (b"tick,page,op\n0,1,\n", 2, "op must be"),
        (b"tick,page,op\n0,1,R\n", 2, "op must be"),
        (b"tick,page,op\n0,1,r\n5,1,r\n4,1,w\n", 4, "tick decreases"),
        (b"tick,page,op\n0,1,r\n0,9,r\n", 3, "page out of range (the guest has 4 pages)"),
    ],
)
def test_malformed_lines_report_the_line(raw: bytes, line: int, what: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        parse_trace(raw, "f.csv", n_pages=4 if b"0,9" in raw else None)
    msg = str(e.value)
    assert msg.startswith(f"trace f.csv line {line}: ") and what in msg and "\n" not in msg


def test_the_first_bad_line_wins() -> None:
    raw = b"tick,page,op\n0,1,r\n0,x,r\n0,1,q\n"
    with pytest.raises(InvalidArgument, match="line 3: page"):
        parse_trace(raw, "f")


def test_writer_round_trip_plain_and_gzip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ticks = np.sort(rng.integers(0, 1000, 5000))
    pages = rng.integers(0, 10**12, 5000)
    writes = rng.random(5000) < 0.4
    for name in ("a.csv", "a.csv.gz"):
        path = write_trace(tmp_path / name, ticks, pages, writes)
        assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
        t = load_trace(path)
        assert t.ticks.tolist() == ticks.tolist() and t.pages.tolist() == pages.tolist()
        assert t.writes.tolist() == writes.tolist()
    text = write_trace(
        tmp_path / "s.csv", np.array([0, 10]), np.array([5, 123]), np.array([True, False])
    ).read_text()
    assert text == "tick,page,op\n0,5,w\n10,123,r\n"
    with pytest.raises(InvalidArgument):
        write_trace(tmp_path / "bad.csv", np.array([1, 0]), np.array([0, 0]), np.array([True, True]))
    with pytest.raises(InvalidArgument):
        write_trace(tmp_path / "bad.csv", np.array([0]), np.array([-1]), np.array([True]))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 10**18 - 1), st.integers(0, 10**18 - 1), st.booleans()),
        min_size=1,
        max_size=50,
    )
)
def test_parse_inverts_format(rows: list[tuple[int, int, bool]]) -> None:
    rows.sort(key=lambda r: r[0])
    raw = ("tick,page,op\n" + "".join(f"{t},{p},{'w' if w else 'r'}\n" for t, p, w in rows)).encode()
    t = parse_trace(raw)
    assert list(zip(t.ticks.tolist(), t.pages.tolist(), t.writes.tolist(), strict=True)) == rows
    assert t.n_pages == max(p for _, p, _ in rows) + 1


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=60))
def test_garbage_never_crashes(body: bytes) -> None:
    try:
        parse_trace(b"tick,page,op\n" + body, "g", n_pages=1000)
    except InvalidArgument as e:
        assert str(e).startswith("trace g")
