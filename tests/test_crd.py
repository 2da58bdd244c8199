"""CustomResourceDefinitions: what is refused, and the kinds an accepted one serves."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import SCHEMAS
from vmo.api import schema
from vmo.api.core import core_resource_types
from vmo.api.crd import crd_resource_types, structural_errors, validate_crd, version_priority
from vmo.api.types import JSON, PrinterColumn

LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

WIDGET_SCHEMA: JSON = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "properties": {
                "color": {"type": "string", "enum": ["red", "green"], "default": "red"},
                "size": {"type": "integer", "minimum": 1},
                "replicas": {"type": "integer"},
                "config": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            },
        },
        "status": {
            "type": "object",
            "properties": {"replicas": {"type": "integer"}, "selector": {"type": "string"}},
        },
    },
}


def widget_crd(**changes: Any) -> JSON:
    crd: JSON = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "scope": "Namespaced",
            "names": {
                "plural": "widgets",
                "singular": "widget",
                "kind": "Widget",
                "listKind": "WidgetList",
                "shortNames": ["wd"],
                "categories": ["all"],
            },
            "versions": [
                {
                    "name": "v1beta1",
                    "served": True,
                    "storage": False,
                    "schema": {"openAPIV3Schema": WIDGET_SCHEMA},
                },
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": WIDGET_SCHEMA},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                        },
                    },
                    "additionalPrinterColumns": [
                        {"name": "Color", "type": "string", "jsonPath": ".spec.color"},
                        {
                            "name": "Size",
                            "type": "integer",
                            "jsonPath": ".spec.size",
                            "priority": 1,
                            "description": "how big",
                        },
                    ],
                    "selectableFields": [{"jsonPath": ".spec.color"}],
                },
                {
                    "name": "v2alpha1",
                    "served": False,
                    "storage": False,
                    "schema": {"openAPIV3Schema": WIDGET_SCHEMA},
                },
            ],
        },
    }
    crd["spec"].update(changes)
    return crd


def fields_of(causes: list[Any]) -> set[str]:
    return {c.field for c in causes}


# --------------------------------------------------------------------------- served kinds


def test_one_type_per_served_version_preferred_first() -> None:
    types = crd_resource_types(widget_crd())
    assert [t.version for t in types] == ["v1", "v1beta1"]


def test_served_type_carries_names_scope_and_subresources() -> None:
    widget = crd_resource_types(widget_crd())[0]
    assert (widget.group, widget.kind, widget.plural, widget.singular) == (
        "example.com",
        "Widget",
        "widgets",
        "widget",
    )
    assert widget.namespaced
    assert widget.short_names == ("wd",)
    assert widget.categories == ("all",)
    assert widget.subresources == ("status", "scale")
    assert widget.field_selectors == {"spec.color": ".spec.color"}


def test_printer_columns_keep_priority_and_description() -> None:
    widget = crd_resource_types(widget_crd())[0]
    assert widget.printer_columns == (
        PrinterColumn("Color", "string", ".spec.color"),
        PrinterColumn("Size", "integer", ".spec.size", description="how big", priority=1),
    )


def test_served_schema_validates_and_defaults_objects() -> None:
    widget = crd_resource_types(widget_crd())[0]
    assert widget.schema is not None
    obj: JSON = {
        "apiVersion": "example.com/v1",
        "kind": "Widget",
        "metadata": {"name": "w"},
        "spec": {"config": {"anything": [1]}},
    }
    schema.apply_defaults(widget.schema, obj)
    assert obj["spec"]["color"] == "red"
    assert schema.validate(widget.schema, obj) == []
    obj["spec"]["shape"] = "round"
    assert fields_of(schema.validate(widget.schema, obj)) == {"spec.shape"}


def test_version_priority_orders_like_kubernetes() -> None:
    names = ["v1alpha1", "foo", "v2", "v1beta2", "v1", "v1beta1", "v10"]
    assert sorted(names, key=version_priority) == [
        "v10",
        "v2",
        "v1",
        "v1beta2",
        "v1beta1",
        "v1alpha1",
        "foo",
    ]


# --------------------------------------------------------------------------- validation


def test_valid_crd_has_no_causes() -> None:
    assert validate_crd(widget_crd(), None) == []


def test_name_must_be_plural_dot_group() -> None:
    crd = widget_crd()
    crd["metadata"]["name"] = "widget.example.com"
    assert fields_of(validate_crd(crd, None)) == {"metadata.name"}


def test_group_needs_a_dot() -> None:
    crd = widget_crd(group="example")
    crd["metadata"]["name"] = "widgets.example"
    assert "spec.group" in fields_of(validate_crd(crd, None))


def test_exactly_one_storage_version() -> None:
    crd = widget_crd()
    crd["spec"]["versions"][0]["storage"] = True
    causes = validate_crd(crd, None)
    assert any("exactly one version marked as storage" in c.message for c in causes)


def test_duplicate_version_names_are_refused() -> None:
    crd = widget_crd()
    crd["spec"]["versions"][2]["name"] = "v1"
    assert "spec.versions[2].name" in fields_of(validate_crd(crd, None))


def test_served_schema_is_required() -> None:
    crd = widget_crd()
    del crd["spec"]["versions"][0]["schema"]
    assert "spec.versions[0].schema.openAPIV3Schema" in fields_of(validate_crd(crd, None))


def test_non_structural_schema_is_refused() -> None:
    crd = widget_crd()
    bad = copy.deepcopy(WIDGET_SCHEMA)
    bad["properties"]["spec"]["properties"]["tags"] = {"type": "array"}
    bad["properties"]["spec"]["properties"]["loose"] = {"description": "no type"}
    crd["spec"]["versions"][1]["schema"]["openAPIV3Schema"] = bad
    spec_path = "spec.versions[1].schema.openAPIV3Schema.properties[spec]"
    assert fields_of(validate_crd(crd, None)) == {
        f"{spec_path}.properties[tags].items",
        f"{spec_path}.properties[loose].type",
    }


def test_default_must_validate_against_its_schema() -> None:
    crd = widget_crd()
    bad = copy.deepcopy(WIDGET_SCHEMA)
    bad["properties"]["spec"]["properties"]["color"]["default"] = "blue"
    crd["spec"]["versions"][1]["schema"]["openAPIV3Schema"] = bad
    path = "spec.versions[1].schema.openAPIV3Schema.properties[spec].properties[color].default"
    assert fields_of(validate_crd(crd, None)) == {path}


def test_list_map_keys_must_be_required_or_defaulted() -> None:
    node = {
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["name"],
        "items": {"type": "object", "properties": {"name": {"type": "string"}}},
    }
    assert fields_of(structural_errors(node, "s")) == {"s.items.properties[name]"}


def test_scale_paths_must_point_into_spec_and_status() -> None:
    crd = widget_crd()
    crd["spec"]["versions"][1]["subresources"]["scale"]["specReplicasPath"] = ".status.replicas"
    path = "spec.versions[1].subresources.scale.specReplicasPath"
    assert fields_of(validate_crd(crd, None)) == {path}


def test_scope_is_immutable() -> None:
    old = widget_crd()
    new = widget_crd(scope="Cluster")
    assert fields_of(validate_crd(new, old)) == {"spec.scope"}


def test_stored_versions_cannot_be_dropped() -> None:
    old = widget_crd()
    old["status"] = {"storedVersions": ["v1beta1", "v1"]}
    new = widget_crd()
    new["spec"]["versions"] = new["spec"]["versions"][1:]
    assert fields_of(validate_crd(new, old)) == {"status.storedVersions[0]"}


def test_crd_kind_schema_accepts_the_widget_crd() -> None:
    crd_type = next(t for t in core_resource_types() if t.kind == "CustomResourceDefinition")
    assert crd_type.schema is not None and crd_type.validate is validate_crd
    crd = widget_crd()
    schema.apply_defaults(crd_type.schema, crd)
    assert schema.validate(crd_type.schema, crd) == []


# --------------------------------------------------------------------------- upstream CRDs


def upstream_crds() -> list[Path]:
    folders = ("cdi-v1.66.0", "network")
    return sorted(p for folder in folders for p in (SCHEMAS / folder).glob("*.yaml"))


def upstream_schemas() -> list[Path]:
    return sorted((SCHEMAS / "kubevirt-v1.9.0").glob("*.yaml"))


@pytest.mark.parametrize("path", upstream_crds(), ids=lambda p: p.name)
def test_upstream_crds_are_accepted(path: Path) -> None:
    crd = yaml.load(path.read_text(), Loader=LOADER)
    crd_type = next(t for t in core_resource_types() if t.kind == "CustomResourceDefinition")
    assert crd_type.schema is not None
    schema.apply_defaults(crd_type.schema, crd)  # drops generated `status: {conditions: null}`
    assert schema.validate(crd_type.schema, crd) == []
    assert validate_crd(crd, None) == []
    assert crd_resource_types(crd)


@pytest.mark.parametrize("path", upstream_schemas(), ids=lambda p: p.name)
def test_kubevirt_schemas_are_structural(path: Path) -> None:
    document = yaml.load(path.read_text(), Loader=LOADER)
    assert structural_errors(document["openAPIV3Schema"], "s") == []
