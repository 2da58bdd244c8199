"""VMI -> Domain -> QEMU argv: golden command lines, and the specs the mapping must refuse.

Golden cases live in tests/golden/qemu: ``<case>.json`` (a VMI and its node context) beside
``<case>.argv`` (one argument per line). ``VMO_UPDATE_GOLDEN=1 pytest tests/test_qemu_argv.py``
rewrites the .argv files; review the diff before committing it.
"""

from __future__ import annotations

import copy
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from vmo.engine.qemu import (
    Accelerator,
    CpuTopology,
    Disk,
    DiskBus,
    DiskCache,
    DiskFormat,
    Domain,
    KernelBoot,
    LocalVolume,
    NodeContext,
    OvmfFiles,
    RuntimePaths,
    UnsupportedSpec,
    domain_from_vmi,
    qemu_argv,
    stable_mac,
)

GOLDEN = Path(__file__).parent / "golden" / "qemu"
CASES = sorted(path.stem for path in GOLDEN.glob("*.json"))


def context_from_json(raw: dict[str, Any]) -> NodeContext:
    """The golden files' node context: plain JSON for what NodeContext holds."""
    ovmf = raw.get("ovmf")
    return NodeContext(
        workdir=Path(raw["workdir"]),
        accel=Accelerator(raw["accel"]),
        volumes={
            name: LocalVolume(Path(v["path"]), DiskFormat(v["format"]))
            for name, v in raw.get("volumes", {}).items()
        },
        taps=raw.get("taps", {}),
        host_ports=raw.get("hostPorts", {}),
        host_address=raw.get("hostAddress", "127.0.0.1"),
        ovmf=None
        if ovmf is None
        else OvmfFiles(
            code=Path(ovmf["code"]),
            vars_template=Path(ovmf["varsTemplate"]),
            secure_code=Path(ovmf["secureCode"]) if "secureCode" in ovmf else None,
            secure_vars_template=Path(ovmf["secureVarsTemplate"])
            if "secureVarsTemplate" in ovmf
            else None,
        ),
        run_as=raw.get("runAs"),
        default_disk_cache=DiskCache(raw.get("defaultDiskCache", "none")),
    )


def load_case(case: str) -> tuple[dict[str, Any], NodeContext]:
    raw = json.loads((GOLDEN / f"{case}.json").read_text())
    return raw["vmi"], context_from_json(raw["ctx"])


def test_there_are_golden_cases() -> None:
    assert len(CASES) >= 4


@pytest.mark.parametrize("case", CASES)
def test_golden_argv(case: str) -> None:
    vmi, ctx = load_case(case)
    actual = qemu_argv(domain_from_vmi(vmi, ctx=ctx))
    expected_file = GOLDEN / f"{case}.argv"
    if os.environ.get("VMO_UPDATE_GOLDEN") == "1":
        expected_file.write_text("\n".join(actual) + "\n")
    assert expected_file.exists(), f"no golden file; run with VMO_UPDATE_GOLDEN=1 to create {case}"
    expected = expected_file.read_text().splitlines()
    assert actual == expected


def test_argv_is_deterministic() -> None:
    vmi, ctx = load_case("full-devices")
    assert qemu_argv(domain_from_vmi(vmi, ctx=ctx)) == qemu_argv(domain_from_vmi(vmi, ctx=ctx))


def base_vmi() -> dict[str, Any]:
    vmi, _ = load_case("minimal-masquerade")
    return copy.deepcopy(vmi)


def base_ctx(**changes: Any) -> NodeContext:
    _, ctx = load_case("minimal-masquerade")
    return NodeContext(**{**ctx.__dict__, **changes})


def argv_for(vmi: dict[str, Any], ctx: NodeContext | None = None) -> list[str]:
    return qemu_argv(domain_from_vmi(vmi, ctx=ctx or base_ctx()))


def option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == flag]


def test_host_model_is_max_under_tcg_and_host_under_kvm() -> None:
    assert option(argv_for(base_vmi()), "-cpu") == ["max"]
    assert option(argv_for(base_vmi(), base_ctx(accel=Accelerator.KVM)), "-cpu") == ["host"]


def test_masquerade_uses_kubevirt_addresses() -> None:
    (netdev,) = option(argv_for(base_vmi()), "-netdev")
    assert "net=10.0.2.0/24,host=10.0.2.1,dhcpstart=10.0.2.2,dns=10.0.2.3" in netdev


def test_mac_is_stable_and_locally_administered() -> None:
    mac = stable_mac("6f1c5a0e-2b7d-4c8e-9a51-0d3f7b2e4c11", "default")
    assert mac == stable_mac("6f1c5a0e-2b7d-4c8e-9a51-0d3f7b2e4c11", "default")
    assert mac != stable_mac("another-uid", "default")
    assert mac.startswith("52:54:00:")
    assert f"mac={mac}" in " ".join(option(argv_for(base_vmi()), "-device"))


def test_memory_guest_wins_over_requests() -> None:
    vmi = base_vmi()
    vmi["spec"]["domain"]["memory"] = {"guest": "1Gi"}
    assert option(argv_for(vmi), "-m") == ["1024M"]


def test_no_shell_and_no_defaults() -> None:
    argv = argv_for(base_vmi())
    assert argv[0] == "qemu-system-x86_64"
    assert "-nodefaults" in argv and "-no-user-config" in argv
    assert option(argv, "-msg") == ["timestamp=on"]


def test_start_strategy_paused_starts_qemu_stopped_but_never_a_migration_target() -> None:
    assert "-S" not in argv_for(base_vmi())
    vmi = base_vmi()
    vmi["spec"]["startStrategy"] = "Paused"
    assert "-S" in argv_for(vmi)
    # a target runs as its source does once the state has come over: no -S, whatever the spec
    target = argv_for(vmi, base_ctx(incoming="defer"))
    assert "-S" not in target and option(target, "-incoming") == ["defer"]


def test_kernel_boot_is_passed_through(tmp_path: Path) -> None:
    domain = Domain(
        name="kernel-test",
        uuid=uuid.UUID(int=7),
        paths=RuntimePaths.under(tmp_path),
        kernel_boot=KernelBoot(Path("/boot/vmlinuz"), Path("/boot/initrd.img"), "console=ttyS0"),
    )
    argv = qemu_argv(domain)
    assert option(argv, "-kernel") == ["/boot/vmlinuz"]
    assert option(argv, "-initrd") == ["/boot/initrd.img"]
    assert option(argv, "-append") == ["console=ttyS0"]


def test_runas_relaxes_only_the_privilege_filter(tmp_path: Path) -> None:
    domain = Domain(name="a", uuid=uuid.UUID(int=1), paths=RuntimePaths.under(tmp_path))
    sandboxed = option(qemu_argv(domain), "-sandbox")[0]
    assert "elevateprivileges=deny" in sandboxed and "spawn=deny" in sandboxed
    runas = qemu_argv(Domain(**{**domain.__dict__, "run_as": "nobody"}))
    assert option(runas, "-runas") == ["nobody"]
    assert "elevateprivileges=allow" in option(runas, "-sandbox")[0]


def test_domain_rejects_virtio_cdrom() -> None:
    with pytest.raises(ValueError, match="virtio cdrom"):
        Disk("cd", Path("/x.iso"), DiskFormat.RAW, DiskBus.VIRTIO, cdrom=True)


def test_domain_rejects_socket_paths_too_long_for_unix_sockets() -> None:
    with pytest.raises(ValueError, match="too long"):
        RuntimePaths.under(Path("/" + "d" * 120))


def test_domain_rejects_host_passthrough_under_tcg(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="host-passthrough"):
        Domain(
            name="a",
            uuid=uuid.UUID(int=1),
            paths=RuntimePaths.under(tmp_path),
            cpu=CpuTopology(model="host-passthrough"),
        )


def _set(obj: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        obj = obj[int(key)] if key.isdigit() else obj.setdefault(key, {})  # type: ignore[index]
    obj[last] = value


# (dotted path in the VMI to set, value, field the error must name)
REFUSALS = [
    (
        "spec.domain.devices.gpus",
        [{"name": "g", "deviceName": "nvidia"}],
        "spec.domain.devices.gpus",
    ),
    ("spec.domain.cpu.dedicatedCpuPlacement", True, "spec.domain.cpu.dedicatedCpuPlacement"),
    ("spec.domain.memory.hugepages", {"pageSize": "2Mi"}, "spec.domain.memory.hugepages"),
    ("spec.domain.machine.type", "pc-i440fx-7.2", "spec.domain.machine.type"),
    ("spec.domain.devices.disks.0.disk", {"bus": "usb"}, "spec.domain.devices.disks[0].disk.bus"),
    ("spec.domain.devices.disks.0.lun", {}, "spec.domain.devices.disks[0].lun"),
    ("spec.domain.devices.disks.0.cache", "bogus", "spec.domain.devices.disks[0].cache"),
    ("spec.domain.devices.interfaces.0.model", "igb", "spec.domain.devices.interfaces[0].model"),
    ("spec.domain.devices.interfaces.0.sriov", {}, "spec.domain.devices.interfaces[0]"),
    ("spec.domain.features.acpi", {"enabled": False}, "spec.domain.features.acpi.enabled"),
    ("spec.domain.features.hyperv", {"relaxed": {}}, "spec.domain.features.hyperv"),
    ("spec.domain.firmware.bootloader", {"efi": {}}, "spec.domain.firmware.bootloader.efi"),
    ("spec.domain.firmware.kernelBoot", {"kernelArgs": "x"}, "spec.domain.firmware.kernelBoot"),
    ("spec.domain.cpu.model", "host-passthrough", "spec.domain.cpu.model"),
    ("spec.domain.resources.requests.memory", "lots", "spec.domain.resources.requests.memory"),
    ("spec.domain.launchSecurity", {"sev": {}}, "spec.domain.launchSecurity"),
    ("spec.domain.clock.timezone", "Europe/Paris", "spec.domain.clock.timezone"),
]


@pytest.mark.parametrize(("path", "value", "field"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_unsupported_fields_are_refused_by_name(path: str, value: Any, field: str) -> None:
    vmi = base_vmi()
    _set(vmi, path, value)
    with pytest.raises(UnsupportedSpec) as caught:
        domain_from_vmi(vmi, ctx=base_ctx())
    assert caught.value.field == field


def test_empty_values_of_unknown_fields_are_accepted() -> None:
    vmi = base_vmi()
    vmi["spec"]["domain"]["devices"]["gpus"] = []
    vmi["spec"]["domain"]["devices"]["hostDevices"] = []
    assert argv_for(vmi)


def test_pod_network_with_bridge_binding_gets_user_networking() -> None:
    """KubeVirt's default interface (bridge on the pod network) runs; it is only refused for
    live migration (vmo.api.kubevirt.migratable)."""
    vmi = base_vmi()
    vmi["spec"]["domain"]["devices"]["interfaces"] = [{"name": "default", "bridge": {}}]
    argv = argv_for(vmi, base_ctx())
    assert any(a.startswith("user,id=netdev0,net=10.0.2.0/24") for a in argv)


def test_multus_network_without_a_tap_is_refused() -> None:
    vmi = base_vmi()
    vmi["spec"]["domain"]["devices"]["interfaces"] = [{"name": "sec", "bridge": {}}]
    vmi["spec"]["networks"] = [{"name": "sec", "multus": {"networkName": "ns/nad"}}]
    with pytest.raises(UnsupportedSpec) as caught:
        domain_from_vmi(vmi, ctx=base_ctx())
    assert caught.value.field == "spec.networks[0].multus.networkName"
    argv = argv_for(vmi, base_ctx(taps={"sec": "vmotap0"}))
    assert "tap,id=netdev0,ifname=vmotap0,script=no,downscript=no" in argv


def test_volume_without_a_local_file_is_refused() -> None:
    with pytest.raises(UnsupportedSpec) as caught:
        domain_from_vmi(base_vmi(), ctx=base_ctx(volumes={}))
    assert caught.value.field == "spec.volumes[0]"


def test_disk_without_a_volume_is_refused() -> None:
    vmi = base_vmi()
    vmi["spec"]["volumes"] = []
    with pytest.raises(UnsupportedSpec) as caught:
        domain_from_vmi(vmi, ctx=base_ctx())
    assert caught.value.field == "spec.domain.devices.disks[0].name"


def test_volumes_may_be_resolved_by_a_callable() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    def resolve(name: str, volume: dict[str, Any]) -> LocalVolume:
        seen.append((name, volume))
        return LocalVolume(Path(f"/images/{name}.qcow2"), DiskFormat.QCOW2)

    argv = argv_for(base_vmi(), base_ctx(volumes=resolve))
    assert seen[0][0] == "rootdisk" and "containerDisk" in seen[0][1]
    assert any('"filename":"/images/rootdisk.qcow2"' in arg for arg in argv)


def test_forwarded_port_without_a_host_port_is_refused() -> None:
    vmi = base_vmi()
    vmi["spec"]["domain"]["devices"]["interfaces"][0]["ports"] = [{"port": 80}]
    with pytest.raises(UnsupportedSpec) as caught:
        domain_from_vmi(vmi, ctx=base_ctx())
    assert caught.value.field == "spec.domain.devices.interfaces[0].ports[0]"


def test_efi_without_ovmf_is_refused_and_secure_boot_is_the_default() -> None:
    vmi, ctx = load_case("efi-secureboot")
    domain = domain_from_vmi(vmi, ctx=ctx)
    assert domain.efi is not None and domain.efi.secure_boot
    with pytest.raises(UnsupportedSpec) as caught:
        domain_from_vmi(vmi, ctx=NodeContext(**{**ctx.__dict__, "ovmf": None}))
    assert caught.value.field == "spec.domain.firmware.bootloader.efi"
