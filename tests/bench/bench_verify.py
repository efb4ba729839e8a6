"""Benchmark: quote verification against a bare signature check of the same quote.

Run: `python -m tests.bench.bench_verify [--iterations N]` (or `make bench`). Uses a real
quote from a fresh swtpm. Baseline: only the AK's ECDSA signature over the TPMS_ATTEST
bytes (the signature pre-decoded, the key pre-loaded). Measured against it, interleaved so
that every path sees the same machine load, as this process's CPU time per call (best of
5 runs):

- full verification: `verify_quote`, i.e. parsing the signature and the attestation, every
  check in order, and the golden-value comparison (target <= 1.3x);
- from the bytes an agent writes: what the operator does with `status.agent` each cycle
  (the AK public area from base64, through `enrolment.ak_facts`, memoized per AK; the
  evidence from base64 and hex, `attestation.parse_evidence`; the expectation under the
  policy generation's shared reference; then `verify_quote`) (target <= 2.5x);
- the same with the AK parsed afresh every time (how the operator worked before the AK was
  parsed once per enrolment), for comparison;
- the operator's whole cycle: `attestation_step` for a bound member whose agent wrote
  evidence for the outstanding nonce (verdict, next challenge, conditions), for comparison.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from gtvp.core.attestation import ENTROPY_BYTES, attestation_step, parse_evidence
from gtvp.core.enrolment import ak_facts, ek_facts
from gtvp.core.policy import parse_policy
from gtvp.core.quote import Expectation, check_ak_attributes, quote_reference, verify_quote
from gtvp.core.tpm_wire import parse_public, parse_signature, qualified_signer
from gtvp_local.pool import pool_policy
from gtvp_local.processes import ProcessTable
from gtvp_local.swtpm import Swtpm, SwtpmCA
from tests.tpmkit import PCRS, RealQuote, real_quote

TARGETS = {"full": 1.3, "agent": 2.5}


def best_per_call(fn: Callable[[], object], iterations: int, repeats: int = 5) -> float:
    """The best per-call CPU time of this process over `repeats` runs: CPU time, not wall
    time, so that other processes sharing the machine do not inflate one path's figure."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(iterations):
            fn()
        best = min(best, (time.process_time() - start) / iterations)
    return best


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _agent_bytes(q: RealQuote) -> tuple[dict[str, Any], dict[str, Any]]:
    """`status.agent.enrollment` and `status.agent.evidence` as gtvp-agent writes them."""
    enrollment = {
        "ekPublic": _b64(q.enrolment.ek_public),
        "ekCertificate": _b64(q.enrolment.ek_certificate or b""),
        "akPublic": _b64(q.enrolment.ak_public),
        "akName": q.enrolment.ak_name.hex(),
    }
    evidence = {
        "nonce": q.nonce.hex(),
        "attest": _b64(q.quote.attest),
        "signature": _b64(q.quote.signature),
        "pcrBank": q.quote.pcr_bank,
        "pcrValues": {str(p): v.hex() for p, v in sorted(q.quote.pcr_values.items())},
        "producedAt": "2030-01-01T00:00:00Z",
        "eventLog": None,
    }
    return enrollment, evidence


def _bound_member(q: RealQuote, ca: SwtpmCA) -> Callable[[], object]:
    """One `attestation_step` judging the quote, for a member whose AK is bound."""
    enrollment, evidence = _agent_bytes(q)
    policy = parse_policy("default", pool_policy(ca, interval="60s", valid_for="180s")["spec"])
    now = dt.datetime.now(dt.UTC)
    issued = (now - dt.timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    status = {
        "agent": {"enrollment": enrollment, "evidence": evidence},
        "trust": {
            "akName": q.enrolment.ak_name.hex(),
            "ekSHA256": ek_facts(q.enrolment.ek_public).fingerprint,
        },
        "challenge": {
            "nonce": q.nonce.hex(),
            "pcrBank": "sha256",
            "pcrs": list(PCRS),
            "issuedAt": issued,
            "answerAfter": issued,
        },
    }

    def step() -> object:
        return attestation_step(
            spec={"identity": 3},
            status=status,
            labels={},
            policy=policy,
            now=now,
            entropy=secrets.token_bytes(ENTROPY_BYTES),
        )

    outcome = getattr(step(), "outcome", None)
    if outcome != "Verified":
        raise RuntimeError(f"the benchmark's cycle does not verify: {outcome}")
    return step


def _paths(q: RealQuote, ca: SwtpmCA) -> dict[str, Callable[[], object]]:
    ev, exp = q.evidence(), q.expectation()
    verify_quote(ev, exp)  # it verifies
    key = exp.ak.key
    assert isinstance(key, ec.EllipticCurvePublicKey)
    sig = parse_signature(ev.signature)
    der = encode_dss_signature(sig.r, sig.s)
    attest = ev.attest
    reference = quote_reference(pcr_bank="sha256", pcrs=PCRS, golden=dict(q.quote.pcr_values))
    enrollment, evidence = _agent_bytes(q)
    ek_name = q.ek.name

    def bare() -> None:
        key.verify(der, attest, ec.ECDSA(hashes.SHA256()))

    def full() -> None:
        verify_quote(ev, exp)

    def agent() -> None:
        ak = ak_facts(base64.b64decode(enrollment["akPublic"], validate=True))
        if ak.name != enrollment["akName"]:
            raise RuntimeError("AK name")
        expectation = Expectation.of(
            reference,
            ak=ak.public,
            nonce=bytes.fromhex(evidence["nonce"]),
            signer=qualified_signer(ek_name, ak.public.name),
        )
        verify_quote(parse_evidence(evidence), expectation)

    def agent_cold() -> None:
        public = parse_public(base64.b64decode(enrollment["akPublic"], validate=True))
        check_ak_attributes(public)
        if public.name.hex() != enrollment["akName"]:
            raise RuntimeError("AK name")
        expectation = Expectation.of(
            reference,
            ak=public,
            nonce=bytes.fromhex(evidence["nonce"]),
            signer=qualified_signer(ek_name, public.name),
        )
        verify_quote(parse_evidence(evidence), expectation)

    return {
        "bare": bare,
        "full": full,
        "agent": agent,
        "agent_cold": agent_cold,
        "cycle": _bound_member(q, ca),
    }


LABELS = {
    "bare": "baseline (ECDSA P-256 signature check only)",
    "full": "full verification (parse + all checks)",
    "agent": "from the bytes an agent writes (AK memoized)",
    "agent_cold": "the same, AK public area parsed every time",
    "cycle": "operator cycle (attestation_step, one verdict)",
}


def run(iterations: int) -> dict[str, float]:
    """Per-call seconds of every path and their ratios to the bare signature check."""
    with tempfile.TemporaryDirectory() as d:
        procs = ProcessTable(Path(d))
        ca = SwtpmCA(Path(d) / "ca").ensure()
        tpm = Swtpm("bench", Path(d) / "tpm", procs)
        tpm.manufacture(ca)
        tpm.start()
        try:
            q = real_quote(tpm.tcti, Path(d) / "agent")
        finally:
            tpm.stop()
        paths = _paths(q, ca)
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(5):  # interleaved, so every path sees the same machine load
        for name, fn in paths.items():
            best[name] = min(best[name], best_per_call(fn, iterations, repeats=1))
    print(f"bench_verify: {iterations} iterations, best of 5, interleaved, CPU time per call")
    ratios: dict[str, float] = {}
    for name, seconds in best.items():
        ratio = seconds / best["bare"]
        ratios[name] = ratio
        target = f" (target <= {TARGETS[name]})" if name in TARGETS else ""
        shown = "" if name == "bare" else f"  {ratio:5.2f}x{target}"
        print(f"  {LABELS[name]:<48} {seconds * 1e6:8.1f} us{shown}")
    print(f"  ratio full/baseline: {ratios['full']:.2f} (target <= {TARGETS['full']})")
    print(f"  ratio agent-bytes/baseline: {ratios['agent']:.2f} (target <= {TARGETS['agent']})")
    return ratios


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--iterations", type=int, default=2000)
    args = p.parse_args(argv)
    run(args.iterations)
    return 0


if __name__ == "__main__":
    sys.exit(main())
