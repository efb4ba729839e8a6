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
    ratios = bench_verify.run(iterations=20)
    assert ratios["full"] > 0
    assert ratios["agent"] > 0
    out = capsys.readouterr().out
    assert "ratio full/baseline" in out
    assert "ratio agent-bytes/baseline" in out


@pytest.mark.controlplane
@pytest.mark.e2e
def test_quarantine_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.bench import bench_quarantine

    p50, p99 = bench_quarantine.run(runs=2)
    assert 0 < p50 <= p99
    assert "ratio quarantine/baseline" in capsys.readouterr().out


def test_member_memory_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.bench import bench_member_memory

    got = bench_member_memory.run(members=300)
    assert got["memo"] > 0
    assert got["baseline"] > 0
    assert "ratio memo/baseline" in capsys.readouterr().out


def test_box_plan_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.bench import bench_box_plan

    got = bench_box_plan.run(components=80, members=30, boxes=10)
    assert got["median"] > 0
    assert got["cache_ratio"] >= 1.0  # cache-aware never caches less than a random pick
    out = capsys.readouterr().out
    assert "ratio" in out


@pytest.mark.controlplane
@pytest.mark.e2e
def test_box_placement_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.bench import bench_box_placement

    got = bench_box_placement.run(members=8, boxes=8, components=80)
    assert got["placed"] == 8
    assert "boxes placed in" in capsys.readouterr().out


def test_cli_startup_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.bench import bench_cli_startup

    got = bench_cli_startup.run(runs=2)
    assert got["gtvp --help"]["median"] > 0
    assert "gtvp verify-quote (real quote)" in got  # swtpm and tpm2-tools: the tpm mark
    assert "vs 120 ms" in capsys.readouterr().out


@pytest.mark.controlplane
@pytest.mark.e2e
def test_failover_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from gtvp_local.replicas import LeaseTimings
    from tests.bench import bench_failover

    got = bench_failover.run(members=12, interval=6, timings=LeaseTimings(4, 2.5, 0.5))
    assert got["orphans"] > 0
    assert got["failover"] > 0
    assert "ratio failover/baseline" in capsys.readouterr().out


def _real_vms() -> None:
    """The box benchmarks need real VMs and the monolithic image's inputs."""
    from tests.bench import bench_box_boot
    from tests.prerequisites import unavailable

    missing = bench_box_boot.missing_prerequisites()
    if missing:
        unavailable("; ".join(missing))


@pytest.mark.controlplane
@pytest.mark.e2e
def test_box_boot_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.bench import bench_box_boot

    _real_vms()
    got = bench_box_boot.run(runs=1)
    assert all(got[k] > 0 for k in ("box warm", "box cold", "mono warm", "mono cold"))
    out = capsys.readouterr().out
    assert "ratio box/monolithic" in out
    assert "load average" in out


@pytest.mark.controlplane
@pytest.mark.e2e
def test_box_migration_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.bench import bench_box_migration

    _real_vms()
    # unshaped links, a short settle (quicker); the run raises when a cold target's
    # components did not come from exactly the Trusted holders it was given (1, then 3)
    got = bench_box_migration.run(runs=1, uplink_mbit=0, settle=1.0)
    assert got["mono_bytes"] > 0
    assert 0 < got["warm_ratio"] < got["cold1_ratio"]  # a cold target fetches more
    assert got["warm_component_bytes"] < got["component_size"] / 10  # nothing fetched
    for cold in ("cold1_component_bytes", "cold3_component_bytes"):
        # pre-fetched: on the target's link before the migration object existed
        assert got[cold] >= got["component_size"], (cold, got)
    out = capsys.readouterr().out
    assert "ratio box-warm/monolithic" in out
    assert "box, cold, 3 sources" in out
    assert "load average" in out


@pytest.mark.controlplane
@pytest.mark.e2e
def test_component_fetch_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.bench import bench_component_fetch

    _real_vms()
    assert bench_component_fetch.main(["--runs", "1", "--uplink-mbit", "50"]) == 0
    out = capsys.readouterr().out
    assert "3 peers / 1 peer time:" in out
    assert "load average" in out


def test_balance_model_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.bench import bench_balance_model

    got = bench_balance_model.run([7, 1])
    assert got["traces"] == 3
    assert got["ratio"] > 0
    assert "(MODEL of the replay)" in capsys.readouterr().out
