"""The bounds admission puts on sizes and counts, and where each comes from.

Where upstream (KubeVirt, CDI) has a bound, VMO keeps it, with upstream's wording. Where
upstream has none, VMO's bound is set so that a value past it is a typo rather than a plan,
and the reason is given here. Every check names the field it refuses.
"""

from __future__ import annotations

from decimal import Decimal

from vmo.api.quantity import QuantityError, parse_quantity
from vmo.api.types import Cause

# KubeVirt: +kubebuilder:validation:MaxItems=256 on the VMI spec's volumes and networks and
# on the domain's disks and interfaces (they moved from the webhook's arrayLenMax to the CRD).
MAX_LIST_ITEMS = 256

# VMO's floor for guest memory: below it OVMF/SeaBIOS plus a kernel cannot boot a usable guest,
# and KubeVirt's own floor (1M) would only defer the failure to start time.
MIN_GUEST_MEMORY = 64 * 1024**2
MIN_GUEST_MEMORY_TEXT = "64Mi"

# vCPUs per machine type, as QEMU 7.2's query-machines reports cpu-max (q35 288, i440fx 255).
# Upstream's admission has no bound (its CPU-hotplug defaults stop at 512); QEMU refuses a
# topology past its machine's maximum at start, so VMO refuses it when the VM is written.
Q35_MAX_VCPUS = 288
I440FX_MAX_VCPUS = 255

# Disk sizes. CDI refuses a requested size of zero or less, and one below 1MiB ("KubeVirt
# doesn't allow disks smaller than 1MiB"). Neither KubeVirt nor CDI has a ceiling; VMO's is
# 64 TiB: above vSphere's 62 TB VMDK limit and any one disk a VMO host keeps, and far below
# what qcow2 refuses (2 PiB with 64 KiB clusters), so that a "9999999Ti" fails here, by name.
MIN_DISK_SIZE = 2**20
MAX_DISK_SIZE = 64 * 2**40
MAX_DISK_SIZE_TEXT = "64Ti"

# KubeVirt: inline cloud-init user data and network data are limited to 2 KiB each, so that
# every edit does not ship a large object to every node; larger data belongs in a Secret.
CLOUD_INIT_MAX_LEN = 2048


def max_vcpus(machine_type: object) -> int:
    """The vCPUs QEMU gives the machine type (``pc``/``pc-i440fx-*`` 255, q35 and others 288)."""
    text = machine_type if isinstance(machine_type, str) else ""
    return I440FX_MAX_VCPUS if text == "pc" or text.startswith("pc-i440fx") else Q35_MAX_VCPUS


def size_value(value: object) -> Decimal | None:
    """A size's exact value, or None when it is no quantity (the schema reports that)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    try:
        return parse_quantity(value)
    except QuantityError:
        return None


def disk_size_causes(value: object, field: str, *, name: str = "disk") -> list[Cause]:
    """A disk size must be at least 1MiB (upstream) and at most 64Ti (VMO)."""
    size = size_value(value)
    if size is None:
        return []
    if size <= 0:
        return [Cause(field, f"{name} size can't be equal or less than zero")]
    if size < MIN_DISK_SIZE:
        return [Cause(field, f"{name} size should be at least 1MiB")]
    if size > MAX_DISK_SIZE:
        return [
            Cause(field, f"{name} size {value} is more than VMO's limit of {MAX_DISK_SIZE_TEXT}")
        ]
    return []
