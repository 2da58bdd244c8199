"""Files out of a backup without restoring its disk: a real MBR disk with a FAT and an ext4
partition (made by sfdisk, mkfs.vfat, mcopy and mke2fs -d), backed up into a repository, then
browsed and extracted through ``vmo backup files`` and ``extract``, reading only a few chunks."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from vmo.cli import backup as cli
from vmo.controllers.backup.disk import FileSource, backup_disk
from vmo.controllers.backup.files import BackupFiles, FileRestoreError, pick
from vmo.controllers.backup.repository import (
    BackupRef,
    DamagedChunk,
    Manifest,
    Repository,
    local_store,
    new_backup_id,
)

MiB = 1 << 20
DISK = 64 * MiB
FAT_START, FAT_SECTORS = 2048, 16 * 2048  # 16 MiB
EXT_START = FAT_START + FAT_SECTORS
NS = "files"
HOSTS = b"127.0.0.1 localhost\n10.0.0.5 db.prod.example db\n"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def sh(argv: list[str], stdin: bytes | None = None) -> None:
    subprocess.run(argv, input=stdin, check=True, capture_output=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("files")
    raw = base / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(DISK)
    table = (
        f"label: dos\nstart={FAT_START}, size={FAT_SECTORS}, type=c\nstart={EXT_START}, type=83\n"
    )
    sh(["sfdisk", "-q", "--", str(raw)], table.encode())
    sh(
        [
            "mkfs.vfat",
            "-n",
            "VMOBOOT",
            "--offset",
            str(FAT_START),
            "--",
            str(raw),
            str(FAT_SECTORS // 2),
        ]
    )
    (base / "syslinux.cfg").write_text("DEFAULT linux\n")
    sh(
        [
            "mcopy",
            "-i",
            f"{raw}@@{FAT_START * 512}",
            "--",
            str(base / "syslinux.cfg"),
            "::/syslinux.cfg",
        ]
    )
    tree = base / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hosts").write_bytes(HOSTS)
    (tree / "etc" / "hosts").chmod(0o644)
    (tree / "var" / "lib" / "db").mkdir(parents=True)
    big = os.urandom(3 * MiB + 12345)  # spans chunks
    (tree / "var" / "lib" / "db" / "table.dat").write_bytes(big)
    (tree / "var" / "lib" / "db" / "secret").write_bytes(b"s3cret\n")
    (tree / "var" / "lib" / "db" / "secret").chmod(0o600)
    os.symlink("../../etc/hosts", tree / "var" / "lib" / "hosts-link")
    ext_blocks = (DISK - EXT_START * 512) // 1024
    sh(["mke2fs", "-q", "-t", "ext4", "-L", "rootfs", "-b", "1024", "-d", str(tree),
        "-E", f"offset={EXT_START * 512}", "--", str(raw), str(ext_blocks)])  # fmt: skip
    repo = run(Repository.init(local_store(base / "repo"), chunk_size=MiB))

    async def store() -> BackupRef:
        source = FileSource(raw)
        index, _ = await backup_disk(repo, "root", source)
        source.close()
        ref = BackupRef(NS, "vm1", new_backup_id())
        await repo.write_manifest(Manifest(ref, created="2026-12-03T00:00:00Z", kind="Full",
                                           disks=[index], parent=None))  # fmt: skip
        return ref

    ref = run(store())
    return {"base": base, "raw": raw, "repo": repo, "ref": ref, "big": big}


def args(ref: BackupRef, **kw: Any) -> argparse.Namespace:
    defaults = {"backup": ref.id, "disk": "", "partition": None, "path": "", "force": False}
    return argparse.Namespace(**{**defaults, **kw})


def test_partitions_and_filesystems_are_found(image: dict[str, Any]) -> None:
    repo: Repository = image["repo"]

    async def go() -> list[Any]:
        m = await repo.read_manifest(image["ref"])
        files = BackupFiles(repo, m.disks[0])
        return await files.run(
            lambda vols: [(v.number, v.offset, v.fstype, v.fs and v.fs.label) for v in vols]
        )

    found = run(go())
    assert found == [(1, FAT_START * 512, "fat", "VMOBOOT"), (2, EXT_START * 512, "ext4", "rootfs")]


def test_a_file_is_read_from_a_few_chunks_and_matches(image: dict[str, Any], capsys: Any) -> None:
    repo: Repository = image["repo"]
    out = image["base"] / "out-hosts"
    assert (
        run(cli.cmd_extract(repo, args(image["ref"], paths=["/etc/hosts"], output=str(out)), NS))
        == 0
    )
    assert out.read_bytes() == HOSTS
    assert out.stat().st_mode & 0o777 == 0o644
    printed = capsys.readouterr().out
    fetched = int(printed.split("reading ")[1].split(" of ")[0])
    assert 0 < fetched <= 8, printed  # of 64 chunks: the disk was not restored
    # the partition's listing, through the CLI's own table
    assert run(cli.cmd_files(repo, args(image["ref"], path="/var/lib/db"), NS)) == 0
    listing = capsys.readouterr().out
    assert "table.dat" in listing and "-rw-------" in listing and "secret" in listing


def test_a_directory_is_extracted_whole_with_modes_and_links(
    image: dict[str, Any], capsys: Any
) -> None:
    repo: Repository = image["repo"]
    dest = image["base"] / "restored"
    dest.mkdir()
    a = args(image["ref"], paths=["/var/lib"], output=str(dest), partition=2)
    assert run(cli.cmd_extract(repo, a, NS)) == 0
    got = dest / "lib" / "db" / "table.dat"
    assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(image["big"]).digest()
    assert (dest / "lib" / "db" / "secret").stat().st_mode & 0o777 == 0o600
    assert os.readlink(dest / "lib" / "hosts-link") == "../../etc/hosts"
    # a second extract refuses to overwrite, and --force does
    with pytest.raises(FileRestoreError, match="exists: pass --force"):
        run(cli.cmd_extract(repo, a, NS))
    a.force = True
    assert run(cli.cmd_extract(repo, a, NS)) == 0
    # a link extracted before never carries later files out of the destination
    outside = image["base"] / "outside"
    outside.mkdir()
    (dest / "lib" / "db").rename(dest / "lib" / "db-moved")
    os.symlink(outside, dest / "lib" / "db")
    with pytest.raises(FileRestoreError, match="is a symbolic link, not a directory"):
        run(cli.cmd_extract(repo, a, NS))
    assert list(outside.iterdir()) == []
    (dest / "lib" / "db").unlink()
    (dest / "lib" / "db-moved").rename(dest / "lib" / "db")
    # the FAT partition's file, by partition number
    fat = args(image["ref"], paths=["/syslinux.cfg"], output=str(dest), partition=1)
    assert run(cli.cmd_extract(repo, fat, NS)) == 0
    assert (dest / "syslinux.cfg").read_text() == "DEFAULT linux\n"
    # the FAT volume label is the partition's name, not a file in it
    assert run(cli.cmd_files(repo, args(image["ref"], path="/", partition=1), NS)) == 0
    assert "VMOBOOT" not in capsys.readouterr().out


def test_bad_paths_and_partitions_are_named(image: dict[str, Any]) -> None:
    repo: Repository = image["repo"]
    dest = image["base"] / "bad"
    dest.mkdir()
    with pytest.raises(FileRestoreError, match="/etc/nope: no such file or directory"):
        run(
            cli.cmd_extract(
                repo, args(image["ref"], paths=["/etc/nope"], output=str(dest), partition=2), NS
            )
        )
    with pytest.raises(FileRestoreError, match="partition 7 not found: the disk has 1, 2"):
        run(cli.cmd_files(repo, args(image["ref"], path="/", partition=7), NS))
    with pytest.raises(
        FileRestoreError, match="/etc/hosts/x: no such file or directory in partitions 1, 2"
    ):
        run(cli.cmd_files(repo, args(image["ref"], path="/etc/hosts/x"), NS))
    with pytest.raises(FileRestoreError, match="/etc/hosts: not a directory"):
        pick_listdir(image)
    assert list(dest.iterdir()) == []


def pick_listdir(image: dict[str, Any]) -> None:
    repo: Repository = image["repo"]

    async def go() -> None:
        m = await repo.read_manifest(image["ref"])
        await BackupFiles(repo, m.disks[0]).run(
            lambda vols: pick(vols, "/", 2).fs.listdir("/etc/hosts")
        )  # type: ignore[union-attr]

    run(go())


def test_a_damaged_chunk_fails_the_extract_and_leaves_no_file(image: dict[str, Any]) -> None:
    repo: Repository = image["repo"]
    m = run(repo.read_manifest(image["ref"]))
    index = m.disks[0]
    # the chunk that holds the middle of table.dat: find it by reading the file through ChunkFile
    big: bytes = image["big"]
    raw = image["raw"].read_bytes()
    at = raw.find(big[MiB : MiB + 4096])
    assert at > 0
    digest = index.digests[at // MiB]
    path = image["base"] / "repo" / Repository.chunk_key(digest)
    original = path.read_bytes()
    path.chmod(0o644)
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    dest = image["base"] / "damaged"
    dest.mkdir()
    try:
        with pytest.raises(DamagedChunk):
            run(
                cli.cmd_extract(
                    repo, args(image["ref"], paths=["/var/lib/db/table.dat"], output=str(dest)), NS
                )
            )
        assert list(dest.iterdir()) == []  # no partial file, no temporary left over
    finally:
        path.write_bytes(original)


def test_a_disk_without_a_partition_table_is_one_volume(tmp_path: Path) -> None:
    raw = tmp_path / "whole.raw"
    with raw.open("wb") as f:
        f.truncate(8 * MiB)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello").write_bytes(b"hi\n")
    sh(["mke2fs", "-q", "-t", "ext4", "-d", str(tree), "--", str(raw)])
    repo = run(Repository.init(local_store(tmp_path / "repo"), chunk_size=MiB))

    async def go() -> tuple[list[Any], bytes]:
        source = FileSource(raw)
        index, _ = await backup_disk(repo, "data", source)
        source.close()

        def read(vols: list[Any]) -> tuple[list[Any], bytes]:
            with pick(vols, "/hello", None).fs.open("/hello") as fh:
                return [(v.number, v.fstype) for v in vols], fh.read()

        return await BackupFiles(repo, index).run(read)

    assert run(go()) == ([(0, "ext4")], b"hi\n")
