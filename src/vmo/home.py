"""VMO's home (``$VMO_HOME``, default ``~/.vmo``): where the embedded control plane keeps its
state, who may read it (its owner alone), and the lock that says whether its API server lives.

It sits below every other layer, so the CLI, the API server, the engine and the test helpers all
name the same paths without importing each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "HOME_MODE",
    "PRIVATE_UMASK",
    "AlreadyRunning",
    "ServerLock",
    "StateDir",
    "write_private",
]

HOME_MODE = 0o700
# tokens, keys, the store and the logs are the owner's alone: files 0600, directories 0700
PRIVATE_UMASK = 0o077
# a status probe holds the lock shared for a moment: a starting server waits that long, no more
LOCK_WAIT = 1.0
_POLL = 0.02


def write_private(path: Path, text: str) -> None:
    """Replaces ``path`` atomically with ``text``, readable by its owner only."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


class AlreadyRunning(Exception):
    """Another live process holds the API server's lock."""

    def __init__(self, path: Path, pid: int | None) -> None:
        super().__init__(f"{path} is locked by pid {pid if pid else 'unknown'}")
        self.path = path
        self.pid = pid


@dataclass(frozen=True)
class ServerLock:
    """The advisory lock (``flock``) the live API server holds on its pid file for its life.

    The kernel drops it when the holder dies, however it dies: a SIGKILLed server, even one left
    a zombie by a parent that never reaps it, holds no open files (``claim``). So the lock, not a pid probe
    (which counts zombies and reused pids as alive), is the truth about whether a server lives.
    The file is never unlinked: a new server locking a fresh inode while an old one still holds
    the unlinked one would make two.
    """

    path: Path

    def claim(self, *, wait: float = LOCK_WAIT) -> None:
        """Takes the lock, with this process's pid in the file, for the rest of its life.

        The process never lets go: the kernel drops the lock as the process dies, after its
        last write, so a released lock means the server is gone, not merely shutting down.
        """
        # O_CLOEXEC: QEMU and other children must not inherit the lock and outlive the server
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if not _lock(fd, fcntl.LOCK_EX, wait):
            pid = _read_pid(fd)
            os.close(fd)
            raise AlreadyRunning(self.path, pid)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        # fd stays open on purpose (an int: nothing collects it)

    def holder(self, *, wait: float = LOCK_WAIT) -> int | None:
        """The pid of the live server, or None when nobody holds the lock.

        The pid in the file is trusted only once that process is seen holding the file open: a
        server that has just taken the lock may not have replaced a crashed one's pid yet. That
        is waited for (up to ``wait``); a holder whose pid never shows is reported as pid 0.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            if _lock(fd, fcntl.LOCK_SH, 0):
                return None  # released on close below
            deadline = time.monotonic() + wait
            while not _holds_open(pid := _read_pid(fd), os.fstat(fd)):
                if time.monotonic() >= deadline:
                    return 0
                time.sleep(_POLL)
            return pid
        finally:
            os.close(fd)


def _lock(fd: int, kind: int, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL)


def _holds_open(pid: int | None, lock_file: os.stat_result) -> bool:
    """Whether ``pid`` has the lock file open: a pid left by a crashed server (possibly reused
    since by another process) does not, and neither does a zombie."""
    if not pid:
        return False
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                found = fd.stat()
                if (found.st_dev, found.st_ino) == (lock_file.st_dev, lock_file.st_ino):
                    return True
    except FileNotFoundError:
        return False
    except PermissionError:
        return True  # another user's process: the pid it wrote is all there is to go by
    return False


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except ValueError:
        return None


@dataclass(frozen=True)
class StateDir:
    """Everything the embedded control plane keeps on disk, under ``$VMO_HOME``."""

    root: Path

    @classmethod
    def default(cls) -> StateDir:
        return cls(Path(os.environ.get("VMO_HOME") or Path.home() / ".vmo"))

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def db(self) -> Path:
        return self.root / "store.db"

    @property
    def tokens(self) -> Path:
        return self.root / "tokens.json"

    @property
    def sa_key(self) -> Path:
        return self.pki / "sa.key"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "admin.kubeconfig"

    @property
    def engine_kubeconfig(self) -> Path:
        """The identity VMO's own controllers and node agents use."""
        return self.root / "engine.kubeconfig"

    @property
    def nodes(self) -> Path:
        return self.root / "nodes"

    @property
    def pidfile(self) -> Path:
        """The live server's pid; the server holds it locked (see ``server_lock``)."""
        return self.root / "apiserver.pid"

    @property
    def server_lock(self) -> ServerLock:
        return ServerLock(self.pidfile)

    @property
    def logfile(self) -> Path:
        return self.root / "apiserver.log"

    @property
    def url_file(self) -> Path:
        return self.root / "apiserver.url"

    @property
    def monitoring(self) -> Path:
        """Prometheus's configuration, data and scrape targets (``vmo up`` starts it)."""
        return self.root / "monitoring"

    @property
    def metrics_targets(self) -> Path:
        """File-SD target files: each metrics endpoint of this host writes its own."""
        return self.monitoring / "targets"

    @property
    def metrics_cert(self) -> Path:
        """The serving certificate of node agents' and controllers' /metrics (VMO's CA)."""
        return self.pki / "metrics.crt"

    @property
    def metrics_key(self) -> Path:
        return self.pki / "metrics.key"

    def prepare(self) -> None:
        """Creates the home, or tightens an existing one, to its owner alone (0700).

        ``mkdir(mode=...)`` neither applies to a directory that exists nor escapes the umask,
        hence the explicit chmod.
        """
        self.root.mkdir(mode=HOME_MODE, parents=True, exist_ok=True)
        self.pki.mkdir(mode=HOME_MODE, exist_ok=True)
        for directory in (self.root, self.pki):
            os.chmod(directory, HOME_MODE)
