"""Kubernetes resource quantities (`500m`, `2`, `512Mi`, `1G`, `1e3`, `.5`, `+1`, `1Ei`).

The grammar and values of Kubernetes' `resource.Quantity` (apimachinery), which
`kubernetes.utils.parse_quantity` follows too (tests/unit/test_quantity.py compares them):

    quantity  ::= sign? number suffix?
    number    ::= digits | digits "." digits? | "." digits
    suffix    ::= binarySI | decimalSI | ("e" | "E") sign? digits
    binarySI  ::= Ki | Mi | Gi | Ti | Pi | Ei          (powers of 1024)
    decimalSI ::= n | u | m | k | M | G | T | P | E    (powers of 1000)

Written here rather than imported: the core stays free of the Kubernetes client. Where
`parse_quantity` is more lenient than the API server (`1K`, `NaN`, `1_000`, spaces), this
module refuses as the API server does. Placement needs CPU in millicores and memory in
bytes, each rounded up. Pure; a malformed quantity raises `ValueError` naming it.
"""

from __future__ import annotations

import re
from decimal import Decimal, localcontext

_Q = re.compile(
    r"(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?:(?P<si>[KMGTPE]i|[numkMGTPE])|[eE](?P<exp>[+-]?[0-9]+))?"
)
_BINARY = {p: 10 * (i + 1) for i, p in enumerate("KMGTPE")}  # Ki = 2**10 ... Ei = 2**60
_DECIMAL = {"n": -9, "u": -6, "m": -3, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_MAX_EXPONENT = 1000
"""Far beyond any resource (apimachinery's int64 scale tops out near 10**18 * 10**18)."""


def parse_quantity(text: str | int | float) -> Decimal:
    """The exact value of a Kubernetes quantity."""
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    m = _Q.fullmatch(str(text))
    if m is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    number, si, exp = m.group("number"), m.group("si"), m.group("exp")
    if exp is not None and abs(int(exp)) > _MAX_EXPONENT:
        raise ValueError(f"{text!r} is out of range for a Kubernetes quantity")
    with localcontext() as ctx:
        ctx.prec = 80  # exact for every value in range (1Ei, 18 decimal exponent digits)
        value = Decimal(number)
        if si is not None and si.endswith("i"):
            return value * Decimal(2) ** _BINARY[si[0]]
        if si is not None:
            return value.scaleb(_DECIMAL[si])
        return value.scaleb(int(exp)) if exp is not None else value


def cpu_millis(text: str | int | float) -> int:
    return int((parse_quantity(text) * 1000).to_integral_value(rounding="ROUND_CEILING"))


def memory_bytes(text: str | int | float) -> int:
    return int(parse_quantity(text).to_integral_value(rounding="ROUND_CEILING"))


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def cpu_quantity(millis: int) -> str:
    """Millicores as Kubernetes writes them: whole CPUs plain, else in m."""
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


def memory_quantity(n: int) -> str:
    """Bytes in the largest binary suffix that divides them (2Gi, 512Mi, 1000)."""
    for suffix, size in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if n and n % size == 0:
            return f"{n // size}{suffix}"
    return str(n)
