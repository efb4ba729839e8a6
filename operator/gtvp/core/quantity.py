"""Kubernetes resource quantities (`500m`, `2`, `512Mi`, `1G`) as integers.

Only what placement needs: CPU in millicores and memory in bytes. Pure; a malformed
quantity raises `ValueError` naming it.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_Q = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([a-zA-Z]*)$")
_SUFFIX = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
}


def _decimal(text: str) -> Decimal:
    m = _Q.match(str(text).strip())
    if m is None or m.group(2) not in _SUFFIX:
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    try:
        return Decimal(m.group(1)) * _SUFFIX[m.group(2)]
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only numbers
        raise ValueError(f"{text!r} is not a Kubernetes quantity") from exc


def cpu_millis(text: str | int | float) -> int:
    return int((_decimal(str(text)) * 1000).to_integral_value(rounding="ROUND_CEILING"))


def memory_bytes(text: str | int | float) -> int:
    return int(_decimal(str(text)).to_integral_value(rounding="ROUND_CEILING"))


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
