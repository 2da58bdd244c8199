"""Kubernetes ``resource.Quantity`` values (``"2Gi"``, ``"500m"``, ``"1e3"``) as exact decimals.

The grammar is upstream's: a signed decimal number followed by a binary suffix (Ki..Ei), a
decimal suffix (n, u, m, k, M, G, T, P, E) or a decimal exponent (``e3``, ``E-2``).

Upstream documents that no quantity may be greater than 2^63-1 in magnitude (it caps larger
ones). VMO refuses them instead, with ``QuantityRangeError``: a capped ``"1e400"`` would be a
silent surprise, and an uncapped one turns into a float infinity in whoever converts it.
"""

from __future__ import annotations

import re
from decimal import Decimal

__all__ = [
    "MAX_QUANTITY",
    "QUANTITY_PATTERN",
    "QuantityError",
    "QuantityRangeError",
    "parse_quantity",
]

# The largest magnitude upstream lets a quantity have: int64's maximum.
MAX_QUANTITY = Decimal(2**63 - 1)
# Kubernetes resource.Quantity as the apiextensions server checks it (the pattern every CRD
# generated from a Quantity field carries); a schema node with it is a quantity.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
# An exponent of more digits puts any non-zero number out of range (or below a nano); checking
# the length first keeps such exponents from Decimal, whose context overflows past 10^999999.
_MAX_EXPONENT_DIGITS = 4

_BINARY_SUFFIXES = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
_DECIMAL_EXPONENTS = {
    "n": -9,
    "u": -6,
    "m": -3,
    "": 0,
    "k": 3,
    "M": 6,
    "G": 9,
    "T": 12,
    "P": 15,
    "E": 18,
}
_QUANTITY = re.compile(
    r"(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?:[eE](?P<exponent>[+-]?[0-9]+)|(?P<suffix>[KMGTPE]i|[numkMGTPE])?)"
)


class QuantityError(ValueError):
    """A string that is not a Kubernetes quantity; the message says which and why."""


class QuantityRangeError(QuantityError):
    """A well-formed quantity whose magnitude is past ``MAX_QUANTITY`` (2^63-1)."""

    def __init__(self, value: str | int) -> None:
        super().__init__(
            f"quantity {value!r} is out of range: its magnitude may not be more than "
            f"2^63-1 ({MAX_QUANTITY})"
        )
        self.value = value


def parse_quantity(value: str | int) -> Decimal:
    """The exact value of a quantity: ``parse_quantity("1Gi") == Decimal(1073741824)``.

    Raises ``QuantityError`` for what is not a quantity, and its subclass
    ``QuantityRangeError`` for one past 2^63-1 in magnitude; every value returned is finite
    and converts to ``int`` or ``float`` without overflow.
    """
    if isinstance(value, bool):
        raise QuantityError(f"quantity must be a string or an integer, not {value!r}")
    if isinstance(value, int):
        exact = Decimal(value)
    elif isinstance(value, str):
        exact = _parse_string(value)
    else:
        raise QuantityError(f"quantity must be a string or an integer, not {type(value).__name__}")
    if abs(exact) > MAX_QUANTITY:
        raise QuantityRangeError(value)
    return exact


def _parse_string(value: str) -> Decimal:
    match = _QUANTITY.fullmatch(value)
    if match is None:
        raise QuantityError(
            f"quantities must match the regular expression "
            f"'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$': {value!r}"
        )
    number = Decimal(match["number"])
    suffix = match["suffix"] or ""
    if suffix in _BINARY_SUFFIXES:
        return number * _BINARY_SUFFIXES[suffix]
    exponent = match["exponent"]
    if exponent is None:
        return number.scaleb(_DECIMAL_EXPONENTS[suffix])
    if number and len(exponent.lstrip("+-").lstrip("0")) > _MAX_EXPONENT_DIGITS:
        if exponent.startswith("-"):
            raise QuantityError(f"quantity {value!r} has an exponent out of range")
        raise QuantityRangeError(value)
    # within the default context: 28 digits hold every in-range value to the nano, and
    # exponents of four digits stay far from its limit of 10^999999
    return number.scaleb(int(exponent)) if number else Decimal(0)
