"""The TUI's client of the model inspector (``python -m engine.inspector``).

The helper process imports torch so that this process never does. It starts on
first use (or :meth:`Inspector.start`), is restarted when it has died, and is
shared by threads (one request at a time). Answers are dicts as the helper
writes them; a helper that fails, hangs or dies yields an error answer
(``ok`` false, ``key`` null), never an exception.
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

_CACHE_SIZE = 32


class Inspector:
    """One helper process; ``timeout`` bounds each answer (and start-up) in seconds."""

    def __init__(self, *, log: Path | None = None, timeout: float = 120.0,
                 command: list[str] | None = None) -> None:
        self.log = log
        self.timeout = timeout
        self.command = command or [sys.executable, "-m", "engine.inspector"]
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._next_id = 0
        self._cache: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._closing = False
        atexit.register(self.close)

    @property
    def ready(self) -> bool:
        """Whether a started helper is running (its imports done)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.ready and self._proc is not None else None

    def start(self) -> str | None:
        """Start the helper if it is not running; returns why it could not start, else None."""
        with self._lock:
            return self._ensure_started()

    def inspect(self, config: dict[str, Any]) -> dict[str, Any]:
        """The helper's answer for ``config`` (a config it has accepted before is answered from a cache)."""
        key = json.dumps(config, sort_keys=True, default=str)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            answer = self._ask(config)
            if answer.get("ok"):
                self._cache[key] = answer
                while len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
            return answer

    def close(self) -> None:
        """Stop the helper (it also exits by itself when this process goes away). One still starting, or
        busy with an answer, is killed rather than waited for: the app must quit at once."""
        if not self._lock.acquire(blocking=False):
            self._closing = True
            proc = self._proc
            if proc is not None:
                proc.kill()  # the thread waiting on it reads the end of its output and lets go
            self._lock.acquire()
        try:
            self._stop()
        finally:
            self._closing = False
            self._lock.release()

    # --- under the lock ---------------------------------------------------------

    def _ensure_started(self) -> str | None:
        if self.ready:
            return None
        if self._closing:
            return "the model inspector was closed"
        self._stop()
        stderr: Any = subprocess.DEVNULL
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            stderr = open(self.log, "ab")
        try:
            self._proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=stderr, cwd=Path(__file__).resolve().parents[1])
        except OSError as exc:
            return f"the model inspector could not start: {exc}"
        finally:
            if stderr is not subprocess.DEVNULL:
                stderr.close()
        if self._closing:  # close() came between the checks and the start: it found no process to kill
            self._stop()
            return "the model inspector was closed"
        try:
            line = self._read_line(time.monotonic() + self.timeout)
        except (_Ended, TimeoutError):
            line = {}
        if not line.get("ready"):
            self._stop()
            return f"the model inspector did not start{self._log_hint()}"
        return None

    def _ask(self, config: dict[str, Any], *, retry: bool = True) -> dict[str, Any]:
        """One request; a helper found dead on the way is restarted and asked once more."""
        failed = self._ensure_started()
        if failed:
            return _failure(failed)
        assert self._proc is not None and self._proc.stdin is not None
        self._next_id += 1
        rid = self._next_id
        deadline = time.monotonic() + self.timeout
        try:
            self._proc.stdin.write(json.dumps({"id": rid, "config": config}, default=str).encode() + b"\n")
            self._proc.stdin.flush()
            while (answer := self._read_line(deadline)).get("id") != rid:
                pass
            return answer
        except (OSError, _Ended):
            self._stop()
            if retry and not self._closing:
                return self._ask(config, retry=False)
            return _failure(f"the model inspector stopped; it restarts with the next change{self._log_hint()}")
        except TimeoutError:
            self._stop()
            return _failure(f"the model inspector did not answer within {self.timeout:.0f} s; "
                            f"it restarts with the next change{self._log_hint()}")

    def _read_line(self, deadline: float) -> dict[str, Any]:
        """The next JSON line from the helper ({} for a line that is not a JSON object).

        Raises :class:`_Ended` at the end of its output, TimeoutError past ``deadline``."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise TimeoutError
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise _Ended
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            decoded = json.loads(line)
        except ValueError:
            return {}
        return decoded if isinstance(decoded, dict) else {}

    def _stop(self) -> None:
        proc, self._proc, self._buffer = self._proc, None, b""
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _log_hint(self) -> str:
        return f" (see {self.log})" if self.log is not None else ""


class _Ended(Exception):
    """The helper's output ended (it exited or was killed)."""


def _failure(message: str) -> dict[str, Any]:
    return {"id": None, "ok": False, "error": message, "key": None}
