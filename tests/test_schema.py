"""The structural-schema engine: field errors as Kubernetes words them, defaults, quantities."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from vmo.api import schema
from vmo.api.quantity import QuantityError, parse_quantity
from vmo.api.types import JSON, Cause

QUANTITY: JSON = {
    "anyOf": [{"type": "integer"}, {"type": "string"}],
    "x-kubernetes-int-or-string": True,
    "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
}

VM_LIKE: JSON = {
    "type": "object",
    "properties": {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["template"],
            "properties": {
                "runStrategy": {"type": "string", "enum": ["Always", "Halted"]},
                "replicas": {"type": "integer", "format": "int32", "minimum": 0},
                "template": {
                    "type": "object",
                    "properties": {
                        "spec": {
                            "type": "object",
                            "properties": {
                                "disks": {
                                    "type": "array",
                                    "maxItems": 3,
                                    "x-kubernetes-list-type": "map",
                                    "x-kubernetes-list-map-keys": ["name"],
                                    "items": {
                                        "type": "object",
                                        "required": ["name"],
                                        "properties": {
                                            "name": {"type": "string", "maxLength": 8},
                                            "bus": {"type": "string", "default": "virtio"},
                                        },
                                    },
                                },
                                "memory": QUANTITY,
                                "gpus": {"x-vmo-unsupported": "no PCI passthrough"},
                                "labels": {
                                    "type": "object",
                                    "additionalProperties": {"type": "string"},
                                },
                                "extra": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                },
                            },
                        }
                    },
                },
            },
        },
    },
}


def vm(**spec_fields: Any) -> JSON:
    template_spec = spec_fields.pop("template_spec", {})
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": "x", "whatever": {"is": "opaque"}},
        "spec": {"template": {"spec": template_spec}, **spec_fields},
    }


def only(causes: list[Cause]) -> Cause:
    assert len(causes) == 1, causes
    return causes[0]


def test_valid_object_has_no_causes() -> None:
    obj = vm(runStrategy="Always", template_spec={"disks": [{"name": "root"}], "memory": "2Gi"})
    assert schema.validate(VM_LIKE, obj) == []


def test_root_metadata_is_opaque() -> None:
    assert schema.validate(VM_LIKE, vm()) == []


def test_missing_required_field_is_reported_at_its_path() -> None:
    obj = vm(template_spec={"disks": [{"bus": "sata"}]})
    cause = only(schema.validate(VM_LIKE, obj))
    assert cause == Cause(
        "spec.template.spec.disks[0].name", "Required value", "FieldValueRequired"
    )


def test_enum_violation_lists_supported_values() -> None:
    cause = only(schema.validate(VM_LIKE, vm(runStrategy="Sometimes")))
    assert cause.field == "spec.runStrategy"
    assert cause.reason == "FieldValueNotSupported"
    assert cause.message == 'Unsupported value: "Sometimes": supported values: "Always", "Halted"'


def test_wrong_type_is_type_invalid() -> None:
    cause = only(schema.validate(VM_LIKE, vm(replicas="three")))
    assert cause.field == "spec.replicas"
    assert cause.reason == "FieldValueTypeInvalid"
    assert "must be of type integer" in cause.message


def test_boolean_is_not_an_integer() -> None:
    assert only(schema.validate(VM_LIKE, vm(replicas=True))).reason == "FieldValueTypeInvalid"


def test_int32_range_and_minimum() -> None:
    assert "int32" in only(schema.validate(VM_LIKE, vm(replicas=2**31))).message
    assert "greater than or equal to 0" in only(schema.validate(VM_LIKE, vm(replicas=-1))).message


def test_unknown_field_is_refused_with_its_full_path() -> None:
    cause = only(schema.validate(VM_LIKE, vm(template_spec={"cpus": 2})))
    assert cause == Cause(
        "spec.template.spec.cpus", 'unknown field "spec.template.spec.cpus"', "FieldValueUnknown"
    )
    assert schema.strict_decoding_message([cause]) == (
        'strict decoding error: unknown field "spec.template.spec.cpus"'
    )


def test_preserve_unknown_fields_accepts_anything_below() -> None:
    obj = vm(template_spec={"extra": {"a": {"b": [1, 2]}}})
    assert schema.validate(VM_LIKE, obj) == []


def test_unsupported_marker_refuses_any_value() -> None:
    cause = only(schema.validate(VM_LIKE, vm(template_spec={"gpus": []})))
    assert cause.field == "spec.template.spec.gpus"
    assert cause.reason == "FieldValueForbidden"
    assert "field not supported by VMO's embedded engine: no PCI passthrough" in cause.message


def test_map_values_are_validated_with_key_in_path() -> None:
    cause = only(schema.validate(VM_LIKE, vm(template_spec={"labels": {"app": 3}})))
    assert cause.field == "spec.template.spec.labels[app]"


def test_max_length_and_max_items() -> None:
    too_long = vm(template_spec={"disks": [{"name": "a-very-long-name"}]})
    assert only(schema.validate(VM_LIKE, too_long)).reason == "FieldValueTooLong"
    many = vm(template_spec={"disks": [{"name": n} for n in "abcd"]})
    assert only(schema.validate(VM_LIKE, many)).reason == "FieldValueTooMany"


def test_list_map_keys_must_be_unique() -> None:
    obj = vm(template_spec={"disks": [{"name": "a"}, {"name": "a"}]})
    cause = only(schema.validate(VM_LIKE, obj))
    assert cause.field == "spec.template.spec.disks[1]"
    assert cause.reason == "FieldValueDuplicate"


def test_list_set_items_must_be_unique() -> None:
    node = {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"}
    assert only(schema.validate(node, ["a", "b", "a"], path="verbs")).field == "verbs[2]"


@pytest.mark.parametrize("value", ["2Gi", "500m", "1e3", 1024])
def test_quantity_accepts_int_or_quantity_string(value: Any) -> None:
    assert schema.validate(QUANTITY, value, path="q") == []


@pytest.mark.parametrize("value", ["2 GiB", "lots", True, 1.5])
def test_quantity_refuses_other_values(value: Any) -> None:
    assert schema.validate(QUANTITY, value, path="q")


def test_nullable_and_null() -> None:
    assert schema.validate({"type": "string", "nullable": True}, None) == []
    assert (
        only(schema.validate({"type": "string"}, None, path="x")).reason == "FieldValueTypeInvalid"
    )


def test_date_time_and_byte_formats() -> None:
    stamp = {"type": "string", "format": "date-time"}
    assert schema.validate(stamp, "2024-01-02T03:04:05Z") == []
    assert schema.validate(stamp, "yesterday")
    data = {"type": "string", "format": "byte"}
    assert schema.validate(data, "aGVsbG8=") == []
    assert schema.validate(data, "not base64!")


def test_pattern_and_min_length() -> None:
    node = {"type": "string", "pattern": "^[a-z]+$", "minLength": 2}
    assert "should match" in only(schema.validate(node, "ABC", path="n")).message
    assert "at least 2 chars" in only(schema.validate(node, "a", path="n")).message


def test_one_of_requires_exactly_one_branch() -> None:
    node = {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
        "oneOf": [{"required": ["a"]}, {"required": ["b"]}],
    }
    assert schema.validate(node, {"a": "x"}) == []
    assert schema.validate(node, {"a": "x", "b": "y"})
    assert schema.validate(node, {})


def test_embedded_resource_needs_api_version_and_kind() -> None:
    node = {
        "type": "object",
        "x-kubernetes-embedded-resource": True,
        "properties": {"spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    }
    good = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"x": 1}}
    assert schema.validate(node, good, path="t") == []
    fields = {c.field for c in schema.validate(node, {"spec": {}}, path="t")}
    assert fields == {"t.apiVersion", "t.kind"}


# --------------------------------------------------------------------------- defaults


def test_defaults_fill_absent_properties_in_array_items() -> None:
    obj = vm(template_spec={"disks": [{"name": "a"}, {"name": "b", "bus": "sata"}]})
    schema.apply_defaults(VM_LIKE, obj)
    disks = obj["spec"]["template"]["spec"]["disks"]
    assert [d["bus"] for d in disks] == ["virtio", "sata"]


def test_defaults_do_not_create_absent_parents() -> None:
    obj = vm()
    schema.apply_defaults(VM_LIKE, obj)
    assert obj["spec"]["template"]["spec"] == {}


def test_defaults_apply_inside_inserted_defaults_and_replace_null() -> None:
    node = {
        "type": "object",
        "properties": {
            "outer": {
                "type": "object",
                "default": {},
                "properties": {"inner": {"type": "integer", "default": 7}},
            },
            "plain": {"type": "string", "default": "x"},
        },
    }
    obj: JSON = {"plain": None}
    schema.apply_defaults(node, obj)
    assert obj == {"outer": {"inner": 7}, "plain": "x"}


def test_defaults_are_copies() -> None:
    node = {"type": "object", "properties": {"l": {"type": "array", "default": []}}}
    first: JSON = {}
    second: JSON = {}
    schema.apply_defaults(node, first)
    first["l"].append(1)
    schema.apply_defaults(node, second)
    assert second == {"l": []}


def test_prune_unknown_drops_and_reports_fields() -> None:
    obj = vm(template_spec={"cpus": 2, "extra": {"kept": 1}})
    assert schema.prune_unknown(VM_LIKE, obj) == ["spec.template.spec.cpus"]
    assert schema.validate(VM_LIKE, obj) == []


# --------------------------------------------------------------------------- quantities


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1Ki", Decimal(1024)),
        ("2Gi", Decimal(2 * 2**30)),
        ("1.5Mi", Decimal(1572864)),
        ("1Ti", Decimal(2**40)),
        ("500m", Decimal("0.5")),
        ("2k", Decimal(2000)),
        ("3M", Decimal(3_000_000)),
        ("1G", Decimal(10**9)),
        ("1e3", Decimal(1000)),
        ("1E-2", Decimal("0.01")),
        ("-4", Decimal(-4)),
        (".5", Decimal("0.5")),
        (7, Decimal(7)),
    ],
)
def test_parse_quantity(text: str | int, value: Decimal) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "Gi", "1 Gi", "1GB", "1KiB", "1.2.3", "1e", "abc"])
def test_parse_quantity_refuses_garbage(text: str) -> None:
    with pytest.raises(QuantityError, match="quantities must match"):
        parse_quantity(text)
