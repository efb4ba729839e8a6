"""Parse and replay a TCG crypto-agile (TPM 2.0) firmware event log.

The log Linux exposes as `/sys/kernel/security/tpm0/binary_bios_measurements`: a legacy
SHA-1 header event carrying the "Spec ID Event03" structure (which digests each event
has), then TCG_PCR_EVENT2 records. Replaying extends each PCR with each event's digest and
must reproduce what the TPM quoted. Little-endian throughout (it is the firmware's format,
not the TPM's). Bounded: a log larger than MAX_LOG_BYTES or with more than MAX_EVENTS
events, a truncated record or an unknown digest algorithm is `MalformedEvidence`.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from gtvp.core.errors import MalformedEvidence
from gtvp.core.tpm_wire import HASH_NAMES, HASH_SIZES

MAX_LOG_BYTES = 4 * 1024 * 1024
MAX_EVENTS = 20000
MAX_EVENT_DATA = 1024 * 1024
EV_NO_ACTION = 0x00000003
SPEC_ID_SIGNATURE = b"Spec ID Event03\0"
STARTUP_LOCALITY_SIGNATURE = b"StartupLocality\0"

# TCG PC Client Platform Firmware Profile, section 10.4.1: event type -> name
EVENT_TYPES: Mapping[int, str] = {
    0x00000000: "EV_PREBOOT_CERT",
    0x00000001: "EV_POST_CODE",
    0x00000002: "EV_UNUSED",
    0x00000003: "EV_NO_ACTION",
    0x00000004: "EV_SEPARATOR",
    0x00000005: "EV_ACTION",
    0x00000006: "EV_EVENT_TAG",
    0x00000007: "EV_S_CRTM_CONTENTS",
    0x00000008: "EV_S_CRTM_VERSION",
    0x00000009: "EV_CPU_MICROCODE",
    0x0000000A: "EV_PLATFORM_CONFIG_FLAGS",
    0x0000000B: "EV_TABLE_OF_DEVICES",
    0x0000000C: "EV_COMPACT_HASH",
    0x0000000D: "EV_IPL",
    0x0000000E: "EV_IPL_PARTITION_DATA",
    0x0000000F: "EV_NONHOST_CODE",
    0x00000010: "EV_NONHOST_CONFIG",
    0x00000011: "EV_NONHOST_INFO",
    0x00000012: "EV_OMIT_BOOT_DEVICE_EVENTS",
    0x80000000: "EV_EFI_EVENT_BASE",
    0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG",
    0x80000002: "EV_EFI_VARIABLE_BOOT",
    0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION",
    0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
    0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER",
    0x80000006: "EV_EFI_GPT_EVENT",
    0x80000007: "EV_EFI_ACTION",
    0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    0x80000009: "EV_EFI_HANDOFF_TABLES",
    0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
    0x8000000B: "EV_EFI_HANDOFF_TABLES2",
    0x8000000C: "EV_EFI_VARIABLE_BOOT2",
    0x80000010: "EV_EFI_HCRTM_EVENT",
    0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
    0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB",
    0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
}
EVENT_TYPE_BY_NAME: Mapping[str, int] = {v: k for k, v in EVENT_TYPES.items()}
# events whose data is a UEFI_VARIABLE_DATA (a variable's GUID, name and contents)
VARIABLE_EVENTS = frozenset({0x80000001, 0x80000002, 0x8000000C, 0x800000E0})
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001


def event_type_name(event_type: int) -> str:
    """The TCG name of an event type (`0x...` for one the profile does not name)."""
    return EVENT_TYPES.get(event_type, f"0x{event_type:08x}")


def efi_variable(event: Event) -> tuple[str, bytes] | None:
    """(name, contents) of a UEFI variable event's UEFI_VARIABLE_DATA; None for another
    event type or data that does not hold one (a name that is not UTF-16, lengths that
    overrun the data)."""
    if event.event_type not in VARIABLE_EVENTS or len(event.data) < 32:
        return None
    name_len, data_len = struct.unpack_from("<QQ", event.data, 16)
    end = 32 + 2 * name_len
    if name_len > 1024 or end + data_len > len(event.data):
        return None
    try:
        name = event.data[32:end].decode("utf-16-le")
    except UnicodeDecodeError:
        return None
    return name, event.data[end : end + data_len]


@dataclass(frozen=True, slots=True)
class Event:
    """One TCG_PCR_EVENT2 record (slots: a log holds up to MAX_EVENTS of them)."""

    pcr: int
    event_type: int
    digests: Mapping[str, bytes]
    data: bytes


@dataclass(frozen=True)
class EventLog:
    """A parsed log: its events and the PCR values a replay gives per bank."""

    events: tuple[Event, ...]
    pcrs: Mapping[str, Mapping[int, bytes]] = field(default_factory=dict)

    def all_digests(self, bank: str) -> frozenset[str]:
        return frozenset(e.digests[bank].hex() for e in self.events if bank in e.digests)


def _u32(data: bytes, off: int, what: str) -> int:
    if off + 4 > len(data):
        raise MalformedEvidence(f"event log truncated in {what} at offset {off}")
    v: int = struct.unpack_from("<I", data, off)[0]
    return v


def parse_event_log(data: bytes) -> EventLog:
    """Parse a crypto-agile event log and replay it into per-bank PCR values."""
    if len(data) > MAX_LOG_BYTES:
        raise MalformedEvidence(
            f"event log is {len(data)} bytes, more than the {MAX_LOG_BYTES} allowed"
        )
    if len(data) < 32 + 16:
        raise MalformedEvidence(
            f"event log of {len(data)} bytes is too short to hold the TCG header event"
        )
    spec, off = _header_event(data)
    sizes = _digest_sizes(spec)
    banks = {HASH_NAMES[a]: s for a, s in sizes.items() if a in HASH_NAMES}
    pcrs: dict[str, dict[int, bytes]] = {b: {} for b in banks}
    events: list[Event] = []
    while off < len(data):
        if len(events) >= MAX_EVENTS:
            raise MalformedEvidence(f"event log has more than {MAX_EVENTS} events")
        event, off = _event(data, off, index=len(events), sizes=sizes)
        events.append(event)
        _replay(pcrs, banks, event, index=len(events) - 1)
    return EventLog(tuple(events), pcrs)


def _header_event(data: bytes) -> tuple[bytes, int]:
    """The Spec ID event's data (a TCG_PCClientPCREvent with a SHA-1 digest field) and the
    offset of the first TCG_PCR_EVENT2 after it."""
    off = 0
    _pcr = _u32(data, off, "header")
    ev_type = _u32(data, off + 4, "header")
    off += 8 + 20
    size = _u32(data, off, "header")
    off += 4
    if ev_type != EV_NO_ACTION or size > 4096 or off + size > len(data):
        raise MalformedEvidence(
            "this is not a TCG crypto-agile event log (the first event is not the "
            "EV_NO_ACTION Spec ID event)"
        )
    spec = data[off : off + size]
    off += size
    if not spec.startswith(SPEC_ID_SIGNATURE):
        raise MalformedEvidence("event log header lacks the 'Spec ID Event03' signature")
    if len(spec) < 28:
        raise MalformedEvidence("event log Spec ID event is truncated")
    return spec, off


def _digest_sizes(spec: bytes) -> dict[int, int]:
    """Algorithm -> digest size, as the Spec ID event announces them."""
    (n_algs,) = struct.unpack_from("<I", spec, 24)
    if n_algs == 0 or n_algs > 8 or len(spec) < 28 + 4 * n_algs:
        raise MalformedEvidence(f"event log Spec ID event lists {n_algs} algorithms")
    sizes: dict[int, int] = {}
    for i in range(n_algs):
        alg, dsize = struct.unpack_from("<HH", spec, 28 + 4 * i)
        if alg in HASH_SIZES and HASH_SIZES[alg] != dsize:
            raise MalformedEvidence(f"event log: algorithm 0x{alg:04x} with digest size {dsize}")
        sizes[alg] = dsize
    return sizes


def _event(data: bytes, off: int, *, index: int, sizes: Mapping[int, int]) -> tuple[Event, int]:
    """The TCG_PCR_EVENT2 at `off` (the `index`th) and the offset after it."""
    pcr = _u32(data, off, "event")
    ev_type = _u32(data, off + 4, "event")
    count = _u32(data, off + 8, "event")
    off += 12
    if pcr > 23 and ev_type != EV_NO_ACTION:
        raise MalformedEvidence(f"event {index} extends PCR {pcr}")
    if count > 8:
        raise MalformedEvidence(f"event {index} claims {count} digests")
    digests, off = _digests(data, off, count=count, index=index, sizes=sizes)
    esize = _u32(data, off, "event")
    off += 4
    if esize > MAX_EVENT_DATA or off + esize > len(data):
        raise MalformedEvidence(
            f"event {index} claims {esize} bytes of data, {max(0, len(data) - off)} left"
        )
    return Event(pcr, ev_type, digests, data[off : off + esize]), off + esize


def _digests(
    data: bytes, off: int, *, count: int, index: int, sizes: Mapping[int, int]
) -> tuple[dict[str, bytes], int]:
    """An event's TPML_DIGEST_VALUES (digests of algorithms gtvp knows, by bank name)."""
    digests: dict[str, bytes] = {}
    for _ in range(count):
        if off + 2 > len(data):
            raise MalformedEvidence(f"event log truncated in event {index}")
        (alg,) = struct.unpack_from("<H", data, off)
        off += 2
        if alg not in sizes:
            raise MalformedEvidence(
                f"event {index} has a digest of algorithm 0x{alg:04x} that the "
                "header did not announce"
            )
        dsize = sizes[alg]
        if off + dsize > len(data):
            raise MalformedEvidence(f"event log truncated in event {index}")
        if alg in HASH_NAMES:
            digests[HASH_NAMES[alg]] = data[off : off + dsize]
        off += dsize
    return digests, off


def _replay(
    pcrs: dict[str, dict[int, bytes]], banks: Mapping[str, int], event: Event, *, index: int
) -> None:
    """Extend each bank's PCR with the event's digest (EV_NO_ACTION extends nothing, but a
    StartupLocality event sets PCR 0's starting value)."""
    if event.event_type == EV_NO_ACTION:
        locality = _startup_locality_of(event)
        if locality is not None:
            for bank, dsize in banks.items():
                pcrs[bank][0] = b"\0" * (dsize - 1) + bytes([locality])
        return
    for bank, dsize in banks.items():
        if bank not in event.digests:
            raise MalformedEvidence(f"event {index} lacks its {bank} digest")
        current = pcrs[bank].get(event.pcr, b"\0" * dsize)
        pcrs[bank][event.pcr] = hashlib.new(bank, current + event.digests[bank]).digest()


def startup_locality(log: EventLog) -> int:
    """The locality the TPM was started from, as the log's StartupLocality event on PCR 0
    says (the last one, as the replay takes it); 0 when it has none. A TPM started at
    locality 3 or 4 (an H-CRTM) begins PCR 0 at that value, which no extend from software
    can reproduce; one software started itself (firmware that did not measure) begins at 0."""
    found = 0
    for e in log.events:
        locality = _startup_locality_of(e)
        if locality is not None:
            found = locality
    return found


def _startup_locality_of(event: Event) -> int | None:
    """The locality an EV_NO_ACTION StartupLocality event on PCR 0 gives (None: not one)."""
    data = event.data
    if (
        event.event_type == EV_NO_ACTION
        and event.pcr == 0
        and data.startswith(STARTUP_LOCALITY_SIGNATURE)
        and len(data) >= 17
    ):
        return data[16]
    return None
