"""VMO's model of ``VirtualMachineInstanceSpec``: the fields its embedded engine runs.

Upstream fields the engine cannot honour are declared ``unsupported`` with the reason, so a user's
KubeVirt YAML that uses them gets a refusal naming the field rather than "unknown field".

Bounds (``_bounds``): at most 256 disks, interfaces, volumes and networks, and CPU axes within
int32, as upstream's CRD; admission adds at most the machine type's vCPUs (q35 288, pc 255) and an
``emptyDisk.capacity`` from 1Mi to VMO's 64Ti (upstream has no ceiling).
"""

from __future__ import annotations

from vmo.api.kubevirt._bounds import MAX_LIST_ITEMS
from vmo.api.kubevirt._builders import (
    JSON,
    arr,
    boolean,
    empty,
    integer,
    obj,
    quantity,
    quantity_map,
    string,
    string_map,
    unsupported,
    unsupported_fields,
)
from vmo.api.kubevirt._common import affinity, local_ref, toleration

NO_PASSTHROUGH = "host device passthrough is not available in VMO's embedded engine"
NO_HUGEPAGES = "hugepages are not configured by VMO's embedded engine"
NO_PINNING = "CPU pinning and NUMA placement are not implemented by VMO's embedded engine"
NO_CONFIDENTIAL = "confidential computing (SEV/SNP/TDX) is not available in VMO's embedded engine"
NO_HYPERV = "Hyper-V enlightenments are not configured by VMO's embedded engine"
NO_DEVICE = "this device is not emulated by VMO's embedded engine"
NO_BINDING = "only masquerade and bridge interface bindings are supported by VMO's embedded engine"
NO_POD = "VMO's embedded engine runs no virt-launcher pod, so pod-level settings do not apply"
NO_HOTPLUG = "VM rollout strategies and hotplug limits are not supported by VMO's embedded engine"
NO_VOLUME = "this volume source is not available in VMO's embedded engine"
START_PAUSED = "Paused"
"""The one ``spec.startStrategy``: the guest's vCPUs do not run until it is unpaused."""
NO_DISK_TUNING = "per-disk I/O tuning is not configured by VMO's embedded engine"
NO_ARCH = "VMO's embedded engine runs amd64 guests only"

DISK_BUSES = ("virtio", "sata", "scsi", "usb")
INTERFACE_MODELS = ("virtio", "e1000", "e1000e", "igb", "rtl8139", "pcnet", "ne2k_pci")
EVICTION_STRATEGIES = ("None", "LiveMigrate", "LiveMigrateIfPossible", "External")


def bounded(items: JSON) -> JSON:
    """A list of at most 256 ``items``: upstream's bound on devices, volumes and networks."""
    return {**arr(items), "maxItems": MAX_LIST_ITEMS}


def int32() -> JSON:
    return {**integer(), "format": "int32"}


def cpu() -> JSON:
    return obj(
        {
            "sockets": int32(),
            "cores": int32(),
            "threads": int32(),
            "model": string(),
            "maxSockets": unsupported(NO_HOTPLUG),
            **unsupported_fields(
                NO_PINNING, "dedicatedCpuPlacement", "isolateEmulatorThread", "numa", "realtime"
            ),
            "features": unsupported(
                "per-feature CPU flags are not passed by VMO's embedded engine"
            ),
        }
    )


def memory() -> JSON:
    return obj(
        {
            "guest": quantity(),
            "hugepages": unsupported(NO_HUGEPAGES),
            "maxGuest": unsupported(NO_HOTPLUG),
            "reservedOverhead": unsupported(NO_POD),
        }
    )


def resources() -> JSON:
    return obj(
        {
            "requests": quantity_map(),
            "limits": quantity_map(),
            "overcommitGuestOverhead": unsupported(NO_POD),
        }
    )


def firmware() -> JSON:
    bootloader = obj(
        {
            "bios": obj({"useSerial": boolean()}),
            "efi": obj(
                {
                    "secureBoot": boolean(),
                    "persistent": unsupported(
                        "persistent EFI variables need vmStateStorageClass, "
                        "which VMO's embedded engine does not provide"
                    ),
                }
            ),
        }
    )
    return obj(
        {
            "uuid": string(),
            "serial": string(),
            "bootloader": bootloader,
            "kernelBoot": unsupported("direct kernel boot from a container is not supported"),
            "acpi": unsupported("custom ACPI tables are not supported by VMO's embedded engine"),
        }
    )


def features() -> JSON:
    toggle = obj({"enabled": boolean()})
    return obj(
        {
            "acpi": toggle,
            "smm": toggle,
            "apic": obj({"enabled": boolean(), "endOfInterrupt": boolean()}),
            **unsupported_fields(NO_HYPERV, "hyperv", "hypervPassthrough"),
            **unsupported_fields(
                "KVM and paravirtual spinlock tuning is not configured by VMO's embedded engine",
                "kvm",
                "pvspinlock",
            ),
        }
    )


def disk() -> JSON:
    target = obj(
        {
            "bus": string(enum=DISK_BUSES),
            "readonly": boolean(),
            "pciAddress": unsupported("fixed PCI addresses are not supported"),
        }
    )
    cdrom = obj(
        {
            "bus": string(enum=("sata", "scsi")),
            "readonly": boolean(),
            "tray": string(enum=("closed",)),
        }
    )
    return obj(
        {
            "name": string(),
            "disk": target,
            "cdrom": cdrom,
            "lun": unsupported("LUN passthrough is not available in VMO's embedded engine"),
            "bootOrder": integer(),
            "serial": string(),
            "cache": string(enum=("none", "writethrough", "writeback")),
            **unsupported_fields(
                NO_DISK_TUNING,
                "io",
                "dedicatedIOThread",
                "blockSize",
                "errorPolicy",
                "shareable",
            ),
            "tag": unsupported("device role tagging is not supported by VMO's embedded engine"),
            "changedBlockTracking": unsupported(
                "KubeVirt changed-block tracking is not used; VMO backups track blocks themselves"
            ),
        },
        required=("name",),
    )


def interface() -> JSON:
    port = obj(
        {"name": string(), "port": integer(), "protocol": string(enum=("TCP", "UDP"))},
        required=("port",),
    )
    return obj(
        {
            "name": string(),
            "masquerade": empty(),
            "bridge": empty(),
            **unsupported_fields(
                NO_BINDING, "sriov", "passt", "passtBinding", "slirp", "macvtap", "binding"
            ),
            "macAddress": string(),
            "model": string(enum=INTERFACE_MODELS),
            "ports": arr(port),
            "bootOrder": integer(),
            "portRanges": unsupported("port ranges are not forwarded by VMO's embedded engine"),
            "pciAddress": unsupported("fixed PCI addresses are not supported"),
            "acpiIndex": unsupported("ACPI indexes are not assigned by VMO's embedded engine"),
            "dhcpOptions": unsupported("custom DHCP options are not served by VMO's engine"),
            "tag": unsupported("device role tagging is not supported by VMO's embedded engine"),
            "state": unsupported("interface link state control is not supported"),
        },
        required=("name",),
    )


def devices() -> JSON:
    return obj(
        {
            "disks": bounded(disk()),
            "interfaces": bounded(interface()),
            "inputs": arr(
                obj(
                    {
                        "name": string(),
                        "type": string(enum=("tablet",)),
                        "bus": string(enum=("usb", "virtio")),
                    },
                    required=("name", "type"),
                )
            ),
            "rng": empty(),
            "autoattachPodInterface": boolean(),
            "autoattachGraphicsDevice": boolean(),
            "autoattachSerialConsole": boolean(),
            "autoattachMemBalloon": boolean(),
            "autoattachInputDevice": boolean(),
            **unsupported_fields(NO_PASSTHROUGH, "gpus", "hostDevices", "clientPassthrough"),
            **unsupported_fields(
                NO_DEVICE,
                "tpm",
                "sound",
                "watchdog",
                "video",
                "panicDevices",
                "filesystems",
                "downwardMetrics",
                "autoattachVSOCK",
                "logSerialConsole",
            ),
            **unsupported_fields(
                "virtio queue and transport tuning is not configured by VMO's embedded engine",
                "blockMultiQueue",
                "networkInterfaceMultiqueue",
                "useVirtioTransitional",
            ),
            "disableHotplug": unsupported(NO_HOTPLUG),
        }
    )


def domain() -> JSON:
    return obj(
        {
            "cpu": cpu(),
            "memory": memory(),
            "resources": resources(),
            "firmware": firmware(),
            "machine": obj({"type": string()}),
            "features": features(),
            "devices": devices(),
            "clock": unsupported("guest clock and timer settings are not configured by VMO"),
            "chassis": unsupported("SMBIOS chassis fields are not set by VMO's embedded engine"),
            "ioThreads": unsupported(NO_DISK_TUNING),
            "ioThreadsPolicy": unsupported(NO_DISK_TUNING),
            "launchSecurity": unsupported(NO_CONFIDENTIAL),
            "rebootPolicy": unsupported(
                "reboot policies are not supported by VMO's embedded engine"
            ),
        },
        required=("devices",),
    )


def cloud_init() -> JSON:
    return obj(
        {
            "userData": string(),
            "userDataBase64": string(),
            "secretRef": local_ref(),
            "networkData": string(),
            "networkDataBase64": string(),
            "networkDataSecretRef": local_ref(),
        }
    )


def volume() -> JSON:
    return obj(
        {
            "name": string(),
            "containerDisk": obj(
                {
                    "image": string(),
                    "imagePullPolicy": string(enum=("Always", "IfNotPresent", "Never")),
                    "path": string(),
                    "imagePullSecret": string(),
                },
                required=("image",),
            ),
            "dataVolume": obj({"name": string(), "hotpluggable": boolean()}, required=("name",)),
            "persistentVolumeClaim": obj(
                {"claimName": string(), "readOnly": boolean(), "hotpluggable": boolean()},
                required=("claimName",),
            ),
            "cloudInitNoCloud": cloud_init(),
            "cloudInitConfigDrive": cloud_init(),
            "emptyDisk": obj({"capacity": quantity()}, required=("capacity",)),
            "secret": obj({"secretName": string(), "optional": boolean(), "volumeLabel": string()}),
            "configMap": obj({"name": string(), "optional": boolean(), "volumeLabel": string()}),
            **unsupported_fields(
                NO_VOLUME,
                "hostDisk",
                "ephemeral",
                "containerPath",
                "serviceAccount",
                "downwardAPI",
                "downwardMetrics",
                "sysprep",
                "memoryDump",
            ),
        },
        required=("name",),
    )


def network() -> JSON:
    return obj(
        {
            "name": string(),
            "pod": obj({"vmNetworkCIDR": string(), "vmIPv6NetworkCIDR": string()}),
            "multus": obj(
                {"networkName": string(), "default": boolean()}, required=("networkName",)
            ),
            "resourceClaim": unsupported("dynamic resource claims are not supported by VMO"),
        },
        required=("name",),
    )


def vmi_spec() -> JSON:
    """The schema of ``VirtualMachineInstanceSpec`` (a VM's ``spec.template.spec``)."""
    return obj(
        {
            "domain": domain(),
            "volumes": bounded(volume()),
            "networks": bounded(network()),
            "nodeSelector": string_map(),
            "affinity": affinity(),
            "tolerations": arr(toleration()),
            "terminationGracePeriodSeconds": integer(),
            "evictionStrategy": string(enum=EVICTION_STRATEGIES),
            "hostname": string(),
            "subdomain": string(),
            "architecture": string(enum=("amd64",)),
            "priorityClassName": unsupported(NO_POD),
            "schedulerName": unsupported(NO_POD),
            "serviceAccountName": unsupported(NO_POD),
            "dnsConfig": unsupported(NO_POD),
            "dnsPolicy": unsupported(NO_POD),
            "readinessProbe": unsupported("guest probes are not run by VMO's embedded engine"),
            "livenessProbe": unsupported("guest probes are not run by VMO's embedded engine"),
            "accessCredentials": unsupported(
                "credential injection is not supported; use cloud-init user data"
            ),
            "startStrategy": string(enum=(START_PAUSED,)),
            "topologySpreadConstraints": unsupported(NO_POD),
            "resourceClaims": unsupported("dynamic resource claims are not supported by VMO"),
            "utilityVolumes": unsupported(NO_VOLUME),
        },
        required=("domain",),
    )


def template_metadata() -> JSON:
    """``spec.template.metadata``: labels and annotations matter, the rest is kept as given."""
    return obj({"labels": string_map(), "annotations": string_map()}, preserve=True)
