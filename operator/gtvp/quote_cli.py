"""`gtvp verify-quote`: check a quote that tpm2-tools produced, with gtvp's verifier.

Reads the files `tpm2_quote -m/-s/-o` writes (TPMS_ATTEST, TPMT_SIGNATURE, serialized PCR
values), the AK public key (TPM2B_PUBLIC as `tpm2_createak -u` writes it, or PEM) and the
nonce, runs the same `verify_quote` the operator runs, and prints the verdict. Exit 0 only
for a verified quote, 1 for a rejected one (one line with the reason code), 2 for unusable
input files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gtvp.core import errors
from gtvp.core.quote import Evidence, Expectation, verify_quote
from gtvp.core.tpm_wire import (
    ALG_ECC,
    ALG_NULL,
    ALG_RSA,
    ALG_SHA256,
    HASH_SIZES,
    PublicArea,
    ak_qualified_name,
    parse_public,
    parse_tools_pcrs,
)


class InputError(Exception):
    """An input file is missing or unreadable."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror}") from exc


def load_ak(data: bytes) -> tuple[PublicArea, bool]:
    """The AK from TPM2B_PUBLIC (attributes known) or PEM (attributes unknown)."""
    if data.lstrip().startswith(b"-----BEGIN"):
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


def _hex_value(value: Any, size: int) -> bytes:
    if isinstance(value, int):  # YAML reads 0x... as an integer
        return value.to_bytes(size, "big")
    text = str(value).strip().lower().removeprefix("0x")
    return bytes.fromhex(text)


def load_golden(data: bytes, bank: str) -> dict[int, bytes]:
    """A map PCR -> value, or bank -> {PCR -> value} (tpm2_pcrread / tpm2_eventlog style)."""
    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise InputError(f"--golden is not YAML or JSON: {exc}") from exc
    if isinstance(doc, dict) and "pcrs" in doc and isinstance(doc["pcrs"], dict):
        doc = doc["pcrs"]
    if isinstance(doc, dict) and bank in doc and isinstance(doc[bank], dict):
        doc = doc[bank]
    if not isinstance(doc, dict):
        raise InputError("--golden must map PCR indices to values")
    from gtvp.core.tpm_wire import HASH_BY_NAME

    size = HASH_SIZES[HASH_BY_NAME[bank]]
    try:
        return {int(k): _hex_value(v, size) for k, v in doc.items()}
    except (ValueError, OverflowError) as exc:
        raise InputError(f"--golden has a value that is not a {bank} digest: {exc}") from exc


def run(args: argparse.Namespace) -> int:
    try:
        ak, attrs_known = load_ak(_read(args.ak_public, "--ak-public"))
        pcr_file = parse_tools_pcrs(_read(args.pcrs, "--pcrs"))
        if len(pcr_file) != 1:
            raise InputError(f"--pcrs holds {len(pcr_file)} banks; quote one bank")
        bank, values = next(iter(pcr_file.items()))
        try:
            nonce = bytes.fromhex(args.nonce.removeprefix("0x"))
        except ValueError as exc:
            raise InputError("--nonce must be hex") from exc
        golden = load_golden(_read(args.golden, "--golden"), bank) if args.golden else None
        signer = None
        if args.ek_public:
            signer = ak_qualified_name(parse_public(_read(args.ek_public, "--ek-public")), ak)
        expectation = Expectation(
            ak=ak,
            nonce=nonce,
            pcr_bank=bank,
            pcrs=tuple(sorted(values)),
            signer=signer,
            golden=golden,
            ak_attributes_known=attrs_known,
        )
        evidence = Evidence(
            attest=_read(args.message, "--message"),
            signature=_read(args.signature, "--signature"),
            pcr_bank=bank,
            pcr_values=values,
        )
        result = verify_quote(evidence, expectation)
    except InputError as exc:
        print(f"gtvp verify-quote: {exc}", file=sys.stderr)
        return 2
    except errors.VerificationError as exc:
        print(f"REJECTED {exc.reason}: {exc.message}")
        return 1
    skipped = []
    if not attrs_known:
        skipped.append("AK attributes (PEM key; pass the TPM2B_PUBLIC to check them)")
    if signer is None:
        skipped.append("qualifiedSigner (pass --ek-public)")
    if golden is None:
        skipped.append("PCR values (pass --golden)")
    summary = {
        "verdict": "VERIFIED",
        "reason": "QuoteVerified",
        "pcrs": {f"{bank}:{p}": v.hex() for p, v in sorted(result.pcrs.items())},
        "clock": result.clock.clock,
        "resetCount": result.clock.reset_count,
        "restartCount": result.clock.restart_count,
        "notChecked": skipped,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"VERIFIED QuoteVerified: {bank}:{sorted(result.pcrs)} signed by the AK over the "
            f"nonce (clock {result.clock.clock} ms, resets {result.clock.reset_count})"
        )
        for s in skipped:
            print(f"  not checked: {s}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "verify-quote", help="verify a tpm2-tools quote with gtvp's verifier", description=__doc__
    )
    p.add_argument("--ak-public", required=True, help="AK public: TPM2B_PUBLIC or PEM")
    p.add_argument("--message", required=True, help="TPMS_ATTEST (tpm2_quote -m)")
    p.add_argument("--signature", required=True, help="TPMT_SIGNATURE (tpm2_quote -s)")
    p.add_argument("--pcrs", required=True, help="PCR values (tpm2_quote -o)")
    p.add_argument("--nonce", required=True, help="the qualifying data, hex (tpm2_quote -q)")
    p.add_argument("--golden", help="YAML/JSON map of expected PCR values")
    p.add_argument("--ek-public", help="EK public (TPM2B_PUBLIC) to check qualifiedSigner")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    p.set_defaults(func=run)
