"""Kubernetes quantities parsed as Kubernetes parses them: gtvp.core.quantity against
`kubernetes.utils.parse_quantity` (the client's parser, which follows apimachinery's
`resource.Quantity`), on the grammar's every form and on generated ones."""

from __future__ import annotations

from decimal import Context, Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kubernetes.utils import parse_quantity as kubernetes_parse

from gtvp.core.quantity import (
    cpu_millis,
    cpu_quantity,
    memory_bytes,
    memory_quantity,
    parse_quantity,
)

ACCEPTED = [
    "0", "1", "+1", "-1", ".5", "1.", "1.5", "0.1m", "500m", "100u", "5n", "2k", "1M", "1G",
    "1T", "1P", "1E", "1Ki", "512Mi", "1Gi", "1Ti", "1Pi", "1Ei", "1e3", "1E3", "1e-3", "1e+3",
    "1.5e3", "-1.5E-2", "+.5Gi", "123456789012345678901234567890",
]  # fmt: skip
REFUSED = ["", "1e", "e3", "Mi", "1mi", "1ki", "1Ki ", " 1", "1 Mi", "1..5", ".", "+", "1i", "1Zi"]
REFUSED += ["1x", "--1", "1e3.5", "1e3Ki", "0x10", "1K", "NaN", "Infinity", "1_000", "1.5.5"]


def _agrees(text: str) -> bool:
    """gtvp's value is the client's, or the client's is it rounded as the client rounds a
    scaled number (Python's default decimal context, 28 digits): gtvp keeps every digit."""
    ours, theirs = parse_quantity(text), kubernetes_parse(text)
    return bool(ours == theirs or Context(prec=28).plus(ours) == theirs)


@pytest.mark.parametrize("text", ACCEPTED)
def test_accepted_as_kubernetes_does_with_its_value(text: str) -> None:
    assert _agrees(text)


@pytest.mark.parametrize("text", REFUSED)
def test_malformed_quantities_are_refused_naming_them(text: str) -> None:
    with pytest.raises(ValueError, match="Kubernetes quantity"):
        parse_quantity(text)


def test_where_the_client_is_more_lenient_than_the_api_server_gtvp_follows_the_server() -> None:
    """apimachinery refuses these (`k` is the only kilo; no NaN, no digit separators); the
    Python client's Decimal-based parser lets them through."""
    for text in ("1K", "NaN", "1_000"):
        kubernetes_parse(text)  # accepted there
        with pytest.raises(ValueError, match="not a Kubernetes quantity"):
            parse_quantity(text)


SUFFIXES = ["", "n", "u", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]


@st.composite
def quantities(draw: st.DrawFn) -> str:
    sign = draw(st.sampled_from(["", "+", "-"]))
    whole = draw(st.text("0123456789", max_size=6))
    frac = draw(st.none() | st.text("0123456789", max_size=6))
    if not whole and not frac:
        whole = "0"
    number = whole + ("" if frac is None else "." + frac)
    if number == ".":
        number = "0"
    exponent = draw(st.integers(-20, 20).map(lambda e: f"{draw(st.sampled_from('eE'))}{e:+d}"))
    suffix = draw(st.sampled_from([*SUFFIXES, exponent]))
    return sign + number + suffix


@given(quantities())
def test_every_form_of_the_grammar_has_the_clients_value(text: str) -> None:
    assert _agrees(text)


def test_cpu_in_millicores_and_memory_in_bytes_rounded_up() -> None:
    assert cpu_millis("1e3") == 1_000_000
    assert cpu_millis(".5") == 500
    assert cpu_millis("100u") == 1  # 0.1 millicores, rounded up
    assert cpu_millis(2) == 2000
    assert memory_bytes("1Ei") == 2**60
    assert memory_bytes("+1") == 1
    assert memory_bytes("1.5Ki") == 1536
    assert memory_bytes(1.5) == 2
    assert parse_quantity("1e-3") == Decimal("0.001")


@given(st.integers(0, 10**7))
def test_cpu_written_back_reads_the_same(millis: int) -> None:
    written = cpu_quantity(millis)
    assert cpu_millis(written) == millis
    assert kubernetes_parse(written) * 1000 == millis


@given(st.integers(0, 2**50))
def test_memory_written_back_reads_the_same_in_its_shortest_binary_form(n: int) -> None:
    written = memory_quantity(n)
    assert memory_bytes(written) == n == kubernetes_parse(written)


def test_quantities_are_written_as_a_person_would() -> None:
    assert [memory_quantity(n) for n in (3 * 2**30, 1536 * 2**20, 1000)] == [
        "3Gi",
        "1536Mi",
        "1000",
    ]
    assert [cpu_quantity(m) for m in (2000, 100, 1500)] == ["2", "100m", "1500m"]
