"""The virt-controller role: the VirtualMachine controller, the scheduler, and the migration,
snapshot, restore and clone controllers."""

from __future__ import annotations

from vmo.client import Client
from vmo.engine.virtcontroller.clone import CloneController
from vmo.engine.virtcontroller.launcher_pods import LauncherPodController
from vmo.engine.virtcontroller.migration import MigrationController
from vmo.engine.virtcontroller.scheduler import SchedulerController
from vmo.engine.virtcontroller.snapshots import RestoreController, SnapshotController
from vmo.engine.virtcontroller.vm import VMController
from vmo.runtime import Controller


def virt_controllers(client: Client) -> list[Controller]:
    """Every controller of virt-controller's role, each to be run against ``client``."""
    return [
        VMController(client),
        SchedulerController(client),
        MigrationController(client),
        SnapshotController(client),
        RestoreController(client),
        CloneController(client),
        LauncherPodController(client),
    ]
