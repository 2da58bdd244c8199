"""The argv of the tools the engine runs (qemu-img, genisoimage, the guest builder's tools): each
puts ``--`` before its operands, so that a file named ``-x`` or a size of ``-1`` is never read as
an option (issue 10: a negative emptyDisk capacity reached qemu-img's argv as one).

The builders are pinned as exact lists, and each is run against the real tool with operands
that start with ``-``: it works with ``--``, and the same argv without ``--`` fails, which is
what the ``--`` is there for.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from vmo.engine.cloudinit import SeedContent, write_seed
from vmo.engine.storage import qemu_img
from vmo.engine.storage.pool import Pool
from vmo.engine.storage.volumes import VolumeError, resolve_volumes
from vmo.testing.guest import GuestImage, build_disk

MIB = 1 << 20


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def without_end_of_options(argv: list[str]) -> list[str]:
    assert argv.count("--") == 1
    return [arg for arg in argv if arg != "--"]


def virtual_size(path: Path) -> int:
    out = subprocess.run(
        qemu_img.info(path, fmt="qcow2"), capture_output=True, text=True, check=True, timeout=60
    )
    return int(json.loads(out.stdout)["virtual-size"])


# --------------------------------------------------------------- the qemu-img builders, pinned


def test_create_argv() -> None:
    assert qemu_img.create("/p/a.qcow2", 2 * MIB) == [
        "qemu-img", "create", "-q", "-f", "qcow2", "--", "/p/a.qcow2", "2097152",
    ]  # fmt: skip
    assert qemu_img.create("/p/top.qcow2", 4096, backing="base.qcow2", unsafe=True) == [
        "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "base.qcow2", "-u",
        "--", "/p/top.qcow2", "4096",
    ]  # fmt: skip
    assert qemu_img.create(Path("/p/o.qcow2"), backing="/b.qcow2")[-2:] == ["--", "/p/o.qcow2"]


def test_info_map_convert_resize_rebase_argv() -> None:
    assert qemu_img.info("/p/a", fmt="qcow2") == [
        "qemu-img", "info", "--output=json", "-U", "-f", "qcow2", "--", "/p/a",
    ]  # fmt: skip
    assert qemu_img.info("/p/a", backing_chain=True) == [
        "qemu-img", "info", "--output=json", "-U", "--backing-chain", "--", "/p/a",
    ]  # fmt: skip
    assert qemu_img.map_extents("/p/a") == [
        "qemu-img", "map", "--output=json", "-U", "-f", "qcow2", "--", "/p/a",
    ]  # fmt: skip
    assert qemu_img.convert("/s", "/d", source_fmt="vmdk", target_fmt="qcow2", progress=True) == [
        "qemu-img", "convert", "-p", "-U", "-f", "vmdk", "-O", "qcow2", "--", "/s", "/d",
    ]  # fmt: skip
    assert qemu_img.resize("/p/a", 3 * MIB) == [
        "qemu-img", "resize", "-q", "-f", "qcow2", "--", "/p/a", "3145728",
    ]  # fmt: skip
    assert qemu_img.rebase("/p/c", backing="b.qcow2", backing_fmt="qcow2") == [
        "qemu-img", "rebase", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "--", "/p/c",
    ]  # fmt: skip


@pytest.mark.parametrize("size", [0, -1, -(1 << 30), True, 1.5])
def test_a_size_that_is_not_a_positive_byte_count_never_reaches_qemu_img(size: object) -> None:
    with pytest.raises(qemu_img.ImageSizeError):
        qemu_img.create("/p/a.qcow2", size)  # type: ignore[arg-type]
    with pytest.raises(qemu_img.ImageSizeError):
        qemu_img.resize("/p/a.qcow2", size)  # type: ignore[arg-type]


# --------------------------------------------------------------- the builders, run


def test_every_qemu_img_subcommand_takes_files_named_like_options(tmp_path: Path) -> None:
    steps = [
        qemu_img.create("-base.qcow2", MIB),
        qemu_img.resize("-base.qcow2", 2 * MIB),
        qemu_img.create("-top.qcow2", backing="-base.qcow2"),
        qemu_img.info("-top.qcow2", fmt="qcow2", backing_chain=True),
        qemu_img.map_extents("-top.qcow2"),
        qemu_img.convert("-top.qcow2", "-flat.raw", source_fmt="qcow2", target_fmt="raw"),
        qemu_img.rebase("-top.qcow2", backing=""),
    ]
    for argv in steps:
        done = run(argv, tmp_path)
        assert done.returncode == 0, (argv, done.stderr)
    assert (tmp_path / "-flat.raw").stat().st_size == 2 * MIB
    assert virtual_size(tmp_path / "-top.qcow2") == 2 * MIB


def test_without_the_end_of_options_qemu_img_reads_such_names_as_options(tmp_path: Path) -> None:
    """What ``--`` prevents: the same argv without it fails, and makes no file."""
    done = run(without_end_of_options(qemu_img.create("-x.qcow2", MIB)), tmp_path)
    assert done.returncode != 0 and "option" in done.stderr
    assert not (tmp_path / "-x.qcow2").exists()


async def test_the_pool_makes_volumes_through_the_builders(tmp_path: Path) -> None:
    pool = Pool(tmp_path / "pool")
    info = await pool.create_blank("default", "data", 8 * MIB)
    assert info.virtual_size == 8 * MIB and info.format == "qcow2"


async def test_a_negative_empty_disk_reaching_the_engine_is_refused_by_field(
    tmp_path: Path,
) -> None:
    """Admission refuses it; an object stored before that still gets a named refusal, not a
    qemu-img run with ``-1073741824`` among its options."""
    vmi = {
        "metadata": {"name": "vm", "namespace": "default"},
        "spec": {"volumes": [{"name": "scratch", "emptyDisk": {"capacity": "-1Gi"}}]},
    }
    workdir = tmp_path / "vm"
    with pytest.raises(VolumeError, match="above 0") as err:
        await resolve_volumes(vmi, Pool(tmp_path / "pool"), workdir=workdir)
    assert err.value.field_path == "spec.volumes[0].emptyDisk.capacity"
    assert list(workdir.iterdir()) == []


# --------------------------------------------------------------- genisoimage and the guest disk


def test_the_cloud_init_seed_is_written_with_genisoimage(tmp_path: Path) -> None:
    content = SeedContent(
        kind="nocloud",
        user_data="#cloud-config\n",
        network_data=None,
        instance_id="vm.default",
        hostname="vm",
    )
    seed = write_seed(content, tmp_path / "seed.iso")
    listing = run(["isoinfo", "-R", "-f", "-i", str(seed)], tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert {"/meta-data", "/user-data"} <= set(listing.stdout.split())


def test_the_guest_disk_builds_with_every_tool_given_its_end_of_options(tmp_path: Path) -> None:
    """sfdisk, mkfs.vfat, mcopy, syslinux and qemu-img convert, each with ``--``."""
    image = GuestImage(root=tmp_path, kernel_release="test")
    image.kernel.write_bytes(b"kernel")
    image.initramfs.write_bytes(b"initramfs")
    build_disk(image)
    # -a: syslinux's ldlinux.sys is hidden
    listing = run(["mdir", "-a", "-b", "-i", f"{image.disk_raw}@@1M", "::/"], tmp_path)
    assert listing.returncode == 0, listing.stderr
    names = {Path(line).name.lower() for line in listing.stdout.split()}
    assert {"vmlinuz", "initrd.gz", "syslinux.cfg", "ldlinux.sys"} <= names
    for disk, fmt in ((image.disk_qcow2, "qcow2"), (image.disk_vmdk, "vmdk")):
        info = json.loads(run(qemu_img.info(disk), tmp_path).stdout)
        assert info["format"] == fmt and info["virtual-size"] == image.disk_raw.stat().st_size
