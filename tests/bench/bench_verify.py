"""Benchmark: full quote verification against a bare signature check of the same quote.

Run: `python -m tests.bench.bench_verify [--iterations N]` (or `make bench`). Uses a real
quote from a fresh swtpm. Baseline: only the AK's ECDSA signature over the TPMS_ATTEST
bytes (the signature pre-decoded, the key pre-loaded). Full: `verify_quote`, i.e. parsing
the signature and the attestation, every check in order, and the golden-value comparison.
Prints both per-quote costs and their ratio (target: <= 1.5).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from gtvp.core.quote import verify_quote
from gtvp.core.tpm_wire import parse_signature
from gtvp_local.processes import ProcessTable
from gtvp_local.swtpm import Swtpm, SwtpmCA
from tests.tpmkit import real_quote


def best_per_call(fn: Callable[[], object], iterations: int, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        best = min(best, (time.perf_counter() - start) / iterations)
    return best


def run(iterations: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        procs = ProcessTable(Path(d))
        tpm = Swtpm("bench", Path(d) / "tpm", procs)
        tpm.manufacture(SwtpmCA(Path(d) / "ca").ensure())
        tpm.start()
        try:
            q = real_quote(tpm.tcti, Path(d) / "agent")
        finally:
            tpm.stop()
    ev, exp = q.evidence(), q.expectation()
    verify_quote(ev, exp)  # it verifies
    key = exp.ak.key
    assert isinstance(key, ec.EllipticCurvePublicKey)
    sig = parse_signature(ev.signature)
    der = encode_dss_signature(sig.r, sig.s)
    attest = ev.attest

    def bare() -> None:
        key.verify(der, attest, ec.ECDSA(hashes.SHA256()))

    def full() -> None:
        verify_quote(ev, exp)

    bare_s = full_s = float("inf")
    for _ in range(5):  # interleaved, so both see the same machine load
        bare_s = min(bare_s, best_per_call(bare, iterations, repeats=1))
        full_s = min(full_s, best_per_call(full, iterations, repeats=1))
    ratio = full_s / bare_s
    print(f"bench_verify: {iterations} iterations, best of 5")
    print(f"  baseline (ECDSA P-256 signature check only): {bare_s * 1e6:8.1f} us/quote")
    print(f"  full verification (parse + all checks):      {full_s * 1e6:8.1f} us/quote")
    print(f"  ratio full/baseline: {ratio:.2f} (target <= 1.5)")
    return ratio


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--iterations", type=int, default=2000)
    args = p.parse_args(argv)
    run(args.iterations)
    return 0


if __name__ == "__main__":
    sys.exit(main())
