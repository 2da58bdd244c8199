"""Disk hotplug on a real guest, as virtctl does it: ``vmo addvolume`` / ``vmo removevolume``
through the ``addvolume`` / ``removevolume`` subresources. One VM boots once; a claim imported
from an image is hot-plugged (the guest reads the image's boot sector from it), a blank
WaitForFirstConsumer claim is provisioned by hot-plugging it, both are removed again; refusals
are Status errors that change nothing."""

from __future__ import annotations

import copy
import functools
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import requests
import yaml

from tests.conftest import SCHEMAS, Api, Kubectl
from tests.test_vm_e2e import BOOT_TIMEOUT, NS, console, engine_cluster, vm, wait_for, wait_running
from vmo.testing.apiserver import ThreadedServer
from vmo.testing.builders import http_datavolume

VMIS = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances"
VMS = f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines"
SUB = f"/apis/subresources.kubevirt.io/v1/namespaces/{NS}"
PVCS = f"/api/v1/namespaces/{NS}/persistentvolumeclaims"
BLANK_SECTORS = (16 << 20) // 512


def _draft7(node: Any) -> Any:
    if isinstance(node, list):
        return [_draft7(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: _draft7(v) for k, v in node.items() if k not in ("properties", "nullable")}
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    if "properties" in node:
        out["properties"] = {k: _draft7(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@functools.cache
def _validator(kind: str) -> jsonschema.Draft7Validator:
    document = yaml.safe_load((SCHEMAS / "kubevirt-v1.9.0" / f"{kind}.yaml").read_text())
    return jsonschema.Draft7Validator(_draft7(document["openAPIV3Schema"]))


def assert_upstream_valid(obj: dict[str, Any]) -> None:
    body = copy.deepcopy(obj)
    body["metadata"] = {"name": obj["metadata"]["name"]}
    errors = sorted(_validator(obj["kind"].lower()).iter_errors(body), key=str)
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    yield from engine_cluster(tmp_path_factory.mktemp("vmo-hotplug"))


def claim(name: str, size: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": NS, "annotations": annotations or {}},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}},
    }


def vmo(cluster: ThreadedServer, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "vmo.cli.main", *args]
    argv += ["-n", NS, "--kubeconfig", str(cluster.kubeconfig)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def vmi(capi: Api) -> dict[str, Any]:
    found: dict[str, Any] = capi.get(f"{VMIS}/hp").json()
    return found


def volume_entry(capi: Api, name: str) -> dict[str, Any] | None:
    return next(
        (v for v in vmi(capi)["status"].get("volumeStatus") or [] if v["name"] == name), None
    )


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next(c for c in obj["status"]["conditions"] if c["type"] == ctype)


def guest(cluster: ThreadedServer, command: str) -> str:
    return console(cluster, "hp", command)


@pytest.fixture(scope="module")
def booted(cluster: ThreadedServer, k: Kubectl, capi: Api, image_server: str) -> dict[str, Any]:
    k.apply(http_datavolume("hp-root", f"{image_server}/disk.qcow2", namespace=NS, size="64Mi"))
    endpoint = {"cdi.kubevirt.io/storage.import.endpoint": f"{image_server}/disk.qcow2"}
    k.apply(claim("hp-data", "64Mi", endpoint))
    k.apply(claim("hp-blank", "16Mi"))
    k.apply(vm("hp", disk="hp-root"))
    running = wait_running(capi, "hp")
    wait_for(lambda: "ready" in guest(cluster, "echo ready"), BOOT_TIMEOUT, "the guest's shell")
    wait_for(
        lambda: capi.get(f"{PVCS}/hp-data").json()["status"].get("phase") == "Bound",
        BOOT_TIMEOUT,
        "the imported claim",
    )
    return running


class PhaseWatch:
    """The hotplug phases one volume's status entry goes through, read from a watch."""

    def __init__(self, capi: Api, volume: str) -> None:
        self.phases: list[str] = []
        self.volume = volume
        version = vmi(capi)["metadata"]["resourceVersion"]
        self.response = capi.get(
            f"{VMIS}?watch=true&fieldSelector=metadata.name%3Dhp&resourceVersion={version}",
            stream=True,
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for line in self.response.iter_lines():
                obj = json.loads(line)["object"]
                for entry in obj.get("status", {}).get("volumeStatus") or []:
                    phase = entry.get("phase") if entry["name"] == self.volume else None
                    if phase and (not self.phases or self.phases[-1] != phase):
                        self.phases.append(phase)
                if self.phases and self.phases[-1] == "Ready":
                    return
        except (requests.RequestException, ValueError, AttributeError):
            return

    def close(self) -> list[str]:
        self.thread.join(timeout=60)
        self.response.close()
        return self.phases


def test_the_vmi_has_a_scsi_controller_for_hotplug(
    cluster: ThreadedServer, booted: dict[str, Any]
) -> None:
    assert "host" in guest(cluster, "ls /sys/class/scsi_host")


def test_a_hotplugged_claim_reaches_the_guest_with_its_data(
    cluster: ThreadedServer, capi: Api, booted: dict[str, Any]
) -> None:
    watch = PhaseWatch(capi, "hp-data")
    done = vmo(cluster, "addvolume", "hp", "--volume-name=hp-data")
    assert done.returncode == 0, done.stderr
    assert "Successfully submitted add volume request to VMI hp for volume hp-data" in done.stdout
    wait_for(
        lambda: (volume_entry(capi, "hp-data") or {}).get("phase") == "Ready",
        60,
        "hp-data Ready",
    )
    assert watch.close()[-3:] == ["Bound", "AttachedToNode", "Ready"]
    current = vmi(capi)
    volume = next(v for v in current["spec"]["volumes"] if v["name"] == "hp-data")
    assert volume["persistentVolumeClaim"] == {"claimName": "hp-data", "hotpluggable": True}
    disk = next(d for d in current["spec"]["domain"]["devices"]["disks"] if d["name"] == "hp-data")
    assert disk["disk"] == {"bus": "scsi"} and disk["serial"] == "hp-data"
    entry = volume_entry(capi, "hp-data")
    assert entry is not None and entry["target"] == "sda" and "hotplugVolume" in entry
    assert entry["persistentVolumeClaimInfo"]["claimName"] == "hp-data"
    migratable = condition(current, "LiveMigratable")
    assert migratable["status"] == "False" and migratable["reason"] == "HotplugNotLiveMigratable"
    assert_upstream_valid(current)
    migration = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {"name": "hp-move", "namespace": NS},
        "spec": {"vmiName": "hp"},
    }
    refused = capi.post(
        f"/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachineinstancemigrations", migration
    )
    assert refused.status_code >= 400 and "HotplugNotLiveMigratable" in refused.json()["message"]
    # the image's MBR signature, written by the import before the disk was attached
    signature = wait_for(
        lambda: (
            (o := guest(cluster, "dd if=/dev/sda bs=1 skip=510 count=2 2>/dev/null | od -An -tx1"))
            and "55 aa" in o
            and o
        ),
        30,
        "the boot sector of the hot-plugged disk",
    )
    assert "55 aa" in signature


def test_refusals_name_what_failed_and_change_nothing(
    cluster: ThreadedServer, capi: Api, booted: dict[str, Any]
) -> None:
    before = vmi(capi)
    url = f"{SUB}/virtualmachineinstances/hp/addvolume"
    disk = {"disk": {"bus": "scsi"}}
    same_name = {"name": "hp-data", "disk": disk, "volumeSource": _pvc("hp-blank")}
    r = capi.request("PUT", url, same_name)
    assert r.status_code == 409 and "volume with that name already exists" in r.json()["message"]
    same_source = {"name": "other", "disk": disk, "volumeSource": _pvc("hp-data")}
    r = capi.request("PUT", url, same_source)
    assert r.status_code == 409
    assert "Unable to add volume source [hp-data] because it already exists" in r.json()["message"]
    missing = {"name": "ghost", "disk": disk, "volumeSource": _pvc("ghost")}
    r = capi.request("PUT", url, missing)
    assert r.status_code == 404 and '"ghost" not found' in r.json()["message"]
    virtio = {"name": "v", "disk": {"disk": {"bus": "virtio"}}, "volumeSource": _pvc("hp-blank")}
    r = capi.request("PUT", url, virtio)
    assert r.status_code == 400 and "does not use a scsi bus" in r.json()["message"]
    r = capi.request("PUT", url, {"name": "x", "disk": disk, "volumeSource": {"emptyDisk": {}}})
    assert r.status_code == 400 and "persistentVolumeClaim or dataVolume" in r.json()["message"]
    r = capi.request("PUT", f"{SUB}/virtualmachineinstances/hp/removevolume", {"name": "root"})
    assert r.status_code == 409 and "is not hotpluggable" in r.json()["message"]
    out = vmo(cluster, "addvolume", "hp", "--volume-name=ghost")
    assert out.returncode == 1
    assert "Volume ghost is not a DataVolume or PersistentVolumeClaim" in out.stderr
    out = vmo(cluster, "addvolume", "nope", "--volume-name=hp-blank")
    assert out.returncode == 1 and '"nope" not found' in out.stderr, out.stderr
    out = vmo(cluster, "removevolume", "hp", "--volume-name=ghost")
    assert out.returncode == 1
    assert "Unable to remove volume [ghost] because it does not exist" in out.stderr
    out = vmo(cluster, "addvolume", "hp", "--volume-name=hp-blank", "--dry-run")
    assert out.returncode == 0 and "Dry Run execution" in out.stdout, out.stderr
    after = vmi(capi)
    assert after["spec"] == before["spec"]
    assert capi.get(f"{PVCS}/hp-blank").json()["status"].get("phase") == "Pending"


def _pvc(name: str) -> dict[str, Any]:
    return {"persistentVolumeClaim": {"claimName": name}}


def test_a_blank_claim_is_provisioned_on_the_vmi_s_node_when_hotplugged_persistently(
    cluster: ThreadedServer, capi: Api, booted: dict[str, Any]
) -> None:
    done = vmo(cluster, "addvolume", "hp", "--volume-name=hp-blank", "--persist", "--serial=B1")
    assert done.returncode == 0, done.stderr
    template = capi.get(f"{VMS}/hp").json()["spec"]["template"]["spec"]
    assert {
        "name": "hp-blank",
        "persistentVolumeClaim": {"claimName": "hp-blank", "hotpluggable": True},
    } in template["volumes"]
    wait_for(
        lambda: (volume_entry(capi, "hp-blank") or {}).get("phase") == "Ready",
        60,
        "hp-blank Ready",
    )
    pvc = capi.get(f"{PVCS}/hp-blank").json()
    assert pvc["status"]["phase"] == "Bound"
    assert volume_entry(capi, "hp-blank")["target"] == "sdb"  # type: ignore[index]
    sizes = wait_for(
        lambda: (o := guest(cluster, "cat /sys/block/sd*/size")) and str(BLANK_SECTORS) in o and o,
        30,
        "a 16Mi disk in the guest",
    )
    assert str(BLANK_SECTORS) in sizes
    vm_obj = capi.get(f"{VMS}/hp").json()
    assert_upstream_valid(vm_obj)
    # the running VMI has the template's new disk: no restart is required for it
    restart = [
        c for c in vm_obj["status"].get("conditions") or [] if c["type"] == "RestartRequired"
    ]
    assert not restart, restart


def test_a_restarted_agent_knows_the_hotplugged_disks(
    cluster: ThreadedServer, capi: Api, booted: dict[str, Any]
) -> None:
    cluster.restart_node("node-1")  # its QEMU keeps running; the new agent adopts it
    # touching the VMI makes the new agent reconcile it: nothing is attached twice
    patch = {"metadata": {"labels": {"touched": "yes"}}}
    r = capi.request(
        "PATCH", f"{VMIS}/hp", patch, headers={"Content-Type": "application/merge-patch+json"}
    )
    assert r.status_code == 200, r.text
    assert {(volume_entry(capi, n) or {}).get("phase") for n in ("hp-data", "hp-blank")} == {
        "Ready"
    }
    assert "sda" in guest(cluster, "ls /sys/block") and "sdb" in guest(cluster, "ls /sys/block")


def test_removing_disks_unplugs_them_from_the_guest(
    cluster: ThreadedServer, capi: Api, booted: dict[str, Any]
) -> None:
    out = vmo(cluster, "removevolume", "hp", "--volume-name=hp-data")
    assert out.returncode == 0, out.stderr
    assert "Successfully submitted remove volume request to VMI hp for volume hp-data" in out.stdout
    out = vmo(cluster, "removevolume", "hp", "--volume-name=hp-blank", "--persist")
    assert out.returncode == 0, out.stderr
    wait_for(
        lambda: volume_entry(capi, "hp-data") is None and volume_entry(capi, "hp-blank") is None,
        60,
        "the hotplug entries to go",
    )
    current = vmi(capi)
    names = {v["name"] for v in current["spec"]["volumes"]}
    assert "hp-data" not in names and "hp-blank" not in names
    template = capi.get(f"{VMS}/hp").json()["spec"]["template"]["spec"]
    assert "hp-blank" not in {v["name"] for v in template["volumes"]}
    assert condition(current, "LiveMigratable")["status"] == "True"
    vm_conditions = capi.get(f"{VMS}/hp").json()["status"].get("conditions") or []
    assert "RestartRequired" not in {c["type"] for c in vm_conditions}
    assert_upstream_valid(current)
    listing = wait_for(
        lambda: (o := guest(cluster, "ls /sys/block; echo listed")) and "sd" not in o and o,
        30,
        "the disks to leave the guest",
    )
    assert "vda" in listing
    events = capi.get(f"/api/v1/namespaces/{NS}/events").json()["items"]
    reasons = {e["reason"] for e in events if e["involvedObject"].get("name") == "hp"}
    assert {"VolumeHotplugged", "VolumeHotunplugged"} <= reasons
