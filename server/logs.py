"""Logging setup (text or JSON lines) and the one-line-per-request log.

Request lines carry ids, tenant, adapter, token counts, timings and the outcome; never the
prompt or output text unless `log_prompts` is on and the level is debug.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

REQUEST_LOGGER = "loraserve.requests"
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines; request fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}
        if extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        return line


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "urllib3", "filelock", "transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # bitsandbytes warns at every start that an optional hub-downloaded CPU kernel is missing.
    logging.getLogger("bitsandbytes").setLevel(max(logging.ERROR, root.level))


def log_request(
    fields: dict[str, Any], prompt: str | None = None, output: str | None = None, log_prompts: bool = False
) -> None:
    """Writes the request's line; texts only with log_prompts and debug level."""
    logger = logging.getLogger(REQUEST_LOGGER)
    extra = dict(fields)
    if log_prompts and logger.isEnabledFor(logging.DEBUG):
        extra["prompt"] = prompt
        extra["output"] = output
    logger.info("request finished", extra=extra)
