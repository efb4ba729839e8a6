"""The benchmarks run (a few iterations) so that `make bench` cannot rot unnoticed.

No timing is asserted here: figures come from `make bench`, as ratios against a baseline
measured in the same run.
"""

from __future__ import annotations

import pytest

from tests.bench import bench_verify

pytestmark = pytest.mark.tpm


def test_verification_benchmark_runs_and_reports_a_ratio(
    capsys: pytest.CaptureFixture[str],
) -> None:
    ratio = bench_verify.run(iterations=20)
    assert ratio > 0
    assert "ratio full/baseline" in capsys.readouterr().out


@pytest.mark.controlplane
@pytest.mark.e2e
def test_quarantine_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.bench import bench_quarantine

    p50, p99 = bench_quarantine.run(runs=2)
    assert 0 < p50 <= p99
    assert "ratio quarantine/baseline" in capsys.readouterr().out
