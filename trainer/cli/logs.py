"""Logging of an `engram` process, set up once in `main`: `--log-level`, plain lines or one JSON
object per line (`--log-json`, for a log collector), on stderr (stdout holds the command's result)."""
from __future__ import annotations

import json
import logging
import os
import sys
import time

LEVELS = ("debug", "info", "warning", "error")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (ISO 8601, UTC), level, logger, message, and the
    exception's traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record arrives, not the stream of the moment of
    setup: `main` called in a process that swaps stderr (pytest's capture) must not leave a
    handler writing into a closed file."""

    def __init__(self):
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr


def setup(level: str = "info", as_json: bool = False) -> None:
    """Route every logger to stderr at `level`; replaces what an earlier call set up (tests call
    `main` many times in one process)."""
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if as_json else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)  # InsecureBindWarning and friends reach the same log
    # Ray logs at INFO with its own handler ("Connecting to existing Ray cluster at ..."), and
    # ray.init resets its logger to $RAY_LOGGER_LEVEL: a command's output is its result, so Ray's
    # INFO lines show only at debug. Set before Ray is imported (commands import it lazily).
    os.environ.setdefault("RAY_LOGGER_LEVEL", "info" if level == "debug" else "warning")
