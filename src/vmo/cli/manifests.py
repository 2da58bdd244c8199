"""``vmo create vm|instancetype|preference``: virtctl's manifest generators, printing YAML that
``kubectl create -f -`` takes, on VMO or on a KubeVirt cluster.

Flags carry virtctl's names and its ``key:value,key:value`` parameter syntax. They stay offline
(no API call): like virtctl, the namespace is written only when ``-n`` names one.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from vmo.api.quantity import QuantityError, parse_quantity

JSON = dict[str, Any]

KUBEVIRT_API = "kubevirt.io/v1"
INSTANCETYPE_API = "instancetype.kubevirt.io/v1beta1"
RUN_STRATEGIES = ("Always", "Manual", "Halted", "Once", "RerunOnFailure")
CPU_TOPOLOGIES = ("sockets", "cores", "threads", "spread", "any")
CLOUD_INIT_HEADER = "#cloud-config"
CLOUD_INIT_DISK = "cloudinitdisk"
# Kubernetes' rand.String alphabet: no vowels, no look-alikes
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"

# --volume-import type -> the parameters it takes
_IMPORT_PARAMS = {
    "blank": {"type", "name", "size", "bootorder"},
    "http": {"type", "name", "size", "bootorder", "url", "secretref", "certconfigmap"},
    "registry": {
        "type",
        "name",
        "size",
        "bootorder",
        "url",
        "imagestream",
        "pullmethod",
        "secretref",
        "certconfigmap",
    },
    "pvc": {"type", "name", "size", "bootorder", "src"},
    "snapshot": {"type", "name", "size", "bootorder", "src"},
    "ds": {"type", "name", "size", "bootorder", "src"},
}
_SIZE_OPTIONAL = ("pvc", "snapshot", "ds")
# deprecated virtctl flags that are --volume-import with a fixed type
_IMPORT_ALIASES = (
    ("volume_datasource", "ds"),
    ("volume_clone_pvc", "pvc"),
    ("volume_blank", "blank"),
)


class FlagError(Exception):
    """A flag virtctl would refuse; the message names the flag as virtctl's does."""

    def __init__(self, flag: str, problem: str) -> None:
        super().__init__(f'failed to parse "--{flag}" flag: {problem}')


def random_name(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_NAME_ALPHABET) for _ in range(5))


def flag_params(flag: str, text: str, allowed: set[str]) -> dict[str, str]:
    """``key:value,key:value`` -> a dict; an unknown key or a pair without a colon is refused."""
    if not text:
        raise FlagError(flag, "params may not be empty")
    found: dict[str, str] = {}
    for pair in text.split(","):
        key, colon, value = pair.partition(":")
        if not colon:
            raise FlagError(flag, f"params need to have at least one colon: {pair}")
        found[key] = value
    unknown = [f"{k}:{v}" for k, v in found.items() if k not in allowed]
    if unknown:
        raise FlagError(flag, "unknown param(s): " + ",".join(unknown))
    return found


def split_prefixed(flag: str, text: str) -> tuple[str, str]:
    """``prefix/name`` or ``name`` -> (prefix, name)."""
    parts = text.split("/")
    if len(parts) > 2:
        raise FlagError(flag, f"invalid count {len(parts) - 1} of slashes in prefix/name")
    prefix, name = (parts[0], parts[1]) if len(parts) == 2 else ("", parts[0])
    if not name:
        raise FlagError(flag, "name cannot be empty")
    return prefix, name


def checked_quantity(flag: str, text: str) -> str:
    try:
        parse_quantity(text)
    except QuantityError as exc:
        raise FlagError(flag, str(exc)) from None
    return text


def dns_label(flag: str, name: str) -> str:
    valid = (
        0 < len(name) <= 63
        and name[0].isalnum()
        and name[-1].isalnum()
        and all(c.islower() or c.isdigit() or c == "-" for c in name)
    )
    if not valid:
        raise FlagError(flag, f'invalid name "{name}": a lowercase RFC 1123 label is required')
    return name


# --- create vm -------------------------------------------------------------------------------


class VmBuilder:
    """Applies virtctl's flags to a VirtualMachine in virtctl's order: run strategy,
    instancetype, preference, containerdisks, PVCs, imported volumes, cloud-init."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.name = args.name or random_name("vm-")
        self.boot_orders: dict[int, str] = {}
        domain: JSON = {"devices": {}, "memory": {"guest": checked_quantity("memory", args.memory)}}
        self.template_spec: JSON = {
            "domain": domain,
            "terminationGracePeriodSeconds": args.termination_grace_period,
        }
        self.spec: JSON = {"runStrategy": "Always", "template": {"spec": self.template_spec}}
        metadata: JSON = {"name": self.name}
        if args.namespace:
            metadata["namespace"] = args.namespace
        self.vm: JSON = {
            "apiVersion": KUBEVIRT_API,
            "kind": "VirtualMachine",
            "metadata": metadata,
            "spec": self.spec,
        }

    @property
    def volumes(self) -> list[JSON]:
        volumes: list[JSON] = self.template_spec.setdefault("volumes", [])
        return volumes

    def build(self) -> JSON:
        steps: list[Callable[[], None]] = [
            self.run_strategy,
            self.instancetype,
            self.preference,
            self.containerdisks,
            self.pvcs,
            self.imports,
            self.cloud_init,
        ]
        for step in steps:
            step()
        return self.vm

    def add_volume(self, flag: str, volume: JSON, boot_order: int | None) -> None:
        name = dns_label(flag, volume["name"])
        if any(v["name"] == name for v in self.volumes):
            raise FlagError(flag, f'there is already a volume with name "{name}"')
        self.volumes.append(volume)
        if boot_order is None:
            return
        if boot_order == 0:
            raise FlagError(flag, "bootorder must be greater than 0")
        if boot_order in self.boot_orders:
            raise FlagError(flag, f"bootorder {boot_order} was specified multiple times")
        self.boot_orders[boot_order] = name
        disks = self.template_spec["domain"]["devices"].setdefault("disks", [])
        disks.append({"name": name, "bootOrder": boot_order})

    def run_strategy(self) -> None:
        wanted = self.args.run_strategy
        if wanted is None:
            return
        match = next((s for s in RUN_STRATEGIES if s.lower() == wanted.lower()), None)
        if match is None:
            raise FlagError(
                "run-strategy",
                f'invalid run strategy "{wanted}", supported values are: '
                + ", ".join(RUN_STRATEGIES),
            )
        self.spec["runStrategy"] = match

    def instancetype(self) -> None:
        if self.args.instancetype is None:
            return
        kind, name = split_prefixed("instancetype", self.args.instancetype)
        allowed = ("virtualmachineinstancetype", "virtualmachineclusterinstancetype")
        self.spec["instancetype"] = _matcher("instancetype", kind, name, allowed)
        # the instancetype gives the guest its memory
        del self.template_spec["domain"]["memory"]

    def preference(self) -> None:
        if self.args.preference is None:
            return
        kind, name = split_prefixed("preference", self.args.preference)
        allowed = ("virtualmachinepreference", "virtualmachineclusterpreference")
        self.spec["preference"] = _matcher("preference", kind, name, allowed)

    def containerdisks(self) -> None:
        flag = "volume-containerdisk"
        for index, text in enumerate(self.args.volume_containerdisk):
            found = flag_params(flag, text, {"name", "src", "bootorder"})
            if not found.get("src"):
                raise FlagError(flag, "src must be specified")
            name = found.get("name") or f"{self.name}-containerdisk-{index}"
            volume = {"name": name, "containerDisk": {"image": found["src"]}}
            self.add_volume(flag, volume, _boot_order(flag, found))

    def pvcs(self) -> None:
        flag = "volume-pvc"
        for text in self.args.volume_pvc:
            found = flag_params(flag, text, {"name", "src", "bootorder"})
            if not found.get("src"):
                raise FlagError(flag, "src must be specified")
            namespace, claim = split_prefixed(flag, found["src"])
            if namespace:
                raise FlagError(flag, f'not allowed to specify namespace of pvc "{claim}"')
            volume = {
                "name": found.get("name") or claim,
                "persistentVolumeClaim": {"claimName": claim},
            }
            self.add_volume(flag, volume, _boot_order(flag, found))

    def imports(self) -> None:
        wanted: list[tuple[str, str]] = []
        for attribute, kind in _IMPORT_ALIASES:
            for text in getattr(self.args, attribute):
                flag = attribute.replace("_", "-")
                print(
                    f"Flag --{flag} has been deprecated, use flag --volume-import instead",
                    file=sys.stderr,
                )
                wanted.append(("volume-import", f"type:{kind},{text}" if text else ""))
        wanted += [("volume-import", text) for text in self.args.volume_import]
        for flag, text in wanted:
            self.import_volume(flag, text)

    def import_volume(self, flag: str, text: str) -> None:
        kind = flag_params(flag, text, {*_IMPORT_PARAMS["registry"], "src"}).get("type", "")
        if not kind:
            raise FlagError(flag, "type must be specified")
        if kind not in _IMPORT_PARAMS:
            raise FlagError(
                flag, f'invalid volume import type "{kind}", see help for supported values'
            )
        found = flag_params(flag, text, _IMPORT_PARAMS[kind])
        spec: JSON = datavolume_source(flag, kind, found)
        storage: JSON = {}
        if found.get("size"):
            size = checked_quantity(flag, found["size"])
            storage["resources"] = {"requests": {"storage": size}}
        elif kind not in _SIZE_OPTIONAL:
            raise FlagError(flag, "size must be specified")
        spec["storage"] = storage
        name = found.get("name") or random_name("imported-volume-")
        self.add_volume(
            flag, {"name": name, "dataVolume": {"name": name}}, _boot_order(flag, found)
        )
        templates = self.spec.setdefault("dataVolumeTemplates", [])
        templates.append({"metadata": {"name": name}, "spec": spec})

    def cloud_init(self) -> None:
        args = self.args
        changed = any(
            value not in (None, [], False)
            for value in (
                args.user,
                args.password_file,
                args.ssh_key,
                args.ga_manage_ssh,
                args.cloud_init,
                args.cloud_init_user_data,
                args.cloud_init_network_data,
            )
        )
        if not changed:
            return
        if args.cloud_init_user_data and (
            args.user or args.password_file or args.ssh_key or args.ga_manage_ssh
        ):
            raise FlagError(
                "cloud-init-user-data",
                "it cannot be combined with --user, --password-file, --ssh-key or --ga-manage-ssh",
            )
        kind = (args.cloud_init or "nocloud").lower()
        if kind == "none":
            return
        if kind not in ("nocloud", "configdrive"):
            raise FlagError(
                "cloud-init",
                f'invalid cloud-init data source type "{args.cloud_init}", '
                "supported values are: nocloud, configdrive, none",
            )
        source = self.cloud_init_source()
        if (
            args.cloud_init is None
            and source.get("userData") == CLOUD_INIT_HEADER
            and "networkDataBase64" not in source
        ):
            return  # nothing beyond the header, and no data source asked for
        key = "cloudInitNoCloud" if kind == "nocloud" else "cloudInitConfigDrive"
        self.add_volume("cloud-init", {"name": CLOUD_INIT_DISK, key: source}, None)

    def cloud_init_source(self) -> JSON:
        args = self.args
        source: JSON = {}
        if args.cloud_init_network_data:
            source["networkDataBase64"] = args.cloud_init_network_data
        if args.cloud_init_user_data:
            source["userDataBase64"] = args.cloud_init_user_data
        else:
            source["userData"] = self.cloud_config()
        return source

    def cloud_config(self) -> str:
        args = self.args
        lines = [CLOUD_INIT_HEADER]
        if args.user:
            lines.append(f"user: {args.user}")
        if args.password_file:
            print(
                "WARNING: --password-file: The password is stored in cleartext in the VM definition!",
                file=sys.stderr,
            )
            try:
                password = Path(args.password_file).read_text().strip()
            except OSError as exc:
                raise FlagError("password-file", str(exc)) from None
            if password:
                lines += [f"password: {password}", "chpasswd: { expire: False }"]
        keys = [key for text in args.ssh_key for key in text.split(",") if key]
        if keys:
            lines.append("ssh_authorized_keys:")
            lines += [f"  - {key}" for key in keys]
        if args.ga_manage_ssh:
            lines += ["runcmd:", "  - [ setsebool, -P, 'virt_qemu_ga_manage_ssh', 'on' ]"]
        return "\n".join(lines)


def _matcher(flag: str, kind: str, name: str, allowed: tuple[str, ...]) -> JSON:
    kind = kind.lower()
    if kind and kind not in allowed:
        raise FlagError(
            flag, f'invalid {flag} kind "{kind}", supported values are: {", ".join(allowed)}'
        )
    # an empty kind is the cluster-wide kind: the server's defaulting fills it in
    return {"name": name, "kind": _KINDS[kind]} if kind else {"name": name}


_KINDS = {
    "virtualmachineinstancetype": "VirtualMachineInstancetype",
    "virtualmachineclusterinstancetype": "VirtualMachineClusterInstancetype",
    "virtualmachinepreference": "VirtualMachinePreference",
    "virtualmachineclusterpreference": "VirtualMachineClusterPreference",
}


def _boot_order(flag: str, found: dict[str, str]) -> int | None:
    text = found.get("bootorder")
    if text is None:
        return None
    if not text.isdigit():
        raise FlagError(flag, f'failed to parse param "bootorder": invalid syntax: {text}')
    return int(text)


def datavolume_source(flag: str, kind: str, found: dict[str, str]) -> JSON:
    """The DataVolume spec's source for one ``--volume-import``."""
    if kind == "blank":
        return {"source": {"blank": {}}}
    if kind == "http":
        if not found.get("url"):
            raise FlagError(flag, "url is required with http volume source")
        http = {"url": found["url"], **_refs(found)}
        return {"source": {"http": http}}
    if kind == "registry":
        return {"source": {"registry": _registry(flag, found)}}
    if not found.get("src"):
        raise FlagError(flag, "src must be specified")
    namespace, name = split_prefixed(flag, found["src"])
    if kind == "ds":
        ref: JSON = {"kind": "DataSource", "name": name}
        if namespace:
            ref["namespace"] = namespace
        return {"sourceRef": ref}
    if not namespace:
        raise FlagError(flag, f'namespace of {kind} "{name}" must be specified')
    return {"source": {kind: {"name": name, "namespace": namespace}}}


def _refs(found: dict[str, str]) -> JSON:
    names = {"secretref": "secretRef", "certconfigmap": "certConfigMap"}
    return {names[key]: value for key, value in found.items() if key in names and value}


def _registry(flag: str, found: dict[str, str]) -> JSON:
    method = found.get("pullmethod", "")
    if method and method not in ("pod", "node"):
        raise FlagError(flag, "pullmethod must be set to pod or node")
    if bool(found.get("url")) == bool(found.get("imagestream")):
        raise FlagError(flag, "exactly one of url or imagestream must be defined")
    registry: JSON = {**_refs(found)}
    if method:
        registry["pullMethod"] = method
    if found.get("url"):
        registry["url"] = found["url"]
    if found.get("imagestream"):
        registry["imageStream"] = found["imagestream"]
    return registry


def vm_manifest(args: argparse.Namespace) -> JSON:
    if args.memory_given and args.instancetype is not None:
        raise FlagError(
            "memory",
            "if any flags in the group [memory instancetype] are set none of the others can be",
        )
    return VmBuilder(args).build()


# --- create instancetype, create preference ---------------------------------------------------


def _kind_metadata(args: argparse.Namespace, prefix: str, kind: str) -> tuple[str, JSON]:
    """(kind, metadata): ``-n`` or ``--namespaced`` makes the namespaced kind."""
    namespaced = bool(args.namespace) or args.namespaced
    name = args.name or random_name(f"{prefix}-" if namespaced else f"cluster{prefix}-")
    metadata: JSON = {"name": name}
    if args.namespace:
        metadata["namespace"] = args.namespace
    return (f"VirtualMachine{kind}" if namespaced else f"VirtualMachineCluster{kind}"), metadata


def instancetype_manifest(args: argparse.Namespace) -> JSON:
    if args.cpu <= 0:
        raise FlagError("cpu", "cpu value must be greater than zero")
    spec: JSON = {
        "cpu": {"guest": args.cpu},
        "memory": {"guest": checked_quantity("memory", args.memory)},
    }
    for flag, key, texts in (
        ("gpu", "gpus", args.gpu),
        ("hostdevice", "hostDevices", args.hostdevice),
    ):
        for text in texts:
            spec.setdefault(key, []).append(_device(flag, text))
    if args.iothreadspolicy is not None:
        if args.iothreadspolicy not in ("auto", "shared"):
            raise FlagError("iothreadspolicy", "IOThread must be of value auto or shared")
        spec["ioThreadsPolicy"] = args.iothreadspolicy
    kind, metadata = _kind_metadata(args, "instancetype", "Instancetype")
    return {"apiVersion": INSTANCETYPE_API, "kind": kind, "metadata": metadata, "spec": spec}


def _device(flag: str, text: str) -> JSON:
    found = flag_params(flag, text, {"name", "devicename"})
    if not found.get("name"):
        raise FlagError(flag, "name must be specified")
    if not found.get("devicename"):
        raise FlagError(flag, "deviceName must be specified")
    return {"name": found["name"], "deviceName": found["devicename"]}


def preference_manifest(args: argparse.Namespace) -> JSON:
    spec: JSON = {}
    if args.volume_storage_class is not None:
        spec["volumes"] = {"preferredStorageClassName": args.volume_storage_class}
    if args.machine_type is not None:
        spec["machine"] = {"preferredMachineType": args.machine_type}
    if args.cpu_topology is not None:
        if args.cpu_topology not in CPU_TOPOLOGIES:
            raise FlagError(
                "cpu-topology",
                "CPU topology must have a value of sockets, cores, threads or spread",
            )
        spec["cpu"] = {"preferredCPUTopology": args.cpu_topology}
    kind, metadata = _kind_metadata(args, "preference", "Preference")
    return {"apiVersion": INSTANCETYPE_API, "kind": kind, "metadata": metadata, "spec": spec}


# --- the commands ----------------------------------------------------------------------------


def register(sub: Any) -> None:
    create = sub.add_parser("create", help="print a VM, instancetype or preference manifest")
    kinds = create.add_subparsers(dest="create_kind", required=True)
    _vm_flags(kinds.add_parser("vm", help="a VirtualMachine manifest"))
    _instancetype_flags(kinds.add_parser("instancetype", help="a (Cluster)Instancetype manifest"))
    _preference_flags(kinds.add_parser("preference", help="a (Cluster)Preference manifest"))


def _printer(build: Callable[[argparse.Namespace], JSON]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            manifest = build(args)
        except FlagError as exc:
            print(exc, file=sys.stderr)
            return 1
        sys.stdout.write(yaml.safe_dump(manifest, sort_keys=True))
        return 0

    return run


def _namespace_flag(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("-n", "--namespace", default="", help="write this namespace into the manifest")
    # accepted as virtctl's global flag is; generating a manifest asks no server
    cmd.add_argument("--kubeconfig", default="", help=argparse.SUPPRESS)


class _MemoryAction(argparse.Action):
    """Stores ``--memory`` and records that it was given (it excludes ``--instancetype``)."""

    def __call__(
        self, parser: Any, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace.memory_given = True


def _vm_flags(cmd: argparse.ArgumentParser) -> None:
    _namespace_flag(cmd)
    cmd.add_argument("--name", default="", help="the VM's name (default vm-<random>)")
    cmd.add_argument("--run-strategy", default=None, help=", ".join(RUN_STRATEGIES))
    cmd.add_argument("--termination-grace-period", type=int, default=180, metavar="S")
    cmd.add_argument("--memory", default="512Mi", action=_MemoryAction, help="the guest's memory")
    cmd.set_defaults(memory_given=False)
    cmd.add_argument("--instancetype", default=None, help="[kind/]name")
    cmd.add_argument("--preference", default=None, help="[kind/]name")
    repeatable = (
        ("--volume-containerdisk", "src:IMAGE[,name:N][,bootorder:B]"),
        ("--volume-pvc", "src:CLAIM[,name:N][,bootorder:B]"),
        ("--volume-import", "type:blank|http|registry|pvc|snapshot|ds,... (see virtctl)"),
        ("--volume-datasource", "deprecated: --volume-import type:ds"),
        ("--volume-clone-pvc", "deprecated: --volume-import type:pvc"),
        ("--volume-blank", "deprecated: --volume-import type:blank"),
        ("--ssh-key", "an authorized key for the cloud-init user (repeatable)"),
    )
    for flag, helptext in repeatable:
        cmd.add_argument(flag, action="append", default=[], help=helptext)
    cmd.add_argument("--user", default=None, help="the cloud-init user")
    cmd.add_argument("--password-file", default=None, help="a file holding the user's password")
    cmd.add_argument("--ga-manage-ssh", action="store_true", help="let qemu-ga manage SSH keys")
    cmd.add_argument("--cloud-init", default=None, help="nocloud (default), configdrive or none")
    cmd.add_argument("--cloud-init-user-data", default=None, help="base64 user data")
    cmd.add_argument("--cloud-init-network-data", default=None, help="base64 network data")
    cmd.set_defaults(func=_printer(vm_manifest))


def _instancetype_flags(cmd: argparse.ArgumentParser) -> None:
    _namespace_flag(cmd)
    cmd.add_argument("--name", default="")
    cmd.add_argument("--cpu", type=int, required=True, help="the guest's vCPUs")
    cmd.add_argument("--memory", required=True, help="the guest's memory, e.g. 2Gi")
    cmd.add_argument("--gpu", action="append", default=[], help="name:N,devicename:D")
    cmd.add_argument("--hostdevice", action="append", default=[], help="name:N,devicename:D")
    cmd.add_argument("--iothreadspolicy", default=None, help="auto or shared")
    cmd.add_argument("--namespaced", action="store_true", help="a VirtualMachineInstancetype")
    cmd.set_defaults(func=_printer(instancetype_manifest))


def _preference_flags(cmd: argparse.ArgumentParser) -> None:
    _namespace_flag(cmd)
    cmd.add_argument("--name", default="")
    cmd.add_argument("--namespaced", action="store_true", help="a VirtualMachinePreference")
    cmd.add_argument("--volume-storage-class", default=None, help="the preferred StorageClass")
    cmd.add_argument("--machine-type", default=None, help="the preferred machine type")
    cmd.add_argument("--cpu-topology", default=None, help=", ".join(CPU_TOPOLOGIES))
    cmd.set_defaults(func=_printer(preference_manifest))
