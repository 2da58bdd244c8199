"""What the cluster-state metrics read from one object: pure functions from a VM, VMI, Node,
snapshot, clone, backup or BackupPolicy (as the API returns it) to label values and numbers.

The label values are KubeVirt's where KubeVirt exports the family (``<none>`` for an unset
os/workload/flavor/instance type, the VMI phase in lower case, the status groups of its VM
collector), so that its dashboards and alerts read VMO's series unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from itertools import pairwise
from typing import Any

from croniter import croniter

from vmo.api.quantity import QuantityError, parse_quantity
from vmo.runtime import find_condition, parse_timestamp

JSON = dict[str, Any]

NONE = "<none>"  # KubeVirt's value for an os, workload, flavor, instance type or preference unset
UNKNOWN_GROUP = "<unknown>"  # a printable status in none of KubeVirt's groups

ERROR_STATUSES = ("CrashLoopBackOff", "ErrorUnschedulable", "ErrImagePull", "ImagePullBackOff",
                  "ErrorPvcNotFound", "ErrorDataVolumeNotFound", "DataVolumeError", "Unknown")  # fmt: skip
# KubeVirt's VM status groups (virt-controller's VM collector), by printable status.
STATUS_GROUPS: Mapping[str, str] = {
    "Running": "running",
    **dict.fromkeys(("Starting", "Provisioning", "WaitingForVolumeBinding"), "starting"),
    "Migrating": "migrating",
    **dict.fromkeys(("Stopped", "Paused", "Stopping", "Terminating"), "non_running"),
    **dict.fromkeys(ERROR_STATUSES, "error"),
}
GROUPS = ("starting", "running", "migrating", "non_running", "error")

OS, WORKLOAD, FLAVOR = "vm.kubevirt.io/os", "vm.kubevirt.io/workload", "vm.kubevirt.io/flavor"
# what virt-controller writes on a VMI made from a VM with an instance type or preference
INSTANCETYPE_ANNOTATIONS = (
    "kubevirt.io/instancetype-name",
    "kubevirt.io/cluster-instancetype-name",
)
PREFERENCE_ANNOTATIONS = ("kubevirt.io/preference-name", "kubevirt.io/cluster-preference-name")

KVM_DEVICE = "devices.kubevirt.io/kvm"
SCHEDULABLE_LABEL = "kubevirt.io/schedulable"
# KubeVirt's default: a VMI without a CPU request asks for 1/10 of a CPU per vCPU
CPU_ALLOCATION_RATIO = 10
FINAL_VMI_PHASES = ("Succeeded", "Failed")
SUCCEEDED, FAILED = "succeeded", "failed"


def metadata(obj: Mapping[str, Any]) -> JSON:
    return obj.get("metadata") or {}


def spec(obj: Mapping[str, Any]) -> JSON:
    return obj.get("spec") or {}


def status(obj: Mapping[str, Any]) -> JSON:
    return obj.get("status") or {}


def seconds(stamp: object) -> float | None:
    """An RFC 3339 timestamp as Unix seconds; None when absent or unreadable."""
    if not stamp:
        return None
    try:
        return parse_timestamp(str(stamp)).timestamp()
    except ValueError:
        return None


def quantity(value: object) -> float | None:
    """A Kubernetes quantity as a number; None when absent or unreadable."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        return float(parse_quantity(value if isinstance(value, int) else str(value)))
    except QuantityError:
        return None


def latest_transition(obj: Mapping[str, Any]) -> float | None:
    """The newest ``lastTransitionTime`` among the object's status conditions."""
    times = (seconds(c.get("lastTransitionTime")) for c in status(obj).get("conditions") or [])
    return max((t for t in times if t is not None), default=None)


def condition_true(obj: Mapping[str, Any], ctype: str) -> bool:
    found = find_condition(status(obj).get("conditions"), ctype)
    return found is not None and found.get("status") == "True"


# --- VMs and VMIs -------------------------------------------------------------------------------


def status_group(printable: str) -> str:
    return STATUS_GROUPS.get(printable, UNKNOWN_GROUP)


def template(vm: Mapping[str, Any]) -> JSON:
    return spec(vm).get("template") or {}


def system_labels(*metas: Mapping[str, Any]) -> tuple[str, str, str]:
    """(os, workload, flavor): for each, the first of ``metas`` whose annotations, then labels,
    name it; ``<none>`` when none does."""
    return _first(OS, metas), _first(WORKLOAD, metas), _first(FLAVOR, metas)


def _first(key: str, metas: tuple[Mapping[str, Any], ...]) -> str:
    for meta in metas:
        for field in ("annotations", "labels"):
            value = (meta.get(field) or {}).get(key)
            if value:
                return str(value)
    return NONE


def ref_name(ref: object) -> str:
    """The name of a VM's ``spec.instancetype`` or ``spec.preference``; ``<none>`` without."""
    name = ref.get("name") if isinstance(ref, Mapping) else None
    return str(name) if name else NONE


def vm_instance_type(vm: Mapping[str, Any]) -> str:
    return ref_name(spec(vm).get("instancetype"))


def vm_preference(vm: Mapping[str, Any]) -> str:
    return ref_name(spec(vm).get("preference"))


def vmi_instance_type(vmi: Mapping[str, Any], vm: Mapping[str, Any] | None) -> str:
    """From the VMI's annotations (as virt-controller writes them), else from its VM."""
    return _annotated(vmi, INSTANCETYPE_ANNOTATIONS) or (vm_instance_type(vm) if vm else NONE)


def vmi_preference(vmi: Mapping[str, Any], vm: Mapping[str, Any] | None) -> str:
    return _annotated(vmi, PREFERENCE_ANNOTATIONS) or (vm_preference(vm) if vm else NONE)


def _annotated(obj: Mapping[str, Any], keys: tuple[str, ...]) -> str:
    annotations = metadata(obj).get("annotations") or {}
    return next((str(annotations[k]) for k in keys if annotations.get(k)), "")


def guest_os(vmi: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """(name, versionId, kernelRelease, machine) of the guest agent's ``guestOSInfo``."""
    info = status(vmi).get("guestOSInfo") or {}
    return tuple(  # type: ignore[return-value]
        str(info.get(k) or "") for k in ("name", "versionId", "kernelRelease", "machine")
    )


def vmi_phase(vmi: Mapping[str, Any]) -> str:
    """The phase as KubeVirt's metrics spell it: lower case."""
    return str(status(vmi).get("phase") or "").lower()


def non_evictable(vmi: Mapping[str, Any], default_strategy: str) -> bool:
    """Eviction must live-migrate the VMI (its strategy, else the cluster's, is LiveMigrate)
    but it is not LiveMigratable; a VMI not yet judged counts as not migratable, as upstream."""
    strategy = spec(vmi).get("evictionStrategy") or default_strategy or "None"
    return strategy == "LiveMigrate" and not condition_true(vmi, "LiveMigratable")


def vcpus(domain: Mapping[str, Any]) -> int:
    cpu = domain.get("cpu") or {}
    count = 1
    for field in ("sockets", "cores", "threads"):
        count *= int(cpu.get(field) or 1)
    return max(count, 1)


def memory_request(domain: Mapping[str, Any]) -> float | None:
    """``resources.requests.memory``, else ``memory.guest``, in bytes."""
    requests = (domain.get("resources") or {}).get("requests") or {}
    found = quantity(requests.get("memory"))
    return found if found is not None else quantity((domain.get("memory") or {}).get("guest"))


def vm_requests(vm: Mapping[str, Any]) -> tuple[float, float | None]:
    """(CPU cores, memory bytes) the VM's template asks for: ``resources.requests`` where set,
    else its vCPUs and ``memory.guest`` (None when it names no memory)."""
    domain = spec(template(vm)).get("domain") or {}
    requests = (domain.get("resources") or {}).get("requests") or {}
    cpu = quantity(requests.get("cpu"))
    return (cpu if cpu is not None else float(vcpus(domain))), memory_request(domain)


def vmi_requests(
    vmi: Mapping[str, Any], ratio: float = CPU_ALLOCATION_RATIO
) -> tuple[float, float]:
    """(CPU cores, memory bytes) the VMI takes from its node, as its virt-launcher pod requests:
    ``resources.requests``, else a CPU per vCPU when dedicated and 1/``ratio`` of one if not,
    and ``memory.guest``."""
    domain = spec(vmi).get("domain") or {}
    requests = (domain.get("resources") or {}).get("requests") or {}
    cpu = quantity(requests.get("cpu"))
    if cpu is None:
        dedicated = (domain.get("cpu") or {}).get("dedicatedCpuPlacement")
        cpu = vcpus(domain) / (1.0 if dedicated else max(ratio, 1.0))
    return cpu, memory_request(domain) or 0.0


def holds_resources(vmi: Mapping[str, Any]) -> str:
    """The node whose resources the VMI holds ("" for none: not placed, or ended)."""
    vstatus = status(vmi)
    if vstatus.get("phase") in FINAL_VMI_PHASES:
        return ""
    return str(vstatus.get("nodeName") or "")


@dataclass(frozen=True)
class VmFacts:
    """What the VM families read of one VM."""

    namespace: str
    name: str
    status: str  # status.printableStatus
    group: str  # its KubeVirt status group
    info: tuple[str, ...]  # os, workload, flavor, instance_type, preference
    transition: float | None  # the newest condition transition
    cpu: float
    memory: float | None
    start_failures: int


def vm_facts(vm: Mapping[str, Any]) -> VmFacts:
    md = metadata(vm)
    printable = str(status(vm).get("printableStatus") or "")
    cpu, memory = vm_requests(vm)
    failures = int((status(vm).get("startFailure") or {}).get("consecutiveFailCount") or 0)
    return VmFacts(
        namespace=str(md.get("namespace") or ""),
        name=str(md.get("name") or ""),
        status=printable,
        group=status_group(printable),
        info=(*system_labels(metadata(template(vm)), md), vm_instance_type(vm), vm_preference(vm)),
        transition=latest_transition(vm),
        cpu=cpu,
        memory=memory,
        start_failures=failures,
    )


@dataclass(frozen=True)
class VmiFacts:
    """What the VMI and node families read of one VMI (and of its VM, where it has one)."""

    namespace: str
    name: str
    node: str
    phase: str  # lower case, as KubeVirt's metrics have it
    info: tuple[str, ...]  # os, workload, flavor, instance_type, preference
    guest_os: tuple[str, str, str, str]
    non_evictable: bool
    holder: str  # the node whose resources it holds, "" for none
    cpu: float
    memory: float


def vmi_facts(
    vmi: Mapping[str, Any],
    vm: Mapping[str, Any] | None,
    *,
    default_strategy: str = "",
    ratio: float = CPU_ALLOCATION_RATIO,
) -> VmiFacts:
    md = metadata(vmi)
    vm_meta = metadata(template(vm)) if vm else {}
    cpu, memory = vmi_requests(vmi, ratio)
    return VmiFacts(
        namespace=str(md.get("namespace") or ""),
        name=str(md.get("name") or ""),
        node=str(status(vmi).get("nodeName") or ""),
        phase=vmi_phase(vmi),
        info=(*system_labels(md, vm_meta), vmi_instance_type(vmi, vm), vmi_preference(vmi, vm)),
        guest_os=guest_os(vmi),
        non_evictable=non_evictable(vmi, default_strategy),
        holder=holds_resources(vmi),
        cpu=cpu,
        memory=memory,
    )


# --- nodes and the KubeVirt CR ------------------------------------------------------------------


def node_ready(node: Mapping[str, Any]) -> bool:
    return condition_true(node, "Ready")


def node_schedulable(node: Mapping[str, Any]) -> bool:
    labels = metadata(node).get("labels") or {}
    return not spec(node).get("unschedulable") and labels.get(SCHEDULABLE_LABEL) != "false"


def node_allocatable(node: Mapping[str, Any]) -> tuple[float, float]:
    """(CPU cores, memory bytes) of ``status.allocatable``."""
    alloc = status(node).get("allocatable") or {}
    return quantity(alloc.get("cpu")) or 0.0, quantity(alloc.get("memory")) or 0.0


def node_has_kvm(node: Mapping[str, Any]) -> bool:
    """The node advertises KubeVirt's KVM device (``devices.kubevirt.io/kvm``)."""
    return (quantity((status(node).get("allocatable") or {}).get(KVM_DEVICE)) or 0.0) > 0


def cluster_configuration(kubevirts: list[JSON]) -> JSON:
    """``spec.configuration`` of the KubeVirt CR in force (the first not being deleted)."""
    live = [kv for kv in kubevirts if not metadata(kv).get("deletionTimestamp")]
    return (spec(live[0]).get("configuration") or {}) if live else {}


def emulation_enabled(kubevirts: list[JSON]) -> bool:
    dev = cluster_configuration(kubevirts).get("developerConfiguration") or {}
    return dev.get("useEmulation") is True


def cpu_allocation_ratio(kubevirts: list[JSON]) -> float:
    dev = cluster_configuration(kubevirts).get("developerConfiguration") or {}
    ratio = quantity(dev.get("cpuAllocationRatio"))
    return ratio if ratio else float(CPU_ALLOCATION_RATIO)


def default_eviction_strategy(kubevirts: list[JSON]) -> str:
    return str(cluster_configuration(kubevirts).get("evictionStrategy") or "")


# --- migrations ---------------------------------------------------------------------------------

# KubeVirt's migration collector: the phases each "in ... phase" gauge counts (the rest: unset)
MIGRATION_GAUGES: Mapping[str, str] = {
    "Pending": "pending",
    "Scheduling": "scheduling",
    **dict.fromkeys(("Scheduled", "PreparingTarget", "TargetReady", "Running"), "running"),
}


def migration_gauge(vmim: Mapping[str, Any]) -> str | None:
    """Which ``kubevirt_vmi_migrations_in_*_phase`` counts the migration; None once it ended."""
    phase = str(status(vmim).get("phase") or "")
    if phase in ("Succeeded", "Failed"):
        return None
    return MIGRATION_GAUGES.get(phase, "unset")


# --- snapshots, clones, backups: phases and outcomes --------------------------------------------


def phase(obj: Mapping[str, Any]) -> str:
    """A snapshot's or clone's ``status.phase`` (``Unset`` before its controller wrote one)."""
    return str(status(obj).get("phase") or "Unset")


def backup_phase(backup: Mapping[str, Any]) -> str:
    """A VirtualMachineBackup has conditions, not a phase: Succeeded (Complete), Failed,
    Progressing, or Pending before its node took it."""
    for ctype, name in (("Complete", "Succeeded"), ("Failed", "Failed")):
        if condition_true(backup, ctype):
            return name
    return "Progressing" if condition_true(backup, "Progressing") else "Pending"


def backup_type(backup: Mapping[str, Any]) -> str:
    return "Incremental" if status(backup).get("type") == "Incremental" else "Full"


def outcome(obj: Mapping[str, Any], phase_name: str, now: float) -> tuple[str, float] | None:
    """(succeeded|failed, seconds from creation to the end) once ``phase_name`` is terminal:
    the end is the newest condition transition, else ``now`` (when it is first seen ended)."""
    result = {"Succeeded": SUCCEEDED, "Failed": FAILED}.get(phase_name)
    created = seconds(metadata(obj).get("creationTimestamp"))
    if result is None or created is None:
        return None
    end = latest_transition(obj)
    return result, max((end if end is not None else now) - created, 0.0)


# --- backup policies ----------------------------------------------------------------------------


def recovery_points(policy: Mapping[str, Any]) -> list[tuple[str, float]]:
    """(VM, its newest recovery point) for each VM of the policy's status that has one."""
    points = []
    for entry in status(policy).get("virtualMachines") or []:
        when = seconds(entry.get("recoveryPoint"))
        if entry.get("name") and when is not None:
            points.append((str(entry["name"]), when))
    return points


def recovery_point_objective(policy: Mapping[str, Any]) -> float | None:
    """Twice the longest gap between the slots of the policy's cron schedule; None for a
    schedule croniter cannot read."""
    interval = schedule_interval(str(spec(policy).get("schedule") or ""))
    return None if interval is None else 2 * interval


SCHEDULE_SLOTS = 64  # enough slots to cross a night or a weekend an office schedule skips


@lru_cache(maxsize=256)
def schedule_interval(schedule: str) -> float | None:
    """The longest gap, in seconds, between consecutive slots of a cron schedule (its interval,
    for a regular one), over its next ``SCHEDULE_SLOTS`` slots."""
    if not schedule:
        return None
    try:
        slots = croniter(schedule, datetime.now(UTC))
        times = [slots.get_next(float) for _ in range(SCHEDULE_SLOTS + 1)]
    except (ValueError, KeyError):
        return None
    return max(b - a for a, b in pairwise(times))
