"""QEMU processes that outlive the agent: launch one into its working directory, or adopt it again.

A launched QEMU runs in its own session with stdin from /dev/null and stdout/stderr appended to
``<workdir>/qemu.log``; the argv, the pid and the kernel's start time of the process are recorded
in ``<workdir>/qemu.argv.json`` so that a restarted agent can prove (pid + start time, or pidfile +
/proc/<pid>/cmdline for older records, then a QMP answer) that a process is that VM's QEMU, and can
tell "gone" from "does not answer". Processes are tracked through a pidfd, so a recycled pid can
never be signalled by mistake.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import select
import shutil
import signal
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from vmo.engine.qemu.argv import DEFAULT_QEMU, qemu_argv, storage_argv
from vmo.engine.qemu.domain import Disk, Domain, RuntimePaths
from vmo.engine.qemu.errors import (
    LaunchError,
    ProcessError,
    ProtocolError,
    QMPConnectionLost,
    QMPTimeout,
    WorkdirEscape,
)
from vmo.engine.qemu.qmp import QMPClient, Runstate

__all__ = [
    "LOG_NAME",
    "MANIFEST_NAME",
    "ExitStatus",
    "ProcessIdentity",
    "QemuProcess",
    "adopt",
    "find",
    "launch",
    "launch_storage",
]

log = logging.getLogger("vmo.engine.qemu.process")

LOG_NAME = "qemu.log"
MANIFEST_NAME = "qemu.argv.json"
_STARTUP_POLL = 0.01
_TAIL_BYTES = 64 << 10
_TERMINATING = re.compile(rb"terminating on signal (\d+)")
# /proc/<pid>/stat states of a process that has exited: its exit status only waits for its parent
# (which, for a QEMU an earlier agent started, is init and not us)
_EXITED_STATES = frozenset("ZX")
_STAT_START_TIME = 19  # field 22 of /proc/<pid>/stat, counted after the ")" closing field 2


@dataclass(frozen=True)
class ExitStatus:
    """How QEMU ended. ``code``/``signal`` are known only to the agent that started it."""

    code: int | None
    signal: int | None
    shutdown_reason: str | None = None
    """The reason of QEMU's last SHUTDOWN event (e.g. ``guest-shutdown``), if one was seen."""


def _confine(path: Path, workdir: Path) -> Path:
    resolved = path.resolve()
    if not resolved.is_relative_to(workdir):
        raise WorkdirEscape(f"{path} is outside the working directory {workdir}")
    return resolved


def _confine_domain(domain: Domain, workdir: Path) -> None:
    for path in domain.paths.all():
        _confine(path, workdir)
    if domain.efi is not None:
        _confine(domain.efi.vars, workdir)


def _unlink_runtime_files(paths: RuntimePaths) -> None:
    for path in paths.all():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [arg.decode(errors="surrogateescape") for arg in raw.split(b"\0")[:-1]]


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks after boot) of ``pid``, or None when there is no such pid."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()  # the command name (field 2) may hold spaces and ")"
    return fields[0], int(fields[_STAT_START_TIME])


@dataclass(frozen=True)
class ProcessIdentity:
    """One process as the kernel knows it: its pid and start time, which a recycled pid never
    shares. ``running()`` asks /proc about that very process, not merely whether the pid exists."""

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        stat = _proc_stat(pid)
        return None if stat is None else cls(pid, stat[1])

    def running(self) -> bool:
        """False once this process has exited (gone, a zombie, or its pid now someone else's)."""
        stat = _proc_stat(self.pid)
        return stat is not None and stat[1] == self.start_time and stat[0] not in _EXITED_STATES


def _runs_argv(pid: int, argv: list[str]) -> bool:
    """Whether ``pid`` runs exactly ``argv`` (argv[0] compared by name: PATH lookup may differ)."""
    actual = _cmdline(pid)
    if not actual or len(actual) != len(argv):
        return False
    return Path(actual[0]).name == Path(argv[0]).name and actual[1:] == argv[1:]


@dataclass(frozen=True)
class _Manifest:
    argv: list[str]
    paths: RuntimePaths
    log_offset: int
    identity: ProcessIdentity | None = None  # recorded once QEMU is spawned

    def write(self, workdir: Path) -> None:
        body: dict[str, object] = {
            "argv": self.argv,
            "paths": {name: str(getattr(self.paths, name)) for name in _PATH_FIELDS},
            "logOffset": self.log_offset,
        }
        if self.identity is not None:
            body |= {"pid": self.identity.pid, "startTime": self.identity.start_time}
        tmp = workdir / (MANIFEST_NAME + ".tmp")
        tmp.write_text(json.dumps(body, indent=2) + "\n")
        tmp.replace(workdir / MANIFEST_NAME)

    @classmethod
    def read(cls, workdir: Path) -> _Manifest | None:
        try:
            body = json.loads((workdir / MANIFEST_NAME).read_text())
            paths = RuntimePaths(**{name: Path(body["paths"][name]) for name in _PATH_FIELDS})
            identity = (
                ProcessIdentity(int(body["pid"]), int(body["startTime"]))
                if "startTime" in body
                else None
            )
            argv = [str(arg) for arg in body["argv"]]
            return cls(argv, paths, int(body["logOffset"]), identity)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def runs(self, pid: int) -> bool:
        """Whether ``pid`` is this record's QEMU and has not exited. With a recorded start time
        that is the kernel's word (a QEMU busy exiting, whose cmdline is already empty, still
        runs); older records fall back to comparing the command line."""
        if self.identity is not None:
            return self.identity.pid == pid and self.identity.running()
        stat = _proc_stat(pid)
        return stat is not None and stat[0] not in _EXITED_STATES and _runs_argv(pid, self.argv)

    def pid(self) -> int | None:
        return self.identity.pid if self.identity is not None else _read_pid(self.paths.pidfile)


_PATH_FIELDS = ("qmp", "serial", "vnc", "guest_agent", "pidfile")


class QemuProcess:
    """A running QEMU (launched here or adopted), its QMP connection and its exit."""

    def __init__(self, *, pid: int, pidfd: int, workdir: Path, manifest: _Manifest) -> None:
        self.pid = pid
        self.workdir = workdir
        self._pidfd: int | None = pidfd
        self._manifest = manifest
        self._qmp: QMPClient | None = None
        self._shutdown_watch: asyncio.Task[None] | None = None
        self._shutdown_reason: str | None = None
        self._exit: asyncio.Future[ExitStatus] | None = None
        self._status: ExitStatus | None = None

    @property
    def paths(self) -> RuntimePaths:
        return self._manifest.paths

    @property
    def argv(self) -> list[str]:
        return list(self._manifest.argv)

    @property
    def identity(self) -> ProcessIdentity | None:
        """pid and start time, as recorded at launch (None for a record older than that)."""
        return self._manifest.identity

    @property
    def exit_status(self) -> ExitStatus | None:
        """None while QEMU runs; checked without blocking."""
        if self._status is None and self._has_exited():
            self._finish()
        return self._status

    async def qmp(self) -> QMPClient:
        """This process's QMP client, connected (again) if need be."""
        if self._qmp is not None and self._qmp.runstate is Runstate.RUNNING:
            return self._qmp
        await self._drop_qmp()
        if self._status is not None:
            raise QMPConnectionLost(f"QEMU {self.pid} has exited")
        self._qmp = await QMPClient.connect(self.paths.qmp)
        self._shutdown_watch = asyncio.create_task(self._watch_shutdown(self._qmp))
        return self._qmp

    async def _watch_shutdown(self, client: QMPClient) -> None:
        with client.listen("SHUTDOWN") as listener:
            async for event in listener:
                self._shutdown_reason = (event.get("data") or {}).get("reason")

    async def _drop_qmp(self) -> None:
        if self._shutdown_watch is not None:
            self._shutdown_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._shutdown_watch
            self._shutdown_watch = None
        if self._qmp is not None:
            await self._qmp.disconnect()
            self._qmp = None

    def _exit_future(self) -> asyncio.Future[ExitStatus]:
        if self._exit is None:
            loop = asyncio.get_running_loop()
            self._exit = loop.create_future()
            if self._status is not None:
                self._exit.set_result(self._status)
            elif self._pidfd is not None:
                loop.add_reader(self._pidfd, self._finish)
        return self._exit

    def _has_exited(self) -> bool:
        if self._pidfd is None:
            return self._status is not None
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return bool(poller.poll(0))

    def _finish(self) -> None:
        """Collects the exit once the pidfd is readable; idempotent."""
        if self._status is not None or self._pidfd is None:
            return
        if self._exit is not None:
            self._exit.get_loop().remove_reader(self._pidfd)
        self._status = self._reap()
        os.close(self._pidfd)
        self._pidfd = None
        _unlink_runtime_files(self.paths)
        log.info("QEMU %d (%s) exited: %s", self.pid, self.workdir, self._status)
        if self._exit is not None and not self._exit.done():
            self._exit.set_result(self._status)

    def _reap(self) -> ExitStatus:
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            # Started by an earlier agent: the exit code went to init; the log may name a signal.
            return ExitStatus(None, self._signal_from_log(), self._shutdown_reason)
        if os.WIFSIGNALED(status):
            return ExitStatus(None, os.WTERMSIG(status), self._shutdown_reason)
        return ExitStatus(os.WEXITSTATUS(status), self._signal_from_log(), self._shutdown_reason)

    def _signal_from_log(self) -> int | None:
        found = _TERMINATING.findall(self._log_tail())
        return int(found[-1]) if found else None

    async def wait_exit(self, timeout: float | None = None) -> ExitStatus:
        """QEMU's exit status, once it has exited; ``TimeoutError`` if it runs past ``timeout``."""
        status = await asyncio.wait_for(asyncio.shield(self._exit_future()), timeout)
        await self._drop_qmp()
        return status

    def send_signal(self, signum: int) -> None:
        if self._pidfd is not None and self._status is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signum)

    async def kill(self) -> ExitStatus:
        """SIGKILL, then the exit status."""
        self._exit_future()
        self.send_signal(signal.SIGKILL)
        return await self.wait_exit()

    async def powerdown(self, grace: float, *, term_timeout: float = 5.0) -> ExitStatus:
        """ACPI power button; after ``grace`` seconds SIGTERM, after ``term_timeout`` more SIGKILL.

        A QEMU whose monitor does not answer never saw the button: it gets SIGTERM at once."""
        self._exit_future()
        pressed = self._status is not None
        if self._status is None:
            try:
                await (await self.qmp()).execute("system_powerdown")
                pressed = True
            except ProtocolError as exc:
                log.warning("QEMU %d: system_powerdown failed, escalating: %s", self.pid, exc)
        first = grace if pressed else 0.0
        for timeout, next_signal in ((first, signal.SIGTERM), (term_timeout, signal.SIGKILL)):
            try:
                return await self.wait_exit(timeout)
            except TimeoutError:
                log.info("QEMU %d still running; sending %s", self.pid, next_signal.name)
                self.send_signal(next_signal)
        return await self.wait_exit()

    async def quit(self, timeout: float = 10.0) -> ExitStatus:
        """QMP ``quit``: QEMU closes its images cleanly (storing persistent bitmaps) and exits;
        SIGKILL if it does not answer or has not exited after ``timeout`` seconds."""
        self._exit_future()
        if self._status is None:
            try:
                await asyncio.wait_for((await self.qmp()).execute("quit"), timeout)
            except (ProtocolError, TimeoutError) as exc:
                # the monitor closing as QEMU exits may interrupt the answer
                log.info("QEMU %d: quit: %s", self.pid, exc)
        try:
            return await self.wait_exit(timeout)
        except TimeoutError:
            log.warning("QEMU %d did not quit within %g s; killing it", self.pid, timeout)
            return await self.kill()

    def _log_tail(self) -> bytes:
        path = self.workdir / LOG_NAME
        try:
            with path.open("rb") as f:
                size = f.seek(0, os.SEEK_END)
                start = max(self._manifest.log_offset, size - _TAIL_BYTES)
                f.seek(start)
                return f.read()
        except OSError:
            return b""

    def last_stderr_lines(self, n: int = 5) -> list[str]:
        """The last ``n`` non-empty lines QEMU wrote in this run (for a Failed VMI's message)."""
        lines = self._log_tail().decode(errors="replace").splitlines()
        return [line for line in lines if line.strip()][-n:]

    async def detach(self) -> None:
        """Lets go of QEMU without stopping it (the agent is going away); it can be adopted again."""
        await self._drop_qmp()
        if self._pidfd is not None:
            if self._exit is not None and not self._exit.done():
                self._exit.get_loop().remove_reader(self._pidfd)
                self._exit.cancel()
            os.close(self._pidfd)
            self._pidfd = None


def _check_not_running(workdir: Path) -> None:
    manifest = _Manifest.read(workdir)
    pid = None if manifest is None else manifest.pid()
    if manifest is not None and pid is not None and manifest.runs(pid):
        raise ProcessError(f"QEMU {pid} already runs in {workdir}; adopt it instead")


def _prepare_workdir(domain: Domain, workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    _confine_domain(domain, workdir)
    _check_not_running(workdir)
    _unlink_runtime_files(domain.paths)
    efi = domain.efi
    if efi is not None and not efi.vars.exists():
        shutil.copyfile(efi.vars_template, efi.vars)


def inherited_fds() -> list[int]:
    """Descriptors above stderr a child would inherit: those without close-on-exec, which
    Python never makes itself but a parent (a shell's ``flock``, a service manager) may pass
    down. QEMU outlives the agent, so whatever it inherits stays open for the guest's life."""
    found = []
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        if fd <= 2:
            continue
        try:
            if not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                found.append(fd)
        except OSError:
            continue  # the directory listing's own descriptor, closed already
    return found


def _spawn(argv: list[str], logfile: Path) -> int:
    log_fd = os.open(logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        return os.posix_spawnp(
            argv[0],
            argv,
            dict(os.environ),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
                *((os.POSIX_SPAWN_CLOSE, fd) for fd in inherited_fds() if fd != log_fd),
            ],
            # Its own session: no terminal signals, and it survives the agent's process group.
            setsid=True,
        )
    except OSError as exc:
        raise LaunchError(f"cannot start {argv[0]}: {exc}") from exc
    finally:
        os.close(log_fd)


def _log_header(logfile: Path) -> int:
    """Marks the start of a run in the log; the offset where this run's output begins."""
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    with logfile.open("ab") as f:
        f.write(f"--- vmo: launching QEMU at {stamp} ---\n".encode())
        return f.tell()


async def _wait_for_qmp(process: QemuProcess, timeout: float) -> None:
    exited = process._exit_future()
    deadline = asyncio.get_running_loop().time() + timeout
    while not exited.done():
        try:
            await process.qmp()
            return
        except (QMPConnectionLost, QMPTimeout):
            if asyncio.get_running_loop().time() > deadline:
                break
            # The socket appears only once QEMU has parsed its options; there is no event for it.
            await asyncio.wait([exited], timeout=_STARTUP_POLL)
    lines = process.last_stderr_lines()
    if not exited.done():
        await process.kill()
        raise LaunchError(f"QEMU did not answer on QMP within {timeout:g} s", stderr_lines=lines)
    raise LaunchError(f"QEMU exited while starting ({exited.result()})", stderr_lines=lines)


async def launch(
    domain: Domain,
    *,
    workdir: Path,
    binary: str = DEFAULT_QEMU,
    startup_timeout: float = 10.0,
    cgroup: Path | None = None,
) -> QemuProcess:
    """Starts ``domain`` detached from the caller; returns once QMP answers. With ``cgroup``
    (a cgroup2 directory), the process is moved into it before it has run the guest.

    A migration destination (``domain.incoming``) answers in the ``inmigrate`` state: that is
    ready too; it runs the guest once the migration completes (see ``migration``).
    """
    workdir = workdir.resolve()
    _prepare_workdir(domain, workdir)
    argv = qemu_argv(domain, binary=binary)
    return await _launch_argv(argv, domain.paths, domain.name, workdir, startup_timeout, cgroup)


async def launch_storage(
    name: str,
    disks: Sequence[Disk],
    *,
    workdir: Path,
    run_as: str | None,
    binary: str = DEFAULT_QEMU,
    startup_timeout: float = 10.0,
) -> QemuProcess:
    """Starts a guestless QEMU holding ``disks`` open (``argv.storage_argv``), recorded and
    adoptable as a VM's QEMU is; returns once QMP answers."""
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    paths = RuntimePaths.under(workdir)
    _check_not_running(workdir)
    _unlink_runtime_files(paths)
    argv = storage_argv(name, disks, paths, run_as=run_as, binary=binary)
    return await _launch_argv(argv, paths, name, workdir, startup_timeout)


async def _launch_argv(
    argv: list[str],
    paths: RuntimePaths,
    name: str,
    workdir: Path,
    startup_timeout: float,
    cgroup: Path | None = None,
) -> QemuProcess:
    logfile = workdir / LOG_NAME
    manifest = _Manifest(argv, paths, _log_header(logfile))
    manifest.write(workdir)
    pid = _spawn(argv, logfile)
    pidfd = os.pidfd_open(pid)
    try:
        # recorded at once: an agent that dies now leaves a QEMU the next one can prove is its own
        manifest = replace(manifest, identity=ProcessIdentity.of(pid))
        manifest.write(workdir)
        if cgroup is not None:
            try:
                (cgroup / "cgroup.procs").write_text(f"{pid}\n")
            except OSError as exc:
                raise LaunchError(f"cannot move QEMU into cgroup {cgroup}: {exc}") from exc
    except BaseException:
        # a QEMU nobody could ever adopt must not be left running
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os.close(pidfd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        raise
    process = QemuProcess(pid=pid, pidfd=pidfd, workdir=workdir, manifest=manifest)
    log.info("launched QEMU %d for %s in %s", pid, name, workdir)
    await _wait_for_qmp(process, startup_timeout)
    return process


def find(workdir: Path) -> QemuProcess | None:
    """The QEMU that runs (or is still exiting) in ``workdir``, held by a pidfd but not talked to;
    None only when the kernel says no such process runs any more (see ``_Manifest.runs``)."""
    workdir = workdir.resolve()
    manifest = _Manifest.read(workdir)
    if manifest is None:
        return None
    pid = manifest.pid()
    if pid is None or not manifest.runs(pid):
        _unlink_runtime_files(manifest.paths)
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    # Checked again through the pidfd's process: the pid may have been recycled in between.
    if not manifest.runs(pid):
        os.close(pidfd)
        return None
    return QemuProcess(pid=pid, pidfd=pidfd, workdir=workdir, manifest=manifest)


async def adopt(workdir: Path, *, qmp_timeout: float = 5.0) -> QemuProcess | None:
    """The QEMU still running in ``workdir``, re-attached; None if there is none.

    ``ProcessError`` if it runs but does not answer on QMP (the caller decides whether to kill it:
    ``find`` gives a handle that needs no QMP).
    """
    process = find(workdir)
    if process is None:
        return None
    pid = process.pid
    try:
        await asyncio.wait_for(process.qmp(), qmp_timeout)
    except (ProtocolError, TimeoutError) as exc:
        await process.detach()
        raise ProcessError(f"QEMU {pid} in {workdir} does not answer on QMP: {exc}") from exc
    log.info("adopted QEMU %d in %s", pid, workdir)
    return process
