"""``vmo backup ls|show|verify|prune|restore``: a BackupRepository's backups, as the policy
controller stores them, read through the repository's own spec and Secrets (so the same
credentials and encryption key apply). Local-directory repositories are found under the backup
root the controllers use (``--backup-root``, else ``$VMO_BACKUP_ROOT``, else VMO's home's ``backups``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import stat
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from vmo.client import ApiStatusError, Client, Credentials
from vmo.controllers.backup.codec import WrongKey
from vmo.controllers.backup.disk import FileTarget, restore_disk
from vmo.controllers.backup.files import (
    BackupFiles,
    Entry,
    FileRestoreError,
    Filesystem,
    Volume,
    pick,
    walk,
)
from vmo.controllers.backup.policy import BackupPolicyController, default_backup_root
from vmo.controllers.backup.repository import BackupRef, DiskIndex, Repository, RepositoryError
from vmo.controllers.backup.restore import BACKUP_RESTORE
from vmo.controllers.backup.retention import Retention, kept


def _root(args: argparse.Namespace) -> Path:
    return Path(args.backup_root) if args.backup_root else default_backup_root()


async def _open(client: Client, args: argparse.Namespace, namespace: str) -> Repository:
    return await BackupPolicyController(client, _root(args)).open_repository(
        namespace, args.repository
    )


def _console() -> Console:
    """Rich's console; wide when not a terminal, so that ids are never cut short in a pipe."""
    return Console(width=None if sys.stdout.isatty() else 200)


def _find(refs: list[BackupRef], wanted: str) -> BackupRef:
    matches = [r for r in refs if r.id == wanted or r.id.startswith(wanted)]
    if len(matches) != 1:
        raise RepositoryError(
            f"backup {wanted!r} {'is ambiguous' if matches else 'not found'} in the repository"
        )
    return matches[0]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


async def cmd_ls(repo: Repository, args: argparse.Namespace, namespace: str) -> int:
    refs = await repo.backups(namespace, args.vm or None)
    table = Table("VM", "BACKUP", "TYPE", "RECOVERY POINT", "DISKS", "SIZE")
    for ref in refs:
        m = await repo.read_manifest(ref)
        size = sum(d.size for d in m.disks)
        table.add_row(ref.vm, ref.id, m.kind, m.created, str(len(m.disks)), _human(size))
    _console().print(table)
    return 0


async def cmd_show(repo: Repository, args: argparse.Namespace, namespace: str) -> int:
    ref = _find(await repo.backups(namespace), args.backup)
    m = await repo.read_manifest(ref)
    console = _console()
    console.print(f"backup {ref}: {m.kind}, recovery point {m.created}")
    if m.parent:
        console.print(f"  parent {m.parent}")
    if m.stats.get("checkpoint"):
        console.print(f"  checkpoint {m.stats['checkpoint']}")
    for d in m.disks:
        chunks = d.chunks()
        console.print(
            f"  disk {d.name}: {_human(d.size)}, {len(d.digests)} chunks of {_human(d.chunk_size)}, "
            f"{len(d.digests) - sum(1 for x in d.digests if x == bytes(32))} with data, "
            f"{len(chunks)} distinct"
        )
    for obj in m.objects:
        console.print(f"  object {obj.get('kind')} {obj.get('metadata', {}).get('name')}")
    return 0


async def cmd_verify(repo: Repository, args: argparse.Namespace, namespace: str) -> int:
    refs = await repo.backups(namespace)
    if args.backup:
        refs = [_find(refs, args.backup)]
    columns = (TextColumn("verify"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("verify", total=None)
        report = await repo.verify(
            refs, progress=lambda done, total: bar.update(task, completed=done, total=total)
        )
    console = _console()
    console.print(
        f"verified {report.chunks} chunks ({_human(report.bytes)}) of {len(refs)} backups"
    )
    for digest, why in sorted(report.damaged.items()):
        console.print(f"[red]damaged chunk {digest}: {why}[/red]")
    for backup, chunks in sorted(report.backups.items()):
        console.print(f"[red]backup {backup} needs {len(chunks)} damaged chunks[/red]")
    return 0 if report.ok else 1


async def cmd_prune(repo: Repository, args: argparse.Namespace, namespace: str) -> int:
    retention = Retention(args.keep_last, args.keep_hourly, args.keep_daily, args.keep_weekly,
                          args.keep_monthly)  # fmt: skip
    if retention.keeps_all:
        raise RepositoryError("give at least one --keep-* rule: without one nothing is pruned")
    refs = await repo.backups(namespace, args.vm or None)
    forgotten = 0
    for vm in sorted({r.vm for r in refs}):
        mine = [r for r in refs if r.vm == vm]
        keep = kept([(r.id, r.created) for r in mine], retention)
        for ref in mine:
            if ref.id not in keep:
                if not args.dry_run:
                    await repo.delete_backup(ref)
                forgotten += 1
                print(f"{'would forget' if args.dry_run else 'forgot'} {ref}")
    if args.dry_run:
        return 0
    report = await repo.gc(grace=timedelta(seconds=args.grace))
    print(f"forgot {forgotten} backups; freed {report.removed} chunks ({_human(report.freed)})")
    return 0


def _percent(text: Any) -> float:
    """CDI's progress ("12.34%", or "N/A" before it knows) as a number."""
    try:
        return float(str(text or "0").rstrip("%"))
    except ValueError:
        return 0.0


async def _restore_to_vm(
    client: Client, ref: BackupRef, args: argparse.Namespace, namespace: str
) -> int:
    """Creates a BackupRestore and follows it to its end, with a bar per disk."""
    name = args.name or f"{args.to_vm or ref.vm}-{ref.id[:15].lower().replace('t', '')}"[:63]
    spec: dict[str, Any] = {"repository": args.repository, "backup": ref.id}
    if args.to_vm or args.to_namespace:
        spec["target"] = {k: v for k, v in (("name", args.to_vm),
                                            ("namespace", args.to_namespace)) if v}  # fmt: skip
    if args.disk:
        spec["volumes"] = [args.disk]
    if args.volumes_only:
        spec["volumesOnly"] = True
    if args.new_macs:
        spec["macAddressPolicy"] = "Generate"
    if args.run_strategy:
        spec["runStrategy"] = args.run_strategy
    body = {"metadata": {"name": name, "namespace": namespace}, "spec": spec}
    await client.create(BACKUP_RESTORE, body, namespace)
    print(f"backuprestore {namespace}/{name} created")
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[phase]}"))
    tasks: dict[str, Any] = {}
    with Progress(*columns, transient=not sys.stdout.isatty()) as progress:
        while True:
            found = await client.get(BACKUP_RESTORE, name, namespace)
            status = found.get("status") or {}
            for row in status.get("volumes") or []:
                if row["name"] not in tasks:
                    tasks[row["name"]] = progress.add_task(row["name"], total=100.0, phase="")
                done = 100.0 if row.get("phase") == "Succeeded" else _percent(row.get("progress"))
                progress.update(tasks[row["name"]], completed=done, phase=row.get("phase", ""))
            if status.get("phase") in ("Succeeded", "Failed"):
                break
            await asyncio.sleep(1.0)
    conds = {c.get("type"): c for c in status.get("conditions") or []}
    if status["phase"] == "Failed":
        print(f"error: restore failed: {conds.get('Failed', {}).get('message', '')}",
              file=sys.stderr)  # fmt: skip
        return 1
    where = f"{status.get('targetNamespace')}/{status.get('targetName')}"
    for row in status.get("volumes") or []:
        was = f" (was {row['replaced']})" if row.get("replaced") else ""
        print(f"restored {row['name']} into DataVolume {row['dataVolume']}{was}")
    print(f"restore of {ref} into {where}: done")
    return 0


async def cmd_restore(repo: Repository, args: argparse.Namespace, namespace: str) -> int:
    ref = _find(await repo.backups(namespace), args.backup)
    if not args.output:
        if args.client is None:
            raise RepositoryError("--output FILE, or a VM to restore into (--to-vm)")
        return await _restore_to_vm(args.client, ref, args, namespace)
    index = await _disk_of(repo, args, namespace)
    out = Path(args.output)
    if out.exists() and not args.force:
        raise RepositoryError(f"{out} exists: pass --force to overwrite it")
    target = FileTarget(out, index.size, fresh=True)
    columns = (TextColumn(f"{index.name}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    try:
        with Progress(*columns, transient=not sys.stdout.isatty()) as progress:
            task = progress.add_task("restore", total=index.size)
            stats = await restore_disk(
                repo, index, target, progress=lambda n: progress.advance(task, n)
            )
    except BaseException:
        target.close()
        out.unlink(missing_ok=True)  # never a half-restored disk under its name
        raise
    target.close()
    print(f"restored {index.name} of {ref} to {out}: {_human(index.size)} in {stats.seconds:.1f}s")
    return 0


async def _disk_of(repo: Repository, args: argparse.Namespace, namespace: str) -> DiskIndex:
    ref = _find(await repo.backups(namespace), args.backup)
    m = await repo.read_manifest(ref)
    index = m.disk(args.disk) if args.disk else (m.disks[0] if len(m.disks) == 1 else None)
    if index is None:
        names = ", ".join(d.name for d in m.disks)
        raise RepositoryError(f"--disk is needed (or unknown): the backup has {names}")
    return index


def _mode(entry: Entry) -> str:
    kind = {"dir": "d", "link": "l", "file": "-"}.get(entry.kind, "?")
    if entry.mode is None:
        return kind + "?????????"
    return kind + stat.filemode(entry.mode)[1:]


async def cmd_files(repo: Repository, args: argparse.Namespace, namespace: str) -> int:
    """Without a path, the disk's partitions and filesystems; with one, a directory listing."""
    index = await _disk_of(repo, args, namespace)
    files = BackupFiles(repo, index)
    console = _console()
    if not args.path:
        vols = await files.run(lambda vols: vols)
        table = Table("PARTITION", "OFFSET", "SIZE", "FILESYSTEM", "LABEL")
        for v in vols:
            label = v.fs.label if v.fs is not None else ""
            table.add_row(str(v.number), str(v.offset), _human(v.size), v.fstype, label)
        console.print(table)
        return 0

    def listing(vols: list[Volume]) -> list[Entry]:
        vol = pick(vols, args.path, args.partition)
        assert vol.fs is not None
        top = vol.fs.stat(args.path)
        return vol.fs.listdir(args.path) if top.kind == "dir" else [top]

    entries = await files.run(listing)
    table = Table("MODE", "SIZE", "MODIFIED", "NAME", box=None)
    for e in entries:
        when = e.mtime.strftime("%Y-%m-%d %H:%M") if e.mtime else ""
        name = f"{e.name} -> {e.target}" if e.target else e.name
        table.add_row(_mode(e), str(e.size), when, name)
    console.print(table)
    return 0


def _inside(path: Path, root: Path) -> None:
    """Refuses ``path`` when its directory, symbolic links resolved, is not under ``root``: a
    link already there (or one extracted before) must not carry files elsewhere."""
    real, top = path.parent.resolve(), root.resolve()
    if real != top and top not in real.parents:
        raise FileRestoreError(f"{path}: its directory leads outside {root} through a link")


def _copy_out(
    fs: Filesystem, source: str, dest: Path, *, force: bool, root: Path
) -> tuple[int, int]:
    """Writes ``source`` (a file, or a directory and all under it) to ``dest``; returns files and
    bytes. Nothing is written outside ``root`` (links resolved); a file appears under its name
    only whole."""
    files = written = 0
    base = PurePosixPath(source)
    for path, entry in walk(fs, source):
        rel = PurePosixPath(path).relative_to(base)
        if any(part in ("..", "") for part in rel.parts):
            continue
        out = dest.joinpath(*rel.parts) if rel.parts else dest
        _inside(out, root)
        if entry.kind == "dir":
            if out.is_symlink():
                raise FileRestoreError(f"{out} is a symbolic link, not a directory")
            out.mkdir(parents=True, exist_ok=True)
            continue
        if out.exists() or out.is_symlink():
            if not force:
                raise FileRestoreError(f"{out} exists: pass --force to overwrite it")
            if out.is_dir() and not out.is_symlink():
                raise FileRestoreError(f"{out} is a directory")
            out.unlink()
        if entry.kind == "link":
            os.symlink(entry.target, out)
            continue
        if entry.kind != "file":
            continue
        tmp = out.with_name(f".{out.name}.vmo-restore")
        try:
            with fs.open(path) as src, tmp.open("xb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
                    written += len(block)
            if entry.mode is not None:
                tmp.chmod(entry.mode & 0o777)
            tmp.replace(out)
        finally:
            tmp.unlink(missing_ok=True)
        files += 1
    return files, written


async def cmd_extract(repo: Repository, args: argparse.Namespace, namespace: str) -> int:
    """Copies files out of a backed-up disk, reading only the chunks they are in."""
    index = await _disk_of(repo, args, namespace)
    files = BackupFiles(repo, index)
    to_stdout = args.output == "-"

    def extract(vols: list[Volume]) -> tuple[int, int]:
        total_files = total_bytes = 0
        for path in args.paths:
            vol = pick(vols, path, args.partition)
            assert vol.fs is not None
            if to_stdout:
                with vol.fs.open(path) as src:
                    while block := src.read(1 << 20):
                        sys.stdout.buffer.write(block)
                        total_bytes += len(block)
                sys.stdout.buffer.flush()
                total_files += 1
                continue
            dest = Path(args.output)
            root = dest if dest.is_dir() else dest.parent
            if dest.is_dir():
                dest = dest / (PurePosixPath(path).name or f"partition-{vol.number}")
            n, b = _copy_out(vol.fs, path, dest, force=args.force, root=root)
            total_files, total_bytes = total_files + n, total_bytes + b
        return total_files, total_bytes

    n, b = await files.run(extract)
    if not to_stdout:
        fetched = files.file.fetched if files.file else 0
        print(
            f"extracted {n} files ({_human(b)}) from disk {index.name}, reading {fetched} of "
            f"{len(index.digests)} chunks"
        )
    return 0


COMMANDS = {"ls": cmd_ls, "show": cmd_show, "verify": cmd_verify, "prune": cmd_prune,
            "restore": cmd_restore, "files": cmd_files, "extract": cmd_extract}  # fmt: skip


def add_backup_commands(
    sub: Any,
    creds_of: Callable[[argparse.Namespace], Credentials],
    namespace_of: Callable[[argparse.Namespace, Credentials], str],
) -> None:
    backup = sub.add_parser("backup", help="backups in a BackupRepository")
    verbs = backup.add_subparsers(dest="backup_command", required=True)

    def common(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument("-n", "--namespace", default="")
        cmd.add_argument("--kubeconfig", default="")
        cmd.add_argument("--repository", required=True, help="the BackupRepository's name")
        cmd.add_argument("--backup-root", default="", help="where local repositories live")

    ls = verbs.add_parser("ls", help="list backups")
    common(ls)
    ls.add_argument("vm", nargs="?", default="")
    show = verbs.add_parser("show", help="one backup: disks, chunks, objects")
    common(show)
    show.add_argument("backup", help="the backup's id (or a unique prefix)")
    verify = verbs.add_parser("verify", help="re-read and re-hash every chunk backups need")
    common(verify)
    verify.add_argument("backup", nargs="?", default="")
    prune = verbs.add_parser("prune", help="forget backups by retention rules, then free chunks")
    common(prune)
    prune.add_argument("vm", nargs="?", default="")
    for rule in ("last", "hourly", "daily", "weekly", "monthly"):
        prune.add_argument(f"--keep-{rule}", type=int, default=0)
    prune.add_argument("--dry-run", action="store_true")
    prune.add_argument("--grace", type=float, default=3600.0,
                       help="seconds an unreferenced chunk is kept (an upload in flight)")  # fmt: skip
    restore = verbs.add_parser(
        "restore",
        help="restore a backup into a VM (its own, stopped, or a new one), or a disk to a file",
    )
    common(restore)
    restore.add_argument("backup")
    restore.add_argument("--disk", default="", help="only this disk")
    restore.add_argument("--output", default="", help="write the disk to this raw image file")
    restore.add_argument("--force", action="store_true")
    restore.add_argument("--to-vm", default="", help="the target VM (default: the backed-up one)")
    restore.add_argument("--to-namespace", default="", help="the target VM's namespace")
    restore.add_argument("--name", default="", help="the BackupRestore's name")
    restore.add_argument("--new-macs", action="store_true", help="new MACs for every interface")
    restore.add_argument("--volumes-only", action="store_true", help="DataVolumes only, no VM")
    restore.add_argument("--run-strategy", default="", help="the new VM's (default: Halted)")
    files = verbs.add_parser(
        "files", help="a backed-up disk's partitions, or a directory in it, read in place"
    )
    common(files)
    files.add_argument("backup")
    files.add_argument("path", nargs="?", default="", help="a path in the guest's filesystem")
    files.add_argument("--disk", default="")
    files.add_argument("--partition", type=int, default=None)
    extract = verbs.add_parser("extract", help="copy files out of a backup, no disk restored")
    common(extract)
    extract.add_argument("backup")
    extract.add_argument("paths", nargs="+", help="files or directories in the guest")
    extract.add_argument("--disk", default="")
    extract.add_argument("--partition", type=int, default=None)
    extract.add_argument("--output", required=True, help="a directory or file, or - for stdout")
    extract.add_argument("--force", action="store_true")

    def command(args: argparse.Namespace) -> int:
        creds = creds_of(args)
        namespace = namespace_of(args, creds)

        async def go() -> int:
            async with Client(creds) as client:
                args.client = client
                repo = await _open(client, args, namespace)
                return await COMMANDS[args.backup_command](repo, args, namespace)

        try:
            return asyncio.run(go())
        except (RepositoryError, WrongKey, ApiStatusError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    backup.set_defaults(func=command)


__all__ = ["add_backup_commands"]
