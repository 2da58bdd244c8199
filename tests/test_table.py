"""Table rendering for ``kubectl get``: columns, typed cells, ages and the JSONPath dialect."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from vmo.api.types import PrinterColumn
from vmo.apiserver.table import (
    JsonPathError,
    TableError,
    go_float,
    human_duration,
    jsonpath,
    to_table,
)

NOW = datetime(2025, 1, 10, 12, 0, 0, tzinfo=UTC)

VMI: dict[str, Any] = {
    "apiVersion": "kubevirt.io/v1",
    "kind": "VirtualMachineInstance",
    "metadata": {
        "name": "vm-a",
        "namespace": "default",
        "creationTimestamp": "2025-01-10T11:55:00Z",
        "labels": {"kubevirt.io/size": "small"},
    },
    "spec": {"domain": {"cpu": {"cores": 2}}},
    "status": {
        "phase": "Running",
        "nodeName": "node-1",
        "interfaces": [{"name": "default", "ipAddress": "10.0.0.5"}, {"ipAddress": "10.0.0.6"}],
        "conditions": [
            {"type": "LiveMigratable", "status": "False"},
            {"type": "Ready", "status": "True"},
        ],
    },
}

# KubeVirt's own VMI printer columns.
VMI_COLUMNS = (
    PrinterColumn("Age", "date", ".metadata.creationTimestamp"),
    PrinterColumn("Phase", "string", ".status.phase"),
    PrinterColumn("IP", "string", ".status.interfaces[0].ipAddress"),
    PrinterColumn("NodeName", "string", ".status.nodeName"),
    PrinterColumn("Ready", "string", ".status.conditions[?(@.type=='Ready')].status"),
    PrinterColumn(
        "Live-Migratable",
        "string",
        ".status.conditions[?(@.type=='LiveMigratable')].status",
        priority=1,
    ),
)


def test_table_has_name_column_first_then_kind_columns() -> None:
    table = to_table([VMI], VMI_COLUMNS, resource_version="42", now=NOW)
    names = [c["name"] for c in table["columnDefinitions"]]
    assert names == ["Name", "Age", "Phase", "IP", "NodeName", "Ready", "Live-Migratable"]
    assert table["columnDefinitions"][0] | {"description": ""} == {
        "name": "Name",
        "type": "string",
        "format": "name",
        "description": "",
        "priority": 0,
    }
    assert table["columnDefinitions"][-1]["priority"] == 1


def test_table_rows_render_kubevirt_columns() -> None:
    table = to_table([VMI], VMI_COLUMNS, resource_version="42", now=NOW)
    assert table["rows"][0]["cells"] == [
        "vm-a",
        "5m",
        "Running",
        "10.0.0.5",
        "node-1",
        "True",
        "False",
    ]


def test_table_envelope() -> None:
    table = to_table([], VMI_COLUMNS, resource_version="42", continue_token="c1", now=NOW)
    assert (table["kind"], table["apiVersion"]) == ("Table", "meta.k8s.io/v1")
    assert table["metadata"] == {"resourceVersion": "42", "continue": "c1"}
    assert table["rows"] == []


def test_column_description_defaults_to_its_path() -> None:
    table = to_table([], [PrinterColumn("Phase", "string", ".status.phase")], resource_version="1")
    assert ".status.phase" in table["columnDefinitions"][1]["description"]


def test_default_columns_are_name_and_age() -> None:
    table = to_table([VMI], [], resource_version="1", now=NOW)
    assert [(c["name"], c["type"]) for c in table["columnDefinitions"]] == [
        ("Name", "string"),
        ("Age", "date"),
    ]
    assert table["rows"][0]["cells"] == ["vm-a", "5m"]


def test_row_object_is_partial_metadata_by_default() -> None:
    row = to_table([VMI], [], resource_version="1", now=NOW)["rows"][0]
    assert row["object"] == {
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": VMI["metadata"],
    }


@pytest.mark.parametrize(("mode", "expected"), [("Object", VMI), ("None", None)])
def test_include_object_modes(mode: str, expected: Any) -> None:
    row = to_table([VMI], [], include_object=mode, resource_version="1", now=NOW)["rows"][0]
    assert row["object"] == expected


def test_unknown_include_object_is_refused() -> None:
    with pytest.raises(TableError, match='unrecognized includeObject value: "Everything"'):
        to_table([VMI], [], include_object="Everything", resource_version="1")


CELL_CASES: list[tuple[str, Any, Any]] = [
    ("integer", 3, 3),
    ("integer", 3.9, 3),
    ("integer", "3", None),
    ("integer", True, None),
    ("number", 2, 2.0),
    ("number", 2.5, 2.5),
    ("boolean", True, True),
    ("boolean", "true", None),
    ("string", "x", "x"),
    ("string", 5, "5"),
    ("string", 1.5, "1.5"),
    ("string", False, "false"),
    ("string", {"b": 1, "a": [1, 2]}, '{"a":[1,2],"b":1}'),
    ("string", "", ""),
    ("string", None, None),
    ("date", "2025-01-10T09:00:00Z", "3h"),
    ("date", "2025-01-10T11:59:30.5+00:00", "29s"),
    ("date", "yesterday", "<invalid>"),
    ("date", "", "<unknown>"),
    ("date", 12, None),
]


@pytest.mark.parametrize(("column_type", "value", "expected"), CELL_CASES)
def test_cells_are_typed_like_crd_columns(column_type: str, value: Any, expected: Any) -> None:
    obj = {"metadata": {"name": "x"}, "spec": {"v": value}}
    table = to_table(
        [obj], [PrinterColumn("V", column_type, ".spec.v")], resource_version="1", now=NOW
    )
    assert table["rows"][0]["cells"][1] == expected


def test_missing_value_is_null_cell() -> None:
    table = to_table([VMI], [PrinterColumn("X", "string", ".status.nope")], resource_version="1")
    assert table["rows"][0]["cells"] == ["vm-a", None]


# kubectl's ages, per duration.HumanDuration.
DURATIONS: list[tuple[float, str]] = [
    (-5, "<invalid>"),
    (-1.5, "0s"),
    (0, "0s"),
    (59, "59s"),
    (119, "119s"),
    (120, "2m"),
    (125, "2m5s"),
    (9 * 60 + 59, "9m59s"),
    (10 * 60 + 30, "10m"),
    (179 * 60, "179m"),
    (3 * 3600, "3h"),
    (3 * 3600 + 2 * 60, "3h2m"),
    (8 * 3600 + 59 * 60, "8h"),
    (47 * 3600, "47h"),
    (48 * 3600, "2d"),
    (50 * 3600, "2d2h"),
    (8 * 86400, "8d"),
    (729 * 86400, "729d"),
    (730 * 86400, "2y"),
    (770 * 86400, "2y40d"),
    (8 * 365 * 86400, "8y"),
]


@pytest.mark.parametrize(("seconds", "expected"), DURATIONS)
def test_human_duration_matches_kubectl(seconds: float, expected: str) -> None:
    assert human_duration(timedelta(seconds=seconds)) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1.5, "1.5"), (2.0, "2"), (-0.25, "-0.25"), (123456.0, "123456"), (1e6, "1e+06"),
     (1.25e-5, "1.25e-05"), (0.0001, "0.0001"), (0.0, "0")],
)  # fmt: skip
def test_floats_print_as_go_does(value: float, expected: str) -> None:
    assert go_float(value) == expected


JSONPATH_CASES: list[tuple[str, list[Any]]] = [
    (".metadata.name", ["vm-a"]),
    ("{.metadata.name}", ["vm-a"]),
    ("$.metadata.name", ["vm-a"]),
    (".metadata.labels.kubevirt\\.io/size", ["small"]),
    (".metadata.labels['kubevirt.io/size']", ["small"]),
    (".spec.domain.cpu.cores", [2]),
    (".status.interfaces[0].ipAddress", ["10.0.0.5"]),
    (".status.interfaces[-1].ipAddress", ["10.0.0.6"]),
    (".status.interfaces[5].ipAddress", []),
    (".status.interfaces[*].ipAddress", ["10.0.0.5", "10.0.0.6"]),
    (".status.interfaces[*].name", ["default"]),
    (".status.interfaces[0:1].ipAddress", ["10.0.0.5"]),
    (".status.conditions[?(@.type=='Ready')].status", ["True"]),
    ('.status.conditions[?(@.type=="Ready")].status', ["True"]),
    (".status.conditions[?(@.type!='Ready')].type", ["LiveMigratable"]),
    (".status.interfaces[?(@.name)].ipAddress", ["10.0.0.5"]),
    (".spec.domain.cpu[?(@.cores==2)]", []),
    (".status.missing.deeper", []),
    (".status.phase.notamap", []),
]


@pytest.mark.parametrize(("expr", "expected"), JSONPATH_CASES)
def test_jsonpath_dialect(expr: str, expected: list[Any]) -> None:
    assert jsonpath(VMI, expr) == expected


def test_jsonpath_numeric_filter() -> None:
    disks = {"d": [{"n": "a", "size": 1}, {"n": "b", "size": 5}]}
    assert jsonpath(disks, ".d[?(@.size>2)].n") == ["b"]
    assert jsonpath(disks, ".d[?(@.size==1)].n") == ["a"]


@pytest.mark.parametrize("expr", ["..name", ".a[?(x==1)]", ".a[", ".a[foo]"])
def test_jsonpath_refuses_unsupported_syntax(expr: str) -> None:
    with pytest.raises(JsonPathError):
        jsonpath(VMI, expr)
