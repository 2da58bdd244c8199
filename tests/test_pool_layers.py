"""The layered pool, offline, with real qemu-img: snapshots are a constant-time switch to an empty
overlay, restores and linked clones stand on snapshot layers, merges shorten chains, and the
layer directory never holds a file that no volume or snapshot needs."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest

from vmo.engine.storage.pool import (
    Pool,
    SnapshotExists,
    SnapshotNotFound,
    VolumeExists,
    VolumeNotFound,
    qcow2_header,
)

MIB = 1 << 20
GIB = 1 << 30
NS = "ns"
AA, BB, CC = 0xAA, 0xBB, 0xCC
CREATE_OVERLAY = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"]


# --- helpers ----------------------------------------------------------------------------------


def qemu_io(path: Path, command: str, *, read_only: bool = False) -> bool:
    """Runs one qemu-io command on ``path`` (a layer: relative backing names need its real
    directory); False when a pattern check failed."""
    flags = ["-r", "-U"] if read_only else []
    result = subprocess.run(
        ["qemu-io", "-f", "qcow2", *flags, "-c", command, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0 and "Pattern verification failed" not in result.stdout:
        raise AssertionError(f"qemu-io {command!r} on {path}: {result.stdout}{result.stderr}")
    return result.returncode == 0


def write(path: Path, pattern: int, offset: int = 0, length: int = MIB) -> None:
    assert qemu_io(path, f"write -P {pattern:#x} {offset} {length}")


def reads(path: Path, pattern: int, offset: int = 0, length: int = MIB) -> bool:
    return qemu_io(path, f"read -P {pattern:#x} {offset} {length}", read_only=True)


def qemu_img_info(path: Path) -> list[dict[str, object]]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    chain: list[dict[str, object]] = json.loads(out)
    return chain


def check(path: Path) -> None:
    subprocess.run(["qemu-img", "check", "-q", "-U", str(path)], check=True, timeout=60)


def assert_tidy(pool: Pool) -> None:
    """No orphan: the layer directory holds exactly the chains of the volumes and snapshots,
    and no partial file is left anywhere."""
    needed: set[Path] = set()
    for link in pool.root.glob("*.qcow2"):
        needed.update(pool.chain(link))
    for record in pool.snapshots():
        needed.update(pool.chain(pool.snapshot_path(record.namespace, record.name)))
    layers = {p for p in pool.layers_dir.iterdir() if p.name != ".lock"}
    assert layers == needed
    partials = [
        p for d in (pool.root, pool.layers_dir, pool.snapshots_dir) for p in d.glob(".part-*")
    ]
    assert partials == []


def listing(pool: Pool) -> set[str]:
    """Every file of the pool but the lock (made on first use)."""
    return {str(p.relative_to(pool.root)) for p in pool.root.rglob("*") if p.name != ".lock"}


@pytest.fixture
def pool(tmp_path: Path) -> Pool:
    return Pool(tmp_path / "pool")


async def volume_with(pool: Pool, name: str, pattern: int, size: int = 64 * MIB) -> Path:
    await pool.create_blank(NS, name, size)
    write(pool.top(NS, name), pattern)
    return pool.top(NS, name)


# --- snapshots --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [GIB, 16 * GIB])
async def test_a_snapshot_is_an_empty_overlay_whatever_the_size(pool: Pool, size: int) -> None:
    await pool.create_blank(NS, "disk", size)
    before = pool.top(NS, "disk")
    record = await pool.snapshot(NS, "disk", "snap")
    top = pool.top(NS, "disk")
    assert record.layer == before.name and pool.snapshot_path(NS, "snap") == before
    assert record.virtual_size == size and record.volume == "disk"
    assert top != before and top.parent == pool.layers_dir
    assert qcow2_header(top) == (size, before.name)  # relative, in the layer's own directory
    assert top.stat().st_blocks * 512 < MIB
    assert pool.chain(pool.path(NS, "disk")) == [top, before]
    assert (await pool.info(NS, "disk")).virtual_size == size
    assert_tidy(pool)


async def test_a_snapshot_keeps_the_old_bytes_and_the_volume_gets_the_new(pool: Pool) -> None:
    await volume_with(pool, "disk", AA)
    await pool.snapshot(NS, "disk", "snap")
    write(pool.top(NS, "disk"), BB)
    assert reads(pool.snapshot_path(NS, "snap"), AA)
    assert reads(pool.top(NS, "disk"), BB)
    assert not reads(pool.top(NS, "disk"), AA)
    check(pool.top(NS, "disk"))
    assert_tidy(pool)


async def test_the_switch_sees_the_old_and_new_tops_with_the_name_already_moved(
    pool: Pool,
) -> None:
    old = await volume_with(pool, "disk", AA)
    seen: list[tuple[Path, Path, Path]] = []

    async def switch(previous: Path, new: Path) -> None:
        seen.append((previous, new, pool.top(NS, "disk")))

    await pool.snapshot(NS, "disk", "snap", switch=switch)
    new = pool.top(NS, "disk")
    # The volume names the new top before QEMU moves onto it: a crash in between leaves a
    # volume reading through an empty overlay to what QEMU wrote, never a lost layer.
    assert seen == [(old, new, new)]
    assert not pool.has_snapshot(NS, "other")


async def test_a_failed_switch_changes_nothing(pool: Pool) -> None:
    old = await volume_with(pool, "disk", AA)
    files = listing(pool)

    async def switch(previous: Path, new: Path) -> None:
        assert new.is_file()
        raise RuntimeError("QEMU refused")

    with pytest.raises(RuntimeError, match="QEMU refused"):
        await pool.snapshot(NS, "disk", "snap", switch=switch)
    assert pool.top(NS, "disk") == old
    assert not pool.has_snapshot(NS, "snap")
    assert listing(pool) == files
    assert_tidy(pool)


async def test_snapshotting_a_missing_volume_fails_and_leaves_nothing(pool: Pool) -> None:
    await volume_with(pool, "disk", AA)
    files = listing(pool)
    with pytest.raises(VolumeNotFound):
        await pool.snapshot(NS, "missing", "snap")
    assert listing(pool) == files
    assert not pool.has_snapshot(NS, "snap")


async def test_a_duplicate_snapshot_name_is_refused(pool: Pool) -> None:
    await volume_with(pool, "disk", AA)
    await volume_with(pool, "other", BB)
    await pool.snapshot(NS, "disk", "snap")
    files, top = listing(pool), pool.top(NS, "other")
    with pytest.raises(SnapshotExists):
        await pool.snapshot(NS, "other", "snap")
    assert listing(pool) == files and pool.top(NS, "other") == top
    assert pool.snapshot_record(NS, "snap").volume == "disk"


async def test_concurrent_snapshots_of_one_name_make_exactly_one(pool: Pool) -> None:
    await volume_with(pool, "disk", AA)
    await volume_with(pool, "other", BB)
    results = await asyncio.gather(
        pool.snapshot(NS, "disk", "snap"),
        pool.snapshot(NS, "other", "snap"),
        return_exceptions=True,
    )
    assert sum(isinstance(r, SnapshotExists) for r in results) == 1
    assert len(pool.snapshots()) == 1
    assert_tidy(pool)


async def test_a_second_pool_object_sees_and_respects_the_snapshots(pool: Pool) -> None:
    await volume_with(pool, "disk", AA)
    await pool.snapshot(NS, "disk", "snap")
    again = Pool(pool.root)
    assert again.has_snapshot(NS, "snap")
    again.collect()
    assert reads(again.snapshot_path(NS, "snap"), AA)
    assert_tidy(again)


# --- restore ----------------------------------------------------------------------------------


async def test_restore_brings_the_old_bytes_back(pool: Pool) -> None:
    await volume_with(pool, "disk", AA)
    await pool.snapshot(NS, "disk", "snap")
    written = pool.top(NS, "disk")
    write(written, BB)
    info = await pool.restore(NS, "disk", "snap")
    assert info.virtual_size == 64 * MIB
    assert reads(pool.top(NS, "disk"), AA)
    assert not written.exists()  # what was written since the snapshot is gone
    write(pool.top(NS, "disk"), CC)
    assert reads(pool.snapshot_path(NS, "snap"), AA)  # restoring twice gives the same bytes
    await pool.restore(NS, "disk", "snap")
    assert reads(pool.top(NS, "disk"), AA)
    assert_tidy(pool)


async def test_restore_keeps_what_a_later_snapshot_holds(pool: Pool) -> None:
    await volume_with(pool, "disk", AA)
    await pool.snapshot(NS, "disk", "first")
    write(pool.top(NS, "disk"), BB)
    await pool.snapshot(NS, "disk", "second")
    await pool.restore(NS, "disk", "first")
    assert reads(pool.top(NS, "disk"), AA)
    assert reads(pool.snapshot_path(NS, "second"), BB)
    await pool.restore(NS, "disk", "second")
    assert reads(pool.top(NS, "disk"), BB)
    assert_tidy(pool)


async def test_restoring_a_missing_snapshot_fails_and_leaves_nothing(pool: Pool) -> None:
    await volume_with(pool, "disk", AA)
    files, top = listing(pool), pool.top(NS, "disk")
    with pytest.raises(SnapshotNotFound):
        await pool.restore(NS, "disk", "missing")
    await pool.snapshot(NS, "disk", "snap")
    files = listing(pool)
    with pytest.raises(VolumeNotFound):
        await pool.restore(NS, "missing", "snap")
    assert listing(pool) == files and reads(pool.top(NS, "disk"), AA)
    assert top != pool.top(NS, "disk")


# --- clones -----------------------------------------------------------------------------------


async def test_a_linked_clone_sees_the_snapshot_and_keeps_its_writes(pool: Pool) -> None:
    await volume_with(pool, "disk", AA)
    await pool.snapshot(NS, "disk", "snap")
    write(pool.top(NS, "disk"), BB)
    info = await pool.volume_from_snapshot(pool, (NS, "snap"), NS, "clone")
    clone = pool.top(NS, "clone")
    assert info.virtual_size == 64 * MIB and pool.record(NS, "clone").source == "snapshot:ns/snap"
    assert pool.backing_of(clone) == pool.snapshot_path(NS, "snap")
    assert reads(clone, AA)
    write(clone, CC)
    assert reads(clone, CC)
    assert reads(pool.snapshot_path(NS, "snap"), AA)
    assert reads(pool.top(NS, "disk"), BB)
    assert_tidy(pool)


async def test_a_linked_clone_can_grow(pool: Pool) -> None:
    await volume_with(pool, "disk", AA)
    await pool.snapshot(NS, "disk", "snap")
    info = await pool.volume_from_snapshot(pool, (NS, "snap"), NS, "big", min_size=128 * MIB)
    assert info.virtual_size == 128 * MIB
    write(pool.top(NS, "big"), CC, offset=100 * MIB)
    assert reads(pool.top(NS, "big"), AA) and reads(pool.top(NS, "big"), CC, offset=100 * MIB)


@pytest.mark.parametrize("other_pool", [False, True])
async def test_a_full_clone_has_no_backing_file(
    pool: Pool, tmp_path: Path, other_pool: bool
) -> None:
    await volume_with(pool, "disk", AA)
    await pool.snapshot(NS, "disk", "earlier")
    write(pool.top(NS, "disk"), BB, offset=8 * MIB)
    await pool.snapshot(NS, "disk", "snap")
    write(pool.top(NS, "disk"), CC)
    await pool.snapshot(NS, "disk", "later")  # the snapshot's layer has a chain under and over
    assert pool.backing_of(pool.snapshot_path(NS, "snap")) is not None
    target = Pool(tmp_path / "other") if other_pool else pool
    progress: list[float] = []
    info = await target.volume_from_snapshot(
        pool, (NS, "snap"), NS, "copy", full=not other_pool, progress=progress.append
    )
    copy = target.top(NS, "copy")
    assert info.virtual_size == 64 * MIB and progress[-1] == 100.0
    assert qcow2_header(copy)[1] is None and target.chain(copy) == [copy]
    assert reads(copy, AA) and reads(copy, BB, offset=8 * MIB)
    check(copy)
    assert_tidy(target)
    assert_tidy(pool)


async def test_a_clone_cannot_take_an_existing_name(pool: Pool) -> None:
    await volume_with(pool, "disk", AA)
    await pool.snapshot(NS, "disk", "snap")
    files = listing(pool)
    with pytest.raises(VolumeExists):
        await pool.volume_from_snapshot(pool, (NS, "snap"), NS, "disk")
    with pytest.raises(SnapshotNotFound):
        await pool.volume_from_snapshot(pool, (NS, "missing"), NS, "new")
    assert listing(pool) == files


# --- deleting and merging ---------------------------------------------------------------------


async def test_deleting_a_snapshot_with_one_child_merges_it_away(pool: Pool) -> None:
    await volume_with(pool, "disk", AA)
    write(pool.top(NS, "disk"), BB, offset=4 * MIB)
    await pool.snapshot(NS, "disk", "first")
    write(pool.top(NS, "disk"), CC, offset=4 * MIB)
    await pool.snapshot(NS, "disk", "second")
    first = pool.snapshot_path(NS, "first")
    assert len(pool.chain(pool.path(NS, "disk"))) == 3
    assert pool.merges() == []
    assert await pool.delete_snapshot(NS, "first") is True
    assert first.exists()  # a volume still stands on it
    assert pool.merges() == [(first, pool.snapshot_path(NS, "second"))]
    assert await pool.merge_offline() == 1
    chain = pool.chain(pool.path(NS, "disk"))
    assert len(chain) == 2 and not first.exists()
    assert qcow2_header(chain[1])[1] is None
    assert reads(chain[0], AA) and reads(chain[0], CC, offset=4 * MIB)
    assert reads(pool.snapshot_path(NS, "second"), CC, offset=4 * MIB)
    for layer in chain:
        check(layer)
    assert pool.merges() == []
    assert_tidy(pool)


async def test_a_merge_onto_a_grandparent_names_it_relatively(pool: Pool) -> None:
    await volume_with(pool, "disk", AA)
    await pool.snapshot(NS, "disk", "a")
    write(pool.top(NS, "disk"), BB, offset=2 * MIB)
    await pool.snapshot(NS, "disk", "b")
    write(pool.top(NS, "disk"), CC, offset=4 * MIB)
    await pool.delete_snapshot(NS, "b")
    assert await pool.merge_offline() == 1
    top = pool.top(NS, "disk")
    assert qcow2_header(top)[1] == pool.snapshot_path(NS, "a").name
    chain = qemu_img_info(top)
    assert [c["backing-filename"] for c in chain if "backing-filename" in c] == [
        pool.snapshot_path(NS, "a").name
    ]
    assert reads(top, AA) and reads(top, BB, offset=2 * MIB) and reads(top, CC, offset=4 * MIB)
    assert_tidy(pool)


async def test_deleting_an_unknown_snapshot_says_so(pool: Pool) -> None:
    assert await pool.delete_snapshot(NS, "missing") is False


async def test_merges_leave_chains_in_use_alone(pool: Pool) -> None:
    await volume_with(pool, "disk", AA)
    await pool.snapshot(NS, "disk", "snap")
    await pool.delete_snapshot(NS, "snap")
    assert len(pool.merges()) == 1
    top = pool.top(NS, "disk")
    assert await pool.merge_offline([top]) == 0
    assert pool.open_chains([top]) == set(pool.chain(top))
    assert len(pool.chain(top)) == 2
    assert await pool.merge_offline() == 1
    assert pool.chain(pool.top(NS, "disk")) == [pool.top(NS, "disk")]
    assert reads(pool.top(NS, "disk"), AA)
    assert_tidy(pool)


async def test_a_layer_under_a_volume_and_a_clone_outlives_both_but_the_last(pool: Pool) -> None:
    await volume_with(pool, "disk", AA)
    await pool.snapshot(NS, "disk", "snap")
    layer = pool.snapshot_path(NS, "snap")
    await pool.volume_from_snapshot(pool, (NS, "snap"), NS, "clone")
    await pool.delete_snapshot(NS, "snap")
    assert layer.exists() and pool.merges() == []  # two children: nothing to merge into
    assert await pool.merge_offline() == 0
    assert pool.delete(NS, "disk") is True
    assert layer.exists()  # the clone's base cannot go from under it
    assert reads(pool.top(NS, "clone"), AA)
    check(pool.top(NS, "clone"))
    assert_tidy(pool)
    assert pool.delete(NS, "clone") is True
    assert not layer.exists()
    assert [p.name for p in pool.layers_dir.iterdir()] == [".lock"]
    assert pool.volumes() == [] and pool.layers() == []
    assert_tidy(pool)


async def test_deleting_a_volume_keeps_its_snapshots(pool: Pool) -> None:
    await volume_with(pool, "disk", AA)
    await pool.snapshot(NS, "disk", "snap")
    write(pool.top(NS, "disk"), BB)
    pool.delete(NS, "disk")
    assert reads(pool.snapshot_path(NS, "snap"), AA)
    await pool.volume_from_snapshot(pool, (NS, "snap"), NS, "disk")
    assert reads(pool.top(NS, "disk"), AA)
    await pool.delete_snapshot(NS, "snap")
    assert await pool.merge_offline() == 1
    assert len(pool.chain(pool.top(NS, "disk"))) == 1 and reads(pool.top(NS, "disk"), AA)
    pool.delete(NS, "disk")
    assert_tidy(pool)
    assert [p.name for p in pool.layers_dir.iterdir()] == [".lock"]


async def test_the_layer_report_shows_the_graph(pool: Pool) -> None:
    await volume_with(pool, "disk", AA)
    await pool.snapshot(NS, "disk", "snap")
    await pool.volume_from_snapshot(pool, (NS, "snap"), NS, "clone")
    by_name = {layer.name: layer for layer in pool.layers()}
    base = by_name[pool.snapshot_path(NS, "snap").name]
    assert base.snapshots == ("ns/snap",) and base.volumes == () and base.backing is None
    assert set(base.children) == {pool.top(NS, "disk").name, pool.top(NS, "clone").name}
    assert by_name[pool.top(NS, "clone").name].volumes == ("ns/clone",)
    assert by_name[pool.top(NS, "clone").name].backing == base.name
    assert base.real_size >= MIB and base.virtual_size == 64 * MIB


# --- crashes and capacity ---------------------------------------------------------------------


async def test_discard_partials_sweeps_what_a_crash_left(pool: Pool) -> None:
    await volume_with(pool, "disk", AA)
    top = pool.top(NS, "disk")
    # a crash after creating a snapshot's overlay, before pointing the volume at it
    orphan = pool.new_layer_path()
    subprocess.run(
        [*CREATE_OVERLAY, top.name, "-u", str(orphan), str(64 * MIB)],
        check=True,
    )
    # ... and after writing a snapshot record's partial file, a link, a staging file
    (pool.snapshots_dir / ".part-ns--snap.json").write_text("{")
    (pool.root / ".part-link-1234abcd").symlink_to(f".layers/{top.name}")
    (pool.root / ".part-ns--x-1234abcd.qcow2").write_bytes(b"x")
    removed = pool.discard_partials()
    assert orphan in removed and len(removed) == 4
    assert pool.top(NS, "disk") == top and reads(top, AA)
    assert_tidy(pool)


async def test_a_merge_interrupted_after_the_rebase_is_finished_by_collection(
    pool: Pool,
) -> None:
    await volume_with(pool, "disk", AA)
    await pool.snapshot(NS, "disk", "snap")
    layer, top = pool.snapshot_path(NS, "snap"), pool.top(NS, "disk")
    await pool.delete_snapshot(NS, "snap")
    subprocess.run(["qemu-img", "rebase", "-q", "-f", "qcow2", "-b", "", str(top)], check=True)
    assert layer.exists()  # the crash: the merged layer was not deleted
    assert pool.collect() == [layer.name]
    assert reads(pool.top(NS, "disk"), AA)
    assert_tidy(pool)


async def test_a_volume_from_before_layering_is_layered_on_its_first_snapshot(
    pool: Pool,
) -> None:
    plain = pool.path(NS, "old")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(plain), str(64 * MIB)], check=True
    )
    write(plain, AA)
    handle = os.open(plain, os.O_RDONLY)  # a running QEMU holding the file
    try:
        await pool.snapshot(NS, "old", "snap")
        assert pool.path(NS, "old").is_symlink()
        layer = pool.snapshot_path(NS, "snap")
        assert os.fstat(handle).st_ino == layer.stat().st_ino
    finally:
        os.close(handle)
    assert reads(layer, AA) and reads(pool.top(NS, "old"), AA)
    assert_tidy(pool)


async def test_used_bytes_counts_each_layer_once(pool: Pool) -> None:
    await volume_with(pool, "disk", AA)
    write(pool.top(NS, "disk"), BB, offset=8 * MIB, length=8 * MIB)
    await pool.snapshot(NS, "disk", "snap")
    await pool.volume_from_snapshot(pool, (NS, "snap"), NS, "clone")
    files = [
        p
        for d in (pool.root, pool.layers_dir, pool.snapshots_dir)
        for p in d.iterdir()
        if not p.is_symlink() and p.is_file()
    ]
    assert pool.used_bytes() == sum(p.stat().st_blocks * 512 for p in files)
    # two volumes and a snapshot on 9 MiB of data: the data counts once
    assert 9 * MIB <= pool.used_bytes() < 12 * MIB


async def test_a_full_clone_respects_the_pool_capacity(pool: Pool, tmp_path: Path) -> None:
    await volume_with(pool, "disk", AA)
    write(pool.top(NS, "disk"), BB, offset=8 * MIB, length=8 * MIB)
    await pool.snapshot(NS, "disk", "snap")
    small = Pool(tmp_path / "small", capacity_bytes=4 * MIB)
    from vmo.engine.storage.pool import PoolFull

    with pytest.raises(PoolFull):
        await small.volume_from_snapshot(pool, (NS, "snap"), NS, "copy")
    assert small.volumes() == [] and listing(small) == {".layers", ".snapshots"}


async def test_snapshots_of_an_unwritten_top_share_one_layer_and_the_chain_stays(
    pool: Pool,
) -> None:
    """An idle golden volume cloned again and again: nothing written since the last snapshot,
    so the next snapshot is the same layer and the volume's chain does not grow."""
    await volume_with(pool, "golden", AA)
    first = await pool.snapshot(NS, "golden", "s1")
    chain = pool.chain(pool.path(NS, "golden"))
    for index in range(2, 6):
        record = await pool.snapshot(NS, "golden", f"s{index}")
        assert record.layer == first.layer
        await pool.volume_from_snapshot(pool, (NS, f"s{index}"), NS, f"clone{index}")
        assert reads(pool.top(NS, f"clone{index}"), AA)
    assert pool.chain(pool.path(NS, "golden")) == chain
    # an explicit zero write is data of the top's own: the next snapshot freezes it
    assert qemu_io(pool.top(NS, "golden"), "write -z 0 64k")
    record = await pool.snapshot(NS, "golden", "s6")
    assert record.layer != first.layer
    assert len(pool.chain(pool.path(NS, "golden"))) == len(chain) + 1
    for index in range(1, 6):
        await pool.delete_snapshot(NS, f"s{index}")
    assert reads(pool.top(NS, "clone3"), AA)
    assert_tidy(pool)
