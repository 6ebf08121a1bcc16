"""Claims on shared work: several workers (one per GPU, the tasks of a Slurm array, local
processes) on one output folder never run the same item twice.

A claim is a file created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and on NFSv3+):
exactly one worker creates it. While the item runs, a heartbeat thread refreshes the file's
modification time; a claim whose heartbeat is older than ``timeout_s`` belongs to a dead worker
and is taken over, by renaming it away first (a rename succeeds for one worker only).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional


def default_worker_id() -> str:
    """host:pid, plus the Slurm array task when there is one."""
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{socket.gethostname()}:{os.getpid()}" + (f":task{task}" if task else "")


class Claim:
    """A held claim; ``release()`` removes it. Use it as a context manager to keep the
    heartbeat running while the work runs."""

    def __init__(self, path: Path, heartbeat_s: float):
        self.path, self.heartbeat_s = path, heartbeat_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except FileNotFoundError:  # taken over (we were presumed dead) or released
                return

    def __enter__(self) -> "Claim":
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"claim {self.path.name}")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.path.unlink(missing_ok=True)


class ClaimBoard:
    """Claims under ``root`` for items named by keys (``a/b/c`` keys are fine)."""

    def __init__(self, root: str | os.PathLike, *, worker: Optional[str] = None, timeout_s: float = 600.0):
        if not timeout_s > 0:
            raise ValueError(f"claim timeout must be > 0 seconds, got {timeout_s!r}")
        self.root = Path(root)
        self.worker = worker or default_worker_id()
        self.timeout_s = float(timeout_s)

    def path(self, key: str) -> Path:
        return self.root / (key.replace("/", "__") + ".claim")

    def holder(self, key: str) -> Optional[dict]:
        try:
            return json.loads(self.path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def claim(self, key: str) -> Optional[Claim]:
        """The claim on ``key``, or None when a live worker holds it."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._take_over_if_stale(path):
                    return None
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"worker": self.worker, "host": socket.gethostname(), "pid": os.getpid(),
                           "since": time.time()}, f)
            return Claim(path, heartbeat_s=max(self.timeout_s / 4, 0.05))
        return None

    def _take_over_if_stale(self, path: Path) -> bool:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True  # released meanwhile: try again
        if age < self.timeout_s and not self._holder_gone(path):
            return False
        dead = path.with_name(f"{path.name}.{os.getpid()}.stale")
        try:
            os.rename(path, dead)  # only one worker wins this rename
        except FileNotFoundError:
            return False  # another worker took it over first
        dead.unlink(missing_ok=True)
        return True

    @staticmethod
    def _holder_gone(path: Path) -> bool:
        """Whether the claim's process is known dead: it ran on this host and its pid is gone
        (a worker killed with -9 sends no more heartbeats, but waiting out the timeout wastes it)."""
        try:
            holder = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False  # being written, or an older claim without a pid: the timeout decides
        pid = holder.get("pid")
        if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # EPERM: alive, another user's
            return False
        return False
