"""Synthetic TCG event logs for tests: what an agent would read from
/sys/kernel/security/tpm0/binary_bios_measurements after the same extends."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence


def synth_log(events: Sequence[tuple[int, int, bytes]], digests: Mapping[int, bytes] = {}) -> bytes:
    """A crypto-agile log with a sha256 bank only: (pcr, type, data), digest = sha256(data)
    unless `digests` gives the event's (by index); what `tpm2_pcrextend pcr:sha256=...` of
    the same digests leaves in a TPM."""
    spec = (
        b"Spec ID Event03\0"
        + struct.pack("<IBBBB", 0, 0, 2, 0, 2)
        + struct.pack("<I", 1)
        + struct.pack("<HH", 0x000B, 32)
        + b"\0"
    )
    out = struct.pack("<II", 0, 3) + b"\0" * 20 + struct.pack("<I", len(spec)) + spec
    for i, (pcr, etype, data) in enumerate(events):
        out += struct.pack("<III", pcr, etype, 1) + struct.pack("<H", 0x000B)
        out += digests.get(i, hashlib.sha256(data).digest()) + struct.pack("<I", len(data)) + data
    return out
