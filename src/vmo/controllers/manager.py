"""VMO's own controllers as one process: ``vmo controllers run`` (and, in a cluster, the
in-cluster Deployment) runs them under a leader Lease, so replicas never both act."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from vmo.client import Client
from vmo.client.prometheus import PrometheusConfig
from vmo.controllers.access.crds import access_crds
from vmo.controllers.access.policy import VMAccessPolicyController
from vmo.controllers.access.quota import VMQuotaController
from vmo.controllers.backup.crds import backup_crds
from vmo.controllers.backup.policy import (
    BackupPolicyController,
    BackupRepositoryController,
    default_backup_root,
)
from vmo.controllers.backup.restore import BackupRestoreController
from vmo.controllers.backup.restore_server import RestoreServer
from vmo.controllers.balance.controller import BalanceController, PrometheusSource
from vmo.controllers.balance.crds import balance_crds
from vmo.controllers.crds import install
from vmo.controllers.example import NodeLabelController
from vmo.controllers.ha.controller import HAController
from vmo.controllers.ha.crds import ha_crds
from vmo.home import StateDir
from vmo.runtime import Controller, LeaderElector, LeaseTiming, Manager

LEASE_NAME = "vmo-controllers"
LEASE_NAMESPACE = "vmo-system"


def vmo_controllers(
    client: Client,
    *,
    backup_root: Path | None = None,
    restore_server: RestoreServer | None = None,
    prometheus: PrometheusSource | None = None,
) -> list[Controller]:
    """Every VMO-own controller, each to run against ``client``. ``backup_root``: where the
    BackupRepositories on a local directory live (each under its namespace); ``restore_server``:
    where restored disks are served from (default: an ephemeral port on loopback);
    ``prometheus``: how the balancer reaches Prometheus (default: the home's, as ``vmo up``
    records it)."""
    root = backup_root or default_backup_root()
    policies = BackupPolicyController(client, root)
    return [
        NodeLabelController(client),
        VMAccessPolicyController(client),
        VMQuotaController(client),
        policies,
        BackupRepositoryController(client, root),
        BackupRestoreController(client, policies, restore_server or RestoreServer()),
        BalanceController(client, prometheus or _home_prometheus),
        HAController(client),
    ]


def _home_prometheus() -> PrometheusConfig:
    return PrometheusConfig.from_home(StateDir.default())


async def ensure_crds(client: Client) -> None:
    """Every VMO CRD, created where missing and brought up to date."""
    await install(client, [*backup_crds(), *access_crds(), *balance_crds(), *ha_crds()])


def default_identity() -> str:
    """A replica's name in the Lease: host and process, as client-go uses the pod name."""
    return f"{socket.gethostname()}_{os.getpid()}"


def controller_manager(
    client: Client,
    *,
    identity: str,
    namespace: str = LEASE_NAMESPACE,
    timing: LeaseTiming | None = None,
    backup_root: Path | None = None,
    restore_server: RestoreServer | None = None,
    prometheus: PrometheusSource | None = None,
) -> Manager:
    election = LeaderElector(
        client, LEASE_NAME, namespace, identity, timing=timing or LeaseTiming()
    )
    return Manager(
        vmo_controllers(
            client, backup_root=backup_root, restore_server=restore_server, prometheus=prometheus
        ),
        election=election,
    )
