"""Replaying real UEFI event logs (tests/data/uefi-eventlogs, from Keylime's test data)."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gtvp.core.errors import MalformedEvidence
from gtvp.core.eventlog import EV_NO_ACTION, parse_event_log

DATA = Path(__file__).parents[1] / "data" / "uefi-eventlogs"
LOGS = ["binary_bios_measurements", "binary_bios_measurements-secureboot"]


def _expected(name: str) -> dict[str, dict[int, bytes]]:
    doc = yaml.safe_load((DATA / f"{name}.pcrs.yaml").read_text())["pcrs"]
    sizes = {"sha1": 20, "sha256": 32}
    return {
        bank: {int(k): int(v).to_bytes(sizes[bank], "big") for k, v in vals.items()}
        for bank, vals in doc.items()
    }


@pytest.mark.parametrize("name", LOGS)
def test_replay_matches_tpm2_tools_for_pcrs_1_to_14(name: str) -> None:
    log = parse_event_log((DATA / name).read_bytes())
    for bank, values in _expected(name).items():
        for pcr, value in values.items():
            if pcr == 0:
                continue  # see the StartupLocality test below
            assert log.pcrs[bank][pcr] == value, f"{name} {bank} PCR {pcr}"


def test_secure_boot_log_pcr0_matches_too() -> None:
    name = "binary_bios_measurements-secureboot"
    log = parse_event_log((DATA / name).read_bytes())
    for bank, values in _expected(name).items():
        assert log.pcrs[bank][0] == values[0]


def test_startup_locality_sets_pcr0_and_no_action_events_are_not_extended() -> None:
    """The plain log starts PCR0 at locality 3 (TCG PC Client PFP, StartupLocality).

    tpm2-tools 5.4 (which made the .pcrs.yaml) extends EV_NO_ACTION events and ignores
    StartupLocality (fixed upstream later), so its PCR0 differs; a TPM's PCR0 is what the
    spec says, which is what gtvp replays.
    """
    data = (DATA / "binary_bios_measurements").read_bytes()
    log = parse_event_log(data)
    assert log.events[0].data.startswith(b"StartupLocality\0")
    for bank in ("sha1", "sha256"):
        size = hashlib.new(bank).digest_size
        pcr = b"\0" * (size - 1) + b"\x03"
        for e in log.events:
            if e.pcr == 0 and e.event_type != EV_NO_ACTION:
                pcr = hashlib.new(bank, pcr + e.digests[bank]).digest()
        assert log.pcrs[bank][0] == pcr
        assert log.pcrs[bank][0] != _expected("binary_bios_measurements")[bank][0]


def test_bogus_log_is_refused_with_a_clear_error() -> None:
    with pytest.raises(MalformedEvidence, match="too short"):
        parse_event_log((DATA / "binary_bios_measurements-bogus").read_bytes())


def test_truncated_log_is_refused() -> None:
    data = (DATA / "binary_bios_measurements").read_bytes()
    with pytest.raises(MalformedEvidence, match=r"truncated|claims"):
        parse_event_log(data[: len(data) - 7])


def test_huge_log_is_refused_before_parsing() -> None:
    with pytest.raises(MalformedEvidence, match="more than"):
        parse_event_log(b"\0" * (4 * 1024 * 1024 + 1))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048), st.integers(min_value=0, max_value=49000))
def test_any_bytes_or_cut_give_a_log_or_a_malformed_error(junk: bytes, cut: int) -> None:
    real = (DATA / "binary_bios_measurements").read_bytes()
    for data in (junk, real[:cut] + junk):
        with contextlib.suppress(MalformedEvidence):
            parse_event_log(data)
