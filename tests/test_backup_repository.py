"""The backup repository on real stores: a local directory and a real S3 server (SeaweedFS).
Disk images are real files with random data, zeros and holes; every restore is compared byte
for byte with what was backed up."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from vmo.controllers.backup.codec import Codec, CodecError, WrongKey
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
    DamagedChunk,
    DiskIndex,
    Manifest,
    Repository,
    RepositoryBusy,
    RepositoryError,
    local_store,
    new_backup_id,
    s3_store,
)
from vmo.controllers.backup.retention import Retention, kept
from vmo.testing.s3 import ACCESS_KEY, SECRET_KEY, SeaweedS3

CS = 64 << 10  # small chunks keep the images small and the chunk counts meaningful
MiB = 1 << 20


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def write_image(path: Path, size: int, seed: int) -> None:
    """Random data, with a zeroed stretch and a hole, as a used disk has."""
    rnd = random.Random(seed)
    with path.open("wb") as fh:
        fh.truncate(size)
        for offset in range(0, size, CS):
            if offset // CS % 7 == 3:
                continue  # a hole
            data = bytes(CS) if offset // CS % 7 == 5 else rnd.randbytes(CS)
            fh.seek(offset)
            fh.write(data[: size - offset])


def change(path: Path, extents: list[Extent], seed: int) -> None:
    rnd = random.Random(seed)
    with path.open("r+b") as fh:
        for offset, length in extents:
            fh.seek(offset)
            fh.write(rnd.randbytes(length))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def backup(
    repo: Repository,
    image: Path,
    *,
    vm: str = "db",
    parent: Manifest | None = None,
    changed: list[Extent] | None = None,
) -> tuple[Manifest, DiskStats]:
    source = FileSource(image)
    try:
        async with repo.writing("test"):
            index, stats = await backup_disk(
                repo,
                "root",
                source,
                parent=parent.disk("root") if parent else None,
                changed=changed,
            )
            ref = BackupRef("virtual-machines", vm, new_backup_id())
            kind = "Incremental" if stats.reused else "Full"
            manifest = Manifest(
                ref, ref.id, kind, [index], parent=parent.ref.id if parent else None
            )
            await repo.write_manifest(manifest)
    finally:
        source.close()
    return manifest, stats


async def restore(repo: Repository, manifest: Manifest, dest: Path) -> DiskStats:
    index = manifest.disk("root")
    assert index is not None
    target = FileTarget(dest, index.size, fresh=True)
    try:
        return await restore_disk(repo, index, target)
    finally:
        target.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    write_image(path, 4 * MiB + 12345, seed=1)
    return path


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    return tmp_path / "repo"


def local_repo(path: Path, secret: bytes | None = None) -> Repository:
    result: Repository = run(Repository.init(local_store(path), secret=secret, chunk_size=CS))
    return result


# --- the codec -----------------------------------------------------------------------------------


def test_sealed_blobs_open_only_under_their_name_and_key() -> None:
    plain = Codec()
    data = b"a" * 10_000
    sealed = plain.seal(data, name="x")
    assert len(sealed) < 100 and plain.open(sealed, name="x") == data  # compressed
    noise = os.urandom(4096)
    assert len(plain.seal(noise, name="n")) == len(noise) + 5  # stored as it is: no gain
    secret, _config = Codec.new_encryption(b"passphrase")
    locked = secret.seal(data, name="x")
    assert data[:64] not in locked
    assert secret.open(locked, name="x") == data
    with pytest.raises(CodecError, match="fails authentication"):
        secret.open(locked, name="y")  # a blob passed off under another name
    tampered = bytearray(locked)
    tampered[-1] ^= 1
    with pytest.raises(CodecError, match="fails authentication"):
        secret.open(bytes(tampered), name="x")
    with pytest.raises(CodecError, match="encrypted"):
        plain.open(locked, name="x")
    # keyed ids: the same data has another id under a key, so ids say nothing about content
    assert secret.chunk_id(data) != plain.chunk_id(data) == hashlib.sha256(data).digest()


# --- local repositories --------------------------------------------------------------------------


def test_a_full_and_two_incremental_backups_each_restore_byte_for_byte(
    tmp_path: Path, image: Path, repo_dir: Path
) -> None:
    repo = local_repo(repo_dir)
    versions = [digest(image)]
    first, full = run(backup(repo, image))
    assert full.reused == 0 and full.sent > 0 and full.zero > 0
    # the holes and the zeroed stretches are neither read nor stored
    assert full.read < image.stat().st_size
    extents = [[(100_000, 5000), (3 * MiB, 70_000)], [(0, 10), (4 * MiB, 12345)]]
    manifests = [first]
    for n, changed in enumerate(extents):
        change(image, changed, seed=10 + n)
        versions.append(digest(image))
        manifest, inc = run(backup(repo, image, parent=manifests[-1], changed=changed))
        touched = {i for o, length in changed for i in range(o // CS, (o + length - 1) // CS + 1)}
        assert inc.read == sum(min(CS, inc.size - i * CS) for i in touched)  # nothing else read
        assert inc.sent <= len(touched) and inc.reused == inc.chunks - len(touched)
        manifests.append(manifest)
    for n, manifest in enumerate(run(repo.backups())):
        out = tmp_path / f"restored-{n}.img"
        run(restore(repo, run(repo.read_manifest(manifest)), out))
        assert digest(out) == versions[n], f"point in time {n}"
        assert out.stat().st_size == image.stat().st_size


def test_identical_disks_of_two_vms_are_stored_once(
    tmp_path: Path, image: Path, repo_dir: Path
) -> None:
    repo = local_repo(repo_dir)
    run(backup(repo, image, vm="a"))
    stored = run(repo.stored_bytes())
    clone = tmp_path / "clone.img"
    clone.write_bytes(image.read_bytes())
    _, stats = run(backup(repo, clone, vm="b"))
    assert stats.sent == 0 and stats.deduplicated > 0
    assert run(repo.stored_bytes()) == stored


class FailingSource(FileSource):
    """A source whose reads fail after ``budget`` of them: a backup cut off midway."""

    def __init__(self, path: Path, budget: int) -> None:
        super().__init__(path)
        self.budget = budget

    def read_blocking(self, offset: int, length: int) -> bytes:
        self.budget -= 1
        if self.budget < 0:
            raise OSError("the source went away")
        return super().read_blocking(offset, length)


def test_an_interrupted_backup_leaves_no_backup_and_its_chunks_are_reused(
    image: Path, repo_dir: Path
) -> None:
    repo = local_repo(repo_dir)

    async def interrupted() -> None:
        source = FailingSource(image, budget=20)
        try:
            async with repo.writing("test"):
                await backup_disk(repo, "root", source, workers=1)
        finally:
            source.close()

    with pytest.raises(OSError, match="went away"):
        run(interrupted())
    assert run(repo.backups()) == []
    _, stats = run(backup(repo, image))
    assert stats.deduplicated >= 15 and stats.sent > 0  # what the first run wrote is not resent
    assert run(repo.verify()).ok


def test_verify_and_restore_name_a_damaged_chunk_and_the_backups_that_need_it(
    tmp_path: Path, image: Path, repo_dir: Path
) -> None:
    repo = local_repo(repo_dir, secret=b"s3cret")
    first, _ = run(backup(repo, image, vm="a"))
    second, _ = run(backup(repo, image, vm="b"))
    assert run(repo.verify()).ok
    victim, missing = sorted(first.chunks())[:2]
    chunk_file = repo_dir / Repository.chunk_key(victim)
    blob = bytearray(chunk_file.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    chunk_file.write_bytes(bytes(blob))
    (repo_dir / Repository.chunk_key(missing)).unlink()
    report = run(repo.verify())
    assert not report.ok
    assert set(report.damaged) == {victim.hex(), missing.hex()}
    assert "fails authentication" in report.damaged[victim.hex()]
    assert "missing" in report.damaged[missing.hex()]
    assert set(report.backups) == {str(first.ref), str(second.ref)}
    with pytest.raises(DamagedChunk) as caught:
        run(restore(repo, first, tmp_path / "out.img"))
    assert caught.value.digest in {victim, missing}


def test_a_wrong_key_is_refused_and_nothing_is_overwritten(image: Path, repo_dir: Path) -> None:
    repo = local_repo(repo_dir, secret=b"right")
    run(backup(repo, image))
    before = {p: p.read_bytes() for p in repo_dir.rglob("*") if p.is_file()}
    store = local_store(repo_dir)
    with pytest.raises(WrongKey, match="does not open"):
        run(Repository.open(store, secret=b"wrong"))
    with pytest.raises(WrongKey, match="is needed"):
        run(Repository.open(store))
    with pytest.raises(RepositoryError, match="already there"):
        run(Repository.init(store, secret=b"wrong"))
    after = {p: p.read_bytes() for p in repo_dir.rglob("*") if p.is_file()}
    assert after == before
    plain = local_repo(repo_dir.parent / "plain")
    del plain
    with pytest.raises(WrongKey, match="not encrypted"):
        run(Repository.open(local_store(repo_dir.parent / "plain"), secret=b"x"))


def test_prune_and_gc_free_only_what_no_backup_needs(
    tmp_path: Path, image: Path, repo_dir: Path
) -> None:
    repo = local_repo(repo_dir)
    first, _ = run(backup(repo, image))
    change(image, [(0, 2 * MiB)], seed=3)
    second, _ = run(backup(repo, image, parent=first, changed=[(0, 2 * MiB)]))
    only_first = first.chunks() - second.chunks()
    assert only_first
    run(repo.delete_backup(first.ref))
    report = run(repo.gc())
    assert report.removed == len(only_first) and report.freed > 0
    for digest_ in only_first:
        assert not (repo_dir / Repository.chunk_key(digest_)).exists()
    run(restore(repo, second, tmp_path / "second.img"))
    assert digest(tmp_path / "second.img") == digest(image)
    assert run(repo.verify()).ok


def test_gc_and_backups_exclude_each_other(image: Path, repo_dir: Path) -> None:
    repo = local_repo(repo_dir)

    async def gc_while_writing() -> None:
        async with repo.writing("a backup"):
            await repo.gc()

    with pytest.raises(RepositoryBusy, match="backup by a backup"):
        run(gc_while_writing())
    # a garbage collection's lock (as another process holds it) keeps backups out
    lock = repo_dir / "locks" / "gc" / "other"
    lock.parent.mkdir(parents=True, exist_ok=True)
    expires = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    lock.write_text(json.dumps({"owner": "gc elsewhere", "expires": expires}))
    with pytest.raises(RepositoryBusy, match="gc by gc elsewhere"):
        run(backup(repo, image))
    assert run(repo.backups()) == []
    # an expired one is its dead holder's, and no longer counts
    lock.write_text(json.dumps({"owner": "gc elsewhere", "expires": "2020-01-01T00:00:00+00:00"}))
    run(backup(repo, image))
    assert run(repo.gc()).stale_locks == 1 and not lock.exists()


def test_two_backups_of_one_vm_never_run_at_once(repo_dir: Path) -> None:
    repo = local_repo(repo_dir)

    async def twice() -> None:
        async with repo.vm_lock("ns", "db", "first"), repo.vm_lock("ns", "db", "second"):
            pass

    with pytest.raises(RepositoryBusy, match="already running \\(first\\)"):
        run(twice())

    async def after() -> None:  # released: the next one may run, and another VM meanwhile
        async with repo.vm_lock("ns", "db", "third"), repo.vm_lock("ns", "web", "fourth"):
            pass

    run(after())


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a repository whose disk fills."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_repository_disk_fails_the_backup_cleanly(tmp_path: Path, small_disk: Path) -> None:
    image = tmp_path / "noise.img"
    image.write_bytes(os.urandom(4 * MiB))
    repo = local_repo(small_disk / "repo")
    with pytest.raises(RepositoryError, match="writing chunks/"):
        run(backup(repo, image))
    assert run(repo.backups()) == []
    # nothing half-written remains beside the chunks that made it whole
    assert not [p for p in small_disk.rglob("*") if p.name.startswith(".")]
    assert run(Repository.open(local_store(small_disk / "repo"))).chunk_size == CS


# --- retention ----------------------------------------------------------------------------------


def test_retention_keeps_the_newest_of_each_period() -> None:
    # every 6 hours from Sunday 2025-12-28 to Sunday 2026-01-11 18:00
    start = datetime(2025, 12, 28, tzinfo=UTC)
    backups = [(f"b{n}", start + timedelta(hours=6 * n)) for n in range(60)]
    keep = kept(backups, Retention(keep_last=2, daily=3, weekly=2, monthly=2))
    # b55 and b51: Jan 10 and 9 18:00; b31: Jan 4 18:00 (ISO week 1); b15: Dec 31 18:00
    assert set(keep) == {"b59", "b58", "b55", "b51", "b31", "b15"}
    assert keep["b59"] == ["keep-last", "daily", "weekly", "monthly"]
    assert keep["b31"] == ["weekly"] and keep["b15"] == ["monthly"]
    assert kept(backups, Retention(hourly=3)).keys() == {"b59", "b58", "b57"}
    assert set(kept(backups, Retention())) == {name for name, _ in backups}  # no rule: keep all


# --- S3 -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    with SeaweedS3(tmp_path_factory.mktemp("seaweed")) as server:
        yield server


def s3_repo(server: SeaweedS3, bucket: str, **kwargs: Any) -> Any:
    return s3_store(
        bucket,
        endpoint=server.endpoint,
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        **kwargs,
    )


def test_an_encrypted_s3_repository_backs_up_and_restores_each_point_in_time(
    tmp_path: Path, image: Path, s3: SeaweedS3
) -> None:
    repo = run(Repository.init(s3_repo(s3, "points"), secret=b"k", chunk_size=CS))
    first, _ = run(backup(repo, image))
    v1 = digest(image)
    change(image, [(MiB, 100_000)], seed=5)
    second, inc = run(backup(repo, image, parent=first, changed=[(MiB, 100_000)]))
    assert inc.read <= 3 * CS
    reopened = run(Repository.open(s3_repo(s3, "points"), secret=b"k"))
    run(restore(reopened, first, tmp_path / "1.img"))
    run(restore(reopened, second, tmp_path / "2.img"))
    assert digest(tmp_path / "1.img") == v1 and digest(tmp_path / "2.img") == digest(image)
    assert run(reopened.verify()).ok
    with pytest.raises(RepositoryError):
        run(Repository.open(s3_store(
            "points", endpoint=s3.endpoint, access_key=ACCESS_KEY, secret_key="wrong", retries=0
        )))  # fmt: skip


def test_an_s3_repository_going_away_mid_backup_fails_it_and_keeps_earlier_ones(
    tmp_path: Path, image: Path, s3: SeaweedS3
) -> None:
    store = s3_repo(s3, "away", retries=1, timeout="3s")
    repo = run(Repository.init(store, chunk_size=CS))
    first, _ = run(backup(repo, image))
    big = tmp_path / "big.img"
    big.write_bytes(os.urandom(16 * MiB))

    class StoppingSource(FileSource):
        reads = 0

        async def read(self, offset: int, length: int) -> bytes:
            self.reads += 1
            if self.reads == 10:
                await asyncio.to_thread(s3.stop)  # the store goes away mid-backup
            return await super().read(offset, length)

    async def cut_off() -> None:
        source = StoppingSource(big)
        try:
            async with repo.writing("test"):
                await backup_disk(repo, "root", source)
        finally:
            source.close()

    try:
        with pytest.raises(RepositoryError):
            run(cut_off())
    finally:
        s3.start()
    assert [r.id for r in run(repo.backups())] == [first.ref.id]
    run(restore(repo, first, tmp_path / "first.img"))
    assert digest(tmp_path / "first.img") == digest(image)
    _, stats = run(backup(repo, big, vm="big"))  # the next run succeeds
    assert stats.sent + stats.deduplicated == stats.chunks - stats.zero
    assert run(repo.verify()).ok


def test_indexes_survive_their_json_form() -> None:
    index = DiskIndex("root", 3 * CS + 1, CS, [os.urandom(32) for _ in range(4)])
    again = DiskIndex.from_json(json.loads(json.dumps(index.to_json())))
    assert again == index
