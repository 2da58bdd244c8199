"""The balance controller: each BalancePolicy's cycle, and each recommendation's execution.

One controller, one worker, two kinds of key, so that a cycle and an execution never race on
the policy's status (its cooldowns):

- ``policy/NAME`` runs the policy's cycle once its interval has passed (or its spec changed):
  read the policy (a bad spec: ``Ready=False`` naming the field, nothing else), measure usage
  through Prometheus (unreachable: ``MeasurementsAvailable=False`` saying why, nothing else),
  build the model (``cluster.build``), let the decision engine plan (``algorithm.recommend``),
  then write the plan as BalanceRecommendations: new ones created, repeated ones refreshed,
  pending ones the plan dropped deleted (superseded). In Full mode, inside a maintenance window
  if the policy has any, each new recommendation is carried out at once.
- ``rec/NAMESPACE/NAME`` follows one recommendation: approved (``vmo balance apply``) and still
  pending, it is carried out; migrating, its VirtualMachineInstanceMigration's phase becomes
  its own (Succeeded or Failed, with the migration's message).

Carrying a recommendation out is creating a VirtualMachineInstanceMigration of its VMI with
``addedNodeSelector`` naming the target (KubeVirt's own way to pick a migration's node), and
starting the VMI's cooldown. VMs that two policies select are moved by neither: both policies
say so in a ``Conflict`` condition.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from vmo.api.scheduling import InvalidRequest, feasible_nodes, vmi_request
from vmo.client import KUBEVIRT, NAMESPACE, NODE, VM, VMI, VMIM, Client, Conflict, NotFound
from vmo.client.prometheus import (
    PrometheusClient,
    PrometheusConfig,
    PrometheusError,
    PrometheusNotConfigured,
)
from vmo.controllers.balance import algorithm
from vmo.controllers.balance.cluster import (
    Model,
    build,
    schedulable,
    selection_labels,
    vmi_key,
)
from vmo.controllers.balance.crds import BALANCE_POLICY, BALANCE_RECOMMENDATION
from vmo.controllers.balance.measure import MeasurementError, Measurements, measure
from vmo.controllers.balance.model import Plan, Recommendation, Vm
from vmo.controllers.balance.policy import InvalidPolicy, PolicySpec, overlaps, parse_policy
from vmo.runtime import (
    Controller,
    EventRecorder,
    Result,
    Selector,
    Watch,
    condition,
    merge_conditions,
    observed_generation,
    parse_timestamp,
    timestamp,
)

log = logging.getLogger(__name__)

JSON = dict[str, Any]
POLICY_LABEL = "vmo.dev/balance-policy"
RECOMMENDATION_LABEL = "vmo.dev/balance-recommendation"
HOSTNAME = "kubernetes.io/hostname"
ASSUMED_BANDWIDTH = 64 * 2**20  # KubeVirt's default bandwidthPerMigration (0 = unlimited)
RETRY_UNAVAILABLE = 60.0
KEEP_FINISHED = 20  # finished recommendations kept per policy, newest first
FINISHED = ("Succeeded", "Failed", "Superseded")

# how the controllers reach Prometheus, asked each cycle (PrometheusError: they cannot)
PrometheusSource = Callable[[], PrometheusConfig]


def recommendation_name(policy: str, rec: Recommendation) -> str:
    """Stable across cycles for one move, so that ``vmo balance apply ID`` keeps its ID."""
    digest = hashlib.sha256(f"{policy}/{rec.vm}/{rec.source}/{rec.target}".encode()).hexdigest()
    vmi = rec.vm.split("/", 1)[1]
    return f"{vmi[:54]}-{digest[:8]}"


def _policy_key(_etype: str, obj: JSON) -> list[str]:
    return [f"policy/{obj['metadata']['name']}"]


def _rec_key(_etype: str, obj: JSON) -> list[str]:
    md = obj["metadata"]
    return [f"rec/{md.get('namespace', '')}/{md['name']}"]


def _migration_key(_etype: str, obj: JSON) -> list[str]:
    md = obj["metadata"]
    rec = (md.get("labels") or {}).get(RECOMMENDATION_LABEL)
    return [f"rec/{md.get('namespace', '')}/{rec}"] if rec else []


def _seconds_since(stamp: object, now: float) -> float | None:
    if not stamp:
        return None
    try:
        return now - parse_timestamp(str(stamp)).timestamp()
    except ValueError:
        return None


class BalanceController(Controller):
    name = "balance"
    workers = 1

    def __init__(self, client: Client, prometheus: PrometheusSource) -> None:
        super().__init__(client)
        self.prometheus = prometheus
        self.events = EventRecorder(client, component="vmo-balancer", clock=self.clock)
        # each policy's last measurements: initial placement weighs what the cycle measured
        self.measured: dict[str, Measurements] = {}

    def watches(self) -> Sequence[Watch]:
        return [
            Watch(BALANCE_POLICY, _policy_key),
            Watch(BALANCE_RECOMMENDATION, _rec_key),
            Watch(Selector(VMIM, label_selector=RECOMMENDATION_LABEL), _migration_key),
            Watch(NODE, lambda _e, _o: []),
            Watch(VMI, lambda _e, _o: []),
            Watch(VM, lambda _e, _o: []),
            Watch(NAMESPACE, lambda _e, _o: []),
            Watch(KUBEVIRT, lambda _e, _o: []),
        ]

    def resync_keys(self) -> list[str]:
        return [f"policy/{name}" for name in self.informer(BALANCE_POLICY).cache]

    async def reconcile(self, key: str) -> Result | None:
        kind, _, rest = key.partition("/")
        if kind == "policy":
            return await self.cycle(rest)
        namespace, _, name = rest.partition("/")
        await self.follow(namespace, name)
        return None

    # --- the cycle -------------------------------------------------------------------------------

    async def cycle(self, name: str, *, force: bool = False) -> Result | None:
        policy = await self.client.find(BALANCE_POLICY, name)
        if policy is None:
            await self._drop_pending(name, keep=set())
            return None
        try:
            spec = parse_policy(policy)
        except InvalidPolicy as exc:
            await self._status(policy, [condition("Ready", False, "InvalidSpec", str(exc))],
                               message=f"invalid spec, no recommendations: {exc}")  # fmt: skip
            return None
        if spec.suspend:
            await self._status(policy, [condition("Ready", False, "Suspended", "spec.suspend")])
            return None
        now = time.time()
        status = policy.get("status") or {}
        due = self._due(policy, spec, now)
        if due > 0 and not force:
            return Result.after(due)
        try:
            config = self.prometheus()
        except PrometheusNotConfigured as exc:
            why = f"no Prometheus is configured for the controllers ({exc})"
            await self._unmeasured(policy, "PrometheusNotConfigured", why)
            return Result.after(min(spec.interval, RETRY_UNAVAILABLE))
        except PrometheusError as exc:
            await self._unmeasured(policy, "PrometheusUnavailable", str(exc))
            return Result.after(min(spec.interval, RETRY_UNAVAILABLE))
        async with PrometheusClient(config) as prom:
            try:
                measured = await measure(prom, spec.measurement, network="network" in spec.settings.resources)  # fmt: skip
            except MeasurementError as exc:
                await self._unmeasured(policy, "PrometheusUnavailable", str(exc))
                return Result.after(min(spec.interval, RETRY_UNAVAILABLE))
        self.measured[name] = measured
        spec = spec.with_migration_limits(*self._cluster_limits())
        model, contested = self._model(spec, measured)
        cooldowns = algorithm.Cooldowns.from_dict(
            _cooldowns_in(status), spec.cooldown_minimum, spec.cooldown_maximum
        )
        cooldowns.prune(now)
        bandwidth = measured.bandwidth or ASSUMED_BANDWIDTH
        plan = algorithm.recommend(
            model.nodes,
            model.vms,
            spec.settings,
            cooldown=cooldowns,
            now=now,
            bandwidth=bandwidth,
        )
        names = await self._write_plan(policy, spec, plan, measured)
        started = 0
        if spec.migrates and spec.in_window(datetime.now(UTC)):
            for rec in plan.recommendations:
                started += await self._execute_new(policy, names[rec.vm], rec, cooldowns, now)
        await self._cycle_status(policy, spec, plan, model, measured, contested, cooldowns,
                                 started, now)  # fmt: skip
        return Result.after(spec.interval)

    def _due(self, policy: JSON, spec: PolicySpec, now: float) -> float:
        """Seconds until the next cycle (0: now, also when the spec changed since the last)."""
        status = policy.get("status") or {}
        if status.get("observedGeneration") != observed_generation(policy):
            return 0.0
        since = _seconds_since(status.get("lastCycleTime"), now)
        return 0.0 if since is None else max(spec.interval - since, 0.0)

    def _valid_policies(self) -> list[PolicySpec]:
        """Every BalancePolicy whose spec reads (a bad one says so in its own status)."""
        found = []
        for policy in self.informer(BALANCE_POLICY).items():
            try:
                found.append(parse_policy(policy))
            except InvalidPolicy:
                continue
        return found

    def _cluster_limits(self) -> tuple[int, int]:
        """The KubeVirt CR's migration limits (KubeVirt's defaults: 2 per node, 5 in all)."""
        for kv in self.informer(KUBEVIRT).items():
            migrations = ((kv.get("spec") or {}).get("configuration") or {}).get("migrations") or {}
            return (
                int(migrations.get("parallelOutboundMigrationsPerNode") or 2),
                int(migrations.get("parallelMigrationsPerCluster") or 5),
            )
        return 2, 5

    def _model(
        self, spec: PolicySpec, measured: Measurements
    ) -> tuple[Model, dict[str, list[str]]]:
        nodes = self.informer(NODE).items()
        vmis = self.informer(VMI).items()
        vms = {vmi_key(vm): vm for vm in self.informer(VM).items()}
        namespaces = {n["metadata"]["name"]: n for n in self.informer(NAMESPACE).items()}
        others = [p for p in self._valid_policies() if p.name != spec.name]
        candidates = [(vmi_key(v), *selection_labels(v, vms, namespaces)) for v in vmis]
        contested = {
            k: v for k, v in overlaps([spec, *others], candidates).items() if spec.name in v
        }
        model = build(spec, nodes, vmis, vms, namespaces, measured, contested=contested)
        return model, contested

    # --- initial placement (the scheduler extender asks) ---------------------------------------

    def placement_scores(self, pod: JSON, node_names: Sequence[str]) -> dict[str, int]:
        """0..10 per node for the VMI of virt-launcher Pod ``pod`` (``vmi_scores``)."""
        md = pod.get("metadata") or {}
        namespace = str(md.get("namespace") or "")
        name = str((md.get("labels") or {}).get("vm.kubevirt.io/name") or "")
        vmi = self.informer(VMI).cache.get(f"{namespace}/{name}")
        return {} if vmi is None else self.vmi_scores(vmi, node_names)

    def placement_affinity(self, vmi: JSON) -> JSON | None:
        """The preferred node affinity (weight 100) for the node where ``vmi`` scores best among
        those kube-scheduler's filters let it run on; None when no policy places it. The
        cluster-mode mutation of a new VMI adds it."""
        ready = [n for n in self.informer(NODE).items() if schedulable(n)]
        running = [v for v in self.informer(VMI).items() if (v.get("status") or {}).get("nodeName")]
        try:
            fits = [n for n, why in feasible_nodes(vmi, ready, running).items() if not why]
        except InvalidRequest:
            return None
        scores = self.vmi_scores(vmi, fits)
        if not scores:
            return None
        best = max(sorted(scores), key=lambda n: scores[n])
        return {"weight": 100, "preference": {"matchExpressions": [
            {"key": HOSTNAME, "operator": "In", "values": [best]}]}}  # fmt: skip

    def vmi_scores(self, vmi: JSON, node_names: Sequence[str]) -> dict[str, int]:
        """0..10 per node for ``vmi``: 10 where the one Partial or Full policy that selects it
        would see the least imbalance, down to 0 where the most; no score (a neutral answer)
        when no such policy selects it."""
        vms = {vmi_key(vm): vm for vm in self.informer(VM).items()}
        namespaces = {n["metadata"]["name"]: n for n in self.informer(NAMESPACE).items()}
        labels, ns_labels = selection_labels(vmi, vms, namespaces)
        specs = [p for p in self._valid_policies() if p.selects(labels, ns_labels)]
        if len(specs) != 1 or not specs[0].places or specs[0].suspend:
            return {}  # none, Manual, or two policies: the scheduler decides alone
        spec = specs[0]
        measured = self.measured.get(spec.name) or Measurements({}, None)
        nodes = [n for n in self.informer(NODE).items() if n["metadata"]["name"] in node_names]
        model = build(spec, nodes, self.informer(VMI).items(), vms, namespaces, measured)
        newcomer = placement_vm(vmi, measured)
        if newcomer is None:
            return {}
        ranked = algorithm.rank_placement(newcomer, model.nodes, model.vms, spec.settings)
        if not ranked:
            return {}
        best, worst = ranked[0][1], ranked[-1][1]
        spread = worst - best
        return {
            node: 10 if spread <= 0 else round(10 * (worst - after) / spread)
            for node, after in ranked
        }

    # --- recommendations ------------------------------------------------------------------------

    def _recs_of(self, policy: str) -> list[JSON]:
        return [
            r
            for r in self.informer(BALANCE_RECOMMENDATION).items()
            if (r["metadata"].get("labels") or {}).get(POLICY_LABEL) == policy
        ]

    async def _write_plan(
        self, policy: JSON, spec: PolicySpec, plan: Plan, measured: Measurements
    ) -> dict[str, str]:
        name = policy["metadata"]["name"]
        existing = {
            (r["metadata"]["namespace"], r["metadata"]["name"]): r for r in self._recs_of(name)
        }
        written: dict[str, str] = {}
        for rec in plan.recommendations:
            namespace = rec.vm.split("/", 1)[0]
            rec_name = recommendation_name(name, rec)
            written[rec.vm] = rec_name
            body = self._rec_body(policy, spec, rec, rec_name, measured)
            old = existing.get((namespace, rec_name))
            phase = ((old or {}).get("status") or {}).get("phase")
            if old is not None and phase in FINISHED:
                await self.client.delete(BALANCE_RECOMMENDATION, rec_name, namespace)
                old = None
            if old is None:
                try:
                    await self.client.create(BALANCE_RECOMMENDATION, body, namespace)
                except Conflict:
                    continue  # still being deleted: the next cycle writes it
                await self.client.patch_status(
                    BALANCE_RECOMMENDATION, rec_name, {"phase": "Pending",
                    "message": "recommended; `vmo balance apply` carries it out"
                    if not spec.migrates else "recommended"}, namespace,
                )  # fmt: skip
            elif phase in (None, "Pending"):
                spec_now = {k: v for k, v in body["spec"].items() if k != "approved"}
                if any(old["spec"].get(k) != v for k, v in spec_now.items()):
                    await self.client.patch(BALANCE_RECOMMENDATION, rec_name, {"spec": spec_now}, namespace)  # fmt: skip
        await self._drop_pending(name, keep={(k.split("/", 1)[0], v) for k, v in written.items()})
        await self._prune_finished(name)
        return written

    def _rec_body(
        self, policy: JSON, spec: PolicySpec, rec: Recommendation, name: str, m: Measurements
    ) -> JSON:
        namespace, vmi = rec.vm.split("/", 1)
        md = policy["metadata"]
        return {
            "apiVersion": "vmo.dev/v1alpha1",
            "kind": "BalanceRecommendation",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {POLICY_LABEL: md["name"], "kubevirt.io/vmi": vmi[:63]},
                "ownerReferences": [
                    {
                        "apiVersion": "vmo.dev/v1alpha1",
                        "kind": "BalancePolicy",
                        "name": md["name"],
                        "uid": md.get("uid", ""),
                    }
                ],
            },
            "spec": {
                "policy": md["name"],
                "virtualMachineInstance": vmi,
                "source": rec.source,
                "target": rec.target,
                "priority": rec.priority,
                "rule": rec.rule,
                "reason": rec.reason,
                "imbalanceBefore": round(rec.imbalance_before, 4),
                "imbalanceAfter": round(rec.imbalance_after, 4),
                "memoryBytes": int(rec.memory_bytes),
                "expectedSeconds": round(rec.seconds, 1),
                "bandwidth": {
                    "bytesPerSecond": float(m.bandwidth or ASSUMED_BANDWIDTH),
                    "source": "measured" if m.bandwidth else "assumed",
                },
            },
        }

    async def _drop_pending(self, policy: str, keep: set[tuple[str, str]]) -> None:
        """Pending recommendations this cycle did not repeat are superseded: deleted."""
        for rec in self._recs_of(policy):
            md = rec["metadata"]
            phase = (rec.get("status") or {}).get("phase") or "Pending"
            if phase == "Pending" and (md["namespace"], md["name"]) not in keep:
                await self.client.delete(BALANCE_RECOMMENDATION, md["name"], md["namespace"])

    async def _prune_finished(self, policy: str) -> None:
        finished = [
            r for r in self._recs_of(policy) if (r.get("status") or {}).get("phase") in FINISHED
        ]
        finished.sort(
            key=lambda r: str((r.get("status") or {}).get("completionTime") or ""), reverse=True
        )
        for rec in finished[KEEP_FINISHED:]:
            md = rec["metadata"]
            await self.client.delete(BALANCE_RECOMMENDATION, md["name"], md["namespace"])

    # --- carrying out ---------------------------------------------------------------------------

    async def _execute_new(
        self, policy: JSON, name: str, rec: Recommendation, cooldowns: algorithm.Cooldowns,
        now: float,
    ) -> int:  # fmt: skip
        namespace = rec.vm.split("/", 1)[0]
        found = await self.client.find(BALANCE_RECOMMENDATION, name, namespace)
        if found is None or ((found.get("status") or {}).get("phase") or "Pending") != "Pending":
            return 0
        if await self._migrate(found):
            cooldowns.moved(rec.vm, now, rec.source)
            return 1
        return 0

    async def _migrate(self, rec: JSON) -> bool:
        """Creates the migration; the recommendation becomes Migrating (or Failed, saying why)."""
        md, spec = rec["metadata"], rec["spec"]
        namespace, vmi_name = md["namespace"], spec["virtualMachineInstance"]
        vmi = await self.client.find(VMI, vmi_name, namespace)
        stamp = timestamp()
        where = ((vmi or {}).get("status") or {}).get("nodeName")
        if vmi is None or where != spec["source"]:
            await self.client.patch_status(BALANCE_RECOMMENDATION, md["name"], {
                "phase": "Superseded", "completionTime": stamp,
                "message": f"the VMI is no longer on {spec['source']}"
                if vmi is not None else "the VMI is gone"}, namespace)  # fmt: skip
            return False
        body = {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstanceMigration",
            "metadata": {
                "generateName": f"{vmi_name[:40]}-balance-",
                "namespace": namespace,
                "labels": {
                    RECOMMENDATION_LABEL: md["name"],
                    POLICY_LABEL: spec["policy"],
                },
            },
            "spec": {"vmiName": vmi_name, "addedNodeSelector": {HOSTNAME: spec["target"]}},
        }
        try:
            migration = await self.client.create(VMIM, body, namespace)
        except Exception as exc:  # refused (e.g. not migratable): the recommendation says why
            log.warning("migration for %s/%s refused: %s", namespace, md["name"], exc)
            await self.client.patch_status(BALANCE_RECOMMENDATION, md["name"], {
                "phase": "Failed", "completionTime": stamp,
                "message": f"the migration was refused: {exc}"}, namespace)  # fmt: skip
            return False
        await self.client.patch_status(BALANCE_RECOMMENDATION, md["name"], {
            "phase": "Migrating", "startTime": stamp, "migration": migration["metadata"]["name"],
            "message": f"migrating to {spec['target']}"}, namespace)  # fmt: skip
        await self.events.record(vmi, "BalanceMigration",
                                 f"moving to {spec['target']}: {spec.get('reason', '')}")  # fmt: skip
        return True

    async def follow(self, namespace: str, name: str) -> None:
        rec = await self.client.find(BALANCE_RECOMMENDATION, name, namespace)
        if rec is None:
            return
        status = rec.get("status") or {}
        phase = status.get("phase") or "Pending"
        if phase == "Pending" and (rec.get("spec") or {}).get("approved"):
            policy = await self.client.find(BALANCE_POLICY, rec["spec"]["policy"])
            if policy is None:
                return
            if await self._migrate(rec):
                await self._note_move(policy, rec)
            return
        if phase != "Migrating" or not status.get("migration"):
            return
        migration = await self.client.find(VMIM, status["migration"], namespace)
        if migration is None:
            await self.client.patch_status(BALANCE_RECOMMENDATION, name, {
                "phase": "Failed", "completionTime": timestamp(),
                "message": "its migration was deleted before it ended"}, namespace)  # fmt: skip
            return
        mphase = (migration.get("status") or {}).get("phase")
        if mphase in ("Succeeded", "Failed"):
            state = (migration.get("status") or {}).get("migrationState") or {}
            message = state.get("failureReason") or f"migration {mphase.lower()}"
            await self.client.patch_status(BALANCE_RECOMMENDATION, name, {
                "phase": mphase, "completionTime": timestamp(), "message": message}, namespace)  # fmt: skip

    async def _note_move(self, policy: JSON, rec: JSON) -> None:
        """An approved move starts its VM's cooldown, as an automatic one does."""
        spec = rec["spec"]
        try:
            parsed = parse_policy(policy)
            bounds = (parsed.cooldown_minimum, parsed.cooldown_maximum)
        except InvalidPolicy:
            bounds = (algorithm.COOLDOWN_MIN, algorithm.COOLDOWN_MAX)
        cooldowns = algorithm.Cooldowns.from_dict(
            _cooldowns_in(policy.get("status") or {}), *bounds
        )
        cooldowns.moved(f"{rec['metadata']['namespace']}/{spec['virtualMachineInstance']}",
                        time.time(), spec["source"])  # fmt: skip
        started = int((policy.get("status") or {}).get("migrationsStarted") or 0) + 1
        await self.client.patch_status(
            BALANCE_POLICY, policy["metadata"]["name"],
            {"cooldowns": _cooldowns_out(cooldowns), "migrationsStarted": started},
        )  # fmt: skip

    # --- status ---------------------------------------------------------------------------------

    async def _status(self, policy: JSON, conditions: list[JSON], **fields: Any) -> None:
        old = (policy.get("status") or {}).get("conditions")
        status = {
            "observedGeneration": observed_generation(policy),
            "conditions": merge_conditions(old, conditions, timestamp(), keep_others=True),
            **fields,
        }
        try:
            await self.client.patch_status(BALANCE_POLICY, policy["metadata"]["name"], status)
        except NotFound:
            return

    async def _unmeasured(self, policy: JSON, reason: str, why: str) -> None:
        message = f"no usage measured, so nothing is decided: {why}"
        await self._status(
            policy,
            [condition("MeasurementsAvailable", False, reason, why),
             condition("Ready", False, reason, message)],
            message=message, lastCycleTime=timestamp(),
        )  # fmt: skip

    async def _cycle_status(
        self, policy: JSON, spec: PolicySpec, plan: Plan, model: Model, measured: Measurements,
        contested: dict[str, list[str]], cooldowns: algorithm.Cooldowns, started: int, now: float,
    ) -> None:  # fmt: skip
        conflicts = condition("Conflict", False, "NoOverlap", "")
        if contested:
            shown = "; ".join(f"{vm} by {', '.join(names)}" for vm, names in sorted(contested.items())[:5])  # fmt: skip
            conflicts = condition("Conflict", True, "VMSelectedTwice",
                                  f"{len(contested)} VM(s) selected by more than one policy are "
                                  f"not moved: {shown}")  # fmt: skip
        notes = [*model.notes, *plan.notes]
        message = plan.reason + (f" ({'; '.join(notes)})" if notes else "")
        reason = "Recommended" if plan.recommendations else "NoRecommendation"
        previous = int((policy.get("status") or {}).get("migrationsStarted") or 0)
        await self._status(
            policy,
            [condition("MeasurementsAvailable", True, "Measured",
                       f"{len(measured.usage)} VMI(s) measured"),
             condition("Ready", True, reason, plan.reason), conflicts],
            lastCycleTime=timestamp(datetime.fromtimestamp(now, UTC)),
            nextCycleTime=timestamp(datetime.fromtimestamp(now + spec.interval, UTC)),
            imbalance=round(plan.imbalance, 4),
            targetImbalance=round(plan.target, 4) if plan.target != float("inf") else None,
            nodes=len(model.nodes),
            virtualMachines=len(model.selected),
            recommendations=len(plan.recommendations),
            migrationsStarted=previous + started,
            bandwidth={"bytesPerSecond": float(measured.bandwidth or ASSUMED_BANDWIDTH),
                       "source": "measured" if measured.bandwidth else "assumed"},
            message=message,
            cooldowns=_cooldowns_out(cooldowns),
        )  # fmt: skip


def placement_vm(vmi: JSON, measured: Measurements) -> Vm | None:
    """The VMI to place, as the model sees it: its usage when it ran recently (a VM restarted
    keeps its name), else its requests."""
    try:
        request = vmi_request(vmi)
    except InvalidRequest:
        return None
    md = vmi["metadata"]
    usage = measured.usage.get((md.get("namespace", ""), md.get("name", "")))
    cpu, memory = request.cpu_millis / 1000, float(request.memory_bytes)
    return Vm(
        key=vmi_key(vmi),
        node="",
        cpu=usage.cpu if usage is not None else cpu,
        memory=usage.memory if usage is not None else memory,
        cpu_request=cpu,
        memory_request=memory,
        memory_to_copy=memory,
        network=usage.network if usage is not None else None,
    )


def _cooldowns_in(status: JSON) -> dict[str, dict[str, float | str]]:
    out: dict[str, dict[str, float | str]] = {}
    for entry in status.get("cooldowns") or []:
        try:
            at = parse_timestamp(str(entry["lastMove"])).timestamp()
            out[str(entry["vm"])] = {"at": at, "seconds": float(entry["seconds"]),
                                     "source": str(entry.get("source") or "")}  # fmt: skip
        except (KeyError, ValueError, TypeError):
            continue
    return out


def _cooldowns_out(cooldowns: algorithm.Cooldowns) -> list[JSON]:
    out = []
    for vm, entry in cooldowns.to_dict().items():
        at, seconds = float(entry["at"]), float(entry["seconds"])
        out.append({
            "vm": vm,
            "lastMove": timestamp(datetime.fromtimestamp(at, UTC)),
            "seconds": seconds,
            "source": str(entry["source"]),
            "until": timestamp(datetime.fromtimestamp(at + seconds, UTC)),
        })  # fmt: skip
    return out


__all__ = ["POLICY_LABEL", "RECOMMENDATION_LABEL", "BalanceController", "recommendation_name"]
