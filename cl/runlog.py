"""``RUN_DIR/run.log``: what a run prints (stdout, stderr, log records), each line timestamped.

The console stays as it was; the file gets complete lines only (a progress bar's carriage-return redraws
and terminal control sequences stay on the console). It appends: a resumed run continues its log. What
bypasses Python's streams (C++ warnings written straight to the file descriptors, child processes) is
not captured.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
import traceback
from pathlib import Path

_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_CURSOR_UP = re.compile(r"\x1b\[\d*A")


class _Tee:
    """A text stream that writes to ``stream`` and, line by line with a timestamp, to ``log``."""

    def __init__(self, stream, log, label: str, lock: threading.Lock):
        self.stream, self.log, self.label, self.lock, self.buf = stream, log, label, lock, ""

    def write(self, text: str) -> int:
        n = self.stream.write(text)
        with self.lock:
            *lines, rest = (self.buf + text).split("\n")
            self.buf = rest.rsplit("\r", 1)[-1]  # a redrawn line: only its latest state can still end up logged
            for line in lines:
                if _CURSOR_UP.search(line):
                    continue  # a live display redrawing itself
                line = _CONTROL.sub("", line.rstrip("\r").rsplit("\r", 1)[-1])
                if line.strip():
                    self.log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self.label}{line}\n")
            if lines:
                self.log.flush()
        return n

    def flush(self) -> None:
        self.stream.flush()
        with self.lock:
            self.log.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding...: the console's
        return getattr(self.stream, name)


class RunLog:
    """Context manager: tee ``sys.stdout``/``sys.stderr`` and every logging handler that writes to them into
    ``path``; an exception leaving the block is logged (to the file only) with its traceback."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __enter__(self) -> "RunLog":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8", buffering=1)
        lock = threading.Lock()
        self.saved = sys.stdout, sys.stderr
        sys.stdout = _Tee(sys.stdout, self.file, "", lock)
        sys.stderr = _Tee(sys.stderr, self.file, "[stderr] ", lock)
        self.handlers = []
        loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                           if isinstance(lg, logging.Logger)]
        for lg in loggers:  # the root's handlers and those of libraries that do not propagate (Lightning)
            for h in lg.handlers:
                if type(h) is logging.StreamHandler and h.stream in self.saved:
                    self.handlers.append((h, h.stream))
                    h.setStream(sys.stdout if h.stream is self.saved[0] else sys.stderr)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # to the file only: the console shows what the entry point prints of it
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            for line in "".join(traceback.format_exception(exc_type, exc, tb)).splitlines():
                self.file.write(f"{stamp} [error] {line}\n")
        for h, stream in self.handlers:
            h.setStream(stream)
        for tee in (sys.stdout, sys.stderr):
            if isinstance(tee, _Tee) and tee.buf.strip():
                tee.write("\n")
        sys.stdout, sys.stderr = self.saved
        self.file.close()
