"""Files handed to an unprivileged QEMU by descriptor (``add-fd``), and taken back.

QEMU drops to an account that cannot open the pool's files, so VMO opens them and passes the
descriptor into an fdset whose ``opaque`` names the owner and file (``<kind>:<node>:<path>``);
the block node then opens ``/dev/fdset/N``. Releasing removes every fdset whose opaque starts
with an owner's prefix (QEMU closes the descriptors once no node uses them).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from vmo.engine.qemu.errors import QemuError
from vmo.engine.qemu.qmp import QMPClient


async def pass_fd(qmp: QMPClient, path: Path, opaque: str, *, writable: bool = True) -> int:
    """Opens ``path`` and adds the descriptor to a new fdset; its id."""
    fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    try:
        added = await qmp.execute("add-fd", {"opaque": opaque}, fds=[fd])
        return int(added["fdset-id"])
    finally:
        os.close(fd)


async def release_fds(qmp: QMPClient, prefix: str) -> None:
    """Removes every fdset holding a descriptor whose opaque starts with ``prefix``."""
    for fdset in await qmp.execute("query-fdsets") or []:
        opaques = [str(fd.get("opaque") or "") for fd in fdset.get("fds") or []]
        if any(o.startswith(prefix) for o in opaques):
            with contextlib.suppress(QemuError):
                await qmp.execute("remove-fd", {"fdset-id": fdset["fdset-id"]})


__all__ = ["pass_fd", "release_fds"]
