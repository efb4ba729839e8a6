"""`gtvp eventlog replay FILE [--bank sha256]`: read a TCG firmware event log as gtvp does.

Parses a binary crypto-agile event log (what Linux exposes in
/sys/kernel/security/tpm0/binary_bios_measurements) with the operator's own parser
(`gtvp.core.eventlog`), replays it, and prints YAML: the PCR values the replay gives per
bank, then every event (index, PCR, type by its TCG name, UEFI variable name where there is
one, digests, data size). These are the names and digests a SecurityPolicy's referenceSets
use (docs/attestation.md). Exit 0 on a log that parses, 1 with the reason on a malformed one
(truncated, not a TCG log, unknown algorithm), 2 when the file cannot be read or the bank is
not in the log. Imports neither the Kubernetes client nor kopf.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gtvp.core.errors import MalformedEvidence
from gtvp.core.eventlog import EventLog, efi_variable, event_type_name, parse_event_log
from gtvp.core.refvalues import secure_boot_state


def register(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eventlog_cmd", metavar="{replay}")
    r = sub.add_parser(
        "replay",
        help="parse a binary TCG event log, print the replayed PCRs and the events as YAML",
        description=(
            "Parse a binary TCG crypto-agile event log and print, as YAML, the PCR values "
            "its replay gives and its events. Exit 1 on a malformed log."
        ),
    )
    r.add_argument("file", help="the event log (e.g. a copy of binary_bios_measurements)")
    r.add_argument(
        "--bank",
        default=None,
        help="only this bank (sha1, sha256, sha384, sha512); default: every bank in the log",
    )
    r.set_defaults(func=run_replay)


def replay_document(log: EventLog, bank: str | None) -> dict[str, Any]:
    """The YAML document `gtvp eventlog replay` prints for a parsed log."""
    banks = [bank] if bank else sorted(log.pcrs)
    doc: dict[str, Any] = {
        "banks": banks,
        "pcrs": {b: {p: v.hex() for p, v in sorted(log.pcrs[b].items())} for b in banks},
    }
    for b in banks:
        state = secure_boot_state(log, b)
        if state is not None:
            doc["secureBoot"] = state
            break
    events = []
    for i, e in enumerate(log.events):
        item: dict[str, Any] = {"index": i, "pcr": e.pcr, "type": event_type_name(e.event_type)}
        var = efi_variable(e)
        if var is not None:
            item["variable"] = var[0]
        item["digests"] = {b: e.digests[b].hex() for b in banks if b in e.digests}
        item["dataSize"] = len(e.data)
        events.append(item)
    doc["events"] = events
    return doc


def run_replay(args: argparse.Namespace) -> int:
    import yaml

    try:
        data = Path(args.file).read_bytes()
    except OSError as exc:
        print(f"gtvp eventlog replay: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        log = parse_event_log(data)
    except MalformedEvidence as exc:
        print(
            f"gtvp eventlog replay: {args.file} is not a usable TCG event log: {exc.message}",
            file=sys.stderr,
        )
        return 1
    if args.bank is not None and args.bank not in log.pcrs:
        have = ", ".join(sorted(log.pcrs)) or "none"
        print(
            f"gtvp eventlog replay: {args.file} has no {args.bank} digests (its banks: {have})",
            file=sys.stderr,
        )
        return 2
    doc = replay_document(log, args.bank)
    sys.stdout.write(f"# {args.file}: {len(log.events)} events, replayed by gtvp\n")
    sys.stdout.write(yaml.safe_dump(doc, sort_keys=False, width=200))
    return 0
