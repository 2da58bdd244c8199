"""``vmo netpol``: network policy from the command line.

- ``status``: per node, the MultiNetworkPolicy table its agent keeps: isolated interfaces,
  rules, sets, when it was last written and the last error (the agent's Node annotation).
- ``explain FROM TO PORT [--protocol P] [--network NAD]``: whether VM FROM may open a
  connection to VM TO's PORT, and which policies allow or deny it and why: the source's egress
  and the destination's ingress must both allow it. With ``--network`` (a NAD's ``name`` or
  ``namespace/name``) it reads the MultiNetworkPolicies of that network, else the
  NetworkPolicies of the pod network. It exits 0 when the flow is allowed and 1 when not, as
  ``kubectl auth can-i`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from vmo.api.netpol import PROTOCOLS, endpoint_of, explain
from vmo.client import (
    MULTI_NETWORK_POLICY,
    NAMESPACE,
    NETWORK_POLICY,
    NODE,
    TRANSIENT_ERRORS,
    VMI,
    ApiStatusError,
    Client,
    Credentials,
    NotFound,
)

__all__ = ["add_netpol_commands"]

JSON = dict[str, Any]
# what each node agent's enforcers record on its Node: bridge networks, and the pod network
STATUS_ANNOTATIONS = (("bridge", "vmo.dev/l2-policy"), ("pod", "vmo.dev/pod-policy"))


def _console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 200, highlight=False)


def _age(stamp: object) -> str:
    try:
        when = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return "-"
    seconds = max(int((datetime.now(UTC) - when).total_seconds()), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


async def _status(client: Client) -> int:
    table = Table(
        "NODE", "NETWORK", "TABLE", "INTERFACES", "RULES", "SETS", "WRITTEN", "ERROR", box=None
    )
    for node in sorted((await client.list(NODE))[0], key=lambda n: n["metadata"]["name"]):
        name = node["metadata"]["name"]
        for network, annotation in STATUS_ANNOTATIONS:
            raw = (node["metadata"].get("annotations") or {}).get(annotation)
            try:
                info: JSON = json.loads(raw) if raw else {}
            except ValueError:
                info = {}
            if not info:
                table.add_row(name, network, "-", "-", "-", "-", "-", "no sync reported")
                continue
            table.add_row(
                name,
                network,
                str(info.get("table", "-")),
                str(info.get("interfaces", 0)),
                str(info.get("rules", 0)),
                str(info.get("sets", 0)),
                _age(info.get("synced")),
                str(info.get("error") or ""),
            )
    _console().print(table)
    return 0


def _split(text: str, namespace: str) -> tuple[str, str]:
    ns, _, name = text.rpartition("/")
    return ns or namespace, name


async def _explain(client: Client, namespace: str, args: argparse.Namespace) -> int:
    network = _split(args.network, namespace) if args.network else None
    ends = []
    for text in (args.source, args.destination):
        ns, name = _split(text, namespace)
        ends.append(endpoint_of(await client.get(VMI, name, ns), network))
    kind = MULTI_NETWORK_POLICY if network else NETWORK_POLICY
    policies, _ = await client.list(kind)
    namespaces = {
        str(n["metadata"]["name"]): dict(n["metadata"].get("labels") or {})
        for n in (await client.list(NAMESPACE))[0]
    }
    verdict = explain(
        policies,
        ends[0],
        ends[1],
        args.port,
        protocol=args.protocol,
        namespaces=namespaces,
        network=network,
    )
    where = f"network {network[0]}/{network[1]}" if network else "the pod network"
    flow = (
        f"{ends[0].namespace}/{ends[0].name} -> {ends[1].namespace}/{ends[1].name} "
        f"{args.protocol}/{args.port} on {where}"
    )
    print(f"{'ALLOWED' if verdict.allowed else 'DENIED'}: {flow}")
    for reason in verdict.reasons:
        print(f"  {reason}")
    return 0 if verdict.allowed else 1


def add_netpol_commands(
    sub: Any,
    creds_of: Callable[[argparse.Namespace], Credentials],
    namespace_of: Callable[[argparse.Namespace, Credentials], str],
) -> None:
    group = sub.add_parser("netpol", help="network policy: enforcement status, explain a flow")
    commands = group.add_subparsers(dest="netpol_command", required=True)
    status = commands.add_parser("status", help="each node's MultiNetworkPolicy table")
    status.set_defaults(namespace="")
    why = commands.add_parser("explain", help="which policies allow or deny a flow, and why")
    why.add_argument("source", help="the VM that opens the connection: NAME or NAMESPACE/NAME")
    why.add_argument("destination", help="the VM it connects to: NAME or NAMESPACE/NAME")
    why.add_argument("port", type=int)
    why.add_argument("--protocol", default="TCP", choices=PROTOCOLS)
    why.add_argument("--network", default="", help="a bridge NAD (MultiNetworkPolicy)")
    why.add_argument("-n", "--namespace", default="")
    for cmd in (status, why):
        cmd.add_argument("--kubeconfig", default="")

    def run(args: argparse.Namespace) -> int:
        creds = creds_of(args)
        namespace = namespace_of(args, creds)

        async def go() -> int:
            async with Client(creds) as client:
                if args.netpol_command == "status":
                    return await _status(client)
                return await _explain(client, namespace, args)

        try:
            return asyncio.run(go())
        except NotFound as exc:
            print(f"vmo netpol: {exc.status.get('message') or exc}", file=sys.stderr)
            return 2
        except ApiStatusError as exc:
            print(f"vmo netpol: {exc.status.get('message') or exc}", file=sys.stderr)
            return 2
        except TRANSIENT_ERRORS as exc:
            print(f"vmo netpol: cannot reach the API server: {exc}", file=sys.stderr)
            return 2

    group.set_defaults(func=run)
