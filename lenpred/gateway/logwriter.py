"""The request log's writer: crash-safe JSONL appends that never hold up a request.

Requests hand records to a queue; one thread writes them. Group commit: every record queued meanwhile goes out in
one `write` on an O_APPEND descriptor, then one `fsync`, so lines are whole and a reader (`train.py --dataset`) never
sees half a record. A failed write (disk full, I/O error) is retried with back-off from the first byte not yet
written, so no line is torn, lost or written twice while the disk recovers; requests go on meanwhile. `close` drains
the queue. A torn last line left by a crash (power loss mid-write) is closed by a newline on reopen, so it stays
alone and `load_rows` skips it.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time

__all__ = ["LogWriter", "LogPathError"]

logger = logging.getLogger(__name__)


class LogPathError(OSError):
    """The log path cannot be opened for appending: raised at start-up, before the gateway serves."""


class LogWriter:
    retry_delay = 0.05      # seconds before the first retry of a failed write; doubles up to `max_retry_delay`
    max_retry_delay = 5.0
    retries_on_close = 3    # a write still failing at close is tried this many more times, then dropped (logged)

    def __init__(self, path: str, fsync: bool = True, on_error=None):
        self.path, self.fsync, self.on_error = str(path), fsync, on_error
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if os.fstat(self._fd).st_size and not _ends_with_newline(self.path):
                os.write(self._fd, b"\n")  # a torn line from a crash stays alone
        except OSError as exc:
            raise LogPathError(exc.errno, f"cannot append to the request log {self.path!r}: "
                                          f"{exc.strerror or exc}") from exc
        self._write = os.write  # tests swap it to simulate a failing disk
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0  # records taken from the queue, not yet written
        self.written = 0
        self._thread = threading.Thread(target=self._run, name="lenpred-log", daemon=True)
        self._thread.start()

    def write(self, record: dict) -> None:
        """Queue one record (never blocks on the disk)."""
        self._q.put((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

    def depth(self) -> int:
        """Records queued or being written."""
        return self._q.qsize() + self._pending

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every record queued before this call is written (fsynced unless `fsync=False`)."""
        if self._thread is None or not self._thread.is_alive():
            return True
        mark = threading.Event()
        self._q.put(mark)
        return mark.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, then stop; records written after close are dropped whole."""
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        buf, stop, delay, failures, marks = bytearray(), False, self.retry_delay, 0, []
        while True:
            items = [] if buf or stop else [self._q.get()]
            while True:
                try:
                    items.append(self._q.get_nowait())
                except queue.Empty:
                    break
            for item in items:
                if item is None:
                    stop = True
                elif isinstance(item, threading.Event):
                    marks.append(item)
                else:
                    buf += item
                    self._pending += 1
            if buf:
                try:
                    while buf:
                        del buf[:self._write(self._fd, buf)]
                    if self.fsync:
                        os.fsync(self._fd)
                except OSError as exc:
                    failures += 1
                    logger.error("request log %s: write failed (%s); retrying", self.path, exc)
                    if self.on_error:
                        self.on_error()
                    if stop and failures > self.retries_on_close:
                        logger.error("request log %s: %d record(s) dropped at shutdown", self.path, buf.count(b"\n"))
                        break
                    time.sleep(delay)
                    delay = min(delay * 2, self.max_retry_delay)
                    continue
                self.written += self._pending
                self._pending, delay, failures = 0, self.retry_delay, 0
            for mark in marks:
                mark.set()
            marks = []
            if stop and not buf:
                break
        os.close(self._fd)


def _ends_with_newline(path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
