"""Admission refuses sizes and counts out of range, naming the field, and stores nothing.

The cases are the bad-input probes of issue 10 (``memory.guest: "1e400"``, 100,000 cores, 500
disks, a negative or a 9999999Ti disk) and their neighbours, all sent through the real HTTP API;
each refusal has a counterpart at the bound that must still be accepted.
"""

from __future__ import annotations

import base64
import itertools
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import Api
from vmo.api.quantity import (
    MAX_QUANTITY,
    QUANTITY_PATTERN,
    QuantityError,
    QuantityRangeError,
    parse_quantity,
)

JSON = dict[str, Any]
KUBEVIRT = "/apis/kubevirt.io/v1"
CDI = "/apis/cdi.kubevirt.io/v1beta1"
INSTANCETYPE = "/apis/instancetype.kubevirt.io/v1beta1"
POLICIES = "/apis/migrations.kubevirt.io/v1alpha1/migrationpolicies"
Mutation = Callable[[JSON], Any]


@pytest.fixture
def ns(api: Api, unique: str) -> Iterator[str]:
    assert api.post("/api/v1/namespaces", {"metadata": {"name": unique}}).status_code == 201
    yield unique
    api.delete(f"/api/v1/namespaces/{unique}")


def vmi_spec() -> JSON:
    return {
        "domain": {
            "memory": {"guest": "128Mi"},
            "devices": {
                "disks": [{"name": "root", "disk": {"bus": "virtio"}}],
                "interfaces": [{"name": "default", "masquerade": {}}],
            },
        },
        "networks": [{"name": "default", "pod": {}}],
        "volumes": [{"name": "root", "containerDisk": {"image": "quay.io/containerdisks/x:1"}}],
    }


def vm(name: str, mutate: Mutation = lambda spec: None) -> JSON:
    spec = vmi_spec()
    mutate(spec)
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": {"runStrategy": "Halted", "template": {"spec": spec}},
    }


def vmi(name: str, mutate: Mutation = lambda spec: None) -> JSON:
    spec = vmi_spec()
    mutate(spec)
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": name},
        "spec": spec,
    }


def datavolume(name: str, claim: str, size: object) -> JSON:
    return {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {"name": name},
        "spec": {"source": {"blank": {}}, claim: {"resources": {"requests": {"storage": size}}}},
    }


def refused(api: Api, collection: str, body: JSON, field: str) -> JSON:
    """POSTs ``body``: a 422 Invalid whose causes and message name ``field``, and nothing stored."""
    response = api.post(collection, body)
    assert response.status_code == 422, response.text
    status: JSON = response.json()
    assert status["kind"] == "Status" and status["reason"] == "Invalid"
    assert field in [cause["field"] for cause in status["details"]["causes"]], status
    assert field in status["message"]
    name = body["metadata"]["name"]
    assert api.get(f"{collection}/{name}").status_code == 404
    return status


def accepted(api: Api, collection: str, body: JSON, *, store: bool = False) -> JSON:
    """Admitted in full; unless ``store``, by a server-side dry run, so that no controller
    another test runs on the shared server starts work (an import, a VM) for it."""
    response = api.post(collection if store else f"{collection}?dryRun=All", body)
    assert response.status_code == 201, response.text
    stored: JSON = response.json()
    return stored


# --------------------------------------------------------------- the quantity parser


@pytest.mark.parametrize(
    "text", ["1e400", "1e9999999", "9999999Ti", "8Ei", "9223372036854775808", "-1e19"]
)
def test_quantity_past_int64_is_a_range_error(text: str) -> None:
    with pytest.raises(QuantityRangeError, match="out of range"):
        parse_quantity(text)


def test_integer_quantity_past_int64_is_a_range_error() -> None:
    with pytest.raises(QuantityRangeError):
        parse_quantity(2**63)


@pytest.mark.parametrize(
    ("text", "value"),
    [("9223372036854775807", 2**63 - 1), ("7Ei", 7 * 2**60), ("1e18", 10**18), ("0e99999", 0)],
)
def test_quantity_up_to_int64_parses_exactly(text: str, value: int) -> None:
    assert parse_quantity(text) == value


def test_an_exponent_too_negative_is_refused_not_a_crash() -> None:
    with pytest.raises(QuantityError, match="exponent out of range"):
        parse_quantity("1e-99999999999999999999")


SIGNS = ("", "+", "-")
NUMBERS = ("0", "1", ".5", "9.99", "123456789012345678901234567890")
TAILS = ("", "m", "Ki", "Ei", "E", "e18", "e19", "e-9", "e400", "e99999", "e-99999", "e" + "9" * 10)


@pytest.mark.parametrize("sign", SIGNS)
def test_every_quantity_the_pattern_admits_parses_finite_or_is_refused(sign: str) -> None:
    texts = [sign + number + tail for number, tail in itertools.product(NUMBERS, TAILS)]
    parsed = 0
    for text in [t for t in texts if re.fullmatch(QUANTITY_PATTERN, t)]:
        try:
            value = parse_quantity(text)
        except QuantityError:
            continue
        parsed += 1
        assert abs(value) <= MAX_QUANTITY, text
        assert math.isfinite(float(value)), text
        int(value)  # and converts without OverflowError
    assert parsed >= len(NUMBERS)  # the sweep really checked values, not only refusals


# --------------------------------------------------------------- quantities in range


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (
            lambda s: s["domain"]["memory"].update(guest="1e400"),
            "spec.template.spec.domain.memory.guest",
        ),
        (
            lambda s: s["domain"]["memory"].update(guest="1e9999999"),  # was a 500
            "spec.template.spec.domain.memory.guest",
        ),
        (
            lambda s: s["domain"]["memory"].update(guest=10**30),
            "spec.template.spec.domain.memory.guest",
        ),
        (
            lambda s: s["domain"].update(resources={"requests": {"cpu": "1e400"}}),
            "spec.template.spec.domain.resources.requests[cpu]",
        ),
        (
            lambda s: s["domain"].update(resources={"limits": {"memory": "1e400"}}),
            "spec.template.spec.domain.resources.limits[memory]",
        ),
    ],
    ids=["guest-1e400", "guest-1e9999999", "guest-integer", "cpu-request", "memory-limit"],
)
def test_vm_quantity_out_of_range_is_refused(
    api: Api, ns: str, unique: str, mutate: Mutation, field: str
) -> None:
    status = refused(api, f"{KUBEVIRT}/namespaces/{ns}/virtualmachines", vm(unique, mutate), field)
    assert "out of range" in status["message"]


def test_vmi_guest_memory_out_of_range_is_refused(api: Api, ns: str, unique: str) -> None:
    body = vmi(unique, lambda s: s["domain"]["memory"].update(guest="1e400"))
    refused(
        api, f"{KUBEVIRT}/namespaces/{ns}/virtualmachineinstances", body, "spec.domain.memory.guest"
    )


def test_update_to_an_out_of_range_quantity_is_refused_and_keeps_the_object(
    api: Api, ns: str, unique: str
) -> None:
    url = f"{KUBEVIRT}/namespaces/{ns}/virtualmachines"
    accepted(api, url, vm(unique), store=True)
    patch = {"spec": {"template": {"spec": {"domain": {"memory": {"guest": "1e400"}}}}}}
    response = api.patch(f"{url}/{unique}", patch, "application/merge-patch+json")
    assert response.status_code == 422, response.text
    assert "spec.template.spec.domain.memory.guest" in response.json()["message"]
    stored = api.get(f"{url}/{unique}").json()
    assert stored["spec"]["template"]["spec"]["domain"]["memory"]["guest"] == "128Mi"


@pytest.mark.parametrize(
    ("resource", "kind"), [("cpu", "requests"), ("memory", "limits"), ("cpu", "limits")]
)
def test_negative_cpu_or_memory_resource_is_refused(
    api: Api, ns: str, unique: str, resource: str, kind: str
) -> None:
    def mutate(spec: JSON) -> None:
        spec["domain"]["resources"] = {kind: {resource: "-1"}}

    field = f"spec.template.spec.domain.resources.{kind}.{resource}"
    status = refused(api, f"{KUBEVIRT}/namespaces/{ns}/virtualmachines", vm(unique, mutate), field)
    assert "must be greater than or equal to 0" in status["message"]


# --------------------------------------------------------------- vCPUs


@pytest.mark.parametrize(
    ("cpu", "field"),
    [
        ({"cores": 100000}, "spec.template.spec.domain.cpu.cores"),
        ({"sockets": 8, "cores": 8, "threads": 8}, "spec.template.spec.domain.cpu.sockets"),
        ({"sockets": 2**31}, "spec.template.spec.domain.cpu.sockets"),  # int32, as upstream
    ],
    ids=["100000-cores", "512-vcpus", "past-int32"],
)
def test_more_vcpus_than_q35_takes_are_refused(
    api: Api, ns: str, unique: str, cpu: JSON, field: str
) -> None:
    body = vm(unique, lambda s: s["domain"].update(cpu=cpu))
    refused(api, f"{KUBEVIRT}/namespaces/{ns}/virtualmachines", body, field)


def test_q35_takes_288_vcpus(api: Api, ns: str, unique: str) -> None:
    body = vm(unique, lambda s: s["domain"].update(cpu={"sockets": 2, "cores": 72, "threads": 2}))
    accepted(api, f"{KUBEVIRT}/namespaces/{ns}/virtualmachines", body)


def test_the_pc_machine_takes_fewer_vcpus_than_q35(api: Api, ns: str, unique: str) -> None:
    def mutate(spec: JSON) -> None:
        spec["domain"]["cpu"] = {"sockets": 256}
        spec["domain"]["machine"] = {"type": "pc"}

    body = vm(unique, mutate)
    status = refused(
        api,
        f"{KUBEVIRT}/namespaces/{ns}/virtualmachines",
        body,
        "spec.template.spec.domain.cpu.sockets",
    )
    assert "255" in status["message"]


def test_a_cpu_request_past_the_machine_names_the_request(api: Api, ns: str, unique: str) -> None:
    body = vm(unique, lambda s: s["domain"].update(resources={"requests": {"cpu": "300"}}))
    url = f"{KUBEVIRT}/namespaces/{ns}/virtualmachines"
    refused(api, url, body, "spec.template.spec.domain.resources.requests.cpu")


def test_a_vmi_cpu_limit_past_the_machine_names_the_limit_not_the_derived_topology(
    api: Api, ns: str, unique: str
) -> None:
    body = vmi(unique, lambda s: s["domain"].update(resources={"limits": {"cpu": "300"}}))
    status = refused(
        api,
        f"{KUBEVIRT}/namespaces/{ns}/virtualmachineinstances",
        body,
        "spec.domain.resources.limits.cpu",
    )
    assert "spec.domain.cpu.sockets" not in status["message"]


# --------------------------------------------------------------- list lengths


def many_disks(count: int) -> Mutation:
    def mutate(spec: JSON) -> None:
        spec["domain"]["devices"]["disks"] = [{"name": f"d{i}"} for i in range(count)]
        spec["volumes"] = [
            {"name": f"d{i}", "emptyDisk": {"capacity": "1Gi"}} for i in range(count)
        ]

    return mutate


def many_interfaces(count: int) -> Mutation:
    def mutate(spec: JSON) -> None:
        spec["domain"]["devices"]["interfaces"] = [
            {"name": f"n{i}", "bridge": {}} for i in range(count)
        ]
        spec["networks"] = [
            {"name": f"n{i}", "multus": {"networkName": "br"}} for i in range(count)
        ]

    return mutate


@pytest.mark.parametrize(
    ("mutate", "fields"),
    [
        (
            many_disks(500),
            ["spec.template.spec.domain.devices.disks", "spec.template.spec.volumes"],
        ),
        (
            many_interfaces(257),
            ["spec.template.spec.domain.devices.interfaces", "spec.template.spec.networks"],
        ),
    ],
    ids=["500-disks", "257-interfaces"],
)
def test_more_than_256_devices_are_refused(
    api: Api, ns: str, unique: str, mutate: Mutation, fields: list[str]
) -> None:
    url = f"{KUBEVIRT}/namespaces/{ns}/virtualmachines"
    status = refused(api, url, vm(unique, mutate), fields[0])
    assert fields[1] in [cause["field"] for cause in status["details"]["causes"]]
    assert "must have at most 256 items" in status["message"]


def test_256_disks_are_accepted(api: Api, ns: str, unique: str) -> None:
    accepted(api, f"{KUBEVIRT}/namespaces/{ns}/virtualmachines", vm(unique, many_disks(256)))


# --------------------------------------------------------------- disk sizes


def with_empty_disk(capacity: object) -> Mutation:
    def mutate(spec: JSON) -> None:
        spec["domain"]["devices"]["disks"].append({"name": "scratch"})
        spec["volumes"].append({"name": "scratch", "emptyDisk": {"capacity": capacity}})

    return mutate


@pytest.mark.parametrize(
    ("capacity", "says"),
    [
        ("-1Gi", "can't be equal or less than zero"),
        ("0", "can't be equal or less than zero"),
        ("512Ki", "at least 1MiB"),
        ("100Ti", "64Ti"),
        ("9999999Ti", "out of range"),
    ],
)
def test_empty_disk_capacity_out_of_range_is_refused(
    api: Api, ns: str, unique: str, capacity: str, says: str
) -> None:
    body = vm(unique, with_empty_disk(capacity))
    url = f"{KUBEVIRT}/namespaces/{ns}/virtualmachines"
    status = refused(api, url, body, "spec.template.spec.volumes[1].emptyDisk.capacity")
    assert says in status["message"]


def test_vmi_with_a_negative_empty_disk_is_refused(api: Api, ns: str, unique: str) -> None:
    body = vmi(unique, with_empty_disk("-1Gi"))
    url = f"{KUBEVIRT}/namespaces/{ns}/virtualmachineinstances"
    refused(api, url, body, "spec.volumes[1].emptyDisk.capacity")


@pytest.mark.parametrize("capacity", ["1Mi", "64Ti"])
def test_empty_disk_capacity_at_the_bounds_is_accepted(
    api: Api, ns: str, unique: str, capacity: str
) -> None:
    accepted(
        api, f"{KUBEVIRT}/namespaces/{ns}/virtualmachines", vm(unique, with_empty_disk(capacity))
    )


@pytest.mark.parametrize(
    ("claim", "size", "field", "says"),
    [
        # a quantity out of range is the schema's to refuse: its paths show map keys in brackets
        ("storage", "9999999Ti", "spec.storage.resources.requests[storage]", "out of range"),
        ("storage", "100Ti", "spec.storage.resources.requests.storage", "64Ti"),
        ("storage", "-1Gi", "spec.storage.resources.requests.storage", "Storage size can't be"),
        ("pvc", "0", "spec.pvc.resources.requests.storage", "PVC size can't be equal or less"),
        ("pvc", "512Ki", "spec.pvc.resources.requests.storage", "PVC size should be at least 1MiB"),
    ],
)
def test_datavolume_size_out_of_range_is_refused(
    api: Api, ns: str, unique: str, claim: str, size: str, field: str, says: str
) -> None:
    url = f"{CDI}/namespaces/{ns}/datavolumes"
    status = refused(api, url, datavolume(unique, claim, size), field)
    assert says in status["message"]


def test_datavolume_of_64ti_is_accepted(api: Api, ns: str, unique: str) -> None:
    accepted(api, f"{CDI}/namespaces/{ns}/datavolumes", datavolume(unique, "storage", "64Ti"))


def test_vm_datavolume_template_size_is_bounded(api: Api, ns: str, unique: str) -> None:
    body = vm(unique)
    template = datavolume(f"{unique}-root", "storage", "100Ti")
    body["spec"]["dataVolumeTemplates"] = [
        {"metadata": template["metadata"], "spec": template["spec"]}
    ]
    field = "spec.dataVolumeTemplates[0].spec.storage.resources.requests.storage"
    refused(api, f"{KUBEVIRT}/namespaces/{ns}/virtualmachines", body, field)


# --------------------------------------------------------------- cloud-init


def with_cloud_init(source: JSON) -> Mutation:
    def mutate(spec: JSON) -> None:
        spec["volumes"].append({"name": "cloudinit", "cloudInitNoCloud": source})
        spec["domain"]["devices"]["disks"].append({"name": "cloudinit"})

    return mutate


@pytest.mark.parametrize(
    ("source", "says"),
    [
        ({"userData": "#" * 2049}, "userdata exceeds 2048 byte limit"),
        (
            {"userDataBase64": base64.b64encode(b"#" * 2049).decode()},
            "userdata exceeds 2048 byte limit",
        ),
        ({"networkData": "#" * 2049}, "networkdata exceeds 2048 byte limit"),
    ],
    ids=["userData", "userDataBase64", "networkData"],
)
def test_inline_cloud_init_past_2k_is_refused(
    api: Api, ns: str, unique: str, source: JSON, says: str
) -> None:
    url = f"{KUBEVIRT}/namespaces/{ns}/virtualmachines"
    status = refused(
        api,
        url,
        vm(unique, with_cloud_init(source)),
        "spec.template.spec.volumes[1].cloudInitNoCloud",
    )
    assert says in status["message"]


def test_inline_cloud_init_of_2k_is_accepted(api: Api, ns: str, unique: str) -> None:
    body = vm(unique, with_cloud_init({"userData": "#" * 2048}))
    accepted(api, f"{KUBEVIRT}/namespaces/{ns}/virtualmachines", body)


def test_cloud_init_base64_that_is_not_base64_is_refused(api: Api, ns: str, unique: str) -> None:
    body = vm(unique, with_cloud_init({"userDataBase64": "not base64!"}))
    field = "spec.template.spec.volumes[1].cloudInitNoCloud.userDataBase64"
    refused(api, f"{KUBEVIRT}/namespaces/{ns}/virtualmachines", body, field)


# --------------------------------------------------------------- a volume no disk uses


def test_a_volume_no_disk_uses_gets_a_disk_as_upstream_defaults_it(
    api: Api, ns: str, unique: str
) -> None:
    """Upstream accepts it: virt-api's mutating webhook adds a disk of the volume's name
    (SetDefaultVolumeDisk) before the VMI create admitter looks for one."""

    def mutate(spec: JSON) -> None:
        spec["volumes"].append({"name": "cloudinit", "cloudInitNoCloud": {"userData": "#x"}})

    stored = accepted(
        api, f"{KUBEVIRT}/namespaces/{ns}/virtualmachineinstances", vmi(unique, mutate)
    )
    disks = {disk["name"]: disk for disk in stored["spec"]["domain"]["devices"]["disks"]}
    assert disks["cloudinit"] == {"name": "cloudinit", "disk": {"bus": "sata"}}


# --------------------------------------------------------------- instancetypes and policies


def instancetype(name: str, *, cpus: int = 2, memory: object = "1Gi") -> JSON:
    return {
        "apiVersion": "instancetype.kubevirt.io/v1beta1",
        "kind": "VirtualMachineInstancetype",
        "metadata": {"name": name},
        "spec": {"cpu": {"guest": cpus}, "memory": {"guest": memory}},
    }


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"cpus": 100000}, "spec.cpu.guest"),
        ({"cpus": 0}, "spec.cpu.guest"),
        ({"memory": "1e400"}, "spec.memory.guest"),
        ({"memory": "32Mi"}, "spec.memory.guest"),
    ],
    ids=["100000-vcpus", "no-vcpu", "memory-1e400", "memory-below-floor"],
)
def test_instancetype_out_of_bounds_is_refused(
    api: Api, ns: str, unique: str, changes: JSON, field: str
) -> None:
    url = f"{INSTANCETYPE}/namespaces/{ns}/virtualmachineinstancetypes"
    refused(api, url, instancetype(unique, **changes), field)


def test_cluster_instancetype_is_bounded_too(api: Api, unique: str) -> None:
    body = instancetype(unique, cpus=1000)
    body["kind"] = "VirtualMachineClusterInstancetype"
    refused(api, f"{INSTANCETYPE}/virtualmachineclusterinstancetypes", body, "spec.cpu.guest")


def migration_policy(name: str, **spec: Any) -> JSON:
    return {
        "apiVersion": "migrations.kubevirt.io/v1alpha1",
        "kind": "MigrationPolicy",
        "metadata": {"name": name},
        "spec": {"selectors": {"namespaceSelector": {"team": name}}, **spec},
    }


@pytest.mark.parametrize(
    ("spec", "field", "says"),
    [
        ({"bandwidthPerMigration": "1e400"}, "spec.bandwidthPerMigration", "out of range"),
        ({"bandwidthPerMigration": "-64Mi"}, "spec.bandwidthPerMigration", "must not be negative"),
        ({"completionTimeoutPerGiB": -1}, "spec.completionTimeoutPerGiB", "must not be negative"),
    ],
    ids=["bandwidth-1e400", "bandwidth-negative", "timeout-negative"],
)
def test_migration_policy_out_of_range_is_refused(
    api: Api, unique: str, spec: JSON, field: str, says: str
) -> None:
    status = refused(api, POLICIES, migration_policy(unique, **spec), field)
    assert says in status["message"]


def test_migration_policy_with_unlimited_bandwidth_is_accepted(api: Api, unique: str) -> None:
    stored = accepted(
        api, POLICIES, migration_policy(unique, bandwidthPerMigration="0Mi"), store=True
    )
    assert api.delete(f"{POLICIES}/{stored['metadata']['name']}").status_code == 200


# --------------------------------------------------------------- the other kinds that carry quantities


def test_kubevirt_migration_bandwidth_out_of_range_is_refused(api: Api, ns: str) -> None:
    body = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "KubeVirt",
        "metadata": {"name": "kubevirt"},
        "spec": {"configuration": {"migrations": {"bandwidthPerMigration": "1e400"}}},
    }
    field = "spec.configuration.migrations.bandwidthPerMigration"
    refused(api, f"{KUBEVIRT}/namespaces/{ns}/kubevirts", body, field)


def test_node_capacity_out_of_range_is_refused_and_the_status_kept(api: Api, unique: str) -> None:
    url = f"/api/v1/nodes/{unique}"
    accepted(api, "/api/v1/nodes", {"metadata": {"name": unique}}, store=True)
    try:
        node = api.get(url).json()
        node["status"] = {"capacity": {"cpu": "2", "memory": "1e400"}}
        response = api.put(f"{url}/status", node)
        assert response.status_code == 422, response.text
        assert "status.capacity[memory]" in response.json()["message"]
        assert "capacity" not in api.get(url).json().get("status", {})
    finally:
        api.delete(url)
