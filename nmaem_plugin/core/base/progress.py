"""A progress line for long work: done/total, rate, ETA; to stderr, at most every few seconds."""
import ctypes
import sys
import time
from typing import Optional, TextIO

_libc = None


def release_memory() -> None:
    """Give freed heap memory back to the operating system (glibc's malloc_trim).

    Long loops that allocate and free many large, equal tensors fragment glibc's heap
    (its mmap threshold adapts upwards), and the resident size then creeps up chunk after
    chunk. Calling this once per chunk keeps it flat. A no-op where glibc is absent.
    """
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


def fmt_time(s: float) -> str:
    """Seconds as 42s, 3m05s or 1h02m."""
    s = int(round(s))
    if s >= 3600:
        return "%dh%02dm" % (s // 3600, (s % 3600) // 60)
    if s >= 60:
        return "%dm%02ds" % (s // 60, s % 60)
    return "%ds" % s


class Progress:
    """``Progress(total, "simulate", unit="images")``; call ``update(n)`` as work is done."""

    def __init__(self, total: int, label: str, unit: str = "items",
                 stream: Optional[TextIO] = None, every: float = 2.0):
        self.total, self.label, self.unit = int(total), label, unit
        self.stream = sys.stderr if stream is None else stream
        self.every = every
        self.done = 0
        self.t0 = time.perf_counter()
        self._last = -1e9

    def rate(self) -> float:
        dt = time.perf_counter() - self.t0
        return self.done / dt if dt > 0 else 0.0

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if now - self._last >= self.every or self.done >= self.total:
            self._last = now
            r = self.rate()
            eta = (self.total - self.done) / r if r > 0 else 0.0
            pct = 100.0 * self.done / self.total if self.total else 100.0
            self.stream.write("%s: %d/%d %s (%3.0f%%), %.1f %s/s, ETA %s%s\n"
                              % (self.label, self.done, self.total, self.unit, pct, r,
                                 self.unit, fmt_time(eta), (" " + extra) if extra else ""))
            self.stream.flush()
