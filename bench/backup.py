"""Benchmark: VMO's backup repository (local directory, default 1 MiB chunks) beside restic and
borgbackup, and beside the disk's own raw read and write speed, all in one run.

The image (``--size-mib``, 1 GiB by default) is a raw disk image written once, cut into 1 MiB
blocks of which, by block number modulo 16: 0-1 are written zeros, 2-4 log-like text (unique
per block, compresses about tenfold) and 5-15 random bytes (incompressible), so it is 69%
random, 19% text and 12% zeros.

Measured (before each timed figure the page cache is dropped, ``echo 3 > drop_caches`` after a
sync, when the run may do so; the output says which):
1. Full backup of the image with VMO, restic (``restic backup FILE``, repository format 2,
   compression auto) and borg (``borg create REPO::a FILE``, no encryption, lz4). Then 1/16 of the
   image changes (64 MiB at 1 GiB): that many distinct 1 MiB blocks, chosen at random with a
   fixed seed, each at a 1 MiB-aligned offset, rewritten with fresh random bytes. The second
   backup: VMO incremental (parent = the first backup's index, changed = those extents, what a
   QEMU dirty bitmap gives it); restic and borg re-read and re-chunk the whole file, as they
   work. Bytes are the growth of each repository's directory (sum of its files' sizes), measured
   the same way for all three. Targets: VMO incremental >= 10x less time and >= 10x fewer bytes
   than VMO full; VMO incremental faster than restic's and borg's second runs.
2. ``--clones`` copies (10) of one ``--clone-mib`` image (256 MiB, same layout), each with 3
   random 4 KiB writes of its own, backed up as ten VMs' disks into one fresh repository: the
   sum of the images' sizes over the repository's growth. Target >= 0.8x the clone count (8x for
   ten); the share of it that is deduplication alone (ten times the first clone's bytes over
   all ten clones' bytes) is printed beside it.
3. Full backup throughput (the image's size over the VMO full backup's time) beside a raw
   sequential read of the image (1 MiB ``os.read`` calls); restore throughput (``restore_disk``
   of the second backup into a fresh ``FileTarget``, fsync included; the restored image is then
   compared with the source) beside a raw sequential write of as many bytes (1 MiB blocks, then
   fsync; the restore leaves the zero chunks as holes, so it writes 12% less). Target: each
   >= 0.5x its raw figure. A backup also writes what it stores and a raw read does not, so the
   CPU a backup needs (one thread hashing, and sealing, the image from the page cache) is
   printed beside them to tell CPU from I/O when a target is missed.
4. Verify throughput (``Repository.verify()`` of every backup, sealed chunk bytes per second)
   beside a raw read of every chunk file of the repository. No target: printed for reference.

Run: ``python bench/backup.py [--size-mib N] [--clones N] [--clone-mib N] [--quick]``; the exit
code is 0 whether or not a target is met (MISSED is printed), non-zero only on an error.
"""

from __future__ import annotations

import argparse
import asyncio
import filecmp
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

from vmo.controllers.backup.codec import Codec
from vmo.controllers.backup.disk import (
    DiskStats,
    Extent,
    FileSource,
    FileTarget,
    backup_disk,
    restore_disk,
)
from vmo.controllers.backup.repository import (
    BackupRef,
    DiskIndex,
    Manifest,
    Repository,
    local_store,
    new_backup_id,
)

MIB = 1 << 20
MB = 1_000_000
PASSWORD = "vmo-bench"  # restic 0.14 has no --insecure-no-password
NS = "bench"
T = TypeVar("T")

# --- the machine --------------------------------------------------------------------------------


def drop_caches() -> bool:
    """Empties the page cache so a read comes from the disk; False where the run may not."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
    except OSError:
        return False
    return True


def tree_bytes(path: Path) -> int:
    """The sum of the sizes of the files under ``path`` (``du --apparent-size``)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(root, name)).st_size
    return total


def raw_read(paths: list[Path]) -> tuple[int, float]:
    """(bytes, seconds) of reading ``paths`` in order, 1 MiB per ``os.read``."""
    total, start = 0, time.perf_counter()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            while block := os.read(fd, MIB):
                total += len(block)
        finally:
            os.close(fd)
    return total, time.perf_counter() - start


def raw_write(path: Path, size: int) -> float:
    """Seconds to write ``size`` bytes (1 MiB blocks of random bytes) and fsync them."""
    block = random.Random(7).randbytes(MIB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    start = time.perf_counter()
    try:
        for offset in range(0, size, MIB):
            os.write(fd, block[: min(MIB, size - offset)])
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


# --- the images -----------------------------------------------------------------------------------

LOG_LINES = [
    b"sshd[812]: Accepted publickey for deploy from 10.0.4.17 port 51022 ssh2",
    b"kernel: EXT4-fs (vda1): re-mounted. Opts: errors=remount-ro",
    b"systemd[1]: Started Daily apt download activities.",
    b'nginx: 10.0.4.9 - - "GET /api/v1/items?page=3 HTTP/1.1" 200 5123 "-" "curl/7.88"',
    b"postgres[1440]: LOG:  checkpoint complete: wrote 212 buffers (1.3%)",
    b"cron[655]: (root) CMD (run-parts /etc/cron.hourly)",
]


def text_block(number: int) -> bytes:
    """1 MiB of log lines, unique to block ``number`` (each line carries it) yet compressible."""
    lines, size, i = [], 0, 0
    while size < MIB:
        line = b"%06d.%05d host%d %s\n" % (number, i, i % 7, LOG_LINES[i % len(LOG_LINES)])
        lines.append(line)
        size += len(line)
        i += 1
    return b"".join(lines)[:MIB]


def block_content(number: int, rnd: random.Random) -> bytes:
    kind = number % 16
    if kind < 2:
        return bytes(MIB)
    if kind < 5:
        return text_block(number)
    return rnd.randbytes(MIB)


def write_image(path: Path, size: int, seed: int) -> None:
    """The image: see the module docstring for its layout; written (and synced) once."""
    rnd = random.Random(seed)
    with path.open("wb") as fh:
        for number in range(size // MIB):
            fh.write(block_content(number, rnd))
        fh.flush()
        os.fsync(fh.fileno())


def rewrite(path: Path, extents: list[Extent], seed: int) -> None:
    rnd = random.Random(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, length in extents:
            os.pwrite(fd, rnd.randbytes(length), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def changed_extents(size: int, seed: int) -> list[Extent]:
    """1/16 of the image in distinct 1 MiB-aligned 1 MiB extents, sorted."""
    blocks = random.Random(seed).sample(range(size // MIB), size // MIB // 16)
    return [(b * MIB, MIB) for b in sorted(blocks)]


# --- VMO ------------------------------------------------------------------------------------------


async def vmo_backup(
    repo: Repository,
    image: Path,
    *,
    vm: str,
    parent: DiskIndex | None = None,
    changed: list[Extent] | None = None,
) -> tuple[DiskIndex, DiskStats]:
    """One backup of ``image`` as VM ``vm``'s disk, manifest included, as the controller runs it."""
    source = FileSource(image)
    try:
        async with repo.writing("bench"):
            index, stats = await backup_disk(repo, "root", source, parent=parent, changed=changed)
            ref = BackupRef(NS, vm, new_backup_id())
            kind = "Incremental" if stats.reused else "Full"
            await repo.write_manifest(Manifest(ref, ref.id, kind, [index]))
    finally:
        source.close()
    return index, stats


async def vmo_restore(repo: Repository, index: DiskIndex, dest: Path) -> None:
    target = FileTarget(dest, index.size, fresh=True)
    try:
        await restore_disk(repo, index, target)
    finally:
        target.close()  # the fsync: the restore is on disk only after it


# --- the peers ------------------------------------------------------------------------------------


@dataclass
class Peer:
    """restic or borg, each with its own repository, cache and password in ``tmp``."""

    name: str
    repo: Path
    env: dict[str, str]

    def run(self, *argv: str) -> None:
        done = subprocess.run(list(argv), env=self.env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{self.name} {argv[1:]} failed: {done.stderr.strip()}")

    def init(self) -> None:
        if self.name == "restic":
            self.run("restic", "init", "--repository-version", "2")
        else:
            self.run("borg", "init", "--encryption=none", str(self.repo))

    async def backup(self, image: Path, archive: str) -> None:
        await asyncio.to_thread(self._backup, image, archive)

    def _backup(self, image: Path, archive: str) -> None:
        if self.name == "restic":
            self.run("restic", "backup", "--quiet", "--host", "bench", str(image))
        else:
            self.run("borg", "create", f"{self.repo}::{archive}", str(image))


def peers(tmp: Path) -> list[Peer]:
    base = dict(os.environ)
    restic = Peer("restic", tmp / "restic", base | {
        "RESTIC_REPOSITORY": str(tmp / "restic"),
        "RESTIC_PASSWORD": PASSWORD,
        "RESTIC_CACHE_DIR": str(tmp / "restic-cache"),
    })  # fmt: skip
    borg = Peer("borg", tmp / "borg", base | {
        "BORG_PASSPHRASE": PASSWORD,
        "BORG_BASE_DIR": str(tmp / "borg-home"),
        "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
        "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
    })  # fmt: skip
    return [restic, borg]


# --- figures --------------------------------------------------------------------------------------


@dataclass
class Row:
    """One figure beside its peer or floor; ``target`` None is printed for reference only."""

    figure: str
    value: str
    beside: str
    other: str
    ratio: float
    target: float | None
    rule: str = ""

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "-"
        return "OK" if self.ratio >= self.target else "MISSED"

    def line(self) -> str:
        rule = self.rule or (f">= {self.target:g}x" if self.target is not None else "")
        return (
            f"{self.figure:<30}{self.value:>14}  {self.beside:<26}{self.other:>14}"
            f"{self.ratio:>9.2f}x  {rule:<13}{self.verdict}"
        )


LEGEND = (
    "ratio: how many times VMO's figure is better than the one beside it (the other's time or "
    "bytes over VMO's; VMO's MB/s over the raw MB/s)"
)
HEADER = (
    f"{'figure':<30}{'value':>14}  {'beside':<26}{'value':>14}{'ratio':>10}  {'target':<13}verdict"
)


def secs(s: float) -> str:
    return f"{s:.2f} s"


def mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def mbs(n: int, s: float) -> str:
    return f"{n / MB / s:.0f} MB/s"


class Bench:
    def __init__(self, tmp: Path, *, cold: bool) -> None:
        self.tmp, self.cold = tmp, cold
        self.rows: list[Row] = []

    def show(self, row: Row) -> None:
        self.rows.append(row)
        print("  " + row.line(), flush=True)

    async def timed(self, action: Callable[[], Awaitable[T]]) -> tuple[T, float]:
        """The result of ``action`` and its seconds, from a cold page cache when possible."""
        if self.cold:
            drop_caches()
        start = time.perf_counter()
        result = await action()
        return result, time.perf_counter() - start

    async def grown(self, path: Path, action: Callable[[], Awaitable[T]]) -> tuple[T, float, int]:
        """As ``timed``, and by how many bytes the directory ``path`` grew."""
        before = tree_bytes(path) if path.exists() else 0
        result, seconds = await self.timed(action)
        return result, seconds, tree_bytes(path) - before


async def in_thread(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


async def backups(bench: Bench, image: Path, size: int) -> tuple[Repository, DiskIndex, float]:
    """Part 1: full and second backups of VMO, restic and borg. Returns the VMO repository,
    its second backup's index and the full backup's seconds."""
    repo_dir = bench.tmp / "vmo"
    repo = await Repository.init(local_store(repo_dir), name="bench")
    (full, _), full_s, full_b = await bench.grown(repo_dir, lambda: vmo_backup(repo, image, vm="a"))
    first: dict[str, tuple[float, int]] = {}
    for peer in peers(bench.tmp):
        peer.init()
        _, s, b = await bench.grown(peer.repo, partial(peer.backup, image, "a"))
        first[peer.name] = (s, b)
    extents = changed_extents(size, seed=2)
    rewrite(image, extents, seed=3)
    print(f"changed {len(extents)} extents of 1 MiB ({mib(len(extents) * MIB)})")
    (incr, st), incr_s, incr_b = await bench.grown(
        repo_dir, lambda: vmo_backup(repo, image, vm="a", parent=full, changed=extents)
    )
    second: dict[str, tuple[float, int]] = {}
    for peer in peers(bench.tmp):
        _, s, b = await bench.grown(peer.repo, partial(peer.backup, image, "b"))
        second[peer.name] = (s, b)
    print(f"VMO full: {secs(full_s)}, {mib(full_b)}; incremental: {secs(incr_s)}, {mib(incr_b)} "
          f"(read {mib(st.read)}, reused {st.reused} chunks, sent {st.sent})")  # fmt: skip
    for name in ("restic", "borg"):
        (s1, b1), (s2, b2) = first[name], second[name]
        print(f"{name}: first {secs(s1)}, {mib(b1)}; second {secs(s2)}, {mib(b2)}")
    bench.show(Row("VMO incremental time", secs(incr_s), "VMO full", secs(full_s),
                   full_s / incr_s, 10, ">= 10x less"))  # fmt: skip
    bench.show(Row("VMO incremental bytes", mib(incr_b), "VMO full", mib(full_b),
                   full_b / incr_b, 10, ">= 10x less"))  # fmt: skip
    for name in ("restic", "borg"):
        s2, b2 = second[name]
        bench.show(Row("VMO incremental time", secs(incr_s), f"{name} second run", secs(s2),
                       s2 / incr_s, 1.0, "faster"))  # fmt: skip
        bench.show(Row("VMO incremental bytes", mib(incr_b), f"{name} second run", mib(b2),
                       b2 / incr_b, None))  # fmt: skip
        s1, b1 = first[name]
        bench.show(Row("VMO full time", secs(full_s), f"{name} first run", secs(s1),
                       s1 / full_s, None))  # fmt: skip
        bench.show(Row("VMO full bytes", mib(full_b), f"{name} first run", mib(b1),
                       b1 / full_b, None))  # fmt: skip
    return repo, incr, full_s


def make_clones(base: Path, count: int, seed: int) -> list[Path]:
    """``count`` copies of ``base``, each with 3 random 4 KiB writes of its own."""
    clones = []
    for i in range(count):
        clone = base.with_name(f"clone-{i}.img")
        shutil.copyfile(base, clone)
        rnd = random.Random(seed + i)
        places = [rnd.randrange(0, clone.stat().st_size - 4096) for _ in range(3)]
        rewrite(clone, [(p, 4096) for p in places], seed=seed + 100 + i)
        clones.append(clone)
    return clones


async def clones_dedup(bench: Bench, count: int, size: int) -> None:
    """Part 2: ``count`` clones of one image, as ``count`` VMs' disks, into one repository."""
    base = bench.tmp / "clone-base.img"
    write_image(base, size, seed=11)
    clones = make_clones(base, count, seed=20)
    base.unlink()
    repo_dir = bench.tmp / "vmo-clones"
    repo = await Repository.init(local_store(repo_dir), name="clones")
    start_bytes = tree_bytes(repo_dir)
    first, seconds = 0, 0.0
    for i, clone in enumerate(clones):
        _, s, b = await bench.grown(repo_dir, partial(vmo_backup, repo, clone, vm=f"vm{i}"))
        first, seconds = first or b, seconds + s
        clone.unlink()
    stored = tree_bytes(repo_dir) - start_bytes
    total = count * size
    print(f"{count} clones of {mib(size)}: {mib(stored)} stored in {secs(seconds)}; "
          f"deduplication alone {count * first / stored:.2f}x")  # fmt: skip
    bench.show(Row("VMO clones reduction", mib(stored), f"{count} images' sizes", mib(total),
                   total / stored, 0.8 * count))  # fmt: skip


async def throughput(
    bench: Bench, image: Path, repo: Repository, index: DiskIndex, full_s: float
) -> None:
    """Part 3: backup beside raw read, restore beside raw write."""
    size = image.stat().st_size
    (n, _), read_s = await bench.timed(lambda: in_thread(lambda: raw_read([image])))
    hash_s, seal_s = await in_thread(lambda: cpu_costs(image, repo.codec))
    print(f"one thread, page cache warm: SHA-256 of the image {mbs(size, hash_s)}, "
          f"zstd-{repo.codec.level} seal of its non-zero chunks {mbs(size, seal_s)}")  # fmt: skip
    bench.show(Row("VMO full backup", mbs(size, full_s), "raw read (1 MiB os.read)",
                   mbs(n, read_s), read_s / full_s, 0.5))  # fmt: skip
    dest = bench.tmp / "restored.img"
    _, restore_s = await bench.timed(lambda: vmo_restore(repo, index, dest))
    if not filecmp.cmp(image, dest, shallow=False):
        raise RuntimeError("the restored image differs from the one backed up")
    dest.unlink()
    raw = bench.tmp / "raw-write.img"
    _, write_s = await bench.timed(lambda: in_thread(lambda: raw_write(raw, size)))
    raw.unlink()
    bench.show(Row("VMO restore", mbs(size, restore_s), "raw write (1 MiB + fsync)",
                   mbs(size, write_s), write_s / restore_s, 0.5))  # fmt: skip


def cpu_costs(image: Path, codec: Codec) -> tuple[float, float]:
    """Seconds one thread takes to hash, and to seal, every 1 MiB chunk of ``image`` (read from
    the page cache first, outside the timing): the CPU a backup cannot avoid, for the cause of a
    miss."""
    blocks = []
    with image.open("rb") as fh:
        while block := fh.read(MIB):
            blocks.append(block)
    start = time.perf_counter()
    for block in blocks:
        codec.chunk_id(block)
    hashed = time.perf_counter()
    for block in blocks:
        if block.count(0) != len(block):
            codec.seal(block, name="x")
    return hashed - start, time.perf_counter() - hashed


async def verify(bench: Bench, repo_dir: Path) -> None:
    """Part 4: verify every backup beside a raw read of every chunk file."""
    repo = await Repository.open(local_store(repo_dir), name="bench")
    report, verify_s = await bench.timed(repo.verify)
    if not report.ok:
        raise RuntimeError(f"verify found damaged chunks: {report.damaged}")
    chunks = sorted(p for p in (repo_dir / "chunks").rglob("*") if p.is_file())
    (n, _), read_s = await bench.timed(lambda: in_thread(lambda: raw_read(chunks)))
    print(f"verify: {report.chunks} chunks, {mib(report.bytes)} in {secs(verify_s)}")
    bench.show(Row("VMO verify", mbs(report.bytes, verify_s), "raw read of chunk files",
                   mbs(n, read_s), read_s / verify_s, None))  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="the image (default 1024)")
    parser.add_argument("--clones", type=int, default=10)
    parser.add_argument("--clone-mib", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="256 MiB image, 4 clones of 64 MiB")
    args = parser.parse_args()
    if args.quick:
        args.size_mib, args.clones, args.clone_mib = 256, 4, 64
    if args.size_mib < 16:
        parser.error("--size-mib must be at least 16")
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="vmo-bench-backup-") as name:
        tmp = Path(name)
        cold = drop_caches()
        print(f"page cache: {'dropped before each timed figure' if cold else 'warm (not root)'}")
        bench = Bench(tmp, cold=cold)
        image = tmp / "disk.img"
        size = args.size_mib * MIB
        write_image(image, size, seed=1)
        print(f"image: {mib(size)} (69% random, 19% text, 12% zeros) in {tmp}")
        repo, index, full_s = await backups(bench, image, size)
        await throughput(bench, image, repo, index, full_s)
        await verify(bench, tmp / "vmo")
        image.unlink()
        await clones_dedup(bench, args.clones, args.clone_mib * MIB)
        print(f"\nall figures (page cache {'cold' if cold else 'warm'}):")
        print(LEGEND)
        print(HEADER)
        for row in bench.rows:
            print(row.line())
        missed = sum(row.verdict == "MISSED" for row in bench.rows)
        print(f"{missed} target(s) missed" if missed else "every target met")


if __name__ == "__main__":
    asyncio.run(main())
