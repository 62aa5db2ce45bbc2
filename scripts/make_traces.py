#!/usr/bin/env python3
"""Regenerate the real-program page traces in traces/ with valgrind's lackey.

Each program runs under ``valgrind --tool=lackey --trace-mem=yes``; every data
access (``L``, ``S``, ``M`` lines; instruction fetches are ignored) counts once,
``M`` as a write. Tick t holds data accesses 50,000*t .. 50,000*(t+1)-1. Pages
are the address >> 12, renumbered densely in address order (neighbours stay
neighbours; untouched gaps of the address space are dropped). Within one tick a
page is written once, ``w`` if any access to it in the tick was a store: the
simulate model only sees which pages a tick touched (and the first write), so
this is exact for it and keeps the files small. Runs stop after ``--max-ticks``.

Usage: python3 scripts/make_traces.py [--out traces] [--only NAME ...] [--max-ticks 1000]
Needs valgrind, xz, bzip2, gzip, sqlite3, mawk and /usr/bin/python3 (Debian packages).
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

TICK = 50_000
_ACCESS = re.compile(rb"^ ([LSM]) ([0-9a-f]+),", re.M)


def _text(path: Path, n_words: int, seed: int) -> None:
    """Deterministic text: Zipf-ish words from a fixed vocabulary, 12 words a line."""
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 11)))
        for _ in range(5000)
    ]
    weights = [1.0 / (i + 1) for i in range(len(vocab))]
    words = rng.choices(vocab, weights, k=n_words)
    with path.open("w") as f:
        for i in range(0, n_words, 12):
            f.write(" ".join(words[i : i + 12]) + "\n")


_PY = """
import random
r = random.Random(7)
d = {}
for i in range(150000):
    k = r.randrange(60000)
    d[k] = d.get(k, 0) + i
xs = sorted(d.items(), key=lambda kv: (kv[1] % 1000, kv[0]))
s = {}
for k, v in xs:
    s.setdefault(v % 97, []).append(k)
print(sum(len(v) for v in s.values()))
"""

_SQL = """
CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER, v TEXT);
WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < 60000)
INSERT INTO t(k, v) SELECT (x * 7919) % 10007, printf('%08d-%s', x, hex(randomblob(12))) FROM c;
CREATE INDEX t_k ON t(k);
SELECT count(*), sum(length(v)) FROM t WHERE k BETWEEN 100 AND 4000;
SELECT k, count(*) FROM t GROUP BY k ORDER BY count(*) DESC LIMIT 5;
UPDATE t SET v = upper(v) WHERE k % 13 = 0;
SELECT count(*) FROM t a JOIN t b ON a.k = b.k WHERE a.id < 3000;
"""


def programs(work: Path) -> dict[str, tuple[list[str], Path | None]]:
    """name -> (argv, stdin file). Inputs are generated deterministically in ``work``."""
    text = work / "words.txt"
    _text(text, 300_000, 1)
    (work / "q.sql").write_text(_SQL)
    (work / "p.py").write_text(_PY)
    return {
        "xz": (["xz", "-6", "-c", str(text)], None),
        "bzip2": (["bzip2", "-9", "-c", str(text)], None),
        "awk-wordfreq": (
            ["mawk", "{for(i=1;i<=NF;i++)c[$i]++} END{for(w in c) if(c[w]>50) n++; print n}", str(text)],
            None,
        ),
        "sqlite3": (["sqlite3", ":memory:"], work / "q.sql"),
        "gzip": (["gzip", "-9", "-c", str(text)], None),
        "python3-dict": (["/usr/bin/python3", "-S", str(work / "p.py")], None),
        "sort": (["sort", "-k2,2", "-k1,1", "-S", "64M", str(text)], None),
    }


def trace_one(argv: list[str], stdin: Path | None, max_ticks: int) -> list[tuple[set[bytes], set[bytes]]]:
    """Per tick: (pages touched, pages written), pages as hex strings of address >> 12."""
    r_fd, w_fd = os.pipe()
    cmd = ["valgrind", "--tool=lackey", "--trace-mem=yes", f"--log-fd={w_fd}", *argv]
    with open(stdin or os.devnull, "rb") as fin:
        proc = subprocess.Popen(
            cmd, stdin=fin, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(w_fd,)
        )
    os.close(w_fd)
    ticks: list[tuple[set[bytes], set[bytes]]] = []
    pending: list[tuple[bytes, bytes]] = []
    rest = b""
    with os.fdopen(r_fd, "rb", buffering=1 << 20) as pipe:
        while len(ticks) < max_ticks:
            chunk = pipe.read(1 << 22)
            if not chunk:
                break
            buf = rest + chunk
            cut = buf.rfind(b"\n") + 1
            rest = buf[cut:]
            pending.extend(_ACCESS.findall(buf, 0, cut))
            while len(pending) >= TICK and len(ticks) < max_ticks:
                sl, pending = pending[:TICK], pending[TICK:]
                ticks.append(({a[:-3] for _, a in sl}, {a[:-3] for o, a in sl if o != b"L"}))
    proc.kill()
    proc.wait()
    if pending and len(ticks) < max_ticks:
        ticks.append(({a[:-3] for _, a in pending}, {a[:-3] for o, a in pending if o != b"L"}))
    return ticks


def write(path: Path, ticks: list[tuple[set[bytes], set[bytes]]]) -> tuple[int, int]:
    """Write ``tick,page,op`` (gzip, mtime 0 so reruns give identical bytes); (pages, lines)."""
    every = sorted(set().union(*(t for t, _ in ticks)), key=lambda h: int(h or b"0", 16))
    dense = {h: i for i, h in enumerate(every)}
    lines = 0
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as f:
        f.write(b"tick,page,op\n")
        for t, (touched, written) in enumerate(ticks):
            rows = sorted((dense[h], h in written) for h in touched)
            f.write(b"".join(b"%d,%d,%s\n" % (t, p, b"w" if w else b"r") for p, w in rows))
            lines += len(rows)
    return len(every), lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "traces"))
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--max-ticks", type=int, default=1000)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (argv, stdin) in programs(Path(tmp)).items():
            if args.only and name not in args.only:
                continue
            ticks = trace_one(argv, stdin, args.max_ticks)
            pages, lines = write(out / f"{name}.csv.gz", ticks)
            print(f"{name}: {len(ticks)} ticks, {pages} pages, {lines} lines", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
