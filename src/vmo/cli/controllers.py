"""``vmo controllers run``: VMO's own controllers against any cluster's API (the embedded one
or a real Kubernetes with KubeVirt), as one replica of several under a leader Lease."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmo.client import Client, Credentials
from vmo.controllers.backup.restore_server import RestoreServer
from vmo.controllers.manager import (
    LEASE_NAMESPACE,
    controller_manager,
    default_identity,
    ensure_crds,
)
from vmo.runtime import LeaseTiming, ensure_namespace


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
    run.set_defaults(func=lambda args: _run(args, creds(args)))


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
            )
            print(f"controllers replica {identity} is running", flush=True)
            await manager.run(stop)

    asyncio.run(run())
    return 0
