"""Property: no mutation of a real quote ever verifies, and nothing but gtvp's errors escape."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gtvp.core.errors import VerificationError
from gtvp.core.quote import verify_quote
from gtvp_local.swtpm import Swtpm
from tests.tpmkit import RealQuote, real_quote

pytestmark = pytest.mark.tpm


@pytest.fixture(scope="module")
def quote(shared_tpm: Swtpm, tpm_dir: Path) -> RealQuote:
    q = real_quote(shared_tpm.tcti, tpm_dir / "agent-shared")
    verify_quote(q.evidence(), q.expectation())
    return q


mutation = st.tuples(
    st.sampled_from(["attest", "signature"]),
    st.sampled_from(["flip", "insert", "delete", "truncate", "append"]),
    st.integers(min_value=0, max_value=10_000),
    st.integers(min_value=1, max_value=255),
)


def _mutate(data: bytes, how: str, pos: int, byte: int) -> bytes:
    if not data:
        return bytes([byte])
    pos = pos % (len(data) + 1)

    if how == "flip":
        pos = min(pos, len(data) - 1)
        return data[:pos] + bytes([data[pos] ^ byte]) + data[pos + 1 :]
    if how == "insert":
        return data[:pos] + bytes([byte]) + data[pos:]
    if how == "delete":
        pos = min(pos, len(data) - 1)
        return data[:pos] + data[pos + 1 :]
    if how == "truncate":
        return data[: min(pos, len(data) - 1)]
    return data + bytes([byte]) * (1 + pos % 64)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(mutation, min_size=1, max_size=3))
def test_no_mutated_quote_verifies(
    quote: RealQuote, mutations: list[tuple[str, str, int, int]]
) -> None:
    attest, signature = quote.quote.attest, quote.quote.signature
    for field, how, pos, byte in mutations:
        if field == "attest":
            attest = _mutate(attest, how, pos, byte)
        else:
            signature = _mutate(signature, how, pos, byte)
    if (attest, signature) == (quote.quote.attest, quote.quote.signature):
        return  # mutations that cancel out are not mutations
    with pytest.raises(VerificationError):
        verify_quote(quote.evidence(attest=attest, signature=signature), quote.expectation())


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.dictionaries(st.sampled_from(range(8)), st.binary(min_size=0, max_size=40), min_size=1))
def test_no_changed_pcr_value_verifies(quote: RealQuote, changes: dict[int, bytes]) -> None:
    values = dict(quote.quote.pcr_values) | changes
    if values == dict(quote.quote.pcr_values):
        return
    with pytest.raises(VerificationError):
        verify_quote(quote.evidence(pcr_values=values), quote.expectation())
