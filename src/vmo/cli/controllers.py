"""``vmo controllers run``: VMO's own controllers against any cluster's API (the embedded one
or a real Kubernetes with KubeVirt), as one replica of several under a leader Lease."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from vmo.cli._common import state_dir
from vmo.client import Client, Credentials
from vmo.client.prometheus import PrometheusConfig, prometheus_file
from vmo.controllers.backup.restore_server import RestoreServer
from vmo.controllers.balance.controller import BalanceController
from vmo.controllers.balance.extender import PlacementExtender
from vmo.controllers.manager import (
    LEASE_NAMESPACE,
    controller_manager,
    default_identity,
    ensure_crds,
)
from vmo.controllers.monitoring import StateMetrics
from vmo.runtime import LeaseTiming, ensure_namespace
from vmo.runtime.metrics_http import MetricsEndpoint


def add_controllers_commands(sub: Any, creds: Callable[[argparse.Namespace], Credentials]) -> None:
    group = sub.add_parser("controllers", help="VMO's own controllers").add_subparsers(
        dest="controllers_command", required=True
    )
    run = group.add_parser("run", help="run VMO's controllers (one replica, leader-elected)")
    run.add_argument("--kubeconfig", default="", help="default: $KUBECONFIG, then --home's")
    run.add_argument("--identity", default="", help="this replica's name (default: host_pid)")
    run.add_argument("--lease-namespace", default=LEASE_NAMESPACE)
    run.add_argument(
        "--lease-duration", type=float, default=15.0, help="seconds (client-go's default: 15)"
    )
    run.add_argument(
        "--backup-root",
        default="",
        help="where local-directory BackupRepositories live (default: $VMO_BACKUP_ROOT, "
        "then $VMO_HOME/backups)",
    )
    run.add_argument(
        "--restore-listen",
        default="127.0.0.1:0",
        help="HOST:PORT the backup restores' disks are served on (default: a free loopback port)",
    )
    run.add_argument(
        "--restore-url",
        default="",
        help="the https URL importers reach that server at (default: the listening address; "
        "in a cluster, the controllers' Service)",
    )
    run.add_argument(
        "--metrics-listen",
        default="127.0.0.1:0",
        help="HOST:PORT of the HTTPS /metrics endpoint (default: the port it had last time, "
        "else a free loopback port); 'off' serves none",
    )
    run.add_argument("--metrics-cert", default="", help="default: the home's pki/metrics.crt")
    run.add_argument("--metrics-key", default="", help="default: the home's pki/metrics.key")
    run.add_argument(
        "--metrics-announce",
        action="store_true",
        help="write a file-SD target for the home's Prometheus (vmo up's controllers do)",
    )
    run.add_argument(
        "--placement-listen",
        default="127.0.0.1:0",
        help="HOST:PORT of the balancer's scheduler extender (initial placement; default: a "
        "free loopback port, with the metrics certificate); 'off' serves none",
    )
    run.add_argument(
        "--prometheus",
        default="",
        help="a prometheus.json ({url, ca_file, username, password} or bearer_token) the "
        "balancer reads usage through (default: the home's monitoring/prometheus.json, which "
        "vmo up writes)",
    )
    run.add_argument(
        "--no-state-metrics", action="store_true", help="without the cluster-state collector"
    )
    run.add_argument(
        "--no-kubevirt-state-metrics",
        action="store_true",
        help="the collector leaves out the kubevirt_* families (a cluster's virt-controller "
        "exports them)",
    )
    run.set_defaults(func=lambda args: _run(args, creds(args)))


def _metrics_endpoint(args: argparse.Namespace, client: Client) -> MetricsEndpoint | None:
    """The process's /metrics (the process-wide registry: runtime and state metrics); embedded,
    it also announces itself to the home's Prometheus through a file-SD target file."""
    if args.metrics_listen == "off":
        return None
    home = state_dir(args)
    cert = Path(args.metrics_cert) if args.metrics_cert else home.metrics_cert
    key = Path(args.metrics_key) if args.metrics_key else home.metrics_key
    if not cert.exists():
        logging.getLogger(__name__).warning("no %s: the controllers serve no /metrics", cert)
        return None
    host, _, port = args.metrics_listen.rpartition(":")
    embedded = bool(args.metrics_announce)
    return MetricsEndpoint(
        client,
        cert,
        key,
        job="vmo-controllers",
        instance_name="controllers",
        host=host or "127.0.0.1",
        port=int(port or 0),
        port_file=home.monitoring / "controllers.port" if embedded else None,
        targets_dir=home.metrics_targets if embedded else None,
    )


def _placement_extender(
    args: argparse.Namespace, client: Client, runnables: Sequence[object]
) -> PlacementExtender | None:
    if args.placement_listen == "off":
        return None
    home = state_dir(args)
    cert = Path(args.metrics_cert) if args.metrics_cert else home.metrics_cert
    key = Path(args.metrics_key) if args.metrics_key else home.metrics_key
    ca = home.pki / "ca.crt"
    balancer = next((r for r in runnables if isinstance(r, BalanceController)), None)
    if balancer is None or not cert.exists() or not ca.exists():
        logging.getLogger(__name__).warning("no %s or %s: no placement extender", cert, ca)
        return None
    host, _, port = args.placement_listen.rpartition(":")
    return PlacementExtender(
        client, balancer, cert=cert, key=key, ca=ca, host=host or "127.0.0.1", port=int(port or 0)
    )


def _prometheus_source(args: argparse.Namespace) -> Callable[[], PrometheusConfig]:
    """Read again each time: ``vmo up`` starts Prometheus after the controllers."""
    path = Path(args.prometheus) if args.prometheus else prometheus_file(state_dir(args))
    return lambda: PrometheusConfig.from_file(path)


def _timing(duration: float) -> LeaseTiming:
    # client-go's ratios: renew deadline 2/3 of the lease, retry every 2/15 of it
    return LeaseTiming(duration, duration * 2 / 3, duration * 2 / 15)


def _run(args: argparse.Namespace, creds: Credentials) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    identity = args.identity or default_identity()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        async with Client(creds) as client:
            await ensure_namespace(client, args.lease_namespace)
            await ensure_crds(client)
            manager = controller_manager(
                client,
                identity=identity,
                namespace=args.lease_namespace,
                timing=_timing(args.lease_duration),
                backup_root=Path(args.backup_root) if args.backup_root else None,
                restore_server=RestoreServer(args.restore_listen, args.restore_url),
                prometheus=_prometheus_source(args),
            )
            extender = _placement_extender(args, client, manager.runnables)
            if extender is not None:
                manager = replace(manager, runnables=[*manager.runnables, extender])
            if not args.no_state_metrics:
                state = StateMetrics(client, kubevirt_families=not args.no_kubevirt_state_metrics)
                manager = replace(manager, runnables=[*manager.runnables, state])
            endpoint = _metrics_endpoint(args, client)
            if endpoint is not None:
                await endpoint.start()
            print(f"controllers replica {identity} is running", flush=True)
            try:
                await manager.run(stop)
            finally:
                if endpoint is not None:
                    await endpoint.stop()

    asyncio.run(run())
    return 0
