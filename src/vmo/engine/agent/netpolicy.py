"""The node agent's policy enforcers, each keeping one nftables table of this node in step:
MultiNetworkPolicy on bridge networks (``L2PolicyEnforcer``), and NetworkPolicy's egress on
the pod network by the QEMUs' cgroups (``PodPolicyEnforcer``, see ``podpolicy``).

One key, one pass: any change to a MultiNetworkPolicy, a VMI or a Namespace queues it; the
pass rebuilds the members of every bridge network from the VMIs (each ``bridge`` interface on
a Multus network: the VMI's labels, the interface's MAC and IPs, its named ports), compiles the
table for the members running here, and loads it atomically (``l2policy``). A migration's
target node is a member's node too while the migration is in flight, so the target has the
rules before the switch-over; the source drops them once the VMI names the target. Rules stay
while the agent is down (the guests keep running); the next agent's first pass replaces them.
The pod network's enforcer works the same way over NetworkPolicies, VMIs and Services.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from vmo.api.netpol import isolates, selects
from vmo.client import (
    MULTI_NETWORK_POLICY,
    NAMESPACE,
    NETWORK_POLICY,
    NODE,
    SERVICE,
    VMI,
    ApiStatusError,
    Client,
    Conflict,
    NotFound,
)
from vmo.engine.network.l2policy import (
    Member,
    NftError,
    Table,
    apply,
    compile_table,
    unavailable,
)
from vmo.engine.network.podpolicy import (
    Cgroups,
    PodMember,
    ServicePorts,
    apply_pod_table,
    compile_pod_table,
)
from vmo.runtime import (
    Controller,
    Result,
    TemporaryError,
    Watch,
    object_key,
    set_condition,
    timestamp,
)

log = logging.getLogger(__name__)

JSON = dict[str, Any]
KEY = "l2-policy"
RETRY_SECONDS = 5.0
# the last sync, on the agent's Node, for `vmo netpol status`
STATUS_ANNOTATION = "vmo.dev/l2-policy"
# the Node condition saying whether this node can enforce MultiNetworkPolicy
CONDITION = "NetworkPolicyReady"
# the condition of each VMI running here that a MultiNetworkPolicy selects: were its rules loaded?
VMI_CONDITION = "MultiNetworkPolicyApplied"
# the same three for NetworkPolicy's egress on the pod network
POD_CONDITION = "PodNetworkPolicyReady"
POD_VMI_CONDITION = "NetworkPolicyApplied"
POD_STATUS_ANNOTATION = "vmo.dev/pod-policy"


def _one_key(_etype: str, _obj: JSON) -> list[str]:
    return [KEY]


def _runs_on(vmi: JSON) -> set[str]:
    """The nodes whose taps carry the VMI's interfaces now: its node, and a migration's target
    while the migration is in flight."""
    status = vmi.get("status") or {}
    nodes = {str(status["nodeName"])} if status.get("nodeName") else set()
    state = status.get("migrationState") or {}
    if state.get("targetNode") and not state.get("completed") and not state.get("failed"):
        nodes.add(str(state["targetNode"]))
    return nodes


def members_of(vmi: JSON, node: str) -> list[Member]:
    """The VMI's bridge interfaces on Multus networks, as policy members."""
    md, spec, status = vmi["metadata"], vmi.get("spec") or {}, vmi.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed"):
        return []
    namespace = str(md.get("namespace") or "")
    networks = {n.get("name"): n for n in spec.get("networks") or []}
    reported = {i.get("name"): i for i in status.get("interfaces") or []}
    local = node in _runs_on(vmi)
    out = []
    for iface in ((spec.get("domain") or {}).get("devices") or {}).get("interfaces") or []:
        name = iface.get("name")
        multus = (networks.get(name) or {}).get("multus")
        if "bridge" not in iface or not multus:
            continue
        nad = str(multus.get("networkName") or "")
        nad_ns, _, nad_name = nad.rpartition("/")
        seen = reported.get(name) or {}
        mac = str(seen.get("mac") or iface.get("macAddress") or "").lower()
        if not mac:
            continue  # not started yet: no MAC to match
        ips = tuple(str(ip) for ip in seen.get("ipAddresses") or [seen.get("ipAddress")] if ip)
        ports = {
            str(p["name"]): (str(p.get("protocol") or "TCP"), int(p["port"]))
            for p in iface.get("ports") or []
            if p.get("name") and p.get("port")
        }
        out.append(
            Member(
                namespace=namespace,
                name=str(md.get("name")),
                labels=dict(md.get("labels") or {}),
                network=(nad_ns or namespace, nad_name),
                mac=mac,
                ips=ips,
                named_ports=ports,
                local=local,
            )
        )
    return out


class _Enforcer(Controller):
    """One node's table for one kind of policy, kept in step (see the subclasses)."""

    workers = 1
    resync_seconds = 60.0  # re-asserts the Node condition a heartbeat may have raced
    kind = ""  # the policy kind, for messages
    prefix = ""  # of the controller's name
    policy_resource = MULTI_NETWORK_POLICY
    node_condition = CONDITION
    vmi_condition = VMI_CONDITION
    annotation = STATUS_ANNOTATION
    ready_message = ""

    def __init__(self, client: Client, node: str, probe: Callable[[], str | None]) -> None:
        super().__init__(client)
        self.node = node
        self.name = f"{self.prefix}-{node}"
        self.table: Table | None = None
        self.last_error: str | None = None
        self.probe = probe
        # why this node cannot enforce, when it cannot (known before the first pass: VMIs may
        # be started meanwhile)
        self.cannot: str | None = probe()

    # what a subclass says
    def selecting(self, vmi: JSON, policies: Sequence[JSON]) -> JSON | None:
        """The first policy that selects ``vmi`` and that this table would have to enforce."""
        raise NotImplementedError

    def compile(self) -> Table:
        raise NotImplementedError

    def load(self, table: Table) -> None:
        raise NotImplementedError

    def extra_watches(self) -> list[Watch]:
        return []

    # the shared part
    def policies(self) -> list[JSON]:
        return list(self.informer(self.policy_resource).cache.values())

    async def blocks(self, vmi: JSON) -> str | None:
        """Why ``vmi`` must not start here: a policy selects it and this node cannot enforce
        policies of that kind (it would run open). None when it may start."""
        if self.cannot is None:
            return None
        policy = self.selecting(vmi, self.policies())
        if policy is None:
            return None
        name = f"{policy['metadata']['namespace']}/{policy['metadata']['name']}"
        return (
            f"{self.kind} {name} selects it and node {self.node} cannot enforce it: {self.cannot}"
        )

    def watches(self) -> Sequence[Watch]:
        return [
            Watch(self.policy_resource, _one_key),
            Watch(VMI, _one_key),
            Watch(NAMESPACE, _one_key),
            *self.extra_watches(),
        ]

    def resync_keys(self) -> list[str]:
        return [KEY]

    async def start(self) -> None:
        await super().start()
        self.enqueue(KEY)  # a restarted agent replaces whatever table it finds, even an empty one

    def namespace_labels(self) -> dict[str, dict[str, str]]:
        return {
            str(ns["metadata"]["name"]): dict(ns["metadata"].get("labels") or {})
            for ns in self.informer(NAMESPACE).cache.values()
        }

    async def reconcile(self, key: str) -> Result | None:
        await self.wait_synced()
        self.cannot = await asyncio.to_thread(self.probe)
        await self._condition()
        if self.cannot is not None:
            log.warning("node %s cannot enforce %s: %s", self.node, self.kind, self.cannot)
            return None
        table = self.compile()
        if self.table is not None and table.script == self.table.script:
            await self._vmi_conditions(None)  # an agent's status write may have dropped them
            return None
        try:
            await asyncio.to_thread(self.load, table)
        except NftError as exc:
            self.last_error = str(exc)
            log.warning("node %s: %s rules not applied: %s", self.node, self.kind, exc)
            await self._publish(table, str(exc))
            await self._vmi_conditions(str(exc))
            raise TemporaryError(str(exc), delay=RETRY_SECONDS) from exc
        self.table, self.last_error = table, None
        await self._vmi_conditions(None)
        await self._publish(table, None)
        log.info(
            "node %s: %s table %s: %d isolated interfaces, %d rules, %d sets",
            self.node,
            self.kind,
            table.name,
            table.members,
            table.rules,
            table.sets,
        )
        return None

    def selected_here(self) -> list[JSON]:
        """The VMIs running on this node (not a migration's target: the source owns the VMI's
        status) that a policy of this kind selects."""
        policies = self.policies()
        return [
            vmi
            for vmi in self.informer(VMI).cache.values()
            if (vmi.get("status") or {}).get("nodeName") == self.node
            and self.selecting(vmi, policies) is not None
        ]

    async def _vmi_conditions(self, error: str | None) -> None:
        """Each selected VMI's NetworkPolicyApplied condition: True once this node loaded the
        rules, False with nft's error when it could not. Written only when it changes, with the
        VMI's resourceVersion as precondition (other writers own the other conditions); a VMI
        no policy selects any more loses the condition."""
        selected = {object_key(v) for v in self.selected_here()}
        if error is None:
            wanted = {"status": "True", "reason": "RulesApplied",
                      "message": f"node {self.node} enforces the policies that select it"}  # fmt: skip
        else:
            wanted = {"status": "False", "reason": "RulesNotApplied",
                      "message": f"node {self.node} could not load its rules: {error}"}  # fmt: skip
        for vmi in list(self.informer(VMI).cache.values()):
            if (vmi.get("status") or {}).get("nodeName") != self.node:
                continue
            conditions = (vmi.get("status") or {}).get("conditions") or []
            old = next((c for c in conditions if c.get("type") == self.vmi_condition), None)
            if object_key(vmi) in selected:
                if old is not None and all(old.get(k) == v for k, v in wanted.items()):
                    continue
                updated = set_condition(
                    conditions, {"type": self.vmi_condition, **wanted}, timestamp()
                )
            elif old is not None:
                updated = [c for c in conditions if c.get("type") != self.vmi_condition]
            else:
                continue
            md = vmi["metadata"]
            patch = {
                "metadata": {"resourceVersion": md.get("resourceVersion")},
                "status": {"conditions": updated},
            }
            try:
                await self.client.patch(VMI, md["name"], patch, md["namespace"])
            except NotFound:
                pass
            except Conflict:
                self.enqueue(KEY)  # it changed meanwhile: its event brings the next pass
            except ApiStatusError as exc:
                log.warning("VMI %s/%s: %s not written: %s", md["namespace"], md["name"],
                            self.vmi_condition, exc)  # fmt: skip

    async def _publish(self, table: Table, error: str | None) -> None:
        """The last sync on this agent's Node (a failure to write it is only logged)."""
        body = {
            "table": table.name,
            "interfaces": table.members,
            "rules": table.rules,
            "sets": table.sets,
            "synced": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "error": error,
        }
        patch = {"metadata": {"annotations": {self.annotation: json.dumps(body)}}}
        try:
            await self.client.patch(NODE, self.node, patch)
        except ApiStatusError as exc:
            log.warning("node %s: %s not recorded: %s", self.node, self.annotation, exc)

    async def _condition(self) -> None:
        """The Node's condition (``node_condition``), written when it changes."""
        if self.cannot is None:
            wanted = {"status": "True", "reason": "NftablesReady",
                      "message": self.ready_message}  # fmt: skip
        else:
            wanted = {"status": "False", "reason": "NetworkPolicyUnenforceable",
                      "message": f"{self.cannot}; VMs that policies select do not start here"}  # fmt: skip
        try:
            node = await self.client.get(NODE, self.node)
            conditions = (node.get("status") or {}).get("conditions") or []
            old = next((c for c in conditions if c.get("type") == self.node_condition), None)
            if old is not None and all(old.get(k) == v for k, v in wanted.items()):
                return
            updated = set_condition(
                conditions, {"type": self.node_condition, **wanted}, timestamp()
            )
            await self.client.patch_status(NODE, self.node, {"conditions": updated})
        except ApiStatusError as exc:
            log.warning(
                "node %s: %s condition not written: %s", self.node, self.node_condition, exc
            )


class L2PolicyEnforcer(_Enforcer):
    """One per node agent: MultiNetworkPolicies on this node's bridge ports."""

    kind = "MultiNetworkPolicy"
    prefix = "l2-policy"
    ready_message = "nftables and br_netfilter enforce MultiNetworkPolicy here"

    def __init__(
        self, client: Client, node: str, probe: Callable[[], str | None] = unavailable
    ) -> None:
        super().__init__(client, node, probe)

    def selecting(self, vmi: JSON, policies: Sequence[JSON]) -> JSON | None:
        for member in members_of(vmi, self.node):
            for policy in policies:
                if selects(policy, member.namespace, member.labels, member.network):
                    return policy
        return None

    def compile(self) -> Table:
        members = [
            m for vmi in self.informer(VMI).cache.values() for m in members_of(vmi, self.node)
        ]
        return compile_table(self.node, members, self.policies(), self.namespace_labels())

    def load(self, table: Table) -> None:
        apply(table, node=self.node)


def pod_unavailable() -> str | None:
    """Why this host cannot enforce NetworkPolicy's egress on the pod network, or None."""
    if shutil.which("nft") is None:
        return "nft is not installed (Debian's nftables package)"
    if Cgroups.detect() is None:
        return (
            "no writable cgroup2 hierarchy under /sys/fs/cgroup (VMs get no cgroups of their own)"
        )
    return None


class PodPolicyEnforcer(_Enforcer):
    """One per node agent: NetworkPolicies' egress for the QEMUs on this node, by cgroup
    (``podpolicy``); ingress, and egress to Services, are the forwarders' (``PodPolicyGate``)."""

    kind = "NetworkPolicy"
    prefix = "pod-policy"
    policy_resource = NETWORK_POLICY
    node_condition = POD_CONDITION
    vmi_condition = POD_VMI_CONDITION
    annotation = POD_STATUS_ANNOTATION
    ready_message = "nftables matches each VM's cgroup: NetworkPolicy egress is enforced here"

    def __init__(
        self, client: Client, node: str, probe: Callable[[], str | None] = pod_unavailable
    ) -> None:
        super().__init__(client, node, probe)

    def extra_watches(self) -> list[Watch]:
        return [Watch(SERVICE, _one_key)]

    def selecting(self, vmi: JSON, policies: Sequence[JSON]) -> JSON | None:
        md = vmi.get("metadata") or {}
        namespace, labels = str(md.get("namespace") or ""), dict(md.get("labels") or {})
        for policy in policies:
            if selects(policy, namespace, labels) and isolates(policy, "Egress"):
                return policy
        return None

    def compile(self) -> Table:
        cgroups = Cgroups.detect()
        members = []
        for vmi in self.informer(VMI).cache.values():
            md = vmi["metadata"]
            if cgroups is None or self.node not in _runs_on(vmi):
                continue
            if (vmi.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                continue
            namespace, name = str(md["namespace"]), str(md["name"])
            if not cgroups.path(self.node, namespace, name).is_dir():
                continue  # its QEMU is not started yet: the next VMI event brings it in
            members.append(
                PodMember(
                    namespace,
                    name,
                    dict(md.get("labels") or {}),
                    cgroups.nft_match(self.node, namespace, name),
                )
            )
        services = ServicePorts.of(self.informer(SERVICE).cache.values())
        every_vm = cgroups.nft_base_match() if cgroups is not None else ""
        return compile_pod_table(self.node, members, self.policies(), services, every_vm=every_vm)

    def load(self, table: Table) -> None:
        apply_pod_table(table)
