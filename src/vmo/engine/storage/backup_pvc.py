"""A push-mode backup's files into its target PVC: an ext4 filesystem inside the claim's volume.

Upstream's push mode writes one sparse qcow2 per disk into a Filesystem PVC. A VMO claim is a
disk image, so the filesystem is inside it, as a CSI driver's volume would hold one: the first
push formats an empty claim as ext4 (label ``vmo-backups``), each backup adds a directory
``/<backup>/`` holding ``<volume>.qcow2``, and earlier backups stay. Whoever reads the claim
(a VM it is attached to, or ``vmo``'s file restore) sees plain files.

The image is edited offline with e2fsprogs, not mounted (no loop devices or root mounts are
needed): the volume is converted to a sparse raw file, ``debugfs -w`` adds the files, and the
result is written back into the volume. A claim that holds data which is not ext4 is refused,
never overwritten; a claim too small for the files fails with the sizes named, and the volume
is left as it was (the edit happens on the copy).
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path

EXT_MAGIC_OFFSET = 1080
EXT_MAGIC = b"\x53\xef"
LABEL = "vmo-backups"
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class PushTargetError(Exception):
    """The files could not go into the claim; the message says why, naming the claim."""


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise PushTargetError(f"{argv[0]}: {(done.stderr or done.stdout).strip()}")
    return done.stdout + done.stderr


def _has_data(path: Path) -> bool:
    """Whether the sparse file holds any non-zero byte (its data extents only are read)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size
        offset = 0
        while offset < end:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # nothing but holes from here
                    return False
                raise
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            os.lseek(fd, start, os.SEEK_SET)
            while start < stop:
                block = os.read(fd, min(1 << 20, stop - start))
                if not block:
                    break
                if block != bytes(len(block)):
                    return True
                start += len(block)
            offset = stop
        return False
    finally:
        os.close(fd)


def _is_ext(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(EXT_MAGIC_OFFSET)
        return f.read(2) == EXT_MAGIC


def _size_in(raw: Path, name: str) -> int | None:
    out = subprocess.run(
        ["debugfs", "-R", f"stat {name}", str(raw)], capture_output=True, text=True, timeout=60
    )
    found = re.search(r"\bSize: (\d+)", out.stdout)
    return int(found.group(1)) if found else None


def _free_bytes(raw: Path) -> int:
    out = _run(["dumpe2fs", "-h", str(raw)])
    blocks = re.search(r"^Free blocks:\s+(\d+)", out, re.M)
    size = re.search(r"^Block size:\s+(\d+)", out, re.M)
    return int(blocks.group(1)) * int(size.group(1)) if blocks and size else 0


def store_files(
    volume: Path, directory: str, files: Mapping[str, Path], *, scratch: Path, claim: str
) -> None:
    """Adds ``files`` (name in the claim -> file here) under ``/<directory>/`` of the ext4
    filesystem in the qcow2 ``volume`` (formatting it first when the volume is empty)."""
    for name in [directory, *files]:
        if not _SAFE.match(name):
            raise PushTargetError(f"{name!r} is not a safe file name")
    raw = scratch / f".vmo-push-{directory}.raw"
    try:
        _run(["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", str(volume), str(raw)])
        if not _is_ext(raw):
            if _has_data(raw):
                raise PushTargetError(
                    f"PVC {claim} holds data that is not an ext4 filesystem: a push backup "
                    "never overwrites it"
                )
            _run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", LABEL, "-E", "nodiscard", str(raw)])
        needed = sum(p.stat().st_blocks * 512 for p in files.values())
        free = _free_bytes(raw)
        if needed > free:
            raise PushTargetError(
                f"PVC {claim} is too small: the backup needs {needed} bytes, {free} are free"
            )
        if _size_in(raw, f"/{directory}") is not None:
            raise PushTargetError(
                f"PVC {claim} already holds /{directory}: a backup of that name was pushed into "
                "it before, and is kept"
            )
        script = scratch / f".vmo-push-{directory}.debugfs"
        lines = [f"mkdir /{directory}"]
        lines += [f"write {src} /{directory}/{name}" for name, src in files.items()]
        script.write_text("\n".join(lines) + "\n")
        try:
            _run(["debugfs", "-w", "-f", str(script), str(raw)])
        finally:
            script.unlink(missing_ok=True)
        for name, src in files.items():
            got = _size_in(raw, f"/{directory}/{name}")
            if got != src.stat().st_size:
                raise PushTargetError(
                    f"PVC {claim}: /{directory}/{name} was not written whole "
                    f"({got} of {src.stat().st_size} bytes)"
                )
        _run(["qemu-img", "convert", "-q", "-n", "-f", "raw", "-O", "qcow2", str(raw), str(volume)])
    finally:
        raw.unlink(missing_ok=True)


__all__ = ["LABEL", "PushTargetError", "store_files"]
