"""The argv of every qemu-img run the engine makes, as pure functions that tests pin.

Each argv puts ``--`` before its operands (image files, then a size): qemu-img reads options with
getopt, which permutes, so without ``--`` any later word that starts with ``-`` is an option. That
is how a negative emptyDisk capacity once reached qemu-img as ``-1073741824`` (issue 10); a file
named ``-x`` would have gone the same way. qemu-img 7.2 takes ``--`` in every subcommand used
here (``tests/test_tool_argv.py`` runs each). Sizes are whole positive byte counts, checked here
as well as at admission: ``resize`` would read ``-1M`` even after ``--`` as "shrink by 1M".
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

__all__ = [
    "QEMU_IMG",
    "ImageSizeError",
    "convert",
    "create",
    "info",
    "map_extents",
    "rebase",
    "resize",
]

QEMU_IMG = "qemu-img"
Operand = str | PathLike[str]


class ImageSizeError(ValueError):
    """A size for qemu-img that is not a whole positive number of bytes."""


def _size(size: int) -> str:
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ImageSizeError(f"an image size must be a whole number of bytes above 0, not {size!r}")
    return str(size)


def create(
    path: Operand,
    size: int | None = None,
    *,
    fmt: str = "qcow2",
    backing: str | None = None,
    backing_fmt: str = "qcow2",
    unsafe: bool = False,
) -> list[str]:
    """``qemu-img create``: a new image of ``size`` bytes, or an overlay on ``backing``."""
    argv = [QEMU_IMG, "create", "-q", "-f", fmt]
    if backing is not None:
        argv += ["-F", backing_fmt, "-b", backing]
    if unsafe:
        argv.append("-u")  # the backing file's size is not read (it may be open in a guest)
    return [*argv, "--", str(path), *([] if size is None else [_size(size)])]


def info(path: Operand, *, fmt: str | None = None, backing_chain: bool = False) -> list[str]:
    """``qemu-img info`` as JSON, read without taking the image's lock."""
    argv = [QEMU_IMG, "info", "--output=json", "-U"]
    if backing_chain:
        argv.append("--backing-chain")
    if fmt is not None:
        argv += ["-f", fmt]
    return [*argv, "--", str(path)]


def map_extents(path: Operand, *, fmt: str = "qcow2") -> list[str]:
    """``qemu-img map`` as JSON: where each extent's data lives, read without the lock."""
    return [QEMU_IMG, "map", "--output=json", "-U", "-f", fmt, "--", str(path)]


def convert(
    source: Operand,
    target: Operand,
    *,
    target_fmt: str,
    source_fmt: str | None = None,
    progress: bool = False,
    options: Sequence[str] = (),
) -> list[str]:
    """``qemu-img convert`` of ``source`` into a new ``target``, reading without the lock."""
    argv = [QEMU_IMG, "convert", *(["-p"] if progress else []), "-U"]
    if source_fmt is not None:
        argv += ["-f", source_fmt]
    argv += ["-O", target_fmt]
    for option in options:
        argv += ["-o", option]
    return [*argv, "--", str(source), str(target)]


def resize(path: Operand, size: int, *, fmt: str = "qcow2") -> list[str]:
    """``qemu-img resize`` to exactly ``size`` bytes (never a relative ``+``/``-`` size)."""
    return [QEMU_IMG, "resize", "-q", "-f", fmt, "--", str(path), _size(size)]


def rebase(
    path: Operand, *, backing: str, backing_fmt: str | None = None, fmt: str = "qcow2"
) -> list[str]:
    """``qemu-img rebase`` in safe mode onto ``backing`` ("" for none: the image stands alone)."""
    argv = [QEMU_IMG, "rebase", "-q", "-f", fmt, "-b", backing]
    if backing_fmt is not None:
        argv += ["-F", backing_fmt]
    return [*argv, "--", str(path)]
