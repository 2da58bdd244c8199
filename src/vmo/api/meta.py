"""Validation of ``ObjectMeta`` as Kubernetes does it: names, labels, annotations, owners."""

from __future__ import annotations

import re
from typing import Any

from vmo.api.types import JSON, Cause

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# Path segment names for RBAC-like kinds (e.g. "system:node") allow anything but '/' and '%'.
_PATH_SEGMENT_FORBIDDEN = re.compile(r"[/%]")

ANNOTATIONS_MAX_BYTES = 256 * 1024

_OWNER_REQUIRED = ("apiVersion", "kind", "name", "uid")


def dns1123_label_errors(value: str) -> list[str]:
    errors = []
    if len(value) > 63:
        errors.append("must be no more than 63 characters")
    if not DNS1123_LABEL.match(value):
        errors.append(
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or "
            "'-', and must start and end with an alphanumeric character (e.g. 'my-name', or "
            "'123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
        )
    return errors


def dns1123_subdomain_errors(value: str) -> list[str]:
    errors = []
    if len(value) > 253:
        errors.append("must be no more than 253 characters")
    if not DNS1123_SUBDOMAIN.match(value):
        errors.append(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
            "'-' or '.', and must start and end with an alphanumeric character (e.g. "
            "'example.com', regex used for validation is "
            "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
        )
    return errors


def path_segment_errors(value: str) -> list[str]:
    if value in (".", ".."):
        return [f"may not be '{value}'"]
    if _PATH_SEGMENT_FORBIDDEN.search(value):
        return ["may not contain '/' or '%'"]
    return []


NAME_RULES = {
    "label": dns1123_label_errors,
    "subdomain": dns1123_subdomain_errors,
    "segment": path_segment_errors,
}


def qualified_name_errors(key: str) -> list[str]:
    prefix, _, name = key.rpartition("/")
    errors = []
    if prefix:
        errors += [f"prefix part {e}" for e in dns1123_subdomain_errors(prefix)]
    if not name:
        errors.append("name part must be non-empty")
    elif len(name) > 63:
        errors.append("name part must be no more than 63 characters")
    elif not _QUALIFIED_NAME.match(name):
        errors.append(
            "name part must consist of alphanumeric characters, '-', '_' or '.', and must start "
            "and end with an alphanumeric character"
        )
    return errors


def label_value_errors(value: str) -> list[str]:
    if len(value) > 63:
        return ["must be no more than 63 characters"]
    if not _LABEL_VALUE.match(value):
        return [
            "a valid label must be an empty string or consist of alphanumeric characters, '-', "
            "'_' or '.', and must start and end with an alphanumeric character"
        ]
    return []


def validate_labels(labels: Any, path: str) -> list[Cause]:
    if labels is None:
        return []
    if not isinstance(labels, dict):
        return [Cause(path, "must be a map of strings", "FieldValueTypeInvalid")]
    causes = []
    for key, value in labels.items():
        for err in qualified_name_errors(str(key)):
            causes.append(Cause(path, f'Invalid value: "{key}": {err}'))
        if not isinstance(value, str):
            causes.append(Cause(f"{path}.{key}", "must be a string", "FieldValueTypeInvalid"))
            continue
        for err in label_value_errors(value):
            causes.append(Cause(path, f'Invalid value: "{value}": {err}'))
    return causes


def validate_annotations(annotations: Any, path: str) -> list[Cause]:
    if annotations is None:
        return []
    if not isinstance(annotations, dict):
        return [Cause(path, "must be a map of strings", "FieldValueTypeInvalid")]
    causes = []
    total = 0
    for key, value in annotations.items():
        for err in qualified_name_errors(str(key)):
            causes.append(Cause(path, f'Invalid value: "{key}": {err}'))
        if not isinstance(value, str):
            causes.append(Cause(f"{path}.{key}", "must be a string", "FieldValueTypeInvalid"))
            continue
        total += len(key) + len(value)
    if total > ANNOTATIONS_MAX_BYTES:
        causes.append(
            Cause(
                path,
                f"Too long: must have at most {ANNOTATIONS_MAX_BYTES} bytes",
                "FieldValueTooLong",
            )
        )
    return causes


def validate_owner_references(refs: Any, path: str) -> list[Cause]:
    if refs is None:
        return []
    if not isinstance(refs, list):
        return [Cause(path, "must be a list", "FieldValueTypeInvalid")]
    causes = []
    controllers = 0
    for i, ref in enumerate(refs):
        if not isinstance(ref, dict):
            causes.append(Cause(f"{path}[{i}]", "must be an object", "FieldValueTypeInvalid"))
            continue
        for field in _OWNER_REQUIRED:
            if not ref.get(field):
                causes.append(Cause(f"{path}[{i}].{field}", "Required value", "FieldValueRequired"))
        controllers += 1 if ref.get("controller") else 0
    if controllers > 1:
        causes.append(
            Cause(path, "Invalid value: only one reference can have Controller set to true")
        )
    return causes


def validate_object_meta(meta: JSON, *, name_rule: str, namespaced: bool) -> list[Cause]:
    """Checks the user-settable parts of ``metadata``; server-set fields are overwritten later."""
    causes: list[Cause] = []
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        causes.append(
            Cause(
                "metadata.name",
                "Required value: name or generateName is required",
                "FieldValueRequired",
            )
        )
    else:
        for err in NAME_RULES[name_rule](name):
            causes.append(Cause("metadata.name", f'Invalid value: "{name}": {err}'))
    if not namespaced and meta.get("namespace"):
        causes.append(
            Cause(
                "metadata.namespace", "Forbidden: not allowed on this type", "FieldValueForbidden"
            )
        )
    causes += validate_labels(meta.get("labels"), "metadata.labels")
    causes += validate_annotations(meta.get("annotations"), "metadata.annotations")
    causes += validate_owner_references(meta.get("ownerReferences"), "metadata.ownerReferences")
    finalizers = meta.get("finalizers")
    if finalizers is not None and (
        not isinstance(finalizers, list) or not all(isinstance(f, str) for f in finalizers)
    ):
        causes.append(
            Cause("metadata.finalizers", "must be a list of strings", "FieldValueTypeInvalid")
        )
    return causes
