"""Label and field selectors: Kubernetes' query syntax, its errors, and matching."""

from __future__ import annotations

from typing import Any

import pytest

from vmo.apiserver.selectors import (
    LabelSelector,
    Operator,
    SelectorError,
    label_selector_from_json,
    parse_field_selector,
    parse_label_selector,
)

LABELS = {"app": "web", "tier": "frontend", "version": "3", "empty": ""}

# (selector, matches LABELS)
LABEL_CASES: list[tuple[str, bool]] = [
    ("", True),
    ("app=web", True),
    ("app==web", True),
    ("app=db", False),
    ("app!=db", True),
    ("app!=web", False),
    ("missing!=x", True),
    ("app in (web, db)", True),
    ("app in (db)", False),
    ("missing in (x)", False),
    ("app notin (db,cache)", True),
    ("app notin (web)", False),
    ("missing notin (x)", True),
    ("app", True),
    ("missing", False),
    ("!missing", True),
    ("!app", False),
    ("app=web,tier=frontend", True),
    ("app=web,tier=backend", False),
    ("app=web, !missing ,tier in (frontend)", True),
    ("empty=", True),
    ("empty in ()", True),
    ("app=", False),
    ("version>2", True),
    ("version<3", False),
    ("app>1", False),
    ("app in (in, notin, web)", True),
    ("example.com/role", False),
]


@pytest.mark.parametrize(("selector", "expected"), LABEL_CASES)
def test_label_selector_matches_like_kubernetes(selector: str, expected: bool) -> None:
    assert parse_label_selector(selector).matches(LABELS) is expected


LABEL_ERRORS: list[tuple[str, str]] = [
    ("app=web,", "expected: identifier after ','"),
    ("app in web", "unable to parse requirement: found 'web', expected: '('"),
    ("app in (web", "expected: ',', ')' or identifier"),
    ("app in ()x", "expected: ',' or 'end of string'"),
    ("!app=web", "found '=', expected: ',' or 'end of string'"),
    ("=web", "expected: !, identifier, or 'end of string'"),
    ("app web", "expected: in, notin, =, ==, !=, gt, lt"),
    ("app=we b", "expected: ',' or 'end of string'"),
    ("app=-bad-", "Invalid value"),
    ("-bad-=x", "name part must consist"),
    ("Bad_Prefix/app=x", "prefix part"),
    ("app>x", "must be an integer"),
]


@pytest.mark.parametrize(("selector", "message"), LABEL_ERRORS)
def test_label_selector_errors_use_kubernetes_wording(selector: str, message: str) -> None:
    with pytest.raises(SelectorError) as caught:
        parse_label_selector(selector)
    assert message in str(caught.value)


def test_label_selector_parses_requirements() -> None:
    selector = parse_label_selector("a in (x,y),!b,c!=d")
    assert [(r.key, r.operator, r.values) for r in selector.requirements] == [
        ("a", Operator.IN, ("x", "y")),
        ("b", Operator.DOES_NOT_EXIST, ()),
        ("c", Operator.NOT_EQUALS, ("d",)),
    ]


def test_label_selector_string_form_round_trips() -> None:
    text = str(parse_label_selector("z=1, a in (y,x), !b, c"))
    assert text == "a in (x,y),!b,c,z=1"
    assert str(parse_label_selector(text)) == text


def test_empty_label_selector_selects_everything() -> None:
    selector = parse_label_selector("  ")
    assert selector.empty and selector.matches({}) and selector.matches(None)


JSON_CASES: list[tuple[Any, dict[str, str], bool]] = [
    ({}, {}, True),
    ({"matchLabels": {"app": "web"}}, {"app": "web"}, True),
    ({"matchLabels": {"app": "web"}}, {"app": "db"}, False),
    (
        {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "db"]}]},
        {"app": "db"},
        True,
    ),
    ({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["db"]}]}, {}, True),
    ({"matchExpressions": [{"key": "app", "operator": "Exists"}]}, {"app": ""}, True),
    ({"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}, {"app": ""}, False),
    (
        {
            "matchLabels": {"rbac.vmo.dev/aggregate-to-admin": "true"},
            "matchExpressions": [{"key": "tier", "operator": "Exists"}],
        },
        {"rbac.vmo.dev/aggregate-to-admin": "true"},
        False,
    ),
    (None, {"app": "web"}, False),
]


@pytest.mark.parametrize(("selector", "labels", "expected"), JSON_CASES)
def test_label_selector_from_json(selector: Any, labels: dict[str, str], expected: bool) -> None:
    assert label_selector_from_json(selector).matches(labels) is expected


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ({"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]}, "not a valid"),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": []}]}, "can't be empty"),
        ({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}, "empty"),
        ({"matchLabels": {"a": "not valid"}}, "Invalid value"),
    ],
)
def test_label_selector_from_json_refuses_invalid(selector: Any, message: str) -> None:
    with pytest.raises(SelectorError, match=message):
        label_selector_from_json(selector)


def test_null_json_selector_is_nothing_not_everything() -> None:
    assert label_selector_from_json(None) == LabelSelector(nothing=True)


# --------------------------------------------------------------------------- field selectors

ALLOWED = {
    "metadata.name": "metadata.name",
    "metadata.namespace": "metadata.namespace",
    "status.phase": "status.phase",
    "status.nodeName": "status.nodeName",
    "spec.running": "spec.running",
}
VMI = {
    "metadata": {"name": "vm-a", "namespace": "default"},
    "spec": {"running": True},
    "status": {"phase": "Running"},
}

FIELD_CASES: list[tuple[str, bool]] = [
    ("", True),
    ("metadata.name=vm-a", True),
    ("metadata.name==vm-a", True),
    ("metadata.name!=vm-a", False),
    ("metadata.name=vm-b", False),
    ("metadata.name=vm-a,status.phase=Running", True),
    ("metadata.name=vm-a,status.phase!=Running", False),
    ("status.nodeName=", True),
    ("status.nodeName!=", False),
    ("spec.running=true", True),
    ("metadata.namespace=default,", True),
]


@pytest.mark.parametrize(("selector", "expected"), FIELD_CASES)
def test_field_selector_matches(selector: str, expected: bool) -> None:
    assert parse_field_selector(selector).matches(VMI, ALLOWED) is expected


@pytest.mark.parametrize(
    ("selector", "field", "value"),
    [
        (r"a=x\,y", "a", "x,y"),
        (r"a=x\=y", "a", "x=y"),
        (r"a=x\\y", "a", "x\\y"),
        ("a==b", "a", "b"),
        ("a!=b", "a", "b"),
    ],
)
def test_field_selector_unescapes_values(selector: str, field: str, value: str) -> None:
    (requirement,) = parse_field_selector(selector).requirements
    assert (requirement.field, requirement.value) == (field, value)


def test_field_selector_escaped_comma_does_not_split_terms() -> None:
    selector = parse_field_selector(r"a=x\,y,b=z")
    assert [(r.field, r.value) for r in selector.requirements] == [("a", "x,y"), ("b", "z")]


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ("metadata.name", "invalid selector: 'metadata.name'; can't understand 'metadata.name'"),
        (r"a=b\x", "invalid escape sequence"),
        ("a=b=c", "unescaped character in value"),
    ],
)
def test_field_selector_parse_errors(selector: str, message: str) -> None:
    with pytest.raises(SelectorError, match=message):
        parse_field_selector(selector)


def test_unknown_field_is_refused_with_kubernetes_message() -> None:
    selector = parse_field_selector("spec.nodeName=n1")
    with pytest.raises(SelectorError, match=r"^field label not supported: spec\.nodeName$"):
        selector.matches(VMI, ALLOWED)


def test_field_selector_exposes_fields_and_values() -> None:
    selector = parse_field_selector("metadata.name=a,status.phase!=Failed")
    assert selector.fields == {"metadata.name", "status.phase"}
    assert selector.value_for("metadata.name") == "a"
    assert selector.value_for("status.phase") is None


def test_field_selector_string_form_escapes_values() -> None:
    selector = parse_field_selector(r"a=x\,y,b!=z")
    assert str(selector) == r"a=x\,y,b!=z"
