"""A push backup's files into a claim's volume: an ext4 filesystem made and extended offline
(e2fsprogs), read back with debugfs; a claim holding other data, or too small, is refused and
left as it was."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from vmo.engine.storage.backup_pvc import PushTargetError, store_files

MiB = 1 << 20


def qcow2(path: Path, size: int) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    return path


def debugfs(volume: Path, command: str, tmp: Path) -> str:
    raw = tmp / "read.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(volume), str(raw)], check=True)
    out = subprocess.run(["debugfs", "-R", command, str(raw)], capture_output=True, text=True)
    return out.stdout


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_backups_go_into_an_ext4_filesystem_in_the_claim_one_directory_each(tmp_path: Path) -> None:
    claim = qcow2(tmp_path / "claim.qcow2", 64 * MiB)
    one = tmp_path / "one.bin"
    one.write_bytes(os.urandom(3 * MiB))
    two = tmp_path / "two.bin"
    two.write_bytes(os.urandom(MiB))
    store_files(claim, "b1", {"data.qcow2": one}, scratch=tmp_path, claim="ns/claim")
    store_files(claim, "b2", {"data.qcow2": two, "root.qcow2": one}, scratch=tmp_path,
                claim="ns/claim")  # fmt: skip
    assert "vmo-backups" in debugfs(claim, "stats", tmp_path)  # the label of the first push
    listing = debugfs(claim, "ls /", tmp_path)
    assert "b1" in listing and "b2" in listing  # the earlier backup stays
    for inside, src in (("/b1/data.qcow2", one), ("/b2/data.qcow2", two), ("/b2/root.qcow2", one)):
        out = tmp_path / "out"
        raw = tmp_path / "read.raw"
        subprocess.run(["debugfs", "-R", f"dump {inside} {out}", str(raw)], check=True,
                       capture_output=True)  # fmt: skip
        assert digest(out) == digest(src), inside
    assert not list(tmp_path.glob(".vmo-push-*"))


def test_a_claim_too_small_or_holding_other_data_is_refused_and_kept(tmp_path: Path) -> None:
    claim = qcow2(tmp_path / "claim.qcow2", 32 * MiB)
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 4096)
    store_files(claim, "b1", {"f": small}, scratch=tmp_path, claim="ns/claim")
    before = digest(claim)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(40 * MiB))
    with pytest.raises(PushTargetError, match=r"PVC ns/claim is too small: the backup needs \d+"):
        store_files(claim, "b2", {"f": big}, scratch=tmp_path, claim="ns/claim")
    assert digest(claim) == before
    other = qcow2(tmp_path / "other.qcow2", 16 * MiB)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 1M 64k", str(other)], check=True,
                   capture_output=True)  # fmt: skip
    kept = digest(other)
    with pytest.raises(PushTargetError, match="holds data that is not an ext4 filesystem"):
        store_files(other, "b1", {"f": small}, scratch=tmp_path, claim="ns/other")
    assert digest(other) == kept
    with pytest.raises(PushTargetError, match="already holds /b1: a backup of that name"):
        store_files(claim, "b1", {"f": small}, scratch=tmp_path, claim="ns/claim")
    assert digest(claim) == before
    with pytest.raises(PushTargetError, match="not a safe file name"):
        store_files(claim, "../x", {"f": small}, scratch=tmp_path, claim="ns/claim")
    assert not list(tmp_path.glob(".vmo-push-*"))
