"""Benchmark: VirtualMachineExport download throughput beside ``cat`` of the same volume file.

Starts an embedded cluster (API server, controllers, one node) in a temporary home, imports a
volume filled with data (random bytes: the worst case for gzip) as a DataVolume, exports it, and
downloads it with curl over HTTPS (raw and gzip) to /dev/null. The floor is ``cat`` of the pool's
qcow2 file to /dev/null, in the same run and with the file in the page cache, as the downloads
have it. Prints MB/s of each and the ratio to cat.
Run: ``python bench/export.py [--size-mib 1024] [--runs 2]``.
"""

from __future__ import annotations

import argparse
import base64
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from vmo.testing.apiserver import ThreadedServer

NS = "virtual-machines"
EXPORTS = f"/apis/export.kubevirt.io/v1/namespaces/{NS}/virtualmachineexports"
DATAVOLUMES = f"/apis/cdi.kubevirt.io/v1beta1/namespaces/{NS}/datavolumes"


class Api:
    def __init__(self, server: ThreadedServer) -> None:
        self.base, self.ca = server.url, str(server.ca)
        self.headers = {"Authorization": f"Bearer {server.admin_token}"}

    def get(self, path: str) -> Any:
        return requests.get(self.base + path, headers=self.headers, verify=self.ca, timeout=30)

    def post(self, path: str, body: Any) -> Any:
        return requests.post(
            self.base + path, json=body, headers=self.headers, verify=self.ca, timeout=30
        )


def wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


def make_image(images: Path, size_mib: int) -> Path:
    raw, qcow2 = images / "bench.raw", images / "bench.qcow2"
    with raw.open("wb") as fh:
        block = 64 << 20
        for _ in range(size_mib // 64):
            fh.write(_random(block))
    subprocess.run(
        ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
        check=True,
    )
    raw.unlink()
    return qcow2


def _random(size: int) -> bytes:
    import os

    return os.urandom(size)


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def curl(url: str, token: str, ca: Path) -> list[str]:
    return [
        "curl",
        "-sS",
        "--fail",
        "--cacert",
        str(ca),
        "-H",
        f"x-kubevirt-export-token: {token}",
        "-o",
        "/dev/null",
        url,
    ]


def prepare(server: ThreadedServer, size_mib: int) -> tuple[dict[str, Any], str, Path]:
    api = Api(server)
    images = server.home / "images"
    images.mkdir(exist_ok=True)
    image = make_image(images, size_mib)
    dv = {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {"name": "bench", "namespace": NS},
        "spec": {
            "source": {"http": {"url": f"file://{image}"}},
            "storage": {"resources": {"requests": {"storage": f"{size_mib}Mi"}}},
        },
    }
    api.post(DATAVOLUMES, dv).raise_for_status()
    wait(
        lambda: (
            api.get(f"{DATAVOLUMES}/bench").json().get("status", {}).get("phase") == "Succeeded"
        ),
        600,
        "the import",
    )
    export = {
        "apiVersion": "export.kubevirt.io/v1",
        "kind": "VirtualMachineExport",
        "metadata": {"name": "bench", "namespace": NS},
        "spec": {"source": {"apiGroup": "", "kind": "PersistentVolumeClaim", "name": "bench"}},
    }
    api.post(EXPORTS, export).raise_for_status()
    ready = wait(
        lambda: (
            (e := api.get(f"{EXPORTS}/bench").json()).get("status", {}).get("phase") == "Ready"
            and e
        ),
        60,
        "the export",
    )
    secret = api.get(f"/api/v1/namespaces/{NS}/secrets/{ready['status']['tokenSecretRef']}")
    token = base64.b64decode(secret.json()["data"]["token"]).decode()
    ca = server.home / "export-ca.pem"
    ca.write_text(ready["status"]["links"]["external"]["cert"])
    return ready, token, ca


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    if shutil.which("curl") is None:
        raise SystemExit("curl is needed for this benchmark")
    home = Path(tempfile.mkdtemp(prefix="vmo-bench-export-"))
    server = ThreadedServer(home, engine=True).start()
    try:
        export, token, ca = prepare(server, args.size_mib)
        volume = (home / "nodes" / "node-1" / "pool" / f"{NS}--bench.qcow2").resolve()
        urls = {
            f["format"]: f["url"]
            for f in export["status"]["links"]["external"]["volumes"][0]["formats"]
        }
        timed(["cat", str(volume)])  # warm the page cache
        results: dict[str, list[float]] = {"cat": [], "raw": [], "gzip": []}
        for _ in range(args.runs):
            results["cat"].append(timed(["cat", str(volume)]))
            results["raw"].append(timed(curl(urls["raw"], token, ca)))
            results["gzip"].append(timed(curl(urls["gzip"], token, ca)))
        report(results, args.size_mib)
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)
    return 0


def report(results: dict[str, list[float]], size_mib: int) -> None:
    mb = size_mib * 1.048576
    floor = statistics.median(results["cat"])
    print(f"volume: {size_mib} MiB of random data; medians of {len(results['cat'])} runs")
    print(f"{'what':<28}{'seconds':>9}{'MB/s':>9}{'ratio to cat':>14}")
    for name, label in (
        ("cat", "cat qcow2 > /dev/null"),
        ("raw", "export raw (curl, TLS)"),
        ("gzip", "export gzip (curl, TLS)"),
    ):
        seconds = statistics.median(results[name])
        print(f"{label:<28}{seconds:>9.2f}{mb / seconds:>9.0f}{seconds / floor:>13.1f}x")


if __name__ == "__main__":
    sys.exit(main())
