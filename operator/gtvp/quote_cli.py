"""`gtvp verify-quote`: check a quote that tpm2-tools produced, with gtvp's verifier.

Reads the files `tpm2_quote -m/-s/-o` writes (TPMS_ATTEST, TPMT_SIGNATURE, serialized PCR
values), the AK public key (TPM2B_PUBLIC as `tpm2_createak -u` writes it, or PEM) and the
nonce, runs the same `verify_quote` the operator runs, and prints the verdict.

The signed quote must cover exactly --pcr-selection (default sha256:0-7), as the operator's
quotes must cover the policy's selection: the bank and the PCRs never come from the unsigned
-o file. A SHA-1 bank is refused unless --pcr-selection names it and --allow-sha1 is given.

Exit 0 only for a verified quote, 1 for a rejected one (one line with the reason code), 2
for unusable input files or options (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gtvp.core import errors

# The verifier (gtvp.core.quote and tpm_wire, which load cryptography) and YAML are imported
# in the functions that use them: `gtvp verify-quote --help` and option errors stay cheap.
if TYPE_CHECKING:
    from gtvp.core.quote import QuoteResult
    from gtvp.core.tpm_wire import PublicArea


class InputError(Exception):
    """An input file is missing or unreadable."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror}") from exc


def load_ak(data: bytes) -> tuple[PublicArea, bool]:
    """The AK from TPM2B_PUBLIC (attributes known) or PEM (attributes unknown)."""
    from gtvp.core.tpm_wire import ALG_ECC, ALG_NULL, ALG_RSA, ALG_SHA256, PublicArea, parse_public

    if data.lstrip().startswith(b"-----BEGIN"):
        from cryptography.hazmat.primitives import serialization  # PEM only (it is costly)
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise InputError(f"--ak-public is not a PEM public key: {exc}") from exc
        if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise InputError("--ak-public must be an RSA or ECC key")
        area = PublicArea(
            type=ALG_ECC if isinstance(key, ec.EllipticCurvePublicKey) else ALG_RSA,
            name_alg=ALG_SHA256,
            attributes=0,
            scheme=ALG_NULL,
            scheme_hash=ALG_NULL,
            key=key,
            symmetric=ALG_NULL,
            marshalled=b"",
        )
        return area, False
    return parse_public(data), True


@dataclass(frozen=True)
class Selection:
    """The PCR selection the signed quote must cover: one bank and its PCR indices."""

    bank: str
    pcrs: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.bank}:{list(self.pcrs)}"

    @property
    def compact(self) -> str:
        """`sha256:0-7` style, as --pcr-selection takes it."""
        runs: list[list[int]] = []
        for p in self.pcrs:
            if runs and runs[-1][-1] == p - 1:
                runs[-1].append(p)
            else:
                runs.append([p])
        spans = (f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)
        return f"{self.bank}:{','.join(spans)}"


DEFAULT_SELECTION = "sha256:0-7"
_MAX_PCR = 23  # PCR 0-23: the PC Client platform's PCRs


def parse_selection(text: str) -> Selection:
    """`BANK:LIST`, LIST of indices and ranges: `sha256:0-7`, `sha256:0,1,2,7`, `sha384:0-3,7`."""
    from gtvp.core.tpm_wire import HASH_BY_NAME

    bank, sep, spec = text.strip().lower().partition(":")
    if not sep or bank not in HASH_BY_NAME:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not BANK:PCRS (BANK one of {', '.join(HASH_BY_NAME)}, e.g. sha256:0-7)"
        )
    pcrs: set[int] = set()
    try:
        for part in spec.split(","):
            lo, dash, hi = part.strip().partition("-")
            first, last = int(lo), int(hi if dash else lo)
            if not 0 <= first <= last <= _MAX_PCR:
                raise ValueError(part)
            pcrs.update(range(first, last + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: PCRs must be indices or ascending ranges within 0-{_MAX_PCR}, e.g. 0-7"
        ) from None
    return Selection(bank, tuple(sorted(pcrs)))


def _hex_value(pcr: int, value: str, bank: str) -> bytes:
    from gtvp.core.tpm_wire import HASH_BY_NAME, HASH_SIZES

    size = HASH_SIZES[HASH_BY_NAME[bank]]
    try:
        raw = bytes.fromhex(value.strip().lower().removeprefix("0x"))
    except ValueError:
        raise InputError(f"--golden PCR {pcr} is not a hex value") from None
    if len(raw) != size:
        raise InputError(f"--golden PCR {pcr} is {len(raw)} bytes, a {bank} value is {size}")
    return raw


def _golden_map(doc: Any, bank: str) -> dict[Any, Any]:
    """The PCR map in a golden document: flat, under `pcrs:`, or under a bank's name."""
    from gtvp.core.tpm_wire import HASH_BY_NAME

    if isinstance(doc, dict) and isinstance(doc.get("pcrs"), dict):
        doc = doc["pcrs"]
    if not isinstance(doc, dict):
        raise InputError("--golden must map PCR indices to values")
    banks = {str(k).lower(): k for k in doc if str(k).lower() in HASH_BY_NAME}
    if not banks:
        return doc
    if bank not in banks or not isinstance(doc[banks[bank]], dict):
        raise InputError(
            f"--golden holds {', '.join(banks)} values, not {bank} (the bank of --pcr-selection)"
        )
    return dict(doc[banks[bank]])


def load_golden(data: bytes, bank: str) -> dict[int, bytes]:
    """A map PCR -> value, or bank -> {PCR -> value} (tpm2_pcrread / tpm2_eventlog style)."""
    import yaml  # here: only --golden needs it, and it costs start-up time

    try:
        # BaseLoader keeps every scalar a string: 0x... stays hex text of its real length
        doc = yaml.load(data, Loader=yaml.BaseLoader)  # noqa: S506 (builds only str/list/dict)
    except yaml.YAMLError as exc:
        raise InputError(f"--golden is not YAML or JSON: {exc}") from exc
    out: dict[int, bytes] = {}
    for key, value in _golden_map(doc, bank).items():
        if not str(key).isdigit() or not isinstance(value, str):
            raise InputError(
                f"--golden entry {str(key)[:40]!r} is not a PCR index with a hex value"
            )
        out[int(key)] = _hex_value(int(key), value, bank)
    return out


def _read_pcrs(args: argparse.Namespace) -> tuple[str, dict[int, bytes]]:
    from gtvp.core.tpm_wire import parse_tools_pcrs

    pcr_file = parse_tools_pcrs(_read(args.pcrs, "--pcrs"))
    if len(pcr_file) != 1:
        raise InputError(f"--pcrs holds {len(pcr_file)} banks; quote one bank")
    return next(iter(pcr_file.items()))


def _expected_selection(args: argparse.Namespace) -> Selection:
    sel: Selection = args.pcr_selection
    if sel.bank == "sha1" and not args.allow_sha1:
        raise InputError(
            f"--pcr-selection {sel.compact} selects the SHA-1 bank, which gtvp refuses (SHA-1 "
            "collisions are practical); add --allow-sha1 to verify it anyway"
        )
    return sel


def _selection_reason(attest: bytes, sel: Selection, in_file: Selection, allow_sha1: bool) -> str:
    """A PcrSelectionMismatch said in the CLI's terms (the quote parsed: it got that far)."""
    from gtvp.core.tpm_wire import HASH_NAMES, parse_attest

    signed = [
        Selection(HASH_NAMES[s.hash_alg], s.pcrs) for s in parse_attest(attest).pcr_selections
    ]
    covers = " + ".join(map(str, signed))
    if signed == [sel]:
        return f"--pcrs holds {in_file}, the signed quote covers {covers}"
    reason = f"the signed quote covers {covers}, --pcr-selection expects {sel}"
    sha1 = [s for s in signed if s.bank == "sha1"]
    if sha1 and not allow_sha1:
        hint = sha1[0].compact
        reason += (
            f" (SHA-1 banks are refused unless asked for: --pcr-selection {hint} --allow-sha1)"
        )
    return reason


@dataclass(frozen=True)
class Checked:
    """What `verify` checked and found."""

    result: QuoteResult
    bank: str
    skipped: list[str]
    warnings: list[str]


def verify(args: argparse.Namespace) -> Checked:
    """Verify the files named in `args`; raise InputError or VerificationError."""
    from gtvp.core.quote import Evidence, Expectation, verify_quote
    from gtvp.core.tpm_wire import ak_qualified_name, parse_public

    sel = _expected_selection(args)
    ak, attrs_known = load_ak(_read(args.ak_public, "--ak-public"))
    file_bank, values = _read_pcrs(args)
    try:
        nonce = bytes.fromhex(args.nonce.removeprefix("0x"))
    except ValueError as exc:
        raise InputError("--nonce must be hex") from exc
    golden = load_golden(_read(args.golden, "--golden"), sel.bank) if args.golden else None
    signer = None
    if args.ek_public:
        signer = ak_qualified_name(parse_public(_read(args.ek_public, "--ek-public")), ak)
    expectation = Expectation(
        ak=ak,
        nonce=nonce,
        pcr_bank=sel.bank,
        pcrs=sel.pcrs,
        signer=signer,
        golden=golden,
        ak_attributes_known=attrs_known,
    )
    attest = _read(args.message, "--message")
    evidence = Evidence(attest, _read(args.signature, "--signature"), file_bank, values)
    try:
        result = verify_quote(evidence, expectation)
    except errors.PcrSelectionMismatch as exc:
        in_file = Selection(file_bank, tuple(sorted(values)))
        raise errors.PcrSelectionMismatch(
            _selection_reason(attest, sel, in_file, args.allow_sha1)
        ) from exc
    skipped = []
    if not attrs_known:
        skipped.append("AK attributes (PEM key; pass the TPM2B_PUBLIC to check them)")
    if signer is None:
        skipped.append("qualifiedSigner (pass --ek-public)")
    if golden is None:
        skipped.append("PCR values (pass --golden)")
    warnings = []
    if sel.bank == "sha1":
        warnings.append("SHA-1 PCR bank (--allow-sha1): its collisions are practical")
    return Checked(result, sel.bank, skipped, warnings)


def _print(checked: Checked, as_json: bool) -> None:
    result, bank = checked.result, checked.bank
    if as_json:
        summary = {
            "verdict": "VERIFIED",
            "reason": "QuoteVerified",
            "pcrs": {f"{bank}:{p}": v.hex() for p, v in sorted(result.pcrs.items())},
            "clock": result.clock.clock,
            "resetCount": result.clock.reset_count,
            "restartCount": result.clock.restart_count,
            "notChecked": checked.skipped,
            "warnings": checked.warnings,
        }
        print(json.dumps(summary, indent=2))
        return
    print(
        f"VERIFIED QuoteVerified: {bank}:{sorted(result.pcrs)} signed by the AK over the "
        f"nonce (clock {result.clock.clock} ms, resets {result.clock.reset_count})"
    )
    for s in checked.skipped:
        print(f"  not checked: {s}")
    for w in checked.warnings:
        print(f"  warning: {w}")


def run(args: argparse.Namespace) -> int:
    try:
        checked = verify(args)
    except InputError as exc:
        print(f"gtvp verify-quote: {exc}", file=sys.stderr)
        return 2
    except errors.VerificationError as exc:
        print(f"REJECTED {exc.reason}: {exc.message}")
        return 1
    _print(checked, args.json)
    return 0


def register(p: argparse.ArgumentParser) -> None:
    """`gtvp verify-quote`'s arguments (gtvp.cli names the command)."""
    p.description = __doc__.replace("`", "")  # --help is plain text, not Markdown
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--ak-public", required=True, help="AK public: TPM2B_PUBLIC or PEM")
    p.add_argument("--message", required=True, help="TPMS_ATTEST (tpm2_quote -m)")
    p.add_argument("--signature", required=True, help="TPMT_SIGNATURE (tpm2_quote -s)")
    p.add_argument("--pcrs", required=True, help="PCR values (tpm2_quote -o)")
    p.add_argument("--nonce", required=True, help="the qualifying data, hex (tpm2_quote -q)")
    p.add_argument(
        "--pcr-selection",
        type=parse_selection,
        default=DEFAULT_SELECTION,  # a string: argparse converts it with parse_selection
        metavar="BANK:PCRS",
        help="the selection the signed quote must cover, e.g. sha256:0-7 or sha384:0,2,4-7 "
        f"(default {DEFAULT_SELECTION}); the unsigned --pcrs file never chooses it",
    )
    p.add_argument(
        "--allow-sha1",
        action="store_true",
        help="accept a --pcr-selection in the SHA-1 bank (refused without this flag)",
    )
    p.add_argument("--golden", help="YAML/JSON map of expected PCR values in the selected bank")
    p.add_argument("--ek-public", help="EK public (TPM2B_PUBLIC) to check qualifiedSigner")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    p.set_defaults(func=run)
