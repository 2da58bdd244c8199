"""A real Prometheus for tests (Debian's ``prometheus``), served as ``vmo up`` serves its own:
TLS with a certificate from VMO's CA and basic auth, and a ``SyntheticExporter`` for it to
scrape, whose counters grow at known rates so a test can check the rates it reads back.

The production launcher is ``vmo.cli.monitoring``; this one only starts what a test needs.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import yaml
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vmo.apiserver import pki
from vmo.client.prometheus import PrometheusClient, PrometheusConfig, Sample, prometheus_file
from vmo.home import StateDir, write_private

__all__ = [
    "PrometheusServer",
    "ScrapeJob",
    "SyntheticExporter",
    "free_port",
    "wait_for_samples",
]

READY_LINE = "Server is ready to receive web requests."
USERNAME = "vmo"
COUNTER_HEAD_START = 3600.0  # seconds of growth a synthetic counter starts with


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class ScrapeJob:
    """One scrape job: plain HTTP targets (``host:port``) under a job name."""

    name: str
    targets: Sequence[str]
    metrics_path: str = "/metrics"

    def config(self) -> dict[str, Any]:
        return {
            "job_name": self.name,
            "metrics_path": self.metrics_path,
            "static_configs": [{"targets": list(self.targets)}],
        }


@dataclass
class PrometheusServer:
    """Debian's prometheus on a free loopback port, its data in ``workdir``.

    With ``ca`` it serves HTTPS with a certificate ``ca`` signs; it always wants basic auth
    (user ``vmo``, a random password). ``config`` is how a client reaches it;
    ``write_home_file`` records it where ``vmo top`` and the API server look.
    """

    workdir: Path
    ca: pki.CertPair | None = None
    jobs: Sequence[ScrapeJob] = ()
    scrape_interval: str = "1s"
    binary: str = "prometheus"
    port: int = 0
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18), repr=False)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.ca is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def config(self) -> PrometheusConfig:
        return PrometheusConfig(
            url=self.url,
            ca_file=str(self.ca.cert) if self.ca is not None else "",
            username=USERNAME,
            password=self.password,
        )

    @property
    def log(self) -> Path:
        return self.workdir / "prometheus.log"

    def write_home_file(self, state: StateDir) -> Path:
        """Writes the home's ``monitoring/prometheus.json`` (mode 0600), as ``vmo up`` does."""
        path = prometheus_file(state)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        cfg = self.config
        body = {"url": cfg.url, "ca_file": cfg.ca_file, "username": cfg.username,
                "password": cfg.password}  # fmt: skip
        write_private(path, json.dumps(body, indent=2) + "\n")
        return path

    def _write_configs(self) -> tuple[Path, Path]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {
                        "scrape_interval": self.scrape_interval,
                        "evaluation_interval": self.scrape_interval,
                    },
                    "scrape_configs": [job.config() for job in self.jobs],
                }
            )
        )
        hashed = bcrypt.hashpw(self.password.encode(), bcrypt.gensalt(rounds=4)).decode()
        web: dict[str, Any] = {"basic_auth_users": {USERNAME: hashed}}
        if self.ca is not None:
            pair = pki.issue(
                self.ca,
                pki.CertPair(self.workdir / "prometheus.crt", self.workdir / "prometheus.key"),
                common_name="vmo-prometheus",
                server_names=("127.0.0.1", "localhost"),
            )
            web["tls_server_config"] = {"cert_file": str(pair.cert), "key_file": str(pair.key)}
        web_config = self.workdir / "web.yml"
        web_config.write_text(yaml.safe_dump(web))
        return config, web_config

    def argv(self, config: Path, web_config: Path) -> list[str]:
        return [
            self.binary,
            f"--config.file={config}",
            f"--web.config.file={web_config}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=info",
        ]

    def start(self, *, timeout: float = 60.0) -> PrometheusServer:
        """Starts it and returns once it says it is ready (RuntimeError with its log if not)."""
        self.port = self.port or free_port()
        config, web_config = self._write_configs()
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                self.argv(config, web_config),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + timeout
        while READY_LINE not in self.log.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prometheus did not start:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def wait_for_samples(
    config: PrometheusConfig, expr: str, *, timeout: float = 60.0, interval: float = 0.25
) -> list[Sample]:
    """Queries ``expr`` until it returns samples (those are returned); TimeoutError if not."""
    deadline = time.monotonic() + timeout
    async with PrometheusClient(config) as prom:
        while True:
            samples = await prom.query(expr)
            if samples:
                return samples
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expr} returned nothing within {timeout} s")
            await asyncio.sleep(interval)


# --- the exporter ------------------------------------------------------------------------------

Labels = tuple[tuple[str, str], ...]


@dataclass
class _Line:
    """A counter's course: ``value`` at ``since``, then ``rate`` more each second."""

    rate: float
    value: float
    since: float

    def at(self, when: float) -> float:
        return self.value + self.rate * (when - self.since)


class _Collector(Collector):
    def __init__(self, exporter: SyntheticExporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterator[Metric]:
        # the exposition format keeps whole milliseconds: values are computed at one exactly
        now_ms = time.time_ns() // 1_000_000
        now = now_ms / 1000
        with self.exporter.lock:
            counters = {key: line.at(now) for key, line in self.exporter.counters.items()}
            gauges = dict(self.exporter.gauges)
        stamp = (now_ms + 0.5) / 1000  # written as int(stamp * 1000): now_ms, never one less
        yield from _families(counters, stamp, CounterMetricFamily)
        yield from _families(gauges, stamp, GaugeMetricFamily)


def _families(
    values: Mapping[tuple[str, Labels], float],
    now: float,
    family_type: type[CounterMetricFamily] | type[GaugeMetricFamily],
) -> Iterator[Metric]:
    by_name: dict[str, list[tuple[Labels, float]]] = {}
    for (name, labels), value in sorted(values.items()):
        by_name.setdefault(name, []).append((labels, value))
    for name, entries in by_name.items():
        family = family_type(name, f"synthetic {name}", labels=[k for k, _ in entries[0][0]])
        for labels, value in entries:
            # each sample carries the time it was computed at, so it lies exactly on its
            # counter's line however late in the scrape it was read
            family.add_metric([v for _, v in labels], value, timestamp=now)
        yield family


@dataclass
class SyntheticExporter:
    """``/metrics`` over plain HTTP on a free loopback port: counters that grow at a fixed rate
    per second (so ``rate()`` reads that rate back exactly) and gauges of fixed values."""

    counters: dict[tuple[str, Labels], _Line] = field(default_factory=dict)
    gauges: dict[tuple[str, Labels], float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0
    _server: Any = None

    def counter(self, name: str, labels: Mapping[str, str], *, rate: float) -> None:
        """``name`` (ending in ``_total``) with ``labels`` grows by ``rate`` a second from now
        on (continuing from its value so far: a new rate never looks like a reset)."""
        key = (name.removesuffix("_total"), tuple(sorted(labels.items())))
        now = time.time()
        with self.lock:
            old = self.counters.get(key)
            # a head start, so rate() never shortens its extrapolation towards a zero point
            value = old.at(now) if old is not None else rate * COUNTER_HEAD_START
            self.counters[key] = _Line(rate, value, now)

    def gauge(self, name: str, labels: Mapping[str, str], value: float) -> None:
        with self.lock:
            self.gauges[(name, tuple(sorted(labels.items())))] = value

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> SyntheticExporter:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        self._server, _ = start_http_server(0, addr="127.0.0.1", registry=registry)
        self.port = int(self._server.server_port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> SyntheticExporter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
