"""``vmo addvolume`` / ``vmo removevolume``: virtctl's disk hotplug verbs, with its flags.

They PUT upstream's ``AddVolumeOptions`` / ``RemoveVolumeOptions`` to the ``addvolume`` /
``removevolume`` subresources of the VMI, or of the VM with ``--persist`` (the VM's template
keeps the disk), exactly as virtctl does, so they work against a KubeVirt cluster too.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import Any

from vmo.client import DATAVOLUME, PVC, TRANSIENT_ERRORS, ApiStatusError, Client, Credentials

JSON = dict[str, Any]
CredsFn = Callable[[argparse.Namespace], Credentials]
NamespaceFn = Callable[[argparse.Namespace, Credentials], str]
SUBRESOURCES = "/apis/subresources.kubevirt.io/v1"
# a DNS-1035 label, as the disk and volume name must be
NAME_MAX = 63
CACHE_MODES = ("none", "writethrough", "writeback")


class HotplugError(Exception):
    """Printed on stderr; the command exits 1."""


def register(sub: Any, creds: CredsFn, namespace: NamespaceFn) -> None:
    add = _common(sub.add_parser("addvolume", help="hot-plug a PVC or DataVolume into a VMI"))
    add.add_argument("--disk-name", default="", help="name of the disk/volume in the spec")
    add.add_argument("--serial", default="", help="serial number of the disk (default: its name)")
    add.add_argument("--cache", default="", help="cache mode: none, writethrough or writeback")
    add.add_argument("--disk-type", default="disk", help="disk (lun is not supported by VMO)")
    add.add_argument("--bus", default="scsi", help="the disk's bus (scsi)")
    add.set_defaults(func=lambda a: _run(a, creds, namespace, add_volume))
    remove = _common(sub.add_parser("removevolume", help="hot-unplug a volume from a VMI"))
    remove.set_defaults(func=lambda a: _run(a, creds, namespace, remove_volume))


def _common(cmd: argparse.ArgumentParser) -> argparse.ArgumentParser:
    cmd.add_argument("name", metavar="VMI", help="the VMI (or, with --persist, the VM)")
    cmd.add_argument(
        "--volume-name", required=True, help="the volume: a DataVolume or PVC (addvolume)"
    )
    cmd.add_argument(
        "--persist", action="store_true", help="also change the VM's template (keeps the disk)"
    )
    cmd.add_argument("--dry-run", action="store_true", help="validate only, change nothing")
    cmd.add_argument("-n", "--namespace", default="")
    cmd.add_argument("--kubeconfig", default="")
    return cmd


def _run(
    args: argparse.Namespace,
    creds_fn: CredsFn,
    namespace_fn: NamespaceFn,
    verb: Callable[[Client, str, argparse.Namespace], Any],
) -> int:
    creds = creds_fn(args)
    namespace = namespace_fn(args, creds)

    async def main() -> int:
        async with Client(creds) as client:
            await verb(client, namespace, args)
        return 0

    try:
        return asyncio.run(main())
    except HotplugError as exc:
        print(exc, file=sys.stderr)
    except TRANSIENT_ERRORS as exc:
        print(f"vmo: cannot reach the API server at {creds.server}: {exc}", file=sys.stderr)
    return 1


def _path(namespace: str, args: argparse.Namespace, sub: str) -> str:
    resource = "virtualmachines" if args.persist else "virtualmachineinstances"
    return f"{SUBRESOURCES}/namespaces/{namespace}/{resource}/{args.name}/{sub}"


async def volume_source(client: Client, namespace: str, name: str) -> JSON:
    """A DataVolume of that name, else a PVC, as virtctl looks them up."""
    if await client.find(DATAVOLUME, name, namespace) is not None:
        return {"dataVolume": {"name": name, "hotpluggable": True}}
    if await client.find(PVC, name, namespace) is not None:
        return {"persistentVolumeClaim": {"claimName": name, "hotpluggable": True}}
    raise HotplugError(
        f"error adding volume, Volume {name} is not a DataVolume or PersistentVolumeClaim"
    )


def add_options(args: argparse.Namespace, source: JSON) -> JSON:
    """The ``AddVolumeOptions`` virtctl sends for these flags."""
    name = args.disk_name or args.volume_name
    if len(name) > NAME_MAX:
        raise HotplugError(f"Invalid disk name {name}, must not exceed {NAME_MAX} characters")
    if args.disk_type != "disk":
        raise HotplugError(f"Invalid disk type '{args.disk_type}': VMO hot-plugs disks only")
    if args.bus != "scsi":
        raise HotplugError(f"Invalid bus type '{args.bus}' for disk: VMO hot-plugs on scsi only")
    disk: JSON = {"disk": {"bus": args.bus}, "serial": args.serial or name}
    if args.cache:
        if args.cache not in CACHE_MODES:
            raise HotplugError(f"error adding volume, invalid cache value {args.cache}")
        disk["cache"] = args.cache
    body: JSON = {"name": name, "disk": disk, "volumeSource": source}
    if args.dry_run:
        body["dryRun"] = ["All"]
    return body


async def add_volume(client: Client, namespace: str, args: argparse.Namespace) -> None:
    source = await volume_source(client, namespace, args.volume_name)
    body = add_options(args, source)
    if args.dry_run:
        print("Dry Run execution")
    try:
        await client.request("PUT", _path(namespace, args, "addvolume"), body)
    except ApiStatusError as exc:
        raise HotplugError(f"error adding volume, {_message(exc)}") from None
    kind = "VM" if args.persist else "VMI"
    print(
        f"Successfully submitted add volume request to {kind} {args.name} "
        f"for volume {args.volume_name}"
    )


async def remove_volume(client: Client, namespace: str, args: argparse.Namespace) -> None:
    body: JSON = {"name": args.volume_name}
    if args.dry_run:
        print("Dry Run execution")
        body["dryRun"] = ["All"]
    try:
        await client.request("PUT", _path(namespace, args, "removevolume"), body)
    except ApiStatusError as exc:
        raise HotplugError(f"error removing volume, {_message(exc)}") from None
    kind = "VM" if args.persist else "VMI"
    print(
        f"Successfully submitted remove volume request to {kind} {args.name} "
        f"for volume {args.volume_name}"
    )


def _message(exc: ApiStatusError) -> str:
    return str(exc.status.get("message") or exc)
