"""KubeMacPool's role: every VM interface gets a unique MAC address, generated once and kept.

Pure functions for an admission hook. ``macs_to_assign`` picks addresses for interfaces that lack
one; ``apply_macs`` / ``mac_patch`` write them into the object; ``mac_conflicts`` refuses a MAC
already in use on the same network. Addresses come from KubeMacPool's default range, the locally
administered unicast block 02:00:00:00:00:00-02:ff:ff:ff:ff:ff.

Like KubeMacPool, every interface gets a MAC, pod-network (masquerade) ones included: the guest
then sees the same NIC across restarts and migrations, and cloud-init network-config can match it.
Conflicts are judged per network (two VMs on different L2 segments may share a MAC, as imported
vSphere VMs sometimes do), but generated addresses avoid every MAC in use on any network, so an
interface moved to another network never collides.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping

from vmo.api.types import JSON, Cause

__all__ = [
    "POD_NETWORK",
    "MacPoolExhausted",
    "apply_macs",
    "mac_conflicts",
    "mac_patch",
    "macs_in_use",
    "macs_to_assign",
    "network_key",
    "normalize_mac",
    "random_mac",
]

POD_NETWORK = "pod"
"""The network key of an interface on the pod network."""

_MAC = re.compile(r"^[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}$")
# Generation gives up after this many collisions; with 2**40 addresses that means a broken rng.
_MAX_ATTEMPTS = 4096


class MacPoolExhausted(Exception):
    """No free MAC could be generated (the pool is full or the random source is degenerate)."""


def normalize_mac(mac: str) -> str:
    """``02-AA-...`` and ``02:aa:...`` are one address: lower case, colon-separated."""
    return mac.strip().lower().replace("-", ":")


def random_mac(rng: random.Random) -> str:
    """A MAC in 02:00:00:00:00:00-02:ff:ff:ff:ff:ff (locally administered, unicast)."""
    tail = rng.getrandbits(40).to_bytes(5, "big")
    return ":".join(f"{octet:02x}" for octet in (0x02, *tail))


def _spec_and_path(obj: JSON) -> tuple[JSON, str]:
    """The VMI spec inside a VirtualMachine (its template) or a VirtualMachineInstance."""
    spec = obj.get("spec") or {}
    if obj.get("kind") == "VirtualMachineInstance" or "template" not in spec:
        return spec, "spec"
    return (spec.get("template") or {}).get("spec") or {}, "spec.template.spec"


def _interfaces(obj: JSON) -> tuple[list[JSON], str]:
    spec, path = _spec_and_path(obj)
    interfaces = ((spec.get("domain") or {}).get("devices") or {}).get("interfaces") or []
    return interfaces, f"{path}.domain.devices.interfaces"


def network_key(obj: JSON, network_name: str) -> str:
    """The network an interface of ``obj`` is on: ``pod`` or ``<namespace>/<nad>``."""
    spec, _ = _spec_and_path(obj)
    network = next((n for n in spec.get("networks") or [] if n.get("name") == network_name), None)
    if network is None or "pod" in network:
        return POD_NETWORK
    target = str((network.get("multus") or {}).get("networkName") or "")
    if "/" in target:
        return target
    namespace = (obj.get("metadata") or {}).get("namespace") or "default"
    return f"{namespace}/{target}"


def _valid_mac(value: object) -> str | None:
    return normalize_mac(value) if isinstance(value, str) and _MAC.match(value.strip()) else None


def macs_in_use(
    objects: Iterable[JSON], *, exclude: tuple[str, str] | None = None
) -> dict[str, set[str]]:
    """Network key -> MACs that VMs and VMIs (other than ``exclude`` = (namespace, name)) hold.

    A VM and the VMI it created share a name, so excluding one name excludes both.
    """
    used: dict[str, set[str]] = {}
    for obj in objects:
        md = obj.get("metadata") or {}
        if exclude is not None and (md.get("namespace"), md.get("name")) == exclude:
            continue
        interfaces, _ = _interfaces(obj)
        for iface in interfaces:
            mac = _valid_mac(iface.get("macAddress"))
            if mac is not None:
                used.setdefault(network_key(obj, str(iface.get("name", ""))), set()).add(mac)
    return used


def mac_conflicts(vm: JSON, used_by_network: Mapping[str, set[str]]) -> list[Cause]:
    """MACs of ``vm`` already used on the same network, by another object or by ``vm`` itself."""
    interfaces, path = _interfaces(vm)
    causes: list[Cause] = []
    seen: dict[tuple[str, str], int] = {}
    for index, iface in enumerate(interfaces):
        mac = _valid_mac(iface.get("macAddress"))
        if mac is None:
            continue  # absent, or malformed: the model's validation reports the latter
        network = network_key(vm, str(iface.get("name", "")))
        field = f"{path}[{index}].macAddress"
        if mac in {normalize_mac(m) for m in used_by_network.get(network, set())}:
            causes.append(
                _duplicate(field, f"MAC address {mac} is already in use on network {network}")
            )
        elif (network, mac) in seen:
            first = seen[(network, mac)]
            causes.append(
                _duplicate(
                    field,
                    f"MAC address {mac} is also given to interface {first} on network {network}",
                )
            )
        seen.setdefault((network, mac), index)
    return causes


def _duplicate(field: str, message: str) -> Cause:
    return Cause(field, message, "FieldValueDuplicate")


def macs_to_assign(
    vm: JSON,
    used_by_network: Mapping[str, set[str]],
    *,
    rng: random.Random,
    old: JSON | None = None,
) -> dict[str, str]:
    """Interface name -> MAC for each interface of ``vm`` that has none yet.

    On update (``old`` given), an interface that had a MAC keeps it even if the new spec omits it
    (an ``apply`` of the original manifest must not renumber the NIC); otherwise a fresh address
    is drawn from 02:xx:xx:xx:xx:xx avoiding every MAC in use.
    """
    interfaces, _ = _interfaces(vm)
    previous = _macs_by_interface(old) if old is not None else {}
    taken = set().union(*used_by_network.values()) if used_by_network else set()
    taken = {normalize_mac(m) for m in taken}
    taken |= {m for i in interfaces if (m := _valid_mac(i.get("macAddress"))) is not None}
    chosen: dict[str, str] = {}
    for iface in interfaces:
        name = str(iface.get("name", ""))
        if iface.get("macAddress"):
            continue
        mac = previous.get(name) or _fresh_mac(rng, taken)
        taken.add(mac)
        chosen[name] = mac
    return chosen


def _macs_by_interface(obj: JSON) -> dict[str, str]:
    interfaces, _ = _interfaces(obj)
    return {
        str(i.get("name", "")): mac
        for i in interfaces
        if (mac := _valid_mac(i.get("macAddress"))) is not None
    }


def _fresh_mac(rng: random.Random, taken: set[str]) -> str:
    for _ in range(_MAX_ATTEMPTS):
        mac = random_mac(rng)
        if mac not in taken:
            return mac
    raise MacPoolExhausted(f"no free MAC after {_MAX_ATTEMPTS} draws ({len(taken)} in use)")


def apply_macs(vm: JSON, assignments: Mapping[str, str]) -> None:
    """Writes ``assignments`` (interface name -> MAC) into ``vm`` in place."""
    interfaces, _ = _interfaces(vm)
    for iface in interfaces:
        mac = assignments.get(str(iface.get("name", "")))
        if mac is not None:
            iface["macAddress"] = mac


def mac_patch(vm: JSON, assignments: Mapping[str, str]) -> list[JSON]:
    """``assignments`` as RFC 6902 JSON-patch operations against ``vm``."""
    interfaces, path = _interfaces(vm)
    pointer = "/" + path.replace(".", "/")
    ops: list[JSON] = []
    for index, iface in enumerate(interfaces):
        mac = assignments.get(str(iface.get("name", "")))
        if mac is not None:
            op = "replace" if "macAddress" in iface else "add"
            ops.append({"op": op, "path": f"{pointer}/{index}/macAddress", "value": mac})
    return ops
