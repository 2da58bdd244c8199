"""Label and field selectors: parsing Kubernetes' query syntax and matching objects against it.

``parse_label_selector`` reads the ``labelSelector`` query parameter (``a=b,c in (x,y),!d``),
``label_selector_from_json`` a ``metav1.LabelSelector``; ``parse_field_selector`` reads the
``fieldSelector`` parameter. Errors are ``SelectorError`` with Kubernetes' wording.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from vmo.api.types import JSON

__all__ = [
    "FieldRequirement",
    "FieldSelector",
    "LabelSelector",
    "Operator",
    "Requirement",
    "SelectorError",
    "label_selector_from_json",
    "parse_field_selector",
    "parse_label_selector",
]


class SelectorError(ValueError):
    """A selector that cannot be parsed, or names a field the kind does not index."""


class Operator(enum.StrEnum):
    """Label requirement operators, spelled as in ``k8s.io/apimachinery/pkg/selection``."""

    IN = "in"
    NOT_IN = "notin"
    EQUALS = "="
    DOUBLE_EQUALS = "=="
    NOT_EQUALS = "!="
    EXISTS = "exists"
    DOES_NOT_EXIST = "!"
    GREATER_THAN = "gt"
    LESS_THAN = "lt"


# --------------------------------------------------------------------------- label selectors

_NAME_PART = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _label_key_error(key: str) -> str | None:
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return f'key: Invalid value: "{key}": prefix part must be a DNS-1123 subdomain'
    if not name or len(name) > 63 or not _NAME_PART.match(name):
        return (
            f'key: Invalid value: "{key}": name part must consist of alphanumeric characters, '
            "'-', '_' or '.', and must start and end with an alphanumeric character, "
            "with at most 63 characters"
        )
    return None


def _label_value_error(value: str, index: int) -> str | None:
    if len(value) <= 63 and _LABEL_VALUE.match(value):
        return None
    return (
        f'values[{index}][{value}]: Invalid value: "{value}": a valid label must be an empty '
        "string or consist of alphanumeric characters, '-', '_' or '.', and must start and end "
        "with an alphanumeric character, with at most 63 characters"
    )


@dataclass(frozen=True)
class Requirement:
    """One term of a label selector: a key, an operator and the values it compares with."""

    key: str
    operator: Operator
    values: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if error := _label_key_error(self.key):
            raise SelectorError(error)
        arity = _ARITY[self.operator]
        if arity == "set" and not self.values:
            raise SelectorError("for 'in', 'notin' operators, values set can't be empty")
        if arity == "one" and len(self.values) != 1:
            raise SelectorError("exact-match compatibility requires one single value")
        if arity == "none" and self.values:
            raise SelectorError("values set must be empty for exists and does not exist")
        if arity == "int" and not (len(self.values) == 1 and _is_int(self.values[0])):
            raise SelectorError("for 'Gt', 'Lt' operators, the value must be an integer")
        for index, value in enumerate(self.values):
            if arity != "int" and (error := _label_value_error(value, index)):
                raise SelectorError(error)

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key, "")
        match self.operator:
            case Operator.IN | Operator.EQUALS | Operator.DOUBLE_EQUALS:
                return present and value in self.values
            case Operator.NOT_IN | Operator.NOT_EQUALS:
                return not present or value not in self.values
            case Operator.EXISTS:
                return present
            case Operator.DOES_NOT_EXIST:
                return not present
            case Operator.GREATER_THAN | Operator.LESS_THAN:
                return present and _is_int(value) and self._compare(int(value))

    def _compare(self, value: int) -> bool:
        bound = int(self.values[0])
        return value > bound if self.operator is Operator.GREATER_THAN else value < bound

    def __str__(self) -> str:
        match self.operator:
            case Operator.EXISTS:
                return self.key
            case Operator.DOES_NOT_EXIST:
                return f"!{self.key}"
            case Operator.IN | Operator.NOT_IN:
                return f"{self.key} {self.operator.value} ({','.join(sorted(self.values))})"
            case Operator.GREATER_THAN:
                return f"{self.key}>{self.values[0]}"
            case Operator.LESS_THAN:
                return f"{self.key}<{self.values[0]}"
            case _:
                return f"{self.key}{self.operator.value}{self.values[0]}"


_ARITY: dict[Operator, str] = {
    Operator.IN: "set",
    Operator.NOT_IN: "set",
    Operator.EQUALS: "one",
    Operator.DOUBLE_EQUALS: "one",
    Operator.NOT_EQUALS: "one",
    Operator.EXISTS: "none",
    Operator.DOES_NOT_EXIST: "none",
    Operator.GREATER_THAN: "int",
    Operator.LESS_THAN: "int",
}


def _is_int(text: str) -> bool:
    return re.fullmatch(r"[+-]?[0-9]+", text) is not None


@dataclass(frozen=True)
class LabelSelector:
    """A conjunction of requirements; no requirements matches everything.

    ``nothing`` is the selector a null ``metav1.LabelSelector`` stands for: it matches no object.
    """

    requirements: tuple[Requirement, ...] = ()
    nothing: bool = False

    def matches(self, labels: Mapping[str, str] | None) -> bool:
        if self.nothing:
            return False
        labels = labels or {}
        return all(r.matches(labels) for r in self.requirements)

    @property
    def empty(self) -> bool:
        """True when the selector selects everything."""
        return not self.nothing and not self.requirements

    def __str__(self) -> str:
        ordered = sorted(self.requirements, key=lambda r: r.key)
        return ",".join(str(r) for r in ordered)


# Lexer ---------------------------------------------------------------------


class _Tok(enum.Enum):
    IDENT = "identifier"
    END = "end of string"
    COMMA = ","
    NOT = "!"
    NOT_EQUALS = "!="
    EQUALS = "="
    DOUBLE_EQUALS = "=="
    GT = ">"
    LT = "<"
    IN = "in"
    NOT_IN = "notin"
    OPEN = "("
    CLOSE = ")"


_SYMBOLS = ("!=", "==", "!", "=", ">", "<", "(", ")", ",")
_SPECIAL_CHARS = set("=!(),><")


def _lex(text: str) -> Iterator[tuple[_Tok, str]]:
    position = 0
    while position < len(text):
        char = text[position]
        if char.isspace():
            position += 1
            continue
        symbol = next((s for s in _SYMBOLS if text.startswith(s, position)), None)
        if symbol:
            position += len(symbol)
            yield _Tok(symbol), symbol
            continue
        start = position
        while (
            position < len(text)
            and not text[position].isspace()
            and text[position] not in _SPECIAL_CHARS
        ):
            position += 1
        word = text[start:position]
        keyword = {"in": _Tok.IN, "notin": _Tok.NOT_IN}.get(word, _Tok.IDENT)
        yield keyword, word
    yield _Tok.END, ""


class _LabelParser:
    """Recursive descent over the token list, following Kubernetes' selector grammar."""

    def __init__(self, text: str) -> None:
        self.tokens = list(_lex(text))
        self.position = 0

    def peek(self, *, values: bool = False) -> tuple[_Tok, str]:
        return self._as_value(self.tokens[self.position], values)

    def take(self, *, values: bool = False) -> tuple[_Tok, str]:
        token = self.peek(values=values)
        self.position = min(self.position + 1, len(self.tokens) - 1)
        return token

    @staticmethod
    def _as_value(token: tuple[_Tok, str], values: bool) -> tuple[_Tok, str]:
        # In value position the keywords are plain words: "a in (in, notin)" is legal.
        if values and token[0] in (_Tok.IN, _Tok.NOT_IN):
            return _Tok.IDENT, token[1]
        return token

    def parse(self) -> list[Requirement]:
        requirements: list[Requirement] = []
        while True:
            kind, literal = self.peek()
            if kind is _Tok.END:
                return requirements
            if kind not in (_Tok.IDENT, _Tok.NOT):
                raise SelectorError(
                    f"found '{literal}', expected: !, identifier, or 'end of string'"
                )
            try:
                requirements.append(self.requirement())
            except SelectorError as err:
                raise SelectorError(f"unable to parse requirement: {err}") from None
            kind, literal = self.take(values=True)
            if kind is _Tok.END:
                return requirements
            if kind is not _Tok.COMMA:
                raise SelectorError(f"found '{literal}', expected: ',' or 'end of string'")
            kind, literal = self.peek(values=True)
            if kind not in (_Tok.IDENT, _Tok.NOT):
                raise SelectorError(f"found '{literal}', expected: identifier after ','")

    def requirement(self) -> Requirement:
        negated = self.peek()[0] is _Tok.NOT
        if negated:
            self.take()
        kind, key = self.take()
        if kind is not _Tok.IDENT:
            raise SelectorError(f"found '{key}', expected: identifier")
        if error := _label_key_error(key):
            raise SelectorError(error)
        if negated:
            return Requirement(key, Operator.DOES_NOT_EXIST)
        if self.peek(values=True)[0] in (_Tok.END, _Tok.COMMA):
            return Requirement(key, Operator.EXISTS)
        operator = self.operator()
        if operator in (Operator.IN, Operator.NOT_IN):
            return Requirement(key, operator, self.value_set())
        return Requirement(key, operator, (self.exact_value(),))

    def operator(self) -> Operator:
        kind, literal = self.take()
        operators = {
            _Tok.IN: Operator.IN,
            _Tok.NOT_IN: Operator.NOT_IN,
            _Tok.EQUALS: Operator.EQUALS,
            _Tok.DOUBLE_EQUALS: Operator.DOUBLE_EQUALS,
            _Tok.NOT_EQUALS: Operator.NOT_EQUALS,
            _Tok.GT: Operator.GREATER_THAN,
            _Tok.LT: Operator.LESS_THAN,
        }
        if kind not in operators:
            raise SelectorError(f"found '{literal}', expected: in, notin, =, ==, !=, gt, lt")
        return operators[kind]

    def value_set(self) -> tuple[str, ...]:
        kind, literal = self.take()
        if kind is not _Tok.OPEN:
            raise SelectorError(f"found '{literal}', expected: '('")
        values: list[str] = []
        expect_value = True
        while True:
            kind, literal = self.take(values=True)
            if kind is _Tok.CLOSE:
                # "()" and a trailing comma both stand for the empty value, as upstream.
                return (*values, "") if expect_value else tuple(values)
            if kind is _Tok.COMMA and expect_value:
                values.append("")
            elif kind is _Tok.COMMA:
                expect_value = True
            elif kind is _Tok.IDENT and expect_value:
                values.append(literal)
                expect_value = False
            else:
                raise SelectorError(f"found '{literal}', expected: ',', ')' or identifier")

    def exact_value(self) -> str:
        kind, literal = self.peek(values=True)
        if kind in (_Tok.END, _Tok.COMMA):
            return ""
        self.take(values=True)
        if kind is not _Tok.IDENT:
            raise SelectorError(f"found '{literal}', expected: identifier")
        return literal


def parse_label_selector(text: str) -> LabelSelector:
    """Parse a ``labelSelector`` query string; the empty string selects everything."""
    return LabelSelector(tuple(_LabelParser(text).parse()))


_JSON_OPERATORS = {
    "In": Operator.IN,
    "NotIn": Operator.NOT_IN,
    "Exists": Operator.EXISTS,
    "DoesNotExist": Operator.DOES_NOT_EXIST,
}


def label_selector_from_json(selector: JSON | None) -> LabelSelector:
    """Convert a ``metav1.LabelSelector``; null selects nothing, ``{}`` selects everything."""
    if selector is None:
        return LabelSelector(nothing=True)
    requirements: list[Requirement] = []
    for key, value in sorted((selector.get("matchLabels") or {}).items()):
        requirements.append(Requirement(str(key), Operator.EQUALS, (str(value),)))
    for expression in selector.get("matchExpressions") or []:
        requirements.append(_expression_requirement(expression))
    return LabelSelector(tuple(requirements))


def _expression_requirement(expression: Any) -> Requirement:
    if not isinstance(expression, dict):
        raise SelectorError("matchExpressions entries must be objects")
    operator = expression.get("operator")
    if operator not in _JSON_OPERATORS:
        raise SelectorError(f'"{operator}" is not a valid label selector operator')
    values = tuple(str(v) for v in expression.get("values") or ())
    return Requirement(str(expression.get("key", "")), _JSON_OPERATORS[operator], values)


# --------------------------------------------------------------------------- field selectors


@dataclass(frozen=True)
class FieldRequirement:
    """One ``field=value`` or ``field!=value`` term; ``value`` is unescaped."""

    field: str
    value: str
    negated: bool = False

    def matches(self, actual: str) -> bool:
        return (actual == self.value) != self.negated


@dataclass(frozen=True)
class FieldSelector:
    """A conjunction of field requirements; ``matches`` reads fields through ``allowed`` paths."""

    requirements: tuple[FieldRequirement, ...] = ()

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(r.field for r in self.requirements)

    @property
    def empty(self) -> bool:
        return not self.requirements

    def check(self, allowed: Mapping[str, str]) -> None:
        """Refuse a selector naming a field the kind does not index."""
        for requirement in self.requirements:
            if requirement.field not in allowed:
                raise SelectorError(f"field label not supported: {requirement.field}")

    def matches(self, obj: Mapping[str, Any], allowed: Mapping[str, str]) -> bool:
        self.check(allowed)
        return all(r.matches(field_value(obj, allowed[r.field])) for r in self.requirements)

    def value_for(self, field: str) -> str | None:
        """The value an ``=`` term requires of ``field``, for index lookups; None if none."""
        for requirement in self.requirements:
            if requirement.field == field and not requirement.negated:
                return requirement.value
        return None

    def __str__(self) -> str:
        return ",".join(
            f"{r.field}{'!=' if r.negated else '='}{_escape_field_value(r.value)}"
            for r in self.requirements
        )


def field_value(obj: Mapping[str, Any], path: str) -> str:
    """The string form of the value at a dotted path; a missing field reads as ""."""
    node: Any = obj
    for part in path.strip(".").split("."):
        if not isinstance(node, Mapping) or part not in node:
            return ""
        node = node[part]
    if node is None:
        return ""
    if isinstance(node, bool):
        return "true" if node else "false"
    return str(node)


def _escape_field_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=")


def _split_unescaped(text: str, separators: tuple[str, ...]) -> Iterator[tuple[int, str]]:
    """Yield (index, separator) for each separator outside a backslash escape."""
    index = 0
    while index < len(text):
        if text[index] == "\\":
            index += 2
            continue
        for separator in separators:
            if text.startswith(separator, index):
                yield index, separator
                break
        index += 1


def _unescape_field_value(value: str) -> str:
    out: list[str] = []
    index = 0
    while index < len(value):
        char = value[index]
        if char == "\\":
            following = value[index + 1 : index + 2]
            if following not in ("\\", ",", "="):
                raise SelectorError(
                    f"invalid field selector: invalid escape sequence: \\{following}"
                )
            out.append(following)
            index += 2
            continue
        if char in ",=":
            raise SelectorError(f"invalid field selector: unescaped character in value: {char}")
        out.append(char)
        index += 1
    return "".join(out)


def _split_terms(text: str) -> list[str]:
    terms, start = [], 0
    for index, _ in _split_unescaped(text, (",",)):
        terms.append(text[start:index])
        start = index + 1
    terms.append(text[start:])
    return terms


def _field_term(selector: str, term: str) -> FieldRequirement:
    # At each position "!=" and "==" win over "=", so "a==b" is a==b and not a = "=b".
    for index, operator in _split_unescaped(term, ("!=", "==", "=")):
        field, value = term[:index].strip(), term[index + len(operator) :]
        return FieldRequirement(field, _unescape_field_value(value), operator == "!=")
    raise SelectorError(f"invalid selector: '{selector}'; can't understand '{term}'")


def parse_field_selector(text: str) -> FieldSelector:
    """Parse a ``fieldSelector`` query string; the empty string selects everything."""
    terms = [t for t in _split_terms(text) if t.strip()]
    return FieldSelector(tuple(_field_term(text, term) for term in terms))
