"""Log set-up for the server: text or one JSON object per line, each naming its request id.

`request_id` is a context variable: server/interceptors.py sets it when an RPC
starts, and every line logged while serving that RPC (in the event loop or in
the worker thread that runs the model; server/service.py copies the context
into it) carries it. Owns nothing else.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

FORMATS = ("text", "json")
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "request_id"}


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, any `extra=` fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", ""):
            out["request_id"] = record.request_id
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _TextFormatter(logging.Formatter):
    """The classic one-line layout, with ` request_id=...` appended when a request is being served."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # the first line; a traceback follows it
        line = super().formatMessage(record)
        rid = getattr(record, "request_id", "")
        return f"{line} request_id={rid}" if rid and f"request_id={rid}" not in line else line


def configure(level: str = "INFO", fmt: str = "text", stream=None) -> None:
    """Send the root logger's records to `stream` (default stderr) in `fmt` ("text" or "json"), request ids attached."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, got {fmt!r}")
    handler = logging.StreamHandler(stream)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else _TextFormatter(_TEXT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
