"""The virt-controller role: VM -> VMI decisions per runStrategy, VMI placement, and both
controllers running against the embedded API server."""

from __future__ import annotations

import asyncio
import copy
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from vmo.api.kubevirt import default_vmi
from vmo.client import DATAVOLUME, EVENT, NAMESPACE, NODE, VM, VMI, Client
from vmo.engine.virtcontroller.controllers import virt_controllers
from vmo.engine.virtcontroller.scheduler import (
    MEMORY_OVERHEAD_BYTES,
    Scheduled,
    SchedulerController,
    Unschedulable,
    place,
    scheduled_vmi,
    unschedulable_vmi,
    vmi_request,
)
from vmo.engine.virtcontroller.startfailure import start_backoff_seconds
from vmo.engine.virtcontroller.vm import VMIAction, decide, with_failure
from vmo.engine.virtcontroller.vmi_template import (
    GENERATION_ANNOTATION,
    TEMPLATE_HASH_ANNOTATION,
    build_vmi,
    guest_topology,
    template_hash,
)
from vmo.runtime import Manager
from vmo.testing.apiserver import ThreadedServer

JSON = dict[str, Any]
NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
VM_UID = "vm-uid-1"
VMI_UID = "vmi-uid-1"


# --- builders ------------------------------------------------------------------------------------


def a_vm(strategy: str = "Always", *, generation: int = 1, status: JSON | None = None) -> JSON:
    vm: JSON = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": "db", "namespace": "ns", "uid": VM_UID, "generation": generation},
        "spec": {
            "runStrategy": strategy,
            "template": {
                "metadata": {"labels": {"app": "db"}},
                "spec": {
                    "domain": {
                        "devices": {"disks": [{"name": "root", "disk": {}}]},
                        "memory": {"guest": "128Mi"},
                    },
                    "volumes": [{"name": "root", "containerDisk": {"image": "x"}}],
                },
            },
        },
    }
    if status is not None:
        vm["status"] = status
    return vm


def a_vmi(
    phase: str = "Running",
    *,
    uid: str = VMI_UID,
    vm: JSON | None = None,
    ran: bool | None = None,
    conditions: list[JSON] | None = None,
    deleting: bool = False,
) -> JSON:
    vmi = build_vmi(vm or a_vm())
    vmi["metadata"]["uid"] = uid
    if deleting:
        vmi["metadata"]["deletionTimestamp"] = "2026-01-01T11:59:00Z"
    transitions = [{"phase": "Pending"}]
    if ran if ran is not None else phase in ("Running", "Succeeded", "Failed"):
        transitions.append({"phase": "Running"})
    if phase != "Running" and phase not in [t["phase"] for t in transitions]:
        transitions.append({"phase": phase})
    vmi["status"] = {"phase": phase, "phaseTransitionTimestamps": transitions}
    if conditions is not None:
        vmi["status"]["conditions"] = conditions
    elif phase == "Running":
        vmi["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    return vmi


def cond(status: JSON, ctype: str) -> JSON | None:
    return next((c for c in status.get("conditions") or [] if c["type"] == ctype), None)


# --- decide(): run strategies --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("strategy", "vmi_phase", "action", "printable"),
    [
        ("Always", None, VMIAction.CREATE, "Starting"),
        ("Always", "Running", VMIAction.NONE, "Running"),
        ("Always", "Scheduling", VMIAction.NONE, "Starting"),
        ("Always", "Failed", VMIAction.DELETE, "Stopped"),
        ("Always", "Succeeded", VMIAction.DELETE, "Stopped"),
        ("Halted", None, VMIAction.NONE, "Stopped"),
        ("Halted", "Running", VMIAction.DELETE, "Stopping"),
        ("Manual", None, VMIAction.NONE, "Stopped"),
        ("Manual", "Running", VMIAction.NONE, "Running"),
        ("Manual", "Succeeded", VMIAction.NONE, "Stopped"),
        ("Once", None, VMIAction.CREATE, "Starting"),
        ("Once", "Succeeded", VMIAction.NONE, "Stopped"),
        ("Once", "Failed", VMIAction.NONE, "Stopped"),
        ("RerunOnFailure", None, VMIAction.CREATE, "Starting"),
        ("RerunOnFailure", "Running", VMIAction.NONE, "Running"),
        ("RerunOnFailure", "Failed", VMIAction.DELETE, "Stopped"),
        ("RerunOnFailure", "Succeeded", VMIAction.DELETE, "Stopped"),
    ],
)
def test_run_strategy_decides_the_vmi(
    strategy: str, vmi_phase: str | None, action: VMIAction, printable: str
) -> None:
    vmi = a_vmi(vmi_phase) if vmi_phase else None
    decision = decide(a_vm(strategy), vmi, NOW)
    assert decision.action is action
    assert decision.status["printableStatus"] == printable
    assert decision.status["runStrategy"] == strategy


def test_rerun_on_failure_does_not_start_again_once_it_ran_to_completion() -> None:
    vm = a_vm("RerunOnFailure", status={"runStrategy": "RerunOnFailure"})
    assert decide(vm, None, NOW).action is VMIAction.NONE


def test_rerun_on_failure_queues_a_start_after_deleting_a_failed_vmi() -> None:
    decision = decide(a_vm("RerunOnFailure"), a_vmi("Failed"), NOW)
    assert decision.action is VMIAction.DELETE
    assert decision.status["stateChangeRequests"] == [{"action": "Start"}]


def test_a_backup_of_the_stopped_vm_s_disks_holds_its_start_back_until_it_ends() -> None:
    held = decide(a_vm("Always"), None, NOW, backup="nightly")
    assert held.action is VMIAction.NONE and held.vmi is None
    assert held.requeue_after == 2.0  # a lock whose backup vanished is looked at again
    assert decide(a_vm("Always"), None, NOW).action is VMIAction.CREATE


def test_spec_running_true_means_always() -> None:
    vm = a_vm()
    del vm["spec"]["runStrategy"]
    vm["spec"]["running"] = True
    assert decide(vm, None, NOW).action is VMIAction.CREATE


def test_vmi_built_from_template_is_owned_and_annotated() -> None:
    decision = decide(a_vm(generation=3), None, NOW)
    vmi = decision.vmi
    assert vmi is not None
    assert vmi["metadata"]["name"] == "db" and vmi["metadata"]["namespace"] == "ns"
    assert vmi["metadata"]["labels"] == {"app": "db"}
    assert vmi["metadata"]["annotations"][GENERATION_ANNOTATION] == "3"
    assert vmi["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachine",
            "name": "db",
            "uid": VM_UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert vmi["spec"]["domain"]["memory"]["guest"] == "128Mi"
    assert [e.reason for e in decision.events] == ["SuccessfulCreate"]


def test_deleting_a_vmi_records_successful_delete() -> None:
    decision = decide(a_vm("Halted"), a_vmi("Running"), NOW)
    assert decision.delete_uid == VMI_UID
    assert [e.reason for e in decision.events] == ["SuccessfulDelete"]


def test_a_vmi_already_being_deleted_is_not_deleted_again() -> None:
    decision = decide(a_vm("Halted"), a_vmi("Running", deleting=True), NOW)
    assert decision.action is VMIAction.NONE
    assert decision.status["printableStatus"] == "Stopping"


def test_a_vm_being_deleted_is_terminating_and_its_vmi_deleted() -> None:
    vm = a_vm()
    vm["metadata"]["deletionTimestamp"] = "2026-01-01T11:00:00Z"
    decision = decide(vm, a_vmi("Running"), NOW)
    assert decision.action is VMIAction.DELETE
    assert decision.status["printableStatus"] == "Terminating"


# --- decide(): status fields ---------------------------------------------------------------------


def test_running_vmi_makes_the_vm_ready_and_created() -> None:
    status = decide(a_vm(), a_vmi("Running"), NOW).status
    assert status["ready"] is True and status["created"] is True
    assert cond(status, "Ready") == {
        "type": "Ready",
        "status": "True",
        "lastProbeTime": None,
        "lastTransitionTime": "2026-01-01T12:00:00Z",
    }


def test_no_vmi_means_not_ready_with_upstream_reason() -> None:
    status = decide(a_vm("Halted"), None, NOW).status
    assert status["ready"] is False and status["created"] is False
    ready = cond(status, "Ready")
    assert ready is not None and ready["reason"] == "VMINotExists"


def test_paused_vmi_shows_paused_and_its_condition() -> None:
    vmi = a_vmi(
        "Running",
        conditions=[
            {"type": "Ready", "status": "False"},
            {"type": "Paused", "status": "True", "reason": "PausedByUser"},
        ],
    )
    status = decide(a_vm(), vmi, NOW).status
    assert status["printableStatus"] == "Paused"
    paused = cond(status, "Paused")
    assert paused is not None and paused["reason"] == "PausedByUser"


def test_unschedulable_vmi_shows_error_unschedulable() -> None:
    vmi = a_vmi(
        "Scheduling",
        conditions=[
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/0"}
        ],
    )
    status = decide(a_vm(), vmi, NOW).status
    assert status["printableStatus"] == "ErrorUnschedulable"


def test_migrating_vmi_shows_migrating() -> None:
    vmi = a_vmi("Running")
    vmi["status"]["migrationState"] = {"startTimestamp": "2026-01-01T11:59:59Z"}
    assert decide(a_vm(), vmi, NOW).status["printableStatus"] == "Migrating"


def test_generations_follow_the_vmi_annotation() -> None:
    vmi = a_vmi("Running", vm=a_vm(generation=2))
    status = decide(a_vm(generation=2), vmi, NOW).status
    assert (status["observedGeneration"], status["desiredGeneration"]) == (2, 2)


def test_ready_condition_keeps_its_transition_time_while_unchanged() -> None:
    earlier = {
        "conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": "2025-12-31T00:00:00Z"}
        ]
    }
    status = decide(a_vm(status=earlier), a_vmi("Running"), NOW).status
    ready = cond(status, "Ready")
    assert ready is not None and ready["lastTransitionTime"] == "2025-12-31T00:00:00Z"


def test_failure_to_create_keeps_old_run_strategy_and_sets_failure() -> None:
    vm = a_vm("RerunOnFailure")
    decision = decide(vm, None, NOW)
    status = with_failure(decision, {}, "FailedCreate", "quota", NOW)
    failure = cond(status, "Failure")
    assert failure is not None and failure["message"] == "quota"
    assert "runStrategy" not in status
    # the next pass still sees a strategy change and starts
    assert decide(a_vm("RerunOnFailure", status=status), None, NOW).action is VMIAction.CREATE


# --- decide(): state change requests ------------------------------------------------------------


def test_manual_start_request_creates_the_vmi() -> None:
    vm = a_vm("Manual", status={"stateChangeRequests": [{"action": "Start"}]})
    decision = decide(vm, None, NOW)
    assert decision.action is VMIAction.CREATE
    # the request stays until the VMI is seen, so a lost create is retried
    assert decision.status["stateChangeRequests"] == [{"action": "Start"}]


def test_start_request_is_trimmed_once_the_vmi_exists() -> None:
    vm = a_vm("Manual", status={"stateChangeRequests": [{"action": "Start"}]})
    decision = decide(vm, a_vmi("Scheduling"), NOW)
    assert decision.action is VMIAction.NONE
    assert "stateChangeRequests" not in decision.status


def test_manual_stop_request_for_the_vmi_deletes_it() -> None:
    vm = a_vm("Manual", status={"stateChangeRequests": [{"action": "Stop", "uid": VMI_UID}]})
    assert decide(vm, a_vmi("Running"), NOW).action is VMIAction.DELETE


def test_stop_request_for_another_vmi_is_dropped() -> None:
    vm = a_vm("Manual", status={"stateChangeRequests": [{"action": "Stop", "uid": "old"}]})
    decision = decide(vm, a_vmi("Running"), NOW)
    assert decision.action is VMIAction.NONE
    assert "stateChangeRequests" not in decision.status


def test_restart_of_an_always_vm_deletes_then_recreates() -> None:
    requests = [{"action": "Stop", "uid": VMI_UID}, {"action": "Start"}]
    first = decide(a_vm(status={"stateChangeRequests": requests}), a_vmi("Running"), NOW)
    assert first.action is VMIAction.DELETE
    assert first.status["stateChangeRequests"] == requests
    second = decide(a_vm(status=first.status), None, NOW)
    assert second.action is VMIAction.CREATE
    assert second.status["stateChangeRequests"] == [{"action": "Start"}]


def test_start_paused_request_sets_start_strategy() -> None:
    vm = a_vm(
        "Manual", status={"stateChangeRequests": [{"action": "Start", "data": {"paused": "true"}}]}
    )
    vmi = decide(vm, None, NOW).vmi
    assert vmi is not None and vmi["spec"]["startStrategy"] == "Paused"


def test_halted_vm_with_start_request_switches_to_always() -> None:
    vm = a_vm("Halted", status={"stateChangeRequests": [{"action": "Start"}]})
    decision = decide(vm, None, NOW)
    assert decision.vm_patch == {"spec": {"runStrategy": "Always"}}
    assert decision.action is VMIAction.NONE


# --- decide(): crash-loop backoff ----------------------------------------------------------------


def test_backoff_grows_with_the_square_of_failures_and_is_capped() -> None:
    assert [start_backoff_seconds(n) for n in (1, 2, 3, 5, 6)] == [10, 40, 90, 250, 300]
    assert start_backoff_seconds(1, jitter=0.99) == 15


def test_vmi_failing_before_running_counts_a_start_failure() -> None:
    decision = decide(a_vm(), a_vmi("Failed", ran=False), NOW)
    assert decision.status["startFailure"] == {
        "consecutiveFailCount": 1,
        "lastFailedVMIUID": VMI_UID,
        "retryAfterTimestamp": "2026-01-01T12:00:10Z",
    }
    assert decision.action is VMIAction.DELETE


def test_the_same_failed_vmi_is_counted_once() -> None:
    first = decide(a_vm(), a_vmi("Failed", ran=False), NOW).status
    again = decide(a_vm(status=first), a_vmi("Failed", ran=False), NOW).status
    assert again["startFailure"]["consecutiveFailCount"] == 1


def test_next_start_waits_for_the_backoff_and_shows_crash_loop() -> None:
    failure = {
        "consecutiveFailCount": 2,
        "lastFailedVMIUID": "old",
        "retryAfterTimestamp": "2026-01-01T12:00:40Z",
    }
    decision = decide(a_vm(status={"startFailure": failure}), None, NOW)
    assert decision.action is VMIAction.NONE
    assert decision.requeue_after == 40
    assert decision.status["printableStatus"] == "CrashLoopBackOff"
    later = decide(a_vm(status={"startFailure": failure}), None, NOW + timedelta(seconds=41))
    assert later.action is VMIAction.CREATE


def test_consecutive_failures_grow_the_backoff() -> None:
    status: JSON = {}
    for n in range(1, 4):
        status = decide(a_vm(status=status), a_vmi("Failed", ran=False, uid=f"u{n}"), NOW).status
    assert status["startFailure"]["consecutiveFailCount"] == 3
    assert status["startFailure"]["retryAfterTimestamp"] == "2026-01-01T12:01:30Z"


def test_a_vmi_that_ran_clears_the_start_failures() -> None:
    failure = {"consecutiveFailCount": 3, "lastFailedVMIUID": "old", "retryAfterTimestamp": "x"}
    status = decide(a_vm(status={"startFailure": failure}), a_vmi("Running"), NOW).status
    assert "startFailure" not in status


def test_manual_vm_does_not_track_start_failures() -> None:
    status = decide(a_vm("Manual"), a_vmi("Failed", ran=False), NOW).status
    assert "startFailure" not in status


# --- decide(): RestartRequired -------------------------------------------------------------------


def test_template_change_while_running_requires_restart() -> None:
    running = a_vmi("Running", vm=a_vm(generation=1))
    changed = a_vm(generation=2)
    changed["spec"]["template"]["spec"]["domain"]["memory"]["guest"] = "256Mi"
    decision = decide(changed, running, NOW)
    restart = cond(decision.status, "RestartRequired")
    assert restart is not None and restart["status"] == "True"
    assert (decision.status["observedGeneration"], decision.status["desiredGeneration"]) == (1, 2)
    assert decision.action is VMIAction.NONE


def test_non_template_change_bumps_the_vmi_generation_instead() -> None:
    running = a_vmi("Running", vm=a_vm(generation=1))
    decision = decide(a_vm(generation=2), running, NOW)
    assert cond(decision.status, "RestartRequired") is None
    assert decision.vmi_annotations is not None
    assert decision.vmi_annotations[GENERATION_ANNOTATION] == "2"
    assert decision.status["observedGeneration"] == 2


def test_restart_clears_restart_required() -> None:
    status = {"conditions": [{"type": "RestartRequired", "status": "True"}]}
    changed = a_vm("Halted", generation=2, status=status)
    decision = decide(changed, a_vmi("Running"), NOW)
    assert decision.action is VMIAction.DELETE
    assert cond(decision.status, "RestartRequired") is None


def test_template_hash_ignores_key_order() -> None:
    vm = a_vm()
    reordered = copy.deepcopy(vm)
    reordered["spec"]["template"] = dict(reversed(list(vm["spec"]["template"].items())))
    assert template_hash(vm) == template_hash(reordered)
    assert build_vmi(vm)["metadata"]["annotations"][TEMPLATE_HASH_ANNOTATION] == template_hash(vm)


# --- decide(): DataVolumes -----------------------------------------------------------------------


def a_vm_with_dv() -> JSON:
    vm = a_vm()
    vm["spec"]["dataVolumeTemplates"] = [
        {
            "metadata": {"name": "db-root"},
            "spec": {
                "source": {"blank": {}},
                "storage": {"resources": {"requests": {"storage": "1Gi"}}},
            },
        }
    ]
    vm["spec"]["template"]["spec"]["volumes"] = [
        {"name": "root", "dataVolume": {"name": "db-root"}}
    ]
    return vm


def test_data_volume_templates_are_created_owned_by_the_vm() -> None:
    decision = decide(a_vm_with_dv(), None, NOW)
    assert [dv["metadata"]["name"] for dv in decision.data_volumes] == ["db-root"]
    dv = decision.data_volumes[0]
    assert dv["metadata"]["ownerReferences"][0]["uid"] == VM_UID
    assert dv["spec"]["source"] == {"blank": {}}
    assert decision.action is VMIAction.NONE
    assert decision.status["printableStatus"] == "Provisioning"


def test_vmi_waits_until_data_volumes_succeed() -> None:
    importing = {"db-root": {"status": {"phase": "ImportInProgress"}}}
    decision = decide(a_vm_with_dv(), None, NOW, data_volumes=importing)
    assert decision.data_volumes == ()
    assert decision.action is VMIAction.NONE
    assert decision.status["printableStatus"] == "Provisioning"
    done = {"db-root": {"status": {"phase": "Succeeded"}}}
    decision = decide(a_vm_with_dv(), None, NOW, data_volumes=done)
    assert decision.action is VMIAction.CREATE
    assert decision.vmi is not None
    assert decision.vmi["spec"]["volumes"] == [{"name": "root", "dataVolume": {"name": "db-root"}}]


def test_failed_data_volume_shows_data_volume_error() -> None:
    failed = {"db-root": {"status": {"phase": "Failed"}}}
    decision = decide(a_vm_with_dv(), None, NOW, data_volumes=failed)
    assert decision.status["printableStatus"] == "DataVolumeError"
    assert decision.action is VMIAction.NONE


# --- instancetypes and preferences ---------------------------------------------------------------


def test_instancetype_and_preference_are_expanded_into_the_vmi() -> None:
    vm = a_vm()
    vm["spec"]["instancetype"] = {"name": "small", "kind": "virtualmachineclusterinstancetype"}
    vm["spec"]["preference"] = {"name": "linux", "kind": "virtualmachineclusterpreference"}
    del vm["spec"]["template"]["spec"]["domain"]["memory"]
    instancetype = {"spec": {"cpu": {"guest": 4}, "memory": {"guest": "1Gi"}}}
    preference = {
        "spec": {
            "cpu": {"preferredCPUTopology": "cores"},
            "devices": {"preferredDiskBus": "virtio"},
        }
    }
    vmi = decide(vm, None, NOW, instancetype=instancetype, preference=preference).vmi
    assert vmi is not None
    domain = vmi["spec"]["domain"]
    assert domain["cpu"] == {"sockets": 1, "cores": 4, "threads": 1}
    assert domain["memory"]["guest"] == "1Gi"
    assert domain["devices"]["disks"][0]["disk"] == {"bus": "virtio"}
    annotations = vmi["metadata"]["annotations"]
    assert annotations["kubevirt.io/cluster-instancetype-name"] == "small"
    assert annotations["kubevirt.io/cluster-preference-name"] == "linux"


@pytest.mark.parametrize(
    ("topology", "expected"),
    [
        (None, {"sockets": 4, "cores": 1, "threads": 1}),
        ("preferSockets", {"sockets": 4, "cores": 1, "threads": 1}),
        ("threads", {"sockets": 1, "cores": 1, "threads": 4}),
        ("spread", {"sockets": 2, "cores": 2, "threads": 1}),
    ],
)
def test_guest_cpus_follow_the_preferred_topology(topology: str | None, expected: JSON) -> None:
    preference = {"spec": {"cpu": {"preferredCPUTopology": topology}}} if topology else None
    assert guest_topology(4, preference) == expected


def test_missing_instancetype_is_a_failure_not_a_vmi() -> None:
    vm = a_vm()
    vm["spec"]["instancetype"] = {"name": "gone"}
    decision = decide(vm, None, NOW)
    assert decision.action is VMIAction.NONE
    failure = cond(decision.status, "Failure")
    assert failure is not None and "gone" in failure["message"]


# --- place() -------------------------------------------------------------------------------------


def a_node(
    name: str,
    *,
    cpu: str = "2",
    memory: str = "4Gi",
    ready: str = "True",
    labels: JSON | None = None,
    taints: list[JSON] | None = None,
    unschedulable: bool = False,
) -> JSON:
    spec: JSON = {}
    if taints:
        spec["taints"] = taints
    if unschedulable:
        spec["unschedulable"] = True
    return {
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubevirt.io/schedulable": "true",
                **(labels or {}),
            },
        },
        "spec": spec,
        "status": {
            "allocatable": {"cpu": cpu, "memory": memory},
            "conditions": [{"type": "Ready", "status": ready}],
        },
    }


def a_pending_vmi(name: str = "v", *, memory: str = "1Gi", cpus: int = 1, **spec: Any) -> JSON:
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"uid-{name}",
            "labels": spec.pop("labels", {}),
        },
        "spec": {"domain": {"cpu": {"cores": cpus}, "memory": {"guest": memory}}, **spec},
        "status": {"phase": "Pending"},
    }


def on(node: str, vmi: JSON) -> JSON:
    return {**vmi, "status": {"phase": "Running", "nodeName": node}}


def test_places_on_the_only_fitting_node() -> None:
    assert place(a_pending_vmi(), [a_node("n1")], []) == Scheduled("n1")


def test_no_nodes_at_all() -> None:
    assert place(a_pending_vmi(), [], []) == Unschedulable("no nodes available to schedule pods")


def test_not_ready_node_is_refused_with_the_not_ready_taint() -> None:
    result = place(a_pending_vmi(), [a_node("n1", ready="False")], [])
    assert result == Unschedulable(
        "0/1 nodes are available: 1 node(s) had untolerated taint {node.kubernetes.io/not-ready: }."
    )


def test_cordoned_node_is_refused() -> None:
    result = place(a_pending_vmi(), [a_node("n1", unschedulable=True)], [])
    assert result == Unschedulable("0/1 nodes are available: 1 node(s) were unschedulable.")


def test_node_without_schedulable_label_is_refused() -> None:
    node = a_node("n1")
    node["metadata"]["labels"]["kubevirt.io/schedulable"] = "false"
    assert isinstance(place(a_pending_vmi(), [node], []), Unschedulable)


def test_message_counts_and_sorts_reasons_like_kube_scheduler() -> None:
    vmi = a_pending_vmi(memory="3Gi", nodeSelector={"disk": "ssd"})
    nodes = [a_node("n1", labels={"disk": "ssd"}, memory="2Gi"), a_node("n2")]
    assert place(vmi, nodes, []) == Unschedulable(
        "0/2 nodes are available: 1 Insufficient memory, "
        "1 node(s) didn't match Pod's node affinity/selector."
    )


def test_memory_already_taken_by_placed_vmis_counts() -> None:
    vmi = a_pending_vmi(memory="2Gi")
    nodes = [a_node("n1"), a_node("n2")]
    # n1 would be chosen first (name tie-break) but holds a 2Gi guest already... n2 is emptier
    assert place(vmi, nodes, [on("n1", a_pending_vmi("big", memory="2Gi"))]) == Scheduled("n2")
    full = [on("n1", a_pending_vmi("a", memory="3Gi")), on("n2", a_pending_vmi("b", memory="3Gi"))]
    assert place(vmi, nodes, full) == Unschedulable(
        "0/2 nodes are available: 2 Insufficient memory."
    )


def test_finished_vmis_free_their_node() -> None:
    done = {
        **a_pending_vmi("old", memory="3Gi"),
        "status": {"phase": "Succeeded", "nodeName": "n1"},
    }
    assert place(a_pending_vmi(memory="2Gi"), [a_node("n1")], [done]) == Scheduled("n1")


def test_cpu_request_is_a_tenth_of_vcpus_unless_requested() -> None:
    assert vmi_request(a_pending_vmi(cpus=4)).cpu_millis == 400
    vmi = a_pending_vmi()
    vmi["spec"]["domain"]["resources"] = {"requests": {"cpu": "3", "memory": "64Mi"}}
    request = vmi_request(vmi)
    assert request.cpu_millis == 3000
    assert request.memory_bytes == 64 * 2**20 + MEMORY_OVERHEAD_BYTES
    assert place(vmi, [a_node("n1")], []) == Unschedulable(
        "0/1 nodes are available: 1 Insufficient cpu."
    )


@pytest.mark.parametrize(
    ("operator", "values", "fits"),
    [
        ("In", ["a", "b"], True),
        ("In", ["c"], False),
        ("NotIn", ["a"], False),
        ("NotIn", ["c"], True),
        ("Exists", [], True),
        ("DoesNotExist", [], False),
    ],
)
def test_required_node_affinity_operators(operator: str, values: list[str], fits: bool) -> None:
    term = {"matchExpressions": [{"key": "zone", "operator": operator, "values": values}]}
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}
        }
    }
    result = place(a_pending_vmi(affinity=affinity), [a_node("n1", labels={"zone": "a"})], [])
    assert isinstance(result, Scheduled) is fits


@pytest.mark.parametrize(
    ("operator", "value", "fits"),
    [("Gt", "4", True), ("Gt", "8", False), ("Lt", "9", True), ("Lt", "8", False)],
)
def test_required_node_affinity_numeric_operators(operator: str, value: str, fits: bool) -> None:
    term = {"matchExpressions": [{"key": "cores", "operator": operator, "values": [value]}]}
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}
        }
    }
    result = place(a_pending_vmi(affinity=affinity), [a_node("n1", labels={"cores": "8"})], [])
    assert isinstance(result, Scheduled) is fits


def test_preferred_node_affinity_wins_over_free_space() -> None:
    pref = {
        "weight": 50,
        "preference": {"matchExpressions": [{"key": "gpu", "operator": "Exists"}]},
    }
    affinity = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [pref]}}
    nodes = [a_node("n1", memory="64Gi"), a_node("n2", labels={"gpu": "yes"})]
    assert place(a_pending_vmi(affinity=affinity), nodes, []) == Scheduled("n2")


def test_least_allocated_node_is_preferred() -> None:
    nodes = [a_node("n1"), a_node("n2")]
    busy = [on("n1", a_pending_vmi("x", memory="2Gi"))]
    assert place(a_pending_vmi(memory="512Mi"), nodes, busy) == Scheduled("n2")


def test_pod_anti_affinity_keeps_replicas_apart() -> None:
    term = {
        "labelSelector": {"matchLabels": {"app": "db"}},
        "topologyKey": "kubernetes.io/hostname",
    }
    anti = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}
    first = on("n1", a_pending_vmi("db-0", labels={"app": "db"}))
    second = a_pending_vmi("db-1", labels={"app": "db"}, affinity=anti)
    assert place(second, [a_node("n1"), a_node("n2")], [first]) == Scheduled("n2")
    assert place(second, [a_node("n1")], [first]) == Unschedulable(
        "0/1 nodes are available: 1 node(s) didn't match pod anti-affinity rules."
    )


def test_existing_anti_affinity_is_symmetric() -> None:
    term = {
        "labelSelector": {"matchLabels": {"app": "web"}},
        "topologyKey": "kubernetes.io/hostname",
    }
    anti = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}
    loner = on("n1", a_pending_vmi("loner", affinity=anti))
    result = place(a_pending_vmi("web", labels={"app": "web"}), [a_node("n1")], [loner])
    assert result == Unschedulable(
        "0/1 nodes are available: 1 node(s) didn't satisfy existing pods anti-affinity rules."
    )


def test_pod_affinity_follows_the_selected_vmis() -> None:
    term = {
        "labelSelector": {"matchLabels": {"app": "db"}},
        "topologyKey": "kubernetes.io/hostname",
    }
    aff = {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}
    db = on("n2", a_pending_vmi("db", labels={"app": "db"}))
    app = a_pending_vmi("app", affinity=aff)
    assert place(app, [a_node("n1"), a_node("n2")], [db]) == Scheduled("n2")
    assert place(app, [a_node("n1")], [db]) == Unschedulable(
        "0/1 nodes are available: 1 node(s) didn't match pod affinity rules."
    )


def test_pod_affinity_lets_the_first_of_a_group_anywhere() -> None:
    term = {
        "labelSelector": {"matchLabels": {"app": "db"}},
        "topologyKey": "kubernetes.io/hostname",
    }
    aff = {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}
    first = a_pending_vmi("db-0", labels={"app": "db"}, affinity=aff)
    assert place(first, [a_node("n1")], []) == Scheduled("n1")


def test_pod_affinity_uses_the_topology_key() -> None:
    term = {"labelSelector": {"matchLabels": {"app": "db"}}, "topologyKey": "zone"}
    aff = {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}
    nodes = [
        a_node("n1", labels={"zone": "a"}),
        a_node("n2", labels={"zone": "b"}),
        a_node("n3", labels={"zone": "b"}),
    ]
    db = on("n3", a_pending_vmi("db", labels={"app": "db"}))
    assert place(a_pending_vmi("app", affinity=aff), nodes, [db]) in (
        Scheduled("n2"),
        Scheduled("n3"),
    )
    assert place(a_pending_vmi("app", affinity=aff), nodes[:1], [db]) != Scheduled("n1")


@pytest.mark.parametrize(
    ("toleration", "fits"),
    [
        ({"key": "dedicated", "operator": "Equal", "value": "vms", "effect": "NoSchedule"}, True),
        ({"key": "dedicated", "operator": "Exists"}, True),
        ({"operator": "Exists"}, True),
        ({"key": "dedicated", "operator": "Equal", "value": "other"}, False),
        ({"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}, False),
        (None, False),
    ],
)
def test_taints_need_a_matching_toleration(toleration: JSON | None, fits: bool) -> None:
    taint = {"key": "dedicated", "value": "vms", "effect": "NoSchedule"}
    spec = {"tolerations": [toleration]} if toleration else {}
    result = place(a_pending_vmi(**spec), [a_node("n1", taints=[taint])], [])
    assert isinstance(result, Scheduled) is fits
    if not fits:
        assert result == Unschedulable(
            "0/1 nodes are available: 1 node(s) had untolerated taint {dedicated: vms}."
        )


def test_prefer_no_schedule_taint_only_lowers_the_score() -> None:
    soft = {"key": "busy", "effect": "PreferNoSchedule"}
    nodes = [a_node("n1", taints=[soft]), a_node("n2")]
    assert place(a_pending_vmi(), nodes, []) == Scheduled("n2")
    assert place(a_pending_vmi(), nodes[:1], []) == Scheduled("n1")


def test_scheduled_vmi_records_node_phase_and_label() -> None:
    vmi = scheduled_vmi(a_pending_vmi(), "n1", "2026-01-01T12:00:00Z")
    assert vmi["status"]["phase"] == "Scheduled"
    assert vmi["status"]["nodeName"] == "n1"
    assert vmi["metadata"]["labels"]["kubevirt.io/nodeName"] == "n1"
    assert vmi["status"]["phaseTransitionTimestamps"][-1]["phase"] == "Scheduled"


def test_unschedulable_vmi_carries_pod_scheduled_false() -> None:
    vmi = unschedulable_vmi(a_pending_vmi(), "0/0", "2026-01-01T12:00:00Z")
    assert vmi["status"]["phase"] == "Scheduling"
    scheduled = cond(vmi["status"], "PodScheduled")
    assert scheduled is not None
    assert (scheduled["status"], scheduled["reason"], scheduled["message"]) == (
        "False",
        "Unschedulable",
        "0/0",
    )


# --- the controllers against the embedded API server ---------------------------------------------


async def eventually(probe: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
    """Polls ``probe`` until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await probe()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {result!r})")
        await asyncio.sleep(0.05)


@pytest.fixture
async def client(apiserver: ThreadedServer) -> AsyncIterator[Client]:
    async with Client.from_kubeconfig(apiserver.kubeconfig) as c:
        yield c
    # aiohttp closes TLS transports on a later loop iteration; give it one before the loop ends
    await asyncio.sleep(0.25)


@pytest.fixture
async def controllers(client: Client) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(Manager(virt_controllers(client)).run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_vm_lifecycle_against_the_api_server(
    client: Client, controllers: None, unique: str
) -> None:
    ns, node_name = f"vc-{unique}", f"node-{unique}"
    await client.create(NAMESPACE, {"metadata": {"name": ns}})
    labels = {
        "kubernetes.io/hostname": node_name,
        "kubevirt.io/schedulable": "true",
        "vmo.dev/test": unique,
    }
    await client.create(NODE, {"metadata": {"name": node_name, "labels": labels}})
    node_status: JSON = {
        "allocatable": {"cpu": "2", "memory": "4Gi"},
        "conditions": [{"type": "Ready", "status": "False"}],
    }
    await client.patch_status(NODE, node_name, node_status)
    vm = a_vm("Always")
    vm["metadata"] = {"name": "db", "namespace": ns}
    # only this test's node fits, whatever other nodes the shared server holds
    vm["spec"]["template"]["spec"]["nodeSelector"] = {"vmo.dev/test": unique}
    created = await client.create(VM, vm)

    async def vm_status(printable: str) -> JSON | None:
        got = await client.get(VM, "db", ns)
        return got if got.get("status", {}).get("printableStatus") == printable else None

    async def vmi_phase(phase: str) -> JSON | None:
        got = await client.find(VMI, "db", ns)
        return got if got and got.get("status", {}).get("phase") == phase else None

    try:
        vmi = await eventually(lambda: client.find(VMI, "db", ns))
        owner = vmi["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["uid"], owner["controller"]) == (
            "VirtualMachine",
            created["metadata"]["uid"],
            True,
        )

        unschedulable = await eventually(lambda: vm_status("ErrorUnschedulable"))
        scheduled_cond = cond(unschedulable["status"], "PodScheduled")
        assert scheduled_cond is not None
        # other tests' nodes on the shared server may be not-ready too: the count varies
        assert re.search(
            r"\d+ node\(s\) had untolerated taint \{node.kubernetes.io/not-ready: \}",
            scheduled_cond["message"],
        )
        vmi = await client.get(VMI, "db", ns)
        assert vmi["status"]["phase"] == "Scheduling" and not vmi["status"].get("nodeName")

        node_status["conditions"] = [{"type": "Ready", "status": "True"}]
        await client.patch_status(NODE, node_name, node_status)
        vmi = await eventually(lambda: vmi_phase("Scheduled"))
        assert vmi["status"]["nodeName"] == node_name
        assert vmi["metadata"]["labels"]["kubevirt.io/nodeName"] == node_name
        await eventually(lambda: vm_status("Starting"))

        # virt-api's restart leaves [Stop uid, Start] in status.stateChangeRequests
        restart = f"/apis/subresources.kubevirt.io/v1/namespaces/{ns}/virtualmachines/db/restart"
        await client.request("PUT", restart, {})
        old_uid = vmi["metadata"]["uid"]

        async def replaced() -> JSON | None:
            got = await client.find(VMI, "db", ns)
            return got if got and got["metadata"]["uid"] != old_uid else None

        await eventually(replaced)
        await eventually(lambda: vmi_phase("Scheduled"))

        async def requests_done() -> bool:
            got = await client.get(VM, "db", ns)
            return not got["status"].get("stateChangeRequests")

        await eventually(requests_done)

        await client.patch(VM, "db", {"spec": {"runStrategy": "Halted"}}, ns)

        async def vmi_gone() -> bool:
            return await client.find(VMI, "db", ns) is None

        await eventually(vmi_gone)
        stopped = await eventually(lambda: vm_status("Stopped"))
        assert stopped["status"]["created"] is False
        assert stopped["status"]["runStrategy"] == "Halted"

        events, _ = await client.list(EVENT, ns)
        mine = [e for e in events if e["involvedObject"]["name"] == "db"]
        assert {"SuccessfulCreate", "SuccessfulDelete"} <= {e["reason"] for e in mine}
        assert all(e["source"]["component"] == "virt-controller" for e in mine)
    finally:
        await client.delete(VM, "db", ns)
        await client.delete(NODE, node_name)


async def test_data_volume_templates_against_the_api_server(
    client: Client, controllers: None, unique: str
) -> None:
    ns = f"vc-{unique}"
    await client.create(NAMESPACE, {"metadata": {"name": ns}})
    vm = a_vm_with_dv()
    vm["metadata"] = {"name": "db", "namespace": ns}
    created = await client.create(VM, vm)

    async def provisioning() -> JSON | None:
        got = await client.get(VM, "db", ns)
        return got if got.get("status", {}).get("printableStatus") == "Provisioning" else None

    try:
        await eventually(provisioning)
        dv = await client.get(DATAVOLUME, "db-root", ns)
        assert dv["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
        assert await client.find(VMI, "db", ns) is None
        await client.patch_status(DATAVOLUME, "db-root", {"phase": "Succeeded"}, ns)
        vmi = await eventually(lambda: client.find(VMI, "db", ns))
        assert vmi["spec"]["volumes"] == [{"name": "root", "dataVolume": {"name": "db-root"}}]
    finally:
        await client.delete(VM, "db", ns)
        await client.delete(DATAVOLUME, "db-root", ns)


async def test_one_vmi_whose_data_breaks_placement_fails_alone(
    apiserver: ThreadedServer, client: Client, unique: str
) -> None:
    """Probe: ``memory.guest: "1e400"`` once stopped every scheduling pass. Admission refuses it
    now, so the bad VMI is put straight into the store, as one admitted by an older release."""
    ns, node_name = f"vs-{unique}", f"node-{unique}"
    await client.create(NAMESPACE, {"metadata": {"name": ns}})
    labels = {"kubernetes.io/hostname": node_name, "kubevirt.io/schedulable": "true"}
    await client.create(NODE, {"metadata": {"name": node_name, "labels": {**labels, "t": unique}}})
    ready = {
        "allocatable": {"cpu": "2", "memory": "4Gi"},
        "conditions": [{"type": "Ready", "status": "True"}],
    }
    await client.patch_status(NODE, node_name, ready)

    def vmi_named(name: str, memory: str) -> JSON:
        vm = a_vm()
        vm["spec"]["template"]["spec"]["nodeSelector"] = {"t": unique}
        vm["spec"]["template"]["spec"]["domain"]["memory"]["guest"] = memory
        vmi = build_vmi(vm)
        vmi["metadata"] = {"name": name, "namespace": ns}
        return vmi

    bad = vmi_named("bad", "1e400")
    bad["metadata"] |= {
        "uid": f"uid-{unique}",
        "creationTimestamp": "2020-01-01T00:00:00Z",  # oldest: the pass meets it first
        "generation": 1,
    }

    async def inject() -> None:
        assert apiserver.server is not None
        default_vmi(bad)  # as an older release stored it: defaulted, then admitted
        apiserver.server.store.create(f"kubevirt.io/virtualmachineinstances/{ns}/bad", bad)

    apiserver.call(inject())
    scheduler = SchedulerController(client)
    await scheduler.start()
    try:
        await client.create(VMI, vmi_named("good", "128Mi"))
        assert await scheduler.schedule_pending() >= 1
        good = await client.get(VMI, "good", ns)
        assert good["status"]["nodeName"] == node_name
        events, _ = await client.list(EVENT, ns, field_selector="involvedObject.name=bad")
        assert [e["reason"] for e in events] == ["FailedScheduling"]
        assert "cannot be placed" in events[0]["message"]
        stored = await client.get(VMI, "bad", ns)
        assert not stored["status"].get("nodeName")
        why = cond(stored["status"], "PodScheduled")
        assert why is not None and (why["status"], why["reason"]) == ("False", "InvalidRequest")
        assert "1e400" in why["message"] and "out of range" in why["message"]
    finally:
        await scheduler.stop()
