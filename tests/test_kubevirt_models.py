"""VMO's KubeVirt-family models against upstream's published schemas (the conformance oracle).

- every example validates against upstream's schema, strictly, as written and after VMO's defaults;
- VMO's own schema accepts the examples and refuses unsupported upstream fields by name;
- every field VMO's schema declares exists upstream at the same path (VMO invents no fields);
- every upstream field in the parts VMO models is declared (supported, or refused with a reason);
- semantic admission rules of VMs and VMIs, with field paths.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.conftest import SCHEMAS
from vmo.api.kubevirt import (
    default_vm,
    default_vmi,
    firmware_uuid,
    kubevirt_resource_types,
    validate_vm,
    validate_vmi,
    vm_warnings,
)
from vmo.api.types import Cause, ResourceType, Validator

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

KUBEVIRT = SCHEMAS / "kubevirt-v1.9.0"
CDI = SCHEMAS / "cdi-v1.66.0"
PRESERVE = "x-kubernetes-preserve-unknown-fields"
UNSUPPORTED = "x-vmo-unsupported"
JSON = dict[str, Any]

# kind -> upstream schema file (KubeVirt files hold the bare openAPIV3Schema; others are CRDs)
UPSTREAM_FILES = {
    "VirtualMachine": KUBEVIRT / "virtualmachine.yaml",
    "VirtualMachineInstance": KUBEVIRT / "virtualmachineinstance.yaml",
    "VirtualMachineInstanceMigration": KUBEVIRT / "virtualmachineinstancemigration.yaml",
    "VirtualMachineInstanceReplicaSet": KUBEVIRT / "virtualmachineinstancereplicaset.yaml",
    "VirtualMachineInstancePreset": KUBEVIRT / "virtualmachineinstancepreset.yaml",
    "KubeVirt": KUBEVIRT / "kubevirt.yaml",
    "VirtualMachineInstancetype": KUBEVIRT / "virtualmachineinstancetype.yaml",
    "VirtualMachineClusterInstancetype": KUBEVIRT / "virtualmachineclusterinstancetype.yaml",
    "VirtualMachinePreference": KUBEVIRT / "virtualmachinepreference.yaml",
    "VirtualMachineClusterPreference": KUBEVIRT / "virtualmachineclusterpreference.yaml",
    "VirtualMachineSnapshot": KUBEVIRT / "virtualmachinesnapshot.yaml",
    "VirtualMachineSnapshotContent": KUBEVIRT / "virtualmachinesnapshotcontent.yaml",
    "VirtualMachineRestore": KUBEVIRT / "virtualmachinerestore.yaml",
    "VirtualMachineClone": KUBEVIRT / "virtualmachineclone.yaml",
    "VirtualMachineExport": KUBEVIRT / "virtualmachineexport.yaml",
    "MigrationPolicy": KUBEVIRT / "migrationpolicy.yaml",
    "VirtualMachineBackup": KUBEVIRT / "virtualmachinebackup.yaml",
    "VirtualMachineBackupTracker": KUBEVIRT / "virtualmachinebackuptracker.yaml",
    "DataVolume": CDI / "datavolume.yaml",
    "DataSource": CDI / "datasource.yaml",
    "NetworkAttachmentDefinition": SCHEMAS / "network" / "network-attachment-definition-crd.yaml",
}
CRD_FILES = {kind: path for kind, path in UPSTREAM_FILES.items() if "kubevirt-v" not in str(path)}
DEFAULTERS: dict[str, Callable[[JSON], None]] = {
    "VirtualMachine": default_vm,
    "VirtualMachineInstance": default_vmi,
}


# ---------------------------------------------------------------- helpers


@functools.cache
def upstream_document(kind: str) -> JSON:
    document: JSON = yaml.safe_load(UPSTREAM_FILES[kind].read_text())
    return document


@functools.cache
def upstream_schema(kind: str) -> JSON:
    document = upstream_document(kind)
    if "openAPIV3Schema" in document:
        schema: JSON = document["openAPIV3Schema"]
        return schema
    storage = next(v for v in document["spec"]["versions"] if v.get("storage"))
    schema = storage["schema"]["openAPIV3Schema"]
    return schema


def strict(node: Any) -> Any:
    """Draft 7 form of a structural schema: unknown fields refused, VMO's marker -> refuse all."""
    if isinstance(node, list):
        return [strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    if UNSUPPORTED in node:
        return {"not": {}}
    out = {key: strict(value) for key, value in node.items() if key != "properties"}
    if "properties" in node:
        out["properties"] = {name: strict(child) for name, child in node["properties"].items()}
        if not node.get(PRESERVE) and "additionalProperties" not in node:
            out["additionalProperties"] = False
    return out


@functools.cache
def resource_types() -> dict[str, ResourceType]:
    return {rt.kind: rt for rt in kubevirt_resource_types()}


def vmo_schema(kind: str) -> JSON:
    schema = resource_types()[kind].schema
    assert schema is not None
    return schema


def examples() -> Iterator[tuple[str, JSON]]:
    kinds = set(UPSTREAM_FILES)
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            if isinstance(document, dict) and document.get("kind") in kinds:
                yield f"{path.name}#{index}", document


EXAMPLE_LIST = list(examples())
EXAMPLE_IDS = [name for name, _ in EXAMPLE_LIST]


def upstream_errors(obj: JSON) -> list[str]:
    schema = strict(upstream_schema(obj["kind"]))
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(obj)
    ]


def vmo_draft7_errors(obj: JSON) -> list[str]:
    validator = jsonschema.Draft7Validator(strict(vmo_schema(obj["kind"])))
    return [".".join(map(str, e.absolute_path)) for e in validator.iter_errors(obj)]


def defaulted(obj: JSON) -> JSON:
    out = copy.deepcopy(obj)
    defaulter = DEFAULTERS.get(out["kind"])
    if defaulter is not None:
        defaulter(out)
    return out


def fields(causes: list[Cause]) -> list[str]:
    return [cause.field for cause in causes]


def load_example(name: str, index: int = 0) -> JSON:
    documents = list(yaml.safe_load_all((EXAMPLES / name).read_text()))
    document: JSON = documents[index]
    return document


def schema_module() -> Any:
    """``vmo.api.schema``, VMO's own validator."""
    import vmo.api.schema as module

    return module


# ---------------------------------------------------------------- (a) upstream conformance


def test_examples_cover_the_main_kinds() -> None:
    kinds = {document["kind"] for _, document in EXAMPLE_LIST}
    assert {
        "VirtualMachine",
        "VirtualMachineInstance",
        "VirtualMachineInstanceMigration",
        "VirtualMachineSnapshot",
        "VirtualMachineRestore",
        "VirtualMachineClone",
        "VirtualMachineExport",
        "DataVolume",
        "DataSource",
        "NetworkAttachmentDefinition",
        "MigrationPolicy",
        "KubeVirt",
    } <= kinds


@pytest.mark.parametrize(("name", "obj"), EXAMPLE_LIST, ids=EXAMPLE_IDS)
def test_example_is_valid_upstream(name: str, obj: JSON) -> None:
    assert upstream_errors(obj) == []


@pytest.mark.parametrize(("name", "obj"), EXAMPLE_LIST, ids=EXAMPLE_IDS)
def test_example_stays_valid_upstream_after_vmo_defaults(name: str, obj: JSON) -> None:
    assert upstream_errors(defaulted(obj)) == []


def test_strict_upstream_check_refuses_an_unknown_field() -> None:
    vm = load_example("vm-fedora-masquerade.yaml")
    vm["spec"]["template"]["spec"]["domain"]["cpu"]["coresPerSocket"] = 2
    assert upstream_errors(vm)


# ---------------------------------------------------------------- (b) VMO's own schema


@pytest.mark.parametrize(("name", "obj"), EXAMPLE_LIST, ids=EXAMPLE_IDS)
def test_example_is_valid_for_vmo_schema(name: str, obj: JSON) -> None:
    assert vmo_draft7_errors(obj) == []
    assert vmo_draft7_errors(defaulted(obj)) == []


@pytest.mark.parametrize(("name", "obj"), EXAMPLE_LIST, ids=EXAMPLE_IDS)
def test_example_is_valid_for_vmo_schema_module(name: str, obj: JSON) -> None:
    schema = schema_module()
    for candidate in (obj, defaulted(obj)):
        assert schema.validate(vmo_schema(obj["kind"]), candidate) == []


def semantic_validator(kind: str) -> Validator | None:
    return resource_types()[kind].validate


SEMANTIC_EXAMPLES = [(n, o) for n, o in EXAMPLE_LIST if semantic_validator(o["kind"]) is not None]
# Kinds VMO admits on their schema alone (no semantic rules); an example of any other kind must
# pass its kind's semantic validation below. A kind that gains rules leaves this list.
SCHEMA_ONLY_KINDS = {
    "DataSource",
    "KubeVirt",
    "VirtualMachineClusterPreference",
    "VirtualMachinePreference",
}


@pytest.mark.parametrize(("name", "obj"), SEMANTIC_EXAMPLES, ids=[n for n, _ in SEMANTIC_EXAMPLES])
def test_example_passes_semantic_validation(name: str, obj: JSON) -> None:
    validate = semantic_validator(obj["kind"])
    assert validate is not None
    assert validate(obj, None) == []
    assert validate(defaulted(obj), None) == []


def test_only_the_listed_kinds_have_examples_without_semantic_validation() -> None:
    unchecked = {o["kind"] for _, o in EXAMPLE_LIST if semantic_validator(o["kind"]) is None}
    assert unchecked == SCHEMA_ONLY_KINDS


# ---------------------------------------------------------------- (c) refusals name fields


def with_gpu(vm: JSON) -> JSON:
    vm = copy.deepcopy(vm)
    devices = vm["spec"]["template"]["spec"]["domain"]["devices"]
    devices["gpus"] = [{"name": "gpu1", "deviceName": "nvidia.com/TU104GL_Tesla_T4"}]
    return vm


def test_unsupported_upstream_field_is_valid_upstream_but_refused_by_vmo() -> None:
    vm = with_gpu(load_example("vm-fedora-masquerade.yaml"))
    assert upstream_errors(vm) == []
    assert vmo_draft7_errors(vm) == ["spec.template.spec.domain.devices.gpus"]


def test_unsupported_field_refusal_names_field_and_reason() -> None:
    schema = schema_module()
    vm = with_gpu(load_example("vm-fedora-masquerade.yaml"))
    causes = schema.validate(vmo_schema("VirtualMachine"), vm)
    assert [c.field for c in causes] == ["spec.template.spec.domain.devices.gpus"]
    assert "passthrough" in causes[0].message


def test_unknown_field_refusal_names_field() -> None:
    schema = schema_module()
    vm = load_example("vm-fedora-masquerade.yaml")
    vm["spec"]["template"]["spec"]["domain"]["cpu"]["coresPerSocket"] = 2
    causes = schema.validate(vmo_schema("VirtualMachine"), vm)
    assert any("spec.template.spec.domain.cpu.coresPerSocket" in c.field for c in causes)


def test_start_strategy_paused_is_accepted_and_nothing_else() -> None:
    vm = load_example("vm-fedora-masquerade.yaml")
    vm["spec"]["template"]["spec"]["startStrategy"] = "Paused"
    assert upstream_errors(vm) == [] and vmo_draft7_errors(vm) == []
    vm["spec"]["template"]["spec"]["startStrategy"] = "Later"
    assert vmo_draft7_errors(vm) == ["spec.template.spec.startStrategy"]


def test_passt_binding_is_refused_with_reason() -> None:
    vm = load_example("vm-fedora-masquerade.yaml")
    iface = vm["spec"]["template"]["spec"]["domain"]["devices"]["interfaces"][0]
    del iface["masquerade"]
    iface["passtBinding"] = {}
    assert upstream_errors(vm) == []
    assert vmo_draft7_errors(vm) == ["spec.template.spec.domain.devices.interfaces.0.passtBinding"]


# ---------------------------------------------------------------- (d) no invented fields


def undeclared_upstream(vmo: JSON, upstream: JSON, path: str) -> Iterator[str]:
    """Paths VMO's schema declares that upstream's does not (or with another type)."""
    if upstream.get(PRESERVE) or UNSUPPORTED in vmo:
        return
    if "type" in vmo and "type" in upstream and vmo["type"] != upstream["type"]:
        yield f"{path}: type {vmo['type']} vs upstream {upstream['type']}"
    upstream_properties = upstream.get("properties", {})
    for name, child in vmo.get("properties", {}).items():
        if name not in upstream_properties:
            yield f"{path}.{name}"
        else:
            yield from undeclared_upstream(child, upstream_properties[name], f"{path}.{name}")
    if "items" in vmo:
        yield from undeclared_upstream(vmo["items"], upstream.get("items", {}), f"{path}[]")
    if isinstance(vmo.get("additionalProperties"), dict):
        up = upstream.get("additionalProperties")
        if not isinstance(up, dict):
            yield f"{path}.*"
        else:
            yield from undeclared_upstream(vmo["additionalProperties"], up, f"{path}.*")


def unsupported_nodes_exist_upstream(vmo: JSON, upstream: JSON, path: str) -> Iterator[str]:
    """Fields VMO refuses as unsupported must be real upstream fields too."""
    upstream_properties = upstream.get("properties", {})
    for name, child in vmo.get("properties", {}).items():
        if UNSUPPORTED in child and name not in upstream_properties and not upstream.get(PRESERVE):
            yield f"{path}.{name}"
        elif name in upstream_properties:
            yield from unsupported_nodes_exist_upstream(
                child, upstream_properties[name], f"{path}.{name}"
            )
    if "items" in vmo:
        yield from unsupported_nodes_exist_upstream(
            vmo["items"], upstream.get("items", {}), f"{path}[]"
        )


@pytest.mark.parametrize("kind", sorted(UPSTREAM_FILES))
def test_vmo_declares_no_field_upstream_lacks(kind: str) -> None:
    assert list(undeclared_upstream(vmo_schema(kind), upstream_schema(kind), kind)) == []


def test_invented_field_would_be_caught() -> None:
    schema = copy.deepcopy(vmo_schema("VirtualMachine"))
    schema["properties"]["spec"]["properties"]["autostart"] = {"type": "boolean"}
    found = list(undeclared_upstream(schema, upstream_schema("VirtualMachine"), "vm"))
    assert found == ["vm.spec.autostart"]


@pytest.mark.parametrize("kind", ["VirtualMachine", "VirtualMachineInstance"])
def test_vmo_refuses_only_real_upstream_fields(kind: str) -> None:
    nodes = unsupported_nodes_exist_upstream(vmo_schema(kind), upstream_schema(kind), kind)
    assert list(nodes) == []


# ---------------------------------------------------------------- coverage: refuse by reason


def undeclared_in_vmo(vmo: JSON, upstream: JSON, path: str) -> Iterator[str]:
    """Upstream fields in an object VMO models that VMO neither supports nor refuses by reason."""
    if vmo.get(PRESERVE) or UNSUPPORTED in vmo or "properties" not in vmo:
        return
    properties = vmo["properties"]
    for name, child in upstream.get("properties", {}).items():
        if name not in properties:
            yield f"{path}.{name}"
        else:
            yield from undeclared_in_vmo(properties[name], child, f"{path}.{name}")
    if "items" in vmo and "items" in upstream:
        yield from undeclared_in_vmo(vmo["items"], upstream["items"], f"{path}[]")


@pytest.mark.parametrize("kind", sorted(UPSTREAM_FILES))
def test_every_upstream_spec_field_is_supported_or_refused_with_reason(kind: str) -> None:
    vmo, upstream = vmo_schema(kind), upstream_schema(kind)
    missing = list(
        undeclared_in_vmo(vmo["properties"]["spec"], upstream["properties"]["spec"], "spec")
    )
    assert missing == []


# ---------------------------------------------------------------- API coordinates


def test_served_kinds_are_unique_and_all_have_upstream_schemas() -> None:
    kinds = [rt.kind for rt in kubevirt_resource_types()]
    assert len(kinds) == len(set(kinds))
    assert set(kinds) == set(UPSTREAM_FILES)


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_crd_names_scope_and_columns_match_upstream(kind: str) -> None:
    spec = upstream_document(kind)["spec"]
    rt = resource_types()[kind]
    version = next(v for v in spec["versions"] if v.get("storage"))
    names = spec["names"]
    assert (rt.group, rt.version) == (spec["group"], version["name"])
    assert (rt.plural, rt.singular) == (names["plural"], names["singular"])
    assert set(rt.short_names) == set(names.get("shortNames", []))
    assert rt.categories == tuple(names.get("categories", []))
    assert rt.namespaced == (spec["scope"] == "Namespaced")
    assert ("status" in rt.subresources) == ("status" in (version.get("subresources") or {}))
    columns = [
        (c["name"], c["type"], c["jsonPath"], c.get("description", ""))
        for c in version.get("additionalPrinterColumns", [])
    ]
    assert [(c.name, c.type, c.json_path, c.description) for c in rt.printer_columns] == columns


def test_virtual_machine_columns_and_names() -> None:
    rt = resource_types()["VirtualMachine"]
    assert [(c.name, c.json_path) for c in rt.printer_columns] == [
        ("Age", ".metadata.creationTimestamp"),
        ("Status", ".status.printableStatus"),
        ("Ready", ".status.conditions[?(@.type=='Ready')].status"),
    ]
    assert (rt.short_names, rt.categories, rt.subresources) == (
        ("vm", "vms"),
        ("all",),
        ("status",),
    )


def test_vmi_columns_hide_migratable_and_paused_by_default() -> None:
    rt = resource_types()["VirtualMachineInstance"]
    assert [(c.name, c.priority) for c in rt.printer_columns] == [
        ("Age", 0),
        ("Phase", 0),
        ("IP", 0),
        ("NodeName", 0),
        ("Ready", 0),
        ("Live-Migratable", 1),
        ("Paused", 1),
    ]


@pytest.mark.parametrize(
    ("kind", "namespaced", "short"),
    [
        ("KubeVirt", True, ("kv", "kvs")),
        ("VirtualMachineInstanceMigration", True, ("vmim", "vmims")),
        (
            "VirtualMachineClusterInstancetype",
            False,
            ("vmclusterinstancetype", "vmclusterinstancetypes", "vmcf", "vmcfs"),
        ),
        ("VirtualMachineClusterPreference", False, ("vmcp", "vmcps")),
        ("MigrationPolicy", False, ()),
        ("VirtualMachineClone", True, ("vmclone", "vmclones")),
        ("VirtualMachineExport", True, ("vmexport", "vmexports")),
    ],
)
def test_scope_and_short_names(kind: str, namespaced: bool, short: tuple[str, ...]) -> None:
    rt = resource_types()[kind]
    assert (rt.namespaced, rt.short_names) == (namespaced, short)


# ---------------------------------------------------------------- defaults


def test_vm_defaults_machine_type_architecture_and_stable_firmware_uuid() -> None:
    vm = defaulted(load_example("vm-fedora-masquerade.yaml"))
    spec = vm["spec"]["template"]["spec"]
    assert spec["architecture"] == "amd64"
    assert spec["domain"]["machine"] == {"type": "q35"}
    assert spec["domain"]["firmware"]["uuid"] == firmware_uuid("fedora")


def test_firmware_uuid_is_kubevirts_name_derived_uuid() -> None:
    # KubeVirt: UUID v5 (SHA-1) of the VM name in namespace 6a1a24a1-4061-4607-8bf4-a3963d0c5895
    assert firmware_uuid("testvm") == firmware_uuid("testvm")
    assert firmware_uuid("testvm") != firmware_uuid("testvm2")
    assert firmware_uuid("testvm")[14] == "5"


def test_vm_defaults_keep_a_given_firmware_uuid_and_machine() -> None:
    vm = defaulted(load_example("vm-multus-bridge-vsphere-mac.yaml"))
    domain = vm["spec"]["template"]["spec"]["domain"]
    assert domain["firmware"]["uuid"] == "4216a9f2-8b0e-5c5d-1f3a-6e2b9c0d7a41"


def test_vm_defaults_instancetype_and_preference_kinds_to_cluster_kinds() -> None:
    vm = defaulted(load_example("vm-instancetype-containerdisk.yaml"))
    assert vm["spec"]["instancetype"]["kind"] == "virtualmachineclusterinstancetype"
    assert vm["spec"]["preference"]["kind"] == "virtualmachineclusterpreference"


def bare_vmi(**spec: Any) -> JSON:
    base: JSON = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": "bare", "namespace": "default"},
        "spec": {"domain": {"devices": {}, "resources": {"requests": {"memory": "1Gi"}}}},
    }
    base["spec"].update(spec)
    return base


def test_vmi_without_interfaces_gets_bridge_on_pod_network() -> None:
    vmi = defaulted(bare_vmi())
    assert vmi["spec"]["domain"]["devices"]["interfaces"] == [{"name": "default", "bridge": {}}]
    assert vmi["spec"]["networks"] == [{"name": "default", "pod": {}}]
    assert upstream_errors(vmi) == []


def test_vmi_defaults_topology_memory_model_and_disk_for_each_volume() -> None:
    vmi = bare_vmi(volumes=[{"name": "boot", "containerDisk": {"image": "quay.io/x/y"}}])
    vmi["spec"]["domain"]["resources"]["limits"] = {"cpu": "1500m"}
    vmi = defaulted(vmi)
    domain = vmi["spec"]["domain"]
    assert domain["cpu"] == {"sockets": 2, "cores": 1, "threads": 1, "model": "host-model"}
    assert domain["memory"] == {"guest": "1Gi"}
    assert domain["resources"]["requests"] == {"memory": "1Gi", "cpu": "1500m"}
    assert domain["devices"]["disks"] == [{"name": "boot", "disk": {"bus": "sata"}}]
    assert vmi["spec"]["volumes"][0]["containerDisk"]["imagePullPolicy"] == "Always"
    assert vmi["status"]["memory"]["guestAtBoot"] == "1Gi"
    assert upstream_errors(vmi) == []
    assert vmo_draft7_errors(vmi) == []


def test_vmi_cdrom_defaults_read_only_closed_tray() -> None:
    vmi = defaulted(load_example("vm-vmi-cirros.yaml"))
    cdrom = vmi["spec"]["domain"]["devices"]["disks"][1]["cdrom"]
    assert cdrom == {"bus": "sata", "readonly": True, "tray": "closed"}


def test_defaults_are_idempotent() -> None:
    once = defaulted(load_example("vm-vmi-cirros.yaml"))
    assert defaulted(once) == once


# ---------------------------------------------------------------- semantic validation


def fedora() -> JSON:
    return load_example("vm-fedora-masquerade.yaml")


def template(vm: JSON) -> JSON:
    spec: JSON = vm["spec"]["template"]["spec"]
    return spec


def test_running_is_deprecated_warning_only() -> None:
    vm = fedora()
    del vm["spec"]["runStrategy"]
    vm["spec"]["running"] = True
    assert validate_vm(vm, None) == []
    assert vm_warnings(vm) == ["spec.running is deprecated; use spec.runStrategy instead"]


def test_running_and_run_strategy_together_are_refused() -> None:
    vm = fedora()
    vm["spec"]["running"] = True
    assert fields(validate_vm(vm, None)) == ["spec.running"]


def test_run_strategy_or_running_is_required() -> None:
    vm = fedora()
    del vm["spec"]["runStrategy"]
    assert fields(validate_vm(vm, None)) == ["spec.runStrategy"]


def test_disk_naming_no_volume_is_refused() -> None:
    vm = fedora()
    template(vm)["domain"]["devices"]["disks"][1]["name"] = "missing"
    assert "spec.template.spec.domain.devices.disks[1].name" in fields(validate_vm(vm, None))


def test_volume_backing_two_disks_is_refused() -> None:
    vm = fedora()
    disks = template(vm)["domain"]["devices"]["disks"]
    disks.append({"name": "root", "cdrom": {}})
    causes = validate_vm(vm, None)
    assert fields(causes) == ["spec.template.spec.domain.devices.disks[2].name"]
    assert causes[0].reason == "FieldValueDuplicate"


def test_duplicate_volume_names_are_refused() -> None:
    vm = fedora()
    template(vm)["volumes"].append({"name": "root", "emptyDisk": {"capacity": "1Gi"}})
    assert fields(validate_vm(vm, None)) == ["spec.template.spec.volumes[2].name"]


def test_interface_without_network_is_refused() -> None:
    vm = fedora()
    template(vm)["domain"]["devices"]["interfaces"].append({"name": "lan", "bridge": {}})
    assert fields(validate_vm(vm, None)) == ["spec.template.spec.domain.devices.interfaces[1].name"]


def test_network_without_interface_is_refused() -> None:
    vm = fedora()
    template(vm)["networks"].append({"name": "lan", "multus": {"networkName": "vlan120"}})
    assert fields(validate_vm(vm, None)) == ["spec.template.spec.networks[1].name"]


def test_masquerade_on_multus_network_is_refused() -> None:
    vm = load_example("vm-multus-bridge-vsphere-mac.yaml")
    iface = template(vm)["domain"]["devices"]["interfaces"][0]
    del iface["bridge"]
    iface["masquerade"] = {}
    causes = validate_vm(vm, None)
    assert fields(causes) == ["spec.template.spec.domain.devices.interfaces[0].masquerade"]


def test_bridge_on_pod_network_is_accepted() -> None:
    vm = fedora()
    iface = template(vm)["domain"]["devices"]["interfaces"][0]
    del iface["masquerade"], iface["ports"]
    iface["bridge"] = {}
    assert validate_vm(vm, None) == []


def test_pod_network_used_twice_is_refused() -> None:
    vm = fedora()
    template(vm)["domain"]["devices"]["interfaces"].append({"name": "second", "masquerade": {}})
    template(vm)["networks"].append({"name": "second", "pod": {}})
    assert fields(validate_vm(vm, None)) == ["spec.template.spec.networks[1].pod"]


@pytest.mark.parametrize(
    "mac", ["01:00:5e:00:00:01", "00:50:56:zz:1b:7c", "0050.56a3.1b7c", "00:00:00:00:00:00"]
)
def test_bad_mac_address_is_refused(mac: str) -> None:
    vm = fedora()
    template(vm)["domain"]["devices"]["interfaces"][0]["macAddress"] = mac
    assert fields(validate_vm(vm, None)) == [
        "spec.template.spec.domain.devices.interfaces[0].macAddress"
    ]


@pytest.mark.parametrize(("first", "second"), [(0, None), (1, 1), (-3, None)])
def test_bad_boot_order_is_refused(first: int, second: int | None) -> None:
    vm = fedora()
    disks = template(vm)["domain"]["devices"]["disks"]
    disks[0]["bootOrder"] = first
    if second is not None:
        disks[1]["bootOrder"] = second
    bad = 1 if second is not None else 0
    assert fields(validate_vm(vm, None)) == [
        f"spec.template.spec.domain.devices.disks[{bad}].bootOrder"
    ]


def test_guest_memory_below_floor_is_refused() -> None:
    vm = fedora()
    template(vm)["domain"]["memory"]["guest"] = "32Mi"
    template(vm)["domain"]["resources"]["requests"]["memory"] = "32Mi"
    assert fields(validate_vm(vm, None)) == ["spec.template.spec.domain.memory.guest"]


def test_guest_memory_above_limit_is_refused() -> None:
    vm = fedora()
    template(vm)["domain"]["resources"]["limits"] = {"memory": "1Gi"}
    assert "spec.template.spec.domain.memory.guest" in fields(validate_vm(vm, None))


def test_vmi_without_memory_is_refused() -> None:
    vmi = bare_vmi()
    del vmi["spec"]["domain"]["resources"]
    assert fields(validate_vmi(vmi, None)) == ["spec.domain.memory.guest"]


def test_instancetype_conflicts_with_cpu_topology() -> None:
    vm = load_example("vm-instancetype-containerdisk.yaml")
    template(vm)["domain"]["cpu"] = {"sockets": 2}
    assert fields(validate_vm(vm, None)) == ["spec.template.spec.domain.cpu.sockets"]


def test_cloud_init_with_two_user_data_sources_is_refused() -> None:
    vm = fedora()
    template(vm)["volumes"][1]["cloudInitNoCloud"]["userDataBase64"] = "I2Nsb3VkLWNvbmZpZwo="
    assert fields(validate_vm(vm, None)) == ["spec.template.spec.volumes[1].cloudInitNoCloud"]


def test_vmi_spec_is_immutable_but_status_is_not() -> None:
    old = defaulted(load_example("vm-vmi-cirros.yaml"))
    status_only = copy.deepcopy(old)
    status_only["status"]["phase"] = "Running"
    assert validate_vmi(status_only, old) == []
    changed = copy.deepcopy(old)
    changed["spec"]["domain"]["cpu"]["sockets"] = 4
    assert fields(validate_vmi(changed, old)) == ["spec"]


def test_nad_config_must_be_json() -> None:
    nad = load_example("nad-bridge-vlan.yaml")
    validate = resource_types()["NetworkAttachmentDefinition"].validate
    assert validate is not None
    nad["spec"]["config"] = "{not json"
    assert fields(validate(nad, None)) == ["spec.config"]


def test_backup_tracker_spec_is_immutable() -> None:
    tracker = load_example("vm-backup.yaml", 0)
    validate = resource_types()["VirtualMachineBackupTracker"].validate
    assert validate is not None
    changed = copy.deepcopy(tracker)
    changed["spec"]["source"]["name"] = "other"
    assert fields(validate(changed, tracker)) == ["spec"]


# ---------------------------------------------------------------- schema defaults and status


@pytest.mark.parametrize(("name", "obj"), EXAMPLE_LIST, ids=EXAMPLE_IDS)
def test_schema_defaults_stay_valid_upstream_and_for_vmo(name: str, obj: JSON) -> None:
    schema = schema_module()
    candidate = defaulted(obj)
    if "status" in vmo_schema(obj["kind"])["properties"]:
        candidate.setdefault("status", {})
    schema.apply_defaults(vmo_schema(obj["kind"]), candidate)
    assert upstream_errors(candidate) == []
    assert schema.validate(vmo_schema(obj["kind"]), candidate) == []


def test_new_vm_status_defaults_to_stopped() -> None:
    schema = schema_module()
    vm = fedora()
    vm["status"] = {}
    schema.apply_defaults(vmo_schema("VirtualMachine"), vm)
    assert vm["status"]["printableStatus"] == "Stopped"


RUNNING_VM_STATUS: JSON = {
    "printableStatus": "Running",
    "ready": True,
    "created": True,
    "runStrategy": "Always",
    "observedGeneration": 2,
    "desiredGeneration": 2,
    "conditions": [
        {"type": "Ready", "status": "True", "lastTransitionTime": "2026-08-01T10:00:00Z"},
        {"type": "RestartRequired", "status": "False", "reason": "", "message": ""},
    ],
    "volumeSnapshotStatuses": [
        {"name": "root", "enabled": True},
        {"name": "cloudinit", "enabled": False, "reason": "Snapshot is not supported"},
    ],
    "stateChangeRequests": [{"action": "Stop", "uid": "2f7c"}],
}

MIGRATING_VMI_STATUS: JSON = {
    "phase": "Running",
    "nodeName": "node-a",
    "conditions": [
        {"type": "Ready", "status": "True"},
        {"type": "LiveMigratable", "status": "True"},
        {"type": "AgentConnected", "status": "True"},
    ],
    "interfaces": [
        {
            "name": "default",
            "interfaceName": "eth0",
            "ipAddress": "10.0.2.2",
            "ipAddresses": ["10.0.2.2"],
            "mac": "02:00:00:aa:bb:cc",
            "infoSource": "domain, guest-agent",
            "queueCount": 1,
            "linkState": "up",
        }
    ],
    "migrationState": {
        "migrationUid": "e1c3",
        "sourceNode": "node-a",
        "targetNode": "node-b",
        "targetNodeAddress": "192.0.2.12",
        "startTimestamp": "2026-08-01T10:05:00Z",
        "mode": "PreCopy",
        "completed": False,
        "failed": False,
        "migrationConfiguration": {"bandwidthPerMigration": "0Mi", "allowPostCopy": False},
    },
    "migrationMethod": "LiveMigration",
    "phaseTransitionTimestamps": [
        {"phase": "Scheduled", "phaseTransitionTimestamp": "2026-08-01T10:00:00Z"},
        {"phase": "Running", "phaseTransitionTimestamp": "2026-08-01T10:00:05Z"},
    ],
    "guestOSInfo": {"id": "fedora", "name": "Fedora Linux", "versionId": "42"},
    "memory": {"guestAtBoot": "128Mi", "guestCurrent": "128Mi", "guestRequested": "128Mi"},
    "currentCPUTopology": {"sockets": 1, "cores": 1, "threads": 1},
    "qosClass": "Burstable",
}


@pytest.mark.parametrize(
    ("example", "status"),
    [
        ("vm-fedora-masquerade.yaml", RUNNING_VM_STATUS),
        ("vm-vmi-cirros.yaml", MIGRATING_VMI_STATUS),
    ],
)
def test_status_the_engine_writes_is_valid_upstream_and_for_vmo(example: str, status: JSON) -> None:
    obj = defaulted(load_example(example))
    obj["status"] = copy.deepcopy(status)
    assert upstream_errors(obj) == []
    assert vmo_draft7_errors(obj) == []


def test_status_with_a_misspelt_migration_uid_is_refused() -> None:
    vmi = defaulted(load_example("vm-vmi-cirros.yaml"))
    vmi["status"] = copy.deepcopy(MIGRATING_VMI_STATUS)
    vmi["status"]["migrationState"]["migrationUID"] = "e1c3"
    assert vmo_draft7_errors(vmi) == ["status.migrationState"]


@pytest.mark.parametrize("name", ["production/vlan/120", "VLAN120", "prod/", ""])
def test_malformed_multus_network_name_is_refused(name: str) -> None:
    vm = load_example("vm-multus-bridge-vsphere-mac.yaml")
    template(vm)["networks"][0]["multus"]["networkName"] = name
    assert "spec.template.spec.networks[0].multus.networkName" in fields(validate_vm(vm, None))


def validator(kind: str) -> Callable[[JSON, JSON | None], list[Cause]]:
    validate = resource_types()[kind].validate
    assert validate is not None
    return validate


def test_snapshot_of_something_other_than_a_vm_is_refused() -> None:
    snapshot = load_example("vm-snapshot.yaml", 0)
    snapshot["spec"]["source"]["kind"] = "VirtualMachineInstance"
    assert fields(validator("VirtualMachineSnapshot")(snapshot, None)) == ["spec.source.kind"]


def test_restore_spec_is_immutable() -> None:
    restore = load_example("vm-snapshot.yaml", 1)
    changed = copy.deepcopy(restore)
    changed["spec"]["virtualMachineSnapshotName"] = "other"
    assert fields(validator("VirtualMachineRestore")(changed, restore)) == ["spec"]


def test_clone_with_malformed_new_mac_is_refused() -> None:
    clone = load_example("vm-clone.yaml")
    clone["spec"]["newMacAddresses"]["default"] = "02:00:00:00:10"
    assert fields(validator("VirtualMachineClone")(clone, None)) == [
        "spec.newMacAddresses[default]"
    ]


def test_export_of_a_core_pvc_needs_no_api_group() -> None:
    export = load_example("vm-export.yaml")
    export["spec"]["source"] = {"kind": "PersistentVolumeClaim", "name": "fedora-root"}
    assert upstream_errors(export) == []
    assert validator("VirtualMachineExport")(export, None) == []


def test_backup_pull_mode_needs_a_token_secret() -> None:
    backup = load_example("vm-backup.yaml", 1)
    assert (
        backup["spec"]["mode"] == "Pull" and validator("VirtualMachineBackup")(backup, None) == []
    )
    del backup["spec"]["tokenSecretRef"]
    assert fields(validator("VirtualMachineBackup")(backup, None)) == ["spec.tokenSecretRef"]


MALFORMED_SPECS: list[JSON] = [
    {"domain": "big"},
    {"domain": {"devices": {"disks": "x", "interfaces": [1, None]}}, "volumes": 3},
    {"domain": {"devices": None, "resources": {"limits": "2"}, "cpu": [1]}, "networks": [{}]},
    {"domain": {"devices": {"disks": [{"name": "a", "disk": "virtio"}]}}, "volumes": [{"x": 1}]},
]


@pytest.mark.parametrize("spec", MALFORMED_SPECS)
def test_defaults_and_validation_survive_malformed_objects(spec: JSON) -> None:
    vmi: JSON = {"kind": "VirtualMachineInstance", "metadata": {"name": "m"}, "spec": spec}
    vm: JSON = {"kind": "VirtualMachine", "spec": {"template": {"spec": copy.deepcopy(spec)}}}
    for obj, default, validate in ((vmi, default_vmi, validate_vmi), (vm, default_vm, validate_vm)):
        default(obj)
        validate(obj, None)
        validate(obj, copy.deepcopy(obj))
        assert vmo_draft7_errors(obj)  # the schema still reports the mistake


def test_defaults_do_not_overwrite_a_wrongly_typed_value() -> None:
    vmi = bare_vmi()
    vmi["spec"]["domain"]["machine"] = "q35"
    default_vmi(vmi)
    assert vmi["spec"]["domain"]["machine"] == "q35"
