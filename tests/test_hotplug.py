"""Disk hotplug's pure parts: upstream's checks of AddVolumeOptions / RemoveVolumeOptions, the spec
change a request makes, the body ``vmo addvolume`` sends for virtctl's flags, and which volumes
the node agent must attach. The e2e file (test_hotplug_e2e.py) runs them against a real guest."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from vmo.apiserver.errors import ApiError
from vmo.apiserver.hotplug_api import (
    add_options,
    apply_add,
    apply_remove,
    remove_options,
    verify_add,
    verify_remove,
)
from vmo.cli.hotplug import HotplugError
from vmo.cli.hotplug import add_options as cli_add_options
from vmo.engine.agent.hotplug import wanted
from vmo.engine.qemu.hotplug import device_id, node_name

DISK = {"disk": {"bus": "scsi"}}
PVC = {"persistentVolumeClaim": {"claimName": "data"}}


@pytest.mark.parametrize(
    ("body", "text"),
    [
        ({}, "Request with no body"),
        ({"disk": DISK, "volumeSource": PVC}, "AddVolumeOptions requires name to be set"),
        ({"name": "d", "volumeSource": PVC}, "AddVolumeOptions requires disk to not be nil"),
        ({"name": "d", "disk": DISK}, "AddVolumeOptions requires VolumeSource to not be nil"),
        ({"name": "d", "disk": DISK, "volumeSource": {"emptyDisk": {}}}, "dataVolume"),
        (
            {"name": "d", "disk": {"disk": {"bus": "virtio"}}, "volumeSource": PVC},
            "hotplugged Disk d does not use a scsi bus",
        ),
        ({"name": "d", "disk": {"cdrom": {}}, "volumeSource": PVC}, "must be a disk"),
        (
            {"name": "d", "disk": DISK, "volumeSource": {"persistentVolumeClaim": {}}},
            "claimName is required",
        ),
    ],
)
def test_bad_add_options_are_refused_with_upstream_s_message(body: Any, text: str) -> None:
    with pytest.raises(ApiError) as exc:
        add_options(body)
    assert exc.value.code == 400 and text in str(exc.value)


def test_an_add_marks_the_source_hotpluggable_and_names_the_disk() -> None:
    request = add_options({"name": "d", "disk": {}, "volumeSource": PVC, "dryRun": ["All"]})
    assert request.volume == {
        "name": "d",
        "persistentVolumeClaim": {"claimName": "data", "hotpluggable": True},
    }
    assert request.disk == {"name": "d", "disk": {"bus": "scsi"}}
    spec: dict[str, Any] = {"domain": {"devices": {}}}
    apply_add(spec, request)
    assert spec["volumes"] == [request.volume]
    assert spec["domain"]["devices"]["disks"] == [request.disk]


def test_names_and_sources_must_be_unique() -> None:
    request = add_options({"name": "d", "disk": {}, "volumeSource": PVC})
    taken = [{"name": "d", "dataVolume": {"name": "other"}}]
    assert "volume with that name already exists" in str(verify_add(taken, request))
    source = [{"name": "x", "persistentVolumeClaim": {"claimName": "data"}}]
    assert "volume source [data] because it already exists" in str(verify_add(source, request))
    assert verify_add([{"name": "root", "containerDisk": {"image": "i"}}], request) is None


def test_only_hotpluggable_volumes_are_removed_by_name_or_source() -> None:
    volumes = [
        {"name": "root", "persistentVolumeClaim": {"claimName": "root"}},
        {"name": "d", "persistentVolumeClaim": {"claimName": "data", "hotpluggable": True}},
    ]
    assert "is not hotpluggable" in str(verify_remove(volumes, "root"))
    assert "because it does not exist" in str(verify_remove(volumes, "ghost"))
    assert verify_remove(volumes, "data") is None  # by its claim, as upstream allows
    spec: dict[str, Any] = {
        "volumes": volumes,
        "domain": {"devices": {"disks": [{"name": "root"}, {"name": "d"}]}},
    }
    apply_remove(spec, "data")
    assert [v["name"] for v in spec["volumes"]] == ["root"]
    assert spec["domain"]["devices"]["disks"] == [{"name": "root"}]
    with pytest.raises(ApiError, match="RemoveVolumeOptions requires name"):
        remove_options({"dryRun": ["All"]})


def _flags(**kw: Any) -> argparse.Namespace:
    defaults = {
        "volume_name": "data",
        "disk_name": "",
        "serial": "",
        "cache": "",
        "disk_type": "disk",
        "bus": "scsi",
        "dry_run": False,
    }
    return argparse.Namespace(**(defaults | kw))


def test_vmo_addvolume_sends_what_virtctl_sends() -> None:
    body = cli_add_options(_flags(), PVC)
    assert body == {
        "name": "data",
        "disk": {"disk": {"bus": "scsi"}, "serial": "data"},
        "volumeSource": PVC,
    }
    named = cli_add_options(_flags(disk_name="d1", serial="S", cache="none", dry_run=True), PVC)
    assert named["name"] == "d1" and named["disk"]["serial"] == "S"
    assert named["disk"]["cache"] == "none" and named["dryRun"] == ["All"]


@pytest.mark.parametrize(
    ("flags", "text"),
    [
        ({"cache": "unsafe"}, "invalid cache value unsafe"),
        ({"disk_type": "lun"}, "Invalid disk type 'lun'"),
        ({"bus": "virtio"}, "Invalid bus type 'virtio'"),
        ({"disk_name": "x" * 64}, "must not exceed 63 characters"),
    ],
)
def test_vmo_addvolume_refuses_what_vmo_cannot_plug(flags: dict[str, str], text: str) -> None:
    with pytest.raises(HotplugError, match=text):
        cli_add_options(_flags(**flags), PVC)


def test_the_agent_attaches_only_hotpluggable_volumes_qemu_did_not_start_with() -> None:
    spec = {
        "volumes": [
            {"name": "root", "persistentVolumeClaim": {"claimName": "root"}},
            {"name": "cold", "persistentVolumeClaim": {"claimName": "c", "hotpluggable": True}},
            {"name": "hot", "dataVolume": {"name": "h", "hotpluggable": True}},
        ],
        "domain": {"devices": {"disks": [{"name": "hot", "disk": {"bus": "scsi"}}]}},
    }
    found = wanted(spec, {"root", "cold"})
    assert list(found) == ["hot"]
    assert found["hot"][1] == {"name": "hot", "disk": {"bus": "scsi"}}


def test_qemu_names_are_short_and_stable() -> None:
    long = "v" * 63
    assert node_name(long) == node_name(long) and len(node_name(long)) <= 31
    assert node_name("a") != node_name("b")
    assert device_id("data") == "ua-data"


def test_an_unknown_dry_run_is_refused() -> None:
    from vmo.apiserver.hotplug_api import VolumeHotplug

    hotplug = VolumeHotplug(None, None)  # type: ignore[arg-type]
    with pytest.raises(ApiError, match="Invalid dryRun"):
        hotplug.handle(
            resource="virtualmachineinstances",
            action="removevolume",
            namespace="ns",
            name="vmi",
            body={"name": "d", "dryRun": ["Some"]},
        )
