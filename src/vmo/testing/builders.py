"""Manifest builders for VMs that boot the test guest (in the spirit of KubeVirt's libvmi),
shared by the end-to-end tests, the benchmarks and ``vmo demo``."""

from __future__ import annotations

from typing import Any

JSON = dict[str, Any]


def http_datavolume(name: str, url: str, *, namespace: str, size: str = "1Gi") -> JSON:
    """A CDI DataVolume importing ``url`` (http(s) or file:// under $VMO_HOME/images)."""
    return {
        "apiVersion": "cdi.kubevirt.io/v1beta1",
        "kind": "DataVolume",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "source": {"http": {"url": url}},
            "storage": {"resources": {"requests": {"storage": size}}},
        },
    }


def boot_vm(
    name: str,
    *,
    namespace: str,
    disk: str,
    interfaces: list[JSON],
    networks: list[JSON],
    labels: dict[str, str] | None = None,
    grace: int = 5,
    cloud_init: JSON | None = None,
) -> JSON:
    """A VM (runStrategy Always) booting DataVolume ``disk``, with a NoCloud seed."""
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {
            "runStrategy": "Always",
            "template": {
                "metadata": {"labels": labels or {}},
                "spec": {
                    "terminationGracePeriodSeconds": grace,
                    "domain": {
                        "cpu": {"cores": 1},
                        "memory": {"guest": "256Mi"},
                        "devices": {
                            "disks": [
                                {"name": "root", "disk": {"bus": "virtio"}, "bootOrder": 1},
                                {"name": "cloudinit", "disk": {"bus": "virtio"}},
                            ],
                            "interfaces": interfaces,
                        },
                    },
                    "networks": networks,
                    "volumes": [
                        {"name": "root", "dataVolume": {"name": disk}},
                        {
                            "name": "cloudinit",
                            "cloudInitNoCloud": cloud_init or {"userData": "#cloud-config\n"},
                        },
                    ],
                },
            },
        },
    }
