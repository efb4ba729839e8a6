"""Benchmark: the operator's memory per member for what it works out once per binding.

Run: `python -m tests.bench.bench_member_memory [--members N]` (or `make bench`). Issue #12
caps an operator replica at 400 MiB with 10,000 members; besides its view of the Members,
each member costs the operator what `attestation_step` memoizes per binding so that a cycle
is one parse and one signature check: the EK's facts (`enrolment.ek_facts`), the AK's
parsed public area and key (`enrolment.ak_facts`), the EK certificate checked as a TCG EK
certificate with its validated path (`enrolment.check_ek_certificate`) and the AK's
qualified name (`tpm_wire.qualified_signer`).

N members are made with software-held keys (`tests.softtpm`: an ECC P-256 EK certified by a
software CA, an AK), in a fresh interpreter so that nothing else is in memory; the
resident set is read before and after the operator's per-binding checks run once for each,
with a full garbage collection first. Baseline, same process: the bytes those checks start
from (EK public area, EK certificate, AK public area), which any verifier has to hold.
Prints KiB per member for each memo and in all, and the ratio to the baseline. Nothing is
asserted: the resident set also counts the allocator's own slack.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _rss_kib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure(members: int) -> dict[str, float]:
    """In this process: KiB per member of each memo, and of the bytes they start from."""
    from gtvp.core import enrolment
    from gtvp.core.tpm_wire import qualified_signer
    from tests.softtpm import SoftCA, SoftTpm

    ca = SoftCA()
    bundle = ca.bundle_pem()
    keys = [SoftTpm(ca).enrolment() for _ in range(members)]
    gc.collect()
    before = _rss_kib()
    inputs = [
        (bytes(k.ek_public), bytes(k.ak_public), bytes(k.ek_certificate or b"")) for k in keys
    ]
    del keys
    gc.collect()
    got = {"bytes": (_rss_kib() - before) / members}
    now = dt.datetime.now(dt.UTC)

    def step(what: str, check: Callable[[tuple[bytes, bytes, bytes]], object]) -> None:
        start = _rss_kib()
        for item in inputs:
            check(item)
        gc.collect()
        got[what] = (_rss_kib() - start) / members

    step("ek_facts", lambda i: enrolment.ek_facts(i[0]))
    step("ak_facts", lambda i: enrolment.ak_facts(i[1]))
    step(
        "ek_certificate",
        lambda i: enrolment.check_ek_certificate(
            ek_spki=enrolment.ek_facts(i[0]).spki,
            certificate=i[2],
            presented_chain=(),
            ca_bundle_pem=bundle,
            now=now,
        ),
    )
    step(
        "qualified_signer",
        lambda i: qualified_signer(
            enrolment.ek_facts(i[0]).name, enrolment.ak_facts(i[1]).public.name
        ),
    )
    got["exact_bytes"] = sum(len(b) for item in inputs for b in item) / members / 1024
    return got


def run(members: int = 5000) -> dict[str, float]:
    """Measure in a fresh interpreter and print the figures."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / d) for d in _PATHS)}
    out = subprocess.run(
        [sys.executable, "-m", "tests.bench.bench_member_memory", "--child", str(members)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    got: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    memo = sum(got[k] for k in ("ek_facts", "ak_facts", "ek_certificate", "qualified_signer"))
    baseline = max(got["bytes"], got["exact_bytes"])
    print(f"bench_member_memory: {members} members with software-held keys, one interpreter")
    for what in ("ek_facts", "ak_facts", "ek_certificate", "qualified_signer"):
        print(f"  {what}: {got[what]:.2f} KiB per member")
    print(
        f"  per-binding memo in all: {memo:.2f} KiB per member "
        f"({memo * 10_000 / 1024:.0f} MiB at 10,000 members)"
    )
    print(
        f"  baseline, same process: the bytes it starts from, {baseline:.2f} KiB per member "
        f"(exactly {got['exact_bytes']:.2f} KiB of key and certificate bytes); "
        f"ratio memo/baseline {memo / baseline:.1f}x"
    )
    print(f"  load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return {"memo": memo, "baseline": baseline, "ratio": memo / baseline}


_PATHS = (".", "operator", "attestation-agent", "local")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--members", type=int, default=5000)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child)))
        return 0
    run(args.members)
    return 0


if __name__ == "__main__":
    sys.exit(main())
