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
