"""Starts the virt-controller role: the VirtualMachine controller, the scheduler, and the
migration, snapshot, restore and clone controllers."""

from __future__ import annotations

import asyncio

from vmo.client import Client
from vmo.engine.virtcontroller.clone import CloneController
from vmo.engine.virtcontroller.migration import MigrationController
from vmo.engine.virtcontroller.scheduler import SchedulerController
from vmo.engine.virtcontroller.snapshots import RestoreController, SnapshotController
from vmo.engine.virtcontroller.vm import VMController


async def run_controllers(client: Client, *, stop: asyncio.Event) -> None:
    """Runs every controller against ``client`` until ``stop`` is set."""
    await asyncio.gather(
        VMController(client).run(stop),
        SchedulerController(client).run(stop),
        MigrationController(client).run(stop),
        SnapshotController(client).run(stop),
        RestoreController(client).run(stop),
        CloneController(client).run(stop),
    )
