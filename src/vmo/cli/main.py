"""The ``vmo`` command: start and stop the embedded control plane, manage its users."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import yaml

from vmo.apiserver.auth import TokenFile
from vmo.apiserver.server import kubeconfig
from vmo.cli import controlplane, storage, streams
from vmo.cli._common import state_dir
from vmo.client import Client, Credentials, load_kubeconfig
from vmo.engine.embedded import NodeServices
from vmo.home import PRIVATE_UMASK

# --- users -----------------------------------------------------------------------------------


def cmd_user_add(args: argparse.Namespace) -> int:
    state = state_dir(args)
    if not state.url_file.exists():
        print(
            "vmo user add: start VMO first (vmo up) so the kubeconfig can name its address",
            file=sys.stderr,
        )
        return 1
    token = TokenFile(state.tokens).add(args.name, tuple(args.group))
    config = kubeconfig(
        server=state.url_file.read_text().strip(),
        ca_pem=(state.pki / "ca.crt").read_text(),
        user=args.name,
        token=token,
        namespace=args.namespace,
    )
    text = yaml.safe_dump(config, sort_keys=False)
    if args.output:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        print(f"kubeconfig for {args.name} written to {args.output}")
    else:
        sys.stdout.write(text)
    return 0


# --- virtctl-style commands ------------------------------------------------------------------


def _creds(args: argparse.Namespace) -> Credentials:
    path = args.kubeconfig or os.environ.get("KUBECONFIG") or str(state_dir(args).kubeconfig)
    return load_kubeconfig(path)


def _namespace(args: argparse.Namespace, creds: Credentials) -> str:
    return str(args.namespace or creds.namespace or "default")


def _vmi_name(ref: str) -> str:
    """``vm/NAME``, ``vmi/NAME`` or ``NAME`` -> NAME (a VM's VMI shares its name)."""
    return ref.split("/", 1)[1] if "/" in ref else ref


def cmd_console(args: argparse.Namespace) -> int:
    creds = _creds(args)
    return asyncio.run(streams.console(creds, _namespace(args, creds), _vmi_name(args.name)))


def cmd_vnc(args: argparse.Namespace) -> int:
    creds = _creds(args)
    path = streams.stream_path(_namespace(args, creds), _vmi_name(args.name), "vnc")

    def ready(port: int) -> None:
        print(
            f"VNC proxy for {args.name} listening on 127.0.0.1:{port} (connect a VNC viewer there)",
            flush=True,
        )

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(streams.tcp_proxy(creds, path, port=args.port, ready=ready))
    return 0


def cmd_port_forward(args: argparse.Namespace) -> int:
    creds = _creds(args)
    local, _, remote = args.ports.partition(":")
    remote = remote or local
    path = streams.stream_path(
        _namespace(args, creds), _vmi_name(args.name), f"portforward/{remote}"
    )

    def ready(port: int) -> None:
        print(f"Forwarding from 127.0.0.1:{port} -> {remote}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(streams.tcp_proxy(creds, path, port=int(local), ready=ready))
    return 0


def cmd_image_upload(args: argparse.Namespace) -> int:
    """Like ``virtctl image-upload dv NAME --size S --image-path P``."""
    from vmo.engine.storage.upload import UploadError, image_upload

    creds = _creds(args)
    namespace = _namespace(args, creds)

    def progress(percent: float) -> None:
        filled = int(percent / 5)
        print(f"\r[{'#' * filled}{'.' * (20 - filled)}] {percent:5.1f}%", end="", flush=True)

    async def run() -> None:
        async with Client(creds) as client:
            dv = await image_upload(
                client,
                namespace=namespace,
                name=args.name,
                path=Path(args.image_path),
                size=args.size,
                progress=progress,
                timeout=args.timeout,
            )
        print(f"\nDataVolume {namespace}/{args.name}: {dv['status']['phase']}")

    try:
        asyncio.run(run())
    except (UploadError, OSError) as exc:
        print(f"\nvmo image-upload: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_node_run(args: argparse.Namespace) -> int:
    os.umask(PRIVATE_UMASK)  # the node's files (disks, sockets, logs) are its owner's alone
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    state = state_dir(args)
    kubeconfig = args.kubeconfig or str(state.engine_kubeconfig)
    from vmo.engine.bmc import NodePowerError, claim_node

    try:
        claim_node(state.nodes / args.name)  # the BMC finds this agent by its lock
    except NodePowerError as exc:
        print(f"vmo node run: {exc}", file=sys.stderr)
        return 1

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        client = Client.from_kubeconfig(kubeconfig)
        node = NodeServices(
            client,
            args.name,
            state.nodes / args.name,
            cpus=args.cpus,
            memory_ki=_memory_ki(args.memory),
        )
        try:
            await node.start(stop)
            print(f"node {args.name} is running", flush=True)
            await stop.wait()
        finally:
            await node.close()
            await client.close()

    asyncio.run(run())
    return 0


def _memory_ki(value: str | None) -> int | None:
    if value is None:
        return None
    from vmo.api.quantity import QuantityError, parse_quantity

    try:
        return int(parse_quantity(value)) // 1024
    except QuantityError as exc:
        raise SystemExit(f"vmo node run: --memory {value!r}: {exc}") from None


def cmd_migrate(args: argparse.Namespace) -> int:
    """Like ``virtctl migrate NAME``; ``--cancel`` like ``virtctl migrate-cancel NAME``."""
    from vmo.cli import maintenance

    creds = _creds(args)
    namespace, name = _namespace(args, creds), _vmi_name(args.name)
    if args.cancel:
        return maintenance.run(creds, lambda c: maintenance.cancel_migration(c, namespace, name))
    selector = maintenance.parse_node_selector(args.added_node_selector)
    return maintenance.run(
        creds,
        lambda c: maintenance.migrate(
            c,
            namespace,
            name,
            added_node_selector=selector,
            wait=not args.no_wait,
            timeout=args.timeout,
        ),
        on_interrupt=maintenance.migrate_interrupted(namespace, name),
    )


def cmd_node_cordon(args: argparse.Namespace) -> int:
    from vmo.cli import maintenance

    undo = args.node_command == "uncordon"
    return maintenance.run(_creds(args), lambda c: maintenance.cordon(c, args.node, undo=undo))


def cmd_node_drain(args: argparse.Namespace) -> int:
    from vmo.cli import maintenance

    return maintenance.run(
        _creds(args),
        lambda c: maintenance.drain(c, args.node, timeout=args.timeout, dry_run=args.dry_run),
        on_interrupt=maintenance.drain_interrupted(args.node),
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from vmo.cli import demo

    os.umask(PRIVATE_UMASK)  # the demo's image goes into the home, which is its owner's alone
    state = state_dir(args)
    if controlplane.probe(state) is None:
        print("vmo demo: VMO is not running; start it with `vmo up -d`", file=sys.stderr)
        return 1
    print(
        "building the demo guest from Debian packages (cached after the first time)...", flush=True
    )
    image_url = demo.stage_image(state.root)
    print(
        "applying the hybrid demo (a database VM behind a Service, two VMs on VLAN 100)...",
        flush=True,
    )
    service = asyncio.run(demo.apply_demo(state.kubeconfig, image_url))
    node_port = service["spec"]["ports"][0]["nodePort"]
    cluster_ip = service["spec"]["clusterIP"]
    kubeconfig = state.kubeconfig
    print(
        f"""
The demo VM is running.
  VMs:      kubectl --kubeconfig {kubeconfig} get vm,vmi -n {demo.NS}
  console:  vmo console demo-db -n {demo.NS}        (Ctrl-] leaves)
  service:  nc {cluster_ip} 5432   or   nc 127.0.0.1 {node_port}   (NodePort)
  VNC:      vmo vnc demo-db -n {demo.NS}
The VLAN VMs app-1 and app-2 keep their vSphere MACs {", ".join(demo.VLAN_MACS.values())}."""
    )
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="vmo", description="VMO, a Virtual Machine Orchestrator")
    top.add_argument("--home", default="", help="state directory (default $VMO_HOME or ~/.vmo)")
    sub = top.add_subparsers(dest="command", required=True)
    controlplane.register(sub)
    user = sub.add_parser("user", help="manage users").add_subparsers(
        dest="user_command", required=True
    )
    add = user.add_parser("add", help="add a user with a token and print a kubeconfig for it")
    add.add_argument("name")
    add.add_argument(
        "--group", action="append", default=[], help="a group of the user (repeatable)"
    )
    add.add_argument(
        "--namespace", default="virtual-machines", help="the kubeconfig's default namespace"
    )
    add.add_argument(
        "-o", "--output", default="", help="write the kubeconfig to this file (mode 0600)"
    )
    add.set_defaults(func=cmd_user_add)
    _stream_commands(sub)
    storage.register(sub)
    upload = sub.add_parser("image-upload", help="upload a disk image into a new DataVolume")
    upload.add_argument("kind", choices=["dv"], help="what to upload into (a DataVolume)")
    upload.add_argument("name")
    upload.add_argument("--image-path", required=True)
    upload.add_argument("--size", required=True, help="e.g. 2Gi")
    upload.add_argument("--timeout", type=float, default=300)
    upload.add_argument("-n", "--namespace", default="")
    upload.add_argument("--kubeconfig", default="")
    upload.set_defaults(func=cmd_image_upload)
    demo_cmd = sub.add_parser("demo", help="run the hybrid demo (database VM + Service + VLAN VMs)")
    demo_cmd.set_defaults(func=cmd_demo)
    node = sub.add_parser("node", help="node agents and node maintenance").add_subparsers(
        dest="node_command", required=True
    )
    run = node.add_parser("run", help="run a node agent alone (it joins the running control plane)")
    run.add_argument("--name", required=True)
    run.add_argument("--kubeconfig", default="", help="default: the engine kubeconfig of --home")
    run.add_argument(
        "--cpus", type=int, default=None, help="CPU capacity to report (default: host)"
    )
    run.add_argument(
        "--memory", default=None, help="memory capacity to report, e.g. 4Gi (default: host)"
    )
    run.set_defaults(func=cmd_node_run)
    _maintenance_commands(sub, node)
    from vmo.cli.export import add_export_commands

    add_export_commands(sub, _creds, _namespace)
    from vmo.cli.backup import add_backup_commands

    add_backup_commands(sub, _creds, _namespace)
    from vmo.cli.login import add_login_commands

    add_login_commands(sub, state_dir)
    from vmo.cli.audit import add_audit_commands

    add_audit_commands(sub, state_dir)
    from vmo.cli.access import add_access_commands

    add_access_commands(sub, _creds, _namespace)
    from vmo.cli.events import add_events_commands
    from vmo.cli.top import add_top_commands

    add_events_commands(sub, _creds, _namespace)
    add_top_commands(sub, state_dir)
    from vmo.cli.monitoring import add_monitoring_commands

    add_monitoring_commands(sub, state_dir)
    from vmo.cli.balance import add_balance_commands

    add_balance_commands(sub, _creds, _namespace)
    from vmo.cli.netpol import add_netpol_commands

    add_netpol_commands(sub, _creds, _namespace)
    from vmo.cli.controllers import add_controllers_commands

    add_controllers_commands(sub, _creds)
    from vmo.cli.virtctl import register as add_virtctl_commands

    add_virtctl_commands(sub, _creds, _namespace)
    from vmo.cli.hotplug import register as add_hotplug_commands

    add_hotplug_commands(sub, _creds, _namespace)
    return top


def _maintenance_commands(sub: Any, node: Any) -> None:
    from vmo.cli.maintenance import node_selector_arg

    migrate = sub.add_parser(
        "migrate", help="live-migrate a VM to another node (Ctrl-C stops following, not it)"
    )
    migrate.add_argument("name", help="NAME, vm/NAME or vmi/NAME")
    migrate.add_argument(
        "--cancel", action="store_true", help="abort the VM's migration in flight instead"
    )
    migrate.add_argument(
        "--added-node-selector",
        action="append",
        default=[],
        type=node_selector_arg,
        metavar="KEY=VALUE",
        help="an extra node selector for the target (repeatable)",
    )
    migrate.add_argument("--no-wait", action="store_true", help="create the migration and return")
    migrate.add_argument(
        "--timeout",
        type=float,
        default=0,
        metavar="S",
        help="stop following after S seconds (0: never)",
    )
    migrate.add_argument("-n", "--namespace", default="")
    migrate.add_argument("--kubeconfig", default="")
    migrate.set_defaults(func=cmd_migrate)
    for verb, helptext in (
        ("cordon", "mark a node unschedulable"),
        ("uncordon", "mark a node schedulable again"),
    ):
        cmd = node.add_parser(verb, help=helptext)
        cmd.add_argument("node")
        cmd.add_argument("--kubeconfig", default="")
        cmd.set_defaults(func=cmd_node_cordon)
    drain = node.add_parser(
        "drain", help="cordon a node and move its VMs off by their eviction strategy"
    )
    drain.add_argument("node")
    drain.add_argument(
        "--timeout", type=float, default=0, metavar="S", help="give up after S seconds (0: never)"
    )
    drain.add_argument("--dry-run", action="store_true", help="print the plan only")
    drain.add_argument("--kubeconfig", default="")
    drain.set_defaults(func=cmd_node_drain)


def _stream_commands(sub: Any) -> None:
    for name, helptext, func in (
        ("console", "serial console of a VM (Ctrl-] leaves)", cmd_console),
        ("vnc", "a local VNC proxy to a VM's display", cmd_vnc),
        ("port-forward", "forward a local port to a VM's port (pod network)", cmd_port_forward),
    ):
        cmd = sub.add_parser(name, help=helptext)
        cmd.add_argument("name", help="NAME, vm/NAME or vmi/NAME")
        if name == "port-forward":
            cmd.add_argument("ports", help="LOCAL:REMOTE (LOCAL 0 picks a free port)")
        if name == "vnc":
            cmd.add_argument("--port", type=int, default=0)
        cmd.add_argument("-n", "--namespace", default="")
        cmd.add_argument("--kubeconfig", default="")
        cmd.set_defaults(func=func)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
