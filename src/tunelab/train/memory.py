"""Resident memory in long training runs: the heap's free pages go back to the system when
resident memory grows, not at a fixed rate.

Batches change shape every step (lengths; in masked LM the number of masked positions), so
freed activation buffers rarely fit the next step's and glibc's heap fragments: a 15,000-step
pretraining of a 1.1M-parameter model grew to 3.3 GB. glibc's `malloc_trim` hands the free
pages back, but every page handed back is faulted in again (zeroed by the kernel) when the next
step needs it: trimming at every log line cost MiniLM full fine-tuning 7% of its step time
(256 vs 237 ms, 9,000 more page faults a step). `HeapTrimmer` trims only when resident memory
has grown by more than `slack` over the working set measured at the log line after the previous
trim (docs/pretraining.md has the figures). On a C library without `malloc_trim` (macOS,
musl) or a system without /proc it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

SLACK = 0.05
"""Growth over the working set (a fraction) that triggers a trim."""

_LIBC = None


def resident_bytes() -> int | None:
    """This process's resident memory now, from /proc (None where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def malloc_trim() -> bool:
    """Give the heap's free pages back to the system; whether there was a `malloc_trim`."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):  # not glibc: nothing to trim
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
    return bool(_LIBC)


class HeapTrimmer:
    """Called at each log line: trims the heap when resident memory has grown more than
    `slack` over the working set, then measures the working set again at the next call."""

    def __init__(self, slack: float = SLACK):
        self.slack = slack
        self.working_set: int | None = None
        self.trims = 0

    def __call__(self) -> bool:
        """Whether it trimmed."""
        rss = resident_bytes()
        if rss is None:
            return False
        if self.working_set is None:
            self.working_set = rss
            return False
        if rss <= self.working_set * (1 + self.slack):
            return False
        self.working_set = None  # measured again once the next steps have re-built it
        self.trims += malloc_trim()
        return True
