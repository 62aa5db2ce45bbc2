"""No secrets in logs: the structlog redaction processor on structlog and stdlib loggers."""

from __future__ import annotations

import io
import json
import logging

import structlog

from tiermem.logging import REDACTED, configure_logging, redact_secrets, redact_text

PW = "hunter2-very-secret"


def test_redact_text_masks_url_passwords_query_secrets_and_bearer() -> None:
    assert redact_text(f"redis://tiermem:{PW}@redis:6379/0") == f"redis://tiermem:{REDACTED}@redis:6379/0"
    assert redact_text(f"rediss://:{PW}@h:6380") == f"rediss://:{REDACTED}@h:6380"
    assert PW not in redact_text(f"s3://b/p?endpoint=http://s3:8333&secret_key={PW}&region=x")
    assert "region=x" in redact_text(f"s3://b/p?secret_key={PW}&region=x")
    assert redact_text(f"authorization: Bearer {PW}") == f"authorization: Bearer {REDACTED}"
    assert redact_text("http://s3:8333/bucket") == "http://s3:8333/bucket"  # nothing to hide


def test_processor_masks_secret_keys_and_nested_values() -> None:
    ev = {
        "event": "connect",
        "password": PW,
        "AWS_SECRET_ACCESS_KEY": PW,
        "settings": {"token": PW, "state": f"redis://u:{PW}@r/0", "listen": "0.0.0.0:7000"},
        "urls": [f"redis://:{PW}@r"],
        "empty_token": "",
        "pages": 12,
    }
    out = redact_secrets(None, "info", ev)
    assert PW not in json.dumps(out)
    assert out["settings"]["listen"] == "0.0.0.0:7000"
    assert out["pages"] == 12
    assert out["empty_token"] == ""  # nothing to hide, and the emptiness is useful to see


def test_configured_logging_never_prints_secrets() -> None:
    buf = io.StringIO()
    configure_logging(json=True, level="DEBUG", stream=buf)
    try:
        structlog.get_logger("tiermem.test").info(
            "starting", token=PW, state=f"redis://t:{PW}@redis:6379/0", vms=3
        )
        logging.getLogger("some.library").warning("calling with Authorization: Bearer %s", PW)
        try:
            raise ConnectionError(f"cannot reach redis://t:{PW}@redis:6379")
        except ConnectionError:
            structlog.get_logger("tiermem.test").exception("store down")
        lines = [json.loads(ln) for ln in buf.getvalue().splitlines()]
    finally:
        logging.getLogger().handlers = [h for h in logging.getLogger().handlers if h.get_name() != "tiermem"]
    assert len(lines) == 3
    assert PW not in buf.getvalue()
    assert lines[0]["event"] == "starting" and lines[0]["vms"] == 3 and lines[0]["level"] == "info"
    assert lines[0]["token"] == REDACTED
    assert lines[1]["logger"] == "some.library"
    assert "ConnectionError" in lines[2]["exception"]


def test_console_format_is_redacted_too() -> None:
    buf = io.StringIO()
    configure_logging(json=False, level="INFO", stream=buf)
    try:
        structlog.get_logger("t").info("hello", password=PW)
    finally:
        logging.getLogger().handlers = [h for h in logging.getLogger().handlers if h.get_name() != "tiermem"]
    assert "hello" in buf.getvalue()
    assert PW not in buf.getvalue()
