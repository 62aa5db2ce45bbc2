"""Translation of redis-py, botocore and OS errors into the tiermem tree (most specific first)."""

from __future__ import annotations

import errno
from typing import Any

import botocore.exceptions as bexc
import pytest
import redis.exceptions as rexc

from tiermem.errors import (
    ConfigurationError,
    IntegrityError,
    NotFound,
    StoreFull,
    StoreUnavailable,
    TiermemError,
)
from tiermem.store.local import os_error
from tiermem.store.redis_store import redis_error
from tiermem.store.s3_store import s3_error


@pytest.mark.parametrize(
    "exc,expected",
    [
        # AuthenticationError and BusyLoadingError are ConnectionErrors in redis-py: order matters.
        (rexc.AuthenticationError("invalid username-password pair"), ConfigurationError),
        (
            rexc.NoPermissionError("NOPERM this user has no permissions to run the 'eval' command"),
            ConfigurationError,
        ),
        (rexc.ResponseError("WRONGPASS invalid username-password pair"), ConfigurationError),
        (rexc.ResponseError("ERR DB index is out of range"), ConfigurationError),
        (rexc.OutOfMemoryError("command not allowed when used memory > 'maxmemory'"), StoreFull),
        (rexc.ResponseError("OOM command not allowed when used memory > 'maxmemory'. script: x"), StoreFull),
        (rexc.ExecAbortError("EXECABORT Transaction discarded because of previous errors: OOM"), StoreFull),
        (rexc.BusyLoadingError("Redis is loading the dataset in memory"), StoreUnavailable),
        (
            rexc.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
            StoreUnavailable,
        ),
        (rexc.TimeoutError("Timeout reading from socket"), StoreUnavailable),
        (rexc.ReadOnlyError("You can't write against a read only replica."), StoreUnavailable),
        (rexc.ResponseError("ERR something unexpected"), StoreUnavailable),
    ],
)
def test_redis_errors(exc: Exception, expected: type[TiermemError]) -> None:
    got = redis_error(exc, "put on redis://h:6379/0")
    assert type(got) is expected
    assert "redis://h:6379/0" in str(got)


def _client_error(code: str, status: int) -> bexc.ClientError:
    # a minimal error response, as a failing endpoint may send (the stubs' type wants every field)
    response: Any = {
        "Error": {"Code": code, "Message": f"{code} happened"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return bexc.ClientError(response, "PutObject")


@pytest.mark.parametrize(
    "exc,expected",
    [
        (_client_error("NoSuchKey", 404), NotFound),
        (_client_error("InvalidRange", 416), IntegrityError),
        (_client_error("NoSuchBucket", 404), ConfigurationError),
        (_client_error("AccessDenied", 403), ConfigurationError),
        (_client_error("InvalidAccessKeyId", 403), ConfigurationError),
        (_client_error("SignatureDoesNotMatch", 403), ConfigurationError),
        (_client_error("EntityTooLarge", 400), StoreFull),
        (_client_error("QuotaExceeded", 403), StoreFull),
        (_client_error("XMinioStorageFull", 507), StoreFull),
        (_client_error("SlowDown", 503), StoreUnavailable),
        (_client_error("InternalError", 500), StoreUnavailable),
        (_client_error("ServiceUnavailable", 503), StoreUnavailable),
        (bexc.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), StoreUnavailable),
        (bexc.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), StoreUnavailable),
        (bexc.ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"), StoreUnavailable),
        (bexc.NoCredentialsError(), ConfigurationError),
    ],
)
def test_s3_errors(exc: Exception, expected: type[TiermemError]) -> None:
    assert type(s3_error(exc, "writing seg x")) is expected


@pytest.mark.parametrize(
    "code,expected",
    [
        (errno.ENOSPC, StoreFull),
        (errno.EDQUOT, StoreFull),
        (errno.EFBIG, StoreFull),
        (errno.EACCES, ConfigurationError),
        (errno.EROFS, ConfigurationError),
        (errno.ENOENT, NotFound),
        (errno.EIO, StoreUnavailable),
    ],
)
def test_os_errors(code: int, expected: type[TiermemError]) -> None:
    got = os_error(OSError(code, "boom"), "writing seg x")
    assert type(got) is expected and "writing seg x" in str(got)
