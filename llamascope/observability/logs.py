"""Log lines: text by default, or one JSON object a line (``LLAMASCOPE_LOG_FORMAT=json``).

Every line written while a request is served names the request: text lines
end in ``(request <id>)``, JSON objects carry ``request_id`` (and
``trace_id`` when the request belongs to a trace). The access log line, one
per request, is an ``AccessRecord``: ``key=value`` pairs in text, its fields
in JSON.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Literal

from llamascope.observability.request import current

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class AccessRecord:
    """The fields of one request's access-log line; rendered only if a handler writes it."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        fields = self.fields
        parts = [f"request_id={fields['request_id']}", f"key={fields.get('key') or '-'}"]
        parts.append(f"{fields.get('method', '-')} {fields.get('path', '-')}")
        for name in ("model", "status", "input_tokens", "output_tokens", "image_tokens", "finish", "error"):
            value = fields.get(name)
            if value is not None:
                parts.append(f"{name}={value}")
            elif name in ("model",):
                parts.append(f"{name}=-")
        if fields.get("client_disconnected"):
            parts.append("client=disconnected")
        for name in ("client_request_id", "trace_id"):
            if fields.get(name):
                parts.append(f"{name}={fields[name]}")
        parts.append(f"latency_ms={fields['latency_ms']:.1f}")
        return " ".join(parts)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        if request_id and not isinstance(record.msg, AccessRecord):
            first, newline, rest = line.partition("\n")  # after the message, before a traceback
            line = f"{first} (request {request_id}){newline}{rest}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, the request's ids, an access line's fields."""

    def format(self, record: logging.LogRecord) -> str:
        created = time.gmtime(record.created)
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", created) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if isinstance(record.msg, AccessRecord):
            entry["message"] = "request"
            entry.update({k: v for k, v in record.msg.fields.items() if v is not None})
        else:
            entry["message"] = record.getMessage()
            for name in ("request_id", "trace_id"):
                value = getattr(record, name, None)
                if value:
                    entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class RequestFilter(logging.Filter):
    """Puts the id (and trace id) of the request being served on every record made while serving it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            observation = current()
            record.request_id = observation.request_id if observation is not None else None
            record.trace_id = observation.trace_id if observation is not None else None
        return True


def configure(level: str, fmt: LogFormat = "text") -> None:
    """Log to stderr at ``level`` in ``fmt``, for llamascope and the libraries it runs (uvicorn, alembic)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestFilter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    root = logging.getLogger().level
    # httpx logs every image fetch at INFO; the access log already says what a request did. Alembic says
    # "Context impl SQLiteImpl" and each migration at INFO on every start, and libvips (through pyvips) its
    # "VIPS: threadpool completed with 2 workers" now and then, from its own threads: at debug level only.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root))
    for chatty in ("alembic", "pyvips"):
        logging.getLogger(chatty).setLevel(root if root <= logging.DEBUG else max(logging.WARNING, root))
