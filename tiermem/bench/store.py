"""Page-store benchmark: each figure beside a raw baseline measured in the same run.

For every batch size: put and get throughput (pages/s, MB/s) of the store and
of the plain client doing the same I/O with the same bytes:

- Redis: a redis-py pipeline of SETs, then of GETs (same connection pool);
- S3: ``put_object`` of one object as large as the batch, then a ranged
  ``get_object`` of it (same boto3 client);
- local: ``os.pwrite`` of the batch into one file (plus ``fsync`` when the store
  fsyncs), then ``os.pread``.

Then single-page get latency (p50/p99), store and raw interleaved sample by
sample, and the stored bytes when half of the input pages are zero. The goals
are printed, not asserted: batched put >= 0.7x raw, single get <= 1.5x raw,
stored <= 0.55x input with 50% zero pages.

Run: ``python -m tiermem.bench.store --store URL [--json]`` or ``--spawn redis|s3``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from tiermem.store.base import PageBlob, PageStore
from tiermem.store.url import open_store

__all__ = ["main", "run"]

GOAL_PUT = 0.7
GOAL_GET_LATENCY = 1.5
GOAL_ZERO_RATIO = 0.55


class _Raw:
    """The plain-client baseline for one store kind."""

    name = "none"

    def put(self, batch: int, pages: Sequence[bytes]) -> None:
        raise NotImplementedError

    def get(self, batch: int, n: int) -> list[bytes]:
        raise NotImplementedError

    def get_one(self, batch: int, index: int) -> bytes:
        raise NotImplementedError

    def reset(self) -> None:
        """Start a new run (a fresh file for the local baseline)."""

    def close(self) -> None:
        pass


class _RedisRaw(_Raw):
    name = "redis-py pipeline of SET / GET"

    def __init__(self, store: Any) -> None:
        self.client = store.client
        self.prefix = f"tiermem-bench-raw:{uuid.uuid4().hex[:8]}"

    def _key(self, batch: int, i: int) -> str:
        return f"{self.prefix}:{batch}:{i}"

    def put(self, batch: int, pages: Sequence[bytes]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for i, p in enumerate(pages):
            pipe.set(self._key(batch, i), p)
        pipe.execute()

    def get(self, batch: int, n: int) -> list[bytes]:
        if n == 1:
            return [self.client.get(self._key(batch, 0))]
        pipe = self.client.pipeline(transaction=False)
        for i in range(n):
            pipe.get(self._key(batch, i))
        return list(pipe.execute())

    def get_one(self, batch: int, index: int) -> bytes:
        return bytes(self.client.get(self._key(batch, index)))

    def close(self) -> None:
        keys = list(self.client.scan_iter(match=f"{self.prefix}:*", count=1000))
        for i in range(0, len(keys), 1000):
            self.client.unlink(*keys[i : i + 1000])


class _S3Raw(_Raw):
    name = "boto3 put_object of one object per batch / ranged get_object"

    def __init__(self, store: Any) -> None:
        self.client, self.bucket = store.client, store.bucket
        self.prefix = f"{store.prefix}/bench-raw-{uuid.uuid4().hex[:8]}".lstrip("/")
        self.page = store.page_size

    def put(self, batch: int, pages: Sequence[bytes]) -> None:
        self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{batch}", Body=b"".join(pages))

    def get(self, batch: int, n: int) -> list[bytes]:
        body = self._range(batch, 0, n * self.page)
        return [body[i * self.page : (i + 1) * self.page] for i in range(n)]

    def get_one(self, batch: int, index: int) -> bytes:
        return self._range(batch, index * self.page, (index + 1) * self.page)

    def _range(self, batch: int, start: int, end: int) -> bytes:
        resp = self.client.get_object(
            Bucket=self.bucket, Key=f"{self.prefix}/{batch}", Range=f"bytes={start}-{end - 1}"
        )
        return bytes(resp["Body"].read())

    def close(self) -> None:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}/"
        )
        keys = [{"Key": o["Key"]} for p in pages for o in p.get("Contents", [])]
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": keys[i : i + 1000], "Quiet": True}
            )


class _FileRaw(_Raw):
    name = "os.pwrite / os.pread on one file"

    def __init__(self, store: Any) -> None:
        self.root = store.root
        self.fsync = store.fsync
        self.page = store.page_size
        self.fd = -1
        self.path = self.root / ".bench-raw"
        self.reset()

    def reset(self) -> None:
        """A fresh file, so the baseline allocates new blocks just as the store's appends do."""
        self.close()
        self.path = self.root / f".bench-raw-{uuid.uuid4().hex[:8]}"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.slot = 0
        self.offsets: dict[int, int] = {}

    def put(self, batch: int, pages: Sequence[bytes]) -> None:
        data = b"".join(pages)
        self.offsets[batch] = self.slot
        os.pwrite(self.fd, data, self.slot)
        self.slot += len(data)
        if self.fsync:
            os.fdatasync(self.fd)

    def get(self, batch: int, n: int) -> list[bytes]:
        body = os.pread(self.fd, n * self.page, self.offsets[batch])
        return [body[i * self.page : (i + 1) * self.page] for i in range(n)]

    def get_one(self, batch: int, index: int) -> bytes:
        return os.pread(self.fd, self.page, self.offsets[batch] + index * self.page)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.path.unlink(missing_ok=True)


def _raw_for(store: PageStore) -> _Raw | None:
    if store.kind == "redis":
        return _RedisRaw(store)
    if store.kind == "s3":
        return _S3Raw(store)
    if store.kind == "file":
        return _FileRaw(store)
    return None


def _rate(pages: int, seconds: float, page_size: int) -> dict[str, float]:
    return {
        "pages_per_s": round(pages / seconds, 1),
        "mb_per_s": round(pages * page_size / seconds / 1e6, 2),
        "seconds": round(seconds, 4),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _pct(samples: list[float], q: int) -> float:
    if len(samples) < 2:
        return 0.0
    return round(statistics.quantiles(samples, n=100, method="inclusive")[q - 1] * 1e6, 1)


def _throughput(
    store: PageStore, raw: _Raw | None, batch: int, n_batches: int, compression: str
) -> dict[str, Any]:
    """Put then get ``n_batches`` batches; store and raw alternate batch by batch, so drift hits both."""
    ps = store.page_size
    vm = f"bench-{uuid.uuid4().hex[:8]}"
    pages = [[os.urandom(ps) for _ in range(batch)] for _ in range(n_batches)]
    store.put_pages(vm, [PageBlob(10**9, 0, os.urandom(ps))], compression)  # warm up: connections, map load
    if raw is not None:
        raw.reset()
        raw.put(10**6, [os.urandom(ps)])
    row: dict[str, Any] = {"batch": batch, "batches": n_batches}
    t = {"put": 0.0, "put_raw": 0.0, "get": 0.0, "get_raw": 0.0}
    try:
        entries = []
        for b in range(n_batches):
            blobs = [PageBlob(b * batch + i, 1, p) for i, p in enumerate(pages[b])]
            t0 = time.perf_counter()
            entries.append(store.put_pages(vm, blobs, compression))
            t1 = time.perf_counter()
            if raw is not None:
                raw.put(b, pages[b])
            t["put"] += t1 - t0
            t["put_raw"] += time.perf_counter() - t1
        for b in range(n_batches):
            t0 = time.perf_counter()
            got = store.get_pages(vm, entries[b])
            t1 = time.perf_counter()
            if raw is not None:
                raw.get(b, batch)
            t["get"] += t1 - t0
            t["get_raw"] += time.perf_counter() - t1
            if got != pages[b]:
                raise AssertionError("the store returned different bytes")  # a benchmark must not lie
    finally:
        store.purge_vm(vm)
    for k in ("put", "get"):
        row[k] = _rate(batch * n_batches, t[k], ps)
        if raw is not None:
            row[f"{k}_raw"] = _rate(batch * n_batches, t[f"{k}_raw"], ps)
            row[f"{k}_ratio"] = _ratio(row[k]["pages_per_s"], row[f"{k}_raw"]["pages_per_s"])
    return row


def _latency(store: PageStore, raw: _Raw | None, samples: int, compression: str) -> dict[str, Any]:
    ps = store.page_size
    vm = f"bench-{uuid.uuid4().hex[:8]}"
    n = 256
    pages = [os.urandom(ps) for _ in range(n)]
    try:
        entries = store.put_pages(vm, [PageBlob(i, 1, p) for i, p in enumerate(pages)], compression)
        if raw is not None:
            raw.reset()
            raw.put(0, pages)
        lat: list[float] = []
        lat_raw: list[float] = []
        rng = random.Random(7)
        for _ in range(samples):  # interleaved, so drift hits both alike
            i = rng.randrange(n)
            t0 = time.perf_counter()
            (page,) = store.get_pages(vm, [entries[i]])
            lat.append(time.perf_counter() - t0)
            if page != pages[i]:
                raise AssertionError("the store returned different bytes")
            if raw is not None:
                t0 = time.perf_counter()
                raw.get_one(0, i)
                lat_raw.append(time.perf_counter() - t0)
    finally:
        store.purge_vm(vm)
    out: dict[str, Any] = {"samples": samples, "p50_us": _pct(lat, 50), "p99_us": _pct(lat, 99)}
    if lat_raw:
        out |= {"raw_p50_us": _pct(lat_raw, 50), "raw_p99_us": _pct(lat_raw, 99)}
        out |= {
            "ratio_p50": _ratio(out["p50_us"], out["raw_p50_us"]),
            "ratio_p99": _ratio(out["p99_us"], out["raw_p99_us"]),
        }
    return out


def _backend_bytes(store: Any, vm: str) -> int | None:
    """What the backend really holds for ``vm`` (objects, files), where that can be listed."""
    if store.kind == "file":
        d = store.root / vm
        return sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) if d.exists() else 0
    if store.kind == "s3":
        pages = store.client.get_paginator("list_objects_v2").paginate(
            Bucket=store.bucket, Prefix=store._key(vm)
        )
        return sum(int(o["Size"]) for p in pages for o in p.get("Contents", []))
    return None


def _zero_half(store: PageStore, n: int, compression: str) -> dict[str, Any]:
    ps = store.page_size
    vm = f"bench-{uuid.uuid4().hex[:8]}"
    blobs = [PageBlob(i, 1, bytes(ps) if i % 2 else os.urandom(ps)) for i in range(n)]
    try:
        for i in range(0, n, 1024):
            store.put_pages(vm, blobs[i : i + 1024], compression)
        u = store.usage(vm)
        backend = _backend_bytes(store, vm)
    finally:
        store.purge_vm(vm)
    out: dict[str, Any] = {
        "pages": n,
        "input_bytes": n * ps,
        "stored_bytes": u.stored_bytes,
        "ratio": round(u.stored_bytes / (n * ps), 4),
    }
    if backend is not None:
        out |= {"backend_bytes": backend, "backend_ratio": round(backend / (n * ps), 4)}
    return out


def run(
    url: str,
    pages: int = 4096,
    batch_sizes: Sequence[int] = (1, 64, 1024),
    quick: bool = False,
    compression: str = "none",
) -> dict[str, Any]:
    """Benchmark the store at ``url``; returns a JSON-able dict of figures, baselines and goals."""
    store = open_store(url, name="bench")
    raw = _raw_for(store)
    max_ops = 40 if quick else 200
    try:
        rows = []
        for b in batch_sizes:
            n_batches = max(8 if b > 1 else 20, min(max(pages // b, 1), max_ops))
            rows.append(_throughput(store, raw, b, n_batches, compression))
        latency = _latency(store, raw, 100 if quick else 1000, compression)
        zero = _zero_half(store, min(pages, 1024) if quick else pages, compression)
    finally:
        if raw is not None:
            raw.close()
        store.close()
    batched = [r["put_ratio"] for r in rows if r["batch"] > 1 and r.get("put_ratio") is not None]
    goals = {
        f"batched_put_ge_{GOAL_PUT}x_raw": min(batched) >= GOAL_PUT if batched else None,
        f"single_get_p50_le_{GOAL_GET_LATENCY}x_raw": (
            latency["ratio_p50"] <= GOAL_GET_LATENCY if latency.get("ratio_p50") is not None else None
        ),
        f"stored_le_{GOAL_ZERO_RATIO}x_input_half_zero": zero.get("backend_ratio", zero["ratio"])
        <= GOAL_ZERO_RATIO,
    }
    return {
        "store": store.url,
        "kind": store.kind,
        "page_size": store.page_size,
        "compression": compression,
        "baseline": raw.name if raw is not None else None,
        "throughput": rows,
        "single_get_latency": latency,
        "zero_half": zero,
        "goals": goals,
    }


def _print(res: dict[str, Any]) -> None:
    print(
        f"store {res['store']} ({res['kind']}), page {res['page_size']} B, compression {res['compression']}"
    )
    print(f"baseline: {res['baseline']}")
    print(
        f"{'batch':>6} {'put p/s':>10} {'raw p/s':>10} {'ratio':>6} {'put MB/s':>9} | {'get p/s':>10} {'raw p/s':>10} {'ratio':>6} {'get MB/s':>9}"
    )
    for r in res["throughput"]:
        raw_put, raw_get = r.get("put_raw", {}), r.get("get_raw", {})
        print(
            f"{r['batch']:>6} {r['put']['pages_per_s']:>10.0f} {raw_put.get('pages_per_s', 0):>10.0f} "
            f"{r.get('put_ratio') or 0:>6.2f} {r['put']['mb_per_s']:>9.1f} | {r['get']['pages_per_s']:>10.0f} "
            f"{raw_get.get('pages_per_s', 0):>10.0f} {r.get('get_ratio') or 0:>6.2f} {r['get']['mb_per_s']:>9.1f}"
        )
    lat = res["single_get_latency"]
    print(
        f"single get: p50 {lat['p50_us']} us (raw {lat.get('raw_p50_us')}, x{lat.get('ratio_p50')}), "
        f"p99 {lat['p99_us']} us (raw {lat.get('raw_p99_us')}, x{lat.get('ratio_p99')})"
    )
    z = res["zero_half"]
    print(
        f"50% zero pages: stored {z['ratio']:.3f}x input"
        + (f", backend {z['backend_ratio']:.3f}x" if "backend_ratio" in z else "")
    )
    for goal, ok in res["goals"].items():
        print(f"goal {goal}: {'n/a' if ok is None else 'met' if ok else 'NOT met'}")


@contextmanager
def _maybe_spawn(kind: str | None, url: str | None) -> Iterator[str]:
    if kind is None:
        assert url is not None
        yield url
        return
    from tiermem.bench.servers import spawn

    with spawn(kind) as spawned:
        yield spawned


def main(argv: list[str] | None = None) -> int:
    """``python -m tiermem.bench.store --store URL [--spawn redis|s3] [--json]``."""
    ap = argparse.ArgumentParser(
        prog="tiermem bench store", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
    ap.add_argument("--store", help="store URL (file://, redis://, rediss://, s3://)")
    ap.add_argument("--spawn", choices=["redis", "s3"], help="start a throwaway server and benchmark it")
    ap.add_argument("--pages", type=int, default=4096)
    ap.add_argument("--batch-sizes", default="1,64,1024")
    ap.add_argument("--compression", default="none", choices=["none", "zstd", "lz4"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if not args.store and not args.spawn:
        ap.error("give --store URL or --spawn redis|s3")
    sizes = tuple(int(x) for x in args.batch_sizes.split(","))
    with _maybe_spawn(args.spawn, args.store) as url:
        res = run(url, args.pages, sizes, args.quick, args.compression)
    if args.json:
        json.dump(res, sys.stdout, indent=2)
        print()
    else:
        _print(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
