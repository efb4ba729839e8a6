"""The strict TPM structure parsers: never anything but a result or gtvp's own errors."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gtvp.core.errors import MalformedEvidence, UnsupportedAlgorithm, VerificationError
from gtvp.core.tpm_wire import (
    ALG_SHA256,
    PcrSelection,
    marshal_pcr_selections,
    parse_attest,
    parse_public,
    parse_signature,
    parse_tools_pcrs,
)
from tests.tpmkit import craft_attest, soft_ak

PARSERS = [parse_attest, parse_signature, parse_public, parse_tools_pcrs]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=1200))
def test_random_bytes_never_crash_a_parser(data: bytes) -> None:
    for parse in PARSERS:
        with contextlib.suppress(VerificationError):
            parse(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=200), st.binary(min_size=1, max_size=8))
def test_spliced_attest_never_crashes(pos: int, junk: bytes) -> None:
    _, ak = soft_ak()
    good = craft_attest(signer=ak.name, nonce=b"n" * 16, pcr_values={0: b"\0" * 32})
    pos = min(pos, len(good))
    for data in (good[:pos], good[:pos] + junk + good[pos:], good[:pos] + junk):
        with contextlib.suppress(MalformedEvidence, UnsupportedAlgorithm):
            parse_attest(data)


def test_crafted_attest_round_trips() -> None:
    _, ak = soft_ak()
    a = parse_attest(
        craft_attest(signer=ak.name, nonce=b"nonce", pcr_values={0: b"\0" * 32, 7: b"\1" * 32})
    )
    assert a.extra_data == b"nonce"
    assert a.qualified_signer == ak.name
    assert a.pcr_selections == (PcrSelection(ALG_SHA256, (0, 7)),)


def test_ak_name_matches_tpm2_pytss() -> None:
    from tpm2_pytss.types import TPM2B_PUBLIC

    _, ak = soft_ak()
    tss, _ = TPM2B_PUBLIC.unmarshal(struct.pack(">H", len(ak.marshalled)) + ak.marshalled)
    assert bytes(tss.get_name().marshal())[2:] == ak.name


def test_pcr_selection_marshalling_round_trips() -> None:
    from gtvp.core.tpm_wire import Reader, read_pcr_selections

    sel = (PcrSelection(ALG_SHA256, (0, 1, 7, 16, 23)),)
    assert read_pcr_selections(Reader(marshal_pcr_selections(sel), "x")) == sel


def test_oversized_structure_is_refused_with_its_size() -> None:
    with pytest.raises(MalformedEvidence, match="more than the 8192 allowed"):
        parse_attest(b"\0" * 9000)


def test_a_clock_set_past_what_a_verdict_can_record_is_malformed_evidence() -> None:
    """Attacker: root with the owner's auth sets the TPM clock forward (TPM2_ClockSet takes
    up to 0xFFFF000000000000 ms) and answers with a genuine quote: the verdict would carry
    a clock the API server refuses to store (Member.status.trust.clock is an int64), every
    new verdict's write would fail, and the last one would stand."""
    from gtvp.core.quote import ClockState

    _, ak = soft_ak()
    for clock in (2**63, 0xFFFF000000000000):
        data = craft_attest(signer=ak.name, nonce=b"n", pcr_values={0: b"\0" * 32},
                            clock=ClockState(clock, 1, 0))  # fmt: skip
        with pytest.raises(MalformedEvidence, match=r"clockInfo.clock is \d+ ms, beyond"):
            parse_attest(data)
    edge = craft_attest(signer=ak.name, nonce=b"n", pcr_values={0: b"\0" * 32},
                        clock=ClockState(2**63 - 1, 1, 0))  # fmt: skip
    assert parse_attest(edge).clock == 2**63 - 1


def test_an_ek_whose_aes_key_no_tpm_would_make_is_malformed_evidence() -> None:
    """Attacker: root publishes its genuine EK's area with a 64-bit AES key: the
    fingerprint, certificate and pin checks hold (they read the key alone), and building
    the credential would raise inside tpm2-pytss, an unforeseen error that never asks for
    readmission. It is a named failure instead."""
    from gtvp.core.tpm_wire import as_tpm2b_public
    from tests.softtpm import SoftCA, SoftTpm

    good = SoftTpm(SoftCA()).ek_public  # the TCG EK template, as a TPM makes it
    aes_128_cfb = struct.pack(">HHH", 0x0006, 128, 0x0043)
    assert good.count(aes_128_cfb) == 1
    parse_public(as_tpm2b_public(good))
    for bits in (64, 0, 512):
        bad = good.replace(aes_128_cfb, struct.pack(">HHH", 0x0006, bits, 0x0043))
        with pytest.raises(MalformedEvidence, match=f"AES key of {bits} bits"):
            parse_public(as_tpm2b_public(bad))
