"""Keeping the server's resident memory in step with its live connections.

Two habits of the platform made 2,000 watches opened and closed over TLS cost 550 MB for good:
asyncio gives every TLS connection a 256 KiB read buffer (``SSLProtocol.max_size``), and glibc
keeps freed heap mapped unless asked to give it back. This module shrinks the one and trims the
other; both are process-wide, so the server sets them once, when its application starts.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from asyncio import sslproto
from collections.abc import AsyncIterator

from aiohttp import web

log = logging.getLogger(__name__)

# Two TLS records (16 KiB each) per read are plenty for API requests; bodies stream in chunks.
TLS_READ_BUFFER = 32 * 1024
# Heap given up since the last look that is worth a trim, and how often to look.
TRIM_THRESHOLD = 16 * 1024 * 1024
TRIM_INTERVAL = 5.0


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


class HeapTrimmer:
    """Gives freed heap back to the OS after the program's use of it fell by ``threshold``
    (glibc only): trimming is cheap, but not free, so a steady heap is left alone."""

    def __init__(self, *, threshold: int = TRIM_THRESHOLD) -> None:
        self.threshold = threshold
        self._libc = _glibc()
        self._high = self.in_use()

    @property
    def available(self) -> bool:
        return self._libc is not None

    def in_use(self) -> int:
        """Heap bytes allocated (glibc's ``uordblks`` plus mmapped blocks), 0 when unknown."""
        if self._libc is None:
            return 0
        info: _MallInfo2 = self._libc.mallinfo2()
        return int(info.uordblks + info.hblkhd)

    def trim_if_worth_it(self) -> bool:
        if self._libc is None:
            return False
        in_use = self.in_use()
        self._high = max(self._high, in_use)
        if self._high - in_use < self.threshold:
            return False
        self._libc.malloc_trim(0)
        log.debug("trimmed the heap: %d MiB freed since its high mark", (self._high - in_use) >> 20)
        self._high = in_use
        return True

    async def run(self, interval: float = TRIM_INTERVAL) -> None:
        while True:
            await asyncio.sleep(interval)
            self.trim_if_worth_it()


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: the C library it runs on
        mallinfo2 = libc.mallinfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError, TypeError):
        return None  # not glibc (or older than 2.33): nothing to trim with
    mallinfo2.restype = _MallInfo2
    return libc


def limit_tls_read_buffers(size: int = TLS_READ_BUFFER) -> None:
    sslproto.SSLProtocol.max_size = size


async def connection_memory(app: web.Application) -> AsyncIterator[None]:
    """aiohttp cleanup context: small TLS buffers from the first connection, trims while serving."""
    limit_tls_read_buffers()
    trimmer = HeapTrimmer()
    task = asyncio.get_running_loop().create_task(trimmer.run()) if trimmer.available else None
    yield
    if task is not None:
        task.cancel()
