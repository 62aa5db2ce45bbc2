"""``S3PageStore``: pages packed into segment objects in an S3 bucket (boto3).

Objects live under ``<prefix>/<vm>/seg/<id>`` (segments, 1-8 MiB of payload,
one or more per put batch) and ``<prefix>/<vm>/del/<id>`` (tombstones); the
segment format, compaction and the (page, generation) map are in
:mod:`tiermem.store.segments`. At 4 KiB per object S3 is not viable (requests
cost more than bytes, and a prefix serves ~5,500 GET/s), so:

- a put batch is one PUT per segment (several segments upload in parallel);
- a single page comes back with one ranged GET;
- a batched read coalesces neighbouring ranges of a segment (gaps up to
  ``max_gap``) into one GET, and different segments are fetched in parallel;
- a restarted process rebuilds the map with one LIST and one ranged GET of
  each segment's tail (its footer and index).

The client uses the standard credential chain, path-style addressing (for
S3-compatible servers), botocore's *standard* retry mode, and connect/read
timeouts. botocore errors are translated by :func:`s3_error`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.exceptions as bexc
from botocore.config import Config

from tiermem.errors import (
    ConfigurationError,
    IntegrityError,
    NotFound,
    StoreFull,
    StoreUnavailable,
    TiermemError,
)
from tiermem.store.options import Opt, parse_options
from tiermem.store.segments import SegmentStore
from tiermem.store.space import validate_space

__all__ = ["S3PageStore", "s3_error"]

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_CONFIG = {
    "NoSuchBucket",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "AccountProblem",
    "InvalidBucketName",
    "PermanentRedirect",
    "AuthorizationHeaderMalformed",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "403",
    "301",
    "400",
}
_FULL = {
    "EntityTooLarge",
    "QuotaExceeded",
    "ServiceQuotaExceeded",
    "XMinioStorageFull",
    "InsufficientStorage",
    "StorageFull",
    "TooManyBuckets",
    "507",
}
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]$")
_OPTIONS = {
    "endpoint": Opt("str"),
    "region": Opt("str"),
    "segment_mib": Opt("float", 4.0, 1, 64),
    "compact_below": Opt("float", 0.5, 0, 1),
    "max_gap_kib": Opt("float", 256.0, 0, 65536),
    "timeout": Opt("float", 10.0, 0.1, 3600),
    "connect_timeout": Opt("float", 2.0, 0.1, 600),
    "retries": Opt("int", 4, 0, 20),
    "workers": Opt("int", 8, 1, 64),
}
_DELETE_BATCH = 1000


def s3_error(e: Exception, what: str) -> TiermemError:
    """Translate a botocore error (after botocore's own retries) into the tiermem tree, most specific first."""
    if isinstance(e, bexc.ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        msg = f"{what}: {code or status} {err.get('Message', '')}".rstrip()
        if code in _NOT_FOUND:
            return NotFound(msg)
        if code == "InvalidRange":
            return IntegrityError(f"{msg} (the object is shorter than its index says)")
        if code in _FULL or "quota" in code.lower():
            return StoreFull(msg)
        if code in _CONFIG or status in (301, 400, 403):
            return ConfigurationError(msg)
        return StoreUnavailable(msg)  # SlowDown, 5xx, RequestTimeout, ...
    if isinstance(e, bexc.NoCredentialsError | bexc.PartialCredentialsError | bexc.NoRegionError):
        return ConfigurationError(f"{what}: {e}")
    if isinstance(e, bexc.ParamValidationError):
        return ConfigurationError(f"{what}: {e}")
    return StoreUnavailable(f"{what}: {type(e).__name__}: {e}")  # endpoint, timeouts, closed connections


class S3PageStore(SegmentStore):
    """Pages in segment objects under ``s3://<bucket>/<prefix>/<vm>/``."""

    kind = "s3"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        name: str = "default",
        page_size: int = 4096,
        segment_bytes: int = 4 << 20,
        compact_below: float = 0.5,
        max_gap: int = 256 << 10,
        connect_timeout: float = 2.0,
        read_timeout: float = 10.0,
        retries: int = 4,
        workers: int = 8,
    ) -> None:
        super().__init__(
            name,
            page_size,
            segment_bytes=segment_bytes,
            compact_below=compact_below,
            max_gap=max_gap,
            workers=workers,
        )
        if not _BUCKET_RE.match(bucket):
            raise ConfigurationError(f"invalid S3 bucket name {bucket!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint = endpoint
        self.region = region
        config = Config(
            retries={"mode": "standard", "max_attempts": retries},
            s3={"addressing_style": "path"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=max(10, 2 * workers),
        )
        try:
            self.client: Any = boto3.session.Session().client(
                "s3", endpoint_url=endpoint, region_name=region, config=config
            )
        except (ValueError, bexc.BotoCoreError) as e:
            raise ConfigurationError(f"cannot create an S3 client for {self.url}: {e}") from None

    @classmethod
    def from_url(cls, url: str, name: str = "default", page_size: int = 4096, **opts: Any) -> S3PageStore:
        """Open ``s3://bucket[/prefix][?endpoint=http://host:port&region=..&segment_mib=4&...]``.

        Options: ``endpoint``, ``region``, ``segment_mib`` (1-64, default 4),
        ``compact_below`` (0-1, default 0.5), ``max_gap_kib`` (default 256),
        ``timeout`` (read, s), ``connect_timeout`` (s), ``retries`` (botocore
        retries after the first try, default 4), ``workers`` (parallel requests
        per call, default 8).
        """
        parts = urlsplit(url)
        if parts.scheme != "s3":
            raise ConfigurationError(f"not an S3 URL: {url}")
        if parts.username or parts.password:
            raise ConfigurationError(
                "S3 store URLs carry no credentials: use the standard AWS credential chain"
            )
        bucket = parts.netloc
        q = parse_options("S3", parts.query, opts, _OPTIONS, url)
        if not bucket:
            raise ConfigurationError(f"S3 URL {url} names no bucket (s3://bucket/prefix)")
        endpoint = q.get("endpoint") or None
        if endpoint is not None:
            ep = urlsplit(endpoint)
            if ep.scheme not in ("http", "https") or not ep.hostname:
                raise ConfigurationError(f"S3 endpoint {endpoint!r} is not an http(s)://host[:port] URL")
        return cls(
            bucket,
            parts.path,
            endpoint=endpoint,
            region=q.get("region") or None,
            name=name,
            page_size=page_size,
            segment_bytes=int(q["segment_mib"] * (1 << 20)),
            compact_below=q["compact_below"],
            max_gap=int(q["max_gap_kib"] * 1024),
            read_timeout=q["timeout"],
            connect_timeout=q["connect_timeout"],
            retries=q["retries"],
            workers=q["workers"],
        )

    @property
    def url(self) -> str:
        """``s3://bucket/prefix?endpoint=..&region=..`` (never carries credentials)."""
        q = [f"{k}={v}" for k, v in (("endpoint", self.endpoint), ("region", self.region)) if v]
        return f"s3://{self.bucket}/{self.prefix}" + ("?" + "&".join(q) if q else "")

    def close(self) -> None:
        """Stop I/O threads and close the HTTP connection pool."""
        super().close()
        with contextlib.suppress(Exception):
            self.client.close()

    @contextlib.contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        try:
            yield
        except (bexc.BotoCoreError, bexc.ClientError) as e:
            raise s3_error(e, f"{what} in {self.url}") from None

    def _key(self, vm_id: str, kind: str = "", name: str = "") -> str:
        parts = [p for p in (self.prefix, vm_id, kind, name) if p]
        return "/".join(parts) + ("" if name else "/")

    def _list(self, prefix: str, delimiter: str = "") -> Iterator[dict[str, Any]]:
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            kw["Delimiter"] = delimiter
        yield from self.client.get_paginator("list_objects_v2").paginate(**kw)

    def _delete_keys(self, keys: Sequence[str]) -> None:
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = keys[i : i + _DELETE_BATCH]
            resp = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
            )
            errors = [e for e in resp.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                e0 = errors[0]
                raise StoreUnavailable(
                    f"deleting {len(errors)} objects in {self.url} failed: {e0.get('Code')} {e0.get('Message', '')}"
                )

    # -- blob hooks -----------------------------------------------------------------------

    def _blob_put(self, vm_id: str, kind: str, name: str, data: bytes) -> None:
        with self._translate(f"writing {kind} {name} of VM {vm_id}"):
            self.client.put_object(Bucket=self.bucket, Key=self._key(vm_id, kind, name), Body=data)

    def _blob_read(self, vm_id: str, kind: str, name: str, start: int, end: int) -> bytes:
        with self._translate(f"reading {kind} {name} of VM {vm_id}"):
            resp = self.client.get_object(
                Bucket=self.bucket, Key=self._key(vm_id, kind, name), Range=f"bytes={start}-{end - 1}"
            )
            data: bytes = resp["Body"].read()
        if len(data) != end - start:
            raise IntegrityError(
                f"{kind} {name} of VM {vm_id}: asked for bytes {start}-{end - 1}, got {len(data)} bytes"
            )
        return data

    def _blob_get(self, vm_id: str, kind: str, name: str) -> bytes:
        with self._translate(f"reading {kind} {name} of VM {vm_id}"):
            data: bytes = self.client.get_object(Bucket=self.bucket, Key=self._key(vm_id, kind, name))[
                "Body"
            ].read()
        return data

    def _blob_delete(self, vm_id: str, kind: str, names: Sequence[str]) -> None:
        with self._translate(f"deleting {len(names)} {kind} objects of VM {vm_id}"):
            self._delete_keys([self._key(vm_id, kind, n) for n in names])

    def _blob_list(self, vm_id: str, kind: str) -> list[tuple[str, int]]:
        prefix = self._key(vm_id, kind)
        with self._translate(f"listing {kind} objects of VM {vm_id}"):
            return [
                (obj["Key"][len(prefix) :], int(obj["Size"]))
                for page in self._list(prefix)
                for obj in page.get("Contents", [])
            ]

    def _blob_vms(self) -> list[str]:
        base = f"{self.prefix}/" if self.prefix else ""
        out: list[str] = []
        with self._translate("listing VMs"):
            for page in self._list(base, "/"):
                for cp in page.get("CommonPrefixes", []):
                    vm = cp["Prefix"][len(base) :].rstrip("/")
                    with contextlib.suppress(TiermemError):
                        out.append(validate_space(vm))
        return out

    def _blob_purge(self, vm_id: str) -> None:
        prefix = self._key(vm_id)  # ends with "/": never matches a VM whose id merely starts alike
        with self._translate(f"purging VM {vm_id}"):
            keys: list[str] = []
            for page in self._list(prefix):
                keys += [obj["Key"] for obj in page.get("Contents", [])]
                if len(keys) >= _DELETE_BATCH:
                    self._delete_keys(keys)
                    keys = []
            self._delete_keys(keys)
