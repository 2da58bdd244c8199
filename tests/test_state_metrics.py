"""The cluster-state collector (vmo.controllers.monitoring): the families of docs/monitoring.md's
"Cluster state" table, computed from the objects of an embedded API server with no engine (the
test writes every object and its status itself), scraped through a registry of its own and read
back with prometheus_client's parser."""

from __future__ import annotations

import asyncio
import copy
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from vmo.client import (
    KUBEVIRT,
    NAMESPACE,
    NODE,
    VM,
    VMBACKUP,
    VMCLONE,
    VMI,
    VMIM,
    VMSNAPSHOT,
    Client,
    Resource,
)
from vmo.controllers.backup.policy import BACKUP_POLICY
from vmo.controllers.manager import ensure_crds
from vmo.controllers.monitoring import (
    ClusterStateCollector,
    StateMetrics,
    facts,
    run_state_collector,
)
from vmo.controllers.monitoring.state import VMO_FAMILIES, Seen, served
from vmo.runtime import Informers, parse_timestamp
from vmo.testing.apiserver import ThreadedServer

JSON = dict[str, Any]
NS = "default"
STAMP = "2026-01-02T03:04:05Z"
STAMP_SECONDS = parse_timestamp(STAMP).timestamp()

SPEC: JSON = {
    "domain": {
        "cpu": {"cores": 2},
        "memory": {"guest": "64Mi"},
        "devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
    },
    "volumes": [{"name": "root", "containerDisk": {"image": "quay.io/example/disk:1"}}],
}
TEMPLATE_ANNOTATIONS = {
    "vm.kubevirt.io/os": "fedora",
    "vm.kubevirt.io/workload": "server",
    "vm.kubevirt.io/flavor": "small",
}


# --- builders -----------------------------------------------------------------------------------


def vm_obj(name: str) -> JSON:
    return {
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "runStrategy": "Halted",
            "template": {
                "metadata": {"annotations": dict(TEMPLATE_ANNOTATIONS)},
                "spec": copy.deepcopy(SPEC),
            },
        },
    }


def vmi_obj(name: str, **spec: Any) -> JSON:
    return {"metadata": {"name": name, "namespace": NS}, "spec": {**copy.deepcopy(SPEC), **spec}}


def ref(kind: str, name: str, group: str = "kubevirt.io") -> JSON:
    return {"apiGroup": group, "kind": kind, "name": name}


def condition(ctype: str, status: str = "True", when: str = STAMP) -> JSON:
    return {"type": ctype, "status": status, "lastTransitionTime": when, "reason": "Test"}


async def node(client: Client, name: str, *, ready: bool = True, cpu: str = "4") -> None:
    await client.create(NODE, {"metadata": {"name": name}})
    await client.patch_status(
        NODE,
        name,
        {
            "allocatable": {"cpu": cpu, "memory": "8Gi"},
            "conditions": [condition("Ready", "True" if ready else "False")],
        },
    )


async def vm(client: Client, name: str, **status: Any) -> JSON:
    await client.create(VM, vm_obj(name), NS)
    if status:
        await client.patch_status(VM, name, status, NS)
    return await client.get(VM, name, NS)


async def vmi(client: Client, name: str, spec: JSON | None = None, **status: Any) -> JSON:
    await client.create(VMI, vmi_obj(name, **(spec or {})), NS)
    return await client.patch(VMI, name, {"status": status}, NS)  # VMIs have no /status


async def snapshot(client: Client, name: str, **status: Any) -> JSON:
    body = {"metadata": {"name": name, "namespace": NS},
            "spec": {"source": ref("VirtualMachine", "some-vm")}}  # fmt: skip
    await client.create(VMSNAPSHOT, body, NS)
    if status:
        await client.patch_status(VMSNAPSHOT, name, status, NS)
    return await client.get(VMSNAPSHOT, name, NS)


# --- scraping -----------------------------------------------------------------------------------


class Scrape:
    """One scrape of a collector, parsed back from the text format."""

    def __init__(self, collector: ClusterStateCollector) -> None:
        registry = CollectorRegistry()
        registry.register(collector)
        self.text = generate_latest(registry).decode()
        self.families = {f.name: f for f in text_string_to_metric_families(self.text)}

    def samples(self, sample_name: str) -> list[Sample]:
        return [s for f in self.families.values() for s in f.samples if s.name == sample_name]

    def series(self, sample_name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples(sample_name)]

    def value(self, sample_name: str, **labels: str) -> float | None:
        found = [s.value for s in self.samples(sample_name) if labels.items() <= s.labels.items()]
        assert len(found) <= 1, f"{sample_name}{labels} matches {len(found)} series"
        return found[0] if found else None

    def names(self) -> set[str]:
        return set(self.families)


async def eventually(probe: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = probe()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not met within {timeout}s (last: {result!r})")
        await asyncio.sleep(0.02)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ThreadedServer]:
    """A server of this test's own: Nodes and counts are cluster-wide."""
    with ThreadedServer(home=tmp_path / "home") as running:
        yield running


@pytest.fixture
async def client(server: ThreadedServer) -> AsyncIterator[Client]:
    async with Client.from_kubeconfig(server.kubeconfig) as c:
        await ensure_crds(c)  # BackupPolicy is VMO's CRD
        yield c
    await asyncio.sleep(0.1)  # let aiohttp close its TLS transports


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


Start = Callable[..., Awaitable[ClusterStateCollector]]


@pytest.fixture
async def start(client: Client) -> AsyncIterator[Start]:
    """Starts a collector on fresh informers and waits until they listed everything."""
    started: list[ClusterStateCollector] = []

    async def make(**kwargs: Any) -> ClusterStateCollector:
        collector = ClusterStateCollector(Informers(client), **kwargs)
        collector.start()
        started.append(collector)
        await asyncio.wait_for(collector.wait_synced(), 10)
        return collector

    yield make
    for collector in started:
        await collector.stop()


# --- VMs ----------------------------------------------------------------------------------------


async def test_a_vm_is_one_info_series_with_its_status_group_and_template_labels(
    client: Client, start: Start
) -> None:
    await vm(client, "web", printableStatus="Running", conditions=[condition("Ready")])
    scrape = Scrape(await start())
    assert scrape.series("kubevirt_vm_info") == [
        {"namespace": NS, "name": "web", "status": "Running", "status_group": "running",
         "os": "fedora", "workload": "server", "flavor": "small",
         "instance_type": "<none>", "preference": "<none>"}
    ]  # fmt: skip
    assert scrape.value("kubevirt_vm_info", name="web") == 1
    assert scrape.value("kubevirt_number_of_vms", namespace=NS) == 1


async def test_only_the_current_groups_transition_family_carries_the_time(
    client: Client, start: Start
) -> None:
    await vm(client, "web", printableStatus="Running", conditions=[condition("Ready")])
    scrape = Scrape(await start())
    for group in facts.GROUPS:
        family = f"kubevirt_vm_{group}_status_last_transition_timestamp_seconds"
        assert scrape.series(family) == [{"namespace": NS, "name": "web"}]
        want = STAMP_SECONDS if group == "running" else 0.0
        assert scrape.value(family, name="web") == want


async def test_a_status_change_the_collector_sees_is_timed_when_it_happened(
    client: Client, start: Start
) -> None:
    await vm(client, "web", printableStatus="Stopped", conditions=[condition("Ready", "False")])
    clock = Clock()
    collector = await start(clock=clock)
    clock.now += 100
    await client.patch_status(VM, "web", {"printableStatus": "Starting"}, NS)
    family = "kubevirt_vm_starting_status_last_transition_timestamp_seconds"
    # the Ready condition did not move: the time is the change's, not the condition's
    await eventually(lambda: Scrape(collector).value(family, name="web") == clock.now)
    clock.now += 50
    assert Scrape(collector).value(family, name="web") == clock.now - 50
    assert (
        Scrape(collector).value(
            "kubevirt_vm_non_running_status_last_transition_timestamp_seconds", name="web"
        )
        == 0
    )


async def test_a_vm_without_conditions_is_timed_from_when_the_collector_first_saw_it(
    client: Client, start: Start
) -> None:
    await vm(client, "web", printableStatus="CrashLoopBackOff")
    clock = Clock()
    collector = await start(clock=clock)
    clock.now += 30
    scrape = Scrape(collector)
    assert scrape.value("kubevirt_vm_info", name="web", status_group="error") == 1
    family = "kubevirt_vm_error_status_last_transition_timestamp_seconds"
    assert scrape.value(family, name="web") == clock.now - 30


async def test_a_vms_requests_and_start_failures(client: Client, start: Start) -> None:
    await vm(client, "web", startFailure={"consecutiveFailCount": 3})
    await vm(client, "db")
    scrape = Scrape(await start())
    requests = "kubevirt_vm_resource_requests"
    assert scrape.value(requests, name="web", resource="cpu", unit="cores") == 2  # vCPUs
    assert scrape.value(requests, name="web", resource="memory", unit="bytes") == 64 * 2**20
    assert scrape.value("vmo_vm_start_failures", name="web") == 3
    assert scrape.value("vmo_vm_start_failures", name="db") == 0
    assert scrape.value("kubevirt_number_of_vms", namespace=NS) == 2


async def test_a_deleted_vms_series_disappear(client: Client, start: Start) -> None:
    await vm(client, "web", printableStatus="Running")
    await vm(client, "db", printableStatus="Stopped")
    collector = await start()
    assert {s["name"] for s in Scrape(collector).series("kubevirt_vm_info")} == {"web", "db"}
    await client.delete(VM, "web", NS)

    def gone() -> bool:
        scrape = Scrape(collector)
        return not any(
            s.labels.get("name") == "web" for f in scrape.families.values() for s in f.samples
        )

    await eventually(gone)
    scrape = Scrape(collector)
    assert scrape.value("kubevirt_vm_info", name="db") == 1
    assert scrape.value("kubevirt_number_of_vms", namespace=NS) == 1


# --- VMIs and nodes -----------------------------------------------------------------------------


async def test_a_vmi_is_one_info_series_with_its_node_phase_and_guest_os(
    client: Client, start: Start
) -> None:
    await node(client, "node-a")
    await vm(client, "web")
    guest = {"name": "Fedora Linux", "versionId": "40", "kernelRelease": "6.8.5",
             "machine": "x86_64"}  # fmt: skip
    await vmi(client, "web", phase="Running", nodeName="node-a", guestOSInfo=guest)
    scrape = Scrape(await start())
    assert scrape.series("kubevirt_vmi_info") == [
        {"namespace": NS, "name": "web", "node": "node-a", "phase": "running",
         "os": "fedora", "workload": "server", "flavor": "small",  # from the VM's template
         "instance_type": "<none>", "preference": "<none>",
         "guest_os_name": "Fedora Linux", "guest_os_version_id": "40",
         "guest_os_kernel_release": "6.8.5", "guest_os_machine": "x86_64", "evictable": "true"}
    ]  # fmt: skip
    assert scrape.value("kubevirt_vmi_phase_count", node="node-a", phase="running") == 1


async def test_a_vmi_that_must_live_migrate_but_cannot_is_not_evictable(
    client: Client, start: Start
) -> None:
    strategy = {"evictionStrategy": "LiveMigrate"}
    not_migratable = [condition("LiveMigratable", "False")]
    await vmi(client, "stuck", strategy, phase="Running", nodeName="n", conditions=not_migratable)
    await vmi(client, "free", strategy, phase="Running", nodeName="n",
              conditions=[condition("LiveMigratable")])  # fmt: skip
    await vmi(client, "plain", phase="Running", nodeName="n", conditions=not_migratable)
    scrape = Scrape(await start())
    assert scrape.value("kubevirt_vmi_non_evictable", name="stuck", node="n") == 1
    assert scrape.value("kubevirt_vmi_info", name="stuck", evictable="false") == 1
    for name in ("free", "plain"):  # one migrates; the other is simply shut down
        assert scrape.value("kubevirt_vmi_non_evictable", name=name) == 0
        assert scrape.value("kubevirt_vmi_info", name=name, evictable="true") == 1


async def test_a_nodes_requested_resources_are_the_sum_of_its_running_vmis(
    client: Client, start: Start
) -> None:
    await node(client, "node-a")
    await node(client, "node-b", ready=False, cpu="2")
    asks = {
        "domain": {**SPEC["domain"], "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}}
    }
    await vmi(client, "big", asks, phase="Running", nodeName="node-a")
    await vmi(client, "small", phase="Running", nodeName="node-a")  # 2 vCPUs: 1/10 each
    await vmi(client, "done", phase="Succeeded", nodeName="node-a")
    await vmi(client, "pending", phase="Pending")
    scrape = Scrape(await start())
    requested = "vmo_node_requested"
    assert scrape.value(requested, node="node-a", resource="cpu", unit="cores") == 0.5 + 0.2
    assert scrape.value(requested, node="node-a", resource="memory") == 2**30 + 64 * 2**20
    assert scrape.value(requested, node="node-b", resource="cpu") == 0
    assert scrape.value("vmo_node_allocatable", node="node-b", resource="cpu", unit="cores") == 2
    assert scrape.value("vmo_node_allocatable", node="node-a", resource="memory") == 8 * 2**30
    assert scrape.value("vmo_node_ready", node="node-a") == 1
    assert scrape.value("vmo_node_ready", node="node-b") == 0
    assert scrape.value("kubevirt_allocatable_nodes") == 1
    assert scrape.value("kubevirt_nodes_with_kvm") == 0


async def test_emulation_follows_the_kubevirt_cr(client: Client, start: Start) -> None:
    collector = await start()
    assert Scrape(collector).value("kubevirt_configuration_emulation_enabled") == 0
    await client.create(NAMESPACE, {"metadata": {"name": "kubevirt"}})
    dev = {"developerConfiguration": {"useEmulation": True}}
    body = {"metadata": {"name": "kubevirt", "namespace": "kubevirt"},
            "spec": {"configuration": dev}}  # fmt: skip
    await client.create(KUBEVIRT, body, "kubevirt")
    await eventually(
        lambda: Scrape(collector).value("kubevirt_configuration_emulation_enabled") == 1
    )


# --- migrations ---------------------------------------------------------------------------------


async def test_migrations_are_counted_by_phase_and_ended_ones_per_vmi(
    client: Client, start: Start
) -> None:
    # one migration of a VMI in flight at a time: the ended ones first
    made = [("m1", "Succeeded", "web"), ("m2", "Succeeded", "web"), ("m3", "Failed", "web"),
            ("m4", "Pending", "web"), ("m5", "Failed", "db"), ("m6", "", "db"),
            ("m7", "TargetReady", "app")]  # fmt: skip
    for target in ("web", "db", "app"):
        await vmi(client, target, phase="Running", nodeName="node-a")
    for name, phase, target in made:
        body = {"metadata": {"name": name, "namespace": NS}, "spec": {"vmiName": target}}
        await client.create(VMIM, body, NS)
        if phase:
            await client.patch_status(VMIM, name, {"phase": phase}, NS)
    scrape = Scrape(await start())
    for gauge, want in (("pending", 1), ("scheduling", 0), ("running", 1), ("unset", 1)):
        assert scrape.value(f"kubevirt_vmi_migrations_in_{gauge}_phase") == want
    assert scrape.value("kubevirt_vmi_migration_succeeded", namespace=NS, vmi="web") == 2
    assert scrape.value("kubevirt_vmi_migration_failed", namespace=NS, vmi="web") == 1
    assert scrape.value("kubevirt_vmi_migration_failed", namespace=NS, vmi="db") == 1
    assert scrape.value("kubevirt_vmi_migration_succeeded", namespace=NS, vmi="db") == 0
    assert scrape.value("kubevirt_vmi_migration_failed", vmi="app") is None  # none ended


# --- snapshots, clones, backups -----------------------------------------------------------------

SNAPSHOT_COUNT = "vmo_snapshot_duration_seconds_count"


async def test_a_finished_snapshot_is_observed_exactly_once(client: Client, start: Start) -> None:
    collector = await start()
    await snapshot(client, "s1", phase="InProgress")
    await eventually(lambda: Scrape(collector).value("vmo_snapshots", phase="InProgress") == 1)
    assert Scrape(collector).value(SNAPSHOT_COUNT, result="succeeded") is None
    await client.patch_status(VMSNAPSHOT, "s1", {"phase": "Succeeded", "readyToUse": True}, NS)
    await eventually(lambda: Scrape(collector).value(SNAPSHOT_COUNT, result="succeeded") == 1)
    await client.patch_status(VMSNAPSHOT, "s1", {"indications": ["Online"]}, NS)  # still ended
    await eventually(lambda: Scrape(collector).value("vmo_snapshots", phase="Succeeded") == 1)
    await asyncio.sleep(0.2)
    scrape = Scrape(collector)
    assert scrape.value(SNAPSHOT_COUNT, namespace=NS, result="succeeded") == 1
    assert scrape.value("vmo_snapshot_duration_seconds_bucket", le="+Inf") == 1
    await client.delete(VMSNAPSHOT, "s1", NS)
    await eventually(lambda: Scrape(collector).series("vmo_snapshots") == [])
    assert Scrape(collector).value(SNAPSHOT_COUNT, result="succeeded") == 1  # counted, not undone
    assert len(collector.durations.seen) == 0  # a deleted object's uid is forgotten


async def test_a_snapshot_that_ended_before_the_collector_started_is_not_observed(
    client: Client, start: Start
) -> None:
    await snapshot(client, "old", phase="Failed")
    scrape = Scrape(await start())
    assert scrape.value("vmo_snapshots", namespace=NS, phase="Failed") == 1
    assert scrape.value(SNAPSHOT_COUNT, result="failed") is None


async def test_a_failed_clone_is_counted_by_phase_and_observed_as_failed(
    client: Client, start: Start
) -> None:
    collector = await start()
    body = {"metadata": {"name": "c1", "namespace": NS},
            "spec": {"source": ref("VirtualMachine", "web")}}  # fmt: skip
    await client.create(VMCLONE, body, NS)
    await eventually(lambda: Scrape(collector).value("vmo_clones", phase="Unset") == 1)
    await client.patch_status(VMCLONE, "c1", {"phase": "Failed"}, NS)
    await eventually(
        lambda: Scrape(collector).value("vmo_clone_duration_seconds_count", result="failed") == 1
    )
    assert Scrape(collector).value("vmo_clones", namespace=NS, phase="Failed") == 1


async def test_a_clone_that_ends_while_the_collector_is_paused_is_observed_once_back(
    client: Client, start: Start
) -> None:
    """A lost and regained Lease stops and restarts the collector in one process: what ended
    meanwhile is counted when it lists again, and what it counted before is not counted twice."""
    collector = await start()
    count = "vmo_clone_duration_seconds_count"
    for name in ("before", "during"):
        body = {"metadata": {"name": name, "namespace": NS},
                "spec": {"source": ref("VirtualMachine", "web")}}  # fmt: skip
        await client.create(VMCLONE, body, NS)
    await eventually(lambda: Scrape(collector).value("vmo_clones", phase="Unset") == 2)
    await client.patch_status(VMCLONE, "before", {"phase": "Succeeded"}, NS)
    await eventually(lambda: Scrape(collector).value(count, result="succeeded") == 1)
    await collector.stop()
    await client.patch_status(VMCLONE, "during", {"phase": "Succeeded"}, NS)
    collector.start()
    await asyncio.wait_for(collector.wait_synced(), 10)
    await eventually(lambda: Scrape(collector).value(count, result="succeeded") == 2)
    await asyncio.sleep(0.3)
    assert Scrape(collector).value(count, result="succeeded") == 2


async def test_a_completed_backup_is_observed_with_its_type(client: Client, start: Start) -> None:
    collector = await start()
    body = {"metadata": {"name": "b1", "namespace": NS},
            "spec": {"source": ref("VirtualMachine", "web"), "pvcName": "scratch"}}  # fmt: skip
    await client.create(VMBACKUP, body, NS)
    await eventually(lambda: Scrape(collector).value("vmo_backups", phase="Pending") == 1)
    await client.patch_status(
        VMBACKUP, "b1", {"type": "Incremental", "conditions": [condition("Progressing")]}, NS
    )
    await eventually(lambda: Scrape(collector).value("vmo_backups", phase="Progressing") == 1)
    done = [condition("Progressing", "False"), condition("Complete")]
    await client.patch_status(VMBACKUP, "b1", {"conditions": done}, NS)
    count = "vmo_backup_duration_seconds_count"
    await eventually(
        lambda: Scrape(collector).value(count, type="Incremental", result="succeeded") == 1
    )
    assert Scrape(collector).value("vmo_backups", namespace=NS, phase="Succeeded") == 1


async def test_a_policys_recovery_points_and_objective(client: Client, start: Start) -> None:
    body = {"metadata": {"name": "hourly", "namespace": NS},
            "spec": {"repository": "repo", "schedule": "0 * * * *"}}  # fmt: skip
    await client.create(BACKUP_POLICY, body, NS)
    points = [{"name": "web", "recoveryPoint": STAMP}, {"name": "db", "running": True}]
    await client.patch_status(BACKUP_POLICY, "hourly", {"virtualMachines": points}, NS)
    scrape = Scrape(await start())
    assert scrape.series("vmo_backup_recovery_point_timestamp_seconds") == [
        {"namespace": NS, "policy": "hourly", "vm": "web"}
    ]
    assert scrape.value("vmo_backup_recovery_point_timestamp_seconds", vm="web") == STAMP_SECONDS
    assert scrape.value("vmo_backup_recovery_point_objective_seconds", policy="hourly") == 7200
    # its backups are deleted once stored: the namespace keeps every phase, at 0
    assert {s["phase"]: scrape.value("vmo_backups", **s) for s in scrape.series("vmo_backups")} == {
        "Pending": 0,
        "Progressing": 0,
        "Succeeded": 0,
        "Failed": 0,
    }


async def test_a_policy_run_the_collector_sees_is_observed_as_a_backup(
    client: Client, start: Start
) -> None:
    body = {"metadata": {"name": "nightly", "namespace": NS},
            "spec": {"repository": "repo", "schedule": "0 1 * * *"}}  # fmt: skip
    await client.create(BACKUP_POLICY, body, NS)
    collector = await start()
    entry = {"name": "web", "lastBackup": "b-1", "lastBackupType": "Full",
             "recoveryPoint": STAMP, "lastSuccessTime": "2026-01-02T03:05:05Z"}  # fmt: skip
    await client.patch_status(BACKUP_POLICY, "nightly", {"virtualMachines": [entry]}, NS)
    count = "vmo_backup_duration_seconds_count"
    await eventually(lambda: Scrape(collector).value(count, type="Full", result="succeeded") == 1)
    assert Scrape(collector).value("vmo_backup_duration_seconds_sum", type="Full") == 60


# --- label hygiene and modes --------------------------------------------------------------------

UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d|^\d{9,}(\.\d+)?$")


async def test_no_label_value_is_a_uid_or_a_timestamp(client: Client, start: Start) -> None:
    await node(client, "node-a")
    made = [
        await vm(client, "web", printableStatus="Running", conditions=[condition("Ready")]),
        await vmi(client, "web", phase="Running", nodeName="node-a"),
        await snapshot(client, "s1", phase="Succeeded"),
    ]
    collector = await start()
    made.append(await snapshot(client, "s2", phase="Failed"))
    await eventually(lambda: Scrape(collector).value(SNAPSHOT_COUNT, result="failed") == 1)
    uids = {str(obj["metadata"]["uid"]) for obj in made}
    values = {
        value
        for family in Scrape(collector).families.values()
        for sample in family.samples
        for name, value in sample.labels.items()
        if name != "le"  # a histogram's bucket bound
    }
    assert values and not values & uids
    assert not [v for v in values if UID.search(v) or TIMESTAMP.search(v)]


async def test_without_kubevirt_families_only_vmos_are_exported(
    client: Client, start: Start
) -> None:
    await node(client, "node-a")
    await vm(client, "web", printableStatus="Running")
    names = Scrape(await start(kubevirt_families=False)).names()
    assert not [n for n in names if n.startswith("kubevirt_")]
    assert set(VMO_FAMILIES) <= names
    assert "vmo_snapshot_duration_seconds" in names


def catalogue_families() -> set[str]:
    """The names in the first column of docs/monitoring.md's "Cluster state" table; a
    ``_suffix`` after a slash replaces as many trailing words of the name before it."""
    text = (Path(__file__).parent.parent / "docs" / "monitoring.md").read_text()
    section = text.split("### Cluster state")[1].split("###")[0]
    names: set[str] = set()
    for row in section.splitlines():
        cells = row.split("|")
        if len(cells) < 3:
            continue
        full = ""
        for token in re.findall(r"`([a-z_]+)`", cells[1]):
            if token.startswith("_") and full:
                words = token.count("_")
                token = "_".join(full.split("_")[:-words]) + token
            full = token
            names.add(token)
    return {n for n in names if n.startswith(("kubevirt_", "vmo_"))}


async def test_every_family_of_the_catalogue_is_exported(client: Client, start: Start) -> None:
    catalogue = catalogue_families()
    assert "kubevirt_vmi_migrations_in_unset_phase" in catalogue and len(catalogue) > 30
    names = Scrape(await start()).names()
    assert catalogue <= names, catalogue - names


async def test_the_runnable_registers_the_collector_only_while_it_runs(client: Client) -> None:
    registry = CollectorRegistry()
    stop = asyncio.Event()
    task = asyncio.create_task(run_state_collector(client, stop, registry))

    def exported() -> bool:
        return "kubevirt_vm_info" in generate_latest(registry).decode()

    await eventually(exported)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert not exported()


async def test_the_runnable_watches_only_the_kinds_the_api_serves(client: Client) -> None:
    nothing = Resource("vmo.dev", "v1alpha1", "nothings", "Nothing")
    elsewhere = Resource("example.com", "v1", "things", "Thing")
    assert await served(client, [VM, nothing, elsewhere, NODE]) == [VM, NODE]
    state = StateMetrics(client, registry=CollectorRegistry(), informers=Informers(client))
    stop = asyncio.Event()
    task = asyncio.create_task(state.run(stop))
    await eventually(lambda: len(state.collector.watching) == len(state.collector.resources))
    stop.set()
    await asyncio.wait_for(task, 10)
    assert state.collector.watching == []


# --- pure facts ---------------------------------------------------------------------------------


def test_printable_statuses_map_to_kubevirts_status_groups() -> None:
    assert facts.status_group("Running") == "running"
    for printable in ("Starting", "Provisioning", "WaitingForVolumeBinding"):
        assert facts.status_group(printable) == "starting"
    assert facts.status_group("Migrating") == "migrating"
    for printable in ("Stopped", "Paused", "Stopping", "Terminating"):
        assert facts.status_group(printable) == "non_running"
    for printable in ("CrashLoopBackOff", "ErrorUnschedulable", "ErrImagePull",
                      "ImagePullBackOff", "ErrorPvcNotFound", "ErrorDataVolumeNotFound",
                      "DataVolumeError", "Unknown"):  # fmt: skip
        assert facts.status_group(printable) == "error"
    assert facts.status_group("") == facts.UNKNOWN_GROUP


def test_instance_type_and_preference_come_from_the_spec_or_the_vmis_annotations() -> None:
    vm_ = {"metadata": {"name": "a"}, "spec": {"instancetype": {"name": "u1.small"},
                                               "preference": {"name": "fedora"}}}  # fmt: skip
    assert facts.vm_facts(vm_).info[3:] == ("u1.small", "fedora")
    assert facts.vm_facts({"metadata": {"name": "b"}}).info == ("<none>",) * 5
    annotated = {"metadata": {"annotations": {"kubevirt.io/cluster-instancetype-name": "cx1"}}}
    assert facts.vmi_instance_type(annotated, vm_) == "cx1"
    assert facts.vmi_preference(annotated, vm_) == "fedora"  # from its VM


def test_the_objective_is_twice_the_longest_gap_of_the_schedule() -> None:
    assert facts.schedule_interval("*/15 * * * *") == 900
    assert facts.schedule_interval("0 9 * * 1-5") == 3 * 86400  # Friday to Monday
    assert facts.recovery_point_objective({"spec": {"schedule": "0 0 * * *"}}) == 2 * 86400
    assert facts.recovery_point_objective({"spec": {"schedule": "not cron"}}) is None


def test_a_vmis_cpu_request_is_its_own_else_a_share_of_its_vcpus() -> None:
    domain = {"cpu": {"sockets": 2, "cores": 2}, "memory": {"guest": "1Gi"}}
    assert facts.vmi_requests({"spec": {"domain": domain}}) == (0.4, 2**30)
    assert facts.vmi_requests({"spec": {"domain": domain}}, ratio=4) == (1.0, 2**30)
    dedicated = {**domain, "cpu": {**domain["cpu"], "dedicatedCpuPlacement": True}}
    assert facts.vmi_requests({"spec": {"domain": dedicated}})[0] == 4
    asks = {**domain, "resources": {"requests": {"cpu": "1500m", "memory": "2Gi"}}}
    assert facts.vmi_requests({"spec": {"domain": asks}}) == (1.5, 2 * 2**30)


def test_the_set_of_observed_uids_is_bounded() -> None:
    seen = Seen(limit=3)
    assert all(seen.add(uid) for uid in "abcd")
    assert len(seen) == 3
    assert not seen.add("d") and seen.add("a")  # the oldest went first


def test_a_policy_run_is_timed_once_from_its_recovery_point_to_its_success() -> None:
    """Pull-mode backups end by deletion: the policy's status is what says a run finished."""
    from vmo.controllers.monitoring.state import Durations

    durations = Durations(lambda: 0.0)

    def policy(backup: str, point: str, done: str) -> dict[str, Any]:
        entry = {"name": "vm1", "lastBackup": backup, "lastBackupType": "Incremental",
                 "recoveryPoint": point, "lastSuccessTime": done}  # fmt: skip
        return {"metadata": {"uid": "p-1", "namespace": "ns", "name": "nightly"},
                "status": {"virtualMachines": [entry]}}  # fmt: skip

    durations.on_policy(policy("b0", "2026-01-01T00:00:00Z", "2026-01-01T00:00:05Z"), initial=True)
    first = policy("b1", "2026-01-01T01:00:00Z", "2026-01-01T01:00:30Z")
    durations.on_policy(first, initial=False)
    durations.on_policy(first, initial=False)  # the same run seen again: not counted twice
    samples = {
        (s.name, s.labels.get("type"), s.labels.get("result")): s.value
        for metric in durations.backups.collect()
        for s in metric.samples
    }
    assert samples[("vmo_backup_duration_seconds_count", "Incremental", "succeeded")] == 1
    assert samples[("vmo_backup_duration_seconds_sum", "Incremental", "succeeded")] == 30
