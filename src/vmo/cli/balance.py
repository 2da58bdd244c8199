"""``vmo balance``: the balancer (an explainable DRS) from the command line.

- ``status [POLICY]``: each BalancePolicy's automation level, threshold, imbalance beside its
  target, recommendations, last cycle, and what its conditions say.
- ``recommendations [-A | -n NS] [--policy P] [--all]``: the moves recommended (pending ones by
  default; ``--all`` also those carried out), with their reason, cost and rule. The ID is
  ``NAMESPACE/NAME``.
- ``apply ID [--wait]``: approves one recommendation; the controller carries it out as a
  VirtualMachineInstanceMigration (``--wait`` follows it to its end).
- ``render-webhook``: the MutatingWebhookConfiguration that makes a cluster's new VMIs prefer
  the node the policy scores best (cluster-mode initial placement).
- ``simulate TRACE``: replays a trace file (docs/balance.md, "Traces") through VMO's balancer
  and its peers, the descheduler's LowNodeUtilization and KubeVirtRelieveAndMigrate, and
  prints the same figures as bench/balance.py. It needs no cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from vmo.client import TRANSIENT_ERRORS, ApiStatusError, Client, Credentials, NotFound
from vmo.controllers.balance.controller import POLICY_LABEL
from vmo.controllers.balance.crds import BALANCE_POLICY, BALANCE_RECOMMENDATION
from vmo.controllers.balance.extender import webhook_configuration
from vmo.controllers.balance.model import Settings
from vmo.controllers.balance.peers import KubeVirtRelieveAndMigrate, LowNodeUtilization
from vmo.controllers.balance.simulator import Balancer, VmoBalancer, replay
from vmo.controllers.balance.trace import TraceError, load

__all__ = ["add_balance_commands"]

JSON = dict[str, Any]
GIB = 2**30


def _console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 200, highlight=False)


def _age(stamp: object) -> str:
    if not stamp:
        return "-"
    try:
        when = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return "-"
    seconds = max(int((datetime.now(UTC) - when).total_seconds()), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _points(value: object) -> str:
    return f"{float(value) * 100:.1f}" if isinstance(value, int | float) else "-"


def _conditions(obj: JSON) -> dict[str, JSON]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


async def _status(client: Client, args: argparse.Namespace) -> int:
    if args.policy:
        policies = [await client.get(BALANCE_POLICY, args.policy)]
    else:
        policies, _ = await client.list(BALANCE_POLICY)
    if not policies:
        print("No BalancePolicy: the balancer is idle (see docs/balance.md).", file=sys.stderr)
        return 0
    table = Table(box=None, pad_edge=False)
    for column in ("POLICY", "AUTOMATION", "THRESHOLD", "IMBALANCE", "TARGET", "VMS",
                   "RECOMMENDED", "MIGRATED", "LAST CYCLE", "READY"):  # fmt: skip
        table.add_column(column, no_wrap=True)
    notes: list[str] = []
    for policy in policies:
        spec, status = policy.get("spec") or {}, policy.get("status") or {}
        conds = _conditions(policy)
        ready = conds.get("Ready") or {}
        table.add_row(
            policy["metadata"]["name"],
            str(spec.get("automationLevel") or "Manual"),
            str(spec.get("migrationThreshold") or 3),
            _points(status.get("imbalance")),
            _points(status.get("targetImbalance")),
            str(status.get("virtualMachines", "-")),
            str(status.get("recommendations", "-")),
            str(status.get("migrationsStarted", 0)),
            _age(status.get("lastCycleTime")),
            f"{ready.get('status', 'Unknown')} {ready.get('reason', '')}".strip(),
        )
        name = policy["metadata"]["name"]
        if status.get("message"):
            notes.append(f"{name}: {status['message']}")
        for ctype in ("MeasurementsAvailable", "Conflict"):
            cond = conds.get(ctype) or {}
            bad = cond.get("status") == ("False" if ctype == "MeasurementsAvailable" else "True")
            if bad:
                notes.append(f"{name}: {ctype}: {cond.get('message', '')}")
    console = _console()
    console.print(table)
    for note in notes:
        console.print(note, soft_wrap=True)
    print("(imbalance and target in points: the standard deviation of node load, x100)")
    return 0


async def _recommendations(client: Client, namespace: str, args: argparse.Namespace) -> int:
    selector = f"{POLICY_LABEL}={args.policy}" if args.policy else ""
    items, _ = await client.list(
        BALANCE_RECOMMENDATION, "" if args.all_namespaces else namespace, label_selector=selector
    )
    if not args.all:
        items = [r for r in items if (r.get("status") or {}).get("phase", "Pending") == "Pending"]
    if not items:
        print("No recommendations.", file=sys.stderr)
        return 0
    items.sort(key=lambda r: (r["spec"].get("priority", 5), r["metadata"]["name"]))
    table = Table(box=None, pad_edge=False)
    for column in ("ID", "VMI", "FROM", "TO", "PRI", "RULE", "IMBALANCE", "MEMORY", "TIME",
                   "PHASE", "REASON"):  # fmt: skip
        table.add_column(column, no_wrap=column != "REASON")
    for rec in items:
        spec, status = rec["spec"], rec.get("status") or {}
        md = rec["metadata"]
        table.add_row(
            f"{md['namespace']}/{md['name']}",
            str(spec.get("virtualMachineInstance", "")),
            str(spec.get("source", "")),
            str(spec.get("target", "")),
            str(spec.get("priority", "")),
            str(spec.get("rule", "")),
            f"{_points(spec.get('imbalanceBefore'))} -> {_points(spec.get('imbalanceAfter'))}",
            f"{int(spec.get('memoryBytes') or 0) / GIB:.1f}Gi",
            f"~{float(spec.get('expectedSeconds') or 0):.0f}s"
            + ("" if (spec.get("bandwidth") or {}).get("source") == "measured" else "*"),
            str(status.get("phase", "Pending")),
            str(spec.get("reason", "")) + (f" ({status['message']})" if status.get("message")
                                           and status.get("phase") not in (None, "Pending")
                                           else ""),
        )  # fmt: skip
    _console().print(table)
    print("(* time from the assumed bandwidth: no migration measured yet)")
    return 0


def _split_id(ident: str, namespace: str) -> tuple[str, str]:
    if "/" in ident:
        ns, _, name = ident.partition("/")
        return ns, name
    return namespace, ident


async def _apply(client: Client, namespace: str, args: argparse.Namespace) -> int:
    ns, name = _split_id(args.id, namespace)
    rec = await client.get(BALANCE_RECOMMENDATION, name, ns)
    phase = (rec.get("status") or {}).get("phase") or "Pending"
    if phase != "Pending":
        print(f"vmo balance apply: {ns}/{name} is {phase}, not Pending", file=sys.stderr)
        return 1
    await client.patch(BALANCE_RECOMMENDATION, name, {"spec": {"approved": True}}, ns)
    spec = rec["spec"]
    print(f"approved {ns}/{name}: {spec['virtualMachineInstance']} {spec['source']} -> "
          f"{spec['target']}")  # fmt: skip
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        rec = await client.get(BALANCE_RECOMMENDATION, name, ns)
        status = rec.get("status") or {}
        if status.get("phase") in ("Succeeded", "Failed", "Superseded"):
            print(f"{status['phase']}: {status.get('message', '')}")
            return 0 if status["phase"] == "Succeeded" else 1
        await asyncio.sleep(1)
    print(f"vmo balance apply: not done after {args.timeout:g}s", file=sys.stderr)
    return 1


def _simulate(args: argparse.Namespace) -> int:
    try:
        trace = load(args.trace)
    except TraceError as exc:
        print(f"vmo balance simulate: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"vmo balance simulate: {args.trace}: {exc.strerror}", file=sys.stderr)
        return 1
    balancers: list[Balancer] = [
        VmoBalancer(Settings(threshold=args.threshold)),
        LowNodeUtilization(),
        KubeVirtRelieveAndMigrate(),
    ]
    print(f"{trace.name}: {len(trace.nodes)} nodes, {len(trace.vms)} VMs, {trace.steps} steps "
          f"of {trace.step_seconds:g} s")  # fmt: skip
    results = [replay(trace, b, cycle_steps=args.cycle) for b in balancers]
    lnu = results[1].imbalance or 1e-9
    table = Table(box=None, pad_edge=False)
    for column in ("BALANCER", "IMBALANCE", "VS LNU", "WORST>MEAN", "MIGRATIONS", "GIB MOVED"):
        table.add_column(column, no_wrap=True)
    for result in results:
        table.add_row(
            result.balancer,
            f"{result.imbalance * 100:.2f} pt",
            f"{result.imbalance / lnu:.2f}x",
            f"{result.worst_converged * 100:.1f} pt",
            str(result.migrations),
            f"{result.bytes_moved / GIB:.0f}",
        )
    _console().print(table)
    print("(imbalance: time-averaged standard deviation of node utilisation; worst: after "
          "convergence, the last half of the trace)")  # fmt: skip
    return 0


def _render(args: argparse.Namespace) -> int:
    try:
        ca = Path(args.ca_bundle).read_bytes()
    except OSError as exc:
        print(f"vmo balance render-webhook: {args.ca_bundle}: {exc.strerror}", file=sys.stderr)
        return 1
    service = None
    if args.service:
        namespace, _, name = args.service.partition("/")
        if not namespace or not name:
            print("vmo balance render-webhook: --service: NAMESPACE/NAME", file=sys.stderr)
            return 1
        service = (namespace, name)
    elif not args.url.startswith("https://"):
        print("vmo balance render-webhook: --url: an https:// URL", file=sys.stderr)
        return 1
    body = webhook_configuration(ca_bundle=ca, url=args.url, service=service, port=args.port)
    print(yaml.safe_dump(body, sort_keys=False), end="")
    return 0


def add_balance_commands(
    sub: Any,
    creds_of: Callable[[argparse.Namespace], Credentials],
    namespace_of: Callable[[argparse.Namespace, Credentials], str],
) -> None:
    group = sub.add_parser("balance", help="the balancer: policies, recommendations, simulation")
    commands = group.add_subparsers(dest="balance_command", required=True)
    status = commands.add_parser("status", help="each BalancePolicy's state")
    status.add_argument("policy", nargs="?", default="")
    status.set_defaults(namespace="")
    recs = commands.add_parser("recommendations", help="the moves recommended")
    recs.add_argument("--policy", default="")
    recs.add_argument("--all", action="store_true", help="also those carried out or superseded")
    recs.add_argument("-A", "--all-namespaces", action="store_true")
    recs.add_argument("-n", "--namespace", default="")
    apply = commands.add_parser("apply", help="approve a recommendation: it is carried out")
    apply.add_argument("id", help="NAMESPACE/NAME, as `vmo balance recommendations` shows")
    apply.add_argument("-n", "--namespace", default="")
    apply.add_argument("--wait", action="store_true", help="follow the migration to its end")
    apply.add_argument("--timeout", type=float, default=600)
    for cmd in (status, recs, apply):
        cmd.add_argument("--kubeconfig", default="")
    render = commands.add_parser(
        "render-webhook",
        help="the MutatingWebhookConfiguration of cluster-mode initial placement",
    )
    where = render.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", default="", help="the controllers' https URL")
    where.add_argument("--service", default="", help="NAMESPACE/NAME of the controllers' Service")
    render.add_argument("--port", type=int, default=443)
    render.add_argument("--ca-bundle", required=True, help="the CA of the controllers' certificate")
    simulate = commands.add_parser("simulate", help="replay a trace through VMO and its peers")
    simulate.add_argument("trace", help="a trace file (docs/balance.md, Traces)")
    simulate.add_argument("--threshold", type=int, default=3, choices=range(1, 6))
    simulate.add_argument("--cycle", type=int, default=5, help="steps between cycles")

    def run(args: argparse.Namespace) -> int:
        if args.balance_command == "simulate":
            return _simulate(args)
        if args.balance_command == "render-webhook":
            return _render(args)
        creds = creds_of(args)
        namespace = namespace_of(args, creds)

        async def go() -> int:
            async with Client(creds) as client:
                if args.balance_command == "status":
                    return await _status(client, args)
                if args.balance_command == "recommendations":
                    return await _recommendations(client, namespace, args)
                return await _apply(client, namespace, args)

        try:
            return asyncio.run(go())
        except NotFound as exc:
            print(f"vmo balance: {exc.status.get('message') or exc}", file=sys.stderr)
            return 1
        except ApiStatusError as exc:
            print(f"vmo balance: {exc.status.get('message') or exc}", file=sys.stderr)
            return 1
        except TRANSIENT_ERRORS as exc:
            print(f"vmo balance: cannot reach the API server: {exc}", file=sys.stderr)
            return 1

    group.set_defaults(func=run)
