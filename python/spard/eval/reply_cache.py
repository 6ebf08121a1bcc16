"""A judge's reply cache: append-only JSON Lines, safe against a crash and shared between processes.

Each reply is appended as one line ``{"key": ..., "reply": ...}`` the moment it arrives, flushed
and fsync'd, so a killed run (Ctrl-C, SIGTERM, SIGKILL, a power cut) loses at most the replies
still in flight. Writers hold an exclusive ``flock`` on the file while appending, readers a
shared one, so several evaluations can share one cache: each reads what the others appended
(``refresh``) before asking for a pair, and none overwrites another's lines. A line cut short by
a crash is skipped when read (and closed off by the next append), never fatal.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Optional

try:
    import fcntl
except ImportError:  # not POSIX: no locking between processes (appends stay whole-line)
    fcntl = None

log = logging.getLogger(__name__)


class ReplyCache:
    """Replies by key, in memory and (with ``path``) in an append-only file."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self._replies: dict[str, str] = {}
        self._offset = 0  # bytes of the file already read
        self._lock = threading.Lock()
        self.damaged_lines = 0
        if self.path is not None:
            self.refresh()

    def __len__(self) -> int:
        return len(self._replies)

    def get(self, key: str, *, fresh: bool = False) -> Optional[str]:
        """The cached reply; ``fresh`` first reads what other processes appended."""
        if fresh and key not in self._replies:
            self.refresh()
        return self._replies.get(key)

    @staticmethod
    def _flock(f, kind) -> None:
        if fcntl is not None:
            fcntl.flock(f.fileno(), kind)

    def _read_new(self, f) -> None:
        """Reads the complete lines after ``self._offset`` (call with the file locked)."""
        f.seek(self._offset)
        data = f.read()
        end = data.rfind(b"\n") + 1  # a last line without its newline is still being written (or was cut)
        for raw in data[:end].splitlines():
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
                key, reply = row["key"], row["reply"]
                if not isinstance(key, str) or not isinstance(reply, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                self.damaged_lines += 1
                log.warning("%s: skipping a damaged cache line (a run was killed while writing it?)", self.path)
                continue
            self._replies.setdefault(key, reply)
        self._offset += end

    def refresh(self) -> None:
        """Reads the lines other processes appended since the last read."""
        if self.path is None or not self.path.exists():
            return
        with self._lock, open(self.path, "rb") as f:
            self._flock(f, fcntl.LOCK_SH if fcntl else None)
            try:
                self._read_new(f)
            finally:
                self._flock(f, fcntl.LOCK_UN if fcntl else None)

    def add(self, key: str, reply: str) -> None:
        """Stores a reply: appended to the file (flushed and fsync'd) before returning."""
        with self._lock:
            if key in self._replies:
                return
            if self.path is None:
                self._replies[key] = reply
                return
            line = (json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n").encode("utf-8")
            self.path.parent.mkdir(parents=True, exist_ok=True)  # on the first reply, not before
            with open(self.path, "ab+") as f:
                self._flock(f, fcntl.LOCK_EX if fcntl else None)
                try:
                    self._read_new(f)  # what others appended meanwhile
                    if key in self._replies:  # another process stored this pair first
                        return
                    self._replies[key] = reply
                    f.seek(0, os.SEEK_END)
                    size = f.tell()
                    if size:
                        f.seek(size - 1)
                        if f.read(1) != b"\n":  # a line cut short by a crash: close it off
                            line = b"\n" + line
                    f.write(line)
                    f.flush()
                    os.fsync(f.fileno())
                    self._offset = f.tell()
                finally:
                    self._flock(f, fcntl.LOCK_UN if fcntl else None)
