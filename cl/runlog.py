"""``RUN_DIR/run.log``: everything a run prints (stdout, stderr, log records), each line timestamped.

The console stays as it was; the file gets complete lines only (a progress bar's carriage-return
redraws and terminal control sequences stay on the console). Appends: a resumed run continues its log.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path

_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class _Tee:
    """A text stream that writes to ``stream`` and, line by line with a timestamp, to ``log``."""

    def __init__(self, stream, log, label: str):
        self.stream, self.log, self.label, self.buf = stream, log, label, ""

    def write(self, text: str) -> int:
        n = self.stream.write(text)
        self.buf += text
        *lines, self.buf = self.buf.split("\n")
        for line in lines:
            line = _CONTROL.sub("", line.rsplit("\r", 1)[-1])
            if line.strip():
                self.log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self.label}{line}\n")
        if lines:
            self.log.flush()
        return n

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding...: the console's
        return getattr(self.stream, name)


class RunLog:
    """Context manager: tee ``sys.stdout``/``sys.stderr`` (and logging's console handlers) into ``path``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __enter__(self) -> "RunLog":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8", buffering=1)
        self.saved = sys.stdout, sys.stderr
        sys.stdout = _Tee(sys.stdout, self.file, "")
        sys.stderr = _Tee(sys.stderr, self.file, "[stderr] ")
        self.handlers = []
        for h in logging.getLogger().handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                if h.stream in self.saved:
                    self.handlers.append((h, h.stream))
                    h.setStream(sys.stdout if h.stream is self.saved[0] else sys.stderr)
        return self

    def __exit__(self, *exc) -> None:
        for h, stream in self.handlers:
            h.setStream(stream)
        for tee in (sys.stdout, sys.stderr):
            if isinstance(tee, _Tee) and tee.buf.strip():
                tee.write("\n")
        sys.stdout, sys.stderr = self.saved
        self.file.close()
