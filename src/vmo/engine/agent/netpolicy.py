"""The node agent's MultiNetworkPolicy enforcer: this node's nftables table, kept in step.

One key, one pass: any change to a MultiNetworkPolicy, a VMI or a Namespace queues it; the
pass rebuilds the members of every bridge network from the VMIs (each ``bridge`` interface on
a Multus network: the VMI's labels, the interface's MAC and IPs, its named ports), compiles the
table for the members running here, and loads it atomically (``l2policy``). A migration's
target node is a member's node too while the migration is in flight, so the target has the
rules before the switch-over; the source drops them once the VMI names the target. Rules stay
while the agent is down (the guests keep running); the next agent's first pass replaces them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from vmo.api.netpol import selects
from vmo.client import (
    MULTI_NETWORK_POLICY,
    NAMESPACE,
    NODE,
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
# the Node condition saying whether this node can enforce policies
CONDITION = "NetworkPolicyReady"
# the condition of each VMI running here that a policy selects: were its rules loaded?
VMI_CONDITION = "NetworkPolicyApplied"


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


class L2PolicyEnforcer(Controller):
    """One per node agent: MultiNetworkPolicies on this node's bridge ports."""

    workers = 1
    resync_seconds = 60.0  # re-asserts the Node condition a heartbeat may have raced

    def __init__(
        self, client: Client, node: str, probe: Callable[[], str | None] = unavailable
    ) -> None:
        super().__init__(client)
        self.node = node
        self.name = f"l2-policy-{node}"
        self.table: Table | None = None
        self.last_error: str | None = None
        self.probe = probe
        # why this node cannot enforce, when it cannot (known before the first pass: VMIs may
        # be started meanwhile)
        self.cannot: str | None = probe()

    async def blocks(self, vmi: JSON) -> str | None:
        """Why ``vmi`` must not start here: a policy selects one of its interfaces and this node
        cannot enforce policies (it would run open). None when it may start."""
        if self.cannot is None:
            return None
        policies = list(self.informer(MULTI_NETWORK_POLICY).cache.values())
        for member in members_of(vmi, self.node):
            for policy in policies:
                if selects(policy, member.namespace, member.labels, member.network):
                    name = f"{policy['metadata']['namespace']}/{policy['metadata']['name']}"
                    return (
                        f"MultiNetworkPolicy {name} selects it and node {self.node} cannot "
                        f"enforce it: {self.cannot}"
                    )
        return None

    def watches(self) -> Sequence[Watch]:
        return [
            Watch(MULTI_NETWORK_POLICY, _one_key),
            Watch(VMI, _one_key),
            Watch(NAMESPACE, _one_key),
        ]

    def resync_keys(self) -> list[str]:
        return [KEY]

    async def start(self) -> None:
        await super().start()
        self.enqueue(KEY)  # a restarted agent replaces whatever table it finds, even an empty one

    def compile(self) -> Table:
        members = [
            m for vmi in self.informer(VMI).cache.values() for m in members_of(vmi, self.node)
        ]
        policies = list(self.informer(MULTI_NETWORK_POLICY).cache.values())
        namespaces = {
            str(ns["metadata"]["name"]): dict(ns["metadata"].get("labels") or {})
            for ns in self.informer(NAMESPACE).cache.values()
        }
        return compile_table(self.node, members, policies, namespaces)

    async def reconcile(self, key: str) -> Result | None:
        await self.wait_synced()
        self.cannot = await asyncio.to_thread(self.probe)
        await self._condition()
        if self.cannot is not None:
            log.warning("node %s cannot enforce MultiNetworkPolicy: %s", self.node, self.cannot)
            return None
        table = self.compile()
        if self.table is not None and table.script == self.table.script:
            await self._vmi_conditions(None)  # an agent's status write may have dropped them
            return None
        try:
            await asyncio.to_thread(apply, table, node=self.node)
        except NftError as exc:
            self.last_error = str(exc)
            log.warning("node %s: MultiNetworkPolicy rules not applied: %s", self.node, exc)
            await self._publish(table, str(exc))
            await self._vmi_conditions(str(exc))
            raise TemporaryError(str(exc), delay=RETRY_SECONDS) from exc
        self.table, self.last_error = table, None
        await self._vmi_conditions(None)
        await self._publish(table, None)
        log.info(
            "node %s: MultiNetworkPolicy table %s: %d isolated interfaces, %d rules, %d sets",
            self.node,
            table.name,
            table.members,
            table.rules,
            table.sets,
        )
        return None

    def selected_here(self) -> list[JSON]:
        """The VMIs running on this node (not a migration's target: the source owns the VMI's
        status) that a policy selects on one of their interfaces."""
        policies = list(self.informer(MULTI_NETWORK_POLICY).cache.values())
        out = []
        for vmi in self.informer(VMI).cache.values():
            if (vmi.get("status") or {}).get("nodeName") != self.node:
                continue
            members = members_of(vmi, self.node)
            if any(selects(p, m.namespace, m.labels, m.network) for m in members for p in policies):
                out.append(vmi)
        return out

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
            old = next((c for c in conditions if c.get("type") == VMI_CONDITION), None)
            if object_key(vmi) in selected:
                if old is not None and all(old.get(k) == v for k, v in wanted.items()):
                    continue
                updated = set_condition(conditions, {"type": VMI_CONDITION, **wanted}, timestamp())
            elif old is not None:
                updated = [c for c in conditions if c.get("type") != VMI_CONDITION]
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
                            VMI_CONDITION, exc)  # fmt: skip

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
        patch = {"metadata": {"annotations": {STATUS_ANNOTATION: json.dumps(body)}}}
        try:
            await self.client.patch(NODE, self.node, patch)
        except ApiStatusError as exc:
            log.warning("node %s: l2-policy status not recorded: %s", self.node, exc)

    async def _condition(self) -> None:
        """The Node's NetworkPolicyReady condition, written when it changes."""
        if self.cannot is None:
            wanted = {"status": "True", "reason": "NftablesReady",
                      "message": "nftables and br_netfilter enforce MultiNetworkPolicy here"}  # fmt: skip
        else:
            wanted = {"status": "False", "reason": "NetworkPolicyUnenforceable",
                      "message": f"{self.cannot}; VMs that policies select do not start here"}  # fmt: skip
        try:
            node = await self.client.get(NODE, self.node)
            conditions = (node.get("status") or {}).get("conditions") or []
            old = next((c for c in conditions if c.get("type") == CONDITION), None)
            if old is not None and all(old.get(k) == v for k, v in wanted.items()):
                return
            updated = set_condition(conditions, {"type": CONDITION, **wanted}, timestamp())
            await self.client.patch_status(NODE, self.node, {"conditions": updated})
        except ApiStatusError as exc:
            log.warning("node %s: %s condition not written: %s", self.node, CONDITION, exc)
