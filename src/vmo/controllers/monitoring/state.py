"""The cluster-state collector of VMO's controllers process: virt-controller's object-derived
metrics (``kubevirt_vm_*``, ``kubevirt_vmi_info``, migrations, nodes) and VMO's own
(``vmo_node_*``, start failures, snapshots, clones, backups, recovery points), as
docs/monitoring.md's "Cluster state" table names them.

A scrape reads only what the informers hold: ``collect()`` does no I/O and never waits. The
duration histograms are fed by informer events instead, so a snapshot that ends and goes between
two scrapes still counts, exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vmo.client import (
    KUBEVIRT,
    NODE,
    TRANSIENT_ERRORS,
    VM,
    VMBACKUP,
    VMCLONE,
    VMI,
    VMIM,
    VMSNAPSHOT,
    ApiStatusError,
    Client,
    NotFound,
    Resource,
)
from vmo.controllers.backup.policy import BACKUP_POLICY, POLICY_LABEL
from vmo.controllers.monitoring import facts
from vmo.runtime import DELETED, Informer, Informers, object_key

log = logging.getLogger(__name__)

JSON = dict[str, Any]
T = TypeVar("T")
Handler = Callable[[str, JSON], None]

INFO = ("os", "workload", "flavor", "instance_type", "preference")
GUEST_OS = ("guest_os_name", "guest_os_version_id", "guest_os_kernel_release", "guest_os_machine")
RESOURCE = ("resource", "unit")
MIGRATION_GAUGES = ("pending", "scheduling", "running", "unset")


def transition_family(group: str) -> str:
    return f"kubevirt_vm_{group}_status_last_transition_timestamp_seconds"


# name -> (help, labels). The *_status_last_transition_timestamp_seconds ones are KubeVirt's
# counters, exported here as gauges: prometheus_client would name a counter's sample ..._total,
# and KubeVirt's queries use the bare name (the value is a timestamp or 0, never a count).
KUBEVIRT_FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "kubevirt_vm_info": (
        "Information about Virtual Machines",
        ("namespace", "name", "status", "status_group", *INFO),
    ),
    "kubevirt_vmi_info": (
        "Information about VirtualMachineInstances",
        ("namespace", "name", "node", "phase", *INFO, *GUEST_OS, "evictable"),
    ),
    "kubevirt_vmi_phase_count": (
        "VMIs by node, phase, os, workload, flavor, instance type and preference",
        ("node", "phase", *INFO),
    ),
    "kubevirt_number_of_vms": ("The number of VMs in the namespace", ("namespace",)),
    **{
        transition_family(group): (
            f"The VM's last transition timestamp to a {group} status (0 unless in one)",
            ("namespace", "name"),
        )
        for group in facts.GROUPS
    },
    "kubevirt_vm_resource_requests": (
        "The resources the VM's template requests",
        ("namespace", "name", *RESOURCE),
    ),
    "kubevirt_vmi_non_evictable": (
        "1 when the VMI's eviction strategy is LiveMigrate but it is not live-migratable",
        ("namespace", "name", "node"),
    ),
    **{
        f"kubevirt_vmi_migrations_in_{gauge}_phase": (f"Migrations in the {gauge} phase", ())
        for gauge in MIGRATION_GAUGES
    },
    "kubevirt_vmi_migration_succeeded": (
        "Succeeded migrations of the VMI that the API still holds",
        ("namespace", "vmi"),
    ),
    "kubevirt_vmi_migration_failed": (
        "Failed migrations of the VMI that the API still holds",
        ("namespace", "vmi"),
    ),
    "kubevirt_allocatable_nodes": ("Nodes that are Ready and schedulable", ()),
    "kubevirt_nodes_with_kvm": ("Nodes that advertise devices.kubevirt.io/kvm", ()),
    "kubevirt_configuration_emulation_enabled": (
        "1 when the KubeVirt CR enables software emulation (useEmulation)",
        (),
    ),
}
VMO_FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "vmo_node_allocatable": ("The Node's status.allocatable", ("node", *RESOURCE)),
    "vmo_node_requested": ("The sum of the requests of the VMIs on the node", ("node", *RESOURCE)),
    "vmo_node_ready": ("1 when the Node's Ready condition is True", ("node",)),
    "vmo_vm_start_failures": (
        "The VM's consecutive failed starts (status.startFailure.consecutiveFailCount)",
        ("namespace", "name"),
    ),
    "vmo_snapshots": ("VirtualMachineSnapshots by phase", ("namespace", "phase")),
    "vmo_clones": ("VirtualMachineClones by phase", ("namespace", "phase")),
    "vmo_backups": ("VirtualMachineBackups by phase", ("namespace", "phase")),
    "vmo_backup_recovery_point_timestamp_seconds": (
        "The newest recovery point of the VM under the BackupPolicy",
        ("namespace", "policy", "vm"),
    ),
    "vmo_backup_recovery_point_objective_seconds": (
        "The recovery point age the BackupPolicy allows (twice its schedule's interval)",
        ("namespace", "policy"),
    ),
}

SNAPSHOT_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
BACKUP_BUCKETS = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
                  14400.0, 28800.0)  # fmt: skip
SEEN_LIMIT = 65536  # uids of ended objects remembered (those of deleted ones are forgotten)
# How often kinds the API did not serve (a CRD not installed yet) are looked for again.
DISCOVERY_SECONDS = 30.0
DISCOVERY_ERRORS: tuple[type[Exception], ...] = (ApiStatusError, *TRANSIENT_ERRORS)


def _ns_name(obj: JSON) -> tuple[str, str]:
    md = facts.metadata(obj)
    return str(md.get("namespace") or ""), str(md.get("name") or "")


def _rv(obj: JSON) -> str:
    return str(facts.metadata(obj).get("resourceVersion") or "")


def _ignore(_etype: str, _obj: JSON) -> None:
    """The handler of an informer the collector only reads the cache of."""


class Seen:
    """Uids already accounted for, bounded: a deleted object's is forgotten, and past ``limit``
    the oldest go first."""

    def __init__(self, limit: int = SEEN_LIMIT) -> None:
        self.limit = limit
        self._uids: OrderedDict[str, None] = OrderedDict()

    def add(self, uid: str) -> bool:
        """Remembers ``uid``; False when it was remembered already."""
        if uid in self._uids:
            return False
        self._uids[uid] = None
        while len(self._uids) > self.limit:
            self._uids.popitem(last=False)
        return True

    def forget(self, uid: str) -> None:
        self._uids.pop(uid, None)

    def clear(self) -> None:
        self._uids.clear()

    def __len__(self) -> int:
        return len(self._uids)


@dataclass(frozen=True)
class StatusSeen:
    """When the collector saw a VM's printable status begin; ``changed``: it saw the change
    itself (an event after its first listing), rather than finding the VM in that status."""

    status: str
    when: float
    changed: bool


class Memo(Generic[T]):
    """What was derived from each object, kept while what it was derived from is unchanged
    (the resourceVersions in ``version``). Each scrape keeps only what it asked for, so the
    facts of deleted objects go with the next one."""

    def __init__(self) -> None:
        self._kept: dict[str, tuple[tuple[str, ...], T]] = {}
        self._asked: dict[str, tuple[tuple[str, ...], T]] = {}

    def get(self, key: str, version: tuple[str, ...], derive: Callable[[], T]) -> T:
        hit = self._kept.get(key)
        value = hit[1] if hit is not None and hit[0] == version else derive()
        self._asked[key] = (version, value)
        return value

    def rotate(self) -> None:
        """Ends a scrape: what it did not ask for is dropped."""
        self._kept, self._asked = self._asked, {}

    def __len__(self) -> int:
        return len(self._kept)


class Durations:
    """The duration histograms: each snapshot, clone and backup observed once, when an event
    first shows it ended. One already ended when the collector first lists it ended before this
    process watched: it is remembered, not observed (a restart must not count it again). A
    collector that stopped watching and started again in the same process (a lost and regained
    Lease) keeps its histograms, and observes what ended in between (``paused_at``)."""

    def __init__(self, clock: Callable[[], float], limit: int = SEEN_LIMIT) -> None:
        self.clock = clock
        self.seen = Seen(limit)
        self.paused_at: float | None = None  # when this process last stopped watching
        self.snapshots = Histogram(
            "vmo_snapshot_duration_seconds",
            "VirtualMachineSnapshot creation to ready or failure",
            ["namespace", "result"],
            buckets=SNAPSHOT_BUCKETS,
            registry=None,
        )
        self.clones = Histogram(
            "vmo_clone_duration_seconds",
            "VirtualMachineClone creation to success or failure",
            ["namespace", "result"],
            buckets=SNAPSHOT_BUCKETS,
            registry=None,
        )
        self.backups = Histogram(
            "vmo_backup_duration_seconds",
            "VirtualMachineBackup creation to completion or failure",
            ["namespace", "type", "result"],
            buckets=BACKUP_BUCKETS,
            registry=None,
        )

    @property
    def histograms(self) -> tuple[Histogram, ...]:
        return self.snapshots, self.clones, self.backups

    def on_event(self, resource: Resource, etype: str, obj: JSON, *, initial: bool) -> None:
        uid = str(facts.metadata(obj).get("uid") or "")
        if not uid:
            return
        ended = self._outcome(resource, obj)
        if ended is not None and self.seen.add(uid) and self._news(obj, ended[1], initial):
            self._observe(resource, obj, *ended)
        if etype == DELETED:
            self.seen.forget(uid)  # it cannot come back: its uid need not be remembered

    def on_policy(self, policy: JSON, *, initial: bool) -> None:
        """VMO's backup application ends a pull-mode VirtualMachineBackup by deleting it, so its
        own record tells how a run went: a VM's new ``lastBackup`` took from its recovery point
        (the backup's start) to ``lastSuccessTime``; a new ``lastFailureTime`` is a failure."""
        uid = str(facts.metadata(policy).get("uid") or "")
        namespace, _ = _ns_name(policy)
        for entry in (policy.get("status") or {}).get("virtualMachines") or []:
            vm = str(entry.get("name") or "")
            done = facts.seconds(entry.get("lastSuccessTime"))
            start = facts.seconds(entry.get("recoveryPoint"))
            backup = str(entry.get("lastBackup") or "")
            kind = "Incremental" if entry.get("lastBackupType") == "Incremental" else "Full"
            if (
                backup
                and done is not None
                and start is not None
                and self.seen.add(f"{uid}/{vm}/{backup}")
                and (not initial or self._after_pause(done))
            ):
                self.backups.labels(namespace, kind, facts.SUCCEEDED).observe(
                    max(done - start, 0.0)
                )
            failed = str(entry.get("lastFailureTime") or "")
            if failed and self.seen.add(f"{uid}/{vm}/failed/{failed}") and not initial:
                self.backups.labels(namespace, kind, facts.FAILED).observe(0.0)

    def _after_pause(self, when: float) -> bool:
        return self.paused_at is not None and when >= self.paused_at

    def _news(self, obj: JSON, took: float, initial: bool) -> bool:
        """Whether an ended object is to be observed: an event shows it ending, or a listing
        after a pause finds it ended since."""
        if not initial:
            return True
        created = facts.seconds(facts.metadata(obj).get("creationTimestamp"))
        return created is not None and self._after_pause(created + took)

    def _outcome(self, resource: Resource, obj: JSON) -> tuple[str, float] | None:
        now = self.clock()
        if resource == VMBACKUP:
            return facts.outcome(obj, facts.backup_phase(obj), now)
        return facts.outcome(obj, facts.phase(obj), now)

    def _observe(self, resource: Resource, obj: JSON, result: str, seconds: float) -> None:
        namespace, _ = _ns_name(obj)
        if resource == VMBACKUP:
            if POLICY_LABEL in (facts.metadata(obj).get("labels") or {}):
                return  # the policy's own record counts it (on_policy), deleted or not
            self.backups.labels(namespace, facts.backup_type(obj), result).observe(seconds)
        elif resource == VMCLONE:
            self.clones.labels(namespace, result).observe(seconds)
        else:
            self.snapshots.labels(namespace, result).observe(seconds)


class ClusterStateCollector(Collector):
    """A prometheus_client collector of the cluster's state, from the informers of ``informers``.

    ``start()`` subscribes to them (starting those not yet running), ``stop()`` lets them go.
    ``kubevirt_families=False`` (on a cluster whose virt-controller exports its own) leaves out
    every ``kubevirt_*`` family and keeps VMO's.
    """

    def __init__(
        self,
        informers: Informers,
        *,
        kubevirt_families: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.informers = informers
        self.kubevirt_families = kubevirt_families
        self.clock = clock
        self.durations = Durations(clock)
        self._status_since: dict[str, StatusSeen] = {}  # by VM key
        self._vms: Memo[facts.VmFacts] = Memo()
        self._vmis: Memo[facts.VmiFacts] = Memo()
        self._subscriptions: list[tuple[Informer, int]] = []
        self._priming = False

    @property
    def resources(self) -> list[Resource]:
        kinds = [VM, VMI, NODE, KUBEVIRT, VMSNAPSHOT, VMCLONE, VMBACKUP, BACKUP_POLICY]
        return [*kinds, VMIM] if self.kubevirt_families else kinds

    # --- informers ------------------------------------------------------------------------------

    @property
    def watching(self) -> list[Resource]:
        return [informer.selector.resource for informer, _ in self._subscriptions]

    def start(self, resources: Iterable[Resource] | None = None) -> None:
        """Subscribes to ``resources`` (default: every kind it reads) but those it follows
        already; call it on the event loop the informers run on."""
        for resource in self.resources if resources is None else resources:
            if resource in self.watching:
                continue
            informer = self.informers.get(resource)
            self._priming = True  # add_handler replays the cache: what it holds is not news
            try:
                handle = informer.add_handler(self._handler(resource, informer))
            finally:
                self._priming = False
            self._subscriptions.append((informer, handle))

    async def stop(self) -> None:
        """Lets the informers go, and what was learnt from their events: started again, the
        collector lists everything afresh (a VM deleted meanwhile sends no event)."""
        for informer, handle in self._subscriptions:
            await informer.remove_handler(handle)
        self._subscriptions.clear()
        self._status_since.clear()
        # what was observed stays observed (``seen`` is kept): a pause must not count it twice
        self.durations.paused_at = self.clock()

    async def wait_synced(self) -> None:
        for informer, _ in self._subscriptions:
            await informer.wait_synced()

    def _handler(self, resource: Resource, informer: Informer) -> Handler:
        if resource not in (VM, VMSNAPSHOT, VMCLONE, VMBACKUP, BACKUP_POLICY):
            return _ignore

        def on_event(etype: str, obj: JSON) -> None:
            # the first listing (or the cache replayed to a new handler) tells what is, not news
            initial = self._priming or not informer.synced.is_set()
            if resource == VM:
                self._on_vm(etype, obj, initial=initial)
            elif resource == BACKUP_POLICY:
                self.durations.on_policy(obj, initial=initial)
            else:
                self.durations.on_event(resource, etype, obj, initial=initial)

        return on_event

    def _on_vm(self, etype: str, vm: JSON, *, initial: bool) -> None:
        key = object_key(vm)
        if etype == DELETED:
            self._status_since.pop(key, None)
            return
        printable = str(facts.status(vm).get("printableStatus") or "")
        since = self._status_since.get(key)
        if since is None or since.status != printable:
            self._status_since[key] = StatusSeen(printable, self.clock(), changed=not initial)

    def _items(self, resource: Resource) -> list[JSON]:
        return self.informers.get(resource).items()

    # --- the families ---------------------------------------------------------------------------

    def _families(self) -> dict[str, GaugeMetricFamily]:
        table = {**(KUBEVIRT_FAMILIES if self.kubevirt_families else {}), **VMO_FAMILIES}
        return {
            name: GaugeMetricFamily(name, doc, labels=list(labels))
            for name, (doc, labels) in table.items()
        }

    def describe(self) -> Iterator[Metric]:
        yield from self._families().values()
        for histogram in self.durations.histograms:
            yield from histogram.describe()

    def collect(self) -> Iterator[Metric]:
        out = self._families()
        kubevirts = self._items(KUBEVIRT)
        vms = self._vm_facts(self._items(VM))
        vmis = self._vmi_facts(self._items(VMI), kubevirts)
        nodes = self._items(NODE)
        if self.kubevirt_families:
            self._add_vms(out, vms)
            self._add_vmis(out, vmis)
            self._add_migrations(out, self._items(VMIM))
            self._add_cluster(out, nodes, kubevirts)
        self._add_nodes(out, nodes, vmis)
        for vm in vms:
            out["vmo_vm_start_failures"].add_metric([vm.namespace, vm.name], vm.start_failures)
        _add_phases(out["vmo_snapshots"], self._items(VMSNAPSHOT), facts.phase)
        _add_phases(out["vmo_clones"], self._items(VMCLONE), facts.phase)
        # a policy's backups are deleted once its repository holds them: in its namespace
        # every phase is kept, at 0, so that panels draw no gap between runs
        policies = self._items(BACKUP_POLICY)
        _add_phases(
            out["vmo_backups"], self._items(VMBACKUP), facts.backup_phase,
            every=BACKUP_PHASES, namespaces={_ns_name(p)[0] for p in policies},
        )  # fmt: skip
        self._add_policies(out, policies)
        yield from out.values()
        for histogram in self.durations.histograms:
            yield from histogram.collect()

    def _vm_facts(self, vms: Sequence[JSON]) -> list[facts.VmFacts]:
        found = [
            self._vms.get(object_key(vm), (_rv(vm),), partial(facts.vm_facts, vm)) for vm in vms
        ]
        self._vms.rotate()
        return found

    def _vmi_facts(self, vmis: Sequence[JSON], kubevirts: list[JSON]) -> list[facts.VmiFacts]:
        strategy = facts.default_eviction_strategy(kubevirts)
        ratio = facts.cpu_allocation_ratio(kubevirts)
        vm_cache = self.informers.get(VM)
        found = []
        for vmi in vmis:
            key = object_key(vmi)
            vm = vm_cache.cache.get(key)  # a VM's VMI has its name
            version = (_rv(vmi), _rv(vm) if vm else "", strategy, str(ratio))
            derive = partial(facts.vmi_facts, vmi, vm, default_strategy=strategy, ratio=ratio)
            found.append(self._vmis.get(key, version, derive))
        self._vmis.rotate()
        return found

    def _add_vms(self, out: dict[str, GaugeMetricFamily], vms: Sequence[facts.VmFacts]) -> None:
        per_namespace: Counter[str] = Counter()
        requests = out["kubevirt_vm_resource_requests"]
        for vm in vms:
            per_namespace[vm.namespace] += 1
            labels = [vm.namespace, vm.name]
            out["kubevirt_vm_info"].add_metric([*labels, vm.status, vm.group, *vm.info], 1)
            since = self._transition_time(vm)
            for group in facts.GROUPS:
                value = since if group == vm.group else 0.0
                out[transition_family(group)].add_metric(labels, value)
            requests.add_metric([*labels, "cpu", "cores"], vm.cpu)
            if vm.memory is not None:
                requests.add_metric([*labels, "memory", "bytes"], vm.memory)
        for namespace, count in sorted(per_namespace.items()):
            out["kubevirt_number_of_vms"].add_metric([namespace], count)

    def _transition_time(self, vm: facts.VmFacts) -> float:
        """When the VM's status began: when this collector saw it change, if it did; else the
        newest condition transition; else when this collector first saw the status."""
        since = self._status_since.get(f"{vm.namespace}/{vm.name}")
        if since is not None and since.status != vm.status:
            since = None  # the event is on its way
        if since is not None and since.changed:
            return since.when
        if vm.transition is not None:
            return vm.transition
        return since.when if since is not None else self.clock()

    def _add_vmis(self, out: dict[str, GaugeMetricFamily], vmis: Sequence[facts.VmiFacts]) -> None:
        phases: Counter[tuple[str, ...]] = Counter()
        for vmi in vmis:
            evictable = "false" if vmi.non_evictable else "true"
            out["kubevirt_vmi_info"].add_metric(
                [vmi.namespace, vmi.name, vmi.node, vmi.phase, *vmi.info, *vmi.guest_os, evictable],
                1,
            )
            out["kubevirt_vmi_non_evictable"].add_metric(
                [vmi.namespace, vmi.name, vmi.node], int(vmi.non_evictable)
            )
            phases[(vmi.node, vmi.phase, *vmi.info)] += 1
        for labels, count in sorted(phases.items()):
            out["kubevirt_vmi_phase_count"].add_metric(list(labels), count)

    def _add_migrations(self, out: dict[str, GaugeMetricFamily], vmims: Sequence[JSON]) -> None:
        gauges: Counter[str] = Counter()
        ended: dict[tuple[str, str], Counter[str]] = {}
        for vmim in vmims:
            gauge = facts.migration_gauge(vmim)
            if gauge is not None:
                gauges[gauge] += 1
                continue
            namespace = _ns_name(vmim)[0]
            vmi = str(facts.spec(vmim).get("vmiName") or "")
            ended.setdefault((namespace, vmi), Counter())[str(facts.status(vmim)["phase"])] += 1
        for gauge in MIGRATION_GAUGES:
            out[f"kubevirt_vmi_migrations_in_{gauge}_phase"].add_metric([], gauges[gauge])
        for (namespace, vmi), phases in sorted(ended.items()):
            out["kubevirt_vmi_migration_succeeded"].add_metric(
                [namespace, vmi], phases["Succeeded"]
            )
            out["kubevirt_vmi_migration_failed"].add_metric([namespace, vmi], phases["Failed"])

    def _add_cluster(
        self, out: dict[str, GaugeMetricFamily], nodes: Sequence[JSON], kubevirts: list[JSON]
    ) -> None:
        allocatable = sum(facts.node_ready(n) and facts.node_schedulable(n) for n in nodes)
        out["kubevirt_allocatable_nodes"].add_metric([], allocatable)
        out["kubevirt_nodes_with_kvm"].add_metric([], sum(facts.node_has_kvm(n) for n in nodes))
        emulation = facts.emulation_enabled(kubevirts)
        out["kubevirt_configuration_emulation_enabled"].add_metric([], int(emulation))

    def _add_nodes(
        self,
        out: dict[str, GaugeMetricFamily],
        nodes: Sequence[JSON],
        vmis: Sequence[facts.VmiFacts],
    ) -> None:
        requested: dict[str, tuple[float, float]] = {}
        for vmi in vmis:
            if vmi.holder:
                cpu, memory = requested.get(vmi.holder, (0.0, 0.0))
                requested[vmi.holder] = (cpu + vmi.cpu, memory + vmi.memory)
        for node in nodes:
            name = _ns_name(node)[1]
            out["vmo_node_ready"].add_metric([name], int(facts.node_ready(node)))
            for family, (cpu, memory) in (
                ("vmo_node_allocatable", facts.node_allocatable(node)),
                ("vmo_node_requested", requested.get(name, (0.0, 0.0))),
            ):
                out[family].add_metric([name, "cpu", "cores"], cpu)
                out[family].add_metric([name, "memory", "bytes"], memory)

    @staticmethod
    def _add_policies(out: dict[str, GaugeMetricFamily], policies: Sequence[JSON]) -> None:
        points = out["vmo_backup_recovery_point_timestamp_seconds"]
        objectives = out["vmo_backup_recovery_point_objective_seconds"]
        for policy in policies:
            namespace, name = _ns_name(policy)
            for vm, when in facts.recovery_points(policy):
                points.add_metric([namespace, name, vm], when)
            objective = facts.recovery_point_objective(policy)
            if objective is not None:
                objectives.add_metric([namespace, name], objective)


BACKUP_PHASES = ("Pending", "Progressing", "Succeeded", "Failed")


def _add_phases(
    family: GaugeMetricFamily,
    objs: Iterable[JSON],
    phase_of: Callable[[JSON], str],
    *,
    every: tuple[str, ...] = (),
    namespaces: Iterable[str] = (),
) -> None:
    """Objects by namespace and phase; in ``namespaces``, each of ``every`` phases is there
    (0 when no object is in it)."""
    tally = Counter((_ns_name(obj)[0], phase_of(obj)) for obj in objs)
    for namespace in namespaces:
        for phase in every:
            tally[(namespace, phase)] += 0
    for (namespace, phase), count in sorted(tally.items()):
        family.add_metric([namespace, phase], count)


# --- running it -----------------------------------------------------------------------------------


class StateMetrics:
    """A ``Runnable``: the collector is in ``registry`` while it runs. Under the controllers'
    Lease only the leading replica exports the cluster's state, so series never double.

    Only the kinds the API serves are watched (an informer of a kind whose CRD is missing would
    retry, and warn, forever); the others are looked for again every ``DISCOVERY_SECONDS``, and
    their families stay empty until they appear.
    """

    name = "cluster-state-metrics"

    def __init__(
        self,
        client: Client,
        *,
        registry: CollectorRegistry = REGISTRY,
        kubevirt_families: bool = True,
        informers: Informers | None = None,
    ) -> None:
        self.client = client
        self.registry = registry
        self.collector = ClusterStateCollector(
            informers or Informers.of(client), kubevirt_families=kubevirt_families
        )

    async def run(self, stop: asyncio.Event) -> None:
        self.registry.register(self.collector)
        try:
            while not stop.is_set():
                missing = [r for r in self.collector.resources if r not in self.collector.watching]
                if not missing:
                    await stop.wait()
                    break
                self.collector.start(await served(self.client, missing))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), DISCOVERY_SECONDS)
        finally:
            self.registry.unregister(self.collector)
            await self.collector.stop()


async def served(client: Client, resources: Sequence[Resource]) -> list[Resource]:
    """Those of ``resources`` the API's discovery lists (none of a group it could not be asked
    about: they are asked about again later)."""
    plurals: dict[str, set[str]] = {}
    found = []
    for resource in resources:
        if resource.api_version not in plurals:
            plurals[resource.api_version] = await _served_plurals(client, resource)
        if resource.plural in plurals[resource.api_version]:
            found.append(resource)
    return found


async def _served_plurals(client: Client, resource: Resource) -> set[str]:
    path = f"/apis/{resource.api_version}" if resource.group else f"/api/{resource.version}"
    try:
        listing = await client.request("GET", path)
    except NotFound:
        return set()
    except DISCOVERY_ERRORS as exc:
        log.warning("discovery of %s failed (%s); asking again later", path, exc)
        return set()
    return {str(r.get("name")) for r in (listing or {}).get("resources") or []}


async def run_state_collector(
    client: Client,
    stop: asyncio.Event,
    registry: CollectorRegistry = REGISTRY,
    *,
    kubevirt_families: bool = True,
) -> None:
    """Exports the cluster's state from ``registry`` until ``stop`` is set."""
    await StateMetrics(client, registry=registry, kubevirt_families=kubevirt_families).run(stop)
