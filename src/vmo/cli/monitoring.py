"""The embedded mode's Prometheus: Debian's ``prometheus``, configured and supervised by ``vmo up``.

What ``vmo up`` writes under ``$VMO_HOME/monitoring``:
- ``prometheus.yml``: three scrape jobs (``vmo-apiserver`` by its address; ``vmo-node-agent``
  and ``vmo-controllers`` from the file-SD target files each endpoint writes into
  ``targets/``), all over HTTPS verified against VMO's CA, with a bearer token of Prometheus's own
  (user ``vmo:prometheus`` in the group ``system:monitoring``, which the bootstrap ClusterRole
  ``system:monitoring`` lets ``get /metrics`` and nothing else);
- ``rules/vmo.rules.yaml``: VMO's alert rules (``vmo.api.monitoring``);
- ``web.yml``: Prometheus's own endpoint serves TLS (a certificate from VMO's CA) to basic auth
  (a bcrypt hash; the password is in ``prometheus.json``, mode 0600, with the URL and the CA:
  what ``vmo top`` and the API server's ``metrics.k8s.io`` read);
- ``data/``: the TSDB, kept ``--monitoring-retention`` long.

``vmo monitoring render`` prints the cluster-mode counterparts: ServiceMonitors for the same
jobs and a PrometheusRule with the same rules.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import yaml

from vmo.apiserver import pki
from vmo.apiserver.auth import TokenFile
from vmo.apiserver.bootstrap_roles import MONITORING_GROUP
from vmo.home import StateDir, write_private

log = logging.getLogger(__name__)

PROMETHEUS_USER = "vmo:prometheus"
WEB_USER = "vmo"
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


@dataclass(frozen=True)
class Settings:
    listen: str = "127.0.0.1:9090"
    retention: str = "15d"
    scrape_interval: str = "15s"
    binary: str = "prometheus"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        return cls(
            listen=args.monitoring_listen,
            retention=args.monitoring_retention,
            scrape_interval=args.monitoring_scrape_interval,
        )


class MonitoringError(Exception):
    """Prometheus could not be configured or started; the message says why."""


def _rules_yaml() -> str:
    from vmo.api.monitoring import rules_yaml

    return rules_yaml()


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    for unit in ("ms", "s", "m", "h", "d"):
        if duration.endswith(unit) and duration[: -len(unit)].isdigit():
            return int(duration[: -len(unit)]) * units[unit]
    raise MonitoringError(f"{duration!r} is not a duration such as 15s or 1m")


def scrape_config(state: StateDir, apiserver: str, settings: Settings) -> dict[str, Any]:
    """prometheus.yml (pure): the three jobs, their TLS and token, the rule file."""
    mon = state.monitoring
    interval = _seconds(settings.scrape_interval)
    tls = {"ca_file": str(state.pki / "ca.crt")}
    auth = {"type": "Bearer", "credentials_file": str(mon / "token")}

    def job(name: str, **where: Any) -> dict[str, Any]:
        return {"job_name": name, "scheme": "https", "metrics_path": "/metrics",
                "tls_config": tls, "authorization": auth, **where}  # fmt: skip

    return {
        "global": {
            "scrape_interval": settings.scrape_interval,
            "evaluation_interval": settings.scrape_interval,
            "scrape_timeout": f"{max(1, int(min(interval, 10) * 0.8))}s",
            "external_labels": {"vmo_cluster": "embedded"},
        },
        "rule_files": [str(mon / "rules" / "vmo.rules.yaml")],
        "scrape_configs": [
            job("vmo-apiserver", static_configs=[{"targets": [apiserver]}]),
            job(
                "vmo-node-agent",
                file_sd_configs=[
                    {
                        "files": [str(mon / "targets" / "vmo-node-agent-*.json")],
                        "refresh_interval": "5s",
                    }
                ],
            ),
            job(
                "vmo-controllers",
                file_sd_configs=[
                    {
                        "files": [str(mon / "targets" / "vmo-controllers-*.json")],
                        "refresh_interval": "5s",
                    }
                ],
            ),
        ],
    }


def prepare(state: StateDir, apiserver: str, settings: Settings) -> dict[str, str]:
    """Writes everything Prometheus reads; returns the access record (``prometheus.json``)."""
    mon = state.monitoring
    for directory in (mon, mon / "rules", mon / "targets", mon / "data"):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = TokenFile(state.tokens).add(PROMETHEUS_USER, (MONITORING_GROUP,))
    write_private(mon / "token", token)
    write_private(mon / "rules" / "vmo.rules.yaml", _rules_yaml())
    ca = pki.CertPair(state.pki / "ca.crt", state.pki / "ca.key")
    serving = pki.CertPair(mon / "prometheus.crt", mon / "prometheus.key")
    if not serving.cert.exists() or not serving.key.exists():
        pki.issue(ca, serving, common_name="vmo-prometheus",
                  server_names=("localhost", "127.0.0.1", "::1"))  # fmt: skip
    password = secrets.token_urlsafe(24)
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=10)).decode()
    web = {
        "tls_server_config": {
            "cert_file": str(serving.cert),
            "key_file": str(serving.key),
            "min_version": "TLS12",
        },
        "basic_auth_users": {WEB_USER: hashed},
    }
    write_private(mon / "web.yml", yaml.safe_dump(web, sort_keys=False))
    config = scrape_config(state, apiserver, settings)
    write_private(mon / "prometheus.yml", yaml.safe_dump(config, sort_keys=False))
    return {"url": f"https://{settings.listen}", "ca_file": str(ca.cert),
            "username": WEB_USER, "password": password}  # fmt: skip


def argv(state: StateDir, settings: Settings) -> list[str]:
    mon = state.monitoring
    binary = shutil.which(settings.binary)
    if binary is None:
        raise MonitoringError(
            f"{settings.binary} is not installed (make install installs Debian's prometheus); "
            "vmo up --no-monitoring runs without it"
        )
    return [binary,
            f"--config.file={mon / 'prometheus.yml'}",
            f"--web.config.file={mon / 'web.yml'}",
            f"--web.listen-address={settings.listen}",
            f"--storage.tsdb.path={mon / 'data'}",
            f"--storage.tsdb.retention.time={settings.retention}",
            "--log.level=warn"]  # fmt: skip


async def _ready(access: dict[str, str], proc: asyncio.subprocess.Process) -> None:
    """Waits for ``/-/ready`` over TLS with the basic-auth password."""
    ctx = ssl.create_default_context(cafile=access["ca_file"])
    host, _, port = access["url"].removeprefix("https://").rpartition(":")
    header = "Basic " + _b64(f"{access['username']}:{access['password']}")
    deadline = time.monotonic() + READY_TIMEOUT
    request = (f"GET /-/ready HTTP/1.1\r\nHost: {host}\r\nAuthorization: {header}\r\n"
               "Connection: close\r\n\r\n").encode()  # fmt: skip
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise MonitoringError(f"prometheus exited with {proc.returncode}")
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, int(port), ssl=ctx), 2.0
            )
            try:
                writer.write(request)
                status = await asyncio.wait_for(reader.readline(), 2.0)
            finally:
                writer.close()
            if b" 200 " in status:
                return
        await asyncio.sleep(0.2)
    raise MonitoringError(f"prometheus did not become ready in {READY_TIMEOUT:g}s")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the control plane dies, even of SIGKILL."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


async def supervise(
    state: StateDir, apiserver: str, settings: Settings, stop: asyncio.Event
) -> None:
    """Runs Prometheus until ``stop``; starts it again if it dies. Never raises: without it,
    VMO runs on, and ``monitoring/prometheus.log`` says why."""
    mon = state.monitoring
    access_file = mon / "prometheus.json"
    with contextlib.suppress(FileNotFoundError):
        access_file.unlink()
    try:
        access = prepare(state, apiserver, settings)
        command = argv(state, settings)
    except (MonitoringError, OSError, ImportError) as exc:
        log.error("monitoring: %s", exc)
        return
    while not stop.is_set():
        with (mon / "prometheus.log").open("ab") as logfile:
            proc = await asyncio.create_subprocess_exec(
                *command, stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile,
                start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        try:
            await _ready(access, proc)
            write_private(access_file, json.dumps(access, indent=1) + "\n")
            log.info("Prometheus ready at %s", access["url"])
        except MonitoringError as exc:
            log.error("monitoring: %s; see %s", exc, mon / "prometheus.log")
        waiter = asyncio.ensure_future(proc.wait())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([waiter, stopped], return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(waiter, STOP_TIMEOUT)
            except TimeoutError:
                proc.kill()
                await waiter
            break
        stopped.cancel()
        log.error("Prometheus exited with %s; starting it again", proc.returncode)
        await asyncio.sleep(2.0)
    with contextlib.suppress(FileNotFoundError):
        access_file.unlink()


# --- CLI -------------------------------------------------------------------------------------


def add_up_flags(up: Any) -> None:
    up.add_argument("--no-monitoring", action="store_true", help="do not start Prometheus")
    up.add_argument("--monitoring-listen", default="127.0.0.1:9090", help="Prometheus's HOST:PORT")
    up.add_argument(
        "--monitoring-retention", default="15d", help="how long Prometheus keeps samples"
    )
    up.add_argument(
        "--monitoring-scrape-interval", default="15s", help="scrape and rule-evaluation interval"
    )


def up_flags_argv(args: argparse.Namespace) -> list[str]:
    """The same flags again, for the detached server ``vmo up -d`` starts."""
    if args.no_monitoring:
        return ["--no-monitoring"]
    return ["--monitoring-listen", args.monitoring_listen,
            "--monitoring-retention", args.monitoring_retention,
            "--monitoring-scrape-interval", args.monitoring_scrape_interval]  # fmt: skip


def add_monitoring_commands(sub: Any, state_dir: Any) -> None:
    group = sub.add_parser("monitoring", help="Prometheus, alert rules, ServiceMonitors")
    cmds = group.add_subparsers(dest="monitoring_command", required=True)
    render = cmds.add_parser(
        "render", help="print ServiceMonitors and the PrometheusRule for a cluster"
    )
    render.add_argument("--namespace", default="vmo-system")
    render.set_defaults(func=_cmd_render)
    rules = cmds.add_parser("rules", help="print VMO's alert rules (a Prometheus rule file)")
    rules.set_defaults(func=lambda args: _print(_rules_yaml()))
    status = cmds.add_parser("status", help="where the embedded Prometheus listens")
    status.set_defaults(func=lambda args: _cmd_status(state_dir(args)))


def _print(text: str) -> int:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    from vmo.api.monitoring import prometheus_rule, service_monitors

    docs = [*service_monitors(args.namespace), prometheus_rule(args.namespace)]
    return _print(yaml.safe_dump_all(docs, sort_keys=False))


def _cmd_status(state: StateDir) -> int:
    access_file = state.monitoring / "prometheus.json"
    try:
        access = json.loads(access_file.read_text())
    except (OSError, ValueError):
        print("Prometheus is not running (vmo up starts it unless --no-monitoring)")
        return 1
    print(f"Prometheus: {access['url']} (user {access['username']}, password in {access_file})")
    targets = sorted(p.name for p in (state.metrics_targets).glob("*.json"))
    print(f"targets:    {', '.join(targets) or 'none'}")
    return 0


def access_path(state: StateDir) -> Path:
    return state.monitoring / "prometheus.json"
