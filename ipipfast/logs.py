"""Logging for collectors: one JSON object per line (--log-format json), and
a limit on events that packets cause, so a flood of them (ICMP errors from
the path, IPIP from strangers) cannot flood the log: the first of a kind is
logged, then at most one per interval, saying how many were held back."""
from __future__ import annotations

import json
import logging
import threading
import time


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "message"[, "exception"]} per record."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure(level: int, fmt: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


class Limited:
    """Logs an event of each kind at most once per `interval` seconds; the
    next one that gets through says how many were suppressed meanwhile."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger, self.interval = logger, interval
        self._lock = threading.Lock()
        self._kinds: dict[str, tuple[float, int]] = {}  # kind -> (next allowed, suppressed)

    def log(self, level: int, kind: str, msg: str, *args: object) -> bool:
        """True if it was logged."""
        now = time.monotonic()
        with self._lock:
            allowed, suppressed = self._kinds.get(kind, (0.0, 0))
            if now < allowed:
                self._kinds[kind] = (allowed, suppressed + 1)
                return False
            self._kinds[kind] = (now + self.interval, 0)
        if suppressed:
            msg += f" ({suppressed} more like it suppressed since the last one logged)"
        self.logger.log(level, msg, *args)
        return True
