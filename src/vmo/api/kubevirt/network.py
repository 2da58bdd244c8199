"""k8s.cni.cncf.io/v1 NetworkAttachmentDefinition: the secondary networks VMs attach to."""

from __future__ import annotations

import json

from vmo.api.kubevirt._builders import obj, resource_schema, string
from vmo.api.types import JSON, Cause, ResourceType


def validate_nad(new: JSON, old: JSON | None) -> list[Cause]:
    """``spec.config`` is a CNI configuration: a JSON object carried as a string."""
    config = (new.get("spec") or {}).get("config")
    if config is None or config == "":
        return []  # upstream allows an empty config (a delegate named by annotation)
    try:
        parsed = json.loads(config)
    except ValueError as error:
        return [Cause("spec.config", f"not valid JSON: {error}")]
    if not isinstance(parsed, dict):
        return [Cause("spec.config", "a CNI configuration is a JSON object")]
    if "type" not in parsed and "plugins" not in parsed:
        return [Cause("spec.config", 'a CNI configuration names a "type" or a "plugins" list')]
    return []


def network_attachment_definition() -> ResourceType:
    return ResourceType(
        group="k8s.cni.cncf.io",
        version="v1",
        kind="NetworkAttachmentDefinition",
        plural="network-attachment-definitions",
        singular="network-attachment-definition",
        namespaced=True,
        short_names=("nad", "net-attach-def"),
        schema=resource_schema(obj({"config": string()}), None, spec_required=False),
        validate=validate_nad,
    )
