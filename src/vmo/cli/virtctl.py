"""virtctl's verbs in ``vmo``: each speaks the API exactly as virtctl does (the same
``subresources.kubevirt.io`` paths and bodies, the same kinds and fields), so it works against
VMO's embedded server and against a KubeVirt cluster alike; flags keep virtctl's names.

Lifecycle (start, stop, restart, pause, unpause, soft-reboot, migrate-cancel), the guest agent's
reports (guestosinfo, fslist, userlist), expose, ssh and scp (OpenSSH with a ProxyCommand of
``vmo port-forward --stdio``), and the manifest generators of ``create`` live in
``vmo.cli.manifests``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from vmo.apiserver.kubevirt_api import version_info
from vmo.cli import manifests, streams
from vmo.client import (
    SERVICE,
    TRANSIENT_ERRORS,
    VM,
    VMI,
    VMIM,
    ApiStatusError,
    Client,
    Credentials,
    NotFound,
    Resource,
)

JSON = dict[str, Any]
CredsFn = Callable[[argparse.Namespace], Credentials]
NamespaceFn = Callable[[argparse.Namespace, Credentials], str]
Action = Callable[[Client, str], Awaitable[int]]

SUBRESOURCES = streams.SUBRESOURCES
VMIRS = Resource(
    "kubevirt.io", "v1", "virtualmachineinstancereplicasets", "VirtualMachineInstanceReplicaSet"
)
MIGRATION_SELECTOR_LABEL = "kubevirt.io/vmi-name"
FINAL_MIGRATION_PHASES = ("Succeeded", "Failed")
DRY_RUN_ALL = ["All"]
# labels a VMI carries for where it runs, not what it is: a Service must not select by them
_PLACEMENT_LABELS = ("kubevirt.io/nodeName", "kubevirt.io/migrationTargetNodeName")
_VM_KINDS = {"vm": "vm", "vms": "vm", "virtualmachine": "vm", "virtualmachines": "vm"}
_VMI_KINDS = {
    "vmi": "vmi",
    "vmis": "vmi",
    "virtualmachineinstance": "vmi",
    "virtualmachineinstances": "vmi",
}


class CommandError(Exception):
    """What the command prints on stderr before it exits 1 (virtctl's error line)."""


@dataclass(frozen=True)
class Context:
    """How a verb finds its credentials and namespace (the CLI entry point's helpers)."""

    creds: CredsFn
    namespace: NamespaceFn

    def run(self, args: argparse.Namespace, action: Action) -> int:
        """Runs ``action`` with a client and the namespace; errors go to stderr, exit 1."""
        creds = self.creds(args)
        namespace = self.namespace(args, creds)

        async def main() -> int:
            async with Client(creds) as client:
                return await action(client, namespace)

        try:
            return asyncio.run(main())
        except CommandError as exc:
            print(exc, file=sys.stderr)
        except TRANSIENT_ERRORS as exc:
            print(f"vmo: cannot reach the API server at {creds.server}: {exc}", file=sys.stderr)
        return 1


def message(exc: ApiStatusError) -> str:
    """The server's Status message, as virtctl prints a StatusError."""
    return str(exc.status.get("message") or exc)


async def refused(what: str, call: Awaitable[Any], *, sep: str = ": ") -> Any:
    """``call``'s result; a refusal becomes ``CommandError("<what><sep><message>")``."""
    try:
        return await call
    except ApiStatusError as exc:
        raise CommandError(f"{what}{sep}{message(exc)}") from None


def subresource_path(namespace: str, resource: str, name: str, sub: str) -> str:
    return f"{SUBRESOURCES}/namespaces/{namespace}/{resource}/{name}/{sub}"


def dry_run_option(dry_run: bool) -> list[str] | None:
    if dry_run:
        print("Dry Run execution")
        return DRY_RUN_ALL
    return None


def options(**fields: Any) -> JSON:
    """A virtctl options body: Go's ``omitempty`` drops unset fields."""
    return {key: value for key, value in fields.items() if value not in (None, False, [], "")}


# --- register ---------------------------------------------------------------------------------


def register(sub: Any, creds: CredsFn, namespace: NamespaceFn) -> None:
    """Adds virtctl's verbs to the ``vmo`` parser, and ``--stdio`` to its ``port-forward``."""
    ctx = Context(creds, namespace)
    _lifecycle_commands(sub, ctx)
    _vmi_commands(sub, ctx)
    _expose_command(sub, ctx)
    _ssh_commands(sub, ctx)
    manifests.register(sub)
    _version_command(sub, ctx)
    _stdio_port_forward(sub.choices["port-forward"], ctx)


def _common(cmd: argparse.ArgumentParser) -> argparse.ArgumentParser:
    cmd.add_argument("-n", "--namespace", default="")
    cmd.add_argument("--kubeconfig", default="")
    return cmd


def _dry_run(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "--dry-run", action="store_true", help="show what would happen without changing anything"
    )


# --- start, stop, restart, migrate-cancel -----------------------------------------------------


def _lifecycle_commands(sub: Any, ctx: Context) -> None:
    start = _common(sub.add_parser("start", help="start a virtual machine"))
    start.add_argument("name", help="the VirtualMachine")
    start.add_argument("--paused", action="store_true", help="start the guest paused")
    _dry_run(start)
    start.set_defaults(func=lambda a: ctx.run(a, lambda c, ns: cmd_start(c, ns, a)))
    for verb, helptext in (("stop", "stop a virtual machine"), ("restart", "restart one")):
        cmd = _common(sub.add_parser(verb, help=helptext))
        cmd.add_argument("name", help="the VirtualMachine")
        cmd.add_argument(
            "--grace-period",
            type=int,
            default=None,
            metavar="S",
            help="seconds the guest gets to shut down (with --force; only 0 for restart)",
        )
        cmd.add_argument("--force", action="store_true", help="with --grace-period")
        _dry_run(cmd)
        run = cmd_stop if verb == "stop" else cmd_restart
        cmd.set_defaults(func=lambda a, run=run: ctx.run(a, lambda c, ns: run(c, ns, a)))
    cancel = _common(sub.add_parser("migrate-cancel", help="cancel a VM's migration in flight"))
    cancel.add_argument("name", help="the VirtualMachine (or VMI)")
    _dry_run(cancel)
    cancel.set_defaults(func=lambda a: ctx.run(a, lambda c, ns: cmd_migrate_cancel(c, ns, a)))


async def cmd_start(client: Client, namespace: str, args: argparse.Namespace) -> int:
    body = options(paused=args.paused, dryRun=dry_run_option(args.dry_run))
    path = subresource_path(namespace, "virtualmachines", args.name, "start")
    await refused("Error starting VirtualMachine", client.request("PUT", path, body), sep=" ")
    print(f"VM {args.name} was scheduled to start")
    return 0


def _forced_grace(args: argparse.Namespace) -> int | None:
    if (args.grace_period is not None) != args.force:
        raise CommandError("Must both use --force=true and set --grace-period.")
    return int(args.grace_period) if args.force else None


async def cmd_stop(client: Client, namespace: str, args: argparse.Namespace) -> int:
    grace = _forced_grace(args)
    body = options(gracePeriod=grace, dryRun=dry_run_option(args.dry_run))
    what = (
        "error force stopping VirtualMachine:"
        if grace is not None
        else "error stopping VirtualMachine"
    )
    path = subresource_path(namespace, "virtualmachines", args.name, "stop")
    await refused(what, client.request("PUT", path, body), sep=" ")
    print(f"VM {args.name} was scheduled to stop")
    return 0


async def cmd_restart(client: Client, namespace: str, args: argparse.Namespace) -> int:
    grace = _forced_grace(args)
    body = options(gracePeriodSeconds=grace, dryRun=dry_run_option(args.dry_run))
    what = (
        "error force restarting VirtualMachine"
        if grace is not None
        else "error restarting VirtualMachine"
    )
    path = subresource_path(namespace, "virtualmachines", args.name, "restart")
    await refused(what, client.request("PUT", path, body))
    print(f"VM {args.name} was scheduled to restart")
    return 0


def cancellable(migration: JSON, vmi: str) -> bool:
    """A migration of ``vmi`` that has not ended. Upstream's admission labels every migration
    ``kubevirt.io/vmi-name``; ``spec.vmiName`` finds those of a server that does not."""
    labels = migration.get("metadata", {}).get("labels") or {}
    of_vmi = labels.get(MIGRATION_SELECTOR_LABEL) == vmi or migration["spec"].get("vmiName") == vmi
    return of_vmi and (migration.get("status") or {}).get("phase") not in FINAL_MIGRATION_PHASES


async def cmd_migrate_cancel(client: Client, namespace: str, args: argparse.Namespace) -> int:
    name = args.name
    items, _ = await refused(
        "Error fetching virtual machine instance migration list ",
        client.list(VMIM, namespace),
        sep=" ",
    )
    doomed = next((m for m in items if cancellable(m, name)), None)
    if doomed is None:
        raise CommandError(f"Found no migration to cancel for {name}")
    dry_run = dry_run_option(args.dry_run)
    migration = doomed["metadata"]["name"]
    body = options(kind="DeleteOptions", apiVersion="v1", dryRun=dry_run)
    params = {"dryRun": "All"} if dry_run else None
    await refused(
        f"Error canceling migration {migration} of a VirtualMachine {name}",
        client.request("DELETE", VMIM.path(namespace, migration), body, params=params),
    )
    print(f"VM {name} was scheduled to migrate-cancel")
    return 0


# --- pause, unpause, soft-reboot, guest agent reports ----------------------------------------


def _vmi_commands(sub: Any, ctx: Context) -> None:
    for verb in ("pause", "unpause"):
        cmd = _common(sub.add_parser(verb, help=f"{verb} a virtual machine (vm or vmi)"))
        cmd.add_argument("kind", help="vm or vmi")
        cmd.add_argument("name")
        _dry_run(cmd)
        cmd.set_defaults(
            func=lambda a, verb=verb: ctx.run(a, lambda c, ns: cmd_pause(c, ns, a, verb))
        )
    reboot = _common(sub.add_parser("soft-reboot", help="reboot the guest through its agent"))
    reboot.add_argument("name", help="the VirtualMachineInstance")
    reboot.set_defaults(func=lambda a: ctx.run(a, lambda c, ns: cmd_soft_reboot(c, ns, a)))
    for verb, helptext in GUEST_REPORTS.items():
        cmd = _common(sub.add_parser(verb, help=helptext[2]))
        cmd.add_argument("name", help="the VirtualMachineInstance")
        cmd.set_defaults(
            func=lambda a, verb=verb: ctx.run(a, lambda c, ns: cmd_guest_report(c, ns, a, verb))
        )


def kind_of(text: str) -> str:
    """virtctl's resource types, case-insensitive: ``vm`` or ``vmi``."""
    kind = _VM_KINDS.get(text.lower()) or _VMI_KINDS.get(text.lower())
    if kind is None:
        raise CommandError(f"unsupported resource type: {text}")
    return kind


async def cmd_pause(client: Client, namespace: str, args: argparse.Namespace, verb: str) -> int:
    kind, name = kind_of(args.kind), args.name
    doing = "pausing" if verb == "pause" else "unpausing"
    vm = None
    if kind == "vm":
        vm = await refused(f"Error getting VirtualMachine {name}", client.get(VM, name, namespace))
    body = options(dryRun=dry_run_option(args.dry_run))
    path = subresource_path(namespace, "virtualmachineinstances", name, verb)
    try:
        await client.request("PUT", path, body)
    except NotFound as exc:
        if vm is not None and verb == "pause":
            raise CommandError(_vmi_missing(vm)) from None
        raise CommandError(f"Error {doing} VirtualMachineInstance {name}: {message(exc)}") from None
    except ApiStatusError as exc:
        raise CommandError(f"Error {doing} VirtualMachineInstance {name}: {message(exc)}") from None
    print(f"VMI {name} was scheduled to {verb}")
    return 0


def _vmi_missing(vm: JSON) -> str:
    name = vm["metadata"]["name"]
    spec = vm.get("spec") or {}
    strategy = spec.get("runStrategy") or ("Always" if spec.get("running") else "Halted")
    if strategy == "Halted":
        return (
            f"Error pausing VirtualMachineInstance {name}. VirtualMachine {name} is not set to run"
        )
    return f"Error pausing VirtualMachineInstance {name}, it was not found"


async def cmd_soft_reboot(client: Client, namespace: str, args: argparse.Namespace) -> int:
    path = subresource_path(namespace, "virtualmachineinstances", args.name, "softreboot")
    await refused(
        f"Error soft rebooting VirtualMachineInstance {args.name}", client.request("PUT", path)
    )
    print(f"VMI {args.name} was scheduled to soft-reboot")
    return 0


# verb -> (subresource, what virtctl says when it fails, help)
GUEST_REPORTS = {
    "guestosinfo": ("guestosinfo", "Error getting guestosinfo of", "the guest agent's OS info"),
    "fslist": ("filesystemlist", "Error listing filesystems of", "the guest's filesystems"),
    "userlist": ("userlist", "Error listing users of", "the users logged in to the guest"),
}


async def cmd_guest_report(
    client: Client, namespace: str, args: argparse.Namespace, verb: str
) -> int:
    subresource, failure, _ = GUEST_REPORTS[verb]
    path = subresource_path(namespace, "virtualmachineinstances", args.name, subresource)
    report = await refused(
        f"{failure} VirtualMachineInstance {args.name}", client.request("GET", path), sep=", "
    )
    print(json.dumps(report, indent=2))
    return 0


# --- expose ----------------------------------------------------------------------------------


def _expose_command(sub: Any, ctx: Context) -> None:
    cmd = _common(sub.add_parser("expose", help="make a Service for a vm, vmi or vmirs"))
    cmd.add_argument("kind", help="vm, vmi or vmirs")
    cmd.add_argument("name")
    cmd.add_argument("--name", dest="service_name", required=True, help="the Service's name")
    cmd.add_argument("--port", type=int, default=0, help="the port the Service serves on")
    cmd.add_argument("--target-port", default="", help="the guest's port (number or name)")
    cmd.add_argument("--protocol", default="TCP", help="TCP or UDP")
    cmd.add_argument("--type", default="ClusterIP", help="ClusterIP, NodePort or LoadBalancer")
    cmd.add_argument("--port-name", default="", help="the port's name")
    cmd.add_argument("--cluster-ip", default="", help="a fixed ClusterIP, or None (headless)")
    cmd.add_argument("--external-ip", default="", help="an extra IP the Service accepts")
    cmd.add_argument("--ip-family", default="", help="IPv4, IPv6, IPv4,IPv6 or IPv6,IPv4")
    cmd.add_argument(
        "--ip-family-policy", default="", help="SingleStack, PreferDualStack or RequireDualStack"
    )
    cmd.set_defaults(func=lambda a: ctx.run(a, lambda c, ns: cmd_expose(c, ns, a)))


def _choice(value: str, allowed: tuple[str, ...], error: str) -> str:
    for candidate in allowed:
        if candidate.lower() == value.lower():
            return candidate
    raise CommandError(f"{error}: {value}")


@dataclass(frozen=True)
class Exposed:
    """What a Service is made from: the selector, the ports found, and its owner."""

    selector: dict[str, str]
    ports: list[JSON]
    owner: JSON


def pod_network_ports(vmi_spec: JSON) -> list[JSON]:
    """The ports declared on the pod network's interface, named port-1, port-2 …"""
    pod = next((n["name"] for n in vmi_spec.get("networks") or [] if "pod" in n), None)
    interfaces = ((vmi_spec.get("domain") or {}).get("devices") or {}).get("interfaces") or []
    iface = next((i for i in interfaces if pod is not None and i.get("name") == pod), None)
    return [
        options(name=f"port-{index}", protocol=port.get("protocol"), port=port.get("port"))
        for index, port in enumerate((iface or {}).get("ports") or [], start=1)
    ]


def _owner(obj: JSON, kind: str) -> JSON:
    md = obj["metadata"]
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": kind,
        "name": md["name"],
        "uid": md.get("uid", ""),
        "controller": True,
        "blockOwnerDeletion": False,
    }


def exposed(kind: str, obj: JSON) -> Exposed:
    """The selector as virtctl derived it from labels: the VM template's, the VMI's own (less
    the labels of its placement), or the replica set's ``matchLabels``."""
    name = obj["metadata"]["name"]
    if kind == "vmi":
        labels = {
            k: v
            for k, v in (obj["metadata"].get("labels") or {}).items()
            if k not in _PLACEMENT_LABELS
        }
        return Exposed(
            labels, pod_network_ports(obj.get("spec") or {}), _owner(obj, "VirtualMachineInstance")
        )
    template = (obj.get("spec") or {}).get("template") or {}
    ports = pod_network_ports(template.get("spec") or {})
    if kind == "vm":
        labels = dict((template.get("metadata") or {}).get("labels") or {})
        if not labels:
            raise CommandError(f"cannot expose VirtualMachine without any label: {name}")
        return Exposed(labels, ports, _owner(obj, "VirtualMachine"))
    selector = (obj.get("spec") or {}).get("selector") or {}
    if not selector.get("matchLabels"):
        raise CommandError(
            "cannot expose VirtualMachineInstanceReplicaSet without any selector labels"
        )
    if selector.get("matchExpressions"):
        raise CommandError("cannot expose VirtualMachineInstanceReplicaSet with match expressions")
    return Exposed(
        dict(selector["matchLabels"]), ports, _owner(obj, "VirtualMachineInstanceReplicaSet")
    )


def _target_port(text: str) -> int | str | None:
    if not text:
        return None
    return int(text) if text.isdigit() else text


def service_manifest(args: argparse.Namespace, namespace: str, found: Exposed) -> JSON:
    """The Service ``virtctl expose`` creates."""
    protocol = _choice(args.protocol, ("TCP", "UDP"), "unknown protocol")
    if args.type.lower() == "externalname":
        raise CommandError(f"type: {args.type} not supported")
    service_type = _choice(
        args.type, ("ClusterIP", "NodePort", "LoadBalancer"), "unknown service type"
    )
    families = _ip_families(args.ip_family)
    ports = found.ports
    if args.port:
        port = options(name=args.port_name, protocol=protocol, port=args.port)
        if (target := _target_port(args.target_port)) is not None:
            port["targetPort"] = target
        ports = [port]
    if not ports:
        raise CommandError("couldn't find port via --port flag or introspection")
    spec = options(
        ports=ports,
        selector=found.selector,
        clusterIP=args.cluster_ip,
        type=service_type,
        ipFamilies=families,
        externalIPs=[args.external_ip] if args.external_ip else None,
        ipFamilyPolicy=_ip_family_policy(args.ip_family_policy, families),
    )
    metadata = {"name": args.service_name, "namespace": namespace, "ownerReferences": [found.owner]}
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": spec}


def _ip_families(text: str) -> list[str]:
    if not text:
        return []
    return _choice(text, ("IPv4", "IPv6", "IPv4,IPv6", "IPv6,IPv4"), "unknown IPFamily/s").split(
        ","
    )


def _ip_family_policy(text: str, families: list[str]) -> str:
    if not text:
        return "PreferDualStack" if len(families) > 1 else ""
    allowed = ("SingleStack", "PreferDualStack", "RequireDualStack")
    return _choice(text, allowed, "unknown IPFamilyPolicy/s")


async def cmd_expose(client: Client, namespace: str, args: argparse.Namespace) -> int:
    text = args.kind.lower()
    kind = (
        "vmirs"
        if text
        in (
            "vmirs",
            "vmirss",
            "virtualmachineinstancereplicaset",
            "virtualmachineinstancereplicasets",
        )
        else kind_of(text)
    )
    resource, label = {"vm": (VM, "VirtualMachine"), "vmi": (VMI, "VirtualMachineInstance")}.get(
        kind, (VMIRS, "VirtualMachineInstanceReplicaSet")
    )
    obj = await refused(f"error fetching {label}", client.get(resource, args.name, namespace))
    service = service_manifest(args, namespace, exposed(kind, obj))
    await refused("service creation failed", client.create(SERVICE, service, namespace))
    print(f"Service {args.service_name} successfully created for {args.kind} {args.name}")
    return 0


# --- ssh, scp, port-forward --stdio -----------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """``[user@]kind/name[/namespace]``, virtctl's ssh and port-forward target."""

    kind: str
    name: str
    namespace: str
    user: str = ""

    @property
    def host(self) -> str:
        """The name ssh knows the guest by (known_hosts): ``kind.name.namespace``."""
        return f"{self.kind}.{self.name}.{self.namespace}"


def parse_target(text: str, fallback_namespace: str) -> Target:
    user = ""
    if "@" in text:
        user, _, text = text.partition("@")
        if not user:
            raise CommandError("expected username before '@'")
        if not text:
            raise CommandError("expected target after '@'")
    parts = text.split("/")
    if len(parts) == 1:
        raise CommandError("target must contain type and name separated by '/'")
    if len(parts) > 3:
        raise CommandError("target is not valid with more than two '/'")
    if len(parts) == 3 and not parts[2]:
        raise CommandError("namespace cannot be empty")
    kind = _VM_KINDS.get(parts[0].lower()) or _VMI_KINDS.get(parts[0].lower())
    if kind is None:
        raise CommandError(f"unsupported resource type '{parts[0]}'")
    if not parts[1]:
        raise CommandError("name cannot be empty")
    namespace = parts[2] if len(parts) == 3 else fallback_namespace
    return Target(kind, parts[1], namespace, user)


def default_username() -> str:
    return next((v for k in ("USER", "USERNAME", "LOGNAME") if (v := os.environ.get(k))), "")


def proxy_command(target: Target, port: int, *, vmo: list[str]) -> str:
    """ssh's ProxyCommand: ``vmo port-forward --stdio=true kind/name/namespace PORT``. ssh
    hands it to a shell, so every word is quoted, and ``%`` (ssh's token escape) doubled."""
    argv = [
        *vmo,
        "port-forward",
        "--stdio=true",
        f"{target.kind}/{target.name}/{target.namespace}",
        str(port),
    ]
    return "ProxyCommand=" + shlex.join(argv).replace("%", "%%")


def vmo_invocation(args: argparse.Namespace) -> list[str]:
    """How the ProxyCommand runs this very ``vmo``, with the same home and kubeconfig."""
    argv = [sys.executable, "-m", "vmo.cli.main"]
    if getattr(args, "home", ""):
        argv += ["--home", os.path.abspath(args.home)]
    return argv


def ssh_argv(
    program: str, args: argparse.Namespace, target: Target, client_args: list[str]
) -> list[str]:
    """The OpenSSH client's argv, as virtctl's local ssh builds it."""
    vmo = vmo_invocation(args)
    proxy = proxy_command(target, args.port, vmo=vmo)
    if args.kubeconfig:
        proxy += " " + shlex.quote(f"--kubeconfig={os.path.abspath(args.kubeconfig)}").replace(
            "%", "%%"
        )
    argv = [program, "-o", proxy]
    for extra in args.local_ssh_opts:
        argv += shlex.split(extra)
    if args.known_hosts:
        argv += ["-o", f"UserKnownHostsFile={args.known_hosts}"]
    if args.identity_file:
        argv += ["-i", args.identity_file]
    return argv + client_args


def _ssh_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("-l", "--username", default=None, help="the guest user (default $USER)")
    cmd.add_argument("-i", "--identity-file", default="", help="the private key to log in with")
    cmd.add_argument("--known-hosts", default="", help="the known_hosts file to use")
    cmd.add_argument("-p", "--port", type=int, default=22, help="the guest's SSH port")
    cmd.add_argument(
        "-t",
        "--local-ssh-opts",
        action="append",
        default=[],
        help='extra options for the local ssh client, e.g. "-o StrictHostKeyChecking=no"',
    )


def _ssh_commands(sub: Any, ctx: Context) -> None:
    ssh = _common(sub.add_parser("ssh", help="ssh to a VM through its port-forward subresource"))
    ssh.add_argument("target", help="[user@]vmi/NAME[/NAMESPACE] or [user@]vm/NAME[/NAMESPACE]")
    ssh.add_argument("-c", "--command", default="", help="a command to run in the guest")
    _ssh_options(ssh)
    ssh.set_defaults(func=lambda a: cmd_ssh(ctx, a))
    scp = _common(sub.add_parser("scp", help="copy files to or from a VM over ssh"))
    scp.add_argument("source")
    scp.add_argument("destination")
    scp.add_argument("-r", "--recursive", action="store_true", help="copy directories")
    scp.add_argument("--preserve", action="store_true", help="keep times and modes")
    _ssh_options(scp)
    scp.set_defaults(func=lambda a: cmd_scp(ctx, a))


def _user_host(args: argparse.Namespace, target: Target) -> str:
    user = target.user or args.username
    user = default_username() if user is None else user
    return f"{user}@{target.host}" if user else target.host


def ssh_command(args: argparse.Namespace, namespace: str) -> list[str]:
    target = parse_target(args.target, namespace)
    client_args = [_user_host(args, target), *([args.command] if args.command else [])]
    return ssh_argv("ssh", args, target, client_args)


def scp_command(args: argparse.Namespace, namespace: str) -> list[str]:
    source, destination = args.source, args.destination
    if ":" in source and ":" in destination:
        raise CommandError(
            "copying from a remote location to another remote location is not supported: "
            f"{source!r} to {destination!r}"
        )
    if ":" not in source and ":" not in destination:
        raise CommandError(
            f"none of the two provided locations seems to be a remote location: {source!r} to {destination!r}"
        )
    to_remote = ":" in destination
    remote, local = (destination, source) if to_remote else (source, destination)
    where, _, path = remote.partition(":")
    target = parse_target(where, namespace)
    remote_arg = f"{_user_host(args, target)}:{path}"
    flags = [*(["-r"] if args.recursive else []), *(["-p"] if args.preserve else [])]
    pair = [local, remote_arg] if to_remote else [remote_arg, local]
    return ssh_argv("scp", args, target, [*flags, *pair])


def _run_client(
    ctx: Context, args: argparse.Namespace, build: Callable[[argparse.Namespace, str], list[str]]
) -> int:
    try:
        argv = build(args, ctx.namespace(args, ctx.creds(args)))
        return subprocess.run(argv, check=False).returncode
    except CommandError as exc:
        print(exc, file=sys.stderr)
    except FileNotFoundError as exc:
        print(f"vmo: the OpenSSH client is not installed: {exc}", file=sys.stderr)
    return 1


def cmd_ssh(ctx: Context, args: argparse.Namespace) -> int:
    return _run_client(ctx, args, ssh_command)


def cmd_scp(ctx: Context, args: argparse.Namespace) -> int:
    return _run_client(ctx, args, scp_command)


def _stdio_port_forward(port_forward: argparse.ArgumentParser, ctx: Context) -> None:
    """``vmo port-forward --stdio=true kind/name[/namespace] PORT``: virtctl's mode that joins
    stdin and stdout to the guest's port, which ``vmo ssh`` uses as its ProxyCommand."""
    port_forward.add_argument(
        "--stdio",
        nargs="?",
        const="true",
        default="false",
        choices=("true", "false"),
        help="carry the (single) port over stdin/stdout instead of a local listener",
    )
    tcp_forward = port_forward.get_default("func")
    port_forward.set_defaults(
        func=lambda a: cmd_stdio_forward(ctx, a) if a.stdio == "true" else tcp_forward(a)
    )


def forwarded_port(text: str) -> int:
    """virtctl's ``[protocol/]local[:remote]``: the guest's port (tcp only)."""
    protocol, _, ports = text.rpartition("/")
    if protocol and protocol.lower() != "tcp":
        raise CommandError(f"only tcp port-forwarding is supported, not {protocol}")
    local, _, remote = ports.partition(":")
    try:
        return int(remote or local)
    except ValueError:
        raise CommandError(f"invalid port {text!r}") from None


def cmd_stdio_forward(ctx: Context, args: argparse.Namespace) -> int:
    creds = ctx.creds(args)
    try:
        target = parse_target(args.name, ctx.namespace(args, creds))
        port = forwarded_port(args.ports)
    except CommandError as exc:
        print(exc, file=sys.stderr)  # stdout carries the tunnel: messages go to stderr
        return 1
    resource = "virtualmachines" if target.kind == "vm" else "virtualmachineinstances"
    path = streams.stream_path(
        target.namespace, target.name, f"portforward/{port}/tcp", resource=resource
    )
    try:
        asyncio.run(streams.stdio_forward(creds, path))
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 1
    except TRANSIENT_ERRORS as exc:
        print(f"vmo: cannot reach the API server at {creds.server}: {exc}", file=sys.stderr)
        return 1
    return 0


# --- version ---------------------------------------------------------------------------------


def _version_command(sub: Any, ctx: Context) -> None:
    cmd = sub.add_parser("version", help="the client's and the server's version")
    cmd.add_argument("-c", "--client", action="store_true", help="the client's version only")
    cmd.add_argument("--kubeconfig", default="")
    cmd.add_argument("-n", "--namespace", default="", help=argparse.SUPPRESS)
    cmd.set_defaults(func=lambda a: cmd_version(ctx, a))


def go_info(info: JSON) -> str:
    """``version.Info{GitVersion:"v1", …}``: how virtctl prints an Info (Go's ``%#v``)."""
    fields = ", ".join(
        f"{key[0].upper()}{key[1:]}:{json.dumps(str(value))}" for key, value in info.items()
    )
    return f"version.Info{{{fields}}}"


def cmd_version(ctx: Context, args: argparse.Namespace) -> int:
    print(f"Client Version: {go_info(version_info())}")
    if args.client:
        return 0

    async def server(client: Client, _namespace: str) -> int:
        info = await refused(
            "failed to get server version", client.request("GET", f"{SUBRESOURCES}/version")
        )
        print(f"Server Version: {go_info(info)}")
        return 0

    return ctx.run(args, server)
